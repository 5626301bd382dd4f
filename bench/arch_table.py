"""`python -m bench.arch_table`: pack and stream every MoE model file of the installed mlx-lm and
write the architecture table of docs/store.md (and bench/results/arch-table.json).

Each covered architecture is built tiny (flashmesh.testing.arch_configs) in fp32 and 4-bit affine,
packed, and run at two budgets (every expert in RAM, and the minimum: one layer's top-k) against
mlx-lm on the unpacked model: "exact" means greedy tokens equal in all four runs. A failure is
written into the table as it happened. tests/test_architectures.py checks the same cases and that
the committed table names every model file with the status this script writes.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from importlib.metadata import version
from pathlib import Path

from flashmesh.node.expert_banks import find_expert_banks, submodule
from flashmesh.node.experts import load_lazy
from flashmesh.testing.arch_check import (
    BUDGETS,
    EXACT,
    TABLE_END,
    TABLE_START,
    build_and_pack,
    expected_statuses,
    reference,
    render_table,
    streamed,
)
from rich.progress import Progress

from bench.cli import write_result

DOC = Path("docs/store.md")


def check(root: Path, arch: str) -> tuple[str, str]:
    """(status, description of the banks pack found) for one covered architecture."""
    for quant in ("fp32", "4bit"):
        try:
            packed = build_and_pack(root, arch, quant=quant)
            prompt, ref = reference(packed)
            for which in BUDGETS:
                if streamed(packed, prompt, which).tokens != ref.tokens:
                    return f"differs from mlx-lm ({quant}, budget {which})", ""
        except Exception as e:  # any failure is what the table must report
            return f"fails ({quant}): {type(e).__name__}: {str(e).splitlines()[0][:160]}", ""
        if quant == "fp32":
            banks = describe_banks(packed.source)
    return EXACT, banks


def describe_banks(source: Path) -> str:
    """e.g. "`model.layers.N.mlp.switch_mlp` (SwitchGLU)": the banks' paths, any layer, and classes."""
    model, _ = load_lazy(source, strict=True)
    found = find_expert_banks(model)
    paths = sorted({re.sub(r"\.\d+(\.|$)", r".N\1", b.path) for b in found})
    kinds = set()
    for b in found:
        bank = submodule(model, b.path)
        kinds.add(f"list of {type(bank[0]).__name__}" if b.kind == "list" else type(bank).__name__)
    return ", ".join(f"`{p}`" for p in paths) + f" ({', '.join(sorted(kinds))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="check only these model files (the table is not written)")
    args = parser.parse_args()
    statuses = expected_statuses()
    banks: dict[str, str] = {}
    todo = [a for a, s in statuses.items() if s == EXACT and (not args.only or a in args.only)]
    with tempfile.TemporaryDirectory(prefix="arch-table-") as tmp, Progress() as progress:
        task = progress.add_task("architectures", total=len(todo))
        for arch in todo:
            statuses[arch], banks[arch] = check(Path(tmp), arch)
            progress.advance(task)
    if args.only:
        for arch in todo:
            print(f"{arch}: {statuses[arch]} {banks[arch]}")
        return 0 if all(statuses[a] == EXACT for a in todo) else 1
    table = render_table(statuses, banks, mlx_lm_version=version("mlx-lm"))
    text = DOC.read_text()
    DOC.write_text(text[: text.index(TABLE_START)] + table + text[text.index(TABLE_END) + len(TABLE_END) :])
    path = write_result("arch-table", {"mlx_lm": version("mlx-lm"), "statuses": statuses, "banks": banks})
    print(f"wrote the table into {DOC} and {path}")
    return 0 if all(s == EXACT or s.startswith(("refused", "not checked")) for s in statuses.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
