"""`flashmesh cluster ls | inspect | top | init | add-node`, and the discovery options of coordinator commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from flashmesh.protos import TLS_ENV, TOKEN_ENV
from rich.console import Console
from rich.live import Live

log = logging.getLogger(__name__)
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


def find_nodes(args) -> list:
    """The nodes `add_discovery_args`' options name or find."""
    from flashmesh.coordinator.discovery import find_nodes

    return find_nodes(
        static=args.node,
        interfaces=None if args.no_zeroconf else args.interfaces,
        timeout=args.discover_timeout,
        expect=args.expect,
        name_prefix=args.name_prefix,
    )


def node_watcher(args):
    """A NodeWatcher on --interfaces for the nodes `cluster top` would show (None with --no-zeroconf):
    it finds nodes that restart elsewhere."""
    if args.no_zeroconf:
        return None
    from flashmesh.coordinator.node_watch import NodeWatcher

    prefix = getattr(args, "name_prefix", "")
    return NodeWatcher(interfaces=args.interfaces, accept=lambda n: n.name.startswith(prefix))


def register(sub: argparse._SubParsersAction) -> None:
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


def _rows(args) -> list[dict]:
    from flashmesh.coordinator.client import NodeClient
    from flashmesh.coordinator.cluster import resolve_token
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
    from flashmesh.coordinator.cluster import resolve_token
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
