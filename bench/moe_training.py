"""Training an mlx-lm MoE model with mlx's optimizers and the Switch/GShard load-balancing loss.

mlx-lm's qwen3_moe class computes no auxiliary loss, so each MoE block's router (its `gate`
nn.Linear) is swapped for a `RecordingGate`: the same weight under the same parameter name, which
also hands its logits to a `RouterLogits` list. The loss reads them after the forward pass. The
architecture file is untouched and the saved weights are an ordinary mlx-lm checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from flashmesh.node.expert_banks import find_expert_banks, submodule


@dataclass(eq=False)
class RouterLogits:
    """The router logits of the forward pass in progress, one [..., E] array per MoE layer.

    A plain object (not a list) so that nn.Module does not take it for parameters."""

    logits: list[mx.array] = field(default_factory=list)

    def take(self) -> list[mx.array]:
        out, self.logits = self.logits, []
        return out


class RecordingGate(nn.Linear):
    """An MoE block's router with the same weight (and parameter name) that records its logits."""

    def __init__(self, gate: nn.Linear, sink: RouterLogits) -> None:
        nn.Module.__init__(self)
        self.weight = gate.weight
        if "bias" in gate:
            self.bias = gate.bias
        self.sink = sink

    def __call__(self, x: mx.array) -> mx.array:
        logits = super().__call__(x)  # [..., E]
        self.sink.logits.append(logits)
        return logits


def record_routers(model: nn.Module) -> RouterLogits:
    """Swap every MoE block's `gate` for a RecordingGate; return the sink its logits go to."""
    sink = RouterLogits()
    for block in _moe_blocks(model):
        if not isinstance(block.get("gate"), nn.Linear):
            raise ValueError("the MoE block has no nn.Linear router named gate")
        block["gate"] = RecordingGate(block["gate"], sink)
    return sink


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules holding each routed-expert bank (mlx-lm's MoE blocks), found by tracing."""
    return [submodule(model, bank.path.rpartition(".")[0]) for bank in find_expert_banks(model)]


def load_balancing_loss(logits: list[mx.array], *, top_k: int) -> mx.array:
    """Switch Transformer / GShard auxiliary loss, averaged over layers: E * sum_e f_e * P_e, where
    f_e is the share of the (token, slot) assignments routed to expert e (top-k of the softmax, as
    the block chooses) and P_e the mean router probability of e. 1.0 when perfectly balanced."""
    losses = []
    for layer_logits in logits:
        experts = layer_logits.shape[-1]
        probs = mx.softmax(layer_logits.reshape(-1, experts).astype(mx.float32), axis=-1)  # [T, E]
        chosen = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k])  # [T, k]
        counts = (chosen[..., None] == mx.arange(experts)).sum(axis=(0, 1))  # [E]
        share = counts.astype(mx.float32) / chosen.size
        losses.append(experts * (share * probs.mean(axis=0)).sum())
    return mx.stack(losses).mean()


@dataclass
class TrainConfig:
    steps: int = 600
    batch: int = 16
    seq: int = 128
    learning_rate: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_coef: float = 0.01  # Switch Transformer's coefficient (Qwen3 ships 0.001, OLMoE 0.01)
    clip: float = 1.0
    seed: int = 0


def batches(tokens: np.ndarray, config: TrainConfig):
    """Random windows of seq + 1 tokens, from a generator seeded with config.seed."""
    rng = np.random.default_rng(config.seed)
    for _ in range(config.steps):
        starts = rng.integers(0, len(tokens) - config.seq - 1, size=config.batch)
        window = np.stack([tokens[s : s + config.seq + 1] for s in starts]).astype(np.int32)
        yield mx.array(window[:, :-1]), mx.array(window[:, 1:])


def train(
    model: nn.Module,
    tokens: np.ndarray,
    config: TrainConfig,
    *,
    top_k: int,
    on_step: Callable[[int, float, float], None] | None = None,
) -> list[tuple[float, float]]:
    """Train `model` in place on the token stream; return (cross-entropy, aux loss) per step."""
    sink = record_routers(model)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(config.learning_rate / config.warmup, config.learning_rate, config.warmup),
            optim.cosine_decay(config.learning_rate, config.steps - config.warmup, config.learning_rate / 10),
        ],
        [config.warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)

    def loss_fn(model, x, y):
        ce = nn.losses.cross_entropy(model(x), y).mean()
        aux = load_balancing_loss(sink.take(), top_k=top_k)
        return ce + config.aux_coef * aux, (ce, aux)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    history = []
    for step, (x, y) in enumerate(batches(tokens, config)):
        (_, (ce, aux)), grads = value_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, config.clip)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, ce, aux)
        history.append((ce.item(), aux.item()))
        if on_step is not None:
            on_step(step, *history[-1])
    restore_routers(model)
    return history


def restore_routers(model: nn.Module) -> None:
    """Put plain nn.Linear routers back (same weights), so the model is mlx-lm's as built."""
    for block in _moe_blocks(model):
        gate = block["gate"]
        if isinstance(gate, RecordingGate):
            plain = nn.Linear(1, 1, bias="bias" in gate)
            plain.update(gate.parameters())
            block["gate"] = plain


def cross_entropy(model: nn.Module, tokens: np.ndarray, *, seq: int, max_windows: int = 256, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over consecutive windows of `tokens`."""
    n = min(max_windows, (len(tokens) - 1) // seq)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        window = np.stack([tokens[r * seq : r * seq + seq + 1] for r in rows]).astype(np.int32)
        x, y = mx.array(window[:, :-1]), mx.array(window[:, 1:])
        loss = nn.losses.cross_entropy(model(x), y, reduction="sum")
        total += loss.item()
        count += y.size
    return total / count


def unigram_cross_entropy(
    train_tokens: np.ndarray, held_out: np.ndarray, *, vocab: int, seq: int, max_windows: int = 256
) -> float:
    """Cross-entropy of an add-one unigram model fitted on the training tokens, scored on the same
    predicted positions as `cross_entropy` (the first token of each window is not predicted)."""
    counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n = min(max_windows, (len(held_out) - 1) // seq)
    targets = np.concatenate([held_out[r * seq + 1 : r * seq + seq + 1] for r in range(n)])
    return float(-logp[targets].mean())


def perplexity(nats: float) -> float:
    return math.exp(nats)
