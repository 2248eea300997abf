"""lockctl's dealings with its controlling terminal: whose process group has it, handing it
over, and stopping lockctl's job as Ctrl-Z would.

Invariant: nothing here changes the terminal's foreground group except `give_terminal`, and
no function raises because the terminal hung up: a hung-up terminal reads as one with no
foreground group, and handing it over then does nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import _proctree

if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start


def controlling_tty() -> int | None:
    """A descriptor of lockctl's controlling terminal, or None without one."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def foreground(tty: int | None) -> int | None:
    """The terminal's foreground process group; None without a terminal or once hung up."""
    if tty is None:
        return None
    try:
        return os.tcgetpgrp(tty)
    except OSError:
        return None  # hung up


def give_terminal(tty: int | None, pgid: int) -> None:
    """Make `pgid` the terminal's foreground process group; nothing without a terminal."""
    if tty is None:
        return
    try:
        os.tcsetpgrp(tty, pgid)
    except OSError:
        pass  # hung up meanwhile: there is no terminal left to hand over


def only_ancestors_share_group() -> bool:
    """Whether every other running member of lockctl's process group is an ancestor of
    lockctl: lockctl is its own job, or run by a shell script that is the job; not a member
    of a pipeline whose other members may want the terminal."""
    table = _proctree.processes()
    parents = {pid: ppid for pid, ppid, _pgrp, _state in table}
    ancestors = set()
    pid = os.getppid()
    while pid > 1 and pid not in ancestors:
        ancestors.add(pid)
        pid = parents.get(pid, 0)
    me, group = os.getpid(), os.getpgrp()
    return not any(
        pgrp == group and pid != me and pid not in ancestors and _proctree.running(pid, state)
        for pid, _ppid, pgrp, state in table
    )


def stop_self(*, group: bool) -> bool:
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
