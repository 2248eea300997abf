"""etcd's order is the only order: real `lockd --backend etcd` daemons, standing for hosts.

A request enters the global queue (its key in etcd) the moment it reaches its daemon,
whatever that daemon holds or awaits, so a request on another host never overtakes it; and
`status` on any host lists every host's holders and waiters in that one order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from lockd_client.errors import LockBusy, LockdError, LockTimeout
from lockd_client.protocol import LockInfo
from lockd_client.trio_client import Client, Lease, connect

from .conftest import Daemon
from .etcd_cluster import EtcdCluster, entries_under, requires_etcd
from .test_etcd_daemon import WAIT, serving_hosts

pytestmark = requires_etcd

#: Long enough for a grant that should not come to have come, under load.
SETTLE = 0.3


class Request:
    """One acquire on a connection of its own, running in the background."""

    def __init__(self, label: str, granted: list[str]) -> None:
        self.label = label
        self.lease: Lease | None = None
        self.error: LockdError | None = None
        self.done = trio.Event()
        self._granted = granted
        self._client: Client | None = None

    async def run(
        self, daemon: Daemon, names: tuple[str, ...], kwargs: dict[str, object],
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with connect(daemon.socket, label=self.label) as client:
            self._client = client
            task_status.started()
            try:
                self.lease = await client.acquire(*names, **kwargs)  # type: ignore[arg-type]
                self._granted.append(self.label)
            except LockdError as exc:
                self.error = exc
            self.done.set()
            await trio.sleep_forever()  # the connection, and the lease, last until cancelled

    async def release(self) -> None:
        assert self.lease is not None, f"{self.label} was not granted: {self.error!r}"
        await self.lease.release()

    @property
    def waiting(self) -> bool:
        return not self.done.is_set()


class Hosts:
    """Daemons on one etcd; requests on them, and the order in which they were granted."""

    def __init__(
        self, daemons: tuple[Daemon, ...], etcd: EtcdCluster, key_prefix: str, nursery: trio.Nursery
    ) -> None:
        self.daemons = daemons
        self.etcd = etcd
        self.prefix = key_prefix
        self.nursery = nursery
        self.granted: list[str] = []

    async def ask(self, host: int, label: str, *names: str, **kwargs: object) -> Request:
        """Send a request on host `host`; return once it is in etcd's queue (or answered)."""
        before = await self.keys()
        request = Request(label, self.granted)
        await self.nursery.start(request.run, self.daemons[host], names, kwargs)
        with trio.fail_after(WAIT):
            # etcd is read again and again: nothing here is told when it changes.
            while request.waiting and await self.keys() < before + len(names):  # noqa: ASYNC110
                await trio.sleep(0.01)
        return request

    async def keys(self) -> int:
        """How many keys etcd holds under the prefix: requests times their names."""
        return len(await entries_under(self.etcd.endpoints, self.prefix))

    async def hold(self, host: int, label: str, *names: str, **kwargs: object) -> Request:
        request = await self.ask(host, label, *names, **kwargs)
        with trio.fail_after(WAIT):
            await request.done.wait()
        assert request.lease is not None, request.error
        return request

    async def status(self, host: int, *names: str) -> list[LockInfo]:
        async with connect(self.daemons[host].socket) as client:
            return await client.status(*names)


@pytest.fixture
async def hosts(shared_etcd: EtcdCluster, short_tmp: Path, prefix: str) -> AsyncIterator[Hosts]:
    """Three daemons ("hosts" A, B, C: 0, 1, 2) on one etcd and prefix."""
    async with serving_hosts(shared_etcd, short_tmp, prefix, ["a", "b", "c"]) as daemons:
        async with trio.open_nursery() as nursery:
            yield Hosts(daemons, shared_etcd, prefix, nursery)
            nursery.cancel_scope.cancel()


async def finished(request: Request) -> None:
    with trio.fail_after(WAIT):
        await request.done.wait()


async def still_waits(*requests: Request) -> bool:
    await trio.sleep(SETTLE)
    return all(r.waiting for r in requests)


def parties(infos: list[LockInfo]) -> list[tuple[str, list[str | None], list[str | None]]]:
    return [(i.name, [h.label for h in i.holders], [w.label for w in i.waiters]) for i in infos]


