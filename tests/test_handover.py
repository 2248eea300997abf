"""The handover state format (lockd.handover) and the check a re-exec runs first
(lockd.reexec.check, `lockd --check-handover`): a state this program cannot read, or one
that could not be live, is refused, saying why, before anything of it is used; a good one
passes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from lockd_client import protocol

from lockd import __main__ as main
from lockd import handover, reexec
from lockd.backend import BackendKind, Claim
from lockd.config import Config
from lockd.flock.backend import FlockBackend
from lockd.orders import StartTake
from lockd.policy import Policy
from lockd.processes import Processes, ProcessOwner
from lockd.service import LockService
from lockd.table import LockTable

from .conftest import Daemon
from .test_service_handover import FakePeer
from .test_service_model import FakeBackend

PROCESS = 4321


def a_state(**changes: Any) -> handover.State:
    """What a daemon hands over with a lease held on x by one client, a request of another
    waiting for it with a deadline, a lease on y tied to a process, and a subscription."""
    return msgspec.structs.replace(handed_over()[0], **changes)


def handed_over() -> tuple[handover.State, list[Claim]]:
    """`a_state()`, and the claims of its tickets in order (`HandedOver.claims`)."""
    now = 1000.0
    service = LockService(
        LockTable(), Processes(lambda pid: ProcessOwner(pid, 1000, "worker", 99)), Config().limits,
        Policy.from_config(Config().policy), FakeBackend(orders_requests=False, leases_outlive_daemon=True),
        clock=lambda: now, wall_clock=lambda: now + 1_700_000_000,
    )
    session = handover.SessionState(
        fd=0, greeted=True, unread=b"\x00\x00", outbox=b"", attached=[], event_head=0, events=[],
    )
    a, b = FakePeer("a", 1000, 1, "build", session), FakePeer("b", 1001, 2, None, session)
    for peer in (a, b):
        assert service.connect(peer, 4000 + peer.ident, peer.uid, peer.uid, frozenset({peer.uid}), peer.slot)
    service.request(a, protocol.Acquire(1, ["x"]))
    service.taken(taken_next(service), [7])
    service.request(b, protocol.Acquire(1, ["x"], timeout=30.0))
    service.request(a, protocol.Acquire(2, ["y"], pid=PROCESS))
    service.taken(taken_next(service), [8])
    service.request(b, protocol.Subscribe(2, ["x"]))
    service.check()
    handed = service.hand_over()
    # The flock backend's part, as `FlockBackend.hand_over` gives it: each held claim (by
    # its index) with a descriptor for its one name and no slot files.
    held = [[index, [50 + index], []] for index, ticket in enumerate(handed.tickets) if ticket.phase == "held"]
    state = handover.State(
        version=handover.VERSION, server="lockd test", paused_at=now, config=Config(),
        listeners=[handover.ListenerState(fd=3, path="/run/lockd/lockd.sock", inode=12)],
        metrics_listener=None, connections=handed.connections, tickets=handed.tickets, processes=handed.processes,
        next_arrival=handed.next_arrival, next_connection=3, backend="flock",
        backend_state=msgspec.msgpack.encode(held), backend_descriptors=[fd for _, fds, _ in held for fd in fds],
        history=[], reply_to=handover.ReplyTo(connection=1, request_id=9),
    )
    return state, handed.claims


def taken_next(service: LockService) -> Claim:
    """The claim of the one StartTake among the service's orders (the others are let go)."""
    (take,) = [order for order in service.orders if isinstance(order, StartTake)]
    service.orders.clear()
    return take.claim


def as_array(state: handover.State) -> list[Any]:
    """`state` as plain msgpack data (each part an array of its fields), to be spoilt."""
    decoded = msgspec.msgpack.decode(handover.encode(state))
    assert isinstance(decoded, list)
    return decoded


def at(part: type[handover.Struct], field: str) -> int:
    """Where `field` is in the array a `part` is encoded as."""
    return part.__struct_fields__.index(field)


def width(part: type[handover.Struct]) -> int:
    """How many fields a `part` has: the length of its array."""
    return len(part.__struct_fields__)


TICKETS = at(handover.State, "tickets")


# --- the format ---------------------------------------------------------------------------------


def test_a_state_round_trips_exactly() -> None:
    state = a_state()
    assert [t.phase for t in state.tickets] == ["held", "held", "waiting"]
    assert state.processes == [handover.ProcessState(pid=PROCESS, uid=1000, command="worker", pidfd=99)]
    assert handover.decode(handover.encode(state)) == state


def test_a_state_of_another_version_is_refused_naming_both() -> None:
    data = handover.encode(a_state(version=handover.VERSION + 1))
    with pytest.raises(handover.Unreadable) as refused:
        handover.decode(data)
    assert str(refused.value) == (
        f"handover state version {handover.VERSION + 1}; this lockd reads version {handover.VERSION} only"
    )


