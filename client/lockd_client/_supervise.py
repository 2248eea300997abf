"""Running a command under a lease, for `lockctl acquire NAME -- CMD`.

Invariant: no process of CMD's process group runs user code while the daemon could consider
the lease free. CMD is exec'd only after a guardian process holds a duplicate of the daemon
connection, and that connection is closed (by lockctl and the guardian alike) only once CMD's
process group has no live member left, or once CMD has exited normally and lockctl has
released the lease. Whoever notices trouble first — lockctl seeing the lease lost, or the
guardian seeing lockctl die — terminates the group before letting go of the connection.

Why the pieces are shaped this way:

- CMD runs in its own process group, so a `sh -c` wrapper cannot shield the real work: the
  group, not the direct child, is what gets signalled and waited for.
- The guardian is a fork of lockctl without exec (it costs a few pages of copied memory). It
  holds the connection fd and the read end of a pipe from lockctl. lockctl writes one byte
  before it lets go of the lease; EOF without that byte means lockctl died (SIGKILL, OOM), so
  the guardian terminates CMD's group and only then exits, which is when the daemon sees the
  connection close and frees the lock.
- CMD is forked first but held at a gate (a pipe it reads before exec) until the guardian
  exists: if lockctl dies before opening the gate, CMD sees EOF and exits without running.
- Every descriptor lockctl opens is close-on-exec (Python's default, and made sure of for the
  connection), so CMD and whatever it starts — including daemonising grandchildren — never
  hold the connection or the pipes.
- With a controlling terminal on which lockctl is the foreground job, CMD's group becomes the
  foreground group (so an interactive CMD reads the terminal and gets Ctrl-C), and lockctl
  takes the terminal back afterwards. When CMD stops (Ctrl-Z), lockctl stops itself too so the
  shell's job control sees it, and passes the continue on to CMD.
- Waiting uses `select.poll` on the connection and on a signal wakeup pipe, which carries the
  forwarded signals and SIGCHLD alike; nothing runs in the background.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from .errors import LeaseLost, LockdError

#: Signals sent to lockctl that it passes on to CMD's process group. A signal to lockctl
#: stands for a signal to the job, as a terminal sends Ctrl-C to a whole foreground group.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Python ignores these at start-up for its own sake; a program it starts expects the defaults.
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)
# The guardian outlives lockctl only to clean up; nothing aimed at the job may stop it early.
_GUARDIAN_IGNORES = (*FORWARDED, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)

_DONE = b"d"
_GATE_OPEN = b"g"
#: How often the group is re-examined while it is being terminated.
_GROUP_POLL = 0.02


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    conn_fd: int,
    process_events: Callable[[], None],
    is_lost: Callable[[], str | None],
    *,
    kill_after: float,
) -> int:
    """Run `argv` while the lease is held; return its exit status (128+N if killed by signal N).

    `conn_fd` is the daemon connection; when it is readable `process_events()` is called and
    then `is_lost()` says whether the lease ended (it returns the reason, or None). A lost lease
    terminates CMD's process group (SIGTERM, then SIGKILL after `kill_after` seconds) and
    raises `LeaseLost` once no member is left. Raises OSError if `argv` cannot be executed
    (CMD never ran then). Returns only after CMD has exited; the caller releases the lease.
    """
    return _Supervisor(conn_fd, process_events, is_lost, kill_after).run(argv, env)


class _Supervisor:
    def __init__(
        self,
        conn_fd: int,
        process_events: Callable[[], None],
        is_lost: Callable[[], str | None],
        kill_after: float,
    ) -> None:
        self.conn_fd = conn_fd
        self.process_events = process_events
        self.is_lost = is_lost
        self.kill_after = kill_after
        self.pid = 0
        self.reaped = False
        self.tty: int | None = None
        self.guardian = 0
        self.guard_w = -1

    def run(self, argv: Sequence[str], env: Mapping[str, str]) -> int:
        # Whoever made the connection, CMD must not inherit it (see the module docstring).
        os.set_inheritable(self.conn_fd, False)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        handled = [s for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN]
        handled.append(signal.SIGCHLD)
        saved = {s: signal.signal(s, _note) for s in handled}
        saved_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.tty = _controlling_tty()
        if self.tty is not None:
            # lockctl leaves the foreground to CMD yet must still write to and hand back the
            # terminal; with SIGTTOU ignored neither stops it.
            saved[signal.SIGTTOU] = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            self._start(argv, env, handled)
            return self._wait(wake_r)
        finally:
            if self.pid and not self.reaped:
                # Only after an unexpected error: even then CMD must not outlive the lease.
                terminate_group(self.pid, self.kill_after)
                self._reap_blocking()
            if self.guardian:
                self._dismiss_guardian()
            elif self.guard_w >= 0:
                os.close(self.guard_w)
            if self.tty is not None:
                if self.pid and _foreground(self.tty) == self.pid:
                    _give_terminal(self.tty, os.getpgrp())
                os.close(self.tty)
            signal.set_wakeup_fd(saved_wakeup)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _start(self, argv: Sequence[str], env: Mapping[str, str], handled: list[int]) -> None:
        """Fork CMD (held at the gate), fork the guardian, then let CMD exec."""
        reset = [*handled, *_PYTHON_IGNORES]
        if self.tty is not None:
            reset.append(signal.SIGTTOU)
        gate_r, gate_w = os.pipe()
        err_r, err_w = os.pipe()
        # Signals stay blocked across both forks so that neither child runs lockctl's handlers
        # (which would write to the shared wakeup pipe); each child unblocks after resetting.
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            self.pid = os.fork()
            if self.pid == 0:
                os.close(gate_w)
                os.close(err_r)
                _exec_child(argv, env, gate_r, err_w, reset)
            os.close(gate_r)
            os.close(err_w)
            os.setpgid(self.pid, self.pid)  # the child does it too: whichever runs first
            guard_r, self.guard_w = os.pipe()
            lockctl = os.getpid()
            try:
                self.guardian = os.fork()
                if self.guardian == 0:
                    _guardian(lockctl, self.conn_fd, guard_r, self.pid, self.kill_after)
            finally:
                os.close(guard_r)
        except BaseException:
            os.close(gate_w)
            os.close(err_r)
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
                self._reap_blocking()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        lost = self._lost_reason(0)
        try:
            if lost is None:
                if self.tty is not None and _foreground(self.tty) == os.getpgrp():
                    _give_terminal(self.tty, self.pid)
                os.write(gate_w, _GATE_OPEN)
        finally:
            os.close(gate_w)
        failure = _read_all(err_r)
        os.close(err_r)
        if lost is not None:
            self._reap_blocking()
            raise LeaseLost(f"{lost}; CMD was not started")
        if failure:
            self._reap_blocking()
            code = int(failure)
            raise OSError(code, os.strerror(code), argv[0])

    def _wait(self, wake_r: int) -> int:
        poller = select.poll()
        poller.register(self.conn_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            # The connection is read first: if the lease ended in the same instant that CMD
            # exited, the run cannot be vouched for and is reported as lost.
            if self.conn_fd in ready:
                reason = self._lost_reason(ready[self.conn_fd])
                if reason is not None:
                    self._terminate(reason)
            if wake_r in ready:
                status = None
                for sig in _read_all(wake_r):
                    if sig == signal.SIGCHLD:
                        status = self._reap() if status is None else status
                    elif sig in FORWARDED:
                        _signal_group(self.pid, sig)
                if status is not None:
                    return status

    def _lost_reason(self, events: int) -> str | None:
        try:
            self.process_events()
        except LockdError as e:
            return self.is_lost() or f"connection to lockd failed: {e}"
        reason = self.is_lost()
        if reason is None and events & (select.POLLHUP | select.POLLERR):
            # The client saw nothing yet the socket is dead: without this the loop would spin.
            return "connection to lockd closed"
        return reason

    def _reap(self) -> int | None:
        """Exit status of CMD if it has exited; follows CMD's stops when job control applies."""
        pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
        if pid == 0:
            return None
        if os.WIFSTOPPED(status):
            self._follow_stop()
            return None
        self.reaped = True
        return _exit_status(status)

    def _follow_stop(self) -> None:
        """CMD stopped (Ctrl-Z, or SIGTTIN in the background): stop lockctl as well, so the
        shell sees the job stopped, and on `fg`/`bg` continue CMD the same way."""
        if self.tty is None:
            return  # no job control: whoever stopped CMD continues it
        if _foreground(self.tty) == self.pid:
            _give_terminal(self.tty, os.getpgrp())
        if not _stop_self():
            return  # orphaned (no shell to continue us): leave CMD as it is, like no terminal
        # Continued. `fg` gave lockctl the terminal; pass it on. `bg` did not.
        if _foreground(self.tty) == os.getpgrp():
            _give_terminal(self.tty, self.pid)
        _signal_group(self.pid, signal.SIGCONT)

    def _terminate(self, reason: str) -> NoReturn:
        terminate_group(self.pid, self.kill_after)
        self._reap_blocking()
        raise LeaseLost(f"{reason}; CMD was terminated, and its work may be incomplete")

    def _reap_blocking(self) -> None:
        os.waitpid(self.pid, 0)
        self.reaped = True

    def _dismiss_guardian(self) -> None:
        """Tell the guardian CMD is done (so it leaves the group alone) and wait for it."""
        try:
            os.write(self.guard_w, _DONE)
        except BrokenPipeError:
            pass  # the guardian died early (killed by hand): nothing to tell it
        finally:
            os.close(self.guard_w)
        os.waitpid(self.guardian, 0)


