"""The Swift node (`mobile_export/ios`, executable `flashmesh-node`) as local processes on 127.0.0.1, beside
Python ones, for the tests and benchmarks: built with the Swift toolchain when it is present, found
by the port its start line prints (it does not advertise by zeroconf; the coordinator gets `--node`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.node.bundle_format import is_bundle
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.protos import TOKEN_ENV
from flashmesh.protos.errors import UserError
from flashmesh.testing.local_nodes import LocalNodeProcesses

PACKAGE = Path(__file__).resolve().parent.parent / "mobile_export" / "ios"
REQUIRE_ENV = "FLASHMESH_REQUIRE_SWIFT"  # set (as .ci/run does) to make a missing toolchain an error
SWIFT_DIRS = ("/opt/swift/usr/bin",)
# One build for the executable and the unit tests: release (the node computes in loops that debug code
# runs far slower), with testing enabled so `swift test` reuses it instead of building a second time.
BUILD_FLAGS = ["-c", "release", "-Xswiftc", "-enable-testing"]
_START = re.compile(r"^node (\S+) \((\w+)\) serving .* port (\d+)$", re.M)


def swift_executable() -> str | None:
    """`swift` on PATH or in the toolchain's usual place; None without a toolchain."""
    return shutil.which("swift") or next((f"{d}/swift" for d in SWIFT_DIRS if Path(d, "swift").is_file()), None)


def swift_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def swift_run(*args: str, env: dict | None = None, timeout: float = 900) -> str:
    """`swift ARGS` in the package with BUILD_FLAGS; its output, or a UserError with its last lines."""
    swift = swift_executable()
    if swift is None:
        raise UserError("no Swift toolchain: install Swift 6 (swift on PATH or in /opt/swift/usr/bin)")
    result = subprocess.run(
        [swift, *args, *BUILD_FLAGS], cwd=PACKAGE, capture_output=True, text=True, env=env, timeout=timeout
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise UserError(f"swift {' '.join(args)} failed:\n" + "\n".join(output.strip().splitlines()[-60:]))
    return output


def bundle_expert_bytes(bundle: Path) -> int:
    """Every expert of a bundle, as a node's cache holds it (fp16 records count as fp32): a budget that holds all."""
    source = BundleExpertSource(bundle)
    try:
        return source.manifest.expert_bytes_total
    finally:
        source.close()


def node_binary() -> Path | None:
    """The release `flashmesh-node` with the unit tests, built first (quick when up to date); None
    without a Swift toolchain (a binary left from another build is not used then)."""
    if swift_executable() is None:
        return None
    swift_run("build", "--build-tests")
    return PACKAGE / ".build" / "release" / "flashmesh-node"


class MixedNodeProcesses(LocalNodeProcesses):
    """Node processes on 127.0.0.1, each the Swift node or `flashmesh node serve` (kind "swift" or
    "python", serving a bundle or store), found by the port their start line prints; no zeroconf."""

    def __init__(self, shards: list[Path], *, kinds: list[str], binary: Path | None = None, **kwargs) -> None:
        super().__init__(shards, **kwargs)
        self.kinds = list(kinds)
        self.binary = binary

    def command(self, i: int, port: int) -> list[str]:
        budget = ["--ram-budget", str(self.budgets[i]), "--port", str(port), "--name", self.names[i]]
        extra = [*self.node_args[i], "--parent-pid", str(os.getpid())]
        if self.flash_gbps is not None:
            extra += ["--flash-gbps", str(self.flash_gbps)]
        if self.kinds[i] == "swift":
            if self.binary is None:
                raise UserError("no flashmesh-node binary: build mobile_export/ios with `swift build -c release`")
            return [str(self.binary), "--bundle", str(self.shards[i]), "--host", "127.0.0.1", *budget, *extra]
        source = ["--bundle", str(self.shards[i])] if is_bundle(self.shards[i]) else [str(self.shards[i])]
        cli = [sys.executable, "-m", "flashmesh.coordinator.cli", "node", "serve", *source, *budget, *extra]
        return [*cli, "--interfaces", "127.0.0.1", "--no-advertise"]

    def start(self, i: int, *, port: int = 0) -> subprocess.Popen:
        log_path = self.logdir / f"{self.names[i]}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log_file)
        self._offsets = getattr(self, "_offsets", {})
        self._offsets[i] = log_path.stat().st_size  # the start line of this run comes after what is there
        env = {**os.environ, TOKEN_ENV: self.token, "TRANSFORMERS_VERBOSITY": "error"}
        self.procs[i] = subprocess.Popen(
            self.command(i, port), env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=self.before_exec[i]
        )
        return self.procs[i]

    def find(self, *, timeout: float = 120.0) -> list[NodeAddress]:
        """Wait for every started node's start line; return their addresses (by name, so a coordinator
        checks it reached the node it meant)."""
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            log_path = self.logdir / f"{self.names[i]}.log"
            while True:
                text = log_path.read_bytes()[self._offsets.get(i, 0) :].decode(errors="replace")
                match = _START.search(text)
                if match:
                    self.addresses[i] = NodeAddress(host="127.0.0.1", port=int(match.group(3)), name=self.names[i])
                    break
                self._check_alive(i)
                if time.monotonic() > deadline:
                    raise UserError(f"local node {self.names[i]} printed no start line within {timeout:g} s")
                time.sleep(0.1)
        return [a for a in self.addresses if a is not None]
