"""`python -m bench routing STORE`: routing statistics of a model from the engine's own trace, and
the hit rate of every cache policy vs the budget (plot).

The "prompt" phase is a long real-text prompt (held-out Python documentation by default) routed
token by token in its prefill: for a causal model this is exactly the routing a decode of that
text would see, without the repetition loops a small model's own greedy output falls into. The
"generation" phase is the model's own continuation of a short prompt (decode steps).
"""

from __future__ import annotations

from pathlib import Path

from flashmesh.node.cache import POLICIES, effective_policy
from flashmesh.node.store_format import Manifest

from bench.plots import save_plot
from bench.policy import simulate
from bench.routing import belady_hit_rate, requests, statistics
from bench.routing_trace import trace_store

CURVE_SHARES = (0.05, 0.10, 0.15, 0.20, 0.25, 0.35, 0.50, 0.75)
# Published figures for Qwen3.5-397B-A17B (flash-moe; OS page cache as the expert cache).
PUBLISHED = {
    "model": "Qwen3.5-397B-A17B (flash-moe)",
    "overlap_range": [0.08, 0.34],
    "hit_rate_at_expert_share": {"share": 0.17, "hit_rate": 0.71},
}


def long_prompt(tokenizer, *, prompt_file: Path | None, tokens: int) -> list[int]:
    """The first `tokens` tokens of `prompt_file`, or of the held-out corpus documents."""
    if prompt_file is not None:
        text = Path(prompt_file).read_text()
    else:
        from bench.corpus import load_corpus

        text = "\n".join(load_corpus().held_out)
    return tokenizer.encode(text[: tokens * 12])[:tokens]


def policy_curves(trace, *, experts_total: int, top_k: int) -> dict[str, dict[str, float]]:
    """Hit rate by budget share (of all experts) for each cache policy and the ideal one."""
    curves: dict[str, dict[str, float]] = {p: {} for p in (*POLICIES, "belady")}
    for share in CURVE_SHARES:
        capacity = max(top_k, int(share * experts_total))
        for policy in POLICIES:
            curves[policy][f"{share:g}"] = simulate(trace, capacity=capacity, policy=policy)
        curves["belady"][f"{share:g}"] = belady_hit_rate(trace, capacity=capacity)
    return curves


def run_routing_bench(
    store: Path,
    *,
    prompt_file: Path | None = None,
    prompt_tokens: int = 1024,
    prompt: str = "The Python interpreter",
    max_tokens: int = 128,
    temperature: float = 0.0,
) -> dict:
    from flashmesh.coordinator.engine import load_store_tokenizer

    manifest = Manifest.load(store)
    tokenizer = load_store_tokenizer(store, manifest)
    ids = long_prompt(tokenizer, prompt_file=prompt_file, tokens=prompt_tokens)
    phases, text = trace_store(store, prompt_tokens=ids, prompt=prompt, max_tokens=max_tokens, temperature=temperature)
    experts = manifest.layers[0].num_experts
    top_k = manifest.top_k
    total = sum(len(s.experts) for s in manifest.layers)
    result = {
        "bench": "routing",
        "store": str(store),
        "model": {
            "model_type": manifest.config.get("model_type"),
            "moe_layers": len(manifest.layers),
            "experts": experts,
            "top_k": top_k,
            "expert_bytes": manifest.layers[0].payload_bytes,
        },
        "prompt_source": str(prompt_file) if prompt_file else "held-out python3-doc documents",
        "generation": {"prompt": prompt, "temperature": temperature, "text": text},
        "published": PUBLISHED,
        "phases": {},
    }
    for name, (steps, predicted) in phases.items():
        stats = statistics(steps, predicted, experts=experts, top_k=top_k)
        stats["policy_hit_rate_by_budget_share"] = policy_curves(requests(steps), experts_total=total, top_k=top_k)
        result["phases"][name] = stats
    return result


