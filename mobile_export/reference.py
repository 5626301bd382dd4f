"""A NumPy reference executor for the bundle: runs the *saved* MIL programs (read back from the
.mlpackage files) op by op, with the bundle's expert records, as the iOS app would call them.

Only the ops the exporter emits are implemented; anything else is an error naming the op. Every op
computes in float32 and stores its result in the dtype the program declares (fp16 activations), as
Core ML's GPU/ANE do (fp16 storage, wider accumulation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from coremltools.converters.mil.mil import types
from flashmesh.mobile_export.bundle_format import BundleExperts
from flashmesh.mobile_export.saved import load_saved_program
from flashmesh.node.bundle_format import load_manifest
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)


def _f(a):
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def _slices(begin, end):
    return tuple(slice(int(b), int(e)) for b, e in zip(begin, end, strict=True))


def _topk(x, k, axis=-1, ascending=False, **_):
    order = np.argsort(x if ascending else -x, axis=int(axis), kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=int(axis))
    return np.take_along_axis(x, idx, axis=int(axis)), idx


def _softmax(x, axis=-1):
    m = np.max(x, axis=int(axis), keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=int(axis), keepdims=True)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    return np.matmul(np.swapaxes(x, -1, -2) if transpose_x else x, np.swapaxes(y, -1, -2) if transpose_y else y)


def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def _slice_update(x, update, begin, end, **_):
    out = np.array(x, copy=True)
    out[_slices(begin, end)] = update
    return out


OPS = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(x + epsilon),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "softmax": _softmax,
    "cast": lambda x, dtype: x,
    "identity": lambda x: x,
    "reshape": lambda x, shape: np.reshape(x, [int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "concat": lambda values, axis, interleave=False: np.concatenate(values, axis=int(axis)),
    "slice_by_index": lambda x, begin, end, **_: x[_slices(begin, end)],
    "slice_update": _slice_update,
    "gather": lambda x, indices, axis=0, **_: np.take(x, indices.astype(np.int64), axis=int(axis)),
    "gather_along_axis": lambda x, indices, axis=0, **_: np.take_along_axis(
        x, indices.astype(np.int64), axis=int(axis)
    ),
    "greater_equal": lambda x, y: x >= y,
    "reduce_sum": lambda x, axes, keep_dims=False: np.sum(
        x, axis=tuple(int(a) for a in axes), keepdims=bool(keep_dims)
    ),
    "reduce_mean": lambda x, axes, keep_dims=False: np.mean(
        x, axis=tuple(int(a) for a in axes), keepdims=bool(keep_dims)
    ),
    "reduce_min": lambda x, axes, keep_dims=False: np.min(
        x, axis=tuple(int(a) for a in axes), keepdims=bool(keep_dims)
    ),
    "matmul": _matmul,
    "linear": _linear,
    "topk": _topk,
}


class Interpreter:
    """Runs functions of one saved package."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self.program = load_saved_program(package)

    def run(self, function: str, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """inputs by name; `states` (by name) are read and updated in place, as an MLState is."""
        func = self.program.functions[function]
        env: dict[str, np.ndarray] = {}
        for name, var in func.inputs.items():
            env[name] = states[name] if types.is_state(var.sym_type) else inputs[name]

        def value(v):
            if isinstance(v, (list, tuple)):
                return [value(x) for x in v]
            return env[v.name] if v.name in env else v.val

        for op in func.operations:
            if op.op_type == "const":
                env[op.outputs[0].name] = op.outputs[0].val
                continue
            args = {k: value(v) for k, v in op.inputs.items()}
            if op.op_type == "read_state":
                results = [np.array(args["input"], copy=True)]
            elif op.op_type == "coreml_update_state":
                states[op.inputs["state"].name] = np.asarray(args["value"]).copy()
                results = [args["value"]]
            elif op.op_type in OPS:
                args = {
                    k: (_f(v) if isinstance(v, np.ndarray) else [_f(x) for x in v] if isinstance(v, list) else v)
                    for k, v in args.items()
                }
                out = OPS[op.op_type](**args)
                results = list(out) if isinstance(out, tuple) else [out]
            else:
                raise UserError(f"{self.package}: the reference executor has no op {op.op_type!r}")
            for var, res in zip(op.outputs, results, strict=True):
                env[var.name] = np.asarray(res).astype(types.nptype_from_builtin(var.dtype))
        return {v.name: env[v.name] for v in func.outputs}


class ReferenceRunner:
    """Runs the whole bundle (dense segments + expert kernel + records) for a token sequence."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle)
        self.packages = {p["path"]: Interpreter(self.bundle / p["path"]) for p in self.manifest["coreml"]["packages"]}
        self.kernel = Interpreter(self.bundle / self.manifest["coreml"]["kernel"]["path"])
        self.experts = BundleExperts(self.bundle)
        emb = self.manifest["embeddings"]
        self.embeddings = np.fromfile(self.bundle / emb["file"], dtype=np.float16).reshape(emb["shape"])  # [V, H]
        self.ctx = self.manifest["runtime"]["context"]
        self.prefill = self.manifest["runtime"]["prefill_tokens"]
        self.k = self.manifest["runtime"]["kernel_slots"]
        self.reset()

    def reset(self) -> None:
        self.states: dict[str, np.ndarray] = {}
        for pkg in self.manifest["coreml"]["packages"]:
            for fn in pkg["functions"].values():
                for s in fn["states"]:
                    self.states[s["name"]] = np.zeros(s["shape"], np.float16)
        self.pos = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens at the current position; return logits [len(tokens), V] (float32)."""
        if self.pos + len(tokens) > self.ctx:
            raise UserError(f"context of {self.ctx} tokens is full")
        if len(tokens) == 1:
            return self._call(tokens, "decode", 1)
        out = []
        for i in range(0, len(tokens), self.prefill):
            chunk = tokens[i : i + self.prefill]
            out.append(self._call(chunk, "prefill", self.prefill))
        return np.concatenate(out)

    def _call(self, tokens: list[int], mode: str, t: int) -> np.ndarray:
        n = len(tokens)
        if self.pos + t > self.ctx:
            raise UserError(f"a {mode} call of {t} tokens at position {self.pos} passes the context of {self.ctx}")
        ids = np.array(tokens + [0] * (t - n))
        positions = (self.pos + np.arange(t)).astype(np.int32)  # [T]
        mask = np.where(np.arange(self.ctx)[None, :] <= positions[:, None], 0.0, -np.inf)
        mask = mask.astype(np.float16)[None, None]  # [1, 1, T, C]
        carry = {"x_embed": self.embeddings[ids][None]}  # [1, T, H]
        logits = None
        for seg in self.manifest["segments"]:
            inputs = dict(carry)
            if seg["layers"]:
                inputs |= {"positions": positions, "mask": mask}
            out = self.packages[seg["package"]].run(seg[mode], inputs, self.states)
            if seg["moe_layer"] is None:
                logits = out["logits"][0]  # [T, V]
                break
            y = self._experts(
                seg["moe_layer"], out["xn"][0], out["expert_ids"][0][:n], out["expert_weights"][0][:n], mode, t
            )
            carry = {"h_in": out["h"], "y_in": y[None]}
        self.pos += n
        return logits[:n].astype(np.float32)

    def _experts(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray, mode: str, t: int) -> np.ndarray:
        """x [T, H] fp16, ids/w [n, k] for the n real tokens -> y [T, H] fp16: kernel calls of k slots."""
        if mode == "decode":
            inputs = self.experts.kernel_inputs(layer, [int(e) for e in ids[0]])
            return self.kernel.run("decode", {"x": x, "w": w.astype(np.float16), **inputs}, {})["y"]
        wanted = sorted({int(e) for e in ids.reshape(-1)})
        total = np.zeros(x.shape, np.float32)
        for g in range(0, len(wanted), self.k):
            group = wanted[g : g + self.k]
            slots = group + [group[0]] * (self.k - len(group))  # pad with a zero-weight repeat
            wt = np.zeros((t, self.k), np.float16)  # [T, k]
            for s, e in enumerate(group):
                rows, cols = np.nonzero(ids == e)
                wt[rows, s] = w[rows, cols]
            y = self.kernel.run("prefill", {"x": x, "w": wt, **self.experts.kernel_inputs(layer, slots)}, {})["y"]
            total += y.astype(np.float32)
        return total.astype(np.float16)

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy: returns the generated tokens and the logits [V] that chose each."""
        self.reset()
        logits = self.forward(prompt)[-1]
        tokens, steps = [], []
        for _ in range(max_tokens):
            steps.append(logits)
            tokens.append(int(np.argmax(logits)))
            logits = self.forward([tokens[-1]])[-1]
        return tokens, steps

    def close(self) -> None:
        self.experts.close()
