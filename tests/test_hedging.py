"""Hedged requests without a network: a node that stops answering (in-process links that hang, as a
SIGSTOPped process or a dropped link would) costs a few of its own p99 latencies, not the RPC
deadline: its pairs go to replicas, the first answer wins, the hung request is cancelled, tokens
stay identical; a healthy cluster sends (almost) no extra requests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from flashmesh.coordinator.failover import ExpertsLost, Hedge, NodeError
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.faults import wait_taken_back

from .conftest import local_tokens
from .test_failover import Rig

RPC_DEADLINE = 5.0  # seconds: far above what a hedge may take here


class HangingLink:
    """Wraps a link; while `hang` is set its replies never come (until its deadline, as gRPC's)."""

    def __init__(self, link) -> None:
        self.link, self.label = link, link.label
        self.hang = False
        self.cancelled = 0
        self._timers: list[threading.Timer] = []

    def _hung(self, timeout: float | None) -> Future:
        future: Future = Future()
        future.seconds = timeout or 0.0
        error = NodeError(
            f"node {self.label}: did not answer within {timeout} s (test)", kind=ErrorKind.DEADLINE_EXCEEDED
        )

        def expire() -> None:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

        future.add_done_callback(lambda f: setattr(self, "cancelled", self.cancelled + f.cancelled()))
        timer = threading.Timer(timeout or RPC_DEADLINE, expire)
        self._timers.append(timer)
        timer.start()
        return future

    def compute_async(self, request, *, timeout=None):
        return self._hung(timeout) if self.hang else self.link.compute_async(request, timeout=timeout)

    def info_async(self, *, timeout=None):
        return self._hung(timeout) if self.hang else self.link.info_async(timeout=timeout)

    def prefetch(self, request, *, timeout=None):
        return self.link.prefetch(request, timeout=timeout)

    def stats(self, *, timeout=None):
        return self.link.stats(timeout=timeout)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()


def _rig(store, tmp_path, *, replicas: int, deadline: float):
    rig = Rig(store, tmp_path, replicas=replicas, probe_backoff=0.05)
    links = [HangingLink(link) for link in rig.links]
    rig.backend.links.update({s.node_id: link for s, link in zip(rig.services, links, strict=True)})
    rig.backend.deadline.floor = rig.backend.deadline.initial = deadline
    rig.backend.hedge = Hedge(floor=0.02, warmup=4)
    rig.backend.health.probe_deadline = 0.2  # a probe of a hung node gives up quickly
    rig.hanging = links
    return rig


@pytest.fixture
def rig_of(models, tmp_path):
    rigs = []

    def make(*, replicas: int = 2, deadline: float = RPC_DEADLINE):
        _, store = models.get("qwen3_moe")
        rigs.append(_rig(store, tmp_path / f"rig{len(rigs)}", replicas=replicas, deadline=deadline))
        return rigs[-1]

    yield make
    for rig in rigs:
        for link in rig.hanging:
            link.close()
        rig.close()


def test_a_node_that_stops_answering_costs_a_hedge_not_the_deadline(rig_of):
    rig = rig_of()
    reference = local_tokens(rig.store, max_tokens=8)
    assert rig.generate() == reference  # warm: every node's latency measured
    rig.backend.reset_dispatch()
    victim = rig.services[1].node_id
    calls = [0]
    compute = rig.backend.compute

    def hang_mid_decode(layer, x, indices):
        calls[0] += 1
        if calls[0] == 8 + 2 * 8 + 3:  # prefill, two decode steps, then mid-way through the third
            rig.hanging[1].hang = True
        return compute(layer, x, indices)

    rig.backend.compute = hang_mid_decode
    try:
        start = time.monotonic()
        assert rig.generate() == reference
        elapsed = time.monotonic() - start
    finally:
        rig.backend.__dict__.pop("compute")
    stats = rig.backend.dispatch
    assert [h.node for h in stats.hedges if h.node == "n1"] and stats.nodes[victim].outrun >= 1
    assert rig.hanging[1].cancelled >= 1  # the hung request lost the race and was cancelled
    assert rig.backend.membership.down() == [victim]  # and its node is routed around until it answers
    assert max(stats.stall_seconds) < 1.0 and elapsed < RPC_DEADLINE  # hedged, not waited out
    assert not [f for f in stats.failovers if f.node == "n1"]  # nothing had to wait for the deadline
    # it answers again: a probe finds it and it gets work again
    rig.hanging[1].hang = False
    assert wait_taken_back(rig.backend, timeout=10.0) is not None  # probed as an idle server does
    before = rig.services[1].stats().requests
    assert rig.generate() == reference
    assert rig.backend.membership.down() == [] and "n1" in stats.recoveries
    assert rig.services[1].stats().requests > before


def test_without_a_replica_the_deadline_is_the_last_resort(rig_of):
    rig = rig_of(replicas=1, deadline=1.0)
    rig.generate(max_tokens=2)  # warm
    rig.hanging[2].hang = True
    start = time.monotonic()
    with pytest.raises(ExpertsLost) as e:
        rig.generate(max_tokens=2)
    assert time.monotonic() - start >= 0.9  # waited for the deadline: nowhere to hedge to
    assert "n2" in str(e.value) and "did not answer" in str(e.value)
    assert not rig.backend.dispatch.hedges  # and no extra request was sent


def test_hedge_delay_follows_each_nodes_own_latency():
    h = Hedge(factor=3.0, floor=0.01, warmup=4)
    assert h.after("a", 4) is None  # nothing measured: never hedge (the deadline applies)
    for seconds in (0.004, 0.005, 0.006, 0.005):
        h.observe("a", seconds, 4)
    assert h.after("a", 4) == pytest.approx(3 * 0.006, rel=0.05)
    assert h.after("a", 16) == pytest.approx(4 * 3 * 0.006, rel=0.05)  # bigger: scaled from the warm class
    assert h.after("a", 1) == pytest.approx(3 * 0.006, rel=0.05)  # smaller: bounded by the warm class
    assert h.after("b", 4) is None  # nodes are separate
    for _ in range(4):
        h.observe("b", 0.0001, 4)
    assert h.after("b", 4) == 0.01  # never below the floor
