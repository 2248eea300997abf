"""The workloads W1–W7 (W3 also on a counting semaphore; W6 against lockd alone), the flood
and the CLI start-up measure, each runnable against lockd and its floors.

Invariant: a workload function measures one system once and returns plain numbers (JSON
types); it starts and ends every process it creates, and bounds every wait, so a stuck
system fails the run with an error instead of hanging it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lockd_client.errors import LockdError

from lockd import loglimit

from .lockers import EtcdGateway, EtcdLockLocker, Locker, RawLockdLocker, b64, make_async_locker, make_locker
from .machine import REPO, EtcdProbe, ProcessProbe
from .services import Service
from .stats import latency_summary

#: A worker must be connected within this long, and report within this long after its end.
WORKER_TIMEOUT = 60.0
#: Untimed cycles before a timed run, so first-use costs (file creation, caches) stay out.
WARMUP_CYCLES = 200
#: How long W5 waits for the waiter to hold the lock after the kill: above any lease TTL it meets.
W5_TIMEOUT = 30.0


# --- W1: one client, one name ----------------------------------------------------------------


def w1_cycles(
    locker: Locker, name: str, cycles: int, server: ProcessProbe | None, etcd: EtcdProbe | None = None
) -> dict[str, Any]:
    """Time `cycles` acquire+release cycles one by one; with `server`, its CPU per cycle; with
    `etcd`, etcd's CPU, requests (by method) and writes per cycle."""
    acquire, release, clock = locker.acquire, locker.release, time.perf_counter_ns
    for _ in range(WARMUP_CYCLES):
        release(acquire(name))
    samples = [0] * cycles
    # Read before the server's CPU, so the metrics request's own cost stays out of it.
    etcd_before = etcd.counters() if etcd else Counter()
    etcd_cpu_before = etcd.process.cpu_ns() if etcd else 0
    cpu_before = server.cpu_ns() if server else 0
    started = clock()
    for i in range(cycles):
        t = clock()
        release(acquire(name))
        samples[i] = clock() - t
    elapsed = clock() - started
    result = _w1_figures(samples, elapsed, server, cpu_before)
    if etcd:
        result["etcd_cpu_us_per_cycle"] = (etcd.process.cpu_ns() - etcd_cpu_before) / cycles / 1000
        done = etcd.counters()
        done.subtract(etcd_before)
        result["etcd_writes_per_cycle"] = done.pop("proposals") / cycles
        result["etcd_requests_per_cycle"] = {m: n / cycles for m, n in sorted(done.items()) if n}
        result["etcd_requests_total_per_cycle"] = sum(done.values()) / cycles
    return result


def w1_cycles_async(spec: dict[str, Any], name: str, cycles: int, server: ProcessProbe | None) -> dict[str, Any]:
    """`w1_cycles` through an async locker (`lockers.ASYNC_KINDS`), in a trio run of its own."""
    import trio

    async def run() -> dict[str, Any]:
        locker = await make_async_locker(spec)
        try:
            acquire, release, clock = locker.acquire, locker.release, time.perf_counter_ns
            for _ in range(WARMUP_CYCLES):
                await release(await acquire(name))
            samples = [0] * cycles
            cpu_before = server.cpu_ns() if server else 0
            started = clock()
            for i in range(cycles):
                t = clock()
                await release(await acquire(name))
                samples[i] = clock() - t
            return _w1_figures(samples, clock() - started, server, cpu_before)
        finally:
            await locker.aclose()

    return trio.run(run)


def _w1_figures(samples: list[int], elapsed: int, server: ProcessProbe | None, cpu_before: int) -> dict[str, Any]:
    """W1's latencies and rate from the cycles' `samples` (ns) over `elapsed` (ns); with `server`,
    its CPU per cycle since `cpu_before`."""
    cycles = len(samples)
    result = latency_summary(samples) | {"cycles_per_s": cycles / (elapsed / 1e9)}
    if server:
        result["server_cpu_us_per_cycle"] = (server.cpu_ns() - cpu_before) / cycles / 1000
    return result


# --- worker fleets (W2, W3) ------------------------------------------------------------------


