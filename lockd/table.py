"""The lock table: who holds which named lock, who waits, in what order. Pure logic.

Who orders the requests depends on the backend, and the table has a mode for each:

- **The table orders them** (the flock backend; `LockTable()`): the backend's locks are
  this host's alone, so the table's arrival order is the only order. Invariants 1-4 below
  are the table's, and the backend is only ever asked for locks the table agrees on.
- **The backend orders them** (the etcd backend; `LockTable(ordered_by_backend=True)`):
  requests on other hosts compete for the same locks, and only the backend sees them all
  (etcd's revision order is the one global queue). The table then grants, refuses and
  orders nothing on its own view: every ticket goes to the backend the moment it arrives
  (TAKING, effect `Take`), the backend decides when it holds (`taken`) or that a no-wait
  request is refused (`take_blocked`), and invariants 1-4 are the backend's to keep, across
  hosts. What stays the table's is the rest: owners, deadlines (a TAKING ticket waits in the
  backend's queue and times out there), forced releases, departures, tokens, and the
  accounting of invariant 5. A ticket counts as waiting from its arrival until `taken`.

Invariants (`LockTable.check` asserts those of the table's mode; the tests call it after
every step):

1. Per name, the tickets holding it (TAKING or HELD) are one exclusive ticket or only shared
   ones; on a counting semaphore of N slots, at most N tickets, each holding one slot. A name is
   a lock or a semaphore of one N for as long as anyone holds or awaits it: a request that
   says otherwise is refused at once (`Reason.MISMATCH`), in either of the table's modes.
2. FIFO per name, no barging: a ticket is granted only when every ticket that arrived before it
   on each of its names, holding or waiting, is compatible with it (both shared). So a shared request
   waits behind a waiting exclusive one, and an exclusive one must be first in line. On a
   semaphore, a ticket is granted only when fewer than N tickets that arrived before it hold or
   await the name: a later ticket may be granted while an earlier one waits for another of its
   names, but only into a slot that the earlier one will not need.
3. A multi-name ticket joins all its queues in one step and is granted on all of them in one
   step. Queue order is therefore one global arrival order, and the oldest waiting ticket is
   only ever blocked by holders: no deadlock, whatever order clients name their locks in.
4. At rest (after every public call returns), no waiting ticket is grantable.
5. The per-name entries and the per-owner index hold exactly the live tickets; no empty entry
   lingers, so memory follows the live tickets and nothing else. A name's entry is its queue,
   or, where one ticket holds the name and none waits for it, possibly that ticket itself. The
   deadline heap also keeps entries of tickets granted or ended since, but sweeps them before
   they outnumber the rest.
6. Where the backend orders requests: no ticket is ever WAITING; every live ticket stands
   among the holders of each of its lines, in arrival order, from arrival to end.

A grant has two steps. The table lets the ticket through (WAITING → TAKING, effect `Take`:
at once where the backend orders requests); the backend then obtains the real lock (an
flock, an etcd key) and the edge reports `taken` (TAKING → HELD, effect `Granted`). Where the
table orders requests, a TAKING ticket already counts as a holder here, so the backend is only
ever asked for locks the table agrees on. Every `Take` is followed by exactly
one `Drop` of the same ticket, whatever ends it; the Drop says how it ended (`Ending`), since
the owner's work may outlive a lease the owner did not release: only a released one is let go
of for everyone at once. And every ticket, granted or not, ends with exactly one `Ended`,
after whatever else its end causes for it (Refused, Lost, Drop): the one place the edge lets
go of its own records of the ticket.

A forced release does not end a lease: it tells the owner (`Lost`) and moves it HELD →
BREAKING, still a holder, until the owner says it has stopped its work (`release`), goes
away (`drop_owner`, `end`: then what it handed its work keeps the lock until that work ends),
or its grace passes (`expire`). So nobody is granted a lock while the work of a broken holder
still cleans up, and nobody waits for it for ever.

The table owns no clock and does no I/O: callers pass `now` and deadlines as plain numbers
(any monotonic scale) and carry out the returned effects in order. Every method runs to
completion without yielding, so under trio it is atomic with no lock of its own.

A table can be handed over (a daemon that re-executes itself): what it decides and reports
depends only on its live tickets, the order each name's holders were let through, and its
arrival counter, which `tickets()` and `next_arrival` give out and `LockTable.restored` takes
back, checking the invariants as it rebuilds. Only the order of `names()` is not kept.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from enum import Enum
from typing import TypeVar, cast

import msgspec

_K = TypeVar("_K", bound=Hashable)


class State(Enum):
    WAITING = "waiting"
    TAKING = "taking"
    HELD = "held"
    BREAKING = "breaking"
    ENDED = "ended"


# The daemon spells the states with these: on Python 3.11 every `State.X` goes through
# EnumType.__getattr__, over ten times the cost of a global, and a lock cycle tests the state
# a dozen times (3.12 made that lookup cheap: drop these once 3.11 is no longer supported).
WAITING, TAKING, HELD, BREAKING, ENDED = State.WAITING, State.TAKING, State.HELD, State.BREAKING, State.ENDED


class Ticket:
    """One acquire request: queued, then held, then ended. Identity is the object itself.

    The table sets `state`, `seq` and `tokens` as the ticket goes (and `deadline`, `since`).
    A ticket rebuilt for `LockTable.restored` is made with the constructor and has those set
    by whoever rebuilds it, as the table it came from had them.
    """

    __slots__ = (
        "owner", "names", "shared", "slots", "wait", "deadline", "info", "since", "state", "tokens", "seq",
    )

    def __init__(
        self,
        owner: Hashable,
        names: tuple[str, ...],
        shared: bool,
        wait: bool,
        deadline: float | None,
        info: object,
        since: float,
        slots: dict[str, int] | None = None,
    ) -> None:
        self.owner = owner
        self.names = names
        #: The mode on the names that are locks.
        self.shared = shared
        #: The names that are semaphores, with their slots (None: none is).
        self.slots = slots
        self.wait = wait
        self.deadline = deadline
        #: Whatever the edge wants shown for this ticket (pid, uid, command...). Opaque here.
        self.info = info
        #: `now` at request time; replaced by `now` at grant time.
        self.since = since
        self.state = WAITING
        #: One per name, from the backend, once HELD.
        self.tokens: list[int] | None = None
        #: Arrival order, set by the table from 1 on when it takes the ticket in (0 until then).
        self.seq = 0

    @property
    def holding(self) -> bool:
        return self.state is TAKING or self.state is HELD or self.state is BREAKING

    def slots_on(self, name: str) -> int | None:
        """The slots of `name` if this ticket takes it as a semaphore; None for a lock."""
        return self.slots.get(name) if self.slots else None

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        if self.slots:
            mode += f" slots={self.slots}"
        return f"<Ticket {'+'.join(self.names)} {mode} {self.state.value} owner={self.owner!r}>"


# --- effects: what the edge must do, in order -------------------------------------------------
#
# Effects are structs, made in C: a lease gives four, and an __init__ of Python is a call of
# Python each. They compare by kind and fields (tickets by identity). The collector tracks
# them: through its ticket's owner an effect can lead back to the service's queue holding it.


class Effect(msgspec.Struct):
    ticket: Ticket


class Take(Effect):
    """Obtain the backend lock on every name of `ticket`, in its mode, then call `taken`.

    If it cannot be had at once and `ticket.wait` is false, call `take_blocked` instead.
    """


class Ending(Enum):
    """How a ticket that held (or was being taken) ended: what its `Drop` may do."""

    #: Its owner let go, or it was never granted: nobody works under it, so the lock may be
    #: released for everyone at once.
    RELEASED = "released"
    #: Its owner went away, or the daemon stopped serving it, without letting go: whatever
    #: the owner handed its work keeps the lock until that work ends.
    ABANDONED = "abandoned"
    #: Broken by force, and its owner did not let go within the grace: released under it.
    OVERDUE = "overdue"


class Drop(Effect):
    """Give up whatever the backend holds or is still trying to obtain for `ticket`, as
    `ending` allows."""

    ending: Ending


class Ended(Effect):
    """`ticket` has ended (it is ENDED): forget whatever is kept for it outside the table."""


class Granted(Effect):
    """Tell the ticket's owner it holds the lease, with `ticket.tokens`."""


