"""Storage faults: a full disk under pack, shard and export-ios (a tmpfs made here, root) is one
line naming the place and the bytes needed, with nothing left behind; a store file that fails to
read (EIO on a loop device, root) or is cut short under a running node is DATA_LOSS for its records
only, and the coordinator serves them from replicas while the node keeps serving the rest; a file
deleted under a running node changes nothing until the node restarts, which then refuses in one
line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.faults import generate_with_faults
from flashmesh.testing.local_nodes import ensure_shards, local_node_processes

from .conftest import assert_one_line_error, run_cli

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a loop device needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs: too small for any store of the test models."""
    _need_root()
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "fmr-small", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("command", ["pack", "shard", "dense", "export-ios"])
def test_a_full_disk_is_one_line_naming_the_place_and_the_bytes(models, small_disk, capsys, command):
    src, store = models.get("qwen3_moe", "fp32", layers=3)
    out = small_disk / "out"
    args = {
        "pack": ["pack", src, out],
        "shard": ["shard", store, out, "--count", "2", "--index", "0"],
        "dense": ["shard", store, out, "--dense"],
        "export-ios": ["export-ios", store, out, "--context", "64", "--prefill", "8"],
    }[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, f"not enough space in {small_disk}")
    assert str(out) in err and re.search(r"it needs (about|more than the) [\d.]+ ?[KMG]?i?B", err), err
    assert list(small_disk.iterdir()) == []  # nothing half-written, no temporary left


def _physical_extents(path: Path) -> list[tuple[int, int]]:
    """(first byte, last byte) on the device of each extent of `path` (filefrag, e2fsprogs)."""
    text = subprocess.run(["filefrag", "-v", "-b1", str(path)], check=True, capture_output=True, text=True).stdout
    return [(int(a), int(b)) for a, b in re.findall(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", text, re.M)]


@pytest.fixture
def loop_disk(tmp_path):
    """An ext4 filesystem on a loop device over `disk.img`; yields (mount point, image path)."""
    _need_root()
    if shutil.which("losetup") is None or shutil.which("filefrag") is None:
        pytest.skip("needs losetup and filefrag (util-linux, e2fsprogs)")
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    image.touch()
    os.truncate(image, 64 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True)
    device = loop.stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            yield mount, image
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        for _ in range(100):  # a loop device that saw I/O errors is released a moment later
            if not subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.1)


def test_a_store_file_that_fails_to_read_is_data_loss_served_by_replicas(models, tmp_path, loop_disk):
    _, store = models.get("qwen3_moe")
    mount, image = loop_disk
    shards = ensure_shards(store, tmp_path, count=3, replicas=2)
    # shard 0 on the loop disk, its last layer file written last so that it lies after everything else
    victim = Manifest.load(shards[0]).layers[-1]
    disk_shard = mount / shards[0].name
    shutil.copytree(shards[0], disk_shard, ignore=shutil.ignore_patterns(Path(victim.file).name))
    os.sync()
    shutil.copy2(shards[0] / victim.file, disk_shard / victim.file)
    os.sync()
    others = [e for p in disk_shard.rglob("*") if p.is_file() and p.name != Path(victim.file).name
              for e in _physical_extents(p)]  # fmt: skip
    start = min(a for a, _ in _physical_extents(disk_shard / victim.file))
    if any(b >= start for _, b in others):
        pytest.skip("ext4 placed the victim file before another one; cannot fail it alone by truncation")
    # the disk under the node fails from the victim file on: its reads (O_DIRECT) get EIO
    tokens, lost, state, requests = _generate_damaged(store, tmp_path, disk_shard, shards,
                                                      damage=lambda: os.truncate(image, start))  # fmt: skip
    assert lost and all("Input/output error" in f.reason and f"layer {victim.layer}" in f.reason for f in lost)
    assert state.up and state.bad and {layer for layer, _ in state.bad} == {victim.layer}
    assert requests > 0  # still serving the layers it can read
    assert tokens == _healthy_tokens(store, PROMPT)


def test_a_store_file_cut_short_or_deleted_under_a_running_node(models, tmp_path, capsys):
    _, store = models.get("qwen3_moe")
    shards = ensure_shards(store, tmp_path, count=3, replicas=2)
    sick_shard = tmp_path / "sick"
    shutil.copytree(shards[0], sick_shard)
    layers = Manifest.load(sick_shard).layers
    cut, gone = layers[-1], layers[0]

    def damage():  # before anything was read; the node holds the deleted file open
        os.truncate(sick_shard / cut.file, cut.record_offset(cut.experts[1]))  # only its first record is left
        (sick_shard / gone.file).unlink()

    tokens, lost, state, requests = _generate_damaged(store, tmp_path, sick_shard, shards, damage=damage)
    assert lost and all("short read" in f.reason and f.layer == cut.layer for f in lost), lost
    assert state.up and state.bad and {layer for layer, _ in state.bad} == {cut.layer}
    assert (cut.layer, cut.experts[0]) not in state.bad  # the record still there is served
    assert requests > 0
    assert tokens == _healthy_tokens(store, PROMPT)
    code, _, err = run_cli(capsys, "node", "serve", sick_shard, "--no-advertise", "--port", "0")
    assert_one_line_error(code, err, str(sick_shard / gone.file), "is missing")


def _generate_damaged(store: Path, tmp_path: Path, sick_shard: Path, shards: list[Path], *, damage):
    """Three node processes (replicas 2), the first serving `sick_shard`; `damage()` runs once they
    are up, before anything is read; then a generation. Returns (tokens, the DATA_LOSS failovers,
    the first node's membership state, the requests it was sent)."""
    dense = tmp_path / "dense"
    write_dense(store, dense)
    budget = Manifest.load(store).expert_bytes_total
    with local_node_processes([sick_shard, *shards[1:]], budgets=[budget] * 3, token="disk", logdir=tmp_path / "logs",
                              flash_gbps=1.0) as nodes:  # fmt: skip
        streaming = open_model(
            ModelOptions(store=dense, cluster=True, nodes=tuple(nodes.addresses), token="disk", rpc_deadline=5.0)
        )
        try:
            damage()
            tokens = generate_with_faults(streaming, PROMPT, max_tokens=6)
            sick = next(n.node_id for n in streaming.nodes if n.address.target == nodes.addresses[0].target)
            backend = streaming.backend
            lost = [f for f in backend.dispatch.failovers if f.kind == ErrorKind.DATA_LOSS]
            return tokens, lost, backend.membership.states[sick], backend.dispatch.nodes[sick].requests
        finally:
            streaming.close()


def _healthy_tokens(store: Path, prompt: str) -> list[int]:
    local = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    try:
        return generate_with_faults(local, prompt, max_tokens=6)
    finally:
        local.close()
