"""Logging for lockd: one plain line per event on stderr, shaped for where stderr goes.

Invariants: `configure_logging` can be called again (a reload changing `log_level`) and
leaves exactly one lockd handler installed. Under systemd lines carry no timestamp (the
journal adds its own) but start with a `<N>` syslog priority, which journald turns into the
entry's level. `contained` logs a bug and lets the daemon carry on.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from types import TracebackType

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: logging level → syslog priority, read by journald from the `<N>` prefix of a line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Every line of a multi-line record (tracebacks) gets the prefix, or journald would
        # file the continuation lines at the default level.
        priority = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second call replaces it."""


def under_systemd() -> bool:
    """True when systemd started lockd, or stderr is connected to the journal.

    JOURNAL_STREAM names the device and inode of the journal stream systemd connected; it is
    only believed when stderr really is that stream (not redirected since).
    """
    return bool(os.environ.get("INVOCATION_ID")) or stderr_is_journal()


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM names its
    device and inode, and stderr has not been redirected since)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def configure_logging(level: str, under_systemd: bool) -> None:
    """Send lockd's records at `level` and above (others' at warning and above) to stderr.

    `level` is one of LEVELS (config.LogLevel). Third-party libraries stay at warning so a
    chatty HTTP client cannot drown lockd's own lines.
    """
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
    handler = _Handler(sys.stderr)
    if under_systemd:
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lockd").setLevel(LEVELS[level])


class contained:
    """Log an exception raised while `doing` and carry on: a bug must cost the request it
    concerns, never the daemon and everyone's leases. `doing % args` is formatted only if
    something is raised: callers on the hot path describe what they do for free.

    A class rather than a generator: entering and leaving it is a fraction of the cost, and
    the service and the shell pass through it several times per request."""

    __slots__ = ("_doing", "_args")

    def __init__(self, doing: str, *args: object) -> None:
        self._doing = doing
        self._args = args

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        # Logging formats the message (only when there are args), and reports rather than
        # raises a repr that fails there: whatever went wrong stays contained.
        logging.getLogger("lockd").exception(f"internal error {self._doing}; carrying on", *self._args, exc_info=exc)
        return True


class Occasional:
    """A warning about a lasting condition (a full disk, a journal that does not keep up),
    logged at most once every `interval` seconds however often it recurs; the lines between
    are counted and the next line says how many. Thread-safe enough for a counter: a line
    more or less under a race, never an exception."""

    __slots__ = ("_interval", "_next", "_skipped")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = -math.inf
        self._skipped = 0

    def warn(self, message: str, *args: object, exc_info: bool = False) -> None:
        """Log `message` % `args` at warning, unless one was logged less than the interval
        ago; `exc_info`: with the traceback of the exception being handled."""
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._interval
        skipped, self._skipped = self._skipped, 0
        if skipped:
            message += f" (and {skipped} more times in the last {self._interval:g} s)"
        logging.getLogger("lockd").warning(message, *args, exc_info=exc_info)