def plot_policy_curves(result: dict, path: Path, *, phase: str = "prompt") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["phases"][phase]["policy_hit_rate_by_budget_share"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in curves.items():
        if policy == "auto":
            continue  # the same curve as the policy it stands for
        x = [float(s) * 100 for s in points]
        label = f"{policy} (default)" if policy == effective_policy("auto") else policy
        ax.plot(x, [v * 100 for v in points.values()], "o-" if policy != "belady" else "k--", label=label)
    published = result["published"]["hit_rate_at_expert_share"]
    ax.plot([published["share"] * 100], [published["hit_rate"] * 100], "r*", ms=12, label="Qwen3.5-397B (published)")
    ax.set_xlabel("cache budget, % of expert bytes")
    ax.set_ylabel("hit rate %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    m = result["model"]
    ax.set_title(
        f"{Path(result['store']).name[:32]}: {m['moe_layers']} x {m['experts']} experts, top-{m['top_k']}, {phase}",
        fontsize=9,
    )
    return save_plot(fig, path, dpi=100)


def plot_models(results: dict[str, dict], path: Path, *, phases: dict[str, str]) -> Path:
    """Hit rate vs budget of LRU, the default policy and Belady, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"lru": ":", effective_policy("auto"): "-", "belady": "--"}
    for i, (label, result) in enumerate(results.items()):
        curves = result["phases"][phases[label]]["policy_hit_rate_by_budget_share"]
        for policy, style in styles.items():
            x = [float(s) * 100 for s in curves[policy]]
            ax.plot(x, [v * 100 for v in curves[policy].values()], style, color=f"C{i}", label=f"{label}: {policy}")
    published = PUBLISHED["hit_rate_at_expert_share"]
    ax.plot([published["share"] * 100], [published["hit_rate"] * 100], "r*", ms=12, label=PUBLISHED["model"])
    ax.set_xlabel("cache budget, % of expert bytes")
    ax.set_ylabel("hit rate %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("hit rate vs budget: LRU (dotted), LFU with aging (solid, default), Belady (dashed)", fontsize=9)
    return save_plot(fig, path, dpi=100)


def cmd_routing(args) -> int:
    import json

    from bench.cli import RESULTS, _store_or_demo, write_result

    store = _store_or_demo(args.store)
    result = run_routing_bench(
        store,
        prompt_file=args.prompt_file,
        prompt_tokens=args.prompt_tokens,
        prompt=args.prompt,
        max_tokens=args.tokens,
        temperature=args.temperature,
    )
    name = args.name or f"routing-{store.name}"
    result["plot"] = str(plot_policy_curves(result, RESULTS / f"{name}.png"))
    path = write_result(name, result)
    if args.json:
        print(json.dumps(result))
        return 0
    for phase, stats in result["phases"].items():
        o = stats["overall"]
        look = "-" if o["lookahead_accuracy"] is None else f"{o['lookahead_accuracy']:.3f}"
        print(
            f"{phase} ({stats['tokens']} tokens): load entropy {o['load_entropy']:.3f}, top-10% share "
            f"{o['top10_share']:.3f}, overlap {o['overlap']:.3f} (chance {o['chance_overlap']:.3f}), lookahead {look}"
        )
        for policy, points in stats["hit_rate_by_budget_share"].items():
            print(f"  {policy:>6}: " + "  ".join(f"{float(s) * 100:.0f}% {h:.3f}" for s, h in points.items()))
    print(f"written to {path} and {result['plot']}")
    return 0


def register(bsub) -> None:
    p = bsub.add_parser("routing", help="routing statistics from the engine's trace; hit rate vs budget per policy")
    p.set_defaults(func=cmd_routing)
    p.add_argument("store", type=Path, nargs="?", default=None, help="a packed store (default: the demo store)")
    p.add_argument("--prompt-file", type=Path, default=None, help="long real text (default: held-out python3-doc)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens of it routed in the prefill")
    p.add_argument("--prompt", default="The Python interpreter", help="the generation's prompt")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.routing_bench OUT.png LABEL=RESULT.json:PHASE ...`: several models in one plot."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.routing_bench", description=main.__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("models", nargs="+", help="LABEL=bench/results/routing-X.json:PHASE")
    args = p.parse_args(argv)
    results, phases = {}, {}
    for spec in args.models:
        label, rest = spec.split("=", 1)
        file, phase = rest.rsplit(":", 1)
        results[label], phases[label] = json.loads(Path(file).read_text()), phase
    print(plot_models(results, args.out, phases=phases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
