"""What lockd needs from systemd: inherited listening sockets, sd_notify, the watchdog.

Invariant: without systemd's environment variables every function here is a no-op returning
its empty value, so lockd runs the same by hand; and notifying never raises into the server —
a failed send is logged once and the daemon carries on.

The environment contract is systemd's (sd_listen_fds(3), sd_notify(3), sd_watchdog_enabled(3));
it is small and stable enough that lockd speaks it directly rather than depending on libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from typing import Final

import trio
from lockd_client.errors import LockdError

log = logging.getLogger(__name__)

#: systemd passes sockets as descriptors 3, 4, ... (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3


class ActivationError(LockdError):
    """systemd passed descriptors lockd cannot serve on; the message says which and why."""


def listen_fds() -> list[socket.socket]:
    """The listening sockets systemd passed to this process, in order; [] when none.

    Honoured only when LISTEN_PID is this process (the variables may have been inherited from
    a parent they were meant for). LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from
    the environment either way, so no child of lockd mistakes them for its own. Each descriptor
    is made close-on-exec and must be a listening AF_UNIX stream socket, else ActivationError
    (and no descriptor is closed).
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
        if n < 0:
            raise ValueError
    except ValueError:
        raise ActivationError(
            f"bad socket activation environment LISTEN_PID={pid!r} LISTEN_FDS={count!r}; "
            "start lockd from a .socket unit or without these variables"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
            sockets.append(_listening_unix_socket(fd))
    except ActivationError:
        for sock in sockets:
            sock.detach()
        raise
    return sockets


def _listening_unix_socket(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(
            f"systemd was to pass descriptor {fd}, but it is not open: {exc}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(
            f"descriptor {fd} from systemd is not a socket; lockd.socket must use ListenStream="
        )
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"an {sock.family.name} {sock.type.name} socket"
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            what += " that is not listening"
        sock.detach()
        raise ActivationError(
            f"descriptor {fd} from systemd is {what}; lockd serves only a listening "
            "AF_UNIX stream socket (ListenStream=/path in lockd.socket)"
        )
    return sock


class Notifier:
    """Sends sd_notify state to systemd over the datagram socket named by NOTIFY_SOCKET.

    Without NOTIFY_SOCKET every method does nothing. Sends never block (a full systemd queue
    drops the message) and never raise; the first failure is logged as a warning, later ones
    only at debug level.
    """

    def __init__(self, address: str | None) -> None:
        """`address`: NOTIFY_SOCKET's value — a path, or `@name` for an abstract socket."""
        self._name = address
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:
            self._fail(f"NOTIFY_SOCKET={address!r} is neither a path nor @abstract")
            return
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._fail(f"cannot create the notify socket: {exc}")
            return
        self._sock.setblocking(False)

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send `VAR=value` lines as one message. Returns whether systemd got it."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)  # type: ignore[arg-type]
        except OSError as exc:
            self._fail(f"sd_notify to {self._name} failed: {exc}")
            return False
        return True

    def ready(self, status: str) -> bool:
        """Tell systemd lockd now serves; only after the socket accepts and the backend works."""
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A one-line summary `systemctl status lockd` shows (e.g. leases held, waiters)."""
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        """Reloading the configuration; follow with `ready` once it is applied (or refused)."""
        # systemd 253+ wants the moment of the reload, to order it against later READY=1.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=shutting down")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _fail(self, message: str) -> None:
        if self._warned:
            log.debug("%s", message)
            return
        self._warned = True
        log.warning("%s; systemd will not see lockd's state (and its watchdog may restart it)", message)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of WATCHDOG_USEC; None when no watchdog is set.

    WATCHDOG_PID, when present, must be this process: the watchdog is meant for it alone.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if usec is None or (pid is not None and int(pid) != os.getpid()):
            return None
        timeout = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r WATCHDOG_PID=%r: not numbers", usec, pid)
        return None
    if timeout <= 0:
        return None
    return timeout / 2 / 1_000_000


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping systemd's watchdog now and every `interval` seconds, until cancelled.

    Runs as a task of the server's nursery on the event loop itself, so a loop that stops
    running stops the pings and systemd restarts lockd. Cancellation ends it between pings;
    nothing is left to clean up.
    """
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
