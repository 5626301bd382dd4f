"""Does `flashmesh plan` predict what runs here? Measure, predict, compare.

    python -m bench plan-validate [--workdir /work/data/plan] [--rounds 5] [--big-rounds 3]

Models (realistic routing): the trained tiny qwen3_moe (testing/tiny_moe) and the realistic big
model (bench/bigmodel.py; 8 layers x 64 experts of 6 MiB, 3.2 GB; --big-source reuses a built one).

1. Routing for the plan: the routing benchmark's curve of the engine's policy (1024 held-out
   tokens, bench/results/routing-*.json); beside it, two calibration runs (their own prompts and
   seeds), each a warm-up generation then a measured-length one, replayed through the engine's
   cache policy (bench/policy.py) at each budget share, hits of the second generation only.
2. Rounds; in each, for each model, budget (all, half, a quarter of the experts; the order flips
   every round) and mode (in-process; two local node processes): immediately before the measured
   run, this machine's figures (bench/plan_probes.py: expert compute at the model's shape with one
   process and with two at once, the dense matmul rate, flash at the layer's expected misses, the
   Health round trip to the nodes) and the engine's fixed cost per MoE layer, measured on a third
   model (synthetic, hidden 64, 4 layers, 8 experts, top-2: weights too small to matter) in the
   same mode. Then the run: decode tok/s and hit rate of a sampled generation after a warm-up
   generation of another prompt.
3. Each round's prediction from that round's figures (bench/plan_replan.py); per row the medians
   over rounds and the spread. Writes bench/results/plan-validate.json (+ .png: predicted vs measured).
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
from contextlib import ExitStack
from pathlib import Path

from flashmesh.coordinator.hit_rate import Routing
from flashmesh.coordinator.model_facts import load_facts
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.planner import Device, plan
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.node.store_writer import pack

from bench.plan_probes import Probes
from bench.plan_replan import ROUTING_BENCH, add_predictions, devices_for, predict, routing_bench_curve
from bench.plan_runs import calibration_curve, measure, nodes_up, ping_ms

log = logging.getLogger(__name__)

FRACTIONS = (1.0, 0.5, 0.25)
TEMPERATURE = 0.8  # sampled: a small model's greedy output loops on a few experts, which real text does not
PROMPTS = {  # calibration runs mirror a measured one (warm-up on one text, counted on another) with their own texts
    "calibration": [["Exceptions are raised when", "The dictionary type maps"],
                    ["A class defines", "The file object returned by"]],
    "warm": "The list type supports", "measured": "A module is",
}  # fmt: skip
TOKENS = {"trained-tiny": 32, "realistic-big": 8}  # per generation (warm-up and measured alike)
PROBE_SHAPES = {"probe": {"hidden": 64, "layers": 4, "experts": 8, "top_k": 2, "expert_hidden": 32}}  # fixed cost
RAM = 64 * 10**9  # not the limit here: every budget is given
ALL_HIT = Routing(curve=((0.0, 1.0), (1.0, 1.0)))  # the probes hold every expert
PRIMARY = "routing bench"  # the routing source of the headline prediction (docs/plan.md says why)


def prepare(workdir: Path, *, big_source: Path) -> dict[str, Path]:
    from flashmesh.testing.synthetic import build_model
    from flashmesh.testing.trained import materialize

    from bench.bigmodel import CALIBRATION, prepare_big
    from bench.realistic import RoutingKnobs

    def packed(source: Path, store: Path) -> Path:
        if not (store / MANIFEST).is_file():
            pack(str(source), store, force=True, show_progress=False)
        return store

    tiny_src = workdir / "trained-tiny-src"
    if not (tiny_src / "config.json").is_file():
        materialize(tiny_src)
    for probe, shape in PROBE_SHAPES.items():
        if not (workdir / f"{probe}-src" / "config.json").is_file():
            build_model(workdir / f"{probe}-src", "qwen3_moe", **shape)
    knobs = RoutingKnobs(**json.loads(CALIBRATION.read_text())["knobs"])
    big, _ = prepare_big(big_source, workdir / "realistic-big-store", knobs=knobs, show_progress=False)
    return {
        "trained-tiny": packed(tiny_src, workdir / "trained-tiny-store"),
        "realistic-big": big,
        **{probe: packed(workdir / f"{probe}-src", workdir / f"{probe}-store") for probe in PROBE_SHAPES},
    }


def every_expert(store: Path) -> int:
    return Manifest.load(store).expert_bytes_total


def expert_shape(store: Path) -> tuple[int, int, int, int]:
    """(hidden, expert FFN width, experts, k) of a qwen3_moe store, checked against its records' bytes."""
    config = json.loads((store / "config.json").read_text())
    shape = (config["hidden_size"], config["moe_intermediate_size"], config["num_experts"],
             config["num_experts_per_tok"])  # fmt: skip
    assert 3 * shape[0] * shape[1] * 4 == load_facts(str(store)).layers[0].payload_bytes, shape  # fp32 gate/up/down
    return shape


