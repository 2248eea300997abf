"""The orders of the lock service (lockd.service): the I/O it needs done, which the shell
(lockd.server) carries out in the order given, answering where an order says so by calling
the service back.

Invariant: an order is plain data about I/O, and every decision was made before it was
given. The shell may find an order obsolete (a take whose request ended meanwhile: the
service says so) and skip it, but decides nothing else. Orders name a request by its `Claim`,
as the backend does: never by the table's ticket.

Orders are structs, made in C: a lease gives five, and a dataclass's __init__ is a call of
Python each, and the collector does not track them. An order naming a peer leads back to
its own queue (peer, shell, service), a cycle the collector cannot see; it is harmless only
because the shell empties the queue as it carries orders out, and the daemon keeps its one
service for its life. A `LookForHolders` is kept by its client until answered.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import msgspec
from lockd_client.protocol import Holder, LeaseEvent

from .backend import Claim
from .handover import SessionState
from .processes import ProcessOwner
from .table import Reason


class Peer(Hashable, Protocol):
    """A connected client, as orders address it (the session, in the daemon)."""

    #: From the client's hello: shown for its requests that carry no label of their own.
    label: str | None
    #: Once closed, nothing sent reaches the client.
    closed: bool
    #: Unique among the daemon's peers, kept across a re-exec.
    ident: int
    #: Whether its hello was answered.
    greeted: bool

    def send(
        self, message: object, fds: Sequence[int] = (), undelivered: Callable[[], None] | None = None,
    ) -> None:
        """Send `message` (with copies of `fds`) or queue it; never blocks. A peer that
        cannot take it may close on the spot: then the service hears `disconnected`. If the
        message never reaches the peer's socket, `undelivered` is called, at once or later.
        Raises LimitExceeded, having sent, queued and called nothing, if copies of `fds` were
        needed and the daemon has no descriptor left to make them (so never without `fds`)."""

    def close(self, reason: str) -> None:
        """Stop serving this peer once what is queued is sent; the service hears
        `disconnected`."""

    def offer(self, subscription_id: int, message: object) -> bool:
        """Send `message`, an event of subscription `subscription_id`, unless so many events
        wait unsent that it would be better dropped (a lagging subscriber): then send nothing
        and return False. Never blocks, and never cuts the peer off."""

    def end_events(self, subscription_id: int, notice: object | None) -> None:
        """Throw away the events of subscription `subscription_id` not yet sent, then send
        `notice` (if any) after the events already on their way."""

    def hand_over(self) -> SessionState:
        """What a re-executed daemon needs to serve this peer on (lockd.handover)."""


class Send(msgspec.Struct, gc=False):
    """Send `message` to `peer`."""

    peer: Peer
    message: object


class Close(msgspec.Struct, gc=False):
    """Stop serving `peer` once what is queued for it is sent."""

    peer: Peer
    reason: str


class StartTake(msgspec.Struct, gc=False):
    """Have the backend take `claim`, unless the service no longer is (`taking`); answer
    `taken`, `take_blocked`, `take_waits` while it waits outside lockd, or `take_failed`."""

    claim: Claim


class StopTake(msgspec.Struct, gc=False):
    """Cancel the backend's take of `claim` if it runs in a task of its own: it must not
    answer any more."""

    claim: Claim


class Release(msgspec.Struct, gc=False):
    """Have the backend drop `claim` (see `Backend.drop` for `unlock`)."""

    claim: Claim
    unlock: bool


class Grant(msgspec.Struct, gc=False):
    """Tell `peer` its request `request_id` is granted with `tokens`, and send it the
    backend's lock-file descriptors of `claim`; answer `grant_undelivered` if it never
    reaches the peer's socket (the peer closed before it was written), or `grant_unsendable`
    if it could not be sent for want of descriptors (the peer serves on)."""

    peer: Peer
    request_id: int
    tokens: list[int]
    claim: Claim


class LookForHolders(msgspec.Struct):
    """Look up who outside lockd holds `names`, for the refusal of `peer`'s request
    `request_id` (`reason`), which names `known` first; answer `holders_found`."""

    peer: Peer
    request_id: int
    names: tuple[str, ...]
    reason: Reason
    known: list[Holder]


class Watch(msgspec.Struct, gc=False):
    """Watch `owner`'s process; answer `process_exited` when it exits."""

    owner: ProcessOwner


class Unwatch(msgspec.Struct, gc=False):
    """Stop watching `owner`'s process, and close its pidfd."""

    owner: ProcessOwner


class WakeAt(msgspec.Struct, gc=False):
    """Call `wake` by `deadline` (a time of the service's clock) at the latest."""

    deadline: float


class Record(msgspec.Struct, gc=False):
    """`event` happened: tell every observer (the metrics, the history, the journal); one
    that fails is logged and the others are told still. (`Publish` tells subscribers.)"""

    event: LeaseEvent


class SendMetrics(msgspec.Struct, gc=False):
    """Send `peer` the daemon's metrics, in answer to its request `request_id`."""

    peer: Peer
    request_id: int


class Publish(msgspec.Struct, gc=False):
    """Offer `event` to `peer`'s subscription `subscription_id` unless it has ended since
    (`LockService.subscribed`); answer `subscriber_lagging` if the peer cannot take it."""

    peer: Peer
    subscription_id: int
    event: LeaseEvent


class EndEvents(msgspec.Struct, gc=False):
    """`peer`'s subscription `subscription_id` has ended: throw away its events not sent yet,
    and send `notice` (if any) as its last word."""

    peer: Peer
    subscription_id: int
    notice: object | None


class StartReexec(msgspec.Struct, gc=False):
    """Re-execute the daemon in place (lockd.reexec), as `peer` asked in request
    `request_id` (None: a signal asked); answer `reexec_refused` if it does not happen."""

    peer: Peer | None
    request_id: int | None


Order = (
    Send | Close | StartTake | StopTake | Release | Grant | LookForHolders | Watch | Unwatch | WakeAt | Record
    | SendMetrics | Publish | EndEvents | StartReexec
)
