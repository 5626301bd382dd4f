"""Run a model directory or hub id directly: it is packed into a store in the cache on first use
and that store is used from then on.

The cache is platformdirs' user cache directory (~/.cache/flashmesh/models on Linux,
~/Library/Caches/flashmesh/models on macOS; $FLASHMESH_CACHE_DIR overrides). A cached store is
named after its source and the source's fingerprint: an xxh3 of the source's resolved path, its
config.json and the name, size and modification time of every file in it. So a changed source is
packed again, and nothing is read but file metadata to tell. Packing is atomic (node.store_writer)
and runs under a lock, so two commands starting at once pack once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import platformdirs
import xxhash
from flashmesh.node.store_format import MANIFEST, write_json_atomic
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "FLASHMESH_CACHE_DIR"
SOURCE_FILE = "source.json"  # beside the manifest in a cached store: where it came from


def cache_root() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    root = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("flashmesh"))
    return root / "models"


def source_fingerprint(source: Path) -> str:
    """Identity of a model directory from its metadata (nothing of the weights is read)."""
    source = source.resolve()
    h = xxhash.xxh3_64()
    h.update(str(source).encode())
    h.update((source / "config.json").read_bytes())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        st = path.stat()  # follows the hub cache's symlinks to the blobs
        h.update(f"{path.relative_to(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _slug(text: str) -> str:
    name = text.rstrip("/").replace("/", "--") if not Path(text).expanduser().exists() else Path(text).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def model_name(arg: str | Path) -> str:
    """What a model is called (the served model id): a directory's name, or the hub id itself."""
    path = Path(arg).expanduser()
    return path.resolve().name if path.exists() else str(arg)


def resolve_model(arg: str | Path, *, show_progress: bool = False) -> Path:
    """A store to run for `arg`: a store itself, or the cached store of a model directory or hub id
    (packed now when there is none yet)."""
    path = Path(arg).expanduser()
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"{arg} is neither a flashmesh store nor a model directory (no manifest.json, no config.json); give a "
            "store written by `flashmesh pack`, a model directory or a hub id"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"{arg} is a file; give a store, a model directory or a hub id like org/name")
    from flashmesh.node.store_writer import pack, resolve_source

    source = resolve_source(str(arg))
    store = cache_root() / f"{_slug(str(arg))}-{source_fingerprint(source)[:12]}"
    if (store / MANIFEST).is_file():
        return store
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.parent / f".{store.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another command may be packing it: wait, then use its store
        if not (store / MANIFEST).is_file():
            log.warning("packing %s into %s (first use; later runs reuse it)", arg, store)
            manifest = pack(str(source), store, force=True, show_progress=show_progress)
            write_json_atomic(
                store / SOURCE_FILE,
                {"source": str(arg), "path": str(source.resolve()), "fingerprint": manifest.fingerprint,
                 "packed_at": time.time()},
            )  # fmt: skip
    return store


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cached_models() -> list[dict]:
    """Every store in the cache: name, source, bytes on disk, when it was packed."""
    root = cache_root()
    rows = []
    for store in sorted(root.iterdir()) if root.is_dir() else []:
        if store.name.startswith(".") or not (store / MANIFEST).is_file():
            continue
        try:
            meta = json.loads((store / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
        rows.append(
            {"name": store.name, "path": str(store), "source": meta.get("source", "?"), "bytes": _size(store),
             "packed_at": meta.get("packed_at")}
        )  # fmt: skip
    return rows


def remove_model(name: str) -> Path:
    root = cache_root()
    store = root / name
    if "/" in name or name.startswith(".") or not (store / MANIFEST).is_file():
        known = ", ".join(r["name"] for r in cached_models()) or "none"
        raise UserError(f"no cached model {name!r} (cached: {known}); see `flashmesh models`")
    doomed = root / f".{name}.removing-{os.getpid()}"
    store.rename(doomed)  # gone from the listing at once, even if removal is interrupted
    shutil.rmtree(doomed)
    (root / f".{name}.lock").unlink(missing_ok=True)
    return store
