"""Handing a lock table over: `LockTable.restored` from copies of `tickets()`.

The property: the model's random operations (tests/test_table_model.py) drive a table and a
twin in lockstep, and at random moments the twin is handed over (rebuilt from fresh copies of
its tickets, as a re-executed daemon rebuilds them). Every call and query must then answer
the same on both, ticket for ticket and field for field, the arrival counter included: the
rebuilt table is the old one, as far as anyone can tell. The unit tests show that a handover
that breaks an invariant is refused, saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis.stateful import precondition, rule

from lockd.table import Effect, LockTable, State, Ticket
from tests.test_table_model import OWNERS, OrderedTableMachine, TableMachine


def fields(thing: Ticket | Effect) -> dict[str, Any]:
    return {slot: getattr(thing, slot) for cls in type(thing).__mro__ for slot in getattr(cls, "__slots__", ())}


def rebuilt(ticket: Ticket) -> Ticket:
    """A fresh ticket with `ticket`'s fields, as a daemon rebuilds one from a handover."""
    copy = Ticket(
        ticket.owner, tuple(ticket.names), ticket.shared, ticket.wait, ticket.deadline, ticket.info, ticket.since,
        dict(ticket.slots) if ticket.slots else None,
    )
    copy.state, copy.seq = ticket.state, ticket.seq
    copy.tokens = None if ticket.tokens is None else list(ticket.tokens)
    return copy


def handed_over(table: LockTable) -> tuple[LockTable, dict[Ticket, Ticket]]:
    """`table` rebuilt from copies of its tickets, and which copy stands for which ticket."""
    old = table.tickets()
    new = [rebuilt(t) for t in old]
    restored = LockTable.restored(new, ordered_by_backend=table.ordered_by_backend, next_arrival=table.next_arrival)
    restored.check()
    return restored, dict(zip(old, new, strict=True))


class Twins:
    """A table and a twin driven in lockstep: every call goes to both, with the twin's
    tickets for the table's, must answer the same on both, and gives the table's answer."""

    def __init__(self, table: LockTable) -> None:
        self.table = table
        self.twin = LockTable(ordered_by_backend=table.ordered_by_backend)
        #: The twin's ticket for each of the table's, once either answered with it.
        self.twin_of: dict[Ticket, Ticket] = {}
        self.handovers = 0

    def hand_over(self) -> None:
        self.twin, copies = handed_over(self.twin)
        self.twin_of = {ours: copies.get(theirs, theirs) for ours, theirs in self.twin_of.items()}
        self.handovers += 1
        self.compare()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        ours, theirs = getattr(self.table, name), getattr(self.twin, name)

        def both(*args: Any, **kwargs: Any) -> Any:
            answer = theirs(*self._twin(args), **{k: self._twin(v) for k, v in kwargs.items()})
            expected = ours(*args, **kwargs)
            if name == "names":  # the one order a handover does not keep
                assert sorted(answer) == sorted(expected), (answer, expected)
            else:
                self._same(expected, answer)
            return expected

        return both

    def __len__(self) -> int:
        assert len(self.twin) == len(self.table)
        return len(self.table)

    def check(self) -> None:
        self.table.check()
        self.twin.check()
        self.compare()

    def compare(self) -> None:
        """Everything the table shows, asked of both."""
        assert len(self) == len(self.table.tickets())
        tickets = self.tickets()
        assert self.table.next_arrival == self.twin.next_arrival
        for name in self.names():
            for query in ("queue", "holders", "waiters", "slots_of", "waiting_on"):
                getattr(self, query)(name)
        for ticket in tickets:
            self.blockers(ticket)
        for owner in {*OWNERS, *(t.owner for t in tickets)}:
            self.tickets_of(owner)
            self.waiting_of(owner)
        self.waiting_count()
        self.next_deadline()

    def _twin(self, value: Any) -> Any:
        if isinstance(value, Ticket):
            return self.twin_of[value]
        if isinstance(value, (list, tuple)):
            return type(value)(self._twin(v) for v in value)
        return value

    def _same(self, ours: Any, theirs: Any) -> None:
        if isinstance(ours, Ticket):
            assert isinstance(theirs, Ticket), (ours, theirs)
            twin = self.twin_of.get(ours)
            if twin is None:  # new on both: acquire
                assert theirs not in self.twin_of.values(), f"{theirs} answers for {ours}, but is another's twin"
                twin = self.twin_of[ours] = theirs
            assert twin is theirs, f"{theirs} answers for {ours}, whose twin is {twin}"
            assert fields(ours) == fields(theirs), (fields(ours), fields(theirs))
        elif isinstance(ours, Effect):
            assert type(ours) is type(theirs), (ours, theirs)
            self._same(fields(ours), fields(theirs))
        elif isinstance(ours, dict):
            assert ours.keys() == theirs.keys()
            for key, value in ours.items():
                self._same(value, theirs[key])
        elif isinstance(ours, (list, tuple)):
            assert type(ours) is type(theirs) and len(ours) == len(theirs), (ours, theirs)
            for a, b in zip(ours, theirs, strict=True):
                self._same(a, b)
        else:
            assert ours == theirs, (ours, theirs)


