"""`flashmesh serve STORE [--cluster ...]`: the OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.model_cache import model_name
from flashmesh.coordinator.options import add_model_args, model_options, resolve_store
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes
from rich.console import Console

log = logging.getLogger(__name__)
err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)")
    p.set_defaults(func=cmd_serve)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the store's name)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 + Retry-After")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body", default="8MiB", help="largest request body (413 above it)")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one step (default 8)")
    p.add_argument(
        "--prefill-batch", type=int, default=2,
        help="prompts prefilled together; a joining request stalls the others by at most one chunk of each",
    )  # fmt: skip
    p.add_argument("--prompt-cache", type=int, default=8, help="conversations whose KV cache is kept (0: none)")
    p.add_argument("--prompt-cache-bytes", default="1GiB", help="most KV bytes the prompt cache keeps")


def _exit_cleanly(*_) -> None:
    raise SystemExit(0)


def cmd_serve(args) -> int:
    from flashmesh.coordinator.api.app import ServeOptions, create_app
    from flashmesh.coordinator.api.metrics import ServerMetrics
    from flashmesh.coordinator.api.server import bind, make_server
    from flashmesh.coordinator.api.worker import GenerationWorker
    from flashmesh.node.store_format import Manifest

    for name in ("max_queue", "max_tokens_limit", "prefill_step", "max_batch", "prefill_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.prompt_cache < 0:
        raise UserError("--prompt-cache must be 0 (off) or more")
    prompt_cache_bytes = parse_bytes(args.prompt_cache_bytes)
    given = args.store
    resolve_store(args, show_progress=sys.stderr.isatty())  # packs a model directory on first use
    options = dataclasses.replace(model_options(args), watch=True)  # nodes that restart elsewhere are found
    Manifest.load(options.store)  # a bad path fails here, before anything is started
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port; pass 0..65535")
    max_body = parse_bytes(args.max_body)
    sock = bind(args.host, args.port)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises it again: exit 0 through the finally blocks.
    previous = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        metrics = ServerMetrics()
        worker = GenerationWorker(
            lambda: open_model(options), max_queue=args.max_queue, max_batch=args.max_batch,
            prefill_batch=args.prefill_batch, prefill_step_size=args.prefill_step,
            prompt_cache_entries=args.prompt_cache, prompt_cache_bytes=prompt_cache_bytes, metrics=metrics,
        ).start()  # fmt: skip
        try:
            serving = ServeOptions(
                model_id=args.model_name or model_name(given),
                max_tokens_limit=args.max_tokens_limit,
                max_body_bytes=max_body,
            )
            app = create_app(worker, serving, metrics=metrics)
            host, port = sock.getsockname()[:2]
            nodes = worker.streaming.nodes
            where = f"{len(nodes)} nodes" if nodes else "experts in-process"
            print(f"serving {serving.model_id} ({where}) at http://{host}:{port}/v1", flush=True)
            print(f"dashboard: http://{host}:{port}/", flush=True)
            make_server(app).run(sockets=[sock])
        finally:
            worker.close()
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
