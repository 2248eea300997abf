"""Random operations on the lock table, checked against a plain reference model.

The model restates the table's rules as directly as possible: one list of live tickets in
arrival order, and a ticket may hold once, on each of its names, no conflicting ticket is
ahead of it on a lock, and fewer than N tickets are ahead of it on a semaphore of N slots.
Every effect list the table returns must equal the model's, and is then carried out in order
against a simulated backend, which checks what the real edge relies on: exclusion among the
tickets it was told to take (at most N on a semaphore), FIFO at the moment of each Take, and
one Drop per Take.

Each run picks what each name is (a lock, or a semaphore of 1-3 slots) and whether requests
keep to it: in a mixed run some requests say otherwise, and must be refused as mismatches
while anyone holds or awaits the name.

Where the backend orders requests (`OrderedTableMachine`), every ticket is taken on arrival,
and the simulated backend grants them in any order that keeps its holders exclusive, and at
most N on a semaphore of N slots (etcd's order need not be this host's arrival order): the
table must follow, deciding nothing itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable

from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lockd.table import (
    Drop,
    Effect,
    Ended,
    Ending,
    Granted,
    LockTable,
    Lost,
    Queued,
    Reason,
    Refused,
    State,
    Take,
    Ticket,
)

NAMES = ("a", "b", "c")
OWNERS = (1, 2, 3, 4)
HOLDING = (State.TAKING, State.HELD, State.BREAKING)
#: How long a broken lease's owner has to let go, in the machine's time steps.
GRACE = 2  # may equal a request's deadline: what is due at once is served in arrival order
#: What a name is: a lock (None) or a semaphore of that many slots.
KINDS = st.none() | st.integers(1, 3)
#: (owner, names, shared, wait, timeout, odd): repeated names allowed, as clients may send
#: them; mostly waiting requests, as a no-wait one that is refused changes nothing. `odd`: in
#: a mixed run, what this request says some names are, whatever the run picked for them.
REQUESTS = st.tuples(
    st.sampled_from(OWNERS),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    st.booleans(),
    st.just(True) | st.booleans(),
    st.none() | st.integers(0, 4),
    st.dictionaries(st.sampled_from(NAMES), KINDS, max_size=2),
)
Request = tuple[int, list[str], bool, bool, int | None, dict[str, int | None]]


class Model:
    """What the table should decide, computed by brute force over the live tickets."""

    def __init__(self, ordered: bool) -> None:
        #: The backend orders requests: the table lets every ticket through on arrival.
        self.ordered = ordered
        #: The state of a ticket waiting for its turn.
        self.queued = State.TAKING if ordered else State.WAITING
        self.live: list[Ticket] = []  # arrival order
        self.state: dict[Ticket, State] = {}
        self.arrival: dict[Ticket, int] = {}
        #: The slots each request asked for, by name (the names it asked a slot of).
        self.slots: dict[Ticket, dict[str, int]] = {}
        self.timed: list[Ticket] = []  # live once, with a deadline, not yet expired
        self._count = itertools.count()

    # --- the rules, from their definitions ----------------------------------------------------

    def kind(self, ticket: Ticket, name: str) -> int | None:
        """What `ticket` says `name` is: a semaphore of that many slots, or a lock (None)."""
        return self.slots[ticket].get(name)

    def on(self, name: str) -> list[Ticket]:
        """The live tickets on `name`, in arrival order."""
        return [t for t in self.live if name in t.names]

    def slots_of(self, name: str) -> int | None:
        """What `name` is while anyone holds or awaits it (they all agree), else None."""
        kinds = {self.kind(t, name) for t in self.on(name)}
        assert len(kinds) <= 1, f"{name!r} is {kinds} at once"
        return kinds.pop() if kinds else None

    def mismatch(self, ticket: Ticket) -> str | None:
        """The first of `ticket`'s names that someone holds or awaits as something else."""
        for name in ticket.names:
            if any(self.kind(t, name) != self.kind(ticket, name) for t in self.on(name)):
                return name
        return None

    def conflict(self, a: Ticket, b: Ticket, name: str) -> bool:
        """On lock `name`, which both are on: they cannot both hold it."""
        return not (a.shared and b.shared)

    def ahead(self, ticket: Ticket, name: str) -> list[Ticket]:
        """The live tickets on `name` that arrived before `ticket` (all of them, for a newcomer)."""
        return [t for t in self.on(name) if self.arrival[t] < self.arrival[ticket]]

    def admitted(self, ticket: Ticket, name: str) -> bool:
        """Invariant 2 on one name: nothing incompatible ahead on a lock; fewer than N
        tickets ahead, holding or waiting, on a semaphore of N slots."""
        slots = self.kind(ticket, name)
        ahead = self.ahead(ticket, name)
        if slots is None:
            return not any(self.conflict(ticket, t, name) for t in ahead)
        return len(ahead) < slots

    def held_back(self, ticket: Ticket) -> bool:
        return not all(self.admitted(ticket, name) for name in ticket.names)

    def in_the_way(self, ticket: Ticket) -> list[Ticket]:
        """What effects report: name by name, on a lock, the conflicting holders ahead, or
        every holder ahead where a conflicting waiter is ahead too (it waits for them all); on
        a semaphore, every holder where it has no slot yet (any of them leaving frees one).
        Where the backend orders requests: the granted tickets on its names, wherever they
        arrived, that conflict with it on a lock, and all of them while it still waits (one
        still waiting waits behind an exclusive request, or for a slot, so for all of them)."""
        found: dict[Ticket, None] = {}
        if self.ordered:
            waiting = self.state[ticket] is State.TAKING
            for name in ticket.names:
                lock = self.kind(ticket, name) is None
                for other in self.on(name):
                    granted = self.state[other] in (State.HELD, State.BREAKING)
                    if granted and other is not ticket and (waiting or (lock and self.conflict(ticket, other, name))):
                        found[other] = None
            return list(found)
        for name in ticket.names:
            ahead = self.ahead(ticket, name)
            if self.kind(ticket, name) is not None:
                if self.state[ticket] not in HOLDING and not self.admitted(ticket, name):
                    found.update((t, None) for t in self.on(name) if self.state[t] in HOLDING)
                continue
            behind = any(self.state[t] is State.WAITING and self.conflict(ticket, t, name) for t in ahead)
            for other in ahead:
                if self.state[other] in HOLDING and (behind or self.conflict(ticket, other, name)):
                    found[other] = None
        return list(found)

    def holders_fit(self, tickets: Iterable[Ticket]) -> bool:
        """May `tickets` all hold at once: no two conflict on a lock, at most N on a semaphore?"""
        tickets = list(tickets)
        for name in {n for t in tickets for n in t.names}:
            on = [t for t in tickets if name in t.names]
            slots = self.kind(on[0], name)
            if slots is not None:
                if len(on) > slots:
                    return False
            elif any(self.conflict(a, b, name) for a, b in itertools.combinations(on, 2)):
                return False
        return True

    # --- the table's calls --------------------------------------------------------------------

    def acquire(self, ticket: Ticket, slots: dict[str, int]) -> list[Effect]:
        self.arrival[ticket] = next(self._count)
        self.slots[ticket] = {name: n for name, n in slots.items() if name in ticket.names}
        self.state[ticket] = State.WAITING  # a newcomer, until decided
        wrong = self.mismatch(ticket)
        if wrong is not None:
            self.state[ticket] = State.ENDED
            holders = [t for t in self.on(wrong) if self.state[t] in HOLDING]
            return [Refused(ticket, Reason.MISMATCH, holders, wrong)]
        held_back = not self.ordered and self.held_back(ticket)
        if held_back and not ticket.wait:
            blockers = self.in_the_way(ticket)
            self.state[ticket] = State.ENDED
            return [Refused(ticket, Reason.BUSY, blockers)]
        self.live.append(ticket)
        if ticket.deadline is not None:
            self.timed.append(ticket)
        if held_back:
            self.state[ticket] = State.WAITING
            return [Queued(ticket, self.in_the_way(ticket))]
        self.state[ticket] = State.TAKING
        return [Take(ticket)]

    def grant(self) -> list[Effect]:
        effects: list[Effect] = []
        if self.ordered:
            return effects  # the backend's to decide
        for ticket in self.live:
            if self.state[ticket] is State.WAITING and not self.held_back(ticket):
                self.state[ticket] = State.TAKING
                effects.append(Take(ticket))
        return effects

    def end(self, ticket: Ticket, ending: Ending = Ending.RELEASED) -> list[Effect]:
        effects: list[Effect] = [Drop(ticket, ending)] if self.state[ticket] in HOLDING else []
        self.live.remove(ticket)
        self.state[ticket] = State.ENDED
        return effects + self.grant()

    def taken(self, ticket: Ticket) -> list[Effect]:
        if self.state[ticket] is not State.TAKING:
            return []
        self.state[ticket] = State.HELD
        return [Granted(ticket)]

    def take_blocked(self, ticket: Ticket) -> list[Effect]:
        if self.state[ticket] is not State.TAKING or ticket.wait:
            return []
        return [Refused(ticket, Reason.BUSY, self.in_the_way(ticket)), *self.end(ticket)]

    def release(self, ticket: Ticket) -> list[Effect]:
        return self.end(ticket) if ticket in self.live else []

    def lose(self, ticket: Ticket, reason: str) -> list[Effect]:
        if ticket not in self.live:
            return []
        lost: list[Effect] = [Lost(ticket, reason)] if self.state[ticket] is State.HELD else []
        return lost + self.end(ticket, Ending.ABANDONED)

    def force_release(self, name: str, reason: str, grace_until: float) -> tuple[int, list[Effect]]:
        broken = [t for t in self.live if name in t.names and self.state[t] in (State.HELD, State.BREAKING)]
        effects: list[Effect] = []
        for ticket in broken:
            if self.state[ticket] is State.BREAKING:
                effects += self.end(ticket)
            else:
                self.state[ticket] = State.BREAKING
                self.timed.append(ticket)
                effects.append(Lost(ticket, reason))
        return len(broken), effects

    def drop_owner(self, owner: Hashable) -> list[Effect]:
        gone = [t for t in self.live if t.owner == owner]
        effects: list[Effect] = [Drop(t, Ending.ABANDONED) for t in gone if self.state[t] in HOLDING]
        for ticket in gone:
            self.live.remove(ticket)
            self.state[ticket] = State.ENDED
        return effects + self.grant()

    def expire(self, now: float) -> list[Effect]:
        due = [t for t in self.timed if t.deadline <= now]  # type: ignore[operator]
        self.timed = [t for t in self.timed if t not in due]
        effects: list[Effect] = []
        for ticket in sorted(due, key=lambda t: (t.deadline, self.arrival[t])):
            if self.state[ticket] is State.BREAKING:
                effects += self.end(ticket, Ending.OVERDUE)
            elif self.state[ticket] in (State.WAITING, State.TAKING):
                effects.append(Refused(ticket, Reason.TIMEOUT, self.in_the_way(ticket)))
                effects += self.end(ticket)
        return effects

    def next_deadline(self) -> float | None:
        timed = [t.deadline for t in self.timed if self.state[t] in (State.WAITING, State.TAKING, State.BREAKING)]
        return min(timed) if timed else None  # type: ignore[type-var]


