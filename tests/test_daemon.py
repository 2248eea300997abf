"""The daemon end to end: a real `python -m lockd`, raw protocol clients, real flock(1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lockd_client
import msgspec
import pytest
from lockd_client import protocol
from lockd_client.protocol import Acquire, Error, ForceRelease, Granted, Lost, Release, ReleasePid, Status

from .conftest import Daemon
from .flock_tools import can_flock
from .rawclient import RawClient
from .waiting import wait_until

#: What "promptly" means on a loaded 2-core CI box: far above a normal round trip (~1 ms).
PROMPT = 2.0

HOLDER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from rawclient import RawClient
from lockd_client import protocol
c = RawClient({sock!r})
reply = c.acquire({name!r})
assert isinstance(reply, protocol.Granted), reply
print("held", flush=True)
sys.stdin.read()
"""


def spawn_holder(daemon: Daemon, name: str) -> subprocess.Popen[str]:
    """A separate process holding `name` through its own connection until killed."""
    code = HOLDER_SCRIPT.format(tests=str(Path(__file__).parent), sock=daemon.socket, name=name)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def status(daemon: Daemon, *names: str) -> list[protocol.LockInfo]:
    with RawClient(daemon.socket) as c:
        reply = c.request(Status(1, list(names)))
    assert isinstance(reply, protocol.StatusReply), reply
    return reply.locks


def test_acquire_busy_release(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as a, RawClient(daemon.socket) as b:
        granted = a.acquire("site.com")
        assert isinstance(granted, Granted) and len(granted.tokens) == 1
        busy = b.acquire("site.com", timeout=0)
        assert isinstance(busy, Error) and busy.code == "busy"
        assert busy.holders[0].pid == os.getpid()
        assert "site.com is busy; held by pid" in busy.message
        a.send(Release(1))
        a.request(Status(2))  # handled after the release, which has no reply of its own
        again = b.acquire("site.com", timeout=0)
        assert isinstance(again, Granted)
        assert again.tokens[0] > granted.tokens[0]
    assert (daemon.lock_dir / "site.com.lock").exists()


def test_waiter_granted_soon_after_holder_is_sigkilled(daemon: Daemon) -> None:
    with spawn_holder(daemon, "db") as holder, RawClient(daemon.socket) as waiter:
        waiter.send(Acquire(7, ["db"]))
        assert isinstance(waiter.recv(), protocol.Queued)
        started = time.monotonic()
        holder.kill()
        reply = waiter.recv()
        elapsed = time.monotonic() - started
    assert isinstance(reply, Granted) and reply.id == 7
    assert elapsed < 2.0


def test_daemon_sigkill_frees_files_and_tokens_continue(daemon: Daemon) -> None:
    c = RawClient(daemon.socket)
    first = c.acquire("a")
    assert isinstance(first, Granted)
    assert not can_flock(daemon.lock_dir / "a.lock")
    daemon.kill()
    assert can_flock(daemon.lock_dir / "a.lock")
    c.close()
    daemon.start()
    with RawClient(daemon.socket) as c2:
        second = c2.acquire("a")
    assert isinstance(second, Granted) and second.tokens[0] > first.tokens[0]


def test_flock_holder_outside_lockd_blocks_then_hands_over(daemon: Daemon) -> None:
    path = daemon.lock_dir / "outside.lock"
    # Its own session, so killing the group kills `sleep`, which inherited the locked fd.
    outside = subprocess.Popen(["flock", str(path), "sleep", "60"], start_new_session=True)
    try:
        wait_until(lambda: not can_flock(path), "flock(1) took the lock")
        with RawClient(daemon.socket) as c:
            busy = c.acquire("outside", timeout=0)
            assert isinstance(busy, Error) and busy.code == "busy"
            assert any(h.outside for h in busy.holders), busy
            timed_out = c.acquire("outside", timeout=0.1)
            assert isinstance(timed_out, Error) and timed_out.code == "timeout"
            assert [h.pid for h in timed_out.holders if h.outside] == [h.pid for h in busy.holders], timed_out
            c.send(Acquire(9, ["outside"]))
            queued = c.recv()
            assert isinstance(queued, protocol.Queued)
            infos = status(daemon, "outside")
            assert any(h.outside for info in infos for h in info.holders)
            started = time.monotonic()
            os.killpg(outside.pid, signal.SIGKILL)
            granted = c.recv()
            assert isinstance(granted, Granted), granted
            assert time.monotonic() - started < 2.0
            assert not can_flock(path)
    finally:
        os.killpg(outside.pid, signal.SIGKILL)
        outside.wait(10)


def test_lockd_lease_excludes_flock_users(daemon: Daemon) -> None:
    path = daemon.lock_dir / "shared-file.lock"
    with RawClient(daemon.socket) as c:
        assert isinstance(c.acquire("shared-file"), Granted)
        assert not can_flock(path)
        c.send(Release(1))
        c.request(Status(2))  # handled after the release: the file is free now
        assert can_flock(path)


def test_symlink_at_lock_path_is_refused_and_not_followed(daemon: Daemon, short_tmp: Path) -> None:
    target = short_tmp / "victim"
    (daemon.lock_dir / "evil.lock").symlink_to(target)
    with RawClient(daemon.socket) as c:
        reply = c.acquire("evil")
        assert isinstance(reply, Error) and reply.code == "bad_lock_file"
        assert str(daemon.lock_dir / "evil.lock") in reply.message
        assert isinstance(c.acquire("fine"), Granted)  # the connection goes on
    assert not target.exists()


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".hidden", "-rf", "a\nb", "a\0b", "x" * 251, "é"])
def test_invalid_names_are_refused_and_create_nothing(daemon: Daemon, name: str) -> None:
    with RawClient(daemon.socket) as c:
        reply = c.request(Acquire(1, [name]))
        assert isinstance(reply, Error) and reply.code == "invalid_name", reply
        assert "starting with a letter or digit" in reply.message
    assert list(daemon.lock_dir.iterdir()) == []


