"""`python -m bench io-footprint`: how much of fio's rate is its buffers, on this machine's disk.

fio's libaio engine reads into its `iodepth` buffers over and over. A reader that lands records in
a cache's slots writes to many more, and on a VM's virtual disk the destination's footprint can
change the rate, as do the pages under it (one segment per 4 KiB page, or per huge page). This
alternates, at one queue depth: fio; the same libaio loop in C (bench/aio_loop.c, compiled here)
into fio's footprint (`queue_depth` buffers), into the engine's (`bench io`'s slots) in 4 KiB pages
and in huge pages, and into 512 buffers; and the engine itself (`bench io`'s continuous side, its
slots in huge pages where Linux has them). Each figure is over the fio trial of its round, median
over rounds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from textwrap import fill

import numpy as np
from flashmesh.protos.errors import UserError

from bench.io import engine_randread, engine_slots, fio_randread, largest_layer, save_fio_ratio_plot

LOOP_SOURCE = Path(__file__).with_name("aio_loop.c")


def build_loop(out_dir: Path) -> Path:
    """bench/aio_loop.c compiled into `out_dir` (cc, Linux)."""
    cc = shutil.which("cc")
    if cc is None:
        raise UserError("io-footprint compiles bench/aio_loop.c: install a C compiler (cc) and re-run")
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "aio_loop"
    built = out_dir / "aio_loop.building"
    subprocess.run([cc, "-O2", "-o", str(built), str(LOOP_SOURCE)], check=True, capture_output=True)
    built.replace(binary)
    return binary


def loop_randread(
    binary: Path,
    path: Path,
    *,
    record: int,
    records: int,
    queue_depth: int,
    buffers: int,
    seconds: float,
    huge_pages: bool = False,
) -> float:
    """GB/s of bench/aio_loop.c: fio's loop, landing in `buffers` buffers in turn (4 KiB or huge pages)."""
    pages = "huge" if huge_pages else "4k"
    out = subprocess.run(
        [str(binary), str(path), str(record), str(records), str(queue_depth), str(buffers), str(seconds), pages],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout)


def run_footprint_bench(
    store_path: Path,
    *,
    out_dir: Path,
    queue_depth: int = 8,
    seconds: float = 1.0,
    rounds: int = 7,
    cache_buffers: int = 512,
) -> dict:
    """fio, the C loop at three footprints and the engine, alternating, at one queue depth."""
    manifest, spec, path = largest_layer(store_path)
    records = len(spec.experts)
    slots = engine_slots(manifest, spec, queue_depth)
    loop = build_loop(out_dir)
    footprints = {  # name -> (buffers, huge pages)
        "loop_fio_footprint": (queue_depth, False),
        "loop_engine_footprint": (slots, False),
        "loop_engine_footprint_huge": (slots, True),
        "loop_cache_footprint": (cache_buffers, False),
    }
    trials: dict[str, list[float]] = {"fio": [], **{k: [] for k in footprints}, "engine": []}
    for r in range(rounds):
        trials["fio"].append(
            fio_randread(
                path, block=spec.record_size, queue_depth=queue_depth, seconds=seconds, size=records * spec.record_size
            )
        )
        for name, (buffers, huge) in footprints.items():
            trials[name].append(
                loop_randread(
                    loop,
                    path,
                    record=spec.record_size,
                    records=records,
                    queue_depth=queue_depth,
                    buffers=buffers,
                    seconds=seconds,
                    huge_pages=huge,
                )  # fmt: skip
            )
        trials["engine"].append(
            engine_randread(store_path, spec.layer, queue_depth=queue_depth, seconds=seconds, verify=True, seed=r)
        )
    ratios = {k: float(np.median([x / f for x, f in zip(v, trials["fio"], strict=True)])) for k, v in trials.items()}
    return {
        "bench": "io-footprint",
        "store": str(store_path),
        "file": str(path),
        "record_bytes": spec.record_size,
        "queue_depth": queue_depth,
        "rounds": rounds,
        "seconds_per_trial": seconds,
        "buffers": {"fio": queue_depth, **{k: b for k, (b, _) in footprints.items()}, "engine": slots},
        "huge_pages": {"fio": False, **{k: h for k, (_, h) in footprints.items()}, "engine": True},
        "trials_gbps": {k: [round(x, 4) for x in v] for k, v in trials.items()},
        "ratio_to_fio": {k: round(v, 4) for k, v in ratios.items()},
        "engine_over_loop_at_its_footprint": round(ratios["engine"] / ratios["loop_engine_footprint_huge"], 4),
    }


def plot_footprint(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, buffers = result["ratio_to_fio"], result["buffers"]
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = ["gray" if n == "fio" else "C1" if n == "engine" else "C2" if n.endswith("huge") else "C0" for n in names]
    ax.bar(range(len(names)), [ratios[n] for n in names], color=colors)
    labels = [f"{fill(n.replace('_', ' '), 16)}\n{buffers[n]} buffers" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=6)
    title = (
        f"{result['record_bytes'] // 1024} KiB records, queue depth {result['queue_depth']}, "
        f"{result['rounds']} alternating rounds"
    )
    return save_fio_ratio_plot(fig, ax, title, path)
