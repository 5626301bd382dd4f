"""Per-architecture pieces of the dense programs: attention (with its KV state), router, shared experts.

Supported: qwen3_moe (GQA attention with q/k norms, softmax top-k routing), mixtral (GQA attention
without q/k norms, softmax over the top-k logits) and deepseek_v3 / Kimi K2 (MLA attention caching the
compressed latent, sigmoid group routing, shared experts, dense first layers). Anything else is
refused with one line naming what is unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from coremltools.converters.mil import Builder as mb
from flashmesh.mobile_export import mil_ops as ops
from flashmesh.protos.errors import UserError

SUPPORTED = ("deepseek_v3", "mixtral", "qwen3_moe")


def rope_table(rope, dim: int, ctx: int, *, traditional: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [C, dim/2] read off the model's own rope module (any scaling it applies included)."""
    half = dim // 2
    unit = np.tile([1.0, 0.0], half) if traditional else np.concatenate([np.ones(half), np.zeros(half)])
    y = np.asarray(rope(mx.array(np.broadcast_to(unit, (1, 1, ctx, dim)).astype(np.float32))))[0, 0]
    return (y[:, 0::2], y[:, 1::2]) if traditional else (y[:, :half], y[:, half:])


@dataclass
class State:
    name: str
    shape: list[int]  # [1, heads, C, dim]


class Arch:
    """What the segment builder needs from an architecture."""

    def __init__(self, config: dict, model, *, ctx: int) -> None:
        self.cfg = config
        self.model = model  # mlx-lm model built lazily (rope modules, scales); no weights read
        self.ctx = ctx
        self.eps = config["rms_norm_eps"]
        self.hidden = config["hidden_size"]
        self.top_k = config["num_experts_per_tok"]

    def prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def lm_head_key(self) -> str:
        return "model.embed_tokens.weight" if self.cfg.get("tie_word_embeddings") else "lm_head.weight"

    def dense_mlp(self, reg, xn, layer: int):
        return ops.swiglu_mlp(reg, xn, f"{self.prefix(layer)}.mlp")

    def shared_experts(self, reg, xn, layer: int):
        return None


class Qwen3Moe(Arch):
    traditional = False
    qk_norm = True  # RMS norms on q and k per head before rope
    moe_block = "mlp"  # the MoE module's name in a decoder layer (its router is `<block>.gate`)

    def __init__(self, config: dict, model, *, ctx: int) -> None:
        super().__init__(config, model, ctx=ctx)
        c = config
        self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or c["hidden_size"] // self.nh
        attn = model.model.layers[0].self_attn
        self.scale = attn.scale
        self.traditional = bool(getattr(attn.rope, "traditional", False))
        self.cos, self.sin = rope_table(attn.rope, self.hd, ctx, traditional=self.traditional)

    def states(self, layer: int) -> list[State]:
        return [
            State(f"k_{layer}", [1, self.nkv, self.ctx, self.hd]),
            State(f"v_{layer}", [1, self.nkv, self.ctx, self.hd]),
        ]

    def attention(self, reg, x, layer: int, positions, mask, states: dict, t: int):
        """x fp16 [1, T, H] (normed) -> [1, T, H]; writes k/v [1, nkv, T, hd] into the states."""
        p = f"{self.prefix(layer)}.self_attn"
        nh, nkv, hd = self.nh, self.nkv, self.hd
        q = mb.reshape(x=ops.linear(reg, x, f"{p}.q_proj.weight"), shape=[1, t, nh, hd])
        k = mb.reshape(x=ops.linear(reg, x, f"{p}.k_proj.weight"), shape=[1, t, nkv, hd])
        if self.qk_norm:
            q = ops.rms_norm(q, reg.const(f"{p}.q_norm.weight", "float32"), self.eps)
            k = ops.rms_norm(k, reg.const(f"{p}.k_norm.weight", "float32"), self.eps)
        v = ops.heads(ops.linear(reg, x, f"{p}.v_proj.weight"), nkv, hd, t)  # [1, nkv, T, hd]
        q = mb.transpose(x=q, perm=[0, 2, 1, 3])
        k = mb.transpose(x=k, perm=[0, 2, 1, 3])
        cos, sin = ops.rope_tables(self.cos, self.sin, positions, "attn")
        q = ops.rope(q, cos, sin, traditional=self.traditional, t=t, n=nh, d=hd)
        k = ops.rope(k, cos, sin, traditional=self.traditional, t=t, n=nkv, d=hd)
        keys = ops.cache_update(states[f"k_{layer}"], k, positions, [1, nkv, t, hd])  # [1, nkv, C, hd]
        values = ops.cache_update(states[f"v_{layer}"], v, positions, [1, nkv, t, hd])
        out = ops.attention(q, keys, values, mask, n_heads=nh, n_kv=nkv, t=t, ctx=self.ctx, scale=self.scale)
        return ops.linear(reg, ops.merge_heads(out, nh, hd, t), f"{p}.o_proj.weight")

    @property
    def normalize_topk(self) -> bool:
        return bool(self.cfg.get("norm_topk_prob", False))

    def router(self, reg, xn, layer: int, t: int):
        key = f"{self.prefix(layer)}.{self.moe_block}.gate.weight"
        return ops.softmax_topk_router(reg, xn, key, k=self.top_k, normalize=self.normalize_topk)


