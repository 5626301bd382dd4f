"""What serving from an iPhone bundle costs a node: the fp16 -> fp32 upcast per record load, next to the
aligned flash read of the same records, in one run (a ratio, not a bare time).

    python -m bench.bundle_node /work/fmbig10/big.flashmesh-ios --records 8 --rounds 6

Each round reads `records` random experts of one layer with the node's reader (O_DIRECT, several
preads in flight), waits for the reads alone, then times the checksum and the conversion that
`BundleExpertSource` does on the node's MLX thread.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import wait
from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.node.store_format import checksum
from flashmesh.node.store_reader import ExpertStore


def run_bundle_node_bench(bundle: Path, *, records: int = 8, rounds: int = 6, seed: int = 0) -> dict:
    rng = random.Random(seed)
    io = check = convert = 0.0
    nbytes = 0
    with BundleExpertSource(bundle) as source:
        layers = [s.layer for s in source.manifest.layers]
        for _ in range(rounds):
            layer = rng.choice(layers)
            spec = source._specs[layer]
            experts = rng.sample(spec.experts, records)
            start = time.perf_counter()
            pending = source.submit(layer, experts)
            wait([f for _, futures in pending.jobs.values() for f in futures])
            io += time.perf_counter() - start
            nbytes += records * spec.record_size
            start = time.perf_counter()
            for e, (skew, _) in pending.jobs.items():
                host = memoryview(np.array(pending.raws[e], copy=False))[skew : skew + spec.record_size]
                assert checksum(host) == spec.record_checksum(e)
            check += time.perf_counter() - start
            views = {
                e: ExpertStore._arrays(source, pending.raws[e], skew, spec) for e, (skew, _) in pending.jobs.items()
            }
            mx.eval([a for v in views.values() for a in v.values()])
            start = time.perf_counter()
            converted = {e: source._arrays(pending.raws[e], skew, spec) for e, (skew, _) in pending.jobs.items()}
            mx.eval([a for v in converted.values() for a in v.values()])
            convert += time.perf_counter() - start
    return {
        "bundle": str(bundle),
        "expert_input": source.expert_input,
        "record_bytes": spec.record_size,
        "records_read": records * rounds,
        "bypassing_page_cache": source.bypassing_cache,
        "read_gbps": nbytes / io / 1e9,
        "checksum_over_read": check / io,
        "upcast_over_read": convert / io,
        "ram_bytes_per_record": source.layer(layer).payload_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--records", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    from bench.cli import write_result

    result = run_bundle_node_bench(args.bundle, records=args.records, rounds=args.rounds)
    path = write_result(f"bundle-node-{args.bundle.stem}", result)
    print(json.dumps(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
