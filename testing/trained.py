"""The tiny MoE trained on English text, shipped with the project for the demo.

`python -m bench.train_tiny OUT --ship testing/tiny_moe` trains it (mlx-lm's qwen3_moe, 8 MoE
layers x 32 experts, top-4, on Debian's python3-doc) and writes the copy shipped here: its weights in
float16 (15 MB; the trained weights were rounded to float16 before evaluation, so nothing is lost),
config, tokenizer, training facts and the SHA-256 of every file. `materialize` checks those sums and
writes an ordinary mlx-lm model directory in float32 (MLX's CPU expert matmul needs float32).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from flashmesh.node.store_format import staged_directory
from flashmesh.protos.errors import UserError

SHIPPED = Path(__file__).parent / "tiny_moe"
TRAINED_SHAPE = {"hidden": 128, "layers": 8, "experts": 32, "top_k": 4, "expert_hidden": 64}
WEIGHTS = "model.fp16.safetensors"
CHECKSUMS = "checksums.json"
_NOT_SHIPPED = {"model.safetensors", CHECKSUMS}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ship(model_dir: Path, out: Path = SHIPPED) -> Path:
    """Write the shipped copy of a trained model directory (float16 weights + checksums) to `out`."""
    import mlx.core as mx

    model_dir = Path(model_dir)
    with staged_directory(out) as tmp:
        weights = {k: v.astype(mx.float16) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
        mx.save_safetensors(str(tmp / WEIGHTS), weights, metadata={"format": "mlx"})
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name not in _NOT_SHIPPED:
                shutil.copy2(f, tmp / f.name)
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
    return Path(out)


def verify(shipped: Path = SHIPPED) -> dict[str, str]:
    """Check every shipped file against checksums.json; return the sums."""
    try:
        sums = json.loads((shipped / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{shipped / CHECKSUMS} is missing or unreadable ({e}); re-checkout the repository") from None
    for name, expected in sums.items():
        path = shipped / name
        if not path.is_file() or _sha256(path) != expected:
            raise UserError(
                f"{path} is missing or does not match its SHA-256 (a partial checkout or a Git LFS pointer?); "
                "re-checkout it, or re-create it with `python -m bench.train_tiny OUT --ship testing/tiny_moe`"
            )
    return sums


def digest(shipped: Path = SHIPPED) -> str:
    """A short identity of the shipped model (its weights' SHA-256, first 12 hex digits)."""
    return verify(shipped)[WEIGHTS][:12]


def materialize(directory: Path, shipped: Path = SHIPPED) -> Path:
    """Write the shipped model as an mlx-lm model directory with float32 weights (atomically)."""
    import mlx.core as mx

    verify(shipped)
    with staged_directory(Path(directory)) as tmp:
        for f in sorted(shipped.iterdir()):
            if f.name not in (WEIGHTS, CHECKSUMS):
                shutil.copy2(f, tmp / f.name)
        weights = {k: v.astype(mx.float32) for k, v in mx.load(str(shipped / WEIGHTS)).items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    return Path(directory)