def test_another_version_is_refused_before_the_rest_is_read() -> None:
    """A later version may have changed anything else: only its version is looked at."""
    data = msgspec.msgpack.encode([handover.VERSION + 1, "something new"])
    with pytest.raises(handover.Unreadable, match="version 2; this lockd reads version 1 only"):
        handover.decode(data)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"garbage that is no msgpack", msgspec.msgpack.encode([]), msgspec.msgpack.encode(["1", 2]),
    # The state as a map: what it was before its parts were encoded as arrays.
    msgspec.msgpack.encode({"version": 1, "tickets": []}),
])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(handover.Unreadable, match="^not a lockd handover state"):
        handover.decode(data)


def test_a_truncated_state_is_refused() -> None:
    data = handover.encode(a_state())
    for cut in (len(data) - 1, len(data) // 2, 20):
        with pytest.raises(handover.Unreadable):
            handover.decode(data[:cut])


def test_an_unknown_field_is_refused_rather_than_half_read() -> None:
    """A field this program does not know comes after those it knows (a field is only ever
    added at the end): the array is longer than the part has fields."""
    spoilt = as_array(a_state())
    spoilt.append([])
    state_width = width(handover.State)
    with pytest.raises(
        handover.Unreadable,
        match=rf"^malformed handover state: Expected `array` of at most length {state_width}, got {state_width + 1}$",
    ):
        handover.decode(msgspec.msgpack.encode(spoilt))
    spoilt = as_array(a_state())
    spoilt[TICKETS][0].append(1)
    ticket_width = width(handover.TicketState)
    with pytest.raises(
        handover.Unreadable,
        match=rf"^malformed handover state: Expected `array` of at most length {ticket_width}, got {ticket_width + 1}"
        rf" - at `\$\[{TICKETS}\]\[0\]`$",
    ):
        handover.decode(msgspec.msgpack.encode(spoilt))


def test_a_missing_field_is_refused() -> None:
    spoilt = as_array(a_state())
    deadline = at(handover.TicketState, "deadline")
    del spoilt[TICKETS][1][deadline:]
    with pytest.raises(
        handover.Unreadable,
        match=rf"^malformed handover state: Expected `array` of at least length {width(handover.TicketState)},"
        rf" got {deadline} - at `\$\[{TICKETS}\]\[1\]`$",
    ):
        handover.decode(msgspec.msgpack.encode(spoilt))
    spoilt = as_array(a_state())
    processes = at(handover.State, "processes")
    del spoilt[processes:]
    with pytest.raises(
        handover.Unreadable,
        match=rf"^malformed handover state: Expected `array` of at least length {width(handover.State)},"
        rf" got {processes}$",
    ):
        handover.decode(msgspec.msgpack.encode(spoilt))


def test_a_field_of_the_wrong_type_is_refused() -> None:
    spoilt = as_array(a_state())
    phase = at(handover.TicketState, "phase")
    spoilt[TICKETS][0][phase] = "granted"
    with pytest.raises(
        handover.Unreadable, match=rf"^malformed handover state: .*'granted'.* - at `\$\[{TICKETS}\]\[0\]\[{phase}\]`$",
    ):
        handover.decode(msgspec.msgpack.encode(spoilt))


def test_descriptors_are_every_one_the_state_names_each_once() -> None:
    state = a_state()
    session = msgspec.structs.replace(state.connections[0].session, fd=20, attached=[(0, [21]), (5, [22, 23])])
    gone = msgspec.structs.replace(state.connections[1], session=None)
    state = msgspec.structs.replace(
        state, metrics_listener=handover.ListenerState(fd=4, path=None, inode=None),
        listeners=[handover.ListenerState(fd=fd, path=None, inode=None) for fd in (3, 5)],
        connections=[msgspec.structs.replace(state.connections[0], session=session), gone],
        processes=[handover.ProcessState(pid=1, uid=0, command="init", pidfd=30),
                   handover.ProcessState(pid=2, uid=0, command="x", pidfd=31)],
        backend_descriptors=[40, 41],
    )
    fds = handover.descriptors(state)
    assert sorted(fds) == [3, 4, 5, 20, 21, 22, 23, 30, 31, 40, 41]
    assert len(fds) == len(set(fds))


def test_a_state_goes_through_a_memfd_that_is_inherited() -> None:
    data = os.urandom(3 << 20)  # more than one read's worth
    fd = handover.to_memfd(data)
    assert os.get_inheritable(fd), "the memfd must stay open across the exec"
    assert handover.read_fd(fd) == data
    with pytest.raises(OSError):
        os.fstat(fd)  # read_fd closed it


def test_an_empty_memfd_reads_empty() -> None:
    assert handover.read_fd(handover.to_memfd(b"")) == b""


# --- the check --------------------------------------------------------------------------------


def check_mode(
    data: bytes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, str]:
    """Run check mode in this process on `data`: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    status = main._check_handover()
    out, err = capsys.readouterr()
    return status, out, err


def two_holders() -> handover.State:
    """`a_state()` where the request waiting for x holds it too: two exclusive holders."""
    state = a_state()
    waiting = state.tickets[-1]
    held = msgspec.structs.replace(waiting, phase="held", tokens=[9], deadline=None)
    return msgspec.structs.replace(state, tickets=[*state.tickets[:-1], held])


def test_check_passes_a_good_state(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The backend's part is checked by its kind, against the claims of the tickets as
    adopted: those the daemon handed over, in order."""
    state, claims = handed_over()
    asked: list[str] = []
    checked: list[tuple[bytes, list[Claim]]] = []

    class Flock:
        orders_requests = FlockBackend.orders_requests

        @staticmethod
        def check_handover(backend_state: bytes, claims: Sequence[Claim]) -> object:
            checked.append((backend_state, list(claims)))
            return FlockBackend.check_handover(backend_state, claims)

    def kind(name: str) -> BackendKind:
        asked.append(name)
        return Flock

    assert reexec.check(handover.encode(state), kind) is None
    assert asked == ["flock"]
    ((backend_state, adopted),) = checked
    assert backend_state == state.backend_state
    assert [msgspec.structs.asdict(c) for c in adopted] == [msgspec.structs.asdict(c) for c in claims]
    status, out, err = check_mode(handover.encode(a_state()), monkeypatch, capsys)
    assert (status, err) == (0, "") and out.endswith("can take over\n")


def test_check_passes_a_request_being_taken_that_came_after_one_waiting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The table gives out the tickets it let through (here one the backend is taking, as
    while a process outside lockd holds the lock file) before those waiting, whatever
    their times: the census of the adopted service still finds the oldest request waiting."""
    state = a_state()
    held_x, held_y, waiting = state.tickets
    waiting = msgspec.structs.replace(waiting, since=-10.0, requested=-10.0)
    taking = msgspec.structs.replace(
        waiting, seq=state.next_arrival, request_id=3, names=["z"], phase="taking", since=-5.0, requested=-5.0,
    )
    state = msgspec.structs.replace(state, tickets=[held_x, held_y, taking, waiting], next_arrival=taking.seq + 1)
    status, out, err = check_mode(handover.encode(state), monkeypatch, capsys)
    assert (status, err) == (0, "") and out.endswith("can take over\n")


def test_check_says_why_it_cannot_adopt_inconsistent_tickets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = check_mode(handover.encode(two_holders()), monkeypatch, capsys)
    assert status == 1 and out == ""
    assert err.startswith("lockd: the handed-over state is inconsistent: ") and "x" in err, err


def test_check_says_why_it_cannot_read_a_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def kind(name: str) -> BackendKind:
        raise AssertionError("nothing of an unreadable state is used")

    assert (reexec.check(b"nonsense", kind) or "").startswith("not a lockd handover state (")
    assert reexec.check(handover.encode(a_state(version=7)), kind) == (
        f"handover state version 7; this lockd reads version {handover.VERSION} only"
    )
    status, out, err = check_mode(handover.encode(a_state(version=7)), monkeypatch, capsys)
    assert (status, out) == (1, "")
    assert err == f"lockd: handover state version 7; this lockd reads version {handover.VERSION} only\n"


def test_check_refuses_a_ticket_for_what_is_not_handed_over(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A state whose tickets name a process or a connection it does not hand over cannot be
    adopted: the check says so (and the old daemon serves on), rather than failing."""
    inconsistent = "lockd: the handed-over state is inconsistent: "
    status, _, err = check_mode(handover.encode(a_state(processes=[])), monkeypatch, capsys)
    assert (status, err) == (1, f"{inconsistent}ticket 3 is tied to process {PROCESS}, which is not handed over\n")
    state = a_state()
    status, _, err = check_mode(
        handover.encode(msgspec.structs.replace(state, connections=state.connections[1:])), monkeypatch, capsys,
    )
    assert (status, err) == (1, f"{inconsistent}ticket 1 is for connection 1, which is not handed over\n")


@pytest.mark.parametrize("good", [True, False])
def test_check_mode_end_to_end(short_tmp: Path, good: bool) -> None:
    """`lockd --check-handover` with the flags a daemon runs with: it reads the state on its
    stdin, touches nothing, and says whether it can take over."""
    daemon = Daemon(short_tmp)
    state = a_state() if good else two_holders()
    done = subprocess.run(
        [*daemon.argv(), reexec.CHECK_FLAG], input=handover.encode(state), capture_output=True, timeout=30,
    )
    if good:
        assert (done.returncode, done.stderr) == (0, b""), done
        assert done.stdout.decode().endswith("can take over\n")
    else:
        assert done.returncode == 1 and done.stdout == b"", done
        assert done.stderr.decode().startswith("lockd: the handed-over state is inconsistent: "), done
    assert not Path(daemon.socket).exists() and not daemon.lock_dir.exists() and not daemon.state_dir.exists()
