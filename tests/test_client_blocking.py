"""The blocking client against a real daemon, real processes and real flock(1)."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import threading
import time

import lockd_client
import msgspec
import pytest
from lockd_client import protocol

from .conftest import Daemon
from .flock_tools import can_flock, descriptors_of
from .waiting import wait_until

WAIT = 10.0


def is_free(daemon: Daemon, name: str) -> bool:
    """Whether another connection gets `name` at once. It gives it back before returning.

    Releases on other connections are applied in no particular order relative to this one:
    callers first make a round trip on the releasing connection (any request will do).
    """
    with lockd_client.connect(daemon.socket) as other:
        try:
            other.acquire(name, wait=False).release()
        except lockd_client.LockBusy:
            return False
        other.status()
        return True


@pytest.fixture
def client(daemon: Daemon):
    with lockd_client.connect(daemon.socket, label="test client") as c:
        yield c


# --- connecting -------------------------------------------------------------------------------


def test_no_daemon_says_where_it_looked_and_what_to_do(short_tmp):
    path = str(short_tmp / "nobody.sock")
    with pytest.raises(lockd_client.DaemonUnavailable) as raised:
        lockd_client.connect(path)
    assert path in str(raised.value)
    assert "LOCKD_SOCKET" in str(raised.value) and "`lockd`" in str(raised.value)


def test_the_socket_comes_from_lockd_socket_by_default(daemon, monkeypatch):
    monkeypatch.setenv("LOCKD_SOCKET", daemon.socket)
    with lockd_client.connect() as c:
        assert c.server.backend == "flock"
        assert c.server.version == protocol.PROTOCOL_VERSION


def test_a_silent_daemon_is_busy_once_the_timeout_passes(short_tmp):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(short_tmp / "mute.sock"))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(lockd_client.DaemonBusy, match="did not answer within 0.2 s"):
            lockd_client.connect(str(short_tmp / "mute.sock"), timeout=0.2)
        assert time.monotonic() - started < WAIT


def test_the_socket_is_close_on_exec(client):
    assert not os.get_inheritable(client.fileno())


# --- leases -----------------------------------------------------------------------------------


def test_a_lease_excludes_other_connections_and_flock_until_released(daemon, client):
    lock_file = daemon.lock_dir / "job.lock"
    with client.lock("job") as lease:
        assert lease.names == ("job",)
        assert lease.token == lease.tokens["job"] > 0
        assert not is_free(daemon, "job")
        assert not can_flock(lock_file)
        assert not lease.lost
    client.status()
    assert is_free(daemon, "job")
    assert can_flock(lock_file)


def test_release_is_applied_before_the_next_request_on_the_connection(client):
    lease = client.acquire("job")
    lease.release()
    lease.release()
    again = client.acquire("job", wait=False)
    assert again.token > lease.token


def test_shared_leases_coexist_and_exclude_an_exclusive_one(daemon, client):
    with lockd_client.connect(daemon.socket) as other:
        mine = client.acquire("db", shared=True)
        theirs = other.acquire("db", shared=True)
        with pytest.raises(lockd_client.LockBusy) as busy:
            with lockd_client.connect(daemon.socket) as third:
                third.acquire("db", wait=False)
        assert {h.token for h in busy.value.holders} == {mine.token, theirs.token}
        assert all(h.mode == "shared" for h in busy.value.holders)
        assert can_flock(daemon.lock_dir / "db.lock", shared=True)
        assert not can_flock(daemon.lock_dir / "db.lock")


def test_busy_says_who_holds_the_lock(daemon, client):
    lease = client.acquire("job", label="nightly backup")
    with lockd_client.connect(daemon.socket) as other:
        with pytest.raises(lockd_client.LockBusy) as busy:
            other.acquire("job", wait=False)
    assert type(busy.value) is lockd_client.LockBusy
    [holder] = busy.value.holders
    assert (holder.pid, holder.token, holder.label) == (os.getpid(), lease.token, "nightly backup")


def test_no_wait_wins_over_a_timeout_as_in_flock(daemon, client):
    client.acquire("job")
    with lockd_client.connect(daemon.socket) as other:
        with pytest.raises(lockd_client.LockBusy) as busy:
            other.acquire("job", wait=False, timeout=WAIT)
    assert type(busy.value) is lockd_client.LockBusy  # refused at once, not timed out


def test_a_timeout_gives_up_after_it_passes(daemon, client):
    client.acquire("job")
    with lockd_client.connect(daemon.socket) as other:
        started = time.monotonic()
        with pytest.raises(lockd_client.LockTimeout) as timed_out:
            other.acquire("job", timeout=0.3)
        assert time.monotonic() - started >= 0.25
        assert timed_out.value.holders[0].pid == os.getpid()
        assert isinstance(timed_out.value, lockd_client.LockBusy)


def test_several_names_are_taken_together_or_not_at_all(daemon, client):
    with lockd_client.connect(daemon.socket) as other:
        held_b = other.acquire("b")
        with pytest.raises(lockd_client.LockBusy):
            client.acquire("a", "b", wait=False)
        assert is_free(daemon, "a")
        held_b.release()
        lease = client.acquire("b", "a")
    assert lease.names == ("b", "a") and set(lease.tokens) == {"a", "b"}
    assert not is_free(daemon, "a") and not is_free(daemon, "b")


def test_invalid_names_are_refused_before_anything_is_sent(client):
    with pytest.raises(lockd_client.InvalidName, match="starting with a letter or digit"):
        client.acquire("ok", "../escape")
    assert client.acquire("ok", wait=False).names == ("ok",)


def test_status_shows_holders_and_waiters_with_labels(daemon, client):
    lease = client.acquire("job")
    seen = []

    def on_queued(holders):
        seen.append(client.status("job", "idle"))
        lease.release()

    with lockd_client.connect(daemon.socket, label="waiter") as other:
        other.acquire("job", on_queued=on_queued)
    [[info]] = seen
    assert info.name == "job" and info.mode == "exclusive"
    assert [(h.label, h.token) for h in info.holders] == [("test client", lease.token)]
    assert [h.label for h in info.waiters] == ["waiter"]
    wait_until(lambda: client.status() == [], "the daemon saw `other` close")


def test_on_queued_reports_the_holders_and_the_request_then_waits(daemon, client):
    lease = client.acquire("job")
    queued = []

    def on_queued(holders):
        queued.append(holders)
        lease.release()

    with lockd_client.connect(daemon.socket) as other:
        granted = other.acquire("job", on_queued=on_queued)
        assert [[h.token for h in holders] for holders in queued] == [[lease.token]]
        assert granted.token > lease.token


@pytest.mark.parametrize("interrupt", [RuntimeError("callback failed"), KeyboardInterrupt()])
def test_an_exception_while_waiting_withdraws_the_request(daemon, client, interrupt):
    lease = client.acquire("job")

    def on_queued(holders):
        raise interrupt

    with lockd_client.connect(daemon.socket) as other:
        with pytest.raises(type(interrupt)):
            other.acquire("job", on_queued=on_queued)
        [info] = other.status("job")
        assert info.waiters == []
        lease.release()
        client.status()
        assert is_free(daemon, "job")


def test_ctrl_c_in_a_blocked_acquire_withdraws_it(daemon, client):
    lease = client.acquire("job")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    with lockd_client.connect(daemon.socket) as other:
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                other.acquire("job", timeout=WAIT)
        finally:
            timer.cancel()
        assert other.status("job")[0].waiters == []
        lease.release()
        client.status()
        assert is_free(daemon, "job")


# --- losing leases ----------------------------------------------------------------------------


def test_a_forced_release_is_seen_as_lost_with_its_reason(daemon, client):
    with pytest.raises(lockd_client.LeaseLost, match="forcibly released"):
        with client.lock("job") as lease:
            with lockd_client.connect(daemon.socket) as admin:
                assert admin.force_release("job") == 1
            wait_until(lambda: lease.lost, "the lease reported lost")
            assert "forcibly released" in lease.lost_reason
    client.status()  # the release went out unanswered: is_free needs a round trip after it
    assert is_free(daemon, "job")


def test_the_socket_becomes_readable_when_a_lease_is_lost(daemon, client):
    lease = client.acquire("job")
    with lockd_client.connect(daemon.socket) as admin:
        admin.force_release("job")
    readable, _, _ = select.select([client], [], [], WAIT)
    assert readable == [client]
    client.process_events()
    assert lease.lost_reason is not None


def test_a_killed_daemon_leaves_the_leases_held_by_their_descriptors(daemon, client):
    a_file, b_file = daemon.lock_dir / "a.lock", daemon.lock_dir / "b.lock"
    with client.lock("a") as a:
        b = client.acquire("b")
        daemon.kill()
        wait_until(lambda: (client.process_events(), a.detached)[1], "the lease detached")
        assert b.detached and not a.lost and not b.lost
        assert not can_flock(a_file) and not can_flock(b_file)
        with pytest.raises(lockd_client.DaemonUnavailable, match="closed the connection.*make a new one"):
            client.acquire("c")
    assert can_flock(a_file) and not can_flock(b_file)
    b.release()
    assert can_flock(b_file)
    assert select.select([client], [], [], 0)[0] == [client]


def test_a_restarted_daemon_sees_a_detached_lease_as_held_until_it_is_released(daemon, client):
    lease = client.acquire("a")
    daemon.restart()
    with lockd_client.connect(daemon.socket) as other:
        with pytest.raises(lockd_client.LockBusy) as busy:
            other.acquire("a", wait=False)
        assert [h.pid for h in busy.value.holders] == [os.getpid()]
        (lock,) = other.status("a")
        assert [(h.pid, h.outside) for h in lock.holders] == [(os.getpid(), True)]
        lease.release()
        other.acquire("a", wait=False).release()


def test_a_client_lockd_cut_off_is_named_as_the_holder_while_it_keeps_the_lock(daemon, client):
    lease = client.acquire("a")
    os.write(client.fileno(), b"\0\0\0\2\xc1\xc1")  # garbage: lockd hangs up on it
    wait_until(lambda: (client.process_events(), lease.detached)[1], "the lease detached")
    with lockd_client.connect(daemon.socket) as other:
        (lock,) = other.status("a")
        assert [(h.pid, h.outside) for h in lock.holders] == [(os.getpid(), True)]
        lease.release()
        other.acquire("a", wait=False).release()


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_client_collected_unclosed_lets_go_of_its_locks(daemon):  # Python warns of the socket
    def forget() -> None:
        lockd_client.connect(daemon.socket).acquire("a")  # neither released nor closed

    forget()
    gc.collect()
    wait_until(lambda: can_flock(daemon.lock_dir / "a.lock"), "the lock freed")


def test_a_release_frees_the_file_once_the_daemon_reads_it(daemon, client):
    lease = client.acquire("a")
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        lease.release()
        assert descriptors_of(daemon.lock_dir / "a.lock") == []  # this process let go of its copy...
        assert not can_flock(daemon.lock_dir / "a.lock")  # ...and the daemon's holds until it reads
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: can_flock(daemon.lock_dir / "a.lock"), "the lock freed once the daemon read")


def test_the_descriptor_is_read_only_and_close_on_exec(daemon, client):
    lease = client.acquire("a")
    (fd,) = descriptors_of(daemon.lock_dir / "a.lock")
    assert os.get_inheritable(fd) is False
    with pytest.raises(OSError):
        os.write(fd, b"x")
    lease.release()


def test_a_forked_child_holds_none_of_the_leases(daemon, client):
    lease = client.acquire("a")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            held = descriptors_of(daemon.lock_dir / "a.lock")
            os.write(w, b"lost" if lease.lost and not held else b"kept")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        assert reader.read() == b"lost"
    os.waitpid(child, 0)
    assert not lease.lost
    assert not can_flock(daemon.lock_dir / "a.lock")
    lease.release()
    client.status()  # the daemon has applied the release once it answers a later request
    assert can_flock(daemon.lock_dir / "a.lock")


def test_garbage_from_the_daemon_hangs_up_but_keeps_the_descriptor(short_tmp):
    path = str(short_tmp / "liar.sock")
    seen_after_garbage = []

    def lie(listener):
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)  # Hello
            out = bytearray()
            protocol.encode_frame(msgspec.msgpack.Encoder(), protocol.Welcome(1, "liar", "none"), out)
            conn.sendall(out)
            conn.recv(65536)  # Acquire
            conn.sendall(b"\0\0\0\1\xc1")
            seen_after_garbage.append(conn.recv(65536))

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        liar = threading.Thread(target=lie, args=(listener,))
        liar.start()
        with lockd_client.connect(path) as c:
            with pytest.raises(lockd_client.RemoteProtocolError, match="broke the protocol"):
                c.acquire("a")
            liar.join(WAIT)
            assert seen_after_garbage == [b""]
            assert select.select([c], [], [], 0)[0] == [c]


def test_an_exception_leaving_the_block_wins_over_the_loss(daemon, client):
    with pytest.raises(ZeroDivisionError):
        with client.lock("a"):
            daemon.kill()
            raise ZeroDivisionError


def test_closing_the_client_ends_its_leases_without_raising(daemon):
    c = lockd_client.connect(daemon.socket)
    with c.lock("a") as lease:
        c.close()
        assert not lease.lost
    c.close()
    wait_until(lambda: is_free(daemon, "a"), "the lease ended with its connection")


# --- processes --------------------------------------------------------------------------------


def test_a_child_started_while_holding_does_not_keep_the_lease(daemon, client):
    client.acquire("job")
    # close_fds=False hands the child every inheritable descriptor: the socket must not be one.
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        client.close()
        wait_until(lambda: can_flock(daemon.lock_dir / "job.lock"), "the lock freed")
        assert is_free(daemon, "job")
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(WAIT)


@pytest.fixture
def sleeper():
    """A child process to tie leases to; killed after the test."""
    child = subprocess.Popen(["sleep", "30"])
    yield child
    child.kill()
    child.wait(WAIT)


def test_a_lease_tied_to_a_process_outlives_the_connection_until_released(daemon, client, sleeper):
    with lockd_client.connect(daemon.socket) as c:
        c.acquire("job", pid=sleeper.pid)
    [info] = client.status("job")
    assert [h.pid for h in info.holders] == [sleeper.pid]
    assert client.release_pid(sleeper.pid, "job") == 1
    assert is_free(daemon, "job")
    with pytest.raises(lockd_client.NotHeld):
        client.release_pid(sleeper.pid, "job")


def test_a_lease_tied_to_a_process_ends_on_release_while_its_connection_lasts(daemon, client, sleeper):
    lease = client.acquire("job", pid=sleeper.pid)
    assert not is_free(daemon, "job")
    lease.release()
    client.status()
    assert is_free(daemon, "job")


def test_a_lease_tied_to_a_process_ends_when_it_exits(daemon, client, sleeper):
    client.acquire("job", pid=sleeper.pid)
    assert not is_free(daemon, "job")
    sleeper.kill()
    wait_until(lambda: is_free(daemon, "job"), "the lease ended with its process")
