"""The trio lockd client: one connection that any number of tasks may use at once.

Invariants:
- At most one task reads the socket at a time. It applies what it read to the connection's
  state and wakes the waiting tasks whose wait that ended (every one once the connection
  closes); whoever waits can count on a reader: a task that leaves while others wait and
  none reads wakes one of them to read in its place.
  Reading happens only in tasks that wait for something, and, without waiting, when no
  task is reading and a lease's block ends or its `lost` is asked: there is no background
  task.
- A frame is never torn. Writes go one at a time, in turn by the send lock; a write the socket
  takes at once skips the lock, since nothing can run between the check that no task is
  writing and the send. Requests are written only if not already cancelled; one interrupted
  mid-write closes the connection (the daemon then ends every lease on it). Releases and
  withdrawals are written shielded from cancellation, so a lease is released even when its
  block is left by cancellation, and a cancelled acquire leaves nothing queued or granted.
"""

from __future__ import annotations

# The reads' flag from `_socket`, a plain int: the `socket` module's flags are IntFlag members,
# and or-ing one with another (as every read does) runs the Enum machinery's Python code.
import _socket
import functools
import os
import select
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import trio

from . import _dial, _lockfds, errors, paths, protocol
from ._connection import (
    CLOSED,
    HELD,
    LOST,
    READ_SIZE,
    Call,
    Connection,
    LeaseView,
    QueuedCallback,
    Subscription,
    check_exit_status,
    went_away,
)

T = TypeVar("T")


def connect(
    socket_path: str | os.PathLike[str] | None = None, *, label: str | None = None
) -> Connecting:
    """Connect to lockd and complete the handshake, as `lockd_client.connect` does.

    Use it as the blocking client's is used: `async with connect() as client:` closes the
    connection on leaving the block; `client = await connect()` leaves closing to
    `await client.aclose()` (or `async with client:`). Closing ends every lease on it.

    `socket_path` defaults to `paths.socket_path()` (which honours LOCKD_SOCKET). `label`
    (at most 256 characters) is shown in `status` next to this connection's leases. Raises
    DaemonUnavailable if nothing listens at the socket. A busy daemon is waited for: while
    its queue of connections waiting to be accepted is full, connecting is retried, backing
    off, and once in that queue the connection waits for the handshake's answer.

    Unlike the blocking `connect`, this takes no `timeout`: bound connecting and the handshake
    with a trio timeout around it (`with trio.fail_after(5): ...`). Cancelled there, it closes
    the socket before the cancellation propagates, leaving nothing behind.
    """
    path = os.fspath(socket_path) if socket_path is not None else paths.socket_path()
    return Connecting(path, label)


class Connecting:
    """What `connect` returns: await it for a Client, or enter it to have the Client closed on
    leaving the block."""

    __slots__ = ("_path", "_label", "_client")

    def __init__(self, path: str, label: str | None) -> None:
        self._path = path
        self._label = label
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._client is not None
        await self._client.aclose()

    async def _open(self) -> Client:
        # The client reads the stdlib socket under trio's: see Client._raw.
        raw = await _connected_socket(self._path)
        client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(raw)), raw, self._path)
        try:
            client.server = await client._run(*client._conn.hello(self._label))
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        return client


