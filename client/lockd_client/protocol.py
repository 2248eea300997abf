"""The lockd wire protocol: the one definition both the daemon and every client use.

Invariant: every byte on a lockd socket is a frame — a 4-byte big-endian length followed by
that many bytes of one msgpack-encoded message defined here — and a frame whose announced
length exceeds the receiver's limit is rejected before any of its body is buffered.

Conversation (see docs/protocol.md):
  1. The client sends `Hello`; the daemon answers `Welcome`, or `Error(code="version")` and closes.
  2. The client sends requests, each with an `id` it chooses (unique among its pending requests).
     Every request but `Release` gets exactly one reply carrying its id. `Release` gets none,
     so a release can be pipelined with the next request; the daemon handles one connection's
     requests in the order sent.
  3. The daemon may push `Queued` (a request is waiting, and for whom) and `Lost` (a held lease
     ended without the client asking) at any time.

Tags are explicit strings, so renaming a class never changes the wire. New fields are added
with defaults only, so older peers keep decoding newer messages. No message class is
subclassed (each is `final`): a message's exact type says what it is, which is how both
ends dispatch on it, fast, and how a type checker follows them.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, Final, Literal, Union, final

import msgspec

# The codes of `Error` and the framing's error belong to the one exception tree; they are part
# of the wire all the same, so this module offers them too (the `as` says: re-exported).
from .errors import ErrorCode as ErrorCode
from .errors import FrameTooLarge as FrameTooLarge

#: The version `Hello` says this side speaks; a daemon refuses any other (`version`). Changed
#: only for a change older peers could not decode: new fields come with defaults instead.
PROTOCOL_VERSION: Final = 1

#: A request frame larger than this is refused by the daemon without reading its body:
#: 64 KiB holds an acquire of ~250 maximal names, far beyond any real use.
MAX_REQUEST_FRAME: Final = 64 * 1024
#: Replies can be large (`status` of a host with 100k leases), but a client still refuses a
#: frame no sane daemon would send rather than allocate whatever a corrupted prefix says.
MAX_REPLY_FRAME: Final = 256 * 1024 * 1024

#: A frame's length prefix: 4 bytes, unsigned, big-endian (docs/protocol.md).
_PREFIX: Final = struct.Struct(">I")
PREFIX_SIZE: Final = _PREFIX.size
#: The prefix of a body of N bytes: `pack_prefix(N)`.
pack_prefix: Final = _PREFIX.pack

Mode = Literal["exclusive", "shared"]


class Feature:
    """Values of `Welcome.features`. Wire values: never changed, only added to."""

    #: `Acquire.slots`: counting semaphores.
    SEMAPHORES: Final = "semaphores"
    #: `History`: the lease events the daemon recorded.
    HISTORY: Final = "history"
    #: `Subscribe`: lease events as they happen.
    EVENTS: Final = "events"
    #: `Metrics`: the daemon's metrics in the Prometheus text format.
    METRICS: Final = "metrics"
    #: `Reexec`: the daemon re-executes itself in place, keeping every lease and connection.
    REEXEC: Final = "reexec"


# Name N is stored as the file `N.lock`, which must fit a 255-byte file name; the leading
# letter or digit keeps out `.`/`..`, hidden files and option-like names.
MAX_NAME_LENGTH: Final = 250
NAME_RULE: Final = (
    f"a lock name is 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ @ + -, "
    "starting with a letter or digit (so it is a plain file name in the lock directory)"
)
_NAME_RE: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@+-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)


#: The most slots a semaphore may have: a semaphore bounds concurrent work (backups, builds,
#: migrations), and the table's FIFO checks scan up to N queue entries.
MAX_SLOTS: Final = 1000
Slots = Annotated[int, msgspec.Meta(ge=1, le=MAX_SLOTS)]


def name_problem(name: str) -> str | None:
    """Return why `name` is not a valid lock name, or None when it is."""
    if not isinstance(name, str):
        return f"a lock name must be a str, not {type(name).__name__}"
    if _NAME_RE.fullmatch(name):
        return None
    return f"invalid lock name {name!r}: {NAME_RULE}"


def names_problem(names: list[str]) -> str | None:
    """Return why `names` cannot be the names of an acquire, release_pid or force_release
    (none given, or one invalid), or None when they can."""
    if not names:
        return "no lock name given: a request must name at least one lock"
    fullmatch = _NAME_RE.fullmatch
    for name in names:
        # Checked on every request: the valid case without a call per name.
        if type(name) is not str or not fullmatch(name):
            problem = name_problem(name)
            if problem is not None:
                return problem
    return None


def slots_problem(names: list[str], slots: dict[str, int]) -> str | None:
    """Return why `slots` cannot be the semaphores of an acquire of `names` (a count out of
    range, or a name the acquire does not name), or None when they can."""
    for name, count in slots.items():
        if name not in names:
            return f"slots are given for {name}, which the request does not name"
        if type(count) is not int or not 1 <= count <= MAX_SLOTS:
            return f"the slots of {name} must be a whole number from 1 to {MAX_SLOTS}, not {count!r}"
    return None


#: Labels are a line of text for `status`; the cap keeps what one client makes every reader of
#: `status` receive small. A longer label fails decoding, which is a protocol violation.
MAX_LABEL_LENGTH: Final = 256
Label = Annotated[str, msgspec.Meta(max_length=MAX_LABEL_LENGTH)]


def label_problem(label: str | None) -> str | None:
    """Return why `label` cannot be sent, or None when it can."""
    if label is not None and len(label) > MAX_LABEL_LENGTH:
        return (
            f"a label is at most {MAX_LABEL_LENGTH} characters, and this one has {len(label)}; "
            "shorten it"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Client → daemon


@final
class Hello(msgspec.Struct, tag="hello"):
    version: int
    #: Free text shown in `status` next to every lease of this connection.
    label: Label | None = None


@final
class Acquire(msgspec.Struct, tag="acquire"):
    id: int
    #: All granted together or none; order does not matter.
    names: list[str]
    mode: Mode = "exclusive"
    #: None waits as long as it takes; 0 fails at once with `busy`; otherwise seconds.
    timeout: float | None = None
    #: Shown in `status` for this lease instead of the connection's label.
    label: Label | None = None
    #: Tie the lease to this process instead of the connection: it ends when that process
    #: exits or on `ReleasePid`. Only for the process's own uid (or root).
    pid: int | None = None
    #: The names (among `names`) that are counting semaphores, each with its number of slots:
    #: the request takes one slot of each, and `mode` applies to the other names only. Every
    #: request on a name must agree with its holders and waiters on this (`slots_mismatch`).
    #: Only for a daemon whose Welcome lists the feature `semaphores`.
    slots: dict[str, Slots] = {}


#: A process's exit status, as a shell reports it: 0 to 255.
ExitStatus = Annotated[int, msgspec.Meta(ge=0, le=255)]


@final
class Release(msgspec.Struct, tag="release"):
    """End the lease (or withdraw the waiting request, or end the subscription) made by
    request `id`. No reply."""

    id: int
    #: The exit status of the work the lease protected (lockctl's CMD), for the history:
    #: 128+N for a death by signal N; None when there was no such work or it is unknown.
    exit_status: ExitStatus | None = None


@final
class ReleasePid(msgspec.Struct, tag="release_pid"):
    """End the process-tied leases that process `pid` holds on `names`."""

    id: int
    pid: int
    names: list[str]


@final
class ForceRelease(msgspec.Struct, tag="force_release"):
    """Break every lease on `name`, whoever holds it; the holders see them lost."""

    id: int
    name: str


@final
class Status(msgspec.Struct, tag="status"):
    id: int
    #: Empty: every lock that is held or waited on.
    names: list[str] = []


#: The most events one `History` request may ask for.
MAX_HISTORY_LIMIT: Final = 100_000

#: Where a history reply stopped: the time and the daemon's number of the oldest event it
#: holds. Only ever passed back (`History.before`), never made up.
HistoryCursor = tuple[float, Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]]


@final
class History(msgspec.Struct, tag="history"):
    """The recorded lease events on `names` (every name when empty) from `since` to `until`
    (Unix times; None: no bound), at most the latest `limit`, oldest first. Each user
    sees the events the daemon's policy lets them read. Answered by `HistoryReply`, which
    may hold fewer (it is cut at about 1 MiB): its `more` is then the `before` of the
    request for the next, earlier page."""

    id: int
    names: list[str] = []
    since: float | None = None
    until: float | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY_LIMIT)] = 1000
    #: Only the events before this cursor (a `HistoryReply.more`): the next page.
    before: HistoryCursor | None = None


@final
class Subscribe(msgspec.Struct, tag="subscribe"):
    """Send every lease event on `names` (every name when empty) that this user may read,
    as it happens (`Event`), until `Release(id)`. Answered by `Done` once subscribed. A
    subscriber that does not read its events fast enough is dropped: an `Error` with the
    subscription's id (code `limit`) is its last message."""

    id: int
    names: list[str] = []


