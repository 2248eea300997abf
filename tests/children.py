"""Forked children for the runs that kill their participants at random (tests/test_chaos.py,
tests/test_etcd_checker.py).

Invariant: a forked child never returns into the test runner, whatever its function does;
and a child killed by `stop_and_kill` does nothing after the line its killer notes between
stopping it and killing it, so a history read from a log can take that line as its end.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def fork(target: Callable[..., object], *args: object) -> int:
    """Run `target(*args)` in a child process; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            target(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def stop_and_kill(pid: int, note: Callable[[str], None], who: str) -> None:
    """SIGSTOP `pid`, note `KILL who`, SIGKILL it and reap it. A child that had died on its
    own is noted as `UNEXPECTED who exited with status N` instead: its own lines say why."""
    os.kill(pid, signal.SIGSTOP)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        note(f"UNEXPECTED {who} exited with status {status}")
        return
    note(f"KILL {who}")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
