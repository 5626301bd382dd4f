"""Building blocks of the bundle's MIL programs (coremltools' MIL builder, no torch).

Activations are fp16 [1, T, H] between blocks (what iOS runs); norms, routers and their weights are
fp32 inside (sums of squares overflow fp16 on real models, and top-k must not flip on fp16 ties).
Every weight constant is named after the store tensor it holds, so verify-bundle can round-trip it.
"""

from __future__ import annotations

import re

import numpy as np
from coremltools.converters.mil import Builder as mb
from flashmesh.mobile_export.weights import DenseWeights
from flashmesh.node.store_format import checksum

NEG_INF = float("-inf")


class WeightRegistry:
    """Makes weight consts from store tensors and remembers which const holds which tensor."""

    def __init__(self, dense: DenseWeights) -> None:
        self.dense = dense
        self.used: dict[str, dict] = {}  # const name -> {"key": store tensor, "dtype": float16|float32}
        self._cache: dict[str, np.ndarray] = {}

    def array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self.dense.get(key)
        return self._cache[key]

    def const(self, key: str, dtype: str = "float16"):
        arr = self.array(key).astype(np.dtype(dtype))
        name = "w_" + re.sub(r"[^A-Za-z0-9_]", "_", key) + ("_f32" if dtype == "float32" else "")
        # save_multifunction stores identical constants once under one name: verify also finds by content
        self.used[name] = {"key": key, "dtype": dtype, "checksum": checksum(np.ascontiguousarray(arr).tobytes())}
        return mb.const(val=arr, name=name)

    def clear_cache(self) -> None:
        self._cache.clear()


def rms_norm(x, weight, eps: float):
    """x fp16 [..., D] -> fp16 [..., D]; computed in fp32 like mlx's fast rms_norm."""
    xf = mb.cast(x=x, dtype="fp32")
    ms = mb.reduce_mean(x=mb.mul(x=xf, y=xf), axes=[-1], keep_dims=True)
    y = mb.mul(x=xf, y=mb.rsqrt(x=mb.add(x=ms, y=np.float32(eps))))
    return mb.cast(x=mb.mul(x=y, y=weight), dtype="fp16")


def linear(reg: WeightRegistry, x, key: str):
    """x fp16 [1, T, in] @ W[out, in]^T -> fp16 [1, T, out]."""
    return mb.linear(x=x, weight=reg.const(key))


def swiglu_mlp(reg: WeightRegistry, x, prefix: str):
    """mlx-lm's MLP: down(silu(gate(x)) * up(x)); x [1, T, H] -> [1, T, H]."""
    g = linear(reg, x, f"{prefix}.gate_proj.weight")
    u = linear(reg, x, f"{prefix}.up_proj.weight")
    return linear(reg, mb.mul(x=mb.silu(x=g), y=u), f"{prefix}.down_proj.weight")


def heads(x, n: int, d: int, t: int):
    """[1, T, n*d] -> [1, n, T, d]"""
    return mb.transpose(x=mb.reshape(x=x, shape=[1, t, n, d]), perm=[0, 2, 1, 3])


def merge_heads(x, n: int, d: int, t: int):
    """[1, n, T, d] -> [1, T, n*d]"""
    return mb.reshape(x=mb.transpose(x=x, perm=[0, 2, 1, 3]), shape=[1, t, n * d])


def rope(x, cos, sin, *, traditional: bool, t: int, n: int, d: int):
    """Rotary embedding with tables gathered at the positions. x [1, n, T, d], cos/sin [T, d/2]."""
    half = d // 2
    if traditional:  # interleaved pairs (x0, x1), (x2, x3), ...
        xr = mb.reshape(x=x, shape=[1, n, t, half, 2])
        x1 = mb.reshape(x=mb.slice_by_index(x=xr, begin=[0, 0, 0, 0, 0], end=[1, n, t, half, 1]), shape=[1, n, t, half])
        x2 = mb.reshape(x=mb.slice_by_index(x=xr, begin=[0, 0, 0, 0, 1], end=[1, n, t, half, 2]), shape=[1, n, t, half])
    else:  # halves
        x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, n, t, half])
        x2 = mb.slice_by_index(x=x, begin=[0, 0, 0, half], end=[1, n, t, d])
    o1 = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
    o2 = mb.add(x=mb.mul(x=x1, y=sin), y=mb.mul(x=x2, y=cos))
    if traditional:
        o = mb.concat(values=[mb.expand_dims(x=o1, axes=[-1]), mb.expand_dims(x=o2, axes=[-1])], axis=-1)
        return mb.reshape(x=o, shape=[1, n, t, d])
    return mb.concat(values=[o1, o2], axis=-1)


def rope_tables(cos: np.ndarray, sin: np.ndarray, positions, name: str):
    """Gather cos/sin rows at `positions` [T] int32. Tables [C, d/2] fp16 -> [T, d/2]."""
    c = mb.gather(x=mb.const(val=cos.astype(np.float16), name=f"rope_cos_{name}"), indices=positions, axis=0)
    s = mb.gather(x=mb.const(val=sin.astype(np.float16), name=f"rope_sin_{name}"), indices=positions, axis=0)
    return c, s


