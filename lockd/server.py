"""The lock service: requests from sessions go to the lock table, and the table's effects go
out to the backend and the sessions.

Invariants:
- Every change to the table is carried out by `_apply` before the change's caller returns:
  effects join one queue and are carried out strictly in order, including those that
  carrying them out causes (a client cut off while a reply is sent to it ends its tickets on
  the spot). So each Take is carried out before its Drop, and the table, the sessions, the
  process owners and the backend agree at every await point.
- A ticket that ends is forgotten by its session and its process (`_forget`) as it ends, so
  no limit counts it and its request id is free again, unless its refusal is still to be
  sent: then the session keeps the id reserved until it is.
- No exception of a background task (timer, slow take, process watch, a backend's report) or
  of one effect stops the others: a bug costs at most the ticket it concerns.
- Once `stop()` is called nothing more is granted and no connection is served: every client
  is told `shutdown`, and every connection closes. Held leases are reported lost only where
  the backend's leases do not outlive the daemon; elsewhere their holders keep the locks
  through their copies of the lock-file descriptors, and their work goes on.
- A lease's locks are released for every copy of their descriptors only when it was released
  (by its holder, or by `release_pid`), or broken by force and then let go or overdue (see
  lockd.table); when its holder goes away, only the daemon's own copies are closed.
- What clients do wrong (connections cut off or refused, requests refused by policy) is
  logged through `_log_noise`, within the budget of `loglimit`, and what is over it is summed
  up once its window ends, or at the end; what a client sent is quoted short and inert. (Lines
  about work done, a forced release or a failing backend, are not limited: a client can only
  cause them by using lockd as it may.)
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import trio

from lockd_client import errors, protocol
from lockd_client.describe import holder_text

from . import __version__, admission, listen, procinfo
from .backend import Backend, Blocked, Claim, holders_in_order
from .config import Limits
from .loglimit import Kind, LogLimiter, Summary
from .policy import Policy
from .processes import ProcessOwner, Processes
from .session import Party, Session, party, shown_label
from .table import (
    BREAKING, ENDED, HELD, TAKING, Drop, Effect, Ending, Granted, LockTable, Lost, Queued, Reason, Refused,
    Take, Ticket,
)

log = logging.getLogger("lockd")

#: How long a graceful shutdown waits for clients to take their `Lost` events and hang up.
SHUTDOWN_GRACE = 1.0
SHUTDOWN_MESSAGE = "lockd is shutting down; reconnect when it is back"
#: The states `status` shows as holding: a broken lease holds until its owner has let go.
_SHOWN_HELD = (HELD, BREAKING)
#: What clients do wrong, logged within bounds (see loglimit).
CUT_OFF = Kind(logging.INFO, "cut off {count} more connections")
REFUSED_CONNECTION = Kind(logging.WARNING, "refused {count} more connections")
UNREADABLE_PEER = Kind(
    logging.WARNING, "dropped {count} more connections whose peer credentials were unreadable"
)
REFUSED_REQUEST = Kind(logging.WARNING, "refused {count} more requests by policy")



class Server:
    """Serves the lock table over listeners. Call `serve` once."""

    def __init__(self, table: LockTable, backend: Backend, limits: Limits, policy: Policy) -> None:
        self.table = table
        self.backend = backend
        #: Both may be replaced while serving (configuration reload).
        self.limits = limits
        self.policy = policy
        self.sessions: set[Session] = set()
        #: uid → its sessions, for the per-uid limits.
        self._uid_sessions: dict[int, set[Session]] = {}
        #: uid → how many names the live tickets asked for by its connections cover, counted
        #: from request to end: a process-tied lease still counts once its connection is gone.
        self._uid_names: dict[int, int] = {}
        self._counted: set[Ticket] = set()
        self._session_ids = itertools.count(1)
        #: Tickets the backend is taking in a task of their own, each with the scope that stops it.
        self._takes: dict[Ticket, trio.CancelScope] = {}
        #: The tickets the backend was asked to take, by their claim, until their Drop.
        self._claimed: dict[Claim, Ticket] = {}
        self._processes = Processes(self._process_exited)
        self._effects: deque[Effect] = deque()
        self._applying = False
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._stop = trio.Event()
        self._stopping = False
        self._all_gone = trio.Event()
        #: time.time() - trio.current_time(), fixed when serving starts.
        self._wall_offset = 0.0
        self._noise = LogLimiter()
        #: Wakes `_summarise_noise` when the next summary is due.
        self._noise_timer: trio.CancelScope | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def serve(self, listeners: list[socket.socket], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve on `listeners` (listening AF_UNIX sockets) until `stop()` is called;
        `task_status.started()` fires once they accept.

        After `stop()`: closes the listeners, grants nothing more, reports every lease lost
        unless the backend's leases outlive the daemon, tells every client the daemon is
        shutting down, gives them SHUTDOWN_GRACE seconds to read that and hang up, closes every
        connection and returns. Cancellation instead stops at once. Either way no lock that a
        holder still has is released: the holders' copies keep them.
        """
        self._wall_offset = time.time() - trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_timer)
                nursery.start_soon(self._summarise_noise)
                nursery.start_soon(self.backend.run, self._backend_lost)
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                task_status.started()
                await self._stop.wait()
                await self._shut_down(listeners)
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                if listener.fileno() != -1:
                    listen.close(listener)
            self._log_summaries(self._noise.flush)

    def stop(self) -> None:
        """Begin a graceful shutdown; `serve` returns once it is done."""
        self._stop.set()

    async def _shut_down(self, listeners: list[socket.socket]) -> None:
        self._stopping = True
        for listener in listeners:
            listen.close(listener)
        reason = "the daemon is shutting down"
        if not self.backend.leases_outlive_daemon:
            for owner in [*self.sessions, *self._processes.owners()]:
                for ticket in self.table.tickets_of(owner):
                    if ticket.state is HELD:
                        # What this grants is never taken (see `_take`) and ends below.
                        with _contained(f"reporting {ticket} lost at shutdown"):
                            self._apply(self.table.lose(ticket, reason))
        goodbye = protocol.Error(None, protocol.ErrorCode.SHUTDOWN, SHUTDOWN_MESSAGE)
        for session in list(self.sessions):
            session.send(goodbye)
            session.close(reason)
        if self.sessions:
            with trio.move_on_after(SHUTDOWN_GRACE):
                await self._all_gone.wait()

    def _backend_lost(self, claim: Claim, reason: str) -> None:
        ticket = self._claimed.get(claim)
        if ticket is None:
            return  # dropped meanwhile
        with _contained(f"ending the lost lease {ticket}"):
            if ticket.state is HELD:
                self._apply(self.table.lose(ticket, reason))
            elif ticket.state is not ENDED:  # not granted yet: the request fails
                self._take_failed(ticket, party(ticket), errors.DaemonUnavailable(reason))

    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._nursery is not None
        while True:
            try:
                sock = await listen.accept(listener)
            except trio.ClosedResourceError:
                return  # shutting down
            except OSError as exc:
                # Out of descriptors (EMFILE...) or a client that gave up (ECONNABORTED): new
                # clients wait in the backlog; serving the connected ones goes on.
                log.warning("cannot accept a connection: %s; retrying in 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            self._nursery.start_soon(self._serve_connection, sock)

    # --- sessions -----------------------------------------------------------------------------

    async def _serve_connection(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = procinfo.peer_credentials(sock)
        except OSError as exc:
            self._log_noise(
                UNREADABLE_PEER, None, str(exc),
                "dropping a connection whose peer credentials are unreadable: %s", exc,
            )
            sock.close()
            return
        session = Session(
            sock, next(self._session_ids), pid, uid, gid, procinfo.peer_groups(sock, pid, gid),
            procinfo.command_line(pid), self._end_session,
        )
        if self._stopping:
            session.send(protocol.Error(None, protocol.ErrorCode.SHUTDOWN, SHUTDOWN_MESSAGE))
            session.close("the daemon is shutting down")
        elif refusal := admission.connection_refusal(
            self.limits, len(self.sessions), len(self._uid_sessions.get(uid, ())), uid
        ):
            self._log_noise(
                REFUSED_CONNECTION, uid, refusal,
                "refusing a connection from uid %d pid %d (%s): %s", uid, pid, session.command, refusal,
            )
            session.send(protocol.Error(None, protocol.ErrorCode.LIMIT, refusal))
            session.close(refusal)
        else:
            self.sessions.add(session)
            self._uid_sessions.setdefault(uid, set()).add(session)
            log.debug("%r connected: %s", session, session.command)
        # What this client is promised now holds for it even if a reload shortens the grace.
        session.break_grace = self.limits.break_grace
        notice = self.backend.loss_notice
        welcome = protocol.Welcome(
            protocol.PROTOCOL_VERSION, f"lockd {__version__}", self.backend.name, self.limits.max_frame,
            leases_outlive_daemon=self.backend.leases_outlive_daemon,
            stop_within=session.break_grace if notice is None else min(notice, session.break_grace),
        )
        try:
            await session.serve(welcome, self._dispatch, self.limits)
        finally:
            if session in self.sessions:
                self._left(session)

    def _left(self, session: Session) -> None:
        self.sessions.remove(session)
        of_uid = self._uid_sessions[session.uid]
        of_uid.remove(session)
        if not of_uid:
            del self._uid_sessions[session.uid]
        if self._stopping and not self.sessions:
            self._all_gone.set()

    def _end_session(self, session: Session) -> None:
        """The session closed: end its tickets now (its process-tied leases live on)."""
        reason = session.close_reason or ""
        if session in self.sessions and not self._stopping and not reason.startswith("the client"):
            self._log_noise(CUT_OFF, session.uid, reason, "%r cut off: %s", session, reason)
        with _contained(f"ending the tickets of {session!r}"):
            for ticket in self.table.tickets_of(session):
                self._forget(ticket)
            session.forget_all()
            self._apply(self.table.drop_owner(session))

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, session: Session, message: object) -> Awaitable[None] | None:
        """Handle one request (a `session.Handler`): the awaitable returned for a request that
        has to wait must be awaited, or that request is never answered."""
        if isinstance(message, protocol.Acquire):
            self._acquire(session, message)
        elif isinstance(message, protocol.Release):
            self._release(session, message.id)
        elif isinstance(message, protocol.Status):
            return self._status(session, message)
        elif isinstance(message, protocol.ReleasePid):
            self._release_pid(session, message)
        elif isinstance(message, protocol.ForceRelease):
            self._force_release(session, message)
        else:
            session.fail(f"unexpected {type(message).__name__} message")
        return None

    def _error(self, session: Session, request_id: int, exc: errors.LockdError) -> None:
        code = exc.code or protocol.ErrorCode.PROTOCOL
        holders = exc.holders if isinstance(exc, errors.LockBusy) else []
        session.send(protocol.Error(request_id, code, str(exc), holders))

    def _acquire(self, session: Session, request: protocol.Acquire) -> None:
        try:
            names = _checked_names(request.names)
            if session.in_use(request.id):
                raise errors.ProtocolError(f"request id {request.id} is already in use on this connection")
            timeout = request.timeout
            if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
                raise errors.ProtocolError(f"timeout must be a finite number >= 0, not {timeout}")
            refusal = admission.acquire_refusal(
                self.limits, names, waits=timeout != 0, requests=session.names,
                pending=self._pending(session), waiting_on=self.table.waiting_on,
                uid_requests=self._uid_names.get(session.uid, 0),
                uid_pending=lambda: sum(map(self._pending, self._uid_sessions.get(session.uid, ()))),
            ) or self.policy.check_acquire(session.uid, session.gids, names, request.mode)
            if isinstance(refusal, errors.PermissionDenied):
                self._log_noise(
                    REFUSED_REQUEST, session.uid, str(refusal),
                    "refused uid %d pid %d (%s) %s on %s: %s", session.uid, session.pid,
                    session.command, request.mode, ", ".join(names), refusal,
                )
            if refusal is not None:
                raise refusal
            process = self._processes.owner(session.uid, request.pid) if request.pid is not None else None
            if process is not None and timeout is None:
                _refuse_a_second_lease(process, names)
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        label = session.label if request.label is None else shown_label(request.label)
        shared, wait = request.mode == "shared", timeout != 0
        if process is not None:
            claim = Claim(tuple(names), shared, wait, process.pid, process.uid, None,
                          procinfo.command_line(process.pid), label)
        else:
            claim = Claim(tuple(names), shared, wait, session.pid, session.uid, session.gid, session.command, label)
        info = Party(session, request.id, claim, process)
        now = trio.current_time()
        deadline = now + timeout if timeout else None
        ticket, effects = self.table.acquire(
            session, names, shared=shared, wait=wait,
            deadline=deadline, now=now, info=info,
        )
        if ticket.state is not ENDED:  # else refused at once: `_refused` discards the process
            session.remember(request.id, ticket)
            self._counted.add(ticket)
            self._uid_names[session.uid] = self._uid_names.get(session.uid, 0) + len(ticket.names)
            if process is not None:
                assert self._nursery is not None
                self._processes.attach(process, ticket, self._nursery)
        if deadline is not None:
            self._wake_timer(deadline)
        self._apply(effects)

    def _release(self, session: Session, request_id: int) -> None:
        ticket = session.tickets.get(request_id)
        if ticket is not None:
            self._forget(ticket)
            self._apply(self.table.release(ticket))
        else:
            session.unreserve(request_id)  # withdrawn: its refusal is not sent

    def _release_pid(self, session: Session, request: protocol.ReleasePid) -> None:
        try:
            wanted = set(_checked_names(request.names))
            owner = self._processes.find(request.pid)
            if owner is not None and session.uid not in (0, owner.uid):
                raise errors.PermissionDenied(
                    f"the leases of process {request.pid} belong to uid {owner.uid}; only that user or root may release them"
                )
            held = self.table.tickets_of(owner) if owner is not None else []
            released = [t for t in held if not wanted.isdisjoint(t.names)]
            missing = wanted.difference(*(t.names for t in released))
            for ticket in released:
                holder = party(ticket)
                self._forget(ticket)
                if holder.session is not session and ticket.state is HELD:
                    holder.session.send(protocol.Lost(
                        holder.request_id, f"released by uid {session.uid} (pid {session.pid}: {session.command})",
                    ))
                self._apply(self.table.release(ticket))
            if missing:
                raise errors.NotHeld(
                    f"process {request.pid} holds no lease on {', '.join(sorted(missing))}"
                    + (f" (released {len(released)} other)" if released else "")
                )
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        log.debug("%r released %d lease(s) of process %d", session, len(released), request.pid)
        session.send(protocol.Done(request.id, len(released)))

    def _force_release(self, session: Session, request: protocol.ForceRelease) -> None:
        try:
            (name,) = _checked_names([request.name])
            holders = [t for t in self.table.holders(name) if t.state in _SHOWN_HELD]
            decision = self.policy.check_force(session.uid, name, [party(t).claim.uid for t in holders])
            if not decision.allowed:
                self._log_noise(
                    REFUSED_REQUEST, session.uid, decision.reason,
                    "refused uid %d pid %d (%s) a forced release of %s: %s",
                    session.uid, session.pid, session.command, name, decision.reason,
                )
                raise decision.error()
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        reason = f"forcibly released by uid {session.uid} (pid {session.pid}: {session.command})"
        grace = max([self.limits.break_grace, *(party(t).session.break_grace for t in holders)])
        grace_until = trio.current_time() + grace
        count, effects = self.table.force_release(name, reason, grace_until=grace_until)
        self._wake_timer(grace_until)
        for ticket in holders:
            holder = party(ticket)
            log.warning("%s: lease of pid %s (uid %s) broken, %s", name, holder.claim.pid, holder.claim.uid, reason)
        self._apply(effects)
        session.send(protocol.Done(request.id, count))

    async def _status(self, session: Session, request: protocol.Status) -> None:
        """Answer with the holders and waiters of the names asked for (or of every name).

        Outside holders are looked for first, in one look at the host's locks: of the names
        asked for; for a status of everything, of the names lockd does not hold and of every
        other lock file (and every name another host holds, from a backend shared by hosts).
        Names no lockd client holds may be held elsewhere: by another host (the backend knows
        those), or by a process flocking the file (only a look at the host tells). The table
        is read after the look, so what lockd itself holds is shown as it is when answered: a
        name lockd let go of during the look was not looked for, and an outside holder that
        conflicts with lockd's holders has let go since, so it is left out. Where the backend
        orders requests, holders and waiters are listed in its order. Cancellation: nothing is
        sent.
        """
        try:
            if request.names:
                names = _checked_names(request.names)
            else:
                names = list(dict.fromkeys([*self.table.names(), *self.backend.outside_names()]))
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        outside = await self.backend.outside_holders_of(
            [name for name in names if request.names or not self._held(name)],
            every_file=not request.names,
        )
        names += [name for name in outside if name not in names]
        outside_waiting = self.backend.outside_waiters_of(names)
        locks = []
        for name in names:
            holding = self.table.holders(name)
            held = [t for t in holding if t.state in _SHOWN_HELD]
            waiting = [t for t in holding if t.state is TAKING] + self.table.waiters(name)
            holders = [self._holder(t, name) for t in held]
            if not held:
                holders += outside.get(name, [])
            elif held[0].shared:
                holders += [h for h in outside.get(name, []) if h.mode == "shared"]
            waiters = [self._holder(t, name) for t in waiting] + outside_waiting.get(name, [])
            if self.backend.orders_requests:
                # One queue for every host: the backend's (tokens and places sort in it).
                holders.sort(key=_place)
                waiters.sort(key=_place)
            if holders or waiters:
                locks.append(protocol.LockInfo(name, holders[0].mode if holders else None, holders, waiters))
        session.send(protocol.StatusReply(request.id, locks))

    def _held(self, name: str) -> bool:
        return any(t.state in _SHOWN_HELD for t in self.table.holders(name))

    def _holder(self, ticket: Ticket, name: str) -> protocol.Holder:
        who = party(ticket).claim
        # Not granted yet: its place in a backend's queue, shown as other hosts' waiters are.
        token = ticket.tokens[ticket.names.index(name)] if ticket.tokens else self.backend.place_of(who)
        return protocol.Holder(
            pid=who.pid, uid=who.uid, gid=who.gid, command=who.command, label=who.label,
            since=ticket.since + self._wall_offset, mode="shared" if ticket.shared else "exclusive",
            token=token,
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

    # --- process-tied leases ------------------------------------------------------------------

    def _process_exited(self, owner: ProcessOwner) -> None:
        """End every ticket tied to the process: a lease is lost, a request fails."""
        tickets = list(owner.tickets)
        held = [t for t in tickets if t.state is HELD]
        if held:
            log.info("process %d exited: ending its %d lease(s)", owner.pid, len(held))
        for ticket in tickets:
            who = party(ticket)
            self._forget(ticket)
            if ticket.state is HELD:
                who.session.send(protocol.Lost(who.request_id, f"process {owner.pid} exited"))
            elif ticket.state is not BREAKING:  # a broken one was told already
                who.session.send(protocol.Error(
                    who.request_id, protocol.ErrorCode.NOT_HELD,
                    f"process {owner.pid} exited before the lock was granted",
                ))
        # All at once: one of them waiting behind another must not be granted on its way out.
        self._apply(self.table.end(tickets))

    def _pending(self, session: Session) -> int:
        """Requests of `session` not granted yet: waiting in the table or being taken (where
        the backend orders requests, the table counts those as waiting already)."""
        if self.table.ordered_by_backend:
            return self.table.waiting_of(session)
        return self.table.waiting_of(session) + session.taking

    def _forget(self, ticket: Ticket) -> None:
        """`ticket` is ending: its request id and its tie to a process end with it."""
        who = party(ticket)
        if who.session.tickets.get(who.request_id) is ticket:
            who.session.forget(who.request_id)
        if ticket in self._counted:
            self._counted.remove(ticket)
            left = self._uid_names[who.session.uid] - len(ticket.names)
            if left:
                self._uid_names[who.session.uid] = left
            else:
                del self._uid_names[who.session.uid]
        if who.process is not None:
            self._processes.detach(who.process, ticket)

    # --- effects ------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out `effects` after those already queued, and those they cause, in order."""
        queue = self._effects
        queue.extend(effects)
        if self._applying:
            return  # an outer call is carrying out the queue
        self._applying = True
        try:
            while queue:
                effect = queue.popleft()
                try:
                    self._carry_out(effect)
                except Exception:
                    log.exception("internal error carrying out %r; ending that request", effect)
                    with _contained(f"ending {effect.ticket} after an internal error"):
                        self._end_in_error(effect.ticket)
        finally:
            self._applying = False

    def _end_in_error(self, ticket: Ticket) -> None:
        """End `ticket` after a bug: a lease is lost, a request fails."""
        if ticket.state is ENDED:
            return
        who = party(ticket)
        self._forget(ticket)
        problem = "internal error in lockd (it is logged); retry"
        if ticket.state is HELD:
            who.session.send(protocol.Lost(who.request_id, problem))
        elif ticket.state is not BREAKING:
            who.session.send(protocol.Error(who.request_id, protocol.ErrorCode.UNAVAILABLE, problem))
        # Not released: the holder may still be at work, and keeps the lock till it stops.
        self._effects.extend(self.table.end([ticket]))

    def _carry_out(self, effect: Effect) -> None:
        ticket = effect.ticket
        who = party(ticket)
        if isinstance(effect, Take):
            self._take(ticket, who)
        elif isinstance(effect, Granted):
            self._granted(ticket, who)
        elif isinstance(effect, Drop):
            self._forget(ticket)
            scope = self._end_take(ticket)
            if scope is not None:
                scope.cancel()
            if effect.ending is Ending.OVERDUE:
                log.warning(
                    "%s: the broken lease of pid %s was not let go within limits.break_grace; "
                    "releasing its locks under it", ", ".join(ticket.names), who.claim.pid,
                )
            self._drop(ticket, who.claim, unlock=effect.ending is not Ending.ABANDONED)
        elif isinstance(effect, Queued):
            who.session.send(protocol.Queued(who.request_id, self._in_way(ticket, effect.blockers)))
        elif isinstance(effect, Refused):
            self._refused(ticket, who, effect)
        elif isinstance(effect, Lost):
            self._lost(ticket, who, effect.reason)

    def _take(self, ticket: Ticket, who: Party) -> None:
        if self._stopping or ticket.state is not TAKING:
            # Shutting down, or ended while this Take waited in the queue: its Drop follows,
            # and nothing is held for it.
            return
        self._claimed[who.claim] = ticket
        try:
            tokens = self.backend.take_now(who.claim)
        except errors.LockdError as exc:
            self._take_failed(ticket, who, exc)
            return
        if tokens is not None:
            self._apply(self.table.taken(ticket, tokens, now=trio.current_time()))
            return
        scope = trio.CancelScope()
        self._takes[ticket] = scope
        who.session.taking += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._take_slowly, ticket, who, scope)

    def _blocked(self, ticket: Ticket, holders: list[protocol.Holder]) -> None:
        """The backend waits for `holders`, outside the table: tell the client, unless the
        request ended meanwhile (its cancellation reaches the take only at its next await)."""
        if ticket in self._takes:
            who = party(ticket)
            who.session.send(protocol.Queued(who.request_id, holders))

    def _end_take(self, ticket: Ticket) -> trio.CancelScope | None:
        scope = self._takes.pop(ticket, None)
        if scope is not None:
            party(ticket).session.taking -= 1
        return scope

    async def _take_slowly(self, ticket: Ticket, who: Party, scope: trio.CancelScope) -> None:
        """Wait for the backend (a lock held outside lockd, a remote host). Cancelled by Drop."""
        failure: Exception | None = None
        with scope:
            try:
                tokens = await self.backend.take(who.claim, partial(self._blocked, ticket))
            except Exception as exc:
                failure = exc
        if scope.cancelled_caught or self._end_take(ticket) is None:
            return  # dropped (maybe just as the take ended): the Drop has done the rest
        with _contained(f"ending the take of {ticket}"):
            if failure is None:
                self._apply(self.table.taken(ticket, tokens, now=trio.current_time()))
            elif isinstance(failure, Blocked):
                self._apply(self.table.take_blocked(ticket))
            elif isinstance(failure, errors.LockdError):
                self._take_failed(ticket, who, failure)
            else:
                log.error("internal error taking %s", ticket, exc_info=failure)
                self._take_failed(ticket, who, errors.DaemonUnavailable(
                    "internal error in lockd while taking the lock (it is logged); retry"
                ))

    def _take_failed(self, ticket: Ticket, who: Party, exc: errors.LockdError) -> None:
        log.warning("cannot take %s for pid %s: %s", ", ".join(ticket.names), who.claim.pid, exc)
        self._forget(ticket)
        who.session.send(protocol.Error(who.request_id, exc.code or protocol.ErrorCode.PROTOCOL, str(exc)))
        self._apply(self.table.release(ticket))

    def _granted(self, ticket: Ticket, who: Party) -> None:
        assert ticket.tokens is not None
        if who.process is not None:
            # From now on the process's exit ends the lease, not the connection's; while the
            # connection lasts, its Release still ends it too.
            self.table.reassign(ticket, who.process)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("granted %s to pid %s, token %s", ", ".join(ticket.names), who.claim.pid, ticket.tokens)
        fds = self.backend.descriptors(who.claim)
        who.session.send(protocol.Granted(who.request_id, ticket.tokens, len(fds)), fds)

    def _drop(self, ticket: Ticket, claim: Claim, *, unlock: bool) -> None:
        self._claimed.pop(claim, None)
        # Once the daemon stops, what the backend holds is left to the backend's own shutdown:
        # holders told their leases are lost must have stopped their work before the locks
        # can go to anyone else (an etcd lease is left to expire rather than revoked).
        if not self._stopping:
            self.backend.drop(claim, unlock=unlock)

    def _refused(self, ticket: Ticket, who: Party, effect: Refused) -> None:
        self._forget(ticket)
        holders = self._in_way(ticket, effect.blockers)
        if holders and not self.backend.orders_requests:
            _send_refusal(ticket, who, effect.reason, holders)
        else:
            # Held outside the table (where the backend orders requests, maybe on other hosts
            # as well as here): the reply names whoever holds it now, found by a look that
            # starts after the refusal and does not stall the event loop. The ticket has
            # ended already; a look takes milliseconds, so these tasks are no more than the
            # requests refused within that time.
            assert self._nursery is not None
            who.session.reserve(who.request_id)
            self._nursery.start_soon(self._refuse_naming_outside, ticket, who, effect.reason, holders)

    async def _refuse_naming_outside(
        self, ticket: Ticket, who: Party, reason: Reason, holders: list[protocol.Holder]
    ) -> None:
        """Send a refusal naming `holders` and the holders outside lockd ([] if the look
        fails: it only serves to name them), unless the client withdrew the request meanwhile."""
        try:
            found = await self.backend.outside_holders_of(list(ticket.names))
        except Exception:
            log.exception("internal error looking for the holders of %s; carrying on", ", ".join(ticket.names))
            found = {}
        if who.session.unreserve(who.request_id):
            _send_refusal(ticket, who, reason, holders + holders_in_order(found, ticket.names))

    def _lost(self, ticket: Ticket, who: Party, reason: str) -> None:
        # Its Drop forgets it: a broken lease is still the client's until it lets go.
        log.warning("lease on %s of pid %s lost: %s", ", ".join(ticket.names), who.claim.pid, reason)
        who.session.send(protocol.Lost(who.request_id, reason))

    # --- logging what clients do wrong ---------------------------------------------------------

    def _log_noise(self, kind: Kind, uid: int | None, reason: str, message: str, *args: object) -> None:
        """Log `message` about what a client did, unless lines of that kind are over their
        budget: then the event is counted for a summary (see loglimit)."""
        if self._noise.admit(kind, trio.current_time(), uid, reason):
            log.log(kind.level, message, *args)
        elif self._noise_timer is not None:
            due = self._noise.next_summary()
            if due is not None and due < self._noise_timer.deadline:
                self._noise_timer.deadline = due

    async def _summarise_noise(self) -> None:
        """Log each summary of what clients did as its window ends. `_log_noise` pulls the
        deadline in."""
        while True:
            due = self._noise.next_summary()
            with trio.CancelScope(deadline=math.inf if due is None else due) as scope:
                self._noise_timer = scope
                await trio.sleep_forever()
            self._log_summaries(lambda: self._noise.summaries(trio.current_time()))

    def _log_summaries(self, summaries: Callable[[], list[Summary]]) -> None:
        with _contained("logging what clients did"):
            for summary in summaries():
                log.log(summary.kind.level, "%s", summary.text())

    # --- time ---------------------------------------------------------------------------------

    def _wake_timer(self, deadline: float) -> None:
        """A deadline was added to the table: have the timer wake for it if it is the next."""
        if self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline

    async def _run_timer(self) -> None:
        """Expire waiting requests at their deadlines. `_acquire` pulls the deadline in."""
        while True:
            deadline = self.table.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer = scope
                await trio.sleep_forever()
            with _contained("expiring requests"):
                self._apply(self.table.expire(trio.current_time()))


@contextmanager
def _contained(doing: str) -> Iterator[None]:
    """Log an exception raised while `doing` and carry on: for background work, whose
    exceptions would otherwise end the daemon and everyone's leases."""
    try:
        yield
    except Exception:
        log.exception("internal error %s; carrying on", doing)


def _refuse_a_second_lease(process: ProcessOwner, names: list[str]) -> None:
    """Raise WouldDeadlock if `process` already holds any of `names`, for a request that
    would wait for it without a bound: it would wait for itself, since the first lease ends
    only when the process releases it or exits, and the process waits for the lockctl asking
    for the second. (Shared on shared is refused too: a writer queued between them would
    make it the same wait.)"""
    mine = sorted({name for ticket in process.tickets if ticket.holding for name in ticket.names}.intersection(names))
    if mine:
        taken = ", ".join(mine)
        raise errors.WouldDeadlock(
            f"process {process.pid} already holds {taken}: a second lease on it would wait for "
            f"the first, which ends only when that process releases it or exits; release it "
            f"first (lockctl release {mine[0]}), or keep the one lease"
        )


def _checked_names(names: list[str]) -> list[str]:
    """`names` without repeats, each valid; else raises InvalidName (as the client does)."""
    unique = list(dict.fromkeys(names))
    problem = protocol.names_problem(unique)
    if problem is not None:
        raise errors.InvalidName(problem)
    return unique


def _send_refusal(ticket: Ticket, who: Party, reason: Reason, holders: list[protocol.Holder]) -> None:
    """Tell `who` its request for `ticket` is refused (busy or timed out), naming `holders`."""
    names = ", ".join(ticket.names)
    if reason is Reason.TIMEOUT:
        code, what = protocol.ErrorCode.TIMEOUT, f"{names}: timed out waiting for the lock"
    else:
        code, what = protocol.ErrorCode.BUSY, f"{names} is busy"
    who.session.send(protocol.Error(who.request_id, code, f"{what}{_held_by(holders)}", holders))


def _place(holder: protocol.Holder) -> tuple[bool, int]:
    """Where `holder` stands in a backend's queue (its token, or its place while it waits);
    parties outside the queue (processes flocking a lock file) after it, in their order."""
    return holder.token is None, holder.token or 0


def _held_by(holders: list[protocol.Holder]) -> str:
    if not holders:
        return ""
    now = time.time()
    return "; held by " + ", ".join(holder_text(holder, now) for holder in holders)
