"""Security against a real daemon: other users' clients, hostile names, planted files.

Clients of another uid are forked children that drop to `nobody` before connecting, so the
daemon sees that uid through SO_PEERCRED exactly as it would for a real second user.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client import protocol
from lockd_client.protocol import Acquire, Error, ForceRelease, Granted, Release, ReleasePid, Status

from .conftest import Daemon
from .flock_tools import can_flock
from .rawclient import RawClient
from .test_fuzz import internal_errors
from .waiting import wait_until

NOBODY = 65534
TIMEOUT = 10.0


class Actor:
    """A forked child running as another uid, acting on its own RawClients when told to.

    `do(key, method, *args)` calls `method` on the child's client `key` and returns the
    result (or raises what it raised); `connect(key, path)` opens that client.
    """

    def __init__(self, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                # Nothing of the parent's may stay open here: not its connections to the
                # daemon, nor another actor's end of its pipe (that actor would never see EOF).
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                _serve(theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(TIMEOUT)
        self.pid = pid
        self.uid = uid
        self._sock = ours
        self._file = ours.makefile("rwb")

    def connect(self, key: str, path: str, **kwargs: object) -> None:
        self._call(("connect", key, path, kwargs))

    def do(self, key: str, method: str, *args: object) -> object:
        return self._call(("do", key, method, args))

    def _call(self, command: tuple) -> object:
        pickle.dump(command, self._file)
        self._file.flush()
        ok, value = pickle.load(self._file)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._file.close()
        self._sock.close()
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _serve(sock: socket.socket) -> None:  # pragma: no cover - runs in the child
    clients: dict[str, RawClient] = {}
    stream = sock.makefile("rwb")
    while True:
        try:
            command = pickle.load(stream)
        except EOFError:
            return
        try:
            if command[0] == "connect":
                _, key, path, kwargs = command
                clients[key] = RawClient(path, **kwargs)
                result: tuple = (True, None)
            else:
                _, key, method, args = command
                result = (True, getattr(clients[key], method)(*args))
        except Exception as exc:  # sent back to the test, which raises it
            result = (False, exc)
        pickle.dump(result, stream)
        stream.flush()


def start_shared(root: Path, config: str | None = None) -> Daemon:
    """A running daemon whose socket any user can reach, reading `config` if given."""
    root.chmod(0o711)
    args = []
    if config is not None:
        (root / "lockd.toml").write_text(config)
        args = ["--config", str(root / "lockd.toml")]
    d = Daemon(root, *args)
    d.start()
    os.chmod(d.socket, 0o666)
    return d


@pytest.fixture
def shared_daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = start_shared(short_tmp)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


@pytest.fixture
def nobody() -> Iterator[Actor]:
    actor = Actor(NOBODY, NOBODY)
    yield actor
    actor.close()


def status(daemon: Daemon, *names: str) -> list[protocol.LockInfo]:
    with RawClient(daemon.socket) as c:
        reply = c.request(Status(1, list(names)))
    assert isinstance(reply, protocol.StatusReply), reply
    return reply.locks


# --- identity and other users' leases ----------------------------------------------------------


def test_identity_is_the_kernels_not_the_clients_word(shared_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", shared_daemon.socket, hello=False)
    nobody.do("c", "send", protocol.Hello(protocol.PROTOCOL_VERSION, label="uid 0 root"))
    assert isinstance(nobody.do("c", "recv"), protocol.Welcome)
    granted = nobody.do("c", "request", Acquire(1, ["mine"], label="root"))
    assert isinstance(granted, Granted), granted
    [info] = status(shared_daemon, "mine")
    assert info.holders[0].uid == NOBODY
    assert info.holders[0].pid == nobody.pid
    assert info.holders[0].gid == NOBODY


def test_another_user_cannot_release_or_break_a_lease(shared_daemon: Daemon, nobody: Actor) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(shared_daemon.socket) as owner:
            assert isinstance(owner.acquire("precious"), Granted)  # request id 1
            assert isinstance(owner.acquire("tied", pid=sleeper.pid), Granted)
            nobody.connect("c", shared_daemon.socket)
            # Request ids belong to a connection: another connection's Release(1) is its own.
            nobody.do("c", "send", Release(1))
            forced = nobody.do("c", "request", ForceRelease(2, "precious"))
            assert isinstance(forced, Error) and forced.code == "permission_denied", forced
            assert "uid 0" in forced.message
            by_pid = nobody.do("c", "request", ReleasePid(3, sleeper.pid, ["tied"]))
            assert isinstance(by_pid, Error) and by_pid.code == "permission_denied", by_pid
            hijack = nobody.do("c", "request", Acquire(4, ["hijack"], pid=sleeper.pid))
            assert isinstance(hijack, Error) and hijack.code == "permission_denied", hijack
            busy = nobody.do("c", "request", Acquire(5, ["precious"], timeout=0))
            assert isinstance(busy, Error) and busy.code == "busy"

            held = {info.name: info.holders[0].uid for info in status(shared_daemon, "precious", "tied")}
            assert held == {"precious": 0, "tied": 0}
            assert not can_flock(shared_daemon.lock_dir / "precious.lock")
            assert not can_flock(shared_daemon.lock_dir / "tied.lock")
            assert status(shared_daemon, "hijack") == []
            # The owner was told nothing was lost: its next reply is the one it asks for.
            assert isinstance(owner.request(Status(9, ["precious"])), protocol.StatusReply)
    finally:
        sleeper.kill()
        sleeper.wait(TIMEOUT)


def test_a_user_may_break_its_own_lease_and_root_anyones(shared_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("holder", shared_daemon.socket)
    nobody.connect("admin", shared_daemon.socket)
    assert isinstance(nobody.do("holder", "request", Acquire(1, ["own"])), Granted)
    done = nobody.do("admin", "request", ForceRelease(1, "own"))
    assert isinstance(done, protocol.Done) and done.released == 1
    lost = nobody.do("holder", "recv")
    assert isinstance(lost, protocol.Lost) and "uid 65534" in lost.reason

    assert isinstance(nobody.do("holder", "request", Acquire(2, ["theirs"])), Granted)
    with RawClient(shared_daemon.socket) as root:
        done = root.request(ForceRelease(1, "theirs"))
    assert isinstance(done, protocol.Done) and done.released == 1
    lost = nobody.do("holder", "recv")
    assert isinstance(lost, protocol.Lost) and "uid 0" in lost.reason
    log = shared_daemon.log()
    assert "theirs: lease of pid" in log and f"(uid {NOBODY}) broken" in log


# --- policy -----------------------------------------------------------------------------------

POLICY = """
[policy]
force_release = ["root", "nobody"]

