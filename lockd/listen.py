"""The listening sockets: binding lockd's own, and accepting on it or on systemd's.

Invariant: a socket is only ever bound where nothing else lives (a stale socket file
excepted), with its final mode from the first instant; and accepting never blocks the event
loop — every socket here is non-blocking, and a task waits for readiness through trio.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Final, NamedTuple

import trio

from . import handover

#: The host's cap on every listen backlog (net.core.somaxconn): listen(2) cuts a larger one
#: down to it without a word, so this is the longest queue lockd can ask for.
SOMAXCONN: Final = "/proc/sys/net/core/somaxconn"


class Listener(NamedTuple):
    """A listening socket, and the socket file this daemon bound it at, if it did (a path and
    the inode bound there): that file is this daemon's to remove when it stops, systemd's
    sockets' are not."""

    sock: socket.socket
    path: Path | None = None
    inode: int | None = None

    @classmethod
    def bound(cls, sock: socket.socket, path: Path) -> Listener:
        """`sock`, which this daemon has just bound at `path`."""
        return cls(sock, path, os.stat(path).st_ino)

    def unlink(self) -> None:
        """Remove the socket file this daemon bound, unless another daemon has bound that path
        since (it is then that one's)."""
        if self.path is None:
            return
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def hand_over(self) -> handover.ListenerState:
        """The listener as a re-executed daemon adopts it (`adopted`)."""
        return handover.ListenerState(
            fd=self.sock.fileno(), path=None if self.path is None else str(self.path), inode=self.inode,
        )

    @classmethod
    def adopted(cls, state: handover.ListenerState) -> Listener:
        """The listener a daemon this one re-executed from handed over."""
        sock = socket.socket(fileno=state.fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        return cls(sock, None if state.path is None else Path(state.path), state.inode)


def somaxconn() -> int:
    """The longest listen queue this host allows (see SOMAXCONN); Python's SOMAXCONN constant
    if it cannot be read."""
    try:
        with open(SOMAXCONN, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind_unix_listener(path: str, mode: int, backlog: int | None = None, option: str = "--socket") -> socket.socket:
    """Bind a listening AF_UNIX socket at `path` with `mode`, replacing only a stale socket.

    The kernel queues up to `backlog` connections that lockd has not accepted yet (default:
    as many as the host allows, `somaxconn()`): a burst of clients, or a daemon briefly
    stopped, waits there. Past it, clients find the queue full (EAGAIN) and retry.

    A live daemon answering at `path` is an error; a socket file nobody answers on is stale
    and replaced. Anything else at the path (a regular file, a directory) is left alone and
    is an error (naming `option`, what chose the path). The mode is set through the umask at
    bind time, so the socket is never reachable with a wider mode, even for an instant.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; move it away or choose another {option}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            # Not blocking: a live daemon whose queue is full (busy, or stopped) would hold a
            # blocking connect for as long as it stays so; EAGAIN says it is there.
            probe.setblocking(False)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: its daemon is gone
            except BlockingIOError:
                raise OSError(
                    errno.EADDRINUSE,
                    f"another lockd is serving on {path} (busy); stop it first or choose another {option}",
                ) from None
            else:
                raise OSError(
                    errno.EADDRINUSE,
                    f"another lockd is already serving on {path}; stop it first or choose another {option}",
                )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(somaxconn() if backlog is None else backlog)
    return sock


async def accept(listener: socket.socket) -> socket.socket:
    """The next connection on `listener`, as a non-blocking socket, returned with no
    checkpoint since accept(2): the caller takes charge of it before any other task runs (a
    re-exec hands over the connections it knows of; one in between would be closed by the exec).

    Raises what accept(2) raises (EMFILE when out of descriptors...), and ClosedResourceError
    once `close` was called on the listener. Cancellation: nothing is accepted.
    """
    listener.setblocking(False)
    # A burst of connections must not keep the accepting task from yielding.
    await trio.lowlevel.cancel_shielded_checkpoint()
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        conn.setblocking(False)
        return conn


def close(listener: socket.socket) -> None:
    """Stop listening: a task in `accept` gets ClosedResourceError."""
    trio.lowlevel.notify_closing(listener)
    listener.close()
