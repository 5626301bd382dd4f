"""Write an mlx-lm qwen3_moe model directory as GGUF for llama.cpp (the `bench llamacpp` comparison).

    python -m bench.gguf_export MODEL_DIR OUT.gguf

Tensors keep their dtype (the synthetic models are fp32, so the GGUF is ALL_F32 and one expert is
as many bytes as one record payload of our store). Names come from the `gguf` package's own
TensorNameMap (mlx-lm's stacked `switch_mlp.*` are the merged `mlp.experts.*` of the HF converter).
The tokenizer is written as a gpt2-style byte-level BPE (vocab + merges), as llama.cpp's
convert_hf_to_gguf does for Qwen. Written tensor by tensor (safetensors safe_open), temp name then rename.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

ARCH = "qwen3moe"


def _tokenizer(writer, source: Path) -> None:
    import gguf

    spec = json.loads((source / "tokenizer.json").read_text())
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the HF ByteLevel pre-tokenizer's regex is GPT-2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    eos = cfg.get("eos_token")
    if eos in special:
        writer.add_eos_token_id(special[eos])
    pad = cfg.get("pad_token")
    if pad in special:
        writer.add_pad_token_id(special[pad])


def _numpy_dtype(safetensors_dtype: str, key: str) -> np.dtype:
    names = {"F32": "float32", "F16": "float16"}
    if safetensors_dtype not in names:
        raise ValueError(f"{key} is {safetensors_dtype}; this exporter writes F32 or F16 tensors")
    return np.dtype(names[safetensors_dtype])


def _gguf_name(name_map, key: str) -> str:
    hf = key.replace(".mlp.switch_mlp.", ".mlp.experts.")
    name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for tensor {key}")
    return name


def export_gguf(source: Path, out: Path) -> Path:
    """Write `source` (an mlx-lm qwen3_moe directory, unquantized) to `out`; return `out`."""
    import gguf
    from safetensors import safe_open

    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "qwen3_moe":
        raise ValueError(f"{source} is {config.get('model_type')}; this exporter writes qwen3_moe only")
    if "quantization" in config:
        raise ValueError(f"{source} is quantized; export an unquantized model")
    layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, layers)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_name(source.name)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    _tokenizer(writer, source)

    files = sorted(source.glob("*.safetensors"))
    plan: list[tuple[Path, str, str]] = []  # (file, key, gguf name)
    dtypes = set()
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dtype = _numpy_dtype(t.get_dtype(), key)
                dtypes.add(dtype)
                shape = t.get_shape()
                writer.add_tensor_info(_gguf_name(name_map, key), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
                plan.append((file, key, _gguf_name(name_map, key)))
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtypes == {np.dtype("float32")} else gguf.LlamaFileType.MOSTLY_F16
    )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for file in files:
            with safe_open(str(file), framework="numpy") as f:
                for path, key, _ in plan:
                    if path == file:
                        writer.write_tensor_data(f.get_tensor(key))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(export_gguf(args.source, args.out))


if __name__ == "__main__":
    main()