@final
class Metrics(msgspec.Struct, tag="metrics"):
    """The daemon's metrics, in the Prometheus text exposition format (`MetricsReply`)."""

    id: int


@final
class Reexec(msgspec.Struct, tag="reexec"):
    """Have the daemon re-execute its own command line in place (an upgrade): same pid, every
    lease, queue and connection kept. Answered by `Reexecuted` from the new program, or an
    `Error` from the old one saying why it did not (it then serves on as before). Only for
    root and the daemon's own user."""

    id: int


Request = Union[Hello, Acquire, Release, ReleasePid, ForceRelease, Status, History, Subscribe, Metrics, Reexec]


# ---------------------------------------------------------------------------------------------
# Daemon → client


@final
class Holder(msgspec.Struct, omit_defaults=True):
    """A party holding or awaiting a lock. Identity comes from SO_PEERCRED and /proc."""

    pid: int | None
    uid: int | None
    gid: int | None = None
    command: str = ""
    label: str | None = None
    #: Unix time the lease was granted (holders) or requested (waiters).
    since: float = 0.0
    mode: Mode = "exclusive"
    token: int | None = None
    #: True for a process holding the lock file's flock directly, outside lockd.
    outside: bool = False
    #: The host the party is on, when that is another host (the etcd backend); None: this one.
    host: str | None = None


