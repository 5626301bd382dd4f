"""`flashmesh models [ls | rm NAME...]`: the stores packed from model directories and hub ids on first use."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from flashmesh.coordinator.tables import fitted_table, stdout_console
from flashmesh.protos.sizes import format_bytes
from rich.console import Console

out = stdout_console()
err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or remove the stores packed from model directories and hub ids")
    p.set_defaults(func=cmd_models_ls)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models_sub = p.add_subparsers(dest="models_command")
    ls = models_sub.add_parser("ls", help="list the cached stores (the default)")
    ls.set_defaults(func=cmd_models_ls)
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")
    rm = models_sub.add_parser("rm", help="remove cached stores")
    rm.set_defaults(func=cmd_models_rm)
    rm.add_argument("names", nargs="+", metavar="NAME", help="as `flashmesh models` lists them")


def cmd_models_ls(args) -> int:
    from flashmesh.coordinator.model_cache import cache_root, cached_models

    rows = cached_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        err.print(f"no cached models in {cache_root()}; `flashmesh run MODEL_DIR_OR_HUB_ID` packs one on first use")
        return 0
    cells = [
        [r["name"], r["source"], format_bytes(r["bytes"]),
         datetime.fromtimestamp(r["packed_at"]).strftime("%Y-%m-%d %H:%M") if r["packed_at"] else "?"]
        for r in rows
    ]  # fmt: skip
    total = format_bytes(sum(r["bytes"] for r in rows))
    title = f"{len(rows)} cached models, {total} in {cache_root()}"
    table = fitted_table(["name", "source", "size", "packed"], cells, keep={"name", "source"},
                         stack=("name", "source"), title=title, console=out)  # fmt: skip
    out.print(table)
    return 0


def cmd_models_rm(args) -> int:
    from flashmesh.coordinator.model_cache import remove_model

    for name in args.names:
        path = remove_model(name)
        err.print(f"removed {path}", markup=False, highlight=False)
    return 0
