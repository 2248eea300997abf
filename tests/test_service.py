"""Unit tests of the lock service, the daemon's synchronous core: requests and reports in,
orders out, without sockets, tasks or a backend.

`Harness` plays the shell: it feeds inputs, collects the orders in order, and answers a
StartTake as the test says (at once, later, or never). Each time it has collected the
orders, and when the test ends, it checks the service's invariants (`LockService.check`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from lockd_client import errors, protocol

from lockd.backend import Claim, Requester
from lockd.config import Limits
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
    WakeAt,
    Watch,
)
from lockd.policy import Policy
from lockd.processes import Processes, ProcessOwner
from lockd.service import MAX_SUBSCRIPTIONS, Client, LockService, Party
from lockd.table import LockTable, Reason, State, Ticket

WALL_OFFSET = 1_000_000.0
#: The processes that exist, with their uids.
PID = 4242
PROCESS_UID = {PID: 1000, 1: 0}


class FakePeer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.label: str | None = None
        self.closed = False

    def send(self, message: object, fds: object = ()) -> None:
        raise AssertionError("the service never sends itself")

    def close(self, reason: str) -> None:
        raise AssertionError("the service never closes itself")

    def offer(self, subscription_id: int, message: object) -> bool:
        raise AssertionError("the service never sends itself")

    def end_events(self, subscription_id: int, notice: object | None) -> None:
        raise AssertionError("the service never sends itself")

    def __repr__(self) -> str:
        return f"<FakePeer {self.name}>"


class FakeBackend:
    """The facts of a backend like flock's, which leaves the order of requests to the table."""

    name = "flock"
    orders_requests = False
    loss_notice = None

    def __init__(self, leases_outlive_daemon: bool) -> None:
        self.leases_outlive_daemon = leases_outlive_daemon
        #: What the backend knows is held on other hosts.
        self.known_outside: list[str] = []

    def place_of(self, claim: Claim) -> int | None:
        return None

    def outside_names(self) -> list[str]:
        return self.known_outside

    def outside_slots(self, name: str) -> int | None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A LockService with a clock the test moves, and the shell's side played by the test."""

    def __init__(
        self, *, leases_outlive_daemon: bool = True, limits: Limits | None = None, grant: bool = True,
        ordered: bool = False, arrivals: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        """`ordered`: the backend orders requests, as etcd's does."""
        self.clock = Clock()
        #: How far the wall clock was stepped (set, synced) since the start.
        self.wall_step = 0.0
        self.backend = FakeBackend(leases_outlive_daemon)
        self.backend.orders_requests = ordered
        self.service = LockService(
            LockTable(ordered_by_backend=ordered), Processes(self.open_process), limits or Limits(),
            Policy((), {0: "root"}), self.backend, clock=self.clock,
            wall_clock=lambda: self.clock.now + WALL_OFFSET + self.wall_step, arrivals=arrivals,
        )
        #: Whether a StartTake is answered `taken` at once, as the flock backend does when the
        #: file is free; otherwise it is left to the test (a take waiting outside lockd).
        self.grant = grant
        self.tokens = iter(range(1, 1_000_000))
        self.taking: list[StartTake] = []
        self.peers: dict[str, FakePeer] = {}
        #: The events recorded, in order: kept apart from the other orders.
        self.events: list[protocol.LeaseEvent] = []

    @staticmethod
    def open_process(pid: int) -> ProcessOwner:
        """Processes from PROCESS_UID exist, of that user; no others do."""
        if pid not in PROCESS_UID:
            raise errors.NotHeld(f"process {pid} does not exist")
        return ProcessOwner(pid, PROCESS_UID[pid], f"process {pid}", -1)

    def connect(self, name: str, uid: int = 1000) -> Client:
        peer = self.peers[name] = FakePeer(name)
        welcome = self.service.connect(peer, 4000 + len(self.peers), uid, uid, frozenset({uid}), f"cmd {name}")
        assert isinstance(welcome, protocol.Welcome) and welcome.backend == "flock"
        assert self.orders() == []
        return self.service.clients[peer]

    def orders(self) -> list[Order]:
        """The orders the service left, in order, carrying out the takes as the shell would."""
        done: list[Order] = []
        queue = self.service.orders
        while queue:
            order = queue.popleft()
            if isinstance(order, Record):
                self.events.append(order.event)
                continue
            done.append(order)
            if isinstance(order, StartTake) and self.service.taking(order.claim):
                if self.grant:
                    self.service.taken(order.claim, [next(self.tokens) for _ in order.claim.names])
                else:
                    self.taking.append(order)
        self.service.check()
        return done

    def acquire(self, client: Client, request_id: int, *names: str, **fields: object) -> list[Order]:
        return self.request(client, protocol.Acquire(request_id, list(names), **fields))  # type: ignore[arg-type]

    def request(self, client: Client, message: object) -> list[Order]:
        assert self.service.request(client.peer, message) is None
        return self.orders()


def sent(orders: list[Order], peer: object | None = None) -> list[object]:
    return [o.message for o in orders if isinstance(o, Send) and (peer is None or o.peer is peer)]


def kinds(orders: list[Order]) -> list[str]:
    return [type(o).__name__ if not isinstance(o, Send) else type(o.message).__name__ for o in orders]


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.service.check()


def test_a_free_lock_is_taken_then_granted_with_its_tokens(h: Harness) -> None:
    a = h.connect("a")
    orders = h.acquire(a, 1, "x", "y")
    assert kinds(orders) == ["StartTake", "Grant"]
    grant = orders[1]
    assert isinstance(grant, Grant) and (grant.peer, grant.request_id, grant.tokens) == (a.peer, 1, [1, 2])
    assert grant.claim.names == ("x", "y") and grant.claim.requester.pid == a.pid and not grant.claim.shared
    assert a.names == 2


def test_a_clients_claims_share_who_asks_but_for_those_with_a_label_of_their_own(h: Harness) -> None:
    a = h.connect("a")
    a.peer.label = "nightly"  # type: ignore[misc]  # as its hello says, after the connect
    claims = [o.claim for i, name in enumerate("xyz", 1) for o in h.acquire(a, i, name) if isinstance(o, Grant)]
    (labelled,) = [o.claim for o in h.acquire(a, 4, "w", label="mine") if isinstance(o, Grant)]
    assert claims[0].requester is claims[1].requester is claims[2].requester
    assert claims[0].requester == Requester(a.pid, a.uid, a.gid, a.command, "nightly")
    assert labelled.requester == Requester(a.pid, a.uid, a.gid, a.command, "mine")


def test_a_release_unlocks_for_every_copy_and_hands_the_lock_to_the_next_in_line(h: Harness) -> None:
    a, b = h.connect("a"), h.connect("b")
    h.acquire(a, 1, "x")
    queued = h.acquire(b, 1, "x")
    assert kinds(queued) == ["Queued"]
    (message,) = sent(queued, b.peer)
    assert isinstance(message, protocol.Queued) and [w.pid for w in message.holders] == [a.pid]
    h.service.request(a.peer, protocol.Release(1))
    orders = h.orders()
    assert kinds(orders) == ["Release", "StartTake", "Grant"]
    release = orders[0]
    assert isinstance(release, Release) and release.unlock
    assert a.names == 0 and b.names == 1


def test_a_client_that_goes_away_leaves_its_lock_to_its_descriptors(h: Harness) -> None:
    a = h.connect("a")
    h.acquire(a, 1, "x")
    h.service.disconnected(a.peer, "the client closed the connection")
    (release,) = h.orders()
    assert isinstance(release, Release) and not release.unlock
    assert a.peer not in h.service.clients and len(h.service.table) == 0


def test_a_no_wait_request_on_a_held_lock_is_refused_naming_the_holder(h: Harness) -> None:
    a, b = h.connect("a"), h.connect("b")
    h.acquire(a, 1, "x")
    (refusal,) = sent(h.acquire(b, 7, "x", timeout=0))
    assert isinstance(refusal, protocol.Error) and (refusal.id, refusal.code) == (7, "busy")
    assert f"pid {a.pid}" in refusal.message and refusal.holders[0].pid == a.pid
    assert b.tickets == {} and b.names == 0


def test_a_request_id_in_use_is_a_protocol_error_and_changes_nothing(h: Harness) -> None:
    a = h.connect("a")
    h.acquire(a, 1, "x")
    (error,) = sent(h.acquire(a, 1, "y"))
    assert isinstance(error, protocol.Error) and error.code == "protocol" and "already in use" in error.message
    assert list(a.tickets) == [1] and h.service.table.holders("y") == []


def test_a_request_beyond_the_connections_lease_limit_is_refused(h: Harness) -> None:
    h.service.limits = Limits(max_leases_per_connection=2)
    a = h.connect("a")
    h.acquire(a, 1, "x", "y")
    (error,) = sent(h.acquire(a, 2, "z"))
    assert isinstance(error, protocol.Error) and error.code == "limit"
    h.service.request(a.peer, protocol.Release(1))
    h.orders()
    assert kinds(h.acquire(a, 3, "z")) == ["StartTake", "Grant"]


def test_a_request_times_out_at_its_deadline_by_the_clock_given(h: Harness) -> None:
    a, b = h.connect("a"), h.connect("b")
    h.acquire(a, 1, "x")
    orders = h.acquire(b, 2, "x", timeout=5.0)
    assert WakeAt(105.0) in orders
    h.clock.now = 104.9
    h.service.wake()
    assert h.orders() == []
    h.clock.now = 105.0
    h.service.wake()
    (error,) = sent(h.orders(), b.peer)
    assert isinstance(error, protocol.Error) and (error.id, error.code) == (2, "timeout")


def test_a_take_waiting_outside_lockd_is_stopped_when_its_client_withdraws(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    assert kinds(h.acquire(a, 1, "x")) == ["StartTake"]
    (take,) = h.taking
    h.service.take_waits(take.claim, [protocol.Holder(pid=9, uid=0)])
    (queued,) = sent(h.orders())
    assert isinstance(queued, protocol.Queued) and queued.holders[0].pid == 9
    h.service.request(a.peer, protocol.Release(1))
    orders = h.orders()
    assert kinds(orders) == ["StopTake", "Release"]
    assert isinstance(orders[0], StopTake) and orders[0].claim is take.claim
    # A late answer from the cancelled take changes nothing.
    h.service.taken(take.claim, [5])
    assert h.orders() == [] and a.taking == 0


def test_a_take_blocked_outside_is_refused_naming_who_holds_it_once_looked_up(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 3, "x", timeout=0)
    (take,) = h.taking
    h.service.take_blocked(take.claim)
    look, release = h.orders()
    assert isinstance(look, LookForHolders) and look.reason is Reason.BUSY
    assert isinstance(release, Release)  # nothing is held: the backend's drop does nothing
    # While the look runs the id stays in use: a new request with it is a protocol error.
    (error,) = sent(h.acquire(a, 3, "y"))
    assert isinstance(error, protocol.Error) and error.code == "protocol"
    h.service.holders_found(look, [protocol.Holder(pid=77, uid=0, command="flock x.lock")])
    (refusal,) = sent(h.orders())
    assert isinstance(refusal, protocol.Error) and refusal.code == "busy" and "pid 77" in refusal.message
    assert kinds(h.acquire(a, 3, "y")) == ["StartTake"]


def test_a_withdrawn_refusal_is_never_sent(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 3, "x", timeout=0)
    h.service.take_blocked(h.taking[0].claim)
    look, _ = h.orders()
    assert isinstance(look, LookForHolders)
    h.service.request(a.peer, protocol.Release(3))
    assert h.orders() == []
    h.service.holders_found(look, [])
    assert h.orders() == []


def test_a_withdrawn_refusal_is_not_sent_for_a_later_request_with_its_id(h: Harness) -> None:
    """A client may use an id again once it withdrew the request: the look for the old
    request's refusal, still running, must not answer the new one."""
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 3, "x", timeout=0)
    h.service.take_blocked(h.taking[0].claim)
    first, _ = h.orders()
    h.request(a, protocol.Release(3))
    h.acquire(a, 3, "y", timeout=2.0)
    h.clock.now += 2.0
    h.service.wake()
    (second,) = [o for o in h.orders() if isinstance(o, LookForHolders)]
    assert isinstance(first, LookForHolders) and second.names == ("y",)
    h.service.holders_found(first, [protocol.Holder(pid=77, uid=0)])
    assert h.orders() == []
    h.service.holders_found(second, [protocol.Holder(pid=78, uid=0)])
    (refusal,) = sent(h.orders())
    assert isinstance(refusal, protocol.Error) and (refusal.id, refusal.code) == (3, "timeout")
    assert refusal.message.startswith("y: timed out") and refusal.holders[0].pid == 78


def test_a_failed_take_fails_that_request_only(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 1, "x")
    h.acquire(a, 2, "y")
    first, second = h.taking
    h.service.take_failed(first.claim, errors.BadLockFile("x.lock is a directory"))
    orders = h.orders()
    assert kinds(orders) == ["Error", "StopTake", "Release"]
    assert list(a.tickets) == [2] and a.taking == 1
    h.service.taken(second.claim, [4])
    assert kinds(h.orders()) == ["Grant"]


def test_a_lease_the_backend_cannot_vouch_for_is_lost(h: Harness) -> None:
    a = h.connect("a")
    grant = h.acquire(a, 1, "x")[1]
    assert isinstance(grant, Grant)
    h.service.lost(grant.claim, "the etcd lease expired")
    orders = h.orders()
    (lost,) = sent(orders)
    assert isinstance(lost, protocol.Lost) and lost.reason == "the etcd lease expired"
    assert a.tickets == {}
    h.service.lost(grant.claim, "again")  # a report about a claim already ended is ignored
    assert h.orders() == []


def test_release_pid_unlocks_before_it_answers(h: Harness) -> None:
    a, admin = h.connect("a", uid=PROCESS_UID[PID]), h.connect("admin", uid=0)
    ours = PID
    h.service.request(a.peer, protocol.Acquire(1, ["x"], pid=ours))
    orders = h.orders()
    assert kinds(orders) == ["Watch", "StartTake", "Grant"]
    watch = orders[0]
    assert isinstance(watch, Watch) and watch.owner.pid == ours
    h.service.request(admin.peer, protocol.ReleasePid(5, ours, ["x"]))
    orders = h.orders()
    # The holder hears first, then the lock goes, then the caller is told: never before it went.
    assert kinds(orders) == ["Lost", "Release", "Unwatch", "Done"]
    assert isinstance(orders[1], Release) and orders[1].unlock
    assert h.service.processes.find(ours) is None  # nothing tied to it any more: not watched


def test_a_forced_release_breaks_the_lease_until_its_holder_lets_go(h: Harness) -> None:
    a, b, admin = h.connect("a"), h.connect("b"), h.connect("admin", uid=0)
    h.acquire(a, 1, "x")
    h.acquire(b, 1, "x")
    h.service.request(admin.peer, protocol.ForceRelease(9, "x"))
    orders = h.orders()
    assert kinds(orders) == ["WakeAt", "Lost", "Done"]
    assert orders[0] == WakeAt(100.0 + Limits().break_grace)
    # Broken, not ended: b still waits until a says it has stopped.
    assert h.service.table.waiters("x")[0].owner is b
    h.service.request(a.peer, protocol.Release(1))
    assert kinds(h.orders()) == ["Release", "StartTake", "Grant"]


def test_a_broken_lease_not_let_go_within_the_grace_is_released_under_its_holder(h: Harness) -> None:
    a, admin = h.connect("a"), h.connect("admin", uid=0)
    h.acquire(a, 1, "x")
    h.service.request(admin.peer, protocol.ForceRelease(9, "x"))
    h.orders()
    h.clock.now += Limits().break_grace
    h.service.wake()
    (release,) = h.orders()
    assert isinstance(release, Release) and release.unlock


@pytest.mark.parametrize("outlive", [True, False])
def test_stop_reports_leases_lost_only_where_they_do_not_outlive_the_daemon(outlive: bool) -> None:
    h = Harness(leases_outlive_daemon=outlive)
    a = h.connect("a")
    h.acquire(a, 1, "x")
    h.service.stop()
    orders = h.orders()
    assert kinds(orders) == (["Error", "Close"] if outlive else ["Lost", "Error", "Close"])
    assert isinstance(orders[-1], Close) and orders[-1].peer is a.peer
    # Once stopping, nothing is released: the backend's own shutdown decides.
    h.service.disconnected(a.peer, "the daemon stopped serving it")
    assert h.orders() == []
    b = FakePeer("b")
    assert h.service.connect(b, 1, 1, 1, frozenset(), "late") is None
    assert kinds(h.orders()) == ["Error", "Close"]


def test_a_connection_over_the_limit_is_told_why_and_closed() -> None:
    h = Harness(limits=Limits(max_connections_per_uid=1))
    h.connect("a")
    late = FakePeer("late")
    assert h.service.connect(late, 1, 1000, 1000, frozenset(), "again") is None
    error, close = h.orders()
    assert isinstance(error, Send) and isinstance(error.message, protocol.Error)
    assert error.message.code == "limit" and "max_connections_per_uid" in error.message.message
    assert isinstance(close, Close) and close.peer is late


def test_a_status_shows_holders_and_waiters_with_what_is_held_outside(h: Harness) -> None:
    a, b = h.connect("a"), h.connect("b")
    a.peer.label = "nightly"  # type: ignore[misc]
    h.acquire(a, 1, "x", mode="shared")
    h.acquire(b, 1, "x")
    h.backend.known_outside = ["remote"]
    look = h.service.request(b.peer, protocol.Status(2, []))
    assert look is not None and look.names == ["x", "remote"] and look.look_for == ["remote"] and look.every_file
    # What the look finds: another host's holder, a process flocking a file, and one
    # conflicting with lockd's shared holders of x, which must have let go since.
    outside = {
        "remote": [protocol.Holder(pid=5, uid=0, mode="exclusive")], "y": [protocol.Holder(pid=6, uid=0)],
        "x": [protocol.Holder(pid=7, uid=0, mode="exclusive"), protocol.Holder(pid=8, uid=0, mode="shared")],
    }
    h.service.status_reply(b.peer, look, outside, {"remote": [protocol.Holder(pid=9, uid=0)]})
    (reply,) = sent(h.orders())
    assert isinstance(reply, protocol.StatusReply)
    shown = {lock.name: lock for lock in reply.locks}
    assert list(shown) == ["x", "remote", "y"]
    x = shown["x"]
    assert (x.mode, [(w.pid, w.label) for w in x.holders], [w.pid for w in x.waiters]) == (
        "shared", [(a.pid, "nightly"), (8, None)], [b.pid],
    )
    assert x.holders[0].since == pytest.approx(100.0 + WALL_OFFSET)
    assert [w.pid for w in shown["remote"].waiters] == [9]


def test_a_status_for_a_client_gone_during_the_look_is_not_sent(h: Harness) -> None:
    a = h.connect("a")
    look = h.service.request(a.peer, protocol.Status(2, ["x"]))
    assert look is not None and look.look_for == ["x"] and not look.every_file
    h.service.disconnected(a.peer, "the client closed the connection")
    h.service.status_reply(a.peer, look, {}, {})
    assert h.orders() == []


def test_tickets_of_a_process_end_with_it(h: Harness) -> None:
    a = h.connect("a", uid=PROCESS_UID[PID])
    ours = PID
    h.service.request(a.peer, protocol.Acquire(1, ["x"], pid=ours))
    h.orders()
    h.service.request(a.peer, protocol.Acquire(2, ["x"], pid=ours, timeout=5.0))  # waits behind the first
    h.orders()
    owner = h.service.processes.find(ours)
    assert owner is not None and len(owner.tickets) == 2
    h.service.process_exited(owner)
    orders = h.orders()
    # The lease is lost, the waiting request fails, and only then is anything released (not
    # granted to the waiter on its way out).
    assert sorted(kinds(orders)[:2]) == ["Error", "Lost"] and kinds(orders)[2:] == ["Release", "Unwatch"]
    assert a.tickets == {} and a.names == 0


def test_a_take_for_a_request_withdrawn_before_it_started_is_obsolete(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    h.service.request(a.peer, protocol.Acquire(1, ["x"]))
    h.service.request(a.peer, protocol.Release(1))
    start, stop, release = h.service.orders
    assert isinstance(start, StartTake) and not h.service.taking(start.claim)
    assert isinstance(stop, StopTake) and isinstance(release, Release)


def test_a_claim_lost_while_it_is_being_taken_stops_the_take(h: Harness) -> None:
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 1, "x")
    (take,) = h.taking
    h.service.lost(take.claim, "the etcd lease expired")
    orders = h.orders()
    assert kinds(orders) == ["Error", "StopTake", "Release"]
    (error,) = sent(orders)
    assert isinstance(error, protocol.Error) and error.code == "unavailable"


def test_a_broken_lease_the_backend_loses_ends_without_unlocking_under_its_holder(h: Harness) -> None:
    a, admin = h.connect("a"), h.connect("admin", uid=0)
    grant = h.acquire(a, 1, "x")[1]
    assert isinstance(grant, Grant)
    h.service.request(admin.peer, protocol.ForceRelease(9, "x"))
    h.orders()
    h.service.lost(grant.claim, "the etcd lease expired")
    (release,) = h.orders()  # told when it was broken: nothing more is sent
    assert isinstance(release, Release) and not release.unlock
    assert a.tickets == {}


def test_a_process_that_exits_ends_its_tickets_in_arrival_order(h: Harness) -> None:
    """Whatever order its tickets are kept in: what follows (who is told first, which waiter
    is granted first and so gets the lower tokens) must not depend on where in memory they
    are, or a re-executed daemon would decide otherwise than the one it took over from."""
    a = h.connect("a", uid=PROCESS_UID[PID])
    b = h.connect("b")
    names = [f"n{i}" for i in range(12)]
    for request_id, name in enumerate(names, 1):
        h.acquire(a, request_id, name, pid=PID)
        h.acquire(b, request_id, name)
    owner = h.service.processes.find(PID)
    assert owner is not None
    h.service.process_exited(owner)
    orders = h.orders()
    assert [m.id for m in sent(orders, a.peer)] == list(range(1, len(names) + 1))
    grants = [(o.request_id, o.tokens) for o in orders if isinstance(o, Grant)]
    assert grants == [(i, [len(names) + i]) for i in range(1, len(names) + 1)]


def test_a_process_tied_grant_that_reached_nobody_ends(h: Harness) -> None:
    """The shell reports a Grant whose connection closed as it went out: the lease, tied to a
    process that never got its descriptors, must not live on until that process exits."""
    a = h.connect("a", uid=PROCESS_UID[PID])
    h.service.request(a.peer, protocol.Acquire(1, ["x"], pid=PID))
    grant = h.orders()[-1]
    assert isinstance(grant, Grant)
    h.events.clear()
    h.service.grant_undelivered(grant.claim)
    orders = h.orders()
    assert kinds(orders) == ["Release", "Unwatch"]  # nobody to tell: its connection is gone
    assert isinstance(orders[0], Release) and not orders[0].unlock
    assert a.tickets == {} and h.service.processes.find(PID) is None
    assert ends(h) == [("released", "client_gone", "its client went away without releasing it")]


def test_a_grant_that_could_not_be_sent_fails_its_request_and_goes_to_the_next_waiter(h: Harness) -> None:
    """The shell had no descriptor left to send a Grant with, and its client serves on: it
    hears the error in the grant's place, and the lease, never held, goes to the next."""
    a, b = h.connect("a"), h.connect("b")
    grant = h.acquire(a, 1, "x")[-1]
    assert isinstance(grant, Grant)
    h.acquire(b, 1, "x")
    h.events.clear()
    h.service.grant_unsendable(grant.claim, errors.LimitExceeded("the daemon is out of file descriptors"))
    orders = h.orders()
    assert sent(orders, a.peer) == [protocol.Error(1, "limit", "the daemon is out of file descriptors")]
    assert [o.peer for o in orders if isinstance(o, Grant)] == [b.peer]
    assert a.tickets == {}
    assert ends(h) == [("lost", "limit", "the daemon is out of file descriptors")]
    h.service.grant_unsendable(grant.claim, errors.LimitExceeded("again"))  # ended: nothing more
    assert h.orders() == []


def test_the_per_uid_lease_limit_counts_only_live_leases(h: Harness) -> None:
    """Names a uid's connections asked for stop counting once those requests end."""
    h.service.limits = Limits(max_leases_per_uid=2)
    a, b = h.connect("a"), h.connect("b")
    h.acquire(a, 1, "x", "y")
    (error,) = sent(h.acquire(b, 1, "z"))
    assert isinstance(error, protocol.Error) and error.code == "limit" and "max_leases_per_uid" in error.message
    h.request(a, protocol.Release(1))
    assert kinds(h.acquire(b, 2, "z")) == ["StartTake", "Grant"]


def test_a_broken_lease_keeps_the_grace_its_client_was_promised_when_a_reload_shortens_it(h: Harness) -> None:
    a = h.connect("a")  # promised Limits().break_grace
    h.service.reconfigure(Limits(break_grace=5.0), h.service.policy)
    admin = h.connect("admin", uid=0)
    h.acquire(a, 1, "x")
    h.request(admin, protocol.ForceRelease(9, "x"))
    promised = Limits().break_grace
    assert promised > 5.0
    h.clock.now = 100.0 + 5.0
    h.service.wake()
    assert h.orders() == []  # still a's to let go of
    h.clock.now = 100.0 + promised
    h.service.wake()
    (release,) = h.orders()
    assert isinstance(release, Release) and release.unlock


def test_release_pid_of_another_users_process_is_refused(h: Harness) -> None:
    a, other = h.connect("a", uid=PROCESS_UID[PID]), h.connect("other", uid=PROCESS_UID[PID] + 1)
    h.request(a, protocol.Acquire(1, ["x"], pid=PID))
    orders = h.request(other, protocol.ReleasePid(5, PID, ["x"]))
    (error,) = sent(orders)
    assert isinstance(error, protocol.Error) and (error.id, error.code) == (5, "permission_denied")
    assert kinds(orders) == ["Error"]  # nothing released
    assert [t.state for t in h.service.table.holders("x")] == [State.HELD]


def test_a_second_lease_of_a_process_on_a_name_it_holds_is_refused_unless_its_wait_is_bounded(h: Harness) -> None:
    """It would wait for the first, which ends only when that same process lets go."""
    a = h.connect("a", uid=PROCESS_UID[PID])
    h.request(a, protocol.Acquire(1, ["x"], pid=PID))
    (error,) = sent(h.request(a, protocol.Acquire(2, ["y", "x"], pid=PID)))
    assert isinstance(error, protocol.Error) and (error.id, error.code) == (2, "would_deadlock")
    assert list(a.tickets) == [1] and h.service.table.waiters("x") == []
    # A bounded wait ends by itself: it may queue.
    assert kinds(h.request(a, protocol.Acquire(3, ["x"], pid=PID, timeout=5.0))) == ["WakeAt", "Queued"]


def test_a_connection_gone_during_a_look_keeps_no_refusal_while_its_process_lease_lives(h: Harness) -> None:
    """Its process-tied lease keeps the client known after the connection is gone: what it
    had to refuse must not live on with it."""
    a = h.connect("a", uid=PROCESS_UID[PID])
    h.request(a, protocol.Acquire(1, ["x"], pid=PID))
    h.grant = False
    h.acquire(a, 2, "y", timeout=0)
    h.service.take_blocked(h.taking[0].claim)
    look, _ = h.orders()
    assert isinstance(look, LookForHolders) and list(a.refusing) == [2]
    h.service.disconnected(a.peer, "the client closed the connection")
    assert h.orders() == [] and not a.refusing
    assert list(a.tickets) == [1]  # the lease on x lives on, tied to the process
    h.service.holders_found(look, [])
    assert h.orders() == []


def test_a_late_word_that_a_take_waits_is_not_sent_once_it_is_granted(h: Harness) -> None:
    """The backend's callback may report a wait that is already over: the client, granted
    already, must not hear that it waits."""
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 1, "x")
    (take,) = h.taking
    h.service.taken(take.claim, [3])
    assert kinds(h.orders()) == ["Grant"]
    h.service.take_waits(take.claim, [protocol.Holder(pid=9, uid=0)])
    assert h.orders() == []


