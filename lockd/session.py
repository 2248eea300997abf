"""One client connection's socket I/O: the handshake, reading and decoding requests, and
writing replies. Who the client is and what it asked for are the service's (lockd.service).

Invariants:
- Everything the daemon sends to a client goes through `Session.send` (replies) or
  `Session.offer` (lease events), which never await: they write what the socket takes (at
  once, or, corked, once the read's last request is handled) and leave the rest, in order,
  to the session's writer task, the only other place that writes to the socket. A client
  that lets more than MAX_OUTBOX bytes of replies pile up, or leaves replies unread for
  `send_timeout`, is cut off. So no client, however slow, can block the daemon or another
  client.
- Lease events have a lane of their own: they wait in a bounded queue (MAX_QUEUED_EVENTS
  bytes) that the writer takes from only while no reply waits, and the send timeout runs
  only while replies wait. A subscriber that does not read loses its subscription (the
  service drops it when `offer` refuses an event; its unsent events are thrown away and its
  notice goes last in the lane), never its connection and the leases on it. An event never
  overtakes a reply sent before it; a reply may overtake events that wait.
- Descriptors sent with a message (SCM_RIGHTS) go with its first byte, or with the first byte
  of an earlier message written in the same system call (MAX_FDS_PER_MESSAGE to a byte), so
  a client that queues the descriptors it receives in order has each message's by the time
  the message is complete. Those left waiting in the outbox are the session's own duplicates,
  closed once sent or when the session ends, so they always refer to the files they were
  sent for.
- The replies to the requests of one read are written together, by one system call when the
  socket takes them: while a request that has others after it in the same read is handled,
  the session is corked (`send` queues), and the last one's reply, or the end of the read's
  requests, writes them all. So a reply waits at most for the synchronous handling of the
  requests after it in the same read, never more than FAIR_TURNS of them and never across
  an await: the batch is cut at FAIR_TURNS, at a handler that awaits, at a shut gate, and
  where a write's descriptors would pass MAX_FDS_PER_MESSAGE. A reply held back and then
  dropped (the connection broke) is reported as undelivered, as one that never went out at
  once is (see `send`).
- Every descriptor queued to go with a reply is a duplicate (`os.dup`): a grant not written
  at once (queued behind unread replies, held back with a batch, or carrying more than
  MAX_FDS_PER_MESSAGE) costs one per lock file until it is sent. Out of descriptors, a batch
  is written at once instead, and the grant with it if the socket takes it all; if not,
  `send` raises LimitExceeded having queued nothing, and the session serves on: running out
  costs that request, never the connection or its other leases.
- `close` calls `on_close` synchronously, exactly once: the daemon ends the session's leases
  there, before anything else happens, so a cut-off client never holds a lease while its
  goodbye is still being written. A closed session hands no more requests to the daemon.
- The reader yields to the scheduler at least every FAIR_TURNS reads or requests, so a client
  that floods its connection cannot starve the others.
- A connection's requests are handled in the order sent: one whose handling has to wait (a
  status looking at the host's locks) holds back that connection's later requests only.
"""

from __future__ import annotations

import array
import errno
import logging
import math
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import msgspec
import trio
from lockd_client import errors, protocol
from lockd_client.describe import sanitize

from . import handover
from .config import Limits
from .fdlimit import out_of_descriptors

log = logging.getLogger("lockd")

#: Replies a client may leave unread before it is cut off. Generous: a `status` of a busy host
#: is one large frame, and it is still appended whole.
MAX_OUTBOX: Final = 4 * 1024 * 1024
#: Lease events waiting to be sent (bytes) past which the next one is refused and its
#: subscription dropped: a subscriber that cannot keep up loses its subscription, never its
#: connection and the leases on it.
MAX_QUEUED_EVENTS: Final = 256 * 1024
#: Reads and requests the reader handles before it lets other tasks run.
FAIR_TURNS: Final = 16
#: After its goodbye is written, how long a cut-off client has to hang up before the daemon
#: closes: until then what it still sends is read and dropped, so closing does not reset the
#: connection and destroy the goodbye before the client reads it.
LINGER: Final = 1.0
_RECV_SIZE: Final = 65536
#: One descriptor as SCM_RIGHTS carries it: a C int, as `array("i")` packs it.
_ONE_FD: Final = struct.Struct("i")
#: How much of what a client sent a protocol error quotes, in its reply and in the log.
_MAX_QUOTED: Final = 120