def _stop_self() -> bool:
    """Stop lockctl as Ctrl-Z would; return once continued. False if it was not stopped.

    The kernel discards SIGTSTP for a process group no shell controls (orphaned); continuing
    CMD then would only let it stop again at once. A continue leaves SIGCONT pending while it
    is blocked, which tells the two cases apart.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCONT])
    try:
        os.kill(os.getpid(), signal.SIGTSTP)
        if signal.SIGCONT not in signal.sigpending():
            return False
        signal.sigtimedwait([signal.SIGCONT], 0)
        return True
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCONT])


def _note(signum: int, frame: object) -> None:
    """Signal handler: the wakeup pipe already carries the signal number; nothing else to do."""


def _exec_child(
    argv: Sequence[str], env: Mapping[str, str], gate_r: int, err_w: int, reset: list[int]
) -> NoReturn:
    """In the forked child: join a new process group, wait for the gate, exec CMD."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in reset:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)
        if os.read(gate_r, 1) == _GATE_OPEN:
            os.execvpe(argv[0], list(argv), dict(env))
    except OSError as e:
        os.write(err_w, str(e.errno).encode())
    finally:
        os._exit(127)


def _guardian(lockctl: int, conn_fd: int, guard_r: int, pgid: int, kill_after: float) -> NoReturn:
    """In the forked guardian: hold the connection until lockctl is done or dead."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in _GUARDIAN_IGNORES:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # Keep stderr for the one message below; any other inherited descriptor (lockctl's
        # stdout may be a pipe someone reads to EOF) must not be held open by the guardian.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        _close_all_but(conn_fd, guard_r)
        if _DONE not in _read_all(guard_r):
            _warn(
                f"lockctl: lockctl (pid {lockctl}) ended without releasing its lease; "
                f"terminating CMD (process group {pgid}) before the lease goes"
            )
            terminate_group(pgid, kill_after)
    finally:
        os._exit(0)


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def terminate_group(pgid: int, kill_after: float) -> None:
    """SIGTERM (and SIGCONT, so stopped members act on it) to process group `pgid`; SIGKILL
    once `kill_after` seconds pass with live members left. Returns when no member is alive.

    Zombies do not count: they run no code, and a parent that does not reap them (or an init
    that does not) must not keep the lock held.
    """
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)
    deadline = time.monotonic() + kill_after
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            _signal_group(pgid, signal.SIGKILL)
            # A SIGKILLed process in uninterruptible sleep may still finish the I/O it is in:
            # the lock is held until even that is over.
            deadline = float("inf")
        time.sleep(_GROUP_POLL)


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member runs as another user (a setuid program): alive all the same
    with os.scandir("/proc") as entries:
        pids = [entry.name for entry in entries if entry.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which is in parentheses and may contain anything.
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split(b" ", 3)[:3]
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is gone: nothing left to signal


def _exit_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _controlling_tty() -> int | None:
    """A descriptor of lockctl's controlling terminal, or None without one."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None


def _foreground(tty: int) -> int | None:
    try:
        return os.tcgetpgrp(tty)
    except OSError:
        return None  # hung up


def _give_terminal(tty: int, pgid: int) -> None:
    try:
        os.tcsetpgrp(tty, pgid)
    except OSError:
        pass  # hung up meanwhile: there is no terminal left to hand over


def _read_all(fd: int) -> bytes:
    """Everything readable from `fd` until EOF (blocking pipe) or until empty (non-blocking)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _warn(message: str) -> None:
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass  # stderr gone: the termination matters, not the message
