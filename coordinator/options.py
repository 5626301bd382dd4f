"""How a model is opened: the options every command shares."""

from __future__ import annotations

import os

from flashmesh.node.store_format import Manifest


def default_budget(manifest: Manifest) -> int:
    """Without --ram-budget: every expert, but at most half of this machine's RAM (the slabs are
    allocated up front, so a budget above what the machine has would fail at start)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(manifest.expert_bytes_total, max(manifest.min_budget_bytes, physical // 2))