def daemon_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def test_garbage_and_oversize_frames_cost_nothing_else(daemon: Daemon) -> None:
    holder = RawClient(daemon.socket)
    assert isinstance(holder.acquire("precious"), Granted)
    baseline = daemon_fds(daemon)
    attacks = [
        b"\x00\x00\x00\x05hello",                       # not msgpack of any message
        b"\xff\xff\xff\xff",                             # 4 GiB frame announced
        (protocol.MAX_REQUEST_FRAME + 1).to_bytes(4, "big") + b"x" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x00\x00\x10\x81",                         # truncated, then hang up
    ]
    for payload in attacks:
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(daemon.socket)
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        while raw.recv(65536):
            pass  # the daemon answers with an error and closes
        raw.close()
    with RawClient(daemon.socket) as c:
        c.send(Status(1))
        reply = c.recv()
        garbage = c.request(Acquire(2, ["precious"], timeout=0))
    assert isinstance(reply, protocol.StatusReply)
    assert [lock.name for lock in reply.locks] == ["precious"]
    assert isinstance(garbage, Error) and garbage.code == "busy"
    wait_until(lambda: daemon_fds(daemon) <= baseline, "descriptors back to the baseline")
    holder.close()


def test_request_before_hello_and_wrong_version_are_refused(daemon: Daemon) -> None:
    with RawClient(daemon.socket, hello=False) as c:
        c.send(Status(1))
        reply = c.recv()
        assert isinstance(reply, Error) and reply.code == "protocol"
        with pytest.raises(EOFError):
            c.recv()
    with RawClient(daemon.socket, hello=False) as c:
        c.send(protocol.Hello(99))
        reply = c.recv()
        assert isinstance(reply, Error) and reply.code == "version"


def test_shared_holders_and_no_writer_starvation(daemon: Daemon) -> None:
    with (
        RawClient(daemon.socket) as r1,
        RawClient(daemon.socket) as r2,
        RawClient(daemon.socket) as w,
        RawClient(daemon.socket) as r3,
    ):
        assert isinstance(r1.acquire("cfg", mode="shared"), Granted)
        assert isinstance(r2.acquire("cfg", mode="shared"), Granted)
        w.send(Acquire(1, ["cfg"]))
        assert isinstance(w.recv(), protocol.Queued)
        r3.send(Acquire(1, ["cfg"], mode="shared"))
        assert isinstance(r3.recv(), protocol.Queued)  # behind the waiting writer
        r1.send(Release(1))
        r2.send(Release(1))
        assert isinstance(w.recv(), Granted)
        w.send(Release(1))
        assert isinstance(r3.recv(), Granted)


