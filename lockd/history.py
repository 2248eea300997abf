"""The history of lease events: every event the service records, kept in SQLite in the
state directory and read back by `lockctl history`.

Invariants:
- The event loop never waits for the database: `record` only appends to a queue, or, when
  the writer is `max_backlog` events behind, drops the event and counts it (`dropped`), with
  a warning at most once a minute. Everything else happens in the one writer thread, which
  `start` starts and `stop` ends (after writing what was recorded before it), or in the
  thread that runs a query (`read`).
- The writer writes the events in the order recorded, in batches of whatever has queued up
  within BATCH_DELAY of the first, one transaction each. A write that fails (a full or
  read-only disk, a database locked by someone else) is logged at most once a minute and
  retried, with what came meanwhile, no sooner than RETRY seconds later; a database of an
  older schema is migrated in place (`_MIGRATIONS`, one transaction each); a file that is not
  a database of this schema or an older one, or a corrupt one, is moved aside (logged) and a
  new one started. An event SQLite cannot store is dropped and counted (`dropped`), never
  retried. Nothing about the database reaches the leases, and no trouble, however lasting,
  is logged more than once a minute.
- What is recorded is in the file at most BATCH_DELAY later while the disk keeps up: a
  killed daemon (SIGKILL, a crash) loses those events and the backlog; `stop` writes them.
- Across a re-exec every event is written once, by one program or the other: `hand_over`
  parks the writer between two transactions (one under way is committed first) and returns
  what was recorded and not written, in order; the store writes nothing more until `resume`
  (the exec failed), which writes them first. The new program gives them to `start`, which
  queues them before anything it records. The exec closes the database's descriptors and
  the lock file's (all O_CLOEXEC), and the writer thread is gone with the old program.
- Retention: the writer deletes the events older than `max_age`, within a quarter of it
  (at most a minute) of their expiry, and the oldest events while the database is larger
  than `max_size`, and hands the freed pages back to the file system (incremental vacuum).
- A query answers with every event recorded before it was asked, once written (it waits up
  to FLUSH_WAIT for the writer to get to them), and only with those of the uid it is given
  (None: every user's): the latest of them, as many as fit in REPLY_BYTES, with a cursor
  that the next page starts from (then without waiting for the writer).
- Starting a store registers an adapter for None with the sqlite3 module (`_adapt_none`),
  for the whole process, every connection of every module: SQLite binds NULL as before, but
  sooner (binding a None took 320-470 ns without it, 150-190 with it, on CPython 3.11), and
  an event has six or so. Registering it again changes nothing.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import math
import os
import pwd
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec
from lockd_client import errors, protocol

from .config import HistorySection
from .logs import Occasional

log = logging.getLogger("lockd")

FILE_NAME: Final = "history.sqlite3"
#: Beside the database: the daemon that holds an flock on it owns the database's files.
LOCK_NAME: Final = f"{FILE_NAME}.lock"
#: The schema's version, kept in PRAGMA user_version (0: a new, empty database).
SCHEMA_VERSION: Final = 2
_SCHEMA: Final = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    slots INTEGER,
    token INTEGER,
    pid INTEGER,
    uid INTEGER,
    user TEXT,
    command TEXT NOT NULL,
    label TEXT,
    waited REAL,
    held REAL,
    reason TEXT,
    exit_status INTEGER,
    cause TEXT
);
CREATE INDEX events_by_time ON events (time);
CREATE INDEX events_by_name ON events (name, time);
CREATE INDEX events_by_uid ON events (uid, time);
"""
#: What brings a database of each older version to the next: version 2 added `cause` (the
#: events before it have none).
_MIGRATIONS: Final = {1: "ALTER TABLE events ADD COLUMN cause TEXT;"}
#: The columns of an event, in the order of LeaseEvent's fields.
_FIELDS: Final = protocol.LeaseEvent.__struct_fields__
_COLUMNS: Final = ", ".join(_FIELDS)
_WIDTH: Final = len(_FIELDS)
#: Where the user name and the uid are among an event's values.
_USER: Final = _FIELDS.index("user")
_UID: Final = _FIELDS.index("uid")
#: Rows one INSERT statement writes: SQLite gives the interpreter's lock back to the event
#: loop around each statement it runs, so a batch written a row per statement took it back
#: as many times, each a handoff between the threads. As many rows as stay within the 999
#: parameters every SQLite takes.
ROWS_PER_INSERT: Final = 999 // _WIDTH