async def _connected_socket(path: str) -> socket.socket:
    """A socket connected to lockd at `path` once its queue has room (see `_dial`).

    Not trio's own connect: it takes the EAGAIN of a full queue for a connection under way,
    and hands back a socket that is not connected.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        waits = _dial.pauses()
        # Polling, backing off, is the only way: nothing signals that a full queue has room.
        while not _dial.attempt(sock, path):  # noqa: ASYNC110
            await trio.sleep(next(waits))
    except BaseException:
        sock.close()
        raise
    return sock


class Client:
    """A connection to lockd, shared by any number of tasks. Closing it (or leaving its
    `async with` block) ends all its leases."""

    server: protocol.Welcome

    def __init__(self, stream: trio.SocketStream, raw: socket.socket, socket_path: str) -> None:
        self._stream = stream
        #: The stdlib socket that `stream` wraps (closed with it). Reads need the descriptors
        #: that come with the bytes, with and without waiting, and trio's socket has no
        #: recvmsg that does not wait: reads wait for trio, then take what is there from this.
        self._raw = raw
        self._conn = Connection()
        self.socket_path = socket_path
        self._send_lock = trio.Lock()
        # Reads land in one buffer for the connection's lifetime: no allocation per read.
        self._inbox = bytearray(READ_SIZE)
        self._inbox_view = memoryview(self._inbox)
        #: Asked, without waiting, whether there is anything to read (`_read_pending`).
        self._readable = select.poll()
        self._readable.register(raw, select.POLLIN)
        self._reading = False
        #: The tasks waiting while another reads: each one's event, and what it waits for.
        #: Only those whose wait is over are woken, not all of them at every read: with many
        #: requests in flight that would cost a trip through the scheduler per task per read.
        self._waiters: dict[trio.Event, Callable[[], bool]] = {}
        _lockfds.register(self, self._conn)

    async def acquire(
        self,
        *names: str,
        shared: bool = False,
        wait: bool = True,
        # Sent to the daemon, which counts it and answers LockTimeout with the holders: not a
        # bound on this call that trio's own timeouts could replace.
        timeout: float | None = None,  # noqa: ASYNC109
        label: str | None = None,
        pid: int | None = None,
        slots: int | Mapping[str, int] | None = None,
        on_queued: QueuedCallback | None = None,
    ) -> Lease:
        """Take every lock in `names` together, waiting until all are free.

        The arguments mean what they mean to the blocking `Client.acquire`: `shared`;
        `slots` (counting semaphores); `wait`
        (False raises LockBusy at once, whatever `timeout` says); `timeout` (seconds, counted
        by the daemon, then LockTimeout); `label`; `pid`, which ties the lease to that process
        so that it outlives this connection, while `Lease.release` still ends it as long as
        this connection lasts. `on_queued(holders)` is called, in this task, each time the
        daemon says the request waits. Invalid names raise InvalidName, and a label too long
        InvalidArgument, before anything is sent.

        Cancellation: if cancelled while waiting (or interrupted by any other exception), the
        request is withdrawn — a Release is written, shielded from the cancellation — before
        the exception propagates, so no lease is left behind, granted or queued.
        """
        call, data = self._conn.acquire(
            names, shared=shared, wait=wait, timeout=timeout, label=label, pid=pid, slots=slots
        )
        return Lease(self, await self._run(call, data, on_queued))

    def lock(
        self,
        *names: str,
        shared: bool = False,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (as `acquire`'s: the daemon's to count)
        label: str | None = None,
        pid: int | None = None,
        slots: int | Mapping[str, int] | None = None,
        on_queued: QueuedCallback | None = None,
    ) -> Locking:
        """`acquire` for an `async with` block, which releases the lease on leaving it:
        `async with client.lock("site.com") as lease: ...`. Cancellation: as `acquire`, and
        the release on leaving is shielded, so a cancelled block still releases the lease."""
        return Locking(
            functools.partial(
                self.acquire,
                *names,
                shared=shared,
                wait=wait,
                timeout=timeout,
                label=label,
                pid=pid,
                slots=slots,
                on_queued=on_queued,
            )
        )

    async def status(self, *names: str) -> list[protocol.LockInfo]:
        """Holders and waiters of `names`, or of every lock in use if none are given.

        Cancellation: the reply, when it comes, is ignored.
        """
        return await self._run(*self._conn.status(names))

    async def metrics(self) -> str:
        """The daemon's metrics, in the Prometheus text format (docs/metrics.md). Raises
        ProtocolError, sending nothing, if the daemon is too old to serve them.

        Cancellation: the reply, when it comes, is ignored.
        """
        return await self._run(*self._conn.metrics())

    async def reexec(self) -> protocol.Reexecuted:
        """Have lockd re-execute itself in place, as the blocking `Client.reexec` does, and
        return the new program's `Reexecuted`; raises as that one does.

        Cancellation: the answer, when it comes, is ignored; a re-exec under way goes on.
        """
        return await self._run(*self._conn.reexec())

    async def history(
        self, *names: str, since: float | None = None, until: float | None = None, limit: int = 1000,
    ) -> list[protocol.LeaseEvent]:
        """The recorded lease events on `names`, as the blocking `Client.history` returns them:
        the latest `limit` from `since` until before `until`, oldest first, those the daemon's
        policy lets this user read, read a page at a time.

        Cancellation: the reply to the page asked for, when it comes, is ignored.
        """
        query = self._conn.history(names, since, until, limit)
        while (page := query.next_page()) is not None:
            query.add(await self._run(*page))
        return query.events

    async def release_pid(self, pid: int, *names: str) -> int:
        """End the leases process `pid` holds on `names` (acquired with `pid=`).

        Returns how many ended; raises NotHeld if it holds none of them.
        """
        return await self._run(*self._conn.release_pid(pid, names))

    async def force_release(self, name: str) -> int:
        """Break every lease on `name`; their holders see them lost. Returns how many."""
        return await self._run(*self._conn.force_release(name))

    def events(self, *names: str) -> Subscribing:
        """Subscribe to the lease events on `names` (every lock if none are given) that this
        user may read, as the blocking `Client.events` does; here with `async for`::

            async with client.events("site.com") as events:
                async for event in events:
                    print(event.event, event.name, event.pid)

        Entering the block (or awaiting, `events = await client.events(...)`, then
        `await events.aclose()`) returns once lockd has confirmed: every event from then on
        comes, in order. Waiting for the next event reads the connection for every task using
        it. The iteration ends with SubscriptionDropped (a LimitExceeded) if its events were not
        read as fast as they came (subscribe again; `history` has the ones missed),
        DaemonUnavailable if the connection ended; it ends cleanly once `aclose()` ends the
        subscription or the client.

        Cancellation: cancelling a task waiting for the next event loses no event; leaving the
        block by cancellation (or any exception) ends the subscription with a Release written
        shielded from the cancellation. Cancelled while subscribing, the subscription is
        withdrawn the same way before the cancellation propagates.
        """
        return Subscribing(self, names)

    async def aclose(self) -> None:
        """Close the connection and release every lease on it. Idempotent.

        Tasks waiting on this connection raise DaemonUnavailable. The socket is closed even if
        this is cancelled.
        """
        for lease in self._conn.close():
            _lockfds.let_go(self._conn.let_go(lease), unlock=lease.detached)
        self._wake()
        self._close_socket()
        await self._stream.aclose()

    def _close_socket(self) -> None:
        _lockfds.close_all(self._conn.stray_fds())
        self._stream.socket.close()

    def _forget_after_fork(self) -> None:
        _lockfds.close_all(self._conn.abandon("this process is a fork of the one holding the lease"))
        if self._raw.fileno() >= 0:
            _lockfds.hang_up(self._raw.fileno())

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<lockd trio Client {self.socket_path} {self._conn.phase.value}>"

    # --- internals ----------------------------------------------------------------------------

    async def _run(self, call: Call[T], data: bytes, on_queued: QueuedCallback | None = None) -> T:
        """Send a request and read until its reply; withdraw it if anything interrupts."""
        try:
            await self._send(data)
            while not call.done:
                await self._read_until(lambda: call.done or bool(call.queued))
                if call.queued:
                    for holders in call.take_queued():
                        if on_queued is not None:
                            on_queued(holders)
            return call.result()
        except BaseException:
            await self._send_shielded(self._conn.withdraw(call))
            _lockfds.close_all(self._conn.stray_fds())
            raise

    async def _read_until(self, done: Callable[[], bool]) -> None:
        """Read until `done()` holds or the connection closes.

        If another task is reading, wait for it to apply what it read instead: register
        `done` in `_waiters` and sleep. `done` must be cheap and change nothing, as the
        reading task evaluates it for every waiter after every read. The wake-up rules:
        - after a read, the reader wakes only the waiters whose `done()` now holds;
        - once the connection is closed, every waiter is woken (no wait can end otherwise);
        - a task that stops reading (its own wait over, cancelled, or failed) while others
          wait wakes one of them to read in its place, so waiters always have a reader.

        Cancelling the reading task loses nothing: trio consumes no data from a cancelled
        receive, and the reading is handed on as above.
        """
        try:
            while not done() and self._conn.phase is not CLOSED:
                if self._reading:
                    woken = trio.Event()
                    self._waiters[woken] = done
                    try:
                        await woken.wait()
                    finally:
                        self._waiters.pop(woken, None)
                    continue
                self._reading = True
                try:
                    try:
                        await trio.lowlevel.wait_readable(self._raw)
                        read = _lockfds.recv_into(self._raw, self._inbox, _socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except (trio.ClosedResourceError, OSError) as exc:
                        self._apply_read(exc)
                    else:
                        self._apply_read(read)
                finally:
                    self._reading = False
                    # No hand-over yet: this task reads again if its own wait is not over,
                    # and if it is, it hands the reading on as it leaves, below. Handing it
                    # on now would wake a task only to find this one reading again.
                    self._wake(hand_over=False)
        finally:
            if not self._reading:
                self._wake()

    def _read_pending(self) -> None:
        """Apply what the daemon has already sent, without waiting and without a checkpoint.

        Does nothing while a task is reading: that task applies it, and a second reader
        could take half of what it expects.
        """
        # Asked first, without reading: a read that finds nothing raises BlockingIOError,
        # which costs several times a poll(), and most calls (every block's end) find nothing.
        while not self._reading and self._conn.phase is not CLOSED and self._readable.poll(0):
            try:
                read = _lockfds.recv_into(self._raw, self._inbox, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._apply_read(exc)
            else:
                self._apply_read(read)
            self._wake()

    def _apply_read(self, result: tuple[int, list[int]] | Exception) -> None:
        """Apply one read: the byte count it put in the inbox and the descriptors that came
        with it, or how it failed."""
        if isinstance(result, Exception):
            self._conn.abort(f"reading from lockd at {self.socket_path} failed: {result}")
        else:
            size, fds = result
            self._conn.receive_data(self._inbox_view[:size], fds)
        if self._conn.phase is CLOSED:
            self._close_socket()
        elif self._conn.stray:
            _lockfds.close_all(self._conn.stray_fds())

    async def _send(self, data: bytes) -> None:
        """Write `data`, after what the connection has unsent, whole and in order with every
        other task's writes; nothing at all if this task is already cancelled."""
        if not data and not self._conn.has_unsent:
            return
        lock = self._send_lock
        # Cancelled here, nothing is written; past this point a cancel may tear the frame.
        await trio.lowlevel.checkpoint_if_cancelled()
        if lock.locked():  # another task is writing: this one's turn comes after it
            await lock.acquire()
            try:
                await trio.lowlevel.checkpoint_if_cancelled()  # cancelled while waiting for it
            except BaseException:
                lock.release()
                raise
        else:
            data = self._write_now(data)
            if not data:
                return
            lock.acquire_nowait()
        await self._write(data)

    async def _send_shielded(self, data: bytes) -> None:
        """Write a release or withdrawal whatever the cancellation; if the connection is
        broken, the daemon has ended the lease already."""
        if not data and not self._conn.has_unsent:
            return
        lock = self._send_lock
        wait_turn = lock.locked()
        if not wait_turn:
            data = self._write_now(data)
            if not data:
                return  # written at once, as nearly always: nothing waited, so nothing to shield
            lock.acquire_nowait()
        with trio.CancelScope(shield=True):
            if wait_turn:
                await lock.acquire()
            try:
                await self._write(data)
            except errors.DaemonUnavailable:
                pass

    def _write_now(self, data: bytes) -> bytes:
        """Write what the socket takes at once of `data`, after what the connection has unsent;
        return the rest. Only while no other task is writing, and before this one yields:
        then nothing can come between. A request is a few dozen bytes, and the socket nearly
        always has room for it: it goes without a trip through the scheduler or the lock."""
        if self._conn.has_unsent:
            data = self._conn.take_unsent() + data
        try:
            return data[self._raw.send(data):]
        except OSError:
            return data  # full (EAGAIN), or broken: the stream's write waits, or says so

    async def _write(self, data: bytes) -> None:
        """Write `data` (after what the connection has unsent) whole, holding the send lock,
        then release it. Interrupted midway, the frame may be torn: the connection closes."""
        try:
            # After `_send` wrote part of it at once, this tries again: safe because no await
            # came between (the lock was taken without one), so no other write went first.
            data = self._write_now(data)
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = self._abort(f"writing to lockd at {self.socket_path} failed: {exc}")
            raise went_away(reason) from exc
        except BaseException:
            self._abort("the connection was closed after an interrupted write")
            raise
        finally:
            self._send_lock.release()

    def _abort(self, reason: str) -> str:
        """`Connection.abort`, then close the socket and wake every waiting task; returns
        why the connection is closed."""
        reason = self._conn.abort(reason)
        self._close_socket()
        self._wake()
        return reason

    def _wake(self, hand_over: bool = True) -> None:
        """Wake the waiting tasks whose wait is over (all of them once the connection is
        closed); with `hand_over`, the first of the others too, to read in place of a task
        that stopped reading or waiting."""
        waiters = self._waiters
        if not waiters:
            return
        closed = self._conn.closed
        for woken, done in list(waiters.items()):
            if closed or done():
                woken.set()
                del waiters[woken]
        if hand_over and waiters:
            woken = next(iter(waiters))
            woken.set()
            del waiters[woken]


