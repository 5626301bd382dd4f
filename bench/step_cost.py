"""`python -m bench.step_cost STORE --source SRC`: one decode step's cost, engine vs mlx-lm, robust to load.

Everything fits (`--preload`); both models in one process. Three checks of where the engine's
decode could cost more than mlx-lm's:

- graph: one decode step's lazy graph (`mx.export_to_dot` of the logits), node and edge counts;
- threads: CPU ticks per thread (/proc) over one generation: which threads work during decode;
- step: decode steps pipelined as mlx-lm's generate_step does (`async_eval` of step n+1, then
  `.item()` of step n) on a KV cache trimmed back after each block, in alternating blocks; the
  minimum and lower quartile over blocks of the main thread's and the process's CPU per step.
  Other jobs only ever add time, so the minimum is the figure least moved by a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def graph_counts(model, ids) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(ids, cache=cache))
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, model(mx.array([[5]]), cache=cache))
        dot = Path(f.name).read_text()
    labels = re.findall(r'label\s*=\s*"(\w*)', dot)
    return {"nodes": len(labels), "edges": dot.count("->"), "ops": dict(Counter(labels).most_common())}


def thread_ticks() -> dict[str, int]:
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{tid}:{names.get(tid, 'native')}"] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


def pipelined_block(model, cache, *, steps: int, stream) -> tuple[float, float, float]:
    """Seconds per step (wall, main thread CPU, process CPU) of `steps` pipelined decode steps."""
    import mlx.core as mx
    from mlx_lm.models.cache import trim_prompt_cache

    def step(y):
        with mx.stream(stream):
            return mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1)

    start = (time.perf_counter(), time.thread_time(), time.process_time())
    y = mx.array([7])
    mx.async_eval(y)
    for _ in range(steps):
        following = step(y)
        mx.async_eval(following)
        y.item()
        y = following
    y.item()
    end = (time.perf_counter(), time.thread_time(), time.process_time())
    trim_prompt_cache(cache, steps)
    return tuple((b - a) / steps for a, b in zip(start, end, strict=True))


def run(store: Path, source: Path, *, blocks: int, steps: int) -> dict:
    import mlx.core as mx
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.generate import encode_prompt
    from flashmesh.coordinator.options import ModelOptions
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from bench.decode import PROMPT
    from bench.overhead import timed_generate

    reference, tokenizer = load(str(source))
    engine = open_model(ModelOptions(store=store, preload=True))
    models = {"mlx_lm": reference, "engine": engine.model}
    ids = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog and then")])
    prompt = encode_prompt(tokenizer, PROMPT, chat=False)
    result: dict = {"bench": "step_cost", "store": str(store), "source": str(source), "graph": {}, "threads": {}}
    for name, model in models.items():
        result["graph"][name] = graph_counts(model, ids)
        timed_generate(model, tokenizer, prompt, max_tokens=4)
        before = thread_ticks()
        timed_generate(model, tokenizer, prompt, max_tokens=48)
        after = thread_ticks()
        result["threads"][name] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    stream = mx.new_stream(mx.default_device())
    caches = {}
    for name, model in models.items():
        caches[name] = make_prompt_cache(model)
        mx.eval(model(ids, cache=caches[name]))
        pipelined_block(model, caches[name], steps=3, stream=stream)
    samples: dict[str, list[tuple[float, float, float]]] = {n: [] for n in models}
    for b in range(blocks):
        for name in models if b % 2 == 0 else reversed(list(models)):
            samples[name].append(pipelined_block(models[name], caches[name], steps=steps, stream=stream))
    result["step_ms"] = {}
    for i, what in enumerate(("wall", "main_cpu", "process_cpu")):
        for name, rows in samples.items():
            v = sorted(r[i] * 1e3 for r in rows)
            result["step_ms"].setdefault(name, {})[what] = {
                "min": v[0],
                "q1": v[len(v) // 4],
                "median": statistics.median(v),
            }
    for what in ("main_cpu", "process_cpu"):
        e, r = result["step_ms"]["engine"][what], result["step_ms"]["mlx_lm"][what]
        result[f"engine_over_mlx_lm_{what}_min"] = e["min"] / r["min"]
        result[f"engine_over_mlx_lm_{what}_q1"] = e["q1"] / r["q1"]
    result["blocks"], result["steps_per_block"] = blocks, steps
    engine.close()
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("--source", type=Path, required=True, help="the unpacked model, for mlx-lm")
    p.add_argument("--blocks", type=int, default=40, help="blocks per model, alternating")
    p.add_argument("--steps", type=int, default=12, help="decode steps per block")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    from bench.cli import write_result

    result = run(args.store, args.source, blocks=args.blocks, steps=args.steps)
    path = write_result(args.name or f"step-cost-{args.store.name}", result)
    shown = {k: v for k, v in result.items() if k not in ("graph", "store", "source")}
    shown["graph"] = {n: {"nodes": g["nodes"], "edges": g["edges"]} for n, g in result["graph"].items()}
    print(json.dumps(shown, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
