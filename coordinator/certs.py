"""`flashmesh cluster init` and `cluster add-node`: a private cluster CA and its members' certificates.

Layout of a cluster directory (every identity directory is self-contained, to be copied as is):

    ca/ca.crt, ca/ca.key          the CA; ca.key never leaves this machine (0600, directory 0700)
    coordinator/ca.crt tls.crt tls.key   the coordinator's client certificate (extended key usage clientAuth)
    nodes/NAME/ca.crt tls.crt tls.key    node NAME's server certificate (serverAuth; CN and DNS name NAME,
                                         plus localhost, 127.0.0.1, ::1 and every --san)

Keys are ECDSA P-256. Each directory is built under a temporary name and renamed into place, so
nothing is ever half-written; private keys are created with mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flashmesh.node.tls import (
    CA_DIR,
    CA_FILE,
    CERT_FILE,
    COORDINATOR,
    COORDINATOR_DIR,
    KEY_FILE,
    NODE,
    NODES_DIR,
    check_name,
)
from flashmesh.protos.errors import UserError

CA_KEY_FILE = "ca.key"
CA_DAYS = 3650
DEFAULT_DAYS = 825  # the longest leaf lifetime browsers accept; reissue with add-node --force


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _san(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(check_name(text))


def _place(partial: Path, final: Path, *, force: bool) -> None:
    """Rename the finished directory `partial` to `final`, replacing it only with `force`."""
    if final.exists() and not force:
        shutil.rmtree(partial)
        raise UserError(f"{final} already exists; pass --force to replace it")
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{secrets.token_hex(3)}")
        final.rename(old)
    partial.rename(final)
    if old is not None:
        shutil.rmtree(old)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a member only signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _partial(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".partial-{name}-{secrets.token_hex(3)}"
    path.mkdir(mode=0o700)
    return path


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(directory) / CA_DIR
    if not (ca_dir / CA_KEY_FILE).is_file():
        raise UserError(
            f"{ca_dir / CA_KEY_FILE} is missing; run this where `flashmesh cluster init {directory}` was run"
        )
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{ca_dir} holds no readable CA ({e}); recreate it with `flashmesh cluster init --force`"
        ) from None
    return cert, key


def _write_ca(parent: Path) -> Path:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"flashmesh cluster CA {secrets.token_hex(4)}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    partial = _partial(parent, CA_DIR)
    _write(partial / CA_FILE, _cert_pem(cert))
    _write(partial / CA_KEY_FILE, _key_pem(key), private=True)
    return partial


def issue(
    directory: Path,
    name: str,
    *,
    role: str = NODE,
    sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
    valid_from: datetime | None = None,
    out: Path | None = None,
) -> Path:
    """Issue `name` a certificate from the CA in cluster `directory`; write its identity directory
    (default nodes/NAME, or coordinator/) and return it. `valid_from` backdates (tests of expiry)."""
    directory = Path(directory)
    check_name(name)
    ca_cert, ca_key = load_ca(directory)
    if out is not None:
        final = Path(out)
    elif role == COORDINATOR:
        final = directory / COORDINATOR_DIR
    else:
        final = directory / NODES_DIR / name
    if final.exists() and not force:
        raise UserError(f"{final} already exists; pass --force to replace it")
    key = _key()
    start = valid_from or datetime.now(UTC) - timedelta(minutes=5)
    alt = [x509.DNSName(name)]
    if role == NODE:
        alt += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        alt += [x509.IPAddress(ipaddress.ip_address("::1"))]
    for text in sans:
        general = _san(text)
        if general not in alt:
            alt.append(general)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == NODE else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    partial = _partial(final.parent, final.name)
    _write(partial / CA_FILE, _cert_pem(ca_cert))
    _write(partial / CERT_FILE, _cert_pem(cert))
    _write(partial / KEY_FILE, _key_pem(key), private=True)
    _place(partial, final, force=force)
    return final


def init_cluster(
    directory: Path,
    *,
    nodes: Sequence[str] = (),
    coordinator: str = COORDINATOR,
    sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """A new CA in `directory`, the coordinator's identity and one per node; return the identities."""
    directory = Path(directory)
    for name in (coordinator, *nodes):
        check_name(name)
    if len(set(nodes)) != len(nodes):
        raise UserError(f"--nodes names a node twice: {', '.join(nodes)}")
    if (directory / CA_DIR).exists() and not force:
        raise UserError(
            f"{directory} already holds a cluster CA; add nodes with `flashmesh cluster add-node {directory} NAME`, "
            "or pass --force to replace it (every certificate must then be reissued)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _place(_write_ca(directory), directory / CA_DIR, force=force)
    if force:  # certificates of the old CA are worthless now
        shutil.rmtree(directory / NODES_DIR, ignore_errors=True)
    written = [issue(directory, coordinator, role=COORDINATOR, days=days, force=force)]
    written += [issue(directory, name, sans=sans, days=days) for name in nodes]
    return written
