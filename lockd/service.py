"""The lock service: one place decides. Connections, requests and the reports of the backend
and the process watches come in; what the daemon must do goes out as one ordered queue of
orders (lockd.orders), carried out by the shell (lockd.server).

Invariants:
- Every ticket that ends, however it ends, ends through the table's one `Ended` effect, and
  only there does the service let go of its records of it: its request id, the limits' counts
  (per connection, per uid) and its tie to a process. A request id whose refusal is still to
  be sent stays reserved on its connection until it is sent or the client withdraws it.
- Every change to the table is carried out by `_apply` before the input that caused it
  returns: effects join one queue and are carried out strictly in order, including those
  that carrying them out causes. So the table, the connections and the process owners agree
  whenever the service is not running (`LockService.check` asserts how; the tests call it
  after every step).
- The service does no I/O and reads no clock of its own: everything it sends and every other
  I/O it needs is an order, and orders are carried out in the order given, so a reply never
  overtakes the I/O it reports (a release's Done follows its unlock). Opening a process's
  pidfd (`Processes`) and the clocks (monotonic, and the wall clock the times shown to
  people are read from when they are shown or recorded) are given to it.
- The backend sees a request only as its `Claim`, and so does the shell: every report about a
  take names the claim, and a report about a claim that has ended changes nothing.
- No exception while carrying out one effect stops the others: a bug costs at most the ticket
  it concerns.
- Once `stop()` is called nothing more is taken or released: every client is told the daemon
  is shutting down and is closed; held leases are reported lost only where the backend's
  leases do not outlive the daemon (elsewhere their holders keep the locks through their
  copies of the lock-file descriptors). What the backend holds is left to its own shutdown.
- A lease's locks are released for every copy of their descriptors (`Release(unlock=True)`)
  only when it was released (by its holder, or by `release_pid`), or broken by force and then
  let go or overdue (see lockd.table); when its holder goes away, only the daemon's own
  copies are closed.
- What clients do wrong (connections refused or cut off, requests refused by policy) is
  logged within the budget of `loglimit`; lines about work done are not limited.
- Every lease and every refused request yields its events (`Record`), one per name: a
  refused request `refused`; a lease `granted`, maybe `broken`, and exactly one end,
  `released` or `lost`, given where its ticket ends (`Ended`), `granted` before anything
  else about it. A request withdrawn before its grant yields none. Each event but `granted`
  carries its cause (`protocol.Cause`), decided where the decision is made (`Party.cause`):
  what ends a lease says why before the table ends it. A daemon that stops ends every
  lease's story (`daemon_stopped`).
- Every event goes to each subscription that asked for its name and whose user may read it
  (`Policy.events_visible_to`, as the policy says now), in order, until the subscription
  ends: its client releases it or goes away, or lags (it cannot take an event): then an
  `Error` of code `limit` is the last message about it. The books of the subscriptions are
  lockd.events'.
- A re-exec loses nothing of what the service holds: `hand_over` gives out every client,
  live ticket (in the table's order, with its deadline and why it may end), process owner and
  subscription, and a new service that `adopt`s it keeps its invariants (`check`) and
  decides from then on as the old one would have, tokens and queue order included.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from lockd_client import errors, protocol
from lockd_client.describe import holder_text, sanitize
from lockd_client.protocol import Cause

from . import __version__, admission, handover
from .backend import BackendView, Claim, Requester
from .census import Census, Tally, name_census
from .config import Limits
from .events import Subscribers, Subscription, ending, lease_events, refusal_events
from .loglimit import Kind, LogLimiter
from .logs import contained
from .orders import (
    Close,
    EndEvents,
    Grant,
    LookForHolders,
    Order,
    Peer,
    Record,
    Release,
    Send,
    SendMetrics,
    StartReexec,
    StartTake,
    StopTake,
    Unwatch,
    WakeAt,
    Watch,
)
from .policy import Policy
from .processes import Processes, ProcessOwner
from .table import (
    BREAKING,
    ENDED,
    HELD,
    TAKING,
    WAITING,
    Drop,
    Effect,
    Ended,
    Ending,
    Granted,
    LockTable,
    Lost,
    Queued,
    Reason,
    Refused,
    State,
    Take,
    Ticket,
)

log = logging.getLogger("lockd")

#: Who this daemon is, as `Welcome.server` tells clients.
SERVER: Final = f"lockd {__version__}"
SHUTDOWN_MESSAGE: Final = "lockd is shutting down; reconnect when it is back"
LOST_SHUTDOWN: Final = "the daemon is shutting down"
INTERNAL_PROBLEM: Final = "internal error in lockd (it is logged); retry"
#: The states `status` shows as holding: a broken lease holds until its owner has let go.
_SHOWN_HELD: Final = (HELD, BREAKING)
#: The slots of every claim that takes no semaphore: one empty dict for them all, rather than
#: one per lease (msgspec makes a new one for each default). Never changed.
_NO_SLOTS: Final[dict[str, int]] = {}
#: What this daemon offers beyond the first version of the protocol (Welcome.features).
_FEATURES: Final = (
    protocol.Feature.SEMAPHORES, protocol.Feature.EVENTS, protocol.Feature.METRICS, protocol.Feature.REEXEC,
)
#: Subscriptions one connection may hold: one can name any number of locks, so more than a
#: few is a client bug.
MAX_SUBSCRIPTIONS: Final = 16
#: What clients do wrong, logged within bounds (see loglimit).
CUT_OFF: Final = Kind(logging.INFO, "cut off {count} more connections")
REFUSED_CONNECTION: Final = Kind(logging.WARNING, "refused {count} more connections")
UNREADABLE_PEER: Final = Kind(
    logging.WARNING, "dropped {count} more connections whose peer credentials were unreadable"
)
REFUSED_REQUEST: Final = Kind(logging.WARNING, "refused {count} more requests by policy")
DROPPED_SUBSCRIPTION: Final = Kind(
    logging.INFO, "dropped {count} more subscriptions that did not read their events in time"
)


class Client:
    """A connection's identity (from the kernel, never from what it says) and what it has
    asked for: its live tickets by request id, and the counts the limits read."""

    __slots__ = ("peer", "pid", "uid", "gid", "gids", "command", "break_grace", "requester", "tickets", "names",
                 "taking", "refusing", "subscriptions")

    def __init__(
        self, peer: Peer, pid: int, uid: int, gid: int, gids: frozenset[int], command: str, break_grace: float
    ) -> None:
        self.peer = peer
        self.pid = pid
        self.uid = uid
        self.gid = gid
        #: Every group the peer was in at connect time (policies name groups).
        self.gids = gids
        self.command = command
        #: The `limits.break_grace` this client was told at connect time: a lease of its broken
        #: by force is given at least that long, whatever a reload says since.
        self.break_grace = break_grace
        #: Who asks, for every claim it asks for itself under its connection's label: made
        #: at its first such request (the hello that gives the label comes after `connect`,
        #: and before any request; it is the label for as long as the connection lasts).
        self.requester: Requester | None = None
        #: Request id → the ticket of an Acquire that is waiting or held on this connection.
        self.tickets: dict[int, Ticket] = {}
        #: How many names those tickets cover: what the lease limits count.
        self.names = 0
        #: How many of those the backend is taking (not granted yet: they count as waiting).
        self.taking = 0
        #: Ids of ended requests whose refusal is still to be sent → the look it waits for (a
        #: withdrawn request's id may be used again while its look still runs).
        self.refusing: dict[int, LookForHolders] = {}
        #: Request id → a subscription of this connection to lease events (lockd.events).
        self.subscriptions: dict[int, Subscription] = {}

    def __repr__(self) -> str:
        return f"<Client pid={self.pid} uid={self.uid} {self.peer!r}>"

    def uses(self, request_id: int) -> bool:
        """Whether `request_id` names something of this connection's that has not ended."""
        return request_id in self.tickets or request_id in self.refusing or request_id in self.subscriptions

    def asking_as_itself(self) -> Requester:
        """Who asks for a claim this client makes for itself, under its connection's label:
        what `requester` keeps once made."""
        return Requester(self.pid, self.uid, self.gid, self.command, self.peer.label)


