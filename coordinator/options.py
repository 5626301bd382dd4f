"""How a model is opened: one set of options for `run`, `run --cluster`, `serve`, the demo and the
benchmarks, read from the command line in one place (`add_model_args` / `model_options`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from flashmesh.coordinator.cluster_cli import add_discovery_args
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.coordinator.remote import DEFAULT_RPC_DEADLINE
from flashmesh.node.cluster_config import interfaces_setting, tls_setting
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Where the experts run and how: in this process from the store, or with `cluster` on nodes
    (given in `nodes` and/or found by zeroconf on the `zeroconf` interfaces), when `store` needs only
    the dense part (`flashmesh shard --dense`)."""

    store: Path
    lookahead: bool | None = None  # the next layer's router predicts its experts, read ahead; None: auto
    # --- experts in this process
    ram_budget: int | None = None  # bytes of experts cached; None: every expert, at most half the RAM
    page_cache: bool = False  # let the OS page cache help (default: bypass it)
    preload: bool = False  # read every expert up front when the budget holds them all
    huge_pages: bool = True  # the cache's slabs in transparent huge pages where Linux has them
    verify: bool = True  # check every record's checksum
    queue_depth: int = 8  # reads in flight
    # --- experts on nodes
    cluster: bool = False
    nodes: tuple[NodeAddress | str, ...] = ()  # static addresses (HOST:PORT, NAME@HOST:PORT)
    zeroconf: tuple[str, ...] | None = None  # IPv4 interfaces to browse on; None: no multicast
    discover_timeout: float = 3.0
    expect: int | None = None  # stop browsing once this many nodes are found
    name_prefix: str = ""  # only zeroconf nodes whose name starts with it
    token: str | None = None  # the cluster token; None: $FLASHMESH_TOKEN
    tls: Path | None = None  # the coordinator's identity (CLUSTER_DIR or its coordinator/); None: plaintext
    rpc_deadline: float = DEFAULT_RPC_DEADLINE  # least seconds a node gets per request before failover
    probe_backoff: float = 0.5  # first wait before probing a node that went down
    connect_timeout: float = 10.0  # seconds a node gets to answer Info when connecting
    hedge: bool = True  # a request late against its node's own p99 goes to a replica too (coordinator.failover)
    watch: bool = False  # keep browsing zeroconf: a node that restarts elsewhere is reconnected (serve)

    def check(self) -> None:
        """Refuse options that would be silently ignored where the experts run."""
        if self.cluster:
            local = [f for f, on in (("--ram-budget", self.ram_budget is not None), ("--page-cache", self.page_cache),
                                     ("--preload", self.preload), ("--no-huge-pages", not self.huge_pages))
                     if on]  # fmt: skip
            if local:
                raise UserError(
                    f"{', '.join(local)} set the cache of experts computed here; with --cluster each node "
                    "has its own: pass them to `flashmesh node serve`"
                )
        elif self.tls is not None or self.nodes or self.zeroconf is not None:
            raise UserError("--tls and --node are for experts computed on nodes; add --cluster")


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(manifest: Manifest) -> int:
    """Without --ram-budget: every expert, but at most half of this machine's RAM (the slabs are
    allocated up front, so a budget above what the machine has would fail at start)."""
    return min(manifest.expert_bytes_total, max(manifest.min_budget_bytes, physical_memory_bytes() // 2))


# A layer's top-k records at least this big: predicting them costs less than reading them serially
# (measured: pays with 8 x 6 MiB per layer, does not with 4 x 96 KiB; docs/benchmarks.md).
LOOKAHEAD_LAYER_BYTES = 4 * 2**20


def lookahead_pays(manifest: Manifest, budget_bytes: int | None) -> bool:
    """Lookahead when neither --lookahead nor --no-lookahead is given: on where a layer's reads are big
    enough to hide behind the previous layer's compute and the cache (`budget_bytes`; None: on nodes,
    each with its own) cannot hold every expert."""
    if budget_bytes is not None and budget_bytes >= manifest.expert_bytes_total:
        return False
    return manifest.min_budget_bytes >= LOOKAHEAD_LAYER_BYTES


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The options of experts computed in this process, and lookahead."""
    p.add_argument(
        "--ram-budget",
        default=None,
        help="bytes of expert weights kept in RAM, e.g. 2GB, 512MiB (default: every expert, at most half the RAM)",
    )
    p.add_argument("--page-cache", action="store_true", help="let the OS page cache help (default: bypass it)")
    p.add_argument("--preload", action="store_true", help="read every expert up front when the budget holds them all")
    p.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="back the expert cache with 4 KiB pages, not transparent huge pages (Linux; docs/store.md)",
    )
    p.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="predict the next layer's experts with its router and read them ahead (default: on when the experts "
        "do not all fit and a layer's reads are 4 MiB or more, where flash, not compute, is the limit; "
        "docs/benchmarks.md)",
    )


def add_rpc_deadline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rpc-deadline",
        type=float,
        default=DEFAULT_RPC_DEADLINE,
        help="seconds a node gets for a layer's request before it counts as hung and its work moves to replicas; "
        "grows with measured latency for large requests (default %(default)g)",
    )


def resolve_store(args: argparse.Namespace, *, show_progress: bool) -> None:
    """args.store: a store as given, or the cached store of a model directory or hub id (packed now on
    first use: model_cache.resolve_model)."""
    from flashmesh.coordinator.model_cache import resolve_model

    args.store = resolve_model(args.store, show_progress=show_progress)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Everything `model_options` reads: `run` and `serve` take exactly these."""
    p.add_argument(
        "store",
        help="a store (with --cluster: or its dense part, `flashmesh shard --dense`), or a model directory or hub "
        "id, packed into the cache on first use (`flashmesh models`)",
    )
    add_cache_args(p)
    p.add_argument("--cluster", action="store_true", help="compute the experts on nodes (zeroconf and/or --node)")
    add_discovery_args(p)
    add_rpc_deadline_arg(p)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The options `add_model_args` added, as given on the command line, else the environment, else the
    cluster config (`flashmesh cluster init`). STORE as given: `resolve_store` makes a store of a model
    directory or hub id."""
    cluster = args.cluster or bool(args.node)
    tls = tls_setting(args.tls) if cluster else args.tls
    zeroconf = tuple(interfaces_setting(args.interfaces)) if cluster and not args.no_zeroconf else None
    options = ModelOptions(
        store=Path(args.store),
        lookahead=args.lookahead,
        ram_budget=parse_bytes(args.ram_budget) if args.ram_budget else None,
        page_cache=args.page_cache,
        preload=args.preload,
        huge_pages=args.huge_pages,
        cluster=cluster,
        nodes=tuple(args.node),
        zeroconf=zeroconf,
        discover_timeout=args.discover_timeout,
        expect=args.expect,
        name_prefix=args.name_prefix,
        token=args.token,
        tls=Path(tls) if tls else None,
        rpc_deadline=args.rpc_deadline,
    )
    options.check()
    return options
