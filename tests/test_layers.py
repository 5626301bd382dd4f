"""Imports run one way: protos <- node <- coordinator; mobile_export beside coordinator over node and
protos; testing on top; the product never imports bench; only the adapters import grpc."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "protos": {"protos"},
    "node": {"protos", "node"},
    "coordinator": {"protos", "node", "coordinator"},
    "mobile_export": {"protos", "node", "mobile_export"},
    "testing": {"protos", "node", "coordinator", "mobile_export", "testing"},
}
GRPC_ADAPTERS = {"protos/flashmesh_pb2_grpc.py", "protos/generate.py", "node/server.py", "coordinator/client.py"}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _files(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_one_way(part):
    wrong = []
    for path in _files(part):
        rel = path.relative_to(ROOT).as_posix()
        for module in _imports(path):
            top = module.split(".")
            if top[0] == "bench" or top[:2] == ["flashmesh", "bench"]:
                wrong.append(f"{rel} imports {module} (benchmarks are not part of the product)")
            elif top[0] == "flashmesh" and len(top) > 1 and top[1] not in ALLOWED[part]:
                wrong.append(f"{rel} imports {module}")
            elif top[0] in ALLOWED:
                wrong.append(f"{rel} imports {module} (import it as flashmesh.{module})")
            elif top[0] == "grpc" and rel not in GRPC_ADAPTERS:
                wrong.append(f"{rel} imports grpc (only the transport adapters may)")
    assert not wrong, "\n".join(wrong)
