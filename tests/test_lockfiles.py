"""LockFiles against real files and real flock(1) processes sharing them."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client.errors import BadLockFile, LimitExceeded
from lockd_client.protocol import Holder

from lockd import lockfiles
from lockd.lockfiles import LockDirError, LockFiles, prepare_lock_dir

from .flock_tools import can_flock, claim, make_lock_dir, open_fds, outside_flock


class Hung(Exception):
    pass


def _hung(signum: int, frame: object) -> None:
    raise Hung("a lock-file call blocked")


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Every call here must return without blocking; a hang fails the test instead."""
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return make_lock_dir(tmp_path)


@pytest.fixture
def files(lock_dir: Path) -> Iterator[LockFiles]:
    files = LockFiles(lock_dir)
    yield files
    files.close()


# --- interplay with outside flock users --------------------------------------------------------


def test_exclusive_excludes_outside_flock_until_unlocked(files: LockFiles, lock_dir: Path) -> None:
    t = claim("db")
    assert files.try_lock(t)
    assert not can_flock(lock_dir / "db.lock")
    assert not can_flock(lock_dir / "db.lock", shared=True)
    files.unlock(t)
    assert can_flock(lock_dir / "db.lock")


def test_outside_holder_blocks_and_is_named(files: LockFiles, lock_dir: Path) -> None:
    path = lock_dir / "db.lock"
    with outside_flock(path) as proc:
        assert not files.try_lock(claim("db"))
        assert not files.try_lock(claim("db", shared=True))
        assert files.outside_holders("db") == [
            Holder(
                pid=proc.pid,
                uid=os.getuid(),
                command=f"flock {path} sleep 30",
                mode="exclusive",
                outside=True,
            )
        ]
    assert files.try_lock(claim("db"))


def test_shared_coexists_with_outside_shared(files: LockFiles, lock_dir: Path) -> None:
    path = lock_dir / "logs.lock"
    t = claim("logs", shared=True)
    assert files.try_lock(t)
    assert can_flock(path, shared=True)
    assert not can_flock(path)
    with outside_flock(path, shared=True) as proc:
        assert files.try_lock(claim("logs", shared=True))
        [holder] = files.outside_holders("logs")
        assert (holder.pid, holder.mode) == (proc.pid, "shared")


