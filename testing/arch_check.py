"""Every Mixture-of-Experts model file of the installed mlx-lm, packed and streamed against mlx-lm.

Shared by tests/test_architectures.py and `python -m bench.arch_table` (which writes the table in
docs/store.md): a tiny random model of each architecture (testing/arch_configs.py) is packed, and
flashmesh's greedy tokens must equal mlx-lm's own, with every expert in RAM and at the smallest
budget (one layer's top-k experts, so experts stream and evict).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm.models
import numpy as np
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_writer import pack
from flashmesh.testing.arch_configs import NOT_CHECKED, REFUSED, TINY_CONFIGS, tiny_config
from flashmesh.testing.synthetic import build_model

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts"
MAX_TOKENS = 6
BUDGETS = ("all", "minimum")
QUANT4 = {"bits": 4, "group_size": 64, "mode": "affine"}

_IMPORT = re.compile(r"^from \.(?:(\w+) import|\s+import ([\w, ]+))", re.MULTILINE)


def moe_model_files() -> list[str]:
    """Model files of the installed mlx-lm that can hold routed experts: they use mlx-lm's switch
    layers or build experts themselves, or they wrap a model file that does (kimi_vl, mistral3)."""
    root = Path(mlx_lm.models.__file__).parent
    sources = {f.stem: f.read_text() for f in root.glob("*.py") if f.stem not in ("__init__", "switch_layers")}
    imports = {
        name: {m.strip() for a, b in _IMPORT.findall(src) for m in (a or b).split(",")} & sources.keys()
        for name, src in sources.items()
    }
    moe = {name for name, src in sources.items() if "switch_layers" in src or "experts" in src}
    while grown := {name for name, deps in imports.items() if deps & moe} - moe:
        moe |= grown
    return sorted(moe)


def uncovered() -> tuple[list[str], list[str]]:
    """(MoE model files neither covered nor refused, covered or refused names mlx-lm no longer has)."""
    files, known = set(moe_model_files()), set(TINY_CONFIGS) | set(REFUSED) | set(NOT_CHECKED)
    return sorted(files - known), sorted(known - files)


@dataclass(frozen=True)
class Packed:
    arch: str
    quant: str
    source: Path
    store: Path


def build_and_pack(root: Path, arch: str, *, quant: str = "fp32") -> Packed:
    """A tiny random `arch` model under `root` and its store."""
    name = f"{arch}-{quant}"
    src = build_model(
        root / f"{name}-src",
        arch,
        config=lambda vocab: tiny_config(arch, vocab=vocab),
        quantize=QUANT4 if quant == "4bit" else None,
        fill_zeros=True,
    )
    store = root / f"{name}-store"
    pack(str(src), store, show_progress=False)
    return Packed(arch, quant, src, store)


@dataclass(frozen=True)
class Run:
    tokens: list[int]  # greedy continuation of the prompt
    logits: np.ndarray  # [V] float32, the prompt's last position in one forward pass


def _run(model, tokenizer, prompt: list[int]) -> Run:
    tokens = generate(model, tokenizer, prompt, SamplingParams(max_tokens=MAX_TOKENS)).tokens
    logits = model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    return Run(tokens, np.array(logits))


def reference(packed: Packed) -> tuple[list[int], Run]:
    """(prompt tokens, mlx-lm's run) on the unpacked source model."""
    from mlx_lm import load

    model, tokenizer = load(str(packed.source))
    prompt = tokenizer.encode(PROMPT)
    return prompt, _run(model, tokenizer, prompt)


def budget_bytes(manifest: Manifest, which: str) -> int:
    return manifest.expert_bytes_total if which == "all" else manifest.min_budget_bytes


def streamed(packed: Packed, prompt: list[int], which: str) -> Run:
    """flashmesh's run from the store at budget `which`; checks the cache kept to it and streamed."""
    budget = budget_bytes(Manifest.load(packed.store), which)
    streaming = open_model(ModelOptions(store=packed.store, ram_budget=budget))
    try:
        run = _run(streaming.model, streaming.tokenizer, prompt)
        stats = streaming.cache.stats
        if stats.peak_bytes > budget or stats.misses == 0:
            raise AssertionError(f"{packed.arch}: cache peak {stats.peak_bytes} of {budget} B, {stats.misses} misses")
    finally:
        streaming.close()
    return run


TABLE_START = "<!-- architecture table: `python -m bench.arch_table` writes between these lines -->"
TABLE_END = "<!-- end of architecture table -->"
EXACT = "exact"


def expected_statuses() -> dict[str, str]:
    """What the table must say of each MoE model file: exact (its tests pass), or refused / not
    checked and why."""
    explained = {
        **{a: f"refused: {r}" for a, r in REFUSED.items()},
        **{a: f"not checked: {r}" for a, r in NOT_CHECKED.items()},
    }
    return {arch: explained.get(arch, EXACT) for arch in moe_model_files()}


def render_table(statuses: dict[str, str], banks: dict[str, str], *, mlx_lm_version: str) -> str:
    """The markdown table of docs/store.md: one row per MoE model file."""
    count = {word: sum(s.startswith(word) for s in statuses.values()) for word in (EXACT, "refused", "not checked")}
    other = len(statuses) - sum(count.values())
    lines = [
        TABLE_START,
        f"mlx-lm {mlx_lm_version}: {len(statuses)} model files with routed experts: "
        + ", ".join(f"{n} {word}" for word, n in count.items())
        + (f", {other} failing" if other else "")
        + ".",
        "",
        "| model file | status | routed experts (as found by `pack`) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{arch}` | {statuses[arch]} | {banks.get(arch, '')} |" for arch in sorted(statuses)]
    return "\n".join([*lines, TABLE_END])


def table_in(text: str) -> dict[str, str]:
    """model file -> status, as the table in a docs/store.md text states them."""
    block = text[text.index(TABLE_START) : text.index(TABLE_END)]
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| `")]
    return {cells[0].strip("| `"): cells[1] for cells in rows}