class Queued(Effect):
    """Tell the ticket's owner it waits, and for whom (`blockers`: the holders in its way, as
    `LockTable.blockers` gives them)."""

    blockers: list[Ticket]


class Refused(Effect):
    """Tell the owner its request failed (`reason`); `blockers` are the holders in its way.
    For `Reason.MISMATCH`, `name` is the first of its names it disagrees on, and
    `LockTable.slots_of(name)` what that name is."""

    reason: Reason
    blockers: list[Ticket]
    name: str | None = None


class Lost(Effect):
    """Tell the owner its held lease ended without it asking: `reason` says why."""

    reason: str


class Reason(Enum):
    """Why a request failed (`Refused.reason`)."""

    BUSY = "busy"
    TIMEOUT = "timeout"
    #: A name is a semaphore of another number of slots than the ticket says, or a lock
    #: where it says semaphore (or the reverse).
    MISMATCH = "mismatch"


#: The `waiting` of every line where nobody waits: shared, so never changed.
_NOBODY: OrderedDict[Ticket, None] = OrderedDict()


class _Queue:
    """One name's queue: `holders` (TAKING, HELD or BREAKING) and `waiting`, both in arrival
    order. What may be granted depends on what the name is: a lock (`_Line`) or a counting
    semaphore (`_SlotLine`)."""

    __slots__ = ("holders", "waiting")

    #: None for a lock; a semaphore's number of slots.
    slots: int | None

    def __init__(self) -> None:
        self.holders: dict[Ticket, None] = {}
        # Not a dict: a dict deleted from the front keeps the holes until it next grows, so
        # finding its first entry would cost O(tickets served) and draining a line O(n²).
        # Made when a ticket first waits, and let go when none does: most lines never have a
        # waiting ticket, and an empty OrderedDict costs a third of a held lease's memory.
        self.waiting: OrderedDict[Ticket, None] = _NOBODY

    def __bool__(self) -> bool:
        return bool(self.holders or self.waiting)

    def _wait(self, ticket: Ticket) -> None:
        """Put `ticket` at the back of `waiting`."""
        if self.waiting is _NOBODY:
            self.waiting = OrderedDict()
        self.waiting[ticket] = None

    def _unwait(self, ticket: Ticket) -> None:
        """Take `ticket` out of `waiting`."""
        waiting = self.waiting
        del waiting[ticket]
        if not waiting:
            self.waiting = _NOBODY


