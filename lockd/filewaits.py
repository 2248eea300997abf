"""Waiting for lock files that processes hold outside lockd: one policy for every backend.

Invariant: a claim waiting here has its files taken (`LockFiles.try_lock`) at most once, by
`FileWaits.run`, and only while it still waits; a wait that ends any other way (cancelled,
withdrawn) leaves nothing held for the claim once it has ended: files taken for it just as it
ended are let go.

The kernel does not announce when a process lets go of an flock, so `run` retries every
waiting claim: one pass for all of them, trying each set of names in each mode once (the
other claims of a set are tried only when it succeeds), every POLL_MIN seconds, backing off
to POLL_MAX while nothing comes free. Nothing polls while no claim waits. A backend calls
`wait` only once lockd's own order lets the claim have the files (the table's, or the
backend's queue), so whatever holds them here is outside lockd.
"""

from __future__ import annotations

import trio
from lockd_client.errors import LockdError

from .backend import BlockedCallback, Claim, holders_in_order
from .hostlocks import HostLocks
from .lockfiles import LockFiles

#: The first retry comes this soon after a claim finds a file held outside lockd (often a
#: holder that is exiting: the kernel closes its connection before its copy of the lock
#: file's descriptor, and the daemon may see the one before the other is done)...
POLL_MIN = 0.001
#: ...and retries slow down to this while it stays held, so a grant still follows the outside
#: holder's exit well within 100 ms, at a few system calls per waiting set of names.
POLL_MAX = 0.05
_BACKOFF = 1.5


class _Waiter:
    """A claim waiting for `run`: it sets `taken` or `error`, then `done`."""

    __slots__ = ("done", "taken", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.taken = False
        self.error: LockdError | None = None


class FileWaits:
    """Claims waiting for lock files held outside lockd (see the module docstring)."""

    def __init__(self, files: LockFiles, host_locks: HostLocks) -> None:
        self._files = files
        self._host_locks = host_locks
        #: Claims waiting, in arrival order.
        self._waiting: dict[Claim, _Waiter] = {}
        self._wake = trio.Event()

    async def wait(self, claim: Claim, blocked: BlockedCallback) -> None:
        """Return once `run` has taken every file of `claim`, which then holds them.

        Calls `blocked` with the outside holders, from a look at the host's locks, unless the
        files were taken before the look ended. Raises what `LockFiles.try_lock` raises.
        Needs `run` running to ever return. Cancellation: the claim stops waiting, and what
        `run` took for it meanwhile is let go.
        """
        waiter = self._waiting[claim] = _Waiter()
        self._wake.set()
        try:
            # Waiting from now on: `run` may take the files while the look waits its turn.
            holders = holders_in_order(await self._host_locks.holders_of(list(claim.names)), claim.names)
            if not waiter.done.is_set():
                blocked(holders)
            await waiter.done.wait()
        except BaseException:
            if self._waiting.pop(claim, None) is None and waiter.taken:
                self._files.unlock(claim)  # taken by `run` just as this wait was cancelled
            raise
        if waiter.error is not None:
            raise waiter.error

    def withdraw(self, claim: Claim) -> None:
        """Stop trying to take `claim`'s files; its `wait` returns only when cancelled. What
        `run` took for it already stays held: the caller lets go of it. Never blocks."""
        self._waiting.pop(claim, None)

    async def run(self) -> None:
        """Retry the waiting claims (see the module docstring) until cancelled."""
        interval = POLL_MIN
        while True:
            if not self._waiting:
                await self._wake.wait()
                self._wake = trio.Event()
                interval = POLL_MIN
            await trio.sleep(interval)
            interval = POLL_MIN if self._retry() else min(interval * _BACKOFF, POLL_MAX)

    def _retry(self) -> bool:
        """Try every waiting claim once per set of names and mode; True if any was taken."""
        busy: set[tuple[tuple[str, ...], tuple[bool, ...]]] = set()
        progress = False
        for claim, waiter in list(self._waiting.items()):
            key = (claim.names, tuple(map(claim.shared_on, claim.names)))
            if key in busy:
                continue
            try:
                taken = self._files.try_lock(claim)
            except LockdError as exc:
                waiter.error = exc
            else:
                if not taken:
                    busy.add(key)
                    continue
                waiter.taken = progress = True
            del self._waiting[claim]
            waiter.done.set()
        return progress
