"""The history across a re-exec: `hand_over` parks the writer and returns what is not
written, `resume` writes it after all, and a new program started with it writes it first;
every event ends up in the database once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lockd_client.protocol import LeaseEvent

from lockd import history as history_module
from lockd.config import HistorySection
from lockd.history import HistoryStore

from .waiting import wait_until


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(tmp_path / "state", HistorySection())
    yield store
    store.stop()


@pytest.fixture
def by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that writes only when hurried (a query, `hand_over`, `stop`): what is
    recorded stays unwritten until then."""
    monkeypatch.setattr(history_module, "BATCH_DELAY", 60.0)


def event(name: str) -> LeaseEvent:
    return LeaseEvent(time.time(), "released", name, "exclusive", token=1, pid=42, uid=0)


def record(store: HistoryStore, *names: str) -> None:
    for name in names:
        store.record(event(name))


def written(path: Path) -> list[str]:
    """The names of the events in the database, in the order written; read beside the
    store, without hurrying its writer."""
    with sqlite3.connect(path) as db:
        names = [name for (name,) in db.execute("SELECT name FROM events ORDER BY id")]
    db.close()
    return names


def flush(store: HistoryStore) -> None:
    store.read([], None, None, 1, None)  # once the writer has written what came before


def writing(store: HistoryStore, events: int) -> None:
    """Wait until the writer has taken `events` from its queue, for a write (or to fail one)."""
    wait_until(lambda: store._queue.qsize() == 0 and store.backlog == events, "the writer at its batch")


@contextmanager
def write_lock(path: Path) -> Iterator[Callable[[], None]]:
    """Hold the database's write lock from another connection until the function given is
    called (or the block ends): a write meanwhile waits for it (the store's busy wait is
    longer)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield lambda: blocker.execute("COMMIT") if blocker.in_transaction else None
    finally:
        if blocker.in_transaction:
            blocker.execute("COMMIT")
        blocker.close()


def test_hand_over_returns_what_is_unwritten_in_order_and_nothing_is_written_after(
    store: HistoryStore, by_hand: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.start()
    record(store, "a", "b")
    flush(store)
    record(store, "c", "d", "e")
    assert [e.name for e in store.hand_over()] == ["c", "d", "e"]
    record(store, "f")  # recorded after: not the hand-over's, and not written while parked either
    assert store.backlog == 4
    # A query hurries the writer, which stays parked: the query waits for nothing written.
    monkeypatch.setattr(history_module, "FLUSH_WAIT", 0.2)
    assert [e.name for e in store.read([], None, None, 10, None)[0]] == ["a", "b"]
    assert written(store.path) == ["a", "b"]


def test_resume_writes_them_first_and_each_once(store: HistoryStore, by_hand: None) -> None:
    store.start()
    record(store, "a")
    flush(store)
    record(store, "b", "c")
    assert [e.name for e in store.hand_over()] == ["b", "c"]
    record(store, "d")
    store.resume()
    record(store, "e")
    flush(store)
    assert written(store.path) == ["a", "b", "c", "d", "e"]
    # Once more: a writer resumed can be handed over again.
    record(store, "f")
    assert [e.name for e in store.hand_over()] == ["f"]
    store.stop()  # the exec did not happen: what was handed over is written
    assert written(store.path) == ["a", "b", "c", "d", "e", "f"]


def test_a_hand_over_waits_for_the_batch_being_written(store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "BUSY_WAIT", 30.0)  # the write waits out the lock, whatever the load
    store.start()
    flush(store)  # and its first look for expired events: it does not hold up the next write
    with write_lock(store.path) as release, ThreadPoolExecutor(1) as pool:
        record(store, "a", "b")
        writing(store, 2)
        record(store, "c")
        handed = pool.submit(store.hand_over)
        wait_until(lambda: store._queue.qsize() == 2, "the hand-over's marker queued after c")
        time.sleep(0.2)
        assert not handed.done()  # waiting for the write, which waits for the lock
        release()
        assert [e.name for e in handed.result(timeout=10)] == ["c"]
    assert written(store.path) == ["a", "b"]
    store.resume()
    flush(store)
    assert written(store.path) == ["a", "b", "c"]


def test_a_hand_over_that_gives_up_leaves_the_writer_as_it_was(
    store: HistoryStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(history_module, "BUSY_WAIT", 30.0)
    store.start()
    flush(store)  # and its first look for expired events: it does not hold up the next write
    with write_lock(store.path) as release, ThreadPoolExecutor(1) as pool:
        record(store, "a")
        writing(store, 1)
        monkeypatch.setattr(history_module, "HAND_OVER_WAIT", 0.1)
        with pytest.raises(TimeoutError, match="did not get to a pause"):
            store.hand_over()
        record(store, "b")
        # A hand-over again, while the writer is still at "a": it passes the marker of the
        # one that gave up by, and parks at this one's, after "b".
        monkeypatch.setattr(history_module, "HAND_OVER_WAIT", 10.0)
        handed = pool.submit(store.hand_over)
        wait_until(lambda: store._queue.qsize() == 3, "the second hand-over's marker queued")
        release()
        assert [e.name for e in handed.result(timeout=10)] == ["b"]
    assert written(store.path) == ["a"]
    store.resume()
    flush(store)
    assert written(store.path) == ["a", "b"]


class _SlowDeletes(sqlite3.Connection):
    """A connection on a slow disk, for retention: each DELETE takes a while."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("DELETE"):
            time.sleep(0.02)
        return super().execute(sql, *args)


