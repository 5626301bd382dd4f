"""What mutual TLS costs between coordinator and nodes, on loopback with the demo model, from one run.

    .venv/bin/python -m bench.tls_overhead [--calls 400] [--nodes 1 3] [--rounds 2] [--out FILE.json]

1. Per RPC, interleaved: one plaintext and one TLS node process serve the same store side by side;
   the same Compute request (one decode token's top-k experts of one layer, and a 32-token prefill
   chunk) goes to each in turn, `--calls` times, so machine load hits both alike; median and p90
   latency and their TLS/plaintext ratio. Likewise a fresh channel + Info (the handshake's cost).
2. Whole generations: for each node count, plaintext and TLS clusters started in turn (`--rounds`
   alternations), every node's budget holding its shard; best decode tok/s and mean MoE layer
   dispatch latency per mode. Coarse: on a shared 2-core machine these swing with the load.
Writes the JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flashmesh.coordinator.certs import init_cluster  # noqa: E402
from flashmesh.coordinator.engine import open_model  # noqa: E402
from flashmesh.coordinator.options import ModelOptions  # noqa: E402
from flashmesh.node.store_format import Manifest  # noqa: E402
from flashmesh.node.tls import COORDINATOR, load_identity  # noqa: E402
from flashmesh.testing.demo import DEMO_SHAPE, prepare_demo  # noqa: E402
from flashmesh.testing.local_nodes import ensure_dense, ensure_shards, local_nodes  # noqa: E402

from bench.cluster_loopback import _cluster_figures, _generate, _speeds  # noqa: E402
from bench.plots import save_plot


def _request(info, *, tokens: int, k: int = DEMO_SHAPE["top_k"]):
    """A Compute request for layer 0: `tokens` hidden states, each with the top-k experts it routes to."""
    import numpy as np
    from flashmesh.protos import flashmesh_pb2 as pb
    from flashmesh.protos.codec import encode_numpy

    rng = np.random.default_rng(0)
    layer = info.layers[0]
    experts = np.stack([rng.choice(np.array(layer.experts), size=k, replace=False) for _ in range(tokens)])
    return pb.ComputeRequest(
        layer=layer.layer,
        x=encode_numpy(rng.standard_normal((tokens, info.hidden_size)).astype(np.float32)),
        rows=encode_numpy(np.repeat(np.arange(tokens, dtype=np.int32), k)),
        experts=encode_numpy(experts.reshape(-1).astype(np.int32)),
    )


def _interleaved(store: Path, *, tls_dir: Path, budget: int, calls: int, logdir: Path) -> dict:
    token = secrets.token_urlsafe(18)
    with (
        local_nodes([store], budgets=[budget], token=token, logdir=logdir) as (plain,),
        local_nodes([store], budgets=[budget], token=token, logdir=logdir, tls=tls_dir) as (secure,),
    ):
        return interleaved_rpcs(plain, secure, token=token, tls_dir=tls_dir, calls=calls, k=DEMO_SHAPE["top_k"])


def interleaved_rpcs(plain, secure, *, token: str, tls_dir: Path, calls: int, k: int) -> dict:
    """The same Compute requests to a plaintext and a TLS node in turn; fresh channels + Info likewise."""
    from flashmesh.coordinator.client import NodeClient

    identity = load_identity(tls_dir, role=COORDINATOR)
    clients = {"plaintext": NodeClient(plain, token=token), "tls": NodeClient(secure, token=token, tls=identity)}
    try:
        info = clients["plaintext"].info()
        result: dict = {}
        for label, tokens in (("decode_1_token", 1), ("prefill_32_tokens", 32)):
            request = _request(info, tokens=tokens, k=k)
            times: dict[str, list[float]] = {"plaintext": [], "tls": []}
            for i in range(calls + 20):  # the first 20 of each warm the caches
                for mode, client in clients.items():
                    start = time.perf_counter()
                    client.compute_async(request).result()
                    if i >= 20:
                        times[mode].append(time.perf_counter() - start)
            result[label] = _latency(times)
            result[label]["request_bytes"] = request.ByteSize()
        handshakes: dict[str, list[float]] = {"plaintext": [], "tls": []}
        for _ in range(max(10, calls // 8)):
            for mode, address in (("plaintext", plain), ("tls", secure)):
                start = time.perf_counter()
                fresh = NodeClient(address, token=token, tls=identity if mode == "tls" else None)
                fresh.info()
                handshakes[mode].append(time.perf_counter() - start)
                fresh.close()
        result["new_channel_and_info"] = _latency(handshakes)
    finally:
        for client in clients.values():
            client.close()
    return result


def _latency(times: dict[str, list[float]]) -> dict:
    out: dict = {"calls": len(times["plaintext"])}
    for mode, values in times.items():
        ms = sorted(v * 1e3 for v in values)
        out[f"{mode}_ms_median"] = statistics.median(ms)
        out[f"{mode}_ms_p90"] = ms[int(0.9 * (len(ms) - 1))]
    out["tls_median_ratio"] = out["tls_ms_median"] / out["plaintext_ms_median"]
    return out


def _measure(dense: Path, shards, *, tls_dir: Path | None, budget: int, args, layers: int, logdir: Path) -> dict:
    token = secrets.token_urlsafe(18)
    with local_nodes(shards, budgets=[budget] * len(shards), token=token, logdir=logdir, tls=tls_dir) as addresses:
        start = time.perf_counter()
        streaming = open_model(
            ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token=token, tls=tls_dir)
        )
        opened = time.perf_counter() - start
        try:
            _generate(streaming, args.max_tokens)  # warm-up
            streaming.backend.reset_dispatch()
            stats = _generate(streaming, args.max_tokens)
            figures = _cluster_figures(streaming.backend, stats, layers)
            repeats = [stats] + [_generate(streaming, args.max_tokens) for _ in range(args.repeats - 1)]
        finally:
            streaming.close()
    return {"open_cluster_s": opened, "tokens": repeats[0].tokens, **_speeds(repeats), **figures}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    width = 0.35
    rpc = result["rpc_interleaved"]
    for j, mode in enumerate(("plaintext", "tls")):
        axes[0].bar([i + (j - 0.5) * width for i in range(len(rpc))], [r[f"{mode}_ms_median"] for r in rpc.values()],
                    width, label=mode)  # fmt: skip
    axes[0].set_xticks(range(len(rpc)), [k.replace("_", " ") for k in rpc], fontsize=8)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("one RPC, interleaved")
    counts = [r["nodes"] for r in result["summary"]]
    for i, (key, label) in enumerate((("decode_tokens_per_s", "decode tok/s"), ("layer_dispatch_ms_mean", "ms")), 1):
        ax = axes[i]
        for j, mode in enumerate(("plaintext", "tls")):
            values = [r[f"{mode}_{key}"] for r in result["summary"]]
            ax.bar([c + (j - 0.5) * width for c in range(len(counts))], values, width, label=mode)
        ax.set_xticks(range(len(counts)), [f"{c} node{'s' if c > 1 else ''}" for c in counts])
        ax.set_ylabel(label)
        ax.set_title("decode speed (best)" if i == 1 else "MoE layer dispatch, mean")
    save_figure(fig, axes, "mutual TLS vs plaintext on loopback (demo model, one run)", path)


def save_figure(fig, axes, title: str, path: Path) -> None:
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    save_plot(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".flashmesh/bench-cluster"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=400, help="interleaved RPCs per mode and request shape")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=2, help="plaintext/TLS alternations per node count")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per configuration")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tls_overhead.json"))
    args = parser.parse_args()

    store, _ = prepare_demo(args.workdir, show_progress=False)
    manifest = Manifest.load(store)
    dense = ensure_dense(store, args.workdir / "dense")
    budget = manifest.expert_bytes_total
    runs = []
    with tempfile.TemporaryDirectory(prefix="flashmesh-bench-tls-") as tmp:
        tls_dir = Path(tmp) / "cluster"
        init_cluster(tls_dir)
        rpc = _interleaved(store, tls_dir=tls_dir, budget=budget, calls=args.calls, logdir=args.workdir / "logs")
        for label, r in rpc.items():
            print(
                f"{label:>22}: plaintext {r['plaintext_ms_median']:.3f} ms, TLS {r['tls_ms_median']:.3f} ms median "
                f"({r['tls_median_ratio']:.2f}x; p90 {r['plaintext_ms_p90']:.3f} / {r['tls_ms_p90']:.3f} ms)"
            )
        for count in args.nodes:
            shards = ensure_shards(store, args.workdir, count=count)
            for round_ in range(args.rounds):
                for mode in ("plaintext", "tls"):
                    run = _measure(
                        dense, shards, tls_dir=tls_dir if mode == "tls" else None, budget=budget, args=args,
                        layers=len(manifest.layers), logdir=args.workdir / "logs",
                    )  # fmt: skip
                    runs.append({"nodes": count, "mode": mode, "round": round_, **run})
                    print(
                        f"{count} node(s) {mode:>9} round {round_}: {run['decode_tokens_per_s']:.2f} tok/s, "
                        f"layer dispatch {run['layer_dispatch_ms_mean']:.2f} ms, open {run['open_cluster_s']:.3f} s"
                    )
    summary = []
    for count in args.nodes:
        entry: dict = {"nodes": count}
        for mode in ("plaintext", "tls"):
            mine = [r for r in runs if r["nodes"] == count and r["mode"] == mode]
            entry[f"{mode}_decode_tokens_per_s"] = max(r["decode_tokens_per_s"] for r in mine)
            entry[f"{mode}_layer_dispatch_ms_mean"] = min(r["layer_dispatch_ms_mean"] for r in mine)
            entry[f"{mode}_layer_dispatch_ms_p99"] = min(r["layer_dispatch_ms_p99"] for r in mine)
            entry[f"{mode}_open_cluster_s"] = min(r["open_cluster_s"] for r in mine)
            entry[f"{mode}_wire_bytes_per_decode_token"] = mine[0]["wire_bytes_per_decode_token"]
        entry["tls_decode_ratio"] = entry["tls_decode_tokens_per_s"] / entry["plaintext_decode_tokens_per_s"]
        entry["tls_dispatch_ratio"] = entry["tls_layer_dispatch_ms_mean"] / entry["plaintext_layer_dispatch_ms_mean"]
        entry["tokens_identical"] = len({tuple(r["tokens"]) for r in runs if r["nodes"] == count}) == 1
        summary.append(entry)
    result = {
        "benchmark": "tls_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "model": {"arch": "qwen3_moe", **DEMO_SHAPE, "dtype": "float32"},
        "max_tokens": args.max_tokens,
        "rpc_interleaved": rpc,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _plot(result, args.out.with_suffix(".png"))
    for e in summary:
        print(
            f"{e['nodes']} node(s): TLS/plaintext decode {e['tls_decode_ratio']:.2f}x, layer dispatch "
            f"{e['tls_dispatch_ratio']:.2f}x, open {e['plaintext_open_cluster_s']:.3f} -> "
            f"{e['tls_open_cluster_s']:.3f} s, "
            f"tokens identical: {e['tokens_identical']}"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
