"""The Server in this process, over a real socket and real lock files: whatever a bug in the
backend breaks, it costs the request it concerns, never the daemon; and a request that has to
wait (a slow look at the host's locks) holds up only the client that asked."""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from lockd_client import protocol

from lockd import listen
from lockd.backend import BlockedCallback, Claim
from lockd.config import Limits
from lockd.flock.backend import FlockBackend
from lockd.flock.tokens import TokenStore
from lockd.listen import bind_unix_listener
from lockd.lockfiles import LockFiles
from lockd.logs import contained
from lockd.orders import Order
from lockd.policy import Policy
from lockd.server import Server
from lockd.table import Effect, LockTable

from .flock_tools import kill, make_lock_dir, outside_flock

TIMEOUT = 10.0


class BuggyBackend(FlockBackend):
    """The flock backend, except that names starting with "bug" hit a bug somewhere."""

    def take_now(self, ticket: Claim) -> list[int] | None:
        if ticket.names[0] == "bug-now":
            raise RuntimeError("a bug in take_now")
        if ticket.names[0] == "bug-later":
            return None  # as if held outside: the take goes on in a task of its own
        return super().take_now(ticket)

    async def take(self, ticket: Claim, blocked: BlockedCallback) -> list[int]:
        if ticket.names[0] != "bug-later":
            return await super().take(ticket, blocked)
        await trio.sleep(0.01)
        raise RuntimeError("a bug in take")


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return make_lock_dir(tmp_path)


@pytest.fixture
def backend(lock_dir: Path, tmp_path: Path) -> Iterator[BuggyBackend]:
    files = LockFiles(lock_dir)
    tokens = TokenStore.open(tmp_path / "state")
    yield BuggyBackend(files, tokens)
    files.close()
    tokens.close()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
        self.decoder = protocol.reply_decoder()
        self.encoder = msgspec.msgpack.Encoder()

    async def send(self, message: object) -> None:
        out = bytearray()
        protocol.encode_frame(self.encoder, message, out)
        await self.stream.send_all(out)

    async def recv(self) -> object:
        while (body := self.frames.next_frame()) is None:
            data = await self.stream.receive_some()
            assert data, "the daemon hung up"
            self.frames.feed(data)
        return self.decoder.decode(body)

    async def final(self, message: object) -> object:
        """Send a request; its reply, past any Queued."""
        await self.send(message)
        while isinstance(reply := await self.recv(), protocol.Queued):
            pass
        return reply


@asynccontextmanager
async def serving(
    backend: BuggyBackend, short_tmp: Path, observers: Sequence[Callable[[protocol.LeaseEvent], None]] = (),
) -> AsyncIterator[Client]:
    path = str(short_tmp / "s")
    server = Server(LockTable(), backend, Limits(), Policy((), {0: "root"}), observers)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [bind_unix_listener(path, 0o600)])
        client = Client(await trio.open_unix_socket(path))
        async with client.stream:
            await client.send(protocol.Hello(protocol.PROTOCOL_VERSION))
            assert isinstance(await client.recv(), protocol.Welcome)
            yield client
        server.stop()


@pytest.mark.parametrize("name", ["bug-now", "bug-later"])
async def test_a_bug_taking_a_lock_fails_that_request_only(
    backend: BuggyBackend, short_tmp: Path, name: str, caplog
) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as client:
            failed = await client.final(protocol.Acquire(1, [name]))
            assert isinstance(failed, protocol.Error) and failed.id == 1, failed
            assert isinstance(await client.final(protocol.Acquire(1, [name], timeout=0)), protocol.Error)
            assert isinstance(await client.final(protocol.Acquire(2, ["fine"])), protocol.Granted)
            status = await client.final(protocol.Status(3))
            assert isinstance(status, protocol.StatusReply) and [i.name for i in status.locks] == ["fine"]
    assert "internal error" in caplog.text and "a bug in take" in caplog.text


async def test_an_observer_that_fails_costs_the_others_nothing(
    backend: BuggyBackend, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(event: protocol.LeaseEvent) -> None:
        raise RuntimeError("a bug in an observer")

    seen: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp, [failing, lambda event: seen.append(event.event)]) as client:
            assert isinstance(await client.final(protocol.Acquire(1, ["x"])), protocol.Granted)
            await client.send(protocol.Release(1))
            assert isinstance(await client.final(protocol.Status(2)), protocol.StatusReply)
    assert seen == ["granted", "released"]
    assert "a bug in an observer" in caplog.text