def test_a_status_leaves_out_outside_holders_that_conflict_with_an_exclusive_lease(h: Harness) -> None:
    """While lockd holds a name exclusively, any outside holder of it seen by the look has let
    go since, shared or not."""
    a = h.connect("a")
    h.acquire(a, 1, "x")
    look = h.service.request(a.peer, protocol.Status(2, ["x"]))
    assert look is not None
    outside = {"x": [protocol.Holder(pid=7, uid=0, mode="exclusive"), protocol.Holder(pid=8, uid=0, mode="shared")]}
    h.service.status_reply(a.peer, look, outside, {})
    (reply,) = sent(h.orders())
    assert isinstance(reply, protocol.StatusReply)
    (x,) = reply.locks
    assert (x.mode, [w.pid for w in x.holders]) == ("exclusive", [a.pid])


# --- subscriptions to lease events --------------------------------------------------------------


def published(orders: list[Order], peer: object) -> list[tuple[int, str, str]]:
    """(subscription, event, name) of each event published to `peer`, in order."""
    return [
        (o.subscription_id, o.event.event, o.event.name) for o in orders if isinstance(o, Publish) and o.peer is peer
    ]


def test_a_subscription_gets_the_events_it_asks_for_in_order(h: Harness) -> None:
    watcher, a = h.connect("watcher"), h.connect("a")
    assert sent(h.request(watcher, protocol.Subscribe(7, ["x"]))) == [protocol.Done(7)]
    assert sent(h.request(watcher, protocol.Subscribe(8))) == [protocol.Done(8)]
    orders = h.acquire(a, 1, "x", "y") + h.request(a, protocol.Release(1, exit_status=3))
    assert published(orders, watcher.peer) == [
        (7, "granted", "x"), (8, "granted", "x"), (8, "granted", "y"),
        (7, "released", "x"), (8, "released", "x"), (8, "released", "y"),
    ]
    released = [o.event for o in orders if isinstance(o, Publish) and o.event.event == "released"]
    assert {e.exit_status for e in released} == {3} and all(e.held == 0.0 for e in released)


