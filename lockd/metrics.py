"""The daemon's metrics: counted as plain numbers while serving, put in the Prometheus text
format only when someone reads them (`lockctl metrics`, the listener of lockd.metrics_http).
docs/metrics.md lists every metric.

Invariants:
- Serving pays only for counting lease events: `Metrics.observe` does a few dict and integer
  operations and a bisect per histogram an event feeds (one; two for a name with series of
  its own), and nothing on the hot path knows of the exposition format. Every gauge (leases
  held, waiters, the oldest lease and waiter, connections, the history writer, the etcd
  session, the process's descriptors) is read from its owner at render time.
- A render costs the same however many leases are live, but for the names with series of
  their own: the service keeps its census as tickets change (lockd.census), and only the
  lines of those names are visited. A name is matched against the globs once, when first
  seen (`note`, `observe`), never per render. Renders less than CACHE_SECONDS apart share
  one text, so scrapes however many and however fast cost one render a second at most.
- A lock name is a label value only where it matches one of the configured globs
  (`[metrics] names`); with none configured no series names a lock, so the number of series
  stays the same whatever names clients use. Per-name counts are kept for matching names
  only.
- Rendering changes nothing but the cache.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import resource
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, Protocol

from lockd_client import protocol
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .census import MODES, Census
from .histogram import Histogram

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
#: The families only the etcd backend has (the flock daemon never shows them).
ETCD_FAMILIES: Final = ("lockd_etcd_lease_alive", "lockd_etcd_keepalive_age_seconds", "lockd_etcd_request_seconds")
#: How a lease ended when it was `released`: as its holder asked, or with its holder gone.
RELEASE_REASONS: Final = ("requested", "by_other", "abandoned", "shutdown")
#: Why a lease was `lost` (see `loss_reason`).
LOSS_REASONS: Final = ("forced", "overdue", "shutdown", "backend", "internal")
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
}
_RELEASE_REASON: Final = {
    protocol.Cause.RELEASED_BY_OTHER: "by_other", protocol.Cause.CLIENT_GONE: "abandoned",
    protocol.Cause.PROCESS_EXITED: "abandoned", protocol.Cause.DAEMON_STOPPED: "shutdown",
}


class _Counts:
    """What the events of some leases add up to: all of them, or those on one name."""

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
        #: What the render under way reads (the registry's collectors take no arguments).
        self._reading: tuple[ServiceStats, int, float] | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        self._all = _Counts()
        #: name → its counts, for the names that match `names` and had an event.
        self._named: dict[str, _Counts] = {}
        #: Names found not to match lately: a dict lookup costs a fifth of a glob's match.
        #: Emptied when full, so that names made up per job cannot grow it without bound.
        self._unmatched: dict[str, None] = {}

    def observe(self, event: protocol.LeaseEvent) -> None:
        """Count `event`. Returns at once and never raises (a `Server` observer)."""
        self._all.count(event)
        if self._matches is not None:
            named = self._counts_of(event.name)
            if named is not None:
                named.count(event)

    def note(self, names: tuple[str, ...]) -> None:
        """A request for `names` arrived: those that match the globs get series from now on,
        even if none of them is ever granted. Returns at once and never raises."""
        if self._matches is not None:
            for name in names:
                self._counts_of(name)

    def _counts_of(self, name: str) -> _Counts | None:
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
            named = self._named[name] = _Counts()
        return named

    def render(self, service: ServiceStats, connections: int, now: float) -> bytes:
        """The metrics in the Prometheus text format (version 0.0.4), with the gauges read
        from `service` (at `now`, on its clock), `connections` and the sources given; the
        text rendered less than CACHE_SECONDS before `now`, if there is one."""
        if 0 <= now - self._rendered_at < CACHE_SECONDS:
            return self._text
        self._reading = service, connections, now
        try:
            self._text = generate_latest(self._registry)
        finally:
            self._reading = None
        self._rendered_at = now
        return self._text

    def collect(self) -> Iterator[Metric]:
        assert self._reading is not None, "collected outside render()"
        service, connections, now = self._reading
        yield from _counters("lockd", [], [([], self._all)], "")
        yield from _gauges("lockd", [], [([], service.census())], now, "")
        yield _gauge("lockd_connections", "Client connections served now.", connections)
        yield CounterMetricFamily(
            "lockd_subscriptions_dropped", "Event subscriptions dropped because their client did not read "
            "its events in time.", service.subscriptions_dropped,
        )
        build = GaugeMetricFamily(
            "lockd_build_info", "Always 1: the daemon's version and backend, as labels.", labels=["version", "backend"],
        )
        build.add_metric([__version__, self._backend], 1)
        yield build
        yield from _descriptors()
        names = sorted(self._named)
        if names:
            counts = [([name], self._named[name]) for name in names]
            yield from _counters("lockd_name", ["name"], counts, _PER_NAME)
            censuses = [([name], service.name_census(name)) for name in names]
            yield from _gauges("lockd_name", ["name"], censuses, now, _PER_NAME)
        if self._history is not None:
            yield _gauge(
                "lockd_history_backlog", "Lease events waiting to be written to the history.",
                self._history.backlog,
            )
            yield CounterMetricFamily(
                "lockd_history_dropped", "Lease events the history never recorded (queue full, disk failing).",
                self._history.dropped,
            )
        if self._etcd is not None:
            yield from _etcd_metrics(self._etcd)


class _Collector:
    """The metrics, for `prometheus_client`'s registry (a `Collector`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """One test of a name against every glob (as `fnmatchcase` would); None for no globs."""
    if not patterns:
        return None
    pattern = re.compile("|".join(fnmatch.translate(glob) for glob in patterns))
    return lambda name: pattern.match(name) is not None


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value)


