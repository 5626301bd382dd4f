"""Soak: K concurrent clients for M minutes against `flashmesh serve` on loopback.

The server is a separate process (`python -m flashmesh.coordinator.cli serve`), so its RSS is its own. Each
client loops over completions and chat completions, streamed and not, through the official openai
client. Reported: requests served, errors, latency percentiles, tokens, and the server's RSS at
start (model loaded, no traffic), after warm-up, at the end, with the growth after warm-up held
against a stated bound.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flashmesh.protos.errors import UserError

from bench.plots import save_plot

log = logging.getLogger(__name__)

PROMPTS = [
    "The experts live on flash and",
    "Write a haiku about solid state drives.",
    "Explain mixture of experts routing in one sentence:",
    "def fibonacci(n):",
    "List three reasons to stream weights from flash:",
]


@dataclass
class Outcome:
    started: float  # seconds since the soak began
    seconds: float
    kind: str
    ok: bool
    completion_tokens: int = 0
    error: str | None = None


def start_serve(serve_args: list[str], *, logfile: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`flashmesh serve SERVE_ARGS...` as a separate process; return it and its base URL (.../v1)
    once it says it is serving (its stderr goes to `logfile`)."""
    cmd = [sys.executable, "-m", "flashmesh.coordinator.cli", "serve", *serve_args]
    err = open(logfile, "wb")  # noqa: SIM115 - handed to the child, closed below
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})})  # fmt: skip
    err.close()
    try:
        line = proc.stdout.readline()
    except BaseException:  # stopped (SIGTERM, Ctrl-C) while it starts: it must not outlive us
        proc.kill()
        proc.wait()
        raise
    if not line.startswith("serving "):
        proc.kill()
        proc.wait()
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"the server did not start: {' '.join(tail) or line.strip()}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def _start_server(store: Path, *, ram_budget: int, max_queue: int, logfile: Path) -> tuple[subprocess.Popen, str]:
    args = [str(store), "--port", "0", "--model-name", "soak", "--ram-budget", str(ram_budget)]
    return start_serve([*args, "--max-queue", str(max_queue)], logfile=logfile)


def _client_loop(
    base_url: str, index: int, *, t0: float, deadline: float, max_tokens: int, out: list, stop: threading.Event
) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="soak", max_retries=0, timeout=300)
    rng = random.Random(index)
    while time.monotonic() < deadline and not stop.is_set():
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        kind = ("chat" if chat else "completion") + ("-stream" if stream else "")
        prompt = rng.choice(PROMPTS) + f" ({rng.randrange(10**6)})"
        kw = {"model": "soak", "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.7])}
        start = time.monotonic()
        try:
            if chat:
                create, kw["messages"] = client.chat.completions.create, [{"role": "user", "content": prompt}]
            else:
                create, kw["prompt"] = client.completions.create, prompt
            if stream:  # the last chunk carries the usage (stream_options.include_usage)
                tokens = list(create(stream=True, stream_options={"include_usage": True}, **kw))[-1].usage
            else:
                tokens = create(**kw).usage
            tokens = tokens.completion_tokens
            out.append(Outcome(start - t0, time.monotonic() - start, kind, True, tokens))
        except Exception as e:  # noqa: BLE001 - counted and reported, the soak goes on
            out.append(Outcome(start - t0, time.monotonic() - start, kind, False, error=f"{type(e).__name__}: {e}"))
    client.close()


def _metric_totals(base_url: str) -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()) if k != "le")
            if not s.name.endswith("_bucket") and not s.name.endswith("_created"):
                totals[key] = totals.get(key, 0.0) + s.value
    return totals


