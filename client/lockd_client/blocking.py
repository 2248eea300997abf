"""The blocking lockd client: one socket, one thread at a time, standard library only.

Invariant: when a call returns or raises, nothing it asked of the daemon is left behind
unaccounted for. A request interrupted while waiting (KeyboardInterrupt, an exception from
`on_queued`) is withdrawn before the exception propagates, so no lock stays queued or granted
to nobody; a request interrupted in the middle of writing closes the connection instead,
because a torn frame would corrupt everything after it. This module never imports trio.
"""

from __future__ import annotations

# The socket type itself: the `socket` module's Python layer (enums of every constant, made
# at import) would cost lockctl about 2 ms of start-up for nothing this client uses.
import _socket as socket
import os
import select
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TypeVar

from . import _lockfds, errors, paths, protocol
from ._connection import (
    CLOSED,
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
from ._dial import BusyCallback, Patience, pauses

T = TypeVar("T")


def connect(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    label: str | None = None,
    timeout: float | None = 5.0,
    on_busy: BusyCallback | None = None,
) -> Client:
    """Connect to lockd and complete the handshake.

    `socket_path` defaults to `paths.socket_path()` (which honours LOCKD_SOCKET). `label`
    (at most 256 characters) is shown in `status` next to this connection's leases. `timeout`
    bounds connecting and the handshake only (None: no bound); requests then wait as long as
    they ask to.

    A busy daemon is waited for: while its queue of connections waiting to be accepted is
    full, connecting is retried, backing off, and once in that queue the connection waits
    for the handshake's answer, until `timeout` has passed; then DaemonBusy is raised.
    `on_busy()` is called once if that wait lasts a second. Raises DaemonUnavailable if
    nothing listens at the socket.
    """
    path = os.fspath(socket_path) if socket_path is not None else paths.socket_path()
    patience = Patience(path, timeout, on_busy)
    waits = pauses()
    while True:
        sock = patience.connect()
        # A child process must not inherit the socket: it would keep this connection, and so
        # every lease on it, alive after this process closes or dies.
        assert not os.get_inheritable(sock.fileno())
        try:
            client = Client(sock, path)
            call, data = client._conn.hello(label)
            client._send(data)
            while not call.done:
                patience.wait_readable(sock)
                client._read()
            client.server = call.result()
            return client
        except errors.LimitExceeded as refusal:
            sock.close()
            patience.pause(next(waits), refusal)  # turned away for its limits: as busy
        except BaseException:
            sock.close()
            raise


class Client:
    """A connection to lockd. Closing it (or leaving its `with` block) ends all its leases.

    Not thread-safe: use one Client per thread.
    """

    server: protocol.Welcome

    def __init__(self, sock: socket.socket, socket_path: str) -> None:
        self._sock = sock
        self._conn = Connection()
        self.socket_path = socket_path
        # Reads land in one buffer for the connection's lifetime: no allocation per read.
        self._inbox = bytearray(READ_SIZE)
        self._inbox_view = memoryview(self._inbox)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        _lockfds.register(self, self._conn)

    def acquire(
        self,
        *names: str,
        shared: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        label: str | None = None,
        pid: int | None = None,
        slots: int | Mapping[str, int] | None = None,
        on_queued: QueuedCallback | None = None,
    ) -> Lease:
        """Take every lock in `names` together, waiting until all are free.

        `shared` asks for a shared lease. `slots=N` makes the names counting semaphores of N
        slots, at most N holders at once, and the lease takes one slot of each; a mapping
        `{name: N}` does so for the names it maps only, and `shared` is then for the others.
        Every user of a name must give the same N (or none): else SlotsMismatch.
        `wait=False` raises LockBusy at once if any name is held, whatever `timeout` says (as
        flock(1) -n does with -w); otherwise `timeout` (seconds) raises LockTimeout once it
        passes. Both errors carry the holders. `label` (at most 256 characters) is shown in
        `status`.

        `pid` ties the lease to that process instead of this connection: it outlives this
        connection, and ends when that process exits or on `release_pid`; while this
        connection lasts, `Lease.release` ends it too.

        `on_queued(holders)` is called each time the daemon says the request waits. Invalid
        names raise InvalidName, and a label too long InvalidArgument, before anything is
        sent. If waiting is interrupted by any exception, the request is withdrawn first.
        """
        call, data = self._conn.acquire(
            names, shared=shared, wait=wait, timeout=timeout, label=label, pid=pid, slots=slots
        )
        return Lease(self, self._run(call, data, on_queued))

    #: `acquire` under the name that reads right in a `with` statement, which releases the
    #: lease on leaving the block: `with client.lock("site.com") as lease: ...`.
    lock = acquire

    def status(self, *names: str) -> list[protocol.LockInfo]:
        """Holders and waiters of `names`, or of every lock in use if none are given."""
        return self._run(*self._conn.status(names))

    def metrics(self) -> str:
        """The daemon's metrics, in the Prometheus text format (docs/metrics.md). Raises
        ProtocolError, sending nothing, if the daemon is too old to serve them."""
        return self._run(*self._conn.metrics())

    def reexec(self) -> protocol.Reexecuted:
        """Have lockd re-execute its own command line in place, as SIGUSR2 does, to run the
        version installed now: the new program takes over under the same pid, with every
        lease, waiting request and connection (this one too). Returns once it has, which may
        take a few seconds: its `Reexecuted` says the server before and after, and how long
        lockd paused (`paused`, seconds).

        Only root and lockd's own user may: else PermissionDenied. Raises BackendUnavailable
        if lockd did not re-execute (the message says why; it serves on as before),
        ProtocolError, sending nothing, if it is too old to, and DaemonUnavailable if the
        connection ended before the answer (lockd's log says why).
        """
        return self._run(*self._conn.reexec())

    def history(
        self, *names: str, since: float | None = None, until: float | None = None, limit: int = 1000,
    ) -> list[protocol.LeaseEvent]:
        """The lease events the daemon recorded on `names` (every lock when none are given)
        from `since` until before `until` (Unix times; None: no bound): the latest `limit` of
        them, oldest first, read a page (about a MiB) at a time. The daemon's policy decides
        whose events a user sees: by default their own, and those in its
        `policy.read_events` (by default root) everyone's.

        Raises ProtocolError if the daemon keeps no history (an older lockd, or one whose
        config turns it off), DaemonUnavailable if it cannot read it now.
        """
        query = self._conn.history(names, since, until, limit)
        while (page := query.next_page()) is not None:
            query.add(self._run(*page))
        return query.events

    def release_pid(self, pid: int, *names: str) -> int:
        """End the leases process `pid` holds on `names` (acquired with `pid=`).

        Returns how many ended; raises NotHeld if it holds none of them.
        """
        return self._run(*self._conn.release_pid(pid, names))

    def force_release(self, name: str) -> int:
        """Break every lease on `name`; their holders see them lost. Returns how many."""
        return self._run(*self._conn.force_release(name))

    def events(self, *names: str) -> Events:
        """Subscribe to the lease events on `names` (every lock if none are given) that this
        user may read (lockd's policy: by default their own, and root everyone's).

        Returns once lockd has confirmed: every event from then on comes, in order, from the
        iterator returned. Leaving its `with` block (or `close()`) ends the subscription::

            with client.events("site.com") as events:
                for event in events:
                    print(event.event, event.name, event.pid)

        Waiting for the next event reads the connection, so replies and notices for this
        client's other requests and leases are applied meanwhile. The iteration ends with an
        exception when the subscription does: SubscriptionDropped (a LimitExceeded) if its
        events were not read as fast as they came (subscribe again; `history` has the ones
        missed), DaemonUnavailable if the connection ended; it ends cleanly (StopIteration)
        once `close()` ends the subscription or the client. `event.user` is None: lockd sends
        `uid`. Raises ProtocolError if this lockd does not send events, InvalidName for a bad
        name, and LimitExceeded when this connection has too many subscriptions.
        """
        subscription, data = self._conn.subscribe(names)
        events = Events(self, subscription)
        try:
            self._send(data)
            while not (subscription.started or subscription.ended):
                self._read()
        except BaseException:
            events.close()
            raise
        if subscription.error is not None:
            raise subscription.error
        return events

    def fileno(self) -> int:
        """The socket, for select/poll: when readable, call `process_events`.

        It stays open until `close`, even once the connection has ended (it then polls
        readable for ever), so the number is never reused while a caller watches it.
        """
        return self._sock.fileno()

    def process_events(self) -> None:
        """Apply whatever the daemon has sent, without blocking.

        A Lost notice marks its lease lost. When the connection ends, a lease whose lock-file
        descriptors this process holds stays held, `detached`, where the daemon said its
        leases outlive it; every other lease is marked lost.
        """
        # Asked first, without reading: a read that finds nothing raises BlockingIOError,
        # which costs several times a poll(), and most calls (every `with` block's end) find
        # nothing.
        while self._conn.phase is not CLOSED and self._readable.poll(0) and self._read(socket.MSG_DONTWAIT):
            pass

    def close(self) -> None:
        """Close the connection and release every lease on it. Idempotent."""
        for lease in self._conn.close():
            _lockfds.let_go(self._conn.let_go(lease), unlock=lease.detached)
        _lockfds.close_all(self._conn.stray_fds())
        self._sock.close()

    def _forget_after_fork(self) -> None:
        _lockfds.close_all(self._conn.abandon("this process is a fork of the one holding the lease"))
        if self._sock.fileno() >= 0:
            _lockfds.hang_up(self._sock.fileno())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lockd Client {self.socket_path} {self._conn.phase.value}>"

    # --- internals ----------------------------------------------------------------------------

    def _run(self, call: Call[T], data: bytes, on_queued: QueuedCallback | None = None) -> T:
        """Send a request and read until its reply; withdraw it if anything interrupts."""
        try:
            self._send(data)
            while not call.done:
                self._read()
                if call.queued:
                    for holders in call.take_queued():
                        if on_queued is not None:
                            on_queued(holders)
            return call.result()
        except BaseException:
            self._send_quietly(self._conn.withdraw(call))
            _lockfds.close_all(self._conn.stray_fds())
            raise

    def _read(self, flags: int = 0) -> bool:
        """Read once and apply it. False when MSG_DONTWAIT found nothing to read."""
        conn = self._conn
        try:
            if not flags:
                # Wait in poll(), not in recv(): a reader blocked in recv() on a Unix socket
                # is woken for nothing each time the daemon reads a request of ours (the
                # kernel's write-space wakeup is not filtered for it), at a cost in CPU to
                # both processes.
                self._readable.poll()
            size, fds = _lockfds.recv_into(self._sock, self._inbox, flags)
        except BlockingIOError:
            return False
        except OSError as exc:
            conn.abort(f"reading from lockd at {self.socket_path} failed: {exc}")
        else:
            conn.receive_data(self._inbox_view[:size], fds)
        if conn.phase is CLOSED:
            self._hang_up()
            _lockfds.close_all(conn.stray_fds())
        elif conn.stray:
            _lockfds.close_all(conn.stray_fds())
        return True

    def _send(self, data: bytes) -> None:
        if self._conn.has_unsent:
            data = self._conn.take_unsent() + data
        if not data:
            return
        try:
            self._sock.sendall(data)
        except OSError as exc:
            reason = self._conn.abort(f"writing to lockd at {self.socket_path} failed: {exc}")
            self._hang_up()
            raise went_away(reason) from exc
        except BaseException:
            # Interrupted mid-frame: the daemon might read garbage after it, so end it all.
            self._conn.abort("the connection was closed after an interrupted write")
            self._hang_up()
            raise

    def _hang_up(self) -> None:
        """Let go of this process's handle on the connection, but keep the descriptor number
        until `close`: whoever polls `fileno()` must not see it vanish or be reused.

        The daemon sees the connection end once no process holds it. A socket shutdown would
        end it at once for every process holding a copy, and lockctl relies on a copy kept by
        another process to hold the lease until the command it runs under it is gone. The
        descriptor then refers to /dev/null, which polls readable.
        """
        _lockfds.hang_up(self._sock.fileno())

    def _send_quietly(self, data: bytes) -> None:
        """Send a release; if the connection is broken, the daemon already ended the lease."""
        try:
            self._send(data)
        except errors.DaemonUnavailable:
            pass


class Events(Iterator[protocol.LeaseEvent]):
    """A subscription to lease events (`Client.events`): an iterator of `LeaseEvent`s, and a
    context manager that ends the subscription on leaving its block."""

    __slots__ = ("_client", "_subscription")

    def __init__(self, client: Client, subscription: Subscription) -> None:
        self._client = client
        self._subscription = subscription

    def __next__(self) -> protocol.LeaseEvent:
        """The next event, waiting for it. Once the subscription has ended, the events that
        came before its end, then StopIteration if `close` ended it, else its error."""
        subscription = self._subscription
        while not subscription.events and not subscription.ended:
            self._client._read()
        if subscription.events:
            return subscription.events.popleft()
        self.close()  # ended here for lagging: lockd is yet to hear it
        if subscription.error is not None:
            raise subscription.error
        raise StopIteration

    def close(self) -> None:
        """End the subscription, without waiting for lockd. Idempotent."""
        self._client._send_quietly(self._client._conn.unsubscribe(self._subscription))

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lockd Events {', '.join(self._subscription.names) or 'every lock'}>"


class Lease(LeaseView):
    """A granted lease. As a context manager it is released on leaving the block.

    If the lease was lost (the daemon went away, or it was force-released), leaving the block
    raises LeaseLost, unless another exception is already propagating.
    """

    __slots__ = ()
    _client: Client

    @property
    def lost(self) -> bool:
        """Whether the lease ended without being released. Reads pending events first."""
        self._client.process_events()
        return self._record.state is LOST

    def release(self, exit_status: int | None = None) -> None:
        """Release the lease without waiting for the daemon, unlocking its lock files.
        Idempotent.

        The daemon applies it before any later request on this connection. A lost lease is
        let go of too (the daemon may be waiting for that to give the lock to the next).
        `exit_status`: that of the work the lease protected (128+N for a death by signal N),
        kept in the daemon's history with the release. Raises InvalidArgument, releasing
        nothing, for an `exit_status` outside 0 to 255.
        """
        check_exit_status(exit_status)
        client, record = self._client, self._record
        conn = client._conn
        try:
            client._send_quietly(conn.release(record, exit_status))
        finally:
            if record.fds:
                _lockfds.let_go(conn.let_go(record), unlock=record.detached)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.process_events()  # a loss the daemon has already reported counts
        self.release()
        self._raise_if_lost(exc_type)
