"""Running a command under a lease, for `lockctl acquire NAME -- CMD`.

Invariant: no process that CMD started runs while the lock could be free, unless CMD exited
by itself first. The daemon connection and the lease's lock-file descriptors (whose flocks
outlive the daemon) are held by lockctl and by a guardian process; the guardian is CMD's
parent and a child subreaper, so every process CMD starts stays in the guardian's tree however
it detaches (own process group, own session, double fork). Whoever gives up the lease first
(lockctl seeing it lost, the guardian seeing lockctl die) kills that whole tree and waits
until it is empty before it lets go of the connection and the descriptors. The daemon going
away is not a loss where its leases outlive it: CMD goes on under the kernel's lock. Only
when CMD exits by itself are the background processes it left behind let go of with the
lease: the lock does not wait for them.

Why the pieces are shaped this way:

- The guardian is a fork of lockctl without exec (a few pages of copied memory). It moves to
  a process group of its own, so that what kills lockctl's job (`kill -9 %1`, timeout(1)
  killing its group) misses it, and renames itself (`lockd-guardian` in ps, in both the name
  and the command line), so that `pkill lockctl` misses it too. It ignores every signal aimed
  at the job. It stays in lockctl's session: CMD's group must be in the terminal's session
  for lockctl to give CMD the terminal, and a parent in another session would make CMD's
  group orphaned, which turns Ctrl-Z into a no-op.
- lockctl and the guardian talk over two pipes. lockctl says "done" (CMD exited and the lease
  is released: leave the rest alone) or "terminate"; EOF without either means lockctl died
  (SIGKILL, OOM), and the guardian terminates the tree. The guardian reports CMD's pid, its
  stops and its exit, and "gone" once a tree it was told to terminate is empty. Only lockctl
  holds its ends of the pipes for long: the guardian drops its copies once it has forked CMD,
  and CMD's child drops them at once, as exec would, so each side sees the other's death as
  EOF.
- lockctl is a child subreaper too: if the guardian dies, the tree falls to lockctl, which
  terminates it before giving up the lease. Only one of the two may die: if both are killed
  while CMD runs, CMD runs on with the lock free (CMD's child at the gate then never runs).
- CMD waits at a gate (a pipe it reads before exec) until lockctl has checked that the lease
  still holds and handed it the terminal; if lockctl dies first, CMD sees EOF and never runs.
  An exec failure comes back on a close-on-exec pipe that lockctl polls, so a CMD stopped
  before its exec cannot hang lockctl.
- Terminating a tree: SIGTERM and SIGCONT once to every descendant and to CMD's process
  group, SIGKILL to all of them after `kill_after` seconds and again every round, until the
  terminating process has no child left to reap and CMD's group has no running member. A
  process that may not be signalled (another user's, started through sudo) is waited for:
  the lock stays held until it exits.
- Terminal: CMD runs in a process group of its own, which lockctl makes the terminal's
  foreground group while lockctl's job is in the foreground, provided every other member of
  lockctl's group is an ancestor of lockctl (the shell script running it): the other members
  of a pipeline keep the terminal. When CMD stops (Ctrl-Z), lockctl takes the terminal back
  and stops its own group, so the shell sees the job stopped; on `fg` it hands the terminal
  back and continues CMD, unless the lease was lost meanwhile. A CMD that stopped on using the
  terminal in the background is given it and continued once lockctl's job is in the
  foreground. A SIGTSTP sent to lockctl is passed on to CMD first; a SIGCONT is passed on too.
- Every descriptor is close-on-exec, so CMD and whatever it starts never hold the connection
  or the pipes. CMD's child closes them itself right after the fork, since it may wait at the
  gate for ever.
- lockctl waits with `select.poll` on the connection, the guardian's reports, the exec-error
  pipe and a signal wakeup pipe; nothing runs in the background.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from . import _guardian, _lockfds, _proctree, _terminal
from .errors import LeaseLost, LockdError

if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start


class Exit(NamedTuple):
    """How CMD ended."""

    #: As a shell reports it: the exit code, or 128+N for death by signal N.
    status: int
    #: The signal CMD died of, if it did.
    signal: int | None
    #: Whether CMD had the terminal then (so signals from the keyboard reached only CMD).
    foreground: bool


class NotStarted(LeaseLost):
    """The lease ended after it was granted and before CMD was started: CMD never ran."""


class ExecError(OSError):
    """CMD could not be executed (errno says why); it never ran."""


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    conn_fd: int,
    lease_fds: Sequence[int],
    process_events: Callable[[], None],
    is_lost: Callable[[], str | None],
    is_detached: Callable[[], bool],
    *,
    kill_after: float,
) -> Exit:
    """Run `argv` while the lease is held; return how it ended, once it has exited.

    `conn_fd` is the daemon connection and `lease_fds` the lease's lock-file descriptors,
    which the guardian holds too; when the connection is readable `process_events()` is
    called, then `is_lost()` says whether the lease ended (it returns the reason, or None)
    and `is_detached()` whether the daemon went away leaving the lease to the descriptors. A
    lost lease terminates CMD's whole process tree (SIGTERM, then SIGKILL after `kill_after`
    seconds) and raises LeaseLost once nothing of it is left; NotStarted (a LeaseLost) if CMD
    had not been started yet. A detached lease is said so once on stderr, and CMD goes on.
    Raises ExecError if `argv` cannot be executed. The caller releases the lease after a
    normal return.
    """
    return _Supervisor(conn_fd, lease_fds, process_events, is_lost, is_detached, kill_after).run(argv, env)


class _Supervisor:
    def __init__(
        self,
        conn_fd: int,
        lease_fds: Sequence[int],
        process_events: Callable[[], None],
        is_lost: Callable[[], str | None],
        is_detached: Callable[[], bool],
        kill_after: float,
    ) -> None:
        self.conn_fd = conn_fd
        self.lease_fds = lease_fds
        self.process_events = process_events
        self.is_lost = is_lost
        self.is_detached = is_detached
        self.kill_after = kill_after
        self.pid = 0  # CMD's, and its process group's, once the guardian has reported it
        self.started = False  # the gate is open: CMD may have run
        self.wait_status: int | None = None  # CMD's wait status once it has exited
        self.exec_errno = b""
        self.guardian = 0
        self.finished = False  # the guardian was told done or terminate, or died
        self.to_guardian = self.from_guardian = self.gate_w = self.err_r = -1
        self.reports = b""  # a partial line from the guardian
        self.tty: int | None = None
        self.may_hand_over = False
        self.handed = False  # CMD's group is the terminal's foreground group, by our doing
        self.early_signals: list[int] = []  # signals to pass on once CMD is known

    def run(self, argv: Sequence[str], env: Mapping[str, str]) -> Exit:
        # Whoever made the connection, CMD must not inherit it (see the module docstring).
        os.set_inheritable(self.conn_fd, False)
        ignored: set[int] = {s for s in _guardian.TOUCHED if signal.getsignal(s) == signal.SIG_IGN}
        handled: list[int] = [s for s in (*_guardian.FORWARDED, signal.SIGTSTP) if s not in ignored]
        handled.append(signal.SIGCONT)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        saved = {s: signal.signal(s, _guardian.note) for s in handled}
        saved_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.tty = _terminal.controlling_tty()
        if self.tty is not None:
            # lockctl leaves the foreground to CMD yet must still write to and hand back the
            # terminal; with SIGTTOU ignored neither stops it.
            saved[signal.SIGTTOU] = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            self.may_hand_over = _terminal.only_ancestors_share_group()
        try:
            self._start(argv, env, handled, ignored)
            result = self._wait(wake_r)
            self._end_guardian(_guardian.DONE)
            return result
        finally:
            if self.guardian and not self.finished:
                # Only after an unexpected error: even then CMD must not outlive the lease.
                self._end_guardian(_guardian.TERMINATE)
            _guardian.prctl(_guardian.PR_SET_CHILD_SUBREAPER, 0)
            if self.tty is not None:
                if self.handed or (self.pid and _terminal.foreground(self.tty) == self.pid):
                    _terminal.give_terminal(self.tty, os.getpgrp())
                os.close(self.tty)
            signal.set_wakeup_fd(saved_wakeup)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            for fd in (wake_r, wake_w, self.to_guardian, self.from_guardian, self.gate_w):
                if fd >= 0:
                    os.close(fd)
            if self.err_r >= 0:
                os.close(self.err_r)

    def _start(
        self, argv: Sequence[str], env: Mapping[str, str], handled: list[int], ignored: set[int]
    ) -> None:
        """Fork the guardian, which forks CMD and holds it at the gate."""
        gate_r, self.gate_w = os.pipe()
        self.err_r, err_w = os.pipe()
        orders, self.to_guardian = os.pipe()
        self.from_guardian, reports = os.pipe()
        _guardian.prctl(_guardian.PR_SET_CHILD_SUBREAPER, 1)
        lockctl = os.getpid()
        # Signals stay blocked across the fork so that the guardian never runs lockctl's
        # handlers (which would write to lockctl's wakeup pipe); it unblocks them itself.
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            self.guardian = _lockfds.fork_keeping()
            if self.guardian == 0:
                _guardian.run(argv, env, lockctl, self.conn_fd, self.lease_fds, gate_r, err_w,
                              orders, reports, self.kill_after, ignored)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
            for fd in (gate_r, err_w, orders, reports):
                os.close(fd)
        try:
            os.setpgid(self.guardian, self.guardian)  # it does so too: whichever runs first
        except ProcessLookupError:
            pass  # it died already; its EOF says so

    def _wait(self, wake_r: int) -> Exit:
        poller = select.poll()
        for fd in (self.conn_fd, self.from_guardian, self.err_r, wake_r):
            poller.register(fd, select.POLLIN)
        while self.wait_status is None:
            ready = dict(poller.poll())
            # The connection is read first: if the lease ended in the same instant that CMD
            # exited, the run cannot be vouched for and is reported as lost.
            if self.conn_fd in ready:
                reason = self._lost_reason(ready[self.conn_fd])
                if reason is not None:
                    self._terminate(reason)
                if self.is_detached():
                    poller.unregister(self.conn_fd)
                    _proctree.warn(
                        "lockctl: lockd went away; CMD goes on, and the lock stays held until it "
                        "exits (this lockctl and its guardian hold the lock file)"
                    )
            if self.err_r in ready:
                data = os.read(self.err_r, 64)
                if data:
                    self.exec_errno += data
                else:  # CMD exec'd (or exited): nothing more will come
                    poller.unregister(self.err_r)
                    os.close(self.err_r)
                    self.err_r = -1
            if wake_r in ready:
                for sig in _guardian.read_all(wake_r):
                    self._on_signal(sig)
            if self.from_guardian in ready:
                self._on_reports()
        if self.err_r >= 0:
            self.exec_errno += _guardian.read_all(self.err_r)  # CMD has exited: this cannot block
        if self.exec_errno:
            code = int(self.exec_errno)
            raise ExecError(code, os.strerror(code))
        status = self.wait_status
        died_of = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return Exit(_exit_status(status), died_of, self.handed)

    def _on_reports(self) -> None:
        data = os.read(self.from_guardian, 4096)
        if not data:
            self._guardian_died()
        self.reports += data
        *lines, self.reports = self.reports.split(b"\n")
        for line in lines:
            kind, _, value = line.partition(b" ")
            if kind == _guardian.CMD_PID:
                self._open_gate(int(value))
            elif kind == _guardian.CMD_STOPPED:
                self._follow_stop(int(value))
            elif kind == _guardian.CMD_EXITED:
                self.wait_status = int(value)
            elif kind == _guardian.FORK_FAILED:
                self.wait_status = 127 << 8
                self.exec_errno = value

    def _open_gate(self, pid: int) -> None:
        self.pid = pid
        reason = self._lost_reason(0)
        if reason is not None:
            self._terminate(reason)
        if self.may_hand_over and _terminal.foreground(self.tty) == os.getpgrp():
            self._hand_over()
        try:
            os.write(self.gate_w, _guardian.GATE_OPEN)
        except BrokenPipeError:
            pass  # CMD's child died at the gate: the guardian reports its exit next
        os.close(self.gate_w)
        self.gate_w = -1
        self.started = True
        for sig in self.early_signals:
            _proctree.signal_group(self.pid, sig)

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGTSTP:
            self._stop_job()
        elif sig == signal.SIGCONT:
            self._continue_cmd()
        elif sig in _guardian.FORWARDED:
            if self.started:
                _proctree.signal_group(self.pid, sig)
            else:
                self.early_signals.append(sig)

    def _lost_reason(self, events: int) -> str | None:
        try:
            self.process_events()
        except LockdError as e:
            return self.is_lost() or f"connection to lockd failed: {e}"
        reason = self.is_lost()
        if reason is None and not self.is_detached() and events & (select.POLLHUP | select.POLLERR):
            # The client saw nothing yet the socket is dead: without this the loop would spin.
            return "connection to lockd closed"
        return reason

    def _follow_stop(self, sig: int) -> None:
        """CMD stopped (Ctrl-Z, or SIGTTIN in the background): stop lockctl's job as well,
        so the shell sees it stopped, and on `fg`/`bg` continue CMD the same way."""
        if self.tty is None or not _proctree.is_stopped(self.pid):
            return  # no job control, or continued already: whoever stopped CMD continues it
        if sig in (signal.SIGTTIN, signal.SIGTTOU) and self.may_hand_over and (
            _terminal.foreground(self.tty) == os.getpgrp()
        ):
            # CMD used the terminal in the background, but the job has been brought to the
            # foreground since (`fg` of a running job sends no SIGCONT): CMD may have it now.
            self._continue_cmd()
            return
        handed = self.handed
        if handed:
            _terminal.give_terminal(self.tty, os.getpgrp())
            self.handed = False
        # With the terminal handed over, Ctrl-Z reached only CMD: lockctl passes it on to the
        # rest of its group (the shell script running it), as the terminal would have.
        if _terminal.stop_self(group=handed):
            self._resume()
        # else orphaned (no shell to continue us): leave CMD as it is, like no terminal

    def _stop_job(self) -> None:
        """lockctl got SIGTSTP: stop CMD with it, and continue both together."""
        if self.started:
            _proctree.signal_group(self.pid, signal.SIGTSTP)
        if _terminal.stop_self(group=False):
            self._resume()
        elif self.started:
            _proctree.signal_group(self.pid, signal.SIGCONT)  # nobody would ever continue it

    def _resume(self) -> None:
        """lockctl was continued after a stop: continue CMD, unless the lease went meanwhile."""
        reason = self._lost_reason(0)
        if reason is not None:
            self._terminate(reason)
        self._continue_cmd()

    def _continue_cmd(self) -> None:
        if not self.started:
            return
        # `fg` gave lockctl's group the terminal: pass it on. `bg` did not.
        if self.may_hand_over and _terminal.foreground(self.tty) == os.getpgrp():
            self._hand_over()
        _proctree.signal_group(self.pid, signal.SIGCONT)

    def _hand_over(self) -> None:
        _terminal.give_terminal(self.tty, self.pid)
        self.handed = True

    def _terminate(self, reason: str) -> NoReturn:
        if not self.started:
            os.close(self.gate_w)  # CMD sees EOF at the gate and exits without running
            self.gate_w = -1
            self._end_guardian(_guardian.TERMINATE)
            raise NotStarted(f"{reason}; CMD was not started")
        self._end_guardian(_guardian.TERMINATE)
        raise LeaseLost(f"{reason}; CMD was terminated, and its work may be incomplete")

    def _end_guardian(self, order: bytes) -> None:
        """Tell the guardian `order` and wait for it to exit; after _guardian.TERMINATE, return only
        once CMD's tree is gone."""
        if self.finished:
            return
        self.finished = True
        if order == _guardian.DONE:
            # What CMD left running goes on without the lease; it must not land on lockctl.
            _guardian.prctl(_guardian.PR_SET_CHILD_SUBREAPER, 0)
        try:
            os.write(self.to_guardian, order)
        except BrokenPipeError:
            pass  # it died: its reports end in EOF below
        if order == _guardian.TERMINATE and not self._await_gone():
            # It died: lockctl inherited the tree, and reaped the guardian.
            _proctree.terminate_tree(self.pid, self.kill_after)
            return
        os.waitpid(self.guardian, 0)

    def _await_gone(self) -> bool:
        """Read the guardian's reports until TREE_GONE (True) or EOF (False: it died)."""
        while True:
            lines = self.reports.split(b"\n")
            if _guardian.TREE_GONE in lines[:-1]:
                return True
            data = os.read(self.from_guardian, 4096)
            if not data:
                return False
            self.reports += data

    def _guardian_died(self) -> NoReturn:
        self.finished = True
        _proctree.warn(
            f"lockctl: the guardian process (pid {self.guardian}) died; terminating CMD "
            f"(process group {self.pid}) before the lease goes"
        )
        _proctree.terminate_tree(self.pid, self.kill_after)
        raise LeaseLost(
            f"lockctl's guardian process (pid {self.guardian}) died, so the lease could no "
            "longer be kept safely; CMD was terminated, and its work may be incomplete"
        )


def _exit_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
