"""Unit tests of the census kept as tickets change state (`lockd.census.Tally`), driven by a
real `LockTable` as the service drives it and checked against a count of the table's
tickets after every step."""

from __future__ import annotations

import random

import pytest

from lockd import census
from lockd.census import MODES, Tally, mode_of
from lockd.table import BREAKING, HELD, TAKING, WAITING, Effect, Ended, Granted, LockTable, Take, Ticket


class Driven:
    """A table and its tally, told of every arrival, grant and end as the service tells it."""

    def __init__(self) -> None:
        self.table = LockTable()
        self.tally = Tally()
        self.taking: list[Ticket] = []
        self.now = 0.0

    def acquire(self, owner: int, names: list[str], *, shared: bool = False, wait: bool = True) -> Ticket:
        self.now += 1
        ticket, effects = self.table.acquire(owner, names, shared=shared, wait=wait, now=self.now)
        self.tally.arrived(ticket)
        self.apply(effects)
        return ticket

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if type(effect) is Take:
                self.taking.append(effect.ticket)
            elif type(effect) is Granted:
                self.tally.granted(effect.ticket)
            elif type(effect) is Ended:
                self.tally.ended(effect.ticket)

    def take(self, ticket: Ticket) -> None:
        self.taking.remove(ticket)
        if ticket.state is TAKING:
            self.apply(self.table.taken(ticket, [1] * len(ticket.names), now=self.now))

    def check(self) -> None:
        tickets = self.table.tickets()
        held = [t for t in tickets if t.state is HELD or t.state is BREAKING]
        waiting = [t for t in tickets if t.state is WAITING or t.state is TAKING]
        counted = self.tally.census()
        assert (counted.leases, counted.requests) == (len(held), len(waiting))
        assert counted.held == {m: sum(mode_of(t, n) == m for t in held for n in t.names) for m in MODES}
        assert counted.waiting == {m: sum(mode_of(t, n) == m for t in waiting for n in t.names) for m in MODES}
        assert counted.held_since == min((t.since for t in held), default=None)
        assert counted.waiting_since == min((t.since for t in waiting), default=None)


@pytest.mark.parametrize("min_sweep", [0, 2, 64])
def test_the_census_counts_what_the_table_holds_whenever_its_queues_are_swept(
    monkeypatch: pytest.MonkeyPatch, min_sweep: int
) -> None:
    # Below the default, queues are swept at nearly every transition: with tickets still in
    # the state (a sweep keeps exactly those) and with none (a sweep drops every entry).
    monkeypatch.setattr(census, "_MIN_SWEEP", min_sweep)
    rng = random.Random(min_sweep)
    d = Driven()
    for step in range(3000):
        tickets = d.table.tickets()
        r = rng.random()
        if r < 0.45 or not tickets:
            names = rng.sample("abc", rng.randint(1, 2))
            d.acquire(rng.randrange(5), names, shared=rng.random() < 0.3, wait=rng.random() < 0.8)
        elif r < 0.75 and d.taking:
            d.take(rng.choice(d.taking))
        elif r < 0.97:
            d.apply(d.table.release(rng.choice(tickets)))
        else:
            d.apply(d.table.force_release(rng.choice("abc"), "test", grace_until=d.now + 5)[1])
        if rng.random() < 0.02:
            d.apply(d.table.expire(d.now + 100))
        if step % 500 == 499:  # everyone lets go, and the states stay empty for a while
            for ticket in d.table.tickets():
                d.apply(d.table.release(ticket))
            d.taking.clear()
            for _ in range(3 * min_sweep + 10):
                ticket = d.acquire(9, ["z"])
                d.take(ticket)
                d.check()
                d.apply(d.table.release(ticket))
        d.check()


def test_a_lone_client_cycling_leaves_no_ended_ticket_in_the_census_past_a_sweep() -> None:
    # Nobody asks for the census meanwhile (finding the oldest drops the dead entries in
    # front): only the sweeps keep the queues short.
    d = Driven()
    for _ in range(1000):
        ticket = d.acquire(1, ["x"])
        d.take(ticket)
        d.apply(d.table.release(ticket))
        assert len(d.tally._by_held.entries) <= census._MIN_SWEEP
        assert len(d.tally._by_waiting.entries) <= census._MIN_SWEEP
    d.check()
