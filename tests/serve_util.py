"""A real `serve` app on 127.0.0.1 (ephemeral port) over a tiny packed model, for the serve tests."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flashmesh.coordinator.api.app import ServeOptions, create_app
from flashmesh.coordinator.api.metrics import ServerMetrics
from flashmesh.coordinator.api.server import serving_in_thread
from flashmesh.coordinator.api.worker import GenerationWorker
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest

MODEL = "tiny-moe"


@dataclass
class Served:
    url: str
    worker: GenerationWorker
    metrics: ServerMetrics

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body bytes) of one request over a fresh connection."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post(self, path: str, payload) -> tuple[int, dict, dict]:
        status, headers, body = self.raw(
            "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        return status, headers, json.loads(body)


@contextmanager
def served(store: Path, *, opener=None, max_queue: int = 4, **options) -> Iterator[Served]:
    """Serve `store` with its experts in-process, or as `opener` (returning the open model) opens it."""
    budget = Manifest.load(store).expert_bytes_total
    metrics = ServerMetrics()
    opener = opener or (lambda: open_model(ModelOptions(store=store, ram_budget=budget)))
    worker = GenerationWorker(opener, max_queue=max_queue, metrics=metrics)
    worker.start()
    try:
        app = create_app(worker, ServeOptions(model_id=MODEL, **options), metrics=metrics)
        with serving_in_thread(app) as url:
            yield Served(url, worker, metrics)
    finally:
        worker.close()
