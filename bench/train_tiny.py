"""Train the tiny MoE on English text: mlx-lm's qwen3_moe, 8 MoE layers x 32 experts, top-4.

    python -m bench.train_tiny OUT [--steps 600] [--seed 0] [--ship testing/tiny_moe]

Corpus: the Python manual's reST sources from Debian's python3-doc (bench/corpus.py; installed
with apt-get when missing), every 20th document held out. Tokenizer: byte-level BPE of 4096
tokens trained on the training documents with `tokenizers`. Training: AdamW with warm-up and cosine
decay, cross-entropy + 0.01 x the Switch load-balancing loss (bench/moe_training.py). The final
weights are rounded to float16 precision (the copy the project ships) and stored as float32, the
dtype MLX's CPU expert matmul needs; perplexity is measured on that model. OUT is an ordinary
mlx-lm model directory plus training.json (losses, perplexities, wall and CPU time, load).

With Debian's OpenBLAS installed the script re-executes itself with it preloaded (bench/blas.py;
10-20x faster matmuls than the mlx wheel's reference BLAS) and says so in training.json. Same seed,
same BLAS: same weights (checked: two runs, identical safetensors).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from flashmesh.testing.trained import TRAINED_SHAPE as TINY_SHAPE

from bench.blas import blas_in_use, reexec_with_openblas

VOCAB = 4096
PROMPTS = ["The Python interpreter", "A list is a sequence of", "To open a file, use the"]

log = logging.getLogger(__name__)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def encode(tokenizer_dir: Path, docs: list[str]):
    """Documents -> one uint16 token stream, each document followed by <|endoftext|>."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.uint16)


def continuations(model_dir: Path, prompts: list[str], *, max_tokens: int = 40) -> dict[str, str]:
    """Greedy continuations from mlx-lm's own load of the written directory."""
    from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    out = {}
    for prompt in prompts:
        tokens = encode_prompt(tokenizer, prompt, chat=False)
        out[prompt] = generate(model, tokenizer, tokens, SamplingParams(max_tokens=max_tokens)).text
    return out


