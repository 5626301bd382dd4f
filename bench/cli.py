"""`python -m bench ...` (from a checkout): benchmarks that write their results to bench/results/*.json.

Benchmarks never run in the test suite. Every figure they report is a ratio measured inside one
run (engine vs fio, streamed vs in-RAM), never a bare time compared across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from collections.abc import Callable
from pathlib import Path

# Under the current directory: run from the repository root, results land in the repository's bench/results.
RESULTS = Path("bench/results")
DEMO_WORKDIR = Path(".flashmesh/demo")


def write_result(name: str, result: dict, *, out: Path | None = None) -> Path:
    """Write `result` (plus host facts) to bench/results/<name>.json; return the path."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **result,
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def write_plotted(name: str, result: dict, plot: Callable[[dict, Path], Path]) -> Path:
    """`plot(result, path)` into bench/results/<name>.png, named in the result as "plot"; then write_result."""
    result["plot"] = str(plot(result, RESULTS / f"{name}.png"))
    return write_result(name, result)


def _store_or_demo(store: Path | None) -> Path:
    if store is not None:
        return store
    from flashmesh.testing.demo import prepare_demo

    built, _ = prepare_demo(DEMO_WORKDIR, show_progress=False)
    return built


def cmd_io(args: argparse.Namespace) -> int:
    from bench.io import SIDES, plot_io, run_io_bench

    store = _store_or_demo(args.store)
    qds = tuple(int(q) for q in args.queue_depths.split(","))
    result = run_io_bench(
        store,
        queue_depths=qds,
        seconds=args.seconds,
        rounds=args.rounds,
        verify=not args.no_verify,
        aio=args.reader != "threads",
        huge_pages=args.pages != "small",
        compare=tuple(
            side for side, on in (("threads", args.reader == "both"), ("small_pages", args.pages == "both")) if on
        ),
    )
    name = args.name or f"io-{store.name}"
    path = write_plotted(name, result, plot_io)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"store {store} ({result['record_bytes']} B records, file {result['file_bytes'] / 1e6:.1f} MB), "
            f"read by {result['reader']} into {result['slots']} slots"
            f" ({'huge pages where Linux has them' if result['huge_pages'] else '4 KiB pages'})"
        )
        print("paired = median over rounds of each engine trial / the fio trial just before it")
        print(f"{'qd':>4} {'fio GB/s':>10} {'engine GB/s':>12} {'ratio':>7} {'paired':>7} {'sync GB/s':>10}")
        for qd in qds:
            f, e = result["fio_gbps_by_qd"][str(qd)], result["engine_gbps_by_qd"][str(qd)]
            y, pr = result["engine_sync_gbps_by_qd"][str(qd)], result["paired_ratio_by_qd"][str(qd)]
            print(f"{qd:>4} {f:>10.3f} {e:>12.3f} {e / f if f else 0:>7.2f} {pr:>7.2f} {y:>10.3f}")
        for side, (_, over, label) in SIDES.items():
            if f"{side}_paired_ratio_by_qd" in result:
                tp, ab = result[f"{side}_paired_ratio_by_qd"], result[f"{over}_over_{side}_by_qd"]
                print(f"{label}, same rounds: paired " + ", ".join(f"qd {q} {tp[str(q)]:.2f}" for q in qds))
                print(f"{over} / {side}, trial by trial: " + ", ".join(f"qd {q} {ab[str(q)]:.2f}" for q in qds))
        print(
            f"best: engine {result['engine_gbps']:.3f} GB/s / fio {result['fio_gbps']:.3f} GB/s = {result['ratio']:.2f}"
        )
        print(f"written to {path}")
    return 0


def cmd_io_footprint(args: argparse.Namespace) -> int:
    from bench.io_footprint import plot_footprint, run_footprint_bench

    store = _store_or_demo(args.store)
    result = run_footprint_bench(
        store, out_dir=RESULTS / "tmp", queue_depth=args.queue_depth, seconds=args.seconds, rounds=args.rounds
    )
    name = args.name or f"io-footprint-{store.name}"
    path = write_plotted(name, result, plot_footprint)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"store {store} ({result['record_bytes']} B records), queue depth {result['queue_depth']}")
    print(f"{'reader':<24} {'buffers':>8} {'of fio':>7}")
    for reader, ratio in result["ratio_to_fio"].items():
        print(f"{reader:<24} {result['buffers'][reader]:>8} {ratio:>7.2f}")
    print(f"engine / the loop at the engine's footprint, huge pages: {result['engine_over_loop_at_its_footprint']:.2f}")
    print(f"written to {path}")
    return 0


def _budget(store: Path, text: str | None, *, fraction: float) -> int:
    from flashmesh.node.store_format import Manifest
    from flashmesh.protos.sizes import parse_bytes

    manifest = Manifest.load(store)
    if text is not None:
        return parse_bytes(text)
    return max(int(manifest.expert_bytes_total * fraction), manifest.min_budget_bytes)


