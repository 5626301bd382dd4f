"""Start/stop cycles: `node serve`, `serve`, `demo` and a benchmark (`bench soak`, which runs a
`serve` process and clients) stopped by SIGTERM or SIGINT, idle and under load; each must exit 0
(no abort, no traceback, no hang) and leave none of its child processes running. The test suite
runs a few cycles (tests/test_shutdown.py); `python -m bench shutdown --cycles 50` the full count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from flashmesh.node.store_format import Manifest
from flashmesh.protos import TOKEN_ENV
from flashmesh.protos.errors import UserError

PROCESSES = ("node_serve", "serve", "demo", "bench")
REPO = Path(__file__).resolve().parents[1]  # `python -m bench` runs from here
EXIT_TIMEOUT = 90.0  # seconds from the signal to the exit; longer counts as hung
HUNG = -1000  # the status recorded for a process that did not exit in time
TOKEN = "shutdown-token"


@dataclass
class Cycle:
    process: str
    signal: str
    load: bool
    status: int
    seconds_to_exit: float
    tail: str  # the last lines of its output when the status is not 0
    orphans: int = 0  # its child processes still running after it exited (killed then)


def _command(process: str, store: Path, workdir: Path) -> tuple[list[str], str]:
    """The command line and the output line that says it is up."""
    cli = [sys.executable, "-m", "flashmesh.coordinator.cli"]
    if process == "node_serve":
        budget = str(Manifest.load(store).expert_bytes_total)
        return cli + ["node", "serve", str(store), "--ram-budget", budget, "--no-advertise", "--flash-gbps", "1"], (
            "serving"
        )
    if process == "serve":
        return cli + ["serve", str(store), "--port", "0", "--model-name", "m"], "serving"
    if process == "bench":  # starting its server (idle), or with its clients running (load); never finishes
        return [sys.executable, "-m", "bench", "soak", str(store), "--clients", "2", "--minutes", "30", "--json"], ""
    # the demo: in-process while it loads (idle), with two node processes while it generates (load)
    return cli + ["demo", "--workdir", str(workdir), "--max-tokens", "4000", "--no-tls"], ""


def _compute_request(store: Path):
    """A Compute request for one held expert of the first MoE layer (one token of zeros)."""
    import numpy as np
    from flashmesh.protos import flashmesh_pb2 as pb
    from flashmesh.protos.codec import encode_numpy

    spec = Manifest.load(store).layers[0]
    return pb.ComputeRequest(
        layer=spec.layer,
        x=encode_numpy(np.zeros((4, spec.input_dim), dtype=np.float32)),
        rows=encode_numpy(np.arange(4, dtype=np.int32)),
        experts=encode_numpy(np.array(spec.experts[:1] * 4, dtype=np.int32)),
    )


def _load(process: str, line: str, stop: threading.Event, store: Path) -> None:
    """Keep requests in flight until `stop` (errors are expected once the process stops): expert
    computes on a node, streamed completions on a server."""
    if process == "node_serve":
        from flashmesh.coordinator.client import NodeClient
        from flashmesh.coordinator.discovery import NodeAddress

        port = int(re.search(r"port (\d+)", line).group(1))
        client = NodeClient(NodeAddress("127.0.0.1", port), token=TOKEN)
        request = _compute_request(store)
        try:
            while not stop.is_set():
                try:
                    calls = [client.compute_async(request, timeout=5.0) for _ in range(4)]  # several in flight
                    for call in calls:
                        call.result()
                except UserError:
                    time.sleep(0.01)
        finally:
            client.close()
        return
    base = line.rsplit(" at ", 1)[1].strip()
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 64, "stream": True}).encode()
    while not stop.is_set():
        try:
            req = urllib.request.Request(f"{base}/completions", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
        except OSError:
            time.sleep(0.01)


def one_cycle(process: str, store: Path, workdir: Path, *, sig: signal.Signals, load: bool) -> Cycle:
    cmd, ready = _command(process, store, workdir)
    if process == "demo":
        cmd += ["--nodes", "2" if load else "0"]
    env = {**os.environ, TOKEN_ENV: TOKEN, "TRANSFORMERS_VERBOSITY": "error", "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
        stop, loader = threading.Event(), None
        try:
            line = proc.stdout.readline() if ready else ""
            while ready and line and ready not in line:
                line = proc.stdout.readline()
            if not ready:  # demo, bench: once it handles SIGTERM, while it loads (idle) or works (load)
                _wait_for_handler(proc, signal.SIGTERM)
                if process == "bench" and load:
                    _wait_for_clients(proc)
                time.sleep((2.0 if process == "bench" else 12.0) if load else 1.0)
            elif load:
                loader = threading.Thread(target=_load, args=(process, line, stop, store), name="shutdown-load")
                loader.start()
                time.sleep(1.0)
            children = _children(proc.pid)
            sent = time.monotonic()
            proc.send_signal(sig)
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its stdout drained
            try:
                status = proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:  # hung: its threads' stacks (faulthandler) go to the report
                proc.send_signal(signal.SIGABRT)
                proc.wait(timeout=30)
                status = HUNG
            seconds = time.monotonic() - sent
            _, alive = psutil.wait_procs(children, timeout=5.0)  # a child may take a moment after its parent
            for child in alive:
                child.kill()
        finally:
            stop.set()
            if loader is not None:
                loader.join()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-(60 if status == HUNG else 3) :]
    return Cycle(process, sig.name, load, status, seconds, " | ".join(tail) if status else "", len(alive))


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it ended by itself: its status says how
        return []


def _wait_for_clients(proc: subprocess.Popen, *, timeout: float = 120.0) -> None:
    """Until a child of `proc` (the benchmark's server) has a client connected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for child in _children(proc.pid):
            try:
                if any(c.status == psutil.CONN_ESTABLISHED for c in child.net_connections(kind="tcp")):
                    return
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise UserError(f"process {proc.pid} had no client connected to its server within {timeout:g} s")


def _wait_for_handler(proc: subprocess.Popen, sig: signal.Signals, *, timeout: float = 120.0) -> None:
    """Until `proc` catches `sig` (its SigCgt mask in /proc): a signal before that, during
    interpreter start-up, would end it by the default action, before any of our code runs."""
    deadline, pid = time.monotonic() + timeout, proc.pid
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return  # it ended by itself: its status says how
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (sig - 1)):
            return
        time.sleep(0.05)
    raise UserError(f"process {pid} did not install a handler for {sig.name} within {timeout:g} s")


