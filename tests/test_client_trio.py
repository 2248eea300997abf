"""The trio client against a real daemon: tasks sharing a connection, cancellation, loss."""

from __future__ import annotations

import inspect
import os
import socket

import lockd_client
import msgspec
import pytest
import trio
import trio.testing
from lockd_client import protocol, trio_client

from .conftest import Daemon
from .flock_tools import can_flock, descriptors_of
from .waiting import wait_until_async

WAIT = 10.0


async def is_free(daemon: Daemon, name: str) -> bool:
    """Whether another connection gets `name` at once; it gives it back before returning.

    Callers make a round trip on the connection that released `name` first, since releases
    on different connections are applied in no particular order.
    """
    async with trio_client.connect(daemon.socket) as other:
        try:
            lease = await other.acquire(name, wait=False)
        except lockd_client.LockBusy:
            return False
        await lease.release()
        await other.status()
        return True


async def start_doomed_acquire(nursery: trio.Nursery, client, name: str, match: str) -> None:
    """Start a task whose acquire of `name` is queued and must end in DaemonUnavailable."""
    queued = trio.Event()

    async def doomed():
        with pytest.raises(lockd_client.DaemonUnavailable, match=match):
            await client.acquire(name, on_queued=lambda holders: queued.set())

    nursery.start_soon(doomed)
    await queued.wait()


async def test_no_daemon_raises_unavailable(short_tmp):
    with pytest.raises(lockd_client.DaemonUnavailable, match="is lockd running"):
        async with trio_client.connect(short_tmp / "nobody.sock"):
            pass


async def test_a_lease_excludes_others_until_its_block_ends(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket, label="trio") as c:
            assert c.server.backend == "flock"
            async with c.lock("job") as lease:
                assert lease.token == lease.tokens["job"] > 0
                assert not await is_free(daemon, "job")
                assert not await trio.to_thread.run_sync(can_flock, daemon.lock_dir / "job.lock")
                [info] = await c.status("job")
                assert [(h.pid, h.label) for h in info.holders] == [(os.getpid(), "trio")]
            await c.status()
            assert await is_free(daemon, "job")
            assert not lease.lost


async def test_busy_timeout_and_shared_behave_as_in_the_blocking_client(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as a, trio_client.connect(daemon.socket) as b:
            shared = [await a.acquire("db", shared=True), await b.acquire("db", shared=True)]
            with pytest.raises(lockd_client.LockBusy) as busy:
                await a.acquire("db", wait=False)
            assert {h.token for h in busy.value.holders} == {s.token for s in shared}
            with pytest.raises(lockd_client.LockTimeout):
                await b.acquire("db", timeout=0.2)


async def test_tasks_share_one_connection(daemon):
    """While one task waits (and reads), others' replies still reach them, in any order."""
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            held = await holder.acquire("x")
            queued = trio.Event()
            got = {}

            async def take(name, **kwargs):
                got[name] = await c.acquire(name, **kwargs)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: take("x", on_queued=lambda holders: queued.set()))
                await queued.wait()
                async with trio.open_nursery() as others:
                    for i in range(10):
                        others.start_soon(take, f"n{i}")
                    others.start_soon(c.status)
                assert "x" not in got
                assert sorted(got) == sorted(f"n{i}" for i in range(10))
                [info] = await c.status("x")
                assert len(info.waiters) == 1
                await held.release()
            assert got["x"].token > held.token


