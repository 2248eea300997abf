"""The history of lease events against a real daemon: what `lockctl history` shows for every
kind of event, across a restart, under retention, for other users, when the database cannot
be written, and the same events in the journal."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import queue
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
import trio
from lockd_client import blocking, errors, protocol, trio_client
from lockd_client.cli import _when, history_table
from lockd_client.protocol import Acquire, History, HistoryReply, LeaseEvent

from lockd import history as history_module
from lockd.config import HistorySection
from lockd.history import HistoryInUse, HistoryStore
from lockd.journal import EventLog, journal_entry

from .conftest import Daemon
from .rawclient import RawClient
from .test_cli import LOCKCTL, lockctl
from .test_security import NOBODY, Actor, start_shared
from .waiting import wait_until

CONFIG = """
[limits]
break_grace = 0.5

[[policy.rules]]
names = "forbidden*"
allow = false
"""


def start(root: Path, config: str = CONFIG, daemon_env: dict[str, str] | None = None) -> Daemon:
    (root / "lockd.toml").write_text(config)
    d = Daemon(root, "--config", str(root / "lockd.toml"), daemon_env=daemon_env)
    d.start()
    return d


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = start(short_tmp)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


def history(d: Daemon, *args: str) -> list[dict]:
    """`lockctl history --json ARGS`' events."""
    done = lockctl(d, "history", "--json", "--limit", "100000", *args)
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout)["events"]
    assert all(set(event) == set(LeaseEvent.__struct_fields__) for event in events), events
    return events


def kinds(events: list[dict]) -> list[str]:
    return [event["event"] for event in events]


# --- every kind of event ------------------------------------------------------------------------


def test_cmds_exit_status_is_kept_with_its_release(daemon: Daemon, name: str) -> None:
    before = time.time()
    done = lockctl(daemon, "acquire", "--label", "nightly", name, "--", "sh", "-c", "exit 3")
    assert done.returncode == 3, done.stderr
    granted, released = history(daemon, name)
    assert (granted["event"], released["event"]) == ("granted", "released")
    assert granted["token"] == released["token"] is not None
    assert before <= granted["time"] <= released["time"] <= time.time()
    for event in (granted, released):
        assert event["name"] == name and event["mode"] == "exclusive" and event["slots"] is None
        assert (event["uid"], event["user"], event["label"]) == (0, "root", "nightly")
        assert "lockd_client.cli acquire" in event["command"] and event["pid"] > 0
    assert granted["waited"] >= 0 and granted["held"] is None and granted["exit_status"] is None
    assert released["held"] >= 0 and released["waited"] is None
    assert (released["exit_status"], released["reason"]) == (3, None)
    assert (granted["cause"], released["cause"]) == (None, "requested")
    # The plain log line of each, without systemd.
    assert f"{name} released exclusive pid {released['pid']} uid 0" in daemon.log()
    assert "exit status 3" in daemon.log()


def test_death_by_signal_is_128_plus_n(daemon: Daemon, name: str) -> None:
    done = lockctl(daemon, "acquire", name, "--", "sh", "-c", "kill -TERM $$")
    assert done.returncode == 128 + 15
    assert history(daemon, name)[-1]["exit_status"] == 128 + 15


def test_an_exit_status_beyond_a_byte_is_refused_before_it_is_sent(daemon: Daemon, name: str) -> None:
    with blocking.connect(daemon.socket) as client:
        lease = client.acquire(name)
        for bad in (256, -1, 2**63, True):
            with pytest.raises(errors.InvalidArgument, match="0 to 255"):
                lease.release(exit_status=bad)
        assert not lease.lost and client.status(name)[0].holders  # still held
        lease.release(exit_status=255)

    async def main() -> None:
        async with trio_client.connect(daemon.socket) as client:
            lease = await client.acquire(name)
            with pytest.raises(errors.InvalidArgument, match="0 to 255"):
                await lease.release(exit_status=2**63)
            await lease.release(exit_status=0)

    trio.run(main)
    with RawClient(daemon.socket) as raw:  # what no client library sends: the daemon refuses it
        assert isinstance(raw.acquire(name), protocol.Granted)
        raw.send(protocol.Release(1, exit_status=2**63))
        reply = raw.recv()
        assert isinstance(reply, protocol.Error) and reply.code == "protocol" and reply.id is None, reply
    events = wait_until(lambda: len(e := history(daemon, name)) == 6 and e, "the third lease's end")
    assert [e["exit_status"] for e in events if e["event"] == "released"] == [255, 0, None]


