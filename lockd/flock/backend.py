"""The single-host backend: a lease is an flock() on `<lock dir>/NAME.lock`.

Invariant: a claim holds its flocks exactly from a successful take to its drop, and every
successful take carries fresh tokens from the one durable counter; a take that fails, raises
or is cancelled holds nothing (see lockd.backend).

Within lockd the table decides who may hold what, and in what order (`orders_requests` is
false), so a take only ever waits for processes that flock the same files directly: the wait
follows lockd.filewaits, whose `run` is this backend's.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import trio
from lockd_client.protocol import Holder

from ..backend import Blocked, BlockedCallback, Claim, LoseCallback
from ..filewaits import FileWaits
from ..hostlocks import HostLocks
from ..lockfiles import LockFiles
from .tokens import TokenStore


class _Held(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A held claim's flocks as a re-executed daemon adopts them: by its index among the
    claims handed over, its descriptors (`LockFiles.descriptors`) and slot files."""

    claim: int
    fds: list[int]
    slots: list[tuple[str, int]]


_ENCODER = msgspec.msgpack.Encoder()


class FlockBackend:
    """`lockd.backend.Backend` over LockFiles and a TokenStore, both owned by the caller."""

    name = "flock"
    orders_requests = False
    #: The holder's copy of the lock file's descriptor keeps the flock (see lockd.lockfiles).
    leases_outlive_daemon = True
    loss_notice = None

    def __init__(self, files: LockFiles, tokens: TokenStore) -> None:
        self._files = files
        self._tokens = tokens
        self._host_locks = HostLocks(files)
        self._file_waits = FileWaits(files, self._host_locks)

    def take_now(self, claim: Claim) -> list[int] | None:
        if not self._files.try_lock(claim):
            return None
        return self._fresh_tokens(claim)

    async def take(self, claim: Claim, blocked: BlockedCallback) -> list[int]:
        """Take the files now, or wait for them once the outside holder lets go.

        Raises Blocked at once if `claim.wait` is false and the files are held outside lockd.
        Needs `run` running to ever finish waiting. Cancellation: the take stops waiting, and
        whatever was taken for it meanwhile is let go, so a cancelled take holds nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        tokens = self.take_now(claim)
        if tokens is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return tokens
        if not claim.wait:
            raise Blocked(f"{', '.join(claim.names)}: held by a process outside lockd")
        await self._file_waits.wait(claim, blocked)
        return self._fresh_tokens(claim)

    def descriptors(self, claim: Claim) -> Sequence[int]:
        return self._files.descriptors(claim)

    def drop(self, claim: Claim, *, unlock: bool) -> None:
        self._file_waits.withdraw(claim)
        if unlock:
            self._files.unlock(claim)
        else:
            self._files.abandon(claim)

    async def outside_holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        return await self._host_locks.holders_of(names, every_file=every_file)

    def outside_waiters_of(self, names: list[str]) -> dict[str, list[Holder]]:
        return {}  # processes blocked in flock(2) on a lock file are not reported

    def place_of(self, claim: Claim) -> int | None:
        return None  # the table orders requests

    def outside_names(self) -> list[str]:
        return []

    def outside_slots(self, name: str) -> int | None:
        return None  # a process flocking a lock file says nothing of slots

    async def run(self, lose: LoseCallback) -> None:
        """Retry the takes waiting for outside holders (lockd.filewaits) until cancelled.

        An flock lasts as long as its descriptor, so nothing is ever lost: `lose` is unused.
        """
        await self._file_waits.run()

    def unattended(self) -> None:
        return None  # a flock lasts as long as its descriptor

    def hand_over(self, claims: Sequence[Claim]) -> tuple[bytes, list[int]]:
        """The descriptors and slot files held for `claims` (those being taken hold none:
        they are taken anew)."""
        held = [
            _Held(index, list(fds), self._files.slots_of(claim))
            for index, claim in enumerate(claims) if (fds := self._files.descriptors(claim))
        ]
        return _ENCODER.encode(held), [fd for entry in held for fd in entry.fds]

    def adopt(self, state: bytes, claims: Sequence[Claim]) -> None:
        held = self.check_handover(state, claims)
        self._files.adopt([(claims[entry.claim], entry.fds, entry.slots) for entry in held])

    @staticmethod
    def check_handover(state: bytes, claims: Sequence[Claim]) -> list[_Held]:
        """The state `hand_over` gave, decoded and checked against `claims`, short of its
        descriptors (which `adopt` checks). Raises ValueError."""
        try:
            held = msgspec.msgpack.decode(state, type=list[_Held])
        except msgspec.MsgspecError as exc:
            raise ValueError(f"not a handover of the flock backend: {exc}") from None
        for entry in held:
            if not 0 <= entry.claim < len(claims):
                raise ValueError(f"the flock backend's handover names claim {entry.claim} of {len(claims)}")
            claim = claims[entry.claim]
            if len(entry.fds) != len(claim.names) + len(claim.slots) or [n for n, _ in entry.slots] != [*claim.slots]:
                raise ValueError(f"the flock backend's handover does not fit the claim on {', '.join(claim.names)}")
        return held

    def _fresh_tokens(self, claim: Claim) -> list[int]:
        """Tokens for `claim`, whose files are held: taken after the flocks, so each is
        greater than that of every earlier holder. On an error the files are let go."""
        try:
            # A copy made to size ([:]): the ticket keeps it for as long as the lease, and the
            # list a comprehension builds has room for four.
            return [self._tokens.next() for _ in claim.names][:]
        except BaseException:
            self._files.unlock(claim)
            raise
