"""`flashmesh node serve` processes on 127.0.0.1 and the shards they serve: for the demo, the
benchmarks and the tests (which kill, stop and restart them)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmesh.coordinator.discovery import NodeAddress, discover
from flashmesh.node.bundle_format import is_bundle
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.protos import TLS_ENV, TOKEN_ENV
from flashmesh.protos.errors import UserError


def ensure_shards(store: Path, workdir: Path, *, count: int, replicas: int = 1) -> list[Path]:
    """Shards 0..count-1 of `store` under `workdir`, written once per store fingerprint."""
    from flashmesh.node.shard import write_shard

    fingerprint = Manifest.load(store).fingerprint
    paths = []
    suffix = f"x{replicas}" if replicas > 1 else ""
    for i in range(count):
        path = Path(workdir) / f"{Path(store).name}-shard{i}of{count}{suffix}"
        if not (path / MANIFEST).is_file() or Manifest.load(path).fingerprint != fingerprint:
            write_shard(store, path, count=count, index=i, replicas=replicas, force=True)
        paths.append(path)
    return paths


def ensure_dense(store: Path, out: Path) -> Path:
    """The coordinator's dense part of `store` at `out`, written once per store fingerprint."""
    from flashmesh.node.shard import write_dense

    if not (out / MANIFEST).is_file() or Manifest.load(out).fingerprint != Manifest.load(store).fingerprint:
        write_dense(store, out, force=True)
    return out


