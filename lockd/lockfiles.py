"""The lock files: real flock() locks on `<lock dir>/NAME.lock`, taken for lockd tickets.

Invariants:
- A ticket holds the flock of every one of its names, or of none: `try_lock` never waits and
  never keeps part of a ticket, so lockd cannot deadlock with processes that flock these files
  themselves (it never holds one of their files while waiting for another).
- Every file is opened relative to the lock directory's descriptor — the one opened (never
  through a symbolic link) and checked at start — never through a symbolic link, and is used
  only if it is a regular file. A file is never truncated or unlinked: its
  inode is the lock, shared with every outside `flock` user of the same path.
- An exclusive ticket has its own open file; all shared tickets on a name share one open file
  and one LOCK_SH, counted. Closing a file is what releases its flock, so nothing is held once
  its count reaches zero, and `close()` releases everything.

The table only asks for locks that are compatible among lockd's own tickets; the kernel then
arbitrates against everyone else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from lockd_client.errors import BadLockFile, DaemonUnavailable, LimitExceeded, LockdError
from lockd_client.protocol import Holder, Mode, name_problem

from . import procinfo
from .table import Ticket

SUFFIX = ".lock"

# O_NONBLOCK: opening a FIFO or device someone planted at the path must not hang the daemon
# (Linux opens a FIFO for read and write at once, but only O_NONBLOCK promises it).
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class LockDirError(LockdError):
    """The lock directory is missing, unusable or unsafe; the daemon cannot start with it."""


def prepare_lock_dir(path: Path, mode: int) -> None:
    """Create `path` with permissions `mode` (missing parents with 0o755) if it does not exist.

    An existing directory is left as it is; `LockFiles` then judges it (and `mode`).
    """
    try:
        _make_dir(path, mode)
    except OSError as err:
        raise LockDirError(f"cannot create the lock directory {path}: {err.strerror}") from err


def _make_dir(path: Path, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        _make_dir(path.parent, 0o755)
        os.mkdir(path, mode)
    # mkdir narrowed the mode by the umask; the operator asked for exactly this one.
    os.chmod(path, mode)


def _open_lock_dir(path: Path) -> int:
    """Open `path` and check it is a directory only trusted users can change; return its fd.

    Whoever can rename or replace files in the lock directory can take a lock away from its
    holder (by moving the locked inode aside), so the directory must be owned by root or by
    the daemon's user, and writable by group or others only with the sticky bit set. The
    checks are made on the open descriptor, which every lock file is then opened through:
    the directory that was checked is the one used, whatever happens to `path` later.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LockDirError(f"the lock directory {path} does not exist: create it or choose another") from None
    except NotADirectoryError:
        # O_NOFOLLOW with O_DIRECTORY refuses a symbolic link as "not a directory".
        if path.is_symlink():
            raise LockDirError(
                f"the lock directory {path} is a symbolic link: give the directory it points to"
            ) from None
        raise LockDirError(f"the lock directory {path} is not a directory: choose a directory") from None
    except OSError as err:
        raise LockDirError(f"cannot open the lock directory {path}: {err.strerror}") from err
    try:
        _check_lock_dir(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_lock_dir(path: Path, st: os.stat_result) -> None:
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise LockDirError(
            f"the lock directory {path} is writable by group or others without the sticky bit, "
            f"so anyone could replace its lock files: run `chmod go-w {path}` "
            f"(or `chmod +t {path}` if other users must create lock files there)"
        )
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise LockDirError(
            f"the lock directory {path} is owned by uid {st.st_uid}, who could replace its lock "
            f"files: use a directory owned by root or by the daemon's user (uid {euid})"
        )


#: Who flocks one file, as /proc/locks tells: (pid, mode) each.
_Flocks = list[tuple["int | None", Mode]]


def _add_holder(found: dict[str, dict[int | None, Holder]], name: str, pid: int | None, mode: Mode) -> None:
    """Add process `pid` to the outside holders of `name` in `found`, once."""
    holders = found.setdefault(name, {})
    if pid not in holders:
        holders[pid] = Holder(
            pid=pid,
            uid=procinfo.process_uid(pid) if pid else None,
            command=procinfo.command_line(pid) if pid else "",
            mode=mode,
            outside=True,
        )


class _Shared:
    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 1


class LockFiles:
    """The flocks lockd holds in one lock directory. See the module docstring.

    Not thread-safe; every method returns without blocking.
    """

    def __init__(self, lock_dir: Path, file_mode: int = 0o600) -> None:
        """Open `lock_dir`, which must exist and be safe (else LockDirError, which says what
        to fix). New lock files get `file_mode` (less the umask)."""
        self.lock_dir = lock_dir
        self.file_mode = file_mode
        self._dir_fd = _open_lock_dir(lock_dir)
        self._exclusive: dict[str, int] = {}
        self._shared: dict[str, _Shared] = {}
        self._held: set[Ticket] = set()

    def close(self) -> None:
        """Release every flock and close the directory. Idempotent."""
        fds = [*self._exclusive.values(), *(s.fd for s in self._shared.values())]
        self._exclusive.clear()
        self._shared.clear()
        self._held.clear()
        for fd in fds:
            os.close(fd)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def try_lock(self, ticket: Ticket) -> bool:
        """Flock every name of `ticket` in its mode, or none of them; True if it now holds all.

        False when a name is held outside lockd. Raises BadLockFile for a path that is not a
        regular file (or cannot be opened), LimitExceeded when out of descriptors or kernel
        lock records, DaemonUnavailable when the lock directory's filesystem fails; nothing of
        `ticket` is held after False or an exception. A ticket already held stays held: True.
        """
        if ticket in self._held:
            return True
        shared = ticket.shared
        done: list[str] = []
        try:
            for name in ticket.names:
                if not (self._lock_shared(name) if shared else self._lock_exclusive(name)):
                    self._unlock_names(done, shared)
                    return False
                done.append(name)
        except BaseException:
            self._unlock_names(done, shared)
            raise
        self._held.add(ticket)
        return True

    def unlock(self, ticket: Ticket) -> None:
        """Release whatever `ticket` holds. Idempotent; never blocks."""
        if ticket in self._held:
            self._held.remove(ticket)
            self._unlock_names(ticket.names, ticket.shared)

    def outside_holders(self, name: str) -> list[Holder]:
        """`outside_holders_of([name])` for one name: [] when nobody outside holds it."""
        return self.outside_holders_of([name]).get(name, [])

    def outside_holders_of(self, names: Iterable[str], every_file: bool = False) -> dict[str, list[Holder]]:
        """The processes other than this one holding the flock of each of `names`' files, by
        name; a name nobody outside holds is left out. With `every_file`, also those of every
        other lock file in the directory that is held.

        Reads /proc/locks once however many names are asked about: the kernel builds it anew
        on every read, at a cost that grows with every flock on the host, and first waits for
        an RCU grace period (milliseconds, unless it was read moments before), so a caller
        with an event loop runs this in a worker thread. `every_file` adds one scan of the
        directory, only when the read shows flocks on its filesystem that `names` do not
        account for; the directory entries' inode numbers tell which files they are, without
        a stat each. A file that does not exist is left out (it is never created here). A
        holder in another pid namespace shows with pid and uid None.
        """
        by_key: dict[tuple[int, int, int], list[str]] = {}
        for name in dict.fromkeys(names):
            try:
                st = os.stat(name + SUFFIX, dir_fd=self._dir_fd, follow_symlinks=False)
            except OSError:
                continue
            # /proc/locks names the file as MAJOR:MINOR:INODE, the device numbers in hex.
            by_key.setdefault((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), []).append(name)
        if not by_key and not every_file:
            return {}
        try:
            with open("/proc/locks", "rb") as f:
                table = f.read()
        except OSError:
            return {}
        me = os.getpid()
        device = os.fstat(self._dir_fd).st_dev
        here = (os.major(device), os.minor(device))
        found: dict[str, dict[int | None, Holder]] = {}
        #: Flocks on the directory's filesystem that no name asked for accounts for, by inode.
        unnamed: dict[int, _Flocks] = {}
        for line in table.splitlines():
            # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF"; waiters read "N: -> FLOCK ...".
            fields = line.split()
            if len(fields) < 6 or fields[1] != b"FLOCK":
                continue
            major, minor, inode = fields[5].split(b":")
            key = (int(major, 16), int(minor, 16), int(inode))
            number = int(fields[4])
            if number == me:
                continue
            # 0: the holder lives in a pid namespace this one cannot see into.
            pid = number if number > 0 else None
            mode: Mode = "exclusive" if fields[3] == b"WRITE" else "shared"
            wanted = by_key.get(key)
            if wanted is not None:
                for name in wanted:
                    _add_holder(found, name, pid, mode)
            elif every_file and key[:2] == here:
                unnamed.setdefault(key[2], []).append((pid, mode))
        if unnamed:
            for name, holders in self._names_of(unnamed):
                for pid, mode in holders:
                    _add_holder(found, name, pid, mode)
        return {name: list(holders.values()) for name, holders in found.items()}

    def _names_of(self, inodes: dict[int, _Flocks]) -> Iterator[tuple[str, _Flocks]]:
        """The lock names whose files have these inode numbers, with what `inodes` maps them to."""
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                name = entry.name.removesuffix(SUFFIX)
                if entry.inode() in inodes and name != entry.name and name_problem(name) is None:
                    yield name, inodes[entry.inode()]

    # --- internals ----------------------------------------------------------------------------

    def _lock_exclusive(self, name: str) -> bool:
        fd = self._open(name)
        if not self._flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, name):
            return False
        self._exclusive[name] = fd
        return True

    def _lock_shared(self, name: str) -> bool:
        entry = self._shared.get(name)
        if entry is not None:
            entry.users += 1
            return True
        fd = self._open(name)
        if not self._flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, name):
            return False
        self._shared[name] = _Shared(fd)
        return True

    def _unlock_names(self, names: Sequence[str], shared: bool) -> None:
        for name in names:
            if shared:
                entry = self._shared[name]
                entry.users -= 1
                if entry.users:
                    continue
                del self._shared[name]
                os.close(entry.fd)
            else:
                os.close(self._exclusive.pop(name))

    def _open(self, name: str) -> int:
        """Open `name`'s lock file, creating it; only a regular file is returned."""
        filename = name + SUFFIX
        try:
            fd = os.open(filename, _OPEN_FLAGS, self.file_mode, dir_fd=self._dir_fd)
        except OSError as err:
            raise self._error(name, err) from err
        try:
            mode = os.fstat(fd).st_mode
        except OSError as err:
            os.close(fd)
            raise self._error(name, err) from err
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise BadLockFile(
                f"{self.lock_dir / filename} is {kind}; lockd only locks regular files in its "
                "lock directory: remove it"
            )
        return fd

    def _flock(self, fd: int, operation: int, name: str) -> bool:
        """Apply `operation` to `fd`: True if taken; else `fd` is closed, and False if busy."""
        try:
            fcntl.flock(fd, operation)
            return True
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as err:
            os.close(fd)
            raise self._error(name, err) from err

    def _error(self, name: str, err: OSError) -> LockdError:
        path = self.lock_dir / (name + SUFFIX)
        code = err.errno
        if code in (errno.EMFILE, errno.ENFILE):
            return LimitExceeded(
                f"the daemon is out of file descriptors ({err.strerror}): raise its open-file "
                "limit (LimitNOFILE=) or end some leases"
            )
        if code == errno.ENOLCK:
            return LimitExceeded("the kernel has no lock records left: end some leases and retry")
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            return DaemonUnavailable(
                f"cannot create {path} ({err.strerror}): fix the lock directory's filesystem"
            )
        if code == errno.ELOOP:
            return BadLockFile(
                f"{path} is a symbolic link; lockd never follows links in the lock directory: "
                "remove it"
            )
        if code == errno.EISDIR:
            return BadLockFile(f"{path} is a directory; lockd only locks regular files: remove it")
        if code == errno.ENXIO:
            return BadLockFile(f"{path} is a socket or device; lockd only locks regular files: remove it")
        return BadLockFile(
            f"cannot open {path} ({err.strerror}): give the daemon's user read and write access "
            "to it, or remove it"
        )
