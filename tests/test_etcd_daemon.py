"""Two real `lockd --backend etcd` daemons on one etcd, standing for two hosts.

Each daemon has its own socket and lock directory; clients are real processes (lockctl) or
the trio client in the test process, so timings are measured on one clock.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from lockd_client.errors import DaemonUnavailable, LockTimeout
from lockd_client.protocol import Holder
from lockd_client.trio_client import Client, connect

from .conftest import Daemon
from .etcd_cluster import EtcdCluster, requires_etcd, wait_keys
from .waiting import wait_until_async

pytestmark = requires_etcd

TTL = 2
WAIT = 10.0
LOCKCTL = [sys.executable, "-m", "lockd_client.cli"]


def etcd_daemon(root: Path, endpoints: list[str], prefix: str) -> Daemon:
    root.mkdir()
    return Daemon(
        root, "--backend", "etcd", "--etcd-endpoints", ",".join(endpoints),
        "--etcd-ttl", str(TTL), "--etcd-prefix", prefix,
    )


@pytest.fixture
async def two_daemons(
    shared_etcd: EtcdCluster, short_tmp: Path, prefix: str
) -> AsyncIterator[tuple[Daemon, ...]]:
    """Two daemons ("hosts") on one etcd and prefix, both serving."""
    async with serving_hosts(shared_etcd, short_tmp, prefix, ["a", "b"]) as daemons:
        yield daemons


@asynccontextmanager
async def serving_hosts(
    etcd: EtcdCluster, root: Path, prefix: str, hosts: Sequence[str]
) -> AsyncIterator[tuple[Daemon, ...]]:
    """A daemon per host name in `hosts` on one etcd and prefix, all serving; killed after."""
    daemons = tuple(etcd_daemon(root / host, etcd.endpoints, prefix) for host in hosts)
    try:
        for d in daemons:
            d.start()
        with trio.fail_after(WAIT):
            for d in daemons:
                await until_serving(d)
        yield daemons
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()


async def until_serving(daemon: Daemon) -> None:
    """Return once `daemon` grants locks (it has its etcd lease)."""

    async def serving() -> bool:
        try:
            async with connect(daemon.socket) as client:
                await (await client.acquire("ready")).release()
        except DaemonUnavailable:
            return False
        return True

    await wait_until_async(serving, f"lockd in {daemon.root} serving", interval=0.05)


class Queued:
    """An `on_queued` callback that keeps what it is told; `first` waits for its first call."""

    def __init__(self) -> None:
        self.told: list[list[Holder]] = []
        self.called = trio.Event()

    def __call__(self, holders: list[Holder]) -> None:
        self.told.append(holders)
        self.called.set()

    async def first(self) -> list[Holder]:
        await self.called.wait()
        return self.told[0]


def lockctl(daemon: Daemon, *args: str) -> subprocess.Popen[bytes]:
    """`lockctl ARGS` against `daemon`, its stderr in the daemon's directory."""
    with open(daemon.root / "lockctl.err", "ab") as err:
        return subprocess.Popen(
            [*LOCKCTL, *args], env=daemon.env, stdout=subprocess.DEVNULL, stderr=err
        )


def reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL lockctl and every process under it (CMD, its guardian) and reap lockctl."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(WAIT)


def descendants(parent: int) -> list[int]:
    """The processes under `parent`, parents before their children (lockctl forks CMD and a
    guardian; which one is CMD's parent is lockctl's business)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [pid for child in map(int, children) for pid in [child, *descendants(child)]]


def command_pid(parent: int, argv0: bytes) -> int | None:
    """The process under `parent` running `argv0`."""
    for pid in descendants(parent):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(argv0):
                return pid
        except FileNotFoundError:
            continue
    return None


async def until_holding(client: Client, name: str, pid: int) -> None:
    """Return once `client`'s daemon shows process `pid` holding `name`."""

    async def holding() -> bool:
        return pid in [h.pid for info in await client.status(name) for h in info.holders]

    await wait_until_async(holding, f"pid {pid} holding {name}", interval=0.02)


async def seconds_to_grant(
    client: Client, name: str, etcd: EtcdCluster, prefix: str, cause: Callable[[], object]
) -> float:
    """Queue an acquire of `name` on `client` behind one holder, call `cause`: time to grant."""
    granted: list[float] = []

    async def acquire() -> None:
        await client.acquire(name)
        granted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acquire)
        await wait_keys(etcd.endpoints, f"{prefix}{name}/", 2)  # the holder's key and ours
        cause()
        caused = trio.current_time()
    return granted[0] - caused


async def test_killed_client_frees_the_lock_for_a_waiter_on_the_other_host(
    two_daemons: tuple[Daemon, Daemon], shared_etcd: EtcdCluster, prefix: str
) -> None:
    a, b = two_daemons
    holder = lockctl(a, "acquire", "site.com", "--", "sleep", "60")
    try:
        with trio.fail_after(WAIT):
            async with connect(a.socket) as on_a, connect(b.socket) as on_b:
                await until_holding(on_a, "site.com", holder.pid)
                # B sees the holder on the other host, with its command line.
                (info,) = await on_b.status("site.com")
                (remote,) = info.holders
                assert (remote.pid, remote.host) == (holder.pid, socket.gethostname())
                assert "sleep 60" in remote.command
                kill = functools.partial(holder.send_signal, signal.SIGKILL)
                # Not the TTL (2 s): the key goes as soon as the guardian has stopped CMD.
                assert await seconds_to_grant(on_b, "site.com", shared_etcd, prefix, kill) < TTL / 2
    finally:
        reap(holder)


