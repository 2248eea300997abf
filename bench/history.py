"""`python -m bench.history`: the history's writer alone, as the daemon runs it.

Invariant: what is measured is lockd.history.HistoryStore itself (its writer thread, its
batches, its database in the directory given), fed events shaped like those of a W2 run (32
names, granted and released in turn), so a change to the store shows here first, away from
the noise of client processes. Two measures, repeated and interleaved:

- *flood*: N events recorded at once; the time until the writer has written them all, and
  its thread's CPU time (`/proc/self/task/TID/schedstat`, SQLite's work included) per event.
- *paced*: this thread plays the event loop, a unit of Python work then a system call that
  lets the interpreter's lock go (as trio's epoll and socket calls do), recording events at
  the rate given, for some seconds, and once more with no store. The loop's units lost per
  event, in µs of the loop's time, are what the writer took from it (its turns holding the
  interpreter's lock, and the handoffs); the writer's CPU per event is beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lockd_client import protocol

from lockd import history
from lockd.config import HistorySection

NAMES = [f"bench-w2-{n:02d}" for n in range(32)]


def events(count: int) -> list[protocol.LeaseEvent]:
    """`count` events as a W2 run records them: each name granted then released, in turn."""
    uid, pid, now = os.getuid(), os.getpid(), time.time()
    out = []
    for n in range(count):
        name = NAMES[n // 2 % len(NAMES)]
        if n % 2 == 0:
            out.append(protocol.LeaseEvent(
                now + n * 1e-5, "granted", name, "exclusive", None, n, pid, uid, None,
                "python -m bench.worker lockd /tmp/lockd.sock", None, 2e-5, None, None, None, None,
            ))
        else:
            out.append(protocol.LeaseEvent(
                now + n * 1e-5, "released", name, "exclusive", None, n - 1, pid, uid, None,
                "python -m bench.worker lockd /tmp/lockd.sock", None, 2e-5, 3e-5, "released", None,
                protocol.Cause.REQUESTED,
            ))
    return out


def _cpu(thread: threading.Thread) -> float:
    """Seconds `thread` has run on a CPU."""
    with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def _writer(store: history.HistoryStore) -> threading.Thread:
    thread = store._thread  # noqa: SLF001 - the bench times the store's own thread
    assert thread is not None
    return thread


def flood(root: Path, count: int) -> dict[str, float]:
    """Record `count` events at once into a new store; time the writer until written."""
    recorded = events(count)
    store = history.HistoryStore(root, HistorySection(max_backlog=count + 1))
    store.start()
    try:
        writer = _writer(store)
        cpu0, t0 = _cpu(writer), time.perf_counter()
        for event in recorded:
            store.record(event)
        _written(store)
        wall, cpu = time.perf_counter() - t0, _cpu(writer) - cpu0
    finally:
        store.stop()
    return {"events_per_s": count / wall, "writer_cpu_us_per_event": cpu / count * 1e6}


def _written(store: history.HistoryStore) -> None:
    """Wait until the writer has written every event recorded: what it costs is measured to
    the last one. `flush` gives up after FLUSH_WAIT, sooner than a flood takes."""
    if not store.flush():
        while store.backlog:
            time.sleep(0.01)


#: One unit of the loop's Python work: about what trio spends on a few ready tasks.
_UNIT = 200


def _unit() -> None:
    total = 0
    for n in range(_UNIT):
        total += n
    os.sched_yield()  # a system call, the interpreter's lock let go around it


def paced(root: Path | None, rate: float, seconds: float) -> dict[str, float]:
    """This thread as an event loop recording `rate` events a second into a new store in
    `root` (None: none recorded) for `seconds`: units of work done, and the writer's CPU."""
    recorded = events(int(rate * seconds) + 1)
    store = None
    if root is not None:
        store = history.HistoryStore(root, HistorySection(max_backlog=len(recorded) + 1))
        store.start()
    try:
        cpu0 = _cpu(_writer(store)) if store else 0.0
        units = sent = 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                if store:
                    store.record(recorded[sent])
                sent += 1
            _unit()
            units += 1
        if store:
            _written(store)
            cpu = _cpu(_writer(store)) - cpu0
        else:
            cpu = 0.0
    finally:
        if store:
            store.stop()
    return {"units_per_s": units / seconds, "events": sent, "writer_cpu_us_per_event": cpu / max(sent, 1) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per flood")
    parser.add_argument("--rate", type=float, default=30_000, help="events a second, paced (W2 records about this)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per paced run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where the databases go (default: tmpfs)")
    args = parser.parse_args()
    floods: list[dict[str, float]] = []
    losses: list[float] = []
    writer_paced: list[float] = []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            floods.append(flood(Path(tmp), args.events))
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            bare = paced(None, args.rate, args.seconds)
            on = paced(Path(tmp), args.rate, args.seconds)
        unit_us = 1e6 / bare["units_per_s"]
        # What the loop lost over the run, in µs of its own time, per event recorded.
        losses.append((bare["units_per_s"] - on["units_per_s"]) * args.seconds * unit_us / on["events"])
        writer_paced.append(on["writer_cpu_us_per_event"])
        print(
            f"flood: {floods[-1]['events_per_s']:,.0f} events/s, writer {floods[-1]['writer_cpu_us_per_event']:.2f} "
            f"µs CPU/event; paced {args.rate:,.0f}/s: loop lost {losses[-1]:.2f} µs/event, writer "
            f"{writer_paced[-1]:.2f} µs CPU/event", flush=True,
        )
    summary: dict[str, Any] = {
        "flood_events_per_s": statistics.median(f["events_per_s"] for f in floods),
        "flood_writer_cpu_us_per_event": statistics.median(f["writer_cpu_us_per_event"] for f in floods),
        "paced_loop_lost_us_per_event": statistics.median(losses),
        "paced_writer_cpu_us_per_event": statistics.median(writer_paced),
    }
    print("median: " + ", ".join(f"{k} {v:,.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
