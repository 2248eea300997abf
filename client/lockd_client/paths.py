"""Where lockd lives on a host by default. Shared by the daemon and every client.

Invariant: with the same environment and uid, the daemon and its clients compute the same
socket path; `LOCKD_SOCKET` overrides it for both.

The rules are written once, on strings. The clients use `socket_path`; the Path forms are for
the daemon, and import pathlib only when called, which keeps it out of lockctl's start-up.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

SOCKET_ENV = "LOCKD_SOCKET"
SOCKET_NAME = "lockd.sock"


def _runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/lockd"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "lockd")
    return f"/tmp/lockd-{os.geteuid()}"


def socket_path() -> str:
    """`LOCKD_SOCKET` if set, else the socket in `runtime_dir()`."""
    return os.environ.get(SOCKET_ENV) or os.path.join(_runtime_dir(), SOCKET_NAME)


def runtime_dir() -> Path:
    """The directory holding the socket (and, for a per-user daemon, the lock files).

    Root: /run/lockd. Others: $XDG_RUNTIME_DIR/lockd, else a private /tmp/lockd-UID.
    """
    from pathlib import Path

    return Path(_runtime_dir())


def default_socket() -> Path:
    """`socket_path()` as a Path."""
    from pathlib import Path

    return Path(socket_path())


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
