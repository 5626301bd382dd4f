"""Emulated LAN hosts for tests: network namespaces on a private bridge, each with one veth
interface, a 10.77.0.0/24 address and a multicast route (zeroconf needs one). Every name starts with
`fmux` plus a random suffix; everything is removed on exit. Needs root and iproute2."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@dataclass(frozen=True)
class Host:
    ns: str
    address: str
    home: str  # its own HOME: platformdirs puts the config under HOME/.config there

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host with its own HOME and no test-suite config overrides."""
        return ["ip", "netns", "exec", self.ns, "env", f"HOME={self.home}", *argv]


def host_env() -> dict[str, str]:
    """The environment for host commands: the suite's config and cache overrides removed."""
    drop = {"FLASHMESH_CONFIG_DIR", "FLASHMESH_CACHE_DIR", "FLASHMESH_TOKEN", "FLASHMESH_TLS", "XDG_CONFIG_HOME"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"TRANSFORMERS_VERBOSITY": "error"}


@contextmanager
def lan(count: int, root) -> Iterator[list[Host]]:
    suffix = secrets.token_hex(2)
    bridge = f"fmux{suffix}br"
    namespaces: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in range(count):
            ns, outside, inside = f"fmux{suffix}h{i}", f"fmux{suffix}v{i}", f"fmux{suffix}p{i}"
            _ip("netns", "add", ns)
            namespaces.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            address = f"10.77.0.{i + 1}"
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{address}/24", "dev", inside, ns=ns)
            _ip("link", "set", inside, "up", ns=ns)
            _ip("route", "add", "224.0.0.0/4", "dev", inside, ns=ns)
            home = root / f"home{i}"
            home.mkdir()
            hosts.append(Host(ns, address, str(home)))
        yield hosts
    finally:
        for ns in namespaces:  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
