"""`python -m bench io`: the store's fetch path against fio's random reads on the same file.

Both sides read whole records (the store's record size, 16 KiB aligned) at random record offsets of
the same layer file with the page cache bypassed (O_DIRECT), at several queue depths, in one run.
The figure of merit is the ratio engine / fio-best: absolute GB/s on a VM disk mean little.

The engine side is the store's fetch path exactly as the cache uses it (`ExpertStore.load`): Linux
AIO where it is built (node/aio_reads.py, `queue_depth` reads in flight), else reader threads (as
many as the queue depth), reading each record into a slab slot (or staging, then copied) and
checking its xxh3; `--reader threads` measures the threads where AIO is built. Records land in
turn in the slots of a slab the size of the store's cache (every expert of the layer's shape, at most
64 MiB, as the default budget holds them), in transparent huge pages where Linux has them as the
cache's are (node/huge_pages.py; `--pages small` for 4 KiB pages), faulted in before the clock.
`engine_gbps` keeps batches queued ahead so that every reader always has a record to read (reads in
flight across layer boundaries); `engine_sync_gbps` waits for each layer-sized batch before queueing
the next (a barrier per layer). fio reads into its own `iodepth` buffers of 4 KiB pages.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path

import numpy as np
from flashmesh.node.slab import Slab, signature
from flashmesh.node.store_format import LayerSpec, Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

QUEUE_DEPTHS = (1, 4, 8, 16, 32)


def ensure_fio() -> str:
    """Path of fio, installed with apt when missing (Debian/Ubuntu, as root)."""
    found = shutil.which("fio")
    if found:
        return found
    log.warning("fio is missing; installing it with apt-get")
    subprocess.run(["apt-get", "install", "-y", "fio"], check=False, capture_output=True)
    found = shutil.which("fio")
    if not found:
        raise UserError("fio is not installed and apt-get could not install it; install fio and re-run")
    return found


def fio_randread(path: Path, *, block: int, queue_depth: int, seconds: float, size: int) -> float:
    """fio random-read GB/s (O_DIRECT, libaio) at `block` bytes and `queue_depth`, on `path`."""
    cmd = [
        ensure_fio(),
        "--name=flashmesh",
        f"--filename={path}",
        "--rw=randread",
        f"--bs={block}",
        f"--size={size}",  # the records' span: offsets are multiples of bs, i.e. record starts
        "--direct=1",
        "--ioengine=libaio",
        f"--iodepth={queue_depth}",
        "--numjobs=1",
        f"--runtime={seconds}",
        "--time_based",
        "--randrepeat=0",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    return job["io_bytes"] / (job["runtime"] / 1000.0) / 1e9 if job["runtime"] else 0.0


def largest_layer(store_path: Path) -> tuple[Manifest, LayerSpec, Path]:
    """The store's manifest, the layer with the most record bytes (the one both sides read), its file."""
    manifest = Manifest.load(store_path)
    spec = max(manifest.layers, key=lambda s: len(s.experts) * s.record_size)
    return manifest, spec, Path(store_path) / spec.file


def records_ahead(queue_depth: int, batch: int) -> int:
    """Records `engine_randread` keeps queued beyond the batch it waits for."""
    return max(2 * queue_depth, batch)


def engine_window(queue_depth: int, batch: int) -> int:
    """The fewest slots records can land in, in turn: the waited batch, the records queued ahead of
    it, and one batch more, so that no slot is reused while its read is in flight."""
    return records_ahead(queue_depth, batch) + 2 * batch


CACHE_SLAB_BYTES = 64 << 20


