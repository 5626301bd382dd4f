"""`python -m bench.instructions STORE --source SRC`: instructions per decoded token, engine vs mlx-lm.

Wall and CPU time on the shared 2-core VM swing 0.5-2x from one round to the next; the number of
instructions a generation executes does not. A child process runs under valgrind's callgrind with
instrumentation off until mlx-lm's model and the engine (`--budget`; default everything fits,
`--preload`) are loaded and warm, then generates the same greedy tokens with each, twice: `short`
tokens and `short + N`; callgrind dumps its counters after every generation, per thread. Per
decoded token = (long - short) / N, so the prefill cancels. Equal counts say the engine adds no
work; a CPU-time gap with equal counts is the machine (caches, scheduling, other jobs), not the
code. Needs valgrind (Debian: `apt-get install valgrind`); about 4 minutes per 10 tokens per model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDER = ("mlx_lm", "engine")


def _child(store: Path, source: Path, short: int, extra: int, budget: float) -> None:
    import resource

    resource.setrlimit = lambda *a: None  # mlx-lm raises the fd limit at import; valgrind forbids it
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.generate import encode_prompt
    from flashmesh.coordinator.options import ModelOptions
    from flashmesh.node.store_format import Manifest
    from mlx_lm import load

    from bench.decode import PROMPT
    from bench.overhead import timed_generate

    reference, tokenizer = load(str(source))
    manifest = Manifest.load(store)
    ram_budget = max(int(manifest.expert_bytes_total * budget), manifest.min_budget_bytes)
    engine = open_model(ModelOptions(store=store, ram_budget=ram_budget, preload=budget >= 1))
    models = dict(zip(ORDER, (reference, engine.model), strict=True))
    prompt = encode_prompt(tokenizer, PROMPT, chat=False)[:16]
    for model in models.values():
        timed_generate(model, tokenizer, prompt, max_tokens=4)

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, stdout=subprocess.DEVNULL)
        time.sleep(0.5)  # callgrind acts on the command at its next poll

    control("-i", "on")
    control("-z")
    tokens = {}
    for name, model in models.items():
        for count in (short, short + extra):
            tokens[name, count] = timed_generate(model, tokenizer, prompt, max_tokens=count)["tokens"]
            control(f"--dump={name}-{count}")
    print(json.dumps({"tokens_equal": all(tokens[ORDER[0], n] == tokens[ORDER[1], n] for n in (short, short + extra))}))


def _totals(out_dir: Path, pid: int) -> list[dict[int, int]]:
    """Per dump (in order): thread number -> instructions (callgrind's `summary:` line)."""
    parts: dict[int, dict[int, int]] = {}
    for f in out_dir.glob(f"cg.{pid}.*-*"):
        m = re.fullmatch(rf"cg\.{pid}\.(\d+)-(\d+)", f.name)
        summary = re.search(r"^summary:\s*(\d+)", f.read_text(errors="replace"), re.M)
        if m and summary:
            parts.setdefault(int(m[1]), {})[int(m[2])] = int(summary[1])
    return [parts[k] for k in sorted(parts)]


def run(store: Path, source: Path, *, short: int, extra: int, budget: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fm-instructions-") as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            str(store),
            "--source",
            str(source),
            "--short",
            str(short),
            "--extra",
            str(extra),
            "--budget",
            str(budget),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode}): {err[-2000:]}")
        pid = proc.pid  # valgrind execs the program in place: the dumps carry this pid
        dumps = _totals(Path(tmp), pid)[: 2 * len(ORDER)]
    result: dict = {
        "bench": "instructions",
        "store": str(store),
        "source": str(source),
        "budget_fraction": budget,
        "decoded_tokens": extra,
    }
    for i, name in enumerate(ORDER):
        short_run, long_run = dumps[2 * i], dumps[2 * i + 1]  # callgrind zeroes its counters at each dump
        main = (long_run.get(1, 0) - short_run.get(1, 0)) / extra  # thread 1: the main thread
        total = (sum(long_run.values()) - sum(short_run.values())) / extra
        result[name] = {"main_thread_per_token": main, "all_threads_per_token": total}
    result.update(json.loads(out.strip().splitlines()[-1]))
    result["engine_over_mlx_lm_all_threads"] = (
        result["engine"]["all_threads_per_token"] / result["mlx_lm"]["all_threads_per_token"]
    )
    result["engine_over_mlx_lm_main_thread"] = (
        result["engine"]["main_thread_per_token"] / result["mlx_lm"]["main_thread_per_token"]
    )
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("--source", type=Path, required=True, help="the unpacked model, for mlx-lm")
    p.add_argument("--short", type=int, default=2, help="tokens of the generation whose count is subtracted")
    p.add_argument("--extra", type=int, default=8, help="decoded tokens counted")
    p.add_argument("--budget", type=float, default=1.0, help="fraction of the expert bytes (1: --preload)")
    p.add_argument("--name", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.store, args.source, args.short, args.extra, args.budget)
        return 0
    from bench.cli import write_result

    result = run(args.store, args.source, short=args.short, extra=args.extra, budget=args.budget)
    path = write_result(args.name or f"instructions-{args.store.name}", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("store", "source")}, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
