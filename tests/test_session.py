"""Session on a real socket pair under trio: the handshake, fair reading, and sending that never
blocks, with the daemon's side played by plain functions."""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Iterator

import msgspec
import pytest
import trio
import trio.testing
from lockd_client import protocol
from lockd_client.errors import LimitExceeded

from lockd.config import Limits
from lockd.session import FAIR_TURNS, MAX_OUTBOX, Gate, Session

WELCOME = protocol.Welcome(protocol.PROTOCOL_VERSION, "lockd test", "flock")


def frames(*messages: object) -> bytes:
    out = bytearray()
    encoder = msgspec.msgpack.Encoder()
    for message in messages:
        protocol.encode_frame(encoder, message, out)
    return bytes(out)


def replies(data: bytes) -> list[object]:
    buffer = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
    buffer.feed(data)
    decoder = protocol.reply_decoder()
    found = []
    while (body := buffer.next_frame()) is not None:
        found.append(decoder.decode(body))
    return found


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def make_session(sock: socket.socket, closed: list[str] | None = None) -> Session:
    def on_close(session: Session) -> None:
        if closed is not None:
            closed.append(session.close_reason or "")

    return Session(sock, 1, on_close)


async def test_a_flooding_client_lets_other_tasks_run(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION), *[protocol.Release(i) for i in range(1000)]))
    theirs.shutdown(socket.SHUT_WR)  # everything is there to read at once, then EOF
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await make_session(ours).serve(WELCOME, lambda session, message: seen.append(ticks), Limits())
            nursery.cancel_scope.cancel()
    assert len(seen) == 1000
    # trio runs the tasks of one scheduling batch in any order: the other task may come just
    # before or just after the reader's next turn, so within two turns.
    window = 2 * FAIR_TURNS
    assert all(seen[i + window] > seen[i] for i in range(len(seen) - window)), seen


async def test_labels_are_made_inert(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    hostile = "\x1b[2J\nforged \u202e" + "x" * (protocol.MAX_LABEL_LENGTH - 13)
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION, label=hostile)))
    theirs.shutdown(socket.SHUT_WR)
    session = make_session(ours)
    with trio.fail_after(10):
        await session.serve(WELCOME, lambda session, message: None, Limits())
    assert session.label == "?[2J?forged ?" + "x" * (protocol.MAX_LABEL_LENGTH - 13)
    assert replies(read_all(theirs)) == [WELCOME]


async def test_send_never_blocks_keeps_order_and_cuts_off_a_client_that_reads_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    closed: list[str] = []
    session = make_session(ours, closed)
    big = protocol.Error(None, "x", "y" * 60_000)
    sent = 0
    while not session.closed:
        session.send(protocol.Done(sent, 0))
        session.send(big)
        sent += 1
    # Cut off in the very call that overflowed, its leases ended (on_close) right then.
    assert closed == [f"it left more than {MAX_OUTBOX} bytes of replies unread"]
    assert MAX_OUTBOX // 60_000 < sent < 2 * MAX_OUTBOX // 60_000 + 1_000
    # What was queued still goes out, in order, once the client reads.
    theirs.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve, WELCOME, lambda session, message: None, Limits())
            received = await trio.to_thread.run_sync(read_all, theirs)
    done = [r.id for r in replies(received) if isinstance(r, protocol.Done)]
    assert done == list(range(len(done))) and len(done) >= sent - 1


async def test_a_session_closed_before_serving_flushes_its_goodbye_and_hangs_up(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))  # unread: must not reset
    session = make_session(ours)
    refusal = protocol.Error(None, protocol.ErrorCode.LIMIT, "too many")
    session.send(refusal)
    session.close("too many")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve, WELCOME, lambda session, message: None, Limits())
            received = await trio.to_thread.run_sync(read_all, theirs)
            theirs.close()
    assert replies(received) == [refusal]


