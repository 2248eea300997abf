"""One client connection to lockd as a state machine: requests in, bytes out; bytes in, state.

Invariants:
- Every request sent has one `Call`, resolved exactly once (a value or an error); a lease is
  HELD from its Granted until it is released, lost, or the connection closes, and never
  becomes HELD again.
- Once the connection is CLOSED (EOF, a connection-level Error, a protocol violation, a
  failed transport, or `close`), no Call is pending, and the only leases still HELD are
  `detached` ones: the daemon said its leases outlive it, and the lease's lock-file
  descriptors keep it, until the client releases it. Whoever waits on this connection can
  always tell that its wait is over.
- Every lock-file descriptor received belongs to exactly one lease record (`fds`) until the
  caller takes it with `let_go`, or is handed back by `stray_fds` for the caller to close:
  none is ever forgotten.
- A subscription receives the events the daemon sends for it, in order, from its Done until
  it ends, exactly once: its client releases it, the daemon ends it with an Error (one that
  lags is dropped: SubscriptionDropped), this client drops it with MAX_UNREAD_EVENTS unread
  (its Release waits in `take_unsent` for the next write), or the connection closes (by this
  client: a clean end, as a release; otherwise DaemonUnavailable). Its unread events stay
  readable after the end.
- A method that refuses a move (bad name, wrong phase, oversized request) raises before
  changing any state.

No I/O and no clock: the blocking and trio clients read and write the socket, feed what they
read (and the descriptors that came with it) to `receive_data`, send the bytes each request
method returns, and unlock or close the descriptors of the leases that end
(`lockd_client._lockfds`).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Generic, TypeAlias, TypeVar, overload

import msgspec

from . import errors, paths, protocol

T = TypeVar("T")

#: The requests that carry an id and get a reply: each is a Call.
NumberedRequest: TypeAlias = (
    "protocol.Acquire | protocol.Status | protocol.ReleasePid | protocol.ForceRelease | protocol.Metrics"
    " | protocol.History | protocol.Reexec"
)

#: Called with the holders each time the daemon says an acquire waits for them.
QueuedCallback = Callable[[list[protocol.Holder]], object]

#: Events a subscription may hold unread before it ends with SubscriptionDropped, as the daemon
#: drops a subscriber whose socket is not read (about 256 KiB of them): a client whose other
#: requests keep the socket read must not pile up events for a reader that never comes.
MAX_UNREAD_EVENTS: Final = 2048

#: How much a client asks the socket for at once: the size of the buffer each client keeps
#: for its lifetime. 64 KiB takes a burst of replies in one read, at little cost per client.
READ_SIZE: Final = 64 * 1024


class Phase(enum.Enum):
    NEW = "new"  # Hello not sent yet
    GREETING = "greeting"  # Hello sent, Welcome awaited
    OPEN = "open"
    CLOSED = "closed"


class LeaseState(enum.Enum):
    HELD = "held"
    LOST = "lost"  # ended without the client asking; `lost_reason` says why
    RELEASED = "released"  # ended by the client: release, withdraw, or closing the connection


# The members as module globals, which the clients' code compares with: in Python 3.11 the Enum
# metaclass's `__getattr__` hook makes every read of a member off its class (`Phase.OPEN`)
# cost about as much as a function call, three of them in each acquire and release.
NEW, GREETING, OPEN, CLOSED = Phase.NEW, Phase.GREETING, Phase.OPEN, Phase.CLOSED
HELD, LOST, RELEASED = LeaseState.HELD, LeaseState.LOST, LeaseState.RELEASED


class LeaseRecord(msgspec.Struct, eq=False):
    """The client's view of one granted lease, keyed by the id of the Acquire that made it.

    A Struct, never encoded: one is made per grant, and a Struct is made in C.
    """

    id: int
    names: tuple[str, ...]
    #: One per name, in `names` order (the grant was checked to carry exactly that many).
    #: Kept as they came: most leases never ask for them by name.
    _tokens: list[int]
    #: The lock-file descriptors that came with the grant, one per name, then one per
    #: semaphore slot; open until the client lets go of the lease (whatever its state),
    #: then [].
    fds: list[int]
    #: The process the lease is tied to, if it was acquired with `pid=`.
    pid: int | None
    state: LeaseState = HELD
    lost_reason: str | None = None
    #: The connection ended, but the daemon said its leases outlive it: the descriptors
    #: still hold the locks, and the lease is HELD until released.
    detached: bool = False
    #: Whether the daemon was told this lost lease was let go of (see `Connection.release`).
    acknowledged: bool = False

    @property
    def tokens(self) -> dict[str, int]:
        return dict(zip(self.names, self._tokens, strict=True))

    def lost_error(self) -> errors.LeaseLost:
        return errors.LeaseLost(
            f"the lease on {', '.join(self.names)} was lost: {self.lost_reason}; "
            "whatever it protected may have been changed by someone else since"
        )

    def __repr__(self) -> str:
        return f"<LeaseRecord {self.id} {', '.join(self.names)} {self.state.value}>"


class LeaseView:
    """What both clients' Lease classes show of a lease record.

    A plain class, unlike the private records: the public Lease classes derive from it, and
    a Struct would show its fields in their signatures, their conversions and their rules
    for subclasses.
    """

    __slots__ = ("_client", "_record")

    def __init__(self, client: object, record: LeaseRecord) -> None:
        self._client = client
        self._record = record

    @property
    def names(self) -> tuple[str, ...]:
        return self._record.names

    @property
    def tokens(self) -> dict[str, int]:
        """Fencing token per name: strictly increasing per name over every grant."""
        return self._record.tokens

    @property
    def token(self) -> int:
        """The fencing token of the first name."""
        return self._record._tokens[0]  # not through a property of the record: a call fewer

    @property
    def lost_reason(self) -> str | None:
        """Why the lease was lost; None while it is not."""
        return self._record.lost_reason

    @property
    def detached(self) -> bool:
        """Whether the connection to lockd ended (the daemon went away, or either side hung
        up on the other) while the lease is held. The lease is still safe: the lock-file
        descriptors this process holds keep the locks (only the flock backend's leases
        outlive the daemon; others are lost with it), until it is released."""
        return self._record.detached

    def _raise_if_lost(self, exc_type: type[BaseException] | None) -> None:
        """At the end of the lease's block: raise LeaseLost if it was lost, unless another
        exception is already leaving the block (that one says more)."""
        if exc_type is None and self._record.state is LOST:
            raise self._record.lost_error()

    def __repr__(self) -> str:
        return f"<lockd {type(self).__name__} {', '.join(self.names)} {self._record.state.value}>"


class Call(msgspec.Struct, Generic[T], eq=False):
    """A request waiting for its one reply.

    `done` turns true exactly once; then `result()` returns the value or raises the error.
    For an acquire, `queued` collects the holder lists of the daemon's Queued notices until
    the waiter takes them with `take_queued`. A Struct, never encoded, for the same reason as
    LeaseRecord.
    """

    id: int | None
    request: protocol.Hello | NumberedRequest
    queued: list[list[protocol.Holder]] = msgspec.field(default_factory=list)
    done: bool = False
    _value: T | None = None
    _error: errors.LockdError | None = None

    def result(self) -> T:
        if not self.done:
            raise errors.LocalProtocolError(f"request {self.id} has no reply yet; read until it is done")
        if self._error is not None:
            raise self._error
        # `_value` is None only until `_resolve` sets it, which it has: done, and no error.
        return self._value  # type: ignore[return-value]

    def take_queued(self) -> list[list[protocol.Holder]]:
        taken, self.queued = self.queued, []
        return taken

    def _resolve(self, value: T) -> None:
        self._value = value
        self.done = True

    def _fail(self, error: errors.LockdError) -> None:
        self._error = error
        self.done = True

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<Call {self.id} {type(self.request).__name__} {state}>"


class Subscription:
    """A subscription to lease events (`Connection.subscribe`), keyed by its request id.

    `started` turns true with the daemon's Done; `events` queues what arrives until the
    reader takes it; `ended` turns true exactly once, with `error` None when the client ended
    it (or closed the connection) and the exception otherwise (SubscriptionDropped when it
    lagged, DaemonUnavailable when the connection ended otherwise).
    """

    __slots__ = ("id", "names", "events", "started", "ended", "error", "_subscribed")

    def __init__(self, id: int, names: tuple[str, ...]) -> None:
        self.id = id
        self.names = names
        self.events: deque[protocol.LeaseEvent] = deque()
        self.started = False
        self.ended = False
        self.error: errors.LockdError | None = None
        #: Whether the daemon still sends events for it, until told by a Release.
        self._subscribed = True

    def _end(self, error: errors.LockdError | None) -> None:
        if not self.ended:
            self.ended = True
            self.error = error

    def __repr__(self) -> str:
        state = "ended" if self.ended else "started" if self.started else "pending"
        return f"<Subscription {self.id} {', '.join(self.names) or 'every lock'} {state}>"


class HistoryQuery:
    """A history query (`Connection.history`), read page by page: the daemon answers one
    `History` request with at most about a MiB of events, the latest first, and says where
    the earlier ones start. While `next_page` returns a request, send it and hand its reply
    to `add`; then `events` holds them all, oldest first."""

    __slots__ = ("_conn", "_request", "_left", "_pages", "_done")

    def __init__(self, conn: Connection, request: protocol.History, limit: int) -> None:
        self._conn = conn
        #: The first page's request; each later page's is a copy with a new id and cursor.
        self._request = request
        self._left = limit
        self._pages: list[list[protocol.LeaseEvent]] = []
        self._done = False

    def next_page(self) -> tuple[Call[protocol.HistoryReply], bytes] | None:
        """The request for the next page, or None once there is no more to ask for."""
        if self._done:
            return None
        conn = self._conn
        conn._check_open()
        self._request = msgspec.structs.replace(
            self._request, id=conn._next_id, limit=min(self._left, protocol.MAX_HISTORY_LIMIT),
        )
        return conn._send_request(self._request)

    def add(self, reply: protocol.HistoryReply) -> None:
        """Take the reply to the last `next_page`."""
        self._pages.append(reply.events)
        self._left -= len(reply.events)
        # A page without events ends it too, so that no daemon can keep a client asking.
        self._done = reply.more is None or not reply.events or self._left <= 0
        self._request = msgspec.structs.replace(self._request, before=reply.more)

    @property
    def events(self) -> list[protocol.LeaseEvent]:
        """The events of the pages so far, oldest first."""
        return [event for page in reversed(self._pages) for event in page]


#: Why the connection is closed when the daemon ended it after the handshake (the leases lost
#: with it say so too).
EOF_REASON: Final = "the daemon closed the connection"


def went_away(reason: str) -> errors.DaemonUnavailable:
    """The error for a connection that lockd ended, or that broke under it, for `reason`.

    Its advice reads right both to a program using this library and to a lockctl user.
    """
    return errors.DaemonUnavailable(f"{reason}; is lockd still running? If it is, its log says why")


def cannot_connect(socket_path: str, exc: OSError) -> errors.DaemonUnavailable:
    """The error for a socket that cannot be connected to, for a reason other than a full
    queue (that is DaemonBusy: lockd is there). Only a missing socket, or one nobody listens
    on, suggests that lockd is not running."""
    problem = f"cannot connect to lockd at {socket_path}: {exc.strerror or exc}"
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        advice = f"is lockd running? start it with `lockd`, or set {paths.SOCKET_ENV} to its socket"
    elif isinstance(exc, PermissionError):
        advice = (
            "this user may not use that socket: ask for access "
            "(the system service admits root and the lockd group)"
        )
    else:
        return errors.DaemonUnavailable(problem)
    return errors.DaemonUnavailable(f"{problem}; {advice}")


class Connection:
    """The client side of one lockd connection. See the module docstring."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = protocol.reply_decoder()
        self._buffer = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
        #: The largest request the daemon takes; its Welcome says, and older daemons take this.
        self._max_frame = protocol.MAX_REQUEST_FRAME
        #: The clients ask `phase is CLOSED` after every read, not `closed`: a call fewer.
        self.phase = NEW
        #: The daemon's Welcome, once received.
        self.server: protocol.Welcome | None = None
        #: Why the connection is CLOSED, once it is.
        self.close_reason: str | None = None
        self._greeting: Call[protocol.Welcome] | None = None
        #: Request id → its call. Calls of every kind share it, so it cannot say each one's
        #: value type; `_send_request` does, and `_handle` resolves a call only with the reply
        #: its request gets.
        self._calls: dict[int, Call[Any]] = {}
        self._leases: dict[int, LeaseRecord] = {}
        #: Request id → a subscription the daemon may still send events for.
        self._subscriptions: dict[int, Subscription] = {}
        #: Requests to go out with the next write (`take_unsent`): Releases of subscriptions
        #: this client dropped while reading.
        self._unsent = bytearray()
        #: Whether `take_unsent` has something to write. An attribute kept with `_unsent`, not
        #: a property: the clients ask before every request they write, and a property costs
        #: a call each time.
        self.has_unsent = False
        self._next_id = 1
        #: Descriptors received and not yet claimed by their Granted.
        self._unclaimed_fds: deque[int] = deque()
        #: Descriptors nobody will use, for the caller to close: `stray_fds` hands them over.
        #: Read-only outside Connection: the clients test it, and `stray_fds` takes them.
        self.stray: list[int] = []
        #: Lease id → every lease record made here that still has descriptors (lost and
        #: released ones too, until the caller lets go of them).
        self._holding: dict[int, LeaseRecord] = {}
        #: Whether leases tied to a process (`pid=`) keep their descriptors. By default they
        #: do not: this client does not live as long as that process, and its copies would
        #: hold the lock after it; the daemon's copy and its watch on the process keep the
        #: lease. lockctl's keeper, which lives exactly as long as that process, keeps them.
        self.keep_tied_descriptors = False

    @property
    def closed(self) -> bool:
        return self.phase is CLOSED

    # --- client moves -------------------------------------------------------------------------

    def hello(self, label: str | None = None) -> tuple[Call[protocol.Welcome], bytes]:
        """Start the handshake; the Call resolves with the daemon's Welcome."""
        if self.phase is not NEW:
            raise errors.LocalProtocolError("the handshake was already started on this connection")
        _check_label(label)
        hello = protocol.Hello(protocol.PROTOCOL_VERSION, label)
        data = self._encode(hello)
        self.phase = GREETING
        self._greeting = Call(None, hello)
        return self._greeting, data

    def acquire(
        self,
        names: Iterable[str],
        *,
        shared: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        label: str | None = None,
        pid: int | None = None,
        slots: int | Mapping[str, int] | None = None,
    ) -> tuple[Call[LeaseRecord], bytes]:
        """Ask for every name together; the Call resolves with the lease, or fails.

        `wait=False` fails with LockBusy at once if any name is held, whatever `timeout`
        says; otherwise `timeout` (seconds) bounds the wait and then fails with LockTimeout.
        `slots` makes every name (an int) or the names it maps (to their counts) counting
        semaphores, of which the lease takes one slot each. Duplicate names count once.
        """
        unique = list(dict.fromkeys(names))
        if (problem := protocol.names_problem(unique)) is not None:
            raise errors.InvalidName(problem)
        if label is not None:
            _check_label(label)
        semaphores = _checked_slots(slots, unique, shared) if slots is not None else {}
        if not wait:
            timeout = 0  # not waiting wins over any timeout, as -n over -w in flock(1)
        if self.phase is not OPEN:
            self._check_open()
        if semaphores:
            self._require(protocol.Feature.SEMAPHORES, "does not serve semaphores (slots); upgrade it")
        mode: protocol.Mode = "shared" if shared else "exclusive"
        return self._send_request(protocol.Acquire(self._next_id, unique, mode, timeout, label, pid, semaphores))

    def status(self, names: Iterable[str] = ()) -> tuple[Call[list[protocol.LockInfo]], bytes]:
        """Ask who holds and awaits `names` (every lock in use when empty)."""
        checked = list(names)
        if checked:
            _checked_names(checked)
        self._check_open()
        return self._send_request(protocol.Status(self._next_id, checked))

    def metrics(self) -> tuple[Call[str], bytes]:
        """Ask for the daemon's metrics; resolves with them in the Prometheus text format."""
        self._check_open()
        self._require(protocol.Feature.METRICS, "does not serve metrics; upgrade it")
        return self._send_request(protocol.Metrics(self._next_id))

    def reexec(self) -> tuple[Call[protocol.Reexecuted], bytes]:
        """Ask the daemon to re-execute itself in place; resolves with the `Reexecuted` its new
        program sends, on this same connection, once it has taken over."""
        self._check_open()
        self._require(
            protocol.Feature.REEXEC,
            "cannot re-execute itself in place: it is older than this client; restart it instead",
        )
        return self._send_request(protocol.Reexec(self._next_id))

    def history(self, names: Iterable[str], since: float | None, until: float | None, limit: int) -> HistoryQuery:
        """A query for the latest `limit` recorded events on `names` (every name when empty)
        from `since` to `until` (Unix times; None: no bound), to read page by page."""
        checked = list(names)
        if checked:
            _checked_names(checked)
        for bound, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise errors.InvalidArgument(f"{bound} must be a finite Unix time, not {value}")
        if since is not None and until is not None and since > until:
            raise errors.InvalidArgument(f"since ({since}) is after until ({until}): nothing could match")
        if type(limit) is not int or limit < 1:
            raise errors.InvalidArgument(f"limit must be a whole number of events, 1 or more, not {limit!r}")
        self._check_open()
        self._require(
            protocol.Feature.HISTORY,
            "keeps no history: it is older than this client, or its config turns the history off ([history] enabled)",
        )
        return HistoryQuery(self, protocol.History(0, checked, since, until), limit)  # numbered when sent

    def release_pid(self, pid: int, names: Iterable[str]) -> tuple[Call[int], bytes]:
        """End the leases tied to process `pid` on `names`; resolves with how many ended."""
        checked = _checked_names(names)
        self._check_open()
        return self._send_request(protocol.ReleasePid(self._next_id, pid, checked))

    def force_release(self, name: str) -> tuple[Call[int], bytes]:
        """Break every lease on `name`; resolves with how many were broken."""
        _checked_names([name])
        self._check_open()
        return self._send_request(protocol.ForceRelease(self._next_id, name))

    def subscribe(self, names: Iterable[str] = ()) -> tuple[Subscription, bytes]:
        """Ask for the lease events on `names` (every lock when empty) that this user may
        read, as they happen; the subscription starts with the daemon's Done, and lasts until
        `unsubscribe`, its Error, or the connection's end."""
        unique = list(dict.fromkeys(names))
        if unique:
            _checked_names(unique)
        self._check_open()
        self._require(protocol.Feature.EVENTS, "does not send lease events; upgrade it")
        data = self._encode(protocol.Subscribe(self._next_id, unique))
        subscription = Subscription(self._next_id, tuple(unique))
        self._subscriptions[subscription.id] = subscription
        self._next_id += 1
        return subscription, data

    def unsubscribe(self, subscription: Subscription) -> bytes:
        """End `subscription` (its unread events stay readable); returns the Release to send,
        b"" when the daemon sends it nothing more anyway. Idempotent."""
        subscription._end(None)
        if not subscription._subscribed:
            return b""
        if self._subscriptions.get(subscription.id) is not subscription:
            raise errors.LocalProtocolError(f"{subscription!r} belongs to another connection")
        subscription._subscribed = False
        del self._subscriptions[subscription.id]
        return self._encode(protocol.Release(subscription.id))

    def release(self, lease: LeaseRecord, exit_status: int | None = None) -> bytes:
        """End `lease`; the caller then lets go of its descriptors (`lease.fds`). Returns the
        Release to send, or b"" when there is nothing to tell the daemon. `exit_status`: that
        of the work the lease protected, for the daemon's history.

        A lost lease is acknowledged the same way, once: the daemon holds a lease broken by
        force until its holder says it let go, which then frees the lock at once.
        """
        state, id = lease.state, lease.id
        if state is HELD:
            if self._leases.get(id) is not lease:
                raise errors.LocalProtocolError(f"{lease!r} belongs to another connection")
            data = b"" if lease.detached else self._encode(protocol.Release(id, exit_status))
            del self._leases[id]
            lease.state = RELEASED
            return data
        if state is LOST and not lease.acknowledged and self.phase is OPEN:
            lease.acknowledged = True
            return self._encode(protocol.Release(id))
        return b""

    def let_go(self, lease: LeaseRecord) -> list[int]:
        """Take `lease`'s descriptors, for the caller to close (and unlock, when the lease is
        `detached`: no daemon will). Idempotent: [] the second time."""
        fds, lease.fds = lease.fds, []
        self._holding.pop(lease.id, None)
        return fds

    def stray_fds(self) -> list[int]:
        """Take the descriptors received that no lease claims (a grant that came after its
        request was withdrawn, or left over when the connection closed): close them."""
        if self.closed and self._unclaimed_fds:
            self.stray += self._unclaimed_fds
            self._unclaimed_fds.clear()
        if not self.stray:
            return []
        stray, self.stray = self.stray, []
        return stray

    def withdraw(self, call: Call[T]) -> bytes:
        """Stop waiting for `call`: its reply, when it comes, is ignored.

        A waiting acquire is withdrawn from the daemon's queue; one already granted is
        released. Returns the bytes to send (b"" when there is nothing to undo).
        """
        if call.done:
            if isinstance(call._value, LeaseRecord):
                # Released: the daemon unlocks on reading it; this client's copies only close.
                lease = call._value
                data = self.release(lease)
                self.stray += self.let_go(lease)
                return data
            return b""
        if call is self._greeting:
            self.close()  # a connection without its handshake is of no use
            return b""
        id = call.id
        if id is None or self._calls.get(id) is not call:
            raise errors.LocalProtocolError(f"{call!r} belongs to another connection")
        if isinstance(call.request, protocol.Acquire):
            data = self._encode(protocol.Release(id))
        else:
            data = b""
        del self._calls[id]
        call._fail(errors.LockdError(f"request {call.id} was withdrawn"))
        return data

    def abandon(self, reason: str) -> list[int]:
        """This process lets go of everything at once, telling the daemon nothing (a child
        forked from the process using the connection; a client collected unclosed): its
        leases are lost to it for `reason`, and the connection is closed. Returns every
        descriptor it has, to close without unlocking (other copies may be at work)."""
        fds = self.stray_fds()
        for record in list(self._holding.values()):
            fds += self.let_go(record)
            if record.state is HELD:
                record.state = LOST
                record.lost_reason = reason
        self._leases.clear()
        if not self.closed:
            self._shut(reason, lambda: errors.DaemonUnavailable(f"{reason}: connect anew"))
        return fds + self.stray_fds()

    def close(self) -> list[LeaseRecord]:
        """The client closes the connection: its leases (detached ones too) end as released,
        not lost, and its subscriptions as if released. Returns every lease that still has
        descriptors, lost ones included: the caller lets go of them."""
        for lease in self._leases.values():
            lease.state = RELEASED
        self._leases.clear()
        for subscription in self._subscriptions.values():
            subscription._subscribed = False
            subscription._end(None)
        self._subscriptions.clear()
        ended = list(self._holding.values())
        if not self.closed:
            reason = "the connection was closed by this client"
            self._shut(reason, lambda: errors.DaemonUnavailable(reason))
        return ended

    def abort(self, reason: str) -> str:
        """The transport failed (`reason` says how): leases are lost, requests fail. Returns
        why the connection is closed: `reason`, unless it was closed already."""
        if self.closed and self.close_reason is not None:
            return self.close_reason
        self._lose_all(reason, lambda: went_away(reason))
        return reason

    # --- daemon moves -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        """Apply bytes read from the socket, and the descriptors that came with them (they
        are the connection's from now on); b"" means the daemon closed it.

        A protocol violation (garbage, an oversized frame, a reply that cannot be) closes the
        connection: its leases are lost with a reason naming the violation, and its requests
        fail with RemoteProtocolError; the caller should then hang up, so the daemon ends the
        leases too. Data arriving after the connection closed is discarded.
        """
        if self.phase is CLOSED:
            self.stray.extend(fds)
            return
        if fds:
            self._unclaimed_fds.extend(fds)
        if not data:
            if self.phase is GREETING:
                reason = "lockd closed the connection during the handshake"
            else:
                reason = EOF_REASON
            self._lose_all(reason, lambda: went_away(reason))
            return
        bodies, too_large = self._buffer.frames(data)
        unapplied = iter(bodies)
        try:
            for body in unapplied:
                message = self._decoder.decode(body)
                # A grant, the reply that matters most, without a stop in `_handle`. A call
                # exists only for a request sent once the connection was open.
                if type(message) is protocol.Granted:
                    call = self._calls.get(message.id)
                    if call is not None and type(call.request) is protocol.Acquire:
                        self._grant(call, call.request, message)
                        continue
                self._handle(message)
                if self.phase is CLOSED:
                    return
            if too_large is not None:
                raise too_large
        except (protocol.FrameTooLarge, msgspec.DecodeError, _Violation) as exc:
            reason = f"lockd broke the protocol ({exc})"
            self._lose_all(
                reason,
                lambda: errors.RemoteProtocolError(
                    f"{reason}; the connection is closed: check that lockd and this client are "
                    "the same version (lockd's log may say more)"
                ),
            )
        except BaseException:
            # Interrupted between frames (KeyboardInterrupt in the blocking client): the frames
            # after this one are applied by the next call, in order. Lost, a grant's descriptors
            # would be taken by the grants after it.
            self._buffer.put_back(list(unapplied))
            raise

    def take_unsent(self) -> bytes:
        """What this connection decided to send on its own while reading (the Release of a
        subscription it dropped): the clients write it before their next request's bytes,
        whose order it keeps. b"" once closed."""
        if not self._unsent:
            return b""
        data = b"" if self.closed else bytes(self._unsent)
        self._unsent.clear()
        self.has_unsent = False
        return data

    # --- internals ----------------------------------------------------------------------------

    def _require(self, feature: str, missing: str) -> None:
        """Raise ProtocolError unless the daemon serves `feature` ("this lockd ... `missing`")."""
        if self.server is not None and feature not in self.server.features:
            raise errors.ProtocolError(f"this lockd ({self.server.server}) {missing}")

    def _encode(self, message: protocol.Request) -> bytes:
        body = self._encoder.encode(message)
        size = len(body)
        if size > self._max_frame:
            raise errors.LimitExceeded(
                f"a request of {size} bytes exceeds this lockd's limit of {self._max_frame} "
                "bytes; name fewer locks in one request"
            )
        return protocol.pack_prefix(size) + body

    def _check_open(self) -> None:
        if self.phase is not OPEN:
            if self.closed:
                raise errors.DaemonUnavailable(
                    f"this connection to lockd is closed ({self.close_reason}); "
                    "make a new one to send more requests"
                )
            raise errors.LocalProtocolError("no request may be sent before lockd's Welcome")

    # What each request resolves with, as `_handle` resolves it.
    @overload
    def _send_request(self, request: protocol.Acquire) -> tuple[Call[LeaseRecord], bytes]: ...
    @overload
    def _send_request(self, request: protocol.Status) -> tuple[Call[list[protocol.LockInfo]], bytes]: ...
    @overload
    def _send_request(self, request: protocol.ReleasePid | protocol.ForceRelease) -> tuple[Call[int], bytes]: ...
    @overload
    def _send_request(self, request: protocol.Metrics) -> tuple[Call[str], bytes]: ...
    @overload
    def _send_request(self, request: protocol.History) -> tuple[Call[protocol.HistoryReply], bytes]: ...
    @overload
    def _send_request(self, request: protocol.Reexec) -> tuple[Call[protocol.Reexecuted], bytes]: ...

    def _send_request(self, request: NumberedRequest) -> tuple[Call[Any], bytes]:
        """Encode `request` (numbered `_next_id` by the caller) and await its reply."""
        data = self._encode(request)
        call: Call[Any] = Call(request.id, request)
        self._calls[request.id] = call
        self._next_id += 1
        return call, data

    def _handle(self, message: protocol.Reply) -> None:
        # This runs for every reply but the grant of a pending acquire (`receive_data`
        # hands those to `_grant`): the common cases are tested first, and by exact type,
        # because isinstance on msgspec Structs costs several times as much.
        if self.phase is not OPEN:
            self._handle_greeting(message)
            return
        if type(message) is protocol.Welcome:
            raise _Violation("a second welcome")
        if type(message) is protocol.Error and message.id is None:
            self._lose_all(message.message, lambda: errors.from_reply(message))
            return
        id = message.id
        if id is None or not 0 < id < self._next_id:
            raise _Violation(f"{_tag(message)} for request {id}, which was never sent")
        if type(message) is protocol.Lost:
            self._handle_lost(message)
            return
        call = self._calls.get(id)
        if call is None:
            subscription = self._subscriptions.get(id)
            if subscription is not None:
                self._handle_subscription(subscription, message)
                return
            if id in self._leases:
                raise _Violation(f"{_tag(message)} for request {id}, already granted")
            if type(message) is protocol.Granted:
                self.stray += self._claim_fds(message.descriptors)
            return  # in flight when the client withdrew or released it: stale, not wrong
        request = call.request
        if type(message) is protocol.Queued:
            if type(request) is not protocol.Acquire:
                raise _Violation(f"queued for {_tag(request)} request {id}")
            call.queued.append(message.holders)
            return
        if type(message) is protocol.Error:
            del self._calls[id]
            call._fail(errors.from_reply(message))
            return
        # Otherwise the reply must be the one kind its request gets.
        if type(message) is protocol.StatusReply and type(request) is protocol.Status:
            del self._calls[id]
            call._resolve(message.locks)
        elif type(message) is protocol.Done and type(request) in (protocol.ReleasePid, protocol.ForceRelease):
            del self._calls[id]
            call._resolve(message.released)
        elif type(message) is protocol.MetricsReply and type(request) is protocol.Metrics:
            del self._calls[id]
            call._resolve(message.text)
        elif type(message) is protocol.HistoryReply and type(request) is protocol.History:
            del self._calls[id]
            call._resolve(message)
        elif type(message) is protocol.Reexecuted and type(request) is protocol.Reexec:
            del self._calls[id]
            call._resolve(message)
        else:
            raise _Violation(f"{_tag(message)} in reply to {_tag(request)} request {id}")

    def _grant(self, call: Call[LeaseRecord], request: protocol.Acquire, message: protocol.Granted) -> None:
        names = request.names
        count = message.descriptors
        # One per name, then one per slot of a semaphore (its slot file).
        if len(message.tokens) != len(names) or (count and count != len(names) + len(request.slots)):
            raise _Violation(f"{len(message.tokens)} tokens and {count} descriptors for {len(names)} names")
        unclaimed = self._unclaimed_fds
        # Before the call is gone: claiming may fail.
        fds = [unclaimed.popleft()] if count == 1 and unclaimed else self._claim_fds(count)
        id = request.id
        del self._calls[id]
        if request.pid is not None and not self.keep_tied_descriptors:
            self.stray += fds
            fds = []
        lease = LeaseRecord(id, tuple(names), message.tokens, fds, request.pid)
        if fds:
            self._holding[id] = lease
        self._leases[id] = lease
        call._resolve(lease)

    def _handle_subscription(self, subscription: Subscription, message: protocol.Reply) -> None:
        if type(message) is protocol.Event and subscription.started:
            if len(subscription.events) >= MAX_UNREAD_EVENTS:
                subscription._end(errors.SubscriptionDropped(
                    f"{MAX_UNREAD_EVENTS} lease events came that were not read: the subscription "
                    "ended; subscribe again, and read the events as they come"
                ))
                # The daemon is told with the next write, whoever makes it.
                subscription._subscribed = False
                del self._subscriptions[subscription.id]
                self._unsent += self._encode(protocol.Release(subscription.id))
                self.has_unsent = True
                return
            subscription.events.append(message.event)
        elif type(message) is protocol.Done and not subscription.started:
            subscription.started = True
        elif type(message) is protocol.Error:
            # The daemon refused it or dropped it: it sends nothing more for it.
            subscription._subscribed = False
            del self._subscriptions[subscription.id]
            if subscription.started and message.code == protocol.ErrorCode.LIMIT:
                subscription._end(errors.SubscriptionDropped(message.message))
            else:
                subscription._end(errors.from_reply(message))
        else:
            state = "started" if subscription.started else "not yet started"
            raise _Violation(f"{_tag(message)} for subscription {subscription.id}, {state}")

    def _handle_greeting(self, message: protocol.Reply) -> None:
        if self._greeting is None:
            raise _Violation(f"{_tag(message)} before Hello")
        if isinstance(message, protocol.Welcome):
            self.phase = OPEN
            self.server = message
            self._max_frame = message.max_frame
            self._greeting._resolve(message)
        elif isinstance(message, protocol.Error) and message.id is None:
            self._lose_all(message.message, lambda: errors.from_reply(message))
        else:
            raise _Violation(f"{_tag(message)} instead of welcome")

    def _handle_lost(self, message: protocol.Lost) -> None:
        if message.id in self._calls:
            raise _Violation(f"lost for request {message.id}, which was never granted")
        lease = self._leases.pop(message.id, None)
        if lease is not None:  # else released before the notice arrived
            lease.state = LOST
            lease.lost_reason = message.reason

    def _claim_fds(self, count: int) -> list[int]:
        unclaimed = self._unclaimed_fds
        if count > len(unclaimed):
            raise _Violation(f"a grant with {count} descriptors, of which {len(unclaimed)} came")
        if count == 1:
            return [unclaimed.popleft()]
        return [unclaimed.popleft() for _ in range(count)]

    def _lose_all(self, reason: str, error: Callable[[], errors.LockdError]) -> None:
        outlive = self.server is not None and self.server.leases_outlive_daemon
        for id, lease in list(self._leases.items()):
            if outlive and lease.fds:
                lease.detached = True
            else:
                lease.state = LOST
                lease.lost_reason = reason
                del self._leases[id]
        self._shut(reason, error)

    def _shut(self, reason: str, error: Callable[[], errors.LockdError]) -> None:
        # Each waiter raises its own instance: one exception raised in several places would
        # pile their tracebacks onto each other.
        self.phase = CLOSED
        self.close_reason = reason
        pending = [*self._calls.values(), *([self._greeting] if self._greeting else [])]
        self._calls.clear()
        for call in pending:
            if not call.done:
                call._fail(error())
        for subscription in self._subscriptions.values():
            subscription._subscribed = False
            subscription._end(error())
        self._subscriptions.clear()


class _Violation(Exception):
    """The daemon sent something the protocol rules out. Never leaves this module."""


def _tag(message: msgspec.Struct) -> str:
    return str(message.__struct_config__.tag)


def check_exit_status(exit_status: int | None) -> None:
    """Raise InvalidArgument unless `exit_status` is one `Release` can carry: None, or 0 to 255."""
    if exit_status is not None and (type(exit_status) is not int or not 0 <= exit_status <= 255):
        raise errors.InvalidArgument(
            f"exit_status must be a process's exit status, 0 to 255 (128+N for a death by signal N), or None, "
            f"not {exit_status!r}"
        )


def _check_label(label: str | None) -> None:
    problem = protocol.label_problem(label)
    if problem is not None:
        raise errors.InvalidArgument(problem)


def _checked_slots(slots: int | Mapping[str, int], names: list[str], shared: bool) -> dict[str, int]:
    """`slots` as `Acquire.slots` has it: every semaphore name of `names` with its count."""
    counts = dict(slots) if isinstance(slots, Mapping) else dict.fromkeys(names, slots)
    problem = protocol.slots_problem(names, counts)
    if problem is not None:
        raise errors.InvalidArgument(problem)
    if shared and len(counts) == len(names):
        raise errors.InvalidArgument(
            "shared applies to the names that are locks, and every name here is a semaphore: a slot has no "
            "mode; leave shared out"
        )
    return counts


def _checked_names(names: Iterable[str]) -> list[str]:
    checked = list(names)
    problem = protocol.names_problem(checked)
    if problem is not None:
        raise errors.InvalidName(problem)
    return checked