def _spawn_worker(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    """A line from the worker, or RuntimeError if it has none before `deadline` (monotonic)."""
    assert proc.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not box or not box[0]:
        raise RuntimeError(f"benchmark worker {proc.pid} said nothing in time (exit status {proc.poll()})")
    return box[0]


class Fleet:
    """One worker process per entry of `names`, each working on that name; created connected
    and ready. `run` has them all measure over the same `seconds`; `close` ends them."""

    def __init__(self, locker: dict[str, Any], workload: str, names: list[str], seconds: float, **spec: Any) -> None:
        self.seconds = seconds
        self.workers = [_spawn_worker({"locker": locker, "workload": workload, "name": n, **spec}) for n in names]
        try:
            deadline = time.monotonic() + WORKER_TIMEOUT
            for w in self.workers:
                if _readline(w, deadline).strip() != "ready":
                    raise RuntimeError(f"benchmark worker {w.pid} failed to start")
        except BaseException:
            self.close()
            raise

    def run(self) -> list[dict[str, Any]]:
        """Start all workers 200 ms from now; their results, in `names` order."""
        start = time.monotonic_ns() + 200_000_000
        end = start + int(self.seconds * 1e9)
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"go {start} {end}\n")
            w.stdin.flush()
        deadline = time.monotonic() + 0.2 + self.seconds + WORKER_TIMEOUT
        results = [json.loads(_readline(w, deadline)) for w in self.workers]
        for w in self.workers:
            w.wait(WORKER_TIMEOUT)
        return results

    def close(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)


def run_fleet(
    locker: dict[str, Any], workload: str, names: list[str], seconds: float, server: ProcessProbe | None,
    **spec: Any,
) -> tuple[list[dict[str, Any]], int | None]:
    """The workers' results, and the server's CPU time (ns) over the measured interval (None
    without `server`): from just before the start signal, so connecting stays out of it.
    `spec` goes to every worker."""
    fleet = Fleet(locker, workload, names, seconds, **spec)
    try:
        cpu_before = server.cpu_ns() if server else 0
        results = fleet.run()
        return results, (server.cpu_ns() - cpu_before if server else None)
    finally:
        fleet.close()


def _cpu_figures(results: list[dict[str, Any]], server_ns: int | None, count: int, per: str) -> dict[str, Any]:
    """CPU time per cycle or grant (`per`) of the clients together and of the server."""
    out = {f"client_cpu_us_per_{per}": sum(r["cpu_ns"] for r in results) / max(count, 1) / 1000}
    if server_ns is not None:
        out[f"server_cpu_us_per_{per}"] = server_ns / max(count, 1) / 1000
    return out


def w2_throughput(
    locker: dict[str, Any], clients: int, seconds: float, server: ProcessProbe | None
) -> dict[str, Any]:
    """`clients` processes, one name each, cycling for `seconds`: total cycles/s."""
    results, server_ns = run_fleet(locker, "cycle", [f"w2-{i}" for i in range(clients)], seconds, server)
    total = sum(r["cycles"] for r in results)
    out: dict[str, Any] = {"cycles_per_s": total / seconds, "clients": clients, "seconds": seconds}
    out |= _cpu_figures(results, server_ns, total, "cycle")
    if server_ns is not None:
        out["server_cpu_share"] = server_ns / (seconds * 1e9)
    return out


def w3_fairness(
    locker: dict[str, Any], clients: int, seconds: float, server: ProcessProbe | None = None
) -> dict[str, Any]:
    """`clients` processes on one exclusive name, releasing as soon as granted.

    Handoff latency: from the holder's release call to the next holder's acquire returning,
    over grants that changed hands. `other_share`: grants that went to another client than
    the previous holder's — with every client always back in line, FIFO makes this ~1.
    `fifo_inversions` (lockd only): grants made to a request sent after the daemon had
    already queued another request that was granted later — proof of barging, with no
    allowance needed for clocks or scheduling (see `_inversions`).
    """
    results, server_ns = run_fleet(locker, "grants", ["w3"] * clients, seconds, server)
    grants = sorted(
        (t_acq, t_rel, t_req, t_queued, token, who)
        for who, r in enumerate(results)
        for t_acq, t_rel, t_req, t_queued, token in zip(
            r["t_acq"], r["t_rel"], r["t_req"], r["t_queued"], r["token"], strict=True
        )
    )
    handoffs = [b[0] - a[1] for a, b in itertools.pairwise(grants) if a[5] != b[5]]
    tokens = [g[4] for g in grants]
    out: dict[str, Any] = {
        "grants_per_s": len(grants) / seconds,
        "grants": len(grants),
        "other_share": len(handoffs) / (len(grants) - 1) if len(grants) > 1 else 0.0,
        "handoff": latency_summary(handoffs),
        "fifo_inversions": _inversions(grants) if results[0]["reports_queue"] else None,
        "per_client_grants": [len(r["t_acq"]) for r in results],
    }
    out |= _cpu_figures(results, server_ns, len(grants), "grant")
    if None not in tokens:
        out["tokens_increase"] = all(a < b for a, b in itertools.pairwise(tokens))
    return out