def engine_slots(manifest: Manifest, spec: LayerSpec, queue_depth: int) -> int:
    """Slots `engine_randread` lands records in: as many as the store's cache has for this layer's
    shape at the default budget (every such expert), at most CACHE_SLAB_BYTES, at least the window."""
    same_shape = sum(len(s.experts) for s in manifest.layers if signature(s) == signature(spec))
    cache_sized = min(same_shape, max(1, CACHE_SLAB_BYTES // spec.payload_bytes))
    return max(engine_window(queue_depth, min(manifest.top_k, len(spec.experts))), cache_sized)


def fault_in(slab: Slab) -> None:
    """Write every page of `slab` now, so that the clock times a cache's steady state: a slot's pages
    first touched by a read are zeroed inside io_submit, slowly where the VM backs memory lazily."""
    for rows in slab.rows.values():
        rows[:] = 0


def engine_randread(
    store_path: Path,
    layer: int,
    *,
    queue_depth: int,
    seconds: float,
    verify: bool,
    continuous: bool = True,
    seed: int = 0,
    aio: bool = True,
    huge_pages: bool = True,
) -> float:
    """GB/s of the cache's fetch path (`ExpertStore.load`: reader threads read, check and copy whole
    records into slab slots) on random records of one layer, with `queue_depth` reader threads.

    Requests are layer-sized batches of top-k distinct random records, as the cache makes them.
    continuous: batches are queued ahead so that every reader thread always has a record to read
    (what the engine does when reads of later layers are queued behind the current one; fio's
    libaio keeps `iodepth` reads in flight the same way); otherwise one batch at a time, each
    waited for before the next is queued (a barrier per layer).
    """
    rng = np.random.default_rng(seed)
    with ExpertStore(store_path, queue_depth=queue_depth, verify=verify, aio=aio) as store:
        if not store.bypassing_cache:
            log.warning("%s: O_DIRECT unavailable; engine numbers include the page cache", store_path)
        spec = store.layer(layer)
        batch = min(store.manifest.top_k, len(spec.experts))
        ahead = records_ahead(queue_depth, batch)
        ring = Slab([spec], slots=engine_slots(store.manifest, spec, queue_depth), huge_pages=huge_pages)
        fault_in(ring)
        next_slot, in_flight = 0, deque()
        # the batches are drawn before the clock starts: numpy's sampling is not the fetch path
        draws = rng.permuted(np.tile(np.asarray(spec.experts), (4096, 1)), axis=1)[:, :batch].tolist()
        drawn = itertools.cycle(draws)

        def queue_one() -> None:
            nonlocal next_slot
            slots = {e: (next_slot + i) % ring.slots for i, e in enumerate(next(drawn))}
            next_slot = (next_slot + batch) % ring.slots
            in_flight.append(store.load(layer, slots, ring, urgent=True))

        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        landed = 0
        while time.perf_counter() < deadline:
            while len(in_flight) * batch < (batch + ahead if continuous else batch):  # the waited batch + ahead
                queue_one()
            reads = in_flight.popleft()
            reads.wait()
            landed += len(reads.slots) * spec.record_size
        for reads in in_flight:
            reads.wait()
            landed += len(reads.slots) * spec.record_size
        elapsed = time.perf_counter() - start
        return landed / elapsed / 1e9


# the A/B sides `run_io_bench` can add: name -> (engine_randread options, what the engine is over it, label)
SIDES = {
    "threads": ({"aio": False}, "aio", "reader threads"),  # the reader threads where AIO is built
    "small_pages": ({"huge_pages": False}, "huge", "engine, 4 KiB pages"),  # slots in 4 KiB pages
}


def run_io_bench(
    store_path: Path,
    *,
    queue_depths: tuple[int, ...] = QUEUE_DEPTHS,
    seconds: float = 1.0,
    rounds: int = 3,
    verify: bool = True,
    aio: bool = True,
    huge_pages: bool = True,
    compare: tuple[str, ...] = (),
) -> dict:
    """fio and the engine at each queue depth, interleaved in short trials, `rounds` times.
    `compare`: SIDES whose trials run next to the engine's in every round (A/B, order alternating).

    A VM's virtual disk swings by 2-4x from second to second; alternating short trials and taking
    per-queue-depth medians makes both sides see the same disk, so the ratio means something.
    """
    manifest, spec, path = largest_layer(store_path)
    with ExpertStore(store_path, queue_depth=1, aio=aio) as store:
        reader = store.reader
    span = len(spec.experts) * spec.record_size
    engine = {"aio": aio, "huge_pages": huge_pages}
    sides = {"engine": engine, **{name: engine | SIDES[name][0] for name in compare}}
    runs: dict[str, dict[int, list[float]]] = {
        name: {qd: [] for qd in queue_depths} for name in ["fio", *sides, "sync"]
    }

    def trial(qd: int, r: int, options: dict, *, continuous: bool = True) -> float:
        return engine_randread(
            store_path, spec.layer, queue_depth=qd, seconds=seconds, verify=verify, seed=r, continuous=continuous,
            **options,
        )  # fmt: skip

    for r in range(rounds):
        for qd in queue_depths:
            runs["fio"][qd].append(
                fio_randread(path, block=spec.record_size, queue_depth=qd, seconds=seconds, size=span)
            )
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # neither side always nearer fio's trial
            for name in order:
                runs[name][qd].append(trial(qd, r, sides[name]))
            runs["sync"][qd].append(trial(qd, r, engine, continuous=False))
            log.info(
                "round %d qd %d: fio %.3f GB/s, engine %.3f GB/s", r, qd, runs["fio"][qd][-1], runs["engine"][qd][-1]
            )
    medians = {name: {qd: float(np.median(v)) for qd, v in by_qd.items()} for name, by_qd in runs.items()}
    fio, engine_gbps, sync = medians["fio"], medians["engine"], medians["sync"]
    fio_best, engine_best = max(fio.values()), max(engine_gbps.values())
    ab = {}
    for name in compare:  # each side over fio's trial of its round, and the engine over the side, trial by trial
        ab[f"{name}_engine_trials"] = _rounded(runs[name])
        ab[f"{name}_paired_ratio_by_qd"] = {str(qd): _paired(runs[name][qd], runs["fio"][qd]) for qd in queue_depths}
        ab[f"{SIDES[name][1]}_over_{name}_by_qd"] = {
            str(qd): _paired(runs["engine"][qd], runs[name][qd]) for qd in queue_depths
        }
    return ab | {
        "bench": "io",
        "store": str(store_path),
        "file": str(path),
        "file_bytes": span,
        "record_bytes": spec.record_size,
        "verify_checksums": verify,
        "reader": reader,
        "huge_pages": huge_pages,
        "slots": engine_slots(manifest, spec, max(queue_depths)),
        "seconds_per_trial": seconds,
        "rounds": rounds,
        "queue_depths": list(queue_depths),
        "fio_gbps_by_qd": {str(k): round(v, 4) for k, v in fio.items()},
        "engine_gbps_by_qd": {str(k): round(v, 4) for k, v in engine_gbps.items()},
        "engine_sync_gbps_by_qd": {str(k): round(v, 4) for k, v in sync.items()},
        "engine_sync_gbps": round(max(sync.values()), 4),
        "ratio_sync": round(max(sync.values()) / fio_best, 4) if fio_best else None,
        "fio_trials": _rounded(runs["fio"]),
        "engine_trials": _rounded(runs["engine"]),
        "fio_gbps": round(fio_best, 4),
        "fio_best_qd": max(fio, key=fio.get),
        "engine_gbps": round(engine_best, 4),
        "engine_best_qd": max(engine_gbps, key=engine_gbps.get),
        "ratio": round(engine_best / fio_best, 4) if fio_best else None,
        "ratio_by_qd": {str(k): round(engine_gbps[k] / fio[k], 4) for k in queue_depths if fio[k]},
        # each engine trial over the fio trial just before it (the same moment of the disk), median
        "paired_ratio_by_qd": {str(qd): _paired(runs["engine"][qd], runs["fio"][qd]) for qd in queue_depths},
    }


def _rounded(by_qd: dict[int, list[float]]) -> dict[str, list[float]]:
    return {str(k): [round(x, 4) for x in v] for k, v in by_qd.items()}


def _paired(trials: list[float], baseline: list[float]) -> float:
    """Median over rounds of each trial over the baseline trial of its round."""
    return round(float(np.median([t / b for t, b in zip(trials, baseline, strict=True) if b])), 4)


def plot_io(result: dict, path: Path) -> Path:
    """The engine's paired ratio to fio by queue depth, and each compared side's, against the 0.90 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qds = [str(q) for q in result["queue_depths"]]
    pages = "huge pages" if result["huge_pages"] else "4 KiB pages"
    bars = {f"engine ({result['reader']}, {pages})": result["paired_ratio_by_qd"]}
    bars |= {
        label: result[f"{name}_paired_ratio_by_qd"]
        for name, (_, _, label) in SIDES.items()
        if f"{name}_paired_ratio_by_qd" in result
    }
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(bars)
    for i, (label, by_qd) in enumerate(bars.items()):
        ax.bar([q + i * width for q in range(len(qds))], [by_qd[q] for q in qds], width, label=label)
    ax.set_xticks([q + width * (len(bars) - 1) / 2 for q in range(len(qds))], [f"qd {q}" for q in qds])
    ax.axhline(1.0, color="gray", lw=1)
    title = (
        f"{result['record_bytes'] // 1024} KiB records into up to {result['slots']} slots, "
        f"{result['rounds']} alternating rounds (fio: its own buffers, 4 KiB pages)"
    )
    return save_fio_ratio_plot(fig, ax, title, path, legend_at="lower right")


def save_fio_ratio_plot(fig, ax, title: str, path: Path, *, legend_at: str = "best") -> Path:
    """The 0.90-of-fio line, the axis and the title every fetch-path plot has; saved."""
    from bench.plots import save_plot

    ax.axhline(0.9, ls="--", color="C3", lw=1, label="0.90 of fio")
    ax.set_ylabel("GB/s over the round's fio trial (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc=legend_at)
    return save_plot(fig, path)
