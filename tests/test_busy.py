"""A busy lockd is not a missing one: lockctl and both client libraries wait for a daemon
whose listen queue is full, or that has not answered yet, up to their own deadline, and then
say it was busy; only a missing socket or a refused connection says lockd may not be running.

The daemons are real and really stopped (SIGSTOP), their listen queue filled with real
connections, so the kernel answers EAGAIN as it does to a burst of clients.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lockd_client
import pytest
import trio
from lockd_client import cli, trio_client

from lockd.listen import somaxconn

from .conftest import Daemon
from .rawclient import RawClient
from .test_cli import LOCKCTL, finish, lockctl, start_lockctl
from .test_cli_supervise import TIMEOUT
from .waiting import wait_until

#: The test daemons' listen_backlog: the kernel queues BACKLOG + 1 connections.
BACKLOG = 4


@pytest.fixture
def small_queue(short_tmp: Path) -> Iterator[Daemon]:
    """A running daemon whose listen queue is cheap to fill."""
    config = short_tmp / "lockd.toml"
    config.write_text(f"listen_backlog = {BACKLOG}\n")
    d = Daemon(short_tmp, "--config", str(config))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


class Stopped:
    """A daemon stopped with SIGSTOP, and the connections that filled its listen queue."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.proc is not None
        self.pid = daemon.proc.pid
        self.path = daemon.socket
        self.queued: list[socket.socket] = []
        # Accepted in order: once this one is answered, the queue is empty (the start-up
        # probe of the fixture may still be in it).
        RawClient(self.path, timeout=TIMEOUT).close()
        os.kill(self.pid, signal.SIGSTOP)
        # A stopping daemon could still accept.
        wait_until(lambda: _state(self.pid) == "T", "the daemon stopped")

    def fill(self) -> int:
        """Connect until the queue is full; how many connections it took."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except BlockingIOError:
                sock.close()
                return len(self.queued)
            self.queued.append(sock)

    def resume(self) -> None:
        """SIGCONT, and hang up the connections that filled the queue. Idempotent."""
        os.kill(self.pid, signal.SIGCONT)
        for sock in self.queued:
            sock.close()
        self.queued.clear()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@contextmanager
def stopped(daemon: Daemon, *, full: bool) -> Iterator[Stopped]:
    """`daemon` stopped, its listen queue full if `full`; resumed on leaving."""
    stop = Stopped(daemon)
    try:
        if full:
            assert stop.fill() == BACKLOG + 1
            assert queue_is_full(daemon.socket)
        yield stop
    finally:
        stop.resume()


def queue_is_full(path: str) -> bool:
    """Whether a connection to `path` would wait (if not, this one takes a place in the queue)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            return True
    return False


