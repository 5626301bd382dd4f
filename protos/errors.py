"""The project-wide user error, at the bottom of the import graph (every part imports protos)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a bad path, a corrupt record, a node that is down); the message is
    one line with the fix. The CLI prints it as `error: ...` and exits 2; nothing shows a traceback."""
