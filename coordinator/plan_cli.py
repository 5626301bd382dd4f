"""`flashmesh plan MODEL --device ...`: will it fit, where do the experts go, how fast will it decode."""

from __future__ import annotations

import argparse
import json

from flashmesh.coordinator.planner import DEFAULT_LINK_MS
from flashmesh.coordinator.tables import fitted_table, stdout_console
from flashmesh.protos.sizes import format_bytes

out = stdout_console()


def register(sub: argparse._SubParsersAction) -> None:
    from flashmesh.coordinator.device_presets import PRESETS

    p = sub.add_parser("plan", help="predict fit, placement, hit rate and tok/s before downloading anything")
    p.set_defaults(func=cmd_plan)
    p.add_argument("model", help="a model directory, a store, a config.json, or a hub id (only its config is fetched)")
    p.add_argument(
        "--device", action="append", default=[], metavar="SPEC",
        help="NAME:RAM:FLASH_GBPS[:COMPUTE_GBPS], a preset, or NAME=PRESET (repeatable; the first is the "
        f"coordinator). Presets: {', '.join(PRESETS)}",
    )  # fmt: skip
    p.add_argument(
        "--coordinator", default=None, metavar="SPEC",
        help="a device that runs only the dense part (default: the first --device does both)",
    )  # fmt: skip
    p.add_argument("--budget", action="append", default=[], metavar="NAME=BYTES", help="a device's expert budget")
    p.add_argument("--routing", default=None, metavar="FILE", help="measured routing statistics (docs/plan.md)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token, if run with fewer than the model's")
    p.add_argument("--bits", type=int, default=None, help="plan as if the experts were quantized to BITS (affine)")
    p.add_argument("--link-ms", type=float, default=DEFAULT_LINK_MS, help="one request and reply between devices")
    p.add_argument("--layer-overhead-ms", type=float, default=0.0, help="fixed cost per MoE layer and token")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def make_plan(args):
    from flashmesh.coordinator.device_presets import parse_device
    from flashmesh.coordinator.hit_rate import Routing
    from flashmesh.coordinator.model_facts import load_facts
    from flashmesh.coordinator.planner import plan
    from flashmesh.protos.errors import UserError
    from flashmesh.protos.sizes import parse_bytes

    devices = [parse_device(d) for d in args.device or ["mbp-m3max-48"]]
    for entry in args.budget:
        name, _, size = entry.partition("=")
        matches = [i for i, d in enumerate(devices) if d.name == name]
        if not matches or not size:
            raise UserError(f"--budget {entry}: write NAME=BYTES with NAME one of {', '.join(d.name for d in devices)}")
        devices[matches[0]] = devices[matches[0]].__class__(**{**devices[matches[0]].__dict__,
                                                               "budget_bytes": parse_bytes(size)})  # fmt: skip
    facts = load_facts(args.model, bits=args.bits, top_k=args.top_k)
    routing = Routing.load(args.routing) if args.routing else None
    coordinator = parse_device(args.coordinator) if args.coordinator else None
    return plan(facts, devices, routing=routing, link_ms=args.link_ms, layer_overhead_ms=args.layer_overhead_ms,
                coordinator=coordinator)  # fmt: skip


def cmd_plan(args) -> int:
    result = make_plan(args)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    m = result.model
    out.print(
        f"{m.name} ({m.model_type}, {m.quantization}): {len(m.layers)} MoE layers x "
        f"{max(s.num_experts for s in m.layers)} experts, top-{m.top_k}, "
        f"{format_bytes(max(s.payload_bytes for s in m.layers))} per expert; experts "
        f"{format_bytes(m.expert_bytes_total)}, dense part {format_bytes(m.dense_bytes)}",
        markup=False, highlight=False,
    )  # fmt: skip
    rows = [
        [d.name, format_bytes(d.budget_bytes), str(d.assigned_experts), f"{d.hit_rate:.1%}",
         format_bytes(d.read_bytes_per_token), f"{d.read_s * 1e3:.1f}", f"{d.compute_s * 1e3:.1f}"]
        for d in result.devices
    ]  # fmt: skip
    headers = ["device", "expert budget", "experts placed", "hit rate", "read / token", "read ms", "compute ms"]
    out.print(fitted_table(headers, rows, keep={"device"}, title="placement", console=out))
    lines = [
        f"fits: {'yes' if result.fits else 'no'}" + "".join(f"\n  {p}" for p in result.problems),
        f"expert bytes per token {format_bytes(m.active_expert_bytes)}, read from flash "
        f"{format_bytes(result.read_bytes_per_token)} (hit rate {result.hit_rate:.1%}; {result.routing})",
        f"per token: dense {result.dense_s * 1e3:.1f} ms, network {result.network_s * 1e3:.1f} ms, "
        f"overhead {result.overhead_s * 1e3:.1f} ms",
        f"predicted decode: {result.tokens_per_s:.2f} tok/s (flash reads alone would allow "
        f"{result.read_bound_tokens_per_s:.2f})",
    ]
    for line in lines:
        out.print(line, markup=False, highlight=False)
    return 0
