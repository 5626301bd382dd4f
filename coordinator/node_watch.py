"""Watching the network after startup: a node that restarts (with a new id, perhaps on another
port or address) announces itself again by zeroconf, and `NodeWatcher` keeps the latest address
each node name advertises, so that a running coordinator reconnects to it (RemoteExperts' `relink`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flashmesh.coordinator.discovery import NodeAddress, service_address
from flashmesh.protos import SERVICE_TYPE
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

log = logging.getLogger(__name__)


class NodeWatcher(ServiceListener):
    """Browses `_flashmesh._tcp.local.` on `interfaces` until close(). Zeroconf's callbacks only
    note names; one owned thread resolves them (close() stops and joins it)."""

    def __init__(self, *, interfaces: list[str], accept: Callable[[NodeAddress], bool] | None = None) -> None:
        self.accept = accept
        self._lock = threading.Lock()
        self._announced: dict[str, int] = {}  # instance name -> order of its latest announcement
        self._resolved: dict[str, tuple[int, NodeAddress]] = {}
        self._count = 0
        self._changed = threading.Event()
        self._closing = threading.Event()
        self._zc = Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
        self._thread = threading.Thread(target=self._run, name="flashmesh-node-watch", daemon=True)
        self._thread.start()
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, self)

    # zeroconf's listener (its thread): note, never block
    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self._lock:
            self._count += 1
            self._announced[name] = self._count
        self._changed.set()

    update_service = add_service

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self._lock:
            self._announced.pop(name, None)
            self._resolved.pop(name, None)

    def _run(self) -> None:
        while not self._closing.is_set():
            if not self._changed.wait(timeout=0.5):
                continue
            self._changed.clear()
            with self._lock:
                todo = [(n, order) for n, order in self._announced.items() if self._resolved.get(n, (0,))[0] != order]
            for name, order in todo:
                if self._closing.is_set():
                    return
                node = service_address(self._zc.get_service_info(SERVICE_TYPE, name, timeout=1000))
                if node is None or (self.accept is not None and not self.accept(node)):
                    continue
                with self._lock:
                    if name in self._announced:
                        self._resolved[name] = (order, node)

    def current(self) -> list[NodeAddress]:
        """Every node advertised now, the latest announcement per node name."""
        with self._lock:
            latest: dict[str, tuple[int, NodeAddress]] = {}
            for order, node in self._resolved.values():
                key = node.name or node.node_id
                if key not in latest or latest[key][0] < order:
                    latest[key] = (order, node)
        return sorted((n for _, n in latest.values()), key=lambda n: (n.name, n.host, n.port))

    def latest(self, name: str) -> NodeAddress | None:
        """Where the node called `name` announced itself last (None: not seen)."""
        return next((n for n in self.current() if n.name == name), None)

    def close(self) -> None:
        self._closing.set()
        self._changed.set()
        self._browser.cancel()
        self._thread.join()
        self._zc.close()


def watch_nodes(options, fingerprint: str | None = None) -> NodeWatcher:
    """A NodeWatcher on `options.zeroconf` (coordinator.options.ModelOptions) for the nodes its
    discovery accepts: name prefix and model fingerprint."""
    prefix = options.name_prefix
    return NodeWatcher(
        interfaces=list(options.zeroconf),
        accept=lambda n: n.name.startswith(prefix) and (fingerprint is None or n.fingerprint == fingerprint),
    )
