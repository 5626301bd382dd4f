"""Continuous batching in `flashmesh serve`: aggregate decode tok/s, expert bytes read per generated
token, time to first token and inter-token latency with 1, 2, 4, 8 concurrent streams, experts
in-process or on local node processes; and a conversation's second-turn time to first token
with and without the prompt cache.

    python -m bench serving STORE [--streams 1,2,4,8] [--nodes 0] [--rounds 3] [--max-tokens 32]
    python -m bench serving STORE --second-turn [--context 1000]

The streams go straight to the server's GenerationWorker (what the HTTP routes submit), so client
threads and HTTP cost nothing on the 2-core VM; every figure is a ratio to one stream measured in
the same run, concurrencies in alternating order round by round, medians over rounds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flashmesh.coordinator.api.jobs import DoneEvent, ErrorEvent, TextEvent
from flashmesh.coordinator.api.worker import GenerationWorker
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest

from bench.plots import save_plot

log = logging.getLogger(__name__)

# 36 distinct openings (more than the largest concurrency): two streams with the same prompt would
# route to the same experts and flatter the bytes read per token.
PROMPTS = [
    "The Python interpreter reads",
    "A list is a sequence of",
    "To open a file, use the",
    "The with statement",
    "Exceptions are raised when",
    "A dictionary maps keys to",
    "The os module provides",
    "Classes define new types",
    "The for loop iterates over",
    "Strings are immutable sequences",
    "The import system finds",
    "A generator yields",
    "The json module encodes",
    "Threads share memory, so",
    "Decorators wrap a function",
    "The socket module gives",
    "A tuple is an immutable",
    "The re module matches",
    "Integers have unlimited",
    "The subprocess module runs",
    "A set holds unique",
    "The logging module records",
    "Slicing a sequence returns",
    "The argparse module parses",
    "A lambda expression creates",
    "The pathlib module offers",
    "Coroutines are declared with",
    "The datetime module supplies",
    "A module is a file containing",
    "The unittest framework",
    "Keyword arguments are passed",
    "The collections module implements",
    "The asyncio event loop",
    "Floating point numbers are",
    "The itertools module",
    "A virtual environment is",
]


@dataclass
class Stream:
    submitted: float
    times: list[float] = field(default_factory=list)  # one per generated token (tokens of one event share it)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def on_event(self, event) -> None:  # on the worker thread
        now = time.perf_counter()
        if isinstance(event, TextEvent):
            self.times += [now] * (event.completion_tokens - len(self.times))
        elif isinstance(event, DoneEvent):
            self.times += [now] * (len(event.stats.tokens) - len(self.times))
            self.done.set()
        elif isinstance(event, ErrorEvent):
            self.error = event.error
            self.done.set()


def run_streams(worker: GenerationWorker, prompts: list[str], *, max_tokens: int) -> dict:
    """`prompts` submitted at once, greedy, up to `max_tokens` each (no logits processor: the batch
    samples in one call, as most requests do)."""
    tokenizer = worker.tokenizer
    params = SamplingParams(max_tokens=max_tokens)
    backend = worker.streaming.backend
    before = backend.stats()
    streams = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for p in prompts:
        s = Stream(time.perf_counter())
        worker.submit(tokenizer.encode(p), params, s.on_event)
        streams.append(s)
    for s in streams:
        s.done.wait(600)
        if s.error is not None:
            raise s.error
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    used = backend.stats().since(before).total
    tokens = sum(len(s.times) for s in streams)
    # Decode: every token after each stream's first, over the span from the first first token to the
    # last token (joins and leaves included: what serving these streams together achieves).
    first, last = min(s.times[0] for s in streams), max(s.times[-1] for s in streams)
    decoded = tokens - len(streams)
    itl = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if b > a]
    return {
        "streams": len(prompts),
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "aggregate_decode_tokens_per_s": decoded / (last - first) if last > first else 0.0,
        "expert_bytes_read": used.bytes_read,
        "bytes_read_per_token": used.bytes_read / max(1, tokens),
        # This process's CPU seconds (all its threads; not the nodes'): what other engineers' load
        # does not change, unlike wall time, so the CPU cost of batching shows through the noise.
        "cpu_s_per_token": cpu / max(1, tokens),
        "cache_hit_rate": used.hit_rate,
        "ttft_s": [s.times[0] - s.submitted for s in streams],
        "itl_s": itl,
    }


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))} if values else {}


def run_batching_bench(
    store: Path,
    *,
    streams: tuple[int, ...],
    rounds: int,
    max_tokens: int,
    budget: int,
    nodes: int = 0,
    workdir: Path | None = None,
    progress=None,
) -> dict:
    """Alternating rounds over the concurrencies; medians and ratios to one stream."""
    with _opened(store, budget=budget, nodes=nodes, workdir=workdir, max_batch=max(streams)) as worker:
        run_streams(worker, PROMPTS[: max(streams)], max_tokens=max_tokens)  # warm-up: caches, allocator
        trials: dict[int, list[dict]] = {c: [] for c in streams}
        for r in range(rounds):
            for c in streams if r % 2 == 0 else tuple(reversed(streams)):
                prompts = [PROMPTS[(r * max(streams) + i) % len(PROMPTS)] for i in range(c)]
                trials[c].append(run_streams(worker, prompts, max_tokens=max_tokens))
                if progress is not None:
                    progress()
    rows = []
    for c in streams:
        t = trials[c]
        rows.append(
            {
                "streams": c,
                "aggregate_decode_tokens_per_s": float(np.median([x["aggregate_decode_tokens_per_s"] for x in t])),
                "aggregate_tokens_per_s": float(np.median([x["aggregate_tokens_per_s"] for x in t])),
                "bytes_read_per_token": float(np.median([x["bytes_read_per_token"] for x in t])),
                "cpu_s_per_token": float(np.median([x["cpu_s_per_token"] for x in t])),
                "cache_hit_rate": float(np.median([x["cache_hit_rate"] for x in t])),
                "ttft_s": _percentiles([v for x in t for v in x["ttft_s"]]),
                "itl_s": _percentiles([v for x in t for v in x["itl_s"]]),
            }
        )
    # Ratios to one stream paired within each round (the disk swings several-fold between rounds here).
    base = trials[streams[0]]
    for row, c in zip(rows, streams, strict=True):
        pairs = list(zip(trials[c], base, strict=True))
        row["decode_speedup_vs_1"] = float(
            np.median([x["aggregate_decode_tokens_per_s"] / y["aggregate_decode_tokens_per_s"] for x, y in pairs])
        )
        row["bytes_per_token_vs_1"] = float(
            np.median([x["bytes_read_per_token"] / max(1e-9, y["bytes_read_per_token"]) for x, y in pairs])
        )
        row["cpu_per_token_vs_1"] = float(np.median([x["cpu_s_per_token"] / y["cpu_s_per_token"] for x, y in pairs]))
    manifest = Manifest.load(store)
    return {
        "store": str(store),
        "nodes": nodes,
        "ram_budget_bytes": budget,
        "expert_bytes_total": manifest.expert_bytes_total,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "rows": rows,
        "trials": {str(c): [{k: v for k, v in x.items() if k != "itl_s"} for x in trials[c]] for c in streams},
    }


def run_second_turn_bench(store: Path, *, budget: int, rounds: int, context: int, reply_tokens: int = 32) -> dict:
    """A conversation of about `context` tokens: time to first token of its second turn with the
    prompt cache (the first turn's KV reused) against its first turn and against the same second
    turn on a server without a prompt cache; alternating rounds, a fresh conversation each round."""
    with (
        _opened(store, budget=budget, max_batch=1, prompt_cache=8) as cached,
        _opened(store, budget=budget, max_batch=1, prompt_cache=0) as uncached,
    ):
        tokenizer = cached.tokenizer
        rows = []
        for r in range(rounds + 1):  # round 0 warms both up
            words = " ".join(PROMPTS[(r + i) % len(PROMPTS)] for i in range(context))
            body = tokenizer.decode(tokenizer.encode(f"Conversation {r}. {words}")[: context - 16])
            first = [{"role": "user", "content": body}]
            t1, reply, n1 = _turn(cached, first, reply_tokens)
            second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            order = (cached, uncached) if r % 2 == 0 else (uncached, cached)
            ttft = {id(w): _turn(w, second, 1)[0] for w in order}
            if r:
                rows.append(
                    {
                        "first_turn_ttft_s": t1,
                        "first_turn_prompt_tokens": n1,
                        "second_turn_cached_ttft_s": ttft[id(cached)],
                        "second_turn_uncached_ttft_s": ttft[id(uncached)],
                    }
                )
    med = {k: float(np.median([row[k] for row in rows])) for k in rows[0]}
    return {
        "store": str(store),
        "ram_budget_bytes": budget,
        "rounds": rounds,
        "rows": rows,
        "median": med,
        "cached_second_over_first": float(
            np.median([x["second_turn_cached_ttft_s"] / x["first_turn_ttft_s"] for x in rows])
        ),
        "cached_over_uncached_second": float(
            np.median([x["second_turn_cached_ttft_s"] / x["second_turn_uncached_ttft_s"] for x in rows])
        ),
        "prompt_cache": {
            "hits": cached.prompt_cache.stats.hits,
            "tokens_reused": cached.prompt_cache.stats.tokens_reused,
        },
    }


def _turn(worker: GenerationWorker, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(time to first token, the reply's text, prompt tokens) of one greedy chat turn."""
    prompt = worker.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    s = Stream(time.perf_counter())
    text: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, TextEvent):
            text.append(event.text)
        s.on_event(event)

    worker.submit(prompt, SamplingParams(max_tokens=max_tokens), on_event)
    s.done.wait(600)
    if s.error is not None:
        raise s.error
    return s.times[0] - s.submitted, "".join(text), len(prompt)