@final
class LockInfo(msgspec.Struct):
    name: str
    #: The holders' mode; None when only waiters are present.
    mode: Mode | None
    holders: list[Holder]
    #: In queue order.
    waiters: list[Holder]
    #: The number of slots of a semaphore (its holders are shown as `shared`); None for a lock.
    slots: int | None = None


@final
class Welcome(msgspec.Struct, tag="welcome"):
    version: int
    server: str
    backend: str
    #: The largest request frame this daemon accepts (its `limits.max_frame`); a larger one
    #: closes the connection, so clients check before sending.
    max_frame: int = MAX_REQUEST_FRAME
    #: True when a granted lease stays safe without the daemon: the lock-file descriptors
    #: sent with `Granted` keep it for as long as the client holds them, so a client that sees
    #: the daemon go keeps its leases and its work goes on. False: the daemon going away
    #: ends every lease (the etcd backend: other hosts may take the locks once it is gone).
    leases_outlive_daemon: bool = False
    #: Seconds a holder has to stop its work once told its lease is lost (or, when leases do
    #: not outlive the daemon, once the connection ends) before the lock may go to someone
    #: else; None when the daemon sets no bound.
    stop_within: float | None = None
    #: What this daemon serves beyond the first version of the protocol (`Feature`). A
    #: client checks before using one: an older daemon ignores a field it does not know
    #: (it would grant a plain lock for `Acquire.slots`) and closes the connection on a
    #: request it does not know.
    features: list[str] = []