#: What the help of a per-name family adds.
_PER_NAME: Final = " For the names in lockd's [metrics] names."
#: The counters of a `_Counts`: (name suffix, help, label, the counts it reads).
_COUNTERS: Final[list[tuple[str, str, str | None, Callable[[_Counts], Mapping[str, int] | int]]]] = [
    ("grants", "Leases granted, per name they hold, by mode.", "mode", lambda c: c.grants),
    ("releases", "Leases ended as their holder asked (requested), from another connection (lockctl release) "
     "(by_other), with their holder gone (abandoned) or lockd stopping (shutdown), per name.",
     "reason", lambda c: c.releases),
    ("losses", "Leases lost, per name: broken and not let go in time (overdue), the daemon "
     "stopping (shutdown), or the backend (backend).", "reason", lambda c: c.losses),
    ("refusals", "Requests refused, per name, by the error code the client got (busy, timeout, "
     "permission_denied, limit, ...).", "code", lambda c: c.refusals),
    ("breaks", "Leases broken by a forced release, per name.", None, lambda c: c.breaks),
]
#: The histograms of a `_Counts`.
_HISTOGRAMS: Final[list[tuple[str, str, Callable[[_Counts], Histogram]]]] = [
    ("wait_seconds", "Seconds from request to grant, per name granted.", lambda c: c.wait),
    ("hold_seconds", "Seconds from grant to end, per name of the leases that ended.", lambda c: c.hold),
]


def _counters(
    prefix: str, labels: list[str], rows: list[tuple[list[str], _Counts]], scope: str,
) -> Iterator[Metric]:
    """The counters and histograms of each row's counts, its label values first; `scope`
    ends each help text."""
    for suffix, documentation, label, read in _COUNTERS:
        family = CounterMetricFamily(
            f"{prefix}_{suffix}", documentation + scope, labels=labels if label is None else [*labels, label],
        )
        for values, counts in rows:
            value = read(counts)
            if isinstance(value, int):
                family.add_metric(values, value)
            else:
                for key, count in value.items():
                    family.add_metric([*values, key], count)
        yield family
    for suffix, documentation, histogram in _HISTOGRAMS:
        histograms = HistogramMetricFamily(f"{prefix}_{suffix}", documentation + scope, labels=labels)
        for values, counts in rows:
            seen = histogram(counts)
            histograms.add_metric(values, seen.cumulative(), seen.total)
        yield histograms


def _gauges(
    prefix: str, labels: list[str], rows: list[tuple[list[str], Census]], now: float, scope: str,
) -> Iterator[Metric]:
    """The gauges of each row's census, its label values first; `scope` ends each help text."""
    held = GaugeMetricFamily(
        f"{prefix}_leases_held", "Leases held now (granted, or broken and not let go yet), per name they "
        "hold, by mode." + scope, labels=[*labels, "mode"],
    )
    waiting = GaugeMetricFamily(
        f"{prefix}_waiters", "Requests waiting now (queued, or being taken behind a holder outside lockd), "
        "per name they wait for, by mode." + scope, labels=[*labels, "mode"],
    )
    oldest_held = GaugeMetricFamily(
        f"{prefix}_lease_oldest_held_seconds", "Seconds the longest-held lease has been held (0: none is)."
        + scope, labels=labels,
    )
    oldest_waiting = GaugeMetricFamily(
        f"{prefix}_waiter_oldest_waiting_seconds",
        "Seconds the longest-waiting request has been waiting (0: none is)." + scope, labels=labels,
    )
    for values, census in rows:
        for mode in MODES:
            held.add_metric([*values, mode], census.held[mode])
            waiting.add_metric([*values, mode], census.waiting[mode])
        oldest_held.add_metric(values, _age(census.held_since, now))
        oldest_waiting.add_metric(values, _age(census.waiting_since, now))
    yield from (held, waiting, oldest_held, oldest_waiting)


def _descriptors() -> Iterator[Metric]:
    """The process's open descriptors and their limit, under the names prometheus_client's
    ProcessCollector gives them: lockd holds some per lease, and running out refuses leases.
    Not that collector itself: it lists /proc/self/fd, 15 ms per 20,000 descriptors here, on
    the event loop; Linux 6.2 and later give the count as the directory's size, in O(1)."""
    try:
        count = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
    except OSError:
        return  # not Linux: no /proc
    yield _gauge("process_open_fds", "Number of open file descriptors.", count)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    yield _gauge("process_max_fds", "Maximum number of open file descriptors.", limit)


def _age(since: float | None, now: float) -> float:
    return 0.0 if since is None else max(0.0, now - since)


def _etcd_metrics(etcd: EtcdStats) -> Iterator[Metric]:
    alive, age = etcd.lease_state()
    lease_alive, keepalive_age, request_seconds = ETCD_FAMILIES
    yield _gauge(lease_alive, "1 while the daemon holds an etcd lease it vouches for, else 0.", alive)
    if age is not None:
        yield _gauge(
            keepalive_age,
            "Seconds since the keep-alive that last confirmed the etcd lease was sent.", age,
        )
    family = HistogramMetricFamily(
        request_seconds, "Seconds each etcd request took, answered or not, by API call.",
        labels=["call"],
    )
    for call, seen in sorted(etcd.request_seconds.items()):
        family.add_metric([call], seen.cumulative(), seen.total)
    yield family
