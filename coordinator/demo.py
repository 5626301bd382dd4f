"""`flashmesh demo`: a small MoE model built locally, packed, and run streamed.

The source model and its store are cached under the work directory, keyed by architecture and
shape, so a second run skips building and packing.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.synthetic import build_model
from node.store_format import MANIFEST, StoreError
from node.store_writer import pack

# Big enough that a quarter of the experts is a real cache (8 layers x 32 experts, top-4).
DEMO_SHAPE = {"hidden": 128, "layers": 8, "experts": 32, "top_k": 4, "expert_hidden": 128}


def prepare_demo(workdir: Path, *, arch: str = "qwen3_moe", show_progress: bool = True) -> tuple[Path, Path]:
    """Build (once) and pack (once) the demo model; return (store, source model directory)."""
    workdir = Path(workdir)
    key = f"{arch}-" + "-".join(f"{k}{v}" for k, v in DEMO_SHAPE.items())
    source, store = workdir / f"{key}-model", workdir / f"{key}-store"
    if not (source / "config.json").is_file():
        try:
            build_model(source, arch, **DEMO_SHAPE)
        except ValueError as e:
            raise StoreError(f"{e}; the demo builds qwen3_moe, mixtral, deepseek_v3, gpt_oss or qwen3_next") from None
    if not (store / MANIFEST).is_file():
        pack(str(source), store, force=True, show_progress=show_progress)
    return store, source


def demo_cluster_dir(workdir: Path) -> Path:
    """The demo's cluster CA and coordinator certificate (made once); node certificates are
    issued per run by `local_nodes`."""
    from coordinator.certs import init_cluster
    from node.tls import CA_DIR

    path = Path(workdir) / "cluster"
    if not (path / CA_DIR).is_dir():
        init_cluster(path)
    return path


def reference_tokens(source: Path, prompt: str, *, max_tokens: int, chat: bool, prefill_step_size: int) -> list[int]:
    """Greedy tokens from mlx-lm's own load + stream_generate on the unpacked model."""
    from mlx_lm import load

    from coordinator.generate import encode_prompt, generate

    model, tokenizer = load(str(source))
    tokens = encode_prompt(tokenizer, prompt, chat=chat)
    return generate(model, tokenizer, tokens, max_tokens=max_tokens, prefill_step_size=prefill_step_size).tokens


def describe(store: Path) -> dict:
    return json.loads((store / MANIFEST).read_text())["config"]
