"""Faults with real node processes on loopback: a record damaged on one replica's flash, a
coordinator restart, a node stopped (SIGSTOP) or killed (SIGKILL) in the middle of a generation,
with and without replicas, and a killed node that comes back. Tokens must be identical to the
single-machine run whenever a replica exists; the stall is bounded by the RPC deadline."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.failover import ExpertsLost
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.faults import generate_with_faults, wait_taken_back
from flashmesh.testing.local_nodes import ensure_shards, local_node_processes

from .conftest import PROMPT, assert_one_line_error

log = logging.getLogger(__name__)

TOKEN = "test-faults-token"
MAX_TOKENS = 8
RPC_DEADLINE = 2.0  # seconds: short, so a hung node is found quickly, yet far above a healthy call here
STALL_BOUND = 15.0  # seconds: generous for a 2-core VM shared with other work; the figures are logged
TAKEN_BACK_WITHIN = 15.0  # seconds from the repair: probe back-off (<= 2 s) + probe and reconnect, on a loaded VM


@pytest.fixture(scope="module")
def reference(models):
    """Tokens of the single-machine run, and the (layer, expert) pairs it used."""
    _, store = models.get("qwen3_moe")
    streaming = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    used: set[tuple[int, int]] = set()
    compute = streaming.backend.compute

    def recording(layer, x, indices):
        used.update((layer, int(e)) for e in np.array(indices).reshape(-1))
        return compute(layer, x, indices)

    streaming.backend.compute = recording
    try:
        tokens = generate(
            streaming.model,
            streaming.tokenizer,
            streaming.tokenizer.encode(PROMPT),
            SamplingParams(max_tokens=MAX_TOKENS),
        ).tokens
    finally:
        streaming.close()
    return store, tokens, used


def _nodes(store, work, *, count, replicas):
    shards = ensure_shards(store, work, count=count, replicas=replicas)
    budget = Manifest.load(store).expert_bytes_total  # every node can cache all it holds
    return shards, local_node_processes(
        shards, budgets=[budget] * count, token=TOKEN, logdir=work / "logs", flash_gbps=1.0
    )


class Cluster:
    def __init__(self, nodes, dense, shards):
        self.nodes, self.dense, self.shards = nodes, dense, shards

    def open(self, *, hedge: bool = True):
        return open_model(
            ModelOptions(
                store=self.dense,
                cluster=True,
                nodes=tuple(self.nodes.addresses),
                token=TOKEN,
                rpc_deadline=RPC_DEADLINE,
                probe_backoff=0.2,
                hedge=hedge,
            )
        )

    def busiest(self, streaming, connected) -> tuple[int, str]:
        """(process index, node id) of the node assigned the most experts: the one to hurt."""
        placement = streaming.backend.placement
        node_id = max(placement.node_ids, key=lambda n: len(placement.assigned(n)))
        return self.index_of(connected, node_id), node_id

    def index_of(self, connected, node_id: str) -> int:
        """Process index of the node `open` connected as `node_id` (ids change when a node restarts)."""
        target = next(n.address.target for n in connected if n.node_id == node_id)
        return [a.target for a in self.nodes.addresses].index(target)


@pytest.fixture(scope="module")
def replicated(reference, tmp_path_factory):
    store = reference[0]
    work = tmp_path_factory.mktemp("faults-replicated")
    dense = work / "dense"
    write_dense(store, dense)
    shards, processes = _nodes(store, work, count=3, replicas=2)
    with processes as nodes:
        yield Cluster(nodes, dense, shards)


def _generate(streaming, *, on_layer_call=None):
    """Generate; `on_layer_call(n)` runs before the n-th MoE layer call (to inject a fault there)."""
    return generate_with_faults(streaming, PROMPT, max_tokens=MAX_TOKENS, on_layer_call=on_layer_call)


MID_DECODE = 8 + 2 * 8 + 3  # prefill (8 MoE layers), two decode steps, then mid-way through the third


def _report(what, backend):
    stats = backend.dispatch
    normal = [c.seconds for c in stats.calls if c.rounds == 1]
    log.warning(
        "%s: failovers %s, stall max %.3f s, layer call median %.4f s",
        what,
        [(f.node, f.kind, round(f.detect_seconds, 3)) for f in stats.failovers],
        max(stats.stall_seconds, default=0.0),
        float(np.median(normal)) if normal else 0.0,
    )


def _assert_taken_back(streaming, victim_id: str, tokens: list[int]) -> None:
    """The repaired node is up again within TAKEN_BACK_WITHIN (waiting on the membership, probing as
    an idle server does: how long a generation lasts must not decide it), then gets work again."""
    backend = streaming.backend
    seconds = wait_taken_back(backend, timeout=TAKEN_BACK_WITHIN)
    assert seconds is not None, f"still down after {TAKEN_BACK_WITHIN:g} s: {backend.membership.states[victim_id]}"
    log.warning("taken back %.2f s after the repair", seconds)
    assert backend.dispatch.recoveries
    before = backend.dispatch.nodes[victim_id].requests
    assert _generate(streaming) == tokens
    # (not `down() == []` after it: on a loaded VM a healthy node may be late once, outrun by a hedge
    # and held down until its next probe; that is hedging working, tests/test_hedging.py)
    assert backend.dispatch.nodes[victim_id].requests > before


def test_damaged_record_on_one_replica_is_served_by_the_other(replicated, reference):
    store, tokens, used = reference
    streaming = replicated.open()
    nodes = streaming.nodes
    backend = streaming.backend
    try:
        # a record the prompt needs, on the node that would serve it first; nothing has read it yet
        layer, expert = min(used)
        primary = backend.placement.node_of(layer, expert)
        assert backend.placement.replicas[(layer, expert)]
        shard = replicated.shards[replicated.index_of(nodes, primary)]
        spec = next(s for s in Manifest.load(shard).layers if s.layer == layer)
        path = shard / spec.file
        offset = spec.record_offset(expert) + 64
        original = path.read_bytes()[offset]
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes([original ^ 0xFF]))
        try:
            assert _generate(streaming) == tokens
        finally:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(bytes([original]))
        failovers = [f for f in backend.dispatch.failovers if f.kind == ErrorKind.DATA_LOSS]
        assert [f.layer for f in failovers] == [layer]
        assert f"layer {layer} expert {expert}: record checksum mismatch" in failovers[0].reason
        state = backend.membership.states[primary]
        assert state.up and state.bad == {(layer, expert)}  # only that record moved; the node serves the rest
        assert backend.dispatch.nodes[primary].requests > 0
    finally:
        streaming.close()


def test_coordinator_restart_with_nodes_left_running(replicated, reference):
    _, tokens, _ = reference
    for _ in range(2):
        streaming = replicated.open()
        nodes = streaming.nodes
        try:
            assert len(nodes) == 3 and _generate(streaming) == tokens
            assert not [
                f for f in streaming.backend.dispatch.failovers if f.kind != ErrorKind.DEADLINE_EXCEEDED
            ]  # none lost
        finally:
            streaming.close()


def test_run_cli_takes_an_rpc_deadline(replicated, reference, capsys):
    _, tokens, _ = reference
    nodes = [x for a in replicated.nodes.addresses for x in ("--node", a.target)]
    args = ["run", str(replicated.dense), *nodes, "--no-zeroconf", "--token", TOKEN, "--prompt", PROMPT]
    assert main([*args, "--max-tokens", str(MAX_TOKENS), "--rpc-deadline", "1.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == tokens and result["dispatch"]["failovers"] == []
    assert all(n["up"] for n in result["nodes"])
    code = main([*args, "--rpc-deadline", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "deadline must be positive")


def test_sigstop_is_found_by_the_deadline_and_fails_over(replicated, reference):
    """The last resort, hedging off (tests/test_hedging.py and tests/test_chaos.py hedge)."""
    _, tokens, _ = reference
    streaming = replicated.open(hedge=False)
    connected = streaming.nodes
    backend = streaming.backend
    index, victim_id = replicated.busiest(streaming, connected)
    victim, label = replicated.nodes.procs[index], backend.links[victim_id].label
    try:

        def stop(n):
            if n == MID_DECODE:
                os.kill(victim.pid, signal.SIGSTOP)

        try:
            start = time.monotonic()
            assert _generate(streaming, on_layer_call=stop) == tokens
            elapsed = time.monotonic() - start
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        _report("SIGSTOP", backend)
        failovers = [f for f in backend.dispatch.failovers if f.node == label]  # (a loaded VM may add others)
        assert [f.kind for f in failovers] == [ErrorKind.DEADLINE_EXCEEDED]
        assert RPC_DEADLINE * 0.9 <= failovers[0].detect_seconds < STALL_BOUND
        assert max(backend.dispatch.stall_seconds) < STALL_BOUND and elapsed < 2 * STALL_BOUND
        # running again: the probes of an idle coordinator find it, and it is used again
        _assert_taken_back(streaming, victim_id, tokens)
    finally:
        streaming.close()


@pytest.mark.parametrize("when", ["between_calls", "in_flight"])
def test_sigkill_mid_generation_with_replicas(replicated, reference, when):
    """Killed between two layer calls (the next connect is refused), or while a request is in flight
    (stopped first so the request waits in it, then killed: the connection is reset under the call)."""
    _, tokens, _ = reference
    streaming = replicated.open()
    connected = streaming.nodes
    backend = streaming.backend
    index, victim_id = replicated.busiest(streaming, connected)
    victim, label = replicated.nodes.procs[index], backend.links[victim_id].label
    timer = threading.Timer(RPC_DEADLINE / 3, victim.send_signal, args=(signal.SIGKILL,))
    try:

        def kill(n):
            if n == MID_DECODE and when == "between_calls":
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            elif n == MID_DECODE:
                victim.send_signal(signal.SIGSTOP)
                timer.start()

        assert _generate(streaming, on_layer_call=kill) == tokens
        if timer.is_alive() or when == "in_flight":
            timer.join()
        victim.wait()
        _report(f"SIGKILL {when}", backend)
        failovers = [f for f in backend.dispatch.failovers if f.node == label]
        assert [f.kind for f in failovers] == [ErrorKind.UNAVAILABLE]
        assert max(backend.dispatch.stall_seconds) < STALL_BOUND
        assert victim_id in backend.membership.down()  # (a healthy node outrun by a hedge may be too)
        assert _generate(streaming) == tokens  # keeps working on two nodes
        # the node is started again at its address: the cluster takes it back by itself
        replicated.nodes.restart(index)
        _assert_taken_back(streaming, victim_id, tokens)
    finally:
        streaming.close()


def test_sigkill_without_replicas_names_lost_experts_then_recovers(reference, tmp_path_factory):
    store, tokens, _ = reference
    work = tmp_path_factory.mktemp("faults-disjoint")
    dense = work / "dense"
    write_dense(store, dense)
    shards, processes = _nodes(store, work, count=2, replicas=1)
    with processes as nodes:
        cluster = Cluster(nodes, dense, shards)
        streaming = cluster.open()
        try:

            def kill(n):
                if n == MID_DECODE:
                    nodes.procs[1].send_signal(signal.SIGKILL)
                    nodes.procs[1].wait()

            with pytest.raises(ExpertsLost) as e:
                _generate(streaming, on_layer_call=kill)
            message = str(e.value)
            held = Manifest.load(shards[1]).layers
            assert "\n" not in message and nodes.addresses[1].target in message and "unreachable" in message
            assert e.value.lost == {s.layer: s.experts for s in held}
            assert f"layer {held[0].layer} experts" in message
            # the node comes back at its address: the next request finds it and succeeds
            nodes.restart(1)
            assert _generate(streaming) == tokens
            assert streaming.backend.membership.down() == []
        finally:
            streaming.close()
