"""The daemon's metrics in the Prometheus text format (version 0.0.4): what lockd.metrics
counted, with the gauges read from their owners, written out by prometheus_client.

Invariants:
- Imported at the first render (`lockd.metrics.Metrics.render`) and by nothing the daemon
  imports at start: prometheus_client brings http.server and more with it, tens of
  milliseconds that every start, and the pause of every re-exec in place (the new program
  imports everything it needs before it serves), would pay for metrics nobody may read
  (tests/test_metrics_daemon.py watches a daemon's imports).
- Writing the text changes nothing it reads.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .census import MODES, Census
from .histogram import Histogram
from .metrics import Counts, EtcdStats, HistoryStats, ServiceStats

#: The families only the etcd backend has (the flock daemon never shows them).
ETCD_FAMILIES: Final = ("lockd_etcd_lease_alive", "lockd_etcd_keepalive_age_seconds", "lockd_etcd_request_seconds")


class Exposition:
    """The text of some counts and of the sources given, written anew at each `render`."""

    def __init__(
        self, total: Counts, named: Mapping[str, Counts], *, backend: str, history: HistoryStats | None,
        etcd: EtcdStats | None,
    ) -> None:
        """`total`: the counts of every lease; `named`: those of each name with series of its
        own (read as they are at each render: names may be added). `backend`, `history` and
        `etcd` as `lockd.metrics.Metrics` takes them."""
        self._all = total
        self._named = named
        self._backend = backend
        self._history = history
        self._etcd = etcd
        #: What the render under way reads (the registry's collectors take no arguments).
        self._reading: tuple[ServiceStats, int, float] | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def render(self, service: ServiceStats, connections: int, now: float) -> bytes:
        """The text, with the gauges read from `service` (at `now`, on its clock) and
        `connections`. Raises what a source raises."""
        self._reading = service, connections, now
        try:
            return generate_latest(self._registry)
        finally:
            self._reading = None

    def collect(self) -> Iterator[Metric]:
        """The families, for the registry (as a prometheus_client `Collector`), during `render`."""
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


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value)


#: What the help of a per-name family adds.
_PER_NAME: Final = " For the names in lockd's [metrics] names."
#: The counters of a `Counts`: (name suffix, help, label, the counts it reads).
_COUNTERS: Final[list[tuple[str, str, str | None, Callable[[Counts], Mapping[str, int] | int]]]] = [
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
#: The histograms of a `Counts`.
_HISTOGRAMS: Final[list[tuple[str, str, Callable[[Counts], Histogram]]]] = [
    ("wait_seconds", "Seconds from request to grant, per name granted.", lambda c: c.wait),
    ("hold_seconds", "Seconds from grant to end, per name of the leases that ended.", lambda c: c.hold),
]


def _counters(
    prefix: str, labels: list[str], rows: list[tuple[list[str], Counts]], scope: str,
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
