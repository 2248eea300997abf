"""One client connection as the daemon sees it: who is on the other end, what it asked for,
and what is waiting to be sent to it.

Invariant: everything the daemon sends to a client goes through `Session.send`, which only
appends to a bounded outbox and never awaits; the session's own writer task is the one place
that writes to its socket. So no client, however slow, can block the daemon or another
client, and a client that lets more than `max_outbox` bytes pile up is cut off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import msgspec
import trio

from lockd_client import protocol

from .table import Ticket

log = logging.getLogger("lockd")


@dataclass(slots=True)
class Party:
    """Who a ticket is for: shown in `status` and in busy messages. The table keeps it opaque."""

    session: Session | None
    request_id: int
    pid: int | None
    uid: int | None
    gid: int | None
    command: str
    label: str | None
    #: Set for a lease tied to a process rather than to the connection.
    process: ProcessOwner | None = None


@dataclass(eq=False, slots=True)
class ProcessOwner:
    """The table owner of process-tied leases: they end when `pid` exits (watched by pidfd)."""

    pid: int
    uid: int
    pidfd: int
    exited: bool = False


class SessionClosed(Exception):
    pass


class Session:
    """A connected client: its identity (from SO_PEERCRED, never from what it says), its
    live tickets by request id, and its outbox."""

    __slots__ = (
        "stream", "pid", "uid", "gid", "gids", "command", "label", "tickets", "encoder", "_outbox",
        "_wake", "max_outbox", "closed", "close_reason", "ident",
    )

    def __init__(
        self, stream: trio.SocketStream, ident: int, pid: int, uid: int, gid: int, command: str,
        max_outbox: int,
    ) -> None:
        self.stream = stream
        self.ident = ident
        self.pid = pid
        self.uid = uid
        self.gid = gid
        #: Every group the peer was in at connect time (policies name groups).
        self.gids: frozenset[int] = frozenset((gid,))
        self.command = command
        self.label: str | None = None
        #: Request id → the ticket of an Acquire that is waiting or held on this connection.
        self.tickets: dict[int, Ticket] = {}
        self.encoder = msgspec.msgpack.Encoder()
        self._outbox = bytearray()
        self._wake = trio.Event()
        self.max_outbox = max_outbox
        self.closed = False
        self.close_reason: str | None = None

    def __repr__(self) -> str:
        return f"<Session #{self.ident} pid={self.pid} uid={self.uid}>"

    def send(self, message: object) -> None:
        """Queue `message` for this client. Never blocks.

        A client that has left more than `max_outbox` bytes unread is disconnected: its
        writer stops and its leases end like any closed connection's.
        """
        if self.closed:
            return
        if len(self._outbox) > self.max_outbox:
            self.close(f"it left more than {self.max_outbox} bytes of replies unread")
            return
        protocol.encode_frame(self.encoder, message, self._outbox)
        self._wake.set()

    def close(self, reason: str) -> None:
        """Stop serving this client; its tasks notice and end, its leases end with them."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._wake.set()

    async def run_writer(self, send_timeout: float) -> None:
        """Write the outbox to the socket until the session closes.

        A client that does not take a pending write within `send_timeout` seconds is closed.
        Returns (without raising) when the session closes or the peer goes away; whatever is
        still queued when the session closes is flushed first, so a goodbye `Error` arrives.
        """
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                data, self._outbox = self._outbox, bytearray()
                with trio.move_on_after(send_timeout) as scope:
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.close("the connection broke")
                        return
                if scope.cancelled_caught:
                    self.close(f"it did not read its replies for {send_timeout:g} s")
                    return
            if self.closed:
                return
