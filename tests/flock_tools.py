"""Outside flock users for tests: real flock(1) processes on the same files lockd uses."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lockd.backend import Claim, Requester

from .waiting import wait_until

WAIT = 10.0


def claim(*names: str, shared: bool = False, wait: bool = True, slots: dict[str, int] | None = None) -> Claim:
    return Claim(
        names=names, shared=shared, wait=wait,
        requester=Requester(os.getpid(), os.getuid(), os.getgid(), "test", None), slots=slots or {},
    )


def make_lock_dir(root: Path) -> Path:
    path = root / "locks"
    path.mkdir(mode=0o700)
    return path


def can_flock(path: Path, shared: bool = False) -> bool:
    """Whether `flock -n` gets `path` right now (in exclusive or shared mode)."""
    mode = "-s" if shared else "-x"
    code = subprocess.run(["flock", "-n", mode, str(path), "true"], timeout=WAIT).returncode
    assert code in (0, 1), f"flock(1) failed with {code}"
    return code == 0


def flock_pids() -> set[int]:
    """Pids holding a flock anywhere, read from /proc/locks independently of lockd."""
    with open("/proc/locks") as f:
        return {int(line.split()[4]) for line in f if line.split()[1] == "FLOCK"}


@contextmanager
def outside_flock(path: Path, shared: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A `flock [-s] PATH sleep 30` process, yielded once it holds the lock; killed after."""
    mode = ["-s"] if shared else []
    # Its own session: the sleeping child inherits the locked descriptor, so both must die.
    proc = subprocess.Popen(["flock", *mode, str(path), "sleep", "30"], start_new_session=True)
    try:

        def holding() -> bool:
            assert proc.poll() is None, f"flock(1) exited with {proc.returncode}"
            return proc.pid in flock_pids()

        wait_until(holding, "flock(1) took the lock", interval=0.002)
        yield proc
    finally:
        kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` and everything in its session; return once its lock is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(WAIT)
    # The lock lives on in a child holding the inherited descriptor until that child dies too.
    wait_until(lambda: proc.pid not in flock_pids(), "the killed flock(1)'s lock went away", interval=0.002)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptors_of(path: Path) -> list[int]:
    """This process's open descriptors of the file `path`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(int(fd))
        except FileNotFoundError:
            pass  # the descriptor listdir read through, closed since
    return found
