"""Running a command under a lease, for `lockctl acquire NAME -- CMD`.

Invariant: no process that CMD started runs while the daemon could consider the lease free,
unless CMD exited by itself first. The daemon connection is held by lockctl and by a guardian
process; the guardian is CMD's parent and a child subreaper, so every process CMD starts stays
in the guardian's tree however it detaches (own process group, own session, double fork).
Whoever gives up the lease first (lockctl seeing it lost, the guardian seeing lockctl die)
kills that whole tree and waits until it is empty before it lets go of the connection. Only
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
  stops and its exit, and "gone" once a tree it was told to terminate is empty.
- lockctl is a child subreaper too: if the guardian dies, the tree falls to lockctl, which
  terminates it before giving up the lease.
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
  or the pipes.
- lockctl waits with `select.poll` on the connection, the guardian's reports, the exec-error
  pipe and a signal wakeup pipe; nothing runs in the background.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, NoReturn

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
_JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# Every disposition lockctl or the guardian changes: CMD gets each back as lockctl's caller
# left it (a signal ignored under nohup stays ignored).
_TOUCHED = (*FORWARDED, *_JOB_CONTROL, signal.SIGCONT, signal.SIGCHLD)
# Python ignores these at start-up for its own sake; a program it starts expects the defaults.
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)

GUARDIAN_NAME = b"lockd-guardian"

# lockctl -> guardian, one byte.
_DONE = b"d"
_TERMINATE = b"t"
# lockctl -> CMD.
_GATE_OPEN = b"g"
# guardian -> lockctl, one line each: b"pid N", b"stop SIGNAL", b"exit STATUS", b"error ERRNO",
# b"gone".

#: How often a tree being terminated is re-examined; after the SIGKILL, ever less often, up
#: to _POLL_MAX, since what is left may be waited for a long time (see the module docstring).
_POLL = 0.02
_POLL_MAX = 0.5

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


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
    process_events: Callable[[], None],
    is_lost: Callable[[], str | None],
    *,
    kill_after: float,
) -> Exit:
    """Run `argv` while the lease is held; return how it ended, once it has exited.

    `conn_fd` is the daemon connection; when it is readable `process_events()` is called and
    then `is_lost()` says whether the lease ended (it returns the reason, or None). A lost
    lease terminates CMD's whole process tree (SIGTERM, then SIGKILL after `kill_after`
    seconds) and raises LeaseLost once nothing of it is left; NotStarted (a LeaseLost) if CMD
    had not been started yet. Raises ExecError if `argv` cannot be executed. The caller
    releases the lease after a normal return.
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
        self.pid = 0  # CMD's, and its process group's, once the guardian has reported it
        self.started = False  # the gate is open: CMD may have run
        self.status: int | None = None  # CMD's wait status once it has exited
        self.exec_errno = b""
        self.guardian = 0
        self.finished = False  # the guardian was told done or terminate, or died
        self.to_guardian = self.from_guardian = self.gate_w = self.err_r = -1
        self.reports = b""  # a partial line from the guardian
        self.tty: int | None = None
        self.may_hand_over = False
        self.handed = False  # CMD's group is the terminal's foreground group, by our doing
        self.early: list[int] = []  # signals to pass on once CMD is known

    def run(self, argv: Sequence[str], env: Mapping[str, str]) -> Exit:
        # Whoever made the connection, CMD must not inherit it (see the module docstring).
        os.set_inheritable(self.conn_fd, False)
        ignored = {s for s in _TOUCHED if signal.getsignal(s) is signal.SIG_IGN}
        handled = [s for s in (*FORWARDED, signal.SIGTSTP) if s not in ignored]
        handled.append(signal.SIGCONT)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        saved = {s: signal.signal(s, _note) for s in handled}
        saved_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.tty = _controlling_tty()
        if self.tty is not None:
            # lockctl leaves the foreground to CMD yet must still write to and hand back the
            # terminal; with SIGTTOU ignored neither stops it.
            saved[signal.SIGTTOU] = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            self.may_hand_over = _only_ancestors_share_group()
        try:
            self._start(argv, env, handled, ignored)
            result = self._wait(wake_r)
            self._end_guardian(_DONE)
            return result
        finally:
            if self.guardian and not self.finished:
                # Only after an unexpected error: even then CMD must not outlive the lease.
                self._end_guardian(_TERMINATE)
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)
            if self.tty is not None:
                if self.handed or (self.pid and _foreground(self.tty) == self.pid):
                    _give_terminal(self.tty, os.getpgrp())
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
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        lockctl = os.getpid()
        # Signals stay blocked across the fork so that the guardian never runs lockctl's
        # handlers (which would write to lockctl's wakeup pipe); it unblocks them itself.
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            self.guardian = os.fork()
            if self.guardian == 0:
                _guardian(argv, env, lockctl, self.conn_fd, gate_r, err_w, orders, reports,
                          self.kill_after, ignored)
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
        while self.status is None:
            ready = dict(poller.poll())
            # The connection is read first: if the lease ended in the same instant that CMD
            # exited, the run cannot be vouched for and is reported as lost.
            if self.conn_fd in ready:
                reason = self._lost_reason(ready[self.conn_fd])
                if reason is not None:
                    self._terminate(reason)
            if self.err_r in ready:
                data = os.read(self.err_r, 64)
                if data:
                    self.exec_errno += data
                else:  # CMD exec'd (or exited): nothing more will come
                    poller.unregister(self.err_r)
                    os.close(self.err_r)
                    self.err_r = -1
            if wake_r in ready:
                for sig in _read_all(wake_r):
                    self._on_signal(sig)
            if self.from_guardian in ready:
                self._on_reports()
        if self.err_r >= 0:
            self.exec_errno += _read_all(self.err_r)  # CMD has exited: this cannot block
        if self.exec_errno:
            code = int(self.exec_errno)
            raise ExecError(code, os.strerror(code))
        status = self.status
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
            if kind == b"pid":
                self._open_gate(int(value))
            elif kind == b"stop":
                self._follow_stop(int(value))
            elif kind == b"exit":
                self.status = int(value)
            elif kind == b"error":
                self.status = 127 << 8
                self.exec_errno = value

    def _open_gate(self, pid: int) -> None:
        self.pid = pid
        reason = self._lost_reason(0)
        if reason is not None:
            self._terminate(reason)
        if self.may_hand_over and _foreground(self.tty) == os.getpgrp():
            self._hand_over()
        os.write(self.gate_w, _GATE_OPEN)
        os.close(self.gate_w)
        self.gate_w = -1
        self.started = True
        for sig in self.early:
            _signal_group(self.pid, sig)

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGTSTP:
            self._stop_job()
        elif sig == signal.SIGCONT:
            self._continue_cmd()
        elif sig in FORWARDED:
            if self.started:
                _signal_group(self.pid, sig)
            else:
                self.early.append(sig)

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

    def _follow_stop(self, sig: int) -> None:
        """CMD stopped (Ctrl-Z, or SIGTTIN in the background): stop lockctl's job as well,
        so the shell sees it stopped, and on `fg`/`bg` continue CMD the same way."""
        if self.tty is None or not _is_stopped(self.pid):
            return  # no job control, or continued already: whoever stopped CMD continues it
        if sig in (signal.SIGTTIN, signal.SIGTTOU) and self.may_hand_over and (
            _foreground(self.tty) == os.getpgrp()
        ):
            # CMD used the terminal in the background, but the job has been brought to the
            # foreground since (`fg` of a running job sends no SIGCONT): CMD may have it now.
            self._continue_cmd()
            return
        handed = self.handed
        if handed:
            _give_terminal(self.tty, os.getpgrp())
            self.handed = False
        # With the terminal handed over, Ctrl-Z reached only CMD: lockctl passes it on to the
        # rest of its group (the shell script running it), as the terminal would have.
        if _stop_self(group=handed):
            self._resume()
        # else orphaned (no shell to continue us): leave CMD as it is, like no terminal

    def _stop_job(self) -> None:
        """lockctl got SIGTSTP: stop CMD with it, and continue both together."""
        if self.started:
            _signal_group(self.pid, signal.SIGTSTP)
        if _stop_self(group=False):
            self._resume()
        elif self.started:
            _signal_group(self.pid, signal.SIGCONT)  # nobody would ever continue it

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
        if self.may_hand_over and _foreground(self.tty) == os.getpgrp():
            self._hand_over()
        _signal_group(self.pid, signal.SIGCONT)

    def _hand_over(self) -> None:
        _give_terminal(self.tty, self.pid)
        self.handed = True

    def _terminate(self, reason: str) -> NoReturn:
        if not self.started:
            os.close(self.gate_w)  # CMD sees EOF at the gate and exits without running
            self.gate_w = -1
            self._end_guardian(_TERMINATE)
            raise NotStarted(f"{reason}; CMD was not started")
        self._end_guardian(_TERMINATE)
        raise LeaseLost(f"{reason}; CMD was terminated, and its work may be incomplete")

    def _end_guardian(self, order: bytes) -> None:
        """Tell the guardian `order` and wait for it to exit; after _TERMINATE, return only
        once CMD's tree is gone."""
        if self.finished:
            return
        self.finished = True
        if order == _DONE:
            # What CMD left running goes on without the lease; it must not land on lockctl.
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        try:
            os.write(self.to_guardian, order)
        except BrokenPipeError:
            pass  # it died: its reports end in EOF below
        if order == _TERMINATE and not self._await_gone():
            terminate_tree(self.pid, self.kill_after)  # lockctl inherited the tree, and reaped
            return
        os.waitpid(self.guardian, 0)

    def _await_gone(self) -> bool:
        """Read the guardian's reports until "gone" (True) or EOF (False: it died)."""
        while True:
            lines = self.reports.split(b"\n")
            if b"gone" in lines[:-1]:
                return True
            data = os.read(self.from_guardian, 4096)
            if not data:
                return False
            self.reports += data

    def _guardian_died(self) -> NoReturn:
        self.finished = True
        _warn(
            f"lockctl: the guardian process (pid {self.guardian}) died; terminating CMD "
            f"(process group {self.pid}) before the lease goes"
        )
        terminate_tree(self.pid, self.kill_after)
        raise LeaseLost(
            f"lockctl's guardian process (pid {self.guardian}) died, so the lease could no "
            "longer be kept safely; CMD was terminated, and its work may be incomplete"
        )


