"""Mutual TLS between coordinator and real node processes on loopback, the cluster token without
TLS, the identity check of nodes found by zeroconf, and the one-line errors of certificates a
user can get wrong. Every node is found by its own unique name: other runs share 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from flashmesh.coordinator.certs import init_cluster, issue
from flashmesh.coordinator.client import NodeClient, NodeError
from flashmesh.coordinator.cluster import connect
from flashmesh.coordinator.discovery import discover
from flashmesh.coordinator.generate import SamplingParams
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.report import run_prompt
from flashmesh.node.advertise import Advertiser
from flashmesh.node.store_format import Manifest
from flashmesh.node.tls import COORDINATOR, NODE, load_identity
from flashmesh.protos import TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.testing.local_nodes import ensure_shards, local_nodes

from .conftest import PROMPT, assert_one_line_error, flashmesh, local_tokens, run_cli
from .tls_checks import assert_only_cluster_clients, info

TOKEN = f"tls-test-token-{os.getpid()}"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tls_cluster(models, tmp_path_factory):
    """Two TLS node processes with disjoint shards, certificates from `cluster`'s CA."""
    _, store = models.get("qwen3_moe")
    work = tmp_path_factory.mktemp("tls")
    init_cluster(work / "cluster")
    init_cluster(work / "other")
    shards = ensure_shards(store, work, count=2)
    budget = Manifest.load(store).min_budget_bytes * 2
    with local_nodes(shards, budgets=[budget] * 2, token=TOKEN, logdir=work / "logs", tls=work / "cluster") as nodes:
        yield SimpleNamespace(
            store=store,
            work=work,
            budget=budget,
            addresses=nodes,
            identity=load_identity(work / "cluster", role=COORDINATOR),
            other=load_identity(work / "other", role=COORDINATOR),
        )


