"""The single-host backend: a lease is an flock() on `<lock dir>/NAME.lock`.

Invariant: a ticket holds its flocks exactly from a successful take to its drop, and every
successful take carries fresh tokens from the one durable counter; a take that fails, raises
or is cancelled holds nothing (see lockd.backend).

Within lockd the table decides who may hold what, so a take only ever waits for processes
that flock the same files directly. The kernel does not announce when they let go, so a
waiting take retries every `poll_interval`; this polling happens only while an outside
process holds a file.
"""

from __future__ import annotations

import trio
from lockd_client.protocol import Holder

from .backend import Blocked, LoseCallback
from .lockfiles import LockFiles
from .table import Ticket
from .tokens import TokenStore


class FlockBackend:
    """`lockd.backend.Backend` over LockFiles and a TokenStore, both owned by the caller."""

    name = "flock"

    def __init__(self, files: LockFiles, tokens: TokenStore, poll_interval: float = 0.01) -> None:
        """`poll_interval`: seconds between retries while an outside process holds a file.

        10 ms keeps a grant well under 100 ms after the outside holder lets go, at a cost of
        a few system calls per retry.
        """
        self._files = files
        self._tokens = tokens
        self._poll_interval = poll_interval

    def take_now(self, ticket: Ticket) -> list[int] | None:
        if not self._files.try_lock(ticket):
            return None
        try:
            return [self._tokens.next() for _ in ticket.names]
        except BaseException:
            self._files.unlock(ticket)
            raise

    async def take(self, ticket: Ticket) -> list[int]:
        """Retry `take_now` every poll interval until it succeeds; return its tokens.

        Raises Blocked at once if `ticket.wait` is false and the files are held outside lockd.
        Cancellation: only the sleeps between attempts are cancellable and nothing is held
        during them, so a cancelled take holds nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            tokens = self.take_now(ticket)
            if tokens is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return tokens
            if not ticket.wait:
                raise Blocked(f"{', '.join(ticket.names)}: held by a process outside lockd")
            await trio.sleep(self._poll_interval)

    def drop(self, ticket: Ticket) -> None:
        self._files.unlock(ticket)

    def outside_holders(self, name: str) -> list[Holder]:
        return self._files.outside_holders(name)

    async def run(self, lose: LoseCallback) -> None:
        """Nothing to watch: an flock lasts as long as its descriptor. Returns only by cancellation."""
        await trio.sleep_forever()
