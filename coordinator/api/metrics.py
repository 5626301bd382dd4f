"""The server's Prometheus metrics, in a registry of their own (several servers may share a process)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from flashmesh.coordinator.generate import GenerationStats
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DISPATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
# Paths reported as themselves; anything else is "other", so a scan of odd URLs cannot grow the label set.
KNOWN_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/health", "/", "/dashboard.json")
HISTORY = 1000  # generations and per-node request latencies the dashboard remembers


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flashmesh_http_requests", "HTTP requests answered, by path and status code", ["path", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "flashmesh_http_request_seconds", "HTTP request latency (streams: until the last byte)", ["path"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generations = Counter(
            "flashmesh_generations", "generations finished, by finish reason (stop, length, cancelled, error)",
            ["finish_reason"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("flashmesh_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("flashmesh_generated_tokens", "tokens generated", registry=r)
        self.decode_seconds = Counter(
            "flashmesh_decode_seconds", "seconds spent decoding after the first token", registry=r
        )
        self.decode_tps = Gauge("flashmesh_decode_tokens_per_second", "decode speed of the last generation", registry=r)
        self.ttft = Histogram(
            "flashmesh_time_to_first_token_seconds", "prefill time per generation", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "flashmesh_queue_wait_seconds", "time a request waited for the worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("flashmesh_queue_depth", "requests waiting or running", registry=r)
        self.cache_hits = Counter("flashmesh_expert_cache_hits", "expert lookups served from RAM", registry=r)
        self.cache_misses = Counter("flashmesh_expert_cache_misses", "expert lookups read from flash", registry=r)
        self.cache_hit_rate = Gauge("flashmesh_expert_cache_hit_rate", "hits / lookups since the start", registry=r)
        self.bytes_read = Counter("flashmesh_expert_bytes_read", "expert bytes read from flash", registry=r)
        self.node_dispatch = Histogram(
            "flashmesh_node_dispatch_seconds", "one MoE layer's request to one node, send to reply (cluster mode)",
            ["node"], buckets=DISPATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.layer_dispatch = Histogram(
            "flashmesh_layer_dispatch_seconds", "one MoE layer across all nodes, split to reassembled (cluster mode)",
            buckets=DISPATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self._hits = self._lookups = 0
        # For the dashboard: the last generations (wall time, decode tok/s, tokens) and recent per-node latencies.
        self.generations_recent: deque[tuple[float, float, int]] = deque(maxlen=HISTORY)
        self.node_latency_recent: dict[str, deque[float]] = {}

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in KNOWN_PATHS else "other"
        self.requests.labels(path=path, status=str(status)).inc()
        self.request_seconds.labels(path=path).observe(seconds)

    def observe_generation(self, stats: GenerationStats, *, queue_seconds: float) -> None:
        self.generations.labels(finish_reason=stats.finish_reason or "stop").inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generated_tokens.inc(len(stats.tokens))
        if stats.decode_tokens_per_s > 0:
            self.decode_seconds.inc((len(stats.tokens) - 1) / stats.decode_tokens_per_s)
            self.decode_tps.set(stats.decode_tokens_per_s)
        if stats.tokens:
            self.ttft.observe(stats.ttft_s)
            self.generations_recent.append((time.time(), stats.decode_tokens_per_s, len(stats.tokens)))
        self.queue_wait.observe(max(0.0, queue_seconds))

    def observe_failure(self) -> None:
        self.generations.labels(finish_reason="error").inc()

    def observe_cache(self, hits: int, misses: int, bytes_read: int) -> None:
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)
        self.bytes_read.inc(bytes_read)
        self._hits += hits
        self._lookups += hits + misses
        if self._lookups:
            self.cache_hit_rate.set(self._hits / self._lookups)

    def observe_node_latency(self, node: str, seconds: Iterable[float]) -> None:
        h = self.node_dispatch.labels(node=node)
        recent = self.node_latency_recent.setdefault(node, deque(maxlen=HISTORY))
        for s in seconds:
            h.observe(s)
            recent.append(s)

    def observe_layer_dispatch(self, seconds: Iterable[float]) -> None:
        for s in seconds:
            self.layer_dispatch.observe(s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