def cache_update(state, new, positions, shape: list[int]):
    """Write `new` [1, h, T, d] into the KV state [1, h, C, d] at positions[0]; return the updated cache."""
    cache = mb.read_state(input=state)
    pos0 = mb.slice_by_index(x=positions, begin=[0], end=[1])  # [1]
    zero = np.zeros(1, np.int32)
    begin = mb.concat(values=[zero, zero, pos0, zero], axis=0)
    end = mb.add(x=begin, y=np.array(shape, np.int32))
    cache = mb.slice_update(x=cache, update=new, begin=begin, end=end)
    mb.coreml_update_state(state=state, value=cache)
    return cache


def attention(q, k, v, mask, *, n_heads: int, n_kv: int, t: int, ctx: int, scale: float, extra=None):
    """softmax(q k^T * scale + extra + mask) v with grouped kv heads.

    q [1, nh, T, dq], k [1, nkv, C, dq], v [1, nkv, C, dv], mask [1, 1, T, C] (0 / -inf),
    extra: optional scores [1, nh, T, C] added before the mask (MLA's rope part). -> [1, nh, T, dv]"""
    rep = n_heads // n_kv
    dq = q.shape[-1]
    qg = mb.reshape(x=q, shape=[1, n_kv, rep * t, dq])
    scores = mb.matmul(x=mb.mul(x=qg, y=np.float16(scale)), y=k, transpose_y=True)  # [1, nkv, rep*T, C]
    scores = mb.reshape(x=scores, shape=[1, n_heads, t, ctx])
    if extra is not None:
        scores = mb.add(x=scores, y=extra)
    probs = mb.softmax(x=mb.add(x=scores, y=mask), axis=-1)
    out = mb.matmul(x=mb.reshape(x=probs, shape=[1, n_kv, rep * t, ctx]), y=v)  # [1, nkv, rep*T, dv]
    return mb.reshape(x=out, shape=[1, n_heads, t, v.shape[-1]])


def softmax_topk_router(reg: WeightRegistry, xn, key: str, *, k: int, normalize: bool):
    """qwen3_moe routing: softmax over experts, top-k, optional renormalisation. xn [1, T, H] ->
    ids int32 [1, T, k], weights fp16 [1, T, k]. In fp32."""
    logits = mb.linear(x=mb.cast(x=xn, dtype="fp32"), weight=reg.const(key, "float32"))
    probs = mb.softmax(x=logits, axis=-1)
    vals, ids = mb.topk(x=probs, k=k, axis=-1, ascending=False, output_indices_dtype="int32")
    if normalize:
        vals = mb.real_div(x=vals, y=mb.reduce_sum(x=vals, axes=[-1], keep_dims=True))
    return ids, mb.cast(x=vals, dtype="fp16")


def sigmoid_group_router(reg: WeightRegistry, xn, prefix: str, *, cfg: dict, t: int):
    """deepseek_v3 / Kimi routing (noaux_tc): sigmoid scores + correction bias pick groups and experts;
    weights are the un-biased sigmoid scores, renormalised and scaled. -> ids [1, T, k], weights [1, T, k]"""
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    n_group, topk_group = cfg.get("n_group", 1), cfg.get("topk_group", 1)
    logits = mb.matmul(x=mb.cast(x=xn, dtype="fp32"), y=reg.const(f"{prefix}.weight", "float32"), transpose_y=True)
    scores = mb.sigmoid(x=logits)  # [1, T, E]
    biased = mb.add(x=scores, y=reg.const(f"{prefix}.e_score_correction_bias", "float32"))
    if n_group > 1:
        grouped = mb.reshape(x=biased, shape=[1, t, n_group, e // n_group])
        top2, _ = mb.topk(x=grouped, k=2, axis=-1, ascending=False)
        group_scores = mb.reduce_sum(x=top2, axes=[-1])  # [1, T, G]
        kept, _ = mb.topk(x=group_scores, k=topk_group, axis=-1, ascending=False)
        threshold = mb.reduce_min(x=kept, axes=[-1], keep_dims=True)  # [1, T, 1]
        keep = mb.cast(x=mb.greater_equal(x=group_scores, y=threshold), dtype="fp32")  # [1, T, G]
        grouped = mb.mul(x=grouped, y=mb.expand_dims(x=keep, axes=[-1]))
        biased = mb.reshape(x=grouped, shape=[1, t, e])
    _, ids = mb.topk(x=biased, k=k, axis=-1, ascending=False, output_indices_dtype="int32")
    vals = mb.gather_along_axis(x=scores, indices=ids, axis=-1)
    if k > 1 and cfg.get("norm_topk_prob", True):
        vals = mb.real_div(x=vals, y=mb.reduce_sum(x=vals, axes=[-1], keep_dims=True))
    vals = mb.mul(x=vals, y=np.float32(cfg.get("routed_scaling_factor", 1.0)))
    return ids, mb.cast(x=vals, dtype="fp16")
