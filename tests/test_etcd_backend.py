"""EtcdBackend against a real etcd: several backend instances in one trio run stand for hosts.

Each "host" has its own lock directory and its own etcd lease; they share one etcd and one key
prefix, exactly as daemons on different machines would. Each talks to etcd through a
`FaultyEtcd`, which passes everything on until a test injects a fault into it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
from lockd_client.errors import DaemonUnavailable, LimitExceeded, LockdError

from lockd.backend import Blocked, Claim, Requester
from lockd.etcd import client as etcd_client
from lockd.etcd.backend import EtcdBackend
from lockd.etcd.client import EtcdClient
from lockd.lockfiles import LockFiles

from .etcd_cluster import EtcdCluster, entries_under, keys_under, relay_to, requires_etcd, wait_no_keys
from .etcd_faults import Call, FaultyEtcd
from .flock_tools import can_flock, outside_flock
from .waiting import wait_until_async

pytestmark = requires_etcd

TTL = 2  # etcd's minimum with its default election timeout: keeps the loss tests short
WAIT = 10.0


def ignore_blocked(holders: list) -> None:
    """Tests that do not care whom a take waits for."""


class Host:
    """One daemon's backend with its own lock directory; `lose` acts as the server would."""

    def __init__(self, name: str, root: Path, endpoints: list[str], prefix: str) -> None:
        self.name = name
        lock_dir = root / name
        lock_dir.mkdir(exist_ok=True)  # a host's again after a re-exec (`re_exec`)
        self.lock_dir = lock_dir
        self.files = LockFiles(lock_dir)
        self.etcd = FaultyEtcd(endpoints)
        self.backend = EtcdBackend(self.files, self.etcd, host=name, ttl=TTL, prefix=prefix)
        #: (ticket, reason, trio time) per loss.
        self.lost: list[tuple[Claim, str, float]] = []
        self.first_loss = trio.Event()

    def lose(self, ticket: Claim, reason: str) -> None:
        self.lost.append((ticket, reason, trio.current_time()))
        self.first_loss.set()
        self.backend.drop(ticket, unlock=True)

    async def take(self, ticket: Claim) -> list[int]:
        return await self.backend.take(ticket, ignore_blocked)

    async def ready(self) -> None:
        """Return once this host can take locks (its backend holds an etcd lease)."""
        await wait_until_async(self.takes_locks, f"{self.name} taking locks", interval=0.02)

    async def takes_locks(self) -> bool:
        probe = ticket("ready-" + self.name)
        try:
            await self.backend.take(probe, ignore_blocked)
        except DaemonUnavailable:
            return False
        self.backend.drop(probe, unlock=True)
        return True


def ticket(
    *names: str, shared: bool = False, wait: bool = True, label: str | None = None,
    slots: dict[str, int] | None = None,
) -> Claim:
    return Claim(
        names=names, shared=shared, wait=wait,
        requester=Requester(os.getpid(), os.getuid(), os.getgid(), "backup site.com", label), slots=slots or {},
    )


class Pending:
    """A take running in the background."""

    def __init__(self, host: Host, ticket: Claim) -> None:
        self.host = host
        self.ticket = ticket
        self.tokens: list[int] | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        self.at = 0.0

    async def run(self) -> None:
        with self.scope:
            try:
                self.tokens = await self.host.take(self.ticket)
            except (Blocked, LockdError) as exc:
                self.error = exc
        self.at = trio.current_time()
        self.done.set()


def start(nursery: trio.Nursery, host: Host, t: Claim) -> Pending:
    pending = Pending(host, t)
    nursery.start_soon(pending.run)
    return pending


async def holds_while_other_waits(
    holder: Host, waiter: Host, nursery: trio.Nursery, name: str = "x"
) -> tuple[Claim, Pending]:
    """`holder` takes `name`; `waiter` then asks for it and is seen waiting."""
    held = ticket(name)
    await holder.take(held)
    waiting = start(nursery, waiter, ticket(name))
    assert await still_waiting(waiting)
    return held, waiting


async def still_waiting(pending: Pending, seconds: float = 0.3) -> bool:
    with trio.move_on_after(seconds):
        await pending.done.wait()
    return not pending.done.is_set()


@asynccontextmanager
async def serving(*hosts: Host) -> AsyncIterator[trio.Nursery]:
    """Run every host's backend; yield a nursery for takes once all of them are ready."""
    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(host.backend.run, host.lose)
        for host in hosts:
            await host.ready()
        yield nursery
        nursery.cancel_scope.cancel()


Hosts = Callable[..., list[Host]]


@pytest.fixture
def hosts(short_tmp: Path, prefix: str) -> Iterator[Hosts]:
    """`hosts(endpoints, name...)`: a Host per name, on the test's prefix; closed after."""
    made: list[Host] = []

    def make(endpoints: list[str], *names: str) -> list[Host]:
        new = [Host(name, short_tmp, endpoints, prefix) for name in names]
        made.extend(new)
        return new

    yield make
    for host in made:
        host.files.close()


async def test_more_names_than_one_etcd_txn_takes_is_a_limit(hosts: Hosts) -> None:
    (a,) = hosts(["http://127.0.0.1:9"], "host0")
    with pytest.raises(LimitExceeded, match="at most 128 names"):
        await a.take(ticket(*(f"n{i}" for i in range(129))))


