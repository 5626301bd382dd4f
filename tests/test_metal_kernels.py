"""The Swift node's Metal kernels (mobile_export/ios/Sources/FlashmeshPlatform/Kernels/expert_kernels.metal),
compiled as C++ through an emulation shim (mobile_export/ios/tools/metal-emulation) and run on the CPU
over their whole grid, against MLX's own quantized matmul (the arithmetic of mlx-lm's quantized expert
modules) on MLX-quantized weights. This checks the kernels' arithmetic and indexing (packing, groups,
bounds); not the Metal compiler, the GPU, or the Swift host that encodes them (MetalExpertCompute),
which these machines cannot run (docs/ios.md)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

IOS = Path(__file__).resolve().parent.parent / "mobile_export" / "ios"
KERNELS = IOS / "Sources" / "FlashmeshPlatform" / "Kernels" / "expert_kernels.metal"
EMULATION = IOS / "tools" / "metal-emulation"


class Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("rows", "out_dim", "in_dim", "bits", "group_size")]


def _compiler() -> str | None:
    return (
        shutil.which("clang++")
        or shutil.which("g++")
        or next((c for c in ("/opt/swift/usr/bin/clang++",) if Path(c).is_file()), None)
    )


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("SKIPPED: no C++ compiler to emulate the Metal kernels")
    lib = tmp_path_factory.mktemp("metal") / "kernels.so"
    flags = ["-std=c++17", "-O2", "-shared", "-fPIC", "-w", f"-I{EMULATION}", f'-DKERNELS="{KERNELS}"']
    subprocess.run([cxx, *flags, str(EMULATION / "driver.cpp"), "-o", str(lib)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def matmul(kernels, x: np.ndarray, weights) -> np.ndarray:
    """x [R, K] @ W^T by the kernels; weights: fp32 [N, K] or (words, scales, biases, bits, group)."""
    rows, k = x.shape
    if isinstance(weights, np.ndarray):
        n = weights.shape[0]
        y = np.full((rows, n), np.nan, np.float32)
        kernels.run_matmul_dense(_ptr(x), _ptr(weights), _ptr(y), Params(rows, n, k, 0, 1))
        return y
    words, scales, biases, bits, group = weights
    n = words.shape[0]
    y = np.full((rows, n), np.nan, np.float32)
    kernels.run_matmul_affine(
        _ptr(x), _ptr(words), _ptr(scales), _ptr(biases), _ptr(y), Params(rows, n, k, bits, group)
    )  # fmt: skip
    return y


def _quantized(w: mx.array, bits: int, group: int):
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    as_np = [np.ascontiguousarray(np.array(a)) for a in (wq, scales, biases)]
    return (wq, scales, biases), (as_np[0].astype(np.uint32), as_np[1], as_np[2], bits, group)


@pytest.mark.parametrize(("bits", "group"), [(2, 64), (4, 32), (4, 64), (8, 64)])
def test_affine_matmul_equals_mlx_quantized_matmul(kernels, bits, group):
    mx.random.seed(bits * 100 + group)
    w = mx.random.normal((96, 256)) * 0.05  # [N, K]
    x = mx.random.normal((3, 256))
    (wq, s, b), packed = _quantized(w, bits, group)
    want = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=bits))
    got = matmul(kernels, np.array(x), packed)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_dense_matmul_and_swiglu_equal_mlx(kernels):
    mx.random.seed(7)
    h, i, rows = 128, 64, 4
    gate, up, down = (mx.random.normal(s) * 0.1 for s in ((i, h), (i, h), (h, i)))
    x = mx.random.normal((rows, h))
    want = np.array((nn.silu(x @ gate.T) * (x @ up.T)) @ down.T)  # SwitchGLU's expert: down(silu(gate) * up)
    g = matmul(kernels, np.array(x), np.array(gate))
    u = matmul(kernels, np.array(x), np.array(up))
    kernels.run_silu_multiply(_ptr(g), _ptr(u), ctypes.c_uint32(g.size))
    got = matmul(kernels, g, np.array(down))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_quantized_swiglu_equals_mlx(kernels):
    """A 4-bit expert computed on its packed words, as a phone does, against MLX on the same words."""
    mx.random.seed(11)
    h, i, rows, bits, group = 256, 128, 2, 4, 64
    mats = [mx.random.normal(s) * 0.05 for s in ((i, h), (i, h), (h, i))]
    q = [_quantized(m, bits, group) for m in mats]
    x = mx.random.normal((rows, h))

    def qmm(a, k):
        wq, s, b = q[k][0]
        return mx.quantized_matmul(a, wq, s, b, transpose=True, group_size=group, bits=bits)

    want = np.array(qmm(nn.silu(qmm(x, 0)) * qmm(x, 1), 2))
    g = matmul(kernels, np.array(x), q[0][1])
    u = matmul(kernels, np.array(x), q[1][1])
    kernels.run_silu_multiply(_ptr(g), _ptr(u), ctypes.c_uint32(g.size))
    got = matmul(kernels, g, q[2][1])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
