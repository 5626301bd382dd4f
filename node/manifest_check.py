"""The store manifest's shape, checked before anything trusts it: a field of the wrong type or an
impossible value (a tensor outside its record, checksums that do not match the experts) is one
line naming the field, not a crash somewhere later."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import PurePosixPath

from flashmesh.node.store_format import RECORD_ALIGN, LayerSpec, TensorSpec
from flashmesh.protos.codec import DTYPES
from flashmesh.protos.errors import UserError


class _Bad(Exception):
    pass


def _int(value, where: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Bad(f"{where} must be an integer >= {low}, not {value!r}")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"{where} must be a non-empty string, not {value!r}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise _Bad(f"{where} must be a list, not {value!r}")
    return value


def _relative(value, where: str) -> None:
    name = PurePosixPath(_str(value, where))
    if name.is_absolute() or ".." in name.parts:
        raise _Bad(f"{where} must be a path inside the store, not {value!r}")


def _keys(d, where: str, cls) -> None:
    if not isinstance(d, dict):
        raise _Bad(f"{where} must be an object")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise _Bad(f"{where} has fields this flashmesh does not know: {unknown}")


def _tensor(t, where: str, record_size: int) -> None:
    _keys(t, where, TensorSpec)
    _str(t.get("name"), f"{where}.name")
    if not isinstance(t.get("dtype"), str) or t["dtype"] not in DTYPES:
        raise _Bad(f"{where}.dtype must be one of {sorted(DTYPES)}, not {t.get('dtype')!r}")
    shape = [_int(s, f"{where}.shape", low=1) for s in _list(t.get("shape"), f"{where}.shape")]
    offset, nbytes = _int(t.get("offset"), f"{where}.offset"), _int(t.get("nbytes"), f"{where}.nbytes", low=1)
    if nbytes != math.prod(shape) * DTYPES[t["dtype"]][0].itemsize:
        raise _Bad(f"{where}.nbytes {nbytes} does not match its dtype and shape")
    if offset + nbytes > record_size:
        raise _Bad(f"{where} ends past its record ({offset} + {nbytes} > {record_size} bytes)")


def _layer(d, where: str) -> None:
    _keys(d, where, LayerSpec)
    _int(d.get("layer"), f"{where}.layer")
    for key in ("top_k", "input_dim"):
        if key in d:
            _int(d[key], f"{where}.{key}")
    if d.get("kind", "switch") not in ("switch", "list"):
        raise _Bad(f"{where}.kind must be 'switch' or 'list', not {d.get('kind')!r}")
    _str(d.get("module"), f"{where}.module")
    num = _int(d.get("num_experts"), f"{where}.num_experts", low=1)
    size = _int(d.get("record_size"), f"{where}.record_size", low=RECORD_ALIGN)
    if size % RECORD_ALIGN:
        raise _Bad(f"{where}.record_size must be a multiple of {RECORD_ALIGN}, not {size}")
    tensors = _list(d.get("tensors"), f"{where}.tensors")
    if not tensors:
        raise _Bad(f"{where}.tensors is empty")
    for i, t in enumerate(tensors):
        _tensor(t, f"{where}.tensors[{i}]", size)
    experts = [_int(e, f"{where}.experts") for e in _list(d.get("experts"), f"{where}.experts")]
    if len(set(experts)) != len(experts) or any(e >= num for e in experts):
        raise _Bad(f"{where}.experts must be distinct experts below num_experts {num}")
    checksums = _list(d.get("checksums"), f"{where}.checksums")
    if len(checksums) != len(experts) or not all(isinstance(c, str) for c in checksums):
        raise _Bad(f"{where}.checksums must be one string per held expert")
    if "file" in d:
        _relative(d["file"], f"{where}.file")


def check_manifest(d, path) -> None:
    """Raise UserError naming the first field of the manifest at `path` that cannot be right."""
    try:
        if not isinstance(d, dict):
            raise _Bad("it must be a JSON object")
        if not isinstance(d.get("config"), dict):
            raise _Bad("config must be an object")
        _str(d.get("fingerprint"), "fingerprint")
        for key in ("quantization", "shard"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise _Bad(f"{key} must be an object or null, not {d[key]!r}")
        for i, name in enumerate(_list(d.get("dense_files", []), "dense_files")):
            _relative(name, f"dense_files[{i}]")
        layers = _list(d.get("layers"), "layers")
        for i, layer in enumerate(layers):
            _layer(layer, f"layers[{i}]")
    except _Bad as e:
        raise UserError(f"{path} is damaged: {e}; re-run `flashmesh pack` (or re-copy the store)") from None
