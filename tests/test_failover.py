"""Failover without a network: in-process nodes behind links that fail on demand. Replicas take over
with identical tokens, damaged records are served from the other copy, lost experts are named, and
a node that answers again is used again."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import attach, load_dense_model, load_store_tokenizer
from flashmesh.coordinator.failover import (
    Deadline,
    ExpertsLost,
    Membership,
    NodeError,
    format_ranges,
)
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.placement import NodeCapacity, place
from flashmesh.coordinator.remote import RemoteExperts
from flashmesh.node.service import NodeService
from flashmesh.node.shard import shard_experts, write_dense, write_shard
from flashmesh.node.store_format import LayerSpec, Manifest, TensorSpec
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.in_process import InProcessLink

from .conftest import PROMPT, local_tokens


class FaultyLink:
    """An InProcessLink that fails every call with `fail` (a NodeError kind) while it is set."""

    def __init__(self, link: InProcessLink) -> None:
        self.link, self.label = link, link.label
        self.fail: str | None = None
        self.fail_after = 0  # compute calls to let through before failing
        self.calls = 0

    def _failed(self) -> Future:
        future: Future = Future()
        future.set_exception(NodeError(f"node {self.label}: unreachable (test)", kind=self.fail))
        future.seconds = 0.0
        return future

    def compute_async(self, request, *, timeout=None):
        self.calls += 1
        if self.fail and self.calls > self.fail_after:
            return self._failed()
        return self.link.compute_async(request, timeout=timeout)

    def info_async(self, *, timeout=None):
        return self._failed() if self.fail else self.link.info_async(timeout=timeout)

    def prefetch(self, request, *, timeout=None):
        if self.fail:
            raise NodeError(f"node {self.label}: unreachable (test)", kind=self.fail)
        return self.link.prefetch(request, timeout=timeout)


def _capacity(s: NodeService) -> NodeCapacity:
    return dataclasses.replace(NodeCapacity.of(s.info()), read_gbps=1.0, name="")  # placement splits evenly


class Rig:
    def __init__(self, store, tmp_path, *, count=3, replicas=2, probe_backoff=0.05):
        m = Manifest.load(store)
        self.store = store
        self.shards = [
            write_shard(store, tmp_path / f"s{i}", count=count, index=i, replicas=replicas) for i in range(count)
        ]
        self.services = [
            NodeService(tmp_path / f"s{i}", ram_budget=m.expert_bytes_total, token="t", name=f"n{i}", flash_gbps=1.0)
            for i in range(count)
        ]
        self.links = [FaultyLink(InProcessLink(s, s.name)) for s in self.services]
        write_dense(store, tmp_path / "dense")
        self.model, self.manifest, _ = load_dense_model(tmp_path / "dense")
        self.backend = RemoteExperts(
            {s.node_id: link for s, link in zip(self.services, self.links, strict=True)},
            place(m.layers, [_capacity(s) for s in self.services]),
            rpc_deadline=1.0,
            probe_backoff=probe_backoff,
            fingerprint=m.fingerprint,
        )
        attach(self.model, self.backend)
        self.tokenizer = load_store_tokenizer(tmp_path / "dense", m)

    def generate(self, max_tokens=8):
        return generate(
            self.model, self.tokenizer, self.tokenizer.encode(PROMPT), SamplingParams(max_tokens=max_tokens)
        ).tokens

    def close(self):
        for s in self.services:
            s.close()


@pytest.fixture
def rig_factory(models, tmp_path):
    rigs = []

    def make(**kw):
        _, store = models.get("qwen3_moe")
        rigs.append(Rig(store, tmp_path / f"rig{len(rigs)}", **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


@pytest.mark.parametrize("kind", [ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED])
def test_node_lost_mid_generation_fails_over_with_identical_tokens(rig_factory, kind):
    rig = rig_factory()
    reference = local_tokens(rig.store, max_tokens=8)
    rig.links[1].fail, rig.links[1].fail_after = kind, 12  # dies after the prefill, mid-decode
    assert rig.generate() == reference
    assert rig.backend.membership.down() == [rig.services[1].node_id]
    failovers = rig.backend.dispatch.failovers
    assert failovers and all(f.node == "n1" and f.kind == kind for f in failovers)
    assert len(failovers) == 1  # marked down once; afterwards its experts go straight to replicas
    assert [c.rounds for c in rig.backend.dispatch.calls].count(2) == 1
    # it comes back: after the back-off a probe on the dispatch path finds it, and it gets work again
    rig.links[1].fail = None
    time.sleep(0.1)
    before = rig.services[1].stats().requests
    assert rig.generate() == reference
    assert rig.backend.membership.down() == [] and rig.backend.dispatch.recoveries == ["n1"]
    assert rig.services[1].stats().requests > before


def test_damaged_record_is_served_by_the_other_replica(rig_factory):
    rig = rig_factory()
    reference = local_tokens(rig.store, max_tokens=8)
    # damage every record of layer 0 on node 0's flash: the checksum catches it on read
    spec = Manifest.load(rig.services[0].store.path).layers[0]
    path = rig.services[0].store.path / spec.file
    data = bytearray(path.read_bytes())
    for i in range(len(spec.experts)):
        data[spec.record_offset(spec.experts[i]) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert rig.generate() == reference
    failovers = rig.backend.dispatch.failovers
    assert failovers and all(
        f.kind == ErrorKind.DATA_LOSS and f.node == "n0" and f.layer == spec.layer for f in failovers
    )
    assert "checksum mismatch" in failovers[0].reason and f"layer {spec.layer} expert" in failovers[0].reason
    state = rig.backend.membership.states[rig.services[0].node_id]
    assert state.up and state.bad and all(layer == spec.layer for layer, _ in state.bad)
    assert rig.services[0].stats().requests > 0  # still serving its healthy records
    assert rig.services[0].cache._pinned == set()  # a failed read leaves nothing pinned


def test_without_replicas_the_request_fails_naming_lost_experts(rig_factory):
    rig = rig_factory(replicas=1)
    reference = local_tokens(rig.store, max_tokens=8)
    rig.links[2].fail = ErrorKind.UNAVAILABLE
    with pytest.raises(ExpertsLost) as e:
        rig.generate()
    message = str(e.value)
    assert "\n" not in message and "n2" in message and "--replicas" in message
    lost = e.value.lost
    held = Manifest.load(rig.services[2].store.path).layers
    assert lost == {spec.layer: spec.experts for spec in held}
    assert f"layer {held[0].layer} experts {format_ranges(held[0].experts)}" in message
    # a layer call that needs only experts of live nodes still works
    layer = held[0].layer
    alive = [e for e in range(16) if e not in held[0].experts][:4]
    y = rig.backend.compute(layer, mx.ones((1, 64)), mx.array([alive]))
    assert y.shape == (1, 4, 64)
    # the node returns: the next request probes it before giving up, and succeeds
    rig.links[2].fail = None
    assert rig.generate() == reference


def test_membership_routes_to_replicas_in_order():
    layers = [
        LayerSpec(0, "m.0.e", 6, 16384, [TensorSpec("w", "float32", (250,), 0, 1000)], [], []),
    ]
    nodes = [
        NodeCapacity(f"n{i}", {0: frozenset(shard_experts(6, count=3, index=i, replicas=3))}, 1.0, 0) for i in range(3)
    ]
    pl = place(layers, nodes)
    m = Membership(pl)
    experts = np.arange(6, dtype=np.int32)
    assert (m.route(0, experts) == pl.owner[0]).all()
    m.mark_down(pl.node_of(0, 0), "gone")
    routed = m.route(0, experts)
    assert routed[0] == pl.node_ids.index(pl.replicas[(0, 0)][0])
    assert (routed >= 0).all() and m.lost() == {}
    m.mark_down(pl.replicas[(0, 0)][0], "gone")
    m.mark_bad(pl.replicas[(0, 0)][1], [(0, 0)])
    assert m.route(0, experts)[0] == -1 and m.lost() == {0: [0]}
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_deadline_follows_measured_latency():
    d = Deadline(floor=0.5, warmup=2)
    assert d.seconds(1) == 5.0  # nothing measured: ten times the floor
    d.observe(0.010, 4)
    d.observe(0.020, 4)
    assert d.seconds(4) == 0.5  # decode-sized: the floor
    assert d.seconds(1000) == pytest.approx(10 * 0.005 * 1000)  # a big prefill request gets more


def test_logits_are_bit_identical_whichever_replica_answers(rig_factory):
    rig = rig_factory()
    prompt = mx.array(rig.tokenizer.encode(PROMPT))[None]
    everyone = np.array(rig.model(prompt))
    for service in rig.services:  # each node down in turn: its experts come from the other holder
        rig.backend.membership.mark_down(service.node_id, "test")
        np.testing.assert_array_equal(np.array(rig.model(prompt)), everyone)
        rig.backend.membership.recovered(service.node_id, answered_id=service.node_id, held=_held(service))
    assert rig.backend.membership.healthy


def _held(service: NodeService) -> dict[int, frozenset[int]]:
    return {h.layer: frozenset(h.experts) for h in service.info().layers}


def test_a_prefetch_to_a_lost_node_is_only_a_hint(rig_factory):
    rig = rig_factory()
    rig.links[1].fail = ErrorKind.UNAVAILABLE
    layer = rig.manifest.layers[0].layer
    rig.backend.prefetch(layer, list(range(16)))  # does not raise
    assert rig.backend.membership.down() == [rig.services[1].node_id]
    rig.backend.prefetch(layer, list(range(16)))  # now goes to the replicas
    held0 = {e for s in (0, 2) for e in Manifest.load(rig.services[s].store.path).layers[0].experts}
    assert held0 == set(range(16))
    assert all((layer, e) in rig.services[0].cache or (layer, e) in rig.services[2].cache for e in range(16))