class Locking:
    """What `Client.lock` returns: enter it to acquire, and to release on leaving the block.

    A class, not an async generator made a context manager: that costs a generator, trio's
    hooks for it and contextlib's steps through it on every block. It is entered once, as
    that context manager was: a second entry raises RuntimeError, since its one slot would
    lose the first lease, left held until the connection closes.
    """

    __slots__ = ("_acquire", "_entered", "_lease")

    def __init__(self, acquire: Callable[[], Awaitable[Lease]]) -> None:
        self._acquire = acquire
        self._entered = False
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        # Marked before the wait: a second task entering meanwhile must not acquire too.
        if self._entered:
            raise RuntimeError("a lock() block is entered once: call lock() for each block")
        self._entered = True
        self._lease = await self._acquire()
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the lease, shielded from cancellation, as `Lease.__aexit__` does."""
        lease, self._lease = self._lease, None
        assert lease is not None
        await lease.__aexit__(exc_type, exc, tb)


class Subscribing:
    """What `Client.events` returns: await it for an `Events`, or enter it to have the
    subscription ended on leaving the block. The block is entered once: a second entry
    raises RuntimeError, since the one slot would lose the first subscription."""

    __slots__ = ("_client", "_names", "_entered", "_events")

    def __init__(self, client: Client, names: tuple[str, ...]) -> None:
        self._client = client
        self._names = names
        self._entered = False
        self._events: Events | None = None

    def __await__(self) -> Generator[Any, None, Events]:
        return self._subscribe().__await__()

    async def __aenter__(self) -> Events:
        # Marked before the wait: a second task entering meanwhile must not subscribe too.
        if self._entered:
            raise RuntimeError("an events() block is entered once: call events() for each block")
        self._entered = True
        self._events = await self._subscribe()
        return self._events

    async def __aexit__(self, *exc_info: object) -> None:
        events, self._events = self._events, None
        assert events is not None
        await events.aclose()

    async def _subscribe(self) -> Events:
        client = self._client
        subscription, data = client._conn.subscribe(self._names)
        events = Events(client, subscription)
        try:
            await client._send(data)
            await client._read_until(lambda: subscription.started or subscription.ended)
        except BaseException:
            await events.aclose()
            raise
        if subscription.error is not None:
            raise subscription.error
        return events


class Events:
    """A subscription to lease events (`Client.events`): an async iterator of `LeaseEvent`s,
    and an async context manager that ends the subscription on leaving its block."""

    __slots__ = ("_client", "_subscription")

    def __init__(self, client: Client, subscription: Subscription) -> None:
        self._client = client
        self._subscription = subscription

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> protocol.LeaseEvent:
        """The next event, waiting for it. Once the subscription has ended, the events that
        came before its end, then StopAsyncIteration if `aclose` ended it, else its error.
        Cancellation: nothing is lost; the event stays for the next call."""
        subscription = self._subscription
        if subscription.events or subscription.ended:
            await trio.lowlevel.checkpoint()  # a fast stream of events must not starve others
        else:
            await self._client._read_until(lambda: bool(subscription.events) or subscription.ended)
        if subscription.events:
            return subscription.events.popleft()
        await self.aclose()  # ended here for lagging: lockd is yet to hear it
        if subscription.error is not None:
            raise subscription.error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """End the subscription, without waiting for lockd. Idempotent; shielded from
        cancellation."""
        await self._client._send_shielded(self._client._conn.unsubscribe(self._subscription))

    async def __aenter__(self) -> Events:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """End the subscription (`aclose`), shielded from cancellation."""
        await self.aclose()

    def __repr__(self) -> str:
        return f"<lockd trio Events {', '.join(self._subscription.names) or 'every lock'}>"


class Lease(LeaseView):
    """A granted lease. As an async context manager it is released on leaving the block.

    If the lease was lost (the daemon went away, or it was force-released), leaving the block
    raises LeaseLost, unless another exception is already propagating.
    """

    __slots__ = ()
    _client: Client

    @property
    def lost(self) -> bool:
        """Whether the lease ended without being released. Reads pending events first, unless
        another task is reading the connection (then: as of that task's last read)."""
        self._client._read_pending()
        return self._record.state is LOST

    async def release(self, exit_status: int | None = None) -> None:
        """Release the lease without waiting for the daemon, unlocking its lock files.
        Idempotent.

        The daemon applies it before any later request on this connection. Shielded from
        cancellation. A lost lease is let go of too (the daemon may be waiting for that to
        give the lock to the next). `exit_status`: that of the work the lease protected,
        kept in the daemon's history with the release. Raises InvalidArgument, releasing
        nothing, for an `exit_status` outside 0 to 255.
        """
        check_exit_status(exit_status)
        client, record = self._client, self._record
        try:
            await client._send_shielded(client._conn.release(record, exit_status))
        finally:
            if record.fds:
                _lockfds.let_go(client._conn.let_go(record), unlock=record.detached)

    async def wait_lost(self) -> str:
        """Read the connection until this lease is lost; return the reason.

        Runs in the calling task (other tasks' replies it reads are handed to them). If the
        lease is released instead, or held on detached from a daemon that went away (see
        `detached`), it is never lost: this then sleeps until cancelled.
        """
        await self._client._read_until(lambda: self._record.state is not HELD)
        if self._record.state is LOST:
            assert self._record.lost_reason is not None
            return self._record.lost_reason
        await trio.sleep_forever()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._read_pending()  # a loss the daemon has already reported counts
        await self.release()
        self._raise_if_lost(exc_type)
