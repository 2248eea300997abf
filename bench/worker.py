"""One benchmark client process: `python -m bench.worker SPEC_JSON`.

Invariant: a worker measures only between the start and end instants its parent gives it
(CLOCK_MONOTONIC, shared by every process on the host), so the workers of one run overlap
exactly and their timestamps can be merged into one timeline.

Every result also holds `cpu_ns`, the worker's CPU time over the measured interval.

Protocol with the parent, one line each way:
  worker → `ready` once its locker is connected (for `hold`: `held` once the lock is held);
  parent → `go START_NS END_NS`;
  worker → one JSON line of results, then exit.
Workloads (an async locker, `lockers.ASYNC_KINDS`, runs `cycle` and `grants` only, in a trio
run, the same way):
  `cycle`  acquire+release `name` back to back; result {"cycles": n}.
  `grants` the same, recording for every grant the instants of the request, of the daemon's
           `Queued` notice if one came (None otherwise), of the grant and of the release call,
           and the fencing token: {"t_req": [...], "t_queued": [...], "t_acq": [...],
           "t_rel": [...], "token": [...], "reports_queue": whether `Queued` is ever seen}.
  `hold`   acquire `name`, say `held`, and keep it until killed.
  `burst`  `clients` threads, each with a locker of its own (for lockd: a connection of its
           own, made at START), acquire `name` once, release it and close:
           {"start": START, "connected": [...], "held": [...], "errors": [...]}, the instants
           each client was connected and held the lock (None where it failed, and why in
           `errors`).
  `flood`  no locker: from START, `count` connections to lockd at `socket` that each send a
           frame lockd must refuse and hang up, one after the other; result {"seconds": s}.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

from .lockers import ASYNC_KINDS, make_async_locker, make_locker


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


async def run_cycles_async(locker, name: str, start: int, end: int) -> dict[str, int]:
    """`run_cycles`, awaited."""
    acquire, release, now = locker.acquire, locker.release, time.monotonic_ns
    cycles = 0
    _wait_until(start)  # blocking: nothing else runs in this trio run
    while now() < end:
        await release(await acquire(name))
        cycles += 1
    return {"cycles": cycles}


async def run_grants_async(locker, name: str, start: int, end: int) -> dict[str, list[int | None]]:
    """`run_grants`, awaited."""
    acquire, release, token, now = locker.acquire, locker.release, locker.token, time.monotonic_ns
    t_req: list[int] = []
    t_queued: list[int | None] = []
    t_acq: list[int] = []
    t_rel: list[int] = []
    tokens: list[int | None] = []
    queued = _FirstCall()
    _wait_until(start)  # blocking: nothing else runs in this trio run
    while (requested := now()) < end:
        handle = await acquire(name, queued)
        acquired = now()
        tokens.append(token(handle))
        t_queued.append(queued.at)
        released = now()
        await release(handle)
        t_req.append(requested)
        t_acq.append(acquired)
        t_rel.append(released)
        queued.at = None
    return {
        "t_req": t_req, "t_queued": t_queued, "t_acq": t_acq, "t_rel": t_rel, "token": tokens,
        "reports_queue": locker.reports_queue,
    }


async def main_async(spec: dict) -> None:
    """`main` for an async locker: connected, `ready`, measured between the instants given."""
    locker = await make_async_locker(spec["locker"])
    print("ready", flush=True)
    _, start, end = sys.stdin.readline().split()  # blocking, as above
    run = {"cycle": run_cycles_async, "grants": run_grants_async}[spec["workload"]]
    cpu = time.process_time_ns()
    result = await run(locker, spec["name"], int(start), int(end))
    result["cpu_ns"] = time.process_time_ns() - cpu
    await locker.aclose()
    print(json.dumps(result), flush=True)


def run_burst(spec: dict) -> dict[str, list]:
    """Start the `burst` clients, say `ready`, and once told to go, let them loose."""
    count = spec["clients"]
    connected: list[int | None] = [None] * count
    held: list[int | None] = [None] * count
    errors: list[str] = []
    go = threading.Event()
    start = 0

    def client(i: int) -> None:
        go.wait()
        _wait_until(start)
        try:
            locker = make_locker(spec["locker"])
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        try:
            connected[i] = time.monotonic_ns()
            handle = locker.acquire(spec["name"])
            held[i] = time.monotonic_ns()
            locker.release(handle)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            locker.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    start = int(sys.stdin.readline().split()[1])
    go.set()
    for thread in threads:
        thread.join()
    return {"start": start, "connected": connected, "held": held, "errors": errors}


#: Frames lockd must refuse: a length prefix of 4 GiB; a one-byte body that is not msgpack.
BAD_FRAMES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1")


def run_flood(path: str, count: int, start: int) -> dict[str, float]:
    _wait_until(start)
    began = time.monotonic()
    for i in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(path)  # blocking: waits in the kernel while lockd's queue is full
            bad.sendall(BAD_FRAMES[i % 2])
    return {"seconds": time.monotonic() - began}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("locker", {}).get("kind") in ASYNC_KINDS:
        import trio

        trio.run(main_async, spec)
        return
    if spec["workload"] == "burst":
        cpu = time.process_time_ns()
        result = run_burst(spec)
        result["cpu_ns"] = time.process_time_ns() - cpu
        print(json.dumps(result), flush=True)
        return
    if spec["workload"] == "flood":
        print("ready", flush=True)
        _, start, _ = sys.stdin.readline().split()
        print(json.dumps(run_flood(spec["socket"], spec["count"], int(start))), flush=True)
        return
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
