"""The keeper of a process-tied lease (`lockctl acquire NAME` without CMD).

Invariant: from the moment lockctl prints the lease's tokens until the process it is tied to
exits or the lease is released, a process holds the lease's lock-file descriptors — the
keeper — whatever happens to lockd meanwhile. The daemon holds its own copy and watches the
process too, so the lock is free only once both have let go. The keeper lets go when the
process exits, when the daemon says the lease ended (a release, a forced release), or when it
is killed: then its copies close, which frees the lock only if the daemon has none (it
restarted since), which is how `lockctl release` ends a lease the daemon no longer knows. It
never unlocks: that is the daemon's to do on a release.

The keeper is a fork of lockctl, in a session of its own (the caller's job control and a
closing terminal do not reach it) and with /dev/null for stdin, stdout and stderr (a caller
reading lockctl's output to EOF, as `$(lockctl acquire NAME)` does, is not held up). It is
named `lockd-keeper PID` in ps, PID being the process it keeps the lease for, which is how
`lockctl release` finds it when the daemon restarted in between. It ignores the signals of
a terminal and job control, not SIGTERM.
"""

from __future__ import annotations

import errno
import os
import select
from typing import TYPE_CHECKING, Final, NoReturn

from . import _guardian, _lockfds

if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer

    from .blocking import Client, Lease
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start

#: The keeper's name (comm) as ps and /proc show it.
NAME: Final = b"lockd-keeper"
#: How long `release` waits for a keeper it told to let go (it exits at once).
_RELEASE_WAIT: Final = 5.0


def start(client: Client, lease: Lease, target: int) -> None:
    """Fork the keeper of `lease`, tied to process `target`, made on `client` with the
    lease's descriptors kept (`Connection.keep_tied_descriptors`); return in lockctl once it
    runs, under its name (so `release` finds it from then on). Raises OSError if `target`
    cannot be watched or the keeper cannot start.
    """
    pidfd = os.pidfd_open(target)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        keeper = _lockfds.fork_keeping()
        if keeper == 0:
            _keep(client, lease, pidfd, target, ready_w)
        os.close(ready_w)
        # Reaped at once: the keeper forks again and exits, which leaves the real keeper a child
        # of init rather than of lockctl's caller, which never reaps what it did not start.
        os.waitpid(keeper, 0)
        if os.read(ready_r, 1) != b"k":
            raise OSError(errno.ECHILD, "the keeper process exited as it started")
    finally:
        os.close(pidfd)
        os.close(ready_r)


def _keep(client: Client, lease: Lease, pidfd: int, target: int, ready: int) -> NoReturn:
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        conn_fd = client.fileno()
        _guardian.close_all_but(conn_fd, pidfd, ready, *lease._record.fds)
        _guardian.rename(NAME + b" %d" % target)
        os.write(ready, b"k")
        os.close(ready)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        poller = select.poll()
        for fd in (conn_fd, pidfd):
            poller.register(fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if pidfd in events:
                break  # the process is gone, and with it the reason to hold the lease
            if conn_fd in events:
                client.process_events()
                if lease.lost:
                    lease.release()  # says it was let go: a broken lease is then freed at once
                    break
                if lease.detached:
                    poller.unregister(conn_fd)  # lockd is gone; the descriptors keep the lease
    finally:
        os._exit(0)


def release(target: int, names: list[str]) -> bool:
    """End the lease that a keeper holds for process `target` on any of `names`, for a lockd
    that no longer knows it (see the module docstring): SIGTERM every such keeper of this
    user (of anyone's, for root), and wait until they are gone. False if there is none."""
    files = {f"{name}.lock" for name in names}
    me = os.getuid()
    keepers = []
    for pid in _keepers_of(target):
        try:
            # Looked at through a pidfd opened first, so a pid reused meanwhile is not signalled.
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone meanwhile
        try:
            held = {os.path.basename(os.readlink(f"/proc/{pid}/fd/{fd}")) for fd in os.listdir(f"/proc/{pid}/fd")}
            if me in (0, os.stat(f"/proc/{pid}").st_uid) and _is_keeper(pid, target) and held & files:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                keepers.append(pidfd)
                continue
        except OSError:
            pass  # gone meanwhile, or not ours to look at
        os.close(pidfd)
    for pidfd in keepers:
        select.select([pidfd], [], [], _RELEASE_WAIT)
        os.close(pidfd)
    return bool(keepers)


def _keepers_of(target: int) -> list[int]:
    """The pids of the keepers of leases tied to `target`, by their names in /proc."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _is_keeper(int(entry), target)]


def _is_keeper(pid: int, target: int) -> bool:
    title = NAME + b" %d" % target
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(len(title) + 2).rstrip(b"\0") == title
    except OSError:
        return False
