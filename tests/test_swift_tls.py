"""The Swift node (`flashmesh-node`) with mutual TLS, as a real process on 127.0.0.1 beside the Python
coordinator: the same rules as `flashmesh node serve --tls` (tests/test_tls.py): it serves only TLS with its
certificate from the cluster CA, refuses clients without a certificate from that CA, still checks the
token, and refuses its own certificate mistakes with node/tls.py's one line. A coordinator set up by
`flashmesh cluster init` and a node given the join file of `cluster add-node` give mlx-lm's greedy tokens.

Without a Swift toolchain these tests skip, loudly; with FLASHMESH_REQUIRE_SWIFT=1 (.ci/run) they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from flashmesh.coordinator.certs import init_cluster, issue
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.cluster_setup import add_node, setup_coordinator
from flashmesh.node.join import join
from flashmesh.node.shard import write_dense
from flashmesh.node.tls import COORDINATOR, NODE, load_identity
from flashmesh.protos import TLS_ENV
from flashmesh.testing.swift_node import MixedNodeProcesses, bundle_expert_bytes

from .conftest import PROMPT, assert_one_line_error, local_tokens
from .tls_checks import assert_only_cluster_clients

TOKEN = f"swift-tls-token-{os.getpid()}"
MAX_TOKENS = 8
CONFIG_ENV = "FLASHMESH_CONFIG_DIR"


def _start(bundle: Path, binary: Path, logdir: Path, *, token: str, args_for) -> tuple:
    """One Swift node on 127.0.0.1; `args_for(name)` gives its TLS options, knowing its name."""
    budgets = [bundle_expert_bytes(bundle)]
    nodes = MixedNodeProcesses([bundle], kinds=["swift"], binary=binary, budgets=budgets, token=token, logdir=logdir,
                               flash_gbps=1.0)  # fmt: skip
    nodes.node_args = [args_for(nodes.names[0])]
    try:
        nodes.start(0)
        (address,) = nodes.find(timeout=60)
    except BaseException:
        nodes.stop()
        raise
    return nodes, address


@pytest.fixture(scope="module")
def swift_tls(swift_binary, swift_bundles, tmp_path_factory):
    """A Swift node serving every expert of the fp16 qwen3_moe bundle over mutual TLS from `cluster`'s CA."""
    store, bundle = swift_bundles["qwen3_moe-fp16"]
    work = tmp_path_factory.mktemp("swift-tls")
    init_cluster(work / "cluster")
    init_cluster(work / "other")
    dense = work / "dense"
    write_dense(store, dense)
    nodes, address = _start(bundle, swift_binary, work / "logs", token=TOKEN,
                            args_for=lambda name: ["--tls", str(issue(work / "cluster", name))])  # fmt: skip
    try:
        yield SimpleNamespace(
            store=store, bundle=bundle, dense=dense, work=work, address=address, nodes=nodes,
            identity=load_identity(work / "cluster", role=COORDINATOR),
            other=load_identity(work / "other", role=COORDINATOR),
        )  # fmt: skip
    finally:
        nodes.stop()


