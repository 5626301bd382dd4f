"""`flashmesh node serve`, `flashmesh shard` and `flashmesh cluster ls | inspect | top`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from flashmesh.node.cache import parse_bytes
from flashmesh.node.store_format import StoreError
from flashmesh.protos import DEFAULT_MAX_MESSAGE_BYTES, TLS_ENV, TOKEN_ENV
from rich.console import Console
from rich.live import Live

log = logging.getLogger(__name__)
DRAIN_SECONDS = 2.0  # a stopping node lets requests in flight finish for this long
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable when piped
err = Console(stderr=True)


def add_discovery_args(p: argparse.ArgumentParser) -> None:
    """Where to look for nodes: static addresses and zeroconf interfaces."""
    p.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="a node's address (repeatable)")
    p.add_argument(
        "--interfaces",
        nargs="+",
        default=["127.0.0.1"],
        metavar="ADDR",
        help="IPv4 addresses of the interfaces zeroconf browses on (default 127.0.0.1; e.g. your LAN address)",
    )
    p.add_argument("--no-zeroconf", action="store_true", help="use only --node addresses; send no multicast")
    p.add_argument("--discover-timeout", type=float, default=3.0, help="seconds to browse for nodes")
    p.add_argument("--expect", type=int, default=None, help="stop browsing once this many nodes are found")
    p.add_argument(
        "--name-prefix",
        default="",
        metavar="PREFIX",
        help="use only zeroconf nodes whose name starts with PREFIX (several clusters on one network)",
    )
    p.add_argument("--token", default=None, help=f"the cluster token (default: ${TOKEN_ENV})")
    p.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"mutual TLS with this coordinator identity: CLUSTER_DIR or CLUSTER_DIR/coordinator (default: ${TLS_ENV})",
    )


def coordinator_tls(args):
    """The coordinator's TLS identity from --tls or $FLASHMESH_TLS; None: plaintext."""
    from flashmesh.node.tls import COORDINATOR, load_identity

    path = args.tls or os.environ.get(TLS_ENV)
    return None if not path else load_identity(Path(path), role=COORDINATOR)


def find_nodes(args, *, fingerprint: str | None = None) -> list:
    from flashmesh.coordinator.discovery import discover

    prefix = getattr(args, "name_prefix", "")
    nodes = discover(
        static=args.node,
        interfaces=None if args.no_zeroconf else args.interfaces,
        timeout=args.discover_timeout,
        expect=args.expect,
        accept=lambda n: n.name.startswith(prefix) and (fingerprint is None or n.fingerprint == fingerprint),
    )
    if not nodes:
        where = "" if args.no_zeroconf else f" by zeroconf on {', '.join(args.interfaces)}"
        raise StoreError(f"no flashmesh nodes found{where}; start `flashmesh node serve` or pass --node HOST:PORT")
    return nodes


def node_watcher(args, *, fingerprint: str | None = None):
    """A coordinator.node_watch.NodeWatcher on --interfaces for the nodes find_nodes would accept
    (None with --no-zeroconf): a running coordinator finds restarted nodes at their new address."""
    if args.no_zeroconf:
        return None
    from flashmesh.coordinator.node_watch import NodeWatcher

    prefix = getattr(args, "name_prefix", "")
    return NodeWatcher(
        interfaces=args.interfaces,
        accept=lambda n: n.name.startswith(prefix) and (fingerprint is None or n.fingerprint == fingerprint),
    )


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
    s.add_argument("--ram-budget", required=True, help="bytes of expert weights kept in RAM, e.g. 8GB")
    s.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    s.add_argument("--name", default=None, help="node name (default: the host name)")
    s.add_argument(
        "--interfaces", nargs="+", default=["127.0.0.1"], metavar="ADDR",
        help="IPv4 addresses to listen and advertise on (default 127.0.0.1 only)",
    )  # fmt: skip
    s.add_argument("--token", default=None, help=f"the cluster token (default: ${TOKEN_ENV}; else one is generated)")
    s.add_argument("--no-advertise", action="store_true", help="do not advertise by zeroconf (static --node only)")
    s.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"serve only mutual TLS with this node identity: CLUSTER_DIR/nodes/NAME (default: ${TLS_ENV})",
    )
    s.add_argument("--page-cache", action="store_true", help="let the OS page cache help (default: bypass it)")
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

    p = sub.add_parser("cluster", help="see the nodes of a cluster")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True)
    for name, func, text in (
        ("ls", cmd_cluster_ls, "list the nodes found"),
        ("inspect", cmd_cluster_inspect, "nodes with per-layer holdings and assignment"),
        ("top", cmd_cluster_top, "refresh the nodes' figures live"),
    ):
        c = cluster_sub.add_parser(name, help=text)
        c.set_defaults(func=func)
        add_discovery_args(c)
        c.add_argument("--json", action="store_true", help="print JSON instead of tables")
        if name == "top":
            c.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
            c.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (0: never)")
    c = cluster_sub.add_parser("init", help="create a cluster CA and certificates for mutual TLS")
    c.set_defaults(func=cmd_cluster_init)
    c.add_argument("dir", type=Path, help="the cluster directory (its ca/ subdirectory never leaves this machine)")
    c.add_argument("--nodes", default="", help="comma-separated node names to issue certificates for")
    c.add_argument("--coordinator", default="coordinator", help="the coordinator certificate's name")
    _add_issue_args(c)
    c = cluster_sub.add_parser("add-node", help="issue one more node certificate from the cluster CA")
    c.set_defaults(func=cmd_cluster_add_node)
    c.add_argument("dir", type=Path, help="the cluster directory made by `flashmesh cluster init`")
    c.add_argument("name", help="the node's name (its `node serve --name`)")
    _add_issue_args(c)