def _guardian(
    argv: Sequence[str],
    env: Mapping[str, str],
    lockctl: int,
    conn_fd: int,
    gate_r: int,
    err_w: int,
    orders: int,
    reports: int,
    kill_after: float,
    ignored: set[int],
) -> NoReturn:
    """In the forked guardian: fork CMD, then hold the connection until lockctl is done or
    dead, reaping everything that falls to it meanwhile."""
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        # The guardian outlives lockctl only to clean up: nothing aimed at the job may stop
        # it early. (Signals are still blocked: none arrives before this.)
        for sig in (*FORWARDED, *_JOB_CONTROL):
            signal.signal(sig, signal.SIG_IGN)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        try:
            cmd = os.fork()
        except OSError as e:
            _report(reports, b"error %d" % e.errno)
            raise
        if cmd == 0:
            _exec_child(argv, env, gate_r, err_w, ignored, (conn_fd, orders, reports))
        try:
            os.setpgid(cmd, cmd)  # the child does it too: whichever runs first
        except OSError:
            pass  # it did already and may have exec'd, or died
        _report(reports, b"pid %d" % cmd)
        _rename(GUARDIAN_NAME)
        # Keep stderr for the messages; any other inherited descriptor (lockctl's stdout may
        # be a pipe someone reads to EOF) must not be held open by the guardian.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        _close_all_but(conn_fd, orders, reports)
        _guard(lockctl, cmd, orders, reports, kill_after)
    finally:
        os._exit(0)


