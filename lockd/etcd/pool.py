"""A bounded pool of kept-alive HTTP/1.1 connections to etcd's endpoints.

Invariants:
- At most `limit` connections are open at once, idle ones included. An exchange holds one
  from taking it until its answer is read, a stream until it is closed; while every one is
  in use, the next waits its turn (first come, first served).
- A connection is reused only as `etcd.http` allows (a whole answer that left it open, and
  not found closed by the server when taken again); any other ends closed.
- `NotSent` means nothing of the request reached the server, as in `etcd.http`.
"""

from __future__ import annotations

import ssl

import trio

from .http import Connection, Failed, NotSent, Origin


class Pool:
    """Connections to any of the endpoints, at most `limit` open."""

    def __init__(self, context: ssl.SSLContext, limit: int) -> None:
        self._context = context
        self._limit = limit
        self._slots = trio.Semaphore(limit)
        #: Idle connections, the most recently used last.
        self._idle: list[Connection] = []
        self._open = 0
        self._closed = False

    async def hold(self) -> None:
        """Take a place in the pool, waiting for one while all are in use, for `exchange(...,
        held=True)`; the caller gives it back with `release`. Cancellation while waiting takes
        none."""
        await self._slot()

    def release(self) -> None:
        """Give back a place taken with `hold`."""
        self._slots.release()

    async def exchange(
        self, origin: Origin, request: bytes, connect_timeout: float, *, held: bool = False,
    ) -> tuple[int, bytes]:
        """Send `request` (whole HTTP bytes) to `origin`; return the answer's status and body.
        It waits for a place in the pool first, unless the caller `held` one already.

        Raises `NotSent` if no connection could be made within `connect_timeout`, `Failed`
        after. Cancellation closes the connection: whether the server acted on the request is
        then unknown.
        """
        if not held:
            await self._slot()
        try:
            connection = await self._take(origin, connect_timeout)
            try:
                await connection.send(request)
                answer = await connection.answer()
            except BaseException:
                await self._discard(connection)
                raise
            if connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                await self._discard(connection)
            return answer
        finally:
            if not held:
                self._slots.release()

    async def stream(self, origin: Origin, request: bytes, send_timeout: float) -> Stream:
        """Send `request` on a connection of its own within `send_timeout` (waiting for a free one,
        connecting and sending); return the answer to read as it comes, which holds the
        connection until closed.

        Raises `NotSent` or `Failed` as `exchange` does; a timeout while waiting for a connection,
        connecting or sending is `NotSent` or `Failed` according to whether sending had begun.
        Cancellation closes the connection.
        """
        sending = False
        with trio.move_on_after(send_timeout):
            await self._slot()
            try:
                connection = await self._take(origin, send_timeout)
            except BaseException:
                self._slots.release()
                raise
            stream = Stream(self, connection)
            try:
                sending = True
                await connection.send(request)
            except BaseException:
                await stream.aclose()
                raise
            return stream
        if sending:
            raise Failed(f"the request was not sent within {send_timeout:.2g} s")
        raise NotSent(f"no connection within {send_timeout:.2g} s")

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._discard(connection)

    async def _slot(self) -> None:
        """Take a slot, waiting for one only if none is free.

        A free one is taken without yielding to other tasks: `Semaphore.acquire` always does,
        and the request would then leave only after every task ready to run has had its turn.
        Waiting for the answer is the exchange's schedule point.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()

    async def _take(self, origin: Origin, connect_timeout: float) -> Connection:
        """An open connection to `origin`: an idle one the server has not closed, or a new one."""
        for index in range(len(self._idle) - 1, -1, -1):
            if self._idle[index].origin is origin:
                connection = self._idle.pop(index)
                if not connection.stale():
                    return connection
                await self._discard(connection)
                break  # the others to it are older, as likely to be closed: connect afresh
        # Every other connection in use holds a slot, as this caller does: at the limit, one
        # is idle. The count is settled before the first await, so that callers meanwhile
        # see it right.
        oldest = self._idle.pop(0) if self._open >= self._limit else None
        self._open += 1
        try:
            if oldest is not None:
                await self._discard(oldest)
            with trio.move_on_after(connect_timeout):
                return await Connection.open(origin, self._context)
        except BaseException:
            self._open -= 1
            raise
        self._open -= 1
        raise NotSent(f"no connection within {connect_timeout:.2g} s")

    async def _discard(self, connection: Connection) -> None:
        self._open -= 1  # before the await: see `_take`
        await connection.aclose()

    async def _end_stream(self, connection: Connection) -> None:
        self._slots.release()
        await self._discard(connection)


class Stream:
    """An answer read as it arrives (a watch), line by line; it holds its connection and the
    pool slot until `aclose`."""

    def __init__(self, pool: Pool, connection: Connection) -> None:
        self._pool = pool
        self._connection = connection
        self._pending = bytearray()
        self._searched = 0
        self._closed = False

    async def status(self) -> int:
        """Wait for the answer's head; return its status. Raises `Failed`."""
        return await self._connection.answer_head()

    async def line(self) -> bytes | None:
        """The next line of the body, without its newline; None once the body has ended."""
        while (end := self._pending.find(b"\n", self._searched)) < 0:
            part = await self._connection.part()
            if part is None:
                last = bytes(self._pending)
                self._pending.clear()
                return last or None
            self._searched = len(self._pending)
            self._pending += part
        line = bytes(self._pending[:end])
        del self._pending[:end + 1]
        self._searched = 0
        return line

    async def rest(self) -> bytes:
        """The rest of the body, whole."""
        parts = [bytes(self._pending)]
        self._pending.clear()
        while (part := await self._connection.part()) is not None:
            parts.append(part)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close the connection (a stream's is never reused) and free its slot. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._pool._end_stream(self._connection)
