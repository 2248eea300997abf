"""Facts about other processes, from the kernel: socket peer credentials and /proc.

Invariant: nothing here raises because a process went away or hides its /proc entries; a
fact that cannot be read is "" or None.
"""

from __future__ import annotations

import os
import socket
import struct
from array import array

from lockd_client.describe import sanitize

#: `status` shows commands on one line each; a longer command line says nothing more useful.
MAX_COMMAND_LENGTH = 1024
# UTF-8 needs at most 4 bytes a character, so this many bytes always fill MAX_COMMAND_LENGTH.
_COMMAND_READ_BYTES = 4 * MAX_COMMAND_LENGTH

_UCRED = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (since 4.13), which the socket module does not name.
_SO_PEERGROUPS = 59
#: The most Python's getsockopt reads: 256 groups. A peer in more is read from /proc.
_PEERGROUPS_BYTES = 1024


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected `sock`, as the kernel recorded at connect.

    A socket with no peer gives (0, -1, -1).
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def peer_groups(sock: socket.socket, pid: int, gid: int) -> frozenset[int]:
    """Every group of the process that connected `sock` (`pid`, primary `gid`), as the kernel
    recorded them at connect (SO_PEERGROUPS): a policy naming groups must see who connected,
    not what a recycled pid runs now. Falls back to /proc only on a kernel without the option
    or for a peer in more than 256 groups."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEERGROUPS_BYTES)
    except OSError:  # ENOPROTOOPT: an older kernel; ERANGE: more groups than fit
        return process_groups(pid) | {gid}
    return frozenset(array("I", raw)) | {gid}


def _read(pid: int, entry: str, size: int = -1) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{entry}", "rb", buffering=0) as f:
            return f.read(size)
    except OSError:
        return None


def command_line(pid: int) -> str:
    """The arguments of `pid` joined by spaces, at most MAX_COMMAND_LENGTH characters.

    "" when the process is gone, is a kernel thread or zombie (no arguments), or cannot be read.
    """
    raw = _read(pid, "cmdline", _COMMAND_READ_BYTES)
    if not raw:
        return ""
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    # Any process may put newlines or escape sequences in its argv: shown raw they would
    # forge log lines or rewrite an operator's terminal.
    return sanitize(text[:MAX_COMMAND_LENGTH])


def process_uid(pid: int) -> int | None:
    """The real uid of `pid`, or None if it cannot be read."""
    raw = _read(pid, "status")
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    return None


def process_groups(pid: int) -> frozenset[int]:
    """The supplementary group ids of `pid` now (the Groups: line of /proc/PID/status); empty
    if unreadable."""
    raw = _read(pid, "status")
    if raw is None:
        return frozenset()
    for line in raw.splitlines():
        if line.startswith(b"Groups:"):
            return frozenset(int(g) for g in line.split()[1:])
    return frozenset()


def flock_holders(files: set[tuple[int, int, int]]) -> dict[tuple[int, int, int], list[int]]:
    """The processes holding an flock on each of `files` (MAJOR, MINOR, INODE) through a
    descriptor of their own, found by looking at every process's descriptors: pid order.

    /proc/locks names the process that took a lock, which is not who holds it once the
    descriptor was passed on and its taker exited (a lease lockd granted before it
    restarted). This look costs a stat per descriptor on the host: use it only for those.
    A process whose descriptors cannot be read (another user's, to a daemon not run as
    root) is not found.
    """
    found: dict[tuple[int, int, int], list[int]] = {}
    try:
        pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
            if key in files and pid not in found.get(key, ()) and _holds_flock(pid, fd):
                found.setdefault(key, []).append(pid)
    return found


def _holds_flock(pid: int, fd: str) -> bool:
    """Whether descriptor `fd` of `pid` refers to an open file description holding an flock
    (its fdinfo lists the locks that description holds)."""
    raw = _read(pid, f"fdinfo/{fd}")
    return raw is not None and any(
        line.startswith(b"lock:") and b"FLOCK" in line for line in raw.splitlines()
    )
