"""The prompt cache's bounds (coordinator/api/prompt_cache.py over mlx-lm's LRUPromptCache): at most
`max_entries` sequences and `max_bytes` of KV arrays, least recently used out first; a prompt that
extends a stored sequence computes only its new tokens. (Served end to end: test_serve_api.py.)"""

from __future__ import annotations

import mlx.core as mx
from flashmesh.coordinator.api.prompt_cache import PromptCache
from mlx_lm.models.cache import KVCache

TOKENS = 10


def kv() -> list[KVCache]:
    """One layer's KV cache holding TOKENS positions."""
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, TOKENS, 16)), mx.zeros((1, 2, TOKENS, 16)))
    return [cache]


def conversation(i: int) -> list[int]:
    return [100 * i + t for t in range(TOKENS)]


def test_at_most_max_entries_least_recently_used_out_first():
    cache = PromptCache(max_entries=2, max_bytes=2**30)
    for i in range(3):
        cache.store(conversation(i), kv())
    assert len(cache) == 2
    assert cache.fetch(conversation(0) + [7]) == (None, conversation(0) + [7])  # evicted: all computed
    reused, rest = cache.fetch(conversation(2) + [7, 8])
    assert reused is not None and rest == [7, 8]  # only the new tokens
    assert cache.stats.hits == 1 and cache.stats.tokens_reused == TOKENS


def test_at_most_max_bytes():
    one = kv()[0].nbytes
    cache = PromptCache(max_entries=8, max_bytes=int(2.5 * one))
    for i in range(4):
        cache.store(conversation(i), kv())
    assert len(cache) == 2 and cache.nbytes <= 2.5 * one
    assert cache.fetch(conversation(1) + [7])[0] is None and cache.fetch(conversation(3) + [7])[0] is not None