class Party(msgspec.Struct):
    """Who a ticket is for: what the service puts in `Ticket.info`. A struct, made in C: one
    per request, where a dataclass's __init__ is a call of Python. Tracked by the collector,
    unlike the orders: its client's tickets refer back to it."""

    client: Client
    request_id: int
    #: What the backend is asked to take, and who for.
    claim: Claim
    #: Set for a lease tied to a process rather than to the connection.
    process: ProcessOwner | None = None
    #: When it was asked for, on the service's clock.
    requested: float = 0.0
    #: Why its lease ends or its request fails (`protocol.Cause`), set where that is decided,
    #: before the table ends it; for a lease, at the latest as the table lets go of it (as its
    #: Drop says: see `_on_drop`).
    cause: str | None = None
    #: Its lease was lost, for this reason.
    lost: str | None = None
    #: The exit status of its work, as its client reported on release.
    exit_status: int | None = None


def party(ticket: Ticket) -> Party:
    info = ticket.info
    assert isinstance(info, Party)
    return info


@dataclass(slots=True)
class HandedOver:
    """The service's part of a re-exec's state (lockd.handover.State), and the claims of its
    tickets, in the same order, for the backend's part."""

    connections: list[handover.ConnectionState]
    tickets: list[handover.TicketState]
    processes: list[handover.ProcessState]
    next_arrival: int
    claims: list[Claim]


@dataclass(slots=True)
class HistoryLook:
    """A `History` request the service allowed, for the shell to read the history for, as
    `uid` may see it (None: every user's events); `history_reply` answers it."""

    request_id: int
    names: list[str]
    since: float | None
    until: float | None
    limit: int
    uid: int | None
    before: protocol.HistoryCursor | None


@dataclass(slots=True)
class StatusLook:
    """What a status must look for outside lockd before `status_reply`: `names` asked for
    (or all those lockd knows of), `look_for` those of them to look up."""

    request_id: int
    names: list[str]
    look_for: list[str]
    every_file: bool

    def shown(self, outside: dict[str, list[protocol.Holder]]) -> list[str]:
        """The names a status shows, given what the look found `outside`."""
        return self.names + [name for name in outside if name not in self.names]