def test_overlapping_sets_in_opposite_orders_do_not_deadlock(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as c0, RawClient(daemon.socket) as c1, RawClient(daemon.socket) as c2:
        assert isinstance(c0.acquire("a"), Granted)
        c1.send(Acquire(1, ["a", "b"]))
        assert isinstance(c1.recv(), protocol.Queued)  # c1 is in line before c2 asks
        c2.send(Acquire(1, ["b", "a"]))
        assert isinstance(c2.recv(), protocol.Queued)
        c0.send(Release(1))
        granted = c1.recv()
        assert isinstance(granted, Granted) and len(granted.tokens) == 2
        c1.send(Release(1))
        assert isinstance(c2.recv(), Granted)


def test_timeout_names_the_holder(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as a, RawClient(daemon.socket) as b:
        assert isinstance(a.acquire("slow"), Granted)
        reply = b.acquire("slow", timeout=0.2)
        assert isinstance(reply, Error) and reply.code == "timeout"
        assert reply.holders and reply.holders[0].pid == os.getpid()
        assert status(daemon, "slow")[0].waiters == []


def test_sigterm_tells_every_client_and_leaves_the_locks_to_their_holders(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as c, lockd_client.connect(daemon.socket) as library:
        assert isinstance(c.acquire("x"), Granted)  # receives no descriptor: holds nothing itself
        lease = library.acquire("y")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        goodbye = c.recv()
        assert isinstance(goodbye, Error) and (goodbye.id, goodbye.code) == (None, "shutdown"), goodbye
        assert "reconnect" in goodbye.message
        with pytest.raises(EOFError):
            c.recv()
        assert daemon.proc.wait(10) == 0
        assert not os.path.exists(daemon.socket)
        assert can_flock(daemon.lock_dir / "x.lock")
        assert not can_flock(daemon.lock_dir / "y.lock")  # its holder's descriptor keeps it
        assert not lease.lost and lease.detached
        lease.release()
        assert can_flock(daemon.lock_dir / "y.lock")


def test_second_daemon_refuses_a_live_socket_and_replaces_a_stale_one(daemon: Daemon, tmp_path: Path) -> None:
    other = Daemon(tmp_path)
    other.socket = daemon.socket
    proc = subprocess.run(other.argv(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "already serving" in proc.stderr
    daemon.kill()  # leaves its socket file behind
    assert os.path.exists(daemon.socket)
    daemon.start()
    with RawClient(daemon.socket) as c:
        assert isinstance(c.acquire("x"), Granted)


def test_process_tied_lease_outlives_connection_and_ends_with_process(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c:
            assert isinstance(c.acquire("job", pid=sleeper.pid), Granted)
        [info] = status(daemon, "job")
        assert info.holders[0].pid == sleeper.pid
        assert "sleep 60" in info.holders[0].command
        sleeper.kill()
        sleeper.wait(10)
        wait_until(lambda: status(daemon, "job") == [], "the lease ended with its process")
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_process_tied_grant_held_back_with_a_later_reply_to_a_client_gone_ends(daemon: Daemon) -> None:
    """The daemon reads both requests at once (it is stopped while they are sent), so the first
    grant waits for the second's reply, and neither can be written: the client hung up. The
    lease tied to a process was never heard of, so nobody could hand it on: it ends."""
    sleeper = subprocess.Popen(["sleep", "60"])
    encoder = msgspec.msgpack.Encoder()
    both = bytearray()
    protocol.encode_frame(encoder, Acquire(1, ["tied"], pid=sleeper.pid), both)
    protocol.encode_frame(encoder, Acquire(2, ["plain"]), both)
    assert daemon.proc is not None
    try:
        c = RawClient(daemon.socket)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            c.sock.sendall(both)
            c.close()
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)

        def plain_ended() -> bool:
            with RawClient(daemon.socket) as h:
                reply = h.request(protocol.History(1, ["plain"]))
            assert isinstance(reply, protocol.HistoryReply), reply
            return [e.event for e in reply.events] == ["granted", "released"]

        wait_until(plain_ended, "the connection's own lease ended")
        assert status(daemon, "tied") == []
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_release_pid_and_force_release(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c:
            assert isinstance(c.acquire("one", pid=sleeper.pid), Granted)
            done = c.request(ReleasePid(5, sleeper.pid, ["one"]))
            assert isinstance(done, protocol.Done) and done.released == 1
            missing = c.request(ReleasePid(6, sleeper.pid, ["one"]))
            assert isinstance(missing, Error) and missing.code == "not_held"
    finally:
        sleeper.kill()
        sleeper.wait(10)
    with RawClient(daemon.socket) as holder, RawClient(daemon.socket) as admin:
        assert isinstance(holder.acquire("stuck"), Granted)
        done = admin.request(ForceRelease(1, "stuck"))
        assert isinstance(done, protocol.Done) and done.released == 1
        lost = holder.recv()
        assert isinstance(lost, Lost) and "forcibly released" in lost.reason
        # Locked until the holder says it stopped its work and let go (or break_grace passes).
        busy = admin.acquire("stuck", timeout=0)
        assert isinstance(busy, Error) and busy.code == "busy"
        holder.send(Release(lost.id))
        assert isinstance(admin.acquire("stuck", timeout=5), Granted)
    assert "broken" in daemon.log()


def test_a_broken_leases_id_stays_in_use_until_its_holder_lets_go(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as holder, RawClient(daemon.socket) as admin:
        assert isinstance(holder.acquire("x"), Granted)
        assert isinstance(admin.request(ForceRelease(1, "x")), protocol.Done)
        lost = holder.recv()
        assert isinstance(lost, Lost)
        reused = holder.request(Acquire(lost.id, ["y"]))
        assert isinstance(reused, Error) and "already in use" in reused.message
        (lock,) = admin.request(Status(2, ["x"])).locks  # type: ignore[union-attr]
        assert [h.pid for h in lock.holders] == [os.getpid()]  # still holding while it stops
        holder.send(Release(lost.id))
        assert isinstance(holder.request(Acquire(lost.id, ["y"])), Granted)
        assert isinstance(admin.acquire("x", timeout=5), Granted)


def test_release_by_id_ends_a_process_tied_lease_while_its_connection_lasts(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c:
            assert isinstance(c.acquire("tied", pid=sleeper.pid), Granted)
            c.send(Release(1))
            c.request(Status(2))
        assert status(daemon, "tied") == []
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_reload_as_soon_as_the_socket_exists_is_a_reload(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    d.lock_dir.mkdir()
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(d.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        # The socket is bound, and connectable, a while before the event loop runs.
        wait_until(lambda: os.path.exists(d.socket), "the socket bound", interval=0.0005)
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in d.log(), "the reload logged", show=d.log)
        assert d.proc.poll() is None
        with RawClient(d.socket) as c:
            assert isinstance(c.acquire("x"), Granted)
    finally:
        d.kill()


def test_a_reload_of_a_file_nested_too_deeply_keeps_the_daemon_and_its_leases(short_tmp: Path) -> None:
    config = short_tmp / "lockd.toml"
    config.write_text('log_level = "debug"\n')
    d = Daemon(short_tmp, "--config", str(config))
    d.start()
    try:
        with RawClient(d.socket) as c:
            assert isinstance(c.acquire("kept"), Granted)
            config.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload failed" in d.log(), "the failed reload logged", show=d.log)
            assert "nested too deeply" in d.log() and "Traceback" not in d.log()
            assert status(d, "kept")[0].holders[0].pid == os.getpid()
    finally:
        d.kill()


# --- costs a request cannot run up ---------------------------------------------------------------


def test_a_status_naming_one_lock_over_and_over_reads_the_host_lock_list_once(daemon: Daemon) -> None:
    # Every flock on the host lengthens /proc/locks, which the kernel rebuilds on each read.
    names = [f"n{i}" for i in range(2000)]
    with RawClient(daemon.socket) as holder, RawClient(daemon.socket, timeout=PROMPT) as c:
        assert isinstance(holder.acquire(*names), Granted)
        started = time.monotonic()
        reply = c.request(Status(1, ["n7"] * 16_000))
        assert time.monotonic() - started < PROMPT
    assert isinstance(reply, protocol.StatusReply) and [info.name for info in reply.locks] == ["n7"]


# --- shutdown ------------------------------------------------------------------------------------


def test_shutdown_grants_nothing_and_tells_every_client_why(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as holder, RawClient(daemon.socket) as waiter:
        assert isinstance(holder.acquire("x"), Granted)
        waiter.send(Acquire(1, ["x"]))
        assert isinstance(waiter.recv(), protocol.Queued)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        # The waiter is never granted what the holder had: it only learns the daemon is going.
        for c in (holder, waiter):
            goodbye = c.recv()
            assert isinstance(goodbye, Error) and (goodbye.id, goodbye.code) == (None, "shutdown"), goodbye
        # Nobody new is served while the others are told: the daemon no longer listens.
        with socket.socket(socket.AF_UNIX) as late, pytest.raises(ConnectionRefusedError):
            late.connect(daemon.socket)
    assert daemon.proc.wait(10) == 0


# --- process-tied leases -------------------------------------------------------------------------


def test_a_process_tied_lease_that_ends_frees_its_request_id(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c:
            assert isinstance(c.request(Acquire(1, ["job"], pid=sleeper.pid)), Granted)
            assert isinstance(c.request(Acquire(2, ["job2"], pid=sleeper.pid)), Granted)
            done = c.request(ReleasePid(3, sleeper.pid, ["job2"]))
            assert isinstance(done, protocol.Done) and done.released == 1
            assert isinstance(c.request(Acquire(2, ["again"])), Granted)  # id 2 is free again
            sleeper.kill()
            sleeper.wait(10)
            lost = c.recv()
            assert isinstance(lost, Lost) and lost.id == 1 and f"process {sleeper.pid} exited" in lost.reason
            assert isinstance(c.request(Acquire(1, ["job"])), Granted)  # and so is id 1
    finally:
        sleeper.kill()
        sleeper.wait(10)


THREAD_SCRIPT = """
import threading
done = threading.Event()
threading.Thread(target=lambda: (print(threading.get_native_id(), flush=True), done.wait())).start()
input()
done.set()
"""


def test_a_thread_id_is_not_a_process(daemon: Daemon) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", THREAD_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            tid = int(proc.stdout.readline())
            with RawClient(daemon.socket) as c:
                reply = c.request(Acquire(1, ["job"], pid=tid))
            assert isinstance(reply, Error) and reply.code == "not_held", reply
            assert "thread" in reply.message
        finally:
            proc.kill()


def pidfds(daemon: Daemon) -> int:
    """How many processes the daemon watches: its pidfds."""
    assert daemon.proc is not None
    where = f"/proc/{daemon.proc.pid}/fd"
    return sum(os.readlink(f"{where}/{fd}") == "anon_inode:[pidfd]" for fd in os.listdir(where))


def test_a_process_no_lease_is_tied_to_any_more_is_not_watched(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c, RawClient(daemon.socket) as other:
            assert isinstance(c.request(Acquire(1, ["job"], pid=sleeper.pid)), Granted)
            assert pidfds(daemon) == 1
            c.send(Release(1))
            c.request(Status(2))
            assert pidfds(daemon) == 0
            assert isinstance(other.acquire("job"), Granted)
            busy = c.request(Acquire(3, ["job"], pid=sleeper.pid, timeout=0))
            assert isinstance(busy, Error) and busy.code == "busy"
            c.request(Status(6))  # the pidfd is closed just after the refusal is sent
            assert pidfds(daemon) == 0
            c.send(Acquire(4, ["job"], pid=sleeper.pid))
            assert isinstance(c.recv(), protocol.Queued)
            assert pidfds(daemon) == 1
            c.send(Release(4))  # withdrawn while waiting
            c.request(Status(5))
            assert pidfds(daemon) == 0
    finally:
        sleeper.kill()
        sleeper.wait(10)


# --- malformed input -----------------------------------------------------------------------------


def test_nesting_deeper_than_the_decoder_goes_is_malformed(daemon: Daemon) -> None:
    encode = msgspec.msgpack.encode
    # An unknown field is skipped, however deeply it nests.
    body = (
        b"\x83" + encode("type") + encode("status") + encode("id") + b"\x01"
        + encode("junk") + b"\x91" * 50_000 + b"\x01"
    )
    with RawClient(daemon.socket) as c:
        c.sock.sendall(len(body).to_bytes(4, "big") + body)
        reply = c.recv()
        assert isinstance(reply, Error) and reply.code == "protocol" and "malformed" in reply.message, reply
    assert "Traceback" not in daemon.log()


def test_a_process_tied_lease_works_on_a_daemon_with_over_a_thousand_files_open(daemon: Daemon) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as c:
            for n in range(1100):  # one lock file each, so the daemon's next fds are past 1024
                c.send(Acquire(n + 1, [f"many{n}"]))
            for _ in range(1100):
                assert isinstance(c.recv(), Granted)
            assert daemon_fds(daemon) > 1024
            tied = c.request(Acquire(5000, ["tied"], pid=sleeper.pid))
            assert isinstance(tied, Granted), tied
            assert isinstance(c.request(Status(5001, ["many0"])), protocol.StatusReply)  # still served
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_process_asking_for_a_lock_it_holds_is_refused_and_keeps_the_first(daemon: Daemon) -> None:
    # (That it would never be granted on its way out, if it could wait, the table's own
    # tests of drop_owner and end check.)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as holder, RawClient(daemon.socket) as asker:
            assert isinstance(holder.acquire("x", pid=sleeper.pid), Granted)
            refused = asker.request(Acquire(1, ["y", "x"], pid=sleeper.pid))
            assert isinstance(refused, Error) and refused.code == "would_deadlock", refused
            assert f"process {sleeper.pid} already holds x" in refused.message
            assert isinstance(asker.request(Acquire(2, ["y"], pid=sleeper.pid)), Granted)
            sleeper.kill()
            assert isinstance(holder.recv(), Lost)
    finally:
        sleeper.kill()
        sleeper.wait(10)


