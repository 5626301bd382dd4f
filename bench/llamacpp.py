"""llama.cpp (llama-cpp-python) greedy decode of the same weights as GGUF, for the oversubscription
benchmark: runs as a child inside the memory cgroup, from the same prompt token ids as our engine.

llama.cpp maps the GGUF (mmap, no mlock) and lets the kernel page experts in and out within the
cgroup's limit: that is what a user gets who points llama.cpp at a model larger than RAM.
The prompt goes in as token ids (not text) so that both engines decode from identical input.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def llama_cpp_decode(gguf: Path, *, prompt_ids: list[int], max_tokens: int, eos_ids: list[int], prompt: str) -> dict:
    """Greedy: argmax of llama.cpp's logits, one token at a time; timings like coordinator.generate."""
    from llama_cpp import GGML_TYPE_F32, Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=max(256, len(prompt_ids) + max_tokens + 8),
        n_threads=os.cpu_count(),
        n_threads_batch=os.cpu_count(),
        use_mmap=True,
        use_mlock=False,
        logits_all=True,  # keeps every position's logits in llm.scores (vocab is small)
        # fp32 KV cache like MLX's for an fp32 model: llama.cpp's default f16 cache moves logits by ~2%
        # of their scale on the synthetic model, enough to flip near-tied greedy picks
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    own_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    tokens: list[int] = []
    start = time.perf_counter()
    llm.eval(prompt_ids)
    first_at = None
    while True:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if first_at is None:
            first_at = time.perf_counter()
            read_at_first = _read_bytes()
        tokens.append(token)
        if token in eos_ids or len(tokens) == max_tokens:
            break
        llm.eval([token])
    end = time.perf_counter()
    read_in_decode = _read_bytes() - read_at_first
    llm.close()
    return {
        "tokens": tokens,
        "load_s": load_s,
        "ttft_s": first_at - start,
        "decode_tokens_per_s": (len(tokens) - 1) / (end - first_at) if end > first_at else 0.0,
        "llama_cpp_tokenizes_prompt_alike": own_ids == prompt_ids,
        "gguf_bytes": Path(gguf).stat().st_size,
        "kv_cache_type": "f32",
        # bytes this process had the kernel read from storage (page faults on the mapping), per decode step
        "disk_read_bytes_per_token": read_in_decode / max(1, len(tokens) - 1),
    }
