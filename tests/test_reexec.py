"""Re-exec in place (SIGUSR2 or a `Reexec` request): the same pid serves on with every lease,
queue place, token counter and connection it had, and no lock file is free for an instant.

Every test drives a real daemon and real clients over the socket; the lock files are watched
with real `flock -n` probes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client import connect, protocol

from .conftest import Daemon
from .rawclient import RawClient
from .waiting import wait_until

TIMEOUT = 10.0


def reexecs(daemon: Daemon) -> int:
    """How many times the daemon has logged a finished re-exec."""
    return daemon.log().count("re-executed from")


def sigusr2(daemon: Daemon) -> None:
    """Re-exec by signal, and wait until the new program serves."""
    assert daemon.proc is not None
    before = reexecs(daemon)
    daemon.proc.send_signal(signal.SIGUSR2)
    wait_until(lambda: reexecs(daemon) > before, "the re-exec", TIMEOUT, show=daemon.log)


def granted(reply: object) -> protocol.Granted:
    assert isinstance(reply, protocol.Granted), reply
    return reply


def next_reply(client: RawClient) -> object:
    """The next message that is not a Queued notice."""
    while isinstance(message := client.recv(), protocol.Queued):
        pass
    return message


class Prober:
    """`flock -n FILE true` in a loop: counts how often it got the lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.got = 0
        self.tries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(["flock", "-n", str(self.path), "true"], timeout=TIMEOUT)
            self.tries += 1
            self.got += done.returncode == 0

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


@pytest.fixture
def held_lock(daemon: Daemon) -> Iterator[RawClient]:
    with RawClient(daemon.socket) as holder:
        granted(holder.acquire("site.com"))
        yield holder


def test_same_pid_keeps_lease_queue_and_tokens(daemon: Daemon) -> None:
    """A holder, three waiters in order: after the re-exec the same connections go on, the
    lock file never came free, and the waiters are granted in order with the next tokens."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    holder = RawClient(daemon.socket)
    first = granted(holder.acquire("site.com"))
    waiters = [RawClient(daemon.socket) for _ in range(3)]
    for i, waiter in enumerate(waiters):
        waiter.send(protocol.Acquire(1, ["site.com"], label=f"w{i}"))
        assert isinstance(waiter.recv(), protocol.Queued)
    with Prober(daemon.lock_dir / "site.com.lock") as prober:
        sigusr2(daemon)
        sigusr2(daemon)
    assert prober.tries > 0 and prober.got == 0, "the lock file was free during the re-exec"
    assert daemon.proc.poll() is None and daemon.proc.pid == pid
    holder.send(protocol.Release(1))
    tokens = []
    for waiter in waiters:
        grant = granted(next_reply(waiter))
        tokens.append(grant.tokens[0])
        waiter.send(protocol.Release(1))
    assert tokens == sorted(tokens) and tokens[0] > first.tokens[0], tokens
    # The same connection serves new requests.
    assert granted(holder.acquire("other")).tokens[0] > tokens[-1]
    for client in [holder, *waiters]:
        client.close()


def test_reexec_request_is_answered_by_the_new_program(daemon: Daemon, held_lock: RawClient) -> None:
    with RawClient(daemon.socket) as admin:
        reply = admin.request(protocol.Reexec(7))
        assert isinstance(reply, protocol.Reexecuted), reply
        assert reply.id == 7 and reply.server.startswith("lockd ") and 0 <= reply.paused < TIMEOUT
    with RawClient(daemon.socket) as looker:
        status = looker.request(protocol.Status(1, ["site.com"]))
    assert isinstance(status, protocol.StatusReply)
    (lock,) = status.locks
    assert [h.outside for h in lock.holders] == [False], lock


def test_library_connection_goes_on(daemon: Daemon) -> None:
    """A library client holding a lease releases it and acquires again on the same
    connection after the re-exec."""
    client = connect(daemon.socket)
    lease = client.acquire("db")
    sigusr2(daemon)
    lease.release()
    again = client.acquire("db", timeout=5)
    assert again.tokens["db"] > lease.tokens["db"]
    again.release()
    client.close()


def test_deadline_kept(daemon: Daemon, held_lock: RawClient) -> None:
    """A waiter's deadline runs on across the re-exec: it times out when it was due."""
    with RawClient(daemon.socket) as waiter:
        asked = time.monotonic()
        waiter.send(protocol.Acquire(1, ["site.com"], timeout=3.0))
        assert isinstance(waiter.recv(), protocol.Queued)
        sigusr2(daemon)
        reply = next_reply(waiter)
        waited = time.monotonic() - asked
        assert isinstance(reply, protocol.Error) and reply.code == "timeout", reply
        assert 2.5 < waited < 6, waited


def test_process_tied_lease_kept(daemon: Daemon, tmp_path: Path) -> None:
    """A lease tied to a process, whose connection is gone, lives on after the re-exec, and
    ends when the process exits."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RawClient(daemon.socket) as client:
            granted(client.acquire("backup", pid=sleeper.pid))
        sigusr2(daemon)
        with RawClient(daemon.socket) as other:
            assert isinstance(other.acquire("backup", timeout=0), protocol.Error)
            sleeper.kill()
            sleeper.wait()
            granted(other.acquire("backup", timeout=5))
    finally:
        sleeper.kill()


def test_unreadable_state_refused_and_daemon_serves_on(short_tmp: Path) -> None:
    """A new program that cannot take the state over (here: it fails its check) is never
    exec'd: the daemon says why and serves on with its leases."""
    # The daemon runs from a directory where `python -m lockd` finds this lockd, then a
    # broken one: an upgrade gone wrong.
    program = short_tmp / "program"
    program.mkdir()
    (program / "lockd").symlink_to(Path(__file__).parents[1] / "lockd")
    daemon = Daemon(short_tmp, cwd=program)
    daemon.start()
    try:
        with RawClient(daemon.socket) as holder:
            granted(holder.acquire("site.com"))
            # From now on the program to become is one that cannot even start.
            (program / "lockd").unlink()
            (program / "lockd").mkdir()
            (program / "lockd" / "__init__.py").write_text("raise SystemExit('this lockd is broken')\n")
            with RawClient(daemon.socket) as admin:
                reply = admin.request(protocol.Reexec(1))
            assert isinstance(reply, protocol.Error) and reply.code == "not_reexecuted", reply
            assert "not re-executed" in reply.message and "broken" in reply.message, reply.message
            assert isinstance(holder.acquire("other"), protocol.Granted)
            with RawClient(daemon.socket) as other:
                assert isinstance(other.acquire("site.com", timeout=0), protocol.Error)
    finally:
        daemon.stop()
    assert os.path.exists(daemon.lock_dir / "site.com.lock")


def test_subscription_goes_on(daemon: Daemon, held_lock: RawClient) -> None:
    """A subscriber keeps its subscription: the events of a lease granted after the re-exec
    reach it on the same connection."""
    with RawClient(daemon.socket) as watcher:
        assert isinstance(watcher.request(protocol.Subscribe(5, ["site.com"])), protocol.Done)
        sigusr2(daemon)
        held_lock.send(protocol.Release(1))
        event = watcher.recv()
        assert isinstance(event, protocol.Event) and event.id == 5, event
        assert (event.event.name, event.event.event) == ("site.com", "released"), event
