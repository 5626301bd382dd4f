"""Mutual-TLS vectors for the Swift node's unit tests: identity directories as `flashmesh cluster init` /
`add-node` write them, each with what node/tls.py says of it (the node's name and expiry, or its one-line
refusal, which the Swift node must say word for word), and a join file as `cluster add-node` writes it."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flashmesh.coordinator.certs import init_cluster, issue
from flashmesh.node.cluster_config import NODE_ROLE, ClusterConfig
from flashmesh.node.join import JOIN_SUFFIX, write_join_file
from flashmesh.node.tls import CA_FILE, CERT_FILE, KEY_FILE, NODE, load_identity
from flashmesh.protos.errors import UserError

JOIN_TOKEN = 'join-token-with-"quotes"-and-ü'  # escapes in TOML must survive


def _case(out: Path, path: Path, name: str | None) -> dict:
    case = {"path": str(path.relative_to(out)), "name": name}
    try:
        identity = load_identity(path, role=NODE, name=name)
    except UserError as e:
        return {**case, "error": str(e).replace(str(out), "$VECTORS")}
    return {**case, "cn": identity.name, "not_after": identity.not_after.timestamp()}


def tls_vectors(out: Path) -> dict:
    """Write the identities under `out` (an existing directory); return their cases (paths relative to
    `out`, "$VECTORS" in messages standing for it)."""
    root, other = out / "cluster", out / "other"
    init_cluster(root, nodes=["air", "n2"])
    init_cluster(other, nodes=["air"])

    def copy(name: str, label: str) -> Path:
        target = out / label
        shutil.copytree(root / "nodes" / name, target)
        return target

    cases = [(root / "nodes" / "air", "air"), (root, "air"), (root, None), (root, "n9"), (out / "nowhere", "air")]
    missing = copy("air", "missing-key")
    (missing / KEY_FILE).unlink()
    swapped = copy("air", "swapped-key")
    shutil.copy(root / "nodes" / "n2" / KEY_FILE, swapped / KEY_FILE)
    wrong_ca = copy("air", "wrong-ca")
    shutil.copy(other / "ca" / CA_FILE, wrong_ca / CA_FILE)
    garbage = copy("air", "not-pem")
    (garbage / CERT_FILE).write_text("not a certificate\n")
    now = datetime.now(UTC)
    expired = issue(root, "old", valid_from=now - timedelta(days=10), days=1)
    future = issue(root, "early", valid_from=now + timedelta(days=3), days=30)
    cases += [(p, None) for p in (missing, swapped, wrong_ca, garbage, expired, future, root / "coordinator")]
    join = write_join_file(
        out / f"air{JOIN_SUFFIX}",
        ClusterConfig(role=NODE_ROLE, token=JOIN_TOKEN, interfaces="auto", name="air"),
        root / "nodes" / "air",
    )
    damaged = out / f"damaged{JOIN_SUFFIX}"
    damaged.write_bytes(join.read_bytes()[:200])
    return {
        "identities": [_case(out, path, name) for path, name in cases],
        "join": {"path": str(join.relative_to(out)), "token": JOIN_TOKEN, "name": "air", "damaged": damaged.name},
    }
