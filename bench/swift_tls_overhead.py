"""What mutual TLS costs the Swift node (`flashmesh-node --tls`), as bench/tls_overhead.py measures it for the
Python node, from one run:

    .venv/bin/python -m bench.swift_tls_overhead [--work /work/data/swifttls/bench] [--calls 300] [--rounds 4]

1. Per RPC, interleaved: a plaintext and a TLS Swift node serve the same bundle side by side (every expert
   in RAM); the same Compute request (one decode token's top-k experts of one layer, and a 32-token
   prefill chunk) goes to each in turn, `--calls` times; median and p90 latency, TLS / plaintext.
   Likewise a fresh channel + Info (the handshake's cost).
2. Whole generations: one-node clusters over the plaintext and the TLS node in turn (`--rounds`
   alternations, the order swapped each round); median decode tok/s per mode and their ratio.
The model is bench/swift_node.py's random qwen3_moe (fp16 bundle, 1.5 MiB records): random routing, so
only the ratio of the two transports on the same work means something. Writes the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from flashmesh.coordinator.certs import init_cluster, issue
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.testing.swift_node import MixedNodeProcesses, node_binary

from bench.cli import write_result
from bench.swift_node import PROMPT, SHAPE, TOKEN, prepare
from bench.tls_overhead import interleaved_rpcs, save_figure

MODES = ("plaintext", "tls")


def _decode(dense: Path, address, *, tls_dir: Path | None, max_tokens: int) -> float:
    streaming = open_model(ModelOptions(store=dense, cluster=True, nodes=(address,), token=TOKEN, tls=tls_dir))
    try:
        prompt = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
        return generate(
            streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=max_tokens)
        ).decode_tokens_per_s
    finally:
        streaming.close()


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rpc = result["rpc_interleaved"]
    width = 0.35
    for j, mode in enumerate(MODES):
        axes[0].bar([i + (j - 0.5) * width for i in range(len(rpc))], [r[f"{mode}_ms_median"] for r in rpc.values()],
                    width, label=mode)  # fmt: skip
        axes[1].bar([j], [result["decode"][f"{mode}_tokens_per_s_median"]], 0.6, label=mode)
    axes[0].set_xticks(range(len(rpc)), [k.replace("_", " ") for k in rpc], fontsize=8)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("one RPC to the Swift node, interleaved")
    axes[1].set_xticks(range(len(MODES)), MODES)
    axes[1].set_ylabel("decode tok/s (median)")
    axes[1].set_title(f"one-node cluster, ratio {result['decode']['tls_ratio']:.2f}")
    save_figure(fig, axes, "Swift node: mutual TLS vs plaintext on loopback (random qwen3_moe bundle, one run)", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/work/data/swifttls/bench"))
    parser.add_argument("--calls", type=int, default=300, help="interleaved RPCs per mode and request shape")
    parser.add_argument("--rounds", type=int, default=4, help="plaintext/TLS alternations of whole generations")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench/results/swift-tls-overhead.json"))
    args = parser.parse_args()

    binary = node_binary()
    if binary is None:
        raise SystemExit("no Swift toolchain: cannot build flashmesh-node")
    bundle, dense = prepare(args.work)
    source = BundleExpertSource(bundle)
    budget = source.manifest.expert_bytes_total
    source.close()
    with tempfile.TemporaryDirectory(prefix="swifttls-bench-") as tmp:
        tls_dir = Path(tmp) / "cluster"
        init_cluster(tls_dir)
        nodes = MixedNodeProcesses([bundle, bundle], kinds=["swift", "swift"], binary=binary, budgets=[budget] * 2,
                                   token=TOKEN, logdir=args.work / "logs", flash_gbps=1.0)  # fmt: skip
        nodes.node_args = [[], ["--tls", str(issue(tls_dir, nodes.names[1], out=Path(tmp) / "node"))]]
        try:
            for i in range(2):
                nodes.start(i)
            plain, secure = nodes.find(timeout=120)
            rpc = interleaved_rpcs(plain, secure, token=TOKEN, tls_dir=tls_dir, calls=args.calls, k=SHAPE["top_k"])
            for label, r in rpc.items():
                print(f"{label:>22}: TLS / plaintext median {r['tls_median_ratio']:.2f}x "
                      f"(p90 {r['tls_ms_p90'] / r['plaintext_ms_p90']:.2f}x)")  # fmt: skip
            speeds: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    address, tls = (plain, None) if mode == "plaintext" else (secure, tls_dir)
                    speeds[mode].append(_decode(dense, address, tls_dir=tls, max_tokens=args.max_tokens))
        finally:
            nodes.stop()
    decode = {f"{m}_tokens_per_s_median": statistics.median(v) for m, v in speeds.items()}
    decode["tls_ratio"] = decode["tls_tokens_per_s_median"] / decode["plaintext_tokens_per_s_median"]
    print(f"decode tok/s, TLS / plaintext (median of {args.rounds}): {decode['tls_ratio']:.2f}x")
    result = {
        "model": f"random qwen3_moe {SHAPE}, fp16 bundle, every expert cached",
        "rpc_interleaved": rpc,
        "decode": {**decode, "rounds": speeds, "max_tokens": args.max_tokens},
    }
    path = write_result("swift-tls-overhead", result, out=args.out)
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