def _run(dense: Path, node: str, *extra: str, capsys) -> list[int]:
    args = ["run", str(dense), "--cluster", "--node", node, "--no-zeroconf", "--prompt", PROMPT, *extra]
    assert main([*args, "--max-tokens", str(MAX_TOKENS), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_tls_coordinator_and_swift_node_give_mlx_lm_tokens(swift_tls, capsys):
    c = swift_tls
    log = (c.nodes.logdir / f"{c.address.name}.log").read_text()
    assert "mutual TLS: certificate " in log and " valid until " in log
    node = f"{c.address.name}@{c.address.target}"  # the certificate is checked against the name
    tokens = _run(c.dense, node, "--tls", str(c.work / "cluster"), "--token", TOKEN, capsys=capsys)
    assert tokens == local_tokens(c.store, max_tokens=MAX_TOKENS)


def test_clients_without_a_certificate_from_the_cluster_ca_are_refused(swift_tls):
    c = swift_tls
    spare = load_identity(issue(c.work / "cluster", "spare-node", out=c.work / "spare-node"), role=NODE)
    assert_only_cluster_clients(c.address, token=TOKEN, identity=c.identity, other=c.other, spare=spare)


def test_cluster_init_add_node_and_the_join_file(swift_binary, swift_tls, tmp_path, monkeypatch, capsys):
    """As a person sets it up: `cluster init` on the coordinator, `cluster add-node NAME` writes the join
    file, the Swift node serves from it (--join), or from the config `flashmesh cluster join` installs."""
    c = swift_tls
    coordinator, node_config = tmp_path / "coordinator", tmp_path / "node"
    monkeypatch.setenv(CONFIG_ENV, str(coordinator))
    monkeypatch.delenv(TLS_ENV, raising=False)
    config = setup_coordinator(interfaces=["127.0.0.1"])
    expected = local_tokens(c.store, max_tokens=MAX_TOKENS)

    def join_file(name: str) -> list[str]:
        monkeypatch.setenv(CONFIG_ENV, str(coordinator))
        return ["--join", str(add_node(name, out=tmp_path / f"{name}.flashmesh-join"))]

    def from_config(name: str) -> list[str]:
        monkeypatch.setenv(CONFIG_ENV, str(coordinator))
        written = add_node(name, out=tmp_path / f"{name}-c.flashmesh-join")
        monkeypatch.setenv(CONFIG_ENV, str(node_config))  # `flashmesh cluster join` on the node's own machine
        join(written)
        return []

    for args_for in (join_file, from_config):
        monkeypatch.setenv(CONFIG_ENV, str(coordinator))
        # the token comes from the join file or the config, so the one in the environment must agree
        nodes, address = _start(c.bundle, swift_binary, tmp_path / "logs", token=config.token, args_for=args_for)
        try:
            monkeypatch.setenv(CONFIG_ENV, str(coordinator))  # the coordinator's token and TLS come from its config
            assert _run(c.dense, f"{address.name}@{address.target}", capsys=capsys) == expected
        finally:
            nodes.stop()
    # A plaintext coordinator (no config) is refused by the TLS node with the fix in one line.
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "none"))
    code = main(["run", str(c.dense), "--cluster", "--node", c.address.target, "--no-zeroconf", "--token", TOKEN,
                 "--prompt", "x", "--max-tokens", "1"])  # fmt: skip
    assert code == 2 and "--tls" in capsys.readouterr().err.strip().splitlines()[-1]


def test_certificate_mistakes_are_one_line(swift_binary, tmp_path):
    root = tmp_path / "cluster"
    init_cluster(root, nodes=["n1", "n2"])
    init_cluster(tmp_path / "other", nodes=["n1"])
    env = {**os.environ, CONFIG_ENV: str(tmp_path / "config")}
    env.pop(TLS_ENV, None)

    def serve(*flags: str):
        result = subprocess.run([str(swift_binary), "--bundle", str(tmp_path / "no-bundle"), "--ram-budget", "1MB",
                                 *flags], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        return result.returncode, result.stdout, result.stderr

    def copy(name: str) -> Path:
        target = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root / "nodes" / name, target)
        return target

    missing = copy("n1")
    (missing / "tls.key").unlink()
    assert_one_line_error(*_code_err(serve("--tls", str(missing))), str(missing / "tls.key"), "is missing")
    swapped = copy("n1")
    shutil.copy(root / "nodes" / "n2" / "tls.key", swapped / "tls.key")
    assert_one_line_error(*_code_err(serve("--tls", str(swapped))), "is not the key of")
    wrong_ca = copy("n1")
    shutil.copy(tmp_path / "other" / "ca" / "ca.crt", wrong_ca / "ca.crt")
    assert_one_line_error(*_code_err(serve("--tls", str(wrong_ca))), "not issued by the cluster CA", "add-node")
    assert_one_line_error(
        *_code_err(serve("--tls", str(root / "coordinator"))), "coordinator certificate, not a node's"
    )
    assert_one_line_error(
        *_code_err(serve("--tls", str(root / "nodes" / "n1"), "--name", "n2")), "--name n2", "add-node"
    )
    assert_one_line_error(*_code_err(serve("--tls", str(root), "--name", "n9")), "no certificate for node 'n9'")
    assert_one_line_error(*_code_err(serve("--tls", str(tmp_path / "nowhere"))), "does not exist", "cluster init")
    assert_one_line_error(*_code_err(serve("--join", str(root / "ca" / "ca.crt"))), "not a flashmesh join file")
    assert_one_line_error(*_code_err(serve("--join", "x", "--tls", "y")), "--tls DIR or --join FILE, not both")
    env[TLS_ENV] = str(swapped)  # the environment's identity is checked as the flag's is
    assert_one_line_error(*_code_err(serve()), "is not the key of")


def _code_err(result: tuple[int, str, str]) -> tuple[int, str]:
    code, _, err = result
    return code, err
