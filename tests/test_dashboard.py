"""The dashboard at `/`: rendered by headless Chromium from the server's own /dashboard.json.

The page is checked as a browser shows it: Chromium runs its script (fetch, then the DOM is
built from the JSON) and --dump-dom gives the DOM after that, which must name every node; a
screenshot of the same page must be a real image (not blank). Chromium is Debian's `chromium`,
installed here when missing (CI is Debian, as root)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
import zlib

import pytest
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest
from flashmesh.testing.local_nodes import ensure_shards, local_nodes

from .serve_util import served

TOKEN = "dashboard-test"


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if shutil.which("apt-get") is None:
            pytest.skip("headless Chromium is needed and there is no apt-get to install Debian's chromium here")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=1200,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
        found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def browse(chromium: str, url: str, *extra: str, profile) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--window-size=1100,900", *extra,
           url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def png_colors(path) -> int:
    """Distinct pixel values in an 8-bit RGB(A) PNG (filters undone), to tell a page from a blank image."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = (
        int.from_bytes(header[:4], "big"),
        int.from_bytes(header[4:8], "big"),
        header[8],
        header[9],
    )
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return len({row[i : i + bpp] for row in rows[::4] for i in range(0, stride, bpp * 4)})


def test_dashboard_in_chromium(chromium, models, tmp_path):
    _, store = models.get("qwen3_moe")
    shards = ensure_shards(store, tmp_path, count=2)
    budget = Manifest.load(store).expert_bytes_total
    with local_nodes(shards, budgets=[budget] * 2, token=TOKEN, logdir=tmp_path / "logs") as addresses:
        names = [a.name for a in addresses]
        options = ModelOptions(store=store, cluster=True, nodes=tuple(addresses), token=TOKEN)
        with served(store, opener=lambda: open_model(options)) as server:
            status, _, reply = server.post("/v1/completions", {"model": "tiny-moe", "prompt": "Hi", "max_tokens": 4})
            assert status == 200, reply
            state = json.loads(urllib.request.urlopen(server.url + "/dashboard.json", timeout=30).read())
            assert sorted(n["name"] for n in state["nodes"]) == sorted(names)
            assert all(n["up"] and n["rpc_ms"] > 0 and n["experts_assigned"] > 0 for n in state["nodes"])
            assert len(state["tokens_per_s"]) == 1 and state["tokens_per_s"][0]["tokens"] == 4
            assert sum(sum(row[1:]) for row in state["placement"]["layers"]) == sum(
                s.num_experts for s in Manifest.load(store).layers
            )
            page = urllib.request.urlopen(server.url + "/", timeout=30).read().decode()
            assert "<script" in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # all inline

            dom = browse(chromium, server.url + "/", "--dump-dom", profile=tmp_path / "p1")
            assert dom.returncode == 0, dom.stderr[-2000:]
            assert 'data-loaded="true"' in dom.stdout, dom.stdout[-3000:]  # the script ran and got the JSON
            node_rows = re.findall(r'<tr class="node">(.*?)</tr>', dom.stdout, re.S)
            assert len(node_rows) == 2 and all(any(f"<td>{n}</td>" in r for r in node_rows) for n in names)
            assert all(f"<td>{a.target}</td>" in dom.stdout for a in addresses)
            assert "<polyline" in dom.stdout  # the tok/s chart has its point

            shot = tmp_path / "dashboard.png"
            taken = browse(chromium, server.url + "/", f"--screenshot={shot}", profile=tmp_path / "p2")
            assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
            assert shot.stat().st_size > 10_000 and png_colors(shot) > 20


def test_dashboard_state_in_process(models):
    _, store = models.get("qwen3_moe")
    with served(store) as server:
        assert server.post("/v1/completions", {"model": "tiny-moe", "prompt": "Hi", "max_tokens": 3})[0] == 200
        state = json.loads(urllib.request.urlopen(server.url + "/dashboard.json", timeout=30).read())
    (node,) = state["nodes"]
    assert state["mode"] == "in-process" and node["name"] == "this process" and 0 <= node["hit_rate"] <= 1
    assert state["placement"]["nodes"] == ["this process"] and state["tokens_per_s"][0]["tokens"] == 3