class Mixtral(Qwen3Moe):
    """Mixtral: qwen3_moe's attention without q/k norms; every layer MoE (`block_sparse_moe`). Its router
    takes the softmax of the top-k logits, which equals the softmax over all experts renormalised over
    the top-k."""

    qk_norm = False
    moe_block = "block_sparse_moe"

    @property
    def normalize_topk(self) -> bool:
        return True


class DeepseekV3(Arch):
    traditional = True

    def __init__(self, config: dict, model, *, ctx: int) -> None:
        super().__init__(config, model, ctx=ctx)
        c = config
        if c.get("attention_bias"):
            raise UserError("export-ios cannot express deepseek_v3 with attention_bias=true")
        if c.get("topk_method", "noaux_tc") != "noaux_tc" or c.get("scoring_func", "sigmoid") != "sigmoid":
            raise UserError(
                f"export-ios cannot express deepseek routing {c.get('topk_method')}/{c.get('scoring_func')}"
            )
        self.nh = c["num_attention_heads"]
        self.rank, self.rope_dim = c["kv_lora_rank"], c["qk_rope_head_dim"]
        self.nope, self.v_dim = c["qk_nope_head_dim"], c["v_head_dim"]
        attn = model.model.layers[0].self_attn
        self.scale = attn.scale
        self.cos, self.sin = rope_table(attn.rope, self.rope_dim, ctx, traditional=True)

    def states(self, layer: int) -> list[State]:
        return [
            State(f"latent_{layer}", [1, 1, self.ctx, self.rank]),
            State(f"kpe_{layer}", [1, 1, self.ctx, self.rope_dim]),
        ]

    def attention(self, reg, x, layer: int, positions, mask, states: dict, t: int):
        """MLA in its absorbed form; the state caches the normed latent [1, 1, C, rank] and k_pe [1, 1, C, rope]."""
        p = f"{self.prefix(layer)}.self_attn"
        nh, qhd = self.nh, self.nope + self.rope_dim
        if self.cfg.get("q_lora_rank") is None:
            q = ops.linear(reg, x, f"{p}.q_proj.weight")
        else:
            qa = ops.rms_norm(
                ops.linear(reg, x, f"{p}.q_a_proj.weight"), reg.const(f"{p}.q_a_layernorm.weight", "float32"), 1e-6
            )
            q = ops.linear(reg, qa, f"{p}.q_b_proj.weight")
        q = ops.heads(q, nh, qhd, t)  # [1, nh, T, qhd]
        q_nope = mb.slice_by_index(x=q, begin=[0, 0, 0, 0], end=[1, nh, t, self.nope])
        q_pe = mb.slice_by_index(x=q, begin=[0, 0, 0, self.nope], end=[1, nh, t, qhd])
        ckv = ops.linear(reg, x, f"{p}.kv_a_proj_with_mqa.weight")  # [1, T, rank + rope]
        latent = mb.slice_by_index(x=ckv, begin=[0, 0, 0], end=[1, t, self.rank])
        k_pe = mb.slice_by_index(x=ckv, begin=[0, 0, self.rank], end=[1, t, self.rank + self.rope_dim])
        latent = mb.expand_dims(
            x=ops.rms_norm(latent, reg.const(f"{p}.kv_a_layernorm.weight", "float32"), 1e-6), axes=[1]
        )
        k_pe = mb.expand_dims(x=k_pe, axes=[1])  # [1, 1, T, rope]
        cos, sin = ops.rope_tables(self.cos, self.sin, positions, "mla")
        q_pe = ops.rope(q_pe, cos, sin, traditional=True, t=t, n=nh, d=self.rope_dim)
        k_pe = ops.rope(k_pe, cos, sin, traditional=True, t=t, n=1, d=self.rope_dim)
        lat = ops.cache_update(states[f"latent_{layer}"], latent, positions, [1, 1, t, self.rank])  # [1, 1, C, rank]
        kpe = ops.cache_update(states[f"kpe_{layer}"], k_pe, positions, [1, 1, t, self.rope_dim])
        pe_scores = mb.matmul(x=mb.mul(x=q_pe, y=np.float16(self.scale)), y=kpe, transpose_y=True)  # [1, nh, T, C]
        q_abs = mb.matmul(x=q_nope, y=reg.const(f"{p}.embed_q.weight"), transpose_y=True)  # [1, nh, T, rank]
        o = ops.attention(
            q_abs, lat, lat, mask, n_heads=nh, n_kv=1, t=t, ctx=self.ctx, scale=self.scale, extra=pe_scores
        )
        o = mb.matmul(x=o, y=reg.const(f"{p}.unembed_out.weight"), transpose_y=True)  # [1, nh, T, v_dim]
        return ops.linear(reg, ops.merge_heads(o, nh, self.v_dim, t), f"{p}.o_proj.weight")

    def router(self, reg, xn, layer: int, t: int):
        return ops.sigmoid_group_router(reg, xn, f"{self.prefix(layer)}.mlp.gate", cfg=self.cfg, t=t)

    def shared_experts(self, reg, xn, layer: int):
        if self.cfg.get("n_shared_experts") is None:
            return None
        return ops.swiglu_mlp(reg, xn, f"{self.prefix(layer)}.mlp.shared_experts")


def arch_for(config: dict, model, *, ctx: int) -> Arch:
    model_type = config.get("model_type")
    if model_type == "qwen3_moe":
        return Qwen3Moe(config, model, ctx=ctx)
    if model_type == "mixtral":
        return Mixtral(config, model, ctx=ctx)
    if model_type == "deepseek_v3":
        return DeepseekV3(config, model, ctx=ctx)
    raise UserError(f"export-ios cannot express model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
