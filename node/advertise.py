"""Zeroconf advertisement of a node as `_flashmesh._tcp.local.`, bound to the interfaces given.

The TXT record carries the node id, name, model fingerprint, protocol version and port: no
secrets (the cluster token never leaves the node in an advertisement). Multicast goes only out of
the interfaces named by address; the default everywhere in flashmesh is 127.0.0.1.
"""

from __future__ import annotations

import socket

from flashmesh.protos import PROTOCOL_VERSION, SERVICE_TYPE
from flashmesh.protos.errors import UserError
from zeroconf import IPVersion, ServiceInfo, Zeroconf


def check_interfaces(interfaces: list[str]) -> None:
    """Zeroconf binds to interfaces by IPv4 address: refuse anything else in one line."""
    for a in interfaces:
        try:
            socket.inet_aton(a)
        except OSError:
            raise UserError(f"--interfaces takes IPv4 addresses such as 127.0.0.1, not {a!r}") from None


def instance_name(name: str, node_id: str) -> str:
    """A unique, DNS-safe service instance label for a node."""
    safe = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:40] or "node"
    return f"{safe}-{node_id[:8]}"


def txt_properties(*, name: str, node_id: str, fingerprint: str, port: int) -> dict[str, str]:
    """The TXT record (the Swift node's `Advertisement` writes the same, tested byte for byte)."""
    return {"id": node_id, "name": name, "fp": fingerprint, "proto": str(PROTOCOL_VERSION), "port": str(port)}


def service_info(*, name: str, node_id: str, fingerprint: str, port: int, interfaces: list[str]) -> ServiceInfo:
    label = instance_name(name, node_id)
    return ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in interfaces],
        port=port,
        properties=txt_properties(name=name, node_id=node_id, fingerprint=fingerprint, port=port),
        server=f"{label}.local.",
    )


class Advertiser:
    """Registers the node's service on `interfaces` (IPv4 addresses) until close()."""

    def __init__(self, *, name: str, node_id: str, fingerprint: str, port: int, interfaces: list[str]) -> None:
        if not interfaces:
            raise ValueError("advertise on at least one interface address")
        self.info = service_info(name=name, node_id=node_id, fingerprint=fingerprint, port=port, interfaces=interfaces)
        self.zeroconf = Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
        try:
            self.zeroconf.register_service(self.info)
        except BaseException:
            self.zeroconf.close()
            raise

    def close(self) -> None:
        try:
            self.zeroconf.unregister_service(self.info)
        finally:
            self.zeroconf.close()
