"""Expected expert-cache hit rate at a RAM budget, before anything runs.

Model (stated so it can be checked): tokens route independently, layer by layer; within a layer
expert popularity is p_i (measured counts when given, else a Zipf law p_i ~ i^-s over the E
experts); a token uses its layer's k experts. The cache is LRU over (layer, expert) records, and
its hit rate is Che's approximation: with every record requested at rate r_j = k p_j per token,
the characteristic time T solves sum_j (1 - exp(-r_j T)) = C (C records fit) and
h = sum_j r_j (1 - exp(-r_j T)) / sum_j r_j. Where C is below one token's k x layers records, the
engine evicts cyclically (node/cache.py) and keeps what the next layers need soonest: then
h = C / (k L) x the expected share of a layer's experts a token reuses from the token before.

The default exponent s = ZIPF_S was fitted to one published figure: flash-moe's 71% page-cache hit
rate with ~35 GB of cache for Qwen3.5-397B-A17B 4-bit's 203 GB of experts at k=4 (docs/plan.md).
Measured routing replaces it: `flashmesh plan --routing FILE`, FILE JSON {"expert_counts":
[[count per expert] per MoE layer]} (any generation's), or {"hit_rate_curve": [[fraction of
experts cached, hit rate], ...]} (e.g. the routing benchmark's curve of the engine's policy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flashmesh.protos.errors import UserError

ZIPF_S = 1.1


@dataclass(frozen=True)
class Routing:
    """Popularity per MoE layer ([L] arrays summing to 1), or a measured curve of hit rate vs fraction cached."""

    popularity: list[np.ndarray] | None = None
    curve: tuple[tuple[float, float], ...] | None = None
    source: str = f"Zipf popularity, s={ZIPF_S}"

    @classmethod
    def zipf(cls, num_experts: int, layers: int, s: float = ZIPF_S) -> Routing:
        p = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
        return cls(popularity=[p / p.sum()] * layers, source=f"Zipf popularity, s={s:g}")

    @classmethod
    def load(cls, path: Path) -> Routing:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read routing statistics {path} ({e})") from None
        if "expert_counts" in data:
            pops = [np.asarray(c, dtype=np.float64) for c in data["expert_counts"]]
            if not pops or any(p.sum() <= 0 for p in pops):
                raise UserError(f"{path}: expert_counts needs one non-zero list of counts per MoE layer")
            return cls(popularity=[p / p.sum() for p in pops], source=f"measured expert counts ({path})")
        if "hit_rate_curve" in data:
            points = tuple(sorted((float(f), float(h)) for f, h in data["hit_rate_curve"]))
            return cls(curve=((0.0, 0.0), *points, (1.0, 1.0)), source=f"measured hit-rate curve ({path})")
        raise UserError(f"{path} holds neither expert_counts nor hit_rate_curve")


def _che(rates: np.ndarray, capacity: float) -> float:
    """LRU hit rate for independent requests at `rates` with `capacity` slots (Che's approximation)."""
    rates = rates[rates > 0]  # records never asked for take no room
    if capacity >= len(rates):
        return 1.0
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-rates * hi)) < capacity:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-rates * mid)) < capacity else (lo, mid)
    return float(np.sum(rates * (1 - np.exp(-rates * lo))) / np.sum(rates))


def hit_rate(routing: Routing, *, capacity: int, top_k: int, share: list[np.ndarray] | None = None) -> float:
    """Expected hit rate of a cache of `capacity` records over the experts selected by `share`
    (per layer, a boolean mask of the experts this cache serves; None: all of them)."""
    if routing.curve is not None:
        total = sum(int(m.sum()) for m in share) if share is not None else None
        if total is None:
            raise UserError("a hit-rate curve needs the number of experts served")
        xs, ys = zip(*routing.curve, strict=True)
        return float(np.interp(min(1.0, capacity / total), xs, ys))
    pops = routing.popularity
    masks = share or [np.ones(len(p), dtype=bool) for p in pops]
    rates = np.concatenate([top_k * p[m] for p, m in zip(pops, masks, strict=True)])  # requests per token
    if rates.sum() <= 0:
        return 1.0
    per_token = rates.sum()  # records this cache is asked for per token
    if capacity >= per_token:
        return _che(rates, capacity)
    # Cyclic regime: keeps C of the records the next layers need; each is reused with the layer's overlap.
    reuse = [np.sum(np.minimum(1.0, top_k * p[m]) ** 2) / max(1e-12, np.sum(top_k * p[m])) for p, m in
             zip(pops, masks, strict=True)]  # fmt: skip
    return float(capacity / per_token * np.mean(reuse))
