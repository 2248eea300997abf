"""The daemon's metrics: counted as plain numbers while serving, put in the Prometheus text
format only when someone reads them (`lockctl metrics`, the listener of lockd.metrics_http).
docs/metrics.md lists every metric.

Invariants:
- Serving pays only for counting lease events: `Metrics.observe` does a few dict and integer
  operations and a bisect per histogram an event feeds (one; two for a name with series of
  its own), and nothing on the hot path knows of the exposition format. Every gauge (leases
  held, waiters, the oldest lease and waiter, connections, the history writer, the etcd
  session, the process's descriptors) is read from its owner at render time.
- Neither does start-up: this module imports no Prometheus library. The text is written by
  lockd.metrics_text, imported at the first render (see there why).
- A render costs the same however many leases are live, but for the names with series of
  their own: the service keeps its census as tickets change (lockd.census), and only the
  lines of those names are visited. A name is matched against the globs once, when first
  seen (`note`, `observe`), never per render. Renders less than CACHE_SECONDS apart share
  one text, so scrapes however many and however fast cost one render a second at most.
- A lock name is a label value only where it matches one of the configured globs
  (`[metrics] names`); with none configured no series names a lock, so the number of series
  stays the same whatever names clients use. Per-name counts are kept for matching names
  only.
- Rendering changes nothing but the cache (and, at the first render, makes its writer).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from lockd_client import protocol

from .census import MODES, Census
from .histogram import Histogram

if TYPE_CHECKING:
    from .metrics_text import Exposition

#: Upper bounds (seconds) of the wait- and hold-time buckets: a lock is waited for or held for
#: anything from a millisecond (a cron job's guard) to a day (a long backup).
SECONDS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)
#: How many names `Metrics` remembers not to match its globs.
_UNMATCHED_KEPT: Final = 4096
#: Seconds a rendered text is served again rather than rendered anew.
CACHE_SECONDS: Final = 1.0
#: How a lease ended when it was `released`: as its holder asked, or with its holder gone.
RELEASE_REASONS: Final = ("requested", "by_other", "abandoned", "shutdown")
#: Why a lease was `lost` (see `loss_reason`).
LOSS_REASONS: Final = ("forced", "overdue", "shutdown", "backend", "internal", "limit")
#: The refusals counted from the start (others, such as `unavailable`, appear once they
#: happen): an alert on a rate needs its series before the first refusal.
REFUSAL_REASONS: Final = (
    protocol.ErrorCode.BUSY, protocol.ErrorCode.TIMEOUT, protocol.ErrorCode.PERMISSION_DENIED,
    protocol.ErrorCode.LIMIT,
)


class HistoryStats(Protocol):
    """What the metrics read of the history's writer (lockd.history)."""

    @property
    def backlog(self) -> int:
        """Events queued and not yet written."""

    @property
    def dropped(self) -> int:
        """Events never written (the queue was full, or the disk failed), since the start."""


class ServiceStats(Protocol):
    """What the metrics read of the lock service (lockd.service)."""

    def census(self) -> Census:
        """Who holds and who waits now, in all."""

    def name_census(self, name: str) -> Census:
        """Who holds and who waits on `name` now."""

    @property
    def subscriptions_dropped(self) -> int:
        """Subscriptions dropped for not reading their events in time, since the start."""


class EtcdStats(Protocol):
    """What the metrics read of the etcd backend."""

    def lease_state(self) -> tuple[bool, float | None]:
        """Whether the daemon holds an etcd lease it vouches for, and how many seconds ago
        the keep-alive that last confirmed it was sent (None: no lease yet)."""

    @property
    def request_seconds(self) -> Mapping[str, Histogram]:
        """The time each kind of etcd request took, answered or not, by its API path."""


def loss_reason(event: protocol.LeaseEvent) -> str:
    """A `lost` event's cause as a label value: one of LOSS_REASONS."""
    return _LOSS_REASON.get(event.cause or "", "backend")


def release_reason(event: protocol.LeaseEvent) -> str:
    """A `released` event's cause as a label value: one of RELEASE_REASONS."""
    return _RELEASE_REASON.get(event.cause or "", "requested")


_LOSS_REASON: Final = {
    protocol.Cause.FORCED: "forced", protocol.Cause.OVERDUE: "overdue",
    protocol.Cause.DAEMON_STOPPED: "shutdown", protocol.Cause.INTERNAL: "internal",
    protocol.Cause.LIMIT: "limit",
}
_RELEASE_REASON: Final = {
    protocol.Cause.RELEASED_BY_OTHER: "by_other", protocol.Cause.CLIENT_GONE: "abandoned",
    protocol.Cause.PROCESS_EXITED: "abandoned", protocol.Cause.DAEMON_STOPPED: "shutdown",
}