def test_a_user_sees_only_their_own_events_unless_the_policy_lets_them_read_all(h: Harness) -> None:
    mine, root, other = h.connect("mine", uid=1000), h.connect("root", uid=0), h.connect("other", uid=2000)
    for watcher in (mine, root):
        h.request(watcher, protocol.Subscribe(9))
    orders = h.acquire(mine, 1, "x") + h.acquire(other, 1, "y")
    assert published(orders, mine.peer) == [(9, "granted", "x")]
    assert published(orders, root.peer) == [(9, "granted", "x"), (9, "granted", "y")]


def test_release_and_disconnect_end_a_subscription(h: Harness) -> None:
    watcher, a = h.connect("watcher"), h.connect("a")
    h.request(watcher, protocol.Subscribe(1))
    # No reply, as for a lease; what waits to be sent for it is thrown away.
    assert h.request(watcher, protocol.Release(1)) == [EndEvents(watcher.peer, 1, None)]
    assert not h.service.subscribed(watcher.peer, 1)
    assert published(h.acquire(a, 1, "x"), watcher.peer) == []
    h.request(watcher, protocol.Subscribe(2))
    h.service.disconnected(watcher.peer, "the client hung up")
    assert published(h.request(a, protocol.Release(1)), watcher.peer) == []


def test_a_lagging_subscriber_is_dropped_with_a_notice_and_keeps_its_lease(h: Harness) -> None:
    watcher, a = h.connect("watcher"), h.connect("a")
    h.acquire(watcher, 1, "held")
    h.request(watcher, protocol.Subscribe(2))
    h.acquire(a, 1, "x")
    h.service.subscriber_lagging(watcher.peer, 2)
    (end,) = h.orders()  # its unsent events thrown away, the notice its last word
    assert isinstance(end, EndEvents) and (end.peer, end.subscription_id) == (watcher.peer, 2)
    notice = end.notice
    assert isinstance(notice, protocol.Error) and (notice.id, notice.code) == (2, protocol.ErrorCode.LIMIT)
    assert "subscribe again" in notice.message
    assert not h.service.subscribed(watcher.peer, 2) and watcher.tickets[1].state is State.HELD
    h.service.subscriber_lagging(watcher.peer, 2)  # a late report about it changes nothing
    assert published(h.request(a, protocol.Release(1)), watcher.peer) == [] and h.orders() == []


