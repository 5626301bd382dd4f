"""The runs of `bench plan-validate`: the calibration curve, one measured generation, local nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.report import generate_report
from flashmesh.node.store_format import Manifest

from bench.policy import record_trace, simulate
from bench.routing_bench import CURVE_SHARES

CALIBRATION_SEEDS = (7, 8)  # neither is a measured round's seed


def _params(tokens: int, *, seed: int, temperature: float) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=temperature, seed=seed)


def calibration_curve(store: Path, *, prompts: dict, tokens: int, temperature: float) -> list[list[float]]:
    """[budget share, hit rate] of the engine's cache policy ("auto") replayed on the routing of
    calibration runs shaped like a measured one (a generation, then the one whose hits count), one
    per pair of prompts in prompts["calibration"]; the mean over the pairs."""
    manifest = Manifest.load(store)
    experts = sum(len(s.experts) for s in manifest.layers)
    shares = (*CURVE_SHARES, 1.0)
    curves = []
    for pair in prompts["calibration"]:
        streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total))
        try:
            trace = record_trace(streaming.cache)
            for text, seed in zip(pair, CALIBRATION_SEEDS, strict=True):
                warm = len(trace)  # the requests before the counted generation
                prompt = encode_prompt(streaming.tokenizer, text, chat=False)
                generate(
                    streaming.model, streaming.tokenizer, prompt, _params(tokens, seed=seed, temperature=temperature)
                )
        finally:
            streaming.close()
        curves.append([counted_hit_rate(trace, warm=warm, capacity=max(1, round(s * experts))) for s in shares])
    return [[share, sum(c[i] for c in curves) / len(curves)] for i, share in enumerate(shares)]


def counted_hit_rate(trace, *, warm: int, capacity: int) -> float:
    """Hit rate of the engine's policy on trace[warm:], the cache warmed by trace[:warm] (a replay is
    causal: the hits of a prefix do not depend on what follows it)."""

    def hits(requests) -> float:
        return simulate(requests, capacity=capacity, policy="auto") * sum(len(e) for _, e in requests)

    return (hits(trace) - hits(trace[:warm])) / sum(len(e) for _, e in trace[warm:])


def measure(options: ModelOptions, *, prompts: dict, tokens: int, seed: int, temperature: float) -> dict:
    """Decode tok/s and hit rate of a generation after a warm-up generation of another prompt (the
    plan is steady state: caches filled by earlier traffic)."""
    streaming = open_model(options)
    try:
        warm = encode_prompt(streaming.tokenizer, prompts["warm"], chat=False)
        generate_report(streaming, warm, _params(tokens, seed=seed + 1000, temperature=temperature))
        prompt = encode_prompt(streaming.tokenizer, prompts["measured"], chat=False)
        report = generate_report(streaming, prompt, _params(tokens, seed=seed, temperature=temperature))
    finally:
        streaming.close()
    keys = ("decode_tokens_per_s", "bytes_read_per_token", "compute_seconds", "io_seconds")
    return {**{k: report[k] for k in keys}, "hit_rate": report["cache_hit_rate"], "tokens": len(report["tokens"])}


@contextmanager
def nodes_up(store: Path, workdir: Path, *, budget: int, token: str, count: int = 2) -> Iterator[list]:
    """`count` local node processes serving shards of `store`, the budget split evenly."""
    from flashmesh.testing.local_nodes import ensure_shards, local_nodes

    shards = ensure_shards(store, workdir, count=count)
    with local_nodes(shards, budgets=[budget // count] * count, token=token, logdir=workdir / "logs") as nodes:
        yield nodes


def ping_ms(address, *, token: str) -> float:
    """The link alone: the fastest of 20 Health round trips."""
    from flashmesh.coordinator.client import NodeClient
    from flashmesh.coordinator.cluster_view import _ping_ms

    client = NodeClient(address, token=token)
    try:
        return _ping_ms(client, tries=20)
    finally:
        client.close()