async def test_cancelling_an_acquire_withdraws_it(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            held = await holder.acquire("x")
            with trio.CancelScope() as scope:
                await c.acquire("x", on_queued=lambda holders: scope.cancel())
            assert scope.cancelled_caught
            [info] = await c.status("x")  # same connection: the withdrawal came before this
            assert info.waiters == []
            await held.release()
            await holder.status()
            assert await is_free(daemon, "x")


async def test_cancelling_the_reading_task_hands_reading_to_another(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            held_x, held_y = await holder.acquire("x"), await holder.acquire("y")
            y_queued, x_queued, y_gone = trio.Event(), trio.Event(), trio.Event()
            y_scope = trio.CancelScope()
            got = []

            async def take_y():
                # Started first, so this task is the one reading when it is cancelled.
                with y_scope:
                    await c.acquire("y", on_queued=lambda h: y_queued.set())
                y_gone.set()

            async def take_x():
                got.append(await c.acquire("x", on_queued=lambda h: x_queued.set()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_y)
                await y_queued.wait()
                nursery.start_soon(take_x)
                await x_queued.wait()
                y_scope.cancel()
                await y_gone.wait()
                [y] = await c.status("y")
                assert y.waiters == []
                await held_x.release()
            assert [lease.names for lease in got] == [("x",)]
            await held_y.release()
            await holder.status()
            assert await is_free(daemon, "y")


async def test_the_reading_passes_on_past_waiters_cancelled_with_the_reader(daemon):
    """The reader hands the reading to one waiting task, not to all of them: when that one is
    cancelled too, it hands it on in turn."""
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            held = {name: await holder.acquire(name) for name in "xyz"}
            got = []

            async def start_acquire(nursery, name):
                queued = trio.Event()

                async def acquire():
                    got.append(await c.acquire(name, on_queued=lambda h: queued.set()))

                nursery.start_soon(acquire)
                await queued.wait()

            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as doomed:
                    await start_acquire(doomed, "x")  # the reader: started first
                    await start_acquire(doomed, "y")  # first in line to read next
                    await start_acquire(nursery, "z")
                    doomed.cancel_scope.cancel()
                await held["z"].release()
            assert [lease.names for lease in got] == [("z",)]
            assert [lock.waiters for lock in await c.status("x", "y")] == [[], []]


async def test_cancelling_the_block_still_releases_the_lease(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c:
            with trio.CancelScope() as scope:
                async with c.lock("x"):
                    scope.cancel()
                    await trio.sleep_forever()
            await c.status()
            assert await is_free(daemon, "x")


async def test_wait_lost_returns_the_reason_while_other_tasks_use_the_connection(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c, trio_client.connect(daemon.socket) as admin:
            reasons = []
            with pytest.raises(lockd_client.LeaseLost, match="forcibly released"):
                async with c.lock("x") as lease:
                    async def watch():
                        reasons.append(await lease.wait_lost())

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch)
                        await trio.testing.wait_all_tasks_blocked()
                        other = await c.acquire("y")  # its reply is read by the watcher
                        assert not lease.lost
                        assert await admin.force_release("x") == 1
            assert lease.lost and "forcibly released" in reasons[0]
            assert not other.lost


async def force_release_and_wait_for_the_notice(daemon: Daemon, client, name: str) -> None:
    """Break `name` from another connection, and return once the Lost notice is in `client`'s
    socket, unread."""
    async with trio_client.connect(daemon.socket) as other:
        assert await other.force_release(name) == 1
    await trio.lowlevel.wait_readable(client._stream.socket)


async def test_a_loss_already_reported_raises_on_leaving_the_block(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c:
            with pytest.raises(lockd_client.LeaseLost, match="forcibly released"):
                async with c.lock("job"):
                    await force_release_and_wait_for_the_notice(daemon, c, "job")


async def test_lost_reads_a_loss_already_reported(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c:
            lease = await c.acquire("job")
            assert not lease.lost
            await force_release_and_wait_for_the_notice(daemon, c, "job")
            assert lease.lost and "forcibly released" in lease.lost_reason
            await c.status()  # the connection still serves requests


async def test_a_killed_daemon_fails_waiting_requests_and_leaves_leases_held(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            await holder.acquire("x")
            lease = await c.acquire("y")
            async with trio.open_nursery() as nursery:
                await start_doomed_acquire(nursery, c, "x", match="is lockd still running")
                daemon.kill()
            assert lease.detached and not lease.lost
            assert not await trio.to_thread.run_sync(can_flock, daemon.lock_dir / "y.lock")
            async with lease:
                pass
            assert await trio.to_thread.run_sync(can_flock, daemon.lock_dir / "y.lock")
            with pytest.raises(lockd_client.DaemonUnavailable):
                await c.status()


def hung_up(fd: int) -> bool:
    """Whether descriptor `fd` has been pointed at /dev/null, as a forked child's socket is."""
    return os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"


async def test_a_forked_child_holds_neither_the_lease_nor_the_connection(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c:
            lease = await c.acquire("y")
            r, w = os.pipe()
            child = os.fork()
            if child == 0:  # pragma: no cover - runs in the child
                try:
                    kept = descriptors_of(daemon.lock_dir / "y.lock")
                    let_go = lease.lost and not kept and hung_up(c._raw.fileno())
                    os.write(w, b"lost" if let_go else b"kept")
                finally:
                    os._exit(0)
            os.close(w)
            assert await trio.to_thread.run_sync(os.read, r, 10) == b"lost"
            os.close(r)
            await trio.to_thread.run_sync(os.waitpid, child, 0)
            assert not lease.lost
            assert await c.status("y")  # the connection is still ours
            assert not await trio.to_thread.run_sync(can_flock, daemon.lock_dir / "y.lock")


async def test_closing_the_connection_fails_the_requests_waiting_on_it(daemon):
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as holder, trio_client.connect(daemon.socket) as c:
            await holder.acquire("x")
            lease = await c.acquire("y")
            async with trio.open_nursery() as nursery:
                await start_doomed_acquire(nursery, c, "x", match="closed by this client")
                await c.aclose()
            async with lease:
                assert not lease.lost
            await wait_until_async(lambda: is_free(daemon, "y"), "the daemon saw the close")


async def test_connect_can_be_awaited_like_the_blocking_connect_is_called(daemon):
    with trio.fail_after(WAIT):
        c = await trio_client.connect(daemon.socket, label="awaited")
        async with c:
            lease = await c.acquire("x")
            assert not await is_free(daemon, "x")
        with pytest.raises(lockd_client.DaemonUnavailable, match="closed by this client"):
            await c.status()
        assert not lease.lost
        await wait_until_async(lambda: is_free(daemon, "x"), "the daemon saw the close")


async def test_a_cancelled_handshake_closes_the_socket(short_tmp):
    path = str(short_tmp / "mute.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen()
    with trio.fail_after(WAIT):
        with trio.move_on_after(0.3) as scope:
            await trio_client.connect(path)
        assert scope.cancelled_caught
        server_side, _ = await listener.accept()
        with server_side, listener:
            received = b""
            while chunk := await server_side.recv(4096):  # Hello, then EOF: the client hung up
                received += chunk
            assert received


async def test_a_lock_block_entered_a_second_time_raises_and_loses_no_lease(daemon):
    """The second entry comes while the first is still inside: without the refusal, both
    exits would release the second lease and the first would stay held."""
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c:
            guard = c.lock("reused", shared=True)
            async with guard as lease:
                with pytest.raises(RuntimeError, match="entered once"):
                    async with guard:
                        pass
            assert not lease.lost
            with pytest.raises(RuntimeError, match="entered once"):  # nor after leaving
                async with guard:
                    pass
            assert await c.status("reused") == []


def test_lock_takes_what_acquire_takes_in_both_clients():
    for client in (lockd_client.Client, trio_client.Client):
        lock, acquire = inspect.signature(client.lock), inspect.signature(client.acquire)
        assert lock.parameters == acquire.parameters


async def test_a_write_the_socket_cannot_take_at_once_goes_whole_before_the_next():
    """A request larger than the socket's room waits for it holding the connection's turn to
    write; a request and a release made meanwhile, cancelled or not, go after it, whole and in
    the order they were made."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = trio_client.Client(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), ours, "a socket pair")
    encoder = msgspec.msgpack.Encoder()
    client._conn.hello()
    client._conn.receive_data(protocol.frame(encoder, protocol.Welcome(protocol.PROTOCOL_VERSION, "peer", "flock")))
    call, _ = client._conn.acquire(["a"])
    client._conn.receive_data(protocol.frame(encoder, protocol.Granted(call.id, [1])))
    lease = trio_client.Lease(client, call.result())
    names = [f"n{i}-" + "x" * 200 for i in range(250)]
    frames = protocol.FrameBuffer(protocol.MAX_REQUEST_FRAME)
    decoder = protocol.request_decoder()
    sent: list[protocol.Request] = []

    async def release_cancelled() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await lease.release()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.status, *names)
            await wait_until_async(client._send_lock.locked, "the status request part way out")
            nursery.start_soon(client.status, "y")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(release_cancelled)
            await trio.testing.wait_all_tasks_blocked()
            while len(sent) < 3:
                await trio.lowlevel.wait_readable(peer)
                frames.feed(peer.recv(65536))
                while (body := frames.next_frame()) is not None:
                    sent.append(decoder.decode(body))
            nursery.cancel_scope.cancel()
        await client.aclose()
    peer.close()
    assert sent == [protocol.Status(2, names), protocol.Status(3, ["y"]), protocol.Release(1)]
    assert frames.pending == 0
