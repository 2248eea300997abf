"""The metrics' logic: counting events, reading the table, the exposition, the HTTP responder."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from lockd_client import protocol
from prometheus_client.parser import text_string_to_metric_families

from lockd import __version__, metrics_http
from lockd.census import Census
from lockd.config import ListenAddress, listen_address
from lockd.histogram import Histogram
from lockd.metrics import CACHE_SECONDS, Metrics, ServiceStats

from .test_service import Harness


def event(
    kind: protocol.EventKind, name: str = "a", mode: protocol.Mode = "exclusive", **fields: object
) -> protocol.LeaseEvent:
    return protocol.LeaseEvent(1.0, kind, name, mode, **fields)  # type: ignore[arg-type]


class Idle:
    """A lock service with nothing held or awaited."""

    subscriptions_dropped = 0

    def census(self) -> Census:
        return Census()

    def name_census(self, name: str) -> Census:
        return Census()


def samples(metrics: Metrics, service: ServiceStats | None = None, now: float = 0.0) -> dict[tuple, float]:
    """(sample name, sorted labels) → value, as a scraper reads the rendered text."""
    text = metrics.render(service or Idle(), 3, now).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_histogram_puts_a_value_on_a_bound_in_that_bounds_bucket() -> None:
    histogram = Histogram([1.0, 2.0])
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]
    assert histogram.cumulative() == [("1.0", 2.0), ("2.0", 4.0), ("+Inf", 5.0)]
    assert histogram.total == 12.0


def test_counters_add_up_the_events_by_mode_and_reason() -> None:
    metrics = Metrics()
    for observed in [
        event("granted", waited=0.003),
        event("granted", mode="shared", waited=0.2),
        event("granted", slots=3, mode="shared", waited=0.0),
        event("released", held=1.0, cause=protocol.Cause.REQUESTED),
        event("released", held=2.0, reason="its client went away", cause=protocol.Cause.CLIENT_GONE),
        event("released", held=2.0, cause=protocol.Cause.RELEASED_BY_OTHER),
        event("released", held=2.0, reason="lockd stopped", cause=protocol.Cause.DAEMON_STOPPED),
        event("lost", held=1.0, reason="forcibly released again", cause=protocol.Cause.FORCED),
        event("lost", held=1.0, reason="internal error", cause=protocol.Cause.INTERNAL),
        # Counted by cause, whatever the reason says.
        event("lost", held=40.0, reason="not let go", cause=protocol.Cause.OVERDUE),
        event("lost", held=1.0, reason="shutting down", cause=protocol.Cause.DAEMON_STOPPED),
        event(
            "lost", held=1.0, reason="etcd lease could not be kept alive (no renewal was answered in time)",
            cause=protocol.Cause.BACKEND,
        ),
        event("lost", held=0.0, reason="out of file descriptors", cause=protocol.ErrorCode.LIMIT),
        event("broken", held=10.0, reason="forcibly released by uid 0"),
        event("refused", reason="busy", waited=0.0),
        event("refused", reason="timeout", waited=5.0),
        event("refused", reason="slots_mismatch", waited=0.0),
    ]:
        metrics.observe(observed)
    got = samples(metrics)
    assert {mode: got["lockd_grants_total", (("mode", mode),)] for mode in ("exclusive", "shared", "semaphore")} == {
        "exclusive": 1, "shared": 1, "semaphore": 1,
    }
    releases = ("requested", "by_other", "abandoned", "shutdown")
    assert [got["lockd_releases_total", (("reason", r),)] for r in releases] == [1, 1, 1, 1]
    losses = ("forced", "overdue", "shutdown", "backend", "internal", "limit")
    assert [got["lockd_losses_total", (("reason", r),)] for r in losses] == [1, 1, 1, 1, 1, 1]
    assert got["lockd_breaks_total", ()] == 1
    assert [got["lockd_refusals_total", (("code", c),)] for c in ("busy", "timeout", "slots_mismatch")] == [1, 1, 1]
    assert got["lockd_refusals_total", (("code", "permission_denied"),)] == 0
    # Waits of grants only; holds of the ends only (a break is not an end).
    assert (got["lockd_wait_seconds_count", ()], got["lockd_wait_seconds_sum", ()]) == (3, pytest.approx(0.203))
    assert got["lockd_wait_seconds_bucket", (("le", "0.005"),)] == 2
    assert (got["lockd_hold_seconds_count", ()], got["lockd_hold_seconds_sum", ()]) == (10, 51.0)
    assert got["lockd_connections", ()] == 3


def test_no_series_names_a_lock_unless_its_name_matches_a_configured_glob() -> None:
    unnamed, named = Metrics(), Metrics(["site-*", "db"])
    h = Harness(arrivals=named.note)
    h.acquire(h.connect("a"), 1, "site-a")
    for name in ("site-a", "db", "dbx", "other"):
        for metrics in (unnamed, named):
            metrics.observe(event("granted", name, waited=0.0))
    assert not any(dict(labels).get("name") for _, labels in samples(unnamed, h.service))
    got = samples(named, h.service)
    assert {dict(labels)["name"] for _, labels in got if "name" in dict(labels)} == {"site-a", "db"}
    assert got["lockd_name_grants_total", (("mode", "exclusive"), ("name", "db"))] == 1
    assert got["lockd_name_leases_held", (("mode", "exclusive"), ("name", "site-a"))] == 1
    assert got["lockd_name_leases_held", (("mode", "exclusive"), ("name", "db"))] == 0
    assert got["lockd_grants_total", (("mode", "exclusive"),)] == 4


def test_a_name_held_or_awaited_but_never_granted_since_the_start_still_has_its_series() -> None:
    metrics = Metrics(["db"])
    h = Harness(arrivals=metrics.note, grant=False)
    h.clock.now = 5.0
    h.acquire(h.connect("first"), 1, "db")
    h.clock.now = 7.0
    h.acquire(h.connect("second"), 1, "db", mode="shared")
    got = samples(metrics, h.service, now=10.0)
    assert got["lockd_name_waiters", (("mode", "exclusive"), ("name", "db"))] == 1
    assert got["lockd_name_waiters", (("mode", "shared"), ("name", "db"))] == 1
    assert got["lockd_name_waiter_oldest_waiting_seconds", (("name", "db"),)] == 5.0
    assert got["lockd_name_grants_total", (("mode", "exclusive"), ("name", "db"))] == 0


def test_gauges_count_holders_and_waiters_per_name_by_mode_with_the_oldest_ages() -> None:
    h = Harness()
    h.clock.now = 1.0
    h.acquire(h.connect("w"), 1, "x", "y")  # holds two names
    h.clock.now = 2.0
    h.acquire(h.connect("r1"), 1, "z", mode="shared")
    h.clock.now = 3.0
    h.acquire(h.connect("r2"), 1, "x", mode="shared")  # waits behind w
    h.clock.now = 4.0
    h.acquire(h.connect("s1"), 1, "pool", slots={"pool": 1})
    h.clock.now = 6.0
    h.acquire(h.connect("s2"), 1, "pool", slots={"pool": 1})
    got = samples(Metrics(), h.service, now=10.0)
    held = {mode: got["lockd_leases_held", (("mode", mode),)] for mode in ("exclusive", "shared", "semaphore")}
    waiting = {mode: got["lockd_waiters", (("mode", mode),)] for mode in ("exclusive", "shared", "semaphore")}
    assert held == {"exclusive": 2, "shared": 1, "semaphore": 1}
    assert waiting == {"exclusive": 0, "shared": 1, "semaphore": 1}
    assert got["lockd_lease_oldest_held_seconds", ()] == 9.0
    assert got["lockd_waiter_oldest_waiting_seconds", ()] == 7.0


def test_a_request_the_flock_backend_still_takes_behind_an_outside_holder_is_a_waiter() -> None:
    h = Harness(grant=False)
    h.clock.now = 1.0
    h.acquire(h.connect("a"), 1, "x")
    got = samples(Metrics(["x"]), h.service, now=10.0)
    assert got["lockd_leases_held", (("mode", "exclusive"),)] == 0
    assert got["lockd_waiters", (("mode", "exclusive"),)] == 1
    assert (got["lockd_lease_oldest_held_seconds", ()], got["lockd_waiter_oldest_waiting_seconds", ()]) == (0, 9.0)


def test_where_the_backend_orders_requests_a_ticket_it_still_takes_is_a_waiter() -> None:
    h = Harness(ordered=True)
    h.clock.now = 1.0
    h.acquire(h.connect("a"), 1, "x")
    h.grant = False
    h.clock.now = 2.0
    h.acquire(h.connect("b"), 1, "x")
    got = samples(Metrics(), h.service, now=10.0)
    assert got["lockd_leases_held", (("mode", "exclusive"),)] == 1
    assert got["lockd_waiters", (("mode", "exclusive"),)] == 1
    assert (got["lockd_lease_oldest_held_seconds", ()], got["lockd_waiter_oldest_waiting_seconds", ()]) == (9.0, 8.0)


def test_renders_less_than_a_second_apart_share_one_text() -> None:
    metrics = Metrics()
    first = metrics.render(Idle(), 1, 100.0)
    metrics.observe(event("granted", waited=0.0))
    assert metrics.render(Idle(), 2, 100.0 + CACHE_SECONDS / 2) is first
    assert samples(metrics, now=100.0 + CACHE_SECONDS)["lockd_grants_total", (("mode", "exclusive"),)] == 1


def test_the_build_the_descriptors_and_dropped_subscriptions_are_shown() -> None:
    class Dropping(Idle):
        subscriptions_dropped = 2

    got = samples(Metrics(backend="etcd"), Dropping())
    assert got["lockd_build_info", (("backend", "etcd"), ("version", __version__))] == 1
    assert got["lockd_subscriptions_dropped_total", ()] == 2
    assert 0 < got["process_open_fds", ()] < got["process_max_fds", ()]


def test_many_names_that_do_not_match_are_forgotten_not_kept() -> None:
    metrics = Metrics(["db"])
    for number in range(10_000):
        metrics.observe(event("granted", f"job-{number}", waited=0.0))
    assert len(metrics._unmatched) <= 4096
    assert not any("name" in dict(labels) for _, labels in samples(metrics))


class FakeHistory:
    backlog = 12
    dropped = 3


class FakeEtcd:
    def __init__(self) -> None:
        txn = Histogram([0.01, 0.1])
        txn.observe(0.05)
        self.request_seconds = {"kv/txn": txn}

    def lease_state(self) -> tuple[bool, float | None]:
        return True, 1.25


def test_the_history_writer_and_the_etcd_session_are_read_where_given() -> None:
    got = samples(Metrics(history=FakeHistory(), etcd=FakeEtcd()))
    assert (got["lockd_history_backlog", ()], got["lockd_history_dropped_total", ()]) == (12, 3)
    assert (got["lockd_etcd_lease_alive", ()], got["lockd_etcd_keepalive_age_seconds", ()]) == (1, 1.25)
    assert got["lockd_etcd_request_seconds_bucket", (("call", "kv/txn"), ("le", "0.1"))] == 1
    assert not any(name.startswith(("lockd_history", "lockd_etcd")) for name, _ in samples(Metrics()))


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9750", ListenAddress(None, "127.0.0.1", 9750)),
        ("[::1]:9750", ListenAddress(None, "::1", 9750)),
        ("localhost:1", ListenAddress(None, "localhost", 1)),
        ("unix:/run/lockd/metrics.sock", ListenAddress(Path("/run/lockd/metrics.sock"))),
    ],
)
def test_listen_addresses_parse(text: str, address: ListenAddress) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize("text", ["9750", ":9750", "host:", "host:0", "host:65536", "host:x", "unix:relative", "[::1]"])
def test_bad_listen_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT|absolute path"):
        listen_address(text)


# --- the HTTP responder ---------------------------------------------------------------------


def respond(head: bytes) -> tuple[str, dict[str, str], bytes]:
    answer = metrics_http._respond(head, lambda: b"lockd_up 1\n")
    top, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = top.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in headers), body


def test_get_metrics_is_answered_with_the_exposition_and_the_connection_closes() -> None:
    status, headers, body = respond(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == ("HTTP/1.1 200 OK", b"lockd_up 1\n")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert (headers["Content-Length"], headers["Connection"]) == ("11", "close")
    status, headers, body = respond(b"HEAD /metrics HTTP/1.0\n\n")
    assert (status, headers["Content-Length"], body) == ("HTTP/1.1 200 OK", "11", b"")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metrics/x HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", "505 HTTP Version Not Supported"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * metrics_http.MAX_HEAD, "431 Request Header Fields Too Large"),
    ],
)
def test_anything_else_gets_an_error_status(head: bytes, status: str) -> None:
    got, headers, _ = respond(head)
    assert got == f"HTTP/1.1 {status}"
    assert headers["Connection"] == "close"
    if status.startswith("405"):
        assert headers["Allow"] == "GET, HEAD"


def test_a_failing_render_is_a_500_not_a_dead_listener() -> None:
    def broken() -> bytes:
        raise RuntimeError("bug")

    assert metrics_http._respond(b"GET /metrics HTTP/1.1\r\n\r\n", broken).startswith(b"HTTP/1.1 500 ")


@asynccontextmanager
async def listening(tmp_path: Path) -> AsyncIterator[str]:
    """A metrics listener on a Unix socket in `tmp_path`, serving until the block ends; its
    path."""
    path = tmp_path / "m.sock"
    listener = metrics_http.bind(ListenAddress(path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics_http.serve, listener, lambda: b"lockd_up 1\n")
        yield str(path)
        nursery.cancel_scope.cancel()
    assert listener.fileno() == -1


async def test_a_client_that_sends_nothing_is_told_408_then_cut_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with listening(tmp_path) as path:
        silent = await trio.open_unix_socket(path)
        started = trio.current_time()
        assert (await silent.receive_some()).startswith(b"HTTP/1.1 408 ")
        assert trio.current_time() - started == pytest.approx(metrics_http.REQUEST_TIMEOUT)
        assert await silent.receive_some() == b""
        await silent.aclose()


async def test_idle_connections_holding_every_slot_are_evicted_oldest_first_for_a_scrape(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with listening(tmp_path) as path:
        idle = []
        for _ in range(metrics_http.MAX_CLIENTS):
            idle.append(await trio.open_unix_socket(path))
            await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        scraper = await trio.open_unix_socket(path)
        await scraper.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await scraper.receive_some()).startswith(b"HTTP/1.1 200 ")
        assert trio.current_time() == started  # served at once, not after the idle ones timed out
        assert await idle[0].receive_some() == b""  # evicted, unanswered
        # The others still have their slots: the next oldest is evicted for the next one.
        await idle[1].send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await idle[1].receive_some()).startswith(b"HTTP/1.1 200 ")
        for stream in [*idle, scraper]:
            await stream.aclose()


def test_binding_where_something_else_listens_says_which_option_to_change(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=rf"metrics.listen: cannot listen on 127.0.0.1:{port}"):
            metrics_http.bind(ListenAddress(None, "127.0.0.1", port))
    finally:
        taken.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="choose another metrics.listen"):
        metrics_http.bind(ListenAddress(tmp_path / "file"))