def test_outside_holders_of_many_names_read_proc_locks_once(
    files: LockFiles, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []

    def counting_open(path, *args, **kwargs):
        reads.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(lockfiles, "open", counting_open, raising=False)
    (lock_dir / "free.lock").touch()
    with outside_flock(lock_dir / "a.lock") as a, outside_flock(lock_dir / "b.lock", shared=True) as b:
        found = files.outside_holders_of(["a", "b", "free", "missing", "a"] * 1000)
    assert {name: [(h.pid, h.mode) for h in holders] for name, holders in found.items()} == {
        "a": [(a.pid, "exclusive")], "b": [(b.pid, "shared")],
    }
    assert reads == ["/proc/locks"]


def test_every_file_finds_the_held_lock_files_no_name_was_asked_for(
    files: LockFiles, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans: list[object] = []
    real_scandir = os.scandir
    monkeypatch.setattr(lockfiles.os, "scandir", lambda fd: scans.append(fd) or real_scandir(fd))
    assert files.outside_holders_of([], every_file=True) == {}
    for free in ("free.lock", "not-a-lock", "-bad.lock"):
        (lock_dir / free).touch()
    assert files.try_lock(claim("mine"))  # lockd's own: never outside
    with outside_flock(lock_dir / "a.lock") as a, outside_flock(lock_dir / "-bad.lock"), \
            outside_flock(lock_dir / "not-a-lock"), outside_flock(lock_dir / "b.lock", shared=True) as b:
        scans.clear()
        assert files.outside_holders_of(["b"]).keys() == {"b"}
        assert scans == []  # names alone: no scan of the directory
        found = files.outside_holders_of(["b"], every_file=True)
        # The scan reads the directory through its descriptor: a second one sees it all again.
        assert files.outside_holders_of([], every_file=True).keys() == {"a", "b"}
    assert {name: [(h.pid, h.mode) for h in holders] for name, holders in found.items()} == {
        "a": [(a.pid, "exclusive")], "b": [(b.pid, "shared")],
    }
    assert len(scans) == 2


def test_every_file_names_a_flock_handed_on_but_not_the_ones_lockd_holds(files: LockFiles) -> None:
    mine, given = claim("mine"), claim("given", shared=True)
    assert files.try_lock(mine) and files.try_lock(given)
    assert files.outside_holders_of([], every_file=True) == {}
    [fd] = files.descriptors(given)
    holder = subprocess.Popen(["sleep", "30"], pass_fds=[fd])
    try:
        files.abandon(given)  # as for a client cut off: its copy keeps the lock
        found = files.outside_holders_of([], every_file=True)
        assert {name: [(h.pid, h.mode) for h in holders] for name, holders in found.items()} == {
            "given": [(holder.pid, "shared")],
        }
        assert files.outside_holders_of(["mine", "given"]).keys() == {"given"}
    finally:
        holder.kill()
        holder.wait()


def test_every_file_names_a_flock_handed_on_whatever_lockd_holds_elsewhere(
    files: LockFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's flocks are told from one handed on file by file: a flock of a claim let
    go early on another file (a holder may LOCK_UN its copy), or a claim granted while the
    host's locks are read, must not hide the one handed on."""
    early, given = claim("early"), claim("given")
    assert files.try_lock(early) and files.try_lock(given)
    [fd] = files.descriptors(given)
    holder = subprocess.Popen(["sleep", "30"], pass_fds=[fd])
    try:
        files.abandon(given)  # as for a client cut off: its copy keeps the lock
        fcntl.flock(files.descriptors(early)[0], fcntl.LOCK_UN)  # its holder let go of its copy
        expected = {"given": [(holder.pid, "exclusive")]}
        found = files.outside_holders_of([], every_file=True)
        assert {name: [(h.pid, h.mode) for h in holders] for name, holders in found.items()} == expected
        files.unlock(early)
        own_files = LockFiles._own_files

        def granted_meanwhile(self: LockFiles) -> dict[str | tuple[str, int], int]:
            assert self.try_lock(claim("late"))  # the event loop grants while the thread reads
            return own_files(self)

        monkeypatch.setattr(LockFiles, "_own_files", granted_meanwhile)
        found = files.outside_holders_of([], every_file=True)
        assert {name: [(h.pid, h.mode) for h in holders] for name, holders in found.items()} == expected
    finally:
        holder.kill()
        holder.wait()


def test_outside_holders_leaves_out_this_process(files: LockFiles) -> None:
    assert files.try_lock(claim("db"))
    assert files.outside_holders("db") == []


def test_outside_holders_of_a_missing_file_creates_nothing(files: LockFiles, lock_dir: Path) -> None:
    assert files.outside_holders("nothing") == []
    assert not (lock_dir / "nothing.lock").exists()


def test_multi_name_rollback_when_a_later_name_is_held_outside(files: LockFiles, lock_dir: Path) -> None:
    with outside_flock(lock_dir / "b.lock"):
        assert not files.try_lock(claim("a", "b", "c"))
        assert can_flock(lock_dir / "a.lock")
        assert not (lock_dir / "c.lock").exists()  # never reached


def test_shared_rollback_keeps_other_tickets_count(files: LockFiles, lock_dir: Path) -> None:
    first = claim("a", shared=True)
    assert files.try_lock(first)
    with outside_flock(lock_dir / "b.lock"):
        assert not files.try_lock(claim("a", "b", shared=True))
    assert not can_flock(lock_dir / "a.lock")
    files.unlock(first)
    assert can_flock(lock_dir / "a.lock")


# --- files that are not lock files --------------------------------------------------------------


def test_symlink_is_refused_and_its_target_untouched(files: LockFiles, lock_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    os.chmod(target, 0o644)
    (lock_dir / "a.lock").symlink_to(target)
    (lock_dir / "b.lock").symlink_to(tmp_path / "absent")
    before = target.stat()
    for name in ("a", "b"):
        with pytest.raises(BadLockFile, match=f"{lock_dir / name}.lock is a symbolic link.*remove it"):
            files.try_lock(claim(name))
    after = target.stat()
    assert target.read_bytes() == b"keep me"
    assert (after.st_mtime_ns, after.st_mode) == (before.st_mtime_ns, before.st_mode)
    assert not (tmp_path / "absent").exists()
    assert can_flock(target)


def test_fifo_is_refused_promptly(files: LockFiles, lock_dir: Path) -> None:
    os.mkfifo(lock_dir / "pipe.lock")
    with pytest.raises(BadLockFile, match=r"pipe\.lock is a FIFO"):
        files.try_lock(claim("pipe"))


def test_directory_is_refused(files: LockFiles, lock_dir: Path) -> None:
    (lock_dir / "dir.lock").mkdir()
    with pytest.raises(BadLockFile, match=r"dir\.lock is a directory"):
        files.try_lock(claim("dir"))


def test_socket_is_refused(files: LockFiles, lock_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(lock_dir / "sock.lock"))
        with pytest.raises(BadLockFile, match=r"sock\.lock is a socket"):
            files.try_lock(claim("sock"))


def test_bad_file_rolls_back_earlier_names(files: LockFiles, lock_dir: Path) -> None:
    (lock_dir / "b.lock").mkdir()
    with pytest.raises(BadLockFile):
        files.try_lock(claim("a", "b"))
    assert can_flock(lock_dir / "a.lock")


def test_out_of_descriptors_is_a_limit_and_holds_nothing(files: LockFiles, lock_dir: Path) -> None:
    before = open_fds()
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(fds) + 5  # room for at least one lock file, far from room for all
    names = [f"n{i}" for i in range(limit - len(fds) + 5)]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(LimitExceeded, match="out of file descriptors"):
            files.try_lock(claim(*names))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_fds() == before
    assert can_flock(lock_dir / "n0.lock")


# --- bookkeeping --------------------------------------------------------------------------------


def test_each_shared_ticket_has_a_descriptor_of_its_own(files: LockFiles, lock_dir: Path) -> None:
    before = open_fds()
    readers = [claim("logs", shared=True) for _ in range(3)]
    for t in readers:
        assert files.try_lock(t)
    assert open_fds() == before + 3
    assert len({fd for t in readers for fd in files.descriptors(t)}) == 3
    for t in readers[:-1]:
        files.unlock(t)
        assert not can_flock(lock_dir / "logs.lock")
    files.unlock(readers[-1])
    assert can_flock(lock_dir / "logs.lock")
    assert open_fds() == before


def test_a_copy_of_the_descriptor_keeps_the_lock_until_unlock(files: LockFiles, lock_dir: Path) -> None:
    kept, released = claim("a"), claim("b")
    assert files.try_lock(kept) and files.try_lock(released)
    copies = [os.dup(fd) for t in (kept, released) for fd in files.descriptors(t)]
    try:
        files.abandon(kept)  # the daemon lets go of its own; the holder's copy keeps the lock
        files.unlock(released)  # the holder let go: released for every copy
        assert files.descriptors(kept) == files.descriptors(released) == ()
        assert not can_flock(lock_dir / "a.lock")
        assert can_flock(lock_dir / "b.lock")
        files.close()
        assert not can_flock(lock_dir / "a.lock")
    finally:
        for fd in copies:
            os.close(fd)
    assert can_flock(lock_dir / "a.lock")


def test_a_slot_is_a_shared_lock_and_one_exclusive_slot_file(files: LockFiles, lock_dir: Path) -> None:
    first, second, third = (claim("s", slots={"s": 2}) for _ in range(3))
    assert files.try_lock(first) and files.try_lock(second)
    assert len(files.descriptors(first)) == 2  # the lock file's, then the slot file's
    assert not files.try_lock(third)  # both slot files are held
    assert not can_flock(lock_dir / "s.lock") and can_flock(lock_dir / "s.lock", shared=True)
    assert not can_flock(lock_dir / "s#0.lock", shared=True) and not can_flock(lock_dir / "s#1.lock", shared=True)
    files.unlock(first)
    assert files.try_lock(third) and not can_flock(lock_dir / "s#0.lock", shared=True)
    with outside_flock(lock_dir / "s.lock", shared=True):
        assert files.outside_holders("s") != []  # shown, but holds no slot: files.try_lock decides
    for held in (second, third):
        files.unlock(held)
    assert can_flock(lock_dir / "s.lock")
    assert sorted(os.listdir(lock_dir)) == ["s#0.lock", "s#1.lock", "s.lock"]


def test_a_slot_whose_work_outlives_its_lease_stays_taken(files: LockFiles, lock_dir: Path) -> None:
    held = claim("s", slots={"s": 1})
    assert files.try_lock(held)
    # The work goes on with copies of the descriptors; its lease is abandoned (its client
    # died), and then the daemon itself starts anew.
    work = subprocess.Popen(["sleep", "30"], pass_fds=files.descriptors(held), start_new_session=True)
    try:
        files.abandon(held)
        assert not files.try_lock(claim("s", slots={"s": 1}))
        restarted = LockFiles(lock_dir)
        try:
            assert not restarted.try_lock(claim("s", slots={"s": 1}))
            assert [h.pid for h in restarted.outside_holders("s")] == [work.pid]
        finally:
            restarted.close()
    finally:
        work.kill()
        work.wait()
    assert files.try_lock(claim("s", slots={"s": 1}))


def test_fewer_slots_count_the_slot_files_work_of_more_slots_still_holds(files: LockFiles, lock_dir: Path) -> None:
    first, second = claim("s", slots={"s": 2}), claim("s", slots={"s": 2})
    assert files.try_lock(first) and files.try_lock(second)  # s#0 and s#1
    work = subprocess.Popen(["sleep", "30"], pass_fds=files.descriptors(second), start_new_session=True)
    try:
        files.unlock(first)
        files.abandon(second)  # its work holds s#1 on
        # Nobody holds or awaits s in lockd now, so a request may make it a semaphore of one
        # slot: s#0 is free, but one slot is taken already.
        assert not files.try_lock(claim("s", slots={"s": 1}))
        assert files.try_lock(two := claim("s", slots={"s": 2}))
        files.unlock(two)
    finally:
        work.kill()
        work.wait()
    assert files.try_lock(claim("s", slots={"s": 1}))
    assert sorted(os.listdir(lock_dir)) == ["s#0.lock", "s#1.lock", "s.lock"]  # looks create nothing


def test_every_file_names_the_semaphore_of_a_held_slot_file(files: LockFiles, lock_dir: Path) -> None:
    held = claim("s", slots={"s": 3})
    assert files.try_lock(held)
    work = subprocess.Popen(["sleep", "30"], pass_fds=files.descriptors(held), start_new_session=True)
    try:
        files.abandon(held)
        found = files.outside_holders_of([], every_file=True)
        assert [(h.pid, h.mode) for h in found["s"]] == [(work.pid, "shared")]
    finally:
        work.kill()
        work.wait()


def test_descriptors_are_read_only(files: LockFiles, lock_dir: Path) -> None:
    t = claim("a")
    assert files.try_lock(t)
    (fd,) = files.descriptors(t)
    assert os.get_inheritable(fd) is False
    with pytest.raises(OSError):
        os.write(fd, b"x")
    files.unlock(t)


def test_unlock_is_idempotent(files: LockFiles, lock_dir: Path) -> None:
    first, second = claim("logs", shared=True), claim("logs", shared=True)
    assert files.try_lock(first) and files.try_lock(second)
    files.unlock(first)
    files.unlock(first)
    files.unlock(claim("logs", shared=True))  # never held
    assert not can_flock(lock_dir / "logs.lock")
    files.unlock(second)
    assert can_flock(lock_dir / "logs.lock")


def test_locking_a_held_ticket_again_counts_once(files: LockFiles, lock_dir: Path) -> None:
    t = claim("logs", shared=True)
    assert files.try_lock(t) and files.try_lock(t)
    files.unlock(t)
    assert can_flock(lock_dir / "logs.lock")


def test_no_descriptor_leaks(files: LockFiles, lock_dir: Path) -> None:
    os.symlink("/nonexistent", lock_dir / "link.lock")
    os.mkfifo(lock_dir / "fifo.lock")
    before = open_fds()
    with outside_flock(lock_dir / "busy.lock"):
        for i in range(300):
            readers = [claim("r", f"x{i % 7}", shared=True) for _ in range(3)]
            for t in readers:
                assert files.try_lock(t)
            writer = claim("w", f"y{i % 5}")
            assert files.try_lock(writer)
            assert not files.try_lock(claim(f"z{i % 3}", "busy"))
            for bad in ("link", "fifo"):
                with pytest.raises(BadLockFile):
                    files.try_lock(claim(f"z{i % 3}", bad))
            for t in [*readers, writer]:
                files.unlock(t)
    assert open_fds() == before


def test_lock_files_are_never_unlinked(files: LockFiles, lock_dir: Path) -> None:
    t = claim("db", "logs")
    assert files.try_lock(t)
    inodes = {p.name: p.stat().st_ino for p in lock_dir.iterdir()}
    files.unlock(t)
    assert files.try_lock(t)
    files.close()
    assert {p.name: p.stat().st_ino for p in lock_dir.iterdir()} == inodes == {
        "db.lock": inodes["db.lock"],
        "logs.lock": inodes["logs.lock"],
    }


def test_new_files_get_the_configured_mode(lock_dir: Path) -> None:
    old = os.umask(0o022)
    files = LockFiles(lock_dir, file_mode=0o640)
    try:
        assert files.try_lock(claim("db"))
    finally:
        files.close()
        os.umask(old)
    st = (lock_dir / "db.lock").stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 0


def test_close_releases_everything(lock_dir: Path) -> None:
    files = LockFiles(lock_dir)
    before = open_fds()
    assert files.try_lock(claim("a")) and files.try_lock(claim("b", shared=True))
    files.close()
    files.close()
    assert can_flock(lock_dir / "a.lock") and can_flock(lock_dir / "b.lock")
    assert open_fds() == before - 1  # the directory too


def test_missing_lock_dir_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(LockDirError, match=f"{tmp_path / 'nope'}"):
        LockFiles(tmp_path / "nope")


def test_flocks_handed_over_across_exec_are_adopted_with_their_slots(files: LockFiles, lock_dir: Path) -> None:
    """The previous program's descriptors stand for the ones an exec keeps open: copies
    (the same open file descriptions), its own closed as an exec would close them."""
    previous = LockFiles(lock_dir)
    pair, gone, slot = claim("a", "b"), claim("s", slots={"s": 2}), claim("s", slots={"s": 2})
    assert previous.try_lock(pair) and previous.try_lock(gone) and previous.try_lock(slot)
    previous.unlock(gone)  # slot file 0 free, 1 held
    handed = [(c, [os.dup(fd) for fd in previous.descriptors(c)], previous.slots_of(c)) for c in (pair, slot)]
    assert handed[1][2] == [("s", 1)]
    previous.close()
    files.adopt(handed)
    assert [list(files.descriptors(c)) for c in (pair, slot)] == [fds for _, fds, _ in handed]
    assert not can_flock(lock_dir / "a.lock", shared=True) and not can_flock(lock_dir / "s#1.lock")
    assert files.outside_holders_of(["a", "b", "s"]) == {}  # the daemon's own
    assert files.try_lock(claim("s", slots={"s": 2}))  # slot file 0
    assert not files.try_lock(claim("s", slots={"s": 2}))
    files.unlock(pair)
    assert can_flock(lock_dir / "a.lock") and can_flock(lock_dir / "b.lock")


def test_descriptors_not_of_the_claims_files_are_refused_and_nothing_is_adopted(
    files: LockFiles, lock_dir: Path
) -> None:
    previous = LockFiles(lock_dir)
    try:
        a, s = claim("a"), claim("s", slots={"s": 2})
        assert previous.try_lock(a) and previous.try_lock(s)
        (a_fd,) = previous.descriptors(a)
        s_fds, s_slots = list(previous.descriptors(s)), previous.slots_of(s)
        copy = os.dup(a_fd)  # as the next program's, closed by `files`
        good = (a, [copy], [])
        directory = os.open(lock_dir, os.O_RDONLY)
        for bad, problem in [
            ((claim("b"), [directory], []), "is not open on a regular file"),
            ((claim("b"), [copy], []), "include one given before"),
            ((claim("b"), [999], []), r"descriptor 999 for .*/b.lock is not open \(Bad file descriptor\)"),
            ((claim("a", "b"), [a_fd], []), "not one for each of"),
            ((claim("s", slots={"s": 2}), s_fds, [("s", 2)]), "not one of each of the semaphores"),
            ((claim("s", slots={"s": 2}), s_fds[:1], s_slots), "not one for each of"),
        ]:
            with pytest.raises(ValueError, match=problem):
                files.adopt([good, bad])
            assert files.descriptors(a) == ()
        os.close(directory)
        files.adopt([good])
        with pytest.raises(ValueError, match="a is held here already"):
            files.adopt([good])
        previous.unlock(s)
    finally:
        previous.close()


def test_a_lock_file_removed_since_is_adopted_on_the_file_it_was(files: LockFiles, lock_dir: Path) -> None:
    """The flock is on the file the descriptor was opened on: a path removed (or replaced)
    since changes nothing of that, before or after a re-exec."""
    previous = LockFiles(lock_dir)
    try:
        a = claim("a")
        assert previous.try_lock(a)
        copy = os.dup(previous.descriptors(a)[0])
        (lock_dir / "a.lock").unlink()
        files.adopt([(a, [copy], [])])
        assert files.descriptors(a) == (copy,)
        files.unlock(a)
    finally:
        previous.close()


# --- the lock directory -------------------------------------------------------------------------


def check_lock_dir(path: Path) -> None:
    """Open LockFiles on `path` just for its checks."""
    LockFiles(path).close()


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1770])
def test_check_accepts_safe_directories(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "locks"
    path.mkdir()
    os.chmod(path, mode)
    check_lock_dir(path)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_check_refuses_directories_others_can_change(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "locks"
    path.mkdir()
    os.chmod(path, mode)
    before = open_fds()
    with pytest.raises(LockDirError, match=f"{path} is writable by group or others.*chmod go-w"):
        check_lock_dir(path)
    assert open_fds() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_check_refuses_a_directory_owned_by_another_user(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    path.mkdir(mode=0o755)
    os.chown(path, 4321, 4321)
    with pytest.raises(LockDirError, match="owned by uid 4321"):
        check_lock_dir(path)


def test_check_refuses_missing_and_non_directories(tmp_path: Path) -> None:
    with pytest.raises(LockDirError, match="does not exist"):
        check_lock_dir(tmp_path / "nope")
    (tmp_path / "file").touch()
    with pytest.raises(LockDirError, match="not a directory"):
        check_lock_dir(tmp_path / "file")


def test_a_symlinked_lock_dir_is_refused(tmp_path: Path) -> None:
    real = make_lock_dir(tmp_path)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(LockDirError, match="is a symbolic link: give the directory it points to"):
        check_lock_dir(tmp_path / "link")


def test_the_checked_directory_is_the_one_used_even_if_its_path_is_swapped(tmp_path: Path) -> None:
    checked = make_lock_dir(tmp_path)
    files = LockFiles(checked)
    try:
        # Someone who can write the parent renames the checked directory away and puts an
        # unsafe one in its place: lock files still go to the directory that was checked.
        checked.rename(tmp_path / "moved")
        (tmp_path / "locks").mkdir(mode=0o777)
        os.chmod(tmp_path / "locks", 0o777)
        assert files.try_lock(claim("a"))
        assert (tmp_path / "moved" / "a.lock").exists()
        assert not (tmp_path / "locks" / "a.lock").exists()
    finally:
        files.close()


def test_prepare_creates_parents_with_exact_modes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "lock" / "lockd"
    old = os.umask(0o077)
    try:
        prepare_lock_dir(path, 0o1777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "run" / "lock").stat().st_mode) == 0o755
    check_lock_dir(path)


def test_prepare_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    path.mkdir()
    os.chmod(path, 0o777)
    prepare_lock_dir(path, 0o700)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777
    with pytest.raises(LockDirError):
        check_lock_dir(path)


def test_prepare_reports_what_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    with pytest.raises(LockDirError, match="cannot create the lock directory"):
        prepare_lock_dir(tmp_path / "file" / "locks", 0o700)
