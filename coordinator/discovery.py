"""Finding nodes: zeroconf browse of `_flashmesh._tcp.local.` on the interfaces given, plus static
HOST:PORT addresses for networks without mDNS. Returns addresses only; whether a node serves the
right model is checked over the protocol (coordinator.client / coordinator.engine.open_model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flashmesh.node.advertise import check_interfaces
from flashmesh.protos import SERVICE_TYPE
from flashmesh.protos.errors import UserError
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeAddress:
    host: str
    port: int
    name: str = ""
    node_id: str = ""
    fingerprint: str = ""
    protocol_version: int = 0
    source: str = "static"  # "static" or "zeroconf"

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.target})" if self.name else self.target


def parse_address(text: str) -> NodeAddress:
    """HOST:PORT, or NAME@HOST:PORT: then the node must call itself NAME (and, under TLS, hold a
    certificate for NAME rather than for HOST)."""
    name, _, rest = text.strip().rpartition("@")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"cannot read node address {text!r}; write it as HOST:PORT or NAME@HOST:PORT, e.g. 192.168.1.20:50051"
        )
    return NodeAddress(host=host, port=int(port), name=name)


class _Collector(ServiceListener):
    def __init__(self) -> None:
        self.names: list[str] = []
        self.changed = threading.Event()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.names.append(name)
        self.changed.set()

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass


def _txt(props: dict, key: str) -> str:
    value = props.get(key.encode())
    return value.decode() if isinstance(value, bytes) else ""


def service_address(info) -> NodeAddress | None:
    """A resolved zeroconf service -> the node's address (None without an IPv4 address)."""
    addresses = info.parsed_addresses(IPVersion.V4Only) if info is not None else []
    if not addresses:
        return None
    props = info.properties
    proto = _txt(props, "proto")
    return NodeAddress(
        host=addresses[0],
        port=int(info.port),
        name=_txt(props, "name"),
        node_id=_txt(props, "id"),
        fingerprint=_txt(props, "fp"),
        protocol_version=int(proto) if proto.isdigit() else 0,
        source="zeroconf",
    )


def browse(
    *,
    interfaces: list[str],
    timeout: float = 3.0,
    expect: int | None = None,
    accept: Callable[[NodeAddress], bool] | None = None,
) -> list[NodeAddress]:
    """Nodes advertised on `interfaces` within `timeout` seconds (sooner once `expect` are found);
    `accept` filters them (e.g. by model fingerprint or name)."""
    zc = Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    collector = _Collector()
    browser = ServiceBrowser(zc, SERVICE_TYPE, collector)
    found: dict[str, NodeAddress] = {}
    resolved: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and (expect is None or len(found) < expect):
            collector.changed.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            collector.changed.clear()
            for name in list(collector.names):
                if name in resolved:
                    continue
                node = service_address(zc.get_service_info(SERVICE_TYPE, name, timeout=1000))
                if node is None:
                    continue
                resolved.add(name)
                if accept is None or accept(node):
                    found[node.node_id or name] = node
                else:
                    log.info("skipping node %s: not accepted (fingerprint %s)", node.label, node.fingerprint[:16])
    finally:
        browser.cancel()
        zc.close()
    return sorted(found.values(), key=lambda n: (n.name, n.host, n.port))


def discover(
    *,
    static: Sequence[NodeAddress | str] | None = None,
    interfaces: list[str] | None = None,
    timeout: float = 3.0,
    expect: int | None = None,
    accept: Callable[[NodeAddress], bool] | None = None,
) -> list[NodeAddress]:
    """Static addresses first, then zeroconf on `interfaces` (none given: no multicast at all)."""
    nodes = [a if isinstance(a, NodeAddress) else parse_address(a) for a in static or []]
    if interfaces:
        check_interfaces(interfaces)
        want = None if expect is None else max(0, expect - len(nodes))
        if want != 0:
            seen = {(n.host, n.port) for n in nodes}
            nodes += [
                n
                for n in browse(interfaces=interfaces, timeout=timeout, expect=want, accept=accept)
                if (n.host, n.port) not in seen
            ]
    return nodes


def find_nodes(
    *,
    static: Sequence[NodeAddress | str] = (),
    interfaces: Sequence[str] | None,
    timeout: float = 3.0,
    expect: int | None = None,
    name_prefix: str = "",
    fingerprint: str | None = None,
) -> list[NodeAddress]:
    """`discover`, keeping zeroconf nodes named `name_prefix`... that serve `fingerprint`; at least one
    node or a one-line error."""
    nodes = discover(
        static=static,
        interfaces=list(interfaces) if interfaces else None,
        timeout=timeout,
        expect=expect,
        accept=lambda n: n.name.startswith(name_prefix) and (fingerprint is None or n.fingerprint == fingerprint),
    )
    if not nodes:
        where = f" by zeroconf on {', '.join(interfaces)}" if interfaces else ""
        raise UserError(f"no flashmesh nodes found{where}; start `flashmesh node serve` or pass --node HOST:PORT")
    return nodes
