"""Small MoE models with random weights, built from mlx-lm's own classes, plus a local tokenizer.

Used by `flashmesh demo`, the tests and the benchmarks: nothing is downloaded. The directory written
is an ordinary mlx-lm model directory (config.json, model.safetensors, tokenizer files), so it goes
through exactly the loading path a real model does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmesh.node.experts import model_classes
from flashmesh.node.store_format import staged_directory
from mlx.utils import tree_flatten, tree_unflatten

CORPUS = (
    "Mixture of experts models route every token to a few experts out of many. "
    "The experts live on flash and stream into memory when the router picks them. "
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    "Hello, world! What is the capital of France? Paris is the capital of France. "
    "def main():\n    print('hello')\n\nfor i in range(10):\n    total += i\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _common(vocab: int, hidden: int, layers: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    }


def preset(
    arch: str,
    *,
    vocab: int,
    hidden: int = 64,
    layers: int = 3,
    experts: int = 16,
    top_k: int = 4,
    expert_hidden: int = 64,
) -> dict:
    """A config.json for a small model of mlx-lm architecture `arch`."""
    heads = max(2, hidden // 32)
    base = _common(vocab, hidden, layers)
    if arch == "qwen3_moe":
        return {
            **base,
            "model_type": arch,
            "intermediate_size": 2 * hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2 or 1,
            "head_dim": hidden // heads,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": expert_hidden,
            "norm_topk_prob": True,
        }
    if arch == "mixtral":
        return {
            **base,
            "model_type": arch,
            "intermediate_size": expert_hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2 or 1,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
        }
    if arch == "deepseek_v3":
        # Kimi K2 family: MLA attention, sigmoid routing with groups, shared experts, dense first layer.
        return {
            **base,
            "model_type": arch,
            "intermediate_size": 2 * hidden,
            "moe_intermediate_size": expert_hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "n_shared_experts": 1,
            "n_routed_experts": experts,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "qk_nope_head_dim": 32,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": top_k,
            "moe_layer_freq": 1,
            "first_k_dense_replace": 1,
        }
    if arch == "gpt_oss":
        return {
            **base,
            "model_type": arch,
            "intermediate_size": expert_hidden,
            "head_dim": 32,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2 or 1,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
            "sliding_window": 16,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        }
    if arch == "qwen3_next":
        return {
            **base,
            "model_type": arch,
            "intermediate_size": 2 * hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2 or 1,
            "head_dim": hidden // heads,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": expert_hidden,
            "mlp_only_layers": [],
            "moe_intermediate_size": expert_hidden,
            "partial_rotary_factor": 0.5,
            "norm_topk_prob": True,
            "full_attention_interval": 2,
        }
    raise ValueError(f"no synthetic preset for {arch}")


def build_tokenizer(directory: Path, *, vocab_size: int = 384, texts: Iterable[str] | None = None) -> int:
    """Train a byte-level BPE tokenizer locally on `texts` (default: a few built-in sentences);
    return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4 if texts is None else texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return tok.get_vocab_size()


@contextmanager
def writing_model(
    directory: Path, arch: str, *, seed: int = 0, config: Callable[[int], dict] | None = None, **shape
) -> Iterator[tuple[Path, dict, nn.Module]]:
    """(temporary directory holding the tokenizer, config for `arch` (`config(vocab_size)` if given,
    else the preset), mlx-lm's model with a lazy random init) for the block to write weights into; on
    success config.json is written and the directory renamed to `directory`, so a half-written model
    never looks complete."""
    with staged_directory(directory) as tmp:
        vocab = build_tokenizer(tmp)
        config = preset(arch, vocab=vocab, **shape) if config is None else config(vocab)
        model_class, args_class = model_classes(config)
        mx.random.seed(seed)
        yield tmp, config, model_class(args_class.from_dict(config))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))


def _fill_zero_matrices(model: nn.Module) -> None:
    filled = []
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("weight") and w.ndim >= 2 and not mx.any(w).item():
            scale = w.shape[-1] ** -0.5
            filled.append((name, mx.random.uniform(-scale, scale, w.shape, dtype=w.dtype)))
    model.update(tree_unflatten(filled))


def build_model(
    directory: Path,
    arch: str = "qwen3_moe",
    *,
    quantize: dict | None = None,
    seed: int = 0,
    dtype: str = "float32",
    config: Callable[[int], dict] | None = None,
    fill_zeros: bool = False,
    **shape,
) -> Path:
    """Write a random-weight model of `arch` to `directory` (atomically); return the directory.
    fill_zeros: draw random values for weight matrices the architecture initialises to zeros
    (routers left for the checkpoint to fill), so that tokens route to different experts."""
    with writing_model(directory, arch, seed=seed, config=config, **shape) as (tmp, config, model):
        if fill_zeros:
            _fill_zero_matrices(model)
        model.set_dtype(getattr(mx, dtype))
        if quantize is not None:
            nn.quantize(
                model,
                group_size=quantize.get("group_size", 64),
                bits=quantize["bits"],
                mode=quantize.get("mode", "affine"),
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0,
            )
            config["quantization"] = {
                "group_size": quantize.get("group_size", 64),
                "bits": quantize["bits"],
                "mode": quantize.get("mode", "affine"),
            }
        weights = dict(tree_flatten(model.parameters()))
        mx.eval(weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    return Path(directory)
