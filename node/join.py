"""The join file: what `flashmesh cluster add-node NAME` writes for a node and `flashmesh cluster
join FILE` installs there. A gzip'd tar (mode 0600: it holds a private key and the token) of

    config.toml              role = "node", the token, name, interfaces = "auto", tls = "identity"
    identity/ca.crt tls.crt tls.key    the node's certificate from the cluster CA

Installing checks the identity (tls.load_identity) before anything is written, then puts
`identity/` and `config.toml` into the config directory, each under a temporary name first.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tomllib
from pathlib import Path

from flashmesh.node.cluster_config import NODE_ROLE, ClusterConfig, config_dir, config_path, save_config
from flashmesh.node.tls import CA_FILE, CERT_FILE, KEY_FILE, NODE, load_identity
from flashmesh.protos.errors import UserError

JOIN_SUFFIX = ".flashmesh-join"
IDENTITY_DIR = "identity"
MEMBERS = ("config.toml", *(f"{IDENTITY_DIR}/{f}" for f in (CA_FILE, CERT_FILE, KEY_FILE)))


def write_join_file(out: Path, config: ClusterConfig, identity: Path) -> Path:
    """The join file for `config` (a node's) and its identity directory, written to `out` atomically."""
    import tomli_w

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            files = {"config.toml": tomli_w.dumps(config.to_toml()).encode()}
            files |= {f"{IDENTITY_DIR}/{n}": (identity / n).read_bytes() for n in (CA_FILE, CERT_FILE, KEY_FILE)}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _read_members(path: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            if sorted(members) != sorted(MEMBERS):
                raise UserError(f"{path} is not a flashmesh join file (it holds {', '.join(sorted(members))})")
            return {name: tar.extractfile(members[name]).read() for name in MEMBERS}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; copy the file `flashmesh cluster add-node NAME` wrote") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a flashmesh join file ({e}); write it again with add-node") from None


def join(path: Path, *, force: bool = False) -> ClusterConfig:
    """Install a join file into this machine's config directory; return the node's config."""
    files = _read_members(Path(path))
    try:
        data = tomllib.loads(files["config.toml"].decode())
        config = ClusterConfig(**data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, TypeError) as e:
        raise UserError(f"{path} holds no readable config ({e}); write it again with add-node") from None
    if config.role != NODE_ROLE:
        raise UserError(f"{path} is not a node's join file (role {config.role!r})")
    if config_path().exists() and not force:
        raise UserError(f"{config_path()} already exists (this machine is set up); pass --force to replace it")
    root = config_dir()
    root.mkdir(parents=True, exist_ok=True)
    staged = root / f".{IDENTITY_DIR}.partial-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(mode=0o700)
    for name, data in files.items():
        if name.startswith(f"{IDENTITY_DIR}/"):
            target = staged / name.split("/", 1)[1]
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith(KEY_FILE) else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    try:
        load_identity(staged, role=NODE)  # a damaged or foreign certificate fails here, before anything is replaced
    except BaseException:
        shutil.rmtree(staged)
        raise
    final = root / IDENTITY_DIR
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    config = ClusterConfig(**{**config.to_toml(), "tls": IDENTITY_DIR})
    save_config(config, force=True)
    return config
