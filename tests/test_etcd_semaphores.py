"""Counting semaphores across hosts: real `lockd --backend etcd` daemons on one etcd share the
N slots of a name, in etcd's revision order, and refuse a request that disagrees on N."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import trio
from lockd_client.describe import user_name
from lockd_client.errors import LockBusy, SlotsMismatch
from lockd_client.protocol import Holder

from . import test_etcd_order
from .conftest import Daemon
from .etcd_cluster import requires_etcd
from .test_etcd_daemon import WAIT
from .test_etcd_order import Hosts, finished, parties, still_waits

pytestmark = requires_etcd

#: Three daemons ("hosts" A, B, C: 0, 1, 2) on one etcd and prefix.
hosts = test_etcd_order.hosts

HOST = socket.gethostname()


async def test_hosts_share_the_slots_and_waiters_go_in_etcd_order(hosts: Hosts) -> None:
    """3 slots: two holders on A, one on B; the next requests, on either host, wait and are
    granted in the order etcd received them, each as soon as any holder lets go."""
    a1 = await hosts.hold(0, "a1", "x", slots=3)
    a2 = await hosts.hold(0, "a2", "x", slots=3)
    b1 = await hosts.hold(1, "b1", "x", slots=3)
    told: list[list[Holder]] = []
    b4 = await hosts.ask(1, "b4", "x", slots=3, on_queued=told.append)
    a5 = await hosts.ask(0, "a5", "x", slots=3)
    assert await still_waits(b4, a5)
    # A waiter is told who holds the slots it waits for, on every host.
    assert [sorted(h.label or "" for h in holders) for holders in told] == [["a1", "a2", "b1"]]
    assert {h.host for h in told[0]} == {None, HOST}
    for host in (0, 1, 2):
        (info,) = await hosts.status(host, "x")
        assert parties([info]) == [("x", ["a1", "a2", "b1"], ["b4", "a5"])]
        assert (info.slots, info.mode) == (3, "shared")
    await a2.release()  # A's holder goes: B's waiter, older, gets the slot
    await finished(b4)
    assert await still_waits(a5)
    await b1.release()
    await finished(a5)
    tokens = [r.lease.tokens["x"] for r in (a1, a2, b1, b4, a5) if r.lease is not None]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5
    assert hosts.granted == ["a1", "a2", "b1", "b4", "a5"]


async def test_a_busy_semaphore_names_its_holders_on_every_host(hosts: Hosts) -> None:
    await hosts.hold(0, "a1", "x", slots=2)
    await hosts.hold(1, "b1", "x", slots=2)
    for host in (0, 1, 2):
        refused = await hosts.ask(host, "late", "x", slots=2, wait=False)
        await finished(refused)
        assert isinstance(refused.error, LockBusy), refused.error
        assert sorted(h.label or "" for h in refused.error.holders) == ["a1", "b1"]
    assert await hosts.keys() == 2  # the refused requests left etcd's queue


async def test_a_slot_goes_to_a_request_behind_a_multi_name_one_that_waits_elsewhere(hosts: Hosts) -> None:
    lock = await hosts.hold(1, "lock", "x")
    both = await hosts.ask(0, "both", "x", "s", slots={"s": 2})  # waits for x, keeps its slot of s
    second = await hosts.hold(2, "second", "s", slots=2)  # the other slot: granted at once
    third = await hosts.ask(1, "third", "s", slots=2)
    assert await still_waits(both, third)
    await lock.release()
    await finished(both)
    await second.release()
    await finished(third)
    assert hosts.granted == ["lock", "second", "both", "third"]


async def test_a_request_disagreeing_with_another_host_on_the_name_is_refused(hosts: Hosts) -> None:
    await hosts.hold(0, "three", "x", slots=3)
    await hosts.hold(1, "lock", "y")
    cases = [
        (1, "x", 4, "a semaphore of 3 slots", "three"),
        (1, "x", None, "a semaphore of 3 slots", "three"),
        (0, "y", 2, "a plain lock", "lock"),
    ]
    for host, name, slots, kind, label in cases:
        # Waiting would not help: refused at once, by the host whose table has not seen the name.
        refused = await hosts.ask(host, "odd", name, slots=slots)
        await finished(refused)
        assert isinstance(refused.error, SlotsMismatch), refused.error
        message = str(refused.error)
        (holder,) = (await hosts.status(2, name))[0].holders
        assert holder.uid is not None
        asked = "a plain lock" if slots is None else f"a semaphore of {slots} slots"
        assert message.startswith(f"{name} is {kind}, and this request asked for {asked}: every user "), message
        assert f"; held by pid {holder.pid} (" in message
        assert re.search(rf" \[{label}\] of {re.escape(user_name(holder.uid))} on {re.escape(HOST)} for \S+$", message)
        assert [h.label for h in refused.error.holders] == [label]
    assert await hosts.keys() == 2  # the refused requests left etcd's queue
    await hosts.hold(2, "agreeing", "x", slots=3)


async def test_a_killed_holder_frees_its_slot_for_a_waiter_on_another_host(hosts: Hosts) -> None:
    holder = _holder_process(hosts.daemons[0], "x", 1)
    try:
        with trio.fail_after(WAIT):
            line = await trio.to_thread.run_sync(holder.stdout.readline)  # type: ignore[union-attr]
        assert line == b"granted\n"
        waiter = await hosts.ask(1, "waiter", "x", slots=1)
        assert await still_waits(waiter)
        holder.send_signal(signal.SIGKILL)
        await finished(waiter)
        assert hosts.granted == ["waiter"]
    finally:
        holder.kill()
        holder.wait(WAIT)
        holder.stdout.close()  # type: ignore[union-attr]


def _holder_process(daemon: Daemon, name: str, slots: int) -> subprocess.Popen[bytes]:
    """A process that takes a slot of `name` through `daemon`, says so, and sleeps."""
    script = (
        "import sys, time, lockd_client\n"
        "client = lockd_client.connect(sys.argv[1])\n"
        "client.acquire(sys.argv[2], slots=int(sys.argv[3]))\n"
        "print('granted', flush=True)\n"
        "time.sleep(600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, str(daemon.socket), name, str(slots)],
        env=daemon.env, stdout=subprocess.PIPE,
    )