def read_with_descriptors(sock: socket.socket) -> list[tuple[object, list[str]]]:
    """Read until EOF with the reference client's receiving code; every Granted paired with
    the files of the descriptors it claims (in order), others with []."""
    from lockd_client import _lockfds

    sock.settimeout(10)
    data, fds = bytearray(), []
    buffer = bytearray(65536)
    while True:
        size, got = _lockfds.recv_into(sock, buffer)
        fds += got
        if not size:
            break
        data += buffer[:size]
    out = []
    for message in replies(bytes(data)):
        claimed = fds[: getattr(message, "descriptors", 0)]
        del fds[: len(claimed)]
        out.append((message, [os.readlink(f"/proc/self/fd/{fd}") for fd in claimed]))
        _lockfds.close_all(claimed)
    assert fds == [], "descriptors no message claimed"
    return out


@pytest.mark.parametrize("count", [1, 2, 300])
async def test_descriptors_go_with_their_message_however_the_socket_takes_it(
    pair: tuple[socket.socket, socket.socket], tmp_path, count: int
) -> None:
    ours, theirs = pair
    files = [os.open(tmp_path / f"f{i}", os.O_RDONLY | os.O_CREAT) for i in range(count + 1)]
    session = make_session(ours)
    filler = protocol.Error(None, "x", "y" * 60_000)
    before = len(os.listdir("/proc/self/fd"))
    # Fill the socket so that later grants wait in the outbox, with duplicates of their files.
    session.send(protocol.Granted(1, [1] * count, count), files[:count])
    while not session._outbox:
        session.send(filler)
    session.send(protocol.Granted(2, [2], 1), files[count:])
    session.send(protocol.Done(3))
    for fd in files:
        os.close(fd)  # the caller's to close at once: the queued ones are the session's own
    theirs.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve, WELCOME, lambda session, message: None, Limits())
            received = await trio.to_thread.run_sync(read_with_descriptors, theirs)
    grants = [(m.id, paths) for m, paths in received if isinstance(m, protocol.Granted)]
    assert grants == [(1, [str(tmp_path / f"f{i}") for i in range(count)]), (2, [str(tmp_path / f"f{count}")])]
    assert isinstance(received[-1][0], protocol.Done)
    assert len(os.listdir("/proc/self/fd")) <= before - len(files)  # no duplicate left behind


async def test_queued_descriptors_are_closed_when_the_client_is_cut_off(
    pair: tuple[socket.socket, socket.socket], tmp_path
) -> None:
    ours, _ = pair
    closed: list[str] = []
    session = make_session(ours, closed)
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    before = len(os.listdir("/proc/self/fd"))
    filler = protocol.Error(None, "x", "y" * 60_000)
    while not session._outbox:
        session.send(filler)
    session.send(protocol.Granted(1, [1], 1), [fd])
    assert len(os.listdir("/proc/self/fd")) == before + 1
    while not session.closed:
        session.send(filler)
    with trio.fail_after(10):  # the goodbye is never read: given up after send_timeout
        await session.serve(WELCOME, lambda session, message: None, Limits(send_timeout=0.2))
    os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before - 2  # fd, and the socket serve closed


def event(subscription_id: int, name: str) -> protocol.Event:
    return protocol.Event(subscription_id, protocol.LeaseEvent(1.0, "granted", name, "exclusive", token=1))


async def test_events_wait_in_their_own_lane_and_a_dropped_subscription_s_are_thrown_away(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    session = make_session(ours)
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    seen: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, WELCOME, lambda session, message: None, Limits(send_timeout=0.2))
        await trio.sleep(0.1)  # welcomed
        count = 0
        while session.offer(1, event(1, f"n{count}")):  # the socket fills, then the lane
            count += 1
        assert session.offer(2, event(2, "other")) is False  # the lane is full for everyone
        await trio.sleep(1.0)  # unread long past the send timeout: events are not replies
        assert not session.closed
        session.end_events(1, protocol.Error(1, protocol.ErrorCode.LIMIT, "dropped"))
        session.send(protocol.Done(9))  # a reply overtakes the events that wait
        theirs.settimeout(10)
        buffer, decoder = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME), protocol.reply_decoder()
        while not (seen and isinstance(seen[-1], protocol.Error)):
            buffer.feed(await trio.to_thread.run_sync(theirs.recv, 65536))
            while (body := buffer.next_frame()) is not None:
                seen.append(decoder.decode(body))
        session.close("done")
    welcome, *rest = seen
    assert isinstance(welcome, protocol.Welcome)
    assert protocol.Done(9) in rest and rest[-1] == protocol.Error(1, protocol.ErrorCode.LIMIT, "dropped")
    names = [m.event.name for m in rest if isinstance(m, protocol.Event)]
    assert names == [f"n{i}" for i in range(len(names))] and len(names) < count  # in order, the rest thrown away


