"""The big synthetic model of the larger-than-RAM benchmarks: qwen3_moe shape, random fp32 weights.

    python -m bench.bigmodel [--source DIR] [--store DIR] [--layers 8] [--knobs CALIBRATION.json | --random-routing]

Hidden 1024, 64 experts per layer, top-8, expert FFN width 512: one expert is 6 MiB in fp32, so
8 layers hold 3.2 GB of experts (12 layers: 4.8 GB). Built with mlx-lm's own qwen3_moe class, one
decoder layer at a time (bench/bigsource.py), and packed with `flashmesh pack`; both steps are
skipped when their output exists. By default its embeddings, lm_head and routers are made so that
its routing statistics match the trained tiny model's (bench/realistic.py, knobs from
`python -m bench.realistic`); `--random-routing` keeps mlx-lm's random init everywhere, whose
routing is degenerate (every token to nearly the same experts; greedy decoding repeats one token).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from flashmesh.node.store_format import MANIFEST
from flashmesh.node.store_writer import pack

log = logging.getLogger(__name__)

BIG_SHAPE = {"hidden": 1024, "layers": 8, "experts": 64, "top_k": 8, "expert_hidden": 512}
CALIBRATION = Path("bench/results/realistic-calibration.json")


def prepare_big(
    source: Path, store: Path, *, layers: int = 8, knobs=None, show_progress: bool = True
) -> tuple[Path, Path]:
    """Build (once) and pack (once) the big model; return (store, source model directory).
    knobs: bench.realistic.RoutingKnobs for realistic routing, None for mlx-lm's random init."""
    from bench.bigsource import build_big_source
    from bench.realistic import realistic_tensors

    source, store = Path(source), Path(store)
    shape = {**BIG_SHAPE, "layers": layers}
    if not (source / "config.json").is_file():
        log.info("building %s", source)
        replace = None if knobs is None else (lambda config: realistic_tensors(config, knobs))
        build_big_source(source, "qwen3_moe", replace=replace, show_progress=show_progress, **shape)
        if knobs is not None:
            (source / "routing_knobs.json").write_text(json.dumps(knobs.__dict__, indent=1))
    if not (store / MANIFEST).is_file():
        pack(str(source), store, force=True, show_progress=show_progress)
    return store, source


def main() -> None:
    from bench.realistic import RoutingKnobs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(".flashmesh/big/src"), help="model directory")
    parser.add_argument("--store", type=Path, default=Path(".flashmesh/big/store"), help="packed store")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--knobs", type=Path, default=CALIBRATION, help="`python -m bench.realistic` output")
    parser.add_argument("--random-routing", action="store_true", help="mlx-lm's random init (degenerate routing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    knobs = None
    if not args.random_routing:
        if not args.knobs.is_file():
            parser.error(f"{args.knobs} is missing: run `python -m bench.realistic`, or pass --random-routing")
        knobs = RoutingKnobs(**json.loads(args.knobs.read_text())["knobs"])
    store, source = prepare_big(args.source, args.store, layers=args.layers, knobs=knobs)
    print(f"source {source}\nstore {store}")


if __name__ == "__main__":
    main()
