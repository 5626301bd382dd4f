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

from flashmesh.coordinator.generate import SamplingParams
from flashmesh.coordinator.options import ModelOptions, add_model_args, model_options, resolve_store
from flashmesh.coordinator.report import run_prompt
from flashmesh.coordinator.tables import fitted_table
from flashmesh.node.expert_source import reader_label
from flashmesh.node.shutdown import interrupt
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import format_bytes
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
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)


def run_args(args: argparse.Namespace, options: ModelOptions) -> dict:
    """Generate as `run` and the demo do: text streamed to stdout unless --json; return the JSON."""
    stream = None if args.json else (lambda text, _n: print(text, end="", flush=True))
    try:
        result = run_prompt(
            options,
            args.prompt,
            sampling_params(args),
            chat=args.chat,
            prefill_step_size=args.prefill_step,
            on_text=stream,
        )
    except (TypeError, ValueError, AssertionError) as e:  # mlx-lm's model rejecting what a damaged config built
        log.debug("the forward pass failed", exc_info=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the model in {options.store} cannot run ({first[:200]}); its config.json may be damaged, "
            "re-run `flashmesh pack`"
        ) from None
    if stream is not None:
        print(flush=True)
    return result


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
    add_model_args(p)
    add_generation_args(p, prompt_default=None)

    for entry in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        entry.load().register(sub)
    return parser


def print_stats(stats: dict, *, title: str, console: Console = err) -> None:
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
    if stats.get("cache_huge_page_bytes"):  # Linux: slabs in transparent huge pages (docs/store.md)
        rows.append(("cache in huge pages", format_bytes(stats["cache_huge_page_bytes"])))
    if stats.get("flash_busy_seconds"):  # a local cache: the union of its reads' time in flight
        busy = stats["flash_busy_seconds"]
        rows.append((
            "flash busy",
            f"{busy:.3f} s ({stats['flash_busy_share']:.0%} of the run) at "
            f"{stats['expert_bytes_read'] / busy / 1e9:.2f} GB/s",
        ))  # fmt: skip
    if "lookahead" in stats:
        used = f"on, {stats['prefetch_used']} read-aheads used" if stats["lookahead"] else "off"
        rows.append(("router lookahead", used))
    if "reader" in stats:  # a local store: what read its records (docs/store.md, "Reads through Linux AIO")
        rows.append(("flash reads", reader_label(stats["reader"])))
    for key, label in (("tokens_match_reference", "greedy tokens equal mlx-lm's"),):
        if key in stats:
            rows.append((label, str(stats[key]).lower()))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def print_nodes(result: dict, *, console: Console = err) -> None:
    if "nodes" not in result:
        return
    headers = ["node", "address", "held / assigned", "RAM budget", "peak cache", "hit rate", "read", "reads",
               "RPCs", "RPC ms", "p99 ms"]  # fmt: skip
    rows = [
        [n["name"], n["address"], f"{n['experts_held']} / {n['experts_assigned']}", format_bytes(n["ram_budget_bytes"]),
         format_bytes(n["peak_cache_bytes"]), f"{n['cache_hit_rate']:.1%}", format_bytes(n["expert_bytes_read"]),
         reader_label(n["reader"]), str(n["requests"]), f"{n['rpc_ms_mean']:.2f}", f"{n['rpc_ms_p99']:.2f}"]
        for n in result["nodes"]
    ]  # fmt: skip
    console.print(
        fitted_table(headers, rows, keep={"node", "address", "held / assigned", "hit rate"}, stack=("node", "address"),
                     drop_order=["reads", "peak cache", "RPCs", "p99 ms", "RAM budget"], title="nodes",
                     console=console)
    )  # fmt: skip
    d = result["dispatch"]
    console.print(
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
    resolve_store(args, show_progress=sys.stderr.isatty() and not args.json)
    result = run_args(args, model_options(args))
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
    # SIGTERM and Ctrl-C stop the command (node.shutdown.interrupt: a generation between two tokens),
    # then finally blocks run (nothing half-written, local nodes stopped).
    # Commands that are stopped rather than failed (demo, benchmarks) set `stopped_status` 0; `node
    # serve` and `serve` drain on both signals themselves and return 0.
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, interrupt) for sig in signals} if main_thread else {}
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