REAL_LOOK = LockFiles.outside_holders_of


class SlowLook:
    """Reading /proc/locks waits for an RCU grace period: milliseconds, here as long as the
    test likes. Were it read on the event loop, no other client could be served meanwhile."""

    def __init__(self) -> None:
        #: Read before waiting to be let go, not after: the look is then older than its answer.
        self.read_first = False
        self.looking = threading.Event()
        self.let_go = threading.Event()
        #: For each look, whether the test let it go (False: it gave up waiting).
        self.let_go_in_time: list[bool] = []

    def outside_holders_of(
        self, files: LockFiles, names: list[str], every_file: bool
    ) -> dict[str, list[protocol.Holder]]:
        found = REAL_LOOK(files, names, every_file) if self.read_first else None
        self.looking.set()
        self.let_go_in_time.append(self.let_go.wait(TIMEOUT / 4))
        return found if found is not None else REAL_LOOK(files, names, every_file)

    async def started(self) -> None:
        assert await trio.to_thread.run_sync(self.looking.wait, TIMEOUT)


@pytest.fixture
def slow_look(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowLook]:
    look = SlowLook()
    monkeypatch.setattr(
        LockFiles,
        "outside_holders_of",
        lambda files, names, every_file=False: look.outside_holders_of(files, names, every_file),
    )
    yield look
    look.let_go.set()


async def connected(path: Path) -> Client:
    client = Client(await trio.open_unix_socket(str(path)))
    await client.send(protocol.Hello(protocol.PROTOCOL_VERSION))
    assert isinstance(await client.recv(), protocol.Welcome)
    return client


async def test_a_slow_look_at_the_hosts_locks_holds_up_only_the_client_that_asked(
    backend: BuggyBackend, short_tmp: Path, slow_look: SlowLook
) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as asker:
            await asker.send(protocol.Status(1, ["x"]))
            await slow_look.started()
            other = await connected(short_tmp / "s")
            async with other.stream:
                assert isinstance(await other.final(protocol.Acquire(1, ["x"])), protocol.Granted)
                assert slow_look.let_go_in_time == []  # served while the look went on
                slow_look.let_go.set()
                reply = await asker.recv()
                # The table is read after the look: the lease granted meanwhile is shown.
                assert isinstance(reply, protocol.StatusReply) and [i.name for i in reply.locks] == ["x"]
    assert slow_look.let_go_in_time == [True]


async def test_requests_sent_after_a_status_are_answered_after_it(
    backend: BuggyBackend, short_tmp: Path, slow_look: SlowLook
) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as asker:
            await asker.send(protocol.Status(1, ["x"]))
            await asker.send(protocol.Acquire(2, ["x"]))
            await slow_look.started()
            slow_look.let_go.set()
            status, granted = await asker.recv(), await asker.recv()
            assert isinstance(status, protocol.StatusReply) and status.locks == []
            assert isinstance(granted, protocol.Granted) and granted.id == 2


async def test_a_timeout_names_the_outside_holder_found_after_it(
    backend: BuggyBackend, lock_dir: Path, short_tmp: Path, slow_look: SlowLook
) -> None:
    with outside_flock(lock_dir / "x.lock") as proc, trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as client:
            await client.send(protocol.Acquire(1, ["x"], timeout=0.1))
            await slow_look.started()  # the take's own look, to tell the client whom it waits for
            await trio.sleep(0.3)  # the request times out meanwhile
            slow_look.let_go.set()
            while isinstance(reply := await client.recv(), protocol.Queued):
                pass
    assert isinstance(reply, protocol.Error) and reply.code == "timeout"
    assert [h.pid for h in reply.holders] == [proc.pid]


