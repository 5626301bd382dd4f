"""`flashmesh verify-bundle`: check a bundle as far as Linux can, naming the place of every problem.

Structure and manifest integrity (per-section checksums), every record 16 KiB aligned with its
checksum, embeddings checksum, every package reloads with coremltools (skip_model_load) declaring
the manifest's I/O, every weight const present; with `store=`, every record, const and embedding
row recomputed from the store and compared bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flashmesh.mobile_export.bundle_format import check_aligned
from flashmesh.mobile_export.records import convert_record, record_bytes
from flashmesh.mobile_export.saved import consts, load_saved_program
from flashmesh.node.bundle_format import MANIFEST, edited_sections, layer_specs, load_manifest, section_checksums
from flashmesh.node.store_format import RECORD_ALIGN, Manifest, checksum
from flashmesh.protos.errors import UserError


@dataclass
class Report:
    bundle: str
    checks: dict[str, int] = field(default_factory=dict)  # what was checked -> how many
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, what: str, n: int = 1) -> None:
        self.checks[what] = self.checks.get(what, 0) + n

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "checks": self.checks, "errors": self.errors}


def verify_bundle(bundle: Path, *, store: Path | None = None) -> Report:
    bundle = Path(bundle)
    report = Report(str(bundle))
    try:
        manifest = load_manifest(bundle)
    except UserError as e:
        report.errors.append(str(e))
        return report
    for section in edited_sections(manifest):
        report.errors.append(f"{MANIFEST}: section '{section}' was edited (checksum mismatch)")
    report.count("manifest sections", len(section_checksums(manifest)))
    if report.errors:
        return report  # nothing else can be trusted
    source = None
    if store is not None:
        source = Manifest.load(store)
        if source.fingerprint != manifest["store_fingerprint"]:
            report.errors.append(
                f"{store}: fingerprint {source.fingerprint} is not the bundle's store {manifest['store_fingerprint']}"
            )
            source = None
    for name in manifest["tokenizer"]:
        if not (bundle / name).is_file():
            report.errors.append(f"{name}: missing")
    _check_records(bundle, manifest, report, store if source else None, source)
    _check_embeddings(bundle, manifest, report, store if source else None, source)
    _check_packages(bundle, manifest, report, store if source else None, source)
    return report


def _check_records(bundle: Path, manifest: dict, report: Report, store, source) -> None:
    reader = None
    if store is not None:
        from flashmesh.node.store_reader import ExpertStore

        reader = ExpertStore(store, page_cache=True)
    quant = manifest["quantization"]
    try:
        for layer, spec in layer_specs(manifest).items():
            path = bundle / spec.file
            try:
                check_aligned(spec)
            except UserError as e:
                report.errors.append(f"{spec.file}: {e}")
                continue
            if not path.is_file():
                report.errors.append(f"{spec.file}: missing")
                continue
            size, expected = path.stat().st_size, len(spec.experts) * spec.record_size
            if size != expected:
                report.errors.append(
                    f"{spec.file}: {size} bytes, expected {expected} "
                    f"({len(spec.experts)} records of {spec.record_size}); truncated or padded"
                )
                continue
            for t in spec.tensors:
                if t.offset + t.nbytes > spec.record_size:
                    report.errors.append(f"{spec.file}: tensor {t.name} runs past the record end")
            fd = os.open(path, os.O_RDONLY)
            try:
                for i, e in enumerate(spec.experts):
                    offset = i * spec.record_size
                    data = os.pread(fd, spec.record_size, offset)
                    if offset % RECORD_ALIGN:
                        report.errors.append(f"{spec.file}: expert {e} record at offset {offset} is not aligned")
                    if checksum(data) != spec.checksums[i]:
                        report.errors.append(
                            f"{spec.file}: layer {layer} expert {e} record checksum mismatch at offset {offset}"
                        )
                        continue
                    report.count("records (aligned, checksum)")
                    if reader is not None:
                        src = source.layer(layer)
                        arrays = convert_record(
                            reader.read_raw(layer, e), src, mode=quant["expert_input"], bits=quant.get("bits")
                        )
                        if record_bytes(arrays, spec.tensors, spec.record_size) != data:
                            report.errors.append(f"{spec.file}: layer {layer} expert {e} differs from the store")
                        else:
                            report.count("records equal to the store, bit for bit")
            finally:
                os.close(fd)
    finally:
        if reader is not None:
            reader.close()


def _check_embeddings(bundle: Path, manifest: dict, report: Report, store, source) -> None:
    emb = manifest["embeddings"]
    path = bundle / emb["file"]
    if not path.is_file():
        report.errors.append(f"{emb['file']}: missing")
        return
    data = path.read_bytes()
    if checksum(data) != emb["checksum"]:
        report.errors.append(f"{emb['file']}: checksum mismatch ({len(data)} bytes)")
        return
    report.count("embedding table checksum")
    if store is not None:
        from flashmesh.mobile_export.weights import DenseWeights

        ref = DenseWeights(store, source).get("model.embed_tokens.weight").astype(np.float16)
        if ref.tobytes() != data:
            report.errors.append(f"{emb['file']}: differs from the store's model.embed_tokens.weight")
        else:
            report.count("embedding table equal to the store, bit for bit")


def _check_packages(bundle: Path, manifest: dict, report: Report, store, source) -> None:
    from flashmesh.mobile_export.programs import package_io

    dense = None
    if store is not None:
        from flashmesh.mobile_export.weights import DenseWeights

        dense = DenseWeights(store, source)
    packages = [*manifest["coreml"]["packages"], {**manifest["coreml"]["kernel"], "weights": {}}]
    for pkg in packages:
        rel = pkg["path"]
        if not (bundle / rel).is_dir():
            report.errors.append(f"{rel}: missing")
            continue
        damaged = False
        for name, digest in pkg.get("files", {}).items():
            path = bundle / rel / name
            if not path.is_file():
                report.errors.append(f"{rel}/{name}: missing")
                damaged = True
            elif checksum(path.read_bytes()) != digest:
                report.errors.append(f"{rel}/{name}: checksum mismatch")
                damaged = True
            else:
                report.count("package files (checksum)")
        if damaged:
            continue
        try:
            io = package_io(bundle / rel)
            program = load_saved_program(bundle / rel)
        except Exception as e:  # a damaged protobuf raises many types
            report.errors.append(
                f"{rel}: does not reload with coremltools ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            )
            continue
        report.count("packages reloaded")
        for fn, declared in pkg["functions"].items():
            if io.get(fn) != declared:
                report.errors.append(f"{rel}: function {fn} does not declare the manifest's inputs/outputs/states")
            else:
                report.count("functions with the manifest's I/O")
        values = consts(program)
        by_content = {
            checksum(np.ascontiguousarray(v).tobytes()): n for n, v in values.items() if isinstance(v, np.ndarray)
        }
        for name, w in pkg["weights"].items():
            found = name if name in values else by_content.get(w["checksum"])
            if found is None:
                report.errors.append(f"{rel}: weight {name} ({w['key']}) is missing")
                continue
            got = np.asarray(values[found])
            if checksum(np.ascontiguousarray(got).tobytes()) != w["checksum"]:
                report.errors.append(f"{rel}: weight {name} ({w['key']}) does not match its manifest checksum")
                continue
            if dense is not None:
                want = dense.get(w["key"]).astype(np.dtype(w["dtype"]))
                if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
                    report.errors.append(f"{rel}: weight {name} differs from the store's {w['key']}")
                    continue
                report.count("weights equal to the store, bit for bit")
            else:
                report.count("weights present with their checksum")
