"""Counting semaphores through a real daemon and the client library: slots, FIFO, refusals."""

from __future__ import annotations

import os

import lockd_client
import pytest
from lockd_client import errors, protocol

from .conftest import Daemon
from .rawclient import RawClient
from .waiting import wait_until


def test_at_most_n_holders_then_the_next_in_line(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b, \
            lockd_client.connect(lockd.socket) as c:
        first = a.acquire(name, slots=2)
        second = b.acquire(name, slots=2)
        with pytest.raises(errors.LockBusy) as busy:
            c.acquire(name, slots=2, wait=False)
        assert sorted(h.token for h in busy.value.holders) == sorted([first.tokens[name], second.tokens[name]])
        assert second.tokens[name] > first.tokens[name]
        (info,) = c.status(name)
        assert (info.slots, info.mode, len(info.holders), info.waiters) == (2, "shared", 2, [])
        first.release()
        third = c.acquire(name, slots=2, timeout=5)
        assert third.tokens[name] > second.tokens[name]
        second.release()
        third.release()
        wait_until(lambda: a.status(name) == [], "the releases of other connections to be done")


def test_a_name_is_one_kind_while_in_use(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
        lease = a.acquire(name, slots=3)
        three = rf"{name} is a semaphore of 3 slots, and this request asked for "
        with pytest.raises(errors.SlotsMismatch, match=three + "a semaphore of 4 slots") as mismatch:
            b.acquire(name, slots=4)
        assert [holder.pid for holder in mismatch.value.holders] == [os.getpid()]
        with pytest.raises(errors.SlotsMismatch, match=three + "a plain lock"):
            b.acquire(name)
        lease.release()
        lock = a.acquire(name)
        with pytest.raises(errors.SlotsMismatch, match=rf"{name} is a plain lock, .*; held by pid"):
            b.acquire(name, slots=1, timeout=5)
        lock.release()
        a.acquire(name, slots=4).release()  # nobody left on it: any kind again (in order after the release)


def test_a_request_mixes_locks_and_semaphores(lockd: Daemon, name: str) -> None:
    slots, lock = f"{name}-slots", f"{name}-lock"
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
        mixed = a.acquire(lock, slots, slots={slots: 2})
        other = b.acquire(slots, slots=2, wait=False)
        with pytest.raises(errors.LockBusy):
            b.acquire(lock, wait=False)
        infos = {info.name: info for info in b.status(slots, lock)}
        assert (infos[slots].slots, infos[lock].slots, infos[lock].mode) == (2, None, "exclusive")
        mixed.release()
        other.release()


def test_the_client_checks_slots_before_sending(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as client:
        for slots in (0, protocol.MAX_SLOTS + 1, True, 2.5):
            with pytest.raises(errors.InvalidArgument, match="whole number"):
                client.acquire(name, slots=slots)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match="does not name"):
            client.acquire(name, slots={"other": 2})
        with pytest.raises(errors.InvalidArgument, match="a slot has no mode"):
            client.acquire(name, slots=2, shared=True)
        assert client.status(name) == []


def test_the_daemon_refuses_slots_for_names_not_asked_for(lockd: Daemon, name: str) -> None:
    with RawClient(lockd.socket) as raw:
        reply = raw.request(protocol.Acquire(1, [name], slots={"other": 2}))
        assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.PROTOCOL
        assert "does not name" in reply.message
        granted = raw.request(protocol.Acquire(2, [name], slots={name: 2}))
        assert isinstance(granted, protocol.Granted)