def _add_issue_args(c: argparse.ArgumentParser) -> None:
    from flashmesh.coordinator.certs import DEFAULT_DAYS

    c.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST_OR_IP",
        help="another host name or IP address the node is reached at (repeatable; for --node HOST:PORT)",
    )
    c.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"certificate lifetime (default {DEFAULT_DAYS})")
    c.add_argument("--force", action="store_true", help="replace what exists")


def _check_interfaces(interfaces: list[str]) -> None:
    for a in interfaces:
        try:
            socket.inet_aton(a)
        except OSError:
            raise StoreError(f"--interfaces takes IPv4 addresses such as 127.0.0.1, not {a!r}") from None


def _node_tls(args):
    """The node's TLS identity (--tls or $FLASHMESH_TLS); its certificate names the node."""
    from flashmesh.node.tls import CERT_FILE, NODE, load_identity

    path = args.tls or os.environ.get(TLS_ENV)
    if not path:
        return None
    tls = load_identity(Path(path), role=NODE, name=args.name)
    if args.name and args.name != tls.name:
        raise StoreError(
            f"--name {args.name} but {tls.path / CERT_FILE} is node {tls.name}'s certificate; "
            f"drop --name, or issue one with `flashmesh cluster add-node CLUSTER_DIR {args.name}`"
        )
    return tls


def cmd_node_serve(args) -> int:
    from flashmesh.node.shutdown import stop_on_signals

    _check_interfaces(args.interfaces)
    tls = _node_tls(args)
    if (args.store is None) == (args.bundle is None):
        raise StoreError("give a STORE to serve, or --bundle OUT.flashmesh-ios (one of the two)")
    shard = None
    if args.count is not None or args.index is not None:
        if args.bundle is None or args.count is None or args.index is None:
            raise StoreError("--count and --index go together and with --bundle; shard a store with `flashmesh shard`")
        shard = {"count": args.count, "index": args.index, "replicas": args.replicas}
    token = args.token or os.environ.get(TOKEN_ENV)
    generated = not token
    token = token or secrets.token_urlsafe(18)
    # SIGTERM / SIGINT from here on (even while the store opens) stop the node after draining: exit 0.
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        return _serve_node(args, stop, cleanup, tls=tls, shard=shard, token=token, generated=generated)


def _serve_node(args, stop, cleanup: contextlib.ExitStack, *, tls, shard, token: str, generated: bool) -> int:
    from flashmesh.node.advertise import Advertiser
    from flashmesh.node.server import start_server
    from flashmesh.node.service import NodeService

    service = NodeService(
        args.bundle or args.store,
        bundle=args.bundle is not None,
        shard=shard,
        ram_budget=parse_bytes(args.ram_budget),
        token=token,
        name=args.name or (tls.name if tls else socket.gethostname()),
        page_cache=args.page_cache,
        max_message_bytes=parse_bytes(args.max_message),
        flash_gbps=args.flash_gbps,
    )
    cleanup.callback(service.close)  # runs last: after the server has drained
    if stop.is_set():  # stopped while the store opened
        return 0
    try:
        server, port = start_server(service, addresses=args.interfaces, port=args.port, tls=tls)
    except (OSError, RuntimeError) as e:
        raise StoreError(f"cannot listen on {', '.join(args.interfaces)} port {args.port}: {e}") from None
    cleanup.callback(lambda: server.stop(grace=DRAIN_SECONDS).wait())  # requests in flight finish
    info = service.info()
    if not args.no_advertise:
        advertiser = Advertiser(
            name=service.name, node_id=service.node_id, fingerprint=info.fingerprint, port=port,
            interfaces=args.interfaces,
        )  # fmt: skip
        cleanup.callback(advertiser.close)  # first: coordinators stop sending here
    held = sum(len(h.experts) for h in info.layers)
    total = sum(h.num_experts for h in info.layers)
    print(
        f"node {service.name} ({service.node_id}) serving {held} of {total} experts of model "
        f"{info.fingerprint[:16]} from {f'bundle {args.bundle}' if args.bundle else args.store} "
        f"on {', '.join(args.interfaces)} port {port}",
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


def cmd_cluster_init(args) -> int:
    from flashmesh.coordinator.certs import init_cluster

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    written = init_cluster(
        args.dir, nodes=nodes, coordinator=args.coordinator, sans=args.san, days=args.days, force=args.force
    )

    def say(text: str) -> None:
        err.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"cluster CA: {args.dir / 'ca'} (keep it on this machine; nodes never need it)")
    for path in written:
        say(f"  {path}  -> copy to {'the coordinator' if path.name == 'coordinator' else 'node ' + path.name}")
    say(
        "on each node: flashmesh node serve SHARD --tls NAME_DIR ...; on the coordinator: --tls "
        f"{args.dir} (or its coordinator/ copied there); more nodes: flashmesh cluster add-node {args.dir} NAME"
    )
    return 0