def _inversions(grants: list[tuple]) -> int:
    """How many grants (in grant order) went to a request sent after a later-granted request
    was known to be queued.

    A request is queued no later than its `Queued` notice arrived, or — granted at once —
    than its grant returned. A request sent after that instant joined the queue behind it,
    so granting it first is barging, whatever the scheduling of the processes.
    """
    count = 0
    earliest_known_later = float("inf")
    for t_acq, _, t_req, t_queued, _, _ in reversed(grants):
        if earliest_known_later < t_req:
            count += 1
        earliest_known_later = min(earliest_known_later, t_queued if t_queued is not None else t_acq)
    return count


def w3_slots(
    locker: dict[str, Any], clients: int, seconds: float, server: ProcessProbe | None = None
) -> dict[str, Any]:
    """W3 on a counting semaphore (`locker` with "slots": N), or without slots on a lock as
    its reference, measured alike so the two compare: `clients` processes on one name,
    releasing as soon as granted.

    Grants are taken in the daemon's order, their tokens'. Handoff latency: for each grant
    that waited, from the release call that freed its slot to the acquire returning. Slots
    are interchangeable, so in time order each grant takes the slot of the oldest release no
    grant has followed yet, or one never used. `most_holders`: the most clients between
    acquire returning and their release call at one instant, which the daemon bounds by N.
    `fifo_inversions` as in `w3_fairness`.
    """
    results, server_ns = run_fleet(locker, "grants", ["w3s"] * clients, seconds, server)
    grants = sorted(
        ((t_acq, t_rel, t_req, t_queued, token, who)
         for who, r in enumerate(results)
         for t_acq, t_rel, t_req, t_queued, token in zip(
             r["t_acq"], r["t_rel"], r["t_req"], r["t_queued"], r["token"], strict=True
         )),
        key=lambda grant: grant[4],
    )
    # At one instant a release goes before a grant: it may be the one that let the grant in.
    events = sorted([(g[1], 0, None) for g in grants] + [(g[0], 1, g[3]) for g in grants])
    freed: deque[int] = deque()
    handoffs = []
    holders = most_holders = 0
    for at, is_grant, queued in events:
        if not is_grant:
            freed.append(at)
            holders -= 1
            continue
        holders += 1
        most_holders = max(most_holders, holders)
        if freed:
            released = freed.popleft()
            if queued is not None:
                handoffs.append(at - released)
    out: dict[str, Any] = {
        "grants_per_s": len(grants) / seconds,
        "grants": len(grants),
        "waited_share": sum(g[3] is not None for g in grants) / max(len(grants), 1),
        "handoff": latency_summary(handoffs),
        "fifo_inversions": _inversions(grants),
        "most_holders": most_holders,
        "tokens_unique": len({g[4] for g in grants}) == len(grants),
        "per_client_grants": [len(r["t_acq"]) for r in results],
    }
    return out | _cpu_figures(results, server_ns, len(grants), "grant")


# --- W4: many leases at once -----------------------------------------------------------------


#: W4 pipelined: requests the trio client keeps in flight on its one connection.
W4_IN_FLIGHT = 16


def w4_many(locker: Locker, leases: int, server: ProcessProbe) -> dict[str, Any]:
    """Hold `leases` distinct names at once on one connection, acquired one after the other,
    or as many as the daemon grants before refusing one: then `held` says how many and
    `error` how it refused."""
    rss_before, fds_before = server.rss_kib(), server.fds()
    handles = []
    error = None
    started = time.perf_counter()
    try:
        for i in range(leases):
            handles.append(locker.acquire(f"w4-{i}"))
    except LockdError as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    return _w4_figures(leases, len(handles), error, elapsed, server, rss_before, fds_before)


