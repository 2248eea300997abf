"""Random runs of the lock service handed over to a new one (a re-exec), checked for exactness.

The machine drives a service as the model test (test_service_model) does: clients connect,
ask for locks, slots and several names at once (waiting, not waiting, with timeouts, tied
to processes), release, subscribe to lease events, hang up or stop reading; the backend
takes claims at once or later, finds them blocked, fails or loses them; processes exit;
locks are broken by force; time passes; the break grace is reloaded; the daemon stops. The
shell around the service (carrying out its orders, a fake backend and fake peers) is a
`Side`.

After every step at which the daemon could re-execute (not stopping, no look at the host
under way), and at random moments where it does, the service is handed over: its state
(`LockService.hand_over`, the fake backend's and peers' parts, a config) goes through the
state format (`handover.encode`, `handover.decode`) into a fresh service on a clock of
another offset (`LockService.adopt`), with fresh peers for the connections. Checked:
- taking the state changes nothing (taken twice, it is the same; the service's own view is
  as before);
- the adopted service passes `check()`, and everything it shows is what the old one shows:
  every live ticket with its place, state, tokens and times (relative to now), whom it is
  for and what it is tied to; every client's request ids, counts and subscriptions; the
  process owners; the census; the next arrival and deadline; the peers' unread input,
  unsent output and events; the welcome of a peer not yet greeted;
- the adoption orders exactly a WakeAt for each deadline, a Watch for each process and,
  in order, a StartTake for each ticket the backend was taking;
- from then on, both services are given the same inputs, in lockstep, and order the same:
  the same messages to corresponding peers, the same grants with the same tokens, the same
  takes and releases, the same events (the wall clock is one clock; WakeAt hints are left
  out, since the budget of log lines starts afresh by design, and the table's next deadline
  is compared instead; see `compared` for two orders no client can tell apart), and go on
  showing the same. A further handover is taken from the adopted service.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from lockd_client import errors, protocol

from lockd import handover
from lockd.backend import Claim
from lockd.config import Config
from lockd.orders import (
    Close,
    EndEvents,
    Grant,
    LookForHolders,
    Order,
    Publish,
    Record,
    Release,
    Send,
    StartTake,
    StopTake,
    Unwatch,
    WakeAt,
    Watch,
)
from lockd.policy import Policy
from lockd.processes import Processes, ProcessOwner
from lockd.service import Departed, LockService, party
from lockd.table import TAKING, LockTable, Ticket

from .test_service_model import (
    ACQUIRES,
    GRACES,
    MISSING_PID,
    NAMES,
    PROCESSES,
    SEMAPHORES,
    SLOTS,
    WALL_OFFSET,
    FakeBackend,
    conflict,
    limits,
)

#: What a peer may have in flight when the service is handed over.
SESSIONS = st.builds(
    handover.SessionState,
    fd=st.just(0),
    greeted=st.booleans(),
    unread=st.binary(max_size=12),
    outbox=st.binary(max_size=12),
    attached=st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(3, 999), min_size=1, max_size=2)), max_size=2),
    event_head=st.integers(0, 12),
    events=st.lists(st.tuples(st.none() | st.integers(1, 50), st.binary(max_size=8)), max_size=3),
)
LABELS = st.none() | st.sampled_from(["build", "deploy"])
#: Whether the backend answers takes at once where it can: mostly not, so that handovers
#: catch takes under way (as while a process outside lockd holds a lock file).
PROMPT = st.sampled_from([True, False, False])
#: The offsets of the adopted daemon's monotonic clock from the old one's.
OFFSETS = st.sampled_from([-50.0, 1000.0, 123456.0])
#: Requests as the model test makes them, but mostly agreeing on what each name is, so that
#: more of them live to be handed over.
REQUESTS = {**ACQUIRES, "slots": st.one_of(st.just(SEMAPHORES), st.just(SEMAPHORES), ACQUIRES["slots"])}


class FakePeer:
    """A connection as the service addresses it (lockd.orders.Peer), with what it was told
    and what it had in flight (`session`)."""

    def __init__(self, slot: str, uid: int, ident: int, label: str | None, session: handover.SessionState) -> None:
        self.slot = slot
        self.uid = uid
        self.ident = ident
        self.label = label
        self.session = session
        self.greeted = session.greeted
        self.closed = False
        #: It stopped reading: the next message to it cuts it off.
        self.deaf = False
        #: What it was sent, in order.
        self.inbox: list[object] = []
        #: Its welcome, as the service answered its hello.
        self.welcome: protocol.Welcome | None = None

    def send(self, message: object, fds: object = ()) -> None:
        raise AssertionError("the service never sends itself")

    def close(self, reason: str) -> None:
        raise AssertionError("the service never closes itself")

    def offer(self, subscription_id: int, message: object) -> bool:
        raise AssertionError("the service never offers itself")

    def end_events(self, subscription_id: int, notice: object | None) -> None:
        raise AssertionError("the service never ends events itself")

    def hand_over(self) -> handover.SessionState:
        return msgspec.structs.replace(self.session, fd=1000 + self.ident, greeted=self.greeted)

    def __repr__(self) -> str:
        return f"<FakePeer {self.slot} #{self.ident}>"


class BackendState(msgspec.Struct):
    """The fake backend's part of the state: the claims it holds or takes, in the order it
    was handed them (by their index among the tickets'), which of them it is taking, and its
    next token."""

    started: list[int]
    takes: list[int]
    next_token: int


class Side:
    """One daemon: a service, and the shell, backend and peers around it."""

    def __init__(self, ordered: bool, outlive: bool, config: Config, offset: float, now: Callable[[], float]) -> None:
        self.ordered = ordered
        self.outlive = outlive
        #: Its monotonic clock is the machine's plus `offset` (trio's has an offset of its own).
        self.offset = offset
        self.clock = lambda: now() + offset
        self.config = config
        self.policy = Policy.from_config(self.config.policy)
        self.backend = FakeBackend(orders_requests=ordered, leases_outlive_daemon=outlive)
        self.service = LockService(
            LockTable(ordered_by_backend=ordered), Processes(self.open_process), self.config.limits, self.policy,
            self.backend, clock=self.clock, wall_clock=lambda: now() + WALL_OFFSET,
        )
        self.pidfds = itertools.count(500)
        self.next_token = 1
        #: Open connections by slot; every peer by ident.
        self.peers: dict[str, FakePeer] = {}
        self.known: dict[int, FakePeer] = {}
        #: Whether the backend answers a take as it is ordered, where it can.
        self.prompt = True
        # The backend's ledger: claims in the order handed over (a dict for order), those it
        # is still taking, those released.
        self.started: dict[Claim, None] = {}
        self.takes: list[Claim] = []
        self.released: dict[Claim, bool] = {}
        self.looks: list[LookForHolders] = []
        self.recorded: list[protocol.LeaseEvent] = []
        self.watched: set[ProcessOwner] = set()
        self.stopped = False

    def open_process(self, pid: int) -> ProcessOwner:
        if pid not in PROCESSES:
            raise errors.NotHeld(f"process {pid} does not exist")
        return ProcessOwner(pid, PROCESSES[pid], f"process {pid}", next(self.pidfds))

    # --- the shell ----------------------------------------------------------------------------

    def run(self, adopting: bool = False) -> list[Order]:
        """Carry out the service's orders in order, and those they cause."""
        done: list[Order] = []
        queue = self.service.orders
        while queue:
            order = queue.popleft()
            done.append(order)
            self.carry_out(order, adopting)
        self.service.check()
        return done

    def carry_out(self, order: Order, adopting: bool) -> None:
        if isinstance(order, Send):
            self.deliver(order.peer, order.message)
        elif isinstance(order, Grant):
            assert order.claim in self.started and order.claim not in self.released, order
            self.deliver(order.peer, protocol.Granted(order.request_id, order.tokens))
            if order.peer.closed:
                self.service.grant_undelivered(order.claim)
        elif isinstance(order, StartTake):
            self.start_take(order.claim, adopting)
        elif isinstance(order, StopTake):
            if order.claim in self.takes:
                self.takes.remove(order.claim)
        elif isinstance(order, Release):
            assert order.claim in self.started and order.claim not in self.released, order
            assert order.claim not in self.takes, order
            self.released[order.claim] = order.unlock
        elif isinstance(order, Record):
            self.recorded.append(order.event)
        elif isinstance(order, Close):
            self.hang_up(order.peer, order.reason)
        elif isinstance(order, LookForHolders):
            self.looks.append(order)
        elif isinstance(order, Watch):
            assert order.owner not in self.watched, order
            self.watched.add(order.owner)
        elif isinstance(order, Unwatch):
            # (An owner opened for a request refused before its ticket was made is never watched.)
            assert order.owner.closed, order
            self.watched.discard(order.owner)
        elif isinstance(order, Publish):
            if self.service.subscribed(order.peer, order.subscription_id) and not order.peer.closed:
                self.deliver(order.peer, (order.subscription_id, order.event))
        elif isinstance(order, EndEvents):
            self.deliver(order.peer, ("end", order.subscription_id, order.notice))
        else:
            assert isinstance(order, WakeAt), order

    def start_take(self, claim: Claim, adopting: bool) -> None:
        if adopting:
            # Taken again after the handover, in its place in the backend's order.
            assert claim in self.started and claim not in self.takes, claim
        else:
            assert claim not in self.started, claim
            self.started[claim] = None
        if not self.service.taking(claim):
            return
        self.takes.append(claim)
        if self.prompt and not adopting:
            if self.its_turn(claim):
                self.answer_take(claim, "taken")
            elif not claim.wait:
                self.answer_take(claim, "blocked")

    def its_turn(self, claim: Claim) -> bool:
        if not self.ordered:
            return True
        ahead = list(itertools.takewhile(lambda other: other is not claim, self.started))
        return conflict(claim, [other for other in ahead if other not in self.released]) is None

    def answer_take(self, claim: Claim, answer: str) -> None:
        if answer == "taken" and not self.its_turn(claim):
            answer = "waits" if claim.wait else "blocked"
        if answer == "blocked" and claim.wait:
            answer = "waits"
        if answer == "waits":
            self.service.take_waits(claim, [protocol.Holder(pid=77, uid=0, command="flock x.lock")])
            return
        self.takes.remove(claim)
        if answer == "taken":
            tokens = list(range(self.next_token, self.next_token + len(claim.names)))
            self.next_token += len(claim.names)
            self.service.taken(claim, tokens)
        elif answer == "blocked":
            self.service.take_blocked(claim)
        else:
            self.service.take_failed(claim, errors.BadLockFile(f"{claim.names[0]}.lock is a directory"))

    def deliver(self, peer: Any, message: object) -> None:
        if peer.closed:
            return
        if peer.deaf:
            self.hang_up(peer, "it left too many replies unread")
            return
        peer.inbox.append(message)

    def hang_up(self, peer: Any, reason: str) -> None:
        if peer.closed:
            return
        peer.closed = True
        if self.peers.get(peer.slot) is peer:
            del self.peers[peer.slot]
        self.service.disconnected(peer, reason)

    # --- the handover -------------------------------------------------------------------------

    def state(self, history: list[protocol.LeaseEvent]) -> handover.State:
        """What this daemon hands over (as `Reexecutor._state` builds it)."""
        service = self.service
        handed = service.hand_over()
        index = {claim: i for i, claim in enumerate(handed.claims)}
        backend = BackendState(
            started=[index[c] for c in self.started if c not in self.released],
            takes=[index[c] for c in self.takes], next_token=self.next_token,
        )
        return handover.State(
            version=handover.VERSION, server="lockd test", paused_at=12.5, config=self.config, listeners=[],
            metrics_listener=None, connections=handed.connections, tickets=handed.tickets,
            processes=handed.processes, next_arrival=handed.next_arrival, next_connection=0, backend=self.backend.name,
            backend_state=msgspec.msgpack.encode(backend), backend_descriptors=[], history=history, reply_to=None,
        )

    @classmethod
    def adopted(
        cls, state: handover.State, old: Side, offset: float, now: Callable[[], float],
    ) -> tuple[Side, list[Claim], dict[Any, protocol.Welcome], list[Order]]:
        """A new daemon that took over `state` (as `Server.adopt` does), the claims and
        welcomes its service's adoption gave, and the orders it gave."""
        side = cls(old.ordered, old.outlive, state.config, offset, now)
        side.prompt = old.prompt
        sessions: dict[int, Any] = {}
        for connection in state.connections:
            if connection.session is not None:
                before = old.known[connection.client.ident]
                peer = FakePeer(
                    before.slot, before.uid, connection.client.ident, connection.client.label, connection.session,
                )
                peer.deaf, peer.welcome = before.deaf, before.welcome
                sessions[peer.ident] = side.known[peer.ident] = side.peers[peer.slot] = peer
        claims, welcomes = side.service.adopt(state, sessions)
        orders = list(side.service.orders)
        backend = msgspec.msgpack.decode(state.backend_state, type=BackendState)
        side.started = dict.fromkeys(claims[i] for i in backend.started)
        side.next_token = backend.next_token
        # What the backend was taking it takes again, as its StartTakes order (see `run`).
        assert sorted(backend.takes) == sorted(i for i, c in enumerate(claims) if side.service.taking(c))
        side.watched = set()
        return side, claims, welcomes, orders


# --- comparing two daemons ------------------------------------------------------------------


class Pairing:
    """Which object of the adopted daemon stands for which of the old one's (peers, claims,
    process owners): one to one, learnt as they first show up together."""

    def __init__(self) -> None:
        self.ahead: dict[object, object] = {}
        self.back: dict[object, object] = {}

    def pair(self, old: object, new: object) -> None:
        if old in self.ahead:
            assert self.ahead[old] is new, f"{new!r} stands for {old!r}, which is {self.ahead[old]!r}'s"
        else:
            assert new not in self.back, f"{new!r} stands for {old!r} and {self.back[new]!r}"
            self.ahead[old], self.back[new] = new, old

    def same(self, old: object, new: object) -> None:
        """Assert `old` (a value of the old daemon's) is `new` (the adopted one's), objects of
        each daemon paired."""
        if isinstance(old, Claim):
            assert isinstance(new, Claim)
            self.pair(old, new)
            assert msgspec.structs.asdict(old) == msgspec.structs.asdict(new), (old, new)
        elif isinstance(old, ProcessOwner):
            assert isinstance(new, ProcessOwner) and (old.pid, old.uid, old.command) == (new.pid, new.uid, new.command)
            self.pair(old, new)
        elif isinstance(old, (FakePeer, Departed)):
            assert isinstance(new, (FakePeer, Departed)) and old.ident == new.ident, (old, new)
            self.pair(old, new)
        elif dataclasses.is_dataclass(old) and not isinstance(old, type):
            assert type(old) is type(new), (old, new)
            for f in dataclasses.fields(old):
                self.same(getattr(old, f.name), getattr(new, f.name))
        elif isinstance(old, msgspec.Struct):  # an order, or a message it carries
            assert type(old) is type(new), (old, new)
            for name in old.__struct_fields__:
                self.same(getattr(old, name), getattr(new, name))
        elif isinstance(old, (list, tuple)):
            assert isinstance(new, type(old)) and len(old) == len(new), (old, new)
            for a, b in zip(old, new, strict=True):
                self.same(a, b)
        else:
            assert old == new, (old, new)


def compared(orders: list[Order]) -> list[Order]:
    """`orders` as the two daemons must agree on them: without WakeAt hints (see the module
    docstring); each event's Publish orders by subscription (their order across
    connections is that of a dict of subscriptions, which a handover rebuilds per client;
    no connection can tell); a status's locks by name (a status of every name lists them in
    the table's order of names, which a handover does not keep: see lockd.table)."""
    kept = [
        Send(order.peer, msgspec.structs.replace(order.message, locks=sorted(order.message.locks, key=_name)))
        if isinstance(order, Send) and isinstance(order.message, protocol.StatusReply) else order
        for order in orders if not isinstance(order, WakeAt)
    ]
    result: list[Order] = []
    run: list[Publish] = []
    for order in [*kept, None]:
        if isinstance(order, Publish):
            run.append(order)
            continue
        result += sorted(run, key=lambda p: (p.peer.ident, p.subscription_id))
        run = []
        if order is not None:
            result.append(order)
    return result


def _name(lock: protocol.LockInfo) -> str:
    return lock.name


def view(side: Side) -> dict[str, Any]:
    """Everything the daemon `side` shows and decides by, with tickets by their arrival number,
    clients by their connection's ident, processes by pid and times relative to now."""
    service, table = side.service, side.service.table
    now = side.clock()

    def relative(t: float | None) -> float | None:
        return None if t is None else t - now

    def owner(ticket: Ticket) -> tuple[str, int]:
        if isinstance(ticket.owner, ProcessOwner):
            return "process", ticket.owner.pid
        return "client", ticket.owner.peer.ident

    def seqs(tickets: Any) -> list[int]:
        return sorted(t.seq for t in tickets)

    def seq_of(claim: Claim) -> int | None:
        ticket = service._claimed.get(claim)
        return None if ticket is None else ticket.seq

    tickets = []
    for ticket in table.tickets():
        who = party(ticket)
        tickets.append((
            ticket.seq, ticket.names, ticket.shared, ticket.slots, ticket.wait, ticket.state.value, ticket.tokens,
            relative(ticket.deadline), relative(ticket.since), owner(ticket), who.client.peer.ident, who.request_id,
            msgspec.structs.asdict(who.claim), None if who.process is None else who.process.pid,
            relative(who.requested), who.cause, who.lost, who.exit_status,
        ))
    clients = []
    for client in {id(c): c for c in [*service.clients.values(), *(party(t).client for t in table.tickets())]}.values():
        clients.append((
            client.peer.ident, client.peer.label, client.pid, client.uid, client.gid, sorted(client.gids),
            client.command, client.break_grace, {i: t.seq for i, t in client.tickets.items()}, client.names,
            client.taking, sorted(client.refusing),
            {i: (s.names, s.visible, s.uid, s.peer.ident) for i, s in client.subscriptions.items()},
        ))
    census = service.census()
    peers = {
        peer.ident: (peer.slot, peer.hand_over(), peer.deaf, peer.welcome)
        for peer in side.peers.values()
    }
    subscribers = service._subscribers
    return {
        "tickets": tickets,
        "queues": {name: (seqs(table.holders(name)), [t.seq for t in table.waiters(name)], table.slots_of(name),
                          table.waiting_on(name)) for name in sorted(table.names())},
        "connected": [peer.ident for peer in service.clients],
        "clients": sorted(clients, key=lambda c: c[0]),
        "uid_clients": service._uid_clients,
        "uid_names": service._uid_names,
        "claimed": seqs(service._claimed.values()),
        "taking": seqs(service._taking),
        "processes": [(o.pid, o.uid, o.command, seqs(o.tickets), o.closed) for o in service.processes.owners()],
        "census": dataclasses.replace(
            census, held_since=relative(census.held_since), waiting_since=relative(census.waiting_since),
        ),
        "counts": service.counts(),
        "next_arrival": table.next_arrival,
        "next_deadline": relative(table.next_deadline()),
        "waiting": table.waiting_count(),
        "subscribers": (
            subscribers._per_uid,
            sorted((s.peer.ident, s.id) for s in subscribers._every),
            {name: sorted((s.peer.ident, s.id) for s in wanting) for name, wanting in subscribers._by_name.items()},
        ),
        "peers": peers,
        # The takes were started again in the table's order, not in the order they began.
        "backend": (
            [seq_of(c) for c in side.started if c not in side.released], sorted(seq_of(c) or 0 for c in side.takes),
            side.next_token,
        ),
        "stopping": service.stopping,
        "limits": service.limits,
    }


# --- the machine ------------------------------------------------------------------------------


class HandoverMachine(RuleBasedStateMachine):
    """Drives `primary`, and once a handover happened, the daemon that adopted its state
    (`twin`) with it in lockstep (see the module docstring)."""

    @initialize(
        ordered=st.booleans(), outlive=st.booleans(), prompt=PROMPT, grace=st.sampled_from(GRACES),
        labels=st.lists(LABELS, min_size=3, max_size=3), sessions=st.lists(SESSIONS, min_size=3, max_size=3),
    )
    def start(
        self, ordered: bool, outlive: bool, prompt: bool, grace: float, labels: list[str | None],
        sessions: list[handover.SessionState],
    ) -> None:
        self.now = 100.0
        self.idents = itertools.count(1)
        #: Each client's next request id, by slot (a new connection starts again at 1).
        self.ids: dict[str, itertools.count[int]] = {}
        self.primary = Side(ordered, outlive, Config(limits=limits(GRACES[-1])), 0.0, self.clock)
        self.primary.prompt = prompt
        self.twin: Side | None = None
        self.pairing = Pairing()
        for slot, label, session in zip(("a", "d", "root"), labels, sessions, strict=True):
            self.connect(slot, label, session)
        self.reload(grace)

    def clock(self) -> float:
        return self.now

    @property
    def sides(self) -> list[Side]:
        return [self.primary] if self.twin is None else [self.primary, self.twin]

    def both(self, act: Callable[[Side], object]) -> None:
        """Give both daemons the same input (`act`), carry out what they order, and assert
        they ordered the same."""
        results = []
        for side in self.sides:
            returned = act(side)
            results.append((returned, side.run()))
        if self.twin is not None:
            (old_returned, old_orders), (new_returned, new_orders) = results
            self.pairing.same(old_returned, new_returned)
            old, new = compared(old_orders), compared(new_orders)
            try:
                assert [type(o) for o in old] == [type(o) for o in new]
                for a, b in zip(old, new, strict=True):
                    self.pairing.same(a, b)
            except AssertionError as exc:
                raise AssertionError(f"the daemons ordered differently:\n{old}\n{new}") from exc

    def pick_slot(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.primary.peers)))

    # --- clients ------------------------------------------------------------------------------

    @rule(slot=st.sampled_from(sorted(SLOTS)), label=LABELS, session=SESSIONS)
    def connect(self, slot: str, label: str | None, session: handover.SessionState) -> None:
        if slot in self.primary.peers:
            return
        ident = next(self.idents)
        self.ids[slot] = itertools.count(1)

        def act(side: Side) -> object:
            peer = FakePeer(slot, SLOTS[slot], ident, label, session)
            side.known[ident] = peer
            welcome = side.service.connect(peer, 4000 + ident, peer.uid, peer.uid, frozenset({peer.uid, 50}), slot)
            if welcome is not None:
                side.peers[slot] = peer
                peer.welcome = welcome
            return welcome

        self.both(act)

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), hangs_up=st.booleans())
    def leave(self, data: st.DataObject, hangs_up: bool) -> None:
        """A client hangs up, or stops reading (the next message cuts it off)."""
        slot = self.pick_slot(data)

        def act(side: Side) -> None:
            peer = side.peers[slot]
            if hangs_up:
                side.hang_up(peer, "the client closed the connection")
            else:
                peer.deaf = True

        self.both(act)

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), session=SESSIONS)
    def traffic(self, data: st.DataObject, session: handover.SessionState) -> None:
        """What a connection has in flight changes (bytes come in, replies go out)."""
        slot = self.pick_slot(data)
        for side in self.sides:
            side.peers[slot].session = session

    @precondition(lambda self: self.primary.peers)
    @rule(
        data=st.data(), names=REQUESTS["names"], shared=REQUESTS["shared"], timeout=REQUESTS["timeout"],
        pid=REQUESTS["pid"], slots=REQUESTS["slots"], label=LABELS,
    )
    def acquire(
        self, data: st.DataObject, names: list[str], shared: bool, timeout: int | None, pid: int | None,
        slots: dict[str, int], label: str | None,
    ) -> None:
        self._acquire(self.pick_slot(data), names, shared, timeout, pid, slots, label)

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), requests=st.lists(st.fixed_dictionaries(REQUESTS), min_size=2, max_size=4))
    def acquire_burst(self, data: st.DataObject, requests: list[dict[str, Any]]) -> None:
        """Several requests before anything else happens, so that queues grow."""
        for request in requests:
            if self.primary.peers:
                self._acquire(self.pick_slot(data), label=None, **request)

    def _acquire(
        self, slot: str, names: list[str], shared: bool, timeout: int | None, pid: int | None,
        slots: dict[str, int], label: str | None,
    ) -> None:
        message = protocol.Acquire(
            next(self.ids[slot]), names, mode="shared" if shared else "exclusive",
            timeout=None if timeout is None else float(timeout), pid=pid, label=label,
            slots={name: count for name, count in slots.items() if name in names},
        )
        self.both(lambda side: side.service.request(side.peers[slot], message))

    @precondition(lambda self: len(self.primary.peers) >= 2)
    @rule(data=st.data(), name=st.sampled_from(["x", "y"]), shared=st.booleans())
    def contend(self, data: st.DataObject, name: str, shared: bool) -> None:
        """Two clients ask for the same lock, the second to wait for the first (unless both
        share it): queues, which random requests form too seldom."""
        slots = st.sampled_from(sorted(self.primary.peers))
        first, second = data.draw(st.lists(slots, min_size=2, max_size=2, unique=True))
        self._acquire(first, [name], shared, None, None, {}, None)
        self._acquire(second, [name], False, None, None, {}, None)

    @precondition(lambda self: any(self.primary.service.clients[p].tickets for p in self.primary.peers.values()))
    @rule(data=st.data(), exit_status=st.none() | st.integers(0, 255))
    def release(self, data: st.DataObject, exit_status: int | None) -> None:
        """A client releases a lease or withdraws a request."""
        clients = self.primary.service.clients
        slot = data.draw(st.sampled_from(sorted(s for s, p in self.primary.peers.items() if clients[p].tickets)))
        request_id = data.draw(st.sampled_from(sorted(clients[self.primary.peers[slot]].tickets)))
        message = protocol.Release(request_id, exit_status)
        self.both(lambda side: side.service.request(side.peers[slot], message))

    @precondition(lambda self: self.primary.peers)
    @rule(
        data=st.data(), pid=st.sampled_from([*PROCESSES, MISSING_PID]),
        names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
    )
    def release_pid(self, data: st.DataObject, pid: int, names: list[str]) -> None:
        slot = self.pick_slot(data)
        message = protocol.ReleasePid(next(self.ids[slot]), pid, names)
        self.both(lambda side: side.service.request(side.peers[slot], message))

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def force_release(self, data: st.DataObject, name: str) -> None:
        slot = self.pick_slot(data)
        message = protocol.ForceRelease(next(self.ids[slot]), name)
        self.both(lambda side: side.service.request(side.peers[slot], message))

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), names=st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
    def status(self, data: st.DataObject, names: list[str]) -> None:
        """A status, answered at once (nothing is found outside lockd)."""
        slot = self.pick_slot(data)
        message = protocol.Status(next(self.ids[slot]), names)

        def act(side: Side) -> None:
            peer = side.peers[slot]
            look = side.service.request(peer, message)
            assert look is not None
            side.service.status_reply(peer, look, {}, {})

        self.both(act)

    @precondition(lambda self: self.primary.peers)
    @rule(data=st.data(), names=st.none() | st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True))
    def subscribe(self, data: st.DataObject, names: list[str] | None) -> None:
        slot = self.pick_slot(data)
        message = protocol.Subscribe(next(self.ids[slot]), names or [])
        self.both(lambda side: side.service.request(side.peers[slot], message))

    def subscriptions(self) -> list[tuple[str, int]]:
        clients = self.primary.service.clients
        return sorted((slot, i) for slot, peer in self.primary.peers.items() for i in clients[peer].subscriptions)

    @precondition(lambda self: self.subscriptions())
    @rule(data=st.data(), lags=st.booleans())
    def unsubscribe(self, data: st.DataObject, lags: bool) -> None:
        """A subscription ends: its client releases it, or it lags behind its events."""
        slot, subscription_id = data.draw(st.sampled_from(self.subscriptions()))

        def act(side: Side) -> None:
            peer = side.peers[slot]
            if lags:
                side.service.subscriber_lagging(peer, subscription_id)
            else:
                side.service.request(peer, protocol.Release(subscription_id))

        self.both(act)

    # --- the backend --------------------------------------------------------------------------

    @rule(prompt=PROMPT)
    def backend_pace(self, prompt: bool) -> None:
        for side in self.sides:
            side.prompt = prompt

    def counterpart(self, side: Side, claim: Claim) -> Claim:
        """`claim` of the primary, as `side` knows it."""
        if side is self.primary:
            return claim
        found = self.pairing.ahead[claim]
        assert isinstance(found, Claim)
        return found

    @precondition(lambda self: self.primary.takes)
    @rule(data=st.data(), answer=st.sampled_from(["taken", "blocked", "failed", "waits"]))
    def take_answered(self, data: st.DataObject, answer: str) -> None:
        claim = data.draw(st.sampled_from(self.primary.takes))
        self.both(lambda side: side.answer_take(self.counterpart(side, claim), answer))

    @precondition(lambda self: self.primary.service._claimed)
    @rule(data=st.data())
    def backend_loses(self, data: st.DataObject) -> None:
        claim = data.draw(st.sampled_from(list(self.primary.service._claimed)))
        self.both(lambda side: side.service.lost(self.counterpart(side, claim), "the etcd lease expired"))

    @precondition(lambda self: self.primary.looks)
    @rule(data=st.data())
    def holders_found(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.primary.looks) - 1))

        def act(side: Side) -> None:
            side.service.holders_found(side.looks.pop(index), [protocol.Holder(pid=77, uid=0, command="flock")])

        self.both(act)

    # --- processes, time, configuration, shutdown ------------------------------------------

    @precondition(lambda self: self.primary.service.processes.owners())
    @rule(data=st.data())
    def process_exits(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(o.pid for o in self.primary.service.processes.owners())))

        def act(side: Side) -> None:
            owner = side.service.processes.find(pid)
            assert owner is not None
            side.service.process_exited(owner)

        self.both(act)

    @rule(advance=st.integers(0, 7))
    def time_passes(self, advance: int) -> None:
        self.now += advance
        self.both(lambda side: side.service.wake())

    @rule(grace=st.sampled_from(GRACES))
    def reload(self, grace: float) -> None:
        def act(side: Side) -> None:
            side.config = Config(limits=limits(grace))
            side.service.reconfigure(side.config.limits, side.policy)

        self.both(act)

    @precondition(lambda self: not self.primary.stopped and len(self.primary.service._claimed) >= 2)
    @rule()
    def stop(self) -> None:
        def act(side: Side) -> None:
            side.stopped = True
            side.service.stop()

        self.both(act)

    # --- the handover -----------------------------------------------------------------------

    @precondition(lambda self: not self.primary.stopped)
    @rule(offset=OFFSETS, history=st.integers(0, 3))
    def hand_over(self, offset: float, history: int) -> None:
        self._hand_over(offset, history)

    @precondition(lambda self: not self.primary.stopped and len(self.primary.service.table) >= 2)
    @rule(offset=OFFSETS, history=st.integers(0, 3))
    def hand_over_busy(self, offset: float, history: int) -> None:
        """(Where the runs spend most time with few tickets, this has them handed over more.)"""
        self._hand_over(offset, history)

    def _hand_over(self, offset: float, history: int) -> None:
        """The daemon re-executes: the adopted one (if any) hands over to a new one, which
        from now on runs in lockstep with it."""
        # The re-exec waits for the looks under way (`Server.settled`).
        while self.primary.looks:
            self.both(lambda side: side.service.holders_found(side.looks.pop(0), [protocol.Holder(pid=78, uid=0)]))
        old = self.twin or self.primary
        new, state, claims = adopted_exactly(old, offset, history, self.clock)
        # What the runs hand over (--hypothesis-show-statistics).
        for phase in sorted({t.phase for t in state.tickets}):
            event(f"handed over a {phase} ticket")
        if any(c.session is None for c in state.connections):
            event("handed over a client gone, its process-tied lease alive")
        if any(c.subscriptions for c in state.connections):
            event("handed over a subscription")
        if state.processes:
            event("handed over a process")
        if self.twin is not None:
            event("handed over an adopted state")
        # The welcomes are sent meanwhile (by the old daemon, should it serve on).
        for side in (old, new):
            for peer in side.peers.values():
                peer.greeted = True

        self.pairing = Pairing()
        old_claims = old.service.hand_over().claims
        for a, b in zip(old_claims, claims, strict=True):
            self.pairing.same(a, b)
        for owner in old.service.processes.owners():
            found = new.service.processes.find(owner.pid)
            assert found is not None and found.pidfd == owner.pidfd
            self.pairing.same(owner, found)
        for client in {id(party(t).client): party(t).client for t in old.service.table.tickets()}.values():
            counterpart = next(
                party(t).client.peer for t in new.service.table.tickets()
                if party(t).client.peer.ident == client.peer.ident
            )
            if client.peer.closed:
                assert isinstance(counterpart, Departed), counterpart
            self.pairing.same(client.peer, counterpart)
        for peer in old.peers.values():
            self.pairing.same(peer, new.peers[peer.slot])
        self.primary, self.twin = old, new

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def any_moment_hands_over_exactly(self) -> None:
        """Whenever the daemon could re-execute (not stopping; no look under way), what it
        would hand over is adopted exactly (by a daemon thrown away: runs in lockstep start
        only where the rules above hand over)."""
        side = self.twin or self.primary
        if not side.stopped and quiet(side.service):
            adopted_exactly(side, 777.0, 1, self.clock)

    @invariant()
    def both_check_themselves(self) -> None:
        for side in self.sides:
            side.service.check()

    @invariant()
    def both_show_the_same(self) -> None:
        if self.twin is not None:
            assert view(self.twin) == view(self.primary)


