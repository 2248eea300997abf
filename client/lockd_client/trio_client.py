"""The trio lockd client: one connection that any number of tasks may use at once.

Invariants:
- At most one task reads the socket at a time. It applies what it read to the connection's
  state and wakes every other waiting task, which then looks at its own request or lease.
  Reading happens only in tasks that wait for something: there is no background task.
- A frame is never torn. Requests are written only if not already cancelled; one interrupted
  mid-write closes the connection (the daemon then ends every lease on it). Releases and
  withdrawals are written shielded from cancellation, so a lease is released even when its
  block is left by cancellation, and a cancelled acquire leaves nothing queued or granted.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import trio

from . import errors, paths, protocol
from ._connection import READ_SIZE, Call, Connection, LeaseState, LeaseView, unavailable, went_away

T = TypeVar("T")

QueuedCallback = Callable[[list[protocol.Holder]], object]


@asynccontextmanager
async def connect(
    socket_path: str | os.PathLike[str] | None = None, *, label: str | None = None
) -> AsyncIterator[Client]:
    """Connect to lockd, complete the handshake, and close the connection on exit.

    `socket_path` defaults to `paths.default_socket()` (which honours LOCKD_SOCKET). `label`
    is shown in `status` next to this connection's leases. Raises DaemonUnavailable if
    nothing answers at the socket. To bound the handshake, use a trio timeout around it.
    Closing the connection ends every lease on it.
    """
    path = os.fspath(socket_path if socket_path is not None else paths.default_socket())
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise unavailable(path, exc) from exc
    client = Client(stream, path)
    try:
        client.server = await client._run(*client._conn.hello(label))
        yield client
    finally:
        await client.aclose()


class Client:
    """A connection to lockd, shared by any number of tasks."""

    server: protocol.Welcome

    def __init__(self, stream: trio.SocketStream, socket_path: str) -> None:
        self._stream = stream
        self._conn = Connection()
        self.socket_path = socket_path
        self._send_lock = trio.Lock()
        # Reads land in one buffer for the connection's lifetime: no allocation per read.
        self._inbox = bytearray(READ_SIZE)
        self._inbox_view = memoryview(self._inbox)
        self._reading = False
        # Set (then replaced) each time the reading task has applied what it read.
        self._progress = trio.Event()

    async def acquire(
        self,
        *names: str,
        shared: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        label: str | None = None,
        pid: int | None = None,
        on_queued: QueuedCallback | None = None,
    ) -> Lease:
        """Take every lock in `names` together, waiting until all are free.

        `shared` asks for a shared lease. `wait=False` raises LockBusy at once if any name is
        held; `timeout` (seconds, counted by the daemon) raises LockTimeout once it passes.
        `label` is shown in `status`. `pid` ties the lease to that process instead of this
        connection: it then ends only when that process exits or on `release_pid`, not on
        `Lease.release` or when this connection closes. `on_queued(holders)` is called, in this task, each time the daemon says
        the request waits. Invalid names raise InvalidName before anything is sent.

        Cancellation: if cancelled while waiting (or interrupted by any other exception), the
        request is withdrawn — a Release is written, shielded from the cancellation — before
        the exception propagates, so no lease is left behind, granted or queued.
        """
        call, data = self._conn.acquire(
            names, shared=shared, wait=wait, timeout=timeout, label=label, pid=pid
        )
        return Lease(self, await self._run(call, data, on_queued))

    @asynccontextmanager
    async def lock(self, *names: str, **kwargs: Any) -> AsyncIterator[Lease]:
        """`acquire` for an `async with` block, which releases the lease on exit."""
        async with await self.acquire(*names, **kwargs) as lease:
            yield lease

    async def status(self, *names: str) -> list[protocol.LockInfo]:
        """Holders and waiters of `names`, or of every lock in use if none are given.

        Cancellation: the reply, when it comes, is ignored.
        """
        return await self._run(*self._conn.status(names))

    async def release_pid(self, pid: int, *names: str) -> int:
        """End the leases process `pid` holds on `names` (acquired with `pid=`).

        Returns how many ended; raises NotHeld if it holds none of them.
        """
        return await self._run(*self._conn.release_pid(pid, names))

    async def force_release(self, name: str) -> int:
        """Break every lease on `name`; their holders see them lost. Returns how many."""
        return await self._run(*self._conn.force_release(name))

    async def aclose(self) -> None:
        """Close the connection; the daemon ends every lease on it. Idempotent.

        Tasks waiting on this connection raise DaemonUnavailable. The socket is closed even if
        this is cancelled.
        """
        self._conn.close()
        self._wake()
        await self._stream.aclose()

    def __repr__(self) -> str:
        return f"<lockd trio Client {self.socket_path} {self._conn.phase.value}>"

    # --- internals ----------------------------------------------------------------------------

    async def _run(self, call: Call[T], data: bytes, on_queued: QueuedCallback | None = None) -> T:
        """Send a request and read until its reply; withdraw it if anything interrupts."""
        try:
            await self._send(data)
            while not call.done:
                await self._read_until(lambda: call.done or bool(call.queued))
                for holders in call.take_queued():
                    if on_queued is not None:
                        on_queued(holders)
            return call.result()
        except BaseException:
            await self._send_shielded(self._conn.withdraw(call))
            raise

    async def _read_until(self, done: Callable[[], bool]) -> None:
        """Read until `done()` holds or the connection closes.

        If another task is reading, wait for it to apply what it read instead. Cancelling
        the reading task loses nothing: trio consumes no data from a cancelled receive.
        """
        while not done() and not self._conn.closed:
            if self._reading:
                await self._progress.wait()
                continue
            self._reading = True
            try:
                try:
                    size = await self._stream.socket.recv_into(self._inbox)
                except (trio.ClosedResourceError, OSError) as exc:
                    self._conn.abort(f"reading from lockd at {self.socket_path} failed: {exc}")
                else:
                    self._conn.receive_data(self._inbox_view[:size])
                if self._conn.closed:
                    self._stream.socket.close()
            finally:
                self._reading = False
                self._wake()

    async def _send(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            # Cancelled here, nothing is written; past this point a cancel may tear the frame.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._abort(f"writing to lockd at {self.socket_path} failed: {exc}")
                raise went_away(self._conn.close_reason) from exc
            except BaseException:
                self._abort("the connection was closed after an interrupted write")
                raise

    async def _send_shielded(self, data: bytes) -> None:
        """Write a release or withdrawal whatever the cancellation; if the connection is
        broken, the daemon has ended the lease already."""
        with trio.CancelScope(shield=True):
            try:
                await self._send(data)
            except errors.DaemonUnavailable:
                pass

    def _abort(self, reason: str) -> None:
        self._conn.abort(reason)
        self._stream.socket.close()
        self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()


class Lease(LeaseView):
    """A granted lease. As an async context manager it is released on leaving the block.

    If the lease was lost (the daemon went away, or it was force-released), leaving the block
    raises LeaseLost, unless another exception is already propagating.
    """

    __slots__ = ()
    _client: Client

    @property
    def lost(self) -> bool:
        """Whether the lease is known lost: as of the last read by any task on its connection."""
        return self._record.state is LeaseState.LOST

    async def release(self) -> None:
        """Release the lease without waiting for the daemon. Idempotent.

        The daemon applies it before any later request on this connection. Shielded from
        cancellation. Does nothing if the lease was lost or the connection is closed.
        """
        await self._client._send_shielded(self._client._conn.release(self._record))

    async def wait_lost(self) -> str:
        """Read the connection until this lease is lost; return the reason.

        Runs in the calling task (other tasks' replies it reads are handed to them). If the
        lease is released instead, it is never lost: this then sleeps until cancelled.
        """
        await self._client._read_until(lambda: self._record.state is not LeaseState.HELD)
        if self._record.state is LeaseState.LOST:
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
        lost = self.lost
        await self.release()
        if lost and exc_type is None:
            raise self._record.lost_error()