#: The most descriptors one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
MAX_FDS_PER_MESSAGE: Final = 253


@final
class Granted(msgspec.Struct, tag="granted"):
    id: int
    #: Fencing tokens, one per distinct name in the order the request first named them:
    #: strictly increasing per name over every grant, across daemon restarts.
    tokens: list[int]
    #: How many lock-file descriptors (SCM_RIGHTS) come with this message, one per name in
    #: the same order, then one per name taken as a semaphore (its slot file, in the order
    #: of `Acquire.slots`), each a read-only descriptor whose flock is the lease's. They come
    #: no later than the message's first byte, in the order of the grants, possibly with an
    #: earlier message of any kind (253 to a byte at most), so a client that queues the
    #: descriptors it receives, in order, has them all by the time the message is complete.
    descriptors: int = 0


@final
class Queued(msgspec.Struct, tag="queued"):
    """Request `id` waits; `holders` are those it waits for at that moment."""

    id: int
    holders: list[Holder]


@final
class Lost(msgspec.Struct, tag="lost"):
    """The lease of Acquire `id` ended without the client asking."""

    id: int
    reason: str


@final
class Done(msgspec.Struct, tag="done"):
    id: int
    #: How many leases the request ended.
    released: int = 0


@final
class StatusReply(msgspec.Struct, tag="status_reply"):
    id: int
    locks: list[LockInfo]


@final
class Error(msgspec.Struct, tag="error"):
    #: None when the error is about the connection rather than one request.
    id: int | None
    code: str
    message: str
    #: For `busy`, `timeout` and `slots_mismatch`: who held the lock.
    holders: list[Holder] = []


EventKind = Literal["granted", "released", "lost", "broken", "refused"]


class Cause:
    """Values of `LeaseEvent.cause`: why a lease ended or broke, for programs (`reason` is for
    people). A `refused` event's cause is its error's code (ErrorCode), or `process_exited`
    or `internal`; a `granted` event has none.

    They are wire values: never changed, only added to; a client treats one it does not know
    as it would the event without a cause.
    """

    #: `released`: by its holder, on its connection.
    REQUESTED: Final = "requested"
    #: `released`: on behalf of its process, from another connection (`lockctl release`).
    RELEASED_BY_OTHER: Final = "released_by_other"
    #: `released`: its client went away without releasing it (the work it handed a lock-file
    #: descriptor may hold the lock on).
    CLIENT_GONE: Final = "client_gone"
    #: `released`: the process it was tied to exited; `refused`: exited before the grant.
    PROCESS_EXITED: Final = "process_exited"
    #: `broken`: a forced release (`reason` says by whom); `lost`: forced again while broken.
    FORCED: Final = "forced"
    #: `lost`: broken, and not let go within the grace.
    OVERDUE: Final = "overdue"
    #: `lost`: the backend could no longer vouch for it (an etcd session expired...);
    #: `refused`: the backend failed while taking it.
    BACKEND: Final = "backend"
    #: `lost` or `refused`: an internal error in lockd (logged).
    INTERNAL: Final = "internal"
    #: `lost` where the backend's leases do not outlive the daemon; else `released`: lockd
    #: stopped, and the holder's lock-file descriptors keep the lock until it lets go.
    DAEMON_STOPPED: Final = "daemon_stopped"
    #: `lost`: granted, but lockd had no descriptor left to send its lock-file descriptors
    #: with; its request got the `limit` error instead, and the lock was never held.
    LIMIT: Final = "limit"