async def test_a_request_waiting_behind_its_own_host_keeps_its_place_across_hosts(hosts: Hosts) -> None:
    """The issue's case: shared on A and B; an exclusive request on A waits; a shared one
    on B, later, must wait behind it (no barging), not be granted at once."""
    reader_a = await hosts.hold(0, "reader-a", "x", shared=True)
    reader_b = await hosts.hold(1, "reader-b", "x", shared=True)
    writer = await hosts.ask(0, "writer", "x")
    late_reader = await hosts.ask(1, "late-reader", "x", shared=True)
    assert await still_waits(writer, late_reader)
    # Every host lists both shared holders, and the waiters in etcd's order.
    for host in (0, 1, 2):
        assert parties(await hosts.status(host)) == [("x", ["reader-a", "reader-b"], ["writer", "late-reader"])]
    await reader_a.release()
    await reader_b.release()
    await finished(writer)
    assert await still_waits(late_reader)
    await writer.release()
    await finished(late_reader)
    assert hosts.granted == ["reader-a", "reader-b", "writer", "late-reader"]


async def test_exclusive_behind_a_local_exclusive_holder_goes_before_a_later_host(hosts: Hosts) -> None:
    holder = await hosts.hold(0, "holder", "x")
    second = await hosts.ask(0, "second", "x")
    third = await hosts.ask(1, "third", "x")
    assert await still_waits(second, third)
    assert parties(await hosts.status(1, "x")) == [("x", ["holder"], ["second", "third"])]
    await holder.release()
    await finished(second)
    assert await still_waits(third)
    await second.release()
    await finished(third)
    assert hosts.granted == ["holder", "second", "third"]


async def test_a_multi_name_request_holds_its_place_on_every_name_across_hosts(hosts: Hosts) -> None:
    holder = await hosts.hold(0, "holder", "x")
    both = await hosts.ask(0, "both", "x", "y")  # waits on x, keeps its place on y
    later = await hosts.ask(1, "later", "y")
    reversed_names = await hosts.ask(2, "reversed", "y", "x")
    assert await still_waits(both, later, reversed_names)
    no_wait = await hosts.ask(2, "no-wait", "y", wait=False)
    await finished(no_wait)
    assert isinstance(no_wait.error, LockBusy)
    await holder.release()
    await finished(both)
    assert await still_waits(later, reversed_names)
    await both.release()
    await finished(later)
    await later.release()
    await finished(reversed_names)
    assert hosts.granted == ["holder", "both", "later", "reversed"]


@pytest.mark.parametrize("writer_host", [0, 2])
async def test_no_wait_requests_are_refused_behind_a_waiting_request(hosts: Hosts, writer_host: int) -> None:
    holder = await hosts.hold(0, "holder", "x", shared=True)
    writer = await hosts.ask(writer_host, "writer", "x")
    for host in (0, 1):
        # A shared one could share with the holder, but the writer came first.
        refused = await hosts.ask(host, f"reader-{host}", "x", shared=True, wait=False)
        await finished(refused)
        assert isinstance(refused.error, LockBusy) and not isinstance(refused.error, LockTimeout)
        assert [h.label for h in refused.error.holders] == ["holder"]
    await holder.release()
    await finished(writer)


async def test_a_request_timing_out_while_it_waits_on_its_host_leaves_the_queue(hosts: Hosts) -> None:
    holder = await hosts.hold(0, "holder", "x")
    impatient = await hosts.ask(0, "impatient", "x", timeout=0.5)
    behind = await hosts.ask(1, "behind", "x")
    await finished(impatient)
    assert isinstance(impatient.error, LockTimeout)
    assert [h.label for h in impatient.error.holders] == ["holder"]
    with trio.fail_after(WAIT):  # its key goes: the holder's and the one behind are left
        while await hosts.keys() > 2:  # noqa: ASYNC110 (etcd is read again and again)
            await trio.sleep(0.01)
    assert await still_waits(behind)
    await holder.release()
    await finished(behind)
    assert hosts.granted == ["holder", "behind"]


async def test_a_refusal_names_the_holders_on_every_host(hosts: Hosts) -> None:
    await hosts.hold(0, "reader-a", "x", shared=True)
    await hosts.hold(1, "reader-b", "x", shared=True)
    refused = await hosts.ask(0, "writer", "x", wait=False)
    await finished(refused)
    assert isinstance(refused.error, LockBusy)
    assert sorted(h.label or "" for h in refused.error.holders) == ["reader-a", "reader-b"]