def quiet(service: LockService) -> bool:
    """Whether no refusal waits for a look at the host: what the server's `idle` comes to
    for the service, with the gate shut (it counts a refusal's look as under way)."""
    return not any(client.refusing for client in service.clients.values())


def adopted_exactly(
    old: Side, offset: float, history: int, now: Callable[[], float],
) -> tuple[Side, handover.State, list[Claim]]:
    """A new daemon, on a clock `offset` from `old`'s, that adopted what `old` hands over now
    (with the last `history` events as the history's backlog), checked to show and order
    exactly what it must; the state, and the claims of its tickets in order."""
    assert quiet(old.service)
    before = view(old)
    backlog = old.recorded[len(old.recorded) - history:] if history else []
    data = handover.encode(old.state(backlog))
    assert handover.encode(old.state(backlog)) == data, "taking the state changed it"
    assert not old.service.orders and view(old) == before, "taking the state changed the daemon"
    state = handover.decode(data)
    assert state.history == backlog and state.config == old.config
    new, claims, welcomes, orders = Side.adopted(state, old, offset, now)

    # The adoption's orders: the deadlines to wake for, the processes to watch, and the takes
    # to start again, in the table's order.
    restored = new.service.table.tickets()
    assert [t.seq for t in restored] == [t.seq for t in state.tickets]
    assert orders == [
        *(WakeAt(t.deadline) for t in restored if t.deadline is not None),
        *(Watch(owner) for owner in new.service.processes.owners()),
        *(StartTake(party(t).claim) for t in restored if t.state is TAKING),
    ], orders
    new.run(adopting=True)
    assert new.watched == set(new.service.processes.owners())

    # Everything the two show is the same; a peer not greeted gets the welcome it would have.
    assert view(new) == view(old)
    assert {peer.ident for peer in welcomes} == {peer.ident for peer in old.peers.values() if not peer.greeted}
    for peer, welcome in welcomes.items():
        assert welcome == old.known[peer.ident].welcome, (welcome, old.known[peer.ident].welcome)
    return new, state, claims


HandoverMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
test_service_handover_against_old = HandoverMachine.TestCase


def test_the_oldest_request_is_counted_as_oldest_behind_a_later_one_being_taken() -> None:
    """The census of an adopted daemon counts waiting from the oldest request still waiting,
    though the table gives out those it let through (being taken) before those it did not."""
    now = [100.0]
    old = Side(False, True, Config(), 0.0, lambda: now[0])
    session = handover.SessionState(fd=0, greeted=True, unread=b"", outbox=b"", attached=[], event_head=0, events=[])
    a, b = FakePeer("a", 1000, 1, None, session), FakePeer("b", 1001, 2, None, session)
    for peer in (a, b):
        assert old.service.connect(peer, 4000 + peer.ident, peer.uid, peer.uid, frozenset({peer.uid}), peer.slot)
        old.peers[peer.slot] = old.known[peer.ident] = peer
    old.service.request(a, protocol.Acquire(1, ["x"]))
    old.run()
    now[0] = 110.0
    old.service.request(b, protocol.Acquire(1, ["x"]))  # waits for a
    old.run()
    now[0] = 120.0
    old.prompt = False
    old.service.request(b, protocol.Acquire(2, ["y"]))  # let through, still being taken
    old.run()
    assert [t.state.value for t in old.service.table.tickets()] == ["held", "taking", "waiting"]
    assert old.service.census().waiting_since == 110.0

    state = handover.decode(handover.encode(old.state([])))
    new = Side.adopted(state, old, 5000.0, lambda: now[0])[0]
    new.run(adopting=True)
    assert new.service.census().waiting_since == 5110.0
    assert view(new) == view(old)


