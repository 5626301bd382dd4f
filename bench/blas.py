"""Debian's OpenBLAS under MLX for the CPU-heavy bench tools (training, calibration).

The mlx[cpu] wheel for Linux links the reference BLAS (~5 GFLOP/s on the 2-core VM, where numpy's
OpenBLAS reaches ~75). When Debian's libopenblas0-pthread is installed, a tool re-executes itself
with it preloaded: MLX's cblas_sgemm calls then resolve to OpenBLAS (10-20x faster matmuls). The
engine and the speed benchmarks never do this; their figures are with the wheel's own BLAS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
MARK = "FLASHMESH_BENCH_BLAS"


def reexec_with_openblas(module: str, argv: list[str]) -> None:
    """Re-run `python -m module argv` with OpenBLAS preloaded and 2 threads (once; a no-op when it is
    missing or already done). A fixed thread count keeps results deterministic."""
    if os.environ.get(MARK) or not OPENBLAS.is_file():
        return
    env = {**os.environ, "LD_PRELOAD": str(OPENBLAS), "OPENBLAS_NUM_THREADS": "2", MARK: "openblas-pthread"}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def blas_in_use() -> str:
    return os.environ.get(MARK) or "mlx wheel's reference BLAS"
