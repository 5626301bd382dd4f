"""Hosts on a private network for fault tests and benchmarks: one network namespace per host, each
with an `eth0` on a bridge that nothing else is attached to. The bridge's own address (in this
process's namespace) is where the coordinator lives; a host's link goes down and up with
`ip link set eth0 down|up` inside its namespace, as Wi-Fi dropping would. Nothing is routed off
the machine. Every namespace, bridge and veth is named `fmr` + a per-run id and removed on exit.

Needs root and iproute2 (`ip`); `available()` says whether this machine can.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PREFIX = "fmr"


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def available() -> str | None:
    """None when network-namespace hosts can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_network(w.split()[0], strict=False) for w in _ip("-4", "route").stdout.splitlines()
            if w and w.split()[0][0].isdigit()]  # fmt: skip
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")


@dataclass(frozen=True)
class Host:
    netns: str  # namespace name
    address: str  # eth0's IPv4 address inside it
    veth: str  # the bridge-side end of its link

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]


class NetnsHosts:
    """`count` hosts on a private bridge; `gateway` is this process's address on it."""

    def __init__(self, count: int) -> None:
        self.run_id = PREFIX + secrets.token_hex(3)[:5]
        self.bridge = f"{self.run_id}br"
        net = _free_subnet()
        addresses = list(net.hosts())
        self.prefixlen = net.prefixlen
        self.gateway = str(addresses[0])
        self.hosts = [Host(f"{self.run_id}-h{i}", str(addresses[10 + i]), f"{self.run_id}h{i}") for i in range(count)]
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), removed in reverse
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/{self.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            self._made.append(("netns", h.netns))
            peer = f"{h.veth}p"
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
            self._made.append(("link", h.veth))
            _ip("link", "set", peer, "netns", h.netns)
            _ip("link", "set", h.veth, "master", self.bridge)
            _ip("link", "set", h.veth, "up")
            _ip("link", "set", peer, "name", "eth0", netns=h.netns)
            _ip("addr", "add", f"{h.address}/{self.prefixlen}", "dev", "eth0", netns=h.netns)
            _ip("link", "set", "eth0", "up", netns=h.netns)
            _ip("link", "set", "lo", "up", netns=h.netns)

    def link(self, i: int, *, up: bool) -> None:
        """Take host `i`'s link down (frames to and from it are lost) or bring it back."""
        _ip("link", "set", "eth0", "up" if up else "down", netns=self.hosts[i].netns)

    def close(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()


@contextmanager
def netns_hosts(count: int) -> Iterator[NetnsHosts]:
    hosts = NetnsHosts(count)
    try:
        yield hosts
    finally:
        hosts.close()