async def test_a_reply_behind_unread_events_does_not_cut_the_subscriber_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A lagging subscriber loses its subscription; a reply that then waits behind its unread
    events (a `Lost` nobody asked for) starts no send timeout until those events are read."""
    ours, theirs = pair
    session = make_session(ours)
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, WELCOME, lambda session, message: None, Limits(send_timeout=0.2))
        await trio.sleep(0.1)  # welcomed
        count = 0
        while session.offer(1, event(1, f"n{count}")):
            count += 1
        session.end_events(1, protocol.Error(1, protocol.ErrorCode.LIMIT, "dropped"))
        session.send(protocol.Lost(7, "forcibly released by uid 0"))
        await trio.sleep(1.0)  # five send timeouts, the events ahead still unread
        assert not session.closed, session.close_reason
        session.close("done")


async def test_a_shut_gate_holds_back_requests_and_the_hello_and_hands_them_over_unread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """While the gate is shut nothing is handled, the hello included: what arrived stays in
    the socket or in what the session hands over as unread, and the session adopting it (on
    the same socket, as after an exec) answers it all, in order."""
    ours, theirs = pair
    handled: list[object] = []
    session = make_session(ours)
    gate = Gate()
    sent = frames(protocol.Hello(protocol.PROTOCOL_VERSION), protocol.Status(1), protocol.Status(2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, WELCOME, lambda _, message: handled.append(message), Limits(), gate)
        await trio.testing.wait_all_tasks_blocked()
        gate.close()  # the session waits for its hello already
        theirs.sendall(sent)
        await trio.testing.wait_all_tasks_blocked()
        state = session.hand_over()
        assert (state.greeted, handled) == (False, [])
        kept = ours.dup()  # what the exec keeps
        nursery.cancel_scope.cancel()

    kept.setblocking(False)
    adopted = make_session(kept)
    adopted.adopt(state, None, Limits().max_frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adopted.serve, WELCOME, lambda _, message: handled.append(message), Limits(), Gate())
        await trio.testing.wait_all_tasks_blocked()
        assert handled == [protocol.Status(1), protocol.Status(2)]
        theirs.settimeout(10)
        assert replies(theirs.recv(65536)) == [WELCOME]
        nursery.cancel_scope.cancel()


async def test_the_replies_to_one_read_s_requests_are_written_together_with_every_descriptor(
    pair: tuple[socket.socket, socket.socket], tmp_path,
) -> None:
    """Requests that came in one read are answered by one write, whose first byte carries the
    descriptors of every grant in it, in order: the client has each grant's by the time it
    is complete. A request with no reply of its own, last, still has the others written."""
    from lockd_client import _lockfds

    ours, theirs = pair
    files = {i: os.open(tmp_path / f"f{i}", os.O_RDONLY | os.O_CREAT) for i in range(1, 4)}
    session = make_session(ours)

    def handle(session: Session, message: object) -> None:
        if isinstance(message, protocol.Acquire):
            session.send(protocol.Granted(message.id, [message.id], 1), [files[message.id]])
            os.close(files.pop(message.id))  # the caller's to close at once, as a release would

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        theirs.settimeout(10)
        assert replies(theirs.recv(65536)) == [WELCOME]
        theirs.sendall(frames(*[protocol.Acquire(i, [f"n{i}"]) for i in range(1, 4)], protocol.Release(9)))
        buffer = bytearray(65536)
        size, fds = await trio.to_thread.run_sync(_lockfds.recv_into, theirs, buffer)
        assert [m.id for m in replies(bytes(buffer[:size]))] == [1, 2, 3]  # type: ignore[attr-defined]
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds] == [str(tmp_path / f"f{i}") for i in range(1, 4)]
        _lockfds.close_all(fds)
        session.close("done")


async def test_a_gate_shut_between_two_requests_of_one_read_hands_the_rest_over_unread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Frames cut from a read and not yet handled when the gate shuts are part of what the
    session hands over, in order, and the reply of one handled before it is sent."""
    ours, theirs = pair
    handled: list[object] = []
    gate = Gate()

    def handle(session: Session, message: object) -> None:
        handled.append(message)
        session.send(protocol.Done(len(handled)))
        gate.close()  # as a re-exec would, between two requests

    session = make_session(ours)
    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, WELCOME, handle, Limits(), gate)
        await trio.testing.wait_all_tasks_blocked()
        theirs.sendall(frames(protocol.Status(1), protocol.Status(2), protocol.Status(3)))
        await trio.testing.wait_all_tasks_blocked()
        assert handled == [protocol.Status(1)]
        state = session.hand_over()
        kept = ours.dup()
        nursery.cancel_scope.cancel()
    theirs.settimeout(10)
    assert replies(theirs.recv(65536)) == [WELCOME, protocol.Done(1)]

    kept.setblocking(False)
    adopted = make_session(kept)
    adopted.adopt(state, None, Limits().max_frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adopted.serve, WELCOME, lambda _, message: handled.append(message), Limits(), Gate())
        await trio.testing.wait_all_tasks_blocked()
        assert handled == [protocol.Status(1), protocol.Status(2), protocol.Status(3)]
        nursery.cancel_scope.cancel()


