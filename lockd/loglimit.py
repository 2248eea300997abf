"""Logging what clients do wrong within bounds: no client can make lockd write without end.

Invariant: of each kind of event, at most PER_UID per uid and LINES in all are logged one by
one in each WINDOW-second window (windows are aligned to multiples of WINDOW on the clock
the caller uses); every other event is counted, and once its window has ended one summary
says how many there were, from which uids and why. So a kind costs at most LINES + 1 lines
per window, however many events clients cause, and no event goes uncounted. The memory kept
is bounded too: at most KEPT uids and KEPT reasons are counted apart in a window.

Pure: the time is passed in. The caller logs what `admit` lets through, and logs the
summaries that `summaries` returns once `next_summary` says they are due.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: Per kind of fault, at most LINES lines per WINDOW seconds, PER_UID of them for any one uid:
#: enough to see who does what, too few for one user to flood the journal or hide others.
WINDOW: Final = 10.0
LINES: Final = 20
PER_UID: Final = 5
#: Distinct uids, and distinct reasons, counted apart in one window; the rest as "others".
KEPT: Final = 50
#: Shown in a summary, the most frequent first; the rest are summed up as "others".
SHOWN: Final = 5

#: Stands for the uids or reasons beyond KEPT.
_OTHERS: Final = object()


@dataclass(frozen=True)
class Kind:
    """A kind of event: the level its lines are logged at, and how its summary starts, with
    `{count}` for the number of events counted (e.g. "cut off {count} more connections")."""

    level: int
    summary: str


@dataclass
class Summary:
    """The events of one kind counted in one window instead of being logged."""

    kind: Kind
    #: When the window ended, on the caller's clock.
    end: float
    window: float
    count: int
    #: uid (None: unknown) → events; reason → events.
    uids: Counter[object]
    reasons: Counter[object]

    def text(self) -> str:
        uids = _most(self.uids, lambda uid: "unknown uid" if uid is None else f"uid {uid}")
        reasons = _most(self.reasons, lambda reason: f'"{reason}"')
        return (
            f"{self.kind.summary.format(count=f'{self.count:,}')} in the last {self.window:g} s, "
            f"not logged one by one: from {uids}; why: {reasons}"
        )


class _Window:
    __slots__ = ("index", "lines", "lines_of", "count", "uids", "reasons")

    def __init__(self, index: int) -> None:
        self.index = index
        self.lines = 0
        self.lines_of: Counter[int | None] = Counter()
        self.count = 0
        self.uids: Counter[object] = Counter()
        self.reasons: Counter[object] = Counter()


class LogLimiter:
    """See the module docstring."""

    def __init__(self, window: float = WINDOW, lines: int = LINES, per_uid: int = PER_UID) -> None:
        self.window = window
        self.lines = lines
        self.per_uid = per_uid
        self._windows: dict[Kind, _Window] = {}
        #: Windows that ended with events counted, in the order they ended.
        self._ended: list[Summary] = []

    def admit(self, kind: Kind, now: float, uid: int | None, reason: str) -> bool:
        """Whether an event of `kind`, caused by `uid` for `reason`, is to be logged now; if
        not, it is counted for its window's summary."""
        window = self._current(kind, now)
        if window.lines < self.lines and window.lines_of[uid] < self.per_uid:
            window.lines += 1
            window.lines_of[uid] += 1
            return True
        window.count += 1
        _tally(window.uids, uid)
        _tally(window.reasons, reason)
        return False

    def next_summary(self) -> float | None:
        """When `summaries` next has something to return; None while nothing is counted."""
        due = [s.end for s in self._ended]
        due += [self._end(w) for w in self._windows.values() if w.count]
        return min(due, default=None)

    def summaries(self, now: float) -> list[Summary]:
        """The summaries of the windows that have ended by `now`, oldest first."""
        for kind, window in list(self._windows.items()):
            if self._end(window) <= now:
                self._close(kind, window)
        ended, self._ended = self._ended, []
        return sorted(ended, key=lambda s: s.end)

    def flush(self) -> list[Summary]:
        """Every summary, of windows that have not ended too (when lockd stops)."""
        return self.summaries(math.inf)

    def _current(self, kind: Kind, now: float) -> _Window:
        index = math.floor(now / self.window)
        window = self._windows.get(kind)
        if window is None or window.index != index:
            if window is not None:
                self._close(kind, window)
            window = self._windows[kind] = _Window(index)
        return window

    def _close(self, kind: Kind, window: _Window) -> None:
        del self._windows[kind]
        if window.count:
            self._ended.append(
                Summary(kind, self._end(window), self.window, window.count, window.uids, window.reasons)
            )

    def _end(self, window: _Window) -> float:
        return (window.index + 1) * self.window


def _tally(counts: Counter[object], key: object) -> None:
    counts[key if key in counts or len(counts) < KEPT else _OTHERS] += 1


def _most(counts: Counter[object], name: Callable[[object], str]) -> str:
    """The SHOWN most frequent keys with their counts, then the rest summed up."""
    ranked = sorted(counts.items(), key=lambda item: (item[0] is _OTHERS, -item[1]))
    shown = [f"{name(key)} ({n:,})" for key, n in ranked[:SHOWN] if key is not _OTHERS]
    rest = sum(counts.values()) - sum(n for key, n in ranked[:SHOWN] if key is not _OTHERS)
    if rest:
        shown.append(f"others ({rest:,})")
    return ", ".join(shown)