async def test_killed_daemon_frees_its_locks_within_the_ttl_after_its_commands_stopped(
    two_daemons: tuple[Daemon, Daemon], shared_etcd: EtcdCluster, prefix: str
) -> None:
    a, b = two_daemons
    holder = lockctl(a, "acquire", "site.com", "--", "sleep", "60")
    try:
        with trio.fail_after(WAIT):
            async with connect(a.socket) as on_a:
                await until_holding(on_a, "site.com", holder.pid)
            exited: list[float] = []

            async def watch_holder() -> None:
                await trio.to_thread.run_sync(holder.wait, abandon_on_cancel=True)
                exited.append(trio.current_time())

            killed: list[float] = []

            def kill_a() -> None:
                killed.append(trio.current_time())
                a.kill()

            async with connect(b.socket) as on_b, trio.open_nursery() as nursery:
                nursery.start_soon(watch_holder)
                # etcd expires a lease up to half a second late; then a watch event, one read.
                delay = await seconds_to_grant(on_b, "site.com", shared_etcd, prefix, kill_a)
            assert delay < TTL + 1.0
            # lockctl saw its daemon go, stopped its CMD and exited before B could be granted.
            assert holder.returncode == 79
            assert exited[0] < killed[0] + delay
    finally:
        reap(holder)


async def test_lockctl_stops_its_command_when_etcd_goes_away(
    etcd: EtcdCluster, short_tmp: Path, prefix: str
) -> None:
    a = etcd_daemon(short_tmp / "a", etcd.endpoints, prefix)
    a.start()
    holder = None
    try:
        with trio.fail_after(WAIT):
            await until_serving(a)
            holder = lockctl(a, "acquire", "site.com", "--", "sleep", "60")
            async with connect(a.socket) as on_a:
                await until_holding(on_a, "site.com", holder.pid)
            command = await wait_until_async(lambda: command_pid(holder.pid, b"sleep\0"), "CMD started", interval=0.02)
            etcd.members[0].kill()
            killed = trio.current_time()
            status = await trio.to_thread.run_sync(holder.wait)
            # Lost (79) before the lease could expire in etcd: within 2/3 TTL of the last
            # keep-alive, which was at most TTL/3 before the kill.
            assert status == 79, await trio.Path(a.root / "lockctl.err").read_text()
            assert trio.current_time() - killed < TTL
            assert not await trio.Path(f"/proc/{command}").exists(), "CMD outlived its lease"
    finally:
        a.kill()
        if holder is not None:
            reap(holder)


async def test_lockctl_keeps_its_kill_after_within_a_third_of_the_ttl(
    etcd: EtcdCluster, short_tmp: Path, prefix: str
) -> None:
    a = etcd_daemon(short_tmp / "a", etcd.endpoints, prefix)
    a.start()
    try:
        with trio.fail_after(WAIT):
            await until_serving(a)

            def run(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [sys.executable, "-m", "lockd_client.cli", *args], env=a.env, capture_output=True,
                    text=True, timeout=WAIT,
                )

            refused = await trio.to_thread.run_sync(run, "acquire", "--kill-after", "1", "x", "--", "true")
            assert refused.returncode == 64, refused.stderr
            assert f"{TTL / 3:g} s later" in refused.stderr
            done = await trio.to_thread.run_sync(run, "acquire", "x", "--", "true")  # the default shrinks
            assert done.returncode == 0, done.stderr
    finally:
        a.kill()


async def test_starts_without_etcd_and_serves_once_it_appears(short_tmp: Path, prefix: str) -> None:
    cluster = EtcdCluster(1)
    a = etcd_daemon(short_tmp / "a", cluster.endpoints, prefix)
    try:
        a.start()
        argv = [*LOCKCTL, "acquire", "x", "--", "true"]
        with trio.fail_after(WAIT):

            async def refused_saying_why() -> bool:
                refused = await trio.to_thread.run_sync(
                    lambda: subprocess.run(argv, env=a.env, capture_output=True, timeout=WAIT)
                )
                assert refused.returncode == 69, refused.stderr
                return b"etcd at " in refused.stderr and b" is unreachable" in refused.stderr

            # Refused at once, and once lockd has tried etcd, saying what it found.
            await wait_until_async(refused_saying_why, "lockctl told that etcd is unreachable")
        await trio.to_thread.run_sync(cluster.start)
        with trio.fail_after(WAIT):
            await until_serving(a)
        assert a.proc is not None and a.proc.poll() is None
    finally:
        a.kill()
        cluster.close()


