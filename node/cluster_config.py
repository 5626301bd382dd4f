"""This machine's cluster settings, written once by `flashmesh cluster init` (the coordinator) or
`flashmesh cluster join` (a node), so that later commands need no --token, --tls or --interfaces.

The file is `config.toml` in the user's config directory (platformdirs: ~/.config/flashmesh on
Linux, ~/Library/Application Support/flashmesh on macOS; $FLASHMESH_CONFIG_DIR overrides):

    role = "coordinator"        # or "node"
    token = "..."               # the cluster token nodes check
    tls = "cluster"             # identity or cluster directory, relative to the config directory
    interfaces = "auto"         # every up non-loopback IPv4 interface, or ["192.168.1.10", ...]
    name = "studio"             # a node's name (the one in its certificate)

Each setting is taken from the command-line flag, else the environment ($FLASHMESH_TOKEN,
$FLASHMESH_TLS, $FLASHMESH_INTERFACES), else this file, else the built-in default: 127.0.0.1 only,
plaintext, and no token (a node then makes one up and prints it).
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import tomli_w
from flashmesh.protos import TLS_ENV, TOKEN_ENV
from flashmesh.protos.errors import UserError

CONFIG_DIR_ENV = "FLASHMESH_CONFIG_DIR"
INTERFACES_ENV = "FLASHMESH_INTERFACES"
CONFIG_FILE = "config.toml"
AUTO = "auto"
LOOPBACK_ONLY = ["127.0.0.1"]
COORDINATOR_ROLE, NODE_ROLE = "coordinator", "node"


def config_dir() -> Path:
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_config_dir("flashmesh"))


def config_path() -> Path:
    return config_dir() / CONFIG_FILE


@dataclass(frozen=True)
class ClusterConfig:
    role: str
    token: str
    tls: str | None = None  # relative to the config directory, or absolute
    interfaces: str | list[str] = AUTO
    name: str | None = None

    def tls_path(self) -> Path | None:
        return None if self.tls is None else config_dir() / self.tls

    def to_toml(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def load_config() -> ClusterConfig | None:
    """The config file, or None when this machine has none."""
    path = config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); fix it, or remove it and run `flashmesh cluster init`") from None
    try:
        config = ClusterConfig(**data)
    except TypeError as e:
        raise UserError(f"{path}: {e}; the keys are role, token, tls, interfaces, name") from None
    if not (config.interfaces == AUTO or isinstance(config.interfaces, list)):
        raise UserError(f'{path}: interfaces is "auto" or a list of IPv4 addresses, not {config.interfaces!r}')
    return config


def save_config(config: ClusterConfig, *, force: bool = False) -> Path:
    """Write the config file (mode 0600: it holds the token) under a temporary name, then rename."""
    path = config_path()
    if path.exists() and not force:
        raise UserError(f"{path} already exists (this machine is set up); pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        tomli_w.dump(config.to_toml(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def auto_interfaces() -> list[str]:
    """The IPv4 address of every interface that is up, loopback excepted."""
    import psutil

    stats = psutil.net_if_stats()
    found = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        if not (name in stats and stats[name].isup):
            continue
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and a.address not in found:
                found.append(a.address)
    return found


def _expand(value: str | list[str], *, where: str) -> list[str]:
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if items != [AUTO]:
        return items
    found = auto_interfaces()
    if not found:
        raise UserError(f"interfaces = auto ({where}) but no IPv4 interface is up; connect to a network or name one")
    return found


def interfaces_setting(flag: list[str] | None) -> list[str]:
    """Interfaces to listen, advertise or browse on: --interfaces, $FLASHMESH_INTERFACES, the config, 127.0.0.1."""
    if flag:
        return _expand(flag, where="--interfaces")
    if os.environ.get(INTERFACES_ENV):
        return _expand(os.environ[INTERFACES_ENV], where=f"${INTERFACES_ENV}")
    config = load_config()
    if config is not None:
        return _expand(config.interfaces, where=str(config_path()))
    return list(LOOPBACK_ONLY)


def token_setting(flag: str | None) -> str | None:
    """The cluster token: --token, $FLASHMESH_TOKEN, the config; None when none is set."""
    if flag or os.environ.get(TOKEN_ENV):
        return flag or os.environ[TOKEN_ENV]
    config = load_config()
    return None if config is None else config.token


def tls_setting(flag: Path | None) -> Path | None:
    """The TLS identity (or cluster) directory: --tls, $FLASHMESH_TLS, the config; None: plaintext."""
    if flag or os.environ.get(TLS_ENV):
        return Path(flag or os.environ[TLS_ENV])
    config = load_config()
    return None if config is None else config.tls_path()


def name_setting(flag: str | None) -> str | None:
    """A node's name: --name, else the config's (set by `cluster join`); None: decided by the caller."""
    if flag:
        return flag
    config = load_config()
    return None if config is None else config.name
