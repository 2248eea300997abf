"""The trio shell around the lock service: it accepts connections, runs their sessions, the
timer and the backend's slow takes, and carries out the service's orders (lockd.orders).
The service decides; this only does the I/O.

Invariants:
- After every input given to the service, its orders are carried out before the handler
  returns (`_carry_out`), strictly in order, including those that carrying them out causes;
  so the service, the backend and the sessions agree at every await point.
- A take the backend cannot finish at once runs in a task of its own, until it answers or a
  StopTake cancels it; a cancelled take answers nothing.
- No exception of a background task (the timer, a slow take, a process watch, a backend's
  report) or of one order stops the others: a bug costs at most the request it concerns.
- Once `stop()` is called nothing more is granted and no connection is served: every client
  is told `shutdown`, and every connection closes (see `LockService.stop`).
- While the gate is shut (a re-exec, lockd.reexec) no request is handled and no connection
  accepted; what is under way (a request whose handling awaits, a refusal's look, a
  connection accepted but not yet known to the service) is counted from its start, so that
  `idle` says when the state can be handed over whole.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
from lockd_client import errors, protocol

from . import handover, listen, pidfds, procinfo
from .backend import Backend, Blocked, Claim, holders_in_order
from .config import Limits
from .logs import contained
from .metrics import Metrics
from .orders import (
    Close,
    EndEvents,
    Grant,
    LookForHolders,
    Peer,
    Publish,
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
from .service import SERVER, HistoryLook, LockService, StatusLook
from .session import Gate, Session
from .table import LockTable

if TYPE_CHECKING:
    from .config import Config
    from .history import HistoryStore

log = logging.getLogger("lockd")

#: How long a graceful shutdown waits for clients to take their `Lost` events and hang up.
SHUTDOWN_GRACE: Final = 1.0
#: History queries read at once, each in a worker thread; more wait their turn.
HISTORY_READERS: Final = 4
#: accept() errors that mean "not now" (out of descriptors or memory, a client that gave up):
#: new clients wait in the backlog while the connected ones are served. Any other is a bug.
_ACCEPT_RETRIED: Final = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO,
})


class Server:
    """Serves a lock table over listeners. Call `serve` once."""

    def __init__(
        self, table: LockTable, backend: Backend, limits: Limits, policy: Policy,
        observers: Sequence[Callable[[protocol.LeaseEvent], None]] = (), *, metrics: Metrics | None = None,
        history: HistoryStore | None = None,
    ) -> None:
        """`observers` are told every lease event (`Record`), in order; each must return at
        once and never raise (the history's writer queues). `metrics` (default: with no
        per-name series and no other sources) counts them too, and answers `Metrics`.
        `history` answers `History` requests; None: the history is off. Made within
        `trio.run`, whose clock the service keeps time by."""
        self.backend = backend
        self.metrics = Metrics(backend=backend.name) if metrics is None else metrics
        self._observers = (self.metrics.observer, *observers)
        self._history = history
        self._history_readers = trio.CapacityLimiter(HISTORY_READERS)
        self.service = LockService(
            table, Processes(pidfds.open_process), limits, policy, backend,
            # The run's clock itself: `trio.current_time` finds it anew, three calls deep,
            # each time, and a lease reads it three times.
            clock=trio.lowlevel.current_clock().current_time, wall_clock=time.time, history=history is not None,
            arrivals=self.metrics.note if self.metrics.follows_names else None, daemon_uid=os.geteuid(),
        )
        #: The ident the next connection gets.
        self.next_connection = 1
        #: The backend's takes running in tasks of their own, each with the scope that stops it.
        self._takes: dict[Claim, trio.CancelScope] = {}
        self._carrying_out = False
        self._handlers = self._order_handler_table()
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._stop = trio.Event()
        self._all_gone = trio.Event()
        self._sessions = 0
        #: Shut while a re-exec waits for a quiet moment: no session handles a request.
        self.gate = Gate()
        #: Requests whose handling awaits (a status, a history, a refusal's look): none may
        #: be under way when the state is handed over.
        self._in_flight = 0
        self._settled = trio.Event()
        #: Sessions handed over by the daemon this one re-executed from, to serve first,
        #: each with its welcome if it is still to be greeted; the Reexec request to answer.
        self._adopted: list[tuple[Session, protocol.Welcome | None]] = []
        self._answer: tuple[Peer, protocol.Reexecuted] | None = None
        #: Re-executes the daemon (lockd.reexec); None: this one cannot.
        self.reexecutor: Callable[[Peer | None, int | None], Awaitable[None]] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def serve(
        self, listeners: list[socket.socket], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on `listeners` (listening AF_UNIX sockets) until `stop()` is called;
        `task_status.started()` fires once they accept.

        After `stop()`: closes the listeners, has the service tell every client (see
        `LockService.stop`), gives them SHUTDOWN_GRACE seconds to read that and hang up,
        closes every connection and returns. Cancellation instead stops at once. Either way
        no lock that a holder still has is released: the holders' copies keep them.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_timer)
                nursery.start_soon(self.backend.run, self._backend_lost)
                for session, welcome in self._adopted:
                    nursery.start_soon(self._run_session, session, welcome)
                self._adopted = []
                self._carry_out()  # the adopted takes, watches and deadlines
                if self._answer is not None:
                    self._answer[0].send(self._answer[1])
                    self._answer = None
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                task_status.started()
                await self._stop.wait()
                for listener in listeners:
                    listen.close(listener)
                self.service.stop()
                self._carry_out()
                if self._sessions:
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        await self._all_gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                if listener.fileno() != -1:
                    listen.close(listener)
            self.service.log_every_summary()

    def stop(self) -> None:
        """Begin a graceful shutdown; `serve` returns once it is done."""
        self._stop.set()

    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._nursery is not None
        while True:
            if self.gate.shut:
                # New clients wait in the listen queue, which a re-exec hands over whole.
                await self.gate.opened()
            try:
                sock = await listen.accept(listener)
            except trio.ClosedResourceError:
                return  # shutting down
            except OSError as exc:
                if listener.fileno() == -1:
                    return  # closed by stop() between two accepts
                if exc.errno not in _ACCEPT_RETRIED:
                    raise
                log.warning("cannot accept a connection: %s; retrying in 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            # Before the next checkpoint: a re-exec's state then has every connection accepted.
            connected = self._connect(sock)
            if connected is not None:
                self._nursery.start_soon(self._run_session, *connected)

    # --- sessions -----------------------------------------------------------------------------

    def _connect(self, sock: socket.socket) -> tuple[Session, protocol.Welcome | None] | None:
        """The session of a connection just accepted, known to the service, and its welcome;
        None if the peer cannot be told (the socket is closed)."""
        service = self.service
        try:
            pid, uid, gid = procinfo.peer_credentials(sock)
        except OSError as exc:
            service.unreadable_peer(str(exc))
            self._carry_out()
            sock.close()
            return None
        session = Session(sock, self.next_connection, self._disconnected)
        self.next_connection += 1
        welcome = service.connect(
            session, pid, uid, gid, procinfo.peer_groups(sock, pid, gid), procinfo.command_line(pid),
        )
        self._carry_out()
        return session, welcome

    async def _run_session(self, session: Session, welcome: protocol.Welcome | None) -> None:
        service = self.service
        self._sessions += 1
        try:
            await session.serve(welcome, self._dispatch, service.limits, self.gate)
        finally:
            self._sessions -= 1
            if service.stopping and not self._sessions:
                self._all_gone.set()

    def _disconnected(self, session: Session) -> None:
        try:
            self.service.disconnected(session, session.close_reason or "")
        finally:
            self._carry_out()

    def _dispatch(self, session: Session, message: object) -> Awaitable[None] | None:
        """Handle one request (a `session.Handler`): the awaitable returned for a status or a
        history must be awaited, or it is never answered."""
        try:
            look = self.service.request(session, message)
        finally:
            self._carry_out()
        if look is None:
            return None
        if isinstance(look, HistoryLook):
            return self._settling(self._read_history(session, look))
        return self._settling(self._status(session, look))

    async def _settling(self, handling: Awaitable[None], *, counted: bool = False) -> None:
        """Await `handling`, counted as a request under way (see `settled`) from now on, or
        from when it was ordered (`counted`)."""
        if not counted:
            self._in_flight += 1
        try:
            await handling
        finally:
            self._done()

    def _done(self) -> None:
        """Something counted under way is done."""
        self._in_flight -= 1
        if not self._in_flight:
            self._settled.set()

    async def settled(self) -> None:
        """Return once nothing is under way: no request is being handled, no refusal waits
        for its look, no connection accepted waits to be known (see `idle`)."""
        while self._in_flight:
            self._settled = trio.Event()
            await self._settled.wait()

    @property
    def idle(self) -> bool:
        """Whether nothing is under way. With the gate shut, only the timer, the backend and
        process exits can start something (a refusal's look): the state can be handed over
        while this holds, with no await in between."""
        return not self._in_flight

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called."""
        return self._stop.is_set()

    async def _read_history(self, session: Session, look: HistoryLook) -> None:
        """Read the history in a worker thread, then have the service answer. Cancellation
        waits for the read (a bounded query) and sends nothing."""
        assert self._history is not None, "the service asks for no history when it is off"
        read = partial(self._history.read, look.names, look.since, look.until, look.limit, look.uid, look.before)
        page: tuple[list[protocol.LeaseEvent], protocol.HistoryCursor | None] | errors.LockdError
        try:
            page = await trio.to_thread.run_sync(read, limiter=self._history_readers)
        except errors.LockdError as exc:
            page = exc
        try:
            self.service.history_reply(session, look, page)
        finally:
            self._carry_out()

    async def _status(self, session: Session, look: StatusLook) -> None:
        """Look at the host's locks as `look` says, then have the service answer with the
        table as it is by then. Cancellation: nothing is sent."""
        outside = await self.backend.outside_holders_of(look.look_for, every_file=look.every_file)
        try:
            self.service.status_reply(session, look, outside, self.backend.outside_waiters_of(look.shown(outside)))
        finally:
            self._carry_out()

    # --- orders -------------------------------------------------------------------------------

    def _carry_out(self) -> None:
        """Carry out the service's orders, and those they cause, in order."""
        if self._carrying_out:
            return  # an outer call is carrying out the queue
        self._carrying_out = True
        orders, handlers = self.service.orders, self._handlers
        try:
            while orders:
                order = orders.popleft()
                try:
                    handlers[type(order)](order)
                except Exception:
                    log.exception("internal error carrying out %r; ending that request", order)
                    with contained("ending the request of %r", order):
                        self.service.order_failed(order)
        finally:
            self._carrying_out = False

    def _order_handler_table(self) -> dict[type, Callable[[Any], None]]:
        """How each kind of order is carried out: a lookup by its type, where a chain of
        isinstance tests cost up to a dozen calls per order on every request's path."""
        return {
            Send: self._send, StartTake: self._take, Grant: self._grant, Release: self._release,
            Record: self._record, StopTake: self._stop_take, Close: self._close,
            LookForHolders: self._look, Watch: self._watch_order, Unwatch: self._unwatch,
            SendMetrics: self._send_metrics, Publish: self._publish, EndEvents: self._end_events,
            WakeAt: self._wake_at, StartReexec: self._start_reexec,
        }

    @staticmethod
    def _send(order: Send) -> None:
        order.peer.send(order.message)

    def _grant(self, order: Grant) -> None:
        fds = self.backend.descriptors(order.claim)
        try:
            order.peer.send(
                protocol.Granted(order.request_id, order.tokens, len(fds)), fds,
                partial(self._undelivered, order.claim),
            )
        except errors.LimitExceeded as exc:
            self.service.grant_unsendable(order.claim, exc)

    def _undelivered(self, claim: Claim) -> None:
        """A grant of `claim` never reached its client (`Session.send`'s `undelivered`): at
        once, or later, when the replies held back with it were dropped."""
        try:
            self.service.grant_undelivered(claim)
        finally:
            self._carry_out()

    def _release(self, order: Release) -> None:
        self.backend.drop(order.claim, unlock=order.unlock)

    def _record(self, order: Record) -> None:
        # As `contained` does, inline: two events per lease pass here, to every observer.
        event = order.event
        for observe in self._observers:
            try:
                observe(event)
            except Exception:
                log.exception("internal error telling %r of %r; carrying on", observe, event)

    def _stop_take(self, order: StopTake) -> None:
        scope = self._takes.pop(order.claim, None)
        if scope is not None:
            scope.cancel()

    @staticmethod
    def _close(order: Close) -> None:
        order.peer.close(order.reason)

    def _look(self, order: LookForHolders) -> None:
        # A look takes milliseconds, so these tasks are no more than the requests refused
        # within that time.
        assert self._nursery is not None
        # Counted from the order on, as its refusal is: a task begins even if cancelled.
        self._in_flight += 1
        self._nursery.start_soon(partial(self._settling, self._look_for_holders(order), counted=True))

    def _watch_order(self, order: Watch) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, order.owner)

    @staticmethod
    def _unwatch(order: Unwatch) -> None:
        pidfds.close(order.owner)

    def _publish(self, order: Publish) -> None:
        if self.service.subscribed(order.peer, order.subscription_id) and not order.peer.offer(
            order.subscription_id, protocol.Event(order.subscription_id, order.event)
        ):
            self.service.subscriber_lagging(order.peer, order.subscription_id)

    @staticmethod
    def _end_events(order: EndEvents) -> None:
        order.peer.end_events(order.subscription_id, order.notice)

    def _wake_at(self, order: WakeAt) -> None:
        if self._timer is not None and order.deadline < self._timer.deadline:
            self._timer.deadline = order.deadline

    def _start_reexec(self, order: StartReexec) -> None:
        if self.reexecutor is None:
            self.service.reexec_refused(order.peer, order.request_id, "this daemon was not started to re-execute")
            return
        assert self._nursery is not None
        self._nursery.start_soon(self.reexecutor, order.peer, order.request_id)

    def reexec(self) -> None:
        """Re-execute the daemon in place (SIGUSR2), as a `Reexec` request would."""
        self._start_reexec(StartReexec(None, None))

    def reexec_refused(self, peer: Peer | None, request_id: int | None, reason: str) -> None:
        try:
            self.service.reexec_refused(peer, request_id, reason)
        finally:
            self._carry_out()

    # --- re-exec ------------------------------------------------------------------------------

    def hand_over(
        self, *, config: Config, listeners: list[handover.ListenerState],
        metrics_listener: handover.ListenerState | None, history: list[protocol.LeaseEvent], paused_at: float,
        reply_to: handover.ReplyTo | None,
    ) -> handover.State:
        """The state the re-executed program adopts (`adopt`): the service's and the
        backend's parts, with what the caller adds (see lockd.handover.State). Changes
        nothing; call it once `idle` with the gate shut, and exec before the next await."""
        part = self.service.hand_over()
        backend_state, backend_fds = self.backend.hand_over(part.claims)
        return handover.State(
            version=handover.VERSION, server=SERVER, paused_at=paused_at, config=config, listeners=listeners,
            metrics_listener=metrics_listener, connections=part.connections, tickets=part.tickets,
            processes=part.processes, next_arrival=part.next_arrival, next_connection=self.next_connection,
            backend=self.backend.name, backend_state=backend_state, backend_descriptors=backend_fds,
            history=history, reply_to=reply_to,
        )

    def adopt(self, state: handover.State, paused: float) -> None:
        """Take over what the daemon this one re-executed from handed over, before `serve`:
        its sessions are served first, its takes start again, its Reexec is answered.

        Raises what a state this program cannot take over raises (ValueError for one that
        breaks an invariant): then every descriptor the state names but its listeners' is
        closed, and this server must not serve (make another).
        """
        sessions: dict[int, Session] = {}
        try:
            for connection in state.connections:
                if connection.session is not None:
                    session = Session(socket.socket(fileno=connection.session.fd), connection.client.ident,
                                      self._disconnected)
                    sessions[session.ident] = session
                    session.adopt(connection.session, connection.client.label, self.service.limits.max_frame)
            claims, welcomes = self.service.adopt(state, dict(sessions))
            self.backend.adopt(state.backend_state, claims)
        except BaseException:
            for session in sessions.values():
                session.discard()
            for fd in [p.pidfd for p in state.processes] + state.backend_descriptors:
                os.close(fd)
            raise
        for fd in handover.descriptors(state):
            os.set_inheritable(fd, False)
        for session in sessions.values():
            session.sock.setblocking(False)
        self.next_connection = state.next_connection
        self._adopted = [(session, welcomes.get(session)) for session in sessions.values()]
        if state.reply_to is not None and (asker := sessions.get(state.reply_to.connection)) is not None:
            self._answer = asker, protocol.Reexecuted(state.reply_to.request_id, state.server, SERVER, paused)

    def render_metrics(self) -> bytes:
        """The daemon's metrics, in the Prometheus text format (see lockd.metrics)."""
        return self.metrics.render(self.service, len(self.service.clients), trio.current_time())

    def _send_metrics(self, order: SendMetrics) -> None:
        try:
            text = self.render_metrics().decode()
        except Exception:
            log.exception("internal error rendering the metrics")
            order.peer.send(protocol.Error(
                order.request_id, protocol.ErrorCode.UNAVAILABLE, "internal error in lockd (it is logged); retry",
            ))
            return
        order.peer.send(protocol.MetricsReply(order.request_id, text))

    def _take(self, order: StartTake) -> None:
        claim = order.claim
        if not self.service.taking(claim):
            return  # ended while the order waited: its StopTake and Release follow
        try:
            tokens = self.backend.take_now(claim)
        except Exception as exc:
            self.service.take_failed(claim, exc)
            return
        if tokens is not None:
            self.service.taken(claim, tokens)
            return
        assert self._nursery is not None
        scope = self._takes[claim] = trio.CancelScope()
        self._nursery.start_soon(self._take_slowly, claim, scope)

    async def _take_slowly(self, claim: Claim, scope: trio.CancelScope) -> None:
        """Wait for the backend (a lock held outside lockd, a remote host). Cancelled by
        StopTake: then nothing is reported."""
        failure: Exception | None = None
        tokens: list[int] = []
        with scope:
            try:
                tokens = await self.backend.take(claim, partial(self._take_waits, claim))
            except Exception as exc:
                failure = exc
        if scope.cancelled_caught or self._takes.pop(claim, None) is None:
            return  # stopped (maybe just as the take ended): the service has done the rest
        try:
            with contained("ending the take of %s", claim):
                if failure is None:
                    self.service.taken(claim, tokens)
                elif isinstance(failure, Blocked):
                    self.service.take_blocked(claim)
                else:
                    self.service.take_failed(claim, failure)
        finally:
            self._carry_out()

    def _take_waits(self, claim: Claim, holders: list[protocol.Holder]) -> None:
        if claim in self._takes:  # its cancellation reaches the take only at its next await
            try:
                self.service.take_waits(claim, holders)
            finally:
                self._carry_out()

    async def _look_for_holders(self, order: LookForHolders) -> None:
        """Find who holds `order.names` outside lockd ([] if the look fails: it only serves to
        name them in a refusal)."""
        try:
            found = await self.backend.outside_holders_of(list(order.names))
        except Exception:
            log.exception("internal error looking for the holders of %s; carrying on", ", ".join(order.names))
            found = {}
        try:
            with contained("refusing %r", order):
                self.service.holders_found(order, holders_in_order(found, order.names))
        finally:
            self._carry_out()

    async def _watch(self, owner: ProcessOwner) -> None:
        if await pidfds.exited(owner):
            try:
                with contained("ending the leases of process %d", owner.pid):
                    self.service.process_exited(owner)
            finally:
                self._carry_out()

    def _backend_lost(self, claim: Claim, reason: str) -> None:
        try:
            self.service.lost(claim, reason)
        finally:
            self._carry_out()

    # --- time ---------------------------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Wake the service when it is next due (a WakeAt pulls the time in)."""
        while True:
            with trio.CancelScope(deadline=self.service.next_wake()) as scope:
                self._timer = scope
                await trio.sleep_forever()
            try:
                self.service.wake()
            finally:
                self._carry_out()