def cmd_prefetch(args: argparse.Namespace) -> int:
    from bench.engine import run_prefetch_bench

    store = _store_or_demo(args.store)
    budget = _budget(store, args.ram_budget, fraction=0.25)
    result = run_prefetch_bench(store, ram_budget=budget, max_tokens=args.max_tokens, repeats=args.repeats)
    path = write_result(args.name or f"prefetch-{store.name}", result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"store {store}, budget {budget / 2**20:.0f} MiB of {result['expert_bytes_total'] / 2**20:.0f} MiB")
    print(f"{'config':>8} {'tok/s':>7} {'x base':>7} {'hit':>6} {'covered':>8} {'waste/use':>9} {'MB/tok':>7}")
    for name, c in result["configs"].items():
        print(
            f"{name:>8} {c['decode_tokens_per_s']:>7.2f} {c['speedup_vs_off_lru']:>7.2f} {c['hit_rate']:>6.3f}"
            f" {c['prefetch_coverage']:>8.3f} {c['wasted_per_useful']:>9.2f} {c['bytes_read_per_token'] / 1e6:>7.2f}"
        )
    print("policy hit rates replayed on the routing trace (capacity in tokens' worth of experts):")
    for frac, hits in result["policy_hit_rate_by_capacity_in_tokens"].items():
        print(f"  {frac:>6}: " + "  ".join(f"{p} {h:.3f}" for p, h in hits.items()))
    print(f"written to {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.engine import plot_sweep, run_budget_sweep

    store = _store_or_demo(args.store)
    source = args.source
    if source is None and args.store is None:
        from flashmesh.testing.demo import prepare_demo

        _, source = prepare_demo(DEMO_WORKDIR, show_progress=False)
    result = run_budget_sweep(
        store, source=source, max_tokens=args.max_tokens, points=args.points, lookahead=args.lookahead
    )
    name = args.name or f"sweep-{store.name}"
    path = write_plotted(name, result, plot_sweep)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'budget MiB':>10} {'% experts':>9} {'tok/s':>7} {'hit':>6} {'vs mlx-lm':>9} {'same tokens':>11}")
    for r in result["rows"]:
        vs = f"{r['vs_mlx_lm_in_ram']:.2f}" if r["vs_mlx_lm_in_ram"] else "-"
        print(
            f"{r['ram_budget_bytes'] / 2**20:>10.1f} {r['budget_fraction'] * 100:>9.1f}"
            f" {r['decode_tokens_per_s']:>7.2f} {r['hit_rate']:>6.3f} {vs:>9} {str(r['tokens_match_mlx_lm']):>11}"
        )
    fits = result["everything_fits"]
    if fits:
        print(
            f"everything fits, preloaded, alternating with mlx-lm in RAM: {fits['vs_mlx_lm_in_ram']:.2f} of its "
            f"decode tok/s (median of {fits['rounds']}), same tokens: {fits['tokens_match_mlx_lm']}"
        )
    print(f"written to {path} and {result['plot']}")
    return 0


def cmd_overhead(args: argparse.Namespace) -> int:
    from bench.overhead import plot_overhead, run_overhead

    configs = []
    for item in args.configs.split(","):
        fraction, *flags = item.split(":")
        configs.append((float(fraction), "preload" in flags, "4k" not in flags))
    result = run_overhead(args.store, args.source, configs=configs, rounds=args.rounds, max_tokens=args.max_tokens)
    name = args.name or f"overhead-{args.store.name}"
    path = write_plotted(name, result, lambda r, at: plot_overhead([("engine", r)], at))
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.store} ({result['moe_layers']} MoE layers), {args.rounds} alternating rounds, {args.max_tokens} tokens"
    )
    print(
        f"{'config':>18} {'vs mlx-lm':>9} {'min-max':>11} {'CPU ratio':>9} {'hit':>6} {'extra CPU us/layer':>18}"
        f" {'compute() us':>12} {'SwitchGLU us':>12} same"
    )
    for name, c in result["configs"].items():
        print(
            f"{name:>18} {c['vs_mlx_lm']:>9.3f} {c['ratio_min']:>5.2f}-{c['ratio_max']:<5.2f}"
            f" {c['process_cpu_ratio']:>9.3f} {c['hit_rate']:>6.3f}"
            f" {c['extra_main_cpu_us_per_layer']:>18.1f}"
            f" {c['engine_cpu_us_per_layer_call']:>12.1f} {c['mlx_lm_switchglu_cpu_us_per_call']:>12.1f}"
            f" {c['tokens_match_mlx_lm']}"
        )
    print(f"written to {path}")
    return 0


