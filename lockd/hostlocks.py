"""Who holds lock files outside lockd, found without stalling the event loop.

Invariants:
- The host's lock list is read in a worker thread, one read at a time, never on the event
  loop: the kernel makes every reader of /proc/locks take the host-wide file_rwsem for
  writing, which first waits for an RCU grace period (milliseconds, unless it was read
  moments before), so reads at once would gain nothing and tie up worker threads.
- Every answer comes from a read that started after it was asked for, and one read answers
  everyone who asked while the previous one ran: however many clients ask, reads follow one
  another back to back at worst, and nobody waits for more than two of them unless a read
  fails (its reader gets the error; the others who asked read again).
"""

from __future__ import annotations

import trio
from lockd_client.protocol import Holder

from .lockfiles import LockFiles


class _Read:
    """The next read: the names asked of it, then what it found."""

    __slots__ = ("names", "every_file", "found")

    def __init__(self) -> None:
        self.names: dict[str, None] = {}
        #: Someone asked for every lock file held (see `LockFiles.outside_holders_of`).
        self.every_file = False
        self.found: dict[str, list[Holder]] | None = None


class HostLocks:
    """Outside holders of lock files in one directory (see the module docstring)."""

    def __init__(self, files: LockFiles) -> None:
        self._files = files
        self._next = _Read()
        self._reading = trio.Lock()

    async def holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        """`LockFiles.outside_holders_of(names, every_file)`, from a read that starts after
        this call.

        Cancellation: a read under way is finished first (it takes milliseconds), then
        Cancelled is raised; the others waiting for that read still get its answer.
        """
        read = self._next
        read.names.update(dict.fromkeys(names))
        read.every_file |= every_file
        async with self._reading:
            if read.found is None:
                # Whoever gets here first reads for everyone who asked so far; later askers
                # wait for the read after this one.
                self._next = _Read()
                # Shielded: once the read is this one's, it happens, for everyone who asked.
                with trio.CancelScope(shield=True):
                    read.found = await trio.to_thread.run_sync(
                        self._files.outside_holders_of, list(read.names), read.every_file
                    )
        # A thread is not interrupted: a reader cancelled meanwhile learns of it only here.
        await trio.lowlevel.checkpoint_if_cancelled()
        found = read.found
        assert found is not None  # read above, by this task or by the one that asked first
        if every_file:
            return found
        return {name: found[name] for name in names if name in found}