def train_tiny(out: Path, config, *, show_progress: bool = True) -> dict:
    import mlx.core as mx
    from flashmesh.node.experts import model_classes
    from flashmesh.node.store_format import staged_directory
    from flashmesh.testing.synthetic import build_tokenizer, preset
    from mlx.utils import tree_flatten, tree_map
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from bench.corpus import load_corpus
    from bench.moe_training import cross_entropy, perplexity, train, unigram_cross_entropy

    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    corpus = load_corpus()
    with staged_directory(out) as tmp:
        vocab = build_tokenizer(tmp, vocab_size=VOCAB, texts=corpus.train)
        train_tokens, held_tokens = encode(tmp, corpus.train), encode(tmp, corpus.held_out)
        model_config = preset("qwen3_moe", vocab=vocab, **TINY_SHAPE)
        model_class, args_class = model_classes(model_config)
        mx.random.seed(config.seed)
        model = model_class(args_class.from_dict(model_config))
        mx.eval(model.parameters())
        prepared = time.perf_counter()
        loads: list[float] = []
        columns = [
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[ce]:.3f} aux {task.fields[aux]:.3f} {task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not show_progress) as bar:
            task = bar.add_task("train", total=config.steps, ce=0.0, aux=0.0, tps=0.0)
            started = time.perf_counter()

            def on_step(step: int, ce: float, aux: float) -> None:
                tps = (step + 1) * config.batch * config.seq / (time.perf_counter() - started)
                bar.update(task, completed=step + 1, ce=ce, aux=aux, tps=tps)
                if step % 20 == 0:
                    loads.append(os.getloadavg()[0])
                if step % 100 == 0 and not bar.console.is_terminal:  # a log file gets a line now and then
                    log.info("step %d: loss %.3f aux %.3f, %.0f tok/s", step, ce, aux, tps)

            history = train(model, train_tokens, config, top_k=TINY_SHAPE["top_k"], on_step=on_step)
        trained = time.perf_counter()
        # The shipped copy is float16: round here so that this directory is exactly the demo's model.
        model.update(tree_map(lambda a: a.astype(mx.float16).astype(mx.float32), model.parameters()))
        weights = dict(tree_flatten(model.parameters()))
        mx.eval(weights)
        held_ce = cross_entropy(model, held_tokens, seq=config.seq)
        unigram_ce = unigram_cross_entropy(train_tokens, held_tokens, vocab=vocab, seq=config.seq)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(model_config, indent=1))
        text = continuations(tmp, PROMPTS)
        facts = {
            "model": {"arch": "qwen3_moe", **TINY_SHAPE, "vocab": vocab, "dtype": "float32 (float16-rounded)"},
            "parameters": sum(v.size for v in weights.values()),
            "corpus": {
                "source": corpus.source,
                "train_documents": len(corpus.train),
                "held_out_documents": len(corpus.held_out),
                "train_bytes": corpus.train_bytes,
                "held_out_bytes": corpus.held_out_bytes,
                "train_tokens": int(len(train_tokens)),
                "held_out_tokens": int(len(held_tokens)),
            },
            "training": {**vars(config), "tokens_seen": config.steps * config.batch * config.seq},
            "blas": blas_in_use(),
            "held_out_cross_entropy": held_ce,
            "held_out_perplexity": perplexity(held_ce),
            "unigram_perplexity": perplexity(unigram_ce),
            "first_loss": history[0][0],
            "final_loss_mean_last_50": sum(h[0] for h in history[-50:]) / min(50, len(history)),
            "final_aux_mean_last_50": sum(h[1] for h in history[-50:]) / min(50, len(history)),
            "loss_every_50": [round(h[0], 4) for h in history[::50]],
            "continuations": text,
            "wall_seconds": {
                "total": time.perf_counter() - wall0,
                "prepare": prepared - wall0,
                "train": trained - prepared,
            },
            "cpu_seconds": _cpu_seconds() - cpu0,
            "load_average_1min": {"min": min(loads), "max": max(loads), "mean": sum(loads) / len(loads)},
            "cpus": os.cpu_count(),
        }
        (tmp / "training.json").write_text(json.dumps(facts, indent=1))
    return facts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from bench.moe_training import TrainConfig

    p = argparse.ArgumentParser(prog="python -m bench.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the mlx-lm model directory to write")
    defaults = TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--seq", type=int, default=defaults.seq)
    p.add_argument("--lr", type=float, default=defaults.learning_rate)
    p.add_argument("--aux-coef", type=float, default=defaults.aux_coef)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--ship", type=Path, default=None, help="also write the float16 copy the demo loads here")
    p.add_argument("--no-openblas", action="store_true", help="keep the mlx wheel's own BLAS")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.no_openblas:
        reexec_with_openblas("bench.train_tiny", argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        learning_rate=args.lr,
        warmup=min(TrainConfig.warmup, max(1, args.steps // 10)),
        aux_coef=args.aux_coef,
        seed=args.seed,
    )
    facts = train_tiny(args.out, config, show_progress=not args.json)
    if args.ship is not None:
        from flashmesh.testing.trained import ship

        ship(args.out, args.ship)
    if args.json:
        print(json.dumps(facts))
    else:
        print(
            f"held-out perplexity {facts['held_out_perplexity']:.1f} (unigram {facts['unigram_perplexity']:.1f}), "
            f"{facts['training']['tokens_seen'] / 1e6:.2f}M tokens in {facts['wall_seconds']['total'] / 60:.1f} min "
            f"(load average {facts['load_average_1min']['mean']:.1f} on {facts['cpus']} CPUs), written to {args.out}"
        )
        for prompt, text in facts["continuations"].items():
            print(f"  {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
