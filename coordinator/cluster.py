"""Connecting to nodes: check each one's protocol version and model fingerprint, then place.

Used by `flashmesh run --cluster`, the demo and `flashmesh cluster ...`. Every failure is one line
(a NodeError / StoreError) naming the node and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.client import NodeClient, NodeError
from coordinator.discovery import NodeAddress
from coordinator.placement import NodeCapacity
from protos import PROTOCOL_VERSION
from protos import flashmesh_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class ConnectedNode:
    address: NodeAddress
    client: NodeClient
    info: pb.NodeInfo

    @property
    def node_id(self) -> str:
        return self.info.node_id

    def capacity(self) -> NodeCapacity:
        return NodeCapacity(
            node_id=self.info.node_id,
            held={h.layer: frozenset(h.experts) for h in self.info.layers},
            read_gbps=self.info.flash_read_gbps,
            ram_budget_bytes=self.info.ram_budget_bytes,
            name=self.info.name,
        )


def connect(
    addresses: list[NodeAddress], *, token: str, fingerprint: str | None = None, timeout: float = 10.0
) -> list[ConnectedNode]:
    """Open a channel to each address and fetch its info; refuse wrong protocol or model."""
    nodes: dict[str, ConnectedNode] = {}
    try:
        for address in addresses:
            client = NodeClient(address, token=token)
            try:
                info = client.info(timeout=timeout)
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
    return list(nodes.values())