async def test_a_request_refused_while_its_holders_are_looked_for_holds_nothing_meanwhile(
    backend: BuggyBackend, lock_dir: Path, short_tmp: Path, slow_look: SlowLook
) -> None:
    with outside_flock(lock_dir / "x.lock") as proc, trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as first:
            await first.send(protocol.Acquire(1, ["x"], timeout=0))
            await slow_look.started()  # looking for whom to name in its refusal
            second = await connected(short_tmp / "s")
            async with second.stream:
                await second.send(protocol.Acquire(1, ["x"], timeout=0))
                await trio.testing.wait_all_tasks_blocked()
                slow_look.let_go.set()
                replies = [await first.recv(), await second.recv()]
    # The second is refused because of the process outside lockd, not because of the first.
    assert [(r.code, [h.pid for h in r.holders]) for r in replies] == [("busy", [proc.pid])] * 2


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
async def test_status_leaves_out_an_outside_holder_that_let_go_to_lockd_during_the_look(
    backend: BuggyBackend, lock_dir: Path, short_tmp: Path, slow_look: SlowLook, mode: protocol.Mode
) -> None:
    slow_look.read_first = True
    with outside_flock(lock_dir / "x.lock") as proc, trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as waiter:
            await waiter.send(protocol.Acquire(1, ["x"], mode=mode))
            await slow_look.started()  # the take's look, to name the holder in Queued
            slow_look.let_go.set()
            assert isinstance(await waiter.recv(), protocol.Queued)
            slow_look.let_go.clear()
            slow_look.looking.clear()
            asker = await connected(short_tmp / "s")
            async with asker.stream:
                await asker.send(protocol.Status(1, ["x"]))
                await slow_look.started()  # the outside holder is seen, then lets go
                await trio.to_thread.run_sync(kill, proc)
                assert isinstance(await waiter.recv(), protocol.Granted)
                slow_look.let_go.set()
                status = await asker.recv()
    assert isinstance(status, protocol.StatusReply)
    assert [(h.pid, h.mode, h.outside) for info in status.locks for h in info.holders] == [(os.getpid(), mode, False)]


async def test_the_id_of_a_request_whose_refusal_is_on_its_way_stays_in_use_until_withdrawn(
    backend: BuggyBackend, lock_dir: Path, short_tmp: Path, slow_look: SlowLook
) -> None:
    with outside_flock(lock_dir / "x.lock"), trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as client:
            await client.send(protocol.Acquire(1, ["x"], timeout=0))
            await slow_look.started()  # looking for whom to name in the refusal
            reused = await client.final(protocol.Acquire(1, ["y"]))
            assert isinstance(reused, protocol.Error) and reused.code == "protocol", reused
            await client.send(protocol.Release(1))  # withdrawn: its refusal is not sent
            granted = await client.final(protocol.Acquire(1, ["y"]))
            assert isinstance(granted, protocol.Granted) and granted.id == 1
            slow_look.let_go.set()
            # A refusal would be read first: the look for this status comes after its own.
            assert isinstance(await client.final(protocol.Status(2, ["y"])), protocol.StatusReply)


async def test_stop_between_two_accepts_is_a_clean_shutdown(
    backend: BuggyBackend, short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop() closes a listener while its accept loop is between two accepts: the next
    accept meets a closed socket (EBADF), which ends the loop, not the daemon."""
    real_accept, real_close = listen.accept, listen.close
    closed = trio.Event()
    calls = 0

    async def accept(listener: socket.socket) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls == 2:
            await closed.wait()  # as if still in the checkpoint after the first connection
        return await real_accept(listener)

    def close(listener: socket.socket) -> None:
        real_close(listener)
        closed.set()

    monkeypatch.setattr(listen, "accept", accept)
    monkeypatch.setattr(listen, "close", close)
    path = str(short_tmp / "s")
    server = Server(LockTable(), backend, Limits(), Policy((), {0: "root"}))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [bind_unix_listener(path, 0o600)])
            stream = await trio.open_unix_socket(path)
            await trio.testing.wait_all_tasks_blocked()
            server.stop()
        await stream.aclose()


async def test_every_order_and_every_effect_has_a_way_to_be_carried_out(backend: BuggyBackend) -> None:
    """Dispatch is by exact type: an order or effect type added without a handler would only
    show as an internal error once it is given."""
    server = Server(LockTable(), backend, Limits(), Policy((), {0: "root"}))
    assert set(server._order_handler_table()) == set(typing.get_args(Order))
    assert set(server.service._effect_handler_table()) == set(Effect.__subclasses__())


def test_a_description_that_fails_to_format_leaves_the_error_contained(capsys: pytest.CaptureFixture[str]) -> None:
    """Logging formats the description, and a repr that fails there is reported as logging
    reports its own errors: the bug stays contained. (A plain handler, as the daemon's: the
    test run's own handlers raise on such errors.)"""
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    log, lines = logging.getLogger("lockd"), io.StringIO()
    handler = logging.StreamHandler(lines)
    log.addHandler(handler)
    log.propagate = False
    try:
        with contained("ending %r", Unprintable()):
            raise ValueError("the bug")
        with contained("100% sure"):
            raise ValueError("another")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert "internal error 100% sure; carrying on" in lines.getvalue()
    assert "RuntimeError: no repr" in capsys.readouterr().err  # logging's own report of it
