"""The Server in this process, over a real socket and real lock files, with a backend that has a
bug: whatever a bug breaks, it costs the request it concerns, never the daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from lockd.backend import BlockedCallback
from lockd.config import Limits
from lockd.flock_backend import FlockBackend
from lockd.listen import bind_unix_listener
from lockd.lockfiles import LockFiles
from lockd.policy import Policy
from lockd.server import Server
from lockd.table import LockTable, Ticket
from lockd.tokens import TokenStore
from lockd_client import protocol

from .flock_tools import make_lock_dir

TIMEOUT = 10.0


class BuggyBackend(FlockBackend):
    """The flock backend, except that names starting with "bug" hit a bug somewhere."""

    def take_now(self, ticket: Ticket) -> list[int] | None:
        if ticket.names[0] == "bug-now":
            raise RuntimeError("a bug in take_now")
        if ticket.names[0] == "bug-later":
            return None  # as if held outside: the take goes on in a task of its own
        return super().take_now(ticket)

    async def take(self, ticket: Ticket, blocked: BlockedCallback) -> list[int]:
        await trio.sleep(0.01)
        raise RuntimeError("a bug in take")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BuggyBackend]:
    files = LockFiles(make_lock_dir(tmp_path))
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
async def serving(backend: BuggyBackend, short_tmp: Path) -> AsyncIterator[Client]:
    path = str(short_tmp / "s")
    server = Server(LockTable(), backend, Limits(), Policy((), {0: "root"}))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [bind_unix_listener(path, 0o600)])
        client = Client(await trio.open_unix_socket(path))
        async with client.stream:
            await client.send(protocol.Hello(protocol.PROTOCOL_VERSION))
            assert isinstance(await client.recv(), protocol.Welcome)
            yield client
        server.stop()


@pytest.mark.parametrize("name", ["bug-now", "bug-later"])
async def test_a_bug_taking_a_lock_fails_that_request_only(backend: BuggyBackend, short_tmp: Path, name: str, caplog) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as client:
            failed = await client.final(protocol.Acquire(1, [name]))
            assert isinstance(failed, protocol.Error) and failed.id == 1, failed
            assert isinstance(await client.final(protocol.Acquire(1, [name], timeout=0)), protocol.Error)
            assert isinstance(await client.final(protocol.Acquire(2, ["fine"])), protocol.Granted)
            status = await client.final(protocol.Status(3))
            assert isinstance(status, protocol.StatusReply) and [i.name for i in status.locks] == ["fine"]
    assert "internal error" in caplog.text and "a bug in take" in caplog.text


async def test_a_slow_look_at_the_hosts_locks_holds_up_only_the_client_that_asked(
    backend: BuggyBackend, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading /proc/locks waits for an RCU grace period: milliseconds, here made as long as the
    # test likes. Were it read on the event loop, no other client could be served meanwhile.
    looking, let_go = threading.Event(), threading.Event()
    let_go_in_time: list[bool] = []
    real = LockFiles.outside_holders_of

    def slow_look(files: LockFiles, names: list[str]) -> dict[str, list[protocol.Holder]]:
        looking.set()
        let_go_in_time.append(let_go.wait(TIMEOUT / 4))
        return real(files, names)

    monkeypatch.setattr(LockFiles, "outside_holders_of", slow_look)
    with trio.fail_after(TIMEOUT):
        async with serving(backend, short_tmp) as asker:
            await asker.send(protocol.Status(1, ["x"]))
            await trio.to_thread.run_sync(looking.wait, TIMEOUT)
            other = Client(await trio.open_unix_socket(str(short_tmp / "s")))
            async with other.stream:
                await other.send(protocol.Hello(protocol.PROTOCOL_VERSION))
                assert isinstance(await other.recv(), protocol.Welcome)
                assert isinstance(await other.final(protocol.Acquire(1, ["x"])), protocol.Granted)
                let_go.set()
                reply = await asker.recv()
                assert isinstance(reply, protocol.StatusReply) and [i.name for i in reply.locks] == ["x"]
    assert let_go_in_time == [True]
