"""The lockd exception tree: every error a client can see is a `LockdError`.

Invariant: an `Error` reply from the daemon becomes exactly one exception here, chosen by its
code in `from_reply`; a code this client does not know becomes a plain `LockdError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import Error, Holder


class ErrorCode:
    """Values of `Error.code`. A client maps codes it does not know to its root error type."""

    BUSY = "busy"
    TIMEOUT = "timeout"
    INVALID_NAME = "invalid_name"
    BAD_LOCK_FILE = "bad_lock_file"
    PERMISSION_DENIED = "permission_denied"
    NOT_HELD = "not_held"
    PROTOCOL = "protocol"
    VERSION = "version"
    LIMIT = "limit"
    UNAVAILABLE = "unavailable"
    SHUTDOWN = "shutdown"
    WOULD_DEADLOCK = "would_deadlock"


class LockdError(Exception):
    """Root of every lockd error.

    `code` is the wire code (ErrorCode) the daemon sends for this error; None for an error
    only a client raises.
    """

    code: str | None = None


class DaemonUnavailable(LockdError):
    """The daemon cannot be reached, or the connection to it ended (it went away, or is
    shutting down). An `unavailable` reply from a daemon that is still there is the subclass
    BackendUnavailable."""

    code = ErrorCode.UNAVAILABLE


class BackendUnavailable(DaemonUnavailable):
    """The daemon answered, but cannot serve the request now: its backend (etcd, the lock
    directory's filesystem) failed, or it hit an internal error. The message says which;
    the daemon's log says more. Retrying later may succeed."""


class DaemonBusy(DaemonUnavailable):
    """The daemon is there but did not take the connection in time: its queue of connections
    waiting to be accepted stayed full, or it left the handshake unanswered (too many clients
    at once, or the daemon is stopped). Retrying later, or waiting longer, may succeed."""

    code = None  # only a client raises it


class ProtocolError(LockdError):
    """A peer sent something the protocol does not allow."""

    code = ErrorCode.PROTOCOL


class FrameTooLarge(ProtocolError):
    """A frame's length prefix announced more than the receiver accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class LockBusy(LockdError):
    """The lock is held (no-wait request) or the timeout passed before it was granted.

    `holders` says who held it when the request gave up.
    """

    code = ErrorCode.BUSY

    def __init__(self, message: str, holders: list[Holder] | None = None) -> None:
        super().__init__(message)
        self.holders = holders or []


class LockTimeout(LockBusy):
    """The lock was still held when the request's timeout passed."""

    code = ErrorCode.TIMEOUT


class LeaseLost(LockdError):
    """A lease ended without its holder releasing it: daemon gone, or forcibly released."""


class PermissionDenied(LockdError):
    """The daemon's policy refused the request."""

    code = ErrorCode.PERMISSION_DENIED


class InvalidName(LockdError, ValueError):
    """A lock name breaks the naming rule (stated in the message)."""

    code = ErrorCode.INVALID_NAME


class InvalidArgument(LockdError, ValueError):
    """A request's argument breaks a limit of the protocol (the message says which and how);
    nothing was sent."""


class BadLockFile(LockdError):
    """The lock file cannot be used: a symlink or non-regular file sits at its path."""

    code = ErrorCode.BAD_LOCK_FILE


class NotHeld(LockdError):
    """A release named a lease that the given process does not hold, or a lease was to be
    tied to a process that is not running."""

    code = ErrorCode.NOT_HELD


class WouldDeadlock(LockdError):
    """The request would wait for a lease that cannot end before the requester stops waiting:
    the lease of the very process it is for, or of the lockctl running the requester."""

    code = ErrorCode.WOULD_DEADLOCK


class LimitExceeded(LockdError):
    """A daemon limit (connections, leases, waiters) was reached; retry later or raise it."""

    code = ErrorCode.LIMIT


def _codes(cls: type[LockdError]) -> dict[str, type[LockdError]]:
    # Only a class that sets its own code stands for it: FrameTooLarge is a ProtocolError,
    # but an Error reply with code "protocol" is not about a frame.
    found = {sub.code: sub for sub in cls.__subclasses__() if sub.code and "code" in vars(sub)}
    for sub in cls.__subclasses__():
        found.update(_codes(sub))
    return found


# BackendUnavailable shares its parent's code: whoever sends "unavailable" is still there.
_BY_CODE = _codes(LockdError) | {
    ErrorCode.UNAVAILABLE: BackendUnavailable,
    ErrorCode.VERSION: ProtocolError,
    ErrorCode.SHUTDOWN: DaemonUnavailable,
}


def from_reply(error: Error) -> LockdError:
    """The exception that an `Error` reply stands for."""
    cls = _BY_CODE.get(error.code, LockdError)
    if issubclass(cls, LockBusy):
        return cls(error.message, error.holders)
    return cls(error.message)
