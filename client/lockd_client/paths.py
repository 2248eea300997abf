"""Where lockd lives on a host by default. Shared by the daemon and every client.

Invariants: with the same environment and uid, a client finds the daemon that user would
start (`LOCKD_SOCKET` overrides it for both), and only when that daemon's socket is absent
falls back to the host's system daemon; so a user never has to be told where the system one
is. Every socket path handed out is absolute: a relative `LOCKD_SOCKET` is refused, since it
would name another socket in every directory a client starts in.

The rules are written once, on strings. The clients use `socket_path`; the Path forms are for
the daemon, and import pathlib only when called, which keeps it out of lockctl's start-up.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from .errors import InvalidArgument

if TYPE_CHECKING:
    from pathlib import Path

#: The environment variable that names the socket, for the daemon and every client alike.
SOCKET_ENV: Final = "LOCKD_SOCKET"
#: The socket's file name in a runtime directory.
SOCKET_NAME: Final = "lockd.sock"
#: Where the system service (run as root, or socket-activated) listens.
SYSTEM_SOCKET: Final = "/run/lockd/lockd.sock"


def _runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/lockd"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "lockd")
    return f"/tmp/lockd-{os.geteuid()}"


def socket_problem(path: str) -> str | None:
    """Why `path` cannot name lockd's socket, or None."""
    if not path.startswith("/"):
        return f"the socket must be an absolute path, not {path!r}"
    return None


def _own_socket() -> str:
    env = os.environ.get(SOCKET_ENV)
    if not env:
        return os.path.join(_runtime_dir(), SOCKET_NAME)
    problem = socket_problem(env)
    if problem is not None:
        raise InvalidArgument(f"{SOCKET_ENV}: {problem}; set it to an absolute path or unset it")
    return env


def socket_path() -> str:
    """Where a client finds lockd: `LOCKD_SOCKET` if set; else this user's own daemon's socket
    if it exists; else the system daemon's (SYSTEM_SOCKET) if that exists; else this user's
    own (so that an error names the socket a `lockd` of this user would create).

    Raises InvalidArgument if `LOCKD_SOCKET` is not an absolute path."""
    own = _own_socket()
    if SOCKET_ENV in os.environ or os.path.exists(own) or not os.path.exists(SYSTEM_SOCKET):
        return own
    return SYSTEM_SOCKET


def default_socket() -> Path:
    """The socket a daemon of this user binds by default: `LOCKD_SOCKET`, else the one in its
    runtime directory (root: /run/lockd; others: $XDG_RUNTIME_DIR/lockd, else /tmp/lockd-UID).

    Raises InvalidArgument if `LOCKD_SOCKET` is not an absolute path."""
    from pathlib import Path

    return Path(_own_socket())


def default_lock_dir() -> Path:
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/run/lock/lockd")
    return Path(_runtime_dir(), "locks")


def default_state_dir() -> Path:
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/var/lib/lockd")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "lockd"
