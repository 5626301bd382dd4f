"""`flashmesh demo`: a small MoE model, packed and run streamed.

By default the model is the one shipped in testing/tiny_moe (trained here on English text, see
testing/trained.py); `--arch` builds a random-weight one instead. The source model and its store are
cached under the work directory, keyed by the shipped weights' checksum (or architecture and shape),
so a second run skips unpacking and packing.
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path

from flashmesh.coordinator.cli import add_generation_args, print_nodes, print_stats, run_args
from flashmesh.coordinator.options import ModelOptions, add_cache_args, add_rpc_deadline_arg
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.node.store_writer import pack
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes
from flashmesh.testing import trained
from flashmesh.testing.local_nodes import ensure_shards, local_nodes
from flashmesh.testing.synthetic import build_model

# The shipped model trained on English text (testing/trained.py): 8 layers x 32 experts, top-4, so
# a quarter of the experts is a real cache. Other architectures get random weights of this shape.
DEMO_SHAPE = trained.TRAINED_SHAPE
TRAINED = "trained"  # --arch value of the shipped qwen3_moe


def prepare_demo(workdir: Path, *, arch: str = TRAINED, show_progress: bool = True) -> tuple[Path, Path]:
    """Unpack (the trained model) or build (random weights) the demo model once, pack it once;
    return (store, source model directory)."""
    workdir = Path(workdir)
    if arch == TRAINED:
        key = f"trained-qwen3_moe-{trained.digest()}"  # a new shipped model gets a new directory
    else:
        key = f"{arch}-" + "-".join(f"{k}{v}" for k, v in DEMO_SHAPE.items())
    source, store = workdir / f"{key}-model", workdir / f"{key}-store"
    if not (source / "config.json").is_file():
        try:
            if arch == TRAINED:
                trained.materialize(source)
            else:
                build_model(source, arch, **DEMO_SHAPE)
        except ValueError as e:
            raise UserError(
                f"{e}; the demo runs {TRAINED} (qwen3_moe trained on English) or random-weight qwen3_moe, "
                "mixtral, deepseek_v3, gpt_oss or qwen3_next"
            ) from None
    if not (store / MANIFEST).is_file():
        pack(str(source), store, force=True, show_progress=show_progress)
    return store, source


def demo_cluster_dir(workdir: Path) -> Path:
    """The demo's cluster CA and coordinator certificate (made once); node certificates are
    issued per run by `local_nodes`."""
    from flashmesh.coordinator.certs import init_cluster
    from flashmesh.node.tls import CA_DIR

    path = Path(workdir) / "cluster"
    if not (path / CA_DIR).is_dir():
        init_cluster(path)
    return path


def reference_tokens(source: Path, prompt: str, *, max_tokens: int, chat: bool, prefill_step_size: int) -> list[int]:
    """Greedy tokens from mlx-lm's own load + stream_generate on the unpacked model."""
    from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
    from mlx_lm import load

    model, tokenizer = load(str(source))
    tokens = encode_prompt(tokenizer, prompt, chat=chat)
    params = SamplingParams(max_tokens=max_tokens)
    return generate(model, tokenizer, tokens, params, prefill_step_size=prefill_step_size).tokens


def describe(store: Path) -> dict:
    return json.loads((store / MANIFEST).read_text())["config"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small MoE model locally, pack it and run it streamed")
    p.set_defaults(func=cmd_demo, stopped_status=0)  # SIGTERM / Ctrl-C stop the demo: exit 0
    p.add_argument("--workdir", type=Path, default=Path(".flashmesh/demo"))
    p.add_argument(
        "--arch",
        default=TRAINED,
        help=f"{TRAINED} (shipped, trained on English) or an mlx-lm MoE architecture (random weights)",
    )
    p.add_argument(
        "--nodes", type=int, default=3, help="local node processes, each with its own shard (0: all in-process)"
    )
    p.add_argument("--no-tls", action="store_true", help="plaintext to the nodes (default: mutual TLS)")
    add_cache_args(p)
    add_rpc_deadline_arg(p)
    add_generation_args(p, prompt_default="The Python interpreter")


def cmd_demo(args) -> int:
    store, source = prepare_demo(args.workdir, arch=args.arch, show_progress=not args.json)
    manifest = Manifest.load(store)
    # A quarter of the experts fit by default: most tokens stream something from flash.
    budget = parse_bytes(args.ram_budget) if args.ram_budget else manifest.expert_bytes_total // 4
    budget = max(budget, manifest.min_budget_bytes)
    extra = {"store": str(store)}
    if args.nodes > 0:
        if args.preload:
            raise UserError("--preload reads the experts of this process; use it with --nodes 0")
        shards = ensure_shards(store, args.workdir, count=args.nodes)
        token = secrets.token_urlsafe(18)
        cluster_dir = None if args.no_tls else demo_cluster_dir(args.workdir)
        with local_nodes(
            shards,
            budgets=[max(budget // args.nodes, manifest.min_budget_bytes)] * args.nodes,  # the budget is shared
            token=token,
            logdir=args.workdir / "logs",
            tls=cluster_dir,
            node_args=[["--page-cache"] if args.page_cache else []] * args.nodes,
        ) as nodes:
            options = ModelOptions(
                store=store, cluster=True, nodes=tuple(nodes), token=token, tls=cluster_dir,
                lookahead=args.lookahead, rpc_deadline=args.rpc_deadline,
            )  # fmt: skip
            result = {**run_args(args, options), **extra, "tls": cluster_dir is not None}
    else:
        options = ModelOptions(
            store=store, ram_budget=budget, page_cache=args.page_cache, preload=args.preload, lookahead=args.lookahead
        )
        result = {**run_args(args, options), **extra}
    if args.temperature == 0:
        reference = reference_tokens(
            source, args.prompt, max_tokens=args.max_tokens, chat=args.chat, prefill_step_size=args.prefill_step
        )
        result["tokens_match_reference"] = reference == result["tokens"]
    if args.json:
        print(json.dumps(result))
    else:
        print_stats(result, title=f"flashmesh demo ({args.arch}, store {store})")
        print_nodes(result)
    return 0