class _Line(_Queue):
    """A lock's queue, kept so that every FIFO question is answered without a scan.

    Every holder is ahead of every waiting exclusive ticket (a later holder would have been
    granted against FIFO), so "is anything incompatible ahead of a waiting ticket" only ever
    needs the holders' modes and the waiting tickets ahead of it — and the counts answer it
    for a newcomer.
    """

    __slots__ = ("exclusive_holders", "exclusive_waiting")

    slots = None

    def __init__(self) -> None:
        super().__init__()
        self.exclusive_holders = 0
        self.exclusive_waiting = 0

    def admits_newcomer(self, shared: bool) -> bool:
        """Could a ticket joining the back of this line be granted here now?"""
        if shared:
            return not (self.exclusive_holders or self.exclusive_waiting)
        return not (self.holders or self.waiting)

    def admits(self, ticket: Ticket) -> bool:
        """Could waiting `ticket`, already in this line, be granted here now?"""
        if not ticket.shared:
            return not self.holders and next(iter(self.waiting)) is ticket
        if self.exclusive_holders:
            return False
        if not self.exclusive_waiting:
            return True
        for other in self.waiting:
            if other is ticket:
                return True
            if not other.shared:
                return False
        raise AssertionError(f"{ticket} is not waiting in this line")

    def admitted(self) -> list[Ticket]:
        """The waiting tickets this line admits, in queue order: those ahead of the first
        waiting exclusive one, or that one alone if it is first and nobody holds. Costs the
        tickets it returns plus one."""
        if self.exclusive_holders:
            return []
        admitted: list[Ticket] = []
        for ticket in self.waiting:
            if not ticket.shared:
                if not admitted and not self.holders:
                    admitted.append(ticket)
                break
            admitted.append(ticket)
        return admitted

    def add_waiting(self, ticket: Ticket) -> None:
        self._wait(ticket)
        if not ticket.shared:
            self.exclusive_waiting += 1

    def add_holder(self, ticket: Ticket) -> None:
        self.holders[ticket] = None
        if not ticket.shared:
            self.exclusive_holders += 1

    def remove(self, ticket: Ticket) -> None:
        if ticket in self.holders:
            del self.holders[ticket]
            if not ticket.shared:
                self.exclusive_holders -= 1
        else:
            self._unwait(ticket)
            if not ticket.shared:
                self.exclusive_waiting -= 1

    def promote(self, ticket: Ticket) -> None:
        """Move `ticket` from waiting to holding."""
        self._unwait(ticket)
        if not ticket.shared:
            self.exclusive_waiting -= 1
        self.add_holder(ticket)


class _SlotLine(_Queue):
    """A counting semaphore's queue. Every ticket on it takes one slot, whatever its mode on
    its other names; its place in the line (the holders, then the waiting tickets ahead of
    it) decides: below `slots`, admitted. A grant keeps every other ticket's place."""

    __slots__ = ("slots",)

    slots: int

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def admits_newcomer(self, shared: bool) -> bool:
        return len(self.holders) + len(self.waiting) < self.slots

    def admits(self, ticket: Ticket) -> bool:
        free = self.slots - len(self.holders)
        for place, other in enumerate(self.waiting):
            if place >= free:
                return False
            if other is ticket:
                return True
        raise AssertionError(f"{ticket} is not waiting in this line")

    def admitted(self) -> list[Ticket]:
        """The waiting tickets that hold a place below `slots`, in queue order."""
        return list(itertools.islice(self.waiting, max(0, self.slots - len(self.holders))))

    def add_waiting(self, ticket: Ticket) -> None:
        self._wait(ticket)

    def add_holder(self, ticket: Ticket) -> None:
        self.holders[ticket] = None

    def remove(self, ticket: Ticket) -> None:
        if ticket in self.holders:
            del self.holders[ticket]
        else:
            self._unwait(ticket)

    def promote(self, ticket: Ticket) -> None:
        self._unwait(ticket)
        self.holders[ticket] = None


def _count(counts: dict[_K, int], key: _K, delta: int) -> None:
    """Add `delta` to `counts[key]`, leaving no entry at zero (invariant 5)."""
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


def _arrival(ticket: Ticket) -> int:
    return ticket.seq


#: The states in which a ticket's deadline still matters.
_TIMED = (WAITING, TAKING, BREAKING)


def _due(entry: tuple[float, int, Ticket]) -> bool:
    """Whether a deadline heap entry still counts: its ticket is in a timed state and still
    has this deadline (a broken lease's grace replaced its request's deadline)."""
    ticket = entry[2]
    return ticket.state in _TIMED and ticket.deadline == entry[0]
#: The deadline heap is not swept below this size: a sweep would free next to nothing.
_MIN_SWEEP = 64


def _check_handed_over(name: str, line: _Line | _SlotLine) -> None:
    """Raise ValueError unless `line`, rebuilt where the table orders requests, keeps
    invariants 1 and 2: its holders can hold at once, and none was let through ahead of an
    earlier ticket it is in the way of. O(tickets on `line`)."""
    holders = list(line.holders)
    if isinstance(line, _SlotLine):
        if len(holders) > line.slots:
            raise ValueError(f"{holders} hold {name!r}, a semaphore of {line.slots} slots")
        last = max(holders, key=_arrival, default=None)
        for place, ticket in enumerate(line.waiting):
            if last is None or ticket.seq > last.seq:
                break
            if len(holders) + place >= line.slots:
                raise ValueError(f"{last} holds a slot of {name!r} that {ticket}, which arrived earlier, waits for")
        return
    if line.exclusive_holders and len(holders) > 1:
        raise ValueError(f"{holders} hold {name!r} at once, not all shared")
    first = next(iter(line.waiting), None)
    first_exclusive = next((t for t in line.waiting if not t.shared), None)
    for holder in holders:
        earlier = first_exclusive if holder.shared else first
        if earlier is not None and earlier.seq < holder.seq:
            raise ValueError(f"{holder} holds {name!r} ahead of {earlier}, which arrived earlier")


def _check_none_grantable(lines: Mapping[str, _Line | _SlotLine]) -> None:
    """Raise ValueError if a waiting ticket in `lines` could be granted (invariant 4).
    O(tickets the lines admit)."""
    admitted: dict[Ticket, int] = {}
    for line in lines.values():
        for ticket in line.admitted():
            admitted[ticket] = count = admitted.get(ticket, 0) + 1
            if count == len(ticket.names):
                raise ValueError(f"{ticket} waits though it could be granted")


#: What the table keeps for a name: its queue, or the ticket that holds it alone (invariant 5).
_Entry = Ticket | _Line | _SlotLine
#: `LockTable._lines` where only queues can be met: on the names of a waiting ticket.
_Queues = dict[str, _Line | _SlotLine]


def _holders(entry: _Entry) -> Iterable[Ticket]:
    """The tickets holding a name, as `LockTable.holders` gives them, from its entry."""
    return (entry,) if isinstance(entry, Ticket) else entry.holders


