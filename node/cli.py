"""`flashmesh node serve` and `flashmesh shard`: this machine's part of a cluster."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

from flashmesh.node.advertise import check_interfaces
from flashmesh.node.cluster_config import interfaces_setting, name_setting, tls_setting, token_setting
from flashmesh.protos import DEFAULT_MAX_MESSAGE_BYTES, TLS_ENV, TOKEN_ENV
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes
from rich.console import Console

log = logging.getLogger(__name__)
DRAIN_SECONDS = 2.0  # a stopping node lets requests in flight finish for this long
err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="serve this machine's experts to a coordinator")
    node_sub = p.add_subparsers(dest="node_command", required=True)
    s = node_sub.add_parser("serve", help="serve a store (or shard) over gRPC and advertise it by zeroconf")
    s.set_defaults(func=cmd_node_serve)
    s.add_argument("store", type=Path, nargs="?", default=None, help="a store or shard (`flashmesh pack` / `shard`)")
    s.add_argument(
        "--bundle", type=Path, default=None, metavar="OUT.flashmesh-ios",
        help="serve the experts of an iOS bundle (`flashmesh export-ios`) from its own record files instead",
    )  # fmt: skip
    s.add_argument("--count", type=int, default=None, help="with --bundle: serve one shard of COUNT ...")
    s.add_argument("--index", type=int, default=None, help="... the experts `flashmesh shard --index I` would hold")
    s.add_argument("--replicas", type=int, default=1, help="with --bundle --count: machines holding each expert")
    s.add_argument(
        "--ram-budget", default=None,
        help="bytes of expert weights kept in RAM, e.g. 8GB (default: every expert held, at most half the RAM)",
    )  # fmt: skip
    s.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    s.add_argument("--name", default=None, help="node name (default: the config's, else the host name)")
    s.add_argument(
        "--interfaces", nargs="+", default=None, metavar="ADDR",
        help="IPv4 addresses to listen and advertise on, or auto (default: the config of `flashmesh cluster join`, "
        "else 127.0.0.1 only)",
    )  # fmt: skip
    s.add_argument(
        "--token", default=None, help=f"the cluster token (default: ${TOKEN_ENV}, else the config; else one is made up)"
    )
    s.add_argument("--no-advertise", action="store_true", help="do not advertise by zeroconf (static --node only)")
    s.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"serve only mutual TLS with this node identity: CLUSTER_DIR/nodes/NAME (default: ${TLS_ENV}, else the "
        "config)",
    )
    s.add_argument("--page-cache", action="store_true", help="let the OS page cache help (default: bypass it)")
    s.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="back the expert cache with 4 KiB pages, not transparent huge pages (Linux; docs/store.md)",
    )
    s.add_argument("--flash-gbps", type=float, default=None, help="report this read bandwidth instead of measuring")
    s.add_argument("--max-message", default=str(DEFAULT_MAX_MESSAGE_BYTES), help="largest request accepted")
    s.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # exit when this process goes

    p = sub.add_parser("shard", help="write the part of a store one machine serves")
    p.set_defaults(func=cmd_shard)
    p.add_argument("store", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, help="number of shards")
    p.add_argument("--index", type=int, help="which shard, 0..count-1")
    p.add_argument("--replicas", type=int, default=1, help="machines holding each expert (default 1)")
    p.add_argument("--dense", action="store_true", help="write the coordinator's dense part instead")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _node_tls(args):
    """The node's TLS identity (--tls, $FLASHMESH_TLS or the config); its certificate names the node."""
    from flashmesh.node.tls import CERT_FILE, NODE, load_identity

    path = tls_setting(args.tls)
    if path is None:
        return None
    tls = load_identity(path, role=NODE, name=args.name or socket.gethostname())
    if args.name and args.name != tls.name:
        raise UserError(
            f"--name {args.name} but {tls.path / CERT_FILE} is node {tls.name}'s certificate; "
            f"drop --name, or issue one with `flashmesh cluster add-node CLUSTER_DIR {args.name}`"
        )
    return tls


