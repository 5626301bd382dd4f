"""The health side of RemoteExperts (coordinator.remote): probes of nodes that are down, polled on
the dispatch path (and between requests), reconnecting a node that moved, recording failures in
the membership, and the error that names lost experts. Transport-free, like the rest of failover."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flashmesh.coordinator.failover import ExpertsLost, Membership, NodeError, format_lost
from flashmesh.protos.errors import ErrorKind, UserError

log = logging.getLogger(__name__)


class NodeHealth:
    """Keeps `membership` true to what the nodes behind `links` (shared with RemoteExperts) do."""

    def __init__(
        self,
        links: dict,
        membership: Membership,
        *,
        fingerprint: str | None,
        relink: Callable[[str], object | None] | None,
        probe_deadline: float,
        on_recovered: Callable[[str], None],
    ) -> None:
        self.links, self.membership = links, membership
        self.fingerprint, self.relink, self.probe_deadline = fingerprint, relink, probe_deadline
        self.on_recovered = on_recovered

    def poll(self, *, wait_for: list[str] | None = None) -> None:
        """Start a probe (Info, short deadline) of each down node whose back-off has elapsed, and
        take the answers of probes that finished. Nothing runs unowned: a probe's future lives in
        the node's state until a later layer call (or close) collects it. `wait_for`: probe those
        nodes now, whatever their back-off, and wait for the answers."""
        self.membership.retry_records()
        now = time.monotonic()
        for node_id in self.membership.down():
            state = self.membership.states[node_id]
            urgent = wait_for is not None and node_id in wait_for
            moved = False
            if state.probe is None and self.relink is not None and (link := self.relink(node_id)) is not None:
                log.warning("node %s announced itself at a new address; probing it there", link.label)
                self.links[node_id], moved = link, True
            if state.probe is None and (urgent or moved or now >= state.next_probe):
                state.probe = self.links[node_id].info_async(timeout=self.probe_deadline)
            if state.probe is not None and (urgent or state.probe.done()):
                self._take_probe(node_id)

    def _take_probe(self, node_id: str) -> None:
        state = self.membership.states[node_id]
        probe, state.probe = state.probe, None
        label = self.links[node_id].label
        try:
            info = probe.result()
        except UserError as e:
            self.membership.probe_failed(node_id, str(e))
            return
        if self.fingerprint is not None and info.fingerprint != self.fingerprint:
            self.membership.probe_failed(node_id, f"node {label} now serves another model ({info.fingerprint[:16]})")
            log.warning("node %s answers again but serves another model; not using it", label)
            return
        held = {h.layer: frozenset(h.experts) for h in info.layers}
        self.membership.recovered(node_id, answered_id=info.node_id, held=held)
        self.on_recovered(label)
        log.warning("node %s is back (id %s); routing its experts to it again", label, info.node_id)

    def fail(self, node_id: str, error: NodeError, layer: int, experts: np.ndarray) -> None:
        """A request to `node_id` failed in a way a replica can stand in for: mark the node down,
        or, for damaged records the request needed, only those records."""
        asked = {(layer, int(e)) for e in experts}
        if error.kind == ErrorKind.DATA_LOSS and asked & set(error.records):
            self.membership.mark_bad(node_id, error.records)
            log.warning("%s; using a replica for those records", error)
        else:
            self.membership.mark_down(node_id, str(error))
            log.warning("%s; marked down, its work goes to the other holders of its experts", error)

    def lost(self, layer: int, experts: np.ndarray) -> ExpertsLost:
        lost = self.membership.lost()
        needed = sorted({int(e) for e in experts})
        nodes = self.membership.holders(layer, needed)
        why = "; ".join(self.membership.states[n].reason or f"node {self.links[n].label}: damaged records"
                        for n in nodes)  # fmt: skip
        count = sum(len(v) for v in lost.values())
        return ExpertsLost(
            f"{count} experts are lost ({format_lost(lost)}): {why}; no other node holds them. Restart the node "
            "(the coordinator finds it again at the same address) or run shards with replicas "
            "(`flashmesh shard --replicas 2`)",
            lost=lost,
            nodes=[self.links[n].label for n in nodes],
        )

    def route(self, layer: int, experts: np.ndarray) -> np.ndarray:
        slots = self.membership.route(layer, experts)
        if (slots < 0).any():
            # Last chance before failing the request: ask the nodes that hold the lost experts now.
            gone = experts[slots < 0]
            holders = [n for n in self.membership.holders(layer, np.unique(gone)) if not self.membership.states[n].up]
            self.poll(wait_for=holders)
            slots = self.membership.route(layer, experts)
            if (slots < 0).any():
                raise self.lost(layer, experts[slots < 0])
        return slots