def run_cycles(store: Path, workdir: Path, *, cycles: int, processes=PROCESSES, progress=None) -> list[Cycle]:
    """`cycles` per (process, idle/load), alternating SIGTERM and SIGINT."""
    out = []
    plan = [(p, load, i) for i in range(cycles) for p in processes for load in (False, True)]
    for n, (process, load, i) in enumerate(plan):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
        out.append(one_cycle(process, store, workdir, sig=sig, load=load))
        if progress is not None:
            progress(n + 1, len(plan))
    return out


def summarize(cycles: list[Cycle]) -> dict:
    rows = {}
    for c in cycles:
        key = f"{c.process}/{'load' if c.load else 'idle'}/{c.signal}"
        row = rows.setdefault(
            key,
            {"cycles": 0, "exit_0": 0, "aborts": 0, "hung": 0, "orphans": 0, "other": [], "max_seconds_to_exit": 0.0},
        )
        row["cycles"] += 1
        row["exit_0"] += c.status == 0
        row["aborts"] += c.status in (134, -6)
        row["hung"] += c.status == HUNG
        row["orphans"] += c.orphans
        row["max_seconds_to_exit"] = max(row["max_seconds_to_exit"], c.seconds_to_exit)
        if c.status not in (0, 134, -6, HUNG):
            row["other"].append(f"{c.status}: {c.tail}")
    return rows