def cmd_overlap(args: argparse.Namespace) -> int:
    from flashmesh.node.store_format import Manifest
    from flashmesh.protos.sizes import parse_bytes

    from bench.overlap import run_overlap_bench

    manifest = Manifest.load(args.store)
    limit = parse_bytes(args.limit) if args.limit else int(manifest.expert_bytes_total / 3)
    budget = parse_bytes(args.ram_budget) if args.ram_budget else int(limit * 0.45)
    result = run_overlap_bench(
        args.store, limit_bytes=limit, ram_budget=budget, tokens=args.tokens, rounds=args.rounds,
        small_pages_too=args.pages == "both",
    )  # fmt: skip
    path = write_result(args.name or f"overlap-{args.store.name}", result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"experts {result['expert_bytes_total'] / 1e9:.2f} GB, cgroup {limit / 1e9:.2f} GB "
        f"({result['oversubscription']:.1f}x), budget {budget / 1e9:.2f} GB, fio by round"
        f" {[round(x, 2) for x in result['fio_gbps_by_round']]} GB/s"
    )
    for name, c in result["configs"].items():
        if "seconds_per_token" not in c:
            print(f"{name:>14}: failed: {c['runs'][-1]}")
            continue
        print(
            f"{name:>14}: {c['seconds_per_token']:.3f} s/token, read if serial {c['read_seconds_if_serial']:.3f} s,"
            f" compute {c['compute_seconds']:.3f} s: {c['over_max_read_compute']:.2f}x max(read, compute),"
            f" {c['over_sum_read_compute']:.2f}x their sum, hit {c['hit_rate']:.3f};"
            f" {c['over_max_at_engine_rate']:.2f}x max with reads at the engine's rate around each run"
            f" ({c['engine_gbps_around_by_round']} GB/s), {c['over_max_at_fastest_rate']:.2f}x at the faster rate"
        )
        if c.get("engine_rate_over_rate_while_busy"):
            print(
                f"{'':>16}flash busy {c['flash_busy_seconds_per_token'] * 1e3:.0f} ms/token at"
                f" {c['flash_gbps_while_busy']:.2f} GB/s, idle {c['flash_idle_seconds_per_token'] * 1e3:.0f} ms/token"
                f" ({c['flash_idle_at_token_boundary_seconds'] * 1e3:.0f} at the token's edges);"
                f" over reads at the engine's rate: {c['engine_rate_over_rate_while_busy']:.2f} (rate) x"
                f" {c['bytes_read_over_missed']:.2f} (bytes read / missed)"
                f" + {c['flash_idle_over_engine_read_time']:.2f} (idle)"
            )
        if "over_max_at_disk_rate" in c:
            print(
                f"{'':>16}the disk itself (block trace): reads in flight {c['disk_busy_fraction']:.2f} of the decode,"
                f" at {c['disk_gbps_while_busy_by_round']} GB/s ({c['disk_rate_over_alone'] or 0:.2f} of its rate in"
                f" reads alone around each run); {c['over_max_at_disk_rate']:.2f}x max(read, compute) with reads"
                f" at the disk's rate in the run (by round {c['over_max_at_disk_rate_by_round']})"
            )
    u = result["reads_under_compute"]
    print(
        f"reads while MLX computes: {u['ratio']:.2f} of reads alone"
        f" (qd {u['queue_depth']}, by round {[round(x, 2) for x in u['ratio_by_round']]});"
        f" while a preloaded decode runs: {u['ratio_while_decoding']:.2f}"
        f" (by round {[round(x, 2) for x in u['decoding_ratio_by_round']]});"
        f" one layer's batch at a time: {u['bursts_over_alone']:.2f}"
    )
    print(f"written to {path}")
    return 0


def cmd_prefill(args: argparse.Namespace) -> int:
    from bench.prefill import run_prefill_bench

    result = run_prefill_bench(
        args.store, args.source, fraction=args.budget, prompt_tokens=args.prompt_tokens, rounds=args.rounds
    )
    path = write_result(args.name or f"prefill-{args.store.name}", result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['prompt_tokens']}-token prompt at {args.budget:g} of the expert bytes: prefill "
        f"{result['prefill_tokens_per_s']:.1f} tok/s vs mlx-lm in RAM {result['mlx_lm_prefill_tokens_per_s']:.1f}"
        f" = {result['vs_mlx_lm']:.2f} (median of {args.rounds}); waiting on reads "
        f"{result['io_wait_share_of_prefill']:.0%} of it, {result['bytes_read_per_model_call'] / 1e6:.0f} MB read per "
        f"model call; an expert read at most {result['max_reads_of_an_expert_in_a_chunk']}x per chunk"
    )
    print(f"written to {path}")
    return 0


def _need(*modules: str) -> None:
    """Fail in one line, before any work, when an optional benchmark dependency is missing."""
    import importlib.util

    from flashmesh.protos.errors import UserError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = "bench,llamacpp" if "llama_cpp" in missing else "bench"
        raise UserError(f"this benchmark needs {', '.join(missing)}: pip install -e '.[{extras}]'")


def _gguf_for(args: argparse.Namespace) -> Path:
    """The GGUF llama.cpp reads: --gguf, or <source>-f32.gguf written from --source when missing."""
    _need("llama_cpp", "gguf")
    gguf = args.gguf or args.source.parent / f"{args.source.name}-f32.gguf"
    if not gguf.is_file():
        from bench.gguf_export import export_gguf

        print(f"writing {gguf} from {args.source}")
        export_gguf(args.source, gguf)
    return gguf


