"""The interface between the lock table and whatever really holds the locks.

Invariant: a backend holds something for a ticket only between a successful take (`take_now`
returning tokens, or `take` returning) and the matching `drop`; a take that fails, raises or
is cancelled leaves nothing held. Whether a backend lock is shared or exclusive is the
ticket's mode; the table has already made sure that tickets taken together are compatible.
A held ticket's local locks are lock-file descriptors (`descriptors`) that the edge hands to
the holder: `drop` releases them for every copy only when told the holder let go (`unlock`),
and otherwise leaves them held for as long as the holder keeps its copies.

Implementations: `flock_backend.FlockBackend` (one host, files in the lock directory) and
`etcd_backend.EtcdBackend` (many hosts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from lockd_client.errors import LockBusy
from lockd_client.protocol import Holder

from .table import Ticket

#: Called by a backend when it can no longer vouch for a held ticket (e.g. its etcd lease
#: expired): the edge ends the lease and tells the client it is lost, with this reason.
LoseCallback = Callable[[Ticket, str], None]

#: Called by a backend's `take` when the ticket must wait for holders the table does not know
#: (a process flocking the file, a request on another host): the edge tells the client who.
BlockedCallback = Callable[[list[Holder]], None]


class Blocked(LockBusy):
    """The lock is held outside lockd and the ticket does not wait."""


class Backend(Protocol):
    #: Shown to clients in `Welcome.backend`.
    name: str
    #: Whether a granted lease stays exclusive without the daemon, for as long as its holder
    #: keeps its copies of the lock-file descriptors (so the daemon stopping must not make a
    #: holder stop its work).
    leases_outlive_daemon: bool
    #: The least time, in seconds, between a holder being told its lease is lost (or seeing
    #: the daemon go, if leases do not outlive it) and the backend letting another party have
    #: the lock; None if the backend sets no such bound. A holder must stop its work by then.
    loss_notice: float | None

    def take_now(self, ticket: Ticket) -> list[int] | None:
        """Take every name of `ticket` at once, all or none, without waiting.

        Returns one fencing token per name (in `ticket.names` order), or None when that needs
        waiting: then the edge calls `take`. Raises a `LockdError` (e.g. `BadLockFile`) for a
        name that can never be taken; nothing is held then.
        """

    async def take(self, ticket: Ticket, blocked: BlockedCallback) -> list[int]:
        """Wait until every name of `ticket` can be taken, then take them all; return tokens.

        If `ticket.wait` is false and a name is held elsewhere, raise `Blocked` at once. When
        waiting for holders outside the table, call `blocked` with them as soon as they are
        known (again when the backend learns of others); a take that does not wait never
        calls it.
        Cancellation: if this raises Cancelled, nothing is held for the ticket.
        """

    def descriptors(self, ticket: Ticket) -> list[int]:
        """The lock-file descriptors held for `ticket`, one per name, to hand to its holder
        ([] if none). They stay the backend's: the edge sends copies and never closes them."""

    def drop(self, ticket: Ticket, *, unlock: bool) -> None:
        """Give up what is held or being taken for `ticket`. With `unlock` (its holder let go,
        or it was never handed out), the locks are released for every copy of their
        descriptors; without, only the backend's own hold ends. Never blocks; a no-op if
        nothing is held."""

    async def outside_holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        """Holders of `names` that lockd's table does not know (other tools, other hosts), in
        one look; a name nobody outside holds is left out. With `every_file`, also every
        other lock file in the lock directory that a process on this host holds.

        The look starts after the call (refusals rely on it to name current holders). It may
        take milliseconds; it must not block the event loop meanwhile. Cancellation: may
        finish a look under way before raising Cancelled.
        """

    def outside_waiters_of(self, names: list[str]) -> dict[str, list[Holder]]:
        """Requests for `names` queued outside this daemon (other hosts), in queue order."""

    def outside_names(self) -> list[str]:
        """Names held or awaited outside this daemon that the backend knows of without asking
        anyone (another host's locks); not the ones only a look at the host would find."""

    async def run(self, lose: LoseCallback) -> None:
        """Background duties for as long as the daemon serves (keep-alives, watches).

        Runs in the server's nursery; cancelled at shutdown.
        """


def holders_in_order(found: dict[str, list[Holder]], names: Iterable[str]) -> list[Holder]:
    """The holders in `found` (as `outside_holders_of` returns them) as one list, by `names`."""
    return [holder for name in names for holder in found.get(name, ())]