def _guard(lockctl: int, cmd: int, orders: int, reports: int, kill_after: float) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _note)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    poller = select.poll()
    poller.register(orders, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        # Reaped before the first wait too: CMD may have exited before the handler was set.
        cmd = _reap_children(cmd, reports)
        ready = dict(poller.poll())
        if wake_r in ready:
            _read_all(wake_r)
        if orders in ready:
            break
    order = os.read(orders, 1)
    if order == _DONE:
        return
    if not order:
        _warn(
            f"lockctl: lockctl (pid {lockctl}) ended without releasing its lease; "
            "terminating CMD and every process it started before the lease goes"
        )
    terminate_tree(cmd, kill_after)
    if order == _TERMINATE:
        _report(reports, b"gone")


def _reap_children(cmd: int, reports: int) -> int:
    """Reap every child that has ended, reporting CMD's stops and exit; CMD's pid while it
    runs, else 0 (its pid may be reused by anything that falls to the guardian later)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            return cmd
        if pid == 0:
            return cmd
        if pid != cmd or not cmd:
            continue
        if os.WIFSTOPPED(status):
            _report(reports, b"stop %d" % os.WSTOPSIG(status))
        else:
            _report(reports, b"exit %d" % status)
            cmd = 0


def _report(fd: int, line: bytes) -> None:
    try:
        os.write(fd, line + b"\n")
    except BrokenPipeError:
        pass  # lockctl is gone: its EOF says so to the guardian's loop


def _exec_child(
    argv: Sequence[str],
    env: Mapping[str, str],
    gate_r: int,
    err_w: int,
    ignored: set[int],
    guardians: tuple[int, ...],
) -> NoReturn:
    """In the forked child: join a new process group, wait for the gate, exec CMD."""
    try:
        os.setpgid(0, 0)
        # Close-on-exec, all of them; but while CMD waits at the gate, a copy here would hide
        # the guardian's death from lockctl. (Descriptors lockctl's caller passed on stay.)
        for fd in guardians:
            os.close(fd)
        for sig in _TOUCHED:
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
        for sig in _PYTHON_IGNORES:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if os.read(gate_r, 1) == _GATE_OPEN:
            os.execvpe(argv[0], list(argv), dict(env))
    except OSError as e:
        os.write(err_w, str(e.errno).encode())
    finally:
        os._exit(127)


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _prctl(option: int, value: int | bytes) -> None:
    # ctypes costs lockctl ~2 ms to import: only `acquire -- CMD` pays for it.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    arg = ctypes.c_char_p(value) if isinstance(value, bytes) else ctypes.c_ulong(value)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def _rename(title: bytes) -> None:
    """Set the calling process's name and command line (as ps and pkill see them) to `title`.

    The command line is the argument area at the top of the process's stack; it is
    overwritten in place, as setproctitle(3) does, and padded with NULs so that the kernel
    shows no trace of the old one.
    """
    import ctypes

    _prctl(_PR_SET_NAME, title)
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end, fields 48 and 49
    if 0 < start < end:
        size = end - start
        ctypes.memmove(start, title[: size - 1].ljust(size, b"\0"), size)


def terminate_tree(pgid: int, kill_after: float) -> None:
    """Terminate every descendant of the calling process and every member of process group
    `pgid` (0: none): SIGTERM and SIGCONT (so that stopped processes act on it) once, SIGKILL
    `kill_after` seconds later and again every round until none is left.

    Returns when the calling process has no child left and the group no running member. The
    caller must be a child subreaper, so that its children are all its descendants can fall
    to. A SIGKILLed process in uninterruptible sleep may still finish the I/O it is in, and a
    process that may not be signalled runs on: both are waited for.
    """
    refused: set[int] = set()
    _signal_all(pgid, signal.SIGTERM, refused)
    _signal_all(pgid, signal.SIGCONT, refused)
    deadline = time.monotonic() + kill_after
    pause = _POLL
    while _has_children() or group_alive(pgid):
        if time.monotonic() >= deadline:
            _signal_all(pgid, signal.SIGKILL, refused)
            pause = min(pause * 1.5, _POLL_MAX)
        time.sleep(pause)


def _signal_all(pgid: int, sig: int, refused: set[int]) -> None:
    """Send `sig` to CMD's process group and to every descendant of the calling process
    outside it (once each: a handler may act on every SIGTERM it gets); say once for each
    process that may not be signalled that it is waited for."""
    refused_now = []
    if pgid > 0 and not _signal_group(pgid, sig):
        refused_now.append(pgid)
    table = _processes()
    group = {pid for pid, _ppid, pgrp, _state in table if pgrp == pgid}
    for pid in _descendants(table, os.getpid()):
        if pid not in group and not _signal(pid, sig):
            refused_now.append(pid)
    for pid in refused_now:
        if pid not in refused:
            refused.add(pid)
            _warn(
                f"lockctl: not allowed to signal process {pid} ({_command(pid)}): "
                "the lock stays held until it exits"
            )


def _has_children() -> bool:
    """Reap every child that has ended; whether any is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a running member: zombies do not count, but a
    process whose main thread has exited while others run does."""
    if pgid <= 0:
        return False
    return any(
        pgrp == pgid and _running(pid, state) for pid, _ppid, pgrp, state in _processes()
    )


def _processes() -> list[tuple[int, int, int, bytes]]:
    """(pid, parent pid, process group, state) of every process."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which is in parentheses and may contain anything.
        state, ppid, pgrp = stat[stat.rindex(b")") + 2 :].split(b" ", 3)[:3]
        table.append((int(name), int(ppid), int(pgrp), state))
    return table


def _descendants(table: list[tuple[int, int, int, bytes]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _pgrp, _state in table:
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int, state: bytes) -> bool:
    if state not in (b"Z", b"X"):
        return True
    # A thread group whose leader exited shows the leader's state while other threads run.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].startswith(b"T")


def _only_ancestors_share_group() -> bool:
    """Whether every other running member of lockctl's process group is an ancestor of
    lockctl: lockctl is its own job, or run by a shell script that is the job; not a member
    of a pipeline whose other members may want the terminal."""
    table = _processes()
    parents = {pid: ppid for pid, ppid, _pgrp, _state in table}
    ancestors = set()
    pid = os.getppid()
    while pid > 1 and pid not in ancestors:
        ancestors.add(pid)
        pid = parents.get(pid, 0)
    me, group = os.getpid(), os.getpgrp()
    return not any(
        pgrp == group and pid != me and pid not in ancestors and _running(pid, state)
        for pid, _ppid, pgrp, state in table
    )


def _stop_self(*, group: bool) -> bool:
    """Stop lockctl (and its process group if `group`) as Ctrl-Z would; return once
    continued. False if it was not stopped.

    The kernel discards SIGTSTP for a process group no shell controls (orphaned); continuing
    CMD then would only let it stop again at once. A continue leaves SIGCONT pending while it
    is blocked, which tells the two cases apart.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCONT])
    handler = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        if group:
            os.killpg(os.getpgrp(), signal.SIGTSTP)
        else:
            os.kill(os.getpid(), signal.SIGTSTP)
        if signal.SIGCONT not in signal.sigpending():
            return False
        signal.sigtimedwait([signal.SIGCONT], 0)
        return True
    finally:
        signal.signal(signal.SIGTSTP, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCONT])


def _note(signum: int, frame: object) -> None:
    """Signal handler: the wakeup pipe already carries the signal number; nothing else to do."""


def _signal(pid: int, sig: int) -> bool:
    """Send `sig` to `pid`; False if that is not allowed (it runs as another user)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # gone: nothing left to signal
    except PermissionError:
        return False
    return True


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False if no member may be signalled."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is gone: nothing left to signal
    except PermissionError:
        return False
    return True


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return "gone"


def _exit_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _controlling_tty() -> int | None:
    """A descriptor of lockctl's controlling terminal, or None without one."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def _foreground(tty: int | None) -> int | None:
    if tty is None:
        return None
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
