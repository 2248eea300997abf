"""Resource exhaustion against a real daemon: idle crowds, slowloris, clients that never
read, running out of descriptors, and each configurable limit. In every case the offending
client gets a clear error or is cut off, and a well-behaved client is still served promptly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import msgspec
import pytest
import trio
from lockd_client import protocol
from lockd_client.protocol import Acquire, Error, Granted, Hello, Release, Status

from .conftest import Daemon
from .flock_tools import outside_flock
from .rawclient import RawClient
from .test_fuzz import daemon_fds, internal_errors
from .test_security import NOBODY, Actor
from .waiting import wait_until

TIMEOUT = 10.0
#: What "promptly" means on a loaded 2-core CI box: far above a normal round trip (~1 ms).
PROMPT = 2.0


def hello_frame() -> bytes:
    out = bytearray()
    protocol.encode_frame(msgspec.msgpack.Encoder(), Hello(protocol.PROTOCOL_VERSION, label="crowd"), out)
    return bytes(out)


def refused_hello(path: str, *, say_hello: bool = True) -> Error:
    """Connect, say hello (or not), and return the Error the daemon answers before hanging up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        if say_hello:
            s.sendall(hello_frame())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
    frames.feed(data)
    body = frames.next_frame()
    assert body is not None, "the daemon hung up without a word"
    reply = protocol.reply_decoder().decode(body)
    assert isinstance(reply, Error) and reply.code == "limit", reply
    return reply


def admitted(path: str) -> RawClient:
    """A client welcomed by a daemon at its connection limit once earlier connections (the
    start-up probe) are gone."""

    def welcomed() -> RawClient | None:
        c = RawClient(path, hello=False)
        try:
            c.send(Hello(protocol.PROTOCOL_VERSION, label="test"))
            if isinstance(c.recv(), protocol.Welcome):
                return c
        except (EOFError, OSError):
            pass  # refused: the error may be lost to a reset (see the xfail test below)
        c.close()
        return None

    return wait_until(welcomed, "admitted", interval=0.02)


def served_promptly(daemon: Daemon, name: str = "probe") -> None:
    """A fresh client connects, acquires, releases and reads status, all within PROMPT."""
    started = time.monotonic()
    with RawClient(daemon.socket, timeout=PROMPT) as c:
        granted = c.acquire(name, timeout=PROMPT)
        assert isinstance(granted, Granted), granted
        c.send(Release(1))
        reply = c.request(Status(2, [name]))
        assert isinstance(reply, protocol.StatusReply) and reply.locks == [], reply
    assert time.monotonic() - started < PROMPT


def rss_kib(daemon: Daemon) -> int:
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def configured(root: Path, toml: str) -> Daemon:
    """A running daemon reading `toml` as its config file."""
    path = root / "lockd.toml"
    path.write_text(toml)
    d = Daemon(root, "--config", str(path))
    d.start()
    return d


@pytest.fixture
def stopper() -> Iterator[list[Daemon]]:
    """Daemons appended here are killed after the test."""
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


# --- crowds -------------------------------------------------------------------------------------

IDLE = 1000


def test_a_thousand_idle_connections_cost_others_nothing(daemon: Daemon) -> None:
    baseline = daemon_fds(daemon)
    crowd = []
    try:
        for _ in range(IDLE):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(TIMEOUT)
            s.connect(daemon.socket)
            s.sendall(hello_frame())
            crowd.append(s)
        decoder = protocol.reply_decoder()
        for s in crowd:
            frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
            while (body := frames.next_frame()) is None:
                frames.feed(s.recv(4096))
            assert isinstance(decoder.decode(body), protocol.Welcome)
        assert daemon_fds(daemon) > IDLE  # every one of them is really held open
        print(f"exhaustion: {IDLE} idle connections held")
        served_promptly(daemon)
    finally:
        for s in crowd:
            s.close()
    wait_until(lambda: daemon_fds(daemon) <= baseline, "descriptors back to the baseline")