def cmd_oversub(args: argparse.Namespace) -> int:
    from flashmesh.node.store_format import Manifest
    from flashmesh.protos.sizes import parse_bytes

    from bench.oversub import run_oversub_bench

    manifest = Manifest.load(args.store)
    limit = parse_bytes(args.limit) if args.limit else int(manifest.expert_bytes_total / 3.2)
    budget = parse_bytes(args.ram_budget) if args.ram_budget else int(limit * 0.45)
    gguf = _gguf_for(args) if args.llama_cpp else None
    result = run_oversub_bench(
        args.store,
        args.source,
        limit_bytes=limit,
        ram_budget=budget,
        max_tokens=args.max_tokens,
        gguf=gguf,
        repeats=args.repeats,
    )
    path = write_result(args.name or f"oversub-{args.store.name}", result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"experts {result['expert_bytes_total'] / 1e9:.2f} GB, cgroup {limit / 1e9:.2f} GB "
        f"({result['oversubscription']:.1f}x), budget {budget / 1e9:.2f} GB, fio {result['fio_gbps']:.2f} GB/s"
    )
    for name, r in result["runs"].items():
        if "decode_tokens_per_s" in r:
            extra = ""
            if r.get("io_bound_tokens_per_s"):
                extra = f", I/O bound {r['io_bound_tokens_per_s']:.2f} tok/s (reached {r['fraction_of_io_bound']:.2f})"
                if "hit_rate" in r:
                    extra += f", hit {r['hit_rate']:.3f}"
                if "disk_read_bytes_per_token" in r:
                    extra += f", page faults read {r['disk_read_bytes_per_token'] / 1e6:.0f} MB/token"
            peak = f", peak cgroup {r['max_usage_bytes'] / 1e9:.2f} GB" if "max_usage_bytes" in r else " (no limit)"
            print(f"{name:>22}: {r['decode_tokens_per_s']:.2f} tok/s{peak}{extra}")
        else:
            print(f"{name:>22}: rc {r['returncode']}, oom_killed {r.get('oom_killed')}")
    for name in ("streamed", "streamed_no_lookahead"):
        r = result["runs"][name]
        if r.get("over_llama_cpp"):
            print(
                f"{name:>22}: {r['over_llama_cpp']:.2f}x llama.cpp's tok/s (median of rounds), "
                f"same tokens as llama.cpp: {r.get('tokens_match_llama_cpp')},"
                f" as mlx-lm: {r.get('tokens_match_mlx_lm')}"
            )
    print(f"written to {path}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from flashmesh.node.store_format import Manifest
    from flashmesh.protos.sizes import parse_bytes
    from rich.console import Console

    from bench.scaling import plot_scaling, run_scaling_bench

    _need("matplotlib")
    manifest = Manifest.load(args.store)
    budget = parse_bytes(args.ram_budget) if args.ram_budget else manifest.min_budget_bytes * 4
    counts = tuple(int(n) for n in args.nodes.split(","))
    console = Console(stderr=True)
    with console.status("scaling") as status:
        result = run_scaling_bench(
            args.store,
            counts=counts,
            ram_budget=budget,
            read_bps=parse_bytes(args.read_cap),
            modes=tuple(args.budget_modes.split(",")),
            lookahead=args.lookahead,
            max_tokens=args.max_tokens,
            rounds=args.rounds,
            progress=lambda text: status.update(f"scaling: {text}"),
        )
    name = args.name or f"scaling-{args.store.name}"
    path = write_plotted(name, result, plot_scaling)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"experts {result['expert_bytes_total'] / 1e9:.2f} GB; 1 node: budget {budget / 1e9:.2f} GB; "
        f"per node read cap {result['read_bps_per_node'] / 1e6:.0f} MB/s on {result['disk']}"
    )
    print(
        "decode only, seconds per token: io = the slowest node's read wait, cmp = all nodes' expert compute,"
        " coord = the coordinator's own part (dense layers; decode time minus waiting on the nodes)"
    )
    print(
        f"{'nodes':>5} {'budget':>6} {'MiB/node':>8} {'tok/s':>7} {'speedup':>8} {'hit':>5} {'MB/tok':>7}"
        f" {'io s':>6} {'cmp s':>6} {'coord s':>7} {'same':>5}"
    )
    for r in result["rows"]:
        print(
            f"{r['nodes']:>5} {r['budget_mode']:>6} {r['ram_budget_per_node_bytes'] / 2**20:>8.0f}"
            f" {r['decode_tokens_per_s']:>7.2f} {r['speedup']:>8.2f} {r['hit_rate']:>5.2f}"
            f" {r['bytes_read_per_token'] / 1e6:>7.1f}"
            f" {r['node_io_s_per_token_max']:>6.2f} {r['node_compute_s_per_token_sum']:>6.2f}"
            f" {r['coordinator_s_per_token']:>7.2f}"
            f" {str(r['tokens_match_1_node']):>5}"
        )
    print(f"written to {path} and {result['plot']}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from flashmesh.node.store_format import Manifest

    from bench.decode import streamed_decode
    from bench.io import fio_randread

    store = _store_or_demo(args.store)
    manifest = Manifest.load(store)
    budget = _budget(store, args.ram_budget, fraction=0.25)
    spec = max(manifest.layers, key=lambda s: len(s.experts) * s.record_size)
    span = len(spec.experts) * spec.record_size

    def fio() -> float:
        file = store / spec.file
        return max(fio_randread(file, block=spec.record_size, queue_depth=q, seconds=2, size=span) for q in (8, 16))

    before = fio()
    r = streamed_decode(
        store, ram_budget=budget, max_tokens=args.max_tokens, lookahead=args.lookahead, policy=args.policy
    )
    fio_gbps = (before + fio()) / 2
    r.update(
        bench="decode",
        store=str(store),
        fio_gbps=fio_gbps,
        engine_read_gbps_over_fio=r["store_read_gbps"] / fio_gbps if fio_gbps else None,
        expert_bytes_over_budget=manifest.expert_bytes_total / budget,
    )
    path = write_result(args.name or f"decode-{store.name}", r)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"{store.name}: budget {budget / 2**20:.0f} MiB (experts {r['expert_bytes_over_budget']:.1f}x the budget), "
        f"decode {r['decode_tokens_per_s']:.2f} tok/s, hit rate {r['hit_rate']:.3f}, "
        f"{r['bytes_read_per_token'] / 1e6:.2f} MB read/token, engine {r['store_read_gbps']:.2f} GB/s / "
        f"fio {fio_gbps:.2f} GB/s = {r['engine_read_gbps_over_fio']:.2f}"
    )
    print(f"written to {path}")
    return 0


