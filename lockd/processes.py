"""Process-tied leases: the owner that stands for a process, and the watch on its exit.

Invariants:
- At most one open `ProcessOwner` per pid. An owner is open (its pidfd open, its watch
  running) exactly while some live ticket is tied to it: `attach` when a ticket is made (the
  first asks for the watch, which `watch` then runs), `detach` when it ends, and the last
  `detach` closes it. An owner no ticket ever used is
  closed by `discard`. So a process whose leases all ended costs nothing more.
- The pidfd is opened before the process's uid is read, and the process is checked to be
  still running afterwards, so the uid checked is that of the process the pidfd watches,
  even if its pid is recycled meanwhile.
- `on_exit` is called once per owner whose process exits while it is open, from its `watch`;
  never after the owner is closed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable

import trio
from lockd_client import errors

from . import procinfo
from .table import Ticket

log = logging.getLogger("lockd")

#: The kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit).
MAX_PID = 4 * 1024 * 1024


class ProcessOwner:
    """The table owner of the leases tied to process `pid` (of user `uid`)."""

    __slots__ = ("pid", "uid", "command", "pidfd", "tickets", "closed")

    def __init__(self, pid: int, uid: int, command: str, pidfd: int) -> None:
        self.pid = pid
        self.uid = uid
        #: As it was when the first lease was tied to the process.
        self.command = command
        self.pidfd = pidfd
        #: Live tickets tied to this process: waiting ones (still owned by their connection)
        #: and granted ones (owned by this owner in the table).
        self.tickets: set[Ticket] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"<ProcessOwner pid={self.pid} uid={self.uid}>"


class Processes:
    """The open ProcessOwners, by pid."""

    def __init__(self, on_exit: Callable[[ProcessOwner], None]) -> None:
        self._owners: dict[int, ProcessOwner] = {}
        self._on_exit = on_exit

    def owner(self, caller_uid: int, pid: int) -> ProcessOwner:
        """The owner for leases tied to `pid`, which `caller_uid` must be allowed to tie.

        Raises ProtocolError for a pid no process can have, NotHeld for one no process has (or
        a thread's), PermissionDenied for another user's process (unless the caller is root),
        LimitExceeded when out of descriptors. A new owner must be `attach`ed or `discard`ed.
        """
        if not 0 < pid <= MAX_PID:
            raise errors.ProtocolError(f"{pid} is not a process id; a lease can only be tied to a running process")
        owner = self._owners.get(pid)
        if owner is None:
            owner = self._open(pid)
        if caller_uid not in (0, owner.uid):
            uid = owner.uid
            self.discard(owner)
            raise errors.PermissionDenied(
                f"process {pid} belongs to uid {uid}, you are uid {caller_uid}; "
                "only that user or root may tie leases to it"
            )
        return owner

    def attach(self, owner: ProcessOwner, ticket: Ticket) -> bool:
        """Tie `ticket` to `owner`. True for the first ticket: the caller must run `watch`."""
        first = not owner.tickets
        owner.tickets.add(ticket)
        return first

    def detach(self, owner: ProcessOwner, ticket: Ticket) -> None:
        """`ticket` ended; the owner closes once no ticket is tied to it."""
        owner.tickets.discard(ticket)
        self.discard(owner)

    def discard(self, owner: ProcessOwner) -> None:
        """Close `owner` if no ticket is tied to it."""
        if not owner.tickets and not owner.closed:
            self._close(owner)

    def find(self, pid: int) -> ProcessOwner | None:
        """The open owner of `pid`'s leases, if any."""
        return self._owners.get(pid)

    def owners(self) -> list[ProcessOwner]:
        return list(self._owners.values())

    def _open(self, pid: int) -> ProcessOwner:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise _open_error(pid, exc) from None
        uid = procinfo.process_uid(pid)
        # The pid may have been recycled between pidfd_open and reading /proc: the pidfd
        # still watches the old process, which then has exited (its pidfd is readable).
        # poll, not select: select refuses descriptors >= 1024, which a busy daemon has.
        ready = select.poll()
        ready.register(pidfd, select.POLLIN)
        if uid is None or ready.poll(0):
            os.close(pidfd)
            raise errors.NotHeld(f"process {pid} does not exist; a lease can only be tied to a running process")
        owner = self._owners[pid] = ProcessOwner(pid, uid, procinfo.command_line(pid), pidfd)
        return owner

    def _close(self, owner: ProcessOwner) -> None:
        owner.closed = True
        if self._owners.get(owner.pid) is owner:
            del self._owners[owner.pid]
        trio.lowlevel.notify_closing(owner.pidfd)
        os.close(owner.pidfd)

    async def watch(self, owner: ProcessOwner) -> None:
        """Call `on_exit` when the process exits, unless the owner is closed first; return
        then. Cancellation: stops watching, calls nothing."""
        if owner.closed:
            return  # closed before this task ran: its pidfd number may belong to another file
        try:
            await trio.lowlevel.wait_readable(owner.pidfd)
        except trio.ClosedResourceError:
            return
        if owner.closed:
            return
        # The process is gone and so is the reason to keep its pid: a new process may get it.
        if self._owners.get(owner.pid) is owner:
            del self._owners[owner.pid]
        try:
            self._on_exit(owner)
        except Exception:
            # A bug must cost this process's leases at most, never the daemon.
            log.exception("internal error ending the leases of process %d", owner.pid)
        for ticket in list(owner.tickets):
            self.detach(owner, ticket)
        self.discard(owner)


def _open_error(pid: int, exc: OSError) -> errors.LockdError:
    if exc.errno == errno.ESRCH:
        return errors.NotHeld(f"process {pid} does not exist; a lease can only be tied to a running process")
    if exc.errno in (errno.ENOENT, errno.EINVAL):
        return errors.NotHeld(
            f"{pid} is a thread, not a process; tie the lease to its process (the thread group leader)"
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return errors.LimitExceeded(
            f"cannot watch process {pid}: the daemon is out of file descriptors ({exc.strerror}); "
            "raise its open-file limit (LimitNOFILE=) or end some leases"
        )
    return errors.DaemonUnavailable(f"cannot watch process {pid}: {exc.strerror}; retry later")
