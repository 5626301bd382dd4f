"""The big synthetic model of the larger-than-RAM benchmarks: qwen3_moe shape, random fp32 weights.

    python -m bench.bigmodel [--source /work/fmbig/src] [--store /work/fmbig/store] [--layers 8]

Hidden 1024, 64 experts per layer, top-8, expert FFN width 512: one expert is 6 MiB in fp32, so
8 layers hold 3.2 GB of experts (12 layers: 4.8 GB). Built with mlx-lm's own qwen3_moe class and
packed with `flashmesh pack`; both steps are skipped when their output exists.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flashmesh.node.store_format import MANIFEST
from flashmesh.node.store_writer import pack
from flashmesh.testing.synthetic import build_model

log = logging.getLogger(__name__)

BIG_SHAPE = {"hidden": 1024, "layers": 8, "experts": 64, "top_k": 8, "expert_hidden": 512}


def prepare_big(source: Path, store: Path, *, layers: int = 8, show_progress: bool = True) -> tuple[Path, Path]:
    """Build (once) and pack (once) the big model; return (store, source model directory)."""
    source, store = Path(source), Path(store)
    shape = {**BIG_SHAPE, "layers": layers}
    if not (source / "config.json").is_file():
        log.info("building %s", source)
        build_model(source, "qwen3_moe", **shape)
    if not (store / MANIFEST).is_file():
        pack(str(source), store, force=True, show_progress=show_progress)
    return store, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(".flashmesh/big/src"), help="model directory")
    parser.add_argument("--store", type=Path, default=Path(".flashmesh/big/store"), help="packed store")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    store, source = prepare_big(args.source, args.store, layers=args.layers)
    print(f"source {source}\nstore {store}")


if __name__ == "__main__":
    main()