def next_line(proc: subprocess.Popen[str]) -> str:
    """The next line lockctl writes to stderr; fails if none comes within TIMEOUT."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], TIMEOUT)
    assert ready, "lockctl said nothing"
    return proc.stderr.readline()


# --- lockctl ----------------------------------------------------------------------------------


def test_lockctl_waits_for_a_stopped_daemon_with_a_full_queue_and_runs_cmd_once_it_resumes(
    small_queue: Daemon, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    with stopped(small_queue, full=True):
        proc = start_lockctl(small_queue, "acquire", "x", "--", "touch", str(ran))
        try:
            notice = next_line(proc)  # after about a second
            assert notice == (
                f"lockctl: lockd at {small_queue.socket} is busy; waiting for it to take this connection\n"
            )
            assert proc.poll() is None and not ran.exists()
        except BaseException:
            proc.kill()
            raise
    code, err = finish(proc)
    assert code == 0, err
    assert ran.exists()


def test_lockctl_gives_up_on_a_full_queue_at_its_deadline_with_the_busy_status(
    small_queue: Daemon, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    with stopped(small_queue, full=True):
        proc = lockctl(small_queue, "acquire", "-w", "2.5", "x", "--", "touch", str(ran))
        chosen = lockctl(small_queue, "acquire", "-w", "0.2", "-E", "3", "x", "--", "touch", str(ran))
    assert proc.returncode == cli.EXIT_BUSY == 75, proc.stderr
    notice, error = proc.stderr.splitlines()
    assert notice.endswith("is busy; waiting for it to take this connection (for at most 2.5s)")
    assert error == (
        f"lockctl: lockd at {small_queue.socket} is busy: its queue of connections waiting to be "
        "accepted stayed full for 2.5 s (too many clients at once, or lockd is stopped); retry "
        "later, or allow a longer wait; CMD was not started"
    )
    assert chosen.returncode == 3, chosen.stderr
    assert "stayed full for 0.2 s" in chosen.stderr and "is lockd running" not in chosen.stderr
    assert not ran.exists()


def test_lockctl_gives_up_on_a_stopped_daemon_that_never_answers(small_queue: Daemon, tmp_path: Path) -> None:
    with stopped(small_queue, full=False):
        proc = lockctl(small_queue, "acquire", "-w", "0.5", "x", "--", "touch", str(tmp_path / "ran"))
    assert proc.returncode == cli.EXIT_BUSY, proc.stderr
    assert f"lockd at {small_queue.socket} did not answer within 0.5 s" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_lockctl_status_waits_for_a_busy_daemon_within_its_bound(small_queue: Daemon) -> None:
    with stopped(small_queue, full=True):
        proc = start_lockctl(small_queue, "status", "x")
        try:
            notice = next_line(proc)
        except BaseException:
            proc.kill()
            raise
    code, err = finish(proc)
    assert code == 0, err
    assert notice.endswith(f"waiting for it to take this connection (for at most {cli.BUSY_WAIT:g}s)\n")


@pytest.mark.parametrize("bound", [False, True], ids=["no socket", "nobody listening"])
def test_only_a_missing_socket_or_a_refused_connection_asks_whether_lockd_runs(
    short_tmp: Path, bound: bool
) -> None:
    path = str(short_tmp / "lockd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        if bound:
            sock.bind(path)  # never listening: connecting is refused
        proc = subprocess.run(
            [*LOCKCTL, "status", "--socket", path], capture_output=True, text=True, timeout=TIMEOUT
        )
    assert proc.returncode == cli.EXIT_UNAVAILABLE, proc.stderr
    assert ("Connection refused" if bound else "No such file") in proc.stderr
    assert "is lockd running?" in proc.stderr


# --- the blocking client ----------------------------------------------------------------------


def test_the_blocking_client_waits_for_room_in_the_queue_and_says_so_once(small_queue: Daemon) -> None:
    told: list[float] = []
    outcome: list[object] = []

    def use() -> None:
        try:
            with lockd_client.connect(
                small_queue.socket, timeout=10 * TIMEOUT, on_busy=lambda: told.append(time.monotonic())
            ) as client:
                outcome.append(client.acquire("x").token)
        except BaseException as exc:
            outcome.append(exc)

    with stopped(small_queue, full=True):
        thread = threading.Thread(target=use)
        thread.start()

        def busy_told() -> bool:
            assert not outcome, outcome
            return bool(told)

        wait_until(busy_told, "on_busy called")
    thread.join(TIMEOUT)
    [token] = outcome
    assert isinstance(token, int), token
    assert len(told) == 1


def test_the_blocking_client_raises_daemon_busy_at_its_timeout(small_queue: Daemon) -> None:
    told: list[None] = []
    with stopped(small_queue, full=True), pytest.raises(lockd_client.DaemonBusy) as raised:
        lockd_client.connect(small_queue.socket, timeout=0.3, on_busy=lambda: told.append(None))
    assert isinstance(raised.value, lockd_client.DaemonUnavailable)  # what callers caught before
    assert "stayed full for 0.3 s" in str(raised.value)
    assert "is lockd running" not in str(raised.value)
    assert not told  # it gave up before a second had passed


# --- the trio client --------------------------------------------------------------------------


async def test_the_trio_client_waits_for_room_in_the_queue(small_queue: Daemon) -> None:
    connected = trio.Event()
    tokens: list[int] = []

    async def use() -> None:
        async with trio_client.connect(small_queue.socket) as client:
            connected.set()
            tokens.append((await client.acquire("x")).token)

    with stopped(small_queue, full=True) as stop:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use)
            await trio.sleep(1)
            assert not connected.is_set()
            stop.resume()
            with trio.fail_after(TIMEOUT):
                await connected.wait()
    assert len(tokens) == 1


async def test_a_trio_connect_cancelled_while_the_queue_is_full_leaves_nothing_behind(small_queue: Daemon) -> None:
    with stopped(small_queue, full=True):
        fds = len(os.listdir("/proc/self/fd"))
        with trio.move_on_after(0.3) as scope:
            await trio_client.connect(small_queue.socket)
        assert scope.cancelled_caught
        assert len(os.listdir("/proc/self/fd")) == fds


# --- the daemon -------------------------------------------------------------------------------


def test_the_daemon_queues_as_many_connections_as_the_host_allows(daemon: Daemon) -> None:
    wanted = somaxconn() + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + 256:
        if hard != resource.RLIM_INFINITY and hard < wanted + 256:
            pytest.skip(f"filling a queue of {wanted} takes more descriptors than the limit of {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 256, hard))
    try:
        stop = Stopped(daemon)
        try:
            assert stop.fill() == wanted
        finally:
            stop.resume()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_listen_backlog_the_kernel_cuts_down_is_warned_about(short_tmp: Path) -> None:
    config = short_tmp / "lockd.toml"
    config.write_text(f"listen_backlog = {somaxconn() + 1}\n")
    d = Daemon(short_tmp, "--config", str(config))
    d.start()
    try:
        # Logged just after the socket listens, so perhaps after start() has seen it listen.
        warning = f"the kernel queues at most net.core.somaxconn = {somaxconn()} connections"
        wait_until(lambda: warning in d.log(), "the warning logged", show=d.log)
    finally:
        d.kill()


@pytest.fixture
def two_per_user(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon that serves at most two connections of one user."""
    config = short_tmp / "lockd.toml"
    config.write_text("[limits]\nmax_connections_per_uid = 2\n")
    d = Daemon(short_tmp, "--config", str(config))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


def test_a_burst_beyond_the_connection_limits_waits_rather_than_skipping_jobs(
    two_per_user: Daemon, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    with RawClient(two_per_user.socket) as first, RawClient(two_per_user.socket):
        proc = start_lockctl(two_per_user, "acquire", "x", "--", "touch", str(ran))
        try:
            assert "is busy; waiting" in next_line(proc)  # turned away, retrying
            assert proc.poll() is None and not ran.exists()
        except BaseException:
            proc.kill()
            raise
        first.close()
        code, err = finish(proc)
    assert code == 0, err
    assert ran.exists()


def test_the_clients_give_up_on_the_connection_limits_at_their_deadline(two_per_user: Daemon) -> None:
    with RawClient(two_per_user.socket), RawClient(two_per_user.socket):
        with pytest.raises(lockd_client.DaemonBusy, match="max_connections_per_uid.*still did after"):
            lockd_client.connect(two_per_user.socket, timeout=0.3)
    lockd_client.connect(two_per_user.socket, timeout=1).close()
