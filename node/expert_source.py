"""Where a node's expert weights come from: a flash store (or shard) or an iPhone bundle.

`ExpertSource` is what the node's cache and compute need of either; `open_expert_source` is the
one place that picks the implementation. Both read whole aligned records with several preads in
flight and verify each record's checksum; they differ in the record layout and in how a record
becomes the arrays mlx-lm's expert modules (`templates()`) compute with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from flashmesh.node.bundle_format import is_bundle
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.node.read_queue import Load
from flashmesh.node.slab import Slab
from flashmesh.node.store_format import LayerSpec, Manifest
from flashmesh.node.store_reader import ExpertStore, PendingRead, ReadStats
from flashmesh.protos.errors import UserError

READERS = {"aio": "AIO", "threads": "threads"}  # `ExpertSource.reader` -> what tables say


def reader_label(reader: str) -> str:
    """A reader as tables name it; "unknown" for a node that does not say (one from before NodeInfo.flash_reader)."""
    return READERS.get(reader, "unknown")


class ExpertSource(Protocol):
    path: Path
    manifest: Manifest  # config, fingerprint, top-k; layers as the cache holds them (payload = RAM bytes)
    queue_depth: int
    bypassing_cache: bool
    stats: ReadStats

    @property
    def reader(self) -> str:
        """What reads records into slab slots: "aio" (Linux AIO on O_DIRECT files) or "threads"."""
        ...

    def layer(self, layer: int) -> LayerSpec: ...

    def record_bytes(self, layer: int) -> int:
        """Bytes one record of `layer` takes on flash (what a read of it costs)."""
        ...

    def submit(self, layer: int, experts: list[int]) -> PendingRead:
        """Start reading whole records; the arrays are made on the caller's thread by `result()`."""
        ...

    def read(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]: ...

    def load(self, layer: int, slots: dict[int, int], slab: Slab, *, urgent: bool) -> Load:
        """Start reading records into reserved slab slots (expert -> slot); `wait()` on the result."""
        ...

    def landed(self, reads: Load) -> None:
        """Count a finished load in `stats`."""
        ...

    def read_raw(self, layer: int, expert: int) -> bytes:
        """One record's bytes on flash, checksum verified."""
        ...

    def templates(self) -> dict[int, nn.Module]:
        """layer -> the routed-expert module that computes with this source's arrays."""
        ...

    def close(self) -> None: ...


def open_expert_source(
    path: Path, *, bundle: bool = False, page_cache: bool = False, verify: bool = True, shard: dict | None = None
) -> ExpertSource:
    """A store (`flashmesh pack` / `shard`) or, with `bundle`, an iOS bundle (`flashmesh export-ios`), of
    which `shard` ({"index", "count", "replicas"}) picks the experts `flashmesh shard` would."""
    path = Path(path)
    if bundle:
        return BundleExpertSource(path, page_cache=page_cache, verify=verify, shard=shard)
    if shard is not None:
        raise UserError("serving a shard of a store needs `flashmesh shard` first; --count/--index go with --bundle")
    if is_bundle(path):
        raise UserError(f"{path} is an iOS bundle, not a store; serve it with `flashmesh node serve --bundle {path}`")
    return ExpertStore(path, page_cache=page_cache, verify=verify)