class TableMachine(RuleBasedStateMachine):
    #: Whether the backend orders requests (see the module docstring).
    ORDERED = False

    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable(ordered_by_backend=self.ORDERED)
        self.model = Model(self.ORDERED)
        self.now = 0.0
        #: Tickets the backend holds or is taking, from their Take to their Drop, in Take order.
        self.backend: dict[Ticket, None] = {}
        self.took: set[Ticket] = set()
        self.dropped: set[Ticket] = set()
        #: Tickets whose Ended came: exactly those the model has ended.
        self.ended: set[Ticket] = set()
        #: What each name is in this run (see `pick_kinds`).
        self.kinds: dict[str, int | None] = dict.fromkeys(NAMES)
        self.mixed = False

    @initialize(kinds=st.fixed_dictionaries({name: KINDS for name in NAMES}), mixed=st.booleans())
    def pick_kinds(self, kinds: dict[str, int | None], mixed: bool) -> None:
        """What each name is: requests keep to it, but in a mixed run some say otherwise."""
        self.kinds = kinds
        self.mixed = mixed

    # --- carrying out effects -----------------------------------------------------------------

    def _key(self, effect: Effect) -> tuple[object, ...]:
        arrival = self.model.arrival
        blockers = tuple(sorted(arrival[t] for t in getattr(effect, "blockers", ())))
        return (
            type(effect).__name__, arrival[effect.ticket], getattr(effect, "reason", None), blockers,
            getattr(effect, "ending", None),
        )

    def _canonical(self, effects: list[Effect]) -> list[tuple[object, ...]]:
        """Effect keys, with each run of Takes or of Drops in arrival order: the model does
        not care in which order independent tickets are taken or dropped."""
        out: list[tuple[object, ...]] = []
        for kind, run in itertools.groupby(effects, type):
            keys = [self._key(e) for e in run]
            out += sorted(keys) if kind in (Take, Drop) else keys
        return out

    def carry_out(
        self,
        actual: list[Effect],
        expected: list[Effect],
        before: list[Ticket],
        ended: Iterable[Ticket] = (),
    ) -> None:
        """Compare with the model, then apply `actual` in order to the simulated backend.

        `before`: the live tickets when the call began. `ended`: those of them it ended before
        its first effect (a release, a departure).
        """
        for effect in actual:
            if isinstance(effect, Ended):
                assert effect.ticket.state is State.ENDED, effect.ticket
                assert effect.ticket not in self.ended, f"second Ended of {effect.ticket}"
                self.ended.add(effect.ticket)
        actual = [effect for effect in actual if not isinstance(effect, Ended)]
        assert self._canonical(actual) == self._canonical(expected), (actual, expected)
        assert self.ended == {t for t, state in self.model.state.items() if state is State.ENDED}
        model = self.model
        arrival = model.arrival
        ended = set(ended)
        for effect in actual:
            ticket = effect.ticket
            if isinstance(effect, Take):
                assert ticket not in self.took, f"taken twice: {ticket}"
                if not self.ORDERED:
                    assert model.holders_fit([*self.backend, ticket]), f"{ticket} taken while {list(self.backend)} hold"
                    for name in ticket.names:
                        ahead = [
                            t for t in before if name in t.names and arrival[t] < arrival[ticket] and t not in ended
                        ]
                        slots = model.kind(ticket, name)
                        if slots is None:
                            for other in ahead:
                                assert not model.conflict(ticket, other, name), f"{ticket} taken ahead of {other}"
                        else:
                            assert len(ahead) < slots, f"{ticket} taken on {name!r} with {ahead} ahead"
                self.took.add(ticket)
                self.backend[ticket] = None
            elif isinstance(effect, Drop):
                assert ticket in self.backend, f"dropped without a Take, or twice: {ticket}"
                del self.backend[ticket]
                self.dropped.add(ticket)
                ended.add(ticket)
            elif isinstance(effect, (Refused, Lost)):
                ended.add(ticket)

    # --- rules --------------------------------------------------------------------------------

    def _request(
        self, owner: int, names: list[str], shared: bool, wait: bool, timeout: int | None, odd: dict[str, int | None]
    ) -> None:
        deadline = None if timeout is None else self.now + timeout
        kinds = {**self.kinds, **odd} if self.mixed else self.kinds
        slots = {name: n for name in names if (n := kinds[name]) is not None}
        before = list(self.model.live)
        ticket, effects = self.table.acquire(
            owner, names, shared=shared, wait=wait, deadline=deadline, now=self.now, slots=slots
        )
        assert ticket.names == tuple(dict.fromkeys(names))
        self.carry_out(effects, self.model.acquire(ticket, slots), before)

    @rule(request=REQUESTS)
    def acquire(self, request: Request) -> None:
        self._request(*request)

    @rule(requests=st.lists(REQUESTS, min_size=2, max_size=4))
    def acquire_burst(self, requests: list[Request]) -> None:
        """Several requests before anything else happens, so that queues grow."""
        for request in requests:
            self._request(*request)

    def _pick(self, data: st.DataObject, state: State | None = None) -> Ticket:
        live = [t for t in self.model.live if state is None or t.state is state]
        return data.draw(st.sampled_from(live))

    def _grantable(self) -> list[Ticket]:
        """The tickets the backend may say it holds: where it orders requests, those that
        fit with the granted ones (no conflict, a free slot), in whatever order; the same one
        again is a no-op."""
        granted = [t for t in self.model.live if t.state in (State.HELD, State.BREAKING)]
        fits = self.model.holders_fit
        return [
            t for t in self.model.live
            if t.holding and not (self.ORDERED and t.state is State.TAKING and not fits([*granted, t]))
        ]

    @precondition(lambda self: self._grantable())
    @rule(data=st.data())
    def taken(self, data: st.DataObject) -> None:
        """The backend got the locks of a ticket it was asked for (or says so twice)."""
        ticket = data.draw(st.sampled_from(self._grantable()))
        was = ticket.state, ticket.tokens, ticket.since
        tokens = [self.now] * len(ticket.names)
        before = list(self.model.live)
        effects = self.table.taken(ticket, tokens, now=self.now)
        self.carry_out(effects, self.model.taken(ticket), before)
        if was[0] is State.TAKING:
            assert (ticket.tokens, ticket.since) == (tokens, self.now)
        else:
            assert (ticket.state, ticket.tokens, ticket.since) == was

    @precondition(lambda self: any(t.state is State.TAKING for t in self.model.live))
    @rule(data=st.data())
    def take_blocked(self, data: st.DataObject) -> None:
        """The backend found a ticket's locks held outside lockd."""
        ticket = self._pick(data, State.TAKING)
        before = list(self.model.live)
        self.carry_out(self.table.take_blocked(ticket), self.model.take_blocked(ticket), before)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ticket = self._pick(data)
        before = list(self.model.live)
        self.carry_out(self.table.release(ticket), self.model.release(ticket), before, [ticket])

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        ticket = self._pick(data)
        before = list(self.model.live)
        effects = self.table.lose(ticket, "lost")
        self.carry_out(effects, self.model.lose(ticket, "lost"), before, [ticket])

    @precondition(lambda self: len(self.model.live) < len(self.model.arrival))
    @rule(data=st.data())
    def too_late(self, data: st.DataObject) -> None:
        """Whatever arrives for an ended ticket changes nothing."""
        ended = [t for t in self.model.arrival if t.state is State.ENDED]
        ticket = data.draw(st.sampled_from(ended))
        assert self.table.taken(ticket, [0] * len(ticket.names), now=self.now) == []
        assert self.table.take_blocked(ticket) == []
        assert self.table.release(ticket) == []
        assert self.table.lose(ticket, "late") == []
        owner = ticket.owner
        self.table.reassign(ticket, OWNERS[0] if owner != OWNERS[0] else OWNERS[1])
        assert ticket.owner == owner and ticket.state is State.ENDED

    @rule(name=st.sampled_from(NAMES))
    def force_release(self, name: str) -> None:
        before = list(self.model.live)
        count, effects = self.table.force_release(name, "forced", grace_until=self.now + GRACE)
        expected_count, expected = self.model.force_release(name, "forced", self.now + GRACE)
        assert count == expected_count
        self.carry_out(effects, expected, before)

    @rule(owner=st.sampled_from(OWNERS))
    def drop_owner(self, owner: int) -> None:
        before = list(self.model.live)
        gone = [t for t in before if t.owner == owner]
        effects = self.table.drop_owner(owner)
        assert not any(isinstance(e, Take) and e.ticket in gone for e in effects), effects
        self.carry_out(effects, self.model.drop_owner(owner), before, gone)
        assert self.table.tickets_of(owner) == []
        assert all(t.state is State.ENDED for t in gone)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def reassign(self, data: st.DataObject, owner: int) -> None:
        ticket = self._pick(data)
        self.table.reassign(ticket, owner)
        assert ticket.owner == owner

    @rule(advance=st.integers(0, 3))
    def expire(self, advance: int) -> None:
        self.now += advance
        before = list(self.model.live)
        self.carry_out(self.table.expire(self.now), self.model.expire(self.now), before)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def table_checks_itself(self) -> None:
        self.table.check()

    @invariant()
    def table_matches_model(self) -> None:
        model = self.model
        assert len(self.table) == len(model.live)
        names = {name for t in model.live for name in t.names}
        assert set(self.table.names()) == names
        for name in names:
            on_name = [t for t in model.live if name in t.names]
            assert self.table.holders(name) == [t for t in self.backend if name in t.names]
            assert self.table.waiters(name) == [t for t in on_name if t.state is State.WAITING]
        for ticket, state in model.state.items():
            assert ticket.state is state, (ticket, state)
        waiting = [t for t in model.live if t.state is model.queued]
        assert self.table.waiting_count() == len(waiting)
        for owner in OWNERS:
            assert set(self.table.tickets_of(owner)) == {t for t in model.live if t.owner == owner}
            assert self.table.waiting_of(owner) == sum(t.owner == owner for t in waiting)
        for name in NAMES:
            assert self.table.waiting_on(name) == sum(name in t.names for t in waiting)
            assert self.table.slots_of(name) == model.slots_of(name)
        assert self.table.next_deadline() == model.next_deadline()

    @invariant()
    def holders_exclude_each_other(self) -> None:
        """No two holders conflict on a lock; at most N hold a semaphore of N slots."""
        holding = [t for t in self.model.live if t.state in HOLDING]
        # Where the backend orders requests, a TAKING ticket only waits in its queue.
        granted = [t for t in holding if not (self.ORDERED and t.state is State.TAKING)]
        assert self.model.holders_fit(granted), granted
        for name in NAMES:
            slots = self.model.slots_of(name)
            assert slots is None or sum(name in t.names for t in granted) <= slots, name
        assert set(holding) == set(self.backend)

    @invariant()
    def no_holder_barged(self) -> None:
        """Where the table orders requests, every holder is admitted on each of its names by
        the tickets still ahead of it: none holds a place an earlier ticket needs (tickets
        ahead only ever leave, so it holds for as long as it was true at the grant)."""
        if self.ORDERED:
            return
        for ticket in self.model.live:
            if ticket.state in HOLDING:
                assert not self.model.held_back(ticket), f"{ticket} holds past an earlier ticket"

    @invariant()
    def every_waiter_is_blocked(self) -> None:
        """In the table, by the tickets ahead of it (no waiting ticket grantable at rest);
        where the backend orders requests, the table names only the granted tickets in the way
        (the backend may know of more)."""
        for ticket in self.model.live:
            if ticket.state is self.model.queued:
                assert self.ORDERED or self.model.held_back(ticket), f"{ticket} waits for nothing"
                assert set(self.table.blockers(ticket)) == set(self.model.in_the_way(ticket))

    def teardown(self) -> None:
        """Everyone leaves: the table empties and every Take has had exactly one Drop."""
        for owner in OWNERS:
            self.drop_owner(owner)
        assert len(self.table) == 0 and self.table.names() == []
        assert self.table.next_deadline() is None
        assert self.took == self.dropped and not self.backend
        assert self.ended == set(self.model.arrival), "a ticket never had its Ended"


# A failure is shrunk to a short story and reported alone; the explain phase is left out, as
# on a long failing run it can take minutes to annotate what the shrunk steps already show.
TableMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
test_lock_table_against_model = TableMachine.TestCase


class OrderedTableMachine(TableMachine):
    ORDERED = True


OrderedTableMachine.TestCase.settings = TableMachine.TestCase.settings
test_lock_table_ordered_by_the_backend_against_model = OrderedTableMachine.TestCase
