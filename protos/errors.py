"""The project-wide user error and the kinds of node failure: at the bottom of the import graph, since
every part imports protos."""

from __future__ import annotations

from enum import StrEnum


class UserError(Exception):
    """A problem the user can fix (a bad path, a corrupt record, a node that is down); the message is
    one line with the fix. The CLI prints it as `error: ...` and exits 2; nothing shows a traceback."""


class ErrorKind(StrEnum):
    """Why a node call failed: the one table shared by the node (node.service raises it), the gRPC
    adapters (node.server and coordinator.client carry it as the status code of the same name), the
    failover (coordinator.failover decides by it) and InProcessLink. Values are what reports show."""

    INVALID_ARGUMENT = "invalid_argument"  # a malformed request: another node would refuse it too
    UNAUTHENTICATED = "unauthenticated"  # wrong cluster token
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a message above gRPC's own limit
    INTERNAL = "internal"  # the node failed to serve a valid request
    DATA_LOSS = "data_loss"  # a record on the node's flash failed its checksum or was cut short
    UNAVAILABLE = "unavailable"  # unreachable, connection refused or cut
    DEADLINE_EXCEEDED = "deadline"  # no answer within the request's deadline (hung)
    UNKNOWN = "unknown"


# The failures a replica can stand in for; the others are a wrong request or setup, where trying
# another node would not help.
FAILOVER_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED, ErrorKind.DATA_LOSS})
