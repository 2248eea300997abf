"""Re-executing the daemon in place: same pid, every lease, queue and connection kept.

Invariants:
- Nothing is lost if the re-exec does not happen: the program to become is first run in its
  check mode on a state taken now (`--check-handover`), and only if it reads that state is
  anything paused; the state handed over is taken without changing the daemon's, so if the
  exec itself fails, the daemon serves on as it was (`Reexecutor.__call__` says why, to the
  log and to whoever asked).
- The state is taken at a quiet moment, with no await between taking it and the exec: the
  sessions' gate is shut (no request is handled) and no request is under way, and the
  history's writer has stopped between two batches. So the state is the whole truth.
- No lock is ever let go across the exec: every descriptor the state names is inherited
  (O_CLOEXEC cleared just before the exec), and the flocks live on their open file
  descriptions.
- At most one re-exec is under way; a daemon that is stopping does not re-execute.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio
from lockd_client import protocol

from . import handover
from .service import Departed

if TYPE_CHECKING:
    from .backend import BackendKind
    from .config import Config
    from .history import HistoryStore
    from .orders import Peer
    from .processes import ProcessOwner
    from .server import Server
    from .systemd import Notifier

log = logging.getLogger("lockd")

#: The flag that runs the program in check mode: read a state from stdin, say whether it can
#: adopt it, exit.
CHECK_FLAG: Final = "--check-handover"
#: How long the program to become may take to check a state.
CHECK_TIMEOUT: Final = 30.0
#: How long requests under way (a status looking at the host, a history read) may take to
#: finish once the gate is shut, before the re-exec is given up.
SETTLE_TIMEOUT: Final = 5.0
#: What the backend must still stand without the daemon serving (`Backend.unattended`) when
#: the state is taken: a pause of a few hundred milliseconds, a few times over. The re-exec
#: first waits, serving, for the lease's next renewal, at most WAIT_FOR_RENEWAL.
PAUSE_ALLOWANCE: Final = 1.0
WAIT_FOR_RENEWAL: Final = 10.0


class Refused(Exception):
    """The re-exec does not happen, for the reason given; the daemon serves on."""


class Reexecutor:
    """Re-executes the daemon (a `Server.reexecutor`). See the module docstring."""

    def __init__(
        self, server: Server, config: Config, listeners: list[handover.ListenerState],
        metrics_listener: handover.ListenerState | None, history: HistoryStore | None, notifier: Notifier,
        signals: tuple[signal.Signals, ...], argv: list[str] | None = None,
    ) -> None:
        """`argv`: the command line to become (default: this program's own, as it was
        started); `signals`: those held back until the new program listens for them."""
        self._server = server
        self.config = config
        self._listeners = listeners
        self._metrics_listener = metrics_listener
        self._history = history
        self._notifier = notifier
        self._signals = signals
        self._argv = list(sys.orig_argv) if argv is None else argv
        self._running = False

    async def __call__(self, peer: Peer | None, request_id: int | None) -> None:
        """Re-execute for `peer`'s request `request_id` (None: a signal); if it does not
        happen, say why. Returns only then: a re-exec that happens does not return.

        Cancellation (the daemon stopping): nothing was handed over; the gate is opened again
        and the history's writer resumed, so whatever stops the daemon finds it as it was.
        """
        try:
            if self._running:
                raise Refused("a re-exec is under way already")
            self._running = True
            try:
                await self._reexec(peer, request_id)
            finally:
                self._running = False
        except Refused as exc:
            self._server.reexec_refused(peer, request_id, str(exc))
        except Exception:
            # A bug must cost the re-exec, never the daemon and everyone's leases.
            log.exception("internal error re-executing")
            self._server.reexec_refused(peer, request_id, "internal error in lockd (it is logged)")

    async def _reexec(self, peer: Peer | None, request_id: int | None) -> None:
        server = self._server
        if server.service.stopping:
            raise Refused("the daemon is stopping")
        log.info("re-executing %s", " ".join(self._argv))
        await self._check(handover.encode(self._state(peer, request_id, [], time.monotonic())))
        await self._allowance()
        if self._history is not None:
            # While serving: the flush once paused then has next to nothing left to write.
            await trio.to_thread.run_sync(self._history.flush)
        self._notifier.reloading()
        server.gate.close()
        paused_at = time.monotonic()
        try:
            with trio.move_on_after(SETTLE_TIMEOUT) as waited:
                await self._settle()
            if waited.cancelled_caught:
                raise Refused(f"requests under way did not finish within {SETTLE_TIMEOUT:g} s")
            # From here to the exec, nothing awaits: the state taken is the whole truth.
            if server.stopping or server.service.stopping:
                raise Refused("the daemon is stopping")
            left = server.backend.unattended()
            if left is not None and left < PAUSE_ALLOWANCE:
                raise Refused(f"the backend's lease is vouched for {left:.1f} s more only, too little for the pause")
            try:
                backlog = self._history.hand_over() if self._history is not None else []
            except TimeoutError:
                raise Refused("the history's writer did not pause (is its disk hanging?)") from None
            # Taking the state makes an object or more per lease, all short-lived: no collector
            # pass should walk the daemon's every object meanwhile (a third of the time, measured).
            gc.disable()
            try:
                self._exec(self._state(peer, request_id, backlog, paused_at))
            finally:
                gc.enable()
                if self._history is not None:
                    self._history.resume()
        finally:
            server.gate.open()
            if not (server.stopping or server.service.stopping):
                self._notifier.ready(f"not re-executed; {server.service.counts()[0]} leases held")

    async def _allowance(self) -> None:
        """Wait, serving, for the backend's next renewal of its lease (with etcd), so that the
        pause starts with as much of the lease's time as it gets. Raise Refused if none comes
        within WAIT_FOR_RENEWAL."""
        backend = self._server.backend
        before = backend.unattended()
        if before is None:
            return
        with trio.move_on_after(WAIT_FOR_RENEWAL):
            # No event says the lease was renewed: poll, for one keep-alive interval at most.
            while (left := backend.unattended()) is not None and left <= before:  # noqa: ASYNC110
                before = left
                await trio.sleep(0.02)
            return
        raise Refused(f"the backend's lease was not renewed within {WAIT_FOR_RENEWAL:g} s; is etcd reachable?")

    async def _settle(self) -> None:
        """Return once nothing is under way (`Server.idle`) and the history has written what
        was recorded, so that handing it over blocks for next to nothing."""
        server = self._server
        while True:
            await server.settled()
            if self._history is not None and not await trio.to_thread.run_sync(self._history.flush):
                raise Refused("the history's writer did not catch up (is its disk hanging?)")
            if server.idle:
                return  # nothing started during the flush

    def _state(
        self, peer: Peer | None, request_id: int | None, backlog: list[protocol.LeaseEvent], paused_at: float,
    ) -> handover.State:
        return self._server.hand_over(
            config=self.config, listeners=self._listeners, metrics_listener=self._metrics_listener, history=backlog,
            paused_at=paused_at, reply_to=None if peer is None or request_id is None else handover.ReplyTo(
                connection=peer.ident, request_id=request_id,
            ),
        )

    async def _check(self, data: bytes) -> None:
        """Run the program to become in check mode on `data`; raise Refused unless it says
        it can adopt it."""
        command = [*self._argv, CHECK_FLAG]
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                done = await trio.run_process(
                    [sys.executable, *command[1:]], stdin=data, capture_stdout=True, capture_stderr=True,
                    check=False,
                )
        except trio.TooSlowError:
            raise Refused(f"the new program did not check the state within {CHECK_TIMEOUT:g} s") from None
        except OSError as exc:
            raise Refused(f"cannot run {sys.executable}: {exc.strerror}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            if said and CHECK_FLAG in said[-1] and "unrecognized arguments" in said[-1]:
                raise Refused(
                    "the lockd now installed predates re-exec in place and cannot take over; restart lockd "
                    "to run it (every granted lease stays with its holder)"
                )
            raise Refused(
                f"the new program cannot take over (exit status {done.returncode}): "
                f"{said[-1] if said else 'it said nothing'}"
            )

    def _exec(self, state: handover.State) -> None:
        """Exec the program with `state`; raise Refused, with everything as it was, if the
        exec fails."""
        fds = handover.descriptors(state)
        inheritable = {fd: os.get_inheritable(fd) for fd in fds}
        memfd = handover.to_memfd(handover.encode(state))
        try:
            for fd in fds:
                os.set_inheritable(fd, True)
            os.environ[handover.ENV] = str(memfd)
            # Until the new program listens for them: a SIGHUP meanwhile must not kill it.
            signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
            log.info("handing over %d leases and requests, %d connections", len(state.tickets), len(state.connections))
            os.execv(sys.executable, self._argv)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
            raise Refused(f"exec of {sys.executable} failed: {exc.strerror}") from None
        finally:
            # Reached only if the exec failed.
            os.environ.pop(handover.ENV, None)
            os.close(memfd)
            for fd, was in inheritable.items():
                os.set_inheritable(fd, was)


def check(data: bytes, backend_kind: Callable[[str], BackendKind]) -> str | None:
    """Check mode: whether this program can take over the state in `data`; None if it can,
    else why not. The state is rebuilt as the daemon would adopt it, short of touching any
    descriptor or connection, and the result checked; the backend's part is checked by its
    kind (`backend_kind` gives it for a backend's name)."""
    from .policy import Policy
    from .processes import Processes
    from .service import LockService
    from .table import LockTable

    try:
        state = handover.decode(data)
        kind = backend_kind(state.backend)
        ordered = kind.orders_requests
        service = LockService(
            LockTable(ordered_by_backend=ordered), Processes(_no_process), state.config.limits,
            Policy.from_config(state.config.policy), _Backend(state.backend, ordered),
            clock=time.monotonic, wall_clock=time.time,
        )
        peers: dict[int, Peer] = {
            c.client.ident: _Peer(c.client.ident, c.client.label, c.session.greeted)
            for c in state.connections if c.session is not None
        }
        claims, _ = service.adopt(state, peers)
        service.check()
        kind.check_handover(state.backend_state, claims)
    except handover.Unreadable as exc:
        return str(exc)
    except (ValueError, AssertionError, KeyError) as exc:
        return f"the handed-over state is inconsistent: {exc}"
    return None


class _Peer(Departed):
    """A connection as check mode adopts it: served, as far as the service can tell, but
    nothing reaches it."""

    closed = False

    def __init__(self, ident: int, label: str | None, greeted: bool) -> None:
        super().__init__(ident, label)
        self.greeted = greeted

    def send(
        self, message: object, fds: Sequence[int] = (), undelivered: Callable[[], None] | None = None,
    ) -> None:
        pass


class _Backend:
    """What the service reads of a backend, for check mode: nothing is taken or looked at."""

    leases_outlive_daemon = False
    loss_notice = None

    def __init__(self, name: str, orders_requests: bool) -> None:
        self.name = name
        self.orders_requests = orders_requests

    def place_of(self, claim: object) -> None:
        return None

    def outside_names(self) -> list[str]:
        return []

    def outside_slots(self, name: str) -> None:
        return None


def _no_process(pid: int) -> ProcessOwner:
    raise AssertionError("check mode opens no process")


def received() -> handover.State | None:
    """The state handed over to this program by the daemon it re-executes, if any (the
    variable naming it is taken out of the environment). Raises handover.Unreadable."""
    fd = os.environ.pop(handover.ENV, None)
    if fd is None:
        return None
    try:
        return handover.decode(handover.read_fd(int(fd)))
    except (OSError, ValueError) as exc:
        raise handover.Unreadable(f"cannot read the handed-over state: {exc}") from None