def test_refusals_say_why(daemon: Daemon, name: str) -> None:
    with blocking.connect(daemon.socket) as client, client.lock(name):
        assert lockctl(daemon, "acquire", "-n", name, "--", "true").returncode == 75
        assert lockctl(daemon, "acquire", "-w", "0.2", name, "--", "true").returncode == 75
    assert lockctl(daemon, "acquire", f"forbidden-{name}", "--", "true").returncode == 77
    busy, timeout = history(daemon, name)[1:3]
    assert [busy["reason"], timeout["reason"]] == ["busy", "timeout"]
    assert busy["token"] is None and timeout["waited"] > 0
    (denied,) = history(daemon, f"forbidden-{name}")
    assert (denied["event"], denied["reason"], denied["token"]) == ("refused", "permission_denied", None)
    assert [busy["cause"], timeout["cause"], denied["cause"]] == ["busy", "timeout", "permission_denied"]


def test_a_broken_lease_that_is_not_let_go_is_lost(daemon: Daemon, name: str) -> None:
    holder = RawClient(daemon.socket)
    assert isinstance(holder.acquire(name), protocol.Granted)
    assert lockctl(daemon, "release", "--force", name).returncode == 0
    assert isinstance(holder.recv(), protocol.Lost)  # and it never says it let go
    events = wait_until(lambda: len(e := history(daemon, name)) == 3 and e, "the broken lease's end")
    assert kinds(events) == ["granted", "broken", "lost"]
    assert events[1]["reason"].startswith("forcibly released by uid 0")
    assert "break_grace" in events[2]["reason"] and events[2]["held"] >= 0.5
    assert [event["cause"] for event in events] == [None, "forced", "overdue"]
    holder.close()


def test_a_broken_lease_let_go_is_released_and_a_vanished_holder_too(daemon: Daemon, name: str) -> None:
    with blocking.connect(daemon.socket) as client:
        lease = client.acquire(name)
        assert lockctl(daemon, "release", "--force", name).returncode == 0
        wait_until(lambda: lease.lost, "the lease seen lost")
        lease.release()
    holder = RawClient(daemon.socket)
    assert isinstance(holder.acquire(name), protocol.Granted)
    holder.close()  # without releasing
    events = wait_until(lambda: len(e := history(daemon, name)) == 5 and e, "both leases' ends")
    assert kinds(events) == ["granted", "broken", "released", "granted", "released"]
    assert events[2]["reason"] is None
    assert events[4]["reason"] == "its client went away without releasing it"
    assert [event["cause"] for event in events] == [None, "forced", "requested", None, "client_gone"]


def test_a_stop_ends_every_lease_s_story(daemon: Daemon, name: str) -> None:
    # A lease of a connection and one tied to a process: on flock both outlive the daemon,
    # through their holders' descriptors, and their stories end with the daemon's.
    holder = RawClient(daemon.socket)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert isinstance(holder.acquire(f"{name}.conn"), protocol.Granted)
        assert isinstance(holder.acquire(f"{name}.proc", pid=sleeper.pid), protocol.Granted)
        assert daemon.stop() == 0
        daemon.start()
        ends = {
            (event["name"], event["event"], event["cause"])
            for event in history(daemon, f"{name}.conn", f"{name}.proc") if event["event"] != "granted"
        }
        assert ends == {(f"{name}.conn", "released", "daemon_stopped"), (f"{name}.proc", "released", "daemon_stopped")}
    finally:
        sleeper.kill()
        sleeper.wait()
        holder.close()


def test_several_names_and_slots(daemon: Daemon, name: str) -> None:
    with blocking.connect(daemon.socket) as client:
        client.acquire(f"{name}-a", f"{name}-b", slots={f"{name}-b": 3}).release()
    a, b = history(daemon, f"{name}-a"), history(daemon, f"{name}-b")
    assert kinds(a) == kinds(b) == ["granted", "released"]
    assert (a[0]["slots"], b[0]["slots"]) == (None, 3)
    assert history(daemon, f"{name}-a", f"{name}-b") == sorted(a + b, key=lambda e: e["time"])


# --- queries ------------------------------------------------------------------------------------


def test_since_until_and_limit_pick_the_latest_in_range(daemon: Daemon, name: str) -> None:
    with blocking.connect(daemon.socket) as client:
        for _ in range(3):
            client.acquire(name).release()
        times = [event.time for event in client.history(name)]
        assert len(times) == 6 and times == sorted(times)
        assert [e.time for e in client.history(name, limit=2)] == times[-2:]
        assert [e.time for e in client.history(name, since=times[2], until=times[4])] == times[2:4]
        assert client.history(name, since=times[-1] + 1) == []
        with pytest.raises(errors.InvalidArgument, match="since .* is after until"):
            client.history(name, since=2.0, until=1.0)
    assert [e["time"] for e in history(daemon, name, "--since", str(times[2]), "--limit", "1")] == times[-1:]
    assert lockctl(daemon, "history", name, "--since", "1h").stdout.count(name) == 6
    empty = lockctl(daemon, "history", name, "--until", "2000-01-01")
    assert (empty.returncode, empty.stdout) == (0, f"no event recorded on {name} in that time\n")


