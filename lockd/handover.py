"""What a daemon hands to the program it re-executes into (lockd.reexec): the state format.

Invariants:
- The state is complete: every live ticket (in arrival order, with its queue place, deadline,
  tokens and why it may end), every served connection with what it has not read and what it
  has not been sent, every process watch, the backend's holds, the lease events not yet in
  the history, the configuration as loaded, and the counters that must go on upward. What it
  does not hold is rebuilt from it (the census, the per-uid counts) or starts afresh by
  design (metrics counters, log summaries).
- Times are seconds relative to the moment of the handover, so neither program's clock
  offset matters; descriptors are numbers that stay open across the exec, each named once.
- A program never half-reads a state: one of a version it does not read, or with a field it
  does not know (every part forbids unknown fields), is refused before anything of it is
  used (`decode`), and the old daemon serves on.

How the format may change (tests/data/handover-schema.json pins it, with the backends' parts):
a new field gets a default, so a newer program reads an older state as it is; an older
program refuses a newer state (a downgrade), which is what its check mode is for. `VERSION`
changes only when a field's meaning does, and a program then reads the versions before its
own as long as they are in use, by a decoder per version. The configuration handed over is
the daemon's `Config`, which follows the same rule as the config file's keys.
"""

from __future__ import annotations

import os
from typing import Final, Literal

import msgspec
from lockd_client import protocol

from .config import Config, decode_hook, encode_hook

#: The state format's version. A program reads only its own.
VERSION: Final = 1
#: The environment variable that gives the re-executed program the descriptor (a memfd) its
#: state is in.
ENV: Final = "LOCKD_HANDOVER_FD"

TicketPhase = Literal["waiting", "taking", "held", "breaking"]


class Struct(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, array_like=True):
    """A part of the state: none of its fields unknown (a state the reading program does not
    fully understand is refused, not half-read). Encoded as arrays, not maps: a state holds a
    part per lease, and the pause of a re-exec grows with what each costs to write and read;
    a field is only ever added at the end, with a default."""


class ClaimState(Struct):
    """Who a ticket's claim is for, as backends and other hosts see it (lockd.backend.Requester)."""

    pid: int
    uid: int
    gid: int | None
    command: str
    label: str | None


class TicketState(Struct):
    """One live ticket (lockd.table.Ticket) with what the service keeps of it (Party)."""

    seq: int
    #: The `ident` of the client that asked (`ClientState.ident`).
    connection: int
    request_id: int
    names: list[str]
    shared: bool
    slots: dict[str, int]
    wait: bool
    phase: TicketPhase
    #: Seconds after the handover at which it times out (its break grace ends, if breaking).
    deadline: float | None
    #: Seconds relative to the handover (negative: before it): when it was asked for, and
    #: when it was granted (asked for, until then).
    requested: float
    since: float
    tokens: list[int] | None
    claim: ClaimState
    #: The pid of the process it is tied to (`ProcessState.pid`), if any; whether that
    #: process, rather than the connection, owns it in the table (it was granted).
    process: int | None
    owned_by_process: bool
    cause: str | None
    lost: str | None
    exit_status: int | None


class SubscriptionState(Struct):
    id: int
    #: None: every name.
    names: list[str] | None


class ClientState(Struct):
    """Who a connection's client is (lockd.service.Client), from the kernel at connect time."""

    ident: int
    pid: int
    uid: int
    gid: int
    gids: list[int]
    command: str
    break_grace: float
    label: str | None


class SessionState(Struct):
    """A served connection's socket and what is in flight on it (lockd.session)."""

    fd: int
    #: Whether its hello was answered; if not, the new program waits for it.
    greeted: bool
    #: Bytes received and not yet handled as requests.
    unread: bytes
    #: Bytes of replies and events not yet taken by the socket, with the descriptors to go
    #: with the byte at each offset; how many bytes at its head are events.
    outbox: bytes
    attached: list[tuple[int, list[int]]]
    event_head: int
    #: Lease events not yet in the outbox: (subscription id, or None for a last word, frame).
    events: list[tuple[int | None, bytes]]


class ConnectionState(Struct):
    """A client: its connection, or None if that is gone and only leases it tied to a
    process live on; its subscriptions."""

    client: ClientState
    session: SessionState | None
    subscriptions: list[SubscriptionState]


class ProcessState(Struct):
    """A process that leases are tied to, and the pidfd that watches it (lockd.processes)."""

    pid: int
    uid: int
    command: str
    pidfd: int


class ListenerState(Struct):
    """A listening socket; `path` and `inode` if this daemon bound it (so it removes it when
    it stops, unless another daemon has bound that path since)."""

    fd: int
    path: str | None
    inode: int | None


class ReplyTo(Struct):
    """The `Reexec` request the new program answers (`protocol.Reexecuted`)."""

    connection: int
    request_id: int


class State(Struct):
    version: int
    #: The old program's `Welcome.server`.
    server: str
    #: When the old program stopped handling requests, on CLOCK_MONOTONIC (which the exec
    #: keeps): for `Reexecuted.paused`.
    paused_at: float
    config: Config
    listeners: list[ListenerState]
    metrics_listener: ListenerState | None
    connections: list[ConnectionState]
    tickets: list[TicketState]
    processes: list[ProcessState]
    #: The table's next arrival number and the next connection ident.
    next_arrival: int
    next_connection: int
    #: The backend's name and its own state (lockd.backend.Backend.hand_over).
    backend: str
    backend_state: bytes
    backend_descriptors: list[int]
    #: Lease events recorded but not yet written to the history, oldest first.
    history: list[protocol.LeaseEvent]
    reply_to: ReplyTo | None


class _Version(msgspec.Struct, array_like=True):
    """What any version of the state starts with: its first field, whatever follows."""

    version: int


class Unreadable(Exception):
    """A state this program cannot take over; the message says why."""


_encoder = msgspec.msgpack.Encoder(enc_hook=encode_hook)


def encode(state: State) -> bytes:
    return _encoder.encode(state)


def decode(data: bytes) -> State:
    """The state in `data`. Raises Unreadable for another version or a malformed state."""
    try:
        version = msgspec.msgpack.decode(data, type=_Version).version
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Unreadable(f"not a lockd handover state ({exc})") from None
    if version != VERSION:
        raise Unreadable(f"handover state version {version}; this lockd reads version {VERSION} only")
    try:
        return msgspec.msgpack.decode(data, type=State, dec_hook=decode_hook)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Unreadable(f"malformed handover state: {exc}") from None


def descriptors(state: State) -> list[int]:
    """Every descriptor `state` names, each once: they must stay open across the exec."""
    fds = [listener.fd for listener in state.listeners]
    if state.metrics_listener is not None:
        fds.append(state.metrics_listener.fd)
    for connection in state.connections:
        if connection.session is not None:
            fds.append(connection.session.fd)
            fds += (fd for _, attached in connection.session.attached for fd in attached)
    fds += (process.pidfd for process in state.processes)
    fds += state.backend_descriptors
    return fds


def to_memfd(data: bytes) -> int:
    """A new memfd holding `data`, inherited across exec, positioned at its start."""
    fd = os.memfd_create("lockd-handover", 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    """Everything in descriptor `fd` from where it stands, then close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
