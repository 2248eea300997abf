"""The history of lease events against a real daemon: what `lockctl history` shows for every
kind of event, across a restart, under retention, for other users, when the database cannot
be written, and the same events in the journal."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from lockd_client import blocking, errors, protocol, trio_client
from lockd_client.cli import history_table
from lockd_client.protocol import Acquire, History, HistoryReply, LeaseEvent

from lockd.journal import journal_entry

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


def test_a_burst_is_written_without_a_drop(short_tmp: Path, name: str) -> None:
    d = start(short_tmp)
    try:
        with blocking.connect(d.socket) as client:
            for _ in range(5000):
                client.acquire(name).release()
            assert len(client.history(name, limit=100_000)) == 10_000
        assert "dropping events" not in d.log()
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
        blocker.rmdir()

        def written() -> list[dict] | None:
            done = lockctl(d, "history", "--json", name)
            return json.loads(done.stdout)["events"] if done.returncode == 0 else None

        events = wait_until(written, "the events kept in memory written", timeout=15)
        assert kinds(events) == ["granted", "released"]
        assert "history: writing to" in d.log()
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


def test_a_value_with_a_newline_is_sent_with_its_length() -> None:
    event = LeaseEvent(1.0, "lost", "a", "exclusive", token=7, reason="two\nlines")
    fields = _fields(journal_entry(event, "4"))
    assert fields["LOCKD_REASON"] == "two\nlines" and fields["PRIORITY"] == "4" and fields["LOCKD_TOKEN"] == "7"


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