def take_figures(probes: Probes, store: Path, *, mode: str, misses_per_layer: float) -> dict:
    """This machine's figures now: expert compute at the model's expert shape (one process; with
    nodes also per process while two compute), the dense rate, flash at the queue depth a layer's
    misses make (per node with nodes), and the SwitchGLU rate at a third shape for comparison."""
    processes = 2 if mode == "local nodes" else 1
    depth = max(1, round(misses_per_layer / processes))
    shape = expert_shape(store)
    figures = {
        "compute_gbps": probes.take("compute", shape=shape)[0],
        "glu_compute_gbps": probes.take("compute")[0],
        "dense_gbps": probes.take("dense")[0],
        "flash_gbps": probes.take("flash", store=str(store), queue_depth=depth)[0],
        "flash_queue_depth": depth,
    }
    if processes == 2:
        figures["shared_compute_gbps"] = statistics.mean(probes.take("compute", processes=2, shape=shape))
        figures["shared_flash_gbps"] = statistics.mean(probes.take("flash", processes=2, store=str(store),
                                                                   queue_depth=depth))  # fmt: skip
    return figures


def layer_overhead_ms(probe_store: Path, figures: dict, *, mode: str, options: ModelOptions, link_ms: float) -> float:
    """The engine's fixed cost per MoE layer and token in this mode: the probe model's measured token
    time less what the plan says its (negligible) weights and link take, per layer."""
    facts = load_facts(str(probe_store))
    got = measure(options, prompts=PROMPTS, tokens=16, seed=0, temperature=0.0)
    devices, head = devices_for(mode, figures, budget=facts.expert_bytes_total)
    bare = plan(facts, devices, coordinator=head, routing=ALL_HIT, link_ms=link_ms)
    return max(0.0, 1 / got["decode_tokens_per_s"] - 1 / bare.tokens_per_s) / len(facts.layers) * 1e3


def run_plan_validate(workdir: Path, *, rounds: int = 5, big_rounds: int = 3, big_source: Path | None = None) -> dict:
    """rounds of the tiny model; big_rounds (at most rounds) of the big one, whose rounds take ~10 minutes here."""
    workdir.mkdir(parents=True, exist_ok=True)
    stores = prepare(workdir, big_source=big_source or workdir / "realistic-big-src")
    models = ("trained-tiny", "realistic-big")
    curves = {m: calibration_curve(stores[m], prompts=PROMPTS, tokens=TOKENS[m], temperature=TEMPERATURE)
              for m in models}  # fmt: skip
    token = secrets.token_urlsafe(12)
    rows: dict[tuple, dict] = {}
    with ExitStack() as stack:
        probes = stack.enter_context(Probes())
        probe_nodes = {probe: stack.enter_context(nodes_up(stores[probe], workdir, budget=10**9, token=token))
                       for probe in PROBE_SHAPES}  # fmt: skip
        for r in range(rounds):
            for name in models if r < big_rounds else models[:1]:
                store, facts = stores[name], load_facts(str(stores[name]))
                fractions = FRACTIONS if r % 2 == 0 else FRACTIONS[::-1]
                for fraction in fractions:
                    budget = max(int(facts.expert_bytes_total * fraction), 2 * Manifest.load(store).min_budget_bytes)
                    modes = ("in-process", "local nodes") if r % 2 == 0 else ("local nodes", "in-process")
                    for mode in modes:
                        log.warning("round %d: %s, budget %.0f%%, %s", r + 1, name, fraction * 100, mode)
                        row = rows.setdefault((name, fraction, mode), {
                            "model": name, "budget_fraction": fraction, "mode": mode, "budget_bytes": budget,
                            "rounds": []})  # fmt: skip
                        row["rounds"].append(one_round(stores, name, curves[name], facts, probes, probe_nodes,
                                                       token=token, workdir=workdir, budget=budget, mode=mode,
                                                       fraction=fraction, seed=r))  # fmt: skip
    result = {"models": {m: facts_json(stores[m]) for m in models}, "prompts": PROMPTS, "tokens": TOKENS,
              "temperature": TEMPERATURE, "rounds": {models[0]: rounds, models[1]: min(rounds, big_rounds)},
              "probe_models": PROBE_SHAPES, "hit_rate_curves": {m: curves[m] for m in models},
              "rows": list(rows.values())}  # fmt: skip
    return finish(result, workdir)