def cmd_cluster_add_node(args) -> int:
    from flashmesh.coordinator.certs import issue

    path = issue(args.dir, args.name, sans=args.san, days=args.days, force=args.force)
    err.print(
        f"{path}  -> copy to node {args.name}; there: flashmesh node serve SHARD --tls {path.name} ...",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_shard(args) -> int:
    from flashmesh.node.shard import write_dense, write_shard

    if args.dense:
        write_dense(args.store, args.out, force=args.force)
        err.print(f"wrote the dense part of {args.store} to {args.out}")
        return 0
    if args.count is None or args.index is None:
        raise StoreError("pass --count N and --index I (or --dense for the coordinator's part)")
    m = write_shard(args.store, args.out, count=args.count, index=args.index, replicas=args.replicas, force=args.force)
    held = sum(len(s.experts) for s in m.layers)
    err.print(f"wrote shard {args.index} of {args.count} ({held} experts) to {args.out}")
    return 0


def _rows(args) -> list[dict]:
    from flashmesh.coordinator.client import NodeClient
    from flashmesh.coordinator.cluster_run import resolve_token
    from flashmesh.coordinator.cluster_view import add_assignment, node_row

    token = resolve_token(args.token)
    tls = coordinator_tls(args)
    rows = []
    for address in find_nodes(args):
        client = NodeClient(address, token=token, tls=tls)
        try:
            rows.append(node_row(address, client))
        finally:
            client.close()
    add_assignment(rows)
    return rows


def cmd_cluster_ls(args) -> int:
    from flashmesh.coordinator.cluster_view import nodes_table, public

    rows = _rows(args)
    if args.json:
        print(json.dumps([public(r) for r in rows]))
    else:
        out.print(nodes_table(rows, title=f"flashmesh cluster: {len(rows)} nodes"))
    return 0


def cmd_cluster_inspect(args) -> int:
    from flashmesh.coordinator.cluster_view import layers_table, nodes_table, public

    rows = _rows(args)
    if args.json:
        print(json.dumps([public(r) for r in rows]))
        return 0
    out.print(nodes_table(rows, title=f"flashmesh cluster: {len(rows)} nodes"))
    for row in rows:
        if "error" not in row:
            out.print(layers_table(row))
        if "placement_error" in row:
            out.print(f"placement: {row['placement_error']}", style="yellow", markup=False)
    return 0


def cmd_cluster_top(args) -> int:
    from flashmesh.coordinator.client import NodeClient
    from flashmesh.coordinator.cluster_run import resolve_token
    from flashmesh.coordinator.cluster_view import add_assignment, node_row, nodes_table, public

    token = resolve_token(args.token)
    tls = coordinator_tls(args)
    # keyed by node name (zeroconf) or address (--node): a node that restarts elsewhere replaces its row
    clients = {a.name or a.target: (a, NodeClient(a, token=token, tls=tls)) for a in find_nodes(args)}
    watcher = node_watcher(args)
    previous: dict[str, tuple[float, int, int]] = {}
    try:
        with Live(console=out, auto_refresh=False, transient=False) if not args.json else _NoLive() as live:
            count = 0
            while args.iterations == 0 or count < args.iterations:
                for a in watcher.current() if watcher is not None else []:
                    known = clients.get(a.name or a.target)
                    if known is None or known[0].target != a.target:
                        if known is not None:
                            known[1].close()
                        clients[a.name or a.target] = (a, NodeClient(a, token=token, tls=tls))
                rows = [node_row(a, c) for a, c in clients.values()]
                add_assignment(rows)
                now, rates = time.monotonic(), {}
                for r in rows:
                    if "node_id" in r:
                        t0, req0, read0 = previous.get(r["node_id"], (now, r["requests"], r["expert_bytes_read"]))
                        dt = max(now - t0, 1e-9)
                        rates[r["node_id"]] = ((r["requests"] - req0) / dt, (r["expert_bytes_read"] - read0) / dt)
                        previous[r["node_id"]] = (now, r["requests"], r["expert_bytes_read"])
                if args.json:
                    print(json.dumps([{**public(r), "requests_per_s": rates.get(r.get("node_id"), (0, 0))[0]}
                                      for r in rows]), flush=True)  # fmt: skip
                else:
                    live.update(nodes_table(rows, title="flashmesh cluster top", rates=rates), refresh=True)
                count += 1
                if args.iterations == 0 or count < args.iterations:
                    time.sleep(args.interval)
    finally:
        if watcher is not None:
            watcher.close()
        for _, client in clients.values():
            client.close()
    return 0


class _NoLive:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