def test_a_hand_over_stops_retention_between_two_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    kept = HistoryStore(state, HistorySection(max_age=100 * 365 * 86400.0))
    kept.start()
    for i in range(200):
        kept.record(LeaseEvent(1.0, "released", f"old{i}", "exclusive", token=1, pid=42, uid=0))
    kept.stop()
    # Then expired, and deleted one per transaction, a few seconds' work in all.
    monkeypatch.setattr(history_module, "PRUNE_CHUNK", 1)
    monkeypatch.setattr(sqlite3, "connect", partial(sqlite3.connect, factory=_SlowDeletes))
    store = HistoryStore(state, HistorySection())
    store.start()
    try:
        wait_until(lambda: len(written(store.path)) < 195, "retention under way")
        record(store, "a")
        started = time.monotonic()
        assert [e.name for e in store.hand_over()] == ["a"]
        assert time.monotonic() - started < 1.0  # rather than the seconds retention has to go
        left = len(written(store.path))
        time.sleep(0.2)
        assert len(written(store.path)) == left > 0
        store.resume()
        wait_until(lambda: written(store.path) == ["a"], "retention done, and the event written")
    finally:
        store.stop()


# Run as `python SCRIPT STATE_DIR old`: records, hands over, and execs itself as
# `python SCRIPT STATE_DIR new EVENTS_JSON`, which starts a store with the events handed over
# before it records its own.
EXEC_SCRIPT = """
import os, sys, time, msgspec
from pathlib import Path
from lockd import history
from lockd.config import HistorySection
from lockd_client.protocol import LeaseEvent

state, phase = Path(sys.argv[1]), sys.argv[2]
store = history.HistoryStore(state, HistorySection())

def record(*names):
    for name in names:
        store.record(LeaseEvent(time.time(), "released", name, "exclusive", token=1, pid=42, uid=0))

if phase == "old":
    history.BATCH_DELAY = 60.0  # written when hurried only
    store.start()
    record(*(f"old{i}" for i in range(50)))
    store.read([], None, None, 1, None)
    record(*(f"old{i}" for i in range(50, 80)))
    handed = store.hand_over()
    print(os.getpid(), len(handed), flush=True)
    events = msgspec.json.encode(handed).decode()
    os.execv(sys.executable, [sys.executable, sys.argv[0], str(state), "new", events])
else:
    # The exec closed every descriptor of the database's files and of its lock.
    left = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            left.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own
            pass
    assert not [path for path in left if path.startswith(str(state))], left
    store.start(backlog=msgspec.json.decode(sys.argv[3], type=list[LeaseEvent]))
    record("new0", "new1")
    store.stop()
    print(os.getpid(), flush=True)
"""


def test_a_new_program_started_with_the_hand_over_writes_every_event_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    script = tmp_path / "reexec.py"
    script.write_text(EXEC_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(state), "old"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning: nothing left unwritten, no trouble with the database
    old_pid, handed, new_pid = done.stdout.split()
    assert old_pid == new_pid  # one process, two programs
    assert int(handed) == 30
    assert written(state / history_module.FILE_NAME) == [f"old{i}" for i in range(80)] + ["new0", "new1"]