def test_the_trio_client_reads_it_too(daemon: Daemon, name: str) -> None:
    async def main() -> list[LeaseEvent]:
        async with trio_client.connect(daemon.socket) as client:
            async with client.lock(name):
                pass
            return await client.history(name)

    assert kinds([{"event": e.event} for e in trio.run(main)]) == ["granted", "released"]


def test_bad_history_requests_are_refused_and_cost_nothing(daemon: Daemon, name: str) -> None:
    with RawClient(daemon.socket) as raw:
        for request, code in [
            (History(1, ["../etc"]), "invalid_name"),
            (History(2, [name], since=float("nan")), "protocol"),
            (History(3, [name], until=float("inf")), "protocol"),
            (History(4, [name], since=2.0, until=1.0), "protocol"),
        ]:
            reply = raw.request(request)
            assert isinstance(reply, protocol.Error) and reply.code == code, reply
        assert isinstance(raw.acquire(name), protocol.Granted)


def test_history_off_is_said_clearly(short_tmp: Path, name: str) -> None:
    d = start(short_tmp, CONFIG + "\n[history]\nenabled = false\n")
    try:
        done = lockctl(d, "history", name)
        assert done.returncode == 76 and "keeps no history" in done.stderr and "[history] enabled" in done.stderr
        with RawClient(d.socket) as raw:
            reply = raw.request(History(1, [name]))
        assert isinstance(reply, protocol.Error) and reply.code == "unavailable", reply
        assert "history is off in the daemon's config ([history] enabled)" in reply.message
        assert not (d.state_dir / "history.sqlite3").exists()
    finally:
        d.stop()


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin")
def test_when_reads_dates_and_times() -> None:
    from datetime import datetime, timezone

    def utc(*fields: int) -> float:
        return datetime(*fields, tzinfo=timezone.utc).timestamp()

    assert _when("1765000000") == 1765000000.0 and _when("0") == 0.0 and _when("12345678.5") == 12345678.5
    # Eight digits are a date in ISO 8601's basic form, not a Unix time in 1970.
    assert _when("20261206") == _when("2026-12-06") == utc(2026, 12, 5, 23)
    assert _when("20261206T0310") == utc(2026, 12, 6, 2, 10)
    with pytest.raises(argparse.ArgumentTypeError, match="8 digits are read as YYYYMMDD"):
        _when("20261306")
    # Local time across DST changes: a repeated time is the first, a skipped one the clock before.
    assert _when("2026-10-25T02:30") == utc(2026, 10, 25, 0, 30)
    assert _when("2026-03-29T02:30") == utc(2026, 3, 29, 1, 30)
    assert _when("2026-03-29T02:30+00:00") == utc(2026, 3, 29, 2, 30)
    with pytest.raises(argparse.ArgumentTypeError, match="is not a time"):
        _when("yesterday")


def test_table_fits_a_terminal() -> None:
    event = LeaseEvent(1765000000.0, "refused", "site.com", "exclusive", pid=42, uid=0, user="root",
                       command="lockctl acquire -w 2 site.com -- ./restore.sh", waited=2.0, reason="timeout")
    lines = history_table([event], 80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    header, _, row, detail = lines
    assert header.startswith("TIME ") and " refused " in row and "root" in row
    assert detail == "    timeout: lockctl acquire -w 2 site.com -- ./restore.sh"
    wide = history_table([event], None).splitlines()
    assert len(wide) == 2 and wide[1].endswith(" timeout: lockctl acquire -w 2 site.com -- ./restore.sh")


# --- durability and retention ---------------------------------------------------------------


def test_history_survives_a_restart_and_a_stop_writes_what_is_queued(daemon: Daemon, name: str) -> None:
    assert lockctl(daemon, "acquire", name, "--", "true").returncode == 0
    before = history(daemon, name)
    daemon.restart()  # SIGKILL: what was written is there
    assert history(daemon, name) == before
    with blocking.connect(daemon.socket) as client:
        client.acquire(name).release()
    assert daemon.stop() == 0  # graceful: the writer writes what was recorded
    with sqlite3.connect(daemon.state_dir / "history.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM events WHERE name = ?", (name,)).fetchone() == (4,)
    daemon.start()
    assert kinds(history(daemon, name)) == ["granted", "released"] * 2


def test_events_older_than_max_age_are_deleted(short_tmp: Path, name: str) -> None:
    d = start(short_tmp, "[history]\nmax_age = 1.5\n")
    try:
        assert lockctl(d, "acquire", f"{name}-old", "--", "true").returncode == 0
        assert len(history(d, f"{name}-old")) == 2
        wait_until(lambda: not history(d, f"{name}-old"), "the old events deleted")
        assert lockctl(d, "acquire", f"{name}-new", "--", "true").returncode == 0
        assert len(history(d, f"{name}-new")) == 2
    finally:
        d.stop()


def test_the_oldest_events_go_when_the_file_is_too_large(short_tmp: Path, name: str) -> None:
    limit = 64 * 1024
    d = start(short_tmp, f"[history]\nmax_size = {limit}\n")
    path = d.state_dir / "history.sqlite3"
    try:
        with blocking.connect(d.socket) as client:
            for _ in range(1500):
                client.acquire(name, label="x" * 100).release()
            events = client.history(name, limit=100_000)
        assert 0 < len(events) < 3000 and events[-1].event == "released"

        def size() -> int:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                return db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]

        assert size() <= limit, d.log()[-3000:]
        wait_until(lambda: path.stat().st_size <= limit, "the file shrunk", show=lambda: path.stat().st_size)
    finally:
        d.stop()


