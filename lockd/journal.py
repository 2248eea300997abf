"""Lease events in the log: under systemd, with stderr on the journal, each event is one
structured journal entry (`journalctl -u lockd LOCKD_NAME=site.com`); otherwise a plain line
on stderr through lockd's logging, at debug.

Invariants: `record` never blocks and never raises: an entry is sent with one non-blocking
datagram, and one the journal cannot take at once is dropped and counted (`dropped`), with a
warning at most once a minute. When nobody is at the journal's socket (no such file, or
nobody reading it), the event is a plain line on stderr at its level instead (warned about
once a minute), and the socket is tried again for the next. Journal entries are sent only at the log level that shows
them: `lost` and `broken` at warning, the others at info. Plain lines are a trace, at debug
only: a line per event on stderr would double the daemon's work per lease at the default
level, and `refused` events, which any client can cause at will, are never a plain line (the
service logs refusals within the log limiter's bounds), so no client can flood the log.

The journal's native protocol (systemd.journal-fields(7), "Native Journal Protocol" in
systemd's documentation): a datagram of `FIELD=value` lines to /run/systemd/journal/socket;
a value with a newline is sent as the field name, a newline, its length as a little-endian
64-bit number, the value and a newline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from typing import Final

from lockd_client import protocol

from .logs import Occasional, stderr_is_journal

log = logging.getLogger("lockd")

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
#: Names another socket than JOURNAL_SOCKET, for tests (the journal's own, otherwise).
SOCKET_ENV: Final = "LOCKD_JOURNAL_SOCKET"
#: The syslog priorities of the journal entries, by the log level that shows them.
_PRIORITY: Final = {logging.INFO: "6", logging.WARNING: "4"}
_LENGTH: Final = struct.Struct("<Q")
#: Lasting trouble with the journal is logged at most once in this many seconds.
WARN_INTERVAL: Final = 60.0
#: What a send gets when nobody is at the journal's socket (then lines go to stderr).
_NO_JOURNAL: Final = frozenset({errno.ENOENT, errno.ECONNREFUSED})
#: What a send on the socket gets when it must be connected (again) first.
_RECONNECT: Final = frozenset({errno.ENOTCONN, errno.ECONNREFUSED, errno.EDESTADDRREQ})


class EventLog:
    """Logs lease events (a server observer): to the journal at `journal` (a socket path),
    or as plain lines when it is None. Close it when done."""

    def __init__(self, journal: str | None) -> None:
        #: Journal entries lost: the journal did not take them at once (the metrics read it).
        self.dropped = 0
        self._journal = journal
        self._sock: socket.socket | None = None
        self._slow = Occasional(WARN_INTERVAL)
        self._trouble = Occasional(WARN_INTERVAL)
        if journal is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
            # Connected, a send costs no lookup of the path; `_send` connects when this fails.
            with contextlib.suppress(OSError):
                self._sock.connect(journal)

    @classmethod
    def from_environment(cls) -> EventLog:
        """To the journal when stderr is the journal's stream, else plain lines."""
        return cls(os.environ.get(SOCKET_ENV, JOURNAL_SOCKET) if stderr_is_journal() else None)

    def record(self, event: protocol.LeaseEvent) -> None:
        if self._sock is None:
            if event.event != "refused" and log.isEnabledFor(logging.DEBUG):
                log.debug("%s", event_text(event))
            return
        level = logging.WARNING if event.event in ("lost", "broken") else logging.INFO
        if not log.isEnabledFor(level):
            return
        try:
            self._send(self._sock, journal_entry(event, _PRIORITY[level]))
        except BlockingIOError:
            self.dropped += 1
            self._slow.warn(
                "the journal does not keep up with lease events: %d dropped so far rather than wait for it "
                "(lockctl history has them)", self.dropped,
            )
        except OSError as exc:
            if exc.errno in _NO_JOURNAL:
                # Nobody at the socket: the event is a line on stderr instead, as without
                # systemd, but at its level (refusals stay out of the log, as ever).
                if event.event != "refused":
                    log.log(level, "%s", event_text(event))
                self._trouble.warn(
                    "cannot send lease events to the journal at %s: %s; logging them as plain lines until it is back",
                    self._journal, exc.strerror,
                )
            else:
                self.dropped += 1
                self._trouble.warn("cannot send lease events to the journal at %s: %s", self._journal, exc)

    def _send(self, sock: socket.socket, entry: bytes) -> None:
        try:
            sock.send(entry)
        except OSError as exc:
            if exc.errno not in _RECONNECT:
                raise
            # Not connected yet, or the journal made a new socket since (it restarted).
            sock.connect(self._journal)  # type: ignore[arg-type]
            sock.send(entry)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def event_text(event: protocol.LeaseEvent) -> str:
    """One line that says what happened: `site.com granted exclusive pid 4242 uid 1000
    (./backup.sh) token 17 waited 0.002s`."""
    parts = [f"{event.name} {event.event}", _mode(event)]
    parts += [f"{key} {value}" for key, value in (("pid", event.pid), ("uid", event.uid)) if value is not None]
    if event.command:
        parts.append(f"({event.command})")
    if event.label:
        parts.append(f"[{event.label}]")
    if event.token is not None:
        parts.append(f"token {event.token}")
    for key, seconds in (("waited", event.waited), ("held", event.held)):
        if seconds is not None:
            parts.append(f"{key} {seconds:.3f}s")
    if event.exit_status is not None:
        parts.append(f"exit status {event.exit_status}")
    text = " ".join(parts)
    return f"{text}: {event.reason}" if event.reason else text


def journal_entry(event: protocol.LeaseEvent, priority: str) -> bytes:
    """The native journal protocol's datagram for `event`. Built on the event loop for every
    event: the fields that cannot hold a newline (names are ASCII without one, the rest are
    numbers or fixed words) are written as they are, and only the free text is looked at."""
    head = [
        f"PRIORITY={priority}\nSYSLOG_IDENTIFIER=lockd\nLOCKD_EVENT={event.event}\nLOCKD_NAME={event.name}\n"
        f"LOCKD_MODE={event.mode}\n"
    ]
    if event.cause is not None:
        head.append(f"LOCKD_CAUSE={event.cause}\n")
    for key, number in (
        ("LOCKD_SLOTS", event.slots), ("LOCKD_TOKEN", event.token), ("LOCKD_PID", event.pid),
        ("LOCKD_UID", event.uid), ("LOCKD_EXIT_STATUS", event.exit_status),
    ):
        if number is not None:
            head.append(f"{key}={number}\n")
    for key, seconds in (("LOCKD_WAITED", event.waited), ("LOCKD_HELD", event.held)):
        if seconds is not None:
            head.append(f"{key}={seconds:.6f}\n")
    out = bytearray("".join(head).encode())
    for field, text in (
        (b"MESSAGE", event_text(event)), (b"LOCKD_COMMAND", event.command or None), (b"LOCKD_LABEL", event.label),
        (b"LOCKD_REASON", event.reason),
    ):
        if text is None:
            continue
        data = text.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += field + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
        else:
            out += field + b"=" + data + b"\n"
    return bytes(out)


def _mode(event: protocol.LeaseEvent) -> str:
    return event.mode if event.slots is None else f"slot of {event.slots}"
