"""The `flashmesh` command: pack and run here; the other subcommands register themselves (pyproject.toml).

Errors a user can cause end as one line on stderr with the fix and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

from flashmesh.coordinator.cluster_cli import add_discovery_args
from flashmesh.coordinator.options import default_budget
from flashmesh.coordinator.remote import DEFAULT_RPC_DEADLINE
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import format_bytes, parse_bytes
from rich.console import Console
from rich.table import Table

log = logging.getLogger("flashmesh")
err = Console(stderr=True)

# Modules that add subcommands, named in pyproject.toml: each has register(subparsers) and sets `func`
# on its parsers.
COMMANDS = "flashmesh.commands"


def add_generation_args(p: argparse.ArgumentParser, *, prompt_default: str | None) -> None:
    p.add_argument("--prompt", default=prompt_default, required=prompt_default is None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--ram-budget",
        default=None,
        help="bytes of expert weights kept in RAM, e.g. 2GB, 512MiB (default: every expert, at most half the RAM)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--page-cache", action="store_true", help="let the OS page cache help (default: bypass it)")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--preload", action="store_true", help="read every expert up front when the budget holds them all")
    p.add_argument(
        "--lookahead",
        action="store_true",
        help="predict the next layer's experts with its router and read them ahead (helps where flash, not "
        "compute, is the limit; docs/benchmarks.md)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmesh", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="turn a model directory or hub id into a flash store")
    p.set_defaults(func=cmd_pack)
    p.add_argument("src", help="model directory (config.json, *.safetensors, tokenizer) or a hub id")
    p.add_argument("out", type=Path)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("run", help="generate with experts streamed from a store")
    p.set_defaults(func=cmd_run)
    p.add_argument("store", type=Path, help="a store, or with --cluster its dense part (`flashmesh shard --dense`)")
    add_generation_args(p, prompt_default=None)
    p.add_argument("--cluster", action="store_true", help="compute the experts on nodes (zeroconf and/or --node)")
    add_discovery_args(p)
    p.add_argument(
        "--rpc-deadline",
        type=float,
        default=DEFAULT_RPC_DEADLINE,
        help="seconds a node gets for a layer's request before it counts as hung and its work moves to replicas; "
        "grows with measured latency for large requests (default %(default)g)",
    )

    for entry in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        entry.load().register(sub)
    return parser


def print_stats(stats: dict, *, title: str) -> None:
    table = Table(title=title, show_header=False)
    rows = [
        ("time to first token", f"{stats['ttft_s']:.3f} s"),
        ("decode", f"{stats['decode_tokens_per_s']:.2f} tok/s"),
        ("cache hit rate", f"{stats['cache_hit_rate']:.1%}"),
        ("expert bytes read from flash", format_bytes(stats["expert_bytes_read"])),
        ("  per generated token", format_bytes(stats["bytes_read_per_token"])),
        ("effective read rate", f"{stats['read_gbps']:.2f} GB/s"),
        ("seconds in I/O / expert compute", f"{stats['io_seconds']:.3f} / {stats['compute_seconds']:.3f}"),
        (
            "RAM budget / peak cache",
            f"{format_bytes(stats['ram_budget_bytes'])} / {format_bytes(stats['peak_cache_bytes'])}",
        ),
        ("expert bytes in the model", format_bytes(stats["expert_bytes_total"])),
    ]
    for key, label in (("tokens_match_reference", "greedy tokens equal mlx-lm's"),):
        if key in stats:
            rows.append((label, str(stats[key]).lower()))
    for name, value in rows:
        table.add_row(name, value)
    err.print(table)


def run_store(args, store: Path, *, extra: dict | None = None) -> dict:
    from flashmesh.coordinator.engine import open_local
    from flashmesh.coordinator.generate import add_cache_stats, encode_prompt, generate
    from flashmesh.node.store_format import Manifest

    manifest = Manifest.load(store)
    budget = parse_bytes(args.ram_budget) if args.ram_budget else default_budget(manifest)
    streaming = open_local(
        store, ram_budget=budget, page_cache=args.page_cache, lookahead=args.lookahead, preload=args.preload
    )
    try:
        prompt = encode_prompt(streaming.tokenizer, args.prompt, chat=args.chat)
        stream = None if args.json else (lambda s: print(s, end="", flush=True))
        stats = generate(
            streaming.model,
            streaming.tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            prefill_step_size=args.prefill_step,
            on_text=stream,
        )
        if stream is not None:
            print(flush=True)
    except (TypeError, ValueError, AssertionError) as e:  # mlx-lm's model rejecting what a damaged config.json built
        log.debug("the forward pass failed", exc_info=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the model in {store} cannot run ({first[:200]}); its config.json may be damaged, re-run `flashmesh pack`"
        ) from None
    finally:
        streaming.close()
    add_cache_stats(
        stats, streaming.cache.stats, ram_budget_bytes=budget, expert_bytes_total=manifest.expert_bytes_total
    )
    result = stats.to_json()
    result["page_cache_bypassed"] = streaming.store.bypassing_cache
    result.update(extra or {})
    return result


def run_cluster(
    args, store: Path, *, addresses=None, token: str | None = None, tls=None, extra: dict | None = None
) -> dict:
    from flashmesh.coordinator.cluster_cli import coordinator_tls, find_nodes
    from flashmesh.coordinator.cluster_run import resolve_token, run_on_cluster
    from flashmesh.node.store_format import Manifest

    manifest = Manifest.load(store)
    token = token or resolve_token(args.token)
    if addresses is None:  # `run`: nodes and TLS from the command line (the demo passes its own)
        tls = coordinator_tls(args)
        addresses = find_nodes(args, fingerprint=manifest.fingerprint)
    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    result = run_on_cluster(
        store,
        addresses,
        token=token,
        prompt=args.prompt,
        chat=args.chat,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        prefill_step_size=args.prefill_step,
        lookahead=args.lookahead,
        rpc_deadline=getattr(args, "rpc_deadline", DEFAULT_RPC_DEADLINE),
        on_text=stream,
        tls=tls,
    )
    if stream is not None:
        print(flush=True)
    result.update(extra or {})
    return result


def print_nodes(result: dict) -> None:
    if "nodes" not in result:
        return
    table = Table(title="nodes")
    for c in ("node", "address", "held / assigned", "RAM budget", "peak cache", "hit rate", "read", "RPCs", "RPC ms"):
        table.add_column(c, justify="left" if c in ("node", "address") else "right")
    for n in result["nodes"]:
        table.add_row(
            n["name"],
            n["address"],
            f"{n['experts_held']} / {n['experts_assigned']}",
            format_bytes(n["ram_budget_bytes"]),
            format_bytes(n["peak_cache_bytes"]),
            f"{n['cache_hit_rate']:.1%}",
            format_bytes(n["expert_bytes_read"]),
            str(n["requests"]),
            f"{n['rpc_ms_mean']:.2f} (p99 {n['rpc_ms_p99']:.2f})",
        )
    err.print(table)
    d = result["dispatch"]
    err.print(
        f"{d['rpc_requests_per_token']:.1f} RPCs and {format_bytes(d['wire_bytes_per_token'])} on the wire per "
        f"token; MoE layer dispatch {d['layer_dispatch_ms_mean']:.2f} ms mean, {d['layer_dispatch_ms_p99']:.2f} ms p99"
    )


def cmd_pack(args) -> int:
    from flashmesh.node.store_writer import pack

    manifest = pack(args.src, args.out, force=args.force, show_progress=sys.stderr.isatty())
    err.print(
        f"packed {len(manifest.layers)} MoE layers, {format_bytes(manifest.expert_bytes_total)} of experts "
        f"into {args.out} (fingerprint {manifest.fingerprint})"
    )
    return 0


def cmd_run(args) -> int:
    if args.cluster or args.node:
        result = run_cluster(args, args.store)
    else:
        result = run_store(args, args.store)
    if args.json:
        print(json.dumps(result))
    else:
        print_stats(result, title=f"flashmesh run {args.store}")
        print_nodes(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (`func`): logging set up, user errors as one line with status 2."""
    # transformers (used only for tokenizers) announces that PyTorch is absent; it does not need it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "command", None) != "node" and not args.verbose:
        # gRPC's C core logs refused TLS handshakes itself; the coordinator reports them in one line.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # SIGTERM interrupts like Ctrl-C: finally blocks run (nothing half-written, local nodes stopped).
    # Commands that are stopped rather than failed (demo, benchmarks) set `stopped_status` 0; `node
    # serve` and `serve` drain on both signals themselves and return 0.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return args.func(args)
    except UserError as e:
        one_line = " ".join(line.strip() for line in str(e).splitlines())  # a library's message may span lines
        err.print(f"error: {one_line}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        status = getattr(args, "stopped_status", 130)
        err.print("stopped" if status == 0 else "interrupted")
        return status
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
