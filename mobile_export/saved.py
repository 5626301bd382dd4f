"""Reading saved .mlpackage files back as MIL programs (coremltools only, nothing compiled)."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.converters.mil.mil import Program
from flashmesh.protos.errors import UserError


def load_saved_program(package: Path) -> Program:
    """The saved package's MIL program, every function, weights read from its blob file."""
    package = Path(package)
    try:
        model = ct.models.MLModel(str(package), skip_model_load=True)
        spec = model.get_spec()
        weights = (
            Path(model.weights_dir)
            if getattr(model, "weights_dir", None)
            else package / "Data/com.apple.CoreML/weights"
        )
        return load_milproto(spec, spec.specificationVersion, file_weights_dir=str(weights))
    except UserError:
        raise
    except Exception as e:  # protobuf / blob errors come in many types; all mean "cannot be read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{package} cannot be reloaded by coremltools: {first}") from None


def consts(program: Program) -> dict[str, object]:
    """const name -> numpy value, over all functions."""
    out = {}
    for func in program.functions.values():
        for op in func.operations:
            if op.op_type == "const":
                out[op.name] = op.outputs[0].val
    return out