def cmd_plan_validate(args: argparse.Namespace) -> int:
    from bench.plan_plot import plot_plan_validate
    from bench.plan_validate import run_plan_validate

    if args.replan:
        from bench.plan_validate import finish

        result = finish(json.loads(args.replan.read_text()), args.workdir)
    else:
        result = run_plan_validate(args.workdir, rounds=args.rounds, big_rounds=args.big_rounds,
                                   big_source=args.big_source)  # fmt: skip
    path = write_plotted(args.name, result, plot_plan_validate)
    print(f"{'model':<14} {'budget':>6} {'mode':<11} {'measured':>9} {'predicted':>9} {'error':>6} "
          f"{'rounds':>11} {'hit':>6} {'plan hit':>8} {'calib.':>7} {'c. hit':>6}")  # fmt: skip
    for r in result["rows"]:
        spread = f"{min(r['round_errors']):+.0%}..{max(r['round_errors']):+.0%}"
        calibrated = r["predictions"]["calibration"]
        print(
            f"{r['model']:<14} {r['budget_fraction']:>6.0%} {r['mode']:<11} {r['measured_tokens_per_s']:>9.2f} "
            f"{r['predicted_tokens_per_s']:>9.2f} {r['error']:>+6.0%} {spread:>11} {r['measured_hit_rate']:>6.1%} "
            f"{r['predicted_hit_rate']:>8.1%} {calibrated['error']:>+7.0%} {calibrated['hit_rate']:>6.1%}"
        )
    print(f"wrote {path}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from flashmesh.protos.sizes import format_bytes, parse_bytes
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bench.soak import plot_soak, run_soak

    try:
        import openai  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as e:
        from flashmesh.protos.errors import UserError

        raise UserError(f"the soak needs {e.name}: pip install -e '.[bench,dev]'") from None
    store = _store_or_demo(args.store)
    budget = _budget(store, args.ram_budget, fraction=0.25)
    seconds = args.minutes * 60
    name = args.name or f"soak-{'demo' if args.store is None else store.name}-k{args.clients}"
    logdir = DEMO_WORKDIR.parent / f"{name}-logs"
    columns = [TextColumn("soak"), BarColumn(), TextColumn("{task.fields[served]} requests"), TimeRemainingColumn()]
    with Progress(*columns, disable=args.json) as bar:
        task = bar.add_task("soak", total=seconds, served=0)
        result = run_soak(
            store, clients=args.clients, seconds=seconds, ram_budget=budget, max_tokens=args.max_tokens,
            warmup_s=args.warmup, rss_bound_bytes=parse_bytes(args.rss_bound), logdir=logdir,
            progress=lambda done, served: bar.update(task, completed=done, served=served),
        )  # fmt: skip
    result.update(store=str(store), ram_budget_bytes=budget)
    path = write_plotted(name, result, plot_soak)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("latencies", "rss_samples")}))
        return 0
    print(
        f"{result['served']} requests served, {result['errors']} errors in {args.minutes:g} min with {args.clients} "
        f"clients; latency p50 {result['latency_p50_s']:.2f} s, p99 {result['latency_p99_s']:.2f} s; "
        f"{result['tokens_per_s']:.1f} tok/s"
    )
    print(
        f"server RSS: start {format_bytes(result['rss_start_bytes'])}, after {args.warmup:g} s warm-up "
        f"{format_bytes(result['rss_after_warmup_bytes'])}, end {format_bytes(result['rss_end_bytes'])} "
        f"(growth {format_bytes(max(0, result['rss_growth_after_warmup_bytes']))}, bound {args.rss_bound}: "
        f"{'within' if result['rss_within_bound'] else 'EXCEEDED'})"
    )
    print(f"written to {path} and {result['plot']}")
    return 0 if result["errors"] == 0 and result["rss_within_bound"] else 1


