"""Where lockd lives on a host by default. Shared by the daemon and every client.

Invariant: with the same environment and uid, the daemon and its clients compute the same
socket path; `LOCKD_SOCKET` overrides it for both.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "LOCKD_SOCKET"
SOCKET_NAME = "lockd.sock"


def runtime_dir() -> Path:
    """The directory holding the socket (and, for a per-user daemon, the lock files).

    Root: /run/lockd. Others: $XDG_RUNTIME_DIR/lockd, else a private /tmp/lockd-UID.
    """
    if os.geteuid() == 0:
        return Path("/run/lockd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "lockd"
    return Path(f"/tmp/lockd-{os.geteuid()}")


def default_socket() -> Path:
    """`LOCKD_SOCKET` if set, else the socket in `runtime_dir()`."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return runtime_dir() / SOCKET_NAME


def default_lock_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/lock/lockd")
    return runtime_dir() / "locks"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/lockd")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "lockd"