class LockService:
    """The decisions of the daemon over one lock table. See the module docstring."""

    def __init__(
        self, table: LockTable, processes: Processes, limits: Limits, policy: Policy, backend: BackendView, *,
        clock: Callable[[], float], wall_clock: Callable[[], float], history: bool = False,
        arrivals: Callable[[tuple[str, ...]], None] | None = None, daemon_uid: int = 0,
    ) -> None:
        """`table` must order requests itself exactly when `backend` does not. `clock` tells
        the time on the table's scale (monotonic seconds), and `wall_clock` Unix time, read
        each time an event is recorded or a time shown: a clock set or stepped after the
        start (time sync after an early boot) moves what follows, never what was recorded.
        `history`: whether the shell keeps the events and answers `History` requests
        (`HistoryLook`). `arrivals`, if given, is told the names of every request the table
        takes in (it must return at once and never raise: the metrics note the names they
        follow). `daemon_uid`: the daemon's user, who may re-execute it (as root may)."""
        assert table.ordered_by_backend == backend.orders_requests
        self.table = table
        self.processes = processes
        #: Both may be replaced while serving (`reconfigure`).
        self.limits = limits
        self.policy = policy
        self._backend = backend
        self._clock = clock
        self._wall_clock = wall_clock
        self.history = history
        self._features = [*_FEATURES, protocol.Feature.HISTORY] if history else list(_FEATURES)
        self.clients: dict[Peer, Client] = {}
        #: uid → how many of its connections are served, for the per-uid limit.
        self._uid_clients: dict[int, int] = {}
        #: uid → how many names the live tickets asked for by its connections cover, counted
        #: from request to end: a process-tied lease still counts once its connection is gone.
        self._uid_names: dict[int, int] = {}
        #: Tickets handed to the backend, by their claim, from their Take to their Drop.
        self._claimed: dict[Claim, Ticket] = {}
        #: Of those, the ones the backend is still taking (each counted in `Client.taking`).
        self._taking: set[Ticket] = set()
        self.orders: deque[Order] = deque()
        self._effects: deque[Effect] = deque()
        self._applying = False
        self.stopping = False
        self._noise = LogLimiter()
        self._subscribers = Subscribers()
        self._subscriptions_dropped = 0
        #: Who holds and who waits, kept as tickets arrive, are granted and end.
        self._tally = Tally()
        self._arrivals = arrivals
        self._daemon_uid = daemon_uid
        self._effect_handlers = self._effect_handler_table()

    # --- connections --------------------------------------------------------------------------

    def connect(
        self, peer: Peer, pid: int, uid: int, gid: int, gids: frozenset[int], command: str,
    ) -> protocol.Welcome | None:
        """A client connected: what to answer its hello, or None if it is refused (then it is
        told why and closed)."""
        if self.stopping:
            self._send(peer, protocol.Error(None, protocol.ErrorCode.SHUTDOWN, SHUTDOWN_MESSAGE))
            self._close(peer, "the daemon is shutting down")
            return None
        refusal = admission.connection_refusal(self.limits, len(self.clients), self._uid_clients.get(uid, 0), uid)
        if refusal is not None:
            self._log_noise(
                REFUSED_CONNECTION, uid, refusal,
                "refusing a connection from uid %d pid %d (%s): %s", uid, pid, command, refusal,
            )
            self._send(peer, protocol.Error(None, protocol.ErrorCode.LIMIT, refusal))
            self._close(peer, refusal)
            return None
        client = self.clients[peer] = Client(peer, pid, uid, gid, gids, command, self.limits.break_grace)
        self._uid_clients[uid] = self._uid_clients.get(uid, 0) + 1
        log.debug("%r connected: %s", peer, command)
        return self._welcome(client)

    def _welcome(self, client: Client) -> protocol.Welcome:
        # What this client is promised holds for it even if a reload shortens the grace.
        notice = self._backend.loss_notice
        return protocol.Welcome(
            protocol.PROTOCOL_VERSION, SERVER, self._backend.name, self.limits.max_frame,
            leases_outlive_daemon=self._backend.leases_outlive_daemon,
            stop_within=client.break_grace if notice is None else min(notice, client.break_grace),
            features=self._features,
        )

    def unreadable_peer(self, problem: str) -> None:
        """A connection came whose peer credentials could not be read: it is dropped."""
        self._log_noise(
            UNREADABLE_PEER, None, problem, "dropping a connection whose peer credentials are unreadable: %s", problem,
        )

    def disconnected(self, peer: Peer, reason: str) -> None:
        """`peer`'s connection ended (`reason`: the session's): end its tickets now (its
        process-tied leases live on)."""
        client = self.clients.pop(peer, None)
        if client is None:
            return
        left = self._uid_clients[client.uid] - 1
        if left:
            self._uid_clients[client.uid] = left
        else:
            del self._uid_clients[client.uid]
        if not self.stopping and not reason.startswith("the client"):
            self._log_noise(CUT_OFF, client.uid, reason, "%r cut off: %s", peer, reason)
        client.refusing.clear()
        self._subscribers.client_gone(client)
        with contained("ending the tickets of %r", client):
            self._apply(self.table.drop_owner(client))

    # --- requests -----------------------------------------------------------------------------

    def request(self, peer: Peer, message: object) -> StatusLook | HistoryLook | None:
        """Handle one request of a connected client. For a status, what to look for outside
        lockd before `status_reply` answers it; for a history, what to read before
        `history_reply` does; else None: it is answered (in `orders`)."""
        client = self.clients.get(peer)
        if client is None:
            return None  # refused or ended: nothing it asks is served
        if isinstance(message, protocol.Acquire):
            self._acquire(client, message)
        elif isinstance(message, protocol.Release):
            self._release(client, message.id, message.exit_status)
        elif isinstance(message, protocol.Status):
            return self._status_look(client, message)
        elif isinstance(message, protocol.History):
            return self._history_look(client, message)
        elif isinstance(message, protocol.ReleasePid):
            self._release_pid(client, message)
        elif isinstance(message, protocol.ForceRelease):
            self._force_release(client, message)
        elif isinstance(message, protocol.Metrics):
            # Anyone may read them: counts, and only the names the administrator chose.
            self.orders.append(SendMetrics(peer, message.id))
        elif isinstance(message, protocol.Subscribe):
            self._subscribe(client, message)
        elif isinstance(message, protocol.Reexec):
            self._reexec(client, message.id)
        else:
            problem = f"unexpected {type(message).__name__} message"
            self._send(peer, protocol.Error(None, protocol.ErrorCode.PROTOCOL, problem))
            self._close(peer, problem)
        return None

    def _acquire(self, client: Client, request: protocol.Acquire) -> None:
        """Queue a request for the names, or refuse it (limits, policy, a second lease of a
        process on the same name)."""
        process: ProcessOwner | None = None
        try:
            names = checked_names(request.names)
            if client.uses(request.id):
                raise errors.ProtocolError(f"request id {request.id} is already in use on this connection")
            timeout = request.timeout
            if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
                raise errors.ProtocolError(f"timeout must be a finite number >= 0, not {timeout}")
            slots = request.slots
            if slots and (problem := protocol.slots_problem(names, slots)) is not None:
                raise errors.ProtocolError(problem)
            refusal = admission.acquire_refusal(
                self.limits, names, waits=timeout != 0, requests=client.names,
                pending=self._pending(client), waiting_on=self.table.waiting_on,
                uid_requests=self._uid_names.get(client.uid, 0),
                uid_pending=lambda: sum(self._pending(c) for c in self.clients.values() if c.uid == client.uid),
            ) or self.policy.check_acquire(client.uid, client.gids, names, request.mode, slots)
            if isinstance(refusal, errors.PermissionDenied):
                self._log_noise(
                    REFUSED_REQUEST, client.uid, str(refusal),
                    "refused uid %d pid %d (%s) %s on %s: %s", client.uid, client.pid,
                    client.command, request.mode, ", ".join(names), refusal,
                )
            if refusal is not None:
                raise refusal
            if request.pid is not None:
                process = self.processes.get(request.pid)
                if client.uid not in (0, process.uid):
                    raise errors.PermissionDenied(
                        f"process {process.pid} belongs to uid {process.uid}, you are uid {client.uid}; "
                        "only that user or root may tie leases to it"
                    )
                if timeout is None:
                    self._refuse_a_second_lease(process, names)
        except errors.LockdError as exc:
            if process is not None and self.processes.discard(process):
                self.orders.append(Unwatch(process))
            self._send_error(client, request.id, exc)
            if not isinstance(exc, (errors.ProtocolError, errors.InvalidName)):
                self._record_refusal(client, request, exc)
            return
        if process is None and request.label is None:
            requester = client.requester
            if requester is None:
                requester = client.requester = client.asking_as_itself()
        else:
            label = client.peer.label if request.label is None else sanitize(request.label)
            who = process or client
            requester = Requester(who.pid, who.uid, None if process is not None else client.gid, who.command, label)
        claim = Claim(
            names=tuple(names), shared=request.mode == "shared", wait=timeout != 0, requester=requester,
            slots=slots or _NO_SLOTS,
        )
        now = self._clock()
        deadline = now + timeout if timeout else None
        # The claim's names: the ticket keeps the same tuple.
        ticket, effects = self.table.acquire(
            client, claim.names, shared=claim.shared, wait=claim.wait, deadline=deadline, now=now,
            info=Party(client, request.id, claim, process, now), slots=slots,
        )
        if self._arrivals is not None:
            self._arrivals(ticket.names)
        if self._keep(ticket) and process is not None:
            self.orders.append(Watch(process))
        if deadline is not None:
            self.orders.append(WakeAt(deadline))
        self._apply(effects)

    def _keep(self, ticket: Ticket) -> bool:
        """Keep the records of `ticket`, just made (their end is `_ended`'s): its request id,
        the counts the limits read, the census, its tie to a process. True if it is the first
        tie to that process: the process must be watched."""
        who = party(ticket)
        client = who.client
        client.tickets[who.request_id] = ticket
        client.names += len(ticket.names)
        self._uid_names[client.uid] = self._uid_names.get(client.uid, 0) + len(ticket.names)
        self._tally.arrived(ticket)
        return who.process is not None and self.processes.attach(who.process, ticket)

    def _release(self, client: Client, request_id: int, exit_status: int | None) -> None:
        """End a lease or withdraw a request, at its client's wish."""
        ticket = client.tickets.get(request_id)
        if ticket is not None:
            party(ticket).exit_status = exit_status
            self._apply(self.table.release(ticket))
        elif self._subscribers.unsubscribe(client, request_id):
            self.orders.append(EndEvents(client.peer, request_id, None))
        else:
            client.refusing.pop(request_id, None)  # withdrawn: its refusal is not sent

    def _subscribe(self, client: Client, request: protocol.Subscribe) -> None:
        """Send `client` the lease events it asks for and may read, until it releases
        `request.id`."""
        try:
            names = frozenset(checked_names(request.names)) if request.names else None
            if client.uses(request.id):
                raise errors.ProtocolError(f"request id {request.id} is already in use on this connection")
            if len(client.subscriptions) >= MAX_SUBSCRIPTIONS:
                raise errors.LimitExceeded(
                    f"this connection has {MAX_SUBSCRIPTIONS} subscriptions already; one subscription can "
                    "name many locks, or none for all of them"
                )
            per_uid = self.limits.max_subscriptions_per_uid
            if self._subscribers.count(client.uid) >= per_uid:
                raise errors.LimitExceeded(
                    f"uid {client.uid} has {per_uid} subscriptions already over its connections "
                    "(limits.max_subscriptions_per_uid); end some, or have one subscription name many locks"
                )
        except errors.LockdError as exc:
            self._send_error(client, request.id, exc)
            return
        self._subscribers.subscribe(client, request.id, names, self.policy.events_visible_to(client.uid))
        self._send(client.peer, protocol.Done(request.id))

    def subscribed(self, peer: Peer, subscription_id: int) -> bool:
        """Whether `peer`'s subscription `subscription_id` still receives events."""
        client = self.clients.get(peer)
        return client is not None and subscription_id in client.subscriptions

    def subscriber_lagging(self, peer: Peer, subscription_id: int) -> None:
        """`peer` cannot take the next event of its subscription: end the subscription, so
        that a slow reader costs the daemon nothing more, and tell it so."""
        client = self.clients.get(peer)
        if client is None or not self._subscribers.unsubscribe(client, subscription_id):
            return
        self._subscriptions_dropped += 1
        self._log_noise(
            DROPPED_SUBSCRIPTION, client.uid, "lagging",
            "%r: subscription %d dropped: it did not read its events in time", client, subscription_id,
        )
        self.orders.append(EndEvents(peer, subscription_id, protocol.Error(
            subscription_id, protocol.ErrorCode.LIMIT,
            "dropped: events came faster than this connection read them; subscribe again, and read "
            "them as they come (the history has the ones missed)",
        )))

    def _release_pid(self, client: Client, request: protocol.ReleasePid) -> None:
        """Release the leases a process holds on some names (lockctl release)."""
        try:
            wanted = set(checked_names(request.names))
            owner = self.processes.find(request.pid)
            if owner is not None and client.uid not in (0, owner.uid):
                raise errors.PermissionDenied(
                    f"the leases of process {request.pid} belong to uid {owner.uid}; only that user or root may "
                    "release them"
                )
            held = self.table.tickets_of(owner) if owner is not None else []
            released = [t for t in held if not wanted.isdisjoint(t.names)]
            missing = wanted.difference(*(t.names for t in released))
            for ticket in released:
                holder = party(ticket)
                if holder.client is not client:
                    holder.cause = Cause.RELEASED_BY_OTHER
                    if ticket.state is HELD:
                        self._send(holder.client.peer, protocol.Lost(
                            holder.request_id, f"released by uid {client.uid} (pid {client.pid}: {client.command})",
                        ))
                self._apply(self.table.release(ticket))
            if missing:
                raise errors.NotHeld(
                    f"process {request.pid} holds no lease on {', '.join(sorted(missing))}"
                    + (f" (released {len(released)} other)" if released else "")
                )
        except errors.LockdError as exc:
            self._send_error(client, request.id, exc)
            return
        log.debug("%r released %d lease(s) of process %d", client, len(released), request.pid)
        self._send(client.peer, protocol.Done(request.id, len(released)))

    def _force_release(self, client: Client, request: protocol.ForceRelease) -> None:
        """Break every lease on a name, as policy allows: its holders are told, and have the
        longest grace any of them was promised to let go (see lockd.table)."""
        try:
            (name,) = checked_names([request.name])
            holders = [t for t in self.table.holders(name) if t.state in _SHOWN_HELD]
            decision = self.policy.check_force(client.uid, name, [party(t).claim.requester.uid for t in holders])
            if not decision.allowed:
                self._log_noise(
                    REFUSED_REQUEST, client.uid, decision.reason,
                    "refused uid %d pid %d (%s) a forced release of %s: %s",
                    client.uid, client.pid, client.command, name, decision.reason,
                )
                raise decision.error()
        except errors.LockdError as exc:
            self._send_error(client, request.id, exc)
            return
        reason = f"forcibly released by uid {client.uid} (pid {client.pid}: {client.command})"
        for ticket in holders:
            if ticket.state is BREAKING:  # broken before: it ends now
                who = party(ticket)
                who.cause, who.lost = Cause.FORCED, f"{reason}, a second time"
        grace = max([self.limits.break_grace, *(party(t).client.break_grace for t in holders)])
        grace_until = self._clock() + grace
        count, effects = self.table.force_release(name, reason, grace_until=grace_until)
        self.orders.append(WakeAt(grace_until))
        for ticket in holders:
            holder = party(ticket).claim.requester
            log.warning("%s: lease of pid %s (uid %s) broken, %s", name, holder.pid, holder.uid, reason)
        self._apply(effects)
        self._send(client.peer, protocol.Done(request.id, count))

    def _reexec(self, client: Client, request_id: int) -> None:
        """Re-execute the daemon in place, for root or the daemon's own user."""
        if client.uid not in (0, self._daemon_uid):
            self._send_error(client, request_id, errors.PermissionDenied(
                f"only root or uid {self._daemon_uid} (lockd's user) may re-execute lockd; you are uid {client.uid}"
            ))
        elif client.uses(request_id):
            self._send_error(client, request_id, errors.ProtocolError(
                f"request id {request_id} is already in use on this connection"
            ))
        else:
            self.orders.append(StartReexec(client.peer, request_id))

    def reexec_refused(self, peer: Peer | None, request_id: int | None, reason: str) -> None:
        """The re-exec asked for by `peer`'s `request_id` did not happen, for `reason`: the
        daemon serves on as it was."""
        log.error("not re-executed, serving on as before: %s", reason)
        if peer is not None and peer in self.clients:
            message = f"not re-executed: {reason}"
            self._send(peer, protocol.Error(request_id, protocol.ErrorCode.NOT_REEXECUTED, message))

    def _status_look(self, client: Client, request: protocol.Status) -> StatusLook | None:
        """What to look for outside lockd to answer `request` (None: refused, answered).

        For the names asked for, all of them; for a status of everything (the names lockd
        knows, the backend's own included), those lockd does not hold, and every other lock
        file of the host."""
        if request.names:
            try:
                names = checked_names(request.names)
            except errors.LockdError as exc:
                self._send_error(client, request.id, exc)
                return None
            return StatusLook(request.id, names, names, every_file=False)
        names = list(dict.fromkeys([*self.table.names(), *self._backend.outside_names()]))
        return StatusLook(request.id, names, [name for name in names if not self._held(name)], every_file=True)

    def status_reply(
        self, peer: Peer, look: StatusLook, outside: dict[str, list[protocol.Holder]],
        outside_waiting: dict[str, list[protocol.Holder]],
    ) -> None:
        """Answer a status with the table as it is now and what the look found outside
        (nothing if the client has gone meanwhile).

        The table is read after the look, so what lockd itself holds is shown as it is when
        answered: a name lockd let go of during the look was not looked for, and an outside
        holder that conflicts with lockd's holders has let go since, so it is left out. Where
        the backend orders requests, holders and waiters are listed in its order, every
        host's together.
        """
        if peer not in self.clients:
            return
        locks = []
        for name in look.shown(outside):
            holding = self.table.holders(name)
            held = [t for t in holding if t.state in _SHOWN_HELD]
            waiting = [t for t in holding if t.state is TAKING] + self.table.waiters(name)
            holders = [self._holder(t, name) for t in held]
            if not held:
                holders += outside.get(name, [])
            elif party(held[0]).claim.shared_on(name):
                holders += [h for h in outside.get(name, []) if h.mode == "shared"]
            waiters = [self._holder(t, name) for t in waiting] + outside_waiting.get(name, [])
            if self._backend.orders_requests:
                holders.sort(key=_place)
                waiters.sort(key=_place)
            if holders or waiters:
                mode = holders[0].mode if holders else None
                slots = self.table.slots_of(name) or self._backend.outside_slots(name)
                locks.append(protocol.LockInfo(name, mode, holders, waiters, slots))
        self._send(peer, protocol.StatusReply(look.request_id, locks))

    def _history_look(self, client: Client, request: protocol.History) -> HistoryLook | None:
        """What to read to answer `request` (None: refused, answered)."""
        try:
            if not self.history:
                raise errors.DaemonUnavailable(
                    "history is off in the daemon's config ([history] enabled); turn it on and restart lockd"
                )
            names = checked_names(request.names) if request.names else []
            before = None if request.before is None else request.before[0]
            for bound, value in (("since", request.since), ("until", request.until), ("before", before)):
                if value is not None and not math.isfinite(value):
                    raise errors.ProtocolError(f"{bound} must be a finite Unix time, not {value}")
            if request.since is not None and request.until is not None and request.since > request.until:
                raise errors.ProtocolError(f"since ({request.since}) is after until ({request.until})")
        except errors.LockdError as exc:
            self._send_error(client, request.id, exc)
            return None
        visible = self.policy.events_visible_to(client.uid)
        return HistoryLook(request.id, names, request.since, request.until, request.limit, visible, request.before)

    def history_reply(
        self, peer: Peer, look: HistoryLook,
        page: tuple[list[protocol.LeaseEvent], protocol.HistoryCursor | None] | errors.LockdError,
    ) -> None:
        """Answer a history with the page read (its events, and the cursor of the earlier
        ones that match), or why it could not be, unless the client has gone meanwhile."""
        client = self.clients.get(peer)
        if client is None:
            return
        if isinstance(page, errors.LockdError):
            self._send_error(client, look.request_id, page)
        else:
            self._send(peer, protocol.HistoryReply(look.request_id, *page))

    def _held(self, name: str) -> bool:
        return any(t.state in _SHOWN_HELD for t in self.table.holders(name))

    # --- reports about takes, from the shell ---------------------------------------------------

    def taking(self, claim: Claim) -> bool:
        """Whether the backend is still to take `claim` (a StartTake for it is not obsolete)."""
        ticket = self._claimed.get(claim)
        return ticket is not None and ticket in self._taking

    def taken(self, claim: Claim, tokens: list[int]) -> None:
        """The backend took `claim`."""
        ticket = self._claimed.get(claim)
        if ticket is not None and ticket in self._taking:
            self._take_ended(ticket)
            self._apply(self.table.taken(ticket, tokens, now=self._clock()))

    def take_blocked(self, claim: Claim) -> None:
        """The backend found the names held elsewhere, and the claim does not wait."""
        ticket = self._claimed.get(claim)
        if ticket is not None and ticket in self._taking:
            self._take_ended(ticket)
            self._apply(self.table.take_blocked(ticket))

    def take_waits(self, claim: Claim, holders: list[protocol.Holder]) -> None:
        """The backend waits for `holders`, outside the table: tell the client."""
        ticket = self._claimed.get(claim)
        if ticket is not None and ticket in self._taking:
            who = party(ticket)
            self._send(who.client.peer, protocol.Queued(who.request_id, holders))

    def take_failed(self, claim: Claim, exc: Exception) -> None:
        """The backend could not take `claim` (a LockdError says why; anything else is a bug):
        the request fails."""
        ticket = self._claimed.get(claim)
        if ticket is None or ticket.state is ENDED:
            return
        if not isinstance(exc, errors.LockdError):
            log.error("internal error taking %s", ticket, exc_info=exc)
            self._fail(ticket, errors.DaemonUnavailable(
                "internal error in lockd while taking the lock (it is logged); retry"
            ), Cause.INTERNAL)
            return
        self._fail(ticket, exc)

    def lost(self, claim: Claim, reason: str) -> None:
        """The backend can no longer vouch for `claim`: a lease is lost, a request fails."""
        ticket = self._claimed.get(claim)
        if ticket is None:
            return  # dropped meanwhile
        with contained("ending the lost lease %s", ticket):
            who = party(ticket)
            if ticket.state is HELD:
                who.cause = Cause.BACKEND
                self._apply(self.table.lose(ticket, reason))
            elif ticket.state is BREAKING:
                # Its holder was told it is lost when it was broken, and may still be at
                # work: the lease ends, but what the holder has keeps the lock.
                who.cause, who.lost = Cause.BACKEND, reason
                self._apply(self.table.end([ticket]))
            elif ticket.state is not ENDED:
                self._fail(ticket, errors.DaemonUnavailable(reason), Cause.BACKEND)

    def _fail(self, ticket: Ticket, exc: errors.LockdError, cause: str | None = None) -> None:
        """Refuse `ticket`, not granted yet, for `exc` (`cause`: its code, unless given)."""
        who = party(ticket)
        log.warning("cannot take %s for pid %s: %s", ", ".join(ticket.names), who.claim.requester.pid, exc)
        self._send_error(who.client, who.request_id, exc)
        self._record(ticket, who, "refused", reason=_code(exc), cause=cause or _code(exc))
        self._apply(self.table.release(ticket))

    # --- other reports from the shell -----------------------------------------------------------

    def holders_found(self, look: LookForHolders, holders: list[protocol.Holder]) -> None:
        """Send the refusal `look` was for, naming the holders it knew and `holders` (found
        outside lockd), unless the client withdrew the request or went away meanwhile."""
        client = self.clients.get(look.peer)
        if client is not None and client.refusing.get(look.request_id) is look:
            del client.refusing[look.request_id]
            self._send_refusal(client, look.request_id, look.names, look.reason, look.known + holders)

    def grant_undelivered(self, claim: Claim) -> None:
        """The connection of a Grant closed before it was written. Never heard of, so never handed
        on: a lease tied to a process would otherwise outlive the connection that asked for
        it, held for nobody."""
        ticket = self._claimed.get(claim)
        if ticket is not None and ticket.state is not ENDED:
            party(ticket).cause = Cause.CLIENT_GONE
            self._apply(self.table.end([ticket]))

    def grant_unsendable(self, claim: Claim, exc: errors.LimitExceeded) -> None:
        """The shell could not send the Grant of `claim` (`Peer.send` raised `exc`: no
        descriptor left to copy its lock files with), and its client, still connected, waits
        for an answer: it gets `exc` instead, and the lease, which it never heard of, ends as
        lost with cause `limit`, so the next waiter can have it."""
        ticket = self._claimed.get(claim)
        if ticket is not None and ticket.state is not ENDED:
            who = party(ticket)
            log.warning("cannot grant %s to pid %s: %s", ", ".join(ticket.names), who.claim.requester.pid, exc)
            who.cause, who.lost = Cause.LIMIT, str(exc)
            self._send_error(who.client, who.request_id, exc)
            self._apply(self.table.end([ticket]))

    def order_failed(self, order: Order) -> None:
        """Carrying out `order` hit a bug: a lease it was for is lost, a request fails."""
        claim = order.claim if isinstance(order, (StartTake, Grant)) else None
        ticket = self._claimed.get(claim) if claim is not None else None
        if ticket is not None:
            self._end_in_error(ticket)

    def process_exited(self, owner: ProcessOwner) -> None:
        """End every ticket tied to the process: a lease is lost, a request fails."""
        self.processes.exited(owner)
        # In arrival order, not the set's: what follows (who is told first, which waiter is
        # granted first) must not depend on where the tickets are in memory, which a re-exec
        # changes.
        tickets = sorted(owner.tickets, key=_arrival)
        held = [t for t in tickets if t.state is HELD]
        if held:
            log.info("process %d exited: ending its %d lease(s)", owner.pid, len(held))
        for ticket in tickets:
            who = party(ticket)
            who.cause = Cause.PROCESS_EXITED
            if ticket.state is HELD:
                self._send(who.client.peer, protocol.Lost(who.request_id, f"process {owner.pid} exited"))
            elif ticket.state is not BREAKING:  # a broken one was told already
                self._send(who.client.peer, protocol.Error(
                    who.request_id, protocol.ErrorCode.NOT_HELD,
                    f"process {owner.pid} exited before the lock was granted",
                ))
                self._record(ticket, who, "refused", reason=protocol.ErrorCode.NOT_HELD, cause=Cause.PROCESS_EXITED)
        # All at once: one of them waiting behind another must not be granted on its way out.
        self._apply(self.table.end(tickets))

    # --- time, configuration, shutdown ---------------------------------------------------------

    def next_wake(self) -> float:
        """When `wake` is next due (math.inf: not until some input says otherwise)."""
        times = [t for t in (self.table.next_deadline(), self._noise.next_summary()) if t is not None]
        return min(times, default=math.inf)

    def wake(self) -> None:
        """Refuse the requests whose deadline passed, end overdue broken leases, and log the
        summaries of what clients did that are due."""
        now = self._clock()
        with contained("expiring requests"):
            self._apply(self.table.expire(now))
        with contained("logging what clients did"):
            for summary in self._noise.summaries(now):
                log.log(summary.kind.level, "%s", summary.text())

    def log_every_summary(self) -> None:
        """Log every summary of what clients did, due or not: the daemon is going."""
        with contained("logging what clients did"):
            for summary in self._noise.flush():
                log.log(summary.kind.level, "%s", summary.text())

    def reconfigure(self, limits: Limits, policy: Policy) -> None:
        """Apply a reloaded configuration; what connected clients were promised stays, but
        not a right to read others' events that the policy takes away."""
        self.limits = limits
        self.policy = policy
        self._subscribers.revisit(policy.events_visible_to)

    def census(self) -> Census:
        """Who holds and who waits now, as `status` shows them: held once granted (also
        while broken), waiting until then, the backend's takes included (see lockd.census).
        O(1), amortized."""
        return self._tally.census()

    def name_census(self, name: str) -> Census:
        """The same for the tickets on `name` alone. Costs a visit of each of them."""
        return name_census(self.table, name)

    def counts(self) -> tuple[int, int, int]:
        """How many leases are held, requests wait (as `census` counts them), and clients
        are connected."""
        census = self._tally.census()
        return census.leases, census.requests, len(self.clients)

    @property
    def subscriptions_dropped(self) -> int:
        """Subscriptions ended because their client did not read its events in time, since
        the start."""
        return self._subscriptions_dropped

    def stop(self) -> None:
        """Grant and release nothing more; report held leases lost where the backend's leases
        do not outlive the daemon; end every ticket (`daemon_stopped`: where leases outlive
        the daemon, their holders keep the locks through their descriptors); tell every
        client the daemon is going, and close it."""
        self.stopping = True
        reason = LOST_SHUTDOWN
        outlive = self._backend.leases_outlive_daemon
        tickets = [
            ticket for owner in [*self.clients.values(), *self.processes.owners()]
            for ticket in self.table.tickets_of(owner)
        ]
        for ticket in tickets:
            who = party(ticket)
            who.cause = Cause.DAEMON_STOPPED
            if ticket.state is BREAKING and not outlive:
                who.lost = reason
            elif ticket.state is HELD and not outlive:
                with contained("reporting %s lost at shutdown", ticket):
                    self._apply(self.table.lose(ticket, reason))
        with contained("ending the tickets at shutdown"):
            self._apply(self.table.end(tickets))
        goodbye = protocol.Error(None, protocol.ErrorCode.SHUTDOWN, SHUTDOWN_MESSAGE)
        for client in list(self.clients.values()):
            self._send(client.peer, goodbye)
            self._close(client.peer, reason)

    # --- re-exec ------------------------------------------------------------------------------

    def hand_over(self) -> HandedOver:
        """The service's part of the state a re-executed program adopts (lockd.handover), and
        the claims for the backend's. Changes nothing. Valid only while no request is being
        handled and no refusal waits for its look."""
        now = self._clock()
        tickets = self.table.tickets()
        clients = {id(c): c for c in self.clients.values()}
        clients.update((id(party(t).client), party(t).client) for t in tickets)
        connections = []
        for client in clients.values():
            peer = client.peer
            connections.append(handover.ConnectionState(
                client=handover.ClientState(
                    ident=peer.ident, pid=client.pid, uid=client.uid, gid=client.gid, gids=sorted(client.gids),
                    command=client.command, break_grace=client.break_grace, label=peer.label,
                ),
                session=peer.hand_over() if self.clients.get(peer) is client else None,
                subscriptions=[
                    handover.SubscriptionState(id=sub.id, names=None if sub.names is None else sorted(sub.names))
                    for sub in client.subscriptions.values()
                ],
            ))
        states = []
        for ticket in tickets:
            who = party(ticket)
            claim, requester = who.claim, who.claim.requester
            states.append(handover.TicketState(
                seq=ticket.seq, connection=who.client.peer.ident, request_id=who.request_id,
                names=list(ticket.names), shared=ticket.shared, slots=dict(claim.slots), wait=ticket.wait,
                phase=_PHASES[ticket.state], deadline=None if ticket.deadline is None else ticket.deadline - now,
                requested=who.requested - now, since=ticket.since - now, tokens=ticket.tokens,
                claim=handover.ClaimState(
                    pid=requester.pid, uid=requester.uid, gid=requester.gid, command=requester.command,
                    label=requester.label,
                ),
                process=None if who.process is None else who.process.pid,
                owned_by_process=who.process is not None and ticket.owner is who.process,
                cause=who.cause, lost=who.lost, exit_status=who.exit_status,
            ))
        processes = [
            handover.ProcessState(pid=owner.pid, uid=owner.uid, command=owner.command, pidfd=owner.pidfd)
            for owner in self.processes.owners()
        ]
        return HandedOver(connections, states, processes, self.table.next_arrival, [party(t).claim for t in tickets])

    def adopt(
        self, handed: handover.State, peers: dict[int, Peer],
    ) -> tuple[list[Claim], dict[Peer, protocol.Welcome]]:
        """Take over what a daemon handed over (the service's part, `hand_over`), on a new
        table: `peers` are the sessions of its connections by ident; its process owners'
        pidfds are open. Returns the claims of the tickets in order (the backend adopts what
        it holds for them; those being taken are ordered taken again, after it has) and the
        welcome of each client still to be greeted. Raises ValueError (nothing served yet)
        for a state that breaks an invariant of the table, or whose tickets name a connection
        or process it does not hand over."""
        now = self._clock()
        connections, tickets, next_arrival = handed.connections, handed.tickets, handed.next_arrival
        processes = [ProcessOwner(p.pid, p.uid, p.command, p.pidfd) for p in handed.processes]
        clients: dict[int, Client] = {}
        for connection in connections:
            known = connection.client
            peer = peers.get(known.ident) or Departed(known.ident, known.label)
            client = clients[known.ident] = Client(
                peer, known.pid, known.uid, known.gid, frozenset(known.gids), known.command, known.break_grace,
            )
            if connection.session is not None:
                self.clients[peer] = client
                self._uid_clients[client.uid] = self._uid_clients.get(client.uid, 0) + 1
            visible = self.policy.events_visible_to(client.uid)
            for sub in connection.subscriptions:
                names = None if sub.names is None else frozenset(sub.names)
                self._subscribers.subscribe(client, sub.id, names, visible)
        owners = {owner.pid: owner for owner in processes}
        # Equal requesters are one record again: a client's claims share theirs, as they did
        # before the re-exec, and so now do claims of different clients or processes that
        # asked as the same (each had its own; a requester is immutable, so sharing is safe).
        requesters: dict[Requester, Requester] = {}
        restored = []
        for state in tickets:
            if state.connection not in clients:
                raise ValueError(f"ticket {state.seq} is for connection {state.connection}, which is not handed over")
            if state.process is not None and state.process not in owners:
                raise ValueError(f"ticket {state.seq} is tied to process {state.process}, which is not handed over")
            client = clients[state.connection]
            process = None if state.process is None else owners[state.process]
            asked = state.claim
            requester = Requester(asked.pid, asked.uid, asked.gid, asked.command, asked.label)
            requester = requesters.setdefault(requester, requester)
            # The client's own, as its next request would make it (`acquire`), if this is it.
            if process is None and client.requester is None and requester == client.asking_as_itself():
                client.requester = requester
            claim = Claim(
                names=tuple(state.names), shared=state.shared, wait=state.wait, requester=requester,
                slots=state.slots or _NO_SLOTS,
            )
            who = Party(
                client, state.request_id, claim, process, now + state.requested, cause=state.cause,
                lost=state.lost, exit_status=state.exit_status,
            )
            owner = process if state.owned_by_process and process is not None else client
            deadline = None if state.deadline is None else now + state.deadline
            ticket = Ticket(owner, claim.names, state.shared, state.wait, deadline, who, now + state.since,
                            state.slots or None)
            ticket.state, ticket.tokens, ticket.seq = State(state.phase), state.tokens, state.seq
            restored.append(ticket)
        self.table = LockTable.restored(
            restored, ordered_by_backend=self.table.ordered_by_backend, next_arrival=next_arrival,
        )
        # The tally finds the oldest waiting ticket first in the order they arrived: not the
        # order `restored` has them in, where those the backend is taking come first.
        for ticket in sorted(restored, key=_arrival):
            self._keep(ticket)
        for ticket in restored:
            who = party(ticket)
            if ticket.holding:
                self._claimed[who.claim] = ticket
            if ticket.deadline is not None:
                self.orders.append(WakeAt(ticket.deadline))
        # And grants in the order of their times.
        for ticket in sorted((t for t in restored if t.state is HELD or t.state is BREAKING), key=_since):
            self._tally.granted(ticket)
        for owner in processes:
            self.processes.adopt(owner)
            self.orders.append(Watch(owner))
        for ticket in restored:
            if ticket.state is TAKING:
                self._taking.add(ticket)
                party(ticket).client.taking += 1
                self.orders.append(StartTake(party(ticket).claim))
        welcomes = {
            client.peer: self._welcome(client) for client in self.clients.values() if not client.peer.greeted
        }
        return [party(t).claim for t in restored], welcomes

    # --- effects ------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out `effects` after those already queued, and those they cause, in order."""
        queue = self._effects
        queue.extend(effects)
        if self._applying:
            return  # an outer call is carrying out the queue
        self._applying = True
        handlers = self._effect_handlers
        try:
            while queue:
                effect = queue.popleft()
                ticket = effect.ticket
                try:
                    handlers[type(effect)](effect, ticket, ticket.info)
                except Exception:
                    log.exception("internal error carrying out %r; ending that request", effect)
                    with contained("ending %s after an internal error", ticket):
                        self._end_in_error(ticket)
        finally:
            self._applying = False

    def _effect_handler_table(self) -> dict[type, Callable[[Any, Ticket, Any], None]]:
        """How each kind of effect is carried out, given the effect, its ticket and its
        `Party`: a lookup by its type, where a chain of isinstance tests cost up to seven
        calls per effect on every request's path."""
        return {
            Take: self._on_take, Granted: self._on_granted, Drop: self._on_drop, Ended: self._on_ended,
            Queued: self._on_queued, Refused: self._refused, Lost: self._on_lost,
        }

    def _on_take(self, effect: Take, ticket: Ticket, who: Party) -> None:
        if not self.stopping:
            self._claimed[who.claim] = ticket
            self._taking.add(ticket)
            who.client.taking += 1
            self.orders.append(StartTake(who.claim))

    def _on_granted(self, effect: Granted, ticket: Ticket, who: Party) -> None:
        assert ticket.tokens is not None
        self._tally.granted(ticket)
        if who.process is not None:
            # From now on the process's exit ends the lease, not the connection's; while the
            # connection lasts, its Release still ends it too.
            self.table.reassign(ticket, who.process)
        # (At debug level the event log has a line for it: lockd.journal.)
        # Recorded first: should ordering the grant fail, the lease's end has its beginning.
        self._record(ticket, who, "granted")
        self.orders.append(Grant(who.client.peer, who.request_id, ticket.tokens, who.claim))

    def _on_drop(self, effect: Drop, ticket: Ticket, who: Party) -> None:
        ending = effect.ending
        if who.cause is None:  # nothing decided it before: as the table let go of it
            if who.lost is not None:
                who.cause = Cause.BACKEND
            elif ending is Ending.OVERDUE:
                who.cause = Cause.OVERDUE
            else:
                who.cause = Cause.CLIENT_GONE if ending is Ending.ABANDONED else Cause.REQUESTED
        if self._claimed.pop(who.claim, None) is None:
            return  # never handed to the backend
        if ticket in self._taking:
            self._take_ended(ticket)
            self.orders.append(StopTake(who.claim))
        if ending is Ending.OVERDUE:
            log.warning(
                "%s: the broken lease of pid %s was not let go within limits.break_grace; "
                "releasing its locks under it", ", ".join(ticket.names), who.claim.requester.pid,
            )
        # Once the daemon stops, what the backend holds is left to the backend's own shutdown:
        # holders told their leases are lost must have stopped their work before the locks
        # can go to anyone else (an etcd lease is left to expire rather than revoked).
        if not self.stopping:
            self.orders.append(Release(who.claim, unlock=ending is not Ending.ABANDONED))

    def _on_ended(self, effect: Ended, ticket: Ticket, who: Party) -> None:
        """The one place a ticket's records end: its request id, its counts, its process tie;
        and its lease's story, first, so that no bug here leaves it without an end."""
        self._tally.ended(ticket)
        if ticket.tokens is not None:
            with contained("recording the end of %s", ticket):
                self._record_end(ticket, who)
        client = who.client
        if client.tickets.get(who.request_id) is ticket:
            del client.tickets[who.request_id]
        client.names -= len(ticket.names)
        left = self._uid_names[client.uid] - len(ticket.names)
        if left:
            self._uid_names[client.uid] = left
        else:
            del self._uid_names[client.uid]
        if who.process is not None and self.processes.detach(who.process, ticket):
            self.orders.append(Unwatch(who.process))

    def _on_queued(self, effect: Queued, ticket: Ticket, who: Party) -> None:
        self._send(who.client.peer, protocol.Queued(who.request_id, self._in_way(ticket, effect.blockers)))

    def _on_lost(self, effect: Lost, ticket: Ticket, who: Party) -> None:
        # Its Drop ends it: a broken lease is still the client's until it lets go.
        log.warning("lease on %s of pid %s lost: %s", ", ".join(ticket.names), who.claim.requester.pid, effect.reason)
        self._send(who.client.peer, protocol.Lost(who.request_id, effect.reason))
        if ticket.state is BREAKING:
            self._record(ticket, who, "broken", reason=effect.reason, cause=Cause.FORCED)
        else:
            who.lost = effect.reason

    def _record_end(self, ticket: Ticket, who: Party) -> None:
        """Record how the lease of `ticket`, which has ended, ended (`who.cause`: a granted
        ticket's Drop came before its end)."""
        cause = who.cause
        assert cause is not None, ticket
        kind, reason = ending(cause, who.lost)
        exit_status = who.exit_status if kind == "released" else None
        self._record(ticket, who, kind, reason=reason, cause=cause, exit_status=exit_status)

    def _record(
        self, ticket: Ticket, who: Party, kind: protocol.EventKind, *, reason: str | None = None,
        cause: str | None = None, exit_status: int | None = None,
    ) -> None:
        """Record `kind` for each name of `ticket`, whose party is `who` (see the module
        docstring)."""
        granted = ticket.tokens is not None
        # The clock is read only where a span ends now: a grant's wait ended at its grant.
        waited: float | None
        held: float | None
        if kind == "granted":
            waited, held = ticket.since - who.requested, None
        elif granted:
            waited, held = (ticket.since - who.requested if kind == "refused" else None), self._clock() - ticket.since
        else:
            waited, held = (self._clock() - who.requested if kind == "refused" else None), None
        self._happened(lease_events(
            self._wall_clock(), kind, ticket.names, ticket.tokens, who.claim,
            waited=waited, held=held, reason=reason, cause=cause, exit_status=exit_status,
        ))

    def _record_refusal(self, client: Client, request: protocol.Acquire, exc: errors.LockdError) -> None:
        """Record the refusal of `request` before it became a ticket (limits, policy...)."""
        label = client.peer.label if request.label is None else sanitize(request.label)
        self._happened(refusal_events(
            self._wall_clock(), request, pid=client.pid, uid=client.uid, command=client.command,
            label=label, reason=_code(exc),
        ))

    def _happened(self, events: list[protocol.LeaseEvent]) -> None:
        """Record `events`, and publish each to every subscription that wants it."""
        orders = self.orders
        for event in events:
            orders.append(Record(event))
        if self._subscribers.live:
            self._subscribers.publish(events, orders)

    def _refused(self, effect: Refused, ticket: Ticket, who: Party) -> None:
        holders = self._in_way(ticket, effect.blockers)
        refusal = self._mismatch(ticket, effect, holders) if effect.reason is Reason.MISMATCH else None
        code = refusal.code if refusal is not None else effect.reason.value
        self._record(ticket, who, "refused", reason=code, cause=code)
        if refusal is not None:
            self._send_error(who.client, who.request_id, refusal)
        elif holders and not self._backend.orders_requests:
            self._send_refusal(who.client, who.request_id, ticket.names, effect.reason, holders)
        else:
            # Held outside the table (where the backend orders requests, maybe on other hosts
            # as well as here): the reply names whoever holds it now, found by a look that
            # starts after the refusal. Its id stays in use until the reply is sent.
            look = who.client.refusing[who.request_id] = LookForHolders(
                who.client.peer, who.request_id, ticket.names, effect.reason, holders,
            )
            self.orders.append(look)

    def _mismatch(self, ticket: Ticket, effect: Refused, holders: list[protocol.Holder]) -> errors.SlotsMismatch:
        """The refusal of `ticket`, which disagrees with the holders or waiters of
        `effect.name` on what that name is, naming both."""
        name = effect.name
        assert name is not None
        users = self._held_by(holders) or f"; awaited by {len(self.table.waiters(name)) or 'other'} request(s)"
        return errors.SlotsMismatch(
            f"{name} is {_kind(self.table.slots_of(name))}, and this request asked for "
            f"{_kind(ticket.slots_on(name))}: every user of a name must give the same number of slots (none "
            f"for a plain lock); use the name's, or another name{users}",
            holders,
        )

    def _end_in_error(self, ticket: Ticket) -> None:
        """End `ticket` after a bug: a lease is lost, a request fails."""
        if ticket.state is ENDED:
            return
        who = party(ticket)
        who.cause = Cause.INTERNAL
        if ticket.state is HELD or ticket.state is BREAKING:
            who.lost = INTERNAL_PROBLEM
        if ticket.state is HELD:
            self._send(who.client.peer, protocol.Lost(who.request_id, INTERNAL_PROBLEM))
        elif ticket.state is not BREAKING:
            self._send(who.client.peer, protocol.Error(
                who.request_id, protocol.ErrorCode.UNAVAILABLE, INTERNAL_PROBLEM,
            ))
            self._record(ticket, who, "refused", reason=protocol.ErrorCode.UNAVAILABLE, cause=Cause.INTERNAL)
        # Not released: the holder may still be at work, and keeps the lock till it stops.
        self._apply(self.table.end([ticket]))

    def _pending(self, client: Client) -> int:
        """Requests of `client` not granted yet: waiting in the table or being taken (where
        the backend orders requests, the table counts those as waiting already)."""
        if self.table.ordered_by_backend:
            return self.table.waiting_of(client)
        return self.table.waiting_of(client) + client.taking

    def _take_ended(self, ticket: Ticket) -> None:
        self._taking.remove(ticket)
        party(ticket).client.taking -= 1

    def _refuse_a_second_lease(self, process: ProcessOwner, names: list[str]) -> None:
        """Raise WouldDeadlock if `process` already holds any of `names`, for a request that
        would wait for it without a bound: it would wait for itself, since the first lease
        ends only when the process releases it or exits, and the process waits for the
        lockctl asking for the second. (Shared on shared is refused too: a writer queued
        between them would make it the same wait.)"""
        holding = {name for ticket in process.tickets if ticket.holding for name in ticket.names}
        mine = sorted(holding.intersection(names))
        if mine:
            raise errors.WouldDeadlock(
                f"process {process.pid} already holds {', '.join(mine)}: a second lease on it would wait "
                f"for the first, which ends only when that process releases it or exits; release it "
                f"first (lockctl release {mine[0]}), or keep the one lease"
            )

    # --- what clients are told ----------------------------------------------------------------

    def _send(self, peer: Peer, message: object) -> None:
        self.orders.append(Send(peer, message))

    def _close(self, peer: Peer, reason: str) -> None:
        self.orders.append(Close(peer, reason))

    def _send_error(self, client: Client, request_id: int, exc: errors.LockdError) -> None:
        code = exc.code or protocol.ErrorCode.PROTOCOL
        holders = exc.holders if isinstance(exc, (errors.LockBusy, errors.SlotsMismatch)) else []
        self._send(client.peer, protocol.Error(request_id, code, str(exc), holders))

    def _holder(self, ticket: Ticket, name: str) -> protocol.Holder:
        claim = party(ticket).claim
        who = claim.requester
        # Not granted yet: its place in a backend's queue, shown as other hosts' waiters are.
        token = ticket.tokens[ticket.names.index(name)] if ticket.tokens else self._backend.place_of(claim)
        return protocol.Holder(
            pid=who.pid, uid=who.uid, gid=who.gid, command=who.command, label=who.label,
            since=self._wall_clock() - (self._clock() - ticket.since), mode=claim.mode_on(name), token=token,
        )

    def _in_way(self, ticket: Ticket, blockers: Iterable[Ticket]) -> list[protocol.Holder]:
        """The holders among `blockers` of the names `ticket` wants, each once."""
        holders = {}
        for blocker in blockers:
            if blocker.holding:
                name = next((n for n in blocker.names if n in ticket.names), None)
                if name is not None:
                    holders[blocker] = self._holder(blocker, name)
        return list(holders.values())

    def _send_refusal(
        self, client: Client, request_id: int, names: tuple[str, ...], reason: Reason, holders: list[protocol.Holder]
    ) -> None:
        """Tell `client` its request is refused (busy or timed out), naming `holders`."""
        shown = ", ".join(names)
        if reason is Reason.TIMEOUT:
            code, what = protocol.ErrorCode.TIMEOUT, f"{shown}: timed out waiting for the lock"
        else:
            code, what = protocol.ErrorCode.BUSY, f"{shown} is busy"
        self._send(client.peer, protocol.Error(request_id, code, f"{what}{self._held_by(holders)}", holders))

    def _held_by(self, holders: list[protocol.Holder]) -> str:
        """The end of a refusal's message naming `holders` ("; held by ..."), or "" for none."""
        if not holders:
            return ""
        now = self._wall_clock()
        return "; held by " + ", ".join(holder_text(holder, now) for holder in holders)

    def _log_noise(self, kind: Kind, uid: int | None, reason: str, message: str, *args: object) -> None:
        """Log `message` about what a client did, unless lines of that kind are over their
        budget: then the event is counted for a summary (see loglimit)."""
        if self._noise.admit(kind, self._clock(), uid, reason):
            log.log(kind.level, message, *args)
        else:
            due = self._noise.next_summary()
            if due is not None:
                self.orders.append(WakeAt(due))

    # --- for tests ----------------------------------------------------------------------------

    def check(self) -> None:
        """Assert, by brute force, that the service's records agree with its table. For tests,
        between inputs (never while serving). The invariants:

        1. Nothing is left half done: no effect waits to be carried out.
        2. `_uid_clients` counts the connected clients of each uid, with no entry at zero.
        3. Every client that is connected or has a live ticket (a process-tied lease outlives
           its connection) keeps exactly its live tickets in `tickets`, each under its own
           request id; `names` counts their names, `taking` those of them in `_taking`.
        4. `_uid_names` sums, per uid, the names of the live tickets its clients asked for
           (process-tied leases of clients gone included), with no entry at zero.
        5. `_claimed` holds the live tickets handed to the backend, each under its own claim,
           all of them holding (TAKING, HELD or BREAKING), and until `stop()` every holding
           ticket (once stopping, nothing more is handed over). `_taking` is those of them
           the backend is still taking: TAKING ones.
        6. A ticket's owner in the table is its client, or once granted (HELD, BREAKING) the
           process it is tied to.
        7. The open process owners are found by their pid, and each is tied to exactly the
           live tickets that name it, at least one.
        8. A request id whose refusal is still to be sent is none of its client's live
           tickets' ids, and a client gone has no refusal to send.
        9. The subscriptions are those of connected clients (`Subscribers.check`), and their
           ids none of their clients' tickets' or refusals' ids.
        10. `census()` is what a count of every live ticket's (ticket, name) pairs gives.
        11. The table's own invariants (`LockTable.check`).
        """
        assert not self._effects and not self._applying, self._effects
        assert not _NO_SLOTS, "the shared empty slots were changed"
        uid_clients: dict[int, int] = {}
        for peer, client in self.clients.items():
            assert client.peer is peer, (peer, client)
            uid_clients[client.uid] = uid_clients.get(client.uid, 0) + 1
        assert self._uid_clients == uid_clients, (self._uid_clients, uid_clients)

        live = {ticket for name in self.table.names() for ticket in self.table.queue(name)}
        known: dict[Client, dict[int, Ticket]] = {client: {} for client in self.clients.values()}
        uid_names: dict[int, int] = {}
        tied: dict[ProcessOwner, set[Ticket]] = {}
        for ticket in live:
            who = party(ticket)
            known.setdefault(who.client, {})[who.request_id] = ticket
            uid_names[who.client.uid] = uid_names.get(who.client.uid, 0) + len(ticket.names)
            granted = ticket.state is HELD or ticket.state is BREAKING
            owner = who.process if who.process is not None and granted else who.client
            assert ticket.owner is owner, f"{ticket} is owned by {ticket.owner!r}, not {owner!r}"
            if who.process is not None:
                tied.setdefault(who.process, set()).add(ticket)
        assert self._uid_names == uid_names, (self._uid_names, uid_names)

        for client, mine in known.items():
            assert client.tickets == mine, (client, client.tickets, mine)
            assert client.names == sum(len(t.names) for t in mine.values()), client
            assert client.taking == sum(t in self._taking for t in mine.values()), client
            assert client.refusing.keys().isdisjoint(mine), (client, client.refusing)
            assert client.subscriptions.keys().isdisjoint(mine) and client.subscriptions.keys().isdisjoint(
                client.refusing
            ), client
            if self.clients.get(client.peer) is not client:
                assert not client.refusing, f"{client} is gone, refusing {client.refusing}"
                assert not client.subscriptions, f"{client} is gone, subscribed {client.subscriptions}"
        self._subscribers.check(self.clients.values())

        for claim, ticket in self._claimed.items():
            assert ticket in live and ticket.holding, ticket
            assert party(ticket).claim is claim, (claim, ticket)
        if not self.stopping:
            holding = {ticket for ticket in live if ticket.holding}
            assert set(self._claimed.values()) == holding, holding.symmetric_difference(self._claimed.values())
        for ticket in self._taking:
            assert ticket.state is TAKING and self._claimed.get(party(ticket).claim) is ticket, ticket

        owners = self.processes.owners()
        for owner in owners:
            assert self.processes.find(owner.pid) is owner and not owner.closed, owner
            assert owner.tickets and owner.tickets == tied.get(owner, set()), (owner, owner.tickets)
        assert set(tied) <= set(owners), set(tied).difference(owners)

        counted = Census()
        for name in self.table.names():
            of_name = name_census(self.table, name)
            for mode in counted.held:
                counted.held[mode] += of_name.held[mode]
                counted.waiting[mode] += of_name.waiting[mode]
            for since, field in ((of_name.held_since, "held_since"), (of_name.waiting_since, "waiting_since")):
                if since is not None and (getattr(counted, field) is None or since < getattr(counted, field)):
                    setattr(counted, field, since)
        counted.leases = sum(t.state is HELD or t.state is BREAKING for t in live)
        counted.requests = len(live) - counted.leases
        assert self._tally.census() == counted, (self._tally.census(), counted)

        self.table.check()


