"""Live lease events against a real daemon: the blocking and trio clients' subscriptions, and
a watcher that stops reading, which the daemon drops without slowing anyone else."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lockd_client
import pytest
import trio
from lockd_client import protocol, trio_client

from lockd.service import MAX_SUBSCRIPTIONS

from .conftest import Daemon
from .rawclient import RawClient
from .waiting import wait_until

WAIT = 10.0


@pytest.fixture
def client(lockd: Daemon):
    with lockd_client.connect(lockd.socket, label="watcher") as c:
        yield c


def kinds(events: list[protocol.LeaseEvent]) -> list[tuple[str, str]]:
    return [(event.event, event.name) for event in events]


# --- the blocking client ----------------------------------------------------------------------


def test_events_come_in_order_with_what_happened(lockd: Daemon, client, name: str) -> None:
    with client.events(name) as events, lockd_client.connect(lockd.socket) as other:
        lease = other.acquire(name, label="nightly")
        with pytest.raises(lockd_client.LockBusy):
            other.acquire(name, wait=False, shared=True)
        lease.release()
        with RawClient(lockd.socket) as raw:  # the exit status lockctl reports on release
            granted = raw.acquire(name)
            assert isinstance(granted, protocol.Granted)
            raw.send(protocol.Release(raw.next_id - 1, exit_status=3))
            raw.request(protocol.Status(raw.next_id, [name]))  # a round trip: it is applied
        seen = [next(events) for _ in range(5)]
    assert kinds(seen) == [
        ("granted", name), ("refused", name), ("released", name), ("granted", name), ("released", name),
    ]
    start, refusal, end, raw_start, raw_end = seen
    for event in seen:
        assert (event.pid, event.uid, event.user) == (os.getpid(), os.getuid(), None)  # the uid alone
        assert event.slots is None and event.time <= time.time()
    assert (start.mode, start.label, start.token, start.held, start.reason) == (
        "exclusive", "nightly", lease.token, None, None,
    )
    assert start.waited is not None and start.waited >= 0
    assert (refusal.mode, refusal.token, refusal.reason) == ("shared", None, "busy")
    assert (end.token, end.label, end.exit_status, end.waited) == (lease.token, "nightly", None, None)
    assert end.held is not None and end.held >= 0 and start.time <= end.time
    assert (raw_start.token, raw_end.token) == (granted.tokens[0],) * 2
    assert raw_end.exit_status == 3


def test_only_the_names_asked_for_come(lockd: Daemon, client, name: str) -> None:
    with client.events(f"{name}.a", f"{name}.c") as events, lockd_client.connect(lockd.socket) as other:
        other.acquire(f"{name}.b").release()
        other.acquire(f"{name}.b", f"{name}.c").release()
        other.acquire(f"{name}.a").release()
        assert kinds([next(events) for _ in range(4)]) == [
            ("granted", f"{name}.c"), ("released", f"{name}.c"), ("granted", f"{name}.a"), ("released", f"{name}.a"),
        ]


def test_leaving_the_block_ends_the_subscription_at_the_daemon(lockd: Daemon, client, name: str) -> None:
    # The daemon takes MAX_SUBSCRIPTIONS at once per connection: had one of these outlived its
    # block, the last would be refused.
    for _ in range(MAX_SUBSCRIPTIONS + 2):
        with client.events(name):
            pass
    held = [client.events(name) for _ in range(MAX_SUBSCRIPTIONS)]
    with pytest.raises(lockd_client.LimitExceeded, match=f"{MAX_SUBSCRIPTIONS} subscriptions already"):
        client.events(name)
    held.pop().close()
    with client.events(name) as events:
        lease = client.acquire(name)  # the connection's other replies are read as ever
        lease.release()
        assert kinds([next(events), next(events)]) == [("granted", name), ("released", name)]
    with pytest.raises(StopIteration):
        next(events)


def test_a_bad_name_is_refused_before_anything_is_sent(client) -> None:
    with pytest.raises(lockd_client.InvalidName):
        client.events("ok", "../etc")
    client.status()  # the connection is as it was


def test_the_daemon_going_away_ends_the_iteration(daemon: Daemon) -> None:
    with lockd_client.connect(daemon.socket) as c, c.events() as events:
        daemon.kill()
        with pytest.raises(lockd_client.DaemonUnavailable, match="is lockd still running"):
            next(events)


# --- the trio client --------------------------------------------------------------------------


async def test_trio_events_come_while_other_tasks_use_the_connection(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(lockd.socket) as c, c.events(name) as events:
            seen: list[protocol.LeaseEvent] = []

            async def watch() -> None:
                async for event in events:
                    seen.append(event)
                    if len(seen) == 4:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for _ in range(2):  # the same connection: its replies and the events interleave
                    async with c.lock(name) as lease:
                        assert not lease.lost
            assert kinds(seen) == [("granted", name), ("released", name)] * 2
            assert seen[0].token == seen[1].token < seen[2].token


async def test_trio_cancelling_a_wait_loses_no_event(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(lockd.socket) as c, c.events(name) as events:
            with trio.move_on_after(0.05) as waited:
                await events.__anext__()
            assert waited.cancelled_caught
            async with trio_client.connect(lockd.socket) as other:
                await (await other.acquire(name)).release()
            assert [(await events.__anext__()).event, (await events.__anext__()).event] == ["granted", "released"]


async def test_trio_cancelling_the_consumer_ends_the_subscription(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(lockd.socket) as c:
            for _ in range(MAX_SUBSCRIPTIONS + 2):  # each ended despite the cancellation
                with trio.move_on_after(0.01) as scope:
                    async with c.events(name) as events:
                        async for _event in events:
                            pass
                assert scope.cancelled_caught
            events = await c.events(name)  # awaited, not entered: ended by aclose
            async with trio_client.connect(lockd.socket) as other:
                await (await other.acquire(name)).release()
                await other.status()  # the release applied, so its event sent before this:
            await c.status()  # and read
            await events.aclose()
            await events.aclose()
            # What came before the end is still read, then the iteration ends.
            assert kinds([event async for event in events]) == [("granted", name), ("released", name)]


async def test_trio_an_events_block_entered_a_second_time_raises(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(lockd.socket) as c:
            subscribing = c.events(name)
            async with subscribing as events:
                with pytest.raises(RuntimeError, match="entered once"):
                    async with subscribing:
                        pass
                async with trio_client.connect(lockd.socket) as other:
                    await (await other.acquire(name)).release()
                assert [(await events.__anext__()).event, (await events.__anext__()).event] == ["granted", "released"]


async def test_trio_the_daemon_going_away_ends_the_iteration(daemon: Daemon) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(daemon.socket) as c, c.events() as events:
            daemon.kill()
            with pytest.raises(lockd_client.DaemonUnavailable):
                async for _event in events:
                    pass


# --- a watcher that stops reading -------------------------------------------------------------

CYCLES = 3000


def cycle(socket: str, name: str) -> float:
    """Acquire and release `name` CYCLES times on one connection; the rate per second."""
    with lockd_client.connect(socket) as c:
        started = time.perf_counter()
        for _ in range(CYCLES):
            c.acquire(name).release()
        c.status(name)  # the last release applied
        return CYCLES / (time.perf_counter() - started)


def test_a_stalled_watcher_is_dropped_and_keeps_its_connection_and_lease(daemon: Daemon, name: str) -> None:
    alone = cycle(daemon.socket, name)
    with RawClient(daemon.socket) as stalled:
        kept = stalled.acquire(f"{name}.kept")
        assert isinstance(kept, protocol.Granted)
        subscription = stalled.next_id
        stalled.next_id += 1
        stalled.send(protocol.Subscribe(subscription, []))  # every name; then it reads nothing
        beside = cycle(daemon.socket, name)  # dropped partway through
        print(f"\n{CYCLES} acquire/release cycles: {alone:.0f}/s alone, {beside:.0f}/s beside a stalled watcher")
        assert f"subscription {subscription} dropped" in daemon.log()
        messages = []
        while not isinstance(message := stalled.recv(), protocol.Error):
            messages.append(message)
        # Events came until the unread ones filled the daemon's allowance, then the notice.
        assert isinstance(messages[0], protocol.Done) and len(messages) > 1
        assert all(isinstance(m, protocol.Event) and m.id == subscription for m in messages[1:])
        assert (message.id, message.code) == (subscription, protocol.ErrorCode.LIMIT)
        assert "subscribe again" in message.message
        # The notice was the last word about it, and the connection and its lease go on.
        with lockd_client.connect(daemon.socket) as c:
            c.acquire(name).release()
            c.status()
        reply = stalled.request(protocol.Status(stalled.next_id, [f"{name}.kept"]))
        assert isinstance(reply, protocol.StatusReply)
        assert [h.token for lock in reply.locks for h in lock.holders] == kept.tokens


SEND_TIMEOUT = 0.5


def test_a_watcher_that_never_reads_keeps_its_connection_and_lease_past_the_send_timeout(
    short_tmp: Path, name: str,
) -> None:
    # Events waiting for a reader that does not read are not replies: the send timeout, which
    # cuts a client off with its leases, runs only while replies wait.
    config = short_tmp / "lockd.toml"
    config.write_text(f"[limits]\nsend_timeout = {SEND_TIMEOUT}\n")
    d = Daemon(short_tmp, "--config", str(config))
    d.start()
    try:
        with RawClient(d.socket) as stalled, lockd_client.connect(d.socket) as other:
            kept = stalled.acquire(f"{name}.kept")
            assert isinstance(kept, protocol.Granted)
            subscription = stalled.next_id
            stalled.next_id += 1
            stalled.send(protocol.Subscribe(subscription, []))  # then it reads nothing

            def dropped() -> bool:
                for _ in range(100):
                    other.acquire(name).release()
                return f"subscription {subscription} dropped" in d.log()

            wait_until(dropped, "the stalled subscription dropped", WAIT, show=d.log)
            until = time.monotonic() + 4 * SEND_TIMEOUT
            while time.monotonic() < until:  # events keep coming, well past the send timeout
                other.acquire(name).release()
            (lock,) = other.status(f"{name}.kept")
            assert [holder.token for holder in lock.holders] == kept.tokens
            assert "did not read its replies" not in d.log()
            messages = []
            while not isinstance(message := stalled.recv(), protocol.Error):
                messages.append(message)
            assert isinstance(messages[0], protocol.Done)
            assert all(isinstance(m, protocol.Event) and m.id == subscription for m in messages[1:])
            assert (message.id, message.code) == (subscription, protocol.ErrorCode.LIMIT)
            reply = stalled.request(protocol.Status(stalled.next_id, [f"{name}.kept"]))
            assert isinstance(reply, protocol.StatusReply) and reply.locks[0].holders[0].token == kept.tokens[0]
    finally:
        d.kill()


def test_closing_the_client_ends_the_iteration_cleanly(lockd: Daemon, name: str) -> None:
    c = lockd_client.connect(lockd.socket)
    events = c.events(name)
    c.close()
    assert list(events) == []


def test_a_subscription_this_client_drops_is_released_with_its_next_request(
    lockd: Daemon, name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("lockd_client._connection.MAX_UNREAD_EVENTS", 2)
    with lockd_client.connect(lockd.socket) as c, lockd_client.connect(lockd.socket) as other:
        events = c.events(name)
        for _ in range(2):
            other.acquire(name).release()
        other.status()
        c.status()  # reads the events: the third drops the subscription here
        with pytest.raises(lockd_client.SubscriptionDropped):
            list(events)
        c.status()  # carries the Release: the daemon sends no more for it
        other.acquire(name).release()
        other.status()
        assert c._conn.has_unsent is False and c.status(name) == []


async def test_trio_events_are_an_async_context_manager(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        async with trio_client.connect(lockd.socket) as c:
            async with await c.events(name) as events:
                async with trio_client.connect(lockd.socket) as other:
                    await (await other.acquire(name)).release()
                assert [(await events.__anext__()).event for _ in range(2)] == ["granted", "released"]
            assert [event async for event in events] == []  # ended by leaving the block


async def test_trio_closing_the_client_ends_the_iteration_cleanly(lockd: Daemon, name: str) -> None:
    with trio.fail_after(WAIT):
        c = await trio_client.connect(lockd.socket)
        async with c:
            events = await c.events(name)
        assert [event async for event in events] == []
