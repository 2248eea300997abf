"""The trio shell around the lock table: listeners, one task pair per connection, timers,
process watches, shutdown.

Invariant: every change to the table happens in a synchronous call that applies all of the
table's effects before returning (`_apply`), so the table, the sessions and the backend agree
at every await point. The only awaits are on sockets, pidfds, timers and slow backend takes,
and each of those re-enters through `_apply`.

Resource handling: a connection's tickets end when its reader sees EOF, an error, or its
session is closed (slow reader, protocol violation); a process-tied lease ends when its pidfd
becomes readable. On shutdown every lease is reported lost before connections close.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import socket
import time
from collections import deque

import msgspec
import trio

from lockd_client import errors, protocol

from . import __version__, procinfo
from .backend import Backend, Blocked
from .config import Limits
from .policy import Policy
from .session import Party, ProcessOwner, Session
from .table import Drop, Effect, Granted, LockTable, Lost, Queued, Reason, Refused, State, Take, Ticket

log = logging.getLogger("lockd")


#: Replies a client may leave unread before it is cut off. Generous: a `status` of a busy host
#: is one large frame, and it is still appended whole.
MAX_OUTBOX = 4 * 1024 * 1024
#: The kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit).
MAX_PID = 4 * 1024 * 1024
#: How long a graceful shutdown waits for clients to take their `Lost` events.
SHUTDOWN_GRACE = 1.0


class Server:
    """Serves the lock table over listeners. Call `serve` once."""

    def __init__(
        self, table: LockTable, backend: Backend, limits: Limits | None = None, policy: Policy | None = None
    ) -> None:
        self.table = table
        self.backend = backend
        #: Both may be replaced while serving (configuration reload).
        self.limits = limits or Limits()
        self.policy = policy or Policy((), {0: "root"})
        self.sessions: set[Session] = set()
        self._sessions_per_uid: dict[int, int] = {}
        self._session_ids = itertools.count(1)
        self._takes: dict[Ticket, trio.CancelScope] = {}
        self._processes: dict[int, ProcessOwner] = {}
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._stopping = trio.Event()
        #: time.time() - trio.current_time(), fixed when serving starts.
        self._wall_offset = 0.0

    # --- lifecycle ----------------------------------------------------------------------------

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `stop()` is called; `task_status.started()` fires once listeners accept.

        After `stop()`: stops accepting, reports every lease lost to its client, gives
        clients SHUTDOWN_GRACE seconds to read that, closes every connection and
        returns. Cancellation instead stops at once: the leases end with the connections.
        """
        self._wall_offset = time.time() - trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._run_timer)
            nursery.start_soon(self._run_backend)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)
            task_status.started()
            await self._stopping.wait()
            await self._shut_down(listeners)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Begin a graceful shutdown; `serve` returns once it is done."""
        self._stopping.set()

    async def _shut_down(self, listeners: list[trio.SocketListener]) -> None:
        for listener in listeners:
            await listener.aclose()
        for ticket in [t for s in self.sessions for t in s.tickets.values()]:
            self._apply(self.table.lose(ticket, "the daemon is shutting down"))
        for owner in list(self._processes.values()):
            self._end_process(owner)
        for session in list(self.sessions):
            session.close("the daemon is shutting down")
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self.sessions:
                await trio.sleep(0.01)

    async def _run_backend(self) -> None:
        await self.backend.run(self._backend_lost)

    def _backend_lost(self, ticket: Ticket, reason: str) -> None:
        self._apply(self.table.lose(ticket, reason))

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # shutting down
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: new clients wait in the backlog until leases end; serving
                    # the connected ones goes on.
                    log.warning("cannot accept a connection: %s; retrying in 100 ms", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            assert self._nursery is not None
            self._nursery.start_soon(self._handle_connection, stream)

    # --- one connection -----------------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, gid = procinfo.peer_credentials(stream.socket)
        except OSError as exc:
            log.warning("dropping a connection whose peer credentials are unreadable: %s", exc)
            await stream.aclose()
            return
        session = Session(
            stream, next(self._session_ids), pid, uid, gid, procinfo.command_line(pid), MAX_OUTBOX,
        )
        session.gids = procinfo.peer_groups(stream.socket, pid, gid)
        refusal = self._connection_refusal(session)
        if refusal:
            log.warning("refusing a connection from uid %d pid %d (%s): %s", uid, pid, session.command, refusal)
            session.send(protocol.Error(None, protocol.ErrorCode.LIMIT, refusal))
            session.close(refusal)
            with trio.move_on_after(1):
                await session.run_writer(1)
            await stream.aclose()
            return
        self.sessions.add(session)
        self._sessions_per_uid[uid] = self._sessions_per_uid.get(uid, 0) + 1
        log.debug("%r connected: %s", session, session.command)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_writer_then_cancel, session, nursery.cancel_scope)
                try:
                    await self._read(session)
                except Exception:
                    # A bug must cost one connection, never the daemon and everyone's leases.
                    log.exception("internal error serving %r; closing its connection", session)
                    session.close("internal error")
                session.close(session.close_reason or "the client closed the connection")
        finally:
            self.sessions.discard(session)
            left = self._sessions_per_uid[uid] - 1
            if left:
                self._sessions_per_uid[uid] = left
            else:
                del self._sessions_per_uid[uid]
            self._end_session(session)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if session.close_reason and not session.close_reason.startswith("the client"):
                log.info("%r disconnected: %s", session, session.close_reason)

    def _connection_refusal(self, session: Session) -> str | None:
        limits = self.limits
        if len(self.sessions) >= limits.max_connections:
            return f"the daemon serves its maximum of {limits.max_connections} connections (limits.max_connections); retry later"
        if self._sessions_per_uid.get(session.uid, 0) >= limits.max_connections_per_uid:
            return (
                f"uid {session.uid} already has {limits.max_connections_per_uid} connections "
                "(limits.max_connections_per_uid); close some or retry later"
            )
        return None

    async def _run_writer_then_cancel(self, session: Session, scope: trio.CancelScope) -> None:
        await session.run_writer(self.limits.send_timeout)
        # The writer ends only once the session is closed: stop reading from it too.
        scope.cancel()

    async def _read(self, session: Session) -> None:
        frames = protocol.FrameBuffer(self.limits.max_frame)
        decoder = protocol.request_decoder()
        greeted = False
        handshake_deadline = trio.current_time() + self.limits.handshake_timeout
        while not session.closed:
            try:
                with trio.fail_at(math.inf if greeted else handshake_deadline):
                    data = await session.stream.receive_some(65536)
            except trio.TooSlowError:
                session.close(f"no handshake within {self.limits.handshake_timeout:g} s")
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            frames.feed(data)
            try:
                while (body := frames.next_frame()) is not None:
                    message = decoder.decode(body)
                    if greeted:
                        self._dispatch(session, message)
                    else:
                        greeted = self._greet(session, message)
                    if session.closed:
                        return
            except protocol.FrameTooLarge as exc:
                self._fail_connection(session, f"{exc}; the connection is closed")
                return
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                self._fail_connection(session, f"malformed message ({exc}); the connection is closed")
                return

    def _fail_connection(self, session: Session, message: str) -> None:
        session.send(protocol.Error(None, protocol.ErrorCode.PROTOCOL, message))
        session.close(message)

    def _greet(self, session: Session, message: object) -> bool:
        if not isinstance(message, protocol.Hello):
            self._fail_connection(session, "the first message must be hello")
            return False
        if message.version != protocol.PROTOCOL_VERSION:
            session.send(protocol.Error(
                None, protocol.ErrorCode.VERSION,
                f"protocol version {message.version} is not supported; this daemon speaks "
                f"{protocol.PROTOCOL_VERSION} (upgrade lockd_client or lockd to match)",
            ))
            session.close("unsupported protocol version")
            return False
        session.label = message.label
        session.send(protocol.Welcome(
            protocol.PROTOCOL_VERSION, f"lockd {__version__}", self.backend.name, self.limits.max_frame
        ))
        return True

    def _end_session(self, session: Session) -> None:
        session.tickets.clear()
        self._apply(self.table.drop_owner(session))

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, session: Session, message: object) -> None:
        if isinstance(message, protocol.Acquire):
            self._acquire(session, message)
        elif isinstance(message, protocol.Release):
            ticket = session.tickets.pop(message.id, None)
            if ticket is not None:
                self._apply(self.table.release(ticket))
        elif isinstance(message, protocol.Status):
            self._status(session, message)
        elif isinstance(message, protocol.ReleasePid):
            self._release_pid(session, message)
        elif isinstance(message, protocol.ForceRelease):
            self._force_release(session, message)
        else:
            self._fail_connection(session, f"unexpected {type(message).__name__} message")

    def _error(self, session: Session, request_id: int, exc: errors.LockdError) -> None:
        code = exc.code or protocol.ErrorCode.PROTOCOL
        holders = exc.holders if isinstance(exc, errors.LockBusy) else []
        session.send(protocol.Error(request_id, code, str(exc), holders))

    def _acquire(self, session: Session, request: protocol.Acquire) -> None:
        try:
            names = _checked_names(request.names)
            if request.id in session.tickets:
                raise errors.ProtocolError(f"request id {request.id} is already in use on this connection")
            timeout = request.timeout
            if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
                raise errors.ProtocolError(f"timeout must be a finite number >= 0, not {timeout}")
            self._check_acquire_limits(session, names, timeout != 0)
            refusal = self.policy.check_acquire(session.uid, session.gids, names, request.mode)
            if refusal is not None:
                log.warning(
                    "refused uid %d pid %d (%s) %s on %s: %s", session.uid, session.pid,
                    session.command, request.mode, "+".join(names), refusal,
                )
                raise refusal
            process = self._process_owner(session, request.pid) if request.pid is not None else None
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        now = trio.current_time()
        if process is not None:
            party = Party(session, request.id, process.pid, process.uid, None,
                          procinfo.command_line(process.pid), request.label or session.label, process)
        else:
            party = Party(session, request.id, session.pid, session.uid, session.gid,
                          session.command, request.label or session.label)
        deadline = now + timeout if timeout else None
        ticket, effects = self.table.acquire(
            session, names, shared=request.mode == "shared", wait=timeout != 0,
            deadline=deadline, now=now, info=party,
        )
        if ticket.state is not State.ENDED:
            session.tickets[request.id] = ticket
        if deadline is not None and self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline
        self._apply(effects)

    def _check_acquire_limits(self, session: Session, names: list[str], waits: bool) -> None:
        limits = self.limits
        if len(session.tickets) >= limits.max_leases_per_connection:
            raise errors.LimitExceeded(
                f"this connection already has {limits.max_leases_per_connection} leases and requests "
                "(limits.max_leases_per_connection); release some first"
            )
        if not waits:
            return
        if self.table.waiting_of(session) >= limits.max_pending_per_connection:
            raise errors.LimitExceeded(
                f"this connection already has {limits.max_pending_per_connection} waiting requests "
                "(limits.max_pending_per_connection); wait for some to be granted first"
            )
        for name in names:
            if self.table.waiting_on(name) >= limits.max_waiters_per_name:
                raise errors.LimitExceeded(
                    f"{name} already has {limits.max_waiters_per_name} waiters "
                    "(limits.max_waiters_per_name); retry later"
                )

    def _process_owner(self, session: Session, pid: int) -> ProcessOwner:
        """The owner for leases tied to `pid`, watched from now on. Checks the caller may."""
        if not 0 < pid <= MAX_PID:
            raise errors.ProtocolError(f"{pid} is not a process id; a lease can only be tied to a running process")
        owner = self._processes.get(pid)
        if owner is not None and not owner.exited:
            if session.uid not in (0, owner.uid):
                raise errors.PermissionDenied(f"process {pid} belongs to uid {owner.uid}; only that user or root may tie leases to it")
            return owner
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise errors.NotHeld(f"process {pid} does not exist; a lease can only be tied to a running process") from None
        except OSError as exc:
            raise errors.LimitExceeded(f"cannot watch process {pid}: {exc.strerror}") from None
        uid = procinfo.process_uid(pid)
        if uid is None or session.uid not in (0, uid):
            os.close(pidfd)
            raise errors.PermissionDenied(
                f"process {pid} belongs to uid {uid}, you are uid {session.uid}; "
                "only that user or root may tie leases to it"
            )
        owner = ProcessOwner(pid, uid, pidfd)
        self._processes[pid] = owner
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_process, owner)
        return owner

    async def _watch_process(self, owner: ProcessOwner) -> None:
        """End the process's leases when it exits. Shutdown ends them itself and closes the pidfd."""
        try:
            await trio.lowlevel.wait_readable(owner.pidfd)
        except trio.ClosedResourceError:
            return  # already ended by shutdown
        if not owner.exited:
            self._end_process(owner)

    def _end_process(self, owner: ProcessOwner) -> None:
        owner.exited = True
        if self._processes.get(owner.pid) is owner:
            del self._processes[owner.pid]
        tickets = self.table.tickets_of(owner)
        if tickets:
            log.info("process %d exited: ending its %d lease(s)", owner.pid, len(tickets))
        self._apply(self.table.drop_owner(owner))
        trio.lowlevel.notify_closing(owner.pidfd)
        os.close(owner.pidfd)

    def _release_pid(self, session: Session, request: protocol.ReleasePid) -> None:
        try:
            names = _checked_names(request.names)
            owner = self._processes.get(request.pid)
            if owner is not None and session.uid not in (0, owner.uid):
                raise errors.PermissionDenied(
                    f"the leases of process {request.pid} belong to uid {owner.uid}; only that user or root may release them"
                )
            held = self.table.tickets_of(owner) if owner is not None else []
            wanted = set(names)
            released = [t for t in held if wanted & set(t.names)]
            missing = wanted - {n for t in released for n in t.names}
            for ticket in released:
                self._apply(self.table.release(ticket))
            if missing:
                raise errors.NotHeld(
                    f"process {request.pid} holds no lease on {', '.join(sorted(missing))}"
                    + (f" (released {len(released)} other)" if released else "")
                )
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        log.info("%r released %d lease(s) of process %d", session, len(released), request.pid)
        session.send(protocol.Done(request.id, len(released)))

    def _force_release(self, session: Session, request: protocol.ForceRelease) -> None:
        try:
            (name,) = _checked_names([request.name])
            holders = [t for t in self.table.holders(name) if t.state is State.HELD]
            decision = self.policy.check_force(session.uid, name, [t.info.uid for t in holders])
            if not decision.allowed:
                log.warning(
                    "refused uid %d pid %d (%s) a forced release of %s: %s",
                    session.uid, session.pid, session.command, name, decision.reason,
                )
                raise decision.error()
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        reason = f"forcibly released by uid {session.uid} (pid {session.pid}: {session.command})"
        count, effects = self.table.force_release(name, reason)
        for ticket in holders:
            log.warning("%s: lease of pid %s (uid %s) broken, %s", name, ticket.info.pid, ticket.info.uid, reason)
        self._apply(effects)
        session.send(protocol.Done(request.id, count))

    def _status(self, session: Session, request: protocol.Status) -> None:
        try:
            names = _checked_names(request.names) if request.names else self.table.names()
        except errors.LockdError as exc:
            self._error(session, request.id, exc)
            return
        locks = []
        for name in names:
            taking = [t for t in self.table.holders(name) if t.state is not State.HELD]
            holders = [self._holder(t, name) for t in self.table.holders(name) if t.state is State.HELD]
            waiters = [self._holder(t, name) for t in taking + self.table.waiters(name)]
            # Reading /proc/locks costs a scan per name: only where it can matter — a name
            # asked for explicitly, or one whose queue is stuck behind someone.
            if request.names or (waiters and not holders):
                holders += self.backend.outside_holders(name)
            if holders or waiters:
                mode = holders[0].mode if holders else None
                locks.append(protocol.LockInfo(name, mode, holders, waiters))
        session.send(protocol.StatusReply(request.id, locks))

    def _holder(self, ticket: Ticket, name: str) -> protocol.Holder:
        party: Party = ticket.info  # type: ignore[assignment]
        token = ticket.tokens[ticket.names.index(name)] if ticket.tokens else None
        return protocol.Holder(
            pid=party.pid, uid=party.uid, gid=party.gid, command=party.command, label=party.label,
            since=ticket.since + self._wall_offset, mode="shared" if ticket.shared else "exclusive",
            token=token,
        )

    # --- effects ------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out the table's effects in order, and those that carrying them out causes."""
        pending = deque(effects)
        while pending:
            effect = pending.popleft()
            ticket = effect.ticket
            party: Party = ticket.info  # type: ignore[assignment]
            if isinstance(effect, Take):
                pending.extend(self._take(ticket, party))
            elif isinstance(effect, Granted):
                self._granted(ticket, party)
            elif isinstance(effect, Drop):
                scope = self._takes.pop(ticket, None)
                if scope is not None:
                    scope.cancel()
                self.backend.drop(ticket)
            elif isinstance(effect, Queued):
                holders = [self._holder(t, n) for t in effect.blockers for n in t.names if n in ticket.names and t.holding]
                self._send(party, protocol.Queued(party.request_id, holders))
            elif isinstance(effect, Refused):
                self._refused(ticket, party, effect)
            elif isinstance(effect, Lost):
                self._lost(ticket, party, effect.reason)

    def _take(self, ticket: Ticket, party: Party) -> list[Effect]:
        try:
            tokens = self.backend.take_now(ticket)
        except errors.LockdError as exc:
            return self._take_failed(ticket, party, exc)
        if tokens is not None:
            return self.table.taken(ticket, tokens, now=trio.current_time())
        if ticket.wait:
            self._send(party, protocol.Queued(party.request_id, self._outside(ticket)))
        scope = trio.CancelScope()
        self._takes[ticket] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._take_slowly, ticket, party, scope)
        return []

    async def _take_slowly(self, ticket: Ticket, party: Party, scope: trio.CancelScope) -> None:
        """Wait for the backend (a lock held outside lockd, a remote host). Cancelled by Drop."""
        with scope:
            try:
                tokens = await self.backend.take(ticket)
            except Blocked:
                self._takes.pop(ticket, None)
                self._apply(self.table.take_blocked(ticket))
                return
            except errors.LockdError as exc:
                self._takes.pop(ticket, None)
                self._apply(self._take_failed(ticket, party, exc))
                return
            self._takes.pop(ticket, None)
            self._apply(self.table.taken(ticket, tokens, now=trio.current_time()))

    def _take_failed(self, ticket: Ticket, party: Party, exc: errors.LockdError) -> list[Effect]:
        log.warning("cannot take %s for pid %s: %s", "+".join(ticket.names), party.pid, exc)
        if party.session is not None:
            party.session.tickets.pop(party.request_id, None)
        self._send(party, protocol.Error(party.request_id, exc.code or protocol.ErrorCode.PROTOCOL, str(exc)))
        return self.table.release(ticket)

    def _outside(self, ticket: Ticket) -> list[protocol.Holder]:
        return [h for name in ticket.names for h in self.backend.outside_holders(name)]

    def _granted(self, ticket: Ticket, party: Party) -> None:
        assert ticket.tokens is not None
        if party.process is not None:
            # From now on the process's exit ends the lease, not the connection's; while the
            # connection lasts, its Release still ends it too.
            self.table.reassign(ticket, party.process)
            if party.process.exited:
                if party.session is not None:
                    party.session.tickets.pop(party.request_id, None)
                self._apply(self.table.release(ticket))
                self._send(party, protocol.Error(
                    party.request_id, protocol.ErrorCode.NOT_HELD,
                    f"process {party.pid} exited before the lock was granted",
                ))
                return
        log.debug("granted %s to pid %s, token %s", "+".join(ticket.names), party.pid, ticket.tokens)
        self._send(party, protocol.Granted(party.request_id, ticket.tokens))

    def _refused(self, ticket: Ticket, party: Party, effect: Refused) -> None:
        if party.session is not None:
            party.session.tickets.pop(party.request_id, None)
        holders = [self._holder(t, n) for t in effect.blockers for n in t.names if n in ticket.names and t.holding]
        if not holders:
            holders = self._outside(ticket)
        names = "+".join(ticket.names)
        if effect.reason is Reason.TIMEOUT:
            code, what = protocol.ErrorCode.TIMEOUT, f"{names}: timed out waiting for the lock"
        else:
            code, what = protocol.ErrorCode.BUSY, f"{names} is busy"
        self._send(party, protocol.Error(party.request_id, code, f"{what}{_held_by(holders, self._wall_offset)}", holders))

    def _lost(self, ticket: Ticket, party: Party, reason: str) -> None:
        log.warning("lease on %s of pid %s lost: %s", "+".join(ticket.names), party.pid, reason)
        if party.session is not None:
            party.session.tickets.pop(party.request_id, None)
        self._send(party, protocol.Lost(party.request_id, reason))

    def _send(self, party: Party, message: object) -> None:
        if party.session is not None:
            party.session.send(message)

    # --- time ---------------------------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Expire waiting requests at their deadlines. `_acquire` pulls the deadline in."""
        while True:
            deadline = self.table.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._apply(self.table.expire(trio.current_time()))


