"""A large random-weight model written tensor group by tensor group, for measurements at real sizes.

coordinator/synthetic.build_model evaluates the whole model in RAM before saving; a model larger than
a few GB must not. Here the model is built lazily from mlx-lm's own class (MLX draws a random init
only when a tensor is evaluated), and each decoder layer is evaluated, saved to its own
`model-NNNNN.safetensors` (mlx-lm loads every `model*.safetensors`) and dropped, so peak RAM is about
one layer's weights.

    python -m bench.bigsource /work/fmbig10/src --layers 8 --experts 128 --expert-hidden 896 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from flashmesh.testing.synthetic import writing_model
from mlx.utils import tree_flatten
from rich.progress import Progress


def build_big_source(
    directory: Path,
    arch: str = "qwen3_moe",
    *,
    dtype: str = "float32",
    seed: int = 0,
    show_progress: bool = True,
    replace: Callable[[dict], dict[str, mx.array]] | None = None,
    **shape,
) -> dict:
    """Write the model to `directory` (atomically), one safetensors file per decoder layer; return facts.
    replace: config -> tensors (by parameter name) written instead of the random init's."""
    total = 0
    with writing_model(directory, arch, seed=seed, **shape) as (tmp, config, model):
        params = dict(tree_flatten(model.parameters()))  # lazy: nothing drawn yet
        replacements = replace(config) if replace is not None else {}
        del model  # only `params` holds the weights now, so each group is freed once written
        groups: dict[str, list[str]] = {}
        for name in params:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            groups.setdefault(f"layer{int(m.group(1)):05d}" if m else "other", []).append(name)
        with Progress(disable=not show_progress) as progress:
            task = progress.add_task("writing source layers", total=len(groups))
            for i, (_, names) in enumerate(sorted(groups.items())):
                chunk = {n: replacements.get(n, params.pop(n)).astype(getattr(mx, dtype)) for n in names}
                mx.eval(chunk)
                total += sum(a.nbytes for a in chunk.values())
                mx.save_safetensors(str(tmp / f"model-{i:05d}.safetensors"), chunk, metadata={"format": "mlx"})
                del chunk
                progress.advance(task)
    return {"arch": arch, "dtype": dtype, "weight_bytes": total, "config": config}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=896)
    args = p.parse_args()
    facts = build_big_source(
        args.out,
        args.arch,
        dtype=args.dtype,
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden,
    )
    print(json.dumps({k: v for k, v in facts.items() if k != "config"}))


if __name__ == "__main__":
    main()
