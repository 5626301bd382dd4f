"""Subcommands added to `flashmesh` by this part of the project: export-ios, verify-bundle."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flashmesh.protos.errors import UserError
from rich.console import Console

err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's subcommands to the `flashmesh` parser."""
    p = sub.add_parser("export-ios", help="write an iPhone streaming bundle (Core ML programs + expert records)")
    p.set_defaults(func=cmd_export_ios)
    p.add_argument("store", type=Path, help="a flash store made by `flashmesh pack` (the full model)")
    p.add_argument("out", type=Path, help="the bundle directory to write, e.g. model.flashmesh-ios")
    p.add_argument(
        "--target", default="iOS18", choices=["iOS18", "iOS26"], help="minimum iOS (iOS26: int8 kernel inputs)"
    )
    p.add_argument("--chunks", type=int, default=None, help="dense packages to write (default: fewest under 1 GB)")
    p.add_argument("--context", type=int, default=2048, help="KV cache length in tokens")
    p.add_argument("--prefill", type=int, default=64, help="tokens per prefill call")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON summary")

    p = sub.add_parser("verify-bundle", help="check an iPhone bundle: structure, checksums, packages, weights")
    p.set_defaults(func=cmd_verify_bundle)
    p.add_argument("bundle", type=Path)
    p.add_argument("--store", type=Path, default=None, help="also compare every weight with this store, bit for bit")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_export_ios(args) -> int:
    from flashmesh.mobile_export.exporter import export_ios

    start = time.perf_counter()
    manifest = export_ios(
        args.store,
        args.out,
        target=args.target,
        chunks=args.chunks,
        context=args.context,
        prefill=args.prefill,
        force=args.force,
        show_progress=sys.stderr.isatty() and not args.json,
    )
    summary = {
        "bundle": str(args.out),
        "target": args.target,
        "seconds": round(time.perf_counter() - start, 2),
        "bytes": _dir_bytes(args.out),
        "packages": [p["path"] for p in manifest["coreml"]["packages"]] + [manifest["coreml"]["kernel"]["path"]],
        "expert_input": manifest["quantization"]["expert_input"],
        "bytes_per_token": manifest["bytes_per_token"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        err.print(
            f"wrote {summary['bundle']} ({summary['bytes'] / 1e6:.1f} MB, {len(summary['packages'])} packages) in "
            f"{summary['seconds']} s; experts reach the kernel as {summary['expert_input']}, "
            f"{manifest['bytes_per_token']['this_bundle_records'] / 1e6:.2f} MB of records per token uncached"
        )
    return 0


def cmd_verify_bundle(args) -> int:
    from flashmesh.mobile_export.verify import verify_bundle

    if not args.bundle.is_dir():
        raise UserError(f"{args.bundle} is not a directory; give the bundle written by `flashmesh export-ios`")
    report = verify_bundle(args.bundle, store=args.store)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for what, n in report.checks.items():
            err.print(f"ok  {n:6d}  {what}", highlight=False)
        for e in report.errors:
            err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        if report.ok:
            err.print(f"{args.bundle}: bundle verified", highlight=False)
    return 0 if report.ok else 2
