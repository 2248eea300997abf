"""The I/O orders of the lock service (lockd.service), which the shell (lockd.server) carries
out in the order given, answering by calling the service back where an order says so.

Invariant: an order is plain data, about I/O only: every decision was made by the service
before the order was given; the shell may find an order obsolete (a take for a ticket that has
ended meanwhile) and skip it, but never decides anything else.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .backend import Claim
from .processes import ProcessOwner
from .table import Reason, Ticket


class Peer(Hashable, Protocol):
    """A connected client as the service sees it (the session, in the daemon): what `Send`
    and `Close` are for."""

    #: From the client's hello: shown for its requests that carry no label of their own.
    label: str | None
    #: Once closed, nothing sent reaches the client.
    closed: bool

    def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """Send `message` (with copies of `fds`) or queue it; never blocks."""

    def close(self, reason: str) -> None:
        """Stop serving this peer once what is queued is sent."""


@dataclass(slots=True)
class Send:
    """Send `message` to `peer`, or queue it; never blocks. A peer that cannot take it may be
    cut off: then `disconnected` is called back at once."""

    peer: Peer
    message: object


@dataclass(slots=True)
class Close:
    """Stop serving `peer` once what is queued for it is sent; call back `disconnected`."""

    peer: Peer
    reason: str


@dataclass(slots=True)
class StartTake:
    """Have the backend take `claim`; answer `taken`, `take_blocked` or `take_failed`. Skip it
    if `ticket` is no longer TAKING by then: its Release follows."""

    ticket: Ticket
    claim: Claim


@dataclass(slots=True)
class StopTake:
    """Cancel the backend's take of `ticket` if one runs in a task of its own; it must not
    answer any more."""

    ticket: Ticket


@dataclass(slots=True)
class Release:
    """Have the backend drop `claim` (see `Backend.drop` for `unlock`)."""

    claim: Claim
    unlock: bool


@dataclass(slots=True)
class Grant:
    """Tell `peer` its request `request_id` (for `ticket`) is granted with `tokens`, and send
    it the backend's lock-file descriptors of `claim`."""

    ticket: Ticket
    peer: Peer
    request_id: int
    tokens: list[int]
    claim: Claim


@dataclass(slots=True)
class NameOutsideHolders:
    """Look up who outside lockd holds `ticket`'s names, then call `refuse_naming`."""

    ticket: Ticket
    reason: Reason


@dataclass(slots=True)
class Watch:
    """Watch `owner`'s process; call `process_exited` when it exits."""

    owner: ProcessOwner


@dataclass(slots=True)
class WakeAt:
    """Call `expire` at `deadline` (or earlier) unless an earlier wake is set."""

    deadline: float


@dataclass(slots=True)
class SummariseAt:
    """Call `log_summaries` at `deadline` (or earlier)."""

    deadline: float


Order = Send | Close | StartTake | StopTake | Release | Grant | NameOutsideHolders | Watch | WakeAt | SummariseAt
