"""The mutual-TLS identity of one cluster member, as `flashmesh cluster init` writes it: a directory
holding `ca.crt` (the cluster CA's certificate), `tls.crt` (this member's certificate) and `tls.key`
(its private key).

Loading checks what a user can get wrong (a missing file, a key of another certificate, a
certificate from another CA, an expired one, a node's certificate where a coordinator's belongs)
and names the file and the fix, so that nothing starts with material gRPC would later refuse with
a vague handshake error. Pure `cryptography`: the gRPC credentials are made by the adapters.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flashmesh.protos import TLS_ENV
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
NODE, COORDINATOR = "node", "coordinator"
# Where `cluster init` puts each identity inside a cluster directory.
CA_DIR, NODES_DIR, COORDINATOR_DIR = "ca", "nodes", "coordinator"

# A node's name is the DNS name in its certificate that the coordinator checks, so it must be one.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

REISSUE = "reissue it where the cluster CA is: `flashmesh cluster add-node CLUSTER_DIR NAME --force`"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or len(name) > 253:
        raise UserError(
            f"node name {name!r} cannot go into a certificate; use letters, digits, '-' and '.' (a host name)"
        )
    return name


@dataclass(frozen=True)
class TlsIdentity:
    path: Path  # the identity directory
    role: str  # NODE or COORDINATOR
    name: str  # the certificate's common name (a node's name)
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime


def role_of(cert: x509.Certificate) -> str | None:
    """NODE for a server certificate, COORDINATOR for a client one (by extended key usage)."""
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        return NODE
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
        return COORDINATOR
    return None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def resolve(path: Path, *, role: str, name: str | None = None) -> Path:
    """The identity directory `path` names: itself when it holds tls.crt, else inside a cluster
    directory `coordinator/` (for a coordinator) or `nodes/NAME/` (for a node named NAME)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"{path} does not exist; create certificates with `flashmesh cluster init CLUSTER_DIR` and copy "
            f"CLUSTER_DIR/{NODES_DIR}/NAME to each node (CLUSTER_DIR/{COORDINATOR_DIR} to the coordinator)"
        )
    if (path / CERT_FILE).exists():
        return path
    if role == COORDINATOR and (path / COORDINATOR_DIR).is_dir():
        return path / COORDINATOR_DIR
    if role == NODE and (path / NODES_DIR).is_dir():
        if name is None:
            raise UserError(f"{path} is a cluster directory; pass --name NAME or --tls {path}/{NODES_DIR}/NAME")
        if not (path / NODES_DIR / name).is_dir():
            raise UserError(
                f"{path} holds no certificate for node {name!r}; run `flashmesh cluster add-node {path} {name}`"
            )
        return path / NODES_DIR / name
    return path  # reading it names the missing file


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing; copy the whole directory written by `flashmesh cluster init` / `add-node` "
            f"({CA_FILE}, {CERT_FILE}, {KEY_FILE})"
        ) from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check its permissions") from None


def _certificate(path: Path) -> tuple[bytes, x509.Certificate]:
    pem = _read(path)
    try:
        return pem, x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise UserError(f"{path} is not a PEM certificate; {REISSUE}") from None


def _check_dates(path: Path, cert: x509.Certificate, now: datetime, *, fix: str = REISSUE) -> None:
    if now > cert.not_valid_after_utc:
        raise UserError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {fix}")
    if now < cert.not_valid_before_utc:
        raise UserError(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )


def load_identity(path: Path, *, role: str, name: str | None = None) -> TlsIdentity:
    """Read and check an identity directory (or a cluster directory, see `resolve`)."""
    directory = resolve(path, role=role, name=name)
    ca_pem, ca = _certificate(directory / CA_FILE)
    cert_pem, cert = _certificate(directory / CERT_FILE)
    key_path = directory / KEY_FILE
    key_pem = _read(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise UserError(f"{key_path} is not an unencrypted PEM private key; {REISSUE}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise UserError(f"{key_path} is not the key of {directory / CERT_FILE}; copy both from the same directory")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise UserError(
            f"{directory / CERT_FILE} was not issued by the cluster CA in {directory / CA_FILE}; {REISSUE}"
        ) from None
    now = datetime.now(UTC)
    _check_dates(directory / CA_FILE, ca, now, fix="make a new CA and certificates: `flashmesh cluster init --force`")
    _check_dates(directory / CERT_FILE, cert, now)
    found = role_of(cert)
    if found != role:
        raise UserError(
            f"{directory / CERT_FILE} is a {found or 'foreign'} certificate, not a {role}'s; use "
            + (f"CLUSTER_DIR/{COORDINATOR_DIR}" if role == COORDINATOR else f"CLUSTER_DIR/{NODES_DIR}/NAME")
        )
    if key_path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", key_path)
    return TlsIdentity(
        path=directory,
        role=role,
        name=common_name(cert),
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        not_after=cert.not_valid_after_utc,
    )


def handshake_hint(details: str, *, tls: bool) -> str | None:
    """What to do about a connection gRPC could not set up, when TLS is the likely reason."""
    text = details.lower()
    closed = any(k in text for k in ("socket closed", "connection reset", "end of file"))
    if tls and "hostname verification" in text:
        return (
            "its certificate is not for the name or address we reached it by; give it as NAME@HOST:PORT with "
            "its certificate's name, or reissue: `flashmesh cluster add-node CLUSTER_DIR NAME --san HOST --force`"
        )
    if tls and "wrong_version_number" in text:
        return "does not speak TLS; start it with `--tls CLUSTER_DIR/nodes/NAME`, or leave out --tls here"
    if tls and any(k in text for k in ("ssl", "handshake", "certificate", "tsi_")):
        reason = re.search(r"certificate_verify_failed: ([^:]+)", text)
        return (
            f"refused the TLS handshake ({reason.group(1).strip() if reason else details}); its certificate must "
            f"come from the same cluster CA as ours (`flashmesh cluster init`) and be valid now: {REISSUE}"
        )
    if tls and closed:
        return (
            "closed the connection during the TLS handshake: it does not accept our certificate "
            "(issued by another cluster CA, or expired?) or does not serve TLS"
        )
    if not tls and closed:
        return f"closed the connection; if it serves TLS, pass --tls CLUSTER_DIR (or set {TLS_ENV})"
    return None
