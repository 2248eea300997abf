"""The lockd exception tree: every error a client can see is a `LockdError`.

Invariant: an `Error` reply from the daemon becomes exactly one exception here, the class that
`_ERROR_BY_CODE` writes out for its code; a code this client does not know becomes a plain
`LockdError`. A class's own `code` is what the daemon sends when it raises that class, and the
client raises that class (or one of its subclasses) for it: one `except` clause catches it at
both ends.

Protocol errors are of two kinds, as in h11; `ProtocolError` is the base of both:
- `LocalProtocolError`: this client is at fault. Raised when the caller misuses the API (a
  second handshake, a request before lockd's welcome, a lease or request of another
  connection, a result asked for before its reply came), and for an `Error` with code
  `protocol`: the daemon rejected what this client sent as breaking the protocol.
- `RemoteProtocolError`: the daemon is at fault. Raised when the daemon sends what the
  protocol rules out (bytes that do not decode, a frame over the limit, which is
  `FrameTooLarge`, a reply for a request never sent or of the wrong kind, a second welcome);
  the connection is then closed.
- `ProtocolError` itself is raised for an `Error` with code `version`: the two sides speak
  different versions of the protocol, and neither broke it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .protocol import Error, Holder


class ErrorCode:
    """Values of `Error.code`. A client maps codes it does not know to its root error type.

    They are wire values: never changed, only added to (with a class in `_ERROR_BY_CODE`).
    """

    BUSY: Final = "busy"
    TIMEOUT: Final = "timeout"
    INVALID_NAME: Final = "invalid_name"
    BAD_LOCK_FILE: Final = "bad_lock_file"
    PERMISSION_DENIED: Final = "permission_denied"
    NOT_HELD: Final = "not_held"
    PROTOCOL: Final = "protocol"
    VERSION: Final = "version"
    LIMIT: Final = "limit"
    UNAVAILABLE: Final = "unavailable"
    SHUTDOWN: Final = "shutdown"
    WOULD_DEADLOCK: Final = "would_deadlock"
    SLOTS_MISMATCH: Final = "slots_mismatch"
    NOT_REEXECUTED: Final = "not_reexecuted"


class LockdError(Exception):
    """Root of every lockd error.

    `code` is the wire code (ErrorCode) the daemon sends for this error; None for an error
    only a client raises.
    """

    code: ClassVar[str | None] = None


class DaemonUnavailable(LockdError):
    """The daemon cannot be reached, or the connection to it ended (it went away, or is
    shutting down). An `unavailable` reply from a daemon that is still there is the subclass
    BackendUnavailable."""

    # Typed as the root's: a subclass (DaemonBusy) is only a client's.
    code: ClassVar[str | None] = ErrorCode.UNAVAILABLE


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
    """The protocol was broken (LocalProtocolError: by this client or its caller;
    RemoteProtocolError: by the daemon), or the two sides speak different versions of it
    (this class itself: an `Error` with code `version`).

    The daemon raises it for a request that breaks the protocol; this client raises that as
    LocalProtocolError."""

    # Typed as the root's: a subclass (RemoteProtocolError) is only a client's.
    code: ClassVar[str | None] = ErrorCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """This side broke the protocol: the caller used the client in a way it does not allow
    (the message says how; nothing was sent), or the daemon rejected what this client sent
    (an `Error` with code `protocol`; with `id` nil, the connection is closed)."""


class RemoteProtocolError(ProtocolError):
    """The daemon sent something the protocol rules out; the connection is closed, and its
    leases are lost (or detached, where the daemon said they outlive it)."""

    code = None  # the daemon never sends a code that blames itself: only a client raises it


class FrameTooLarge(RemoteProtocolError):
    """A frame's length prefix announced more than the receiver accepts: the peer broke the
    protocol. (The daemon answers one from a client with an `Error` of code `protocol`.)"""

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


class SlotsMismatch(LockdError):
    """The request and the name's current holders or waiters disagree on what the name is: a
    semaphore of N slots (each says its N) or a plain lock. Every user of a name must agree.
    `holders` are the name's holders."""

    code = ErrorCode.SLOTS_MISMATCH

    def __init__(self, message: str, holders: list[Holder] | None = None) -> None:
        super().__init__(message)
        self.holders = holders or []


class NotReexecuted(LockdError):
    """The daemon did not re-execute itself (`Reexec`): the message says why (the new program
    cannot take over its state, another re-exec is under way...). It serves on as it was,
    with everything it held."""

    code = ErrorCode.NOT_REEXECUTED


class LimitExceeded(LockdError):
    """A daemon limit (connections, leases, waiters) was reached; retry later or raise it."""

    code: ClassVar[str | None] = ErrorCode.LIMIT  # None in SubscriptionDropped


class SubscriptionDropped(LimitExceeded):
    """A subscription to lease events ended because its events were not read as fast as they
    came: lockd dropped it (its `limit` error on the subscription), or this client did, with
    MAX_UNREAD_EVENTS unread. Subscribe again, and backfill what was missed from the
    history. Only a client raises it: for a `limit` error on a subscription it holds."""

    code = None


#: What each `Error.code` becomes in a client, one class per code and each class for one code,
#: written out so that no class's place in the tree decides what a code means.
_ERROR_BY_CODE: Final[Mapping[str, type[LockdError]]] = {
    ErrorCode.BUSY: LockBusy,
    ErrorCode.TIMEOUT: LockTimeout,
    ErrorCode.INVALID_NAME: InvalidName,
    ErrorCode.BAD_LOCK_FILE: BadLockFile,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.NOT_HELD: NotHeld,
    # The daemon says that what this client sent broke the protocol.
    ErrorCode.PROTOCOL: LocalProtocolError,
    # Neither side broke the protocol: they speak different versions of it.
    ErrorCode.VERSION: ProtocolError,
    ErrorCode.LIMIT: LimitExceeded,
    # Whoever sends `unavailable` is still there: what failed is behind it.
    ErrorCode.UNAVAILABLE: BackendUnavailable,
    ErrorCode.SHUTDOWN: DaemonUnavailable,
    ErrorCode.WOULD_DEADLOCK: WouldDeadlock,
    ErrorCode.SLOTS_MISMATCH: SlotsMismatch,
    ErrorCode.NOT_REEXECUTED: NotReexecuted,
}


def from_reply(error: Error) -> LockdError:
    """The exception that an `Error` reply stands for."""
    cls = _ERROR_BY_CODE.get(error.code, LockdError)
    if issubclass(cls, (LockBusy, SlotsMismatch)):
        return cls(error.message, error.holders)
    return cls(error.message)
