"""What runs in lockctl's forked guardian process, and the messages lockctl and it exchange.

Invariant: once forked, the guardian never lets go of the daemon connection, nor of the
lease's lock-file descriptors (whose flocks outlive the daemon), while anything of CMD's tree
runs, unless lockctl said DONE: on TERMINATE, or on EOF from lockctl (it died),
it terminates the tree and only then exits. CMD itself never runs before lockctl writes
GATE_OPEN to its gate. lockctl's death reaches the guardian as that EOF, and reaches CMD at
the gate as EOF too: CMD's child, which may wait there for ever, keeps no copy of lockctl's
ends (it closes every close-on-exec descriptor at once). Both sides speak only through the
constants below.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, NoReturn

from . import _proctree

if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start

#: Signals sent to lockctl that it passes on to CMD's process group. A signal to lockctl
#: stands for a signal to the job, as a terminal sends Ctrl-C to a whole foreground group.
FORWARDED: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: The signals of job control, which the guardian ignores (it is not part of the job) and
#: lockctl relays to CMD by stopping and continuing it.
_JOB_CONTROL: Final = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
#: Every disposition lockctl or the guardian changes: CMD gets each back as lockctl's caller
#: left it (a signal ignored under nohup stays ignored).
TOUCHED: Final = (*FORWARDED, *_JOB_CONTROL, signal.SIGCONT, signal.SIGCHLD)
# Python ignores these at start-up for its own sake; a program it starts expects the defaults.
_PYTHON_IGNORES: Final = (signal.SIGPIPE, signal.SIGXFSZ)

#: The guardian's name and command line, as ps and pkill see them.
NAME: Final = b"lockd-guardian"

# lockctl -> guardian, one byte.
#: CMD exited and the lease is released: leave what it left running alone, and exit.
DONE: Final = b"d"
#: Terminate CMD's tree, report TREE_GONE once it is empty, and exit.
TERMINATE: Final = b"t"
# lockctl -> CMD, one byte on the gate; EOF instead means CMD must not run.
GATE_OPEN: Final = b"g"
# guardian -> lockctl, one line each: the kind, then a space and a decimal number for all
# but TREE_GONE.
#: CMD's pid (and process group), once forked.
CMD_PID: Final = b"pid"
#: CMD stopped, and the signal that stopped it.
CMD_STOPPED: Final = b"stop"
#: CMD exited, and its wait status.
CMD_EXITED: Final = b"exit"
#: CMD could not be forked, and the errno.
FORK_FAILED: Final = b"error"
#: The tree lockctl said TERMINATE about is empty.
TREE_GONE: Final = b"gone"

# prctl(2) options, from <linux/prctl.h>: neither os nor ctypes names them.
_PR_SET_NAME: Final = 15
PR_SET_CHILD_SUBREAPER: Final = 36


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    lockctl: int,
    conn_fd: int,
    lease_fds: Sequence[int],
    gate_r: int,
    err_w: int,
    orders: int,
    reports: int,
    kill_after: float,
    ignored: set[int],
) -> NoReturn:
    """In the forked guardian: fork CMD, then hold the connection and the lease's lock-file
    descriptors until lockctl is done or dead, reaping everything that falls to it meanwhile."""
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        # The guardian outlives lockctl only to clean up: nothing aimed at the job may stop
        # it early. (Signals are still blocked: none arrives before this.)
        for sig in (*FORWARDED, *_JOB_CONTROL):
            signal.signal(sig, signal.SIG_IGN)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        try:
            cmd = os.fork()
        except OSError as e:
            _report(reports, FORK_FAILED, e.errno)
            raise
        if cmd == 0:
            _exec_child(argv, env, gate_r, err_w, ignored)
        try:
            os.setpgid(cmd, cmd)  # the child does it too: whichever runs first
        except OSError:
            pass  # it did already and may have exec'd, or died
        rename(NAME)  # before lockctl may open the gate: CMD's parent goes by it from the start
        _report(reports, CMD_PID, cmd)
        # Keep stderr for the messages; any other inherited descriptor (lockctl's stdout may
        # be a pipe someone reads to EOF) must not be held open by the guardian.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        close_all_but(conn_fd, orders, reports, *lease_fds)
        _guard(lockctl, cmd, orders, reports, kill_after)
    finally:
        os._exit(0)


def _guard(lockctl: int, cmd: int, orders: int, reports: int, kill_after: float) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, note)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    poller = select.poll()
    poller.register(orders, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        # Reaped before the first wait too: CMD may have exited before the handler was set.
        cmd = _reap_children(cmd, reports)
        ready = dict(poller.poll())
        if wake_r in ready:
            read_all(wake_r)
        if orders in ready:
            break
    order = os.read(orders, 1)
    if order == DONE:
        return
    if not order:
        _proctree.warn(
            f"lockctl: lockctl (pid {lockctl}) ended without releasing its lease; "
            "terminating CMD (if it had started) and every process it started, before the lease goes"
        )
    _proctree.terminate_tree(cmd, kill_after)
    if order == TERMINATE:
        _report(reports, TREE_GONE)


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
            _report(reports, CMD_STOPPED, os.WSTOPSIG(status))
        else:
            _report(reports, CMD_EXITED, status)
            cmd = 0


def _report(fd: int, kind: bytes, value: int | None = None) -> None:
    line = kind if value is None else kind + b" %d" % value
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
) -> NoReturn:
    """In the forked child: join a new process group, wait for the gate, exec CMD."""
    try:
        os.setpgid(0, 0)
        # Close now what exec will: this child may wait at the gate for ever, and a copy here
        # would hide a death. A copy of lockctl's end of the orders pipe would hide lockctl's
        # death from the guardian, which would then hold the lease with nothing running; one
        # of the guardian's ends, its death from lockctl; one of the gate's write end would
        # keep this child waiting should both die. (The guardian cannot close them before the
        # fork: it would close with them the inheritable ones CMD must get.)
        _close_as_exec_would(gate_r, err_w)
        for sig in TOUCHED:
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
        for sig in _PYTHON_IGNORES:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if os.read(gate_r, 1) == GATE_OPEN:
            os.execvpe(argv[0], list(argv), dict(env))
    except OSError as e:
        os.write(err_w, str(e.errno).encode())
    finally:
        os._exit(127)


def close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _close_as_exec_would(*keep: int) -> None:
    """Close now every close-on-exec descriptor but `keep`, as exec will, for a child that may
    wait long before it execs. Inheritable ones stay, for the program it execs."""
    fds: Iterable[int]
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no descriptor left to list them with: look at every number instead
        fds = range(3, os.sysconf("SC_OPEN_MAX"))
    for fd in fds:
        if fd in keep:
            continue
        try:
            if not os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # not open: the listing's own descriptor, closed once it was read


def prctl(option: int, value: int | bytes) -> None:
    # ctypes costs lockctl ~2 ms to import: only `acquire -- CMD` pays for it.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    arg = ctypes.c_char_p(value) if isinstance(value, bytes) else ctypes.c_ulong(value)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def rename(title: bytes) -> None:
    """Set the calling process's name and command line (as ps and pkill see them) to `title`.

    The command line is the argument area at the top of the process's stack; it is
    overwritten in place, as setproctitle(3) does, and padded with NULs so that the kernel
    shows no trace of the old one.
    """
    import ctypes

    prctl(_PR_SET_NAME, title)
    fields = _proctree.stat_fields("self")
    start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end, fields 48 and 49
    if 0 < start < end:
        size = end - start
        ctypes.memmove(start, title[: size - 1].ljust(size, b"\0"), size)


def note(signum: int, frame: object) -> None:
    """Signal handler: the wakeup pipe already carries the signal number; nothing else to do."""


def read_all(fd: int) -> bytes:
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
