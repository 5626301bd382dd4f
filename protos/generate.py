"""Regenerate protos/flashmesh_pb2.py and flashmesh_pb2_grpc.py from flashmesh.proto with grpcio-tools.

python -m flashmesh.protos.generate            # writes next to the .proto
python -m flashmesh.protos.generate OUT_DIR    # writes into OUT_DIR (the drift test uses this)
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO = "flashmesh.proto"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc (grpcio-tools) on flashmesh.proto; return the files written."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with status {code}")
    grpc_module = out_dir / "flashmesh_pb2_grpc.py"
    # protoc writes `import flashmesh_pb2`; inside the package it must be relative.
    text = grpc_module.read_text().replace("import flashmesh_pb2 as", "from . import flashmesh_pb2 as")
    grpc_module.write_text(text)
    return [out_dir / "flashmesh_pb2.py", grpc_module]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
