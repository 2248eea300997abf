"""The interface between the lock table and whatever really holds the locks.

Invariant: a backend holds something for a claim only between a successful take (`take_now`
returning tokens, or `take` returning) and the matching `drop`; a take that fails, raises or
is cancelled leaves nothing held. A backend sees a request only as its `Claim`, immutable and
equal only to itself: never the lock table's tickets, sessions or parties. A held claim's
local locks are lock-file descriptors (`descriptors`) that the edge hands to the holder:
`drop` releases them for every copy only when told the holder let go (`unlock`), and
otherwise leaves them held for as long as the holder keeps its copies.

Who decides what: the lock table (lockd.table) keeps this daemon's requests, their owners,
deadlines and forced releases; whoever sees every competing request orders them all
(`orders_requests`):

- A backend whose locks are this host's alone (flock) leaves the order to the table: it is
  asked only for locks the table grants, and waits only for holders outside lockd (processes
  that flock the lock files themselves).
- A backend shared with other hosts (etcd) orders every request itself, in its one global
  queue (etcd's revision order): the table hands it each request on arrival, whatever this
  host holds or awaits, and the backend alone decides when it is granted, that a no-wait one
  is refused (`Blocked`), and whom it waits for. The table still ends a request at its
  deadline, and the backend then withdraws it from the queue (the take is cancelled).

Either way, the wait for a lock file that a process holds outside lockd follows one policy
(lockd.filewaits).

Across a re-exec of the daemon (SIGUSR2), `hand_over` describes what the backend holds for
the claims the table has not ended, and the new program's backend `adopt`s it before `run`:
nothing held is let go in between, and a claim being taken keeps its place.

Implementations: `flock.backend.FlockBackend` (one host, files in the lock directory) and
`etcd.backend.EtcdBackend` (many hosts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec
from lockd_client.errors import LockBusy
from lockd_client.protocol import Holder, Mode


class Requester(msgspec.Struct, frozen=True, gc=False):
    """Who asks for a claim: the identity its holder is shown as, to clients and other hosts,
    in its lease events, and in the handover. One record is shared by a client's claims
    without a process or label of their own; a claim with either has one of its own. Out of
    the collector's sight, as a claim is."""

    pid: int
    uid: int
    #: None for a process-tied claim: what the process's group is was never asked.
    gid: int | None
    command: str
    label: str | None


class Claim(msgspec.Struct, frozen=True, eq=False, kw_only=True, gc=False):
    """One request as a backend sees it: the names, the mode, whether it waits, who asks.
    Immutable, and equal only to itself: a backend keys what it holds for it by it.

    Out of the cyclic collector's sight (`gc=False`: 16 bytes less per lease, and one object
    less for its passes to visit): a claim holds strings, numbers, a dict of them and its
    requester, and so can never be part of a reference cycle.
    """

    names: tuple[str, ...]
    shared: bool
    #: Whether a take waits for holders outside lockd's table; if not, it raises `Blocked`.
    wait: bool
    #: Who asks, as other hosts are shown the holder (etcd); often shared with other claims.
    requester: Requester
    #: The names that are counting semaphores, with their slots (every user of a name agrees
    #: on them); `shared` is for the others. The claim takes one slot of each.
    slots: dict[str, int] = {}

    def shared_on(self, name: str) -> bool:
        """Whether `name` is taken shared: as a shared lock, or a slot of a semaphore, which
        others take alongside."""
        return self.shared or name in self.slots

    def mode_on(self, name: str) -> Mode:
        # The test of `shared_on`, inline: every lease event asks it of each name.
        return "shared" if self.shared or name in self.slots else "exclusive"


#: Called by a backend when it can no longer vouch for a held claim (e.g. its etcd lease
#: expired): the edge ends the lease and tells the client it is lost, with this reason.
LoseCallback = Callable[[Claim, str], None]

#: Called by a backend's `take` when the claim must wait for holders the table does not know
#: (a process flocking the file, a request on another host): the edge tells the client who.
BlockedCallback = Callable[[list[Holder]], None]


class Blocked(LockBusy):
    """The lock is held outside lockd and the claim does not wait."""


class BackendView(Protocol):
    """What the lock service reads of a backend: facts, and what it knows without asking
    anyone. Never blocks, never does I/O."""

    @property
    def name(self) -> str:
        """Shown to clients in `Welcome.backend`."""

    @property
    def orders_requests(self) -> bool:
        """Whether the backend orders requests itself, across everyone who shares its locks
        (see the module docstring): the lock table then hands it every request on arrival
        (`LockTable(ordered_by_backend=True)`), and `take` waits for this daemon's own earlier
        requests and holders too."""

    @property
    def leases_outlive_daemon(self) -> bool:
        """Whether a granted lease stays exclusive without the daemon, for as long as its
        holder keeps its copies of the lock-file descriptors (so the daemon stopping must not
        make a holder stop its work)."""

    @property
    def loss_notice(self) -> float | None:
        """The least time, in seconds, between a holder being told its lease is lost (or
        seeing the daemon go, if leases do not outlive it) and the backend letting another
        party have the lock; None if the backend sets no such bound. A holder must stop its
        work by then."""

    def place_of(self, claim: Claim) -> int | None:
        """Where `claim` stands in the queue of a backend that orders requests, as a number
        that sorts with the tokens of the others in it, holders and waiters (etcd: the revision
        of its keys, its token once granted); None if the backend does not order requests or
        has not queued the claim yet."""

    def outside_names(self) -> list[str]:
        """Names held or awaited outside this daemon that the backend knows of without asking
        anyone (another host's locks); not the ones only a look at the host would find."""

    def outside_slots(self, name: str) -> int | None:
        """The slots of `name` where another host uses it as a semaphore, as far as the
        backend knows without asking anyone; None for a lock, or where it knows of no use."""


