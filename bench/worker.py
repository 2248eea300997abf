"""One benchmark client process: `python -m bench.worker SPEC_JSON`.

Invariant: a worker measures only between the start and end instants its parent gives it
(CLOCK_MONOTONIC, shared by every process on the host), so the workers of one run overlap
exactly and their timestamps can be merged into one timeline.

Every result also holds `cpu_ns`, the worker's CPU time over the measured interval.

Protocol with the parent, one line each way:
  worker → `ready` once its locker is connected (for `hold`: `held` once the lock is held);
  parent → `go START_NS END_NS`;
  worker → one JSON line of results, then exit.
Workloads:
  `cycle`  acquire+release `name` back to back; result {"cycles": n}.
  `grants` the same, recording for every grant the instants of the request, of the daemon's
           `Queued` notice if one came (None otherwise), of the grant and of the release call,
           and the fencing token: {"t_req": [...], "t_queued": [...], "t_acq": [...],
           "t_rel": [...], "token": [...], "reports_queue": whether `Queued` is ever seen}.
  `hold`   acquire `name`, say `held`, and keep it until killed.
"""

from __future__ import annotations

import json
import sys
import time

from .lockers import make_locker


def _wait_until(instant_ns: int) -> None:
    while (left := instant_ns - time.monotonic_ns()) > 0:
        time.sleep(min(left / 1e9, 0.01))


def run_cycles(locker, name: str, start: int, end: int) -> dict[str, int]:
    acquire, release, now = locker.acquire, locker.release, time.monotonic_ns
    cycles = 0
    _wait_until(start)
    while now() < end:
        release(acquire(name))
        cycles += 1
    return {"cycles": cycles}


class _FirstCall:
    """An `on_queued` callback that keeps the instant of its first call."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: int | None = None

    def __call__(self) -> None:
        if self.at is None:
            self.at = time.monotonic_ns()


def run_grants(locker, name: str, start: int, end: int) -> dict[str, list[int | None]]:
    acquire, release, token, now = locker.acquire, locker.release, locker.token, time.monotonic_ns
    t_req: list[int] = []
    t_queued: list[int | None] = []
    t_acq: list[int] = []
    t_rel: list[int] = []
    tokens: list[int | None] = []
    queued = _FirstCall() if locker.reports_queue else None
    _wait_until(start)
    while (requested := now()) < end:
        handle = acquire(name, queued)
        acquired = now()
        tokens.append(token(handle))
        t_queued.append(queued.at if queued else None)
        released = now()
        release(handle)
        t_req.append(requested)
        t_acq.append(acquired)
        t_rel.append(released)
        if queued:
            queued.at = None
    return {
        "t_req": t_req, "t_queued": t_queued, "t_acq": t_acq, "t_rel": t_rel, "token": tokens,
        "reports_queue": locker.reports_queue,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    locker = make_locker(spec["locker"])
    if spec["workload"] == "hold":
        locker.acquire(spec["name"])
        print("held", flush=True)
        sys.stdin.read()
        return
    print("ready", flush=True)
    _, start, end = sys.stdin.readline().split()
    run = {"cycle": run_cycles, "grants": run_grants}[spec["workload"]]
    cpu = time.process_time_ns()
    result = run(locker, spec["name"], int(start), int(end))
    # Includes the wait for `start` (sleeps: next to no CPU).
    result["cpu_ns"] = time.process_time_ns() - cpu
    locker.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
