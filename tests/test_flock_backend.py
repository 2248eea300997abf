"""FlockBackend under trio, against real flock(1) processes on the same lock files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from lockd_client.errors import DaemonUnavailable

from lockd.backend import Backend, Blocked, Claim
from lockd.flock.backend import FlockBackend
from lockd.flock.tokens import BLOCK, TokenStore
from lockd.lockfiles import LockFiles

from .flock_tools import can_flock, claim, kill, make_lock_dir, open_fds, outside_flock


def ignore_blocked(holders: list) -> None:
    """Tests that do not care whom a take waits for."""


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return make_lock_dir(tmp_path)


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[TokenStore]:
    store = TokenStore.open(tmp_path / "state")
    yield store
    store.close()


@pytest.fixture
def backend(lock_dir: Path, tokens: TokenStore) -> Iterator[FlockBackend]:
    files = LockFiles(lock_dir)
    yield FlockBackend(files, tokens)
    files.close()


def no_loss(ticket: Claim, reason: str) -> None:
    raise AssertionError(f"the flock backend lost {ticket}: {reason}")


def test_it_is_a_backend(backend: FlockBackend) -> None:
    typed: Backend = backend
    assert typed.name == "flock"


def test_take_now_holds_the_files_and_issues_increasing_tokens(backend: FlockBackend, lock_dir: Path) -> None:
    first, second = claim("b", "a"), claim("c")
    tokens = backend.take_now(first)
    assert tokens is not None and tokens[0] < tokens[1]
    [later] = backend.take_now(second) or []
    assert later > tokens[1]
    assert not can_flock(lock_dir / "a.lock") and not can_flock(lock_dir / "b.lock")
    backend.drop(first, unlock=True)
    backend.drop(first, unlock=True)
    assert can_flock(lock_dir / "a.lock") and can_flock(lock_dir / "b.lock")


async def test_take_now_is_none_while_held_outside(backend: FlockBackend, lock_dir: Path) -> None:
    with outside_flock(lock_dir / "b.lock") as proc:
        assert backend.take_now(claim("a", "b")) is None
        assert [h.pid for h in (await backend.outside_holders_of(["b"])).get("b", [])] == [proc.pid]
    assert can_flock(lock_dir / "a.lock")


def test_a_failed_token_write_releases_the_files(
    backend: FlockBackend, tokens: TokenStore, tmp_path: Path, lock_dir: Path
) -> None:
    for _ in range(BLOCK):  # use up the block the store opened with
        tokens.next()
    (tmp_path / "state" / "tokens.tmp").mkdir()  # the next mark cannot be written
    with pytest.raises(DaemonUnavailable):
        backend.take_now(claim("a"))
    assert can_flock(lock_dir / "a.lock")


async def test_take_waits_for_the_outside_holder_and_follows_its_exit(backend: FlockBackend, lock_dir: Path) -> None:
    t = claim("a", "b")
    got: list[list[int]] = []
    taken = trio.Event()

    async def take() -> None:
        got.append(await backend.take(t, ignore_blocked))
        taken.set()

    with trio.fail_after(10), outside_flock(lock_dir / "b.lock") as proc:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run, no_loss)
            nursery.start_soon(take)
            await trio.sleep(0.1)  # several polls
            assert not got
            assert can_flock(lock_dir / "a.lock")  # nothing half-held while waiting
            kill(proc)
            with trio.fail_after(2):  # ~one poll interval is expected; this is generous
                await taken.wait()
            nursery.cancel_scope.cancel()
    assert len(got[0]) == 2
    assert not can_flock(lock_dir / "a.lock") and not can_flock(lock_dir / "b.lock")
    backend.drop(t, unlock=True)
    assert can_flock(lock_dir / "b.lock")


async def test_many_takes_waiting_on_one_name_cost_one_attempt_per_retry(
    backend: FlockBackend, lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0
    try_lock = LockFiles.try_lock

    def counted(files: LockFiles, t: Claim) -> bool:
        nonlocal attempts
        attempts += 1
        return try_lock(files, t)

    monkeypatch.setattr(LockFiles, "try_lock", counted)
    readers = [claim("a", shared=True) for _ in range(200)]
    granted: list[Claim] = []
    all_granted = trio.Event()

    async def take(t: Claim) -> None:
        await backend.take(t, ignore_blocked)
        granted.append(t)
        if len(granted) == len(readers):
            all_granted.set()

    with trio.fail_after(10), outside_flock(lock_dir / "a.lock") as proc:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run, no_loss)
            for t in readers:
                nursery.start_soon(take, t)
            await trio.sleep(0.5)
            # Each take tried once on its own; then retries of the one name, a few per 0.1 s.
            assert not granted and attempts < len(readers) + 30, attempts
            kill(proc)
            await all_granted.wait()
            nursery.cancel_scope.cancel()
    assert not can_flock(lock_dir / "a.lock", shared=False)
    for t in readers:
        backend.drop(t, unlock=True)
    assert can_flock(lock_dir / "a.lock")


async def test_take_without_wait_is_blocked_and_holds_nothing(backend: FlockBackend, lock_dir: Path) -> None:
    with trio.fail_after(10):
        with outside_flock(lock_dir / "b.lock"):
            with pytest.raises(Blocked, match="held by a process outside lockd"):
                await backend.take(claim("a", "b", wait=False), ignore_blocked)
        assert can_flock(lock_dir / "a.lock") and can_flock(lock_dir / "b.lock")


async def test_a_cancelled_take_holds_nothing(backend: FlockBackend, lock_dir: Path) -> None:
    before = open_fds()
    with trio.fail_after(10):
        with outside_flock(lock_dir / "b.lock"):
            with trio.move_on_after(0.1) as scope:
                await backend.take(claim("a", "b"), ignore_blocked)
            assert scope.cancelled_caught
        assert can_flock(lock_dir / "a.lock") and can_flock(lock_dir / "b.lock")
    assert open_fds() == before


async def test_a_take_cancelled_before_it_starts_takes_nothing(backend: FlockBackend, lock_dir: Path) -> None:
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await backend.take(claim("a"), ignore_blocked)
        assert scope.cancelled_caught
        assert can_flock(lock_dir / "a.lock")


async def test_run_only_ends_by_cancellation(backend: FlockBackend) -> None:
    with trio.move_on_after(0.05) as scope:
        await backend.run(no_loss)
    assert scope.cancelled_caught


async def test_a_waiting_take_says_whom_it_waits_for_and_a_free_one_says_nothing(
    backend: FlockBackend, lock_dir: Path
) -> None:
    told: list[list[int | None]] = []
    with trio.fail_after(10):
        await backend.take(claim("free"), lambda holders: told.append([h.pid for h in holders]))
        assert told == []
        with outside_flock(lock_dir / "b.lock") as proc:
            with trio.move_on_after(0.1):
                await backend.take(claim("a", "b"), lambda holders: told.append([h.pid for h in holders]))
        assert told == [[proc.pid]]
