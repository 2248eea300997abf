"""The trio shell around the lock service: it accepts connections, runs their sessions, the
timers and the backend's slow takes, and carries out the service's orders. It decides
nothing: lockd.service does.

Invariants:
- Every input goes to the service, and the orders it leaves are carried out before the
  input's handler returns (`_carry_out`), strictly in order, including those that carrying
  them out causes. So the service, the backend and the sessions agree at every await point.
- A take the backend cannot finish at once runs in a task of its own, until it answers or a
  `StopTake` cancels it; a cancelled take answers nothing.
- No exception of a background task (timer, slow take, process watch, a backend's report) or
  of one order stops the others: a bug costs at most the request it concerns.
- Once `stop()` is called nothing more is granted and no connection is served: every client
  is told `shutdown`, and every connection closes (see `LockService.stop`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import time
from collections.abc import Awaitable
from functools import partial
from typing import Final

import trio
from lockd_client import errors, protocol

from . import __version__, listen, procinfo
from .backend import Backend, Blocked, Claim, holders_in_order
from .config import Limits
from .orders import (
    Close,
    Grant,
    NameOutsideHolders,
    Order,
    Release,
    Send,
    StartTake,
    StopTake,
    SummariseAt,
    WakeAt,
    Watch,
)
from .policy import Policy
from .processes import Processes, ProcessOwner
from .service import UNREADABLE_PEER, LockService, contained
from .session import Session
from .table import LockTable, Ticket

log = logging.getLogger("lockd")

#: How long a graceful shutdown waits for clients to take their `Lost` events and hang up.
SHUTDOWN_GRACE: Final = 1.0
#: accept() errors that mean "not now" (out of descriptors or memory, a client that gave up):
#: new clients wait in the backlog while the connected ones are served. Any other is a bug.
_ACCEPT_RETRIED: Final = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO,
})


class Server:
    """Serves a lock table over listeners. Call `serve` once."""

    def __init__(self, table: LockTable, backend: Backend, limits: Limits, policy: Policy) -> None:
        self.backend = backend
        self.service = LockService(
            table, Processes(self._process_exited), limits, policy,
            leases_outlive_daemon=backend.leases_outlive_daemon, clock=trio.current_time,
        )
        self._session_ids = itertools.count(1)
        #: The backend's takes running in tasks of their own, each with the scope that stops it.
        self._takes: dict[Ticket, trio.CancelScope] = {}
        self._carrying_out = False
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._summary_timer: trio.CancelScope | None = None
        self._stop = trio.Event()
        self._all_gone = trio.Event()
        self._sessions = 0

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
        self.service.wall_offset = time.time() - trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_timer)
                nursery.start_soon(self._run_summaries)
                nursery.start_soon(self.backend.run, self._backend_lost)
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
            self.service.log_summaries(every=True)

    def stop(self) -> None:
        """Begin a graceful shutdown; `serve` returns once it is done."""
        self._stop.set()

    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._nursery is not None
        while True:
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
            self._nursery.start_soon(self._serve_connection, sock)

    # --- sessions -----------------------------------------------------------------------------

    async def _serve_connection(self, sock: socket.socket) -> None:
        service = self.service
        try:
            pid, uid, gid = procinfo.peer_credentials(sock)
        except OSError as exc:
            service.log_noise(
                UNREADABLE_PEER, None, str(exc), "dropping a connection whose peer credentials are unreadable: %s", exc,
            )
            self._carry_out()
            sock.close()
            return
        session = Session(sock, next(self._session_ids), self._disconnected)
        client = service.connect(
            session, pid, uid, gid, procinfo.peer_groups(sock, pid, gid), procinfo.command_line(pid),
        )
        self._carry_out()
        notice = self.backend.loss_notice
        grace = service.limits.break_grace if client is None else client.break_grace
        welcome = protocol.Welcome(
            protocol.PROTOCOL_VERSION, f"lockd {__version__}", self.backend.name, service.limits.max_frame,
            leases_outlive_daemon=self.backend.leases_outlive_daemon,
            stop_within=grace if notice is None else min(notice, grace),
        )
        self._sessions += 1
        try:
            await session.serve(welcome, self._dispatch, service.limits)
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
        """Handle one request (a `session.Handler`): the awaitable returned for a request that
        has to wait must be awaited, or that request is never answered."""
        service = self.service
        client = service.clients.get(session)
        if client is None:
            return None  # refused or ended: nothing it asks is served
        if isinstance(message, protocol.Acquire):
            service.acquire(client, message)
        elif isinstance(message, protocol.Release):
            service.release(client, message.id)
        elif isinstance(message, protocol.Status):
            return self._status(session, message)
        elif isinstance(message, protocol.ReleasePid):
            service.release_pid(client, message)
        elif isinstance(message, protocol.ForceRelease):
            service.force_release(client, message)
        else:
            session.fail(f"unexpected {type(message).__name__} message")
        self._carry_out()
        return None

    async def _status(self, session: Session, request: protocol.Status) -> None:
        """Answer a status: one look at the host's locks (see `LockService.status_look`),
        then the table as it is by then. Cancellation: nothing is sent."""
        service = self.service
        client = service.clients.get(session)
        if client is None:
            return
        look = service.status_look(client, request, self.backend.outside_names())
        if look is not None:
            outside = await self.backend.outside_holders_of(look.look_for, every_file=look.every_file)
            if session in service.clients:
                waiting = self.backend.outside_waiters_of(look.shown(outside))
                service.status_reply(client, request.id, look, outside, waiting)
        self._carry_out()

    # --- orders -------------------------------------------------------------------------------

    def _carry_out(self) -> None:
        """Carry out the service's orders, and those they cause, in order."""
        if self._carrying_out:
            return  # an outer call is carrying out the queue
        self._carrying_out = True
        orders = self.service.orders
        try:
            while orders:
                order = orders.popleft()
                try:
                    self._do(order)
                except Exception:
                    log.exception("internal error carrying out %r; ending that request", order)
                    if isinstance(order, (StartTake, Grant)):
                        self.service.failed(order.ticket)
        finally:
            self._carrying_out = False

    def _do(self, order: Order) -> None:
        assert self._nursery is not None
        if isinstance(order, Send):
            order.peer.send(order.message)
        elif isinstance(order, StartTake):
            self._take(order.ticket, order.claim)
        elif isinstance(order, Close):
            order.peer.close(order.reason)
        elif isinstance(order, Grant):
            fds = self.backend.descriptors(order.claim)
            order.peer.send(protocol.Granted(order.request_id, order.tokens, len(fds)), fds)
            if order.peer.closed:
                # Never heard of, so never handed on: a lease tied to a process would
                # otherwise outlive the connection that asked for it, held for nobody.
                self.service.failed(order.ticket)
        elif isinstance(order, Release):
            self.backend.drop(order.claim, unlock=order.unlock)
        elif isinstance(order, StopTake):
            scope = self._takes.pop(order.ticket, None)
            if scope is not None:
                scope.cancel()
        elif isinstance(order, NameOutsideHolders):
            # The ticket has ended; a look takes milliseconds, so these tasks are no more
            # than the requests refused within that time.
            self._nursery.start_soon(self._name_outside_holders, order)
        elif isinstance(order, Watch):
            self._nursery.start_soon(self.service.processes.watch, order.owner)
        elif isinstance(order, WakeAt):
            if self._timer is not None and order.deadline < self._timer.deadline:
                self._timer.deadline = order.deadline
        elif isinstance(order, SummariseAt):
            if self._summary_timer is not None and order.deadline < self._summary_timer.deadline:
                self._summary_timer.deadline = order.deadline

    def _take(self, ticket: Ticket, claim: Claim) -> None:
        if not self.service.taking(ticket):
            return  # ended while the order waited: its StopTake and Release follow
        try:
            tokens = self.backend.take_now(claim)
        except errors.LockdError as exc:
            self.service.take_failed(ticket, exc)
            return
        if tokens is not None:
            self.service.taken(ticket, tokens)
            return
        assert self._nursery is not None
        scope = self._takes[ticket] = trio.CancelScope()
        self._nursery.start_soon(self._take_slowly, ticket, claim, scope)

    async def _take_slowly(self, ticket: Ticket, claim: Claim, scope: trio.CancelScope) -> None:
        """Wait for the backend (a lock held outside lockd, a remote host). Cancelled by
        StopTake: then nothing is reported."""
        failure: Exception | None = None
        tokens: list[int] = []
        with scope:
            try:
                tokens = await self.backend.take(claim, partial(self._take_waits, ticket))
            except Exception as exc:
                failure = exc
        if scope.cancelled_caught or self._takes.pop(ticket, None) is None:
            return  # stopped (maybe just as the take ended): the service has done the rest
        service = self.service
        with contained(f"ending the take of {ticket}"):
            if failure is None:
                service.taken(ticket, tokens)
            elif isinstance(failure, Blocked):
                service.take_blocked(ticket)
            elif isinstance(failure, errors.LockdError):
                service.take_failed(ticket, failure)
            else:
                log.error("internal error taking %s", ticket, exc_info=failure)
                service.take_failed(ticket, errors.DaemonUnavailable(
                    "internal error in lockd while taking the lock (it is logged); retry"
                ))
        self._carry_out()

    def _take_waits(self, ticket: Ticket, holders: list[protocol.Holder]) -> None:
        if ticket in self._takes:  # its cancellation reaches the take only at its next await
            self.service.take_waits(ticket, holders)
            self._carry_out()

    async def _name_outside_holders(self, order: NameOutsideHolders) -> None:
        """Refuse naming the holders outside lockd ([] if the look fails: it only serves to
        name them)."""
        names = order.ticket.names
        try:
            found = await self.backend.outside_holders_of(list(names))
        except Exception:
            log.exception("internal error looking for the holders of %s; carrying on", ", ".join(names))
            found = {}
        try:
            with contained(f"refusing {order.ticket}"):
                self.service.refuse_naming(order.ticket, order.reason, holders_in_order(found, names))
        finally:
            self._carry_out()

    # --- reports from the backend and the process watches ------------------------------------

    def _backend_lost(self, claim: Claim, reason: str) -> None:
        try:
            self.service.lost(claim, reason)
        finally:
            self._carry_out()

    def _process_exited(self, owner: ProcessOwner) -> None:
        try:
            self.service.process_exited(owner)
        finally:
            self._carry_out()

    # --- time ---------------------------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Have the service expire what is due, at the table's next deadline (a WakeAt pulls
        it in)."""
        while True:
            deadline = self.service.table.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self.service.expire()
            self._carry_out()

    async def _run_summaries(self) -> None:
        """Log each summary of what clients did as its window ends (a SummariseAt pulls the
        time in)."""
        due: float | None = None
        while True:
            with trio.CancelScope(deadline=math.inf if due is None else due) as scope:
                self._summary_timer = scope
                await trio.sleep_forever()
            due = self.service.log_summaries()