async def told_why_and_hung_up(stream: trio.SocketStream) -> None:
    """Read to the end: the daemon's last word must say the handshake took too long."""
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
    frames.feed(data)
    body = frames.next_frame()
    assert body is not None and frames.pending == 0, data
    reply = protocol.reply_decoder().decode(body)
    assert isinstance(reply, Error) and reply.code == "protocol" and "no handshake within" in reply.message, reply


async def slowloris(path: str, mode: str, cut_off: list[float]) -> None:
    """Connect and never finish the handshake; record when the daemon hangs up."""
    started = trio.current_time()
    stream = await trio.open_unix_socket(path)
    async with stream:
        hello = hello_frame()
        try:
            if mode == "silent":
                await told_why_and_hung_up(stream)
            elif mode == "prefix":
                await stream.send_all(hello[:4])  # announces a frame, sends none of it
                await told_why_and_hung_up(stream)
            else:  # a byte at a time, slower than the handshake timeout allows
                for byte in hello[:-1]:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.3)
                raise AssertionError("the daemon waited for a whole slow hello")
        except trio.BrokenResourceError:
            pass
        cut_off.append(trio.current_time() - started)


async def test_slowloris_is_cut_off_at_the_handshake_timeout(daemon: Daemon) -> None:
    cut_off: list[float] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for mode in ["silent", "prefix", "trickle"] * 20:
                nursery.start_soon(slowloris, daemon.socket, mode, cut_off)
            await trio.sleep(0.5)
            served_promptly(daemon)  # while all 60 hang on
    assert len(cut_off) == 60
    assert max(cut_off) < 5.0 + 3.0  # the default handshake timeout, and scheduling slack
    assert "no handshake within 5 s" in daemon.log()
    assert internal_errors(daemon) == []


# --- clients that never read --------------------------------------------------------------------


def test_a_client_that_never_reads_is_cut_off_and_its_leases_end(daemon: Daemon) -> None:
    names = [f"n{i:03d}" for i in range(300)]
    before = rss_kib(daemon)
    with RawClient(daemon.socket) as holder, RawClient(daemon.socket) as waiter, ExitStack() as stack:
        assert isinstance(holder.acquire(*names), Granted)  # makes every status reply ~40 KiB
        reader = RawClient(daemon.socket)
        stack.callback(reader.close)
        assert isinstance(reader.acquire("unread"), Granted)
        waiter.send(Acquire(1, ["unread"]))
        assert isinstance(waiter.recv(), protocol.Queued)
        # 400 status requests, never reading a reply: ~12 MiB the daemon must not keep.
        out = bytearray()
        encoder = msgspec.msgpack.Encoder()
        for i in range(400):
            protocol.encode_frame(encoder, Status(100 + i), out)
        try:
            reader.sock.sendall(out)
        except (BrokenPipeError, ConnectionResetError):
            pass  # already cut off
        served_promptly(daemon)
        waiter.sock.settimeout(PROMPT + 3)  # well before the 10 s send timeout
        granted = waiter.recv()  # the reader's lease ended with its connection
        assert isinstance(granted, Granted) and granted.id == 1, granted
    assert "bytes of replies unread" in daemon.log()
    assert rss_kib(daemon) - before < 64 * 1024
    assert internal_errors(daemon) == []


def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nsend_timeout = 0.5\n")
    stopper.append(d)
    with RawClient(d.socket) as holder, ExitStack() as stack:
        assert isinstance(holder.acquire(*[f"n{i:03d}" for i in range(300)]), Granted)
        stalled = RawClient(d.socket)
        stack.callback(stalled.close)
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert isinstance(stalled.acquire("stalled"), Granted)
        # A few replies, far below the outbox limit but more than the socket buffers hold.
        out = bytearray()
        for i in range(10):
            protocol.encode_frame(msgspec.msgpack.Encoder(), Status(100 + i), out)
        stalled.sock.sendall(out)
        wait_until(lambda: "did not read its replies for 0.5 s" in d.log(), "stalled reader cut off")
        served_promptly(d, "stalled")


