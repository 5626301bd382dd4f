"""Connecting to nodes: check each one's protocol version and model fingerprint, then place.

Used by `flashmesh run --cluster`, the demo and `flashmesh cluster ...`. Every failure is one line
(a NodeError / UserError) naming the node and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flashmesh.coordinator.client import NodeClient, NodeError
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.coordinator.placement import NodeCapacity
from flashmesh.node.cluster_config import token_setting
from flashmesh.node.tls import TlsIdentity
from flashmesh.protos import PROTOCOL_VERSION, TOKEN_ENV
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)


def resolve_token(token: str | None) -> str:
    """The cluster token given, else $FLASHMESH_TOKEN, else the config's (`flashmesh cluster init`);
    a one-line error without one."""
    token = token_setting(token)
    if not token:
        raise UserError(
            f"the cluster needs its token: pass --token or set {TOKEN_ENV} (each node prints it when it starts), "
            "or set the cluster up once with `flashmesh cluster init`"
        )
    return token


@dataclass
class ConnectedNode:
    address: NodeAddress
    client: NodeClient
    info: pb.NodeInfo

    @property
    def node_id(self) -> str:
        return self.info.node_id

    def capacity(self) -> NodeCapacity:
        return NodeCapacity.of(self.info)


def identity_problem(address: NodeAddress, info: pb.NodeInfo) -> str | None:
    """Why the node that answered is not the one `address` names (zeroconf's TXT record, or the
    NAME of NAME@HOST:PORT); None when it is. Under TLS gRPC has already checked that the node's
    certificate is for `address.name`."""
    if address.node_id and info.node_id != address.node_id:
        return f"advertises node id {address.node_id} but answers as {info.node_id}"
    if address.name and info.name != address.name:
        return f"was named {address.name!r} but calls itself {info.name!r}"
    if address.fingerprint and info.fingerprint != address.fingerprint:
        return f"advertises model {address.fingerprint[:16]} but serves {info.fingerprint[:16]}"
    return None


def _connect_one(
    address: NodeAddress, *, token: str, fingerprint: str | None, timeout: float, tls: TlsIdentity | None
) -> tuple[NodeClient, pb.NodeInfo]:
    client = NodeClient(address, token=token, tls=tls)
    try:
        info = client.info(timeout=timeout)
        problem = identity_problem(address, info)
        if problem is not None:
            raise NodeError(f"node {address.label} {problem}; not using it")
        if info.protocol_version != PROTOCOL_VERSION:
            raise NodeError(
                f"node {address.label} speaks protocol {info.protocol_version}, this coordinator "
                f"{PROTOCOL_VERSION}; run the same flashmesh version on every machine"
            )
        if fingerprint is not None and info.fingerprint != fingerprint:
            raise NodeError(
                f"node {address.label} serves model {info.fingerprint[:16]}, not this store's "
                f"{fingerprint[:16]}; serve a shard of the same store there"
            )
    except BaseException:
        client.close()
        raise
    return client, info


def connect(
    addresses: list[NodeAddress],
    *,
    token: str,
    fingerprint: str | None = None,
    timeout: float = 10.0,
    tls: TlsIdentity | None = None,
) -> list[ConnectedNode]:
    """Open a channel to each address and fetch its info; refuse wrong protocol, model or identity.

    A zeroconf answer is only a hint: a node found that way that cannot be reached, refuses our
    token or TLS certificate, or is not the node it advertised is skipped with a warning. A node
    given statically (--node) that fails is an error."""
    nodes: dict[str, ConnectedNode] = {}
    skipped: list[str] = []
    try:
        for address in addresses:
            try:
                client, info = _connect_one(address, token=token, fingerprint=fingerprint, timeout=timeout, tls=tls)
            except NodeError as e:
                if address.source != "zeroconf":
                    raise
                log.warning("skipping a node found by zeroconf: %s", e)
                skipped.append(str(e))
                continue
            if info.node_id in nodes:  # found twice (zeroconf and --node): keep one channel
                client.close()
                continue
            label = f"{info.name} ({address.target})" if info.name else address.target
            client.label = label
            nodes[info.node_id] = ConnectedNode(address, client, info)
    except BaseException:
        for node in nodes.values():
            node.client.close()
        raise
    if not nodes and skipped:
        raise NodeError(f"no usable node: {'; '.join(skipped)}")
    return list(nodes.values())


class Relinker:
    """RemoteExperts' `relink` (coordinator.links.Relink): a new client for a node that `watcher`
    (coordinator.node_watch.NodeWatcher, owned: closed with it) saw announce itself under the same
    name at another address; the old client is closed."""

    def __init__(self, nodes: list[ConnectedNode], watcher, *, token: str, tls: TlsIdentity | None) -> None:
        self.by_id = {n.node_id: n for n in nodes}
        self.watcher, self.token, self.tls = watcher, token, tls

    def __call__(self, node_id: str) -> NodeClient | None:
        node = self.by_id[node_id]
        moved = self.watcher.latest(node.info.name) if node.info.name else None
        if moved is None or moved.target == node.client.address.target:
            return None
        old, node.address = node.client, moved
        node.client = NodeClient(moved, token=self.token, tls=self.tls)
        node.client.label = f"{node.info.name} ({moved.target})"
        old.close()
        return node.client

    def close(self) -> None:
        self.watcher.close()
