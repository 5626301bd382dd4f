"""Larger than RAM: decode in a memory cgroup (v1) whose limit, page cache included, is a third or
less of the model's expert bytes; against the I/O bound and against mlx-lm in the same cgroup.

The parent measures fio's random-read GB/s at the record size (before and after, averaged), drops
the page cache, and starts each generation as a child process that joins the cgroup before exec.
Children print one JSON line; a child killed for memory is recorded as such.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError

from bench.io import fio_randread

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def make_cgroup(name: str, *, limit_bytes: int) -> Path:
    if not CGROUP_ROOT.is_dir():
        raise UserError(f"{CGROUP_ROOT} is missing: this benchmark needs the cgroup v1 memory controller")
    path = CGROUP_ROOT / name
    path.mkdir(exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return path


def oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_in_cgroup(cgroup: Path | None, args: list[str], *, timeout: float, module: str = "bench.oversub") -> dict:
    """Run `python -m MODULE --child ...` inside `cgroup` (None: unconstrained); return its
    JSON or what killed it."""
    kills_before = oom_kills(cgroup) if cgroup else 0
    if cgroup:
        (cgroup / "memory.max_usage_in_bytes").write_text("0")
    procs = cgroup / "cgroup.procs" if cgroup else None
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", *args],
        preexec_fn=(lambda: procs.write_text(str(os.getpid()))) if procs else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out: dict = {"returncode": proc.returncode, "wall_s": time.perf_counter() - start}
    if cgroup:
        out["oom_killed"] = oom_kills(cgroup) > kills_before
        out["max_usage_bytes"] = int((cgroup / "memory.max_usage_in_bytes").read_text())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        out.update(json.loads(lines[-1]))
    else:
        out["stderr_tail"] = proc.stderr[-800:]
    return out


def child(argv: list[str]) -> int:
    """In the cgroup: one greedy generation (streamed, mlx-lm or llama.cpp); print one JSON line."""
    mode, path, max_tokens = argv[0], Path(argv[1]), int(argv[2])
    if mode == "llama_cpp":  # no MLX in this process: only llama.cpp's memory counts
        from bench.llamacpp import llama_cpp_decode

        ids = [int(t) for t in argv[3].split(",")]
        eos = [int(t) for t in argv[4].split(",") if t]
        r = llama_cpp_decode(path, prompt_ids=ids, max_tokens=max_tokens, eos_ids=eos, prompt=argv[5])
    elif mode == "streamed":
        import mlx.core as mx

        from bench.decode import streamed_decode

        mx.set_cache_limit(int(argv[4]))  # MLX's free-buffer cache counts against the cgroup too
        r = streamed_decode(path, ram_budget=int(argv[3]), max_tokens=max_tokens, lookahead=argv[5] == "on")
    else:
        from bench.decode import PROMPT
        from bench.engine import mlx_lm_in_ram

        r = mlx_lm_in_ram(path, max_tokens=max_tokens, prompt=PROMPT)
    r["peak_rss_bytes"] = _peak_rss()
    print(json.dumps(r))
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt_ids(store: Path) -> tuple[list[int], list[int]]:
    """The prompt's token ids and the EOS ids, from the store's tokenizer (as the streamed run encodes)."""
    from flashmesh.coordinator.engine import load_store_tokenizer
    from flashmesh.coordinator.generate import encode_prompt

    from bench.decode import PROMPT

    tokenizer = load_store_tokenizer(store, Manifest.load(store))
    return encode_prompt(tokenizer, PROMPT, chat=False), sorted(tokenizer.eos_token_ids)


def _median_run(rs: list[dict]) -> dict:
    """The repeat with the median decode tok/s, plus every repeat's tok/s."""
    ok = [r for r in rs if "decode_tokens_per_s" in r]
    if not ok:
        return rs[-1]
    median = sorted(ok, key=lambda r: r["decode_tokens_per_s"])[(len(ok) - 1) // 2]
    return {**median, "decode_tokens_per_s_all": [r["decode_tokens_per_s"] for r in ok]}


def run_oversub_bench(
    store: Path,
    source: Path,
    *,
    limit_bytes: int,
    ram_budget: int,
    max_tokens: int,
    gguf: Path | None = None,
    repeats: int = 1,
    mlx_cache_bytes: int = 64 * 2**20,
    fio_seconds: float = 2.0,
) -> dict:
    """Every run in the same cgroup, page cache dropped before each; the engines alternate within a
    round (`repeats` rounds) so that each sees the same disk; ratios are taken within a round."""
    from bench.decode import PROMPT

    manifest = Manifest.load(store)
    spec = max(manifest.layers, key=lambda s: len(s.experts) * s.record_size)
    file = store / spec.file
    span = len(spec.experts) * spec.record_size

    def fio_best() -> float:
        return max(
            fio_randread(file, block=spec.record_size, queue_depth=qd, seconds=fio_seconds, size=span) for qd in (8, 16)
        )

    prompt_ids, eos_ids = _prompt_ids(store)
    streamed = ["streamed", str(store), str(max_tokens), str(ram_budget), str(mlx_cache_bytes)]
    configs = [("streamed", [*streamed, "on"]), ("streamed_no_lookahead", [*streamed, "off"])]
    if gguf is not None:
        ids, eos = ",".join(map(str, prompt_ids)), ",".join(map(str, eos_ids))
        configs.append(("llama_cpp", ["llama_cpp", str(gguf), str(max_tokens), ids, eos, PROMPT]))
    fio_before = fio_best()
    cgroup = make_cgroup(f"flashmesh-bench-{os.getpid()}", limit_bytes=limit_bytes)
    rounds: list[dict[str, dict]] = []
    try:
        for i in range(repeats):
            rounds.append({})
            for name, args in configs:
                drop_page_cache()
                log.info("round %d/%d: running %s in %s", i + 1, repeats, name, cgroup)
                rounds[-1][name] = run_in_cgroup(cgroup, args, timeout=1800)
        drop_page_cache()
        mlx_lm = run_in_cgroup(cgroup, ["mlx_lm", str(source), str(max_tokens)], timeout=1800)
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            log.warning("pid %s still in %s", pid, cgroup)
        cgroup.rmdir()
    fio_after = fio_best()
    fio_gbps = (fio_before + fio_after) / 2
    runs = {name: _median_run([r[name] for r in rounds]) for name, _ in configs}
    runs["mlx_lm"] = mlx_lm
    if "tokens" not in mlx_lm:  # killed in the cgroup: its tokens, for comparison, from a run without a limit
        runs["mlx_lm_unlimited"] = run_in_cgroup(None, ["mlx_lm", str(source), str(max_tokens)], timeout=1800)
    reference = next((runs[n]["tokens"] for n in ("mlx_lm", "mlx_lm_unlimited") if "tokens" in runs.get(n, {})), None)
    result = {
        "bench": "oversub",
        "store": str(store),
        "gguf": str(gguf) if gguf else None,
        "cgroup_limit_bytes": limit_bytes,
        "ram_budget_bytes": ram_budget,
        "mlx_cache_limit_bytes": mlx_cache_bytes,
        "expert_bytes_total": manifest.expert_bytes_total,
        "expert_payload_bytes": manifest.layers[0].payload_bytes,
        "oversubscription": manifest.expert_bytes_total / limit_bytes,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "prompt_ids": prompt_ids,
        "fio_gbps_before": fio_before,
        "fio_gbps_after": fio_after,
        "fio_gbps": fio_gbps,
        "runs": runs,
    }
    per_token_all_miss = manifest.top_k * len(manifest.layers) * manifest.layers[0].payload_bytes
    result["io_bound_all_miss_tokens_per_s"] = fio_gbps * 1e9 / per_token_all_miss
    llama = runs.get("llama_cpp", {})
    if llama.get("disk_read_bytes_per_token"):  # what llama.cpp's page faults actually read, per token
        llama["io_bound_tokens_per_s"] = fio_gbps * 1e9 / llama["disk_read_bytes_per_token"]
        llama["fraction_of_io_bound"] = llama["decode_tokens_per_s"] / llama["io_bound_tokens_per_s"]
    for r in runs.values():
        if "tokens" in r and reference is not None:
            r["tokens_match_mlx_lm"] = r["tokens"] == reference
            r["tokens_common_prefix_with_mlx_lm"] = _common_prefix(r["tokens"], reference)
    for name in ("streamed", "streamed_no_lookahead"):
        r = runs[name]
        if "decode_tokens_per_s" not in r:
            continue
        bound_missed = (
            fio_gbps * 1e9 / r["missed_expert_bytes_per_token"] if r["missed_expert_bytes_per_token"] else None
        )
        bound_read = fio_gbps * 1e9 / r["bytes_read_per_token"] if r["bytes_read_per_token"] else None
        r["io_bound_tokens_per_s"] = bound_missed
        r["io_bound_read_tokens_per_s"] = bound_read
        r["fraction_of_io_bound"] = r["decode_tokens_per_s"] / bound_missed if bound_missed else None
        r["fraction_of_io_bound_read"] = r["decode_tokens_per_s"] / bound_read if bound_read else None
        r["engine_read_gbps_over_fio"] = r["store_read_gbps"] / fio_gbps if fio_gbps else None
        if gguf is not None:
            pairs = [
                (x[name]["decode_tokens_per_s"], x["llama_cpp"]["decode_tokens_per_s"])
                for x in rounds
                if "decode_tokens_per_s" in x[name] and x["llama_cpp"].get("decode_tokens_per_s")
            ]
            ratios = sorted(a / b for a, b in pairs)
            r["over_llama_cpp_by_round"] = [a / b for a, b in pairs]
            r["over_llama_cpp"] = ratios[(len(ratios) - 1) // 2] if ratios else None
            if "tokens" in runs["llama_cpp"]:
                r["tokens_match_llama_cpp"] = r["tokens"] == runs["llama_cpp"]["tokens"]
                r["tokens_common_prefix_with_llama_cpp"] = _common_prefix(r["tokens"], runs["llama_cpp"]["tokens"])
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit("usage: python -m bench oversub STORE --source MODEL_DIR")