# --- running out of descriptors -----------------------------------------------------------------


class LimitedDaemon(Daemon):
    """A daemon under a hard RLIMIT_NOFILE of `nofile` (prlimit execs it: same pid)."""

    def __init__(self, root: Path, nofile: int) -> None:
        super().__init__(root)
        self.nofile = nofile

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().argv()]


def test_running_out_of_descriptors_gives_clear_errors_and_recovers(short_tmp: Path, stopper) -> None:
    d = LimitedDaemon(short_tmp, 48)
    d.start()
    stopper.append(d)
    client = RawClient(d.socket)
    assert isinstance(client.acquire("first"), Granted)
    fillers: list[socket.socket] = []
    pending = None
    while pending is None:
        assert len(fillers) < d.nofile, "the daemon never ran out of descriptors"
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1.0)
        s.connect(d.socket)  # lands in the listen backlog even when accept() fails
        s.sendall(hello_frame())
        try:
            assert s.recv(4096)
            fillers.append(s)
        except TimeoutError:
            pending = s
    print(f"exhaustion: daemon out of descriptors after {len(fillers)} connections")
    # The connected client is still served; what needs a descriptor fails clearly.
    full = client.acquire("second")
    assert isinstance(full, Error) and full.code == "limit", full
    assert "file descriptors" in full.message
    unwatched = client.request(Acquire(40, ["tied"], pid=os.getpid()))
    assert isinstance(unwatched, Error) and unwatched.code == "limit", unwatched
    assert "raise its open-file limit (LimitNOFILE=)" in unwatched.message
    reply = client.request(Status(50))
    assert isinstance(reply, protocol.StatusReply) and [info.name for info in reply.locks] == ["first"]

    for s in fillers[:5]:
        s.close()
    pending.settimeout(TIMEOUT)
    assert pending.recv(4096), "the waiting connection was never accepted"
    assert isinstance(client.acquire("second"), Granted)
    assert d.proc is not None and d.proc.poll() is None
    assert "cannot accept a connection" in d.log()
    for s in [*fillers[5:], pending]:
        s.close()
    client.close()
    assert internal_errors(d) == []


def test_a_client_that_pipelines_at_the_descriptor_limit_keeps_its_connection_and_leases(
    short_tmp: Path, stopper,
) -> None:
    """A grant held back with the replies after it in the same read goes with copies of its
    descriptors; with none left to make, it goes out at once instead, and a request that cannot
    be served fails alone: the client keeps its connection and its leases."""
    d = LimitedDaemon(short_tmp, 48)
    d.start()
    stopper.append(d)
    with RawClient(d.socket) as client:

        def pipelined(ids: range) -> dict[int, object]:
            out = bytearray()
            for i in ids:
                protocol.encode_frame(client.encoder, Acquire(i, [f"n{i}"]), out)
            client.sock.sendall(out)
            answers: dict[int, object] = {}
            while len(answers) < len(ids):
                reply = client.recv()
                assert isinstance(reply, (Granted, Error)), reply
                answers[reply.id] = reply
            for reply in answers.values():
                assert isinstance(reply, Granted) or reply.code == "limit", reply
            return answers

        answers = pipelined(range(1, 60))
        granted = [i for i, reply in answers.items() if isinstance(reply, Granted)]
        assert granted and len(granted) < len(answers), "the daemon never ran out of descriptors"
        for first in range(100, 110, 2):
            # One descriptor freed: the next request's lock file takes it, and its grant, held
            # back with the next request's reply, has none left to copy it with.
            client.send(Release(granted.pop()))
            answers = pipelined(range(first, first + 2))
            granted += [i for i, reply in answers.items() if isinstance(reply, Granted)]
        reply = client.request(Status(99))
        assert isinstance(reply, protocol.StatusReply)
        assert sorted(info.name for info in reply.locks) == sorted(f"n{i}" for i in granted)
    assert d.proc is not None and d.proc.poll() is None
    assert internal_errors(d) == []


# --- configured limits --------------------------------------------------------------------------


