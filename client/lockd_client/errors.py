"""The lockd exception tree: every error a client can see is a `LockdError`.

Invariant: an `Error` reply from the daemon becomes exactly one exception here, chosen by its
code in `from_reply`; a code this client does not know becomes a plain `LockdError`.
"""

from __future__ import annotations

from . import protocol


class LockdError(Exception):
    """Root of every lockd error.

    `code` is the wire code (protocol.ErrorCode) the daemon sends for this error.
    """

    code: str | None = None


class DaemonUnavailable(LockdError):
    """The daemon cannot be reached, went away, or its backend is unavailable."""

    code = protocol.ErrorCode.UNAVAILABLE


class ProtocolError(LockdError):
    """A peer sent something the protocol does not allow."""

    code = protocol.ErrorCode.PROTOCOL


class LockBusy(LockdError):
    """The lock is held (no-wait request) or the timeout passed before it was granted.

    `holders` says who held it when the request gave up.
    """

    code = protocol.ErrorCode.BUSY

    def __init__(self, message: str, holders: list[protocol.Holder] | None = None) -> None:
        super().__init__(message)
        self.holders = holders or []


class LockTimeout(LockBusy):
    """The lock was still held when the request's timeout passed."""

    code = protocol.ErrorCode.TIMEOUT


class LeaseLost(LockdError):
    """A lease ended without its holder releasing it: daemon gone, or forcibly released."""


class PermissionDenied(LockdError):
    """The daemon's policy refused the request."""

    code = protocol.ErrorCode.PERMISSION_DENIED


class InvalidName(LockdError, ValueError):
    """A lock name breaks the naming rule (stated in the message)."""

    code = protocol.ErrorCode.INVALID_NAME


class InvalidArgument(LockdError, ValueError):
    """A request's argument breaks a limit of the protocol (the message says which and how);
    nothing was sent."""


class BadLockFile(LockdError):
    """The lock file cannot be used: a symlink or non-regular file sits at its path."""

    code = protocol.ErrorCode.BAD_LOCK_FILE


class NotHeld(LockdError):
    """A release named a lease that the given process does not hold, or a lease was to be
    tied to a process that is not running."""

    code = protocol.ErrorCode.NOT_HELD


class LimitExceeded(LockdError):
    """A daemon limit (connections, leases, waiters) was reached; retry later or raise it."""

    code = protocol.ErrorCode.LIMIT


def _codes(cls: type[LockdError]) -> dict[str, type[LockdError]]:
    found = {sub.code: sub for sub in cls.__subclasses__() if sub.code}
    for sub in cls.__subclasses__():
        found.update(_codes(sub))
    return found


_BY_CODE = _codes(LockdError) | {
    protocol.ErrorCode.VERSION: ProtocolError,
    protocol.ErrorCode.SHUTDOWN: DaemonUnavailable,
}


def from_reply(error: protocol.Error) -> LockdError:
    """The exception that an `Error` reply stands for."""
    cls = _BY_CODE.get(error.code, LockdError)
    if issubclass(cls, LockBusy):
        return cls(error.message, error.holders)
    return cls(error.message)
