"""Unit tests of the sans-I/O lock table, one behaviour at a time.

Every test goes through `CheckedTable`, which runs `LockTable.check()` after every call and
keeps the Take/Drop ledger: a ticket is taken at most once, dropped only after being taken
and at most once, and when the test ends (all owners gone) every Take has had its Drop. It
also checks that every ticket ends with exactly one `Ended`, last of its effects, and leaves
those out of what the tests see.
"""

from __future__ import annotations

import gc
import itertools
import tracemalloc
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import pytest

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


class CheckedTable:
    """A LockTable whose every mutation is followed by `check()` and the Take/Drop ledger."""

    def __init__(self, *, ordered_by_backend: bool = False) -> None:
        self.table = LockTable(ordered_by_backend=ordered_by_backend)
        self.took: set[Ticket] = set()
        self.dropped: set[Ticket] = set()
        self.acquired: set[Ticket] = set()
        self.ended: set[Ticket] = set()
        self.owners: dict[Hashable, None] = {}

    def _record(self, effects: list[Effect]) -> list[Effect]:
        for i, effect in enumerate(effects):
            if isinstance(effect, Ended):
                assert effect.ticket.state is State.ENDED, effect.ticket
                assert effect.ticket not in self.ended, f"second Ended of {effect.ticket}"
                later = [e for e in effects[i + 1 :] if e.ticket is effect.ticket]
                assert not later, f"{later} after the Ended of {effect.ticket}"
                self.ended.add(effect.ticket)
        for effect in effects:
            if isinstance(effect, Take):
                assert effect.ticket not in self.took, f"second Take of {effect.ticket}"
                self.took.add(effect.ticket)
            elif isinstance(effect, Drop):
                assert effect.ticket in self.took, f"Drop of {effect.ticket}, never taken"
                assert effect.ticket not in self.dropped, f"second Drop of {effect.ticket}"
                assert effect.ticket.state is State.ENDED, effect.ticket
                self.dropped.add(effect.ticket)
            elif isinstance(effect, Granted):
                assert effect.ticket.state is State.HELD, effect.ticket
        self.table.check()
        return [effect for effect in effects if not isinstance(effect, Ended)]

    def acquire(
        self, owner: Hashable, names: Iterable[str], now: float = 0.0, **kwargs: Any
    ) -> tuple[Ticket, list[Effect]]:
        self.owners[owner] = None
        ticket, effects = self.table.acquire(owner, names, now=now, **kwargs)
        self.acquired.add(ticket)
        return ticket, self._record(effects)

    def hold(self, owner: Hashable, names: Iterable[str], **kwargs: Any) -> Ticket:
        """Acquire on free names and have the backend take them at once."""
        ticket, effects = self.acquire(owner, names, **kwargs)
        assert effects == [Take(ticket)]
        assert self.taken(ticket) == [Granted(ticket)]
        return ticket

    def wait(self, owner: Hashable, names: Iterable[str], **kwargs: Any) -> Ticket:
        """Acquire names that are not free: the ticket queues."""
        ticket, effects = self.acquire(owner, names, **kwargs)
        assert effects == [Queued(ticket, self.table.blockers(ticket))]
        assert ticket.state is State.WAITING
        return ticket

    def taken(self, ticket: Ticket, tokens: list[int] | None = None, now: float = 0) -> list[Effect]:
        tokens = list(range(len(ticket.names))) if tokens is None else tokens
        return self._record(self.table.taken(ticket, tokens, now=now))

    def take_blocked(self, ticket: Ticket) -> list[Effect]:
        return self._record(self.table.take_blocked(ticket))

    def release(self, ticket: Ticket) -> list[Effect]:
        return self._record(self.table.release(ticket))

    def lose(self, ticket: Ticket, reason: str = "gone") -> list[Effect]:
        return self._record(self.table.lose(ticket, reason))

    def force_release(self, name: str, reason: str = "forced", *, grace_until: float) -> tuple[int, list[Effect]]:
        count, effects = self.table.force_release(name, reason, grace_until=grace_until)
        return count, self._record(effects)

    def drop_owner(self, owner: Hashable) -> list[Effect]:
        return self._record(self.table.drop_owner(owner))

    def end(self, tickets: list[Ticket]) -> list[Effect]:
        return self._record(self.table.end(tickets))

    def reassign(self, ticket: Ticket, owner: Hashable) -> None:
        self.owners[owner] = None
        self.table.reassign(ticket, owner)
        self.table.check()

    def expire(self, now: float) -> list[Effect]:
        return self._record(self.table.expire(now))

    def __getattr__(self, name: str) -> object:
        return getattr(self.table, name)  # the queries

    def __len__(self) -> int:
        return len(self.table)

    def finish(self) -> None:
        """Every owner leaves: the table empties, every Take has had exactly one Drop and every
        ticket its Ended."""
        for owner in self.owners:
            self.drop_owner(owner)
        assert len(self.table) == 0
        assert self.table.names() == []
        assert self.took == self.dropped, self.took ^ self.dropped
        assert self.acquired == self.ended, self.acquired ^ self.ended


@pytest.fixture
def table() -> Iterator[CheckedTable]:
    checked = CheckedTable()
    yield checked
    checked.finish()


# --- effects -------------------------------------------------------------------------------


def test_effects_compare_by_kind_and_fields() -> None:
    a = Ticket("o", ("x",), False, True, None, None, 0.0)
    b = Ticket("o", ("x",), False, True, None, None, 0.0)
    assert Take(a) == Take(a)
    assert Take(a) != Take(b)  # tickets are compared by identity
    assert Take(a) != Drop(a, Ending.RELEASED)
    assert Drop(a, Ending.RELEASED) != Drop(a, Ending.ABANDONED)
    assert Refused(a, Reason.BUSY, [b]) == Refused(a, Reason.BUSY, [b])
    assert Refused(a, Reason.BUSY, [b]) != Refused(a, Reason.TIMEOUT, [b])
    assert Refused(a, Reason.BUSY, [b]) != Refused(a, Reason.BUSY, [])
    assert Lost(a, "x") != Lost(a, "y")
    assert "blockers=[]" in repr(Queued(a, []))


# --- exclusive and shared ------------------------------------------------------------------


def test_exclusive_on_a_free_name_is_taken_then_granted(table: CheckedTable) -> None:
    ticket, effects = table.acquire("a", ["x"], now=1.0, info="pid 7")
    assert effects == [Take(ticket)]
    assert ticket.state is State.TAKING and ticket.holding
    assert (ticket.names, ticket.shared, ticket.info, ticket.since) == (("x",), False, "pid 7", 1.0)
    assert table.taken(ticket, [42], now=3.0) == [Granted(ticket)]
    assert ticket.state is State.HELD
    assert (ticket.tokens, ticket.since) == ([42], 3.0)


def test_exclusive_behind_a_holder_queues_and_gets_it_on_release(table: CheckedTable) -> None:
    a = table.hold("a", ["x"])
    b, effects = table.acquire("b", ["x"])
    assert effects == [Queued(b, [a])]
    assert table.release(a) == [Drop(a, Ending.RELEASED), Take(b)]
    assert b.state is State.TAKING


def test_a_taking_ticket_already_counts_as_holder(table: CheckedTable) -> None:
    a, _ = table.acquire("a", ["x"])
    b, effects = table.acquire("b", ["x"], shared=True)
    assert effects == [Queued(b, [a])]