def test_a_burst_is_written_without_a_drop_and_read_a_page_at_a_time(short_tmp: Path, name: str) -> None:
    d = start(short_tmp)
    try:
        with blocking.connect(d.socket) as client:
            for _ in range(5000):
                client.acquire(name, label="x" * 200).release()
            events = client.history(name, limit=100_000)
            assert len(events) == 10_000 and [e.event for e in events] == ["granted", "released"] * 5000
        assert "dropping events" not in d.log()
        with RawClient(d.socket) as raw:
            pages: list[list[LeaseEvent]] = []
            before = None
            while True:
                raw.send(History(len(pages) + 1, [name], limit=100_000, before=before))
                reply = raw.recv()
                assert isinstance(reply, HistoryReply), reply
                assert len(msgspec.msgpack.encode(reply)) <= history_module.REPLY_BYTES + 1024
                pages.insert(0, reply.events)
                if reply.more is None:
                    break
                before = reply.more
        assert len(pages) >= 3 and [e for page in pages for e in page] == events
        shown = lockctl(d, "history", "--json", "--limit", "9999", name)
        assert json.loads(shown.stdout) == {"events": [msgspec.to_builtins(e) for e in events[1:]], "more": True}
        assert "showing the latest 9999 events; earlier ones match too" in shown.stderr
        shown = lockctl(d, "history", "--json", "--limit", "10000", name)
        assert json.loads(shown.stdout)["more"] is False and len(json.loads(shown.stdout)["events"]) == 10_000
        assert shown.stderr == ""
    finally:
        d.stop()


# --- a database that cannot be used --------------------------------------------------------------


def test_an_unwritable_history_costs_no_lease_and_is_written_later(short_tmp: Path, name: str) -> None:
    blocker = short_tmp / "state" / "history.sqlite3"
    blocker.mkdir(parents=True)  # where the file should be: no write can succeed, even as root
    d = start(short_tmp)
    try:
        assert lockctl(d, "acquire", name, "--", "true").returncode == 0
        wait_until(lambda: "history: cannot write to" in d.log(), "a warning", show=d.log)
        done = lockctl(d, "history", name)
        assert done.returncode == 69 and "cannot read its history" in done.stderr
        assert "history: writing to" not in d.log()  # the writer has been through the query's marker
        blocker.rmdir()

        def written() -> list[dict] | None:
            done = lockctl(d, "history", "--json", name)
            return json.loads(done.stdout)["events"] if done.returncode == 0 else None

        events = wait_until(written, "the events kept in memory written", timeout=15)
        assert kinds(events) == ["granted", "released"]
        assert d.log().count("history: writing to") == 1
    finally:
        d.stop()


