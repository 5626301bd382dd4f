"""`python -m bench io`: the store's fetch path against fio's random reads on the same file.

Both sides read whole records (the store's record size, 16 KiB aligned) at random record offsets of
the same layer file with the page cache bypassed (O_DIRECT), at several queue depths, in one run.
The figure of merit is the ratio engine / fio-best: absolute GB/s on a VM disk mean little.

The engine side is the store's fetch path exactly as the cache uses it (`ExpertStore.load`): Linux
AIO where it is built (node/aio_reads.py, `queue_depth` reads in flight), else reader threads (as
many as the queue depth), reading each record into a slab slot (or staging, then copied) and
checking its xxh3; `--reader threads` measures the threads where AIO is built. `engine_gbps` keeps
batches queued ahead so that every reader always has a record to read (reads in flight across
layer boundaries);
`engine_sync_gbps` waits for each layer-sized batch before queueing the next (a barrier per layer).
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
from flashmesh.node.slab import Slab
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
    """Slots `engine_randread` lands records in, in turn: the waited batch, the records queued
    ahead of it, and one batch more, so that no slot is reused while its read is in flight."""
    return records_ahead(queue_depth, batch) + 2 * batch


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
        ring = Slab([spec], slots=engine_window(queue_depth, batch))  # the slots the reads land in, reused
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


def run_io_bench(
    store_path: Path,
    *,
    queue_depths: tuple[int, ...] = QUEUE_DEPTHS,
    seconds: float = 1.0,
    rounds: int = 3,
    verify: bool = True,
    aio: bool = True,
    threads_too: bool = False,
) -> dict:
    """fio and the engine at each queue depth, interleaved in short trials, `rounds` times.
    `threads_too`: the reader threads' trial right after the AIO reader's in every round (A/B).

    A VM's virtual disk swings by 2-4x from second to second; alternating short trials and taking
    per-queue-depth medians makes both sides see the same disk, so the ratio means something.
    """
    _, spec, path = largest_layer(store_path)
    with ExpertStore(store_path, queue_depth=1, aio=aio) as store:
        reader = store.reader
    span = len(spec.experts) * spec.record_size
    fio_runs: dict[int, list[float]] = {qd: [] for qd in queue_depths}
    engine_runs: dict[int, list[float]] = {qd: [] for qd in queue_depths}
    sync_runs: dict[int, list[float]] = {qd: [] for qd in queue_depths}
    threads_runs: dict[int, list[float]] = {qd: [] for qd in queue_depths}
    for r in range(rounds):
        for qd in queue_depths:
            fio_runs[qd].append(fio_randread(path, block=spec.record_size, queue_depth=qd, seconds=seconds, size=span))
            # with `threads_too` the two readers take turns going first, so neither is always nearer fio's trial
            sides = [(engine_runs, aio), (threads_runs, False)][: 2 if threads_too else 1]
            for runs, use_aio in sides if r % 2 == 0 else sides[::-1]:
                runs[qd].append(
                    engine_randread(
                        store_path, spec.layer, queue_depth=qd, seconds=seconds, verify=verify, seed=r, aio=use_aio
                    )
                )
            sync_runs[qd].append(
                engine_randread(
                    store_path,
                    spec.layer,
                    queue_depth=qd,
                    seconds=seconds,
                    verify=verify,
                    continuous=False,
                    seed=r,
                    aio=aio,
                )
            )
            log.info("round %d qd %d: fio %.3f GB/s, engine %.3f GB/s", r, qd, fio_runs[qd][-1], engine_runs[qd][-1])
    fio = {qd: float(np.median(v)) for qd, v in fio_runs.items()}
    engine = {qd: float(np.median(v)) for qd, v in engine_runs.items()}
    sync = {qd: float(np.median(v)) for qd, v in sync_runs.items()}
    fio_best, engine_best = max(fio.values()), max(engine.values())
    # each engine trial over the fio trial just before it (the same moment of the disk), median
    paired = {qd: _paired(engine_runs[qd], fio_runs[qd]) for qd in queue_depths}
    ab = {}
    if threads_too:
        ab = {
            "threads_engine_trials": {str(k): [round(x, 4) for x in v] for k, v in threads_runs.items()},
            "threads_paired_ratio_by_qd": {str(qd): _paired(threads_runs[qd], fio_runs[qd]) for qd in queue_depths},
            "aio_over_threads_by_qd": {str(qd): _paired(engine_runs[qd], threads_runs[qd]) for qd in queue_depths},
        }
    return ab | {
        "bench": "io",
        "store": str(store_path),
        "file": str(path),
        "file_bytes": span,
        "record_bytes": spec.record_size,
        "verify_checksums": verify,
        "reader": reader,
        "seconds_per_trial": seconds,
        "rounds": rounds,
        "queue_depths": list(queue_depths),
        "fio_gbps_by_qd": {str(k): round(v, 4) for k, v in fio.items()},
        "engine_gbps_by_qd": {str(k): round(v, 4) for k, v in engine.items()},
        "engine_sync_gbps_by_qd": {str(k): round(v, 4) for k, v in sync.items()},
        "engine_sync_gbps": round(max(sync.values()), 4),
        "ratio_sync": round(max(sync.values()) / fio_best, 4) if fio_best else None,
        "fio_trials": {str(k): [round(x, 4) for x in v] for k, v in fio_runs.items()},
        "engine_trials": {str(k): [round(x, 4) for x in v] for k, v in engine_runs.items()},
        "fio_gbps": round(fio_best, 4),
        "fio_best_qd": max(fio, key=fio.get),
        "engine_gbps": round(engine_best, 4),
        "engine_best_qd": max(engine, key=engine.get),
        "ratio": round(engine_best / fio_best, 4) if fio_best else None,
        "ratio_by_qd": {str(k): round(engine[k] / fio[k], 4) for k in queue_depths if fio[k]},
        "paired_ratio_by_qd": {str(k): round(v, 4) for k, v in paired.items()},
    }


def _paired(trials: list[float], baseline: list[float]) -> float:
    """Median over rounds of each trial over the baseline trial of its round."""
    return round(float(np.median([t / b for t, b in zip(trials, baseline, strict=True) if b])), 4)
