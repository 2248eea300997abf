"""Inspecting and terminating the process tree lockctl or its guardian is responsible for.

Invariant: `terminate_tree` returns only once the calling process (a child subreaper) has no
child left and CMD's process group no running member; a process that may not be signalled
(another user's, started through sudo) is waited for, however long that takes, and said so
once on stderr. Everything here reads /proc and sends signals; nothing is cached, since any
process may start or exit between two looks.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start

#: How often a tree being terminated is re-examined: often enough that a tree that ends at
#: SIGTERM is seen gone at once; after the SIGKILL, ever less often, up to _POLL_MAX, since
#: what is left may be waited for a long time (see the module docstring).
_POLL: Final = 0.02
_POLL_MAX: Final = 0.5


def stat_fields(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat (`pid` may be "self") after the command name: the state
    (field 3 in proc(5)) first, so field N is at index N - 3. OSError if it is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name is in parentheses and may contain anything, parentheses included.
    return stat[stat.rindex(b")") + 2 :].split()


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
    if pgid > 0 and not signal_group(pgid, sig):
        refused_now.append(pgid)
    table = processes()
    group = {pid for pid, _ppid, pgrp, _state in table if pgrp == pgid}
    for pid in _descendants(table, os.getpid()):
        if pid not in group and not _signal(pid, sig):
            refused_now.append(pid)
    for pid in refused_now:
        if pid not in refused:
            refused.add(pid)
            warn(
                f"lockctl: not allowed to signal process {pid} ({command_name(pid)}): "
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
        pgrp == pgid and running(pid, state) for pid, _ppid, pgrp, state in processes()
    )


def processes() -> list[tuple[int, int, int, bytes]]:
    """(pid, parent pid, process group, state) of every process."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            state, ppid, pgrp = stat_fields(name)[:3]
        except OSError:
            continue  # exited meanwhile
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


def running(pid: int, state: bytes) -> bool:
    if state not in (b"Z", b"X"):
        return True
    # A thread group whose leader exited shows the leader's state while other threads run.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def is_stopped(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] == b"T"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> bool:
    """Send `sig` to `pid`; False if that is not allowed (it runs as another user)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # gone: nothing left to signal
    except PermissionError:
        return False
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False if no member may be signalled."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is gone: nothing left to signal
    except PermissionError:
        return False
    return True


def command_name(pid: int) -> str:
    """The name of process `pid` (its comm, as ps shows it); "gone" if it has none."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return "gone"


def warn(message: str) -> None:
    """Say `message` on stderr, if there still is one."""
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass  # stderr gone: the termination matters, not the message