[[policy.rules]]
names = "backup-*"
users = ["backup"]

[[policy.rules]]
names = "backup-*"
modes = ["exclusive"]
allow = false

[[policy.rules]]
names = "ops-*"
groups = ["adm"]

[[policy.rules]]
names = "ops-*"
allow = false
"""
ADM = 4


@pytest.fixture
def policy_daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = start_shared(short_tmp, POLICY)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


def test_policy_refusal_names_the_rule_and_is_logged(policy_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", policy_daemon.socket)
    refused = nobody.do("c", "request", Acquire(1, ["web", "backup-db"]))
    assert isinstance(refused, Error) and refused.code == "permission_denied", refused
    assert refused.message.startswith(
        'rule 2 (names "backup-*", modes [exclusive]) denies uid 65534 exclusive on backup-db'
    )
    assert isinstance(nobody.do("c", "request", Acquire(2, ["backup-db"], mode="shared")), Granted)
    assert isinstance(nobody.do("c", "request", Acquire(3, ["web"])), Granted)  # nothing of 1 was kept
    assert {info.name for info in status(policy_daemon)} == {"backup-db", "web"}
    [line] = [entry for entry in policy_daemon.log().splitlines() if "refused uid 65534" in entry]
    assert f"pid {nobody.pid}" in line and "exclusive on web, backup-db" in line and "rule 2" in line
    assert line[:4].isdigit()  # when: the line carries its timestamp


def test_policy_groups_come_from_the_kernel(policy_daemon: Daemon) -> None:
    member, outsider = Actor(NOBODY, NOBODY, groups=(ADM,)), Actor(NOBODY, NOBODY)
    try:
        member.connect("c", policy_daemon.socket)
        outsider.connect("c", policy_daemon.socket)
        assert isinstance(member.do("c", "request", Acquire(1, ["ops-deploy"])), Granted)
        refused = outsider.do("c", "request", Acquire(1, ["ops-restart"], label="member of adm"))
        assert isinstance(refused, Error) and refused.code == "permission_denied", refused
        assert 'rule 4 (names "ops-*") denies uid 65534 exclusive on ops-restart' in refused.message
    finally:
        member.close()
        outsider.close()


def test_force_release_list_lets_its_users_break_any_lease(policy_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", policy_daemon.socket)
    with RawClient(policy_daemon.socket) as root:
        assert isinstance(root.acquire("stuck"), Granted)
        done = nobody.do("c", "request", ForceRelease(1, "stuck"))
        assert isinstance(done, protocol.Done) and done.released == 1, done
        lost = root.recv()
        assert isinstance(lost, protocol.Lost) and f"uid {NOBODY}" in lost.reason
    assert "stuck: lease of pid" in policy_daemon.log()


def test_default_force_release_refusal_is_logged(shared_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", shared_daemon.socket)
    with RawClient(shared_daemon.socket) as root:
        assert isinstance(root.acquire("kept"), Granted)
        refused = nobody.do("c", "request", ForceRelease(1, "kept"))
        assert isinstance(refused, Error) and refused.code == "permission_denied"
        assert "force_release [root] does not include uid 65534" in refused.message
    assert f"refused uid {NOBODY} pid {nobody.pid}" in shared_daemon.log()


def test_policy_reload_applies_to_new_requests(policy_daemon: Daemon, nobody: Actor) -> None:
    (policy_daemon.root / "lockd.toml").write_text('[[policy.rules]]\nnames = "web"\nallow = false\n')
    assert policy_daemon.proc is not None
    policy_daemon.proc.send_signal(signal.SIGHUP)
    nobody.connect("c", policy_daemon.socket)

    def refused() -> object:
        reply = nobody.do("c", "request", Acquire(1, ["web"], timeout=0))
        if isinstance(reply, Granted):
            nobody.do("c", "send", Release(1))
            return None
        return reply

    reply = wait_until(refused, "the reloaded policy applied", interval=0.05)
    assert isinstance(reply, Error) and 'rule 1 (names "web")' in reply.message
    assert isinstance(nobody.do("c", "request", Acquire(2, ["backup-db"])), Granted)  # old rules gone


# --- names ------------------------------------------------------------------------------------

HOSTILE = ["a/b", "/etc/passwd", "..", "../x", "../../etc/shadow", ".", ".hidden", "..x", "a\0b", "\0",
           "a\nb", "\n", "x\r", "-rf", " a", "a b", "x" * 251, "é", "a\\b", "*", "a;b"]


def test_hostile_names_are_refused_in_every_request(shared_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", shared_daemon.socket)
    for name in HOSTILE:
        requests = [
            Acquire(1, [name]),
            Acquire(2, ["fine", name]),
            Acquire(3, [name], mode="shared", timeout=0),
            Status(4, [name]),
            ForceRelease(5, name),
            ReleasePid(6, os.getpid(), [name]),
        ]
        for request in requests:
            reply = nobody.do("c", "request", request)
            assert isinstance(reply, Error) and reply.code == "invalid_name", (request, reply)
            assert reply.id == request.id
    outside = sorted(os.listdir(shared_daemon.root))
    assert os.listdir(shared_daemon.lock_dir) == []
    assert status(shared_daemon) == []  # not even "fine" of the refused pair is held
    assert sorted(os.listdir(shared_daemon.root)) == outside


# --- planted files ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_planted_symlink_is_not_followed_in_any_mode(daemon: Daemon, short_tmp: Path, mode: str) -> None:
    victim = short_tmp / "victim"
    victim.write_text("keep me")
    victim.chmod(0o644)
    before = victim.stat()
    (daemon.lock_dir / "evil.lock").symlink_to(victim)
    (daemon.lock_dir / "dangling.lock").symlink_to(short_tmp / "created-through-link")
    (daemon.lock_dir / "dir.lock").symlink_to(short_tmp)
    with RawClient(daemon.socket) as c:
        for name in ["evil", "dangling", "dir"]:
            reply = c.acquire(name, mode=mode)
            assert isinstance(reply, Error) and reply.code == "bad_lock_file", reply
            assert "symbolic link" in reply.message
        together = c.acquire("good", "evil", mode=mode)
        assert isinstance(together, Error) and together.code == "bad_lock_file"
    assert can_flock(daemon.lock_dir / "good.lock")  # all or nothing: good was not kept
    assert status(daemon) == []
    after = victim.stat()
    assert victim.read_text() == "keep me"
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert not (short_tmp / "created-through-link").exists()
    left = sorted(p.name for p in short_tmp.iterdir() if not p.name.startswith("lockd."))
    assert left == ["locks", "state", "victim"]


def test_planted_fifo_and_directory_are_refused_without_hanging(daemon: Daemon) -> None:
    os.mkfifo(daemon.lock_dir / "pipe.lock")
    (daemon.lock_dir / "folder.lock").mkdir()
    with RawClient(daemon.socket) as c:
        for name, kind in [("pipe", "FIFO"), ("folder", "directory")]:
            reply = c.acquire(name)
            assert isinstance(reply, Error) and reply.code == "bad_lock_file", reply
            assert kind in reply.message
        assert isinstance(c.acquire("ok"), Granted)


def test_lock_files_are_private_regular_files(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as c:
        assert isinstance(c.acquire("private"), Granted)
        assert isinstance(c.acquire("also", mode="shared"), Granted)
    for name in ["private.lock", "also.lock"]:
        st = os.lstat(daemon.lock_dir / name)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0


# --- the lock directory at start-up ---------------------------------------------------------------


def start_fails(daemon: Daemon) -> str:
    """What the daemon said when it refused to start (it must exit 1 at once)."""
    try:
        with pytest.raises(RuntimeError, match="lockd exited with 1") as info:
            daemon.start()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    return str(info.value)


def test_refuses_a_lock_dir_others_can_write_without_the_sticky_bit(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    d.lock_dir.mkdir()
    d.lock_dir.chmod(0o777)
    assert "writable by group or others without the sticky bit" in start_fails(d)


def test_refuses_a_lock_dir_owned_by_another_user(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    d.lock_dir.mkdir(mode=0o700)
    os.chown(d.lock_dir, NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}" in start_fails(d)


def test_accepts_a_sticky_world_writable_lock_dir(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    d.lock_dir.mkdir()
    d.lock_dir.chmod(0o1777)
    d.start()
    try:
        with RawClient(d.socket) as c:
            assert isinstance(c.acquire("ok"), Granted)
    finally:
        d.kill()


# --- logs ---------------------------------------------------------------------------------------

FORGED = "lockd: WARNING: forged: every lease was broken"

FORGER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.read()
"""


def test_a_client_cannot_forge_log_lines(daemon: Daemon) -> None:
    argv = [sys.executable, "-c", FORGER, daemon.socket, "\n" + FORGED]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"connected\n"
            with RawClient(daemon.socket) as c:
                c.request(Status(1))  # the forger's connection is logged by now
            assert "forged" in daemon.log()
            assert not any(line.startswith(FORGED) for line in daemon.log().splitlines())
        finally:
            proc.kill()


def test_no_internal_errors_after_hostile_traffic(shared_daemon: Daemon, nobody: Actor) -> None:
    nobody.connect("c", shared_daemon.socket)
    for request in [Acquire(1, ["x"], pid=0), Acquire(2, ["x"], pid=-1), ReleasePid(3, 0, ["x"]), ForceRelease(4, "x")]:
        reply = nobody.do("c", "request", request)
        assert isinstance(reply, (Error, protocol.Done)), reply
    assert internal_errors(shared_daemon) == []