@final
class LeaseEvent(msgspec.Struct):
    """Something that happened to a lease or a request, on one of its names.

    `granted`: the lease began. `released`: it ended as its holder asked, or its client went
    away without asking (`reason` says so; the work it handed a lock-file descriptor may hold
    the lock on). `lost`: it ended against its holder's wish (`reason`), or was granted but
    could not be handed over (cause `limit`). `broken`: a forced release broke it (`reason`
    says by whom); its end follows as `released` or `lost`. `refused`: a request failed
    (`reason`: busy, timeout, policy, limits, slots). `cause` says why, for programs
    (`Cause`).
    """

    #: Unix time.
    time: float
    event: EventKind
    name: str
    mode: Mode
    #: The semaphore's slots; None for a lock.
    slots: int | None = None
    #: The lease's fencing token on `name`; None for a refused request.
    token: int | None = None
    pid: int | None = None
    uid: int | None = None
    #: The user name of `uid`, where the daemon knows it.
    user: str | None = None
    command: str = ""
    label: str | None = None
    #: Seconds from the request to its grant (or refusal).
    waited: float | None = None
    #: Seconds from the grant to this event, for the events that end or break a lease.
    held: float | None = None
    reason: str | None = None
    #: On `released`: the exit status the client reported for the work (lockctl's CMD).
    exit_status: int | None = None
    #: Why it ended, broke or was refused (`Cause`); None on `granted`.
    cause: str | None = None


@final
class HistoryReply(msgspec.Struct, tag="history_reply"):
    id: int
    #: Oldest first.
    events: list[LeaseEvent]
    #: None: no earlier event matches the request. Else earlier ones do (the reply was cut
    #: at `limit` or at its size): ask again with this as `before` for them.
    more: HistoryCursor | None = None


@final
class Event(msgspec.Struct, tag="event"):
    """A lease event for the subscription `id` (`Subscribe`)."""

    id: int
    event: LeaseEvent


@final
class MetricsReply(msgspec.Struct, tag="metrics_reply"):
    id: int
    #: The Prometheus text exposition format, version 0.0.4.
    text: str


@final
class Reexecuted(msgspec.Struct, tag="reexecuted"):
    """The daemon re-executed itself for `Reexec(id)`: sent by the new program."""

    id: int
    #: The server strings (`Welcome.server`) of the program before and after.
    previous: str
    server: str
    #: Seconds between the old program's last request served and the new one's first.
    paused: float


Reply = Union[
    Welcome, Granted, Queued, Lost, Done, StatusReply, Error, HistoryReply, Event, MetricsReply, Reexecuted,
]


# ---------------------------------------------------------------------------------------------
# Framing


