"""`flashmesh bench ...`: benchmarks that write their results to bench/results/*.json.

Benchmarks never run in the test suite. Every figure they report is a ratio measured inside one
run (engine vs fio, streamed vs in-RAM), never a bare time compared across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_WORKDIR = Path(".flashmesh/demo")


def write_result(name: str, result: dict, *, out: Path | None = None) -> Path:
    """Write `result` (plus host facts) to bench/results/<name>.json; return the path."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **result,
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def _store_or_demo(store: Path | None) -> Path:
    if store is not None:
        return store
    from coordinator.demo import prepare_demo

    built, _ = prepare_demo(DEMO_WORKDIR, show_progress=False)
    return built


def cmd_io(args: argparse.Namespace) -> int:
    from bench.io import run_io_bench

    store = _store_or_demo(args.store)
    qds = tuple(int(q) for q in args.queue_depths.split(","))
    result = run_io_bench(store, queue_depths=qds, seconds=args.seconds, rounds=args.rounds, verify=not args.no_verify)
    path = write_result(args.name or f"io-{store.name}", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"store {store} ({result['record_bytes']} B records, file {result['file_bytes'] / 1e6:.1f} MB)")
        print(f"{'qd':>4} {'fio GB/s':>10} {'engine GB/s':>12} {'ratio':>7} {'sync GB/s':>10}")
        for qd in qds:
            f, e = result["fio_gbps_by_qd"][str(qd)], result["engine_gbps_by_qd"][str(qd)]
            y = result["engine_sync_gbps_by_qd"][str(qd)]
            print(f"{qd:>4} {f:>10.3f} {e:>12.3f} {e / f if f else 0:>7.2f} {y:>10.3f}")
        print(
            f"best: engine {result['engine_gbps']:.3f} GB/s / fio {result['fio_gbps']:.3f} GB/s = {result['ratio']:.2f}"
        )
        print(f"written to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flashmesh bench ...` to the parser."""
    bench = sub.add_parser("bench", help="benchmarks (results to bench/results/*.json)")
    bsub = bench.add_subparsers(dest="bench", required=True)

    p = bsub.add_parser("io", help="store fetch path vs fio random reads at the record size, same file, same run")
    p.set_defaults(func=cmd_io)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--queue-depths", default="1,8,16,32")
    p.add_argument("--seconds", type=float, default=1.0, help="per trial, per queue depth, per side")
    p.add_argument("--rounds", type=int, default=3, help="interleaved fio/engine trials per queue depth (median)")
    p.add_argument("--no-verify", action="store_true", help="skip record checksums on the engine side")
    p.add_argument("--name", default=None, help="result file name (default io-<store>)")
    p.add_argument("--json", action="store_true")