def test_a_subscription_id_is_a_request_id_like_any_other(h: Harness) -> None:
    watcher = h.connect("watcher")
    h.acquire(watcher, 1, "x")
    (error,) = sent(h.request(watcher, protocol.Subscribe(1)))
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.PROTOCOL
    h.request(watcher, protocol.Subscribe(2))
    (error,) = sent(h.acquire(watcher, 2, "y"))
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.PROTOCOL
    (error,) = sent(h.request(watcher, protocol.Subscribe(3, ["../etc"])))
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.INVALID_NAME


def test_subscriptions_per_connection_are_bounded(h: Harness) -> None:
    watcher = h.connect("watcher")
    for request_id in range(MAX_SUBSCRIPTIONS):
        h.request(watcher, protocol.Subscribe(request_id))
    (error,) = sent(h.request(watcher, protocol.Subscribe(MAX_SUBSCRIPTIONS)))
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.LIMIT


def test_subscriptions_per_uid_are_bounded_over_connections() -> None:
    h = Harness(limits=Limits(max_subscriptions_per_uid=3))
    first, second, other = h.connect("first"), h.connect("second"), h.connect("other", uid=2000)
    for request_id in (1, 2):
        h.request(first, protocol.Subscribe(request_id, ["x"]))
    h.request(second, protocol.Subscribe(1))
    (error,) = sent(h.request(second, protocol.Subscribe(2)))
    assert isinstance(error, protocol.Error) and error.code == protocol.ErrorCode.LIMIT
    assert "max_subscriptions_per_uid" in error.message
    assert sent(h.request(other, protocol.Subscribe(1))) == [protocol.Done(1)]  # another user's own
    h.request(first, protocol.Release(1))
    h.service.disconnected(first.peer, "the client hung up")
    assert sent(h.request(second, protocol.Subscribe(2))) == [protocol.Done(2)]  # counted down on each end


