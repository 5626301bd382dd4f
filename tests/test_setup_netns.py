"""One-time setup, then no flags: three emulated LAN hosts (network namespaces on a private bridge),
each with its own HOME. The coordinator runs `cluster init` and `add-node`, the nodes `cluster join`,
and from then on `node serve`, `cluster ls | inspect`, `run --cluster` and `serve --cluster` need no
--token, --tls or --interfaces; mutual TLS is on and zeroconf runs only on the hosts' veths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest
from flashmesh.testing.local_nodes import ensure_shards

from .netns import host_env, lan, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))


def cli(host, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        host.command(sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)),
        capture_output=True, text=True, timeout=timeout, env=host_env(),
    )  # fmt: skip


def start(host, *args) -> subprocess.Popen:
    return subprocess.Popen(
        host.command(sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=host_env(),
    )  # fmt: skip


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """stdout lines up to the first containing `needle` (read on a thread, so a hung process times out)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {needle!r} from {proc.args[-4:]}: {''.join(lines)[-2000:]}"
    return lines


def test_init_join_then_no_flags(models, tmp_path):
    _, store = models.get("qwen3_moe")
    shards = ensure_shards(store, tmp_path, count=2)
    local = subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", "run", store, "--prompt", "Hi", "--max-tokens", "6",
         "--json"], capture_output=True, text=True, timeout=300, env=host_env(),
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    with lan(3, tmp_path) as (coordinator, *nodes):
        # Without a config the defaults are as before: loopback only, nothing found across the LAN.
        before = cli(coordinator, "cluster", "ls", "--discover-timeout", "1", "--token", "t")
        assert before.returncode == 2 and "by zeroconf on 127.0.0.1" in before.stderr, before.stderr

        assert cli(coordinator, "cluster", "init").returncode == 0
        procs = []
        try:
            for i, node in enumerate(nodes):
                join_file = tmp_path / f"n{i}.flashmesh-join"
                added = cli(coordinator, "cluster", "add-node", f"n{i}", "--out", join_file)
                assert added.returncode == 0, added.stderr
                joined = cli(node, "cluster", "join", join_file)
                assert joined.returncode == 0, joined.stderr
                procs.append(start(node, "node", "serve", shards[i]))
            for proc, node in zip(procs, nodes, strict=True):
                lines = "".join(wait_for_line(proc, "mutual TLS"))
                assert f"on {node.address} port" in lines and "cluster token" not in lines

            ls = cli(coordinator, "cluster", "ls", "--json")
            assert ls.returncode == 0, ls.stderr
            rows = json.loads(ls.stdout)
            assert sorted((r["name"], r["address"].split(":")[0]) for r in rows) == [
                ("n0", nodes[0].address),
                ("n1", nodes[1].address),
            ]
            assert all("error" not in r for r in rows) and sum(r["experts_assigned"] for r in rows) > 0

            run = cli(coordinator, "run", store, "--cluster", "--prompt", "Hi", "--max-tokens", "6", "--json")
            assert run.returncode == 0, run.stderr
            result = json.loads(run.stdout)
            assert result["tokens"] == json.loads(local.stdout)["tokens"]
            assert sorted(n["name"] for n in result["nodes"]) == ["n0", "n1"]

            serve = start(coordinator, "serve", store, "--cluster", "--port", "0")
            procs.append(serve)
            line = wait_for_line(serve, "serving")[-1]
            assert "(2 nodes)" in line, line
            url = re.search(r" at (http://\S+)/v1", line).group(1)
            body = json.dumps({"model": store.name, "prompt": "Hi", "max_tokens": 3}).encode()
            probe = (
                "import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], "
                "data=sys.argv[2].encode(), headers={'Content-Type': 'application/json'}), timeout=120); "
                "print(r.read().decode())"
            )
            reply = subprocess.run(
                coordinator.command(sys.executable, "-c", probe, f"{url}/v1/completions", body.decode()),
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            assert reply.returncode == 0, reply.stderr
            assert json.loads(reply.stdout)["usage"]["completion_tokens"] == 3
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    assert proc.wait(timeout=30) == 0
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_interfaces_flag_and_environment_override_the_config(tmp_path):
    with lan(1, tmp_path) as (host,):
        assert cli(host, "cluster", "init").returncode == 0
        show = "from flashmesh.node.cluster_config import interfaces_setting as s; import sys; print(s(sys.argv[1:]))"
        auto = subprocess.run(host.command(sys.executable, "-c", show), capture_output=True, text=True,
                              env=host_env(), timeout=60)  # fmt: skip
        assert auto.stdout.strip() == str([host.address]), auto.stderr
        flag = subprocess.run(host.command(sys.executable, "-c", show, "127.0.0.1"), capture_output=True, text=True,
                              env=host_env(), timeout=60)  # fmt: skip
        assert flag.stdout.strip() == "['127.0.0.1']"
        env = host_env() | {"FLASHMESH_INTERFACES": "127.0.0.1"}
        by_env = subprocess.run(host.command(sys.executable, "-c", show), capture_output=True, text=True, env=env,
                                timeout=60)  # fmt: skip
        assert by_env.stdout.strip() == "['127.0.0.1']"
        again = cli(host, "cluster", "init")
        assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.splitlines()) == 1