class FrameBuffer:
    """Reassembles frames from a byte stream. Pure: bytes in, frame bodies out.

    Two ways to use it, which agree (one parser serves both) and may be mixed:
    - `feed` any slicing of the stream, then `next_frame` returns each complete body once,
      as a view into the buffer that is valid until the next `feed`: decode it at once, or
      copy it. A length prefix over `limit` raises FrameTooLarge as soon as it is seen.
    - `frames(data)` takes one read and returns every complete body in it at once. When no
      partial frame was pending, as after nearly every read, `data` is not copied: the
      bodies are views into it, valid while the caller leaves it unchanged; otherwise they
      are views into the buffer, valid until the next `frames`. A caller that stops before
      applying them all gives the rest back with `put_back`, so the next call returns them
      first.
    """

    __slots__ = ("_buf", "_start", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        #: Where the bytes not yet returned as a frame begin.
        self._start = 0
        self._limit = limit

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        # Returned bodies are dropped here, once per feed rather than once per frame. A body
        # still referenced makes this raise BufferError rather than change under its holder.
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def next_frame(self) -> memoryview | None:
        """Return the next complete frame body, or None if none is complete."""
        bodies: list[memoryview] = []
        self._start, too_large = self._cut(memoryview(self._buf), self._start, bodies, 1)
        if too_large is not None:
            raise too_large
        return bodies[0] if bodies else None

    def frames(self, data: bytes | bytearray | memoryview) -> tuple[list[memoryview], FrameTooLarge | None]:
        """`data` fed, every complete frame body, in order, and the error to raise once they
        are applied: FrameTooLarge if a prefix over `limit` follows them (it stays pending,
        so every later call reports it again), else None. See the class docstring for how
        long the bodies are valid."""
        bodies: list[memoryview] = []
        if self._start < len(self._buf):
            self.feed(data)
            self._start, too_large = self._cut(memoryview(self._buf), self._start, bodies, -1)
            return bodies, too_large
        view = memoryview(data)
        end, too_large = self._cut(view, 0, bodies, -1)
        # Nothing pending: the bodies returned before are dropped, and only the rest kept.
        if self._start:
            del self._buf[:]
            self._start = 0
        if end < len(view):
            self._buf += view[end:]
        return bodies, too_large

    def put_back(self, bodies: list[memoryview]) -> None:
        """Keep `bodies`, the last of those `frames` returned, pending again in front of what
        is, for the next `frames` to return first: a caller interrupted while applying a
        read loses none of its frames."""
        if not bodies:
            return
        # A new buffer: the old one may be what `bodies` point into.
        restored = bytearray()
        for body in bodies:
            restored += _PREFIX.pack(len(body))
            restored += body
        restored += memoryview(self._buf)[self._start :]
        self._buf = restored
        self._start = 0

    def _cut(
        self, data: memoryview, start: int, bodies: list[memoryview], most: int
    ) -> tuple[int, FrameTooLarge | None]:
        """Append to `bodies` the complete frame bodies of `data` from `start`, at most `most`
        of them (-1: all), as views into it. Returns where the first frame not cut begins, and
        FrameTooLarge if cutting stopped at a prefix over `limit`."""
        total, limit = len(data), self._limit
        while most and total - start >= PREFIX_SIZE:
            (size,) = _PREFIX.unpack_from(data, start)
            if size > limit:
                return start, FrameTooLarge(size, limit)
            end = start + PREFIX_SIZE + size
            if end > total:
                break
            bodies.append(data[start + PREFIX_SIZE : end])
            start = end
            most -= 1
        return start, None

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._start

    def unread(self) -> bytes:
        """A copy of the bytes received but not yet returned as a frame."""
        return bytes(self._buf[self._start :])


def frame(encoder: msgspec.msgpack.Encoder, message: object) -> bytes:
    """`message` as one frame of its own. (For small messages this is faster than
    `encode_frame` into a new buffer: msgspec's `encode` beats `encode_into`.)"""
    body = encoder.encode(message)
    return _PREFIX.pack(len(body)) + body


def encode_frame(encoder: msgspec.msgpack.Encoder, message: object, out: bytearray) -> None:
    """Append `message` to `out` as one frame, encoding in place behind its length prefix."""
    start = len(out)
    out += b"\0\0\0\0"
    encoder.encode_into(message, out, start + PREFIX_SIZE)
    _PREFIX.pack_into(out, start, len(out) - start - PREFIX_SIZE)


# msgspec works out how to decode a struct type the first time a Decoder needs it, and
# publishes that before it is complete: a thread making a Decoder meanwhile can decode with
# it half done and crash (msgspec 0.22, GIL or not). So the reply decoder, which clients make
# in any thread, is made once, here, while importing holds every other thread off, and
# shared (msgspec's decoders are thread-safe). Requests are decoded by the daemon alone, in
# one thread: their decoder is made when asked for, which spares every client its cost.
_REPLY_DECODER: Final[msgspec.msgpack.Decoder[Reply]] = msgspec.msgpack.Decoder(Reply)


def request_decoder() -> msgspec.msgpack.Decoder[Request]:
    return msgspec.msgpack.Decoder(Request)


def reply_decoder() -> msgspec.msgpack.Decoder[Reply]:
    return _REPLY_DECODER