def test_an_event_is_looked_at_only_by_the_subscriptions_that_want_its_name(h: Harness) -> None:
    watcher, a = h.connect("watcher"), h.connect("a")
    for request_id in range(1, MAX_SUBSCRIPTIONS):
        h.request(watcher, protocol.Subscribe(request_id, [f"other{request_id}"]))
    h.request(watcher, protocol.Subscribe(MAX_SUBSCRIPTIONS, ["x", "other1"]))
    assert published(h.acquire(a, 1, "x"), watcher.peer) == [(MAX_SUBSCRIPTIONS, "granted", "x")]
    assert published(h.acquire(a, 2, "other1"), watcher.peer) == [
        (1, "granted", "other1"), (MAX_SUBSCRIPTIONS, "granted", "other1"),
    ]


def test_a_reload_that_takes_away_reading_everyones_events_applies_to_live_subscriptions(h: Harness) -> None:
    reader, mine, other = h.connect("reader", uid=3000), h.connect("mine", uid=1000), h.connect("other", uid=2000)
    h.service.reconfigure(Limits(), Policy((), {0: "root"}, event_reader_uids=[0, 3000]))
    h.request(reader, protocol.Subscribe(1))
    assert published(h.acquire(mine, 1, "x"), reader.peer) == [(1, "granted", "x")]
    h.service.reconfigure(Limits(), Policy((), {0: "root"}))  # 3000 reads only its own now
    assert published(h.acquire(other, 1, "y") + h.acquire(reader, 2, "z"), reader.peer) == [(1, "granted", "z")]
    h.service.reconfigure(Limits(), Policy((), {0: "root"}, event_reader_uids=[0, 3000]))  # and back
    assert published(h.request(mine, protocol.Release(1)), reader.peer) == [(1, "released", "x")]


