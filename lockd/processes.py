"""Process-tied leases: the owner that stands for a process, by pid. Pure bookkeeping: the
pidfd behind an owner is opened by the function given (lockd.pidfds.open_process in the
daemon) and watched and closed by the shell.

Invariants:
- At most one open `ProcessOwner` per pid. An owner is open exactly while some live ticket
  is tied to it: `attach` when a ticket is made (the first asks the caller to start watching
  the process), `detach` when it ends (the last asks the caller to stop watching and close
  it), and an owner no ticket ever used is closed by `discard`. So a process whose leases
  all ended costs nothing more.
- An owner whose process exited (`exited`) is no longer found by its pid: a new process may
  get that pid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from lockd_client import errors

from .table import Ticket

#: The kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit).
MAX_PID: Final = 4 * 1024 * 1024


class ProcessOwner:
    """The table owner of the leases tied to process `pid` (of user `uid`)."""

    __slots__ = ("pid", "uid", "command", "pidfd", "tickets", "closed")

    def __init__(self, pid: int, uid: int, command: str, pidfd: int) -> None:
        self.pid = pid
        self.uid = uid
        #: As it was when the first lease was tied to the process.
        self.command = command
        #: What the shell watches for the process's exit; closed by the shell once `closed`.
        self.pidfd = pidfd
        #: Live tickets tied to this process: waiting ones (still owned by their connection)
        #: and granted ones (owned by this owner in the table).
        self.tickets: set[Ticket] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"<ProcessOwner pid={self.pid} uid={self.uid}>"


#: Opens an owner for a running process, or raises a LockdError saying why it cannot.
OpenProcess = Callable[[int], ProcessOwner]


class Processes:
    """The open ProcessOwners, by pid."""

    def __init__(self, open_process: OpenProcess) -> None:
        self._owners: dict[int, ProcessOwner] = {}
        self._open = open_process

    def get(self, pid: int) -> ProcessOwner:
        """The owner for leases tied to `pid`, opened if need be: then it must be `attach`ed
        to, or `discard`ed.

        Raises ProtocolError for a pid no process can have, and what opening it raises
        (NotHeld for a process that does not exist...).
        """
        if not 0 < pid <= MAX_PID:
            raise errors.ProtocolError(f"{pid} is not a process id; a lease can only be tied to a running process")
        owner = self._owners.get(pid)
        if owner is None:
            owner = self._owners[pid] = self._open(pid)
        return owner

    def attach(self, owner: ProcessOwner, ticket: Ticket) -> bool:
        """Tie `ticket` to `owner`. True for the first ticket: the process must be watched."""
        first = not owner.tickets
        owner.tickets.add(ticket)
        return first

    def detach(self, owner: ProcessOwner, ticket: Ticket) -> bool:
        """`ticket` ended. True if that closed the owner: its watch must stop, its pidfd close."""
        owner.tickets.discard(ticket)
        return self.discard(owner)

    def discard(self, owner: ProcessOwner) -> bool:
        """Close `owner` if no ticket is tied to it; True if that closed it now."""
        if owner.tickets or owner.closed:
            return False
        owner.closed = True
        self.exited(owner)
        return True

    def exited(self, owner: ProcessOwner) -> None:
        """The process is gone: its pid is no longer `owner`'s."""
        if self._owners.get(owner.pid) is owner:
            del self._owners[owner.pid]

    def adopt(self, owner: ProcessOwner) -> None:
        """Keep `owner`, handed over by a daemon that re-executed, with its tickets attached."""
        assert owner.tickets and self._owners.get(owner.pid) is None, owner
        self._owners[owner.pid] = owner

    def find(self, pid: int) -> ProcessOwner | None:
        """The open owner of `pid`'s leases, if any."""
        return self._owners.get(pid)

    def owners(self) -> list[ProcessOwner]:
        return list(self._owners.values())
