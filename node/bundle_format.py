"""The iPhone bundle's directory and manifest, as far as a node serving its records needs them.

A bundle is a directory `NAME.flashmesh-ios` (written by `flashmesh export-ios`, mobile_export):
  manifest.json            everything the app needs (see docs/ios.md), with per-section checksums
  coreml/*.mlpackage       dense segments (multifunction decode/prefill, stateful KV) and the expert kernel
  experts/layer_XXX.bin    one record per expert, RECORD_ALIGN aligned, laid out as the kernel's inputs
  embeddings.bin           the token embedding table, fp16 [vocab, hidden], one pread per token row
  tokenizer files          copied from the store

Its `protocol_version` is the node protocol (protos.PROTOCOL_VERSION) the bundle's app speaks.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashmesh.node.store_format import LayerSpec, checksum, write_json_atomic
from flashmesh.protos.errors import UserError

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
PROJ = ("gate_proj", "up_proj", "down_proj")  # the expert's projections, in record and kernel order


def is_bundle(path: Path) -> bool:
    """A directory written by `flashmesh export-ios` (its manifest names a bundle format)."""
    try:
        return "bundle_format" in json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


def section_checksums(manifest: dict) -> dict[str, str]:
    """One checksum per top-level manifest section, so an edit is reported by section name."""
    return {
        k: checksum(json.dumps(v, sort_keys=True).encode()) for k, v in manifest.items() if k != "section_checksums"
    }


def edited_sections(manifest: dict) -> list[str]:
    """Top-level sections changed, added or removed since the export (their checksums disagree);
    ["section_checksums"] when those are damaged themselves."""
    stored = manifest.get("section_checksums")
    if not isinstance(stored, dict):
        return ["section_checksums"]
    computed = section_checksums(manifest)
    return sorted(k for k in set(stored) | set(computed) if stored.get(k) != computed.get(k))


def save_manifest(directory: Path, manifest: dict) -> None:
    write_json_atomic(Path(directory) / MANIFEST, {**manifest, "section_checksums": section_checksums(manifest)})


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory} is not a flashmesh iOS bundle (no {MANIFEST}); create one with `flashmesh export-ios`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("bundle_format") != BUNDLE_FORMAT:
        got = manifest.get("bundle_format") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: bundle format {got}, this flashmesh reads {BUNDLE_FORMAT}; re-export the bundle")
    return manifest


def layer_specs(manifest: dict) -> dict[int, LayerSpec]:
    """layer -> the table of its records on flash (size, offsets, checksums, tensors as stored)."""
    return {d["layer"]: LayerSpec.from_json(d) for d in manifest["layers"]}
