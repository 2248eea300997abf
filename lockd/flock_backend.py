"""The single-host backend: a lease is an flock() on `<lock dir>/NAME.lock`.

Invariant: a claim holds its flocks exactly from a successful take to its drop, and every
successful take carries fresh tokens from the one durable counter; a take that fails, raises
or is cancelled holds nothing (see lockd.backend).

Within lockd the table decides who may hold what, so a take only ever waits for processes
that flock the same files directly. The kernel does not announce when they let go, so `run`
retries every waiting take: one pass for all of them, trying each set of names in each mode
once (the rest of a set's claims follow only when it succeeds), every POLL_MIN seconds,
backing off to POLL_MAX while nothing comes free. Nothing polls while no take waits.
"""

from __future__ import annotations

import trio
from lockd_client.errors import LockdError
from lockd_client.protocol import Holder

from .backend import Blocked, BlockedCallback, Claim, LoseCallback, holders_in_order
from .hostlocks import HostLocks
from .lockfiles import LockFiles
from .tokens import TokenStore

#: The first retry comes this soon after a take finds a file held outside lockd (often a
#: holder that is exiting: the kernel closes its connection before its copy of the lock
#: file's descriptor, and the daemon may see the one before the other is done)...
POLL_MIN = 0.001
#: ...and retries slow down to this while it stays held, so a grant still follows the outside
#: holder's exit well within 100 ms, at a few system calls per waiting set of names.
POLL_MAX = 0.05
_BACKOFF = 1.5


class _Waiter:
    """A take waiting for `run`: it sets `tokens` or `error`, then `done`."""

    __slots__ = ("done", "tokens", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.tokens: list[int] | None = None
        self.error: LockdError | None = None


class FlockBackend:
    """`lockd.backend.Backend` over LockFiles and a TokenStore, both owned by the caller."""

    name = "flock"
    #: The holder's copy of the lock file's descriptor keeps the flock (see lockd.lockfiles).
    leases_outlive_daemon = True
    loss_notice = None

    def __init__(self, files: LockFiles, tokens: TokenStore) -> None:
        self._files = files
        self._tokens = tokens
        #: Takes waiting for an outside holder, in arrival order.
        self._waiting: dict[Claim, _Waiter] = {}
        self._wake = trio.Event()
        self._host_locks = HostLocks(files)

    def take_now(self, claim: Claim) -> list[int] | None:
        if not self._files.try_lock(claim):
            return None
        try:
            return [self._tokens.next() for _ in claim.names]
        except BaseException:
            self._files.unlock(claim)
            raise

    async def take(self, claim: Claim, blocked: BlockedCallback) -> list[int]:
        """Take the files now, or wait for `run` to take them once the outside holder lets go.

        Raises Blocked at once if `claim.wait` is false and the files are held outside lockd.
        Needs `run` running to ever finish waiting. Cancellation: the take stops waiting, and
        whatever `run` took for it meanwhile is let go, so a cancelled take holds nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        tokens = self.take_now(claim)
        if tokens is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return tokens
        if not claim.wait:
            raise Blocked(f"{', '.join(claim.names)}: held by a process outside lockd")
        waiter = self._waiting[claim] = _Waiter()
        self._wake.set()
        try:
            # Waiting from now on: `run` may take the files while the look waits its turn.
            holders = holders_in_order(await self._host_locks.holders_of(list(claim.names)), claim.names)
            if not waiter.done.is_set():
                blocked(holders)
            await waiter.done.wait()
        except BaseException:
            if self._waiting.pop(claim, None) is None and waiter.tokens is not None:
                self._files.unlock(claim)  # taken by `run` just as this take was cancelled
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.tokens is not None
        return waiter.tokens

    def descriptors(self, claim: Claim) -> list[int]:
        return self._files.descriptors(claim)

    def drop(self, claim: Claim, *, unlock: bool) -> None:
        self._waiting.pop(claim, None)
        if unlock:
            self._files.unlock(claim)
        else:
            self._files.abandon(claim)

    async def outside_holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        return await self._host_locks.holders_of(names, every_file=every_file)

    def outside_waiters_of(self, names: list[str]) -> dict[str, list[Holder]]:
        return {}  # processes blocked in flock(2) on a lock file are not reported

    def outside_names(self) -> list[str]:
        return []

    async def run(self, lose: LoseCallback) -> None:
        """Retry the waiting takes (see the module docstring) until cancelled.

        An flock lasts as long as its descriptor, so nothing is ever lost: `lose` is unused.
        """
        interval = POLL_MIN
        while True:
            if not self._waiting:
                await self._wake.wait()
                self._wake = trio.Event()
                interval = POLL_MIN
            await trio.sleep(interval)
            interval = POLL_MIN if self._retry() else min(interval * _BACKOFF, POLL_MAX)

    def _retry(self) -> bool:
        """Try every waiting take once per set of names and mode; True if any succeeded."""
        busy: set[tuple[tuple[str, ...], bool]] = set()
        progress = False
        for claim, waiter in list(self._waiting.items()):
            key = (claim.names, claim.shared)
            if key in busy:
                continue
            try:
                tokens = self.take_now(claim)
            except LockdError as exc:
                waiter.error = exc
            else:
                if tokens is None:
                    busy.add(key)
                    continue
                waiter.tokens = tokens
                progress = True
            del self._waiting[claim]
            waiter.done.set()
        return progress