# --- each lease's story, whatever fails ---------------------------------------------------------


def ends(h: Harness) -> list[tuple[str, str | None, str | None]]:
    """(event, cause, reason) of the events recorded but `granted`, taking them."""
    taken = [(e.event, e.cause, e.reason) for e in h.events if e.event != "granted"]
    h.events.clear()
    return taken


def test_each_end_says_its_cause(h: Harness) -> None:
    a, b = h.connect("a", uid=PROCESS_UID[PID]), h.connect("b")
    h.acquire(a, 1, "x")
    h.request(a, protocol.Release(1, exit_status=2))
    assert ends(h) == [("released", "requested", None)]
    h.acquire(a, 2, "x", pid=PID)
    h.request(b, protocol.ReleasePid(1, PID, ["x"]))
    assert ends(h) == [("released", "released_by_other", None)]
    h.acquire(a, 3, "x", pid=PID)
    owner = h.service.processes.find(PID)
    assert owner is not None
    h.service.process_exited(owner)
    h.orders()
    assert ends(h) == [("released", "process_exited", "its process exited without releasing it")]
    h.acquire(b, 2, "y")
    h.service.disconnected(b.peer, "the client hung up")
    h.orders()
    assert ends(h) == [("released", "client_gone", "its client went away without releasing it")]