# --- one etcd, shared by the module's tests -------------------------------------------------------


async def test_exclusive_across_hosts_and_next_waiter_freed_quickly(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            first = ticket("site.com")
            (token_a,) = await a.take(first)
            waiting = start(nursery, b, ticket("site.com"))
            assert await still_waiting(waiting)
            # B's flock is free: only etcd holds it back. A's holder shows on B as outside.
            (remote,) = (await b.backend.outside_holders_of(["site.com"])).get("site.com", [])
            assert (remote.token, remote.host, remote.command) == (
                token_a, "host0", "backup site.com"
            )
            released = trio.current_time()
            a.backend.drop(first, unlock=True)
            await waiting.done.wait()
            assert waiting.error is None
            assert waiting.tokens is not None and waiting.tokens[0] > token_a
            # Generous for a loaded machine: a deletion, a watch event, one read.
            assert waiting.at - released < 0.5


async def test_fifo_across_three_hosts(shared_etcd: EtcdCluster, hosts: Hosts) -> None:
    a, b, c = hosts(shared_etcd.endpoints, "host0", "host1", "host2")
    with trio.fail_after(WAIT):
        async with serving(a, b, c) as nursery:
            held = ticket("x")
            await a.take(held)
            second = start(nursery, b, ticket("x"))
            assert await still_waiting(second, 0.1)
            third = start(nursery, c, ticket("x"))
            assert await still_waiting(third, 0.1)
            assert [h.host for h in a.backend.outside_waiters_of(["x"]).get("x", [])] == ["host1", "host2"]
            a.backend.drop(held, unlock=True)
            await second.done.wait()
            assert await still_waiting(third, 0.2)
            b.backend.drop(second.ticket, unlock=True)
            await third.done.wait()
            assert second.tokens is not None and third.tokens is not None
            assert second.tokens[0] < third.tokens[0]


async def test_shared_holders_together_and_no_barging_past_exclusive(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b, c = hosts(shared_etcd.endpoints, "host0", "host1", "host2")
    with trio.fail_after(WAIT):
        async with serving(a, b, c) as nursery:
            reader_a, reader_b = ticket("db", shared=True), ticket("db", shared=True)
            await a.take(reader_a)
            await b.take(reader_b)
            writer = start(nursery, c, ticket("db"))
            assert await still_waiting(writer)
            late_reader = start(nursery, a, ticket("db", shared=True))
            assert await still_waiting(late_reader, 0.1)
            seen_by_c = (await c.backend.outside_holders_of(["db"])).get("db", [])
            assert sorted(h.mode for h in seen_by_c) == ["shared", "shared"]
            a.backend.drop(reader_a, unlock=True)
            assert await still_waiting(writer, 0.1)
            b.backend.drop(reader_b, unlock=True)
            await writer.done.wait()
            assert await still_waiting(late_reader, 0.1)
            c.backend.drop(writer.ticket, unlock=True)
            await late_reader.done.wait()
            assert late_reader.error is None


async def test_tokens_increase_across_hosts_and_match_across_names(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    seen: list[int] = []
    with trio.fail_after(WAIT):
        async with serving(a, b):
            for i in range(6):
                host = (a, b)[i % 2]
                t = ticket("n1", "n2")
                tokens = await host.take(t)
                assert tokens[0] == tokens[1]
                seen.append(tokens[0])
                host.backend.drop(t, unlock=True)
    assert seen == sorted(set(seen))


async def test_multi_name_requests_in_opposite_orders_never_deadlock(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")

    async def worker(host: Host, names: tuple[str, ...]) -> None:
        for _ in range(15):
            t = ticket(*names)
            await host.take(t)
            await trio.lowlevel.checkpoint()
            host.backend.drop(t, unlock=True)

    with trio.fail_after(WAIT):
        async with serving(a, b):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker, a, ("p", "q"))
                nursery.start_soon(worker, b, ("q", "p"))


async def test_no_wait_request_is_blocked_and_leaves_no_key(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b):
            held = ticket("x")
            await a.take(held)
            with pytest.raises(Blocked):
                await b.take(ticket("x", wait=False))
            a.backend.drop(held, unlock=True)
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")


async def test_no_wait_request_right_after_a_release_on_the_same_host_is_granted(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """The released key may still be on its way out of etcd: it is not someone else's."""
    (a,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with serving(a) as nursery:
            for _ in range(30):
                released = ticket("x")
                await a.take(released)
                a.backend.drop(released, unlock=True)
                again = start(nursery, a, ticket("x", wait=False))
                await again.done.wait()
                assert again.error is None
                a.backend.drop(again.ticket, unlock=True)


async def test_no_wait_slot_right_after_a_release_on_the_same_host_is_granted(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """With the other slot held on another host, a released slot's key on its way out of
    etcd does not count: a no-wait request for a slot is granted, and one more is refused."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    slots = {"s": 2}
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            await b.take(ticket("s", slots=slots))
            for _ in range(30):
                released = ticket("s", slots=slots)
                await a.take(released)
                a.backend.drop(released, unlock=True)
                again = start(nursery, a, ticket("s", wait=False, slots=slots))
                await again.done.wait()
                assert again.error is None
                with pytest.raises(Blocked):
                    await a.take(ticket("s", wait=False, slots=slots))
                a.backend.drop(again.ticket, unlock=True)


async def test_taking_a_lock_again_at_once_never_waits_for_its_own_release(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    """The next put deletes the released key if the janitor has not yet: it never queues
    behind it, so it never checks its keys again (a txn of its own). Two etcd requests a
    cycle at most, as with etcd's own lock API."""
    (a,) = hosts(shared_etcd.endpoints, "host0")
    cycles = 30
    with trio.fail_after(WAIT):
        async with serving(a):
            first = len(a.etcd.calls)
            for _ in range(cycles):
                released = ticket("x")
                await a.take(released)
                a.backend.drop(released, unlock=True)
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")
            calls = [call for _, call in a.etcd.calls[first:] if call.name == "txn"]
    assert not [call for call in calls if call.compared]
    assert len(calls) <= 2 * cycles


async def test_cancelled_take_leaves_no_key(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            # The edge drops the ticket and cancels its take: both must let go in etcd.
            b.backend.drop(waiting.ticket, unlock=True)
            waiting.scope.cancel()
            # And one cancelled at once, before its txn can even have been answered.
            hasty = start(nursery, b, ticket("x"))
            await trio.lowlevel.checkpoint()
            hasty.scope.cancel()
            await waiting.done.wait()
            await hasty.done.wait()
            a.backend.drop(held, unlock=True)
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")


async def test_local_flock_holder_outside_lockd_holds_back_the_grant(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            with outside_flock(a.lock_dir / "x.lock") as proc:
                with pytest.raises(Blocked):
                    await a.take(ticket("x", wait=False))
                waiting = start(nursery, a, ticket("x"))
                assert await still_waiting(waiting)
                assert [h.pid for h in (await a.backend.outside_holders_of(["x"])).get("x", [])] == [proc.pid]
                # A is first in etcd's order, so B queues behind it.
                behind = start(nursery, b, ticket("x"))
                assert await still_waiting(behind, 0.1)
            await waiting.done.wait()
            assert waiting.error is None
            assert await still_waiting(behind, 0.1)
            a.backend.drop(waiting.ticket, unlock=True)
            await behind.done.wait()


@pytest.mark.parametrize("deleted", ["held", "waiting"])
async def test_a_key_deleted_by_hand_ends_the_lease_or_request_it_was_for(
    deleted: str, shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            mine, theirs = await entries_under(shared_etcd.endpoints, prefix + "x/")
            shared_etcd.members[0].delete((mine if deleted == "held" else theirs).key)
            await waiting.done.wait()
    if deleted == "held":  # lost, and B granted
        assert [(t, reason) for t, reason, _ in a.lost] == [
            (held, "its etcd key was deleted (by hand or by another tool)")
        ]
        assert waiting.error is None
    else:  # failed while A still holds: it no longer has a place in the queue
        assert isinstance(waiting.error, DaemonUnavailable) and "vanished" in str(waiting.error)
        assert a.lost == []


async def test_a_waiter_is_not_granted_if_its_keys_went_unnoticed_while_it_waited(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    """The re-check on wake-up (the etcd issue #11456 class): a waiting request whose keys
    went while the daemon did not notice is not granted when its turn comes."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            _, theirs = await entries_under(shared_etcd.endpoints, prefix + "x/")  # A's, B's
            # B's watch leaves the deletion of B's key out: B never hears of it.
            b.etcd.drop_events(lambda e: e.type == "DELETE" and e.kv.key == theirs.key)
            shared_etcd.members[0].delete(theirs.key)
            await b.etcd.delivered(lambda e: e.kv.key == theirs.key, dropped=True)
            assert not waiting.done.is_set()
            a.backend.drop(held, unlock=True)
            await waiting.done.wait()
    assert isinstance(waiting.error, DaemonUnavailable) and "vanished" in str(waiting.error)


async def test_keys_seen_going_while_the_last_check_answers_fail_the_grant(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """etcd answers the check after waiting that the keys are there; before the request
    resumes, the watch shows them deleted. The watch's cancellation of the take would only
    arrive at a checkpoint the grant never reaches: the request must fail all the same."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")

    async def lose_them_meanwhile(call: Call) -> None:
        if call.compared and not call.args["success"]:  # the check of a request that waited
            for key in call.compared:
                shared_etcd.members[0].delete(key)
            for key in call.compared:
                await b.etcd.delivered(lambda e, key=key: e.type == "DELETE" and e.kv.key == key)

    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            b.etcd.after("txn", lose_them_meanwhile)
            a.backend.drop(held, unlock=True)
            await waiting.done.wait()
    assert isinstance(waiting.error, DaemonUnavailable) and "vanished" in str(waiting.error)
    assert b.lost == []


@pytest.mark.parametrize("watch", ["restarted", "running"])
async def test_keys_deleted_right_after_their_put_are_never_granted_unreported(
    watch: str, shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """A request's keys deleted before the daemon's watch showed them (a watch restarted over
    their deletion; or put and delete reaching it together) never make a silent grant: the
    request fails, or is granted and then reported lost."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    deleted = trio.Event()

    async def break_the_watch(call: Call) -> None:
        if any(b"/x/" in key for key in call.puts):
            b.etcd.break_watches(etcd_client.EtcdUnreachable("the watch broke, as a connection may"))

    async def delete_them(call: Call) -> None:
        if any(b"/x/" in key for key in call.puts):
            for key in call.puts:
                shared_etcd.members[0].delete(key)
            deleted.set()

    async def read_after_the_deletion(call: Call) -> None:
        await deleted.wait()

    with trio.fail_after(WAIT):
        async with serving(a, b):
            if watch == "restarted":
                # The watch, restarted, reads etcd only once the keys are gone: never sees them.
                b.etcd.before("txn", break_the_watch)
                b.etcd.before("range_prefix", read_after_the_deletion)
            b.etcd.after("txn", delete_them)
            taken = ticket("x")
            try:
                await b.take(taken)
            except DaemonUnavailable as exc:
                assert "vanished" in str(exc)
            else:  # the mirror had seen the keys: their deletion must end the lease
                with trio.move_on_after(1):
                    await b.first_loss.wait()
                assert [t for t, _, _ in b.lost] == [taken], "granted, keys gone, not lost"
            await a.take(ticket("x"))  # the lock is free for the other host


async def test_releases_go_through_when_etcd_takes_fewer_operations_per_txn(
    prefix: str, hosts: Hosts
) -> None:
    cluster = EtcdCluster(1, extra=["--max-txn-ops", "4"])
    try:
        await trio.to_thread.run_sync(cluster.start)
        (a,) = hosts(cluster.endpoints, "host0")
        with trio.fail_after(WAIT):
            async with serving(a):
                held = [ticket(f"n{i}") for i in range(10)]
                for t in held:
                    await a.take(t)
                for t in held:  # at once: one batch of deletions, too large for this etcd
                    a.backend.drop(t, unlock=True)
                await wait_no_keys(cluster.endpoints, prefix + "n")
                # Released and asked for again at once: the put would also delete the released
                # keys, more operations than this etcd takes in one txn.
                for _ in range(2):
                    again = ticket("n0", "n1", "n2")
                    await a.take(again)
                    a.backend.drop(again, unlock=True)
                await wait_no_keys(cluster.endpoints, prefix + "n")
    finally:
        cluster.close()


# --- etcd failures ----------------------------------------------------------------------------


async def test_etcd_killed_loses_leases_before_ttl_then_service_resumes(
    etcd: EtcdCluster, hosts: Hosts
) -> None:
    (a,) = hosts(etcd.endpoints, "host0")
    (member,) = etcd.members
    with trio.fail_after(4 * WAIT):
        async with serving(a):
            held = ticket("x")
            (before,) = await a.take(held)
            member.kill()
            killed = trio.current_time()
            await a.first_loss.wait()
            (lost_ticket, reason, lost_at) = a.lost[0]
            assert lost_ticket is held and "could not be kept alive" in reason
            # (That it comes early enough is for the partition test, which sees keep-alives.)
            assert lost_at - killed < TTL
            with pytest.raises(DaemonUnavailable, match="unavailable"):
                await a.take(ticket("y"))
            etcd.restart(member)
            await a.ready()
            (after,) = await a.take(ticket("x"))
            assert after > before


async def test_unreachable_at_start_then_serves_once_etcd_appears(hosts: Hosts) -> None:
    cluster = EtcdCluster(1)
    try:
        (a,) = hosts(cluster.endpoints, "host0")
        with trio.fail_after(4 * WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.backend.run, a.lose)
                await trio.sleep(0.3)
                with pytest.raises(DaemonUnavailable, match=r"etcd at .* is unreachable"):
                    await a.take(ticket("x"))
                await trio.to_thread.run_sync(cluster.start)
                await a.ready()
                await a.take(ticket("x"))
                nursery.cancel_scope.cancel()
    finally:
        cluster.close()


async def test_shutdown_with_nothing_granted_revokes_the_lease_at_once(etcd: EtcdCluster, hosts: Hosts) -> None:
    """A daemon stopping while its requests only wait leaves no key behind to expire."""
    a, b, c = hosts(etcd.endpoints, "host0", "host1", "host2")
    with trio.fail_after(WAIT):
        async with serving(b, c) as outer:
            held = ticket("x")
            await b.take(held)
            async with serving(a) as takes:
                waiting_on_a = start(takes, a, ticket("x"))
                assert await still_waiting(waiting_on_a)
            stopped = trio.current_time()
            later = start(outer, c, ticket("x"))
            assert await still_waiting(later, 0.1)
            b.backend.drop(held, unlock=True)
            await later.done.wait()
            # Well under the TTL: the revoke freed a's older key, not its expiry.
            assert later.tokens is not None and later.at - stopped < TTL / 2


async def test_shutdown_leaves_a_lease_with_granted_tickets_to_expire(etcd: EtcdCluster, hosts: Hosts) -> None:
    """Holders told at shutdown that their leases are lost get the TTL to stop their work."""
    a, b = hosts(etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT + 2 * TTL):
        async with trio.open_nursery() as outer:
            outer.start_soon(b.backend.run, b.lose)
            await b.ready()
            async with serving(a):
                held, waiting = await holds_while_other_waits(a, b, outer)
                stopped = trio.current_time()
            await waiting.done.wait()
            assert waiting.at - stopped > TTL / 2
            outer.cancel_scope.cancel()


async def test_partitioned_daemon_loses_its_leases_before_etcd_expires_them(
    etcd: EtcdCluster, hosts: Hosts
) -> None:
    """A is cut off from a healthy etcd: it must stop believing before B can be granted."""
    (b,) = hosts(etcd.endpoints, "host0")
    with trio.fail_after(4 * WAIT):
        async with relay_to(etcd.endpoints[0]) as relay:
            (a,) = hosts([relay.url], "cut-off")
            async with serving(a, b) as nursery:
                held = ticket("x")
                (before,) = await a.take(held)
                await b.take(ticket("y"))
                b_waits = start(nursery, b, ticket("x"))
                a_waits = start(nursery, a, ticket("y"))
                assert await still_waiting(b_waits, TTL / 2)  # at least one keep-alive renewed
                relay.cut = True
                await b_waits.done.wait()
                assert b_waits.error is None
                (lost_ticket, _, lost_at) = a.lost[0]
                assert lost_ticket is held
                # etcd cannot expire A's lease before the last keep-alive it got + TTL; A must
                # give up its leases well before that (the margin is TTL/3; half of it here).
                last = max(t for t in relay.keep_alives if t < lost_at)
                assert lost_at < last + TTL - TTL / 6
                assert b_waits.at > lost_at
                # A's waiter went down with A's lease: never granted.
                await a_waits.done.wait()
                assert isinstance(a_waits.error, DaemonUnavailable) and a_waits.tokens is None
                relay.heal()
                await a.ready()
                b.backend.drop(b_waits.ticket, unlock=True)
                (after,) = await a.take(ticket("x"))
                assert after > before


async def test_keys_of_this_lease_without_a_ticket_are_deleted(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    (a,) = hosts(shared_etcd.endpoints, "host0")
    client = EtcdClient(shared_etcd.endpoints)
    with trio.fail_after(WAIT):
        async with serving(a):
            await a.take(ticket("x"))
            _, (mine,) = await client.range_prefix(prefix + "x/", timeout=2)
            # As a put left behind by a cancelled take would be: this lease, no live ticket.
            stray = f"{prefix}x/{mine.lease:x}/999"
            await client.txn([etcd_client.put(stray, b"{}", mine.lease)], timeout=2)
            # And one whose bytes are not UTF-8, put by another tool under this lease.
            odd = f"{prefix}x/{mine.lease:x}/".encode() + b"\xff"
            shared_etcd.members[0].put(odd, b"{}", mine.lease)

            async def strays_gone() -> bool:
                return len(await keys_under(shared_etcd.endpoints, prefix)) <= 1

            await wait_until_async(strays_gone, "the stray keys deleted", interval=0.02)
            assert await keys_under(shared_etcd.endpoints, prefix) == [mine.text]
    await client.aclose()


async def test_keys_that_are_not_utf8_are_locks_like_any_other_foreign_key(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    (a,) = hosts(shared_etcd.endpoints, "host0")
    member = shared_etcd.members[0]
    on_x = prefix.encode() + b"x/\xff\xfe"
    with trio.fail_after(WAIT):
        async with serving(a):
            member.put(on_x, b"from another tool")
            # Under a name no request can have: nobody waits for it, status never shows it.
            member.put(prefix.encode() + b"\xff/1", b"from another tool")
            with pytest.raises(Blocked):
                await a.take(ticket("x", wait=False))
            assert [h.host for h in (await a.backend.outside_holders_of(["x"])).get("x", [])] == ["?"]
            assert "x" in a.backend.outside_names()
            assert all(name.isascii() for name in a.backend.outside_names())
            member.delete(on_x)
            await a.take(ticket("x"))


async def test_a_failing_watch_ends_the_lease_not_the_daemon(shared_etcd: EtcdCluster, hosts: Hosts) -> None:
    """Errors from etcd are handled in the watch; anything else is a bug, which costs the
    lease (the daemon can no longer trust its mirror), not the daemon."""
    (a,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with serving(a):
            held = ticket("x")
            await a.take(held)
            a.etcd.break_watches(RuntimeError("a bug in the watch"))
            await wait_until_async(lambda: a.lost, "a lease lost")
            ((lost, reason, _),) = a.lost
            assert lost is held
            assert reason == (
                "lockd's etcd watch failed (RuntimeError('a bug in the watch')); see lockd's log"
            )
            await a.ready()
            await a.take(ticket("y"))


async def test_a_watch_gone_silent_is_noticed_and_restarted(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """A's watch stream stops delivering without an error, as behind a firewall that dropped
    the flow: A must find out by itself, or its waiters wait forever and hold up the fleet."""
    (b,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with relay_to(shared_etcd.endpoints[0]) as relay:
            (a,) = hosts([relay.url], "silenced")
            async with serving(a, b) as nursery:
                held = ticket("x")
                await b.take(held)
                waiting = start(nursery, a, ticket("x"))
                assert await still_waiting(waiting)
                relay.silence_watches()
                b.backend.drop(held, unlock=True)
                await waiting.done.wait()
                assert waiting.error is None
                # A take needs the watch to show its own keys: answered, not left hanging.
                relay.silence_watches()
                quick = start(nursery, a, ticket("y", wait=False))
                await quick.done.wait()
                assert quick.tokens is not None or isinstance(quick.error, DaemonUnavailable)
                # And B, behind A's key, is granted once A lets go.
                behind = start(nursery, b, ticket("x"))
                assert await still_waiting(behind, 0.1)
                a.backend.drop(waiting.ticket, unlock=True)
                await behind.done.wait()
                assert behind.error is None


async def test_a_watch_that_fails_at_once_is_retried_with_back_off(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    with trio.fail_after(WAIT):
        async with relay_to(shared_etcd.endpoints[0]) as relay:
            relay.refuse_watches = True
            (a,) = hosts([relay.url], "host0")
            with trio.move_on_after(2.0):
                await a.backend.run(a.lose)
            # Each retry reads the whole prefix. Backing off from 0.1 s to 1 s makes about 5
            # in 2 s; retrying every 0.1 s, about 20.
            reads = [at for at, path in relay.requests if path == "/v3/kv/range"]
            assert 3 <= len(reads) <= 8


async def test_a_burst_of_slow_takes_does_not_hold_up_releases(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    (b,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with relay_to(shared_etcd.endpoints[0]) as relay:
            (a,) = hosts([relay.url], "busy")
            async with serving(a, b) as nursery:
                held, waiting = await holds_while_other_waits(a, b, nursery)
                # etcd takes its time over every put: a burst of takes fills more connections
                # than the client has. Deleting the released key must not queue behind them.
                relay.delays[b"request_put"] = 0.9
                burst = [start(nursery, a, ticket(f"n{i}")) for i in range(etcd_client.CONNECTIONS)]
                await trio.sleep(0.2)
                released = trio.current_time()
                a.backend.drop(held, unlock=True)
                await waiting.done.wait()
                # Queued behind the burst, it would wait for the first puts' answers: 0.7 s.
                assert waiting.at - released < 0.4
                assert a.lost == []
                for pending in burst:
                    pending.scope.cancel()


async def test_a_put_whose_answer_is_lost_fails_the_request_and_leaves_no_key(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    """etcd applied the put, the daemon never heard: the key has no claim, and must go."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b):
            a.etcd.fail("txn", applied=True)
            with pytest.raises(DaemonUnavailable, match="fault injected"):
                await a.take(ticket("x"))
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")
            await b.take(ticket("x", wait=False))


async def test_keep_alives_failing_short_of_the_deadline_cost_no_lease(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    (a,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with serving(a):
            await a.take(ticket("x"))
            a.etcd.fail("keep_alive", 3)  # each attempt is retried at once, the next on time
            await trio.sleep(TTL)
            assert a.lost == []
            renewals = [at for at, call in a.etcd.calls if call.name == "keep_alive"]
            assert len(renewals) >= 5


async def test_deletions_etcd_fails_are_retried_until_done(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            a.etcd.fail("txn", 3)  # the janitor's deletion of the released key
            a.backend.drop(held, unlock=True)
            await waiting.done.wait()
            assert waiting.error is None
            assert [c.name for _, c in a.etcd.calls].count("txn") >= 4


async def test_a_lease_granted_slowly_is_renewed_in_time(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    (a,) = hosts(shared_etcd.endpoints, "host0")
    # Leases are granted at once, and the answer comes a second later (TTL/3 would be 0.67 s).
    a.etcd.answer_late("grant", 1.0)
    with trio.fail_after(WAIT):
        async with serving(a):
            await a.take(ticket("x"))
            # Past where its deadline would be, 2/3 TTL after the grant was sent.
            await trio.sleep(TTL / 2)
            assert a.lost == []


async def test_a_frozen_member_costs_no_lease_while_the_others_serve(
    etcd3: EtcdCluster, hosts: Hosts
) -> None:
    leader = await trio.to_thread.run_sync(etcd3.leader)
    frozen = next(m for m in etcd3.members if m is not leader)
    (a,) = hosts([frozen.url, *(m.url for m in etcd3.members if m is not frozen)], "host0")
    with trio.fail_after(WAIT):
        async with serving(a):
            await a.take(ticket("x"))
            # Its connections stay open and it answers nothing, so each renewal that goes to
            # it can only time out: the next attempt must go elsewhere, within the deadline.
            frozen.stop()
            try:
                await trio.sleep(TTL)  # without moving on, lost 2/3 TTL after the last renewal
                assert a.lost == []
                await a.ready()
            finally:
                frozen.cont()


async def test_a_lease_lost_for_want_of_renewals_is_left_to_expire_not_revoked(
    shared_etcd: EtcdCluster, hosts: Hosts
) -> None:
    """Its holders were just told: etcd's TTL is their time to stop, even if etcd answers again."""
    a, b = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT):
        async with serving(a, b) as nursery:
            held, waiting = await holds_while_other_waits(a, b, nursery)
            a.etcd.fail("keep_alive", 10**6)
            await wait_until_async(lambda: a.lost, "a lease lost")
            lost_at = a.lost[0][2]
            a.etcd.fail("keep_alive", 0)  # etcd answers again: a new lease, the old one stale
            await waiting.done.wait()
            assert waiting.error is None
            assert waiting.at - lost_at >= TTL / 3


@pytest.mark.parametrize(
    ("status", "refused"), [(3, True), (7, True), (9, True), (14, False), (0, False)],
    ids=["invalid-argument", "permission-denied", "failed-precondition", "timed-out", "unreadable"],
)
async def test_a_put_with_deletions_is_sent_alone_again_only_if_etcd_refused_it(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts, status: int, refused: bool
) -> None:
    """A refusal applied none of the txn: the keys are put alone. Other failures (etcd's
    "request timed out", an answer that cannot be read) may come after etcd applied it: the
    take fails rather than put the keys again."""
    (a,) = hosts(shared_etcd.endpoints, "host0")
    failed: list[Call] = []

    async def fail_the_put_with_deletions(call: Call) -> None:
        ops = call.args.get("success", ())
        if not failed and call.puts and any("request_delete_range" in op for op in ops):
            failed.append(call)
            raise etcd_client.EtcdError("etcd at x answered: injected", status)

    with trio.fail_after(WAIT):
        async with serving(a):
            released = ticket("x")
            await a.take(released)
            a.etcd.before("txn", fail_the_put_with_deletions)
            a.backend.drop(released, unlock=True)
            again = ticket("x")
            if refused:
                await a.take(again)
                a.backend.drop(again, unlock=True)
            else:
                with pytest.raises(DaemonUnavailable, match="injected"):
                    await a.take(again)
            a.etcd.before("txn", None)
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")
    assert failed
    after = [call for _, call in a.etcd.calls if call.name == "txn" and call.puts][-1]
    assert (after is not failed[0]) == refused


# --- re-exec ------------------------------------------------------------------------------------


def same_claims(claims: list[Claim]) -> list[Claim]:
    """`claims` as the next program has them: new objects with the same fields."""
    return [msgspec.convert(msgspec.to_builtins(claim), Claim) for claim in claims]


def re_exec(old: Host, endpoints: list[str], prefix: str) -> Host:
    """The daemon of `old` after an exec: the same configuration, and nothing of the old
    program but the descriptors handed over. The caller first `sever`s the old client and
    cancels the old backend's tasks: what ran in the old program then does nothing more to etcd,
    as after a real exec. The old LockFiles is forgotten, never closed (that would close the
    descriptors handed over); only its directory's descriptor stays open with it."""
    new = Host(old.name, old.lock_dir.parent, endpoints, prefix)
    old.files = new.files  # the fixture closes this one (twice, which LockFiles allows)
    return new


async def keys_of(endpoints: list[str], prefix: str, *names: str) -> list[tuple[str, int, int]]:
    """The keys on `names` in etcd, oldest first, with their create revisions and leases."""
    return [
        (kv.text, kv.create_revision, kv.lease) for kv in await entries_under(endpoints, prefix)
        if kv.text[len(prefix):].partition("/")[0] in names
    ]


async def lease_ttl(etcd: EtcdCluster, lease: int) -> int:
    """The seconds etcd gives `lease` before it expires; -1 if it has."""
    answer = await trio.to_thread.run_sync(etcd.members[0].post, "/v3/lease/timetolive", {"ID": lease})
    return int(answer["TTL"])


async def test_a_re_executed_backend_goes_on_with_its_lease_keys_flocks_and_queue_places(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    """Across the exec: the same lease, renewed in time; the held claim's keys and flock
    descriptors; the waiting claim's key and place, ahead of a later host's; and nothing put."""
    old, other, later = hosts(shared_etcd.endpoints, "host0", "host1", "host2")
    endpoints = shared_etcd.endpoints
    with trio.fail_after(WAIT + 2 * TTL):
        async with serving(other, later) as nursery:
            async with trio.open_nursery() as program:
                program.start_soon(old.backend.run, old.lose)
                await old.ready()
                held = ticket("x")
                (token,) = await old.take(held)
                in_the_way = ticket("y")
                await other.take(in_the_way)
                waiting = start(program, old, ticket("y", label="waiting"))
                assert await still_waiting(waiting)
                behind = start(nursery, later, ticket("y"))
                assert await still_waiting(behind)
                keys = await keys_of(endpoints, prefix, "x", "y")
                state, fds = old.backend.hand_over([held, waiting.ticket])
                # The exec: the old program's tasks stop, its connections close.
                old.etcd.sever()
                program.cancel_scope.cancel()
            # Held x; then on y: the holder on another host, this one's waiting claim, the later one.
            (_, x_revision, lease), (_, _, _), (_, waiting_revision, waiting_lease), _ = keys
            assert x_revision == token and waiting_lease == lease and len(fds) == 1
            # As long as a renewal period passes in the exec: the new program renews at once.
            await trio.sleep(TTL / 4)
            new = re_exec(old, endpoints, prefix)
            new_held, new_waiting = claims = same_claims([held, waiting.ticket])
            new.backend.adopt(state, claims)
            assert list(new.backend.descriptors(new_held)) == fds
            started = trio.current_time()
            nursery.start_soon(new.backend.run, new.lose)
            resumed = start(nursery, new, new_waiting)
            await trio.sleep(1.5 * TTL)
            renewals = [at for at, call in new.etcd.calls if call.name == "keep_alive"]
            assert renewals and renewals[0] - started < TTL / 8
            assert await lease_ttl(shared_etcd, lease) > 0 and new.backend.lease_state()[0]
            assert await keys_of(endpoints, prefix, "x", "y") == keys
            assert not [key for _, call in new.etcd.calls if call.name == "txn" for key in call.puts
                        if b"/.heartbeat/" not in key]
            assert new.lost == []
            # Held: by etcd for the other hosts, by the flock on this one.
            with pytest.raises(Blocked):
                await other.take(ticket("x", wait=False))
            assert not can_flock(new.lock_dir / "x.lock", shared=True)
            assert not resumed.done.is_set() and new.backend.place_of(new_waiting) == waiting_revision
            other.backend.drop(in_the_way, unlock=True)
            await resumed.done.wait()
            assert resumed.error is None and resumed.tokens == [waiting_revision]
            assert await still_waiting(behind)
            new.backend.drop(new_waiting, unlock=True)
            await behind.done.wait()
            assert behind.tokens is not None and behind.tokens[0] > waiting_revision
            new.backend.drop(new_held, unlock=True)
            assert can_flock(new.lock_dir / "x.lock")
            (again,) = await other.take(ticket("x"))
            assert again > token
            nursery.cancel_scope.cancel()


async def test_a_handover_whose_exec_fails_changes_nothing(shared_etcd: EtcdCluster, prefix: str, hosts: Hosts) -> None:
    (a,) = hosts(shared_etcd.endpoints, "host0")
    with trio.fail_after(WAIT):
        async with serving(a):
            held = ticket("x")
            await a.take(held)
            state, fds = a.backend.hand_over([held])
            assert fds == list(a.backend.descriptors(held))
            later = ticket("y")
            await a.take(later)
            (x_key, _, _), (y_key, _, _) = await keys_of(shared_etcd.endpoints, prefix, "x", "y")
            # No key number went to the handover: none is ever put twice.
            assert int(y_key.rpartition("/")[2]) == int(x_key.rpartition("/")[2]) + 1
            a.backend.drop(held, unlock=True)
            a.backend.drop(later, unlock=True)
            assert can_flock(a.lock_dir / "x.lock")
            await wait_no_keys(shared_etcd.endpoints, prefix + "x/")


async def test_a_re_exec_too_slow_to_vouch_for_the_lease_loses_its_holders_at_once(
    shared_etcd: EtcdCluster, prefix: str, hosts: Hosts
) -> None:
    """Past TTL - TTL/3 from the last renewal, the lease is not vouched for: the holders are
    told at once, and the lease is left to expire rather than revoked (what is left of their
    TTL/3 is theirs to stop in: a re-exec must be quick)."""
    old, other = hosts(shared_etcd.endpoints, "host0", "host1")
    with trio.fail_after(WAIT + 2 * TTL):
        async with serving(other) as nursery:
            async with trio.open_nursery() as program:
                program.start_soon(old.backend.run, old.lose)
                await old.ready()
                held = ticket("x")
                await old.take(held)
                state, _ = old.backend.hand_over([held])
                old.etcd.sever()
                program.cancel_scope.cancel()
            waiting = start(nursery, other, ticket("x"))
            await trio.sleep(TTL * 2 / 3)
            new = re_exec(old, shared_etcd.endpoints, prefix)
            (new_held,) = claims = same_claims([held])
            new.backend.adopt(state, claims)
            started = trio.current_time()
            nursery.start_soon(new.backend.run, new.lose)
            await new.first_loss.wait()
            ((lost, reason, lost_at),) = new.lost
            assert lost is new_held and "could not be kept alive" in reason and lost_at - started < TTL / 8
            await waiting.done.wait()
            assert waiting.error is None and waiting.at > lost_at
            assert "revoke" not in [call.name for _, call in new.etcd.calls]
            nursery.cancel_scope.cancel()


async def test_a_state_of_another_prefix_cluster_or_backend_or_no_state_is_refused(prefix: str, hosts: Hosts) -> None:
    endpoints = ["http://127.0.0.1:9"]
    (a,) = hosts(endpoints, "host0")
    state, fds = a.backend.hand_over([])
    assert fds == []

    def backend(endpoints: list[str], prefix: str) -> EtcdBackend:
        return EtcdBackend(a.files, FaultyEtcd(endpoints), host="host0", ttl=TTL, prefix=prefix)

    backend(endpoints[::-1], prefix).adopt(state, [])
    with pytest.raises(ValueError, match="for prefix '/lockd-test/.*', and this daemon's is '/elsewhere/'"):
        backend(endpoints, "/elsewhere/").adopt(state, [])
    with pytest.raises(ValueError, match=r"for endpoints http://127.0.0.1:9, and this daemon's are http://10.0.0.1:2379"):
        backend(["http://10.0.0.1:2379"], prefix).adopt(state, [])
    for garbage in [b"", b"\x00garbage", msgspec.msgpack.encode({"backend": "flock", "next_token": 7})]:
        with pytest.raises(ValueError, match="not a handover state of the etcd backend"):
            backend(endpoints, prefix).adopt(garbage, [])