def test_shared_tickets_hold_together(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    s2, effects = table.acquire("b", ["x"], shared=True)
    assert effects == [Take(s2)]
    assert table.queue("x") == [s1, s2]


def test_exclusive_waits_for_every_shared_holder(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    s2 = table.hold("b", ["x"], shared=True)
    e, effects = table.acquire("c", ["x"])
    assert effects == [Queued(e, [s1, s2])]
    assert table.release(s1) == [Drop(s1, Ending.RELEASED)]
    assert table.blockers(e) == [s2]
    assert table.release(s2) == [Drop(s2, Ending.RELEASED), Take(e)]


def test_shared_waits_for_an_exclusive_holder(table: CheckedTable) -> None:
    e = table.hold("a", ["x"])
    s, effects = table.acquire("b", ["x"], shared=True)
    assert effects == [Queued(s, [e])]


def test_release_of_an_exclusive_grants_the_shared_run_behind_it(table: CheckedTable) -> None:
    e1 = table.hold("a", ["x"])
    s1 = table.wait("b", ["x"], shared=True)
    s2 = table.wait("c", ["x"], shared=True)
    e2 = table.wait("d", ["x"])
    s3 = table.wait("e", ["x"], shared=True)
    assert table.release(e1) == [Drop(e1, Ending.RELEASED), Take(s1), Take(s2)]
    assert (e2.state, s3.state) == (State.WAITING, State.WAITING)
    table.release(s1)
    assert table.release(s2) == [Drop(s2, Ending.RELEASED), Take(e2)]
    assert table.release(e2) == [Drop(e2, Ending.RELEASED), Take(s3)]


# --- FIFO, no barging ----------------------------------------------------------------------


def test_shared_behind_a_waiting_exclusive_waits(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    e = table.wait("b", ["x"])
    s2, effects = table.acquire("c", ["x"], shared=True)
    # `s1` could share with it, but the waiting `e` is in its way, and `e` waits for `s1`.
    assert effects == [Queued(s2, [s1])]
    assert table.waiters("x") == [e, s2]
    assert table.release(s1) == [Drop(s1, Ending.RELEASED), Take(e)]
    assert table.release(e) == [Drop(e, Ending.RELEASED), Take(s2)]


def test_an_exclusive_is_granted_only_at_the_head(table: CheckedTable) -> None:
    e1 = table.hold("a", ["x"])
    e2 = table.wait("b", ["x"])
    e3 = table.wait("c", ["x"])
    assert table.blockers(e3) == [e1]
    assert table.waiters("x") == [e2, e3]
    assert table.release(e1) == [Drop(e1, Ending.RELEASED), Take(e2)]
    assert e3.state is State.WAITING
    assert table.release(e2) == [Drop(e2, Ending.RELEASED), Take(e3)]


def test_a_late_comer_waits_behind_a_waiter_even_for_a_free_name(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    both = table.wait("b", ["x", "y"])
    late, effects = table.acquire("c", ["y"])
    assert effects == [Queued(late, [])]  # y is free, but `both` asked first
    assert table.waiters("y") == [both, late]
    assert table.release(h) == [Drop(h, Ending.RELEASED), Take(both)]
    assert table.release(both) == [Drop(both, Ending.RELEASED), Take(late)]


def test_shared_is_granted_past_a_shared_waiter_blocked_elsewhere(table: CheckedTable) -> None:
    ey = table.hold("a", ["y"])
    sxy = table.wait("b", ["x", "y"], shared=True)
    sx, effects = table.acquire("c", ["x"], shared=True)
    assert effects == [Take(sx)]  # everything ahead of it on x is shared
    assert table.release(ey) == [Drop(ey, Ending.RELEASED), Take(sxy)]


# --- many names ----------------------------------------------------------------------------


def test_many_names_are_all_or_nothing(table: CheckedTable) -> None:
    hx = table.hold("a", ["x"])
    xyz = table.wait("b", ["x", "y", "z"])
    assert table.queue("y") == [xyz] and table.queue("z") == [xyz]
    assert xyz.state is State.WAITING
    assert table.release(hx) == [Drop(hx, Ending.RELEASED), Take(xyz)]  # one Take for all three names
    assert table.taken(xyz, [1, 2, 3]) == [Granted(xyz)]
    assert xyz.tokens == [1, 2, 3]


def test_a_ticket_blocked_on_two_names_lists_each_blocker_once(table: CheckedTable) -> None:
    hxy = table.hold("a", ["x", "y"])
    hz = table.hold("b", ["z"])
    w, effects = table.acquire("c", ["y", "z", "x"])
    assert effects == [Queued(w, [hxy, hz])]


@pytest.mark.parametrize("first, second", [(["x", "y"], ["y", "x"]), (["y", "x"], ["x", "y"])])
def test_opposite_orders_never_deadlock(
    table: CheckedTable, first: list[str], second: list[str]
) -> None:
    hx = table.hold("hx", ["x"])
    hy = table.hold("hy", ["y"])
    p = table.wait("p", first)
    q = table.wait("q", second)
    assert table.release(hx) == [Drop(hx, Ending.RELEASED)]  # p still lacks y, q is behind p on x
    assert table.release(hy) == [Drop(hy, Ending.RELEASED), Take(p)]
    assert table.blockers(q) == [p]
    assert table.release(p) == [Drop(p, Ending.RELEASED), Take(q)]


def test_duplicate_names_count_once(table: CheckedTable) -> None:
    ticket, effects = table.acquire("a", ["x", "y", "x", "x"])
    assert effects == [Take(ticket)]
    assert ticket.names == ("x", "y")
    assert table.queue("x") == [ticket]
    table.taken(ticket, [1, 2])
    assert table.release(ticket) == [Drop(ticket, Ending.RELEASED)]
    assert table.names() == []


def test_names_may_be_any_iterable(table: CheckedTable) -> None:
    ticket, _ = table.acquire("a", (n for n in "xy"))
    assert ticket.names == ("x", "y")


def test_no_names_is_an_error_and_changes_nothing(table: CheckedTable) -> None:
    with pytest.raises(ValueError):
        table.acquire("a", [])
    assert len(table) == 0 and table.tickets_of("a") == []


# --- no-wait -------------------------------------------------------------------------------


def test_no_wait_on_a_busy_name_is_refused_with_blockers_and_not_queued(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w = table.wait("b", ["x"])
    nw, effects = table.acquire("c", ["x", "y"], wait=False)
    assert effects == [Refused(nw, Reason.BUSY, [h])]
    assert nw.state is State.ENDED
    assert table.queue("x") == [h, w]
    assert "y" not in table.names()
    assert table.tickets_of("c") == [] and len(table) == 2
    assert table.release(nw) == []


def test_no_wait_shared_obeys_fifo_too(table: CheckedTable) -> None:
    s = table.hold("a", ["x"], shared=True)
    e = table.wait("b", ["x"])
    nw, effects = table.acquire("c", ["x"], shared=True, wait=False)
    assert effects == [Refused(nw, Reason.BUSY, [s])]  # the holder the waiting `e` waits for
    assert table.waiters("x") == [e]


def test_no_wait_shared_joins_shared_holders(table: CheckedTable) -> None:
    table.hold("a", ["x"], shared=True)
    nw, effects = table.acquire("b", ["x"], shared=True, wait=False)
    assert effects == [Take(nw)]


def test_no_wait_blocked_outside_lockd_is_refused_and_lets_waiters_in(table: CheckedTable) -> None:
    nw, effects = table.acquire("a", ["x"], wait=False)
    assert effects == [Take(nw)]
    w = table.wait("b", ["x"])
    assert table.take_blocked(nw) == [Refused(nw, Reason.BUSY, []), Drop(nw, Ending.RELEASED), Take(w)]
    assert nw.state is State.ENDED
    assert table.take_blocked(nw) == []
    assert table.taken(nw) == []


def test_a_waiting_ticket_blocked_outside_lockd_stays_taking(table: CheckedTable) -> None:
    t, _ = table.acquire("a", ["x"])
    assert table.take_blocked(t) == []
    assert t.state is State.TAKING
    b, effects = table.acquire("b", ["x"])
    assert effects == [Queued(b, [t])]
    assert table.taken(t) == [Granted(t)]


def test_take_blocked_of_a_held_ticket_is_ignored(table: CheckedTable) -> None:
    t = table.hold("a", ["x"], wait=False)
    assert table.take_blocked(t) == []
    assert t.state is State.HELD


# --- deadlines -----------------------------------------------------------------------------


def test_a_waiting_ticket_times_out_at_its_deadline(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w = table.wait("b", ["x"], deadline=5.0)
    assert table.next_deadline() == 5.0
    assert table.expire(4.5) == []
    assert table.expire(5.0) == [Refused(w, Reason.TIMEOUT, [h])]  # no Drop: never taken
    assert w.state is State.ENDED
    assert table.next_deadline() is None
    assert table.queue("x") == [h]


def test_a_ticket_taking_at_once_times_out_while_blocked_outside(table: CheckedTable) -> None:
    t, effects = table.acquire("a", ["x"], deadline=5.0)
    assert effects == [Take(t)]
    assert table.take_blocked(t) == []
    assert table.next_deadline() == 5.0
    assert table.expire(6.0) == [Refused(t, Reason.TIMEOUT, []), Drop(t, Ending.RELEASED)]
    assert table.taken(t) == []  # the backend finished just too late: its Drop is on its way


def test_a_ticket_granted_after_waiting_can_time_out_while_taking(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w = table.wait("b", ["x"], deadline=5.0)
    assert table.release(h) == [Drop(h, Ending.RELEASED), Take(w)]
    assert table.next_deadline() == 5.0
    assert table.expire(5.0) == [Refused(w, Reason.TIMEOUT, []), Drop(w, Ending.RELEASED)]


def test_a_held_ticket_ignores_its_deadline(table: CheckedTable) -> None:
    t, _ = table.acquire("a", ["x"], deadline=5.0)
    table.taken(t)
    assert table.next_deadline() is None
    assert table.expire(100.0) == []
    assert t.state is State.HELD


def test_next_deadline_skips_tickets_no_longer_timed(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w1 = table.wait("b", ["x"], deadline=1.0)
    w2 = table.wait("c", ["x"], deadline=3.0)
    table.wait("d", ["x"], deadline=2.0)
    table.release(w1)
    assert table.next_deadline() == 2.0
    table.drop_owner("d")
    assert table.next_deadline() == 3.0
    table.release(h)
    table.taken(w2)
    assert table.next_deadline() is None
    assert table.expire(10.0) == []


def test_expire_fails_tickets_in_deadline_order_then_arrival_order(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    late = table.wait("b", ["x"], deadline=3.0)
    tie1 = table.wait("c", ["y", "x"], deadline=2.0)
    tie2 = table.wait("d", ["x"], deadline=2.0)
    assert table.expire(3.0) == [
        Refused(tie1, Reason.TIMEOUT, [h]),
        Refused(tie2, Reason.TIMEOUT, [h]),
        Refused(late, Reason.TIMEOUT, [h]),
    ]
    assert table.names() == ["x"]


def test_what_is_due_at_once_goes_in_arrival_order_whenever_its_deadline_was_set(table: CheckedTable) -> None:
    """A lease broken after a later request arrived, its grace ending at that request's
    deadline, still goes first: the order depends on the tickets alone, so a handed-over
    table keeps it."""
    h = table.hold("a", ["x"])
    o = table.hold("b", ["y"])
    w = table.wait("c", ["y"], deadline=5.0)
    table.force_release("x", grace_until=5.0)
    assert table.expire(5.0) == [Drop(h, Ending.OVERDUE), Refused(w, Reason.TIMEOUT, [o])]


def test_expiry_of_a_waiting_exclusive_lets_the_shared_behind_it_in(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    e = table.wait("b", ["x"], deadline=5.0)
    s2 = table.wait("c", ["x"], shared=True)
    assert table.expire(5.0) == [Refused(e, Reason.TIMEOUT, [s1]), Take(s2)]


def test_a_ticket_granted_by_expire_past_its_own_deadline_times_out_too(table: CheckedTable) -> None:
    """Its deadline passed while it was still TAKING, as far as the table can tell."""
    h, _ = table.acquire("a", ["x"], deadline=1.0)
    w = table.wait("b", ["x"], deadline=2.0)
    assert table.expire(2.0) == [
        Refused(h, Reason.TIMEOUT, []), Drop(h, Ending.RELEASED),
        Take(w), Refused(w, Reason.TIMEOUT, []), Drop(w, Ending.RELEASED),
    ]


def test_finished_tickets_are_not_kept_alive_by_their_deadlines() -> None:
    class Info:
        pass

    table = LockTable()
    infos = []
    for _ in range(2000):
        info = Info()
        infos.append(weakref.ref(info))
        ticket, _ = table.acquire("a", ["x"], deadline=1e9, now=0.0, info=info)
        table.taken(ticket, [1], now=0.0)
        table.release(ticket)
    del info, ticket
    gc.collect()
    assert sum(ref() is not None for ref in infos) < 200
    table.check()


def test_a_name_held_alone_costs_little_more_than_its_ticket() -> None:
    # Most names have one holder and nobody waiting: a daemon holding many leases is mostly
    # those. Such a name keeps its ticket as its entry, not a queue: a lease costs its ticket
    # (120 bytes) and arrival number (28), a place in `held` and an entry in the table's
    # index of names and in that of owners, 280 to 310 bytes as the dicts grow in steps; a
    # queue with its holder would add about 300 bytes more.
    names = [(f"name-{i}",) for i in range(2000)]
    tokens = [1]
    table = LockTable()
    held = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:
            ticket, _ = table.acquire("a", name, now=0.0)
            table.taken(ticket, tokens, now=0.0)
            held.append(ticket)
        per_lease = (tracemalloc.get_traced_memory()[0] - before) / len(names)
    finally:
        tracemalloc.stop()
    assert [table._lines[name] for (name,) in names] == held
    assert per_lease < 400, per_lease
    table.check()


def test_a_refused_request_leaves_a_name_held_alone_as_it_was() -> None:
    table = LockTable()
    held, _ = table.acquire("a", ["x", "s"], slots={"s": 1}, now=0.0)
    table.taken(held, [1], now=0.0)
    for names, extra in [(["x"], {"wait": False}), (["s"], {"wait": False, "slots": {"s": 1}}), (["s"], {})]:
        refused, effects = table.acquire("b", names, now=0.0, **extra)
        assert isinstance(effects[0], Refused) and refused.state is State.ENDED
        assert table._lines == {"x": held, "s": held}
    table.check()


# --- taken, release ------------------------------------------------------------------------


def test_taken_after_the_ticket_ended_is_ignored(table: CheckedTable) -> None:
    t, _ = table.acquire("a", ["x"])
    w = table.wait("b", ["x"])
    assert table.release(t) == [Drop(t, Ending.RELEASED), Take(w)]
    assert table.taken(t) == []
    assert (t.state, t.tokens) == (State.ENDED, None)


def test_taken_twice_grants_once(table: CheckedTable) -> None:
    t = table.hold("a", ["x"])
    assert table.taken(t, [9]) == []
    assert t.tokens == [0]


def test_release_is_idempotent(table: CheckedTable) -> None:
    t = table.hold("a", ["x"])
    assert table.release(t) == [Drop(t, Ending.RELEASED)]
    assert table.release(t) == []
    assert len(table) == 0 and table.names() == [] and table.tickets_of("a") == []


def test_release_of_a_taking_ticket_drops_it(table: CheckedTable) -> None:
    t, _ = table.acquire("a", ["x"])
    assert table.release(t) == [Drop(t, Ending.RELEASED)]


@pytest.mark.parametrize("end", [CheckedTable.release, CheckedTable.lose])
def test_ending_a_waiting_exclusive_unblocks_the_shared_behind_it(
    table: CheckedTable, end: Callable[[CheckedTable, Ticket], list[Effect]]
) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    e = table.wait("b", ["x"])
    s2 = table.wait("c", ["x"], shared=True)
    s3 = table.wait("d", ["x"], shared=True)
    assert end(table, e) == [Take(s2), Take(s3)]  # no Drop, no Lost: e never held anything
    assert e.state is State.ENDED
    assert table.queue("x") == [s1, s2, s3]


def test_withdrawing_a_multi_name_waiter_unblocks_each_of_its_names(table: CheckedTable) -> None:
    hx = table.hold("a", ["x"])
    xy = table.wait("b", ["x", "y"])
    wy = table.wait("c", ["y"])
    wx = table.wait("d", ["x"])
    assert table.release(xy) == [Take(wy)]
    assert table.release(hx) == [Drop(hx, Ending.RELEASED), Take(wx)]


# --- owners --------------------------------------------------------------------------------


def test_drop_owner_ends_its_held_and_waiting_tickets(table: CheckedTable) -> None:
    held = table.hold("o", ["x"])
    other = table.hold("p", ["y"])
    waiting = table.wait("o", ["y"])
    next_x = table.wait("p", ["x"])
    assert table.drop_owner("o") == [Drop(held, Ending.ABANDONED), Take(next_x)]
    assert (held.state, waiting.state) == (State.ENDED, State.ENDED)
    assert table.tickets_of("o") == []
    assert table.queue("y") == [other]


def test_drop_owner_never_takes_for_the_departing_owner(table: CheckedTable) -> None:
    first = table.hold("o", ["x"])
    table.wait("o", ["x"])  # would be next once `first` goes
    third = table.wait("p", ["x"])
    assert table.drop_owner("o") == [Drop(first, Ending.ABANDONED), Take(third)]


def test_drop_owner_drops_everything_before_taking_anything(table: CheckedTable) -> None:
    a = table.hold("o", ["x"])
    b = table.hold("o", ["y"])
    wx = table.wait("p", ["x"])
    wy = table.wait("q", ["y"])
    effects = table.drop_owner("o")
    assert effects[:2] == [Drop(a, Ending.ABANDONED), Drop(b, Ending.ABANDONED)]
    assert sorted(effects[2:], key=lambda e: e.ticket.names) == [Take(wx), Take(wy)]


def test_drop_owner_of_an_unknown_owner_does_nothing(table: CheckedTable) -> None:
    table.hold("o", ["x"])
    assert table.drop_owner("nobody") == []
    assert len(table) == 1


# --- lose, force_release -------------------------------------------------------------------


def test_lose_a_held_lease_tells_its_owner(table: CheckedTable) -> None:
    t = table.hold("a", ["x"])
    w = table.wait("b", ["x"])
    assert table.lose(t, "etcd lease expired") == [
        Lost(t, "etcd lease expired"), Drop(t, Ending.ABANDONED), Take(w),
    ]
    assert table.lose(t, "again") == []


def test_lose_a_taking_ticket_drops_it_without_lost(table: CheckedTable) -> None:
    t, _ = table.acquire("a", ["x"])
    assert table.lose(t) == [Drop(t, Ending.ABANDONED)]


def test_force_release_breaks_held_leases_only(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    s2 = table.hold("b", ["x", "y"], shared=True)
    s3, _ = table.acquire("c", ["x"], shared=True)  # TAKING: not broken
    e = table.wait("d", ["x"])
    count, effects = table.force_release("x", "by admin", grace_until=30.0)
    assert count == 2
    assert effects == [Lost(s1, "by admin"), Lost(s2, "by admin")]
    # Broken, not ended: they hold x (and y) until their owners have stopped their work.
    assert (s1.state, s2.state) == (State.BREAKING, State.BREAKING)
    assert table.queue("x") == [s1, s2, s3, e]
    assert table.holders("y") == [s2]
    assert table.release(s1) == [Drop(s1, Ending.RELEASED)]
    assert table.drop_owner("b") == [Drop(s2, Ending.ABANDONED)]  # it may have been cut off, and work on
    assert table.release(s3) == [Drop(s3, Ending.RELEASED), Take(e)]


def test_a_broken_lease_is_released_under_its_owner_once_its_grace_passes(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w = table.wait("b", ["x"], deadline=100.0)
    table.force_release("x", "by admin", grace_until=30.0)
    assert table.next_deadline() == 30.0
    assert table.expire(29.9) == []
    assert table.expire(30.0) == [Drop(h, Ending.OVERDUE), Take(w)]
    assert table.next_deadline() == 100.0  # w's own deadline still counts while it is taken


def test_forcing_a_release_twice_does_not_wait_for_the_owner(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w = table.wait("b", ["x"])
    assert table.force_release("x", "once", grace_until=30.0) == (1, [Lost(h, "once")])
    assert table.force_release("x", "twice", grace_until=60.0) == (1, [Drop(h, Ending.RELEASED), Take(w)])


def test_force_release_of_a_name_nobody_holds(table: CheckedTable) -> None:
    assert table.force_release("x", grace_until=1.0) == (0, [])
    w, _ = table.acquire("a", ["x"])
    assert table.force_release("x", grace_until=1.0) == (0, [])
    assert w.state is State.TAKING


# --- reassign ------------------------------------------------------------------------------


def test_reassign_moves_a_ticket_to_another_owner(table: CheckedTable) -> None:
    t = table.hold("conn", ["x"])
    kept = table.hold("conn", ["y"])
    table.reassign(t, "pid 42")
    assert table.tickets_of("conn") == [kept]
    assert table.tickets_of("pid 42") == [t]
    assert t.owner == "pid 42"
    assert table.drop_owner("conn") == [Drop(kept, Ending.ABANDONED)]
    assert t.state is State.HELD
    assert table.drop_owner("pid 42") == [Drop(t, Ending.ABANDONED)]


def test_reassign_to_the_same_owner_or_of_an_ended_ticket_does_nothing(table: CheckedTable) -> None:
    t = table.hold("a", ["x"])
    table.reassign(t, "a")
    assert table.tickets_of("a") == [t]
    table.release(t)
    table.reassign(t, "b")
    assert t.owner == "a" and table.tickets_of("b") == []


# --- queries -------------------------------------------------------------------------------


def test_queries_follow_arrival_order(table: CheckedTable) -> None:
    s = table.hold("a", ["y", "x"], shared=True)
    e = table.wait("b", ["x"])
    s2 = table.wait("a", ["x", "z"], shared=True)
    assert table.queue("x") == [s, e, s2]
    assert table.queue("nothing") == []
    assert table.names() == ["y", "x", "z"]
    assert table.tickets_of("a") == [s, s2]
    assert table.tickets_of("nobody") == []
    assert len(table) == 3


def test_holders_are_in_grant_order_and_waiters_in_arrival_order(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    ey = table.hold("b", ["y"])
    sxy = table.wait("c", ["x", "y"], shared=True)  # held back by y only
    s3, effects = table.acquire("d", ["x"], shared=True)
    assert effects == [Take(s3)]
    assert table.holders("x") == [s1, s3]
    assert table.waiters("x") == [sxy]
    assert table.queue("x") == [s1, s3, sxy]
    assert table.release(ey) == [Drop(ey, Ending.RELEASED), Take(sxy)]
    assert table.holders("x") == [s1, s3, sxy]
    assert table.holders("nothing") == [] and table.waiters("nothing") == []


def test_blockers_are_the_holders_in_the_way(table: CheckedTable) -> None:
    s = table.hold("a", ["x"], shared=True)
    e = table.wait("b", ["x"])
    s2 = table.wait("c", ["x"], shared=True)
    e2 = table.wait("d", ["x"])
    assert table.blockers(s) == []
    assert table.blockers(e) == [s]
    assert table.blockers(s2) == [s]  # s2 could share with s, but waits for e, which waits for s
    assert table.blockers(e2) == [s]


def test_waiting_counts_follow_waiting_tickets_only(table: CheckedTable) -> None:
    h = table.hold("a", ["x"])
    w1 = table.wait("b", ["x", "y"])
    w2 = table.wait("b", ["y"])
    table.acquire("c", ["x"], wait=False)  # refused: never waits
    assert (table.waiting_of("a"), table.waiting_of("b"), table.waiting_of("c")) == (0, 2, 0)
    assert (table.waiting_on("x"), table.waiting_on("y"), table.waiting_on("z")) == (1, 2, 0)
    assert table.waiting_count() == 2
    table.reassign(w2, "pid 9")
    assert (table.waiting_of("b"), table.waiting_of("pid 9")) == (1, 1)
    table.release(h)  # w1 is granted: it no longer waits
    assert (table.waiting_of("b"), table.waiting_on("x"), table.waiting_on("y")) == (0, 0, 1)
    table.drop_owner("pid 9")
    assert (table.waiting_count(), table.waiting_on("y")) == (0, 0)
    assert w1.state is State.TAKING


# --- where the backend orders requests -----------------------------------------------------


@pytest.fixture
def ordered() -> Iterator[CheckedTable]:
    checked = CheckedTable(ordered_by_backend=True)
    yield checked
    checked.finish()


def test_where_the_backend_orders_every_request_goes_to_it_at_once(ordered: CheckedTable) -> None:
    """Whatever this host holds or awaits: another host's request may be ahead of them all."""
    held = ordered.hold("a", ["x"])
    requests = [
        ordered.acquire("b", ["x"]),  # exclusive behind an exclusive holder
        ordered.acquire("c", ["x"], shared=True),  # shared behind them
        ordered.acquire("d", ["y", "x"]),  # several names, one of them held
        ordered.acquire("e", ["x"], wait=False),  # no-wait: the backend refuses it, not the table
    ]
    assert [effects for _, effects in requests] == [[Take(t)] for t, _ in requests]
    tickets = [t for t, _ in requests]
    assert all(t.state is State.TAKING for t in tickets)
    assert ordered.holders("x") == [held, *tickets] and ordered.waiters("x") == []


def test_where_the_backend_orders_it_grants_in_its_own_order(ordered: CheckedTable) -> None:
    first, _ = ordered.acquire("a", ["x"])
    second, _ = ordered.acquire("b", ["x"])
    # etcd recorded the second one first (its put was answered first): it is granted first.
    assert ordered.taken(second, [7]) == [Granted(second)]
    assert ordered.release(second) == [Drop(second, Ending.RELEASED)]  # grants nothing itself
    assert first.state is State.TAKING
    assert ordered.taken(first, [9]) == [Granted(first)]


def test_where_the_backend_orders_requests_wait_until_granted(ordered: CheckedTable) -> None:
    h = ordered.hold("a", ["x"])
    w1, _ = ordered.acquire("b", ["x", "y"])
    w2, _ = ordered.acquire("b", ["y"])
    assert (ordered.waiting_of("a"), ordered.waiting_of("b")) == (0, 2)
    assert (ordered.waiting_on("x"), ordered.waiting_on("y"), ordered.waiting_count()) == (1, 2, 2)
    ordered.reassign(w2, "pid 9")
    assert (ordered.waiting_of("b"), ordered.waiting_of("pid 9")) == (1, 1)
    ordered.release(h)
    ordered.taken(w1)
    assert (ordered.waiting_of("b"), ordered.waiting_on("x"), ordered.waiting_on("y")) == (0, 0, 1)
    ordered.drop_owner("pid 9")
    assert ordered.waiting_count() == 0


def test_where_the_backend_orders_the_holders_in_the_way_are_the_granted_ones(ordered: CheckedTable) -> None:
    s = ordered.hold("a", ["x"], shared=True)
    e, _ = ordered.acquire("b", ["x"])
    s2, _ = ordered.acquire("c", ["x"], shared=True)
    # The table does not know the backend's queue: only holders are named, and a shared
    # request that still waits must wait behind an exclusive one, so for every holder.
    assert (ordered.blockers(e), ordered.blockers(s2), ordered.blockers(s)) == ([s], [s], [])
    nw, _ = ordered.acquire("d", ["x"], shared=True, wait=False)
    assert ordered.take_blocked(nw) == [Refused(nw, Reason.BUSY, [s]), Drop(nw, Ending.RELEASED)]
    assert ordered.take_blocked(e) == []  # a waiting one stays in the backend's queue
    assert e.state is State.TAKING


def test_where_the_backend_orders_a_request_times_out_in_its_queue(ordered: CheckedTable) -> None:
    h = ordered.hold("a", ["x"])
    w, _ = ordered.acquire("b", ["x"], deadline=5.0)
    assert ordered.next_deadline() == 5.0
    assert ordered.expire(5.0) == [Refused(w, Reason.TIMEOUT, [h]), Drop(w, Ending.RELEASED)]
    assert ordered.taken(w) == []  # the backend finished just too late: its Drop is on its way
    assert ordered.waiting_count() == 0


def test_where_the_backend_orders_a_forced_release_and_departures_work_as_ever(ordered: CheckedTable) -> None:
    h = ordered.hold("a", ["x"])
    w, _ = ordered.acquire("b", ["x"])
    assert ordered.force_release("x", "by admin", grace_until=30.0) == (1, [Lost(h, "by admin")])
    assert (h.state, w.state) == (State.BREAKING, State.TAKING)
    assert ordered.expire(30.0) == [Drop(h, Ending.OVERDUE)]
    assert ordered.drop_owner("b") == [Drop(w, Ending.ABANDONED)]


# --- exhaustive ----------------------------------------------------------------------------

NAME_SETS = [("x",), ("y",), ("x", "y"), ("y", "x")]
REQUESTS = [(shared, names) for shared in (False, True) for names in NAME_SETS]


def _conflict(a: Ticket, b: Ticket) -> bool:
    return bool(set(a.names) & set(b.names)) and not (a.shared and b.shared)


@pytest.mark.parametrize("release_order", list(itertools.permutations(range(3))))
def test_every_trio_of_requests_is_granted_in_fifo_order(release_order: tuple[int, ...]) -> None:
    """Three requests of every mode and name set; whoever holds releases, in every order.

    Every ticket is granted eventually (no deadlock), each exactly once, and a ticket is
    granted only after every conflicting ticket that arrived before it.
    """
    for requests in itertools.product(REQUESTS, repeat=3):
        table = CheckedTable()
        tickets = [
            table.acquire(i, names, shared=shared)[0] for i, (shared, names) in enumerate(requests)
        ]
        granted: list[Ticket] = [t for t in tickets if t.state is State.TAKING]
        while len(table):
            holder = next(tickets[i] for i in release_order if tickets[i].holding)
            for effect in table.release(holder):
                if isinstance(effect, Take):
                    granted.append(effect.ticket)
        assert sorted(map(id, granted)) == sorted(map(id, tickets))
        for i, j in itertools.combinations(range(3), 2):
            if _conflict(tickets[i], tickets[j]):
                assert granted.index(tickets[i]) < granted.index(tickets[j]), requests
        table.finish()


def test_a_shared_request_behind_a_writer_names_every_holder_the_writer_waits_for(table: CheckedTable) -> None:
    s1 = table.hold("a", ["x"], shared=True)
    s2 = table.hold("b", ["x", "y"], shared=True)
    table.wait("c", ["x"])
    late = table.wait("d", ["y", "x"], shared=True)
    assert table.blockers(late) == [s1, s2]  # on x, where the writer waits; y admits it
    nw, effects = table.acquire("e", ["x"], shared=True, wait=False)
    assert effects == [Refused(nw, Reason.BUSY, [s1, s2])]
    free, effects = table.acquire("f", ["y"], shared=True)  # nothing exclusive waits on y
    assert effects == [Take(free)] and table.blockers(free) == []


# --- counting semaphores -------------------------------------------------------------------


def _sem(n: int, name: str = "s") -> dict[str, int]:
    return {name: n}


def test_a_semaphore_admits_up_to_its_slots_then_queues(table: CheckedTable) -> None:
    a = table.hold("a", ["s"], slots=_sem(2))
    b = table.hold("b", ["s"], slots=_sem(2))
    c, effects = table.acquire("c", ["s"], slots=_sem(2))
    assert effects == [Queued(c, [a, b])]
    assert table.blockers(c) == [a, b]
    assert table.holders("s") == [a, b] and table.waiters("s") == [c]
    assert table.slots_of("s") == 2
    assert table.release(a) == [Drop(a, Ending.RELEASED), Take(c)]
    assert table.holders("s") == [b, c]


def test_a_semaphore_of_one_slot_excludes_like_a_lock(table: CheckedTable) -> None:
    a = table.hold("a", ["s"], slots=_sem(1))
    b = table.wait("b", ["s"], slots=_sem(1))
    assert table.blockers(b) == [a]
    assert table.release(a) == [Drop(a, Ending.RELEASED), Take(b)]


def test_the_mode_of_a_semaphore_ticket_does_not_matter_on_the_semaphore(table: CheckedTable) -> None:
    """A slot is a slot: shared or exclusive only speaks for a ticket's lock names."""
    e = table.hold("a", ["s"], slots=_sem(2))
    s = table.hold("b", ["s"], shared=True, slots=_sem(2))
    e2 = table.wait("c", ["s"], shared=True, slots=_sem(2))
    assert table.blockers(e2) == [e, s]
    assert table.release(s) == [Drop(s, Ending.RELEASED), Take(e2)]


def test_semaphore_waiters_are_granted_in_arrival_order_as_slots_free(table: CheckedTable) -> None:
    h1 = table.hold("h1", ["s"], slots=_sem(2))
    h2 = table.hold("h2", ["s"], slots=_sem(2))
    w = [table.wait(f"w{i}", ["s"], slots=_sem(2)) for i in range(4)]
    assert table.waiters("s") == w
    assert table.release(h2) == [Drop(h2, Ending.RELEASED), Take(w[0])]
    assert (w[1].state, w[2].state, w[3].state) == (State.WAITING,) * 3
    assert table.release(w[0]) == [Drop(w[0], Ending.RELEASED), Take(w[1])]
    assert table.release(h1) == [Drop(h1, Ending.RELEASED), Take(w[2])]
    assert len(table.holders("s")) == 2
    assert table.release(w[1]) == [Drop(w[1], Ending.RELEASED), Take(w[3])]


def test_releasing_several_slots_at_once_grants_that_many_waiters_in_order(table: CheckedTable) -> None:
    held = [table.hold("o", ["s"], slots=_sem(3)) for _ in range(3)]
    w = [table.wait(f"w{i}", ["s"], slots=_sem(3)) for i in range(4)]
    effects = table.drop_owner("o")
    assert effects == [*(Drop(t, Ending.ABANDONED) for t in held), Take(w[0]), Take(w[1]), Take(w[2])]
    assert w[3].state is State.WAITING and table.blockers(w[3]) == w[:3]


def test_a_later_ticket_may_take_a_slot_an_earlier_waiter_does_not_need(table: CheckedTable) -> None:
    """`both` waits for the lock x only: a later ticket may take the spare slot, and `both`
    is granted as soon as x frees, into the slot it was always owed."""
    h = table.hold("h", ["s"], slots=_sem(3))
    ex = table.hold("ex", ["x"])
    both = table.wait("both", ["s", "x"], slots=_sem(3))
    assert table.blockers(both) == [ex]  # s has a slot for it: only x is in its way
    late, effects = table.acquire("late", ["s"], slots=_sem(3))
    assert effects == [Take(late)]  # h, both: 2 < 3 ahead of it
    assert table.holders("s") == [h, late] and table.waiters("s") == [both]
    full, effects = table.acquire("full", ["s"], slots=_sem(3))
    assert effects == [Queued(full, [h, late])]  # h, both, late: 3 ahead of it
    assert table.release(ex) == [Drop(ex, Ending.RELEASED), Take(both)]
    assert len(table.holders("s")) == 3 and full.state is State.WAITING
    assert table.release(late) == [Drop(late, Ending.RELEASED), Take(full)]


def test_a_later_ticket_never_takes_the_slot_an_earlier_waiter_needs(table: CheckedTable) -> None:
    h = table.hold("h", ["s"], slots=_sem(2))
    ex = table.hold("ex", ["x"])
    both = table.wait("both", ["s", "x"], slots=_sem(2))
    late, effects = table.acquire("late", ["s"], slots=_sem(2))
    assert effects == [Queued(late, [h])]  # a slot is free, but it is the one `both` will take
    nw, effects = table.acquire("nw", ["s"], slots=_sem(2), wait=False)
    assert effects == [Refused(nw, Reason.BUSY, [h])]
    assert table.release(ex) == [Drop(ex, Ending.RELEASED), Take(both)]
    assert late.state is State.WAITING
    assert table.release(h) == [Drop(h, Ending.RELEASED), Take(late)]


def test_a_waiter_blocked_by_a_slot_and_a_lock_is_granted_once_both_free(table: CheckedTable) -> None:
    h = table.hold("h", ["s"], slots=_sem(1))
    ex = table.hold("ex", ["x"])
    both = table.wait("both", ["x", "s"], slots=_sem(1))
    assert table.blockers(both) == [ex, h]
    assert table.release(h) == [Drop(h, Ending.RELEASED)]  # s is free for it now, x is not
    assert table.blockers(both) == [ex]
    assert table.release(ex) == [Drop(ex, Ending.RELEASED), Take(both)]


def test_one_ticket_may_mix_semaphores_and_locks(table: CheckedTable) -> None:
    """`shared` is the mode on the lock names; every semaphore name takes one slot."""
    r1 = table.hold("r1", ["s", "x"], shared=True, slots=_sem(2))
    r2 = table.hold("r2", ["x", "s"], shared=True, slots=_sem(2))
    w, effects = table.acquire("w", ["x"])
    assert effects == [Queued(w, [r1, r2])]
    r3, effects = table.acquire("r3", ["s", "y"], shared=True, slots=_sem(2))
    assert effects == [Queued(r3, [r1, r2])]  # y is free, s is full
    two, effects = table.acquire("two", ["s", "t"], slots={"s": 2, "t": 1})
    assert effects == [Queued(two, [r1, r2])]
    assert (table.slots_of("s"), table.slots_of("t"), table.slots_of("x"), table.slots_of("y")) == (2, 1, None, None)
    assert table.release(r1) == [Drop(r1, Ending.RELEASED), Take(r3)]
    assert table.release(r2) == [Drop(r2, Ending.RELEASED), Take(w), Take(two)]
    assert repr(two) == "<Ticket s+t exclusive slots={'s': 2, 't': 1} taking owner='two'>"


def test_slots_of_follows_whoever_holds_or_awaits_the_name(table: CheckedTable) -> None:
    assert table.slots_of("s") is None
    h = table.hold("h", ["s"], slots=_sem(2))
    lock = table.hold("l", ["x"])
    assert (table.slots_of("s"), table.slots_of("x")) == (2, None)
    table.release(h)
    table.release(lock)
    assert table.slots_of("s") is None and table.names() == []


# --- semaphores: mismatches ----------------------------------------------------------------

#: (what the name is, what the request says): lock vs semaphore both ways, N vs M both ways.
MISMATCHES = [(None, 2), (2, None), (2, 3), (3, 2), (1, None), (None, 1)]


def _request(
    table: CheckedTable, owner: str, names: list[str], slots: int | None, **kwargs: Any
) -> tuple[Ticket, list[Effect]]:
    return table.acquire(owner, names, slots=None if slots is None else {"s": slots}, **kwargs)


def _snapshot(table: CheckedTable) -> tuple[object, ...]:
    names = table.names()
    return (
        names, [table.holders(n) for n in names], [table.waiters(n) for n in names],
        [table.slots_of(n) for n in names], len(table), table.waiting_count(), table.next_deadline(),
    )


@pytest.mark.parametrize("have, want", MISMATCHES)
@pytest.mark.parametrize("wait", [True, False])
def test_a_request_that_disagrees_with_the_holders_is_refused_at_once(
    table: CheckedTable, have: int | None, want: int | None, wait: bool
) -> None:
    held = [table.hold(f"h{i}", ["s"], slots=None if have is None else {"s": have}) for i in range(have or 1)]
    w = table.wait("w", ["s"], slots=None if have is None else {"s": have})  # full: w waits
    before = _snapshot(table)
    bad, effects = _request(table, "bad", ["x", "s"], want, wait=wait, deadline=9.0)
    # Mismatch comes first, even for a no-wait request that would be busy anyway.
    assert effects == [Refused(bad, Reason.MISMATCH, held, "s")]
    assert bad.state is State.ENDED
    assert _snapshot(table) == before  # x not even taken
    assert table.tickets_of("bad") == [] and table.release(bad) == []
    assert table.release(held[0]) == [Drop(held[0], Ending.RELEASED), Take(w)]


@pytest.mark.parametrize("have, want", MISMATCHES)
def test_a_request_that_disagrees_with_the_waiters_alone_is_refused_too(
    table: CheckedTable, have: int | None, want: int | None
) -> None:
    ex = table.hold("ex", ["x"])
    w, _ = _request(table, "w", ["x", "s"], have)  # nobody holds s: it only waits there
    assert table.holders("s") == [] and table.waiters("s") == [w]
    before = _snapshot(table)
    bad, effects = _request(table, "bad", ["s"], want)
    assert effects == [Refused(bad, Reason.MISMATCH, [], "s")]
    assert _snapshot(table) == before
    assert table.release(ex) == [Drop(ex, Ending.RELEASED), Take(w)]


@pytest.mark.parametrize("have, want", MISMATCHES)
def test_once_everyone_left_a_name_may_be_anything(table: CheckedTable, have: int | None, want: int | None) -> None:
    h, _ = _request(table, "h", ["s"], have)
    w, _ = _request(table, "w", ["s"], have)
    table.release(h)
    table.release(w)  # taking, or waiting behind h until h left
    assert table.names() == []
    new, effects = _request(table, "new", ["s"], want)
    assert effects == [Take(new)]
    assert table.slots_of("s") == want
    again, effects = _request(table, "again", ["s"], have)
    assert effects == [Refused(again, Reason.MISMATCH, [new], "s")]


def test_the_first_disagreeing_name_is_the_one_reported(table: CheckedTable) -> None:
    hs = table.hold("hs", ["s"], slots=_sem(2))
    ht = table.hold("ht", ["t"], slots=_sem(3, "t"))
    bad, effects = table.acquire("bad", ["u", "t", "s"], slots={"s": 2, "t": 2})
    assert effects == [Refused(bad, Reason.MISMATCH, [ht], "t")]  # s agrees; t does not
    ok, effects = table.acquire("ok", ["u", "t", "s"], slots={"s": 2, "t": 3})
    assert effects == [Take(ok)]
    assert table.queue("s") == [hs, ok]
    lock, effects = table.acquire("lock", ["u"])  # u is a lock for `ok`: a lock request agrees
    assert effects == [Queued(lock, [ok])]


def test_slots_for_a_name_the_request_does_not_make_changes_nothing(table: CheckedTable) -> None:
    """The edge refuses such a request; here, the slots of a name not asked for are moot."""
    lock = table.hold("l", ["x"])
    t, effects = table.acquire("t", ["x"], slots={"s": 2})
    assert effects == [Queued(t, [lock])]
    assert table.names() == ["x"] and table.slots_of("x") is None


# --- semaphores: no-wait, deadlines, forced releases, departures ---------------------------


def test_no_wait_on_a_full_semaphore_is_refused_busy_with_its_holders(table: CheckedTable) -> None:
    a = table.hold("a", ["s"], slots=_sem(2))
    nw, effects = table.acquire("nw", ["s"], slots=_sem(2), wait=False)
    assert effects == [Take(nw)]  # one slot was free
    table.taken(nw)
    full, effects = table.acquire("full", ["s", "y"], slots=_sem(2), wait=False)
    assert effects == [Refused(full, Reason.BUSY, [a, nw])]
    assert table.queue("s") == [a, nw] and "y" not in table.names()


def test_no_wait_into_a_free_slot_blocked_outside_names_no_holder_in_its_way(table: CheckedTable) -> None:
    """The table had a slot for it: the other slot holders are not what blocks it (the
    edge then looks for whoever holds the lock file outside lockd)."""
    a = table.hold("a", ["s"], slots=_sem(2))
    nw, effects = table.acquire("nw", ["s"], slots=_sem(2), wait=False)
    assert effects == [Take(nw)]
    assert table.blockers(nw) == []
    assert table.take_blocked(nw) == [Refused(nw, Reason.BUSY, []), Drop(nw, Ending.RELEASED)]
    assert table.queue("s") == [a]


def test_a_timed_out_semaphore_waiter_frees_its_place(table: CheckedTable) -> None:
    h = table.hold("h", ["s"], slots=_sem(2))
    ex = table.hold("ex", ["x"])
    both = table.wait("both", ["s", "x"], slots=_sem(2), deadline=5.0)
    late = table.wait("late", ["s"], slots=_sem(2), deadline=9.0)
    assert table.next_deadline() == 5.0
    assert table.expire(4.0) == []
    # Its place was the free slot: the waiter behind it gets it at once.
    assert table.expire(5.0) == [Refused(both, Reason.TIMEOUT, [ex]), Take(late)]
    assert table.holders("s") == [h, late] and table.holders("x") == [ex]
    assert table.next_deadline() == 9.0  # late is still taking


def test_a_timed_out_waiter_on_a_full_semaphore_names_its_holders(table: CheckedTable) -> None:
    h = table.hold("h", ["s"], slots=_sem(1))
    w1 = table.wait("w1", ["s"], slots=_sem(1), deadline=5.0)
    w2 = table.wait("w2", ["s"], slots=_sem(1))
    assert table.expire(5.0) == [Refused(w1, Reason.TIMEOUT, [h])]
    assert table.waiters("s") == [w2]
    assert table.release(h) == [Drop(h, Ending.RELEASED), Take(w2)]


def test_force_release_breaks_every_holder_of_a_semaphore(table: CheckedTable) -> None:
    a = table.hold("a", ["s"], slots=_sem(3))
    b = table.hold("b", ["s", "x"], slots=_sem(3))
    c, _ = table.acquire("c", ["s"], slots=_sem(3))  # TAKING: not broken
    w = table.wait("w", ["s"], slots=_sem(3))
    count, effects = table.force_release("s", "by admin", grace_until=30.0)
    assert count == 2
    assert effects == [Lost(a, "by admin"), Lost(b, "by admin")]
    assert (a.state, b.state, c.state, w.state) == (State.BREAKING, State.BREAKING, State.TAKING, State.WAITING)
    # Broken holders keep their slots until they let go.
    assert table.holders("s") == [a, b, c] and table.blockers(w) == [a, b, c]
    assert table.release(a) == [Drop(a, Ending.RELEASED), Take(w)]
    table.taken(c)
    count, effects = table.force_release("s", "again", grace_until=60.0)
    assert count == 2
    assert effects == [Drop(b, Ending.RELEASED), Lost(c, "again")]  # w is still taking
    assert table.expire(60.0) == [Drop(c, Ending.OVERDUE)]


def test_drop_owner_frees_its_slots_at_once(table: CheckedTable) -> None:
    mine = [table.hold("o", ["s"], slots=_sem(2)), table.hold("o", ["s"], slots=_sem(2))]
    mine_waiting = table.wait("o", ["s"], slots=_sem(2))
    w1 = table.wait("p", ["s"], slots=_sem(2))
    w2 = table.wait("q", ["s"], slots=_sem(2))
    w3 = table.wait("r", ["s"], slots=_sem(2))
    assert table.drop_owner("o") == [
        Drop(mine[0], Ending.ABANDONED), Drop(mine[1], Ending.ABANDONED), Take(w1), Take(w2),
    ]
    assert mine_waiting.state is State.ENDED and w3.state is State.WAITING


def test_waiting_counts_of_a_semaphore(table: CheckedTable) -> None:
    table.hold("a", ["s"], slots=_sem(1))
    table.wait("b", ["s", "x"], slots=_sem(1))
    table.wait("b", ["s"], slots=_sem(1))
    assert (table.waiting_of("b"), table.waiting_on("s"), table.waiting_on("x"), table.waiting_count()) == (2, 2, 1, 2)
    table.drop_owner("a")
    assert (table.waiting_of("b"), table.waiting_on("s"), table.waiting_on("x")) == (1, 1, 0)


# --- semaphores where the backend orders requests ------------------------------------------


def test_where_the_backend_orders_every_semaphore_request_goes_to_it_at_once(ordered: CheckedTable) -> None:
    a = ordered.hold("a", ["s"], slots=_sem(1))
    requests = [
        ordered.acquire("b", ["s"], slots=_sem(1)),
        ordered.acquire("c", ["s", "x"], slots=_sem(1)),
        ordered.acquire("d", ["s"], slots=_sem(1), wait=False),
    ]
    assert [effects for _, effects in requests] == [[Take(t)] for t, _ in requests]
    b, c, d = (t for t, _ in requests)
    assert ordered.holders("s") == [a, b, c, d] and ordered.waiters("s") == []
    assert ordered.slots_of("s") == 1
    # The holders in the way of one still in the backend's queue are the granted ones.
    assert (ordered.blockers(b), ordered.blockers(c), ordered.blockers(a)) == ([a], [a], [])
    assert ordered.take_blocked(d) == [Refused(d, Reason.BUSY, [a]), Drop(d, Ending.RELEASED)]
    assert ordered.release(a) == [Drop(a, Ending.RELEASED)]  # grants nothing itself
    assert ordered.taken(c) == [Granted(c)]  # the backend's order, not this host's
    assert ordered.blockers(b) == [c]


def test_where_the_backend_orders_a_mismatch_is_still_refused(ordered: CheckedTable) -> None:
    a = ordered.hold("a", ["s"], slots=_sem(2))
    q, _ = ordered.acquire("q", ["t"], slots=_sem(2, "t"))  # only in the backend's queue
    before = _snapshot(ordered)
    disagreeing: list[tuple[str, list[str], dict[str, int] | None]] = [
        ("b", ["s"], None), ("c", ["s"], {"s": 3}), ("d", ["x", "t"], {"t": 1}), ("e", ["t"], None),
    ]
    for owner, names, slots in disagreeing:
        bad, effects = ordered.acquire(owner, names, slots=slots)
        expected = ([a], "s") if "s" in names else ([q], "t")
        assert effects == [Refused(bad, Reason.MISMATCH, *expected)]
        assert bad.state is State.ENDED
    assert _snapshot(ordered) == before
    ordered.release(a)
    ordered.release(q)
    new, effects = ordered.acquire("new", ["s"])
    assert effects == [Take(new)] and ordered.slots_of("s") is None


def test_where_the_backend_orders_semaphore_deadlines_and_forced_releases_work_as_ever(ordered: CheckedTable) -> None:
    h = ordered.hold("a", ["s"], slots=_sem(1))
    w, _ = ordered.acquire("b", ["s"], slots=_sem(1), deadline=5.0)
    assert ordered.force_release("s", "by admin", grace_until=30.0) == (1, [Lost(h, "by admin")])
    assert ordered.expire(5.0) == [Refused(w, Reason.TIMEOUT, [h]), Drop(w, Ending.RELEASED)]
    assert ordered.drop_owner("a") == [Drop(h, Ending.ABANDONED)]
    assert ordered.names() == []
