"""export-ios at a real size: build (once) a qwen3_moe-shaped model of >= 10 GB, pack it, export the
iPhone bundle, verify it (alone and against the store); each step a separate process under
`/usr/bin/time -v`, so its wall time and peak RSS are the process's own.

    python -m bench.export_big /work/fmbig10            # -> bench/results/export-ios-big.json

The source is written layer by layer (bench/bigsource.py) and is reused when present, as is the store.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from bench.cli import write_result

err = Console(stderr=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; return its wall seconds, peak RSS and stdout."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    log.write_text(proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-25:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    return {"command": " ".join(cmd), "wall_seconds": round(3600 * h + 60 * m + s, 2), "peak_rss_bytes": rss,
            "stdout": proc.stdout}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--expert-hidden", type=int, default=896)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--target", default="iOS18", choices=["iOS18", "iOS26"])
    p.add_argument("--name", default="export-ios-big")
    args = p.parse_args()
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    flashmesh = [py, "-m", "flashmesh.coordinator.cli"]
    src, store, bundle = work / "src", work / "store", work / "big.flashmesh-ios"
    steps = {}
    if not (src / "config.json").is_file():
        err.print(f"building the source model in {src}")
        shape = ["--layers", str(args.layers), "--experts", str(args.experts)]
        shape += ["--expert-hidden", str(args.expert_hidden), "--hidden", str(args.hidden)]
        steps["build_source"] = timed([py, "-m", "bench.bigsource", str(src), *shape], work / "logs/build.time")
    if not (store / "manifest.json").is_file():
        err.print(f"packing {src} into {store}")
        steps["pack"] = timed([*flashmesh, "pack", str(src), str(store)], work / "logs/pack.time")
    err.print(f"exporting {store} to {bundle}")
    steps["export"] = timed(
        [*flashmesh, "export-ios", str(store), str(bundle), "--force", "--json", "--target", args.target],
        work / "logs/export.time",
    )
    err.print("verifying the bundle")
    steps["verify"] = timed([*flashmesh, "verify-bundle", str(bundle), "--json"], work / "logs/verify.time")
    err.print("verifying the bundle against the store")
    steps["verify_with_store"] = timed(
        [*flashmesh, "verify-bundle", str(bundle), "--store", str(store), "--json"], work / "logs/verify_store.time"
    )
    summary = json.loads(steps["export"].pop("stdout"))
    reports = {k: json.loads(steps[k].pop("stdout")) for k in ("verify", "verify_with_store")}
    for step in steps.values():
        step.pop("stdout", None)
    config = json.loads((src / "config.json").read_text())
    result = {
        "model": {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "moe_intermediate_size")}
        | {"experts": config["num_experts"], "top_k": config["num_experts_per_tok"], "dtype": "float32"},
        "source_bytes": _dir_bytes(src),
        "store_bytes": _dir_bytes(store),
        "bundle_bytes": _dir_bytes(bundle),
        "expert_record_bytes": sum(p.stat().st_size for p in (bundle / "experts").iterdir()),
        "target": args.target,
        "expert_input": summary["expert_input"],
        "export_seconds_in_process": summary["seconds"],
        "bytes_per_token": summary["bytes_per_token"],
        "verify_ok": all(r["ok"] for r in reports.values()),
        "verify_checks": reports["verify_with_store"]["checks"],
        "steps": steps,
    }
    path = write_result(args.name, result)
    print(json.dumps(result, indent=1))
    err.print(f"written to {path}")


if __name__ == "__main__":
    main()
