"""`flashmesh cluster ls | inspect | top` (init, add-node and join: setup_cli.py), and the discovery options of
coordinator commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from flashmesh.coordinator.tables import stdout_console
from flashmesh.node.cluster_config import interfaces_setting, tls_setting
from flashmesh.protos import TLS_ENV, TOKEN_ENV
from rich.console import Console
from rich.live import Live

log = logging.getLogger(__name__)
out = stdout_console()
err = Console(stderr=True)


def add_discovery_args(p: argparse.ArgumentParser) -> None:
    """Where to look for nodes: static addresses and zeroconf interfaces."""
    p.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="a node's address (repeatable)")
    p.add_argument(
        "--interfaces",
        nargs="+",
        default=None,
        metavar="ADDR",
        help="IPv4 addresses of the interfaces zeroconf browses on, or auto (default: the config of `flashmesh "
        "cluster init`, else 127.0.0.1)",
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
    p.add_argument("--token", default=None, help=f"the cluster token (default: ${TOKEN_ENV}, else the config)")
    p.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help="mutual TLS with this coordinator identity: CLUSTER_DIR or CLUSTER_DIR/coordinator "
        f"(default: ${TLS_ENV}, else the config)",
    )


def coordinator_tls(args):
    """The coordinator's TLS identity: --tls, $FLASHMESH_TLS or the config; None: plaintext."""
    from flashmesh.node.tls import COORDINATOR, load_identity

    path = tls_setting(args.tls)
    return None if path is None else load_identity(path, role=COORDINATOR)


def find_nodes(args) -> list:
    """The nodes `add_discovery_args`' options name or find."""
    from flashmesh.coordinator.discovery import find_nodes

    return find_nodes(
        static=args.node,
        interfaces=None if args.no_zeroconf else interfaces_setting(args.interfaces),
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

    prefix = args.name_prefix
    return NodeWatcher(interfaces=interfaces_setting(args.interfaces), accept=lambda n: n.name.startswith(prefix))


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
    from flashmesh.coordinator.setup_cli import register_setup

    register_setup(cluster_sub)


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
        out.print(nodes_table(rows, title=f"flashmesh cluster: {len(rows)} nodes", console=out))
    return 0


def cmd_cluster_inspect(args) -> int:
    from flashmesh.coordinator.cluster_view import layers_table, nodes_table, public

    rows = _rows(args)
    if args.json:
        print(json.dumps([public(r) for r in rows]))
        return 0
    out.print(nodes_table(rows, title=f"flashmesh cluster: {len(rows)} nodes", console=out))
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
                    live.update(
                        nodes_table(rows, title="flashmesh cluster top", rates=rates, console=out), refresh=True
                    )
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
