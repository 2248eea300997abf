"""The lock files: real flock() locks on `<lock dir>/NAME.lock`, taken for lockd claims.

Invariants:
- A claim holds the flock of every one of its names, or of none: `try_lock` never waits and
  never keeps part of a claim, so lockd cannot deadlock with processes that flock these files
  themselves (it never holds one of their files while waiting for another).
- Every file is opened relative to the lock directory's descriptor — the one opened (never
  through a symbolic link) and checked at start — never through a symbolic link, and is used
  only if it is a regular file. A file is never truncated or unlinked: its
  inode is the lock, shared with every outside `flock` user of the same path.
- Every held claim has an open file description of its own per name, opened read-only,
  holding LOCK_EX or LOCK_SH; for each name it takes as a semaphore of N slots, a LOCK_SH on
  `NAME.lock` and a LOCK_EX on one of its N slot files, `NAME#K.lock` for K in 0..N-1 (`#`
  is in no lock name, so no lock's file is ever a slot file). So the kernel, not only the
  table, bounds a semaphore's holders: a slot whose work outlives its lease (a holder gone,
  a daemon restarted) stays taken until that work ends. The flock belongs to that
  description, not to this process:
  whoever the daemon hands a copy of the descriptor to (SCM_RIGHTS) keeps the lock for as
  long as any copy is open. So `unlock` (the holder let go) releases the flock explicitly,
  for every copy at once, while `abandon` and `close()` only close the daemon's own copy and
  leave the lock to the copies outside, if any: the daemon going away never frees a lock
  that work elsewhere still holds.

The table only asks for locks that are compatible among lockd's own claims; the kernel then
arbitrates against everyone else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

from lockd_client.errors import BadLockFile, DaemonUnavailable, LimitExceeded, LockdError
from lockd_client.protocol import MAX_SLOTS, Holder, Mode, name_problem

from . import procinfo
from .backend import Claim
from .fdlimit import out_of_descriptors

SUFFIX: Final = ".lock"
#: Between a semaphore's name and the number of one of its slot files: `NAME#K.lock`.
SLOT_MARK: Final = "#"

# Read-only: a holder gets a copy of the descriptor, and must be able to do no more with it
# than flock(2) and read an empty file. O_NONBLOCK: opening a FIFO or device someone planted
# at the path must not hang the daemon.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: To look at a slot file that may not exist: never create one for a look.
_PROBE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

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
        #: Held claim → one descriptor per name, in `claim.names` order, then one per slot it
        #: holds, in the same order: the descriptor alone where that is one (most claims: this
        #: is kept per lease, and a tuple of one would cost more than the descriptor; read as
        #: `(fds,) if isinstance(fds, int) else fds`, not through a function, on every grant and
        #: release). Changed only on the event loop, and a claim's entry before its descriptors
        #: close.
        self._held: dict[Claim, int | tuple[int, ...]] = {}
        #: Name → the numbers of its slot files held for claims, and each held claim's slots.
        self._slots_taken: dict[str, set[int]] = {}
        self._slots_of: dict[Claim, list[tuple[str, int]]] = {}

    def close(self) -> None:
        """Close every descriptor, leaving each lock to the copies handed out (see the module
        docstring), and the directory. Idempotent."""
        held = list(self._held.values())
        self._held.clear()
        self._slots_taken.clear()
        self._slots_of.clear()
        for fds in held:
            _close_all((fds,) if isinstance(fds, int) else fds)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def try_lock(self, claim: Claim) -> bool:
        """Flock every name of `claim` in its mode, or none of them; True if it now holds all.

        False when a name is held outside lockd. Raises BadLockFile for a path that is not a
        regular file (or cannot be opened), LimitExceeded when out of descriptors or kernel
        lock records, DaemonUnavailable when the lock directory's filesystem fails; nothing of
        `claim` is held after False or an exception. A claim already held stays held: True.
        """
        if claim in self._held:
            return True
        fds: list[int] = []
        slot_fds: list[int] = []
        slots: list[tuple[str, int]] = []
        try:
            # Slots first: while every slot is held, a waiting claim touches no file at all,
            # so a look at the host's locks never sees a flock of the daemon's come and go
            # on the lock file and takes it for one handed on.
            for name, count in claim.slots.items():
                slot = self._take_slot(name, count)
                if slot is None:
                    _close_all(slot_fds)
                    return False
                fd, number = slot
                slot_fds.append(fd)
                slots.append((name, number))
            for name in claim.names:
                fd = self._open(name + SUFFIX)
                fds.append(fd)
                # A slot of a semaphore is a shared flock here: an outside exclusive `flock`
                # waits for every slot to be free, and holds every slot off while it runs.
                exclusive = not claim.shared_on(name)
                operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
                if not self._flock(fd, operation, name + SUFFIX):
                    _close_all(fds + slot_fds)
                    return False
        except BaseException:
            _close_all(fds + slot_fds)
            raise
        self._hold(claim, fds + slot_fds, slots)
        return True

    def _hold(self, claim: Claim, fds: Sequence[int], slots: list[tuple[str, int]]) -> None:
        """Keep `claim`'s descriptors and its slot files."""
        self._held[claim] = fds[0] if len(fds) == 1 else tuple(fds)
        if slots:
            self._slots_of[claim] = slots
            for name, number in slots:
                self._slots_taken.setdefault(name, set()).add(number)

    def _take_slot(self, name: str, count: int) -> tuple[int, int] | None:
        """Flock one of `name`'s `count` slot files that no claim holds, exclusive: its
        descriptor and number; None if each is held (by work a lease left behind), or if work
        left behind by a semaphore of more slots still holds slot files numbered `count` and
        up, so that `count` are held already."""
        taken = self._slots_taken.get(name, ())
        for number in range(count):
            if number in taken:
                continue
            filename = self._slot_file(name, number)
            fd = self._open(filename)
            try:
                if self._flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, filename):
                    beyond = self._slots_held_from(name, count)
                    if beyond and self._held_below(name, count, number) + beyond >= count:
                        os.close(fd)
                        return None
                    return fd, number
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        return None

    def _held_below(self, name: str, count: int, mine: int) -> int:
        """How many of `name`'s slot files numbered below `count` are held, but for `mine`:
        by claims, or by work that leases left behind."""
        taken = self._slots_taken.get(name, ())
        held = len(taken)
        for number in range(count):
            if number != mine and number not in taken and self._slot_held(name, number):
                held += 1
        return held

    def _slots_held_from(self, name: str, first: int) -> int:
        """How many of `name`'s slot files numbered `first` and up are held (they were made
        for a semaphore of more slots, and its work may run on); stops at the first missing."""
        held = 0
        for number in range(first, MAX_SLOTS):
            state = self._slot_held(name, number)
            if state is None:
                break
            held += state
        return held

    def _slot_held(self, name: str, number: int) -> bool | None:
        """Whether slot file `number` of `name` is held; None if it does not exist (never made
        here) or is no regular file. Looks without creating it or keeping any lock."""
        try:
            fd = os.open(self._slot_file(name, number), _PROBE_FLAGS, dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)
        return False

    @staticmethod
    def _slot_file(name: str, number: int) -> str:
        return f"{name}{SLOT_MARK}{number}{SUFFIX}"

    def descriptors(self, claim: Claim) -> tuple[int, ...]:
        """The descriptors holding `claim`'s flocks, one per name in `claim.names` order, then
        one per slot in `claim.slots` order, to hand to its holder; () if it holds none. They
        stay the daemon's: never close them."""
        fds = self._held.get(claim, ())
        return (fds,) if isinstance(fds, int) else fds

    def slots_of(self, claim: Claim) -> list[tuple[str, int]]:
        """The slot files `claim` holds, as (name, number) in `claim.slots` order: with
        `descriptors`, what the next program of the daemon needs to `adopt` its flocks."""
        return list(self._slots_of.get(claim, ()))

    def adopt(self, held: Sequence[tuple[Claim, Sequence[int], Sequence[tuple[str, int]]]]) -> None:
        """Hold, for each claim in `held`, the descriptors that the previous program of this
        daemon held for it (its `descriptors`, kept open across exec) and its slot files (its
        `slots_of`), as if they had been taken here: `descriptors`, `unlock` and `abandon` then
        work on them. Never blocks.

        Raises ValueError, adopting none, if a claim is held here already, or a descriptor is
        not open on the file it stands for in this lock directory (the name's lock file, or the
        slot file named), or slots do not match the claim's.
        """
        checked: list[tuple[Claim, Sequence[int], list[tuple[str, int]]]] = []
        seen: set[int] = set()
        for claim, fds, slots in held:
            if claim in self._held:
                raise ValueError(f"{'+'.join(claim.names)} is held here already")
            slots = list(slots)
            if [name for name, _ in slots] != list(claim.slots) or any(
                not 0 <= number < claim.slots[name] for name, number in slots
            ):
                raise ValueError(f"slot files {slots} are not one of each of the semaphores {claim.slots}")
            filenames = [name + SUFFIX for name in claim.names] + [self._slot_file(*slot) for slot in slots]
            if len(fds) != len(filenames):
                raise ValueError(f"descriptors {list(fds)} are not one for each of {filenames}")
            if seen.intersection(fds) or len(set(fds)) < len(fds):
                raise ValueError(f"descriptors {list(fds)} include one given before")
            seen.update(fds)
            for fd, filename in zip(fds, filenames, strict=True):
                self._check_handed(fd, filename)
            checked.append((claim, fds, slots))
        for claim, fds, slots in checked:
            self._hold(claim, fds, slots)

    def _check_handed(self, fd: int, filename: str) -> None:
        """Raise ValueError unless `fd`, handed over for `filename`, is open on a regular
        file. Whatever is at `filename` now does not matter: the flock is on the file the
        descriptor was opened on, as it was before the re-exec, even if someone has removed
        or replaced the path since. Such a claim still counts as holding its name's file when
        `outside_holders_of` tells the daemon's flocks from those handed on (see `_own_files`),
        as one taken here before its file was removed does."""
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise ValueError(f"descriptor {fd} for {self.lock_dir / filename} is not open ({err.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"descriptor {fd} for {self.lock_dir / filename} is not open on a regular file")

    def unlock(self, claim: Claim) -> None:
        """Release `claim`'s flocks, for every copy of their descriptors, and close the
        daemon's. Idempotent; never blocks."""
        fds = self._let_go(claim)
        if fds is not None:
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_UN)
            _close_all(fds)

    def abandon(self, claim: Claim) -> None:
        """Close the daemon's descriptors of `claim`: its flocks last while a copy handed out
        is open. Idempotent; never blocks."""
        fds = self._let_go(claim)
        if fds is not None:
            _close_all(fds)

    def _let_go(self, claim: Claim) -> tuple[int, ...] | None:
        """Forget `claim`'s descriptors (the caller closes them); None if it holds none."""
        fds = self._held.pop(claim, None)
        if fds is None:
            return None
        for name, number in self._slots_of.pop(claim, ()):
            taken = self._slots_taken[name]
            taken.discard(number)
            if not taken:
                del self._slots_taken[name]
        return (fds,) if isinstance(fds, int) else fds

    def _own_files(self) -> dict[str | tuple[str, int], int]:
        """The lock files the daemon holds flocks on for claims, as `_files_named` names them,
        with how many claims hold each. Read from copies of `_held` and `_slots_of`, each taken
        without letting the event loop's thread run meanwhile (a dict's copy holds the GIL),
        so safe from the thread that reads the host's locks. O(claims held): kept per file
        instead, it would cost every lease an entry more.

        Counted by name, not by the file a claim's descriptor is open on: a claim whose lock or
        slot file was removed or replaced since it was taken (unlinked or renamed in the lock
        directory by someone else; lockd never does) still counts toward its name. Its own
        flock is on a file no directory entry names any more, and on the file now at the path
        one of the daemon's flocks more is taken for a claim's: a flock handed on there (to
        the work of a lease whose client was cut off) goes unnamed, one per such claim, for as
        long as that claim is held."""
        own: dict[str | tuple[str, int], int] = {}
        for claim in self._held.copy():
            for name in claim.names:
                own[name] = own.get(name, 0) + 1
        for slots in self._slots_of.copy().values():
            for slot in slots:
                own[slot] = 1
        return own

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
        directory, whenever the read shows flocks on its filesystem that `names` do not
        account for (the daemon's own included); the directory entries' inode numbers tell
        which files they are, without a stat each. A file that does not exist is left out (it
        is never created here). A holder in another pid namespace shows with pid and uid None.
        """
        #: The lock files asked about, by the key /proc/locks names them with.
        files: dict[procinfo.FileKey, list[str | tuple[str, int]]] = {}
        for name in dict.fromkeys(names):
            for file in self._files_named(name):
                try:
                    st = os.stat(_filename(file), dir_fd=self._dir_fd, follow_symlinks=False)
                except OSError:
                    break  # slot files are made in order: the first missing ends them
                # /proc/locks names the file as MAJOR:MINOR:INODE, the device numbers in hex.
                files.setdefault((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), []).append(file)
        if not files and not every_file:
            return {}
        try:
            with open("/proc/locks", "rb") as f:
                table = f.read()
        except OSError:
            return {}
        device = os.fstat(self._dir_fd).st_dev
        here = (os.major(device), os.minor(device))
        held: list[tuple[procinfo.FileKey, int, Mode]] = []
        for line in table.splitlines():
            entry = procinfo.held_flock(line)
            if entry is not None and (entry[0] in files or every_file and entry[0][:2] == here):
                key, number, exclusive = entry
                held.append((key, number, "exclusive" if exclusive else "shared"))
        # Flocks on the directory's filesystem that no name asked for: which lock files they
        # are, by the inode numbers of the directory's entries. Whatever the daemon's own lines
        # there, each file is looked up: only a count per file tells its claims' flocks from
        # one handed on (a holder may let go of its copy early, and claims are granted while
        # this runs, so totals over many files would let one file's change hide another's).
        unnamed = {key[2] for key, _, _ in held if key not in files}
        if unnamed:
            for file, inode in self._files_at(unnamed):
                files.setdefault((*here, inode), []).append(file)
            held = [entry for entry in held if entry[0] in files]
        # Each flock the daemon took is one line of /proc/locks; as many of its lines on a
        # file as its claims hold there are theirs, and any more were handed on.
        me = os.getpid()
        own = self._own_files() if any(number == me for _, number, _ in held) else {}
        taken: list[tuple[procinfo.FileKey, int | None, Mode]] = []
        for key, number, mode in held:
            if number == me and _count_off(own, files[key]):
                continue  # lockd's own lease: the table knows it
            # 0: the holder lives in a pid namespace this one cannot see into.
            taken.append((key, number if number > 0 else None, mode))
        # A lock whose taker is gone, or is this daemon that no longer holds it, was handed on
        # with its descriptor (a lease granted before lockd restarted, or whose client lockd
        # cut off): its holders are whoever has that descriptor now, None if none is found.
        handed_on = {
            key for key, pid, _ in taken if pid == me or (pid is not None and procinfo.process_uid(pid) is None)
        }
        heirs = procinfo.flock_holders(handed_on, SUFFIX) if handed_on else {}
        found: dict[str, dict[int | None, Holder]] = {}
        for key, taker, mode in taken:
            for pid in heirs.get(key, [None]) if key in handed_on else [taker]:
                if pid != me:
                    for file in files[key]:
                        # Whoever holds a slot file holds a slot, shown as shared.
                        if isinstance(file, str):
                            _add_holder(found, file, pid, mode)
                        else:
                            _add_holder(found, file[0], pid, "shared")
        return {name: list(holders.values()) for name, holders in found.items()}

    @staticmethod
    def _files_named(name: str) -> Iterator[str | tuple[str, int]]:
        """`name`'s lock file, as the name, then its slot files in order, as (name, number)
        (the caller stops at a missing one)."""
        yield name
        for number in range(MAX_SLOTS):
            yield name, number

    def _files_at(self, inodes: set[int]) -> Iterator[tuple[str | tuple[str, int], int]]:
        """The lock files (as `_files_named` names them) that have these inode numbers, with
        their inode numbers."""
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                stem = entry.name.removesuffix(SUFFIX)
                if entry.inode() not in inodes or stem == entry.name:
                    continue
                name, mark, number = stem.rpartition(SLOT_MARK)
                if mark and number.isdecimal() and name_problem(name) is None:
                    yield (name, int(number)), entry.inode()
                elif name_problem(stem) is None:
                    yield stem, entry.inode()

    # --- internals ----------------------------------------------------------------------------

    def _open(self, filename: str) -> int:
        """Open `filename`, a lock or slot file, creating it; only a regular file's
        descriptor is returned."""
        try:
            fd = os.open(filename, _OPEN_FLAGS, self.file_mode, dir_fd=self._dir_fd)
        except OSError as err:
            raise self._error(filename, err) from err
        try:
            st = os.fstat(fd)
        except OSError as err:
            os.close(fd)
            raise self._error(filename, err) from err
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise BadLockFile(
                f"{self.lock_dir / filename} is {kind}; lockd only locks regular files in its "
                "lock directory: remove it"
            )
        return fd

    def _flock(self, fd: int, operation: int, filename: str) -> bool:
        """Apply `operation` to `fd`, open on `filename`: True if taken, False if busy."""
        try:
            fcntl.flock(fd, operation)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            raise self._error(filename, err) from err

    def _error(self, filename: str, err: OSError) -> LockdError:
        path = self.lock_dir / filename
        code = err.errno
        if code in (errno.EMFILE, errno.ENFILE):
            return out_of_descriptors(err)
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
            f"cannot open {path} ({err.strerror}): give the daemon's user read access "
            "to it, or remove it"
        )


def _filename(file: str | tuple[str, int]) -> str:
    """The file name of a lock file, as `LockFiles._files_named` names it."""
    return file + SUFFIX if isinstance(file, str) else LockFiles._slot_file(*file)


def _count_off(own: dict[str | tuple[str, int], int], files: list[str | tuple[str, int]]) -> bool:
    """Count one flock off `own` (as `LockFiles._own_files` gives it) on one of `files`, all
    the same file; False if no claim holds one there."""
    for file in files:
        if own.get(file, 0) > 0:
            own[file] -= 1
            return True
    return False


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
