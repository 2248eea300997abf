"""`python -m bench.render [LEASES...]`: what one render of the metrics costs the daemon's
event loop with that many leases live, a tenth of them waiting, and what the census that
makes it cheap adds to the daemon's memory per lease.

The lock service and its table are built directly, with no daemon and no I/O: the figures
are the render's own (and the census's), not a round trip's.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from lockd import metrics as metrics_module
from lockd.backend import Claim
from lockd.config import Limits
from lockd.metrics import Metrics
from lockd.orders import StartTake
from lockd.policy import Policy
from lockd.processes import Processes, ProcessOwner
from lockd.service import LockService
from lockd.table import LockTable

DEFAULT_LEASES = (10_000, 100_000)
#: Leases per connection: well within limits.max_leases_per_connection.
PER_CLIENT = 1_000
#: Names with series of their own: a few, as docs/metrics.md advises.
WATCHED = ("db", "site.com", "backup-nightly")


class _Peer:
    label = None

    def send(self, message: object, fds: object = ()) -> None:
        pass

    def close(self, reason: str) -> None:
        pass

    def offer(self, message: object) -> bool:
        return True


class _Backend:
    name = "flock"
    orders_requests = False
    leases_outlive_daemon = True
    loss_notice = None

    def place_of(self, claim: Claim) -> int | None:
        return None

    def outside_names(self) -> list[str]:
        return []

    def outside_slots(self, name: str) -> int | None:
        return None


def _no_process(pid: int) -> ProcessOwner:
    raise AssertionError("no process is named")


def build(leases: int, metrics: Metrics) -> LockService:
    """A service with `leases` tickets: nine in ten held, one in ten waiting behind one."""
    now = [0.0]
    service = LockService(
        LockTable(), Processes(_no_process), Limits(max_pending_per_uid=leases, max_waiters_per_name=leases),
        Policy((), {0: "root"}), _Backend(), clock=lambda: now[0], wall_clock=lambda: 0.0,
        arrivals=metrics.note,
    )
    uid = 0
    for first in range(0, leases, PER_CLIENT):
        peer = _Peer()
        service.connect(peer, 1000 + first, uid, uid, frozenset({uid}), "bench")  # type: ignore[arg-type]
        for number in range(first, min(first + PER_CLIENT, leases)):
            now[0] += 0.001
            # Every tenth request waits for the name the one before it holds.
            name = f"job-{number - 1 if number % 10 == 9 else number}"
            if number < len(WATCHED):
                name = WATCHED[number]
            service.request(peer, _acquire(number, name))  # type: ignore[arg-type]
            _carry_out(service)
    return service


def _acquire(number: int, name: str) -> object:
    from lockd_client import protocol

    return protocol.Acquire(number, [name])


def _carry_out(service: LockService) -> None:
    """Take every claim at once, as the flock backend does when the file is free."""
    tokens = iter(range(1, 1 << 30))
    while service.orders:
        order = service.orders.popleft()
        if isinstance(order, StartTake) and service.taking(order.claim):
            service.taken(order.claim, [next(tokens) for _ in order.claim.names])


def measure(leases: int) -> dict[str, Any]:
    metrics = Metrics(WATCHED)
    service = build(leases, metrics)
    census = service.census()
    assert census.leases + census.requests == leases, census
    # The first render imports prometheus_client (lockd.metrics_text): once per daemon, not
    # what a render costs.
    metrics.render(service, 1, -2 * metrics_module.CACHE_SECONDS)
    times = []
    for rep in range(7):
        start = time.perf_counter()
        # A render a second apart each time, so the cache serves none of them.
        metrics.render(service, 1, float(rep) * metrics_module.CACHE_SECONDS * 2)
        times.append(time.perf_counter() - start)
    cached = time.perf_counter()
    metrics.render(service, 1, 12 * metrics_module.CACHE_SECONDS + metrics_module.CACHE_SECONDS / 2)
    cached = time.perf_counter() - cached
    return {
        "leases": leases, "render_ms_median": statistics.median(times) * 1e3, "render_ms_max": max(times) * 1e3,
        "cached_render_us": cached * 1e6, "census_bytes_per_lease": _census_bytes(service) / leases,
    }


def _census_bytes(service: LockService) -> int:
    """The memory of the census's queues of tickets (a pointer per entry, in blocks of 64):
    all it keeps per lease; its counts are a few integers whatever the leases."""
    tally = service._tally
    return sum(sys.getsizeof(oldest.entries) for oldest in (tally._by_held, tally._by_waiting))


def main(argv: list[str]) -> int:
    for leases in [int(arg) for arg in argv] or DEFAULT_LEASES:
        got = measure(leases)
        print(
            f"{got['leases']:>7,} leases: render {got['render_ms_median']:.2f} ms median "
            f"({got['render_ms_max']:.2f} max), cached {got['cached_render_us']:.0f} µs; "
            f"census {got['census_bytes_per_lease']:.1f} bytes per lease"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