class LocalNodeProcesses:
    """`flashmesh node serve` processes on 127.0.0.1, one per shard, with their process handles:
    for the demo, benchmarks and the fault tests (which kill, stop and restart them). Each has a
    unique name, so zeroconf on a shared loopback finds exactly these."""

    def __init__(
        self,
        shards: list[Path],
        *,
        budgets: list[int],
        token: str,
        logdir: Path,
        flash_gbps: float | None = None,
        tls: Path | None = None,
        node_args: list[list[str]] | None = None,
        before_exec: list[Callable[[], None] | None] | None = None,
        hosts: list | None = None,
        browse_on: str = "127.0.0.1",
    ) -> None:
        self.shards, self.budgets, self.token = list(shards), list(budgets), token
        self.hosts = hosts  # testing.netns.Host per node: run node i inside it, on its address
        self.browse_on = browse_on  # where find() looks for them by zeroconf
        self.node_args = node_args or [[] for _ in shards]  # more `node serve` options per node
        self.before_exec = before_exec or [None] * len(shards)  # runs in node i before exec (e.g. join cgroups)
        self.tls = tls  # a cluster directory holding its CA: each node gets a certificate for its name
        self._certs = tempfile.TemporaryDirectory(prefix="flashmesh-node-certs-") if tls is not None else None
        self.flash_gbps = flash_gbps  # report this instead of measuring (placement then splits evenly)
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        run_id = f"local{os.getpid()}x{secrets.token_hex(2)}"
        self.names = [f"{run_id}-{i}" for i in range(len(shards))]
        self.procs: list[subprocess.Popen | None] = [None] * len(shards)
        self.addresses: list[NodeAddress | None] = [None] * len(shards)
        self._logs: list = []

    def start(self, i: int, *, port: int = 0) -> subprocess.Popen:
        log_file = open(self.logdir / f"{self.names[i]}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log_file)
        source = ["--bundle", str(self.shards[i])] if is_bundle(self.shards[i]) else [str(self.shards[i])]
        cmd = [sys.executable, "-m", "flashmesh.coordinator.cli", "node", "serve", *source, *self.node_args[i]]
        listen = "127.0.0.1" if self.hosts is None else self.hosts[i].address
        cmd += ["--ram-budget", str(self.budgets[i]), "--port", str(port), "--interfaces", listen]
        cmd += ["--name", self.names[i], "--parent-pid", str(os.getpid())]
        if self.flash_gbps is not None:
            cmd += ["--flash-gbps", str(self.flash_gbps)]
        if self._certs is not None:
            from flashmesh.coordinator.certs import issue

            out = Path(self._certs.name) / self.names[i]
            cmd += ["--tls", str(out if out.is_dir() else issue(self.tls, self.names[i], out=out))]
        env = {**os.environ, TOKEN_ENV: self.token, "TRANSFORMERS_VERBOSITY": "error"}
        env.pop(TLS_ENV, None)
        if self.hosts is not None:
            cmd = self.hosts[i].command(cmd)  # `ip netns exec` execs: the process is the node itself
        self.procs[i] = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=self.before_exec[i]
        )
        return self.procs[i]

    def _check_alive(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is not None:
            tail = (self.logdir / f"{self.names[i]}.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(f"local node {self.names[i]} exited with status {proc.returncode}: {' '.join(tail)}")

    def find(self, *, timeout: float = 120.0, only: list[int] | None = None) -> list[NodeAddress]:
        """Wait until zeroconf (on `browse_on`) finds every started node (or those of `only`, as
        they are now: a restarted node has a new id); return their addresses."""
        indices = [i for i in (range(len(self.names)) if only is None else only) if self.procs[i] is not None]
        stale = {self.addresses[i].node_id for i in indices if self.addresses[i] is not None}
        wanted = {self.names[i] for i in indices}
        found: dict[str, NodeAddress] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(wanted):
            for i in indices:
                self._check_alive(i)
            if time.monotonic() > deadline:
                raise UserError(f"local nodes {sorted(wanted - set(found))} did not appear within {timeout:g} s")
            for node in discover(
                interfaces=[self.browse_on],
                timeout=2.0,
                expect=len(wanted) - len(found),
                accept=lambda n: n.name in wanted and n.name not in found and n.node_id not in stale,
            ):
                found[node.name] = node
        for i in indices:
            self.addresses[i] = found[self.names[i]]
        return [found[self.names[i]] for i in indices]

    def restart(self, i: int, *, timeout: float = 120.0, same_port: bool = True) -> NodeAddress:
        """Start node `i` again on its old port (or any free one) and wait until it answers there."""
        from flashmesh.coordinator.client import NodeClient

        old = self.addresses[i]
        self.start(i, port=old.port if same_port else 0)
        if self._certs is not None or not same_port:  # no identity to probe with, or a new port: zeroconf
            return self.find(timeout=timeout, only=[i])[0]
        client = NodeClient(old, token=self.token)
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._check_alive(i)
                try:
                    client.health(timeout=1.0)
                    # a restarted node has a new id: what zeroconf said of the old one no longer holds
                    self.addresses[i] = dataclasses.replace(old, node_id=client.info(timeout=5.0).node_id)
                    return self.addresses[i]
                except UserError:
                    if time.monotonic() > deadline:
                        raise UserError(f"local node {self.names[i]} did not come back within {timeout:g} s") from None
                    time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log_file in self._logs:
            log_file.close()
        if self._certs is not None:
            self._certs.cleanup()


@contextmanager
def local_node_processes(
    shards: list[Path],
    *,
    budgets: list[int],
    token: str,
    logdir: Path,
    timeout: float = 120.0,
    flash_gbps: float | None = None,
    tls: Path | None = None,
    node_args: list[list[str]] | None = None,
    before_exec: list[Callable[[], None] | None] | None = None,
    hosts: list | None = None,
    browse_on: str = "127.0.0.1",
) -> Iterator[LocalNodeProcesses]:
    """Started and found `LocalNodeProcesses` (inside `hosts`, testing.netns, when given); always
    stopped on exit."""
    nodes = LocalNodeProcesses(
        shards,
        budgets=budgets,
        token=token,
        logdir=logdir,
        flash_gbps=flash_gbps,
        tls=tls,
        node_args=node_args,
        before_exec=before_exec,
        hosts=hosts,
        browse_on=browse_on,
    )
    try:
        for i in range(len(shards)):
            nodes.start(i)
        nodes.find(timeout=timeout)
        yield nodes
    finally:
        nodes.stop()


@contextmanager
def local_nodes(
    shards: list[Path],
    *,
    budgets: list[int],
    token: str,
    logdir: Path,
    timeout: float = 120.0,
    tls: Path | None = None,
    node_args: list[list[str]] | None = None,
    before_exec: list[Callable[[], None] | None] | None = None,
) -> Iterator[list[NodeAddress]]:
    """Start one `flashmesh node serve` process per shard (or iOS bundle: `--bundle`) on 127.0.0.1,
    find them by zeroconf on 127.0.0.1, yield their addresses; always stop the processes on exit.
    With `tls` (a cluster directory holding its CA) each node gets a certificate for its name, in a
    directory removed on exit, and serves only mutual TLS. `node_args`: more `node serve` options
    per node (e.g. `--count 2 --index 0` for half a bundle); `before_exec[i]` runs in node i's
    process before it execs (the benchmarks put each node in its own cgroups there)."""
    with local_node_processes(
        shards,
        budgets=budgets,
        token=token,
        logdir=logdir,
        timeout=timeout,
        tls=tls,
        node_args=node_args,
        before_exec=before_exec,
    ) as nodes:
        yield list(nodes.addresses)
