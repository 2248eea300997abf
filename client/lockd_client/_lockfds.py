"""The lock-file descriptors that come with a grant: receiving them, letting go of them, and
keeping them out of forked children.

Invariants:
- A descriptor received is close-on-exec from the moment it exists (MSG_CMSG_CLOEXEC): no
  program this process runs ever holds a lease.
- Letting go of a lease closes its descriptors; a lease `detached` from a daemon that went
  away is unlocked first (LOCK_UN, for every copy, lockctl's guardian's too), since no daemon
  will do it. Otherwise the daemon unlocks on the Release, and a copy closing frees nothing
  it still holds.
- A child forked from a process holding leases holds none of them: after the fork, the
  child closes its copies of every registered owner's descriptors and of its daemon
  connections, without unlocking anything, unless it was forked by `fork_keeping` (lockctl's
  guardian and keeper, which exist to hold them).
"""

from __future__ import annotations

import _socket as socket  # the C type: see blocking.py
import _weakref
import array  # the C module: weakref's Python layer would lengthen lockctl's start-up
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol

from .protocol import MAX_FDS_PER_MESSAGE

if TYPE_CHECKING:
    from ._connection import Connection

#: A descriptor is a C int in SCM_RIGHTS data: 4 bytes on Linux.
_FD_SIZE: Final = 4
#: Room for as many descriptors as one message can carry: with less, the kernel would close
#: the ones that do not fit, and the lease would not hold them.
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)


class DescriptorsLost(OSError):
    """The kernel dropped descriptors sent with a message (this process is out of them)."""


def recv_into(sock: socket.socket, buffer: bytearray, flags: int = 0) -> tuple[int, list[int]]:
    """Read from `sock` into `buffer`, as `sock.recvmsg_into` with `flags`: the byte count
    and the descriptors that came with the bytes (close-on-exec). Raises DescriptorsLost,
    having closed the ones that did come, if the kernel dropped some."""
    size, ancdata, msg_flags, _ = sock.recvmsg_into((buffer,), _ANCILLARY_SIZE, flags | socket.MSG_CMSG_CLOEXEC)
    if not msg_flags & socket.MSG_CTRUNC:
        if not ancdata:
            return size, []
        if len(ancdata) == 1:  # a grant's, nearly always
            level, kind, data = ancdata[0]
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and not len(data) % _FD_SIZE:
                return size, array.array("i", data).tolist()
    # Truncated even with nothing to show for it: the kernel could install none of them.
    return size, _received(ancdata, msg_flags)


def _received(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    received = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    fds = received.tolist()
    if msg_flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise DescriptorsLost(
            "lock-file descriptors lockd sent were dropped by the kernel: this process is out "
            "of file descriptors (raise its limit with ulimit -n)"
        )
    return fds


def let_go(fds: list[int], *, unlock: bool) -> None:
    """Close `fds` (what `Connection.let_go` handed over), unlocking them first if asked."""
    if unlock and fds:
        import fcntl  # only now: lockctl's start-up does without it

        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
    close_all(fds)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


# --- clients: collected unclosed, or forked ------------------------------------------------


class _Owner(Protocol):
    def _forget_after_fork(self) -> None:
        """In a forked child: drop this process's copies, unlocking nothing."""


#: id of a weak reference → the reference, to every client registered and not collected.
_owners: dict[int, _weakref.ReferenceType[_Owner]] = {}
_keep_in_child = False


def register(owner: _Owner, conn: Connection) -> None:
    """Have `owner`, a client wrapping `conn`, forget its descriptors in every child forked
    from now on; and have them closed (unlocking nothing) if `owner` is garbage-collected
    unclosed: a dropped client must not keep its locks for the life of the process."""
    ref = _weakref.ref(owner, _collected(conn))
    _owners[id(ref)] = ref


def _collected(conn: Connection) -> Callable[[_weakref.ReferenceType[_Owner]], None]:
    def collected(ref: _weakref.ReferenceType[_Owner]) -> None:
        _owners.pop(id(ref), None)
        close_all(conn.abandon("the client was collected without being closed"))

    return collected


def fork_keeping() -> int:
    """`os.fork()`, but the child keeps every lease's descriptors and every connection (as
    raw descriptors: it forgets the objects, and whatever it forks holds nothing)."""
    global _keep_in_child
    _keep_in_child = True
    try:
        return os.fork()
    finally:
        _keep_in_child = False


def _after_fork_in_child() -> None:
    global _keep_in_child
    if _keep_in_child:
        # The child keeps the descriptors as they are, and whatever it forks is on its own.
        _keep_in_child = False
    else:
        for ref in list(_owners.values()):
            owner = ref()
            if owner is not None:
                owner._forget_after_fork()
    _owners.clear()


def hang_up(fd: int) -> None:
    """Make `fd` refer to /dev/null: this process no longer holds what it referred to, yet
    the number stays taken, so whoever polls it sees it readable rather than reused."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_after_fork_in_child)
