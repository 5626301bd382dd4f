"""The capacity planner: will a model fit on these devices, and how fast will it decode?

Pure arithmetic over ModelFacts (coordinator/model_facts.py), the devices and a routing model
(coordinator/hit_rate.py). The first device is the coordinator (dense part in its RAM); every
device serves experts (placement: coordinator/placement.py's own function, as if each held a full
copy). Per decode token, with a_d the share of expert bytes placed on device d and h_d its hit rate:

    dense    = dense_read_bytes / compute_coordinator
    node d   = k L a_d B (1 - h_d) / flash_d  +  k L a_d B / compute_d     (reads, then compute)
    network  = L x link_ms, with nodes (one request per node per layer, all in parallel)
    tok/s    = 1 / (dense + max_d node_d + network + L x layer_overhead)

B is one expert's bytes and L the MoE layers. Devices that name one `host` (node processes on
one machine) compute and read at the same time, so each gets its per-process share: the measured
`shared_compute_gbps` / `shared_flash_gbps` (one process's GB/s while all of the host's devices
run at once), else an even split of the host's figures (a process alone may not use every core, so
measure both: docs/plan.md). A device's expert budget is its RAM times
USABLE_RAM, less the dense part on the coordinator, unless given (`--budget NAME=BYTES`).
`compute` is the bytes of weights a device multiplies per second in decode (GB/s); it is the
device's memory bandwidth times COMPUTE_EFFICIENCY when not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flashmesh.coordinator.hit_rate import Routing, hit_rate
from flashmesh.coordinator.model_facts import ModelFacts
from flashmesh.coordinator.placement import NodeCapacity, place
from flashmesh.protos.errors import UserError

USABLE_RAM = 0.75  # of a device's memory for the dense part and the expert cache (the OS keeps the rest)
COMPUTE_EFFICIENCY = 0.5  # decode kernels reach about half the memory bandwidth (see docs/plan.md)
DEFAULT_LINK_MS = 1.0  # one request-and-reply over a wired LAN; Wi-Fi is several ms


@dataclass(frozen=True)
class Device:
    name: str
    ram_bytes: int
    flash_gbps: float
    compute_gbps: float
    budget_bytes: int | None = None  # expert cache; None: from ram_bytes
    usable_ram: float = USABLE_RAM  # of ram_bytes an app may use (iOS allows a phone's apps less)
    host: str | None = None  # devices on one machine share its cores and flash
    shared_compute_gbps: float | None = None  # per process, while every device of the host computes
    shared_flash_gbps: float | None = None  # per process, while every device of the host reads
    dense_compute_gbps: float | None = None  # the dense part's matmuls, if they run at another rate than experts


def effective_rates(devices: list[Device]) -> list[tuple[float, float]]:
    """(flash GB/s, compute GB/s) each device gets while the devices on its host work at once."""
    on_host = {}
    for d in devices:
        if d.host is not None:
            on_host[d.host] = on_host.get(d.host, 0) + 1
    rates = []
    for d in devices:
        n = on_host.get(d.host, 1) if d.host is not None else 1
        if n == 1:
            rates.append((d.flash_gbps, d.compute_gbps))
        else:
            rates.append((d.shared_flash_gbps or d.flash_gbps / n, d.shared_compute_gbps or d.compute_gbps / n))
    return rates


@dataclass(frozen=True)
class DevicePlan:
    name: str
    budget_bytes: int
    assigned_experts: int
    assigned_bytes: int
    hit_rate: float
    read_bytes_per_token: float
    read_s: float
    compute_s: float


@dataclass(frozen=True)
class Plan:
    model: ModelFacts
    devices: list[DevicePlan]
    fits: bool
    problems: list[str]
    routing: str
    dense_s: float
    network_s: float
    overhead_s: float
    tokens_per_s: float
    read_bound_tokens_per_s: float  # the read term alone: flash bandwidth / missed bytes per token

    @property
    def hit_rate(self) -> float:
        total = sum(d.assigned_bytes for d in self.devices)
        return sum(d.hit_rate * d.assigned_bytes for d in self.devices) / max(1, total)

    @property
    def read_bytes_per_token(self) -> float:
        return sum(d.read_bytes_per_token for d in self.devices)

    def to_json(self) -> dict:
        return {
            "model": self.model.to_json(), "fits": self.fits, "problems": self.problems, "routing": self.routing,
            "devices": [d.__dict__ for d in self.devices], "hit_rate": self.hit_rate,
            "expert_bytes_per_token": self.model.active_expert_bytes, "read_bytes_per_token": self.read_bytes_per_token,
            "seconds_per_token": {"dense": self.dense_s, "experts": max((d.read_s + d.compute_s for d in self.devices),
                                  default=0.0), "network": self.network_s, "overhead": self.overhead_s},
            "tokens_per_s": self.tokens_per_s, "read_bound_tokens_per_s": self.read_bound_tokens_per_s,
        }  # fmt: skip


def _budgets(facts: ModelFacts, devices: list[Device], problems: list[str], *, dense_on_first: bool) -> list[int]:
    budgets = []
    for i, d in enumerate(devices):
        if d.budget_bytes is not None:
            budgets.append(d.budget_bytes)
            continue
        usable = int(d.ram_bytes * d.usable_ram) - (facts.dense_bytes if i == 0 and dense_on_first else 0)
        if usable <= 0:
            problems.append(f"{d.name}: the dense part ({facts.dense_bytes / 1e9:.1f} GB) does not fit its RAM")
        budgets.append(max(0, usable))
    return budgets


def plan(
    facts: ModelFacts,
    devices: list[Device],
    *,
    routing: Routing | None = None,
    link_ms: float = DEFAULT_LINK_MS,
    layer_overhead_ms: float = 0.0,
    coordinator: Device | None = None,
) -> Plan:
    """coordinator: a device that runs only the dense part (None: devices[0] runs it and serves experts)."""
    if not devices:
        raise UserError("give at least one --device (or a preset name)")
    if len({d.name for d in devices}) != len(devices):
        raise UserError("two devices have the same name; name each one (NAME:RAM:FLASH_GBPS[:COMPUTE])")
    routing = routing or Routing.zipf(max(s.num_experts for s in facts.layers), len(facts.layers))
    if routing.popularity is not None and len(routing.popularity) != len(facts.layers):
        raise UserError(f"the routing statistics cover {len(routing.popularity)} MoE layers, the model has "
                        f"{len(facts.layers)}")  # fmt: skip
    problems: list[str] = []
    budgets = _budgets(facts, devices, problems, dense_on_first=coordinator is None)
    if coordinator is not None and facts.dense_bytes > coordinator.ram_bytes * coordinator.usable_ram:
        problems.append(f"{coordinator.name}: the dense part ({facts.dense_bytes / 1e9:.1f} GB) does not fit its RAM")
    largest = max(s.payload_bytes for s in facts.layers)
    for d, b in zip(devices, budgets, strict=True):
        if b < facts.top_k * largest:
            problems.append(f"{d.name}: expert budget {b / 1e9:.2f} GB is below one layer's top-k "
                            f"({facts.top_k * largest / 1e9:.2f} GB)")  # fmt: skip
    held = {s.layer: frozenset(range(s.num_experts)) for s in facts.layers}
    capacities = [NodeCapacity(d.name, held, d.flash_gbps, b, name=d.name) for d, b in zip(devices, budgets,
                  strict=True)]  # fmt: skip
    placement = place(facts.layers, capacities)
    k, total_bytes = facts.top_k, facts.expert_bytes_total
    per_device = []
    for d, b, (flash, compute) in zip(devices, budgets, effective_rates(devices), strict=True):
        slot = placement.node_ids.index(d.name)
        masks = [placement.owner[s.layer] == slot for s in facts.layers]
        assigned = int(sum(m.sum() for m in masks))
        assigned_bytes = placement.assigned_bytes[d.name]
        share = assigned_bytes / max(1, total_bytes)
        capacity = b // largest
        h = hit_rate(routing, capacity=capacity, top_k=k, share=masks) if assigned else 1.0
        active = share * facts.active_expert_bytes if routing.popularity is None else _active(facts, routing, masks)
        read = active * (1 - h)
        per_device.append(DevicePlan(d.name, b, assigned, assigned_bytes, h, read, read / (flash * 1e9),
                                     active / (compute * 1e9)))  # fmt: skip
    head = coordinator or devices[0]
    dense_s = facts.dense_read_bytes / ((head.dense_compute_gbps or head.compute_gbps) * 1e9)
    network_s = len(facts.layers) * link_ms / 1e3 if len(devices) > 1 or coordinator is not None else 0.0
    overhead_s = len(facts.layers) * layer_overhead_ms / 1e3
    expert_s = max(p.read_s + p.compute_s for p in per_device)
    read_s = max(p.read_s for p in per_device)
    return Plan(
        model=facts, devices=per_device, fits=not problems, problems=problems, routing=routing.source,
        dense_s=dense_s, network_s=network_s, overhead_s=overhead_s,
        tokens_per_s=1.0 / (dense_s + expert_s + network_s + overhead_s),
        read_bound_tokens_per_s=1.0 / read_s if read_s > 0 else float("inf"),
    )  # fmt: skip


def _active(facts: ModelFacts, routing: Routing, masks: list[np.ndarray]) -> float:
    """Expected expert bytes per token on the experts `masks` select, by their measured popularity."""
    return sum(
        facts.top_k * float(p[m].sum()) * s.payload_bytes
        for p, m, s in zip(routing.popularity, masks, facts.layers, strict=True)
    )