def test_an_adopted_clients_claims_share_one_requester_again() -> None:
    now = [100.0]
    old = Side(False, True, Config(), 0.0, lambda: now[0])
    session = handover.SessionState(fd=0, greeted=True, unread=b"", outbox=b"", attached=[], event_head=0, events=[])
    a = FakePeer("a", 1000, 1, None, session)
    assert old.service.connect(a, 4000 + a.ident, a.uid, a.uid, frozenset({a.uid}), a.slot)
    old.peers[a.slot] = old.known[a.ident] = a
    for request_id, name in enumerate(["x", "y", "z"], 1):
        old.service.request(a, protocol.Acquire(request_id, [name], label="mine" if name == "z" else None))
        old.run()

    state = handover.decode(handover.encode(old.state([])))
    new = Side.adopted(state, old, 5000.0, lambda: now[0])[0]
    new.run(adopting=True)
    x, y, z = (party(t).claim.requester for t in new.service.table.tickets())
    assert x is y and x.label is None and z.label == "mine", (x, y, z)
    assert view(new) == view(old)
    # And the client's next claim shares theirs too, as it would have before the re-exec.
    new.service.request(new.peers[a.slot], protocol.Acquire(4, ["w"]))
    new.run()
    (w,) = [party(t).claim.requester for t in new.service.table.tickets() if t.names == ("w",)]
    assert w is x
