"""`flashmesh serve STORE [--cluster ...]`: the OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from pathlib import Path

from flashmesh.coordinator.cluster_cli import add_discovery_args
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes
from rich.console import Console

log = logging.getLogger(__name__)
err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)")
    p.set_defaults(func=cmd_serve)
    p.add_argument("store", type=Path, help="a store, or with --cluster its dense part (`flashmesh shard --dense`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--ram-budget", default=None, help="bytes of expert weights kept in RAM (default: all of them)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the store's name)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 + Retry-After")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body", default="8MiB", help="largest request body (413 above it)")
    p.add_argument("--page-cache", action="store_true", help="let the OS page cache help (default: bypass it)")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--lookahead", action="store_true", help="read the next layer's predicted experts ahead")
    p.add_argument("--cluster", action="store_true", help="compute the experts on nodes (zeroconf and/or --node)")
    add_discovery_args(p)


def _opener(args, manifest, cleanup: contextlib.ExitStack):
    """What the worker thread calls to open the model: in-process experts, or the cluster's (and a
    zeroconf watcher, closed by `cleanup`, that finds nodes again when they restart elsewhere)."""
    if args.cluster or args.node:
        from flashmesh.coordinator.cluster_cli import coordinator_tls, find_nodes, node_watcher
        from flashmesh.coordinator.cluster_run import resolve_token
        from flashmesh.coordinator.engine import open_cluster

        token = resolve_token(args.token)
        tls = coordinator_tls(args)
        addresses = find_nodes(args, fingerprint=manifest.fingerprint)
        watcher = node_watcher(args, fingerprint=manifest.fingerprint)
        if watcher is not None:
            cleanup.callback(watcher.close)
        return lambda: open_cluster(
            args.store, addresses, token=token, lookahead=args.lookahead, tls=tls, watcher=watcher
        )

    from flashmesh.coordinator.engine import open_local

    budget = parse_bytes(args.ram_budget) if args.ram_budget else manifest.expert_bytes_total
    return lambda: (
        open_local(args.store, ram_budget=budget, page_cache=args.page_cache, lookahead=args.lookahead),
        [],
    )


def _exit_cleanly(*_) -> None:
    raise SystemExit(0)


def cmd_serve(args) -> int:
    from flashmesh.coordinator.api.app import ServeOptions, create_app
    from flashmesh.coordinator.api.metrics import ServerMetrics
    from flashmesh.coordinator.api.server import bind, make_server
    from flashmesh.coordinator.api.worker import GenerationWorker
    from flashmesh.node.store_format import Manifest

    for name in ("max_queue", "max_tokens_limit", "prefill_step"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    manifest = Manifest.load(args.store)  # a bad path fails here, before anything is started
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port; pass 0..65535")
    max_body = parse_bytes(args.max_body)
    sock = bind(args.host, args.port)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises it again: exit 0 through the finally blocks.
    previous = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGTERM, signal.SIGINT)}
    cleanup = contextlib.ExitStack()
    try:
        opener = _opener(args, manifest, cleanup)
        metrics = ServerMetrics()
        worker = GenerationWorker(opener, max_queue=args.max_queue, prefill_step_size=args.prefill_step,
                                  metrics=metrics).start()  # fmt: skip
        try:
            options = ServeOptions(
                model_id=args.model_name or Path(args.store).resolve().name,
                max_tokens_limit=args.max_tokens_limit,
                max_body_bytes=max_body,
            )
            app = create_app(worker, options, metrics=metrics)
            host, port = sock.getsockname()[:2]
            where = f"{len(worker.nodes)} nodes" if worker.nodes else "experts in-process"
            print(f"serving {options.model_id} ({where}) at http://{host}:{port}/v1", flush=True)
            make_server(app).run(sockets=[sock])
        finally:
            worker.close()
    finally:
        cleanup.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