def w4_pipelined(socket_path: str, leases: int, server: ProcessProbe) -> dict[str, Any]:
    """`w4_many` through the trio client: W4_IN_FLIGHT tasks share one connection, so that
    many acquires are in flight at once, as a program taking many leases would do it."""
    import trio
    from lockd_client import trio_client

    async def run() -> dict[str, Any]:
        async with trio_client.connect(socket_path, label="bench") as client:
            rss_before, fds_before = server.rss_kib(), server.fds()
            held: list[trio_client.Lease] = []
            errors: list[str] = []

            async def acquire_every(first: int) -> None:
                for i in range(first, leases, W4_IN_FLIGHT):
                    held.append(await client.acquire(f"w4-{i}"))

            started = time.perf_counter()
            try:
                async with trio.open_nursery() as nursery:
                    for first in range(W4_IN_FLIGHT):
                        nursery.start_soon(acquire_every, first)
            except* LockdError as refused:
                errors += [f"{type(exc).__name__}: {exc}" for exc in refused.exceptions]
            elapsed = time.perf_counter() - started
            first_error = errors[0] if errors else None
            return _w4_figures(leases, len(held), first_error, elapsed, server, rss_before, fds_before)

    return trio.run(run)


def _w4_figures(
    leases: int, held: int, error: str | None, elapsed: float, server: ProcessProbe, rss_before: int, fds_before: int
) -> dict[str, Any]:
    rss_after, fds_after = server.rss_kib(), server.fds()
    return {
        "leases": leases,
        "held": held,
        "error": error,
        "seconds": elapsed,
        "leases_per_s": held / elapsed,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
        "fds_before": fds_before,
        "fds_after": fds_after,
    }


# --- W7: a burst of clients at once ----------------------------------------------------------


#: How long a W7 burst may take before the run fails: far beyond any figure it gives.
W7_BUDGET = 120.0


def w7_burst(locker: dict[str, Any], clients: int, processes: int, server: ProcessProbe | None) -> dict[str, Any]:
    """`clients` clients, `processes` processes with as many threads each, that all connect
    (for lockd) and acquire one name at the same instant and release it at once: how many
    held it, and when; with `server` (a fresh daemon), its RSS and fds once all are gone."""
    if server is not None:
        rss_before, fds_before = server.rss_kib(), server.fds()
    results, server_ns = run_fleet(
        locker, "burst", ["w7"] * processes, W7_BUDGET, server, clients=clients // processes
    )
    start = results[0]["start"]
    connected = [t - start for r in results for t in r["connected"] if t is not None]
    held = [t - start for r in results for t in r["held"] if t is not None]
    out: dict[str, Any] = {
        "clients": clients // processes * processes,
        "processes": processes,
        "held": len(held),
        "errors": sorted({e for r in results for e in r["errors"]}),
        "last_holds_s": max(held, default=math.nan) / 1e9,
        "connected": latency_summary(connected),
        "holds": latency_summary(held),
        "waited_over_1s_to_connect": sum(t > 1e9 for t in connected),
    }
    if server is not None:
        deadline = time.monotonic() + WORKER_TIMEOUT
        while server.fds() > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon has yet to see some clients hang up
        out |= {
            "server_cpu_s": server_ns / 1e9,
            "rss_before_mib": rss_before / 1024,
            "rss_after_mib": server.rss_kib() / 1024,
            "fds_before": fds_before,
            "fds_after": server.fds(),
        }
    return out


# --- flood: bad connections while a client cycles ----------------------------------------------