def finish(result: dict, workdir: Path) -> dict:
    """Medians and spreads of the measured rounds; predictions from the calibration curve and from the
    routing benchmark's curve, each round from its own figures; the headline is PRIMARY's."""
    stores = {m: workdir / f"{m}-store" for m in result["hit_rate_curves"]}
    add_predictions(result, source="calibration", curves=result["hit_rate_curves"], stores=stores)
    bench_curves = {m: routing_bench_curve(ROUTING_BENCH[m]) for m in stores}
    add_predictions(result, source="routing bench", curves=bench_curves, stores=stores)
    result["routing_bench_curves"], result["primary_routing"] = bench_curves, PRIMARY
    for row in result["rows"]:
        summarize(row)
    return result


def one_round(stores, name, curve, facts, probes, probe_nodes, *, token, workdir, budget, mode, fraction, seed) -> dict:
    store, routing = stores[name], Routing(curve=tuple(map(tuple, curve)))
    h_guess = plan(facts, [Device("this", RAM, 1.0, 1.0, budget_bytes=budget)], routing=routing).hit_rate
    misses = facts.top_k * (1 - h_guess)
    with ExitStack() as stack:
        if mode == "local nodes":
            nodes = stack.enter_context(nodes_up(store, workdir, budget=budget, token=token, count=2))
            link = ping_ms(nodes[0], token=token)
            options = ModelOptions(store=store, cluster=True, nodes=tuple(nodes), token=token)
            probe_options = {probe: ModelOptions(store=stores[probe], cluster=True, nodes=tuple(probe_nodes[probe]),
                                                 token=token) for probe in PROBE_SHAPES}  # fmt: skip
        else:
            link, options = 0.0, ModelOptions(store=store, ram_budget=budget)
            probe_options = {probe: ModelOptions(store=stores[probe], ram_budget=every_expert(stores[probe]))
                             for probe in PROBE_SHAPES}  # fmt: skip
        figures = take_figures(probes, store, mode=mode, misses_per_layer=misses)
        figures["link_ms"] = link
        figures["layer_overhead_ms"] = layer_overhead_ms(stores["probe"], {**figures, "compute_gbps": 1e9,
                                                         "shared_compute_gbps": 1e9}, mode=mode,
                                                         options=probe_options["probe"], link_ms=link)  # fmt: skip
        got = measure(options, prompts=PROMPTS, tokens=TOKENS[name], seed=100 + seed, temperature=TEMPERATURE)
    p = predict(facts, figures, mode=mode, budget=budget, curve=curve)
    log.warning("  measured %.2f tok/s (hit %.1f%%), predicted %.2f (hit %.1f%%); %s", got["decode_tokens_per_s"],
                got["hit_rate"] * 100, p.tokens_per_s, p.hit_rate * 100,
                ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))  # fmt: skip
    return {**got, "figures": figures, "predicted_tokens_per_s": p.tokens_per_s, "predicted_hit_rate": p.hit_rate,
            "predicted_seconds": p.to_json()["seconds_per_token"]}  # fmt: skip


def summarize(row: dict) -> None:
    rs = row["rounds"]
    measured = [r["decode_tokens_per_s"] for r in rs]
    primary = row["predictions"][PRIMARY]
    row.update(
        measured_tokens_per_s=statistics.median(measured), measured_range=[min(measured), max(measured)],
        measured_hit_rate=statistics.median(r["hit_rate"] for r in rs),
        predicted_tokens_per_s=primary["tokens_per_s"], predicted_range=primary["range"],
        predicted_hit_rate=primary["hit_rate"], error=primary["error"], round_errors=primary["round_errors"],
    )  # fmt: skip


def facts_json(store: Path) -> dict:
    return load_facts(str(store)).to_json()