class HandedOverMachine(TableMachine):
    """The model's machine, on twins whose twin is handed over at random moments."""

    def __init__(self) -> None:
        super().__init__()
        self.table = cast(LockTable, Twins(self.table))

    @precondition(lambda self: self.model.live)  # an empty one is a unit test's
    @rule()
    def hand_over(self) -> None:
        cast(Twins, self.table).hand_over()

    @precondition(lambda self: any(t.state in (State.HELD, State.BREAKING) for t in self.model.live))
    @rule()
    def hand_over_granted_leases(self) -> None:
        """As often again where leases are granted, which takes the machine a few steps."""
        cast(Twins, self.table).hand_over()


HandedOverMachine.TestCase.settings = TableMachine.TestCase.settings
test_a_handed_over_table_behaves_as_the_old_one = HandedOverMachine.TestCase


class OrderedHandedOverMachine(HandedOverMachine):
    ORDERED = OrderedTableMachine.ORDERED


OrderedHandedOverMachine.TestCase.settings = TableMachine.TestCase.settings
test_a_handed_over_table_ordered_by_the_backend_behaves_as_the_old_one = OrderedHandedOverMachine.TestCase


# --- unit tests ----------------------------------------------------------------------------


def test_holders_keep_the_order_they_were_let_through_not_their_arrival_order() -> None:
    table = LockTable()
    first, _ = table.acquire("a", ["s"], slots={"s": 3}, now=0)
    blocker, _ = table.acquire("b", ["y"], now=0)
    early, _ = table.acquire("c", ["s", "y"], slots={"s": 3}, now=0)
    late, _ = table.acquire("d", ["s"], slots={"s": 3}, now=0)
    table.release(blocker)
    assert table.holders("s") == [first, late, early]
    assert table.tickets() == [first, late, early]
    restored, copies = handed_over(table)
    assert restored.holders("s") == [copies[first], copies[late], copies[early]]


def test_waiting_tickets_queue_in_arrival_order_whatever_order_they_come_in() -> None:
    table = LockTable()
    for owner in "abc":
        table.acquire(owner, ["x"], now=0)
    restored = LockTable.restored(reversed([rebuilt(t) for t in table.tickets()]), ordered_by_backend=False)
    assert [t.owner for t in restored.waiters("x")] == ["b", "c"]


def test_arrivals_go_on_where_the_old_table_left_them() -> None:
    table = LockTable()
    kept, _ = table.acquire("a", ["x"], now=0)
    ended, _ = table.acquire("b", ["y"], now=0)
    table.release(ended)
    assert table.next_arrival == 3
    restored, _ = handed_over(table)
    assert restored.next_arrival == 3
    assert restored.acquire("c", ["z"], now=0)[0].seq == table.acquire("c", ["z"], now=0)[0].seq == 3
    assert LockTable.restored([rebuilt(kept)], ordered_by_backend=False).next_arrival == kept.seq + 1 == 2
    assert LockTable.restored([], ordered_by_backend=False).next_arrival == 1


def test_tickets_rebuilt_as_documented_are_taken_as_they_are() -> None:
    ticket = Ticket("a", ("x", "s"), True, False, 9.0, "pid 7", 4.0, {"s": 2})
    ticket.state, ticket.seq, ticket.tokens = State.BREAKING, 5, [1, 2]
    table = LockTable.restored([ticket], ordered_by_backend=False)
    table.check()
    assert table.tickets() == [ticket] and table.holders("x") == [ticket] and table.slots_of("s") == 2
    assert (ticket.state, ticket.seq, ticket.tokens, ticket.deadline, ticket.since) == (
        State.BREAKING, 5, [1, 2], 9.0, 4.0,
    )
    assert table.next_deadline() == 9.0
    assert table.tickets_of("a") == [ticket] and table.next_arrival == 6


def some_tickets(ordered_by_backend: bool = False) -> dict[str, Ticket]:
    """Copies of a table's tickets, by owner: a holds x; b waits to share it (deadline 10);
    c and d hold semaphore s of 2 slots, d still taking; e waits for s; f's lease on z is
    broken (grace until 5). Where the backend orders requests, b and e are taking."""
    table = LockTable(ordered_by_backend=ordered_by_backend)
    for owner, names, extra in [
        ("a", ["x"], {}), ("b", ["x"], {"shared": True, "deadline": 10.0}), ("c", ["s"], {"slots": {"s": 2}}),
        ("d", ["s"], {"slots": {"s": 2}}), ("e", ["s"], {"slots": {"s": 2}}), ("f", ["z"], {}),
    ]:
        ticket, _ = table.acquire(owner, names, now=0, **extra)
        if owner in "acf":
            table.taken(ticket, [0], now=1)
    table.force_release("z", "forced", grace_until=5.0)
    return {cast(str, t.owner): rebuilt(t) for t in table.tickets()}


