"""Connecting to lockd's socket: a busy daemon is waited for, a missing one is not.

Invariants:
- Only a busy daemon is waited for. A non-blocking connect(2) to a Unix socket fails with
  EAGAIN exactly when a daemon listens there but its queue of connections not yet accepted
  is full (a burst of clients, or a daemon stopped or starting): that is retried, backing
  off, and so is a connection in that queue whose handshake is not answered yet, and one
  the daemon turned away for its connection limits (`limit` before its welcome: a burst
  larger than them), until the caller's deadline; then DaemonBusy. Every other failure
  raises DaemonUnavailable at once, and only a missing socket or a refused connection says
  that lockd may not be running.
- Retrying never spins: pauses grow from FIRST_PAUSE to LONGEST_PAUSE, each shortened by a
  random share so that a crowd that found the queue full does not come back in step.
- A blocking caller that waits is told once, after BUSY_NOTICE seconds, so that a person
  waiting learns why nothing happens.

connect(2) is never left to block: a blocking connect waits in the kernel for room in the
queue, but a signal handled meanwhile makes Python believe it connected, and it could neither
keep a deadline nor tell anyone it waits.
"""

from __future__ import annotations

import _socket as socket  # the C type: see blocking.py
import select
import time
from collections.abc import Callable, Iterator
from typing import Final

from . import errors
from ._connection import cannot_connect

#: The first pause: a daemon draining a burst makes room in its queue within a millisecond.
FIRST_PAUSE: Final = 0.001
#: The longest pause: a client that waits for a busy daemon is never more than this late
#: once there is room, and a crowd of them retrying costs the host little.
LONGEST_PAUSE: Final = 0.1
#: How long a wait lasts before `on_busy` is called.
BUSY_NOTICE: Final = 1.0
#: How long a caller with no deadline keeps connecting again while the daemon turns it away
#: for its connection limits: a burst passes within it, while a user whose own connections
#: stay open (one per thread, keepers) is told so rather than left waiting for ever.
LIMIT_WAIT: Final = 60.0

#: Called once when connecting has waited BUSY_NOTICE seconds for a busy daemon.
BusyCallback = Callable[[], object]


def attempt(sock: socket.socket, path: str) -> bool:
    """Connect the non-blocking `sock` to `path`: True once connected, False if the daemon's
    queue is full (try again later). Raises DaemonUnavailable for anything else."""
    try:
        sock.connect(path)
    except BlockingIOError:  # EAGAIN: the only way a Unix socket says its queue is full
        return False
    except OSError as exc:
        raise cannot_connect(path, exc) from exc
    return True


def pauses() -> Iterator[float]:
    """The pauses between attempts: doubling from FIRST_PAUSE up to LONGEST_PAUSE, each
    shortened by up to half at random."""
    import random  # only once a daemon is busy: every import lengthens lockctl's start-up

    longest = FIRST_PAUSE
    while True:
        yield longest * random.uniform(0.5, 1.0)
        longest = min(longest * 2, LONGEST_PAUSE)


def busy(path: str, timeout: float, *, queued: bool) -> errors.DaemonBusy:
    """The error for a daemon that did not take the connection within `timeout` seconds;
    `queued`: it was in the daemon's queue, but the handshake was not answered."""
    if queued:
        what = f"lockd at {path} did not answer within {timeout:g} s"
    else:
        what = (
            f"lockd at {path} is busy: its queue of connections waiting to be accepted "
            f"stayed full for {timeout:g} s"
        )
    return errors.DaemonBusy(
        f"{what} (too many clients at once, or lockd is stopped); retry later, or allow a longer wait"
    )


class Patience:
    """How long a blocking client waits for a busy daemon at `path`: `timeout` seconds from
    now (None: as long as it takes), calling `on_busy` once after BUSY_NOTICE seconds."""

    def __init__(self, path: str, timeout: float | None, on_busy: BusyCallback | None) -> None:
        self.path = path
        self._started = time.monotonic()
        self._deadline = None if timeout is None else self._started + timeout
        self._on_busy = on_busy
        self._refusal: errors.LimitExceeded | None = None

    def connect(self) -> socket.socket:
        """A socket connected to the daemon (in blocking mode), once its queue has room.
        Raises DaemonBusy at the deadline, DaemonUnavailable if nothing listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            waits = pauses()
            while not attempt(sock, self.path):
                left = self._left(queued=False)
                pause = next(waits)
                time.sleep(pause if left is None else min(pause, left))
            sock.setblocking(True)
        except BaseException:
            sock.close()
            raise
        return sock

    def pause(self, seconds: float, refusal: errors.LimitExceeded) -> None:
        """Wait `seconds` before connecting again after the daemon turned the connection
        away (`refusal`, which DaemonBusy quotes from now on). Raises DaemonBusy at the
        deadline."""
        self._refusal = refusal
        if self._deadline is None:
            self._deadline = self._started + LIMIT_WAIT
        left = self._left(queued=True)
        time.sleep(seconds if left is None else min(seconds, left))

    def wait_readable(self, sock: socket.socket) -> None:
        """Wait until the daemon has sent something on `sock` (its answer to the handshake).
        Raises DaemonBusy at the deadline."""
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        while True:
            left = self._left(queued=True)
            if readable.poll(None if left is None else left * 1000):
                return

    def _left(self, *, queued: bool) -> float | None:
        """Seconds to wait before looking again (None: no bound); raises DaemonBusy if the
        deadline has passed. Calls `on_busy` once the wait has lasted BUSY_NOTICE."""
        now = time.monotonic()
        waited = now - self._started
        if self._deadline is not None and now >= self._deadline:
            if self._refusal is not None:
                raise errors.DaemonBusy(
                    f"lockd at {self.path} turned the connection away ({self._refusal}), and still "
                    f"did after {self._deadline - self._started:g} s"
                )
            raise busy(self.path, self._deadline - self._started, queued=queued)
        if self._on_busy is not None and waited >= BUSY_NOTICE:
            self._on_busy()
            self._on_busy = None
        left = None if self._deadline is None else self._deadline - now
        if self._on_busy is not None:
            left = BUSY_NOTICE - waited if left is None else min(left, BUSY_NOTICE - waited)
        return left