async def test_queue_events_and_status_reach_across_hosts(
    two_daemons: tuple[Daemon, Daemon], shared_etcd: EtcdCluster, prefix: str
) -> None:
    a, b = two_daemons
    with trio.fail_after(WAIT):
        async with connect(a.socket) as on_a, connect(b.socket) as on_b, connect(b.socket) as waiter:
            told: list[list[object]] = []
            lease = await on_a.acquire("only-on-a", on_queued=told.append)
            assert told == []  # free: nobody to wait for, so no Queued event
            # B lists a lock that only A's clients hold, without being asked for it by name.
            assert "only-on-a" in [info.name for info in await on_b.status()]
            waited = Queued()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(waiter.acquire, "only-on-a", on_queued=waited))
                (holder,) = await waited.first()
                assert holder.pid == os.getpid()  # B's waiter is told who holds it on A

                async def a_shows_a_waiter() -> bool:
                    return any(info.waiters for info in await on_a.status("only-on-a"))

                await wait_until_async(a_shows_a_waiter, "A's status showing B's waiter", interval=0.02)
                await lease.release()


async def test_a_timeout_names_the_holder_not_a_request_waiting_ahead(
    shared_etcd: EtcdCluster, short_tmp: Path, prefix: str
) -> None:
    async with serving_hosts(shared_etcd, short_tmp, prefix, ["a", "b", "c"]) as (a, b, c):
        with trio.fail_after(WAIT):
            async with connect(a.socket, label="holder") as on_a, connect(b.socket, label="waiter") as on_b, \
                    connect(c.socket, label="late") as on_c:
                await on_a.acquire("x")
                async with trio.open_nursery() as nursery:
                    waiting = Queued()
                    nursery.start_soon(functools.partial(on_b.acquire, "x", on_queued=waiting))
                    await waiting.first()
                    told: list[list[Holder]] = []
                    with pytest.raises(LockTimeout) as timed_out:
                        await on_c.acquire("x", timeout=0.5, on_queued=told.append)
                    nursery.cancel_scope.cancel()
    # C waits behind the nearest request ahead of it, B's, and was told so; but the lock was
    # A's all along, and that is who the timeout names.
    assert [h.label for h in told[0]] == ["waiter"]
    assert [h.label for h in timed_out.value.holders] == ["holder"]


# Three lines per hold, a few ms apart: a second holder at the same time would interleave.
HOLD = 'for step in 1 2 3; do echo "$HOST $LOCKD_TOKEN" >> "$LEDGER"; sleep 0.005; done'


def holds(ledger: Path) -> list[tuple[str, int]]:
    """(host, token) per stretch of consecutive ledger lines written under one grant."""
    runs: list[tuple[str, int]] = []
    for line in ledger.read_text().splitlines():
        host, token = line.split()
        if not runs or runs[-1] != (host, int(token)):
            runs.append((host, int(token)))
    return runs


async def test_cluster_losing_a_follower_then_the_leader_never_has_two_holders(
    etcd3: EtcdCluster, short_tmp: Path, prefix: str
) -> None:
    m0, m1, m2 = etcd3.members
    daemons = (
        etcd_daemon(short_tmp / "a", [m0.url, m1.url, m2.url], prefix),
        etcd_daemon(short_tmp / "b", [m2.url, m1.url, m0.url], prefix),
    )
    ledger = short_tmp / "ledger"
    ledger.touch()
    statuses: list[int] = []

    async def contend(daemon: Daemon) -> None:
        """lockctl runs HOLD under the lock, again and again, whatever etcd is going through."""
        env = {**daemon.env, "HOST": daemon.root.name, "LEDGER": str(ledger)}
        async with await trio.open_file(daemon.root / "lockctl.err", "ab") as err:
            while True:
                done = await trio.run_process(
                    [*LOCKCTL, "acquire", "site.com", "-c", HOLD],
                    env=env, check=False, stdout=subprocess.DEVNULL, stderr=err.wrapped,
                )
                statuses.append(done.returncode)
                if done.returncode:
                    await trio.sleep(0.05)  # 69 while etcd has no quorum, 79 if a lease was lost

    async def progress(count: int) -> None:
        target = len(holds(ledger)) + count
        await wait_until_async(lambda: len(holds(ledger)) >= target, f"{count} more holds", interval=0.05)

    try:
        for daemon in daemons:
            daemon.start()
        with trio.fail_after(6 * WAIT):
            for daemon in daemons:
                await until_serving(daemon)
            async with trio.open_nursery() as nursery:
                for daemon in daemons:
                    nursery.start_soon(contend, daemon)
                await progress(10)
                leader = await trio.to_thread.run_sync(etcd3.leader)
                follower = next(m for m in etcd3.members if m is not leader)
                follower.kill()
                await progress(10)
                await trio.to_thread.run_sync(etcd3.restart, follower)
                (await trio.to_thread.run_sync(etcd3.leader)).kill()
                await progress(10)
                nursery.cancel_scope.cancel()
    finally:
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
    runs = holds(ledger)
    tokens = [token for _, token in runs]
    # A token seen again after another one means two commands wrote at once.
    assert tokens == sorted(set(tokens)), f"overlap or a token going backwards: {runs}"
    assert {host for host, _ in runs} == {"a", "b"}
    assert set(statuses) <= {0, 69, 79}, statuses