def _checked_names(names: list[str]) -> list[str]:
    if not names:
        raise errors.ProtocolError("a request must name at least one lock")
    for name in names:
        problem = protocol.name_problem(name)
        if problem:
            raise errors.InvalidName(problem)
    return names


def _held_by(holders: list[protocol.Holder], wall_offset: float) -> str:
    if not holders:
        return ""
    now = time.time()
    parts = []
    for h in holders:
        who = f"pid {h.pid}" if h.pid is not None else "an unknown process"
        if h.command:
            who += f" ({h.command})"
        if h.outside:
            who += " outside lockd"
        elif h.since:
            who += f" for {now - h.since:.1f} s"
        parts.append(who)
    return "; held by " + ", ".join(parts)


def bind_unix_listener(path: str, mode: int, backlog: int = 1024) -> socket.socket:
    """Bind a listening AF_UNIX socket at `path` with `mode`, replacing only a stale socket.

    A live daemon answering at `path` is an error; a socket file nobody answers on is stale
    and replaced. Anything else at the path (a regular file, a directory) is left alone and
    is an error. The mode is set through the umask at bind time, so the socket is never
    reachable with a wider mode, even for an instant.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; move it away or choose another --socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: its daemon is gone
            else:
                raise OSError(errno.EADDRINUSE, f"another lockd is already serving on {path}; stop it first or choose another --socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    return sock