def flood(daemon: Service, connections: int, flooders: int, idle_cycles: int) -> dict[str, Any]:
    """`connections` bad connections from `flooders` processes, each cut off by `daemon`
    (logging at info), while one client cycles acquire+release on one name: its latency
    then against `idle_cycles` cycles before, and the lines the flood added to the daemon's
    log (counted after stopping the daemon, which logs the last summaries on the way out)."""
    server = daemon.probe
    locker = make_locker({"kind": "lockd", "socket": daemon.socket})
    try:
        idle = w1_cycles(locker, "flood", idle_cycles, server)
        fds_idle = server.fds()
        lines_before = _lines(daemon.log_path)
        workers = [
            _spawn_worker({"workload": "flood", "socket": daemon.socket, "count": connections // flooders})
            for _ in range(flooders)
        ]
        try:
            deadline = time.monotonic() + WORKER_TIMEOUT
            for w in workers:
                if _readline(w, deadline).strip() != "ready":
                    raise RuntimeError(f"flood worker {w.pid} failed to start")
            start = time.monotonic_ns() + 200_000_000
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(f"go {start} {start}\n")
                w.stdin.flush()
            cpu_before = server.cpu_ns()
            _wait_until_ns(start)
            samples = _cycle_while(locker, "flood", lambda: any(w.poll() is None for w in workers))
            ended = [json.loads(_readline(w, time.monotonic() + WORKER_TIMEOUT)) for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                w.wait(10)
        deadline = time.monotonic() + WORKER_TIMEOUT
        while server.fds() > fds_idle and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon has yet to cut off the last of them
        server_ns = server.cpu_ns() - cpu_before
    finally:
        locker.close()
    daemon.stop()
    seconds = max(e["seconds"] for e in ended)
    during = latency_summary(samples)
    return {
        "connections": connections // flooders * flooders,
        "flooders": flooders,
        "seconds": seconds,
        "connections_per_s": connections / seconds,
        "server_cpu_us_per_connection": server_ns / 1000 / connections,
        "idle": idle,
        "during": during,
        "p99_ratio": during["p99_us"] / idle["p99_us"],
        "log_lines": _lines(daemon.log_path) - lines_before,
        # loglimit's bound for the one kind a cut-off is, over the windows the flood touched,
        # and the line saying the daemon stops.
        "log_line_bound": (loglimit.LINES + 1) * (math.ceil(seconds / loglimit.WINDOW) + 2) + 1,
    }


def _cycle_while(locker: Locker, name: str, going: Callable[[], bool]) -> list[int]:
    """Time acquire+release cycles one by one while `going()` (asked every 100 cycles)."""
    acquire, release, clock = locker.acquire, locker.release, time.perf_counter_ns
    samples: list[int] = []
    while going():
        for _ in range(100):
            t = clock()
            release(acquire(name))
            samples.append(clock() - t)
    return samples


def _wait_until_ns(instant: int) -> None:
    while (left := instant - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


# --- W5: a holder is killed while a waiter waits ---------------------------------------------


def w5_crash(
    locker: dict[str, Any], tries: int, is_waiting: Callable[[str], bool]
) -> dict[str, Any]:
    """SIGKILL a holder process while this process waits for its lock: time until held.

    `is_waiting(name)` tells when the waiter's request is queued, so the kill never races
    the request.
    """
    samples = []
    waiter = make_locker(locker)
    try:
        for i in range(tries):
            name = f"w5-{i}"
            holder = _spawn_worker({"locker": locker, "workload": "hold", "name": name})
            try:
                if _readline(holder, time.monotonic() + WORKER_TIMEOUT).strip() != "held":
                    raise RuntimeError("W5 holder failed to take its lock")
                got: list[int] = []
                thread = threading.Thread(target=_note_acquired, args=(waiter, name, got), daemon=True)
                thread.start()
                deadline = time.monotonic() + 10
                while not is_waiting(name):
                    if time.monotonic() > deadline:
                        raise RuntimeError("W5 waiter never queued")
                    time.sleep(0.002)
                killed = time.monotonic_ns()
                os.kill(holder.pid, signal.SIGKILL)
                thread.join(W5_TIMEOUT)
                if not got:
                    raise RuntimeError(f"W5 waiter did not get the lock within {W5_TIMEOUT:g} s of the kill")
                samples.append(got[0] - killed)
            finally:
                holder.kill()
                holder.wait(10)
    finally:
        waiter.close()
    summary = latency_summary(samples)
    return {"tries": tries, "p50_ms": summary["p50_us"] / 1000, "max_ms": summary["max_us"] / 1000}


def _note_acquired(locker: Locker, name: str, got: list[int]) -> None:
    """Acquire `name`, append the instant it returned to `got`, release."""
    handle = locker.acquire(name)
    got.append(time.monotonic_ns())
    locker.release(handle)


def lockd_waiting(socket_path: str) -> Callable[[str], bool]:
    """`is_waiting` for W5 against a daemon: asks its `status` on a separate connection."""
    observer = RawLockdLocker(socket_path, label="bench-observer")
    return lambda name: observer.waiters(name) > 0


def flock_waiting(lock_dir: str) -> Callable[[str], bool]:
    """`is_waiting` for W5 against flock: a blocked request on the file's inode in /proc/locks."""

    def waiting(name: str) -> bool:
        inode = os.stat(os.path.join(lock_dir, name + ".lock")).st_ino
        return any(
            "->" in line and line.split()[-3].endswith(f":{inode}")
            for line in Path("/proc/locks").read_text().splitlines()
        )

    return waiting


def etcd_lock_waiting(url: str) -> Callable[[str], bool]:
    """`is_waiting` for W5 against etcd's lock API: a second key under the name's prefix (the
    holder's and the waiter's), read on a connection of its own."""
    gateway = EtcdGateway(url)

    def waiting(name: str) -> bool:
        prefix = EtcdLockLocker.PREFIX + name + "/"
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = gateway.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
        return int(answer.get("count", 0)) >= 2

    return waiting


# --- CLI -------------------------------------------------------------------------------------


def cli_startup(commands: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, Any]:
    """Wall time of each command from spawn to exit, runs interleaved so drift hits all alike."""
    samples: dict[str, list[int]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            samples[label].append(_time_command(argv, env))
    return {label: latency_summary(s) for label, s in samples.items()}


def _time_command(argv: list[str], env: dict[str, str], timeout: float = 30.0) -> int:
    """ns from spawning `argv` to its exit, which it must make with status 0.

    The exit is seen through a pidfd the moment it happens: `Popen.wait(timeout)` polls at
    doubling intervals (0.5, 1, 2 … ms), which would round every figure up to the next step.
    """
    started = time.perf_counter_ns()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    pidfd = os.pidfd_open(proc.pid)
    try:
        exited = select.select([pidfd], [], [], timeout)[0]
        elapsed = time.perf_counter_ns() - started
    finally:
        os.close(pidfd)
    if not exited:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(argv)} did not exit within {timeout:g} s")
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return elapsed


# --- W6: a re-exec under load ------------------------------------------------------------------


#: W6: the cycles before the first re-exec, which show what a cycle costs without one.
W6_BASELINE_CYCLES = 2_000
#: W6: how long the cycling goes on after each re-exec before the next, so every stall stands
#: apart and the daemon is back to its steady pace when the next comes.
W6_SETTLE = 1.0


def w6_reexec(
    locker: Locker, socket_path: str, leases: int, connections: int, reexecs: int, server: ProcessProbe,
) -> dict[str, Any]:
    """The stall a cycling client sees while the daemon re-executes: `leases` leases held over
    `connections` connections (as evenly as they divide), then one client cycles
    acquire+release on a name of its own, timing each cycle, while this process asks for
    `reexecs` re-execs one after the other on a connection of its own.

    A re-exec's stall is the longest cycle that overlaps it (from the request sent to the
    `Reexecuted` reply): what the cycling client waited beyond its usual pace. `paused` is
    the daemon's own figure (`Reexecuted.paused`): from the old program's last request
    served to the new one's first; the cycle also pays for the pause's edges (shutting the
    sessions' gate, taking the state, adopting it).
    """
    holders = [RawLockdLocker(socket_path, label=f"w6-holder-{i}") for i in range(connections)]
    admin = RawLockdLocker(socket_path, label="w6-admin")
    try:
        for i in range(leases):
            grant, fds = holders[i % connections].acquire(f"w6-{i}")
            for fd in fds:
                os.close(fd)  # the daemon keeps its own: the lease lasts as long as the connection
        rss, fds_held = server.rss_kib(), server.fds()
        cycles: list[tuple[int, int]] = []
        stop = threading.Event()
        failure: list[BaseException] = []

        def cycle() -> None:
            acquire, release, clock = locker.acquire, locker.release, time.perf_counter_ns
            try:
                while not stop.is_set():
                    t = clock()
                    release(acquire("w6-cycling"))
                    cycles.append((t, clock()))
            except BaseException as exc:  # noqa: BLE001 - reported by the run
                failure.append(exc)

        cycler = threading.Thread(target=cycle, name="w6-cycler", daemon=True)
        cycler.start()
        windows: list[tuple[int, int]] = []
        paused: list[float] = []
        try:
            while len(cycles) < W6_BASELINE_CYCLES and cycler.is_alive():
                time.sleep(0.05)
            for _ in range(reexecs):
                asked = time.perf_counter_ns()
                paused.append(admin.reexec())
                windows.append((asked, time.perf_counter_ns()))
                time.sleep(W6_SETTLE)
        finally:
            stop.set()
            cycler.join(WORKER_TIMEOUT)
        if failure:
            raise RuntimeError(f"W6 cycling client failed: {failure[0]!r}") from failure[0]
        before = [end - start for start, end in cycles if start < windows[0][0]] if windows else []
        stalls = [
            max((end - start for start, end in cycles if start < w_end and end > w_start), default=0)
            for w_start, w_end in windows
        ]
    finally:
        admin.close()
        for holder in holders:
            holder.close()
    return {
        "leases": leases,
        "connections": connections,
        "reexecs": reexecs,
        "rss_mib": rss / 1024,
        "fds": fds_held,
        "baseline": latency_summary(before),
        "stall": latency_summary(stalls),
        "stalls_ms": [s / 1e6 for s in stalls],
        "paused": latency_summary([int(p * 1e9) for p in paused]),
        "paused_ms": [p * 1000 for p in paused],
    }