def _waiting(entry: _Entry) -> Iterable[Ticket]:
    """The tickets waiting for a name, as `LockTable.waiters` gives them, from its entry."""
    return () if isinstance(entry, Ticket) else entry.waiting


def _slots(entry: _Entry, name: str) -> int | None:
    """The slots of `name`, from its entry: None unless it is a semaphore."""
    return entry.slots_on(name) if isinstance(entry, Ticket) else entry.slots


def _line_with(name: str, holder: Ticket) -> _Line | _SlotLine:
    """A queue for `name` with `holder`, which holds it alone, in it."""
    slots = holder.slots_on(name)
    line = _Line() if slots is None else _SlotLine(slots)
    line.add_holder(holder)
    return line


class LockTable:
    """Holders and FIFO waiters of named locks, exclusive or shared. See the module docstring."""

    def __init__(self, *, ordered_by_backend: bool = False) -> None:
        """`ordered_by_backend`: the backend orders requests (it says so in
        `Backend.orders_requests`), and the table leaves every decision of order to it."""
        self.ordered_by_backend = ordered_by_backend
        #: The state of a ticket that waits for its turn, and is counted as waiting.
        self._queued = TAKING if ordered_by_backend else WAITING
        #: Name → its entry (invariant 5). A waiting ticket stands in the queue of each of its
        #: names, so every name of a waiting ticket has a queue, not a ticket, as its entry.
        self._lines: dict[str, _Entry] = {}
        self._next_arrival = 1
        self._owners: dict[Hashable, dict[Ticket, None]] = {}
        # Counts of waiting tickets (`_queued`), kept as they change so limits cost O(1) to check.
        self._waiting_by_owner: dict[Hashable, int] = {}
        self._waiting_by_name: dict[str, int] = {}
        # Entries of tickets no longer WAITING or TAKING stay until they reach the top or a sweep.
        # Tickets due at once are served in arrival order: the entry's second field is the seq.
        self._deadlines: list[tuple[float, int, Ticket]] = []
        self._sweep_at = _MIN_SWEEP

    # --- requests -----------------------------------------------------------------------------

    def acquire(
        self,
        owner: Hashable,
        names: Iterable[str],
        *,
        shared: bool = False,
        wait: bool = True,
        deadline: float | None = None,
        now: float,
        info: object = None,
        slots: dict[str, int] | None = None,
    ) -> tuple[Ticket, list[Effect]]:
        """Request every name in `names` together: one slot of each name in `slots` (a
        counting semaphore of that many slots), the others in the mode `shared` says.

        `wait=False` fails at once with Refused("busy") unless the table can grant now;
        otherwise the ticket waits until granted or until `deadline` passes (`expire`).
        Where the backend orders requests, the ticket goes to it at once whatever the table
        holds (`Take`), and the backend refuses a no-wait one (`take_blocked`).
        Duplicate names count once. Names are not validated here: that is the edge's job.
        """
        unique = tuple(dict.fromkeys(names))
        if isinstance(names, tuple) and unique == names:
            unique = names  # the caller's tuple: one fewer kept per ticket
        if not unique:
            raise ValueError("acquire needs at least one name")
        ticket = Ticket(owner, unique, shared, wait, deadline, info, now, slots or None)
        lines = self._lines
        grantable = True
        ordered = self.ordered_by_backend
        for name in unique:
            entry = lines.get(name)
            if entry is not None:
                # Read through a queue of the one holder, not kept: a refusal changes nothing.
                line = _line_with(name, entry) if isinstance(entry, Ticket) else entry
                if line.slots != ticket.slots_on(name):
                    ticket.state = ENDED
                    return ticket, [Refused(ticket, Reason.MISMATCH, list(line.holders), name), Ended(ticket)]
                if grantable and not ordered and not line.admits_newcomer(shared):
                    grantable = False
        if not wait and not grantable:
            ticket.state = ENDED
            return ticket, [Refused(ticket, Reason.BUSY, self._blockers(ticket)), Ended(ticket)]
        ticket.seq = self._next_arrival
        self._next_arrival += 1
        self._owners.setdefault(owner, {})[ticket] = None
        # Even a ticket granted at once needs its deadline: it stays TAKING for as long as the
        # backend cannot take the lock (held outside lockd, or by another host).
        if deadline is not None:
            self._push_deadline(ticket, deadline)
        if grantable:
            for name in unique:
                if lines.setdefault(name, ticket) is not ticket:  # else alone on the name
                    self._line_for(name, ticket).add_holder(ticket)
            ticket.state = TAKING
            if self.ordered_by_backend:
                self._count_waiting(ticket, 1)  # in the backend's queue until `taken`
            return ticket, [Take(ticket)]
        for name in unique:
            self._line_for(name, ticket).add_waiting(ticket)
        self._count_waiting(ticket, 1)
        return ticket, [Queued(ticket, self._blockers(ticket))]

    def taken(self, ticket: Ticket, tokens: list[int], *, now: float) -> list[Effect]:
        """The backend now holds every name of `ticket`: the lease is granted."""
        if ticket.state is not TAKING:
            return []  # ended while the backend worked; its Drop is already on its way
        if self.ordered_by_backend:
            self._count_waiting(ticket, -1)
        ticket.state = HELD
        ticket.tokens = tokens
        ticket.since = now
        return [Granted(ticket)]

    def take_blocked(self, ticket: Ticket) -> list[Effect]:
        """The backend cannot take the locks at once (held outside lockd's table, or, where
        the backend orders requests, by anyone ahead in its queue).

        A waiting ticket stays TAKING while the edge keeps trying; a no-wait one fails busy.
        """
        if ticket.state is not TAKING or ticket.wait:
            return []
        return [Refused(ticket, Reason.BUSY, self._blockers(ticket)), *self._end(ticket, Ending.RELEASED)]

    def release(self, ticket: Ticket) -> list[Effect]:
        """End a lease or withdraw a waiting request, at its owner's wish (for a broken lease:
        its owner has stopped its work). Idempotent."""
        if ticket.state is ENDED:
            return []
        return self._end(ticket, Ending.RELEASED)

    def lose(self, ticket: Ticket, reason: str, ending: Ending = Ending.ABANDONED) -> list[Effect]:
        """End a lease against its owner's wish (the backend lost it, the daemon stops, a
        forced release: `ending`).

        Only a HELD ticket yields `Lost`: one not yet granted ends with no word to its owner,
        so a caller ending those must answer the pending request itself.
        """
        if ticket.state is ENDED:
            return []
        effects: list[Effect] = [Lost(ticket, reason)] if ticket.state is HELD else []
        return effects + self._end(ticket, ending)

    def force_release(self, name: str, reason: str, *, grace_until: float) -> tuple[int, list[Effect]]:
        """Break every held lease on `name`: each owner is told (`Lost`) and has until
        `grace_until` to stop its work and let go (see the module docstring). A lease already
        broken is ended at once: asked twice, the caller will not wait. Returns how many
        leases were broken, and the effects."""
        entry = self._lines.get(name)
        held = (t for t in _holders(entry) if t.state is HELD or t.state is BREAKING) if entry is not None else ()
        broken = sorted(held, key=_arrival)
        effects: list[Effect] = []
        for ticket in broken:
            if ticket.state is BREAKING:
                effects += self._end(ticket, Ending.RELEASED)
            else:
                ticket.state = BREAKING
                ticket.deadline = grace_until
                self._push_deadline(ticket, grace_until)
                effects.append(Lost(ticket, reason))
        return len(broken), effects

    def drop_owner(self, owner: Hashable) -> list[Effect]:
        """The owner is gone (connection closed, process exited): end all its tickets."""
        return self.end(self.tickets_of(owner))

    def end(self, tickets: list[Ticket]) -> list[Effect]:
        """End every ticket in `tickets` at once, silently, as abandoned by their owner (a
        broken one too: its owner may have been cut off before it heard, and works on).

        They are all removed before anything is granted, so none of them is granted on its
        way out (one of them waiting behind another would be).
        """
        tickets = [t for t in dict.fromkeys(tickets) if t.state is not ENDED]
        effects: list[Effect] = [Drop(t, Ending.ABANDONED) for t in tickets if t.holding]
        effects += [Ended(t) for t in tickets]
        for ticket in tickets:
            self._remove(ticket)
        return effects + self._grant_waiting(Counter(n for t in tickets for n in t.names))

    def reassign(self, ticket: Ticket, owner: Hashable) -> None:
        """Make `owner` the one whose departure ends `ticket` (process-tied leases)."""
        if ticket.state is ENDED or ticket.owner == owner:
            return
        waiting = ticket.state is self._queued
        if waiting:
            self._count_waiting(ticket, -1)
        self._unindex_owner(ticket)
        ticket.owner = owner
        self._owners.setdefault(owner, {})[ticket] = None
        if waiting:
            self._count_waiting(ticket, 1)

    def expire(self, now: float) -> list[Effect]:
        """Fail every waiting or taking ticket whose deadline is at or before `now`, and end
        every broken one whose grace has passed: in deadline order, those due at once in
        arrival order."""
        effects: list[Effect] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            ticket = entry[2]
            if not _due(entry):
                continue
            if ticket.state is BREAKING:
                effects += self._end(ticket, Ending.OVERDUE)
            else:
                effects.append(Refused(ticket, Reason.TIMEOUT, self._blockers(ticket)))
                effects += self._end(ticket, Ending.RELEASED)
        return effects

    def next_deadline(self) -> float | None:
        """The earliest deadline of a ticket still WAITING, TAKING or BREAKING, or None."""
        heap = self._deadlines
        while heap and not _due(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # --- queries ------------------------------------------------------------------------------

    def queue(self, name: str) -> list[Ticket]:
        """Everyone on `name`: `holders(name)` then `waiters(name)`."""
        entry = self._lines.get(name)
        return [*_holders(entry), *_waiting(entry)] if entry is not None else []

    def holders(self, name: str) -> list[Ticket]:
        """Tickets holding `name` (TAKING, HELD or BREAKING), in the order they were let
        through; where the backend orders requests, every ticket on `name` in arrival order,
        the TAKING ones still waiting in the backend's queue."""
        entry = self._lines.get(name)
        return list(_holders(entry)) if entry is not None else []

    def waiters(self, name: str) -> list[Ticket]:
        """Tickets waiting in the table for `name`, in arrival (= queue) order; none where the
        backend orders requests."""
        entry = self._lines.get(name)
        return list(_waiting(entry)) if entry is not None else []

    def slots_of(self, name: str) -> int | None:
        """The slots of `name` if it is a semaphore someone holds or awaits; else None."""
        entry = self._lines.get(name)
        return _slots(entry, name) if entry is not None else None

    def names(self) -> list[str]:
        """Every name that is held or waited on."""
        return list(self._lines)

    def tickets_of(self, owner: Hashable) -> list[Ticket]:
        """`owner`'s live tickets, in arrival order (not the order they came to it: that
        depends on when each was reassigned, which a handover does not carry)."""
        return sorted(self._owners.get(owner, ()), key=_arrival)

    def waiting_of(self, owner: Hashable) -> int:
        """How many of `owner`'s tickets wait for their turn: not yet let through by the
        table (WAITING), or, where the backend orders requests, not yet granted by it
        (TAKING). O(1)."""
        return self._waiting_by_owner.get(owner, 0)

    def waiting_count(self) -> int:
        """How many tickets wait for their turn (as `waiting_of` counts them), in all. O(owners)."""
        return sum(self._waiting_by_owner.values())

    def waiting_on(self, name: str) -> int:
        """How many tickets wait for their turn (as `waiting_of` counts them) on `name`. O(1)."""
        return self._waiting_by_name.get(name, 0)

    def blockers(self, ticket: Ticket) -> list[Ticket]:
        """The holders in `ticket`'s way: on each of its names, those it cannot share with,
        and all of them where it waits behind an exclusive request (which waits for them).
        It may also wait behind earlier waiters for names nobody holds. Where the backend
        orders requests, the holders are the granted tickets (HELD, BREAKING), and the table
        does not know the backend's queue: a shared ticket still waiting is taken to wait
        behind an exclusive request (else the backend would have granted it), so all of them."""
        return self._blockers(ticket)

    def __len__(self) -> int:
        """How many tickets are live."""
        return sum(len(tickets) for tickets in self._owners.values())

    # --- handover -----------------------------------------------------------------------------

    def tickets(self) -> list[Ticket]:
        """Every live ticket, as `restored` takes them: the holders (TAKING, HELD, BREAKING) in
        an order that keeps the order each name's holders were let through (where that
        leaves a choice, arrival order), then the waiting ones in arrival order. Changes
        nothing. O(n log n)."""
        # The holders of each name are in the order they were let through, and a ticket is
        # let through on all its names at once: one order of all the holders keeps every
        # name's, and ordering the names' chains together finds one.
        later: dict[Ticket, list[Ticket]] = {}
        before: dict[Ticket, int] = {}
        for entry in self._lines.values():
            previous = None
            for ticket in _holders(entry):
                if previous is None:
                    before.setdefault(ticket, 0)
                else:
                    later.setdefault(previous, []).append(ticket)
                    before[ticket] = before.get(ticket, 0) + 1
                previous = ticket
        ready = [(ticket.seq, ticket) for ticket, count in before.items() if not count]
        heapq.heapify(ready)
        tickets: list[Ticket] = []
        while ready:
            ticket = heapq.heappop(ready)[1]
            tickets.append(ticket)
            for after in later.get(ticket, ()):
                before[after] -= 1
                if not before[after]:
                    heapq.heappush(ready, (after.seq, after))
        waiting = (t for owned in self._owners.values() for t in owned if t.state is WAITING)
        return tickets + sorted(waiting, key=_arrival)

    @property
    def next_arrival(self) -> int:
        """The `seq` the next ticket the table takes in will have."""
        return self._next_arrival

    @classmethod
    def restored(
        cls, tickets: Iterable[Ticket], *, ordered_by_backend: bool, next_arrival: int | None = None
    ) -> LockTable:
        """A table that holds `tickets`, as a table of this mode gave them out (`tickets()`,
        then rebuilt: see `Ticket`), and from now on decides and reports as that one would
        have: each name's holders in the order they come in `tickets`, its waiting tickets in
        arrival (`seq`) order, and the next ticket taken in numbered `next_arrival`, the old
        table's (tickets that ended since may have moved it past every live one; by default,
        one past the largest `seq`). The tickets become the new table's, which changes them
        from now on. O(n log n).

        Raises ValueError, saying what is wrong, if the tickets could not all be live together
        in a table of this mode: one ENDED (or WAITING, where the backend orders requests), a
        `seq` below 1 or given twice or not below `next_arrival`, no names or a name twice, a
        broken lease with no grace, tickets that disagree on what a name is, holders that
        exclude each other, a holder let through ahead of an earlier ticket it is in the way
        of (where the backend orders requests: out of arrival order), or a waiting ticket that
        could be granted. A broken handover is refused, never served.
        """
        table = cls(ordered_by_backend=ordered_by_backend)
        tickets = list(tickets)
        arrived: dict[int, Ticket] = {}
        for ticket in tickets:
            if not (ticket.holding or ticket.state is WAITING and not ordered_by_backend):
                raise ValueError(f"{ticket} cannot be live in this table")
            if ticket.seq < 1:
                raise ValueError(f"{ticket} has no place in the arrival order (seq {ticket.seq})")
            other = arrived.setdefault(ticket.seq, ticket)
            if other is not ticket:
                raise ValueError(f"{ticket} and {other} have the same seq {ticket.seq}")
            owned = table._owners.setdefault(ticket.owner, {})
            if ticket in owned:
                raise ValueError(f"{ticket} is given twice")
            owned[ticket] = None
            if not ticket.names or len(set(ticket.names)) != len(ticket.names):
                raise ValueError(f"{ticket} must name each of its names once (names {ticket.names!r})")
            if ticket.state is BREAKING and ticket.deadline is None:
                raise ValueError(f"{ticket} is broken with no grace to end it")
        lines = table._lines
        waiting = sorted((t for t in tickets if t.state is WAITING), key=_arrival)
        for ticket in [*(t for t in tickets if t.holding), *waiting]:
            for name in ticket.names:
                entry = lines.get(name)
                if entry is None and ticket.holding:
                    lines[name] = ticket  # alone on the name, so far
                    continue
                if entry is not None and _slots(entry, name) != ticket.slots_on(name):
                    first = next(iter(_holders(entry) or _waiting(entry)))
                    raise ValueError(f"{ticket} disagrees with {first} on what {name!r} is")
                line = table._line_for(name, ticket)
                if not ticket.holding:
                    line.add_waiting(ticket)
                    continue
                last = next(reversed(line.holders), None)
                if ordered_by_backend and last is not None and last.seq > ticket.seq:
                    raise ValueError(f"{ticket} holds {name!r} after {last}, which arrived later")
                line.add_holder(ticket)
            if ticket.state is table._queued:
                table._count_waiting(ticket, 1)
            if ticket.deadline is not None and ticket.state in _TIMED:
                table._deadlines.append((ticket.deadline, ticket.seq, ticket))
        heapq.heapify(table._deadlines)
        table._sweep_at = max(_MIN_SWEEP, 2 * len(table._deadlines))
        if not ordered_by_backend:
            # A ticket alone on its name is checked as the queue it stands for: a semaphore of
            # no slots is refused even with one holder.
            queues = {
                name: _line_with(name, entry) if isinstance(entry, Ticket) else entry for name, entry in lines.items()
            }
            for name, line in queues.items():
                _check_handed_over(name, line)
            _check_none_grantable(queues)
        last_seq = max(arrived, default=0)
        if next_arrival is None:
            next_arrival = last_seq + 1
        elif next_arrival <= last_seq:
            raise ValueError(f"the next arrival ({next_arrival}) would not come after {arrived[last_seq]}")
        table._next_arrival = next_arrival
        return table

    # --- internals ----------------------------------------------------------------------------

    def _blockers(self, ticket: Ticket) -> list[Ticket]:
        found: dict[Ticket, None] = {}
        # Where the backend orders requests, a TAKING ticket is one more request in its queue.
        waits = self._queued
        for name in ticket.names:
            entry = self._lines.get(name)
            if entry is not None:
                line = _line_with(name, entry) if isinstance(entry, Ticket) else entry  # to read, not kept
                # Behind a waiting exclusive ticket, a shared one waits for every holder too:
                # they all go before that ticket, and it goes before this one. On a semaphore,
                # every holder is in the way of a ticket that has no slot there yet (any of
                # them letting go frees one), and none is in the way of one that has.
                if isinstance(line, _SlotLine):
                    if not self._lacks_slot(line, ticket):
                        continue
                    behind = True
                elif self.ordered_by_backend:
                    behind = ticket.shared and ticket.state is waits
                else:
                    behind = ticket.shared and self._behind_exclusive(line, ticket)
                for holder in line.holders:
                    if holder is not ticket and holder.state is not waits and (
                        behind or not (ticket.shared and holder.shared)
                    ):
                        found[holder] = None
        return list(found)

    def _lacks_slot(self, line: _SlotLine, ticket: Ticket) -> bool:
        """Does `ticket` wait for a slot of semaphore `line` (waiting, or a newcomer)? Where
        the backend orders requests, the table does not know its queue: while it waits at all."""
        if self.ordered_by_backend:
            return ticket.state is self._queued
        if ticket.holding:
            return False
        return not (line.admits(ticket) if ticket in line.waiting else line.admits_newcomer(ticket.shared))

    @staticmethod
    def _behind_exclusive(line: _Line, ticket: Ticket) -> bool:
        """Does an exclusive ticket wait ahead of shared `ticket` (waiting, or a newcomer)?"""
        if not line.exclusive_waiting or ticket.holding:
            return False
        return ticket not in line.waiting or not line.admits(ticket)

    def _admitted_elsewhere(self, ticket: Ticket, name: str) -> bool:
        """Do all of `ticket`'s lines other than `name` admit it?"""
        lines = cast(_Queues, self._lines)  # a waiting ticket's names (see `_lines`)
        return all(lines[n].admits(ticket) for n in ticket.names if n != name)

    def _line_for(self, name: str, ticket: Ticket) -> _Line | _SlotLine:
        """`name`'s queue, for `ticket` to join (as a holder or a waiter): made for it if
        nobody is on the name, or with the ticket that holds the name alone in it.

        A name that one ticket is let through on, with nobody else on it, keeps that ticket as
        its entry instead of a queue (most names, most of the time, and a queue with its one
        holder costs more than the ticket); the queue is made here, when a second ticket
        joins. Once made, it lasts until it is empty, not turned back into a ticket when all
        but one leave: that would cost a check on every release."""
        lines = self._lines
        entry = lines.get(name)
        if entry is None:
            slots = ticket.slots_on(name)
            line = lines[name] = _Line() if slots is None else _SlotLine(slots)
        elif isinstance(entry, Ticket):
            line = lines[name] = _line_with(name, entry)
        else:
            line = entry
        return line

    def _push_deadline(self, ticket: Ticket, deadline: float) -> None:
        heap = self._deadlines
        if len(heap) >= self._sweep_at:
            # A granted or ended ticket's entry would otherwise keep it (and its `info`, the
            # client's whole session) alive until its deadline, which may be hours away. Sweeping
            # when the heap has doubled since the last sweep costs O(1) per push, amortized.
            heap[:] = [entry for entry in heap if _due(entry)]
            heapq.heapify(heap)
            self._sweep_at = max(_MIN_SWEEP, 2 * len(heap))
        heapq.heappush(heap, (deadline, ticket.seq, ticket))

    def _start_taking(self, ticket: Ticket) -> Take:
        self._count_waiting(ticket, -1)
        lines = cast(_Queues, self._lines)  # a waiting ticket's names (see `_lines`)
        for name in ticket.names:
            lines[name].promote(ticket)
        ticket.state = TAKING
        return Take(ticket)

    def _count_waiting(self, ticket: Ticket, delta: int) -> None:
        _count(self._waiting_by_owner, ticket.owner, delta)
        by_name = self._waiting_by_name
        for name in ticket.names:
            _count(by_name, name, delta)

    def _end(self, ticket: Ticket, ending: Ending) -> list[Effect]:
        effects: list[Effect] = [Drop(ticket, ending), Ended(ticket)] if ticket.holding else [Ended(ticket)]
        self._remove(ticket)
        # Its names are unique: each line lost one ticket (a dict: a Counter costs a
        # Python-level call, on every release).
        return effects + self._grant_waiting(dict.fromkeys(ticket.names, 1))

    def _remove(self, ticket: Ticket) -> None:
        if ticket.state is self._queued:
            self._count_waiting(ticket, -1)
        ticket.state = ENDED
        lines = self._lines
        for name in ticket.names:
            entry = lines[name]
            if isinstance(entry, Ticket):  # this ticket, alone on the name
                del lines[name]
                continue
            entry.remove(ticket)
            if not entry:
                del lines[name]
        self._unindex_owner(ticket)

    def _unindex_owner(self, ticket: Ticket) -> None:
        tickets = self._owners[ticket.owner]
        del tickets[ticket]
        if not tickets:
            del self._owners[ticket.owner]

    def _grant_waiting(self, left: Mapping[str, int]) -> list[Effect]:
        """Grant every ticket that invariant 2 allows now that `left[name]` tickets have left
        each line (restores invariant 4).

        Only tickets on these names can have become grantable: a grant never makes another
        ticket grantable, nor keeps one a line admits from being admitted there, so one pass
        per line over the tickets it admits (`admitted`, in queue order) is enough; each is
        granted if its other lines admit it too. On a semaphore, the tickets it admitted
        before still wait for another line, whose own pass grants them: only the last ones,
        which may have just moved up into the free places (one per ticket gone), are tried,
        so a pass costs what it frees, not the number of slots.
        """
        effects: list[Effect] = []
        lines = self._lines
        for name, gone in left.items():
            line = lines.get(name)
            if line is not None:
                # A ticket alone on a name leaves no entry: one that lost a ticket and is left
                # is a queue.
                assert not isinstance(line, Ticket), f"{line} alone on {name!r} after one left it"
                admitted = line.admitted()
                if line.slots is not None:
                    admitted = admitted[-gone:]
                for ticket in admitted:
                    if self._admitted_elsewhere(ticket, name):
                        effects.append(self._start_taking(ticket))
        return effects

    def check(self) -> None:
        """Assert every invariant of the module docstring that the table's mode makes the
        table's, by brute force. For tests."""
        ordered = self.ordered_by_backend
        assert not _NOBODY, "the shared empty waiting line was changed"
        live: set[Ticket] = set()
        for name, entry in self._lines.items():
            if isinstance(entry, Ticket):
                assert entry.holding and name in entry.names, f"{entry} stands for {name!r}"
            # A ticket alone on its name is checked as the queue it stands for.
            line = _line_with(name, entry) if isinstance(entry, Ticket) else entry
            assert line, f"empty line for {name!r}"
            holders, waiting = list(line.holders), list(line.waiting)
            assert all(t.holding for t in holders) and all(t.state is WAITING for t in waiting)
            assert [t.seq for t in waiting] == sorted(t.seq for t in waiting), f"{name!r} out of order"
            for ticket in holders + waiting:
                assert ticket.slots_on(name) == line.slots, f"{name!r}: {ticket} disagrees on its slots"
                assert ticket.state is not ENDED, ticket
                assert name in ticket.names, (name, ticket)
                live.add(ticket)
            if isinstance(line, _SlotLine):
                self._check_slot_line(name, line, holders, waiting)
                continue
            assert line.exclusive_holders == sum(not t.shared for t in holders), name
            assert line.exclusive_waiting == sum(not t.shared for t in waiting), name
            if ordered:
                # 6: the backend orders; the table only keeps every ticket in arrival order.
                assert not waiting, f"{name!r}: {waiting} wait in the table"
                assert [t.seq for t in holders] == sorted(t.seq for t in holders), f"{name!r} out of order"
            else:
                assert all(t.shared for t in holders) or len(holders) == 1, f"{name!r}: {holders}"
            for ticket in waiting:
                ahead = [h for h in holders if h.seq < ticket.seq] + [w for w in waiting if w.seq < ticket.seq]
                if not ticket.shared:
                    assert all(h.seq < ticket.seq for h in holders), f"{name!r}: a holder barged past {ticket}"
                # The fast rule agrees with the definition: nothing incompatible ahead.
                assert line.admits(ticket) == all(ticket.shared and t.shared for t in ahead), (name, ticket)
        owned: set[Ticket] = set()
        for owner, tickets in self._owners.items():
            assert tickets, f"empty owner entry {owner!r}"
            for ticket in tickets:
                assert ticket.owner == owner, (owner, ticket)
                owned.add(ticket)
        assert live == owned, (live ^ owned)
        by_owner: dict[Hashable, int] = {}
        by_name: dict[str, int] = {}
        for ticket in live:
            if ticket.state is self._queued:
                by_owner[ticket.owner] = by_owner.get(ticket.owner, 0) + 1
                for name in ticket.names:
                    by_name[name] = by_name.get(name, 0) + 1
        assert by_owner == self._waiting_by_owner, (by_owner, self._waiting_by_owner)
        assert by_name == self._waiting_by_name, (by_name, self._waiting_by_name)
        timed = {entry[2] for entry in self._deadlines if entry[0] == entry[2].deadline}
        lines = cast(_Queues, self._lines)  # a waiting ticket's names (see `_lines`)
        for ticket in live:
            for entry in (self._lines[n] for n in ticket.names):
                if isinstance(entry, Ticket):
                    assert entry is ticket, f"{entry} stands for a name of {ticket}"
                else:
                    assert ticket in (entry.holders if ticket.holding else entry.waiting), ticket
            if ticket.deadline is not None and ticket.state is not HELD:
                assert ticket in timed, f"{ticket} has a deadline that is never enforced"
            if ticket.state is WAITING:
                assert not all(lines[n].admits(ticket) for n in ticket.names), f"{ticket} is grantable at rest"

    def _check_slot_line(self, name: str, line: _SlotLine, holders: list[Ticket], waiting: list[Ticket]) -> None:
        if self.ordered_by_backend:
            assert not waiting, f"{name!r}: {waiting} wait in the table"
            return
        assert len(holders) <= line.slots, f"{name!r}: {len(holders)} holders of {line.slots} slots"
        for place, ticket in enumerate(waiting):
            assert line.admits(ticket) == (len(holders) + place < line.slots), (name, ticket)
            # No barging: a later holder only ever took a slot this ticket will not need.
            if any(h.seq > ticket.seq for h in holders):
                assert line.admits(ticket), f"{name!r}: a holder barged past {ticket}"
