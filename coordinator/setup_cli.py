"""`flashmesh cluster init | add-node | join`: set a cluster up once, then run without flags.

`cluster init` with no directory makes this machine the coordinator (CA, identities, token and the
config file in the config directory); `cluster add-node NAME` writes NAME.flashmesh-join for a node,
which `cluster join FILE` installs there. With a CLUSTER_DIR they only write certificates, as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

err = Console(stderr=True)


def _say(text: str) -> None:
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def register_setup(cluster_sub: argparse._SubParsersAction) -> None:
    from flashmesh.coordinator.certs import DEFAULT_DAYS

    c = cluster_sub.add_parser("init", help="set this machine up as the coordinator (CA, token, config file)")
    c.set_defaults(func=cmd_cluster_init)
    c.add_argument(
        "dir", type=Path, nargs="?", default=None,
        help="only write a cluster CA and certificates into this directory (no config file)",
    )  # fmt: skip
    c.add_argument(
        "--interfaces", nargs="+", default=["auto"], metavar="ADDR",
        help="IPv4 addresses the cluster's commands use on this machine, or auto (default: every interface that is "
        "up, loopback excepted)",
    )  # fmt: skip
    c.add_argument("--nodes", default="", help="with DIR: comma-separated node names to issue certificates for")
    c.add_argument("--coordinator", default="coordinator", help="with DIR: the coordinator certificate's name")
    a = cluster_sub.add_parser("add-node", help="write a join file (or a certificate) for one more node")
    for parser in (c, a):
        parser.add_argument(
            "--san", action="append", default=[], metavar="HOST_OR_IP",
            help="another host name or IP address the node is reached at (repeatable; for --node HOST:PORT)",
        )  # fmt: skip
        parser.add_argument(
            "--days", type=int, default=DEFAULT_DAYS, help=f"certificate lifetime (default {DEFAULT_DAYS})"
        )
        parser.add_argument("--force", action="store_true", help="replace what exists")
    a.set_defaults(func=cmd_cluster_add_node)
    a.add_argument(
        "target", nargs="+", metavar="NAME",
        help="the node's name (its certificate's); CLUSTER_DIR NAME: only a certificate, into CLUSTER_DIR",
    )  # fmt: skip
    a.add_argument("--out", type=Path, default=None, help="where the join file goes (default ./NAME.flashmesh-join)")
    j = cluster_sub.add_parser("join", help="on a node: install the join file `cluster add-node` wrote")
    j.set_defaults(func=cmd_cluster_join)
    j.add_argument("file", type=Path, help="NAME.flashmesh-join, copied from the coordinator")
    j.add_argument("--force", action="store_true", help="replace this machine's cluster config")


def cmd_cluster_init(args) -> int:
    if args.dir is not None:
        return _init_directory(args)
    from flashmesh.coordinator.cluster_setup import setup_coordinator
    from flashmesh.node.cluster_config import config_path

    config = setup_coordinator(interfaces=args.interfaces, force=args.force)
    where = "every interface that is up" if config.interfaces == "auto" else ", ".join(config.interfaces)
    _say(f"this machine is the coordinator: {config_path()} (token, TLS, interfaces: {where})")
    _say("for each node: flashmesh cluster add-node NAME, copy NAME.flashmesh-join to it and run there")
    _say("  flashmesh cluster join NAME.flashmesh-join && flashmesh node serve STORE")
    _say("then here: flashmesh cluster ls, flashmesh run STORE --cluster --prompt ..., flashmesh serve STORE --cluster")
    return 0


def _init_directory(args) -> int:
    from flashmesh.coordinator.certs import init_cluster

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    written = init_cluster(
        args.dir, nodes=nodes, coordinator=args.coordinator, sans=args.san, days=args.days, force=args.force
    )
    _say(f"cluster CA: {args.dir / 'ca'} (keep it on this machine; nodes never need it)")
    for path in written:
        _say(f"  {path}  -> copy to {'the coordinator' if path.name == 'coordinator' else 'node ' + path.name}")
    _say(
        "on each node: flashmesh node serve SHARD --tls NAME_DIR ...; on the coordinator: --tls "
        f"{args.dir} (or its coordinator/ copied there); more nodes: flashmesh cluster add-node {args.dir} NAME"
    )
    return 0


def cmd_cluster_add_node(args) -> int:
    from flashmesh.protos.errors import UserError

    if len(args.target) == 2:  # CLUSTER_DIR NAME: a certificate only, as before the config file
        from flashmesh.coordinator.certs import issue

        directory, name = Path(args.target[0]), args.target[1]
        path = issue(directory, name, sans=args.san, days=args.days, force=args.force)
        _say(f"{path}  -> copy to node {name}; there: flashmesh node serve SHARD --tls {path.name} ...")
        return 0
    if len(args.target) != 1:
        raise UserError("give the node's NAME (or CLUSTER_DIR NAME)")
    from flashmesh.coordinator.cluster_setup import add_node

    path = add_node(args.target[0], out=args.out, sans=args.san, days=args.days, force=args.force)
    _say(f"{path}  -> copy it to node {args.target[0]} (it holds the node's key: keep it private); there run")
    _say(f"  flashmesh cluster join {path.name} && flashmesh node serve STORE")
    return 0


def cmd_cluster_join(args) -> int:
    from flashmesh.node.cluster_config import config_path
    from flashmesh.node.join import join

    config = join(args.file, force=args.force)
    _say(f"joined as node {config.name}: {config_path()}; now run: flashmesh node serve STORE")
    return 0