def readable_replies(sock: socket.socket) -> list[object]:
    """The replies the client can read now, without waiting."""
    try:
        return replies(sock.recv(65536, socket.MSG_DONTWAIT))
    except BlockingIOError:
        return []


async def test_a_reply_goes_out_before_a_later_request_of_the_same_read_waits(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """One read holds a request answered at once and one whose handling awaits: the first's
    reply is not held back for as long as the second takes."""
    ours, theirs = pair
    release = trio.Event()

    def handle(session: Session, message: object) -> trio.Event | None:
        assert isinstance(message, protocol.Status)
        if message.id == 1:
            session.send(protocol.Done(1))
            return None

        async def slow() -> None:
            await release.wait()
            session.send(protocol.Done(2))

        return slow()  # type: ignore[return-value]

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_session(ours).serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [WELCOME]
        theirs.sendall(frames(protocol.Status(1), protocol.Status(2)))
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [protocol.Done(1)]
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [protocol.Done(2)]
        nursery.cancel_scope.cancel()


async def test_a_long_read_s_replies_are_not_held_across_the_reader_s_turn(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """More than FAIR_TURNS requests in one read: the reader lets other tasks run before it has
    handled them all, and what it answered by then is written first, not held to the end."""
    ours, theirs = pair
    count = 3 * FAIR_TURNS
    readable_at: list[int] = []

    def handle(session: Session, message: object) -> None:
        assert isinstance(message, protocol.Status)
        readable_at.append(len(readable_replies(theirs)))
        session.send(protocol.Done(message.id))

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_session(ours).serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [WELCOME]
        theirs.sendall(frames(*[protocol.Status(i) for i in range(count)]))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(readable_at) == count
    # Every turn's replies but the last's were readable while later requests were handled.
    assert sum(readable_at) >= count - FAIR_TURNS, readable_at


def dup_at_limit(fd: int) -> int:
    raise OSError(errno.EMFILE, "Too many open files")


async def read_replies(sock: socket.socket, count: int) -> tuple[list[object], list[int]]:
    """The next `count` replies and the descriptors that came with them, letting the session's
    writer run between reads."""
    data, fds = b"", []
    for _ in range(2000):
        if len(found := replies(data)) >= count:
            break
        await trio.testing.wait_all_tasks_blocked()
        try:
            # Not socket.recv_fds: it drops the flags (before Python 3.12) and would block.
            more, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        data += more
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds += array.array("i", payload[: len(payload) - len(payload) % 4])
    else:
        raise AssertionError(f"{count} replies expected, got {replies(data)}")
    return found, fds


async def test_out_of_descriptors_a_read_s_grants_go_out_at_once_instead_of_held_back(
    pair: tuple[socket.socket, socket.socket], tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No descriptor left to copy the second grant's to hold it back with the first: the
    batch is written at once, and the grant with it, with its own descriptor."""
    ours, theirs = pair
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    undelivered: list[int] = []
    closed: list[str] = []
    real_dup = os.dup

    def handle(session: Session, message: object) -> None:
        assert isinstance(message, protocol.Acquire)
        if message.id == 2:
            monkeypatch.setattr(os, "dup", dup_at_limit)
        session.send(protocol.Granted(message.id, [1], 1), [fd], lambda: undelivered.append(message.id))
        monkeypatch.setattr(os, "dup", real_dup)

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_session(ours, closed).serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [WELCOME]
        theirs.sendall(frames(*(protocol.Acquire(i, [str(i)]) for i in (1, 2, 3))))
        got, fds = await read_replies(theirs, 3)
        try:
            assert [(type(m).__name__, m.id) for m in got] == [("Granted", 1), ("Granted", 2), ("Granted", 3)]
            assert len(fds) == 3 and all(os.path.samestat(os.fstat(f), os.fstat(fd)) for f in fds)
        finally:
            for f in fds:
                os.close(f)
        assert (closed, undelivered) == ([], [])
        nursery.cancel_scope.cancel()
    os.close(fd)


async def test_a_grant_behind_unread_replies_out_of_descriptors_fails_and_the_session_serves_on(
    pair: tuple[socket.socket, socket.socket], tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Queued behind a reply the client has not read, a grant needs copies of its
    descriptors; with none left, sending it raises and queues nothing, and the error sent in
    its place and what follows go out as usual."""
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    undelivered: list[int] = []
    closed: list[str] = []
    failed: list[str] = []
    real_dup = os.dup
    unread = protocol.Error(1, "x", "y" * 300_000)

    def handle(session: Session, message: object) -> None:
        assert isinstance(message, protocol.Acquire)
        if message.id == 1:
            session.send(unread)
            return
        if message.id == 2:
            monkeypatch.setattr(os, "dup", dup_at_limit)
        try:
            session.send(protocol.Granted(message.id, [1], 1), [fd], lambda: undelivered.append(message.id))
        except LimitExceeded as exc:
            failed.append(str(exc))
            session.send(protocol.Error(message.id, exc.code, str(exc)))
        monkeypatch.setattr(os, "dup", real_dup)

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_session(ours, closed).serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [WELCOME]
        theirs.sendall(frames(protocol.Acquire(1, ["1"])))
        await trio.testing.wait_all_tasks_blocked()
        theirs.sendall(frames(protocol.Acquire(2, ["2"]), protocol.Acquire(3, ["3"])))
        await trio.testing.wait_all_tasks_blocked()
        got, fds = await read_replies(theirs, 3)
        try:
            assert got[:2] == [unread, protocol.Error(2, protocol.ErrorCode.LIMIT, failed[0])]
            assert (type(got[2]), got[2].id, len(fds)) == (protocol.Granted, 3, 1)
        finally:
            for f in fds:
                os.close(f)
        assert failed[0].startswith("the lock could not be handed over (it is not held): the daemon is out of")
        assert (closed, undelivered) == ([], [])
        nursery.cancel_scope.cancel()
    os.close(fd)


async def test_a_client_that_hangs_up_while_its_replies_are_held_back_has_every_grant_reported(
    pair: tuple[socket.socket, socket.socket], tmp_path,
) -> None:
    """The client hangs up while the replies to its read are held back: the grants among
    them never go out, the last one's too (the one whose send writes them all), and each is
    reported."""
    ours, theirs = pair
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    undelivered: list[int] = []
    closed: list[str] = []

    def handle(session: Session, message: object) -> None:
        assert isinstance(message, protocol.Acquire)
        if message.id == 2:
            theirs.close()
        session.send(protocol.Granted(message.id, [1], 1), [fd], lambda: undelivered.append(message.id))

    theirs.sendall(frames(protocol.Hello(protocol.PROTOCOL_VERSION)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_session(ours, closed).serve, WELCOME, handle, Limits())
        await trio.testing.wait_all_tasks_blocked()
        assert readable_replies(theirs) == [WELCOME]
        theirs.sendall(frames(protocol.Acquire(1, ["a"]), protocol.Acquire(2, ["b"])))
        await trio.testing.wait_all_tasks_blocked()
        assert (len(closed), undelivered) == (1, [1, 2])
        nursery.cancel_scope.cancel()
    os.close(fd)