#: Handles one request. Most requests are handled at once, so a handler is a plain function
#: (a coroutine would cost every request a coroutine and an await); one that has to wait
#: returns an awaitable, which the session awaits before reading this client's next request.
Handler = Callable[["Session", object], Awaitable[None] | None]


class _Malformed(Exception):
    """The peer broke the framing or sent bytes no request decodes from."""


class Session:
    """A connected client's socket: the handshake, reading requests, writing replies. What
    the client is and has asked for is the service's (lockd.service.Client)."""

    __slots__ = (
        "sock", "ident", "label", "closed", "close_reason", "_on_close", "_encoder", "_outbox", "_attached",
        "_wake", "_eof", "_events", "_event_bytes", "_event_head", "_timer", "_send_timeout", "_frames",
        "_unhandled", "_handled", "_corked", "_held", "_unsent", "greeted", "_gate",
    )

    def __init__(self, sock: socket.socket, ident: int, on_close: Callable[[Session], None]) -> None:
        """`sock` must be non-blocking; the session closes it when `serve` returns."""
        self.sock = sock
        self.ident = ident
        #: From the client's hello.
        self.label: str | None = None
        self.closed = False
        self.close_reason: str | None = None
        self._on_close = on_close
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox = bytearray()
        #: [offset in the outbox, descriptors to send with the byte there], in outbox order.
        self._attached: deque[tuple[int, list[int]]] = deque()
        self._wake = trio.Event()
        self._eof = False
        #: Lease events not yet in the outbox, in order: (subscription id, or None for a
        #: subscription's last word, frame).
        self._events: deque[tuple[int | None, bytes]] = deque()
        self._event_bytes = 0
        #: How many bytes at the head of the outbox are events (the writer moves events there
        #: only when it is empty): the rest are replies, which the send timeout is for.
        self._event_head = 0
        #: The writer's send timeout, while it runs: armed only while replies wait.
        self._timer: trio.CancelScope | None = None
        self._send_timeout = math.inf
        #: What was received and not yet handled, once serving: the frames cut from the
        #: last read, of which `_handled` were handled as of the reader's last await (views
        #: into that read or into `_frames`), then what `_frames` holds past them.
        self._frames: protocol.FrameBuffer | None = None
        self._unhandled: Sequence[memoryview] = ()
        self._handled = 0
        #: While set, `send` queues replies without writing them (see the module docstring);
        #: `_held` says that it did, and that the writer does not know of them yet.
        self._corked = False
        self._held = False
        #: The `undelivered` callbacks of the replies held while corked, until they are
        #: written (to be called if they never are).
        self._unsent: list[Callable[[], None]] = []
        self.greeted = False
        #: Requests are handled only while it is open (see `Gate`).
        self._gate: Gate | None = None

    def __repr__(self) -> str:
        return f"<Session #{self.ident}>"

    # --- sending ------------------------------------------------------------------------------

    def offer(self, subscription_id: int, message: object) -> bool:
        """Send the lease event `message` of subscription `subscription_id` in the events'
        lane (see the module docstring), unless MAX_QUEUED_EVENTS bytes of events wait
        already: then False, and nothing is sent."""
        if self._event_bytes >= MAX_QUEUED_EVENTS:
            return False
        self._send_event(subscription_id, protocol.frame(self._encoder, message))
        return True

    def end_events(self, subscription_id: int, notice: object | None) -> None:
        """Throw away the events of subscription `subscription_id` not yet sent, then send
        `notice` (if any) in the events' lane, after the events already on their way: a
        reader that does not read is not cut off for not reading it either."""
        if self._events:
            kept = deque(item for item in self._events if item[0] != subscription_id)
            self._event_bytes = sum(len(item[1]) for item in kept)
            self._events = kept
        if notice is not None:
            self._send_event(None, protocol.frame(self._encoder, notice))

    def _send_event(self, key: int | None, frame: bytes) -> None:
        if self.closed:
            return
        if self._outbox or self._events:
            if not self._events:
                self._wake.set()  # the writer may be idle, waiting for replies
            self._events.append((key, frame))
            self._event_bytes += len(frame)
            return
        outbox = self._outbox
        outbox += frame
        try:
            del outbox[: self.sock.send(outbox)]
        except BlockingIOError:
            pass
        except OSError:
            self._break("the connection broke")
            return
        if outbox:
            self._event_head = len(outbox)
            self._wake.set()

    def send(
        self, message: object, fds: Sequence[int] = (), undelivered: Callable[[], None] | None = None,
    ) -> None:
        """Send `message` to this client, with copies of the descriptors `fds`: write what the
        socket takes now and queue the rest behind what it has not taken yet; or, while corked
        (see the module docstring), queue it all, to be written with the replies to the rest
        of the read. Never blocks; does nothing once the session is closed. The caller keeps
        `fds`: they may be closed as soon as this returns.

        `undelivered` is called, once, if the message never reaches the socket: the session
        was closed already, or closes before it is written (the connection broke, the client
        left more than MAX_OUTBOX bytes unread). A message that was written in part, or queued
        behind one that was, counts as sent.

        Raises LimitExceeded, having queued nothing of it and called nothing, if `fds` had to
        be duplicated to be queued and the daemon is out of descriptors (the replies held back
        before it may have been written meanwhile).
        """
        if self.closed:
            if undelivered is not None:
                undelivered()
            return
        outbox = self._outbox
        if outbox or self._corked:
            # Queued behind what the client has not read yet, or what answers the requests
            # handled before this one in the same read (corked): written together.
            if len(outbox) > MAX_OUTBOX:
                self.close(f"it left more than {MAX_OUTBOX} bytes of replies unread")
            else:
                if fds:
                    try:
                        self._attach(len(outbox), fds)
                    except errors.LimitExceeded:
                        if not self._corked:
                            raise
                        self._send_uncorked(message, fds, undelivered)
                        return
                protocol.encode_frame(self._encoder, message, outbox)
                if self._corked:
                    self._held = True
                    if undelivered is not None:
                        self._unsent.append(undelivered)
                elif self._held:
                    # The last of the batch: written with it, or dropped with it.
                    self._held = False
                    if undelivered is not None:
                        self._unsent.append(undelivered)
                    self._write_queued()
                elif not self._event_head:
                    self._arm()  # events alone may have been waiting: now a reply does
                return
        elif len(fds) > protocol.MAX_FDS_PER_MESSAGE:
            # Over several bytes, as duplicates (see `_attach`).
            self._attach(0, fds)
            protocol.encode_frame(self._encoder, message, outbox)
            self._write_queued()
            return
        else:
            # The common case, without duplicates: the descriptors go now or not at all.
            frame = protocol.frame(self._encoder, message)
            try:
                sent = self.sock.sendmsg([frame], [_rights(fds)]) if fds else self.sock.send(frame)
            except BlockingIOError:
                sent = 0
                if fds:
                    self._attach(0, fds)
            except OSError:
                self._break("the connection broke")
                frame = b""
            if frame:
                if sent < len(frame):
                    outbox += memoryview(frame)[sent:]
                    self._wake.set()
                return
        if undelivered is not None:
            undelivered()

    def _send_uncorked(
        self, message: object, fds: Sequence[int], undelivered: Callable[[], None] | None,
    ) -> None:
        """`send`, for a message that could not be held back with the rest of its read for
        want of descriptors: corking only saves system calls, so write what waits now, and
        then this message, with `fds` themselves if the socket takes everything at once.
        Raises LimitExceeded if it does not (the client is not reading)."""
        self._corked = False
        try:
            if self._held or self._outbox:  # replies left unread may have room by now too
                self._held = False
                self._write_queued()
            self.send(message, fds, undelivered)
        finally:
            self._corked = True

    def _write_queued(self) -> None:
        """Write what the outbox holds, as much as the socket takes now; leave the rest to the
        writer. The replies held while corked, if any, are written (in part at least) or,
        the connection broken, never will be."""
        outbox = self._outbox
        before = len(outbox)
        try:
            self._flush()
        except BlockingIOError:
            pass
        except OSError:
            self._break("the connection broke")
            return
        if self._unsent:
            self._unsent.clear()
        self._event_head = max(0, self._event_head - (before - len(outbox)))
        if outbox:
            self._wake.set()
            if not self._event_head:
                self._arm()

    def _attach(self, offset: int, fds: Sequence[int]) -> None:
        """Queue duplicates of `fds` to go with the outbox's byte at `offset` and those after
        it, MAX_FDS_PER_MESSAGE to a byte. Raises LimitExceeded, queueing none, if the daemon
        is out of descriptors (a message without its descriptors would be a broken promise)."""
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError as exc:
            _close_all(dups)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(exc, "the lock could not be handed over (it is not held)") from exc
            raise
        step = protocol.MAX_FDS_PER_MESSAGE
        for i in range(0, len(dups), step):
            self._attached.append((offset + i // step, dups[i : i + step]))

    def _flush(self) -> None:
        """Write what the socket takes now, each queued descriptor with its byte. Raises
        BlockingIOError once the socket is full, OSError if it broke."""
        outbox, attached = self._outbox, self._attached
        while outbox:
            if attached and attached[0][0] == 0:
                # With the descriptors of the messages after it, as many as one write takes.
                fds, taken = list(attached[0][1]), 1
                while taken < len(attached) and len(fds) + len(attached[taken][1]) <= protocol.MAX_FDS_PER_MESSAGE:
                    fds += attached[taken][1]
                    taken += 1
                end = attached[taken][0] if taken < len(attached) else len(outbox)
                sent = self.sock.sendmsg([outbox[:end] if end < len(outbox) else outbox], [_rights(fds)])
                for _ in range(taken):
                    _close_all(attached.popleft()[1])
            else:
                end = attached[0][0] if attached else len(outbox)
                sent = self.sock.send(outbox[:end] if end < len(outbox) else outbox)
            del outbox[:sent]
            if attached and sent:
                for i, (offset, fds) in enumerate(attached):
                    attached[i] = (offset - sent, fds)

    def _arm(self) -> None:
        """Start the send timeout unless it runs already."""
        timer = self._timer
        if timer is not None and timer.deadline == math.inf:
            timer.deadline = trio.current_time() + self._send_timeout

    def _break(self, reason: str) -> None:
        """Drop what was left to send and cut the client off for `reason`; then call the
        `undelivered` callbacks of the replies held while corked, which now never go out."""
        self._clear()
        self.close(reason)
        unsent, self._unsent = self._unsent, []
        for undelivered in unsent:
            undelivered()

    def _clear(self) -> None:
        """Drop what was left to send."""
        self._outbox.clear()
        self._event_head = 0
        self._events.clear()
        self._event_bytes = 0
        while self._attached:
            _close_all(self._attached.popleft()[1])

    def fail(self, message: str) -> None:
        """Tell the client it broke the protocol, and cut it off."""
        self.send(protocol.Error(None, protocol.ErrorCode.PROTOCOL, message))
        self.close(message)

    def close(self, reason: str) -> None:
        """Stop serving this client: `on_close` ends its leases now; the writer flushes what is
        queued and `serve` then returns."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        # The goodbye matters, the events no longer: and what is left goes within the timeout.
        self._events.clear()
        self._event_bytes = 0
        self._wake.set()
        self._arm()
        self._on_close(self)

    # --- re-exec ------------------------------------------------------------------------------

    def hand_over(self) -> handover.SessionState:
        """What the re-executed program needs to serve this connection on: the socket, what
        the client sent that was not handled yet, what it was not sent yet. Changes nothing;
        valid while no request is being handled (the gate is shut and none is in flight)."""
        frames = self._frames
        # The frames cut from the last read and not handled go back in front of what the
        # buffer holds, as `FrameBuffer.put_back` would do; rebuilt here, as this must not
        # change the session.
        unread = b"".join(protocol.pack_prefix(len(body)) + body for body in self._unhandled[self._handled :])
        return handover.SessionState(
            fd=self.sock.fileno(), greeted=self.greeted, unread=unread + (b"" if frames is None else frames.unread()),
            outbox=bytes(self._outbox), attached=[(offset, list(fds)) for offset, fds in self._attached],
            event_head=self._event_head, events=list(self._events),
        )

    def adopt(self, state: handover.SessionState, label: str | None, max_frame: int) -> None:
        """Go on where the session `state` describes left off, before `serve`: its unsent
        replies, events and descriptors (now this session's own) are sent first, its unread
        requests handled first."""
        self.label = label
        self.greeted = state.greeted
        self._outbox += state.outbox
        self._attached.extend((offset, fds) for offset, fds in state.attached)
        self._event_head = state.event_head
        self._events.extend(state.events)
        self._event_bytes = sum(len(frame) for _, frame in state.events)
        self._frames = protocol.FrameBuffer(max_frame)
        self._frames.feed(state.unread)
        if self._outbox or self._events:
            self._wake.set()

    def discard(self) -> None:
        """Close the socket of a session never served (an adoption that failed), with no
        goodbye and no word to the daemon; its queued descriptors are closed."""
        self.closed = True
        self._clear()
        self.sock.close()

    # --- serving ------------------------------------------------------------------------------

    async def serve(
        self, welcome: protocol.Welcome | None, handle: Handler, limits: Limits, gate: Gate | None = None,
    ) -> None:
        """Serve the connection until either side ends it, then close the socket.

        The client must say Hello by `limits.handshake_timeout`; it is answered `welcome`
        (None only for a session closed already, refused as it connected). Then
        each request is decoded and given to `handle`, in order: a request whose handling has
        to wait holds back this client's later requests, nobody else's. A session closed
        before `serve` (a refused connection) only flushes its goodbye. While `gate` is shut,
        no request is handled. The session is closed when this returns, however it returns.
        Cancellation: stops at once and closes the socket without flushing.
        """
        self._gate = gate
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_then_cancel, limits.send_timeout, nursery.cancel_scope)
                if (welcome is not None or self.greeted) and not self.closed:
                    await self._converse(welcome, handle, limits)
                    # Closed amid a read's requests, it may still hold their replies.
                    self._uncork()
                self.close(self.close_reason or "the client closed the connection")
            if not self._eof:
                await self._linger()
        finally:
            self.close("the daemon stopped serving it")
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def _converse(self, welcome: protocol.Welcome | None, handle: Handler, limits: Limits) -> None:
        frames = self._frames = self._frames or protocol.FrameBuffer(limits.max_frame)
        decoder = protocol.request_decoder()
        sock = self.sock
        gate = self._gate
        try:
            if not self.greeted:
                # One deadline for the whole handshake, however the hello trickles in.
                deadline = trio.current_time() + limits.handshake_timeout
                while True:
                    if gate is not None and gate.shut:
                        # No hello is taken out of the frames while the gate is shut: one
                        # taken and not answered would be in no handed-over state. The
                        # wait is not the client's: its deadline moves on by it.
                        shut_at = trio.current_time()
                        await gate.opened()
                        deadline += trio.current_time() - shut_at
                    if (hello := _next_message(frames, decoder)) is not None:
                        break
                    data = self._recv_now()
                    if data is None:
                        with trio.move_on_at(deadline) as waiting:
                            await trio.lowlevel.wait_readable(sock)
                        if waiting.cancelled_caught:
                            self.fail(f"no handshake within {limits.handshake_timeout:g} s")
                            return
                    elif data:
                        frames.feed(data)
                    else:
                        return
                assert welcome is not None, "a session not greeted yet has its welcome"
                self._greet(hello, welcome)
            await self._handle_requests(frames, decoder, handle)
        except _Malformed as exc:
            self.fail(f"{exc}; the connection is closed")
        except Exception:
            # A bug must cost one connection, never the daemon and everyone's leases.
            log.exception("internal error serving %r; closing its connection", self)
            self.send(protocol.Error(
                None, protocol.ErrorCode.UNAVAILABLE, "internal error in lockd (it is logged); reconnect",
            ))
            self.close("internal error")

    async def _handle_requests(
        self, frames: protocol.FrameBuffer, decoder: msgspec.msgpack.Decoder[protocol.Request], handle: Handler,
    ) -> None:
        """Hand each request to `handle`, in order, until the session closes or the client
        hangs up. Every read is cut into its frames at once, and they are handled one after
        the other with no await in between (but a handler's own, and every FAIR_TURNS): one
        wakeup for whatever a client sent together. Raises _Malformed."""
        sock, gate = self.sock, self._gate
        # What came with the hello, or what an adopted session was handed, comes first.
        bodies: Sequence[memoryview]
        bodies, too_large = frames.frames(b"")
        self._unhandled, handled = bodies, 0
        turns = 0
        while not self.closed:
            if gate is not None and gate.shut:
                self._uncork()
                self._handled = handled
                await gate.opened()
                continue
            if handled < len(bodies):
                handled += 1
                try:
                    message = decoder.decode(bodies[handled - 1])
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                    raise _Malformed(_undecodable(exc)) from None
                corked = self._corked = handled < len(bodies)
                unfinished = handle(self, message)
                if unfinished is not None:
                    self._uncork()
                    self._handled = handled
                    await unfinished
                elif not corked and self._held:
                    self._uncork()  # the last request of the read had no reply of its own
            elif too_large is not None:
                raise _Malformed(str(too_large))
            else:
                # No view into the buffer may outlive what is cut from it: it changes now.
                bodies = self._unhandled = ()
                # Read before waiting, even after a read that emptied the socket: a client
                # that waits for its reply has often sent its next request by the time it is
                # written (it ran as the reply woke it), and then no wait is needed at all.
                data = self._recv_now()
                if data is None:
                    turns = 0
                    self._handled = 0
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not data:
                    return
                bodies, too_large = frames.frames(data)
                self._unhandled, handled = bodies, 0
            turns += 1
            if turns >= FAIR_TURNS:
                turns = 0
                self._uncork()
                self._handled = handled
                await trio.lowlevel.checkpoint()

    def _uncork(self) -> None:
        """Write what was queued while corked, before an await."""
        self._corked = False
        if self._held:
            self._held = False
            self._write_queued()

    def _greet(self, message: object, welcome: protocol.Welcome) -> None:
        if not isinstance(message, protocol.Hello):
            self.fail("the first message must be hello")
        elif message.version != protocol.PROTOCOL_VERSION:
            self.send(protocol.Error(
                None, protocol.ErrorCode.VERSION,
                f"protocol version {message.version} is not supported; this daemon speaks "
                f"{protocol.PROTOCOL_VERSION} (upgrade lockd_client or lockd to match)",
            ))
            self.close("unsupported protocol version")
        else:
            self.label = shown_label(message.label)
            self.greeted = True
            self.send(welcome)

    def _recv_now(self) -> bytes | None:
        """What the socket holds now; None if nothing yet, b"" once the peer hung up."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            data = b""  # reset by the peer: as good as hung up
        if not data:
            self._eof = True
        return data

    async def _write_then_cancel(self, send_timeout: float, scope: trio.CancelScope) -> None:
        await self._write(send_timeout)
        # The writer ends only once the session is closed: stop reading from it too.
        scope.cancel()

    async def _write(self, send_timeout: float) -> None:
        """Write what `send` left in the outbox, and the events `offer` queued while no reply
        waits, until the session closes and the outbox is flushed.

        A client that takes nothing of a pending write for `send_timeout` seconds while
        replies wait (or once the session is closed) is cut off.
        """
        sock = self.sock
        outbox = self._outbox
        self._send_timeout = send_timeout
        try:
            with trio.CancelScope() as timer:
                self._timer = timer
                while True:
                    if not outbox:
                        if self._events:
                            self._take_events()
                        elif self.closed:
                            return
                        else:
                            await self._wake.wait()
                            self._wake = trio.Event()
                            continue
                    # A reply's time to be read starts once the events ahead of it are taken:
                    # a subscriber that lags loses its subscription, not its connection.
                    if self.closed or not self._event_head:
                        self._arm()
                    await trio.lowlevel.wait_writable(sock)
                    timer.deadline = math.inf
                    before = len(outbox)
                    try:
                        self._flush()
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._break("the connection broke")
                        return
                    finally:
                        self._event_head = max(0, self._event_head - (before - len(outbox)))
            self._break(f"it did not read its replies for {send_timeout:g} s")
        finally:
            self._timer = None
            self._clear()

    def _take_events(self) -> None:
        """Move queued events into the empty outbox, up to a socket buffer's worth."""
        outbox, events = self._outbox, self._events
        while events and len(outbox) < _RECV_SIZE:
            frame = events.popleft()[1]
            outbox += frame
            self._event_bytes -= len(frame)
        self._event_head = len(outbox)

    async def _linger(self) -> None:
        """Half-close, then drop what the client still sends until it hangs up or LINGER
        passes (see LINGER)."""
        sock = self.sock
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with trio.move_on_after(LINGER):
            while (data := self._recv_now()) != b"":
                if data is None:
                    await trio.lowlevel.wait_readable(sock)


class Gate:
    """Shut, it holds back every session's next request (the handshake's answer too) until
    it is opened again: a re-exec shuts it, so that nothing is being handled when the state
    is handed over. A request being handled when it shuts is handled to the end."""

    __slots__ = ("shut", "_opened")

    def __init__(self) -> None:
        self.shut = False
        self._opened = trio.Event()

    def close(self) -> None:
        if not self.shut:
            self.shut = True
            self._opened = trio.Event()

    def open(self) -> None:
        self.shut = False
        self._opened.set()

    async def opened(self) -> None:
        await self._opened.wait()


def _next_message(
    frames: protocol.FrameBuffer, decoder: msgspec.msgpack.Decoder[protocol.Request]
) -> object | None:
    """The next complete request in `frames`, decoded; None if none is complete yet."""
    try:
        body = frames.next_frame()
        return None if body is None else decoder.decode(body)
    except protocol.FrameTooLarge as exc:
        raise _Malformed(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _Malformed(_undecodable(exc)) from None


def _undecodable(exc: Exception) -> str:
    """What to tell a client whose message did not decode (`exc`): RecursionError is nesting
    deeper than the decoder's stack, in a field it skips. It quotes what the client sent, and
    goes into a log line: inert and short."""
    quoted = sanitize(str(exc))
    if len(quoted) > _MAX_QUOTED:
        quoted = quoted[:_MAX_QUOTED] + "…"
    return f"malformed message ({type(exc).__name__}: {quoted})"


def shown_label(text: str | None) -> str | None:
    """A client's label as lockd keeps and shows it: inert (see `describe.sanitize`); the
    protocol already caps its length."""
    return None if text is None else sanitize(text)


def _rights(fds: Sequence[int]) -> tuple[int, int, bytes]:
    if len(fds) == 1:  # a grant of one name: no array for it
        return (socket.SOL_SOCKET, socket.SCM_RIGHTS, _ONE_FD.pack(fds[0]))
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