def _insert(rows: int) -> str:
    """An INSERT of `rows` events. One of several is OR ROLLBACK: a row that fails then rolls
    back the transaction, as `_write` would, and SQLite keeps no journal of the statement
    alone. By default (OR ABORT) a statement of several rows keeps one, to undo just itself,
    in a temporary file: every page it changes is copied there first, a write() each, and a
    batch's statements change the same few pages over and over (10 writes per 1 of the
    database's, 2 to 3 µs an event in all). One of a single row stays OR ABORT: `_write`
    falls back to those after a refused row, and goes on with the next row in the same
    transaction, which OR ROLLBACK would have ended with every row before it."""
    row = f"({', '.join('?' for _ in _FIELDS)})"
    verb = "INSERT OR ROLLBACK" if rows > 1 else "INSERT"
    return f"{verb} INTO events ({_COLUMNS}) VALUES {', '.join([row] * rows)}"


#: The INSERTs a batch is written with, by their rows: ROWS_PER_INSERT, and the powers of two
#: below it for the rest (`_statement_rows`). SQLite keeps every statement prepared (the
#: connection's cache), and one of many rows is large: one for every count of rows a batch
#: left over came to 3 MB of the daemon's memory once all 61 had come, these to about 0.1.
_INSERTS: Final = {
    rows: _insert(rows) for rows in (ROWS_PER_INSERT, *(1 << k for k in range(ROWS_PER_INSERT.bit_length())))
}
_INSERT_ONE: Final = _INSERTS[1]


def _statement_rows(events: int) -> Iterator[int]:
    """The rows of each INSERT that writes `events` events, all of `_INSERTS`: as many full
    ones as fit, then the rest by the bits of its count, each a power of two."""
    full, rest = divmod(events, ROWS_PER_INSERT)
    yield from itertools.repeat(ROWS_PER_INSERT, full)
    for k in reversed(range(rest.bit_length())):
        if rest >> k & 1:
            yield 1 << k

#: The adapter `_adapt_none` registers: it returns None, bound as NULL, by the lookup of an
#: empty dict, a call in C.
_NONE_TO_NONE: Final[dict[None, None]] = {}


def _adapt_none() -> None:
    """Register an adapter for None with the sqlite3 module, for the whole process.

    For each None it binds, the module looks for an adapter before binding NULL: a tuple
    built, a dict looked up, two attributes looked for in vain, with the interpreter's lock
    held. One registered for None is found at the first step."""
    sqlite3.register_adapter(type(None), _NONE_TO_NONE.get)


#: Once an event comes, the writer waits this long for more before it writes them all: the
#: event loop then only appends to a queue nobody waits on (a writer woken for every event
#: would cost each a wakeup, and take the interpreter's lock from the loop as often).
BATCH_DELAY: Final = 0.25
#: Seconds between tries to write after a write failed.
RETRY: Final = 5.0
#: How long a query waits for the writer to have written what was recorded before it.
FLUSH_WAIT: Final = 2.0
#: The most bytes of events one reply holds (encoded): a reply is built and sent on the
#: event loop, and must stay far below what a client may leave unread (session.MAX_OUTBOX).
#: The rest of a larger answer is read page by page (`History.before`).
REPLY_BYTES: Final = 1024 * 1024
#: How long `stop` waits for the writer to write what is left.
STOP_WAIT: Final = 5.0
#: How long `hand_over` waits for the writer to finish the transaction under way: longer
#: than one takes while the disk keeps up (BUSY_WAIT, then a full backlog's rows).
HAND_OVER_WAIT: Final = 3.0
#: How long a statement waits for a database locked by another process (sqlite3's timeout).
BUSY_WAIT: Final = 1.0
#: Retention deletes at most this many events per transaction, so writes go on between them.
PRUNE_CHUNK: Final = 10_000
#: Over `max_size`, the oldest events are deleted in rounds, each aiming at this share of it
#: (so that the next writes do not start it again at once), until it is within `max_size`.
SIZE_TARGET: Final = 0.9
#: SQLite's cache of the writer's pages, in KiB (its default is about 2,000), which is the
#: daemon's memory for as long as it runs. Below this, a W2-like flood cost the writer a
#: third more CPU per event (256 KiB: the pages a batch changes no longer fit, and go out and
#: back in mid-transaction); above it, no clear gain (µs an event: 3.84 here, 3.56-3.74 at
#: 1 MiB, 3.76-4.17 at the default).
PAGE_CACHE_KIB: Final = 512
#: The write-ahead log is cut back to this size after each checkpoint.
WAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
#: Lasting trouble is logged at most once in this many seconds.
WARN_INTERVAL: Final = 60.0
_CORRUPT: Final = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
#: The database's files: itself, its write-ahead log, and the log's index.
_SUFFIXES: Final = ("", "-wal", "-shm")
#: What an INSERT raises for a row SQLite cannot store, rather than for the database: an
#: integer beyond 64 bits, a value of a type it has no column type for, a string too long.
_BAD_ROW: Final = (
    OverflowError, TypeError, ValueError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
    sqlite3.ProgrammingError,
)


