"""Facts about other processes, from the kernel: socket peer credentials and /proc.

Invariant: nothing here raises because a process went away or hides its /proc entries; a
fact that cannot be read is "" or None.
"""

from __future__ import annotations

import os
import socket
import struct
from array import array
from typing import Final

from lockd_client.describe import sanitize

#: `status` shows commands on one line each; a longer command line says nothing more useful.
MAX_COMMAND_LENGTH: Final = 1024
# UTF-8 needs at most 4 bytes a character, so this many bytes always fill MAX_COMMAND_LENGTH.
_COMMAND_READ_BYTES = 4 * MAX_COMMAND_LENGTH

_UCRED: Final = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (since 4.13), which the socket module does not name.
_SO_PEERGROUPS: Final = 59
#: The most Python's getsockopt reads: 256 groups. A peer in more is read from /proc.
_PEERGROUPS_BYTES: Final = 1024


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


#: A file, as the kernel's lock lists name it: (MAJOR, MINOR, INODE).
FileKey = tuple[int, int, int]


def held_flock(line: bytes) -> tuple[FileKey, int, bool] | None:
    """(file, pid, exclusive) of a line of /proc/locks, or of a `lock:` line of an fdinfo,
    that is a held flock; None for anything else (a waiter, a POSIX lock, a blank line)."""
    # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF"; waiters read "N: -> FLOCK ...".
    fields = line.removeprefix(b"lock:").split()
    if len(fields) < 6 or fields[1] != b"FLOCK":
        return None
    major, minor, inode = fields[5].split(b":")
    return (int(major, 16), int(minor, 16), int(inode)), int(fields[4]), fields[3] == b"WRITE"


def flock_holders(files: set[FileKey], suffix: str) -> dict[FileKey, list[int]]:
    """The processes holding an flock on each of `files` through a descriptor of their own,
    by pid order; only descriptors whose path ends with `suffix` are looked at.

    /proc/locks names the process that took a lock, which is not who holds it once the
    descriptor was passed on (a lease lockd granted). This look reads every process's list
    of descriptors, without touching any file (a readlink each, and the fdinfo of those that
    end with `suffix`): use it only where /proc/locks cannot tell. Descriptors this process
    may not look at (another user's, unless it may ptrace them) are not found.
    """
    found: dict[FileKey, list[int]] = {}
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
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffix):
                    continue
            except OSError:
                continue
            for line in (_read(pid, f"fdinfo/{fd}") or b"").splitlines():
                entry = held_flock(line) if line.startswith(b"lock:") else None
                if entry is not None and entry[0] in files and pid not in found.get(entry[0], ()):
                    found.setdefault(entry[0], []).append(pid)
    return found