def test_a_broken_lease_ends_lost_when_forced_again_overdue_or_lost_by_the_backend(h: Harness) -> None:
    a, root = h.connect("a"), h.connect("root", uid=0)
    h.acquire(a, 1, "x")
    h.request(root, protocol.ForceRelease(1, "x"))
    ((kind, cause, reason),) = ends(h)
    assert (kind, cause) == ("broken", "forced") and reason is not None and "uid 0" in reason
    h.request(root, protocol.ForceRelease(2, "x"))  # again: it ends at once
    ((kind, cause, reason),) = ends(h)
    assert (kind, cause) == ("lost", "forced") and reason is not None and "a second time" in reason

    h.acquire(a, 2, "y")
    h.request(root, protocol.ForceRelease(3, "y"))
    ends(h)
    h.clock.now += Limits().break_grace + 1
    h.service.wake()
    h.orders()
    assert ends(h) == [("lost", "overdue", "broken, and not let go within limits.break_grace")]

    h.acquire(a, 3, "z")
    claim = party_claim(h, a, 3)
    h.request(root, protocol.ForceRelease(4, "z"))
    ends(h)
    h.service.lost(claim, "the etcd lease expired")
    h.orders()
    assert ends(h) == [("lost", "backend", "the etcd lease expired")]


def test_a_lease_ended_by_a_bug_is_lost_internally(h: Harness) -> None:
    a = h.connect("a")
    h.acquire(a, 1, "x")
    grant = Grant(a.peer, 1, [1], party_claim(h, a, 1))
    h.service.order_failed(grant)
    (lost,) = sent(h.orders(), a.peer)
    assert isinstance(lost, protocol.Lost)
    assert ends(h) == [("lost", "internal", lost.reason)]


@pytest.mark.parametrize("outlive", [True, False])
def test_a_daemon_that_stops_ends_every_lease_s_story(outlive: bool) -> None:
    h = Harness(leases_outlive_daemon=outlive)
    a = h.connect("a", uid=PROCESS_UID[PID])
    h.acquire(a, 1, "x")
    h.acquire(a, 2, "y", pid=PID)
    h.events.clear()
    h.service.stop()
    h.orders()
    expected = ("released", "daemon_stopped") if outlive else ("lost", "daemon_stopped")
    assert [(kind, cause) for kind, cause, _ in ends(h)] == [expected, expected]
    assert len(h.service.table) == 0


