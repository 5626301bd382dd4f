"""Devices the planner knows by name: unified memory and memory bandwidth as Apple publishes them,
SSD / flash sequential-read bandwidth as reviewers have measured it (Apple publishes none), so
these are approximate. Sources, as plain text, in docs/plan.md. `compute` is memory bandwidth x
COMPUTE_EFFICIENCY (planner.py): decode multiplies each weight once per token."""

from __future__ import annotations

from flashmesh.coordinator.planner import COMPUTE_EFFICIENCY, Device
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import parse_bytes

GB = 10**9

# name: (unified memory GB, flash read GB/s, memory bandwidth GB/s, share of RAM an app may use)
PRESETS: dict[str, tuple[float, float, float, float]] = {
    "mac-mini-m4-32": (32, 3.0, 120, 0.75),
    "mac-mini-m4pro-64": (64, 5.0, 273, 0.75),
    "mbp-m2max-96": (96, 5.5, 400, 0.75),
    "mbp-m3max-48": (48, 6.0, 400, 0.75),
    "mbp-m3max-128": (128, 6.0, 400, 0.75),
    "mbp-m4max-128": (128, 7.0, 546, 0.75),
    "studio-m2ultra-192": (192, 6.0, 800, 0.75),
    "studio-m3ultra-512": (512, 6.0, 819, 0.75),
    "iphone-15-pro": (8, 1.5, 51.2, 0.5),
    "iphone-16-pro": (8, 1.6, 60, 0.5),
    "iphone-17-pro": (12, 2.0, 76.8, 0.5),
}


def preset(name: str, *, as_name: str | None = None) -> Device:
    try:
        ram, flash, bandwidth, usable = PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise UserError(f"no device preset {name!r}; presets: {known} (or NAME:RAM:FLASH_GBPS[:COMPUTE])") from None
    return Device(as_name or name, int(ram * GB), flash, bandwidth * COMPUTE_EFFICIENCY, usable_ram=usable)


def parse_device(text: str) -> Device:
    """PRESET, NAME=PRESET, or NAME:RAM:FLASH_GBPS[:COMPUTE_GBPS] (RAM like 48GB; COMPUTE default 100)."""
    if "=" in text:
        name, _, which = text.partition("=")
        return preset(which, as_name=name)
    if ":" not in text:
        return preset(text)
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise UserError(f"cannot read device {text!r}; write NAME:RAM:FLASH_GBPS[:COMPUTE_GBPS], e.g. studio:192GB:6")
    try:
        flash = float(parts[2])
        compute = float(parts[3]) if len(parts) == 4 else 100.0
    except ValueError:
        raise UserError(f"cannot read device {text!r}: FLASH_GBPS and COMPUTE_GBPS are numbers (GB/s)") from None
    if flash <= 0 or compute <= 0:
        raise UserError(f"device {text!r}: bandwidths must be above 0")
    return Device(parts[0], parse_bytes(parts[1]), flash, compute)
