"""Random runs of the lock service, checked against what its clients, the backend and the
process watches rely on.

The machine plays the shell (lockd.server) and everything around the service: clients that
connect, ask (for locks, slots of counting semaphores, or both; now and then for a name as
another kind than its users take it), release and hang up or stop reading; a backend that
takes a claim at once or later, finds it blocked, fails, makes it wait or loses it;
processes that exit; a clock that moves; a reload that changes the break grace; a stop. It
carries out the orders in order as the shell does: a Close ends the connection there and
then (the service hears `disconnected`), a message to a client that stopped reading cuts it
off, and a Grant whose connection closed is reported undelivered. The backend either leaves
the order of requests to the table (flock), or orders them itself (etcd): then it grants
each claim in the order it was handed over, once it can be held with every earlier claim
still held or waiting (on a semaphore of N slots: once fewer than N of them are on it).

Checked after every step, or as each order is carried out:
- `LockService.check()`;
- each request's replies, in the order its connection receives them: Queued*, then one final
  answer, Granted (then at most one Lost) or an Error; a release_pid, force_release or
  status gets exactly one reply; nothing more about a request once its client let go of it.
  A refusal is about its own request: it names its names, and only a request that does not
  wait is busy, only one with a timeout times out. A request that disagrees with a name's
  holders or waiters on what the name is (a lock, or a semaphore of N slots) is refused at
  once (slots_mismatch, saying what it asked for), and no other is. While the connection
  lasts, a request not finally answered is still live in the service, and so is a lease
  whose holder was not told it is lost: nothing ends unannounced. A request is not left
  waiting past its deadline, and once every lease is let go every request has had its final
  answer. An id is free again once its request is over for the client;
- per claim: one StartTake, then at most one StopTake, one Grant and one Release, none after
  its Release, no Release while the backend still takes it; none of StartTake and Release
  once stopped; every claim taken is released exactly once by the end (unless stopped);
- mutual exclusion among claims granted and not released (shared with shared; on a
  semaphore of N slots, at most N claims, all taking it as N slots), and where the table
  orders requests, among claims from their StartTake to their Release; a status shows no
  more of lockd's holders than a semaphore's slots;
- no Grant is ordered for a connection after the service heard it close;
- a release_pid is answered only after the Release of every lease it released, and only
  root or the process's own user may release its leases;
- a lease broken by force is released under its holder exactly once its grace has passed,
  the longest its holders were promised at connect time (a reload may shorten it since);
- at shutdown, held leases are reported lost only where they do not outlive the daemon;
- a process is watched from its first lease to its Unwatch, and every process opened has
  its Unwatch (its pidfd closed) by the end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from lockd_client import errors, protocol

from lockd.backend import BackendView, Claim
from lockd.config import Limits
from lockd.orders import (
    Close,
    Grant,
    LookForHolders,
    Order,
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
from lockd.service import LockService, StatusLook
from lockd.table import HELD, LockTable

from .test_service import Clock

NAMES = ("x", "y", "z")
#: The connections clients may open, with their uids: a, b and c share one, over its
#: connection limit; root may force any release.
SLOTS = {"a": 1000, "b": 1000, "c": 1000, "d": 1001, "root": 0}
#: The processes leases may be tied to, with their uids; MISSING_PID is no process.
PROCESSES = {301: 1000, 302: 1001}
MISSING_PID = 999
#: Break graces a reload may set: the clock moves in whole steps and deadlines fall on them,
#: so a grace never ends at the same time as a request's deadline.
GRACES = (2.5, 6.5)
#: How clients mostly use the names: z as a semaphore of 2 slots, x and y as locks. Requests
#: also ask for other counts or kinds, which the service refuses while a name is in use.
SEMAPHORES = {"z": 2}
ACQUIRES: dict[str, st.SearchStrategy[Any]] = {
    "names": st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    "shared": st.booleans(),
    "timeout": st.none() | st.just(0) | st.integers(1, 4),
    "pid": st.sampled_from([None, None, None, *PROCESSES, MISSING_PID]),
    "slots": st.just(SEMAPHORES) | st.dictionaries(st.sampled_from(NAMES), st.integers(1, 3), max_size=2),
}
#: What a look may find outside lockd on a name: nothing, or holders compatible among
#: themselves (real flocks), maybe in conflict with lockd's holders, which then let go since.
OUTSIDE = st.dictionaries(
    st.sampled_from(NAMES),
    st.sampled_from([
        [protocol.Holder(pid=501, uid=0, mode="exclusive")],
        [protocol.Holder(pid=502, uid=0, mode="shared"), protocol.Holder(pid=503, uid=0, mode="shared")],
    ]),
)
#: Refusals of a request before it reaches the table: a limit; a process not the client's
#: to tie leases to, or none.
BEFORE_THE_TABLE = ("limit", "permission_denied", "not_held")
WALL_OFFSET = 1_000_000.0
#: Where a request is, as its client sees it.
WAITING, GRANTED, LOST, FAILED, WITHDRAWN, RELEASED = "waiting", "granted", "lost", "failed", "withdrawn", "released"
ASKED, ANSWERED = "asked", "answered"
#: An acquire's states in which the client knows it is over: its id may be used again.
OVER = (FAILED, WITHDRAWN, RELEASED)


def limits(grace: float) -> Limits:
    """Limits small enough that the runs reach them."""
    return Limits(
        max_connections_per_uid=2, max_leases_per_connection=6, max_pending_per_connection=4,
        max_leases_per_uid=10, max_pending_per_uid=6, max_waiters_per_name=4, break_grace=grace,
    )


@dataclass
class Request:
    kind: str  # "acquire", "release_pid", "force_release" or "status"
    state: str
    #: An acquire's names (each once) and timeout, and its deadline on the service's clock.
    names: tuple[str, ...] = ()
    #: The names it asked a slot of, with their counts.
    slots: dict[str, int] = field(default_factory=dict)
    timeout: int | None = None
    deadline: float | None = None


class FakePeer:
    """A connection and what its client has asked and been told."""

    def __init__(self, slot: str, uid: int) -> None:
        self.slot = slot
        self.uid = uid
        self.label: str | None = None
        self.closed = False
        #: It stopped reading: the next message to it cuts it off.
        self.deaf = False
        #: The break grace it was promised (Welcome.stop_within).
        self.grace = 0.0
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count(1)
        #: Grants ordered before the service heard the connection close, still to be carried out.
        self.grants_in_flight: list[Grant] = []

    def send(self, message: object, fds: object = ()) -> None:
        raise AssertionError("the service never sends itself")

    def close(self, reason: str) -> None:
        raise AssertionError("the service never closes itself")

    def __repr__(self) -> str:
        return f"<FakePeer {self.slot}>"


def peer_of(order: Send | Close | Grant) -> FakePeer:
    assert isinstance(order.peer, FakePeer), order
    return order.peer


def conflict(claim: Claim, others: list[Claim]) -> str | None:
    """Why `claim` may not be held with all of `others`, or None: on a semaphore name, every
    holder takes a slot of the same count and there are no more holders than slots; on a
    lock name, holders are one exclusive claim or only shared ones."""
    for name in claim.names:
        users = [other for other in others if other is not claim and name in other.names]
        slots = claim.slots.get(name)
        if any(other.slots.get(name) != slots for other in users):
            return f"{claim} and {users} disagree on what {name} is"
        if slots is not None and len(users) >= slots:
            return f"{claim} would be one of {len(users) + 1} holders of {name}'s {slots} slots: {users}"
        if slots is None and users and not (claim.shared and all(other.shared for other in users)):
            return f"{claim} conflicts with {users} on {name}"
    return None


@dataclass
class FakeBackend:
    """The facts of a backend: flock's, or one that orders requests (etcd's)."""

    orders_requests: bool
    leases_outlive_daemon: bool
    loss_notice: float | None = None

    @property
    def name(self) -> str:
        return "etcd" if self.orders_requests else "flock"

    def place_of(self, claim: Claim) -> int | None:
        return None

    def outside_names(self) -> list[str]:
        return []

    def outside_slots(self, name: str) -> int | None:
        return None


class ServiceMachine(RuleBasedStateMachine):
    @initialize(ordered=st.booleans(), outlive=st.booleans(), prompt=st.booleans(), grace=st.sampled_from(GRACES))
    def start(self, ordered: bool, outlive: bool, prompt: bool, grace: float) -> None:
        """Three clients connect, promised the longest grace; then a reload may shorten it."""
        self.clock = Clock()
        #: Whether the backend orders requests (and the table leaves that to it).
        self.ordered = ordered
        self.outlive = outlive
        self.grace = GRACES[-1]
        self.policy = Policy((), {0: "root"})
        backend: BackendView = FakeBackend(orders_requests=ordered, leases_outlive_daemon=outlive)
        self.service = LockService(
            LockTable(ordered_by_backend=ordered), Processes(self.open_process), limits(self.grace), self.policy,
            backend, clock=self.clock, wall_clock=lambda: self.clock() + WALL_OFFSET,
        )
        #: Whether the backend answers a StartTake as it is carried out where it can (a free
        #: flock; a claim first in etcd's queue, or one that does not wait); otherwise it is
        #: left in `takes` for a rule to answer.
        self.prompt = prompt
        self.stopped = False
        self.peers: dict[str, FakePeer] = {}
        self.client_pids = itertools.count(4001)
        self.tokens = itertools.count(1)
        self.takes: list[Claim] = []
        self.looks: list[LookForHolders] = []
        self.statuses: list[tuple[FakePeer, StatusLook]] = []
        # The backend's ledger, per claim.
        self.started: dict[Claim, None] = {}
        self.stopped_takes: set[Claim] = set()
        #: Claim → the connection it was granted to.
        self.granted: dict[Claim, FakePeer] = {}
        #: Token → the claim granted with it, and when.
        self.tokens_granted: dict[int, tuple[Claim, float]] = {}
        self.released: dict[Claim, bool] = {}
        #: The events recorded, in order.
        self.recorded: list[protocol.LeaseEvent] = []
        #: Claim broken by force → when its grace ends.
        self.broken: dict[Claim, float] = {}
        # Process owners, as opened and watched.
        self.opened: list[ProcessOwner] = []
        self.watched: set[ProcessOwner] = set()
        self.unwatched: set[ProcessOwner] = set()
        for slot in ("a", "d", "root"):
            self.connect(slot)
        self.reload(grace)

    def open_process(self, pid: int) -> ProcessOwner:
        if pid not in PROCESSES:
            raise errors.NotHeld(f"process {pid} does not exist")
        owner = ProcessOwner(pid, PROCESSES[pid], f"process {pid}", -1)
        self.opened.append(owner)
        return owner

    # --- the shell ----------------------------------------------------------------------------

    def run(self) -> list[Order]:
        """Carry out the service's orders in order, and those they cause."""
        done: list[Order] = []
        queue = self.service.orders
        while queue:
            order = queue.popleft()
            done.append(order)
            self.carry_out(order)
        self.service.check()
        return done

    def carry_out(self, order: Order) -> None:
        if isinstance(order, Send):
            self.deliver(peer_of(order), order.message)
        elif isinstance(order, Grant):
            self.grant(order)
        elif isinstance(order, StartTake):
            self.start_take(order.claim)
        elif isinstance(order, Record):
            self.recorded.append(order.event)
        elif isinstance(order, StopTake):
            claim = order.claim
            assert claim in self.started and claim not in self.stopped_takes, f"StopTake of {claim}"
            assert claim not in self.released, f"StopTake of {claim} after its Release"
            self.stopped_takes.add(claim)
            if claim in self.takes:
                self.takes.remove(claim)
        elif isinstance(order, Release):
            claim = order.claim
            assert not self.stopped, f"Release of {claim} after stop()"
            assert claim in self.started, f"Release of {claim}, never taken"
            assert claim not in self.released, f"second Release of {claim}"
            assert claim not in self.takes, f"Release of {claim} while the backend still takes it"
            self.released[claim] = order.unlock
        elif isinstance(order, Close):
            self.hang_up(peer_of(order), order.reason)
        elif isinstance(order, LookForHolders):
            self.looks.append(order)
        elif isinstance(order, Watch):
            assert order.owner not in self.watched, f"{order.owner} watched twice"
            self.watched.add(order.owner)
        elif isinstance(order, Unwatch):
            assert order.owner in self.opened and order.owner not in self.unwatched, f"Unwatch of {order.owner}"
            assert order.owner.closed, order.owner
            self.unwatched.add(order.owner)
        else:
            assert isinstance(order, WakeAt)

    def start_take(self, claim: Claim) -> None:
        assert not self.stopped, f"StartTake of {claim} after stop()"
        assert claim not in self.started, f"second StartTake of {claim}"
        if not self.ordered:  # the table let it through: nothing it conflicts with is held
            problem = conflict(claim, [other for other in self.started if other not in self.released])
            assert problem is None, f"taken while not released: {problem}"
        self.started[claim] = None
        if self.service.taking(claim):
            self.takes.append(claim)
            if self.prompt:
                if self.its_turn(claim):
                    self.answer_take(claim, "taken")
                elif not claim.wait:
                    self.answer_take(claim, "blocked")

    def its_turn(self, claim: Claim) -> bool:
        """Whether the backend can take `claim` now: always, where the table orders requests;
        else once it can be held with every claim handed over before it and not released
        (on a semaphore: once fewer than its slots are ahead of it)."""
        if not self.ordered:
            return True
        assert claim in self.started, f"{claim} was never handed over"
        ahead = list(itertools.takewhile(lambda other: other is not claim, self.started))
        return conflict(claim, [other for other in ahead if other not in self.released]) is None

    def answer_take(self, claim: Claim, answer: str) -> None:
        """The backend's take of `claim` ends (`answer`), or reports that it waits."""
        if answer == "waits":
            self.service.take_waits(claim, [protocol.Holder(pid=77, uid=0, command="flock x.lock")])
            return
        self.takes.remove(claim)
        if answer == "taken":
            self.service.taken(claim, [next(self.tokens) for _ in claim.names])
        elif answer == "blocked":
            self.service.take_blocked(claim)
        else:
            self.service.take_failed(claim, errors.BadLockFile(f"{claim.names[0]}.lock is a directory"))

    def grant(self, order: Grant) -> None:
        peer, claim = peer_of(order), order.claim
        assert not peer.closed or any(order is grant for grant in peer.grants_in_flight), (
            f"Grant to {peer} ordered after it closed"
        )
        assert claim in self.started and claim not in self.released, f"Grant of {claim} outside its take"
        assert claim not in self.granted and claim not in self.stopped_takes, f"Grant of {claim}"
        problem = conflict(claim, self.holding())
        assert problem is None, f"granted while held: {problem}"
        self.granted[claim] = peer
        for token in order.tokens:
            self.tokens_granted[token] = (claim, self.clock.now)
        self.deliver(peer, protocol.Granted(order.request_id, order.tokens))
        if peer.closed:
            self.service.grant_undelivered(claim)

    def deliver(self, peer: FakePeer, message: object) -> None:
        if peer.closed:
            return
        if peer.deaf:
            self.hang_up(peer, "it left too many replies unread")
            return
        if isinstance(message, protocol.Error) and message.id is None:
            assert message.code in ("shutdown", "limit"), message
            return  # the goodbye: a Close follows
        assert isinstance(message, (protocol.Queued, protocol.Granted, protocol.Lost, protocol.Error,
                                    protocol.Done, protocol.StatusReply)), message
        request = peer.requests.get(message.id)
        assert request is not None, f"{peer} told {message} about nothing it asked"
        if request.kind == "acquire":
            state = request.state
            if isinstance(message, protocol.Queued):
                assert state == WAITING, (peer, message, state)
            elif isinstance(message, protocol.Granted):
                assert state == WAITING, (peer, message, state)
                request.state = GRANTED
            elif isinstance(message, protocol.Error):
                assert state == WAITING, (peer, message, state)
                request.state = FAILED
                # A refusal is about this request: its names, and why it failed.
                shown = ", ".join(request.names)
                if message.code == "busy":
                    assert request.timeout == 0 and message.message.startswith(f"{shown} is busy"), message
                elif message.code == "timeout":
                    assert request.timeout and message.message.startswith(f"{shown}: timed out"), message
                elif message.code == "slots_mismatch":
                    (name,) = [n for n in request.names if message.message.startswith(f"{n} is ")]
                    slots = request.slots.get(name)
                    asked = "a plain lock" if slots is None else f"a semaphore of {slots} slot"
                    assert f"this request asked for {asked}" in message.message, message
            elif isinstance(message, protocol.Lost):
                assert state == GRANTED, (peer, message, state)
                request.state = LOST
            else:
                raise AssertionError(f"{peer} told {message} about an acquire")
        else:
            assert request.state == ASKED, f"{peer}: second reply {message} to its {request.kind}"
            if request.kind == "status":
                assert isinstance(message, protocol.StatusReply), message
                self.check_status(message)
            else:
                assert isinstance(message, (protocol.Done, protocol.Error)), message
            request.state = ANSWERED

    def hang_up(self, peer: FakePeer, reason: str) -> None:
        """The connection ends: the service hears it at once, as from the session's close."""
        if peer.closed:
            return
        peer.closed = True
        peer.grants_in_flight = [o for o in self.service.orders if isinstance(o, Grant) and o.peer is peer]
        if self.peers.get(peer.slot) is peer:
            del self.peers[peer.slot]
        self.service.disconnected(peer, reason)

    def check_status(self, reply: protocol.StatusReply) -> None:
        """A status shows holders that may hold together, lockd's own as granted (in wall
        time) and not released since."""
        for lock in reply.locks:
            modes = {holder.mode for holder in lock.holders}
            assert modes == {"shared"} or len(lock.holders) <= 1, lock
            assert lock.mode == (lock.holders[0].mode if lock.holders else None), lock
            own = [holder for holder in lock.holders if holder.token is not None]
            assert lock.slots is None or len(own) <= lock.slots, lock
            for holder in own:
                claim, since = self.tokens_granted[holder.token]
                assert claim not in self.released and lock.name in claim.names, (lock, claim)
                assert holder.since == pytest.approx(since + WALL_OFFSET), (holder, since)
                assert holder.pid == claim.requester.pid, (holder, claim)
                assert claim.slots.get(lock.name) == lock.slots, (lock, claim)

    # --- helpers ------------------------------------------------------------------------------

    def holding(self) -> list[Claim]:
        """Claims granted and not released: the leases held (or broken, not let go)."""
        return [claim for claim in self.granted if claim not in self.released]

    def reply(self, orders: list[Order], peer: FakePeer, request_id: int) -> tuple[int, object]:
        """The one message of `orders` about `peer`'s request `request_id`, and where it is."""
        found = [
            (i, o.message) for i, o in enumerate(orders)
            if isinstance(o, Send) and o.peer is peer and getattr(o.message, "id", None) == request_id
        ]
        assert len(found) == 1, (request_id, orders)
        return found[0]

    def pick_peer(self, data: st.DataObject) -> FakePeer:
        return self.peers[data.draw(st.sampled_from(sorted(self.peers)))]

    # --- clients ------------------------------------------------------------------------------

    @rule(slot=st.sampled_from(sorted(SLOTS)))
    def connect(self, slot: str) -> None:
        if slot in self.peers:
            return
        uid = SLOTS[slot]
        peer = FakePeer(slot, uid)
        over = sum(p.uid == uid for p in self.peers.values()) >= limits(self.grace).max_connections_per_uid
        welcome = self.service.connect(peer, next(self.client_pids), uid, uid, frozenset({uid}), f"client {slot}")
        if welcome is None:
            assert self.stopped or over, f"{slot} refused"
            orders = self.run()
            assert [type(o) for o in orders if not isinstance(o, WakeAt)] == [Send, Close] and peer.closed
            return
        assert not self.stopped and not over, f"{slot} admitted"
        assert welcome.leases_outlive_daemon == self.outlive and welcome.stop_within == self.grace
        peer.grace = welcome.stop_within
        self.peers[slot] = peer
        assert self.run() == []

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), hangs_up=st.booleans())
    def leave(self, data: st.DataObject, hangs_up: bool) -> None:
        """A client hangs up, or stops reading (the next message cuts it off)."""
        peer = self.pick_peer(data)
        if hangs_up:
            self.hang_up(peer, "the client closed the connection")
        else:
            peer.deaf = True
        self.run()

    @precondition(lambda self: self.peers)
    @rule(
        data=st.data(), reuse=st.booleans(), names=ACQUIRES["names"], shared=ACQUIRES["shared"],
        timeout=ACQUIRES["timeout"], pid=ACQUIRES["pid"], slots=ACQUIRES["slots"],
    )
    def acquire(
        self, data: st.DataObject, reuse: bool, names: list[str], shared: bool, timeout: int | None, pid: int | None,
        slots: dict[str, int],
    ) -> None:
        self._acquire(data, reuse, names, shared, timeout, pid, slots)

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), requests=st.lists(st.fixed_dictionaries(ACQUIRES), min_size=2, max_size=4))
    def acquire_burst(self, data: st.DataObject, requests: list[dict[str, Any]]) -> None:
        """Several requests before anything else happens, so that queues grow."""
        for request in requests:
            if self.peers:
                self._acquire(data, False, **request)

    def _acquire(
        self, data: st.DataObject, reuse: bool, names: list[str], shared: bool, timeout: int | None, pid: int | None,
        slots: dict[str, int],
    ) -> None:
        peer = self.pick_peer(data)
        over = sorted(i for i, r in peer.requests.items() if r.kind == "acquire" and r.state in OVER)
        if reuse and over:
            request_id = data.draw(st.sampled_from(over))
            client = self.service.clients[peer]
            assert request_id not in client.tickets and request_id not in client.refusing, (
                f"{peer}'s request {request_id} is over, yet its id is in use"
            )
        else:
            request_id = next(peer.ids)
        deadline = self.clock.now + timeout if timeout else None
        slots = {name: count for name, count in slots.items() if name in names}
        peer.requests[request_id] = Request("acquire", WAITING, tuple(dict.fromkeys(names)), slots, timeout, deadline)
        # A process may not wait without a bound for a lease on a name it holds: it would
        # wait for itself.
        deadlock = pid in PROCESSES and timeout is None and peer.uid in (0, PROCESSES[pid]) and any(
            claim.requester.pid == pid and not set(claim.names).isdisjoint(names)
            for claim in self.started if claim not in self.released
        )
        # What a name is while anyone holds or awaits it, by the table, whose check() holds
        # every ticket on a name to agree with it: a request that disagrees is refused.
        table = self.service.table
        mismatch = any(table.queue(n) and table.slots_of(n) != slots.get(n) for n in names)
        mode = "shared" if shared else "exclusive"
        message = protocol.Acquire(
            request_id, names, mode=mode, timeout=None if timeout is None else float(timeout), pid=pid, slots=slots,
        )
        assert self.service.request(peer, message) is None
        orders = self.run()
        refused = [
            o.message.code for o in orders
            if isinstance(o, Send) and o.peer is peer and isinstance(o.message, protocol.Error)
            and o.message.id == request_id
        ]
        if deadlock:  # refused before it reaches the table (unless a limit came first)
            assert refused and refused[0] in ("would_deadlock", "limit"), (refused, orders)
        else:
            assert "would_deadlock" not in refused, orders
        if mismatch and not deadlock:  # refused at once, unless refused before the table
            assert refused and refused[0] in ("slots_mismatch", *BEFORE_THE_TABLE), (refused, orders)
        else:
            assert "slots_mismatch" not in refused, orders

    @precondition(lambda self: any(self.in_use(peer) for peer in self.peers.values() if not peer.deaf))
    @rule(data=st.data())
    def acquire_with_an_id_in_use(self, data: st.DataObject) -> None:
        """A request id in use is refused, and changes nothing."""
        peers = sorted(slot for slot, peer in self.peers.items() if self.in_use(peer) and not peer.deaf)
        peer = self.peers[data.draw(st.sampled_from(peers))]
        request_id = data.draw(st.sampled_from(self.in_use(peer)))
        assert self.service.request(peer, protocol.Acquire(request_id, ["x"])) is None
        (order,) = self.service.orders
        self.service.orders.clear()
        assert isinstance(order, Send) and isinstance(order.message, protocol.Error), order
        assert (order.message.id, order.message.code) == (request_id, "protocol"), order.message
        self.service.check()

    def in_use(self, peer: FakePeer) -> list[int]:
        client = self.service.clients[peer]
        return sorted({*client.tickets, *client.refusing})

    @precondition(lambda self: any(self.acquires(peer) for peer in self.peers.values()))
    @rule(data=st.data(), live=st.booleans())
    def release(self, data: st.DataObject, live: bool) -> None:
        """A client releases a lease, withdraws a request, or (now and then) names one
        already over."""
        peer = self.peers[data.draw(st.sampled_from(sorted(s for s, p in self.peers.items() if self.acquires(p))))]
        ids = self.acquires(peer)
        if live and any(peer.requests[i].state not in OVER for i in ids):
            ids = [i for i in ids if peer.requests[i].state not in OVER]
        request_id = data.draw(st.sampled_from(ids))
        request = peer.requests[request_id]
        if request.state == WAITING:
            request.state = WITHDRAWN
        elif request.state in (GRANTED, LOST):
            request.state = RELEASED
        assert self.service.request(peer, protocol.Release(request_id)) is None
        for order in self.run():
            if isinstance(order, Send) and order.peer is peer:
                assert getattr(order.message, "id", None) != request_id, f"{peer} told {order} about what it let go of"

    @staticmethod
    def acquires(peer: FakePeer) -> list[int]:
        return sorted(i for i, r in peer.requests.items() if r.kind == "acquire")

    @precondition(lambda self: self.peers)
    @rule(
        data=st.data(), pid=st.sampled_from([*PROCESSES, MISSING_PID]),
        names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
    )
    def release_pid(self, data: st.DataObject, pid: int, names: list[str]) -> None:
        """Someone releases the leases of a process on some names (lockctl release)."""
        peer = self.pick_peer(data)
        request_id = next(peer.ids)
        peer.requests[request_id] = Request("release_pid", ASKED)
        owner = self.service.processes.find(pid)
        allowed = owner is None or peer.uid in (0, owner.uid)
        wanted = set(names)
        released = [c for c in self.holding() if c.requester.pid == pid and not wanted.isdisjoint(c.names)]
        client = self.service.clients[peer]
        own = list(client.tickets)
        assert self.service.request(peer, protocol.ReleasePid(request_id, pid, names)) is None
        orders = self.run()
        at, reply = self.reply(orders, peer, request_id)
        assert isinstance(reply, (protocol.Done, protocol.Error)), reply
        if not allowed:
            assert isinstance(reply, protocol.Error) and reply.code == "permission_denied", reply
            assert not any(isinstance(o, Release) and o.claim in released and o.unlock for o in orders), orders
            return
        for claim in released:
            (where,) = [i for i, o in enumerate(orders) if isinstance(o, Release) and o.claim is claim]
            assert where < at, f"the reply to release_pid came before the Release of {claim}"
            assert self.released[claim], f"{claim} released by release_pid without unlocking"
        covered = set().union(*(c.names for c in released))
        if wanted <= covered:
            assert isinstance(reply, protocol.Done) and reply.released == len(released), reply
        else:
            assert isinstance(reply, protocol.Error) and reply.code == "not_held", reply
        # Its own leases it released are over for it: it asked (no Lost is sent).
        for i in own:
            if i not in client.tickets and peer.requests[i].state == GRANTED:
                peer.requests[i].state = RELEASED

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), name=st.sampled_from(NAMES), held=st.booleans())
    def force_release(self, data: st.DataObject, name: str, held: bool) -> None:
        """Someone breaks the leases on a name (mostly one that is held)."""
        peer = self.pick_peer(data)
        if held and self.holding():
            name = data.draw(st.sampled_from(sorted({n for claim in self.holding() for n in claim.names})))
        request_id = next(peer.ids)
        peer.requests[request_id] = Request("force_release", ASKED)
        holders = [c for c in self.holding() if name in c.names]
        allowed = peer.uid == 0 or all(c.requester.uid == peer.uid for c in holders)
        grace_until = self.clock.now + max([self.grace, *(self.granted[c].grace for c in holders)])
        assert self.service.request(peer, protocol.ForceRelease(request_id, name)) is None
        orders = self.run()
        at, reply = self.reply(orders, peer, request_id)
        if not allowed:
            assert isinstance(reply, protocol.Error) and reply.code == "permission_denied", reply
            # (A caller that stopped reading is cut off by the reply: its own leases go then,
            # as abandoned.)
            assert not any(isinstance(o, Release) and o.claim in holders and o.unlock for o in orders), orders
            return
        assert isinstance(reply, protocol.Done) and reply.released == len(holders), reply
        for claim in holders:
            if claim in self.broken:  # broken already: asked twice, it goes now
                (where,) = [i for i, o in enumerate(orders) if isinstance(o, Release) and o.claim is claim]
                assert where < at and self.released[claim], claim
            else:
                self.broken[claim] = grace_until

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), names=st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
    def status(self, data: st.DataObject, names: list[str]) -> None:
        peer = self.pick_peer(data)
        request_id = next(peer.ids)
        peer.requests[request_id] = Request("status", ASKED)
        look = self.service.request(peer, protocol.Status(request_id, names))
        assert look is not None
        self.statuses.append((peer, look))
        assert self.run() == []

    @precondition(lambda self: self.statuses)
    @rule(data=st.data(), outside=OUTSIDE)
    def status_looked(self, data: st.DataObject, outside: dict[str, list[protocol.Holder]]) -> None:
        """The look outside lockd is done: the status is answered (see `check_status`)."""
        peer, look = self.statuses.pop(data.draw(st.integers(0, len(self.statuses) - 1)))
        self.service.status_reply(peer, look, outside, {})
        self.run()

    # --- the backend --------------------------------------------------------------------------

    @rule(prompt=st.booleans())
    def backend_pace(self, prompt: bool) -> None:
        """Whether the backend takes what it is asked for at once (a free flock)."""
        self.prompt = prompt

    @precondition(lambda self: self.takes)
    @rule(data=st.data(), answer=st.sampled_from(["taken", "blocked", "failed", "waits"]))
    def take_answered(self, data: st.DataObject, answer: str) -> None:
        """The backend's take of a claim ends, or says it waits (for holders outside lockd,
        or where the backend orders requests, for those ahead in its queue)."""
        claim = data.draw(st.sampled_from(self.takes))
        if answer == "taken" and not self.its_turn(claim):
            answer = "waits" if claim.wait else "blocked"
        if answer == "blocked" and claim.wait:
            answer = "waits"  # a take that may wait waits
        self.answer_take(claim, answer)
        self.run()

    @precondition(lambda self: any(claim not in self.takes for claim in self.started))
    @rule(data=st.data(), report=st.sampled_from(["taken", "blocked", "waits"]), held=st.booleans())
    def late_report(self, data: st.DataObject, report: str, held: bool) -> None:
        """A report about a take that is over (a callback that lagged), for a lease still
        held or for any claim: it changes nothing."""
        claims = [c for c in self.started if c not in self.takes]
        if held and self.holding():
            claims = self.holding()
        claim = data.draw(st.sampled_from(claims))
        if report == "taken":
            self.service.taken(claim, [0] * len(claim.names))
        elif report == "blocked":
            self.service.take_blocked(claim)
        else:
            self.service.take_waits(claim, [protocol.Holder(pid=77, uid=0)])
        assert self.run() == []

    @precondition(lambda self: self.started)
    @rule(data=st.data())
    def backend_loses(self, data: st.DataObject) -> None:
        """The backend can no longer vouch for a claim (an etcd lease expired), ended or not."""
        claim = data.draw(st.sampled_from(list(self.started)))
        self.service.lost(claim, "the etcd lease expired")
        self.run()

    @precondition(lambda self: self.looks)
    @rule(data=st.data())
    def holders_found(self, data: st.DataObject) -> None:
        look = self.looks.pop(data.draw(st.integers(0, len(self.looks) - 1)))
        self.service.holders_found(look, [protocol.Holder(pid=77, uid=0, command="flock x.lock")])
        self.run()

    # --- processes, time, configuration, shutdown ------------------------------------------

    @precondition(lambda self: self.service.processes.owners())
    @rule(data=st.data())
    def process_exits(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.service.processes.owners(), key=lambda o: o.pid)))
        self.service.process_exited(owner)
        self.run()

    @rule(advance=st.integers(0, 7))
    def time_passes(self, advance: int) -> None:
        self.clock.now += advance
        now = self.clock.now
        due = {claim for claim, until in self.broken.items() if claim not in self.released and until <= now}
        self.service.wake()
        orders = self.run()
        if not self.stopped:
            overdue = {o.claim for o in orders if isinstance(o, Release) and o.claim in self.broken}
            assert overdue == due, f"broken leases released: {overdue}, due: {due}"
            assert all(self.released[claim] for claim in due)
        assert self.service.next_wake() > now
        for peer in self.peers.values():
            client = self.service.clients[peer]
            for request_id, request in peer.requests.items():
                if request.state == WAITING and request.deadline is not None and request.deadline <= now:
                    assert request_id in client.refusing, f"{peer}'s request {request_id} waits past its deadline"

    @rule(grace=st.sampled_from(GRACES))
    def reload(self, grace: float) -> None:
        self.grace = grace
        self.service.reconfigure(limits(grace), self.policy)

    @precondition(lambda self: not self.stopped and len(self.holding()) >= 2)
    @rule()
    def stop(self) -> None:
        """The daemon stops (once some leases are held: what follows a stop is dull)."""
        held = {peer: [i for i, r in peer.requests.items() if r.state == GRANTED] for peer in self.peers.values()}
        self.stopped = True
        self.service.stop()
        self.run()
        assert not self.service.clients and not self.peers
        for peer, granted in held.items():
            if peer.deaf:
                continue
            states = {peer.requests[i].state for i in granted}
            assert states <= ({GRANTED} if self.outlive else {LOST}), (peer, states)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def service_checks_itself(self) -> None:
        self.service.check()

    @invariant()
    def every_lease_tells_its_story(self) -> None:
        """Per token: granted, then maybe broken, then at most one end; nothing after it."""
        story: dict[int, list[str]] = {}
        for event in self.recorded:
            if event.token is not None:
                story.setdefault(event.token, []).append(event.event)
            else:
                assert event.event == "refused", event
        assert story.keys() == self.tokens_granted.keys()
        for token, kinds in story.items():
            ends = [kind for kind in kinds if kind in ("released", "lost")]
            assert kinds[0] == "granted" and len(ends) <= 1, (token, kinds)
            assert set(kinds[1 : len(kinds) - len(ends)]) <= {"broken"}, (token, kinds)
            # A lease the backend was told to let go of has ended.
            assert ends or self.tokens_granted[token][0] not in self.released, (token, kinds)

    @invariant()
    def serves_exactly_the_open_connections(self) -> None:
        assert set(self.service.clients) == set(self.peers.values())

    @invariant()
    def nothing_ends_unannounced(self) -> None:
        for peer in self.peers.values():
            client = self.service.clients[peer]
            for request_id, request in peer.requests.items():
                if request.state == WAITING:
                    assert request_id in client.tickets or request_id in client.refusing, (
                        f"{peer}'s request {request_id} ended without an answer"
                    )
                elif request.state == GRANTED:
                    ticket = client.tickets.get(request_id)
                    assert ticket is not None and ticket.state is HELD, (
                        f"{peer}'s lease {request_id} ended without its holder being told"
                    )
                elif request.kind != "acquire" and request.kind != "status":
                    assert request.state == ANSWERED, (peer, request_id, request)

    @invariant()
    def open_processes_are_watched(self) -> None:
        assert set(self.service.processes.owners()) == self.watched - self.unwatched

    def teardown(self) -> None:
        """Unless stopped: every lease is let go, and then every request has had its final
        answer; everyone leaves, and then every claim taken has been released exactly once
        and every process opened unwatched."""
        if not hasattr(self, "service") or self.stopped:
            return
        self.prompt = True
        for owner in self.service.processes.owners():
            self.service.process_exited(owner)
        self.run()
        for _ in range(100):
            if not (self.takes or self.looks or self.statuses or len(self.service.table)):
                break
            for claim in list(self.takes):
                if claim in self.takes and self.its_turn(claim):
                    self.answer_take(claim, "taken")
                elif claim in self.takes and not claim.wait:
                    self.answer_take(claim, "blocked")
            while self.looks:
                self.service.holders_found(self.looks.pop(), [])
            while self.statuses:
                peer, look = self.statuses.pop()
                self.service.status_reply(peer, look, {}, {})
            self.run()
            for peer in list(self.peers.values()):
                if peer.closed:
                    continue  # cut off meanwhile
                for request_id in list(self.service.clients[peer].tickets):
                    if peer.requests[request_id].state in (GRANTED, LOST):
                        peer.requests[request_id].state = RELEASED
                        self.service.request(peer, protocol.Release(request_id))
                self.run()
        assert len(self.service.table) == 0, self.service.table.names()
        for peer in self.peers.values():
            waiting = [i for i, r in peer.requests.items() if r.state in (WAITING, ASKED)]
            assert not waiting, f"{peer}: requests {waiting} never answered"
        for peer in list(self.peers.values()):
            self.hang_up(peer, "the client closed the connection")
        self.run()
        assert set(self.started) == set(self.released), set(self.started) ^ set(self.released)
        assert set(self.opened) == self.unwatched and not self.service.processes.owners()


# As in the table's model test: a failure is shrunk and reported alone, without the explain
# phase, which on a long run can take minutes to annotate what the shrunk steps show.
ServiceMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
test_lock_service_against_model = ServiceMachine.TestCase