def test_per_connection_limits_refuse_only_the_request_over_them(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nmax_leases_per_connection = 3\nmax_pending_per_connection = 2\n")
    stopper.append(d)
    with RawClient(d.socket) as blocker, RawClient(d.socket) as c:
        assert isinstance(blocker.acquire("busy1", "busy2", "busy3"), Granted)
        c.send(Acquire(1, ["busy1"]))
        c.send(Acquire(2, ["busy2"]))
        assert isinstance(c.recv(), protocol.Queued) and isinstance(c.recv(), protocol.Queued)
        third = c.request(Acquire(3, ["busy3"]))
        assert isinstance(third, Error) and third.code == "limit", third
        assert "limits.max_pending_per_connection" in third.message
        assert isinstance(c.request(Acquire(4, ["free"], timeout=0)), Granted)  # cannot wait: allowed
        fourth = c.request(Acquire(5, ["free2"]))
        assert isinstance(fourth, Error) and fourth.code == "limit", fourth
        assert "limits.max_leases_per_connection" in fourth.message
        blocker.send(Release(1))
        assert {c.recv().id, c.recv().id} == {1, 2}  # the queued requests were kept and granted
        served_promptly(d)


def test_requests_waiting_for_an_outside_holder_count_as_pending(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nmax_pending_per_connection = 2\n")
    stopper.append(d)
    with outside_flock(d.lock_dir / "held.lock"), RawClient(d.socket) as c:
        # lockd's table grants shared requests at once; the flock held outside keeps them waiting.
        for i in (1, 2):
            c.send(Acquire(i, ["held"], mode="shared"))
            assert isinstance(c.recv(), protocol.Queued)
        over = c.request(Acquire(3, ["held"], mode="shared"))
        assert isinstance(over, Error) and over.code == "limit", over
        assert "limits.max_pending_per_connection" in over.message
        c.send(Release(1))
        c.send(Acquire(4, ["held"], mode="shared"))
        assert isinstance(c.recv(), protocol.Queued)  # a withdrawn one no longer counts


def test_waiters_per_name_limit(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nmax_waiters_per_name = 2\n")
    stopper.append(d)
    clients = [RawClient(d.socket) for _ in range(4)]
    try:
        assert isinstance(clients[0].acquire("hot"), Granted)
        for c in clients[1:3]:
            c.send(Acquire(1, ["hot"]))
            assert isinstance(c.recv(), protocol.Queued)
        over = clients[3].request(Acquire(1, ["hot"]))
        assert isinstance(over, Error) and over.code == "limit", over
        assert "hot already has 2 waiters" in over.message
        assert isinstance(clients[3].acquire("cold"), Granted)
    finally:
        for c in clients:
            c.close()


def test_connection_limits_per_uid_leave_other_users_served(short_tmp: Path, stopper) -> None:
    short_tmp.chmod(0o711)
    d = configured(short_tmp, "[limits]\nmax_connections = 8\nmax_connections_per_uid = 5\n")
    stopper.append(d)
    os.chmod(d.socket, 0o666)
    mine = [admitted(d.socket) for _ in range(5)]
    try:
        refusal = refused_hello(d.socket, say_hello=False)  # the 6th of uid 0
        assert "limits.max_connections_per_uid" in refusal.message
        nobody = Actor(NOBODY, NOBODY)
        try:
            for key in "abc":
                nobody.connect(key, d.socket)
            assert isinstance(nobody.do("a", "request", Acquire(1, ["theirs"])), Granted)
            with pytest.raises(AssertionError, match=r"limits\.max_connections\)"):
                nobody.connect("d", d.socket)  # the 9th in all: refused instead of welcomed
        finally:
            nobody.close()
        assert isinstance(mine[0].acquire("still"), Granted)
    finally:
        for c in mine:
            c.close()
    assert internal_errors(d) == []


def test_a_refused_client_that_already_said_hello_reads_why(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nmax_connections = 1\n")
    stopper.append(d)
    with admitted(d.socket):
        for _ in range(20):
            assert "limits.max_connections" in refused_hello(d.socket).message


async def test_short_handshake_timeout(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nhandshake_timeout = 0.5\n")
    stopper.append(d)
    cut_off: list[float] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for mode in ["silent", "prefix", "trickle"]:
                nursery.start_soon(slowloris, d.socket, mode, cut_off)
    assert len(cut_off) == 3 and max(cut_off) < 0.5 + 3.0


def test_process_tied_leases_count_against_the_connection_limit(short_tmp: Path, stopper) -> None:
    d = configured(short_tmp, "[limits]\nmax_leases_per_connection = 3\n")
    stopper.append(d)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(d.socket) as c:
            replies = [c.request(Acquire(i, [f"tied{i}"], pid=sleeper.pid)) for i in range(1, 6)]
        assert [type(r).__name__ for r in replies] == ["Granted"] * 3 + ["Error"] * 2, replies
        assert all(r.code == "limit" for r in replies[3:])
    finally:
        sleeper.kill()
        sleeper.wait(TIMEOUT)


def shared_configured(root: Path, toml: str) -> Daemon:
    root.chmod(0o711)
    d = configured(root, toml)
    os.chmod(d.socket, 0o666)
    return d


def served_as_nobody(d: Daemon) -> None:
    nobody = Actor(NOBODY, NOBODY)
    try:
        nobody.connect("c", d.socket)
        assert isinstance(nobody.do("c", "request", Acquire(1, ["theirs"])), Granted)
    finally:
        nobody.close()


def test_per_uid_lease_limit_leaves_other_users_served(short_tmp: Path, stopper) -> None:
    d = shared_configured(short_tmp, "[limits]\nmax_leases_per_uid = 4\n")
    stopper.append(d)
    with RawClient(d.socket) as a, RawClient(d.socket) as b, RawClient(d.socket) as c:
        assert isinstance(a.acquire("a1", "a2"), Granted)
        assert isinstance(b.acquire("b1", "b2"), Granted)
        over = c.request(Acquire(1, ["c1"]))
        assert isinstance(over, Error) and over.code == "limit", over
        assert "limits.max_leases_per_uid" in over.message
        served_as_nobody(d)


def test_per_uid_pending_limit_leaves_other_users_served(short_tmp: Path, stopper) -> None:
    d = shared_configured(short_tmp, "[limits]\nmax_pending_per_uid = 2\n")
    stopper.append(d)
    with RawClient(d.socket) as holder, RawClient(d.socket) as a, RawClient(d.socket) as b, RawClient(d.socket) as c:
        assert isinstance(holder.acquire("held"), Granted)
        a.send(Acquire(1, ["held"]))
        b.send(Acquire(1, ["held"]))
        assert isinstance(a.recv(), protocol.Queued) and isinstance(b.recv(), protocol.Queued)
        over = c.request(Acquire(1, ["held"]))
        assert isinstance(over, Error) and over.code == "limit", over
        assert "limits.max_pending_per_uid" in over.message
        served_as_nobody(d)


def test_process_tied_leases_count_against_their_user_after_the_connection_closes(
    short_tmp: Path, stopper
) -> None:
    d = configured(short_tmp, "[limits]\nmax_leases_per_uid = 3\n")
    stopper.append(d)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(d.socket) as first:
            assert isinstance(first.acquire("t1", "t2", "t3", pid=sleeper.pid), Granted)
        with RawClient(d.socket) as second:  # the first connection is gone; its leases are not
            over = second.request(Acquire(1, ["t4"], pid=sleeper.pid))
            assert isinstance(over, Error) and "limits.max_leases_per_uid" in over.message, over
        sleeper.kill()
        sleeper.wait(TIMEOUT)

        def granted() -> bool:
            with RawClient(d.socket) as third:
                return isinstance(third.acquire("t4"), Granted)

        # Once the process is gone, so are its leases and their count.
        wait_until(granted, "the process's leases no longer counted", interval=0.02)
    finally:
        sleeper.kill()
        sleeper.wait(TIMEOUT)