class Counts:
    """What the events of some leases add up to: all of them, or those on one name. Written
    by `Metrics` alone; lockd.metrics_text reads them."""

    __slots__ = ("grants", "releases", "losses", "refusals", "breaks", "wait", "hold")

    def __init__(self) -> None:
        self.grants = dict.fromkeys(MODES, 0)
        self.releases = dict.fromkeys(RELEASE_REASONS, 0)
        self.losses = dict.fromkeys(LOSS_REASONS, 0)
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.breaks = 0
        self.wait = Histogram(SECONDS_BUCKETS)
        self.hold = Histogram(SECONDS_BUCKETS)

    def count(self, event: protocol.LeaseEvent) -> None:
        kind = event.event
        if kind == "granted":
            self.grants["semaphore" if event.slots is not None else event.mode] += 1
            if event.waited is not None:
                self.wait.observe(event.waited)
        elif kind == "released" or kind == "lost":
            if kind == "released":
                self.releases[release_reason(event)] += 1
            else:
                self.losses[loss_reason(event)] += 1
            if event.held is not None:
                self.hold.observe(event.held)
        elif kind == "refused":
            code = event.reason or "unknown"
            self.refusals[code] = self.refusals.get(code, 0) + 1
        else:
            self.breaks += 1


class Metrics:
    """The daemon's metrics: `observe` is a `Server` observer; `render` writes them out."""

    def __init__(
        self, names: Sequence[str] = (), *, backend: str = "flock", history: HistoryStats | None = None,
        etcd: EtcdStats | None = None,
    ) -> None:
        """`names`: globs (fnmatch, case-sensitive) of the names that get series of their
        own. `backend`: the backend's name, for `lockd_build_info`. `history` and `etcd`,
        where the daemon has them, are read at render time."""
        self._matches = _matcher(names)
        self._backend = backend
        self._history = history
        self._etcd = etcd
        #: When the text in `_text` was rendered (on the callers' clock).
        self._rendered_at = -math.inf
        self._text = b""
        #: Writes the text; made at the first render (it imports prometheus_client).
        self._exposition: Exposition | None = None
        self._all = Counts()
        #: name → its counts, for the names that match `names` and had an event.
        self._named: dict[str, Counts] = {}
        #: Names found not to match lately: a dict lookup costs a fifth of a glob's match.
        #: Emptied when full, so that names made up per job cannot grow it without bound.
        self._unmatched: dict[str, None] = {}

    @property
    def observer(self) -> Callable[[protocol.LeaseEvent], None]:
        """`observe`, or what it comes down to with no per-name series: the count of all."""
        return self.observe if self._matches is not None else self._all.count

    def observe(self, event: protocol.LeaseEvent) -> None:
        """Count `event`. Returns at once and never raises (a `Server` observer)."""
        self._all.count(event)
        if self._matches is not None:
            named = self._counts_of(event.name)
            if named is not None:
                named.count(event)

    @property
    def follows_names(self) -> bool:
        """Whether any name gets series of its own: else `note` does nothing."""
        return self._matches is not None

    def note(self, names: tuple[str, ...]) -> None:
        """A request for `names` arrived: those that match the globs get series from now on,
        even if none of them is ever granted. Returns at once and never raises."""
        if self._matches is not None:
            for name in names:
                self._counts_of(name)

    def _counts_of(self, name: str) -> Counts | None:
        """The counts of `name` if it matches the globs (made on its first sight), else None."""
        named = self._named.get(name)
        if named is None:
            if name in self._unmatched:
                return None
            assert self._matches is not None
            if not self._matches(name):
                if len(self._unmatched) >= _UNMATCHED_KEPT:
                    self._unmatched.clear()
                self._unmatched[name] = None
                return None
            named = self._named[name] = Counts()
        return named

    def render(self, service: ServiceStats, connections: int, now: float) -> bytes:
        """The metrics in the Prometheus text format (version 0.0.4), with the gauges read
        from `service` (at `now`, on its clock), `connections` and the sources given; the
        text rendered less than CACHE_SECONDS before `now`, if there is one. The first render
        imports lockd.metrics_text. On error (raised as is) the cached text stays, and the
        next render tries again."""
        if 0 <= now - self._rendered_at < CACHE_SECONDS:
            return self._text
        if self._exposition is None:
            from .metrics_text import Exposition

            self._exposition = Exposition(
                self._all, self._named, backend=self._backend, history=self._history, etcd=self._etcd,
            )
        self._text = self._exposition.render(service, connections, now)
        self._rendered_at = now
        return self._text


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """One test of a name against every glob (as `fnmatchcase` would); None for no globs."""
    if not patterns:
        return None
    pattern = re.compile("|".join(fnmatch.translate(glob) for glob in patterns))
    return lambda name: pattern.match(name) is not None
