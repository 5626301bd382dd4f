"""One-time cluster setup on the coordinator: the CA, the coordinator's identity, the token and the
config file (`flashmesh cluster init`), and a join file per node (`flashmesh cluster add-node NAME`).

Everything lives in the config directory (node.cluster_config): `config.toml`, and `cluster/`
holding the CA (ca/, never leaves this machine), the coordinator's identity and nodes/NAME.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

from flashmesh.coordinator.certs import DEFAULT_DAYS, init_cluster, issue
from flashmesh.node.advertise import check_interfaces
from flashmesh.node.cluster_config import (
    AUTO,
    COORDINATOR_ROLE,
    NODE_ROLE,
    ClusterConfig,
    config_dir,
    config_path,
    load_config,
    save_config,
)
from flashmesh.node.join import JOIN_SUFFIX, write_join_file
from flashmesh.node.tls import check_name
from flashmesh.protos.errors import UserError

CLUSTER_DIR = "cluster"


def setup_coordinator(*, interfaces: Sequence[str] = (AUTO,), force: bool = False) -> ClusterConfig:
    """Make this machine a cluster's coordinator: a new CA, token and config file."""
    if list(interfaces) != [AUTO]:
        check_interfaces(list(interfaces))
    if config_path().exists() and not force:
        raise UserError(
            f"{config_path()} already exists: this machine is set up; add nodes with `flashmesh cluster add-node "
            "NAME`, or pass --force to start a new cluster (every node must then join again)"
        )
    init_cluster(config_dir() / CLUSTER_DIR, force=force)
    config = ClusterConfig(
        role=COORDINATOR_ROLE,
        token=secrets.token_urlsafe(18),
        tls=CLUSTER_DIR,
        interfaces=AUTO if list(interfaces) == [AUTO] else list(interfaces),
    )
    save_config(config, force=force)
    return config


def coordinator_config() -> ClusterConfig:
    config = load_config()
    if config is None or config.role != COORDINATOR_ROLE:
        raise UserError(
            "this machine is not a cluster's coordinator yet: run `flashmesh cluster init` first "
            "(or `flashmesh cluster add-node CLUSTER_DIR NAME` for a cluster directory of your own)"
        )
    return config


def add_node(
    name: str, *, out: Path | None = None, sans: Sequence[str] = (), days: int = DEFAULT_DAYS, force: bool = False
) -> Path:
    """Issue node `name` a certificate and write its join file (default ./NAME.flashmesh-join)."""
    check_name(name)
    config = coordinator_config()
    out = Path(out) if out is not None else Path.cwd() / f"{name}{JOIN_SUFFIX}"
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    identity = issue(config_dir() / CLUSTER_DIR, name, sans=sans, days=days, force=force)
    node = ClusterConfig(role=NODE_ROLE, token=config.token, interfaces=AUTO, name=name)
    return write_join_file(out, node, identity)
