"""Building a streaming model from a store: mlx-lm's class, dense weights only, experts dispatched.

`open_local` is the embedded default: the experts are computed in this process from the store's
flash records through the expert cache. The distributed path swaps the backend, nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmesh.coordinator.dispatch import ExpertBackend, bind_backend, install_dispatch
from flashmesh.node.cache import ExpertCache
from flashmesh.node.compute import LocalExperts
from flashmesh.node.experts import load_lazy
from flashmesh.node.store_check import dense_keys, dense_mismatch
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.node.tls import TlsIdentity
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class StreamingModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    manifest: Manifest
    backend: ExpertBackend
    cache: ExpertCache | None = None  # the local cache, when experts run in this process
    store: ExpertStore | None = None

    def close(self) -> None:
        close_backend = getattr(self.backend, "close", None)
        if close_backend is not None:
            close_backend()
        if self.store is not None:
            self.store.close()


def load_dense_model(store_path: Path) -> tuple[nn.Module, Manifest, dict[int, nn.Module]]:
    """mlx-lm's model for the store with dense weights loaded and every routed-expert bank the
    manifest names swapped for a dispatch (no backend yet: `attach` binds one); return it, the
    manifest and layer -> the module that computes that layer's experts."""
    store_path = Path(store_path)
    manifest = Manifest.load(store_path)
    model, _ = load_lazy(store_path, strict=False)
    templates = install_dispatch(model, manifest.layers)
    wanted = {k for k, _ in tree_flatten(model.parameters())}
    missing, _ = dense_mismatch(wanted, dense_keys(store_path, manifest))
    if missing:
        raise UserError(
            f"{store_path} lacks dense weights ({missing[0]} and {len(missing) - 1} more); re-run `flashmesh pack`"
        )
    return model, manifest, templates


def attach(model: nn.Module, backend: ExpertBackend, *, lookahead: bool = False) -> None:
    """Bind the backend to the model's dispatches, then read the dense weights."""
    bind_backend(model, backend, lookahead=lookahead)
    mx.eval(model.parameters())


def load_store_tokenizer(store_path: Path, manifest: Manifest) -> TokenizerWrapper:
    from huggingface_hub.errors import StrictDataclassError

    try:
        return load_tokenizer(Path(store_path), eos_token_ids=manifest.config.get("eos_token_id"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        raise UserError(
            f"{store_path} has no usable tokenizer ({e}); pack from a directory with tokenizer files"
        ) from None


def open_local(
    store_path: Path,
    *,
    ram_budget: int,
    page_cache: bool = False,
    verify: bool = True,
    queue_depth: int = 8,
    lookahead: bool = False,
    preload: bool = False,
) -> StreamingModel:
    """The embedded default: dense part in RAM, experts streamed from this store in-process."""
    store_path = Path(store_path)
    model, manifest, templates = load_dense_model(store_path)
    if manifest.shard is not None:
        raise UserError(
            f"{store_path} is a shard ({manifest.shard}); run the full store, or serve shards "
            "as nodes and run with --cluster"
        )
    store = ExpertStore(store_path, page_cache=page_cache, verify=verify, queue_depth=queue_depth)
    try:
        cache = ExpertCache(store, budget_bytes=ram_budget)
    except UserError:
        store.close()
        raise
    backend = LocalExperts(cache, templates)
    attach(model, backend, lookahead=lookahead)
    if preload:
        cache.preload()
    tokenizer = load_store_tokenizer(store_path, manifest)
    return StreamingModel(model, tokenizer, manifest, backend, cache=cache, store=store)


def open_cluster(
    store_path: Path,
    addresses: list,
    *,
    token: str,
    timeout: float = 10.0,
    lookahead: bool = False,
    tls: TlsIdentity | None = None,
    rpc_deadline: float | None = None,
    probe_backoff: float = 0.5,
    watcher=None,
    hedge=None,
) -> tuple[StreamingModel, list]:
    """Dense part in RAM (a full store or a `flashmesh shard --dense` one), experts on the nodes at
    `addresses` (coordinator.discovery.NodeAddress), over mutual TLS with `tls`; return the model
    and the connected nodes. `rpc_deadline`: least seconds a node gets per request before its work
    fails over (None: default). `watcher` (coordinator.node_watch.NodeWatcher, owned by the caller):
    a node that announces itself at a new address is reconnected there. `hedge`: a
    coordinator.failover.Hedge (None: the default policy)."""
    from flashmesh.coordinator.cluster import connect, relinker
    from flashmesh.coordinator.placement import place
    from flashmesh.coordinator.remote import DEFAULT_RPC_DEADLINE, RemoteExperts

    store_path = Path(store_path)
    model, manifest, _ = load_dense_model(store_path)
    nodes = connect(addresses, token=token, fingerprint=manifest.fingerprint, timeout=timeout, tls=tls)
    try:
        placement = place(manifest.layers, [n.capacity() for n in nodes])
        backend = RemoteExperts(
            {n.node_id: n.client for n in nodes},
            placement,
            rpc_deadline=DEFAULT_RPC_DEADLINE if rpc_deadline is None else rpc_deadline,
            probe_backoff=probe_backoff,
            fingerprint=manifest.fingerprint,
            relink=None if watcher is None else relinker(nodes, watcher, token=token, tls=tls),
            hedge=hedge,
        )
        attach(model, backend, lookahead=lookahead)
        tokenizer = load_store_tokenizer(store_path, manifest)
    except BaseException:
        for n in nodes:
            n.client.close()
        raise
    return StreamingModel(model, tokenizer, manifest, backend), nodes
