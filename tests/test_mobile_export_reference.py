"""The bundle's saved Core ML programs, run op by op in NumPy with the bundle's expert records, give
the logits and greedy tokens of the MLX streamed run (open_model) of the same store.

Tolerance: the bundle computes in fp16 (unit roundoff 2**-11 ~ 4.9e-4) where the MLX run is fp32.
Each of the few dozen fp16 roundings per layer adds a relative error of that order; over 3 layers
and the LM head the logits may drift by some tens of roundoffs of their own scale. We allow
2e-2 * max(1, max|logit|) (about 40 fp16 roundoffs); the measured drift is ~3e-3 on logits ~2.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.options import ModelOptions
from flashmesh.mobile_export.exporter import export_ios
from flashmesh.mobile_export.reference import ReferenceRunner
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_writer import pack
from flashmesh.testing.synthetic import build_model
from mlx_lm.models.cache import make_prompt_cache

PROMPT = "The experts live on flash and"  # 9 tokens: one full prefill call of 8 and one padded
STEPS = 5


def _routed_model(root: Path, arch: str) -> Path:
    """A tiny random model whose routers are random too (deepseek's gate starts at zero: all ties)."""
    src = build_model(root / f"{arch}-src", arch, layers=3)
    weights = mx.load(str(src / "model.safetensors"))
    mx.random.seed(1)
    for k in weights:
        if k.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            scale = 0.5 if k.endswith("weight") else 0.1
            weights[k] = (mx.random.normal(weights[k].shape) * scale).astype(weights[k].dtype)
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    store = root / f"{arch}-store"
    pack(str(src), store, show_progress=False)
    return store


def _mlx_greedy(store: Path) -> tuple[list[int], list[int], list[np.ndarray]]:
    sm = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    try:
        prompt = sm.tokenizer.encode(PROMPT)
        cache = make_prompt_cache(sm.model)
        logits = sm.model(mx.array([prompt]), cache=cache)[0, -1]
        tokens, steps = [], []
        for _ in range(STEPS):
            steps.append(np.asarray(logits.astype(mx.float32)))
            tokens.append(int(np.argmax(steps[-1])))
            logits = sm.model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
        return prompt, tokens, steps
    finally:
        sm.close()


def _assert_reference_matches(bundle, prompt, want_tokens, want_logits) -> None:
    """The NumPy executor on the bundle: MLX's greedy tokens, logits within the fp16 tolerance."""
    runner = ReferenceRunner(bundle)
    try:
        tokens, logits = runner.generate(prompt, STEPS)
    finally:
        runner.close()
    assert tokens == want_tokens
    for want, got in zip(want_logits, logits, strict=True):
        assert np.abs(want - got).max() <= 2e-2 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_reference_execution_matches_mlx(tmp_path, arch):
    store = _routed_model(tmp_path, arch)
    bundle = tmp_path / f"{arch}.flashmesh-ios"
    export_ios(store, bundle, context=64, prefill=8, show_progress=False)
    prompt, want_tokens, want_logits = _mlx_greedy(store)
    assert len(prompt) > 8
    _assert_reference_matches(bundle, prompt, want_tokens, want_logits)


@pytest.mark.parametrize("target", ["iOS18", "iOS26"])
def test_reference_execution_of_affine4_experts(tmp_path, target):
    """4-bit experts end to end: iOS 18 dequantizes the packed records on the CPU into the fp16 kernel
    inputs, iOS 26 passes int8 values and the kernel dequantizes. The MLX run computes with the store's
    fp32 scales/biases, the bundle with fp16 ones: the same fp16 tolerance as above covers it."""
    src = build_model(tmp_path / "q4-src", "qwen3_moe", layers=3, quantize={"bits": 4, "group_size": 64})
    # As in _routed_model: the default routers of this tiny model leave near-ties among experts that one
    # fp16 rounding flips (seen: one flipped expert, logits off by 0.26 of 1.9, tokens still equal).
    # Scaling the quantized routers' scales and biases by 8 widens the spread of their logits.
    weights = mx.load(str(src / "model.safetensors"))
    for k in weights:
        if ".mlp.gate." in k and k.endswith((".scales", ".biases")):
            weights[k] = weights[k] * 8
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    store = tmp_path / "q4-store"
    pack(str(src), store, show_progress=False)
    bundle = tmp_path / f"q4-{target}.flashmesh-ios"
    manifest = export_ios(store, bundle, target=target, context=64, prefill=8, show_progress=False)
    assert manifest["quantization"]["expert_input"] == ("int8" if target == "iOS26" else "float16_cpu_dequant")
    prompt, want_tokens, want_logits = _mlx_greedy(store)
    _assert_reference_matches(bundle, prompt, want_tokens, want_logits)