#: The first schema's table, without `cause`.
SCHEMA_1 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, event TEXT NOT NULL, name TEXT NOT NULL, mode TEXT NOT NULL,
    slots INTEGER, token INTEGER, pid INTEGER, uid INTEGER, user TEXT, command TEXT NOT NULL, label TEXT,
    waited REAL, held REAL, reason TEXT, exit_status INTEGER
);
PRAGMA user_version = 1;
"""


def test_a_history_of_the_first_schema_is_migrated(short_tmp: Path, name: str) -> None:
    state = short_tmp / "state"
    state.mkdir()
    with sqlite3.connect(state / "history.sqlite3") as db:
        db.executescript(SCHEMA_1)
        db.execute(
            "INSERT INTO events (time, event, name, mode, token, command) VALUES (?, 'granted', ?, 'exclusive', 1, '')",
            (time.time() - 10, name),
        )
    db.close()
    d = start(short_tmp)
    try:
        assert lockctl(d, "acquire", name, "--", "true").returncode == 0
        events = history(d, name)
        assert [(event["event"], event["cause"]) for event in events] == [
            ("granted", None), ("granted", None), ("released", "requested"),
        ]
        assert not list(state.glob("history.sqlite3.unusable-*")) and "migrated to schema version 2" in d.log()
    finally:
        d.stop()


def test_a_corrupt_file_is_moved_aside(short_tmp: Path, name: str) -> None:
    state = short_tmp / "state"
    state.mkdir()
    (state / "history.sqlite3").write_bytes(b"not a database" * 1000)
    d = start(short_tmp)
    try:
        assert lockctl(d, "acquire", name, "--", "true").returncode == 0
        assert kinds(history(d, name)) == ["granted", "released"]
        (aside,) = state.glob("history.sqlite3.unusable-*")
        assert aside.read_bytes().startswith(b"not a database")
        assert f"moved it to {aside}" in d.log()
    finally:
        d.stop()


# --- the writer, in this process ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(tmp_path / "state", HistorySection())
    yield store
    store.stop()


def event(name: str, **fields: object) -> LeaseEvent:
    return LeaseEvent(time.time(), "released", name, "exclusive", token=1, pid=42, uid=0, **fields)  # type: ignore[arg-type]


def test_an_event_sqlite_cannot_store_costs_only_itself(store: HistoryStore, caplog: pytest.LogCaptureFixture) -> None:
    store.start()
    store.record(event("before"))
    store.record(event("bad", exit_status=2**63))  # as a daemon without Release's range check took it
    store.record(event("after", exit_status=0))
    assert [e.name for e in store.read([], None, None, 100, None)[0]] == ["before", "after"]
    assert store.dropped == 1
    store.record(event("bad", exit_status=-(2**64)))
    store.record(event("later"))
    assert [e.name for e in store.read([], None, None, 100, None)[0]] == ["before", "after", "later"]
    assert store.dropped == 2
    lines = [r.getMessage() for r in caplog.records if "cannot be stored" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 events" in lines[0], lines  # the second within the minute: counted
    assert not any(r.exc_info for r in caplog.records)


def test_a_row_refused_midway_through_a_batch_costs_only_itself(store: HistoryStore) -> None:
    # SQLite refuses this one as it writes it (NOT NULL), in the batch's second statement: what
    # the first wrote is undone with it, and each of the others written once, in order.
    recorded = [event(f"n{i}", user="someone") for i in range(history_module.ROWS_PER_INSERT + 10)]
    bad = history_module.ROWS_PER_INSERT + 5
    recorded[bad] = event("bad", command=None)
    store.start()
    for e in recorded:
        store.record(e)
    written, more = store.read([], None, None, len(recorded), None)
    assert more is None and written == recorded[:bad] + recorded[bad + 1:]
    assert store.dropped == 1


def test_a_batch_of_any_size_is_written_by_a_few_statements_of_a_fixed_set() -> None:
    # Every count of events is written in order by INSERTs of the prepared few, each size
    # below the full one at most once: the connection keeps no statement per count.
    for events in range(3 * history_module.ROWS_PER_INSERT):
        rows = list(history_module._statement_rows(events))
        assert sum(rows) == events and set(rows) <= history_module._INSERTS.keys(), (events, rows)
        rest = [r for r in rows if r != history_module.ROWS_PER_INSERT]
        assert rows == sorted(rows, reverse=True) and len(rest) == len(set(rest)), (events, rows)


@pytest.fixture
def writers_connection(store: HistoryStore) -> Iterator[sqlite3.Connection]:
    """The connection the writer thread would write with (`start` opens it so)."""
    conn = store._open()
    yield conn
    conn.close()
    store._unlock()


class Statements:
    """A connection that notes each statement run on it as written, with its count of values
    (SQLite's trace callback shows a statement with its values in)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.run: list[tuple[str, int]] = []

    def execute(self, sql: str, parameters: Sequence[object] = ()) -> sqlite3.Cursor:
        self.run.append((sql, len(parameters)))
        return self.conn.execute(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction


def test_a_batch_of_any_size_is_one_transaction_of_a_few_prepared_inserts(
    store: HistoryStore, writers_connection: sqlite3.Connection
) -> None:
    # An INSERT out of step with the values it is given fails, and the batch is then written
    # again a row per statement (as after a row SQLite refuses): every event still stored,
    # nothing logged, only slower. And a statement per count of rows left over would keep as
    # many prepared: 3 MB of the daemon's memory.
    full = history_module.ROWS_PER_INSERT
    width = len(LeaseEvent.__struct_fields__)
    statements = Statements(writers_connection)
    written: list[LeaseEvent] = []
    texts: set[str] = set()
    for size in [*range(1, 2 * full + 1), 1000, 4321, 10_000]:
        batch = [event(f"n{len(written) + i}") for i in range(size)]
        statements.run.clear()
        store._write(statements, batch)  # type: ignore[arg-type]
        written += batch
        begin, *inserts, commit = statements.run
        assert begin == ("BEGIN IMMEDIATE", 0) and commit == ("COMMIT", 0), (size, statements.run)
        assert sum(values for _, values in inserts) == size * width, (size, statements.run)
        assert len(inserts) <= size // full + full.bit_length(), (size, statements.run)
        texts.update(sql for sql, _ in inserts)
    assert texts <= set(history_module._INSERTS.values()) and len(texts) <= full.bit_length() + 1, len(texts)
    names = [name for name, in writers_connection.execute("SELECT name FROM events ORDER BY id")]
    assert names == [e.name for e in written]
    assert store.dropped == 0


def test_the_writers_page_cache_is_capped(writers_connection: sqlite3.Connection) -> None:
    # SQLite's default (about 2 MB) would be the daemon's memory for as long as it runs.
    size = writers_connection.execute("PRAGMA cache_size").fetchone()[0]
    assert size == -history_module.PAGE_CACHE_KIB


def test_pages_part_at_events_of_the_same_time_without_a_gap_or_a_repeat(store: HistoryStore) -> None:
    store.start()
    # Many events of one instant (a release granting many shared waiters at once), more
    # than one page holds.
    same = time.time()
    recorded = [
        LeaseEvent(same, "granted", f"n{i}", "shared", token=i, uid=0, user="root", label="x" * 256)
        for i in range(2 * history_module.REPLY_BYTES // 300)
    ]
    for e in recorded:
        store.record(e)
    pages, before = [], None
    while True:
        events, more = store.read([], None, None, 100_000, None, before)
        assert 0 < len(msgspec.msgpack.encode(events)) <= history_module.REPLY_BYTES
        pages.insert(0, events)
        if more is None:
            break
        before = more
    assert len(pages) >= 2 and [e for page in pages for e in page] == recorded
    # The limit counts across pages, and the reply says when it left some out.
    events, more = store.read([], None, None, 10, None)
    assert events == recorded[-10:] and more is not None
    assert store.read([], None, None, 10, None, more)[0] == recorded[-20:-10]
    assert store.read(["n0", "n1"], None, None, 2, None) == (recorded[:2], None)


def test_a_bug_in_the_writer_is_logged_once_a_minute(
    store: HistoryStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def bug(uid: int | None) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "_user", bug)
    monkeypatch.setattr(history_module, "RETRY", 0.0)
    store.start()
    for _ in range(3):
        store.record(event("kept"))
        assert store.read([], None, None, 100, None) == ([], None)  # once the writer has tried again
    bugs = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None, bugs


class _CountedQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """Counts the writer's waits for work."""

    gets = 0

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        self.gets += 1
        return super().get(block, timeout)


def test_a_failing_writer_waits_for_its_retry_and_says_nothing_about_recovering(
    store: HistoryStore, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "lockd")
    store.path.mkdir(parents=True)  # where the file should be: no open can succeed
    counted = store._queue = _CountedQueue()
    store.start()
    store.record(event("kept"))
    with pytest.raises(errors.DaemonUnavailable, match="cannot read its history"):
        store.read([], None, None, 100, None)  # once the writer has been through its queue
    assert store.backlog == 1
    time.sleep(0.5)  # a writer that spun instead of waiting for its retry would wake thousands of times
    assert counted.gets < 10
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot write to" in m for m in messages), messages
    assert not any("history: writing to" in m for m in messages), messages  # nothing was written


def test_a_second_store_leaves_a_history_in_use_alone(store: HistoryStore, tmp_path: Path) -> None:
    store.start()
    store.record(event("kept"))
    assert len(store.read([], None, None, 10, None)[0]) == 1
    with pytest.raises(HistoryInUse, match="in use by another process .*its own state_dir"):
        HistoryStore(tmp_path / "state", HistorySection()).start()
    store.stop()
    again = HistoryStore(tmp_path / "state", HistorySection())  # once the first let go
    again.start()
    try:
        assert [e.name for e in again.read([], None, None, 10, None)[0]] == ["kept"]
    finally:
        again.stop()


def test_lockd_does_not_start_on_a_history_another_process_holds(short_tmp: Path) -> None:
    state = short_tmp / "state"
    state.mkdir()
    (state / "history.sqlite3").write_bytes(b"not a database" * 1000)  # but someone else's business
    with open(state / "history.sqlite3.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        d = Daemon(short_tmp, "--config", "/dev/null")
        with pytest.raises(RuntimeError, match="lockd exited with 1"):
            d.start()
    assert "is in use by another process" in d.log()
    assert (state / "history.sqlite3").read_bytes().startswith(b"not a database")
    assert list(state.glob("*unusable*")) == []


@pytest.mark.parametrize("make", [
    "CREATE TABLE events (x); CREATE TABLE other (y);",  # another program's, at user_version 0
    f"CREATE TABLE events (x); PRAGMA user_version = {history_module.SCHEMA_VERSION + 1};",
])
def test_a_database_of_another_schema_is_moved_aside_under_a_name_of_its_own(
    tmp_path: Path, make: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(history_module.time, "strftime", lambda *args: "20261206T031000")  # one second
    state = tmp_path / "state"
    for i in range(3):
        with sqlite3.connect(state / "history.sqlite3" if state.exists() else _made(state)) as db:
            db.executescript(make)
        db.close()
        store = HistoryStore(state, HistorySection())
        store.start()
        store.record(event(f"new{i}"))
        assert [e.name for e in store.read([], None, None, 10, None)[0]] == [f"new{i}"]
        store.stop()
        (state / "history.sqlite3").unlink()
    asides = sorted(path.name for path in state.glob("history.sqlite3.unusable-*") if not path.name.endswith("-wal"))
    assert asides == [f"history.sqlite3.unusable-20261206T031000{n}" for n in ("", "-2", "-3")]


def _made(state: Path) -> Path:
    state.mkdir()
    return state / "history.sqlite3"


def test_events_beyond_the_backlog_are_dropped_counted_and_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store = HistoryStore(tmp_path / "state", HistorySection(max_backlog=10))
    store.path.mkdir(parents=True)  # no write can succeed: events wait in memory
    try:
        for i in range(25):  # before the writer takes any
            store.record(event(f"n{i}"))
        assert store.dropped == 15 and store.backlog == 10
        store.start()
        drops = [r.getMessage() for r in caplog.records if "dropping events" in r.getMessage()]
        assert drops == ["history: the writer is 10 events behind; dropping events (1 so far) until it catches up"]
    finally:
        store.stop(0)


# --- other users ----------------------------------------------------------------------------------


@pytest.mark.parametrize("readers", [None, '["root", "nobody"]'])
def test_each_user_reads_their_own_events_unless_policy_says(short_tmp: Path, name: str, readers: str | None) -> None:
    d = start_shared(short_tmp, None if readers is None else f"[policy]\nread_events = {readers}\n")
    actor = Actor(NOBODY, NOBODY)
    try:
        with blocking.connect(d.socket) as client:
            client.acquire(f"{name}-root").release()
        actor.connect("c", d.socket)
        assert isinstance(actor.do("c", "request", Acquire(1, [f"{name}-nobody"])), protocol.Granted)
        actor.do("c", "send", protocol.Release(1))
        reply = actor.do("c", "request", History(2))
        assert isinstance(reply, HistoryReply), reply
        seen = {(event.name, event.uid) for event in reply.events}
        theirs = {(f"{name}-nobody", NOBODY)}
        assert seen == (theirs if readers is None else theirs | {(f"{name}-root", 0)})
        with blocking.connect(d.socket) as client:  # root reads everyone's
            assert {(e.name, e.uid) for e in client.history()} == theirs | {(f"{name}-root", 0)}
    finally:
        actor.close()
        d.stop()


# --- the journal --------------------------------------------------------------------------------


def test_events_go_to_the_journal_with_their_fields(short_tmp: Path, name: str) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(short_tmp / "journal.sock"))
    journal.settimeout(10)
    log = short_tmp / "lockd.log"
    log.touch()
    st = log.stat()  # the daemon's stderr: as if systemd had connected it to the journal
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "LOCKD_JOURNAL_SOCKET": str(short_tmp / "journal.sock")}
    d = start(short_tmp, daemon_env=env)
    try:
        done = subprocess.run([*LOCKCTL, "acquire", name, "--", "sh", "-c", "exit 5"], env=d.env, timeout=10)
        assert done.returncode == 5
        granted, released = (_fields(journal.recv(65536)) for _ in range(2))
    finally:
        d.stop()
        journal.close()
    assert granted["LOCKD_EVENT"] == "granted" and released["LOCKD_EVENT"] == "released"
    for fields in (granted, released):
        assert fields["LOCKD_NAME"] == name and fields["SYSLOG_IDENTIFIER"] == "lockd"
        assert fields["PRIORITY"] == "6" and fields["LOCKD_UID"] == "0" and int(fields["LOCKD_PID"]) > 0
        assert fields["LOCKD_TOKEN"].isdigit() and fields["MESSAGE"].startswith(f"{name} {fields['LOCKD_EVENT']}")
    assert released["LOCKD_EXIT_STATUS"] == "5" and "LOCKD_EXIT_STATUS" not in granted
    assert float(released["LOCKD_HELD"]) >= 0 and "LOCKD_REASON" not in released
    # In the journal, not on stderr as well.
    assert f"{name} granted" not in d.log() and "<6>lockd" in d.log()


def test_plain_event_lines_are_a_debug_trace_without_refusals(short_tmp: Path, name: str) -> None:
    (short_tmp / "lockd.toml").write_text(CONFIG)
    d = Daemon(short_tmp, "--config", str(short_tmp / "lockd.toml"), "--log-level", "info")
    d.start()
    try:
        with blocking.connect(d.socket) as client, client.lock(name):
            for _ in range(20):  # refusals any client can cause at will
                with pytest.raises(errors.LockBusy):
                    client.acquire(name, timeout=0)
        with blocking.connect(d.socket) as client:
            with pytest.raises(errors.PermissionDenied):
                client.acquire(f"forbidden-{name}")
            assert len(client.history(name)) == 22  # recorded all the same
    finally:
        d.stop()
    assert name not in d.log().replace(f"forbidden-{name}", "")  # not a line per event at info
    d.extra_args.remove("info")
    d.extra_args.remove("--log-level")  # the fixtures' debug
    d.start()
    try:
        with blocking.connect(d.socket) as client, client.lock(name):
            with pytest.raises(errors.LockBusy):
                client.acquire(name, timeout=0)
    finally:
        d.stop()
    assert f"{name} granted exclusive" in d.log() and f"{name} released exclusive" in d.log()
    assert f"{name} refused" not in d.log()


def test_a_value_with_a_newline_is_sent_with_its_length() -> None:
    event = LeaseEvent(1.0, "lost", "a", "exclusive", token=7, reason="two\nlines")
    fields = _fields(journal_entry(event, "4"))
    assert fields["LOCKD_REASON"] == "two\nlines" and fields["PRIORITY"] == "4" and fields["LOCKD_TOKEN"] == "7"


@pytest.fixture
def journal_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, "lockd")  # where lockd sends its events to the journal
    return caplog


def test_a_journal_that_does_not_keep_up_loses_entries_counted_and_said(
    tmp_path: Path, journal_log: pytest.LogCaptureFixture,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(tmp_path / "journal.sock"))  # and never read
        with EventLog(str(tmp_path / "journal.sock")) as events:
            for i in range(5000):
                events.record(event(f"n{i}"))
            assert events.dropped > 0
    warnings = [r.getMessage() for r in journal_log.records]
    assert len(warnings) == 1 and "the journal does not keep up with lease events: 1 dropped" in warnings[0]


def test_without_a_journal_to_take_them_events_are_plain_lines(
    tmp_path: Path, journal_log: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "journal.sock"
    with EventLog(str(path)) as events:
        events.record(event("first"))
        events.record(LeaseEvent(1.0, "refused", "denied", "exclusive", reason="busy"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
            journal.bind(str(path))
            journal.settimeout(10)
            events.record(event("second"))  # the journal is there now
            assert _fields(journal.recv(65536))["LOCKD_NAME"] == "second"
        events.record(event("third"))  # gone again: a socket nobody reads
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
            path.unlink()
            journal.bind(str(path))  # the journal restarted, with a new socket
            journal.settimeout(10)
            events.record(event("fourth"))
            assert _fields(journal.recv(65536))["LOCKD_NAME"] == "fourth"
        assert events.dropped == 0
    lines = [r.getMessage() for r in journal_log.records]
    assert "first released exclusive pid 42 uid 0 token 1" in lines and not any("denied" in line for line in lines)
    assert "third released exclusive pid 42 uid 0 token 1" in lines
    assert sum("logging them as plain lines" in line for line in lines) == 1, lines


def _fields(datagram: bytes) -> dict[str, str]:
    """Parse the journal's native protocol."""
    fields: dict[str, str] = {}
    while datagram:
        line, _, rest = datagram.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            datagram = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, datagram = rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests' own lockctl runs must not think they run under systemd.
    for var in ("JOURNAL_STREAM", "INVOCATION_ID", "LOCKD_JOURNAL_SOCKET"):
        monkeypatch.delenv(var, raising=False)