def test_the_tickets_the_corruptions_start_from_are_a_table() -> None:
    tickets = some_tickets()
    assert [(owner, t.state) for owner, t in tickets.items()] == [
        ("a", State.HELD), ("c", State.HELD), ("d", State.TAKING), ("f", State.BREAKING),
        ("b", State.WAITING), ("e", State.WAITING),
    ]
    LockTable.restored(tickets.values(), ordered_by_backend=False).check()
    LockTable.restored(some_tickets(True).values(), ordered_by_backend=True).check()


Corruption = Callable[[dict[str, Ticket]], None]


def _set(owner: str, **values: Any) -> Corruption:
    def corrupt(tickets: dict[str, Ticket]) -> None:
        for field, value in values.items():
            setattr(tickets[owner], field, value)
    return corrupt


def _swap_arrivals(one: str, other: str) -> Corruption:
    def corrupt(tickets: dict[str, Ticket]) -> None:
        tickets[one].seq, tickets[other].seq = tickets[other].seq, tickets[one].seq
    return corrupt


def _leave_out(owner: str) -> Corruption:
    def corrupt(tickets: dict[str, Ticket]) -> None:
        del tickets[owner]
    return corrupt


#: How `some_tickets()` is corrupted, and what the refusal must say.
CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "two exclusive holders": (
        _set("b", state=State.HELD, shared=False, tokens=[0]), r"hold 'x' at once, not all shared",
    ),
    "a grantable waiter": (_leave_out("a"), r"<Ticket x shared waiting owner='b'> waits though it could be granted"),
    "a seq twice": (_set("c", seq=1), r"<Ticket s .*owner='c'> and <Ticket x .*owner='a'> have the same seq 1"),
    "an ENDED ticket": (_set("c", state=State.ENDED), r"<Ticket s .* ended owner='c'> cannot be live"),
    "mismatched slots": (
        _set("d", slots={"s": 3}), r"owner='d'> disagrees with <Ticket .*owner='c'> on what 's' is",
    ),
    "a holder ahead of an earlier waiter": (
        _swap_arrivals("a", "b"), r"owner='a'> holds 'x' ahead of <Ticket .*owner='b'>, which arrived earlier",
    ),
    "a semaphore holder ahead of an earlier waiter": (
        _swap_arrivals("d", "e"), r"owner='d'> holds a slot of 's' that <Ticket .*owner='e'>, which arrived earlier",
    ),
    "too many on a semaphore": (_set("e", state=State.TAKING), r"hold 's', a semaphore of 2 slots"),
    "a semaphore of no slots held alone": (_set("f", slots={"z": 0}), r"owner='f'>\] hold 'z', a semaphore of 0 slots"),
    "no seq": (_set("a", seq=0), r"owner='a'> has no place in the arrival order \(seq 0\)"),
    "a name twice": (_set("a", names=("x", "x")), r"owner='a'> must name each of its names once"),
    "no names": (_set("a", names=()), r"owner='a'> must name each of its names once"),
    "a broken lease with no grace": (_set("f", deadline=None), r"owner='f'> is broken with no grace to end it"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_broken_handover_is_refused_saying_what_is_wrong(corruption: str) -> None:
    corrupt, says = CORRUPTIONS[corruption]
    tickets = some_tickets()
    corrupt(tickets)
    with pytest.raises(ValueError, match=says):
        LockTable.restored(tickets.values(), ordered_by_backend=False)


def test_a_ticket_given_twice_is_refused() -> None:
    tickets = list(some_tickets().values())
    with pytest.raises(ValueError, match=r"owner='a'> is given twice"):
        LockTable.restored([*tickets, tickets[0]], ordered_by_backend=False)


def test_an_arrival_counter_behind_a_ticket_is_refused() -> None:
    tickets = some_tickets()
    with pytest.raises(ValueError, match=r"next arrival \(6\) would not come after <Ticket .*owner='f'>"):
        LockTable.restored(tickets.values(), ordered_by_backend=False, next_arrival=6)
    assert LockTable.restored(tickets.values(), ordered_by_backend=False, next_arrival=7).next_arrival == 7


def test_where_the_backend_orders_requests_a_waiting_ticket_is_refused() -> None:
    with pytest.raises(ValueError, match=r"<Ticket x shared waiting owner='b'> cannot be live"):
        LockTable.restored(some_tickets().values(), ordered_by_backend=True)


def test_where_the_backend_orders_requests_holders_out_of_arrival_order_are_refused() -> None:
    tickets = some_tickets(True)
    _swap_arrivals("a", "b")(tickets)
    with pytest.raises(ValueError, match=r"owner='b'> holds 'x' after <Ticket .*owner='a'>, which arrived later"):
        LockTable.restored(tickets.values(), ordered_by_backend=True)