def party_claim(h: Harness, client: Client, request_id: int) -> Claim:
    info = client.tickets[request_id].info
    assert isinstance(info, Party)
    return info.claim


def story(h: Harness) -> list[tuple[str, str | None]]:
    """(event, reason) of the events recorded and not yet collected, leaving the other orders."""
    return [(o.event.event, o.event.reason) for o in h.service.orders if isinstance(o, Record)]


def test_a_grant_that_fails_as_it_is_ordered_is_recorded_before_its_end(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_grant(*args: object) -> Grant:
        raise RuntimeError("a bug ordering the grant")

    a = h.connect("a")
    monkeypatch.setattr("lockd.service.Grant", broken_grant)
    h.service.request(a.peer, protocol.Acquire(1, ["x"]))
    h.orders()
    assert [(event.event, event.cause) for event in h.events] == [("granted", None), ("lost", "internal")]


def test_an_end_is_recorded_even_if_letting_go_of_its_records_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()  # not checked: the bug leaves the records as they were
    a = h.connect("a")
    h.acquire(a, 1, "x", pid=PID)
    h.events.clear()

    def broken_detach(*args: object) -> bool:
        raise RuntimeError("a bug letting go of the process")

    monkeypatch.setattr(h.service.processes, "detach", broken_detach)
    h.service.request(a.peer, protocol.Release(1))
    assert [kind for kind, _ in story(h)] == ["released"]


def test_a_request_that_fails_before_its_grant_is_recorded_refused(h: Harness) -> None:
    a, b = h.connect("a", uid=PROCESS_UID[PID]), h.connect("b")
    h.acquire(b, 1, "x")
    h.acquire(a, 1, "x", pid=PID)  # waits behind b
    owner = h.service.processes.find(PID)
    assert owner is not None
    h.events.clear()
    h.service.process_exited(owner)
    h.orders()
    assert ends(h) == [("refused", "process_exited", protocol.ErrorCode.NOT_HELD)]
    h.acquire(a, 2, "x")
    h.service.order_failed(StartTake(party_claim(h, a, 2)))  # not handed over yet: nothing to end
    h.grant = False
    h.request(b, protocol.Release(1))
    (taking,) = h.taking
    h.events.clear()
    h.service.order_failed(taking)
    h.orders()
    assert ends(h) == [("refused", "internal", protocol.ErrorCode.UNAVAILABLE)]


def test_a_dropped_subscription_is_logged_within_bounds(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    watcher = h.connect("watcher")
    for request_id in range(1, MAX_SUBSCRIPTIONS + 1):
        h.request(watcher, protocol.Subscribe(request_id))
    with caplog.at_level("INFO", logger="lockd"):
        for request_id in range(1, MAX_SUBSCRIPTIONS + 1):
            h.service.subscriber_lagging(watcher.peer, request_id)
        h.orders()
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 0 < len(dropped) < MAX_SUBSCRIPTIONS


def test_event_times_follow_the_wall_clock_as_it_is_stepped(h: Harness) -> None:
    a = h.connect("a")
    h.acquire(a, 1, "x")
    h.wall_step = 3600.0  # time sync after an early start: an hour forward
    h.clock.now += 2.0
    h.request(a, protocol.Release(1))
    granted, released = h.events
    assert granted.time == 100.0 + WALL_OFFSET
    assert released.time == 102.0 + WALL_OFFSET + 3600.0 and released.held == 2.0


def test_a_take_blocked_outside_lockd_counts_as_waiting_until_granted(h: Harness) -> None:
    # The table let it through (TAKING) but flock() waits for a process outside lockd: status
    # lists it as a waiter, and so must the census the metrics and the systemd status read.
    h.grant = False
    a = h.connect("a")
    h.acquire(a, 1, "x", "y")
    h.clock.now = 130.0
    census = h.service.census()
    assert (census.leases, census.requests, census.held_since, census.waiting_since) == (0, 1, None, 100.0)
    assert (census.held["exclusive"], census.waiting["exclusive"]) == (0, 2)
    assert h.service.counts() == (0, 1, 1)
    (take,) = h.taking
    h.service.taken(take.claim, [5, 6])
    h.orders()
    census = h.service.census()
    assert (census.leases, census.requests, census.held_since, census.waiting_since) == (1, 0, 130.0, None)
    assert h.service.counts() == (1, 0, 1)
    assert h.service.name_census("x").held["exclusive"] == 1


def test_the_census_keeps_no_ended_lease_alive_for_long(h: Harness) -> None:
    a = h.connect("a")
    for request_id in range(1, 301):
        h.acquire(a, request_id, f"n{request_id}")
    for request_id in range(2, 301):  # the oldest lease stays at the front of the census
        h.request(a, protocol.Release(request_id))
    gc.collect()
    # Those ended since the last sweep, which runs as they end: a few dozen at most.
    assert sum(type(o) is Ticket and o.owner is a for o in gc.get_objects()) < 100


def test_the_oldest_holder_and_waiter_follow_grants_and_ends_in_order(h: Harness) -> None:
    a, b, c = h.connect("a"), h.connect("b"), h.connect("c")
    h.acquire(a, 1, "x")
    h.clock.now = 110.0
    h.acquire(b, 1, "y")
    h.acquire(c, 1, "x")
    h.clock.now = 120.0
    h.acquire(c, 2, "y", mode="shared")
    assert (h.service.census().held_since, h.service.census().waiting_since) == (100.0, 110.0)
    h.request(a, protocol.Release(1))  # c's first request is granted, at 120
    assert (h.service.census().held_since, h.service.census().waiting_since) == (110.0, 120.0)
    h.request(b, protocol.Release(1))
    census = h.service.census()
    assert (census.held_since, census.waiting_since, census.leases, census.requests) == (120.0, None, 2, 0)