class _opened:
    """A started GenerationWorker over the store, experts in-process or on `nodes` local node
    processes (each with `budget` split by shard); closed (and the nodes stopped) on exit."""

    def __init__(
        self,
        store: Path,
        *,
        budget: int,
        nodes: int = 0,
        workdir: Path | None = None,
        max_batch: int = 8,
        prompt_cache: int = 0,
    ) -> None:
        self.store, self.budget, self.nodes, self.workdir = store, budget, nodes, workdir
        self.max_batch, self.prompt_cache = max_batch, prompt_cache
        self._stack = []

    def __enter__(self) -> GenerationWorker:
        from contextlib import ExitStack

        stack = self._stack = ExitStack()
        if self.nodes:
            from flashmesh.testing.local_nodes import ensure_dense, ensure_shards, local_nodes

            workdir = self.workdir or Path(".flashmesh/bench-serving")
            shards = ensure_shards(self.store, workdir, count=self.nodes)
            dense = ensure_dense(self.store, workdir / "dense")
            total = Manifest.load(self.store).expert_bytes_total
            budgets = []
            for shard in shards:  # each node the same share of the experts its shard holds
                m = Manifest.load(shard)
                held = sum(len(spec.experts) * spec.record_size for spec in m.layers)
                budgets.append(max(int(held * self.budget / total), m.min_budget_bytes))
            addresses = stack.enter_context(
                local_nodes(shards, budgets=budgets, token="bench", logdir=workdir / "logs")
            )
            options = ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token="bench")
        else:
            options = ModelOptions(store=self.store, ram_budget=self.budget)
        worker = GenerationWorker(
            lambda: open_model(options), max_queue=64, max_batch=self.max_batch, prompt_cache_entries=self.prompt_cache
        ).start()
        stack.callback(worker.close)
        return worker

    def __exit__(self, *exc) -> None:
        self._stack.close()


def plot_batching(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    streams = [r["streams"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(streams, [r["decode_speedup_vs_1"] for r in rows], "o-", label="measured")
    if all("cpu_per_token_vs_1" in r for r in rows):  # what the CPU alone allows, load aside
        a.plot(streams, [1 / r["cpu_per_token_vs_1"] for r in rows], "s--", label="1 / (CPU per token, x one)")
    a.plot(streams, streams, ":", color="gray", label="linear")
    a.set(xlabel="concurrent streams", ylabel="aggregate decode tok/s / one stream's", xscale="log", yscale="log")
    a.set_xticks(streams, [str(s) for s in streams])
    a.legend()
    b.plot(streams, [r["bytes_read_per_token"] / 1e6 for r in rows], "o-")
    b.set(xlabel="concurrent streams", ylabel="expert MB read per generated token", xscale="log")
    b.set_xticks(streams, [str(s) for s in streams])
    where = f"{result['nodes']} local nodes" if result["nodes"] else "experts in-process"
    fig.suptitle(
        f"{Path(result['store']).name}, {where}, budget {result['ram_budget_bytes'] / result['expert_bytes_total']:.0%}"
    )
    return save_plot(fig, path, dpi=110)
