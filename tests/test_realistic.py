"""Random-weight models with realistic routing (bench/realistic.py): what the knobs change."""

from __future__ import annotations

from flashmesh.testing.synthetic import preset

from bench.realistic import RoutingKnobs, apply_knobs, proxy_model, walk_statistics

CONFIG = preset("qwen3_moe", vocab=384, hidden=256, layers=4, experts=16, top_k=4, expert_hidden=64)


def test_knobs_make_routing_follow_the_token_and_greedy_walk_the_cycle():
    plain = proxy_model(CONFIG)
    knobs = RoutingKnobs(chain=0.0, bias=0.0, embed_rms=4.0)
    before = walk_statistics(plain, CONFIG, knobs)  # mlx-lm's init: the walk's tokens do not matter
    after = walk_statistics(apply_knobs(proxy_model(CONFIG), CONFIG, knobs), CONFIG, knobs)
    assert after["greedy_follows_cycle"] == 1.0 and before["greedy_follows_cycle"] < 0.5
    assert before["overlap"] > 0.6  # degenerate: consecutive tokens share most experts
    assert after["overlap"] < 0.4 and after["load_entropy"] > before["load_entropy"]


def test_chain_raises_overlap_and_bias_lowers_entropy():
    model = proxy_model(CONFIG)

    def stats(**kw):
        knobs = RoutingKnobs(embed_rms=4.0, **kw)
        return walk_statistics(apply_knobs(model, CONFIG, knobs), CONFIG, knobs)

    base, chained, biased = stats(chain=0.0, bias=0.0), stats(chain=0.85, bias=0.0), stats(chain=0.0, bias=1.5)
    assert chained["overlap"] > base["overlap"] + 0.1
    assert biased["load_entropy"] < base["load_entropy"] - 0.05