def test_tls_run_matches_the_local_run(tls_cluster, capsys):
    c = tls_cluster
    expected = local_tokens(c.store, max_tokens=MAX_TOKENS)
    options = ModelOptions(store=c.store, cluster=True, nodes=tuple(c.addresses), token=TOKEN, tls=c.work / "cluster")
    result = run_prompt(options, PROMPT, SamplingParams(max_tokens=MAX_TOKENS))
    assert result["tokens"] == expected
    assert all(n["requests"] > 0 for n in result["nodes"])
    # The CLI with static NAME@HOST:PORT: the certificate is checked against NAME, not 127.0.0.1.
    static = [x for a in c.addresses for x in ("--node", f"{a.name}@{a.target}")]
    code, out, err = run_cli(capsys, "run", c.store, *static, "--no-zeroconf", "--tls", c.work / "cluster",
                          "--token", TOKEN, "--prompt", PROMPT, "--max-tokens", MAX_TOKENS, "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["tokens"] == expected
    code, out, err = run_cli(capsys, "cluster", "ls", "--json", *static, "--no-zeroconf", "--tls", c.work / "cluster",
                          "--token", TOKEN)  # fmt: skip
    rows = json.loads(out)
    assert code == 0 and not [r for r in rows if "error" in r], rows
    assert sum(r["experts_held"] for r in rows) == rows[0]["experts_total"]


def _info(channel: grpc.Channel, metadata=((TOKEN_METADATA_KEY, TOKEN),)) -> pb.NodeInfo:
    return info(channel, metadata)


def test_clients_without_a_cluster_certificate_are_refused(tls_cluster):
    c = tls_cluster
    spare = load_identity(issue(c.work / "cluster", "spare-node", out=c.work / "spare-node"), role=NODE)
    assert_only_cluster_clients(c.addresses[0], token=TOKEN, identity=c.identity, other=c.other, spare=spare)


def test_node_with_a_foreign_certificate_is_refused(tls_cluster, caplog):
    c = tls_cluster
    logdir = c.work / "foreign-logs"
    with local_nodes([c.store], budgets=[c.budget], token=TOKEN, logdir=logdir, tls=c.work / "other") as (foreign,):
        # As a user runs it: gRPC's own handshake log lines must not surround the one-line error.
        proc = flashmesh("run", c.store, "--node", foreign.target, "--no-zeroconf", "--tls", c.work / "cluster",
                         "--token", TOKEN, "--prompt", "x")  # fmt: skip
        assert_one_line_error(proc.returncode, proc.stderr, foreign.target, "TLS handshake", "cluster CA")
        # Found by zeroconf instead: skipped with a warning naming it, the others are used.
        with caplog.at_level(logging.WARNING, logger="flashmesh.coordinator.cluster"):
            nodes = connect([*c.addresses, foreign], token=TOKEN, tls=c.identity)
        try:
            assert {n.info.name for n in nodes} == {a.name for a in c.addresses}
        finally:
            for n in nodes:
                n.client.close()
        assert any(foreign.name in r.getMessage() and "TLS" in r.getMessage() for r in caplog.records)


def _impostor(real, name: str):
    """Advertise `name` for the node at `real`'s port; return the advertiser and what zeroconf finds."""
    advertiser = Advertiser(
        name=name, node_id=real.node_id, fingerprint=real.fingerprint, port=real.port, interfaces=["127.0.0.1"]
    )
    found = discover(interfaces=["127.0.0.1"], timeout=10, expect=1, accept=lambda n: n.name == name)
    assert len(found) == 1 and found[0].source == "zeroconf"
    return advertiser, found[0]


def test_advertised_name_must_match_the_certificate(tls_cluster, caplog):
    c = tls_cluster
    real = c.addresses[0]
    advertiser, fake = _impostor(real, f"impostor{os.getpid()}")
    try:
        with caplog.at_level(logging.WARNING, logger="flashmesh.coordinator.cluster"):
            nodes = connect([fake, *c.addresses], token=TOKEN, tls=c.identity)
            for n in nodes:
                n.client.close()
            assert {n.info.name for n in nodes} == {a.name for a in c.addresses}
            with pytest.raises(NodeError, match="no usable node.*not for the name"):
                connect([fake], token=TOKEN, tls=c.identity)
    finally:
        advertiser.close()
    assert any(fake.name in r.getMessage() for r in caplog.records)


def test_without_tls_the_token_and_identity_gate_every_node(tls_cluster, caplog):
    c = tls_cluster
    logdir = c.work / "plain-logs"
    with local_nodes([c.store], budgets=[c.budget], token=TOKEN, logdir=logdir) as (plain,):
        for metadata in ((), ((TOKEN_METADATA_KEY, "wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                _info(grpc.insecure_channel(plain.target), metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _info(grpc.insecure_channel(plain.target)).name == plain.name
        with pytest.raises(NodeError, match="does not speak TLS"):  # a TLS coordinator does not talk to it
            NodeClient(plain, token=TOKEN, tls=c.identity).info(timeout=10)
        with caplog.at_level(logging.WARNING, logger="flashmesh.coordinator.cluster"):
            # Found by zeroconf and refusing our token: skipped with a warning (an error only when none is left).
            with pytest.raises(NodeError, match="no usable node.*token"):
                connect([plain], token="wrong")
            assert any(plain.name in r.getMessage() and "token" in r.getMessage() for r in caplog.records)
            # Advertised under a name it does not answer to: skipped, by the Info identity check.
            advertiser, fake = _impostor(plain, f"plainimpostor{os.getpid()}")
            try:
                nodes = connect([fake, plain], token=TOKEN)
                for n in nodes:
                    n.client.close()
                assert [n.info.name for n in nodes] == [plain.name]
            finally:
                advertiser.close()
            assert any(fake.name in r.getMessage() and "calls itself" in r.getMessage() for r in caplog.records)
        static = plain.__class__(host=plain.host, port=plain.port)  # the same node given as --node
        with pytest.raises(NodeError, match="token"):
            connect([static], token="wrong")


def test_cluster_init_and_add_node(tmp_path, capsys):
    root = tmp_path / "cluster"
    code, _, err = run_cli(capsys, "cluster", "init", root, "--nodes", "studio,mini", "--san", "192.168.1.20",
                        "--san", "studio.lan")  # fmt: skip
    assert code == 0, err
    assert stat.S_IMODE((root / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "ca" / "ca.key").stat().st_mode) == 0o600
    for name in ("coordinator", "nodes/studio", "nodes/mini"):
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == ["ca.crt", "tls.crt", "tls.key"]  # no CA key travels with an identity
        assert stat.S_IMODE((root / name / "tls.key").stat().st_mode) == 0o600
    node = load_identity(root, role=NODE, name="studio")
    cert = x509.load_pem_x509_certificate(node.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"studio", "localhost", "studio.lan"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "192.168.1.20"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert node.name == "studio" and load_identity(root, role=COORDINATOR).name == "coordinator"

    code, _, err = run_cli(capsys, "cluster", "init", root)
    assert_one_line_error(code, err, "already holds a cluster CA", "add-node", "--force")
    assert run_cli(capsys, "cluster", "add-node", root, "air")[0] == 0
    assert load_identity(root / "nodes" / "air", role=NODE).name == "air"
    code, _, err = run_cli(capsys, "cluster", "add-node", root, "air")
    assert_one_line_error(code, err, "air", "--force")
    before = (root / "nodes" / "air" / "tls.crt").read_bytes()
    assert run_cli(capsys, "cluster", "add-node", root, "air", "--force")[0] == 0
    assert (root / "nodes" / "air" / "tls.crt").read_bytes() != before
    code, _, err = run_cli(capsys, "cluster", "add-node", root, "my node")
    assert_one_line_error(code, err, "my node", "letters, digits")
    code, _, err = run_cli(capsys, "cluster", "add-node", tmp_path / "elsewhere", "air")
    assert_one_line_error(code, err, "ca.key is missing")
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".partial-", ".old-"))]
    assert not leftovers


def test_certificate_mistakes_are_one_line(tmp_path, capsys):
    root = tmp_path / "cluster"
    init_cluster(root, nodes=["n1", "n2"])
    init_cluster(tmp_path / "other", nodes=["n1"])

    def copy(name: str):
        target = tmp_path / f"copy-{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root / "nodes" / name, target)
        return target

    def serve(tls, *extra):
        return run_cli(capsys, "node", "serve", tmp_path / "no-store", "--ram-budget", "1MB", "--tls", tls, *extra)

    def ls(tls):
        return run_cli(capsys, "cluster", "ls", "--tls", tls, "--token", "t", "--node", "127.0.0.1:9", "--no-zeroconf")

    code, _, err = ls(tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere", "does not exist", "cluster init")
    missing = copy("n1")
    (missing / "tls.key").unlink()
    code, _, err = serve(missing)
    assert_one_line_error(code, err, str(missing / "tls.key"), "is missing")
    swapped = copy("n1")
    shutil.copy(root / "nodes" / "n2" / "tls.key", swapped / "tls.key")
    code, _, err = serve(swapped)
    assert_one_line_error(code, err, str(swapped / "tls.key"), "is not the key of")
    wrong_ca = copy("n1")
    shutil.copy(tmp_path / "other" / "ca" / "ca.crt", wrong_ca / "ca.crt")
    code, _, err = serve(wrong_ca)
    assert_one_line_error(code, err, str(wrong_ca / "tls.crt"), "not issued by the cluster CA", "add-node")
    expired = issue(root, "n3", valid_from=datetime.now(UTC) - timedelta(days=10), days=1)
    code, _, err = serve(expired)
    assert_one_line_error(code, err, str(expired / "tls.crt"), "expired on", "add-node", "--force")
    code, _, err = serve(root / "coordinator")
    assert_one_line_error(code, err, "coordinator certificate, not a node's")
    code, _, err = ls(root / "nodes" / "n1")
    assert_one_line_error(code, err, "node certificate, not a coordinator's")
    code, _, err = serve(root / "nodes" / "n1", "--name", "n2")
    assert_one_line_error(code, err, "--name n2", "n1", "add-node")
    code, _, err = serve(root, "--name", "n9")
    assert_one_line_error(code, err, "no certificate for node 'n9'", "add-node")


@pytest.mark.parametrize("command", ["run", "serve"])
def test_run_and_serve_open_the_cluster_with_tls_and_the_deadline(tls_cluster, monkeypatch, command):
    """The options `serve --cluster --tls DIR --rpc-deadline S` reads open the cluster over TLS with
    that deadline, exactly as `run`'s do (serve once accepted --tls and then connected in plaintext)."""
    from flashmesh.coordinator.cli import build_parser
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.generate import encode_prompt, generate
    from flashmesh.coordinator.options import model_options

    monkeypatch.delenv("FLASHMESH_TLS", raising=False)
    c = tls_cluster
    static = [x for a in c.addresses for x in ("--node", f"{a.name}@{a.target}")]

    def options(*flags):
        extra = ["--prompt", PROMPT] if command == "run" else []
        argv = [command, str(c.store), *static, "--no-zeroconf", "--token", TOKEN, *flags, *extra]
        return model_options(build_parser().parse_args(argv))

    streaming = open_model(options("--tls", str(c.work / "cluster"), "--rpc-deadline", "7.5"))  # TLS-only nodes
    try:
        assert streaming.remote.deadline.floor == 7.5 and len(streaming.nodes) == 2
        assert all(n.client.tls for n in streaming.nodes)
        prompt = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
        tokens = generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=MAX_TOKENS)).tokens
        assert tokens == local_tokens(c.store, max_tokens=MAX_TOKENS)
    finally:
        streaming.close()
    with pytest.raises(NodeError, match="--tls"):  # without --tls these nodes refuse the connection
        open_model(options()).close()
