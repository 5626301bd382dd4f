"""This machine's figures for `bench plan-validate`, taken immediately before each measured run.

Two probe processes stay up for the whole validation, idle between probes, so that a figure costs
about half a second and can be taken with one process alone or with both at once (what two node
processes on one machine get each: a process alone does not use both cores fully):

- compute: GB/s of fp32 expert weights mlx-lm's SwitchGLU (random weights) multiplies for one
  token, at a given expert shape: each validated model's own (with random weights), as a figure
  from a third shape need not carry over (`python -m bench.plan_probes --shapes` compares them);
- dense: GB/s of fp32 weights an mlx Linear multiplies for one token (D=1536 -> 4D), the
  coordinator's attention and projections;
- flash: GB/s of the engine's O_DIRECT record reads of one store at the queue depth a decode layer
  reads at (its expected misses), plain reads as a layer's cache misses are (bench/io.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBE_SECONDS = 0.6
_BUILT: dict = {}  # this probe process's modules


GLU_SHAPE = (1536, 768, 32, 6)  # hidden, expert FFN width, experts, k: neither validated model's


def compute_gbps(*, shape: tuple = GLU_SHAPE, seconds: float = PROBE_SECONDS, seed: int = 0) -> float:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.switch_layers import SwitchGLU

    d, f, experts, k = shape
    key = ("glu", *shape)
    if key not in _BUILT:  # built once per process: initialising hundreds of MB of weights takes seconds
        mx.random.seed(seed)
        _BUILT[key] = SwitchGLU(d, f, experts)
        mx.eval(_BUILT[key].parameters())
    glu = _BUILT[key]
    x = mx.random.normal((1, 1, d))
    rng = np.random.default_rng(seed)
    mx.eval(glu(x, mx.array(rng.choice(experts, k, replace=False)[None, None])))
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        idx = mx.array(rng.choice(experts, k, replace=False)[None, None])
        start = time.perf_counter()
        mx.eval(glu(x, idx))
        times.append(time.perf_counter() - start)
    return k * 3 * d * f * 4 / statistics.median(times) / 1e9


def dense_gbps(*, seconds: float = PROBE_SECONDS, seed: int = 0) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    d = 1536
    if "linear" not in _BUILT:
        mx.random.seed(seed)
        _BUILT["linear"] = nn.Linear(d, 4 * d, bias=False)
        mx.eval(_BUILT["linear"].parameters())
    linear = _BUILT["linear"]
    x = mx.random.normal((1, 1, d))
    mx.eval(linear(x))
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        x = x + 1
        start = time.perf_counter()
        mx.eval(linear(x))
        times.append(time.perf_counter() - start)
    return 4 * d * d * 4 / statistics.median(times) / 1e9


def flash_gbps(*, store: str, queue_depth: int, seconds: float = PROBE_SECONDS, seed: int = 0) -> float:
    from flashmesh.node.store_format import Manifest

    from bench.io import engine_randread

    layer = Manifest.load(Path(store)).layers[0].layer
    return engine_randread(
        Path(store), layer, queue_depth=queue_depth, seconds=seconds, verify=True, pipelined=False, seed=seed
    )


_PROBES = {"compute": compute_gbps, "dense": dense_gbps, "flash": flash_gbps}


class Probes:
    """Probe processes (`python -m bench.plan_probes`, one JSON request per line on stdin, one figure
    per line on stdout); `take(kind, processes=n)` runs a probe in n of them at once, each one's GB/s."""

    def __init__(self, count: int = 2) -> None:
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.plan_probes"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )  # fmt: skip
            for _ in range(count)
        ]

    def take(self, kind: str, *, processes: int = 1, **kwargs) -> list[float]:
        procs = self._procs[:processes]
        for i, proc in enumerate(procs):
            proc.stdin.write(json.dumps([kind, {**kwargs, "seed": i}]) + "\n")
        answers = [proc.stdout.readline() for proc in procs]
        if not all(answers):
            raise RuntimeError("a plan probe process died (see its stderr above)")
        return [float(a) for a in answers]

    def close(self) -> None:
        for proc in self._procs:
            proc.stdin.close()
        for proc in self._procs:
            proc.wait(timeout=30)

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SHAPES = {  # the validated models' expert shapes beside the third one (docs/plan.md)
    "realistic-big": (1024, 512, 64, 8), "trained-tiny": (128, 64, 32, 4), "third shape": GLU_SHAPE,
}  # fmt: skip


def compare_shapes(*, rounds: int = 7) -> dict[str, dict]:
    """SwitchGLU GB/s at each of SHAPES in alternating short trials: median, and the median and range
    of its ratio to the third shape within a round (the ratio is what a shared machine leaves fair)."""
    rates = {name: [] for name in SHAPES}
    for r in range(rounds):
        for name, shape in SHAPES.items():
            rates[name].append(compute_gbps(shape=shape, seconds=0.3, seed=r))
    third = rates["third shape"]
    out = {}
    for name, got in rates.items():
        ratios = [a / b for a, b in zip(got, third, strict=True)]
        out[name] = {"median_gbps": statistics.median(got), "ratio_to_third": statistics.median(ratios),
                     "ratio_range": [min(ratios), max(ratios)]}  # fmt: skip
    return out


def main() -> None:
    if sys.argv[1:] == ["--shapes"]:  # python -m bench.plan_probes --shapes
        print(json.dumps(compare_shapes(), indent=1))
        return
    for line in sys.stdin:
        kind, kwargs = json.loads(line)
        print(_PROBES[kind](**kwargs), flush=True)


if __name__ == "__main__":
    main()