def cmd_serving(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn

    from bench.serving import plot_batching, run_batching_bench, run_second_turn_bench

    store = _store_or_demo(args.store)
    budget = _budget(store, args.ram_budget, fraction=0.25)
    if args.second_turn:
        result = run_second_turn_bench(store, budget=budget, rounds=args.rounds, context=args.context)
        path = write_result(args.name or f"serving-second-turn-{store.name}", result)
        med = result["median"]
        print(
            f"{med['first_turn_prompt_tokens']:.0f}-token conversation: second-turn TTFT / first-turn TTFT "
            f"{result['cached_second_over_first']:.3f}; with / without the prompt cache "
            f"{result['cached_over_uncached_second']:.3f} (medians of {args.rounds} rounds); written to {path}"
        )
        return 0
    streams = tuple(int(s) for s in args.streams.split(","))
    with Progress(TextColumn("serving"), BarColumn(), TextColumn("{task.completed}/{task.total}")) as bar:
        task = bar.add_task("serving", total=args.rounds * len(streams))
        result = run_batching_bench(
            store,
            streams=streams,
            rounds=args.rounds,
            max_tokens=args.max_tokens,
            budget=budget,
            nodes=args.nodes,
            progress=lambda: bar.advance(task),
        )
    name = args.name or f"serving-{store.name}-{'n' + str(args.nodes) if args.nodes else 'local'}"
    path = write_plotted(name, result, plot_batching)
    print(
        f"{'streams':>7} {'decode tok/s':>12} {'x one':>6} {'MB/token':>9} {'x one':>6} {'TTFT p50/p99 s':>15} "
        f"{'ITL p50/p99 ms':>15} {'CPU ms/token':>12} {'x one':>6}"
    )
    for r in result["rows"]:
        print(
            f"{r['streams']:>7} {r['aggregate_decode_tokens_per_s']:>12.1f} {r['decode_speedup_vs_1']:>6.2f} "
            f"{r['bytes_read_per_token'] / 1e6:>9.3f} {r['bytes_per_token_vs_1']:>6.2f} "
            f"{r['ttft_s']['p50']:>7.2f}/{r['ttft_s']['p99']:<7.2f} "
            f"{r['itl_s']['p50'] * 1e3:>7.1f}/{r['itl_s']['p99'] * 1e3:<7.1f} "
            f"{r['cpu_s_per_token'] * 1e3:>12.1f} {r['cpu_per_token_vs_1']:>6.2f}"
        )
    print(f"written to {path} and {result['plot']}")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bench.chaos import FAULTS, run_chaos

    store = _store_or_demo(args.store)
    seconds = args.minutes * 60
    kinds = tuple(k for k in args.faults.split(",") if k)
    if unknown := [k for k in kinds if k not in FAULTS]:
        from flashmesh.protos.errors import UserError

        raise UserError(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    name = args.name or f"chaos-{'demo' if args.store is None else store.name}-k{args.clients}"
    columns = [TextColumn("chaos"), BarColumn(), TextColumn("{task.fields[served]} requests"), TimeRemainingColumn()]
    with Progress(*columns, disable=args.json) as bar:
        task = bar.add_task("chaos", total=seconds, served=0)
        result = run_chaos(
            store, workdir=DEMO_WORKDIR.parent / "bench-chaos", clients=args.clients, seconds=seconds,
            calm_seconds=args.calm, fault_every=args.fault_every, fault_seconds=args.fault_seconds,
            max_tokens=args.max_tokens, kinds=kinds,
            progress=lambda done, served: bar.update(task, completed=done, served=served),
        )  # fmt: skip
    result["store"] = str(store)
    path = write_result(name, result)
    from bench.reliability_plots import plot_chaos

    plot = plot_chaos(result, path.with_suffix(".png"))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples", "requests")}))
    else:
        print(chaos_table(result))
        print(f"written to {path} and {plot}")
    ok = result["failed"] == 0 and result["greedy_differs"] == 0 and result["nodes_in_use_at_end"] == result["nodes"]
    return 0 if ok and result["server_exit_code"] == 0 else 1


def cmd_shutdown(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from bench.shutdown import run_cycles, summarize

    store = _store_or_demo(args.store)
    with Progress(disable=args.json) as bar:
        task = bar.add_task("start/stop cycles", total=None)
        cycles = run_cycles(store, DEMO_WORKDIR, cycles=args.cycles, processes=tuple(args.processes.split(",")),
                            progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    summary = summarize(cycles)
    path = write_result(args.name, {"store": str(store), "cycles_per_case": args.cycles, "summary": summary,
                                    "cycles": [vars(c) for c in cycles]})  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        for key, row in summary.items():
            print(f"{key:28s} {row['exit_0']}/{row['cycles']} exit 0, {row['aborts']} aborts, {row['hung']} hung, "
                  f"{row['orphans']} orphans, slowest exit {row['max_seconds_to_exit']:.2f} s "
                  f"{row['other'][:2] or ''}")  # fmt: skip
        print(f"written to {path}")
    return 0 if all(r["exit_0"] == r["cycles"] and not r["orphans"] for r in summary.values()) else 1


def chaos_table(r: dict) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in r["faults_by_kind"].items())
    rows = [
        ("requests served (failed)", f"{r['served']} ({r['failed']})"),
        ("greedy outputs differing from the fault-free run", f"{r['greedy_differs']} of {r['greedy_compared']}"),
        ("faults", faults + (f"; {len(r['fault_errors'])} could not be made" if r["fault_errors"] else "")),
        ("latency p99, chaos / fault-free", f"{r['latency_p99_s']:.2f} s / {r['calm_latency_p99_s']:.2f} s"),
        ("latency p50, chaos / fault-free", f"{r['latency_p50_s']:.2f} s / {r['calm_latency_p50_s']:.2f} s"),
        ("nodes in use at the end", f"{r['nodes_in_use_at_end']} of {r['nodes']}"),
        ("server RSS growth over the chaos phase", f"{r['rss_growth_bytes'] / 2**20:+.1f} MiB"),
        ("server exit status on SIGTERM", str(r["server_exit_code"])),
    ]
    return "\n".join(f"{a:50s} {b}" for a, b in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(stopped_status=0)  # a benchmark stopped by SIGTERM / Ctrl-C exits 0 after cleaning up
    bsub = parser.add_subparsers(dest="bench", required=True)

    p = bsub.add_parser("io", help="store fetch path vs fio random reads at the record size, same file, same run")
    p.set_defaults(func=cmd_io)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--queue-depths", default="1,8,16,32")
    p.add_argument("--seconds", type=float, default=1.0, help="per trial, per queue depth, per side")
    p.add_argument("--rounds", type=int, default=3, help="interleaved fio/engine trials per queue depth (median)")
    p.add_argument("--no-verify", action="store_true", help="skip record checksums on the engine side")
    p.add_argument(
        "--reader",
        choices=("aio", "threads", "both"),
        default="aio",
        help="threads: without the AIO reader; both: the threads' trial after AIO's in every round",
    )
    p.add_argument(
        "--pages",
        choices=("huge", "small", "both"),
        default="huge",
        help="the slots' pages: transparent huge pages where Linux has them (as the cache's), 4 KiB, or both (A/B)",
    )
    p.add_argument("--name", default=None, help="result file name (default io-<store>)")
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("io-footprint", help="fio's rate against the same libaio loop landing in more buffers")
    p.set_defaults(func=cmd_io_footprint)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--queue-depth", type=int, default=8)
    p.add_argument("--seconds", type=float, default=1.0, help="per trial")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--name", default=None, help="result file name (default io-footprint-<store>)")
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("prefetch", help="router lookahead on/off x LRU/LFU at one budget, same run")
    p.set_defaults(func=cmd_prefetch)
    p.add_argument("store", type=Path, nargs="?", default=None)
    p.add_argument("--ram-budget", default=None, help="default: a quarter of the expert bytes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("decode", help="one streamed decode with fio at the record size before and after")
    p.set_defaults(func=cmd_decode)
    p.add_argument("store", type=Path, nargs="?", default=None)
    p.add_argument("--ram-budget", default=None, help="default: a quarter of the expert bytes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--lookahead", action="store_true", help="router lookahead prefetch on")
    p.add_argument("--policy", default="auto")
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("oversub", help="decode in a memory cgroup a third of the expert bytes, vs fio and mlx-lm")
    p.set_defaults(func=cmd_oversub)
    p.add_argument("store", type=Path)
    p.add_argument("--source", type=Path, required=True, help="the unpacked model (for mlx_lm.generate)")
    p.add_argument("--limit", default=None, help="cgroup memory limit (default: expert bytes / 3.2)")
    p.add_argument("--ram-budget", default=None, help="expert cache budget (default: 45%% of the limit)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--llama-cpp", action="store_true", help="add llama.cpp (llama-cpp-python, mmap) on the GGUF")
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF for --llama-cpp (default: <source>-f32.gguf)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the engines, alternating (median)")
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("scaling", help="tok/s vs N local nodes, each in its own memory + blkio-capped cgroup")
    p.set_defaults(func=cmd_scaling)
    p.add_argument("store", type=Path)
    p.add_argument("--nodes", default="1,2,4", help="node counts, run in alternating rounds")
    p.add_argument("--ram-budget", default=None, help="one node's (default: 4x the minimum, half a token's experts)")
    p.add_argument("--budget-modes", default="same,split", help="same: each node the budget; split: budget / N")
    p.add_argument("--lookahead", action="store_true", help="router lookahead: nodes read the next layer ahead")
    p.add_argument("--read-cap", default="150MB", help="per node read bandwidth (blkio throttle), bytes/s")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("soak", help="K concurrent clients for M minutes against `flashmesh serve` on loopback")
    p.set_defaults(func=cmd_soak)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--max-tokens", type=int, default=32, help="each request asks for 1..this many tokens")
    p.add_argument("--ram-budget", default=None, help="default: a quarter of the expert bytes")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the RSS baseline is taken")
    p.add_argument("--rss-bound", default="64MiB", help="allowed RSS growth after warm-up")
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("overlap", help="time per token at ~3x oversubscription vs max(read, compute); reads vs MLX")
    p.set_defaults(func=cmd_overlap)
    p.add_argument("store", type=Path)
    p.add_argument("--limit", default=None, help="cgroup memory limit (default: expert bytes / 3)")
    p.add_argument("--ram-budget", default=None, help="expert cache budget (default: 45%% of the limit)")
    p.add_argument("--tokens", type=int, default=24, help="teacher-forced decode steps per run")
    p.add_argument("--pages", choices=("huge", "both"), default="huge", help="both: the runs again in 4 KiB pages")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("prefill", help="a long prompt's prefill at a partial budget vs mlx-lm in RAM, alternating")
    p.set_defaults(func=cmd_prefill)
    p.add_argument("store", type=Path)
    p.add_argument("--source", type=Path, required=True, help="the unpacked model, for mlx-lm")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the expert bytes (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("overhead", help="engine decode vs mlx-lm in RAM, alternating rounds, per budget")
    p.set_defaults(func=cmd_overhead)
    p.add_argument("store", type=Path)
    p.add_argument("--source", type=Path, required=True, help="the unpacked model, for mlx-lm")
    p.add_argument(
        "--configs",
        default="1:preload,1,0.4",
        help="comma-separated budget fractions of the expert bytes, ':preload' to preload, ':4k' for 4 KiB pages"
        " (--no-huge-pages) (default %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("serving", help="serve's continuous batching: tok/s and bytes/token vs concurrent streams")
    p.set_defaults(func=cmd_serving)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--streams", default="1,2,4,8", help="concurrencies, in alternating order each round")
    p.add_argument("--nodes", type=int, default=0, help="experts on this many local node processes (0: in-process)")
    p.add_argument("--ram-budget", default=None, help="default: a quarter of the expert bytes (split by shard)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--second-turn", action="store_true", help="measure a conversation's second-turn TTFT instead")
    p.add_argument("--context", type=int, default=1000, help="--second-turn: the conversation's first prompt, tokens")
    p.add_argument("--name", default=None)

    p = bsub.add_parser("chaos", help="serve --cluster on netns hosts under a fault every ~20 s (needs root)")
    p.set_defaults(func=cmd_chaos)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the chaos phase")
    p.add_argument("--calm", type=float, default=60.0, help="seconds of the fault-free reference phase first")
    p.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    p.add_argument("--fault-seconds", type=float, default=5.0, help="how long each fault lasts")
    p.add_argument("--faults", default="sigkill_restart,sigstop,link_down,damaged_record", help="kinds, in turn")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("shutdown", help="node serve / serve / demo stopped by SIGTERM or SIGINT, idle and loaded")
    p.set_defaults(func=cmd_shutdown)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--cycles", type=int, default=50, help="start/stop cycles per process and idle/load")
    p.add_argument("--processes", default="node_serve,serve,demo,bench", help="which of node_serve, serve, demo, bench")
    p.add_argument("--name", default="shutdown")
    p.add_argument("--json", action="store_true")

    p = bsub.add_parser("plan-validate", help="flashmesh plan's predictions vs measured decode, two models x 3 budgets")
    p.set_defaults(func=cmd_plan_validate)
    p.add_argument("--workdir", type=Path, default=Path("/work/data/plan"), help="where the models are built")
    p.add_argument(
        "--big-source",
        type=Path,
        default=None,
        help="an already built realistic big model (bench/bigmodel.py; default: built in WORKDIR)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the tiny model")
    p.add_argument("--big-rounds", type=int, default=3, help="of the big model (at most --rounds)")
    p.add_argument(
        "--replan",
        type=Path,
        default=None,
        metavar="RESULT",
        help="re-predict a result's rounds from their recorded figures (no measuring)",
    )
    p.add_argument("--name", default="plan-validate")

    p = bsub.add_parser("sweep", help="tok/s and hit rate vs RAM budget, with mlx-lm in RAM as reference")
    p.set_defaults(func=cmd_sweep)
    p.add_argument("store", type=Path, nargs="?", default=None)
    p.add_argument("--source", type=Path, default=None, help="the unpacked model, for the mlx-lm reference")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--points", type=int, default=6)
    p.add_argument("--lookahead", action="store_true", help="router lookahead on at every budget")
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")

    from bench import routing_bench

    routing_bench.register(bsub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flashmesh.coordinator.cli import run_command

    return run_command(build_parser().parse_args(argv))