def run_soak(
    store: Path,
    *,
    clients: int,
    seconds: float,
    ram_budget: int,
    max_tokens: int = 32,
    warmup_s: float = 20.0,
    rss_bound_bytes: int = 64 * 2**20,
    logdir: Path,
    progress=None,
) -> dict:
    import psutil

    logdir.mkdir(parents=True, exist_ok=True)
    proc, base_url = _start_server(store, ram_budget=ram_budget, max_queue=2 * clients, logfile=logdir / "serve.log")
    server = psutil.Process(proc.pid)
    samples: list[tuple[float, int]] = []
    outcomes: list[Outcome] = []
    stop, threads = threading.Event(), []  # stop: the clients end early (this benchmark was stopped)
    try:
        t0 = time.monotonic()
        samples.append((0.0, server.memory_info().rss))
        deadline = t0 + seconds
        threads = [
            threading.Thread(target=_client_loop, args=(base_url, i), kwargs={"t0": t0, "deadline": deadline,
                             "max_tokens": max_tokens, "out": outcomes, "stop": stop})
            for i in range(clients)
        ]  # fmt: skip
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            samples.append((time.monotonic() - t0, server.memory_info().rss))
            if progress is not None:
                progress(min(time.monotonic() - t0, seconds), len(outcomes))
        for t in threads:
            t.join()
        samples.append((time.monotonic() - t0, server.memory_info().rss))
        totals = _metric_totals(base_url)
    finally:
        stop.set()  # then the server drains its open responses (serve's own grace) and the clients end
        proc.terminate()
        try:
            returncode = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        for t in threads:
            if t.ident is not None:
                t.join()
    return _summary(outcomes, samples, totals, clients=clients, seconds=seconds, warmup_s=warmup_s,
                    rss_bound_bytes=rss_bound_bytes, returncode=returncode, max_tokens=max_tokens)  # fmt: skip


def _summary(outcomes, samples, totals, *, clients, seconds, warmup_s, rss_bound_bytes, returncode, max_tokens) -> dict:
    ok = [o for o in outcomes if o.ok]
    lat = np.array([o.seconds for o in ok]) if ok else np.zeros(1)
    t, rss = np.array([s[0] for s in samples]), np.array([s[1] for s in samples], dtype=np.float64)
    after = t >= warmup_s
    warm_rss = float(rss[after][0]) if after.any() else float(rss[0])
    slope = float(np.polyfit(t[after], rss[after], 1)[0]) * 60 if after.sum() >= 3 else 0.0
    growth = float(rss[-1] - warm_rss)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error.split(":")[0]] = errors.get(o.error.split(":")[0], 0) + 1
    tokens = sum(o.completion_tokens for o in ok)
    by_kind = {}
    for kind in sorted({o.kind for o in outcomes}):
        k = [o.seconds for o in ok if o.kind == kind]
        by_kind[kind] = {"requests": len(k), "p50_s": float(np.percentile(k, 50)) if k else None}
    return {
        "bench": "soak",
        "clients": clients,
        "seconds": seconds,
        "max_tokens": max_tokens,
        "requests": len(outcomes),
        "served": len(ok),
        "errors": len(outcomes) - len(ok),
        "errors_by_type": errors,
        "first_errors": [o.error for o in outcomes if not o.ok][:5],
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "latency_max_s": float(lat.max()),
        "by_kind": by_kind,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "requests_per_s": len(ok) / seconds,
        "rss_start_bytes": int(rss[0]),
        "rss_after_warmup_bytes": int(warm_rss),
        "rss_end_bytes": int(rss[-1]),
        "rss_max_bytes": int(rss.max()),
        "warmup_s": warmup_s,
        "rss_growth_after_warmup_bytes": int(growth),
        "rss_slope_after_warmup_bytes_per_min": slope,
        "rss_bound_bytes": rss_bound_bytes,
        "rss_within_bound": growth <= rss_bound_bytes,
        "rss_samples": [[round(a, 2), int(b)] for a, b in samples],
        "server_metrics": {k: v for k, v in totals.items() if k.startswith("flashmesh_") and "_seconds" not in k},
        "server_exit_code": returncode,
        "latencies": [[round(o.started, 3), round(o.seconds, 4), o.kind, o.ok] for o in outcomes],
    }


def plot_soak(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t, rss = zip(*result["rss_samples"], strict=True)
    a.plot(t, [r / 2**20 for r in rss])
    a.axvline(result["warmup_s"], ls="--", c="grey")
    a.set_ylabel("server RSS (MiB)")
    a.set_title(f"soak: {result['clients']} clients, {result['seconds'] / 60:.0f} min, {result['served']} requests")
    for kind in sorted({row[2] for row in result["latencies"]}):
        rows = [r for r in result["latencies"] if r[2] == kind and r[3]]
        b.scatter([r[0] for r in rows], [r[1] for r in rows], s=4, label=kind)
    b.set_ylabel("latency (s)")
    b.set_xlabel("time (s)")
    b.legend(fontsize=7)
    return save_plot(fig, path, dpi=110)
