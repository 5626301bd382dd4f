"""Chaos soak: `flashmesh serve --cluster` over three nodes on network-namespace hosts (replicas 2),
K clients looping, one fault every ~20 s.

    .venv/bin/python -m bench chaos [--minutes 10] [--clients 3] [--fault-every 20]

Faults, in turn on the nodes in turn: SIGKILL then a restart (on the same port, or on a new one
that only zeroconf tells), SIGSTOP then SIGCONT, the host's link down then up, and a damaged
record (a byte flipped in every record of one layer of the node's shard, restored afterwards).
Each lasts `fault_seconds`. Before the faults, a fault-free phase of the same clients gives the
reference: each greedy (prompt, kind) pair's output and the latency distribution. Reported:
requests served and failed, greedy requests whose output differs from the fault-free one, p99
latency against the fault-free p99, whether every node is in use again at the end (the server's
/health), the server's RSS growth over the chaos phase, and its exit status on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flashmesh.node.store_format import Manifest
from flashmesh.protos import TOKEN_ENV
from flashmesh.protos.errors import UserError
from flashmesh.testing import netns
from flashmesh.testing.local_nodes import ensure_dense, ensure_shards, local_node_processes

from bench.soak import start_serve

log = logging.getLogger(__name__)

FAULTS = ("sigkill_restart", "sigstop", "link_down", "damaged_record")  # in turn
PROMPTS = [
    "The experts live on flash and",
    "Explain mixture of experts routing in one sentence:",
    "def fibonacci(n):",
    "List three reasons to stream weights from flash:",
]
TOKEN = "bench-chaos-token"
REQUEST_SECONDS = 120  # a request not answered by then counts as failed


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Outcome:
    phase: str  # "calm" or "chaos"
    started: float
    seconds: float
    key: tuple[str, int]  # (kind, prompt index)
    ok: bool
    text: str = ""
    error: str = ""


def _request(base: str, kind: str, prompt: str, max_tokens: int) -> str:
    """One greedy request; the generated text (streamed requests are joined)."""
    chat, stream = kind.startswith("chat"), kind.endswith("stream")
    body: dict = {"model": "chaos", "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    req = urllib.request.Request(
        f"{base}/v1/{'chat/completions' if chat else 'completions'}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=REQUEST_SECONDS) as r:
        if not stream:
            choice = json.loads(r.read())["choices"][0]
            return choice["message"]["content"] if chat else choice["text"]
        text = []
        for line in r:
            if time.monotonic() - started > REQUEST_SECONDS:  # a stream kept open with nothing coming: a failure
                raise UserError(f"no complete answer within {REQUEST_SECONDS} s")
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise UserError(f"stream error: {event['error']}")
            for choice in event.get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        return "".join(text)


KINDS = ("completion", "completion-stream", "chat", "chat-stream")


def _client(
    base: str, index: int, *, phase: str, t0: float, until: float, max_tokens: int, out: list, stop: threading.Event
) -> None:
    rng = random.Random(f"{phase}-{index}")
    while time.monotonic() < until and not stop.is_set():
        key = (rng.choice(KINDS), rng.randrange(len(PROMPTS)))
        start = time.monotonic()
        try:
            text = _request(base, key[0], PROMPTS[key[1]], max_tokens)
            out.append(Outcome(phase, start - t0, time.monotonic() - start, key, True, text))
        except Exception as e:  # noqa: BLE001 - counted and reported; the soak goes on
            out.append(
                Outcome(phase, start - t0, time.monotonic() - start, key, False, error=f"{type(e).__name__}: {e}")
            )


@dataclass
class FaultEvent:
    at: float
    kind: str
    node: int
    detail: str = ""


@dataclass
class Faults:
    """Injects FAULTS in turn on the nodes in turn, each for `hold` seconds, every `every` seconds."""

    nodes: object  # LocalNodeProcesses
    hosts: object  # NetnsHosts
    shards: list[Path]
    every: float
    hold: float
    kinds: tuple[str, ...] = FAULTS
    events: list[FaultEvent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, t0: float, until: float, stop: threading.Event) -> None:
        n = 0
        while not stop.wait(max(0.0, t0 + self.every * (n + 0.5) - time.monotonic())):
            if time.monotonic() + self.hold > until:
                return
            kind, node = self.kinds[n % len(self.kinds)], n % len(self.shards)
            try:
                self.events.append(FaultEvent(time.monotonic() - t0, kind, node, self._one(kind, node, n, stop)))
            except Exception as e:  # noqa: BLE001 - a fault that could not be made or undone is reported
                self.errors.append(f"{kind} on node {node}: {type(e).__name__}: {e}")
            n += 1

    def _one(self, kind: str, i: int, n: int, stop: threading.Event) -> str:
        proc = self.nodes.procs[i]
        if kind == "sigkill_restart":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.wait(self.hold)
            same_port = sum(e.kind == kind for e in self.events) % 2 == 1  # first a new port, then the same
            address = self.nodes.restart(i, same_port=same_port)
            return f"restarted at {address.target}"
        if kind == "sigstop":
            proc.send_signal(signal.SIGSTOP)
            stop.wait(self.hold)
            proc.send_signal(signal.SIGCONT)
            return ""
        if kind == "link_down":
            self.hosts.link(i, up=False)
            stop.wait(self.hold)
            self.hosts.link(i, up=True)
            return ""
        layers = Manifest.load(self.shards[i]).layers
        spec = layers[n % len(layers)]
        path = self.shards[i] / spec.file
        offsets = [spec.record_offset(e) + 64 for e in spec.experts]
        with open(path, "r+b") as f:
            original = []
            for o in offsets:
                f.seek(o)
                original.append(f.read(1))
                f.seek(o)
                f.write(bytes([original[-1][0] ^ 0xFF]))
        try:
            stop.wait(self.hold)
        finally:
            with open(path, "r+b") as f:
                for o, b in zip(offsets, original, strict=True):
                    f.seek(o)
                    f.write(b)
        return f"layer {spec.layer}, {len(offsets)} records"


def _health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        return json.loads(r.read())


def _start_serve(dense: Path, *, gateway: str, prefix: str, logfile: Path) -> tuple[subprocess.Popen, str]:
    args = [str(dense), "--cluster", "--port", "0", "--interfaces", gateway, "--name-prefix", prefix]
    args += ["--expect", "3", "--discover-timeout", "30", "--model-name", "chaos", "--max-queue", "64"]
    proc, base = start_serve(args, logfile=logfile, env={TOKEN_ENV: TOKEN})
    return proc, base.removesuffix("/v1")


def _phase(base: str, phase: str, *, clients: int, seconds: float, max_tokens: int, t0: float, out: list,
           stop: threading.Event):  # fmt: skip
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_client, args=(base, i), name=f"chaos-client-{i}", kwargs={"phase": phase,
                                "t0": t0, "until": until, "max_tokens": max_tokens, "out": out, "stop": stop})
               for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    return threads, until


def run_chaos(
    store: Path,
    *,
    workdir: Path,
    clients: int = 3,
    seconds: float = 600.0,
    calm_seconds: float = 60.0,
    fault_every: float = 20.0,
    fault_seconds: float = 5.0,
    max_tokens: int = 8,
    kinds: tuple[str, ...] = FAULTS,
    progress=None,
) -> dict:
    if (why := netns.available()) is not None:
        raise UserError(f"{why}; the chaos soak runs its nodes on network-namespace hosts")
    workdir = Path(workdir)
    manifest = Manifest.load(store)
    dense = ensure_dense(store, workdir / "dense")
    shards = ensure_shards(store, workdir, count=3, replicas=2)
    # a third of each shard's experts in RAM: records are read from flash all along (damage is seen)
    budgets = [max(manifest.min_budget_bytes, Manifest.load(s).expert_bytes_total // 3) for s in shards]
    outcomes: list[Outcome] = []
    with netns.netns_hosts(3) as hosts, local_node_processes(
        shards, budgets=budgets, token=TOKEN, logdir=workdir / "logs", flash_gbps=1.0,
        hosts=hosts.hosts, browse_on=hosts.gateway,
    ) as nodes:  # fmt: skip
        prefix = nodes.names[0].rsplit("-", 1)[0]
        proc, base = _start_serve(dense, gateway=hosts.gateway, prefix=prefix, logfile=workdir / "logs" / "serve.log")
        stop = threading.Event()  # set: clients and faults end early (this benchmark was stopped)
        try:
            # the fault-free output of every greedy (chat or not, prompt) pair, one request at a time
            reference = {(chat, i): _request(base, "chat" if chat else "completion", prompt, max_tokens)
                         for chat in (False, True) for i, prompt in enumerate(PROMPTS)}  # fmt: skip
            t0 = time.monotonic()
            threads, _ = _phase(base, "calm", clients=clients, seconds=calm_seconds, max_tokens=max_tokens, t0=t0,
                                out=outcomes, stop=stop)  # fmt: skip
            for t in threads:
                t.join()
            rss_start = _rss_bytes(proc.pid)
            faults = Faults(nodes, hosts, shards, every=fault_every, hold=fault_seconds, kinds=kinds)
            threads, until = _phase(base, "chaos", clients=clients, seconds=seconds, max_tokens=max_tokens, t0=t0,
                                    out=outcomes, stop=stop)  # fmt: skip
            chaos_t0 = time.monotonic()
            injector = threading.Thread(target=faults.run, args=(chaos_t0, until, stop), name="chaos-faults")
            injector.start()
            rss = [(time.monotonic() - t0, rss_start)]
            try:
                while any(t.is_alive() for t in threads):
                    time.sleep(1.0)
                    rss.append((time.monotonic() - t0, _rss_bytes(proc.pid)))
                    if progress is not None:
                        progress(min(seconds, time.monotonic() - t0 - calm_seconds), len(outcomes))
            finally:
                stop.set()
                injector.join()
                for t in threads:
                    t.join()
            back_s, health = _wait_all_up(base)
            rss_end = _rss_bytes(proc.pid)
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            try:
                returncode = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
    return _summary(outcomes, reference, faults, health, back_s, rss, rss_start, rss_end, returncode,
                    clients=clients, seconds=seconds, calm_seconds=calm_seconds, max_tokens=max_tokens,
                    fault_every=fault_every, fault_seconds=fault_seconds, chaos_started_s=chaos_t0 - t0)  # fmt: skip


def _wait_all_up(base: str, *, timeout: float = 30.0) -> tuple[float | None, dict]:
    """Seconds after the last fault until /health shows every node in use (None: not in `timeout`)."""
    start = time.monotonic()
    while True:
        health = _health(base)
        if health["nodes"] and all(n["up"] for n in health["nodes"]):
            return time.monotonic() - start, health
        if time.monotonic() - start > timeout:
            return None, health
        time.sleep(0.5)


def _summary(outcomes, reference, faults, health, back_s, rss, rss_start, rss_end, returncode, **params) -> dict:
    calm = [o for o in outcomes if o.phase == "calm"]
    chaos = [o for o in outcomes if o.phase == "chaos"]

    def differs(rows):
        return [o for o in rows if o.ok and o.text != reference[(o.key[0].startswith("chat"), o.key[1])]]

    def p99(rows):
        return float(np.percentile([o.seconds for o in rows if o.ok], 99)) if any(o.ok for o in rows) else 0.0

    def p50(rows):
        return float(np.percentile([o.seconds for o in rows if o.ok], 50)) if any(o.ok for o in rows) else 0.0

    nodes = health.get("nodes", [])
    return {
        "bench": "chaos",
        **params,
        "served": sum(o.ok for o in chaos),
        "failed": sum(not o.ok for o in chaos),
        "first_failures": [o.error for o in chaos if not o.ok][:5],
        "greedy_compared": sum(o.ok for o in chaos),  # every request is greedy
        "greedy_differs": len(differs(chaos)),
        "calm_served": sum(o.ok for o in calm),
        "calm_failed": sum(not o.ok for o in calm),
        "calm_greedy_differs": len(differs(calm)),
        "latency_p99_s": p99(chaos),
        "calm_latency_p99_s": p99(calm),
        "latency_p50_s": p50(chaos),
        "calm_latency_p50_s": p50(calm),
        "faults": [vars(e) for e in faults.events],
        "fault_errors": faults.errors,
        "faults_by_kind": {k: sum(e.kind == k for e in faults.events) for k in FAULTS},
        "nodes_in_use_at_end": sum(n["up"] for n in nodes),
        "nodes": len(nodes),
        "nodes_taken_back_s": back_s,
        "node_states_at_end": nodes,
        "rss_chaos_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_growth_bytes": rss_end - rss_start,
        "rss_samples": [[round(t, 1), int(b)] for t, b in rss],
        "server_exit_code": returncode,
        "requests": [[round(o.started, 3), round(o.seconds, 4), o.ok] for o in outcomes],  # both phases
    }