class Departed:
    """The peer of a client whose connection is gone while leases it tied to a process live
    on, in a re-executed daemon: nothing reaches it, as nothing reached the old one's."""

    closed = True
    greeted = True

    def __init__(self, ident: int, label: str | None) -> None:
        self.ident = ident
        self.label = label

    def send(
        self, message: object, fds: Sequence[int] = (), undelivered: Callable[[], None] | None = None,
    ) -> None:
        if undelivered is not None:
            undelivered()

    def close(self, reason: str) -> None:
        pass

    def offer(self, subscription_id: int, message: object) -> bool:
        return False

    def end_events(self, subscription_id: int, notice: object | None) -> None:
        pass

    def hand_over(self) -> handover.SessionState:
        raise AssertionError("a departed client has no session to hand over")


#: How the handover names the states a live ticket can be in.
_PHASES: Final[dict[State, handover.TicketPhase]] = {
    WAITING: "waiting", TAKING: "taking", HELD: "held", BREAKING: "breaking",
}


def _since(ticket: Ticket) -> float:
    return ticket.since


def _arrival(ticket: Ticket) -> int:
    return ticket.seq


def _code(exc: errors.LockdError) -> str:
    """What a refusal's event gives as its reason: the error's wire code."""
    return exc.code or protocol.ErrorCode.PROTOCOL


def _kind(slots: int | None) -> str:
    return "a plain lock" if slots is None else f"a semaphore of {slots} slot{'s' if slots > 1 else ''}"


def _place(holder: protocol.Holder) -> tuple[bool, int]:
    """Where `holder` stands in a backend's queue (its token, or its place while it waits);
    parties outside the queue (processes flocking a lock file) after it, in their order."""
    return holder.token is None, holder.token or 0


def checked_names(names: list[str]) -> list[str]:
    """`names` without repeats, each valid; else raises InvalidName (as the client does)."""
    unique = list(dict.fromkeys(names))
    problem = protocol.names_problem(unique)
    if problem is not None:
        raise errors.InvalidName(problem)
    return unique

