"""`python -m bench overlap STORE`: does flash I/O overlap compute when the experts do not fit?

Three things in one run:

1. Time per token at ~3x oversubscription (a cgroup v1 memory limit of expert bytes / 3, page
   cache included, page cache dropped before each child) against the serial bounds: R = the bytes
   of experts not resident when first wanted, per token, at fio's random-read GB/s (the read time
   if nothing overlapped), and C = the time per token of the same engine on the same tokens with
   every expert preloaded, outside the cgroup (compute only), measured in every round alternating
   with the streamed runs. Each round takes fio's rate, and each streamed run the engine's alone
   just before and after it (R'): the strictest figure uses the faster of the two. Perfect
   overlap gives max(R, C), none gives R + C. Tokens are teacher-forced from a fixed text (each
   step's input is the text's next token, not the model's argmax): a random-weight model's routing
   would collapse onto one repeated token; on the realistic-routing models the text's routing is
   realistic too (docs/benchmarks.md).
2. The store's load path GB/s (`bench.io.engine_randread`) alone and while MLX computes expert-sized
   matmuls without pause on another thread of the same process, while a real decode (every expert
   preloaded) runs in another process, and in bursts (one layer's batch at a time, as decode reads
   when nothing is queued behind it), alternating.
3. Where the time goes: the cache's flash busy time (node/busy_time.py) splits each token into reads
   in flight and flash idle, and time per token over R' (R at the engine's own rate) into the rate
   while busy, bytes read over bytes missed (wasted read-aheads) and idle; the loads' own spans say
   how much of the idle is at the token's edges (before its first read, after its last).
4. The disk's own timeline, where the block layer can be traced (root, tracefs; bench/block_trace.py):
   the share of each decode the disk had reads in flight and its rate meanwhile, against its rate
   in the engine's reads alone just around the run, and time per token over max(R, C) with R at the
   disk's rate during that very run, which the drift from minute to minute cannot move.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from flashmesh.node.store_format import Manifest

from bench.block_trace import DiskWindow, trace_if_possible
from bench.io import engine_randread, fault_in, fio_randread
from bench.oversub import drop_page_cache, make_cgroup, run_in_cgroup

log = logging.getLogger(__name__)

TEXT = (
    "Mixture of experts models route every token to a few experts out of many. The experts live on "
    "flash and stream into memory when the router picks them. A journey of a thousand miles begins "
    "with one step. What is the capital of France? Paris is the capital of France, and its river is "
    "the Seine. def main():\n    for i in range(10):\n        total += i\n    print(total)\n"
)


def forced_decode(
    store: Path, *, ram_budget: int, tokens: int, lookahead: bool, preload: bool, huge_pages: bool = True
) -> dict:
    """Teacher-forced decode of TEXT's tokens, one step per token, with per-step timing and cache stats."""
    import mlx.core as mx
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.options import ModelOptions
    from mlx_lm.models.cache import make_prompt_cache

    options = ModelOptions(
        store=store, ram_budget=ram_budget, lookahead=lookahead, preload=preload, huge_pages=huge_pages
    )
    streaming = open_model(options)
    try:
        if not preload:
            slabs = (streaming.cache.slab(spec.layer) for spec in streaming.manifest.layers)
            for slab in {id(slab): slab for slab in slabs}.values():  # layers of one shape share a slab
                fault_in(slab)
        ids = streaming.tokenizer.encode(TEXT * (1 + tokens // 40))[: tokens + 1]
        cache = make_prompt_cache(streaming.model)
        mx.eval(streaming.model(mx.array(ids[:1])[None], cache=cache))  # first step: cold, not timed
        streaming.cache.drain()
        before = streaming.cache.close_stats().__dict__.copy()
        loads = _record_loads(streaming.store)
        spans = []  # each step's (start, end)
        for t in ids[1:]:
            start = time.perf_counter()
            mx.eval(streaming.model(mx.array([[t]]), cache=cache))
            spans.append((start, time.perf_counter()))
        steps = [end - start for start, end in spans]
        stats = streaming.cache.close_stats()
        delta = {k: v - before[k] for k, v in stats.__dict__.items() if isinstance(v, int | float)}
        n = len(steps)
        payload = streaming.manifest.layers[0].payload_bytes
        return {
            "steps": n,
            "seconds_per_token": sum(steps) / n,
            "seconds_per_token_median": statistics.median(steps),
            "step_ms": [round(s * 1e3, 1) for s in steps],
            "hit_rate": delta["hits"] / max(1, delta["hits"] + delta["misses"]),
            "missed_expert_bytes_per_token": (delta["misses"] + delta["prefetch_used"]) * payload / n,
            "bytes_read_per_token": delta["bytes_read"] / n,
            "io_wait_seconds_per_token": delta["io_seconds"] / n,
            "prefetch_used_per_token": delta["prefetch_used"] / n,
            "prefetch_wasted_per_token": delta["prefetch_wasted"] / n,
            "prefetch_dropped_per_token": delta["prefetch_dropped"] / n,  # taken back unread: their layer came
            "peak_cache_bytes": stats.peak_bytes,
            # the flash's own side: time with any read in flight, and the rate it read at meanwhile
            "flash_busy_seconds_per_token": delta["flash_busy_seconds"] / n,
            "flash_gbps_while_busy": delta["bytes_read"] / delta["flash_busy_seconds"] / 1e9
            if delta["flash_busy_seconds"]
            else 0.0,
            "decode_window": [spans[0][0], spans[-1][1]],  # perf_counter: the disk's trace is cut to it
            **_token_boundary(spans, loads),
        }
    finally:
        streaming.close()


def _over_max(pairs: list[tuple[dict, float]], reads: list[float]) -> list[float]:
    """Each run's time per token over max(R, C), with its round's C and the R given for it."""
    return [x["seconds_per_token"] / max(r, c) for (x, c), r in zip(pairs, reads, strict=True)]


def _against_the_disk(pairs: list[tuple[dict, float]]) -> dict:
    """Each run against its disk's own timeline: the share of the decode the disk had reads in
    flight, its rate meanwhile, and time per token over max(R, C) with R at that rate (that run's
    bytes at its own minute's rate); empty where the disk was not traced."""
    traced = [(x, c, DiskWindow(**x["disk"])) for x, c in pairs if "disk" in x and x["disk"]["busy_seconds"] > 0]
    if not traced:
        return {}
    disks = [d for _, _, d in traced]
    alone = [x["disk_gbps_alone_around"] for x, _, _ in traced]
    reads = [x["missed_expert_bytes_per_token"] / (d.gbps_while_busy * 1e9) for x, _, d in traced]
    over = _over_max([(x, c) for x, c, _ in traced], reads)
    # the disk's rate in the decode over its rate in the engine's reads alone just around it
    in_decode = [d.gbps_while_busy / a for d, a in zip(disks, alone, strict=True) if a]
    return {
        "disk_busy_fraction": statistics.median(d.busy_fraction for d in disks),
        "disk_gbps_while_busy_by_round": [round(d.gbps_while_busy, 3) for d in disks],
        "disk_gbps_alone_around_by_round": [round(a, 3) for a in alone],
        "disk_rate_over_alone": statistics.median(in_decode) if in_decode else None,
        "read_seconds_at_disk_rate": statistics.median(reads),
        "over_max_at_disk_rate": statistics.median(over),
        "over_max_at_disk_rate_by_round": [round(v, 3) for v in over],
    }


def _record_loads(store) -> list:
    """Every load the cache submits to `store` from now on (the bench wraps the store's `load`)."""
    loads = []
    submit = store.load

    def load(layer, slots, slab, *, urgent):
        reads = submit(layer, slots, slab, urgent=urgent)
        loads.append(reads)
        return reads

    store.load = load
    return loads


def _token_boundary(spans: list[tuple[float, float]], loads: list) -> dict:
    """Flash idle at each step's edges, medians over steps: from the step's start to its first read
    (the token's first layer cannot be predicted, so nothing is in flight) and from its last read
    landing to the step's end (the last layer's experts and the head)."""
    before, after = [], []
    for start, end in spans:
        mine = [r for r in loads if start <= r.started < end]
        if mine:
            before.append(min(r.started for r in mine) - start)
            after.append(max(0.0, end - max(r.started + r.seconds for r in mine)))
    return {
        "flash_idle_before_first_read_seconds": statistics.median(before) if before else 0.0,
        "flash_idle_after_last_read_seconds": statistics.median(after) if after else 0.0,
    }


def reads_under_compute(store: Path, *, queue_depth: int, seconds: float, rounds: int) -> dict:
    """Load-path GB/s alone vs while an MLX thread computes without pause, and vs while a real decode
    (every expert preloaded) runs in another process; alternating trials."""
    import mlx.core as mx

    manifest = Manifest.load(store)
    spec = max(manifest.layers, key=lambda s: len(s.experts) * s.record_size)
    config = manifest.config
    d, h = config["hidden_size"], config.get("moe_intermediate_size", config.get("intermediate_size"))
    stop = threading.Event()
    done = [0]

    def compute() -> None:  # a decode step's expert work, over and over: top-k [1, D] x [D, H] matmuls
        w = mx.random.normal((manifest.top_k, d, h))
        x = mx.random.normal((manifest.top_k, 1, d))
        while not stop.is_set():
            mx.eval(mx.tanh(x @ w).sum())
            done[0] += 1

    trials: dict[str, list[float]] = {"alone": [], "computing": [], "bursts": [], "decoding": []}
    steps_per_s, decode_cores = [], []  # the decode's CPU seconds per second of its trials: cores it kept busy
    decoder = _Decoder(store)  # started once, stopped (SIGSTOP) between its trials
    try:
        for r in range(rounds):
            kinds = ("alone", "computing", "bursts", "decoding")
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                worker = threading.Thread(target=compute) if kind == "computing" else None
                if worker:
                    stop.clear()
                    done[0] = 0
                    worker.start()
                if kind == "decoding":
                    decoder.resume()
                    cpu_before = decoder.cpu_seconds()
                start = time.perf_counter()
                # bursts: one layer's batch at a time, each waited for, as decode reads with nothing queued behind
                gbps = engine_randread(
                    store, spec.layer, queue_depth=queue_depth, seconds=seconds, verify=True, seed=r,
                    continuous=kind != "bursts",
                )  # fmt: skip
                if kind == "decoding":
                    decoder.pause()
                    decode_cores.append((decoder.cpu_seconds() - cpu_before) / (time.perf_counter() - start))
                if worker:
                    stop.set()
                    worker.join()
                    steps_per_s.append(done[0] / (time.perf_counter() - start))
                trials[kind].append(gbps)
    finally:
        decoder.close()
    ratios = [c / a for a, c in zip(trials["alone"], trials["computing"], strict=True)]
    bursts = [b / a for a, b in zip(trials["alone"], trials["bursts"], strict=True)]
    decoding = [d / a for a, d in zip(trials["alone"], trials["decoding"], strict=True)]
    return {
        "queue_depth": queue_depth,
        "read_gbps_alone": trials["alone"],
        "read_gbps_while_computing": trials["computing"],
        "read_gbps_in_bursts": trials["bursts"],
        "ratio_by_round": ratios,
        "ratio": statistics.median(ratios),
        "bursts_over_alone": statistics.median(bursts),
        # the whole CPU load of a decode step (MLX's threads, the graph), not one thread's matmuls
        "read_gbps_while_decoding": trials["decoding"],
        "decoding_ratio_by_round": decoding,
        "ratio_while_decoding": statistics.median(decoding),
        "decode_cores_busy": decode_cores,
        "compute_steps_per_s_while_reading": steps_per_s,
    }


def run_overlap_bench(
    store: Path,
    *,
    limit_bytes: int,
    ram_budget: int,
    tokens: int,
    rounds: int,
    queue_depth: int = 8,
    mlx_cache_bytes: int = 64 * 2**20,
    small_pages_too: bool = False,
) -> dict:
    """C (everything preloaded), lookahead off and on in the cgroup, alternating, `rounds` times;
    `small_pages_too`: both again with the cache in 4 KiB pages (`--no-huge-pages`) in the same rounds."""
    manifest = Manifest.load(store)
    spec = max(manifest.layers, key=lambda s: len(s.experts) * s.record_size)
    file, span = store / spec.file, len(spec.experts) * spec.record_size

    def fio() -> float:
        return max(fio_randread(file, block=spec.record_size, queue_depth=q, seconds=2, size=span) for q in (8, 16))

    def engine_alone(r: int) -> float:
        return engine_randread(store, spec.layer, queue_depth=queue_depth, seconds=2.0, verify=True, seed=100 + r)

    child = ["forced", str(store), str(tokens), str(mlx_cache_bytes)]
    preloaded = [*child, str(manifest.expert_bytes_total), "off", "preload"]
    cgroup = make_cgroup("fm-engine-overlap", limit_bytes=limit_bytes)
    streamed = ["lookahead_off", "lookahead_on"] + (["lookahead_off_4k", "lookahead_on_4k"] if small_pages_too else [])
    runs: dict[str, list[dict]] = {name: [] for name in [*streamed, "compute_only"]}
    # The flash's rate drifts within minutes here (1.3 to 1.7 GB/s alone, fio 0.56-2.26 GB/s between
    # runs): each round takes fio's, and each streamed run is bracketed by the engine's rate alone,
    # 2 s just before and just after it, so that it is set against the rate of its own minute.
    fio_by_round: list[float] = []
    engine_around: dict[str, list[float]] = {name: [] for name in streamed}
    # the disk's own timeline (block tracepoints) during each run and its brackets, where it can be had
    trace = trace_if_possible(store)
    try:
        for r in range(rounds):
            drop_page_cache()
            fio_by_round.append(fio())
            order = ("compute_only", *streamed)
            for name in order if r % 2 == 0 else order[::-1]:
                drop_page_cache()
                if name == "compute_only":  # C: every expert preloaded, outside the cgroup, in every round
                    runs[name].append(run_in_cgroup(None, preloaded, timeout=3600, module="bench.overlap"))
                    continue
                flag = "on" if name.startswith("lookahead_on") else "off"
                pages = "small" if name.endswith("_4k") else "huge"
                with trace or contextlib.nullcontext():
                    t0 = time.perf_counter()
                    before = engine_alone(2 * r)
                    t1 = time.perf_counter()
                    drop_page_cache()
                    run = run_in_cgroup(
                        cgroup, [*child, str(ram_budget), flag, "stream", pages], timeout=3600, module="bench.overlap"
                    )
                    t2 = time.perf_counter()
                    after = engine_alone(2 * r + 1)
                    t3 = time.perf_counter()
                engine_around[name].append((before + after) / 2)
                if trace is not None and "decode_window" in run:
                    run["disk"] = trace.window(*run["decode_window"]).__dict__
                    brackets = [trace.window(t0, t1), trace.window(t2, t3)]  # the engine's reads alone
                    run["disk_gbps_alone_around"] = statistics.mean(w.gbps_while_busy for w in brackets)
                runs[name].append(run)
    finally:
        cgroup.rmdir()
    fio_gbps = statistics.median(fio_by_round)
    under = reads_under_compute(store, queue_depth=queue_depth, seconds=2.0, rounds=max(5, 2 * rounds))
    # R at the engine's own read rate too: with its slabs in huge pages it often reads faster than fio
    engine_gbps = statistics.median(v for vs in engine_around.values() for v in vs)
    computed = runs.pop("compute_only")
    c_by_round = [x.get("seconds_per_token") for x in computed]
    summary = {}
    for name, rs in runs.items():
        rounds_ok = [
            (x, c, f, e)
            for x, c, f, e in zip(rs, c_by_round, fio_by_round, engine_around[name], strict=True)
            if "seconds_per_token" in x and c is not None
        ]
        pairs = [(x, c) for x, c, _, _ in rounds_ok]
        if not pairs:
            summary[name] = {"runs": rs}
            continue
        reads = [x["missed_expert_bytes_per_token"] / (f * 1e9) for x, _, f, _ in rounds_ok]
        over_max = _over_max(pairs, reads)
        over_sum = [x["seconds_per_token"] / (r + c) for (x, c), r in zip(pairs, reads, strict=True)]
        own = [x["missed_expert_bytes_per_token"] / (e * 1e9) for x, _, _, e in rounds_ok]
        over_max_own = _over_max(pairs, own)
        # the strictest bound: each round's faster rate of the two
        fastest = [min(r, o) for r, o in zip(reads, own, strict=True)]
        over_max_fastest = _over_max(pairs, fastest)
        # time per token over R' = (engine's rate alone / flash's rate while busy) x (bytes read / missed
        # bytes) + flash idle / R': the three things that stand between a token and its reads
        slower = [e / x["flash_gbps_while_busy"] for x, _, _, e in rounds_ok if x["flash_gbps_while_busy"]]
        extra = [x["bytes_read_per_token"] / x["missed_expert_bytes_per_token"] for x, _ in pairs]
        idle = [x["seconds_per_token"] - x["flash_busy_seconds_per_token"] for x, _ in pairs]
        edges = [x["flash_idle_before_first_read_seconds"] + x["flash_idle_after_last_read_seconds"] for x, _ in pairs]
        summary[name] = {
            "flash_idle_at_token_boundary_seconds": statistics.median(edges),
            "flash_busy_seconds_per_token": statistics.median(x["flash_busy_seconds_per_token"] for x, _ in pairs),
            "flash_idle_seconds_per_token": statistics.median(idle),
            "flash_gbps_while_busy": statistics.median(x["flash_gbps_while_busy"] for x, _ in pairs),
            "engine_rate_over_rate_while_busy": statistics.median(slower) if slower else None,
            "bytes_read_over_missed": statistics.median(extra),
            "flash_idle_over_engine_read_time": statistics.median(i / r for i, r in zip(idle, own, strict=True)),
            "seconds_per_token": statistics.median(x["seconds_per_token"] for x, _ in pairs),
            "read_seconds_if_serial": statistics.median(reads),
            "compute_seconds": statistics.median(c for _, c in pairs),
            # per round: this round's run over max(R, C) with this round's C and rates, then the median
            "over_max_read_compute": statistics.median(over_max),
            "over_max_by_round": [round(v, 3) for v in over_max],
            "over_sum_read_compute": statistics.median(over_sum),
            "read_seconds_at_engine_rate": statistics.median(own),
            "over_max_at_engine_rate": statistics.median(over_max_own),
            "over_max_at_engine_rate_by_round": [round(v, 3) for v in over_max_own],
            "engine_gbps_around_by_round": [round(e, 3) for _, _, _, e in rounds_ok],
            "over_max_at_fastest_rate": statistics.median(over_max_fastest),
            "hit_rate": statistics.median(x["hit_rate"] for x, _ in pairs),
            **_against_the_disk(pairs),
            "runs": rs,
        }
    return {
        "bench": "overlap",
        "store": str(store),
        "expert_bytes_total": manifest.expert_bytes_total,
        "cgroup_limit_bytes": limit_bytes,
        "oversubscription": manifest.expert_bytes_total / limit_bytes,
        "ram_budget_bytes": ram_budget,
        "tokens": tokens,
        "rounds": rounds,
        "fio_gbps": fio_gbps,
        "fio_gbps_by_round": fio_by_round,
        "engine_gbps": engine_gbps,
        "compute_only": computed,
        "configs": summary,
        "reads_under_compute": under,
    }


class _Decoder:
    """A teacher-forced decode with every expert preloaded, in a child process, run only between
    `resume` and `pause` (SIGCONT / SIGSTOP): the CPU load of a real decode step next to reads."""

    def __init__(self, store: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.overlap", "--child", "decode-until-stopped", str(store)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # after the preload: decoding from now on
        if line.strip() != "decoding":
            self.close()
            raise RuntimeError(f"the preloaded decode did not start (exit {self.proc.returncode})")
        self.pause()

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def cpu_seconds(self) -> float:
        """The decode's CPU time so far (user + system, all its threads; Linux's /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
        self.proc.wait(timeout=60)


def decode_until_stopped(store: Path) -> int:
    """Teacher-forced decode steps of TEXT, every expert preloaded, until SIGTERM; says "decoding"
    on stdout once the preload is done."""
    import mlx.core as mx
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.options import ModelOptions
    from mlx_lm.models.cache import make_prompt_cache

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total, preload=True))
    try:
        ids = streaming.tokenizer.encode(TEXT)[:64]
        print("decoding", flush=True)
        while not stopping.is_set():
            cache = make_prompt_cache(streaming.model)
            for t in ids:
                if stopping.is_set():
                    break
                mx.eval(streaming.model(mx.array([[t]]), cache=cache))
    finally:
        streaming.close()
    return 0


def child(argv: list[str]) -> int:
    import mlx.core as mx

    if argv[0] == "decode-until-stopped":
        return decode_until_stopped(Path(argv[1]))
    _, store, tokens, mlx_cache, budget, lookahead, mode = argv[:7]
    pages = argv[7] if len(argv) > 7 else "huge"
    mx.set_cache_limit(int(mlx_cache))  # MLX's free-buffer cache counts against the cgroup too
    r = forced_decode(
        Path(store), ram_budget=int(budget), tokens=int(tokens), lookahead=lookahead == "on", preload=mode == "preload",
        huge_pages=pages == "huge",
    )  # fmt: skip
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit("usage: python -m bench overlap STORE")
