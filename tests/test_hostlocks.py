"""HostLocks: looks at the host's lock list in a worker thread, one read answering everyone
who asked while the previous read ran. The reads here are stand-ins the test holds open."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from lockd_client.protocol import Holder

from lockd.hostlocks import HostLocks

TIMEOUT = 10.0


def holder(pid: int) -> Holder:
    return Holder(pid=pid, uid=0, command=f"flock {pid}", mode="exclusive", outside=True)


class HeldOpenReads:
    """Stands in for LockFiles: each read records the names asked and waits for the test to
    let it finish; name N is held by pid N."""

    def __init__(self) -> None:
        self.reads: list[list[str]] = []
        self.started = threading.Semaphore(0)
        self.finish = threading.Semaphore(0)
        self.fail_next = False

    def outside_holders_of(self, names: list[str], every_file: bool = False) -> dict[str, list[Holder]]:
        self.reads.append(sorted(names))
        self.started.release()
        assert self.finish.acquire(timeout=TIMEOUT)
        if self.fail_next:
            self.fail_next = False
            raise OSError("the read failed")
        return {name: [holder(int(name))] for name in names}

    async def wait_started(self) -> None:
        assert await trio.to_thread.run_sync(self.started.acquire, True, TIMEOUT)


@pytest.fixture
def files() -> HeldOpenReads:
    return HeldOpenReads()


@pytest.fixture
def host(files: HeldOpenReads) -> HostLocks:
    return HostLocks(files)  # type: ignore[arg-type]


async def queue_up(nursery: trio.Nursery, ask: Callable[[str], Awaitable[None]], *names: str) -> None:
    """Ask for each of `names` in a task of its own, starting each only once the previous one
    is blocked, so that they queue in this order."""
    for name in names:
        nursery.start_soon(ask, name)
        await trio.testing.wait_all_tasks_blocked()


async def test_one_read_answers_everyone_who_asked_while_the_previous_one_ran(
    files: HeldOpenReads, host: HostLocks
) -> None:
    answers: dict[str, list[Holder]] = {}

    async def ask(*names: str) -> None:
        answers.update(await host.holders_of(list(names)))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "1")
            await files.wait_started()
            for names in (["2", "3"], ["3", "4"], ["5"]):
                nursery.start_soon(ask, *names)
            await trio.testing.wait_all_tasks_blocked()
            files.finish.release()  # the first read ends; the second starts for all three
            await files.wait_started()
            files.finish.release()
    assert files.reads == [["1"], ["2", "3", "4", "5"]]
    assert {name: [h.pid for h in found] for name, found in answers.items()} == {
        "1": [1], "2": [2], "3": [3], "4": [4], "5": [5],
    }


async def test_an_answer_comes_from_a_read_that_started_after_the_question(
    files: HeldOpenReads, host: HostLocks
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.holders_of, ["1"])
            await files.wait_started()
            late = trio.Event()

            async def ask_late() -> None:
                await host.holders_of(["1"])
                late.set()

            nursery.start_soon(ask_late)
            await trio.testing.wait_all_tasks_blocked()
            files.finish.release()
            await files.wait_started()  # the same name is read again, for the late question
            assert not late.is_set()
            files.finish.release()
    assert files.reads == [["1"], ["1"]]


async def test_a_failed_read_fails_its_reader_and_the_others_read_again(
    files: HeldOpenReads, host: HostLocks
) -> None:
    results: list[object] = []

    async def ask(name: str) -> None:
        try:
            results.append(sorted(await host.holders_of([name])))
        except OSError as exc:
            results.append(str(exc))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "1")
            await files.wait_started()
            await queue_up(nursery, ask, "2", "3")
            files.finish.release()
            await files.wait_started()  # read by the asker of 2, which came first
            files.fail_next = True
            files.finish.release()
            await files.wait_started()  # the asker of 3 reads again
            files.finish.release()
    assert files.reads == [["1"], ["2", "3"], ["2", "3"]]
    assert results == [["1"], "the read failed", ["3"]]


@pytest.mark.parametrize("while_reading", [False, True])
async def test_a_cancelled_asker_leaves_the_others_their_answer(
    files: HeldOpenReads, host: HostLocks, while_reading: bool
) -> None:
    answered: list[str] = []
    scopes: dict[str, trio.CancelScope] = {}

    async def ask(name: str) -> None:
        with trio.CancelScope() as scopes[name]:
            answered.extend(await host.holders_of([name]))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "1")
            await files.wait_started()
            await queue_up(nursery, ask, "2", "3")
            if not while_reading:
                scopes["2"].cancel()  # waiting its turn: it leaves, the asker of 3 reads
            files.finish.release()
            await files.wait_started()
            if while_reading:
                scopes["2"].cancel()  # its read goes on, and answers the asker of 3 too
                await trio.testing.wait_all_tasks_blocked()
            files.finish.release()
    assert files.reads == [["1"], ["2", "3"]]
    assert sorted(answered) == ["1", "3"]