class _Stop:
    """What `stop` queues: the writer writes what came before it, then ends."""


_STOP: Final = _Stop()


class _HandOver(_Stop):
    """What `hand_over` queues: the writer takes nothing after it and parks, with what it
    has not written, until `resume`. A kind of _Stop so that an event costs the writer no
    test more than it did."""

    def __init__(self) -> None:
        #: Set by the writer once parked, with `unwritten` filled in.
        self.parked = threading.Event()
        self.unwritten: list[protocol.LeaseEvent] = []
        self.resumed = threading.Event()


class _Unusable(Exception):
    """The file is a database, but not one of this schema: it is moved aside."""


class HistoryInUse(errors.LockdError):
    """Another process holds the history's lock: another lockd with the same state directory."""


class HistoryStore:
    """The history database of one daemon: `record` (the server's observer), `read` (in a
    worker thread), and the writer thread between `start` and `stop`."""

    def __init__(self, state_dir: Path, section: HistorySection) -> None:
        self.path = state_dir / FILE_NAME
        self.lock_path = state_dir / LOCK_NAME
        #: The lock file, flocked, from the first open of the database until `stop`.
        self._lock_fd: int | None = None
        self._max_age = section.max_age
        self._max_size = section.max_size
        self._max_backlog = section.max_backlog
        #: How often expired events are looked for: soon enough after their expiry.
        self._prune_interval = min(60.0, section.max_age / 4)
        self._queue: queue.SimpleQueue[protocol.LeaseEvent | threading.Event | _Stop] = queue.SimpleQueue()
        #: The hand-over under way, from `hand_over` until `resume`: the writer parks at it,
        #: and retention stops between two transactions for it.
        self._handing_over: _HandOver | None = None
        #: Held by the writer while it parks, and by `hand_over` while it gives up: never both.
        self._hand_over_lock = threading.Lock()
        #: Events the writer has taken from the queue and not yet written (the writer's count).
        self._unwritten = 0
        #: Events dropped because the writer was `max_backlog` behind (on the event loop).
        self._overflowed = 0
        #: Events dropped because SQLite could not store them (in the writer).
        self._rejected = 0
        self._drop_warning = Occasional(WARN_INTERVAL)
        self._trouble = Occasional(WARN_INTERVAL)
        self._bad_rows = Occasional(WARN_INTERVAL)
        self._bug = Occasional(WARN_INTERVAL)
        self._failing = False
        self._users: dict[int, str | None] = {}
        self._thread: threading.Thread | None = None
        #: Set to have the writer write what is queued without waiting out BATCH_DELAY.
        self._hurry = threading.Event()

    # --- on the event loop ----------------------------------------------------------------------

    def record(self, event: protocol.LeaseEvent) -> None:
        """Queue `event` for the writer; never blocks or raises (a server observer)."""
        if self._queue.qsize() + self._unwritten >= self._max_backlog:
            self._overflowed += 1
            self._drop_warning.warn(
                "history: the writer is %d events behind; dropping events (%d so far) until it catches up",
                self._max_backlog, self._overflowed,
            )
            return
        self._queue.put(event)

    @property
    def backlog(self) -> int:
        """Events recorded and not yet written."""
        return self._queue.qsize() + self._unwritten

    @property
    def dropped(self) -> int:
        """Events recorded and never to be written: the writer was `max_backlog` behind, or
        SQLite could not store them."""
        return self._overflowed + self._rejected

    # --- lifetime -------------------------------------------------------------------------------

    def start(self, backlog: Iterable[protocol.LeaseEvent] = ()) -> None:
        """Open the database and start the writer thread, with `backlog` (what the program
        before this one after a re-exec handed over, `hand_over`) first in its queue. Before
        serving, so that the daemon's files are in place when the first client comes. Raises
        HistoryInUse if another process holds the database's lock (lockd must not start: two
        daemons would write, prune and move aside each other's database); another problem is
        logged, and the writer tries again, never raised."""
        assert self._thread is None, "started twice"
        _adapt_none()
        for event in backlog:
            self._queue.put(event)
        conn = None
        try:
            conn = self._open()
        except HistoryInUse:
            self._unlock()
            raise
        except (sqlite3.Error, OSError, _Unusable) as exc:
            self._failed(exc)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="lockd-history", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """Have the writer write what was recorded so far and end; wait up to `timeout` for
        it. A writer still at work then is left to die with the process (logged). One parked
        by `hand_over` goes on first: the exec it was for did not happen."""
        if self._thread is None:
            return
        if self._handing_over is not None:
            self.resume()
        self._queue.put(_STOP)
        self._hurry.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "history: the writer did not finish within %g s; %d events may not be written", timeout, self.backlog
            )
        else:
            self._unlock()

    def hand_over(self) -> list[protocol.LeaseEvent]:
        """Park the writer between two transactions and return the events recorded and not
        written, in order; the store then writes nothing until `resume`. For a re-exec, just
        before it: the new program gives them to `start`. Blocks until the writer gets there,
        at most one transaction's write (retention stops between two). Raises TimeoutError if
        it has not within HAND_OVER_WAIT (a disk that hangs): the store then goes on as if
        nothing happened, and the exec must not."""
        assert self._thread is not None and self._handing_over is None, "a writer to hand over, once"
        hand_over = self._handing_over = _HandOver()
        self._queue.put(hand_over)
        self._hurry.set()
        if not hand_over.parked.wait(HAND_OVER_WAIT):
            with self._hand_over_lock:
                if not hand_over.parked.is_set():
                    self._handing_over = None  # the writer passes its marker by
                    raise TimeoutError(
                        f"the history's writer did not get to a pause within {HAND_OVER_WAIT:g} s (a slow disk?)"
                    )
        return hand_over.unwritten

    def flush(self) -> bool:
        """Wait until what was recorded before the call is written, at most FLUSH_WAIT;
        whether it was. Blocks: run it in a worker thread."""
        written = threading.Event()
        self._queue.put(written)
        self._hurry.set()
        return written.wait(FLUSH_WAIT)

    def resume(self) -> None:
        """After `hand_over`, when the exec failed: the writer goes on, and writes what it
        returned first."""
        hand_over = self._handing_over
        assert hand_over is not None and hand_over.parked.is_set(), "resume() only after hand_over()"
        self._handing_over = None
        hand_over.resumed.set()

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection | None) -> None:
        pending: list[protocol.LeaseEvent] = []
        retry_at = prune_at = time.monotonic()
        stopping = False
        while not stopping:
            # After a failure nothing is tried before retry_at, whatever comes meanwhile.
            due = retry_at if pending else max(retry_at, prune_at)
            markers: list[threading.Event] = []
            try:
                item = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None:
                self._hurry.wait(BATCH_DELAY)
                self._hurry.clear()
            while item is not None:
                if isinstance(item, _Stop):
                    if isinstance(item, _HandOver):
                        self._park(item, pending)
                    else:
                        stopping = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    pending.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._unwritten = len(pending)
            now = time.monotonic()
            if now >= retry_at or stopping:
                try:
                    if conn is None:
                        conn = self._open()
                    if pending:
                        self._write(conn, pending)
                        pending.clear()
                        if self._failing:
                            self._failing = False
                            log.info("history: writing to %s again", self.path)
                    if (now >= prune_at or self._size(conn) > self._max_size) and self._prune(conn):
                        prune_at = now + self._prune_interval
                except (sqlite3.Error, OSError, _Unusable, HistoryInUse) as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    retry_at = now if self._failed(exc) else now + RETRY
                except Exception:  # a bug: logged, and the writer carries on
                    self._bug.warn("history: internal error in the writer; retrying in %g s", RETRY, exc_info=True)
                    retry_at = now + RETRY
            self._unwritten = len(pending)
            for marker in markers:
                marker.set()  # whether written or not: a query waits for no retry
        if pending:
            log.warning("history: %d events could not be written to %s before lockd stopped", len(pending), self.path)
        if conn is not None:
            conn.close()

    def _park(self, hand_over: _HandOver, pending: list[protocol.LeaseEvent]) -> None:
        """At `hand_over`'s marker: hand `pending` over and wait for `resume`, unless
        `hand_over` gave up waiting (then the marker means nothing)."""
        with self._hand_over_lock:
            if hand_over is not self._handing_over:
                return
            self._unwritten = len(pending)
            hand_over.unwritten = list(pending)
            hand_over.parked.set()
        hand_over.resumed.wait()

    def _lock(self) -> None:
        """Take the lock beside the database, for as long as this store lives: only its
        holder opens, writes, prunes or moves aside the database's files. Raises
        HistoryInUse if another process holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HistoryInUse(
                f"the history in {self.path.parent} is in use by another process ({self.lock_path} is locked): "
                "another lockd with this state_dir? Give each daemon its own state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock()
        # Other users' commands are no one else's business: SQLite gives the -wal and -shm
        # files the mode of the database file.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        # Opened by `start`, then used by the writer thread alone.
        conn = sqlite3.connect(self.path, timeout=BUSY_WAIT, isolation_level=None, check_same_thread=False)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise _Unusable("it holds tables, but not of a lockd history")
            if version == 0:
                # auto_vacuum must be chosen before the first table, WAL outside a transaction.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            elif version in _MIGRATIONS:
                while version != SCHEMA_VERSION:
                    conn.executescript(f"BEGIN; {_MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;")
                    version += 1
                log.info("history: %s migrated to schema version %d", self.path, version)
            elif version != SCHEMA_VERSION:
                raise _Unusable(f"its schema is version {version}, and this lockd writes version {SCHEMA_VERSION}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(self, conn: sqlite3.Connection, events: list[protocol.LeaseEvent]) -> None:
        """Write `events` in one transaction. Those SQLite cannot store (a number beyond 64
        bits, say) are dropped and counted, so that they cannot hold up the others forever."""
        try:
            with _transaction(conn):
                start = 0
                for rows in _statement_rows(len(events)):
                    conn.execute(_INSERTS[rows], self._values(events[start:start + rows]))
                    start += rows
            return
        except _BAD_ROW:
            pass
        bad: list[BaseException] = []
        with _transaction(conn):
            for event in events:
                try:
                    conn.execute(_INSERT_ONE, self._values([event]))
                except _BAD_ROW as exc:
                    bad.append(exc)
        if bad:
            self._rejected += len(bad)
            self._bad_rows.warn(
                "history: dropped %d events that cannot be stored (%s); %d so far", len(bad), bad[0], self._rejected,
            )

    def _values(self, events: list[protocol.LeaseEvent]) -> list[Any]:
        """The values of `events` one after the other, each event's in the columns' order, as
        an INSERT takes them: made in C, but for the user names (cached: `_user`). Made a
        statement at a time: a whole batch's, thousands of events, would make the writer's
        memory grow by as much, and keep it."""
        values: list[Any] = list(itertools.chain.from_iterable(map(msgspec.structs.astuple, events)))
        cached, user = self._users.get, self._user
        names, uids = values[_USER::_WIDTH], values[_UID::_WIDTH]
        values[_USER::_WIDTH] = [name or cached(uid) or user(uid) for name, uid in zip(names, uids, strict=True)]
        return values

    def _user(self, uid: int | None) -> str | None:
        if uid is None:
            return None
        try:
            return self._users[uid]
        except KeyError:
            pass
        try:
            name: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
        self._users[uid] = name
        return name

    @staticmethod
    def _size(conn: sqlite3.Connection) -> int:
        """The database's size in bytes, without the pages retention freed and not yet
        handed back."""
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])

    def _prune(self, conn: sqlite3.Connection) -> bool:
        """Delete the expired events, then the oldest ones while the database is over its
        size; hand the freed pages back to the file system. Returns whether it got through:
        a hand-over stops it between two transactions."""
        deleted = self._delete(conn, "WHERE time < ? ORDER BY time", time.time() - self._max_age)
        size = self._size(conn)
        # Deleting rows frees fewer pages than their share of the rows (index pages are
        # shared), so the size is measured again after each round; each deletes one row at
        # least, so the rounds end.
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0] if size > self._max_size else 0
        while size > self._max_size and rows and self._handing_over is None:
            excess = max(1, math.ceil(rows * (1 - SIZE_TARGET * self._max_size / size)))
            gone = self._delete(conn, "ORDER BY id", limit=excess)
            deleted += gone
            rows -= gone
            _vacuum(conn)
            size = self._size(conn)
        if deleted:
            _vacuum(conn)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            log.debug("history: retention deleted %d events", deleted)
        return self._handing_over is None

    def _delete(self, conn: sqlite3.Connection, order: str, *args: object, limit: int | None = None) -> int:
        """Delete the first events in `order` (an SQL tail: WHERE ... ORDER BY ...), PRUNE_CHUNK
        per transaction (at most `limit` in all), until a hand-over; returns how many."""
        deleted = 0
        while (limit is None or deleted < limit) and self._handing_over is None:
            chunk = PRUNE_CHUNK if limit is None else min(PRUNE_CHUNK, limit - deleted)
            oldest = f"SELECT id FROM events {order} LIMIT ?"
            cursor = conn.execute(f"DELETE FROM events WHERE id IN ({oldest})", (*args, chunk))
            deleted += cursor.rowcount
            if cursor.rowcount < chunk:
                break
        return deleted

    def _failed(self, exc: Exception) -> bool:
        """Log what went wrong with the database (closed by now); move an unusable one aside.
        Returns whether to try again at once: with a new database."""
        if isinstance(exc, _Unusable) or getattr(exc, "sqlite_errorname", None) in _CORRUPT:
            return self._move_aside(exc)
        self._failing = True
        self._trouble.warn(
            "history: cannot write to %s: %s; trying again every %g s (leases are not affected; events are "
            "kept in memory until %d wait, then dropped)", self.path, exc, RETRY, self._max_backlog,
        )
        return False

    def _move_aside(self, problem: Exception) -> bool:
        """Move the unusable database aside, for a new one (never over an earlier one: the
        name gets a number if need be); returns whether it was. Only with the lock held."""
        assert self._lock_fd is not None, "only the lock's holder moves the database"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in itertools.count(1):
            aside = self.path.with_name(f"{FILE_NAME}.unusable-{stamp}" + (f"-{n}" if n > 1 else ""))
            if not any(os.path.lexists(f"{aside}{suffix}") for suffix in _SUFFIXES):
                break
        try:
            for suffix in _SUFFIXES:
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
        except OSError as exc:
            self._failing = True
            self._trouble.warn("history: %s is unusable (%s) and cannot be moved aside: %s", self.path, problem, exc)
            return False
        log.warning("history: %s was unusable (%s); moved it to %s and starting a new one", self.path, problem, aside)
        return True

    # --- queries, in a worker thread ----------------------------------------------------------------

    def read(
        self, names: list[str], since: float | None, until: float | None, limit: int, uid: int | None,
        before: protocol.HistoryCursor | None = None,
    ) -> tuple[list[protocol.LeaseEvent], protocol.HistoryCursor | None]:
        """The latest `limit` events on `names` (every name when empty) from `since` (at or
        after) to `until` (before), and before the cursor `before`, of `uid` (None: every
        user's), oldest first, as many as fit in REPLY_BYTES; and the cursor of the earlier
        ones that match too (None: none do). Blocks: run it in a worker thread. Raises
        DaemonUnavailable if the database cannot be read."""
        if before is None:  # a first page: with what was recorded before it
            self.flush()
        where: list[str] = []
        params: list[object] = []
        if names:
            where.append("name IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(names))
        if uid is not None:
            where.append("uid = ?")
            params.append(uid)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        if before is not None:
            where.append("(time, id) < (?, ?)")
            params += before
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        query = f"SELECT id, {_COLUMNS} FROM events {condition} ORDER BY time DESC, id DESC LIMIT ?"
        events: list[protocol.LeaseEvent] = []
        more = oldest = None
        size = 0
        encode = msgspec.msgpack.Encoder().encode
        try:
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_WAIT, isolation_level=None)
            try:
                for row_id, *fields in conn.execute(query, (*params, limit + 1)):
                    event = protocol.LeaseEvent(*fields)
                    size += len(encode(event))
                    if events and (len(events) == limit or size > REPLY_BYTES):
                        more = oldest
                        break
                    events.append(event)
                    oldest = (event.time, row_id)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise errors.DaemonUnavailable(
                f"lockd cannot read its history ({self.path}): {exc}; its log says more"
            ) from None
        events.reverse()
        return events, more


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed if the block ends normally, else rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # An INSERT OR ROLLBACK that failed has rolled the transaction back already, and a
        # ROLLBACK with none under way would fail in place of the error that ended the block.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _vacuum(conn: sqlite3.Connection) -> None:
    """Hand the free pages back to the file system. Each step of the pragma frees one page,
    and `execute` would take only the first step: `executescript` takes them all."""
    conn.executescript("PRAGMA incremental_vacuum;")
