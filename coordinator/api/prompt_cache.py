"""KV caches kept across requests (mlx-lm's LRUPromptCache, the one mlx_lm.server uses), so that a
conversation's next turn computes only the tokens after the prefix it shares with an earlier one."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache


@dataclass
class PromptCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    tokens_reused: int = 0


class PromptCache:
    """At most `max_entries` sequences and `max_bytes` of KV arrays (least recently used go first).
    Lives on the MLX thread: the caches are MLX arrays."""

    def __init__(self, *, max_entries: int, max_bytes: int, key: str = "model") -> None:
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._key = key
        self.stats = PromptCacheStats()

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)

    def fetch(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """(a copy of the cache of the longest stored prefix of `prompt` or None, the tokens still
        to compute: never empty, since the last prompt token must run to give the first logits)."""
        self.stats.lookups += 1
        cache, rest = self._lru.fetch_nearest_cache(self._key, list(prompt))
        if cache is not None and not rest:  # the whole prompt is cached: recompute its last token
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = list(prompt[-1:])
            else:
                cache, rest = None, list(prompt)
        if cache is None:
            return None, list(prompt)
        self.stats.hits += 1
        self.stats.tokens_reused += len(prompt) - len(rest)
        return cache, list(rest)

    def store(self, tokens: list[int], cache: list) -> None:
        """Keep `cache`, which holds exactly `tokens` (prompt and generated)."""
        if tokens and cache:
            self._lru.insert_cache(self._key, list(tokens), cache)
