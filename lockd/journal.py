"""Lease events in the log: under systemd, with stderr on the journal, each event is one
structured journal entry (`journalctl -u lockd LOCKD_NAME=site.com`); otherwise one plain
line on stderr through lockd's logging.

Invariants: `record` never blocks and never raises: an entry is sent with one non-blocking
datagram, and one the journal cannot take at once is dropped and counted (`dropped`), with a
warning at most once a minute. Events are logged only at the log level that shows them:
`lost` and `broken` at warning, the others at info.

The journal's native protocol (systemd.journal-fields(7), "Native Journal Protocol" in
systemd's documentation): a datagram of `FIELD=value` lines to /run/systemd/journal/socket;
a value with a newline is sent as the field name, a newline, its length as a little-endian
64-bit number, the value and a newline.
"""

from __future__ import annotations

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
#: The syslog priorities of the journal entries, as the log levels of the plain lines.
_PRIORITY: Final = {logging.INFO: "6", logging.WARNING: "4"}
_LENGTH: Final = struct.Struct("<Q")


class EventLog:
    """Logs lease events (a server observer): to the journal at `journal` (a socket path),
    or as plain lines when it is None. Close it when done."""

    def __init__(self, journal: str | None) -> None:
        self.dropped = 0
        self._journal = journal
        self._sock: socket.socket | None = None
        self._trouble = Occasional(60.0)
        if journal is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls) -> EventLog:
        """To the journal when stderr is the journal's stream, else plain lines."""
        return cls(os.environ.get(SOCKET_ENV, JOURNAL_SOCKET) if stderr_is_journal() else None)

    def record(self, event: protocol.LeaseEvent) -> None:
        level = logging.WARNING if event.event in ("lost", "broken") else logging.INFO
        if not log.isEnabledFor(level):
            return
        if self._sock is None:
            log.log(level, "%s", event_text(event))
            return
        try:
            self._sock.sendto(journal_entry(event, _PRIORITY[level]), self._journal)  # type: ignore[arg-type]
        except OSError as exc:
            self.dropped += 1
            if not isinstance(exc, BlockingIOError):
                self._trouble.warn("cannot send lease events to the journal at %s: %s", self._journal, exc)

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
    """The native journal protocol's datagram for `event`."""
    fields = {
        "MESSAGE": event_text(event),
        "PRIORITY": priority,
        "SYSLOG_IDENTIFIER": "lockd",
        "LOCKD_EVENT": event.event,
        "LOCKD_NAME": event.name,
        "LOCKD_MODE": event.mode,
        "LOCKD_SLOTS": event.slots,
        "LOCKD_TOKEN": event.token,
        "LOCKD_PID": event.pid,
        "LOCKD_UID": event.uid,
        "LOCKD_COMMAND": event.command or None,
        "LOCKD_LABEL": event.label,
        "LOCKD_WAITED": None if event.waited is None else f"{event.waited:.6f}",
        "LOCKD_HELD": None if event.held is None else f"{event.held:.6f}",
        "LOCKD_REASON": event.reason,
        "LOCKD_EXIT_STATUS": event.exit_status,
        "LOCKD_CAUSE": event.cause,
    }
    out = bytearray()
    for key, value in fields.items():
        if value is None:
            continue
        data = str(value).encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += key.encode() + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def _mode(event: protocol.LeaseEvent) -> str:
    return event.mode if event.slots is None else f"slot of {event.slots}"
