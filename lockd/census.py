"""Who holds and who waits, counted as it changes: what the metrics and the daemon's status
line show, read in O(1) however many leases are live.

Invariants:
- One definition, the one `lockctl status` shows: a ticket is *held* once granted (HELD, or
  BREAKING until its holder lets go) and *waiting* from its arrival until its grant (WAITING
  in the table, or TAKING: being taken by the backend, which may be blocked by a process
  outside lockd, or queued in etcd). A ticket counts once per name in `held`/`waiting` (by
  its mode on that name) and once in `leases`/`requests`.
- `Tally` is told every ticket's arrival (`arrived`, right after `LockTable.acquire`), grant
  (`granted`, the table's `Granted` effect) and end (`ended`, its `Ended` effect): the
  transitions the service sees anyway, each exactly once per ticket.
- The oldest held and oldest waiting ticket are found without a scan: grants happen in time
  order and so do arrivals, so the first live entry of a queue of tickets in grant (arrival)
  order is the oldest. Tickets that left a state stay in its queue until they reach its front
  or a sweep, which runs once the queue holds a quarter more entries than live tickets (plus
  a few), as tickets come or end: a pointer per live ticket and state, amortized O(1) per
  transition, and ended tickets kept alive by their entries are never more than a quarter of
  the live ones (plus a few).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .table import BREAKING, HELD, TAKING, WAITING, LockTable, Ticket

#: The modes a lease holds a name in; a semaphore's slot is its own mode here.
MODES: Final = ("exclusive", "shared", "semaphore")
#: Queues are not swept below this many dead entries: a sweep would free next to nothing.
_MIN_SWEEP: Final = 64


def mode_of(ticket: Ticket, name: str) -> str:
    """`ticket`'s mode on `name`, as the metrics label it."""
    if ticket.slots is not None and name in ticket.slots:
        return "semaphore"
    return "shared" if ticket.shared else "exclusive"


#: The states of a ticket that holds its lease, and of one that waits for it.
_HELD_STATES: Final = (HELD, BREAKING)
_WAITING_STATES: Final = (WAITING, TAKING)


def is_held(ticket: Ticket) -> bool:
    return ticket.state in _HELD_STATES


def is_waiting(ticket: Ticket) -> bool:
    return ticket.state in _WAITING_STATES


@dataclass(slots=True)
class Census:
    """Who holds and awaits some names now: (ticket, name) pairs by mode, tickets, and since
    when (the table's clock) the longest held and the longest waiting of them have been so."""

    held: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    #: Tickets held and tickets waiting (a lease on two names counts once here).
    leases: int = 0
    requests: int = 0
    held_since: float | None = None
    waiting_since: float | None = None


class _Oldest:
    """Tickets in the order they entered a state, for the oldest one still in it."""

    __slots__ = ("entries", "live", "still")

    def __init__(self, still: Callable[[Ticket], bool]) -> None:
        self.entries: deque[Ticket] = deque()
        #: How many tickets are in the state.
        self.live = 0
        self.still = still

    def entered(self, ticket: Ticket) -> None:
        """`ticket` entered the state (and is in it: the caller tested `still`)."""
        if len(self.entries) >= self.live + (self.live >> 2) + _MIN_SWEEP:
            # Before counting `ticket`, which is not among the entries yet: so a state left
            # empty reaches the sweep with live == 0, and no entry is looked at.
            self._sweep()
        self.live += 1
        self.entries.append(ticket)

    def ended(self) -> None:
        """A ticket in the state has ended."""
        self.live -= 1
        if len(self.entries) >= self.live + (self.live >> 2) + _MIN_SWEEP:
            self._sweep()

    def _sweep(self) -> None:
        # A dead entry keeps its ticket (and what that refers to) alive: sweep them. With no
        # ticket in the state every entry is dead, and none is looked at: a lone client
        # acquiring and releasing in a loop leaves only dead entries, at every sweep.
        self.entries = deque(filter(self.still, self.entries)) if self.live else deque()

    def oldest(self) -> Ticket | None:
        entries = self.entries
        while entries and not self.still(entries[0]):
            entries.popleft()
        return entries[0] if entries else None


class Tally:
    """Every live ticket's census, kept as tickets arrive, are granted and end."""

    __slots__ = ("_held", "_waiting", "_by_held", "_by_waiting")

    def __init__(self) -> None:
        self._held = dict.fromkeys(MODES, 0)
        self._waiting = dict.fromkeys(MODES, 0)
        self._by_held = _Oldest(is_held)
        self._by_waiting = _Oldest(is_waiting)

    # `is_held` and `is_waiting`'s tests are made inline below: these run on every lease.

    def arrived(self, ticket: Ticket) -> None:
        """`ticket` was just made by `LockTable.acquire` (whatever its state: even one
        refused at once ends through `ended`)."""
        self._add(self._waiting, ticket, 1)
        if ticket.state in _WAITING_STATES:
            self._by_waiting.entered(ticket)
        else:
            self._by_waiting.live += 1  # refused at once: never in the state

    def granted(self, ticket: Ticket) -> None:
        self._add(self._waiting, ticket, -1)
        self._by_waiting.live -= 1  # a holder now: its entry here keeps nothing alive
        self._add(self._held, ticket, 1)
        if ticket.state in _HELD_STATES:
            self._by_held.entered(ticket)
        else:
            self._by_held.live += 1  # ended since (its Ended effect follows)

    def ended(self, ticket: Ticket) -> None:
        """`ticket` ended: it was held if it had been granted (it has tokens), else waiting."""
        if ticket.tokens is not None:
            self._add(self._held, ticket, -1)
            self._by_held.ended()
        else:
            self._add(self._waiting, ticket, -1)
            self._by_waiting.ended()

    def census(self) -> Census:
        """Every live ticket's census. O(1), amortized."""
        held, waiting = self._by_held.oldest(), self._by_waiting.oldest()
        return Census(
            dict(self._held), dict(self._waiting), self._by_held.live, self._by_waiting.live,
            None if held is None else held.since, None if waiting is None else waiting.since,
        )

    @staticmethod
    def _add(counts: dict[str, int], ticket: Ticket, delta: int) -> None:
        if ticket.slots is None:  # one mode for all its names (`mode_of`)
            counts["shared" if ticket.shared else "exclusive"] += delta * len(ticket.names)
        else:
            for name in ticket.names:
                counts[mode_of(ticket, name)] += delta


def name_census(table: LockTable, name: str) -> Census:
    """The census of the tickets on `name`. Costs a visit of each of them."""
    census = Census()
    for ticket in table.queue(name):
        mode = mode_of(ticket, name)
        since = ticket.since
        if is_held(ticket):
            census.held[mode] += 1
            census.leases += 1
            if census.held_since is None or since < census.held_since:
                census.held_since = since
        else:
            census.waiting[mode] += 1
            census.requests += 1
            if census.waiting_since is None or since < census.waiting_since:
                census.waiting_since = since
    return census
