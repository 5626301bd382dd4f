"""Streamed generation equals mlx-lm's own generation on the unpacked model, at three budgets.

Logit tolerance: the streamed path runs mlx-lm's own expert module on the cache's stacked slabs
with expert ids renumbered to slots, so within one wave the arithmetic is the same kernels on the
same rows and the logits are expected bit-identical (atol 0). When the budget forces several waves, rows are
grouped differently in the batched matmul, which may change accumulation order; we then allow
1e-4 absolute on fp32 logits of magnitude ~1-10 (a few ulps of accumulated fp32 error).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest
from mlx_lm import load

from .conftest import ARCHS, PROMPT, check_equivalence

BUDGETS = ["all", "quarter", "minimum"]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_mlx_lm(models, arch, budget):
    src, store = models.get(arch)
    check_equivalence(src, store, budget)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(
    "arch,quant",
    [("qwen3_moe", "affine4"), ("deepseek_v3", "affine8"), ("mixtral", "affine4"), ("gpt_oss", "mxfp4")],
)
def test_quantized_matches_mlx_lm(models, arch, quant, budget):
    src, store = models.get(arch, quant)
    check_equivalence(src, store, budget)


def test_page_cache_mode_matches(models):
    src, store = models.get("qwen3_moe")
    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=8))
    streaming = open_model(
        ModelOptions(store=store, ram_budget=Manifest.load(store).min_budget_bytes * 2, page_cache=True)
    )
    try:
        assert (
            generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=8)).tokens
            == reference.tokens
        )
    finally:
        streaming.close()


def test_long_prefill_in_waves(models):
    """A prompt longer than the prefill chunk, at the minimum budget: several waves per layer."""
    src, store = models.get("qwen3_moe")
    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT * 6)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=6), prefill_step_size=32)
    streaming = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).min_budget_bytes))
    try:
        ours = generate(
            streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=6), prefill_step_size=32
        )
        assert ours.tokens == reference.tokens
        assert streaming.cache.stats.peak_bytes <= streaming.cache.budget_bytes
    finally:
        streaming.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_preloaded_lazy_path_matches(models, arch):
    """Every expert preloaded into a budget that holds them all: layer calls stay lazy (no sync on
    the router, no reads) and the output is still mlx-lm's, bit for bit."""
    src, store = models.get(arch)
    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=8))
    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total, preload=True))
    try:
        read_at_load = streaming.cache.stats.bytes_read
        assert read_at_load == sum(len(s.experts) * s.record_size for s in manifest.layers)
        assert all(streaming.cache.resident_slots(s.layer) is not None for s in manifest.layers)
        ours = generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=8))
        assert ours.tokens == reference.tokens
        ref_logits = ref_model(mx.array(prompt)[None])[0, -1]
        our_logits = streaming.model(mx.array(prompt)[None])[0, -1]
        np.testing.assert_array_equal(np.array(our_logits), np.array(ref_logits))
        stats = streaming.cache.stats
        assert stats.misses == 0 and stats.hits > 0 and stats.bytes_read == read_at_load
    finally:
        streaming.close()