class Backend(BackendView, Protocol):
    """A backend as the shell drives it: takes, drops, looks at the host, background duties."""

    def take_now(self, claim: Claim) -> list[int] | None:
        """Take every name of `claim` at once, all or none, without waiting.

        Returns one fencing token per name (in `claim.names` order), or None when that needs
        waiting: then the edge calls `take`. Raises a `LockdError` (e.g. `BadLockFile`) for a
        name that can never be taken; nothing is held then.
        """

    async def take(self, claim: Claim, blocked: BlockedCallback) -> list[int]:
        """Wait until every name of `claim` can be taken, then take them all; return tokens.

        If `claim.wait` is false and a name is held elsewhere (or, for a backend that orders
        requests, by anyone or anything ahead in its queue), raise `Blocked` at once. When
        waiting for holders outside the table (or for whoever is ahead in its queue), call
        `blocked` with them as soon as they are known (again when the backend learns of
        others); a take that does not wait never calls it.
        Cancellation: if this raises Cancelled, nothing is held for the claim (and a backend
        that orders requests has withdrawn it from its queue, or is about to).
        """

    def descriptors(self, claim: Claim) -> Sequence[int]:
        """The lock-file descriptors held for `claim`, one per name, then one per semaphore
        slot, to hand to its holder (none if none). They stay the backend's: the edge sends
        copies and never closes them."""

    def drop(self, claim: Claim, *, unlock: bool) -> None:
        """Give up what is held or being taken for `claim`. With `unlock` (its holder let go,
        or it was never handed out), the locks are released for every copy of their
        descriptors; without, only the backend's own hold ends. Never blocks; a no-op if
        nothing is held."""

    async def outside_holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        """Holders of `names` that lockd's table does not know (other tools, other hosts), in
        one look; a name nobody outside holds is left out. With `every_file`, also every
        other lock file in the lock directory that a process on this host holds, and every
        name another host holds.

        The look starts after the call (refusals rely on it to name current holders). It may
        take milliseconds; it must not block the event loop meanwhile. Cancellation: may
        finish a look under way before raising Cancelled.
        """

    def outside_waiters_of(self, names: list[str]) -> dict[str, list[Holder]]:
        """Requests for `names` queued outside this daemon (other hosts), in queue order."""

    async def run(self, lose: LoseCallback) -> None:
        """Background duties for as long as the daemon serves (keep-alives, watches).

        Runs in the server's nursery; cancelled at shutdown.
        """

    def unattended(self) -> float | None:
        """For how many more seconds what it holds stays safe if the daemon stops serving
        now (a re-exec's pause): until its etcd lease must be renewed; None: no bound."""

    def hand_over(self, claims: Sequence[Claim]) -> tuple[bytes, list[int]]:
        """What a re-executed daemon needs to go on with `claims` (every claim the table has not
        ended: held, or being taken), as this backend's own encoded state (msgpack via msgspec,
        referring to claims by their index in `claims`), and the descriptors that state names,
        which the caller keeps open across exec (it clears their O_CLOEXEC). Changes nothing:
        if the exec fails, the backend goes on as before. Called on the event loop, with no
        await between it and the exec."""

    def adopt(self, state: bytes, claims: Sequence[Claim]) -> None:
        """In the new program, before `run`: take over what `hand_over` described for `claims`
        (new Claim objects with the same fields, same order). Held claims are held
        (`descriptors`, `drop` work on them); a claim that was being taken is taken again by
        the caller through `take_now`/`take`, which resume with its existing place in the
        queue. Need not be called on the event loop. Raises ValueError (or a LockdError) if
        the state is not one this backend can adopt (wrong backend, other endpoints or prefix,
        malformed); nothing is adopted then."""


class BackendKind(Protocol):
    """What is known of a kind of backend (its class) without making one: for the check mode
    of a re-exec (lockd.reexec)."""

    orders_requests: bool

    @staticmethod
    def check_handover(state: bytes, claims: Sequence[Claim]) -> object:
        """Raise ValueError unless `state` is what `hand_over` gives for `claims`, as far as
        can be told without the backend's descriptors and connections."""


def holders_in_order(found: dict[str, list[Holder]], names: Iterable[str]) -> list[Holder]:
    """The holders in `found` (as `outside_holders_of` returns them) as one list, by `names`."""
    return [holder for name in names for holder in found.get(name, ())]
