"""Building a streaming model from a store: mlx-lm's class, dense weights only, experts dispatched.

`open_model` is the one way in. The embedded default computes the experts in this process from the
store's flash records through the expert cache; the distributed path swaps the backend, nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from flashmesh.coordinator.dispatch import ExpertBackend, bind_backend, install_dispatch
from flashmesh.coordinator.options import ModelOptions, default_budget, lookahead_pays
from flashmesh.node.cache import ExpertCache
from flashmesh.node.compute import LocalExperts
from flashmesh.node.experts import load_lazy
from flashmesh.node.store_check import dense_keys, dense_mismatch
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

if TYPE_CHECKING:  # the cluster side is imported only when a cluster is opened
    from flashmesh.coordinator.cluster import ConnectedNode
    from flashmesh.coordinator.remote import RemoteExperts

log = logging.getLogger(__name__)


@dataclass
class StreamingModel:
    """An open model (`open_model`): mlx-lm's model with its experts behind `backend`. The fields
    after `options` say where the experts run: `cache`/`store` in this process, `nodes`/`remote` on
    nodes (the connected nodes and the backend, for the figures only a cluster has)."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    manifest: Manifest
    backend: ExpertBackend
    options: ModelOptions
    lookahead: bool  # the router lookahead is on (options.lookahead, or what auto chose)
    cache: ExpertCache | None = None
    store: ExpertStore | None = None
    nodes: list[ConnectedNode] = field(default_factory=list)
    remote: RemoteExperts | None = None

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
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


def open_model(options: ModelOptions) -> StreamingModel:
    """The one way to open a model: mlx-lm's class with the store's dense weights, its routed experts
    dispatched to this process (the embedded default) or, with `options.cluster`, to the nodes."""
    options.check()
    if options.cluster:
        return _open_on_nodes(options)
    return _open_here(options)


def _open_here(options: ModelOptions) -> StreamingModel:
    store_path = Path(options.store)
    model, manifest, templates = load_dense_model(store_path)
    if manifest.shard is not None:
        raise UserError(
            f"{store_path} is a shard ({manifest.shard}); run the full store, or serve shards "
            "as nodes and run with --cluster"
        )
    budget = default_budget(manifest) if options.ram_budget is None else options.ram_budget
    store = ExpertStore(
        store_path, page_cache=options.page_cache, verify=options.verify, queue_depth=options.queue_depth
    )
    try:
        cache = ExpertCache(store, budget_bytes=budget, huge_pages=options.huge_pages)
    except UserError:
        store.close()
        raise
    backend = LocalExperts(cache, templates)
    lookahead = lookahead_pays(manifest, budget) if options.lookahead is None else options.lookahead
    attach(model, backend, lookahead=lookahead)
    if options.preload:
        cache.preload()
    tokenizer = load_store_tokenizer(store_path, manifest)
    return StreamingModel(model, tokenizer, manifest, backend, options, lookahead, cache=cache, store=store)


def _open_on_nodes(options: ModelOptions) -> StreamingModel:
    """Dense part here (a full store or a `flashmesh shard --dense` one), experts on the nodes, over
    mutual TLS when `options.tls` names the coordinator's identity."""
    from flashmesh.coordinator.cluster import Relinker, connect, resolve_token
    from flashmesh.coordinator.discovery import find_nodes
    from flashmesh.coordinator.failover import Hedge
    from flashmesh.coordinator.node_watch import watch_nodes
    from flashmesh.coordinator.placement import place
    from flashmesh.coordinator.remote import RemoteExperts
    from flashmesh.node.tls import COORDINATOR, load_identity

    store_path = Path(options.store)
    token = resolve_token(options.token)
    tls = None if options.tls is None else load_identity(Path(options.tls), role=COORDINATOR)
    model, manifest, _ = load_dense_model(store_path)
    addresses = find_nodes(
        static=options.nodes,
        interfaces=options.zeroconf,
        timeout=options.discover_timeout,
        expect=options.expect,
        name_prefix=options.name_prefix,
        fingerprint=manifest.fingerprint,
    )
    nodes = connect(addresses, token=token, fingerprint=manifest.fingerprint, timeout=options.connect_timeout, tls=tls)
    relink = None
    try:
        if options.watch and options.zeroconf:  # a node that restarts elsewhere announces itself: reconnect there
            relink = Relinker(nodes, watch_nodes(options, manifest.fingerprint), token=token, tls=tls)
        placement = place(manifest.layers, [n.capacity() for n in nodes])
        backend = RemoteExperts(
            {n.node_id: n.client for n in nodes},
            placement,
            rpc_deadline=options.rpc_deadline,
            probe_backoff=options.probe_backoff,
            fingerprint=manifest.fingerprint,
            relink=relink,
            hedge=None if options.hedge else Hedge(enabled=False),
        )
        lookahead = lookahead_pays(manifest, None) if options.lookahead is None else options.lookahead
        attach(model, backend, lookahead=lookahead)
        tokenizer = load_store_tokenizer(store_path, manifest)
    except BaseException:
        if relink is not None:
            relink.close()
        for n in nodes:
            n.client.close()
        raise
    return StreamingModel(model, tokenizer, manifest, backend, options, lookahead, nodes=nodes, remote=backend)
