"""Byte sizes as people write and read them: --ram-budget 2GB in, 1.5GiB out."""

from __future__ import annotations

from flashmesh.protos.errors import UserError


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}".replace(".00", "")
        n /= 1024
    return f"{n}"


def parse_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5g', '1048576' -> bytes (GB = 10^9, GiB = 2^30; a bare G means GiB)."""
    units = {
        "": 1,
        "b": 1,
        "k": 1024,
        "kb": 1000,
        "kib": 1024,
        "m": 1024**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1024**3,
        "gb": 1000**3,
        "gib": 1024**3,
        "t": 1024**4,
        "tb": 1000**4,
        "tib": 1024**4,
    }
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a size; write it like 2GB, 512MiB or 1073741824") from None
    if unit not in units or value < 0:
        raise UserError(f"cannot read {text!r} as a size; write it like 2GB, 512MiB or 1073741824")
    return int(value * units[unit])
