"""Placement: which node computes each (layer, expert). A pure function of the manifest and the
nodes' reported holdings, flash read bandwidth and RAM budget; no network.

Model of cost: routing is unknown ahead of time, so every expert is expected to be used equally
often. A node assigned A bytes of experts with a RAM budget R keeps R of them cached and streams
the rest: its expected flash time per token is proportional to max(0, A - R) / bandwidth, and when
everything fits, its compute is proportional to A / bandwidth (a faster machine usually has the
faster flash too). Experts are assigned greedily, most-constrained first (fewest holders), each
to the holder whose cost after taking it is lowest. Every other holder is kept, cheapest first,
as a replica: the alternatives a reliability layer fails over to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.errors import UserError

Key = tuple[int, int]  # (layer, expert)


class LayerLike(Protocol):
    """What placement needs of a MoE layer: node.store_format.LayerSpec or LayerShape."""

    layer: int
    num_experts: int

    @property
    def payload_bytes(self) -> int: ...


@dataclass(frozen=True)
class LayerShape:
    layer: int
    num_experts: int
    payload_bytes: int


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    held: dict[int, frozenset[int]]  # layer -> experts on this node's flash
    read_gbps: float
    ram_budget_bytes: int
    name: str = ""

    @classmethod
    def of(cls, info: pb.NodeInfo) -> NodeCapacity:
        """What a node's Info reply says it can take."""
        return cls(
            node_id=info.node_id,
            held={h.layer: frozenset(h.experts) for h in info.layers},
            read_gbps=info.flash_read_gbps,
            ram_budget_bytes=info.ram_budget_bytes,
            name=info.name,
        )


@dataclass
class Placement:
    node_ids: list[str]
    owner: dict[int, np.ndarray]  # layer -> [E] index into node_ids of the primary node
    replicas: dict[Key, tuple[str, ...]] = field(default_factory=dict)  # alternatives, best first
    assigned_bytes: dict[str, int] = field(default_factory=dict)

    def node_of(self, layer: int, expert: int) -> str:
        return self.node_ids[int(self.owner[layer][expert])]

    def assigned(self, node_id: str) -> list[Key]:
        slot = self.node_ids.index(node_id)
        return [(layer, int(e)) for layer, row in sorted(self.owner.items()) for e in np.nonzero(row == slot)[0]]


def _cost(assigned: int, node: NodeCapacity) -> tuple[float, float]:
    gbps = max(node.read_gbps, 1e-6)
    return (max(0, assigned - node.ram_budget_bytes) / gbps, assigned / gbps)


def place(layers: Sequence[LayerLike], nodes: Sequence[NodeCapacity]) -> Placement:
    """Map every routed expert of `layers` (the full model's) to one node holding it on flash."""
    if not nodes:
        raise UserError("no nodes to place experts on; start `flashmesh node serve` or pass --node HOST:PORT")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise UserError("two nodes report the same node id; restart one of them")
    items: list[tuple[int, int, int, list[int]]] = []  # (layer, expert, bytes, holder slots)
    missing: dict[int, list[int]] = {}
    for spec in layers:
        for e in range(spec.num_experts):
            holders = [i for i, n in enumerate(nodes) if e in n.held.get(spec.layer, ())]
            if holders:
                items.append((spec.layer, e, spec.payload_bytes, holders))
            else:
                missing.setdefault(spec.layer, []).append(e)
    if missing:
        count = sum(len(v) for v in missing.values())
        layer, experts = next(iter(sorted(missing.items())))
        raise UserError(
            f"{count} experts are held by no node found (first: layer {layer} experts {experts[:6]}); "
            "start a node for every shard (`flashmesh shard ... --index I`) or pass its --node"
        )
    assigned = [0] * len(nodes)
    owner = {spec.layer: np.full(spec.num_experts, -1, dtype=np.int32) for spec in layers}
    replicas: dict[Key, tuple[str, ...]] = {}
    items.sort(key=lambda it: (len(it[3]), it[0], it[1]))
    for layer, expert, nbytes, holders in items:
        best = min(holders, key=lambda i: (_cost(assigned[i] + nbytes, nodes[i]), i))
        owner[layer][expert] = best
        assigned[best] += nbytes
        others = sorted((i for i in holders if i != best), key=lambda i: (_cost(assigned[i] + nbytes, nodes[i]), i))
        if others:
            replicas[(layer, expert)] = tuple(ids[i] for i in others)
    return Placement(ids, owner, replicas, {ids[i]: assigned[i] for i in range(len(nodes))})
