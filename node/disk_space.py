"""Disk space for the writers (pack, shard, export-ios): check it before writing when the output's
size is known, and turn a full disk (ENOSPC, or a quota) into one line naming the place and the
bytes needed. staged_directory (node.store_format) removes what was written either way."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from flashmesh.protos.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on the filesystem that will hold `path`."""
    return shutil.disk_usage(_existing(path)).free


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _message(out: Path, *, needs: int | None, written: int | None) -> str:
    from flashmesh.protos.sizes import format_bytes

    where = _existing(Path(out).parent)
    free = format_bytes(free_bytes(where))
    if needs is not None:
        need = f"about {format_bytes(needs)}"
    else:
        need = f"more than the {format_bytes(written or 0)} written before the disk filled"
    return (
        f"not enough space in {where} to write {out}: it needs {need}, {free} are free; "
        "free some space or write it elsewhere"
    )


def check_space(out: Path, needs: int) -> None:
    """Raise before anything is written when `needs` bytes will not fit beside `out`."""
    if needs > free_bytes(Path(out).parent):
        raise UserError(_message(out, needs=needs, written=None))


def disk_full(out: Path, *, needs: int | None, written: int) -> UserError:
    """The error for a write to `out` that found the disk full after `written` bytes."""
    return UserError(_message(out, needs=needs, written=written))