def _budget(args) -> int:
    """--ram-budget, else every expert this store holds, at most half of this machine's RAM."""
    from flashmesh.node.store_format import Manifest

    if args.ram_budget is not None:
        return parse_bytes(args.ram_budget)
    if args.bundle is not None:
        raise UserError("with --bundle, give --ram-budget (e.g. 8GB): bytes of expert weights kept in RAM")
    manifest = Manifest.load(args.store)
    held = sum(len(s.experts) * s.payload_bytes for s in manifest.layers)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(held, max(manifest.min_budget_bytes, physical // 2))


def cmd_node_serve(args) -> int:
    from flashmesh.node.shutdown import stop_on_signals

    args.name = name_setting(args.name)
    interfaces = interfaces_setting(args.interfaces)
    check_interfaces(interfaces)
    tls = _node_tls(args)
    if (args.store is None) == (args.bundle is None):
        raise UserError("give a STORE to serve, or --bundle OUT.flashmesh-ios (one of the two)")
    shard = None
    if args.count is not None or args.index is not None:
        if args.bundle is None or args.count is None or args.index is None:
            raise UserError("--count and --index go together and with --bundle; shard a store with `flashmesh shard`")
        shard = {"count": args.count, "index": args.index, "replicas": args.replicas}
    token = token_setting(args.token)
    generated = not token
    token = token or secrets.token_urlsafe(18)
    # SIGTERM / SIGINT from here on (even while the store opens) stop the node after draining: exit 0.
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        return _serve_node(
            args, stop, cleanup, interfaces=interfaces, tls=tls, shard=shard, token=token, generated=generated
        )


def _serve_node(
    args, stop, cleanup: contextlib.ExitStack, *, interfaces: list[str], tls, shard, token: str, generated: bool
) -> int:
    from flashmesh.node.advertise import Advertiser
    from flashmesh.node.server import start_server
    from flashmesh.node.service import NodeService

    service = NodeService(
        args.bundle or args.store,
        bundle=args.bundle is not None,
        shard=shard,
        ram_budget=_budget(args),
        token=token,
        name=args.name or (tls.name if tls else socket.gethostname()),
        page_cache=args.page_cache,
        huge_pages=args.huge_pages,
        max_message_bytes=parse_bytes(args.max_message),
        flash_gbps=args.flash_gbps,
    )
    cleanup.callback(service.close)  # runs last: after the server has drained
    if stop.is_set():  # stopped while the store opened
        return 0
    try:
        server, port = start_server(service, addresses=interfaces, port=args.port, tls=tls)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot listen on {', '.join(interfaces)} port {args.port}: {e}") from None
    cleanup.callback(lambda: server.stop(grace=DRAIN_SECONDS).wait())  # requests in flight finish
    info = service.info()
    if not args.no_advertise:
        advertiser = Advertiser(
            name=service.name, node_id=service.node_id, fingerprint=info.fingerprint, port=port,
            interfaces=interfaces,
        )  # fmt: skip
        cleanup.callback(advertiser.close)  # first: coordinators stop sending here
    held = sum(len(h.experts) for h in info.layers)
    total = sum(h.num_experts for h in info.layers)
    print(
        f"node {service.name} ({service.node_id}) serving {held} of {total} experts of model "
        f"{info.fingerprint[:16]} from {f'bundle {args.bundle}' if args.bundle else args.store} "
        f"on {', '.join(interfaces)} port {port}",
        flush=True,
    )
    if tls is not None:
        print(f"mutual TLS: certificate {tls.path} valid until {tls.not_after:%Y-%m-%d}", flush=True)
    if generated:
        print(f"cluster token: {token}  (give it to the coordinator: --token or {TOKEN_ENV})", flush=True)
    while not stop.wait(0.5):
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            log.warning("parent process %d is gone; stopping", args.parent_pid)
            break
    return 0


def cmd_shard(args) -> int:
    from flashmesh.node.shard import write_dense, write_shard

    if args.dense:
        write_dense(args.store, args.out, force=args.force)
        err.print(f"wrote the dense part of {args.store} to {args.out}")
        return 0
    if args.count is None or args.index is None:
        raise UserError("pass --count N and --index I (or --dense for the coordinator's part)")
    m = write_shard(args.store, args.out, count=args.count, index=args.index, replicas=args.replicas, force=args.force)
    held = sum(len(s.experts) for s in m.layers)
    err.print(f"wrote shard {args.index} of {args.count} ({held} experts) to {args.out}")
    return 0
