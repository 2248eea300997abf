"""`python -m bench.reexec_profile`: where a re-exec's pause goes, phase by phase, under W6's
load (10,000 leases over 1,000 connections, one client cycling).

Invariant: the daemon is the real one, run unchanged: it is started as
`python -m bench.reexec_profile daemon ARGS`, which times a few of lockd's functions by
wrapping them and then runs `lockd.__main__.main(ARGS)`; a re-exec execs the same command
line, so the new program is timed too. Marks are CLOCK_MONOTONIC, which an exec does not
reset, so one timeline spans both programs; each is appended, as one write, to the file
that LOCKD_REEXEC_TIMELINE names (inherited across the exec).

The new program imports, up front, the modules lockd's start-up imports as it goes, so
their cost shows as a phase of its own; the total is unchanged.
"""

from __future__ import annotations

import time

#: The first instant of the new program this module can see: the interpreter has started
#: and imported `site` (and this package's __init__), nothing else.
_STARTED = time.monotonic_ns()

import argparse  # noqa: E402 - after the instant above, on purpose
import functools  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

TIMELINE_ENV = "LOCKD_REEXEC_TIMELINE"
#: What lockd's start-up and serving import lazily (lockd/__main__.py).
DAEMON_MODULES = (
    "lockd.__main__", "lockd.handover", "lockd.reexec", "lockd.config", "lockd.logs", "lockd.fdlimit",
    "lockd.flock.tokens", "lockd.flock.backend", "lockd.history", "lockd.listen", "lockd.lockfiles",
    "lockd.policy", "lockd.systemd", "lockd.journal", "lockd.metrics", "lockd.server", "lockd.service",
    "lockd.table", "lockd.processes", "trio",
)
#: The phases of a re-exec, each from the first mark to the second (the last of each before
#: the exec in the old program, the first after it in the new one), and whether the daemon
#: serves meanwhile.
PHASES = (
    ("check the new program (serving meanwhile)", "check begin", "check end"),
    ("shut the gate, let requests under way finish", "gate shut", "settled"),
    ("pause the history's writer", "settled", "history paused"),
    ("take the state (Server.hand_over)", "hand_over begin", "hand_over end"),
    ("encode it (msgpack)", "encode begin", "encode end"),
    ("write it to a memfd", "memfd begin", "memfd end"),
    ("mark descriptors inheritable, exec", "memfd end", "exec"),
    ("exec, interpreter start-up, site", "exec", "started"),
    ("import lockd, trio and their dependencies", "started", "imported"),
    ("parse the command line", "imported", "received begin"),
    ("read and decode the state", "received begin", "received end"),
    ("open lock dir, tokens, history; backend; listeners; trio.run", "received end", "adopt begin"),
    ("Server.adopt", "adopt begin", "adopt end"),
    ("  of which the service's tickets and sessions", "service adopt begin", "service adopt end"),
    ("  of which the backend's lock files", "backend adopt begin", "backend adopt end"),
    ("serve: adopted sessions' tasks, gc.freeze, first request", "adopt end", "first request"),
)
#: The pause the clients see: from the gate shut to the first request the new program serves.
PAUSE = ("gate shut", "first request")
#: The marks the old program makes; every other one is the new program's.
OLD_PROGRAM = {
    "check begin", "check end", "gate shut", "settled", "history paused", "hand_over begin", "hand_over end",
    "encode begin", "encode end", "memfd begin", "memfd end", "exec",
}


def _mark(label: str, at: int | None = None) -> None:
    path = os.environ.get(TIMELINE_ENV)
    if path:
        line = f"{os.getpid()} {at if at is not None else time.monotonic_ns()} {label}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _timed(owner: Any, name: str, label: str) -> None:
    """Mark `label begin` and `label end` around every call of `owner.name`."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        _mark(f"{label} begin")
        try:
            return original(*args, **kwargs)
        finally:
            _mark(f"{label} end")

    setattr(owner, name, timed)


def _timed_async(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        _mark(f"{label} begin")
        try:
            return await original(*args, **kwargs)
        finally:
            _mark(f"{label} end")

    setattr(owner, name, timed)


def _after(owner: Any, name: str, label: str, once: bool = False) -> None:
    """Mark `label` when a call of `owner.name` returns (only the first one, with `once`)."""
    original = getattr(owner, name)
    done = []

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            if not (once and done):
                done.append(True)
                _mark(label)

    setattr(owner, name, marked)


def run_daemon(argv: list[str]) -> int:
    """Run lockd with `argv`, its re-exec's phases marked (see the module docstring)."""
    import importlib

    checking = "--check-handover" in argv
    if not checking:
        _mark("started", _STARTED)
    for module in DAEMON_MODULES:
        importlib.import_module(module)
    if checking:
        return int(importlib.import_module("lockd.__main__").main(argv))
    _mark("imported")

    from lockd import handover, history, reexec, server, service, session
    from lockd.flock import backend

    _timed_async(reexec.Reexecutor, "_check", "check")
    _after(session.Gate, "close", "gate shut")
    original_settled = server.Server.settled

    async def settled(self: server.Server) -> None:
        await original_settled(self)
        _mark("settled")

    server.Server.settled = settled
    _after(history.HistoryStore, "hand_over", "history paused")
    _timed(server.Server, "hand_over", "hand_over")
    _timed(handover, "encode", "encode")
    _timed(handover, "to_memfd", "memfd")
    _timed(reexec, "received", "received")
    _timed(server.Server, "adopt", "adopt")
    _timed(service.LockService, "adopt", "service adopt")
    _timed(backend.FlockBackend, "adopt", "backend adopt")
    _after(server.Server, "_dispatch", "first request", once=True)
    real_execv = os.execv

    def execv(path: Any, args: Any) -> None:
        _mark("exec")
        real_execv(path, args)

    reexec.os.execv = execv
    return int(importlib.import_module("lockd.__main__").main(argv))


# --- reading the timeline ---------------------------------------------------------------------


def read_timeline(path: Path) -> list[list[tuple[int, str]]]:
    """The marks, one list per re-exec (ending at its exec, and going on to the new
    program's first request)."""
    reexecs: list[list[tuple[int, str]]] = [[]]
    for line in path.read_text().splitlines():
        _, at, label = line.split(" ", 2)
        reexecs[-1].append((int(at), label))
        if label == "first request" and any(mark == "exec" for _, mark in reexecs[-1]):
            reexecs.append([])
    return [marks for marks in reexecs if any(label == "exec" for _, label in marks)]


def phases(marks: list[tuple[int, str]]) -> dict[str, float]:
    """Each phase's ms in one re-exec's `marks` (see PHASES), and the pause's."""
    exec_at = next(i for i, (_, label) in enumerate(marks) if label == "exec")

    def at(label: str) -> int | None:
        """The old program's last `label` before the exec, or the new one's first after it."""
        if label in OLD_PROGRAM:
            return next((t for t, mark in reversed(marks[: exec_at + 1]) if mark == label), None)
        return next((t for t, mark in marks[exec_at:] if mark == label), None)

    out = {}
    for name, begin, end in (*PHASES, ("pause", *PAUSE)):
        start, stop = at(begin), at(end)
        if start is not None and stop is not None:
            out[name] = (stop - start) / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["daemon"]:
        return run_daemon(args[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.reexec_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=1_000)
    parser.add_argument("--reexecs", type=int, default=5)
    options = parser.parse_args(args)
    return profile(options.leases, options.connections, options.reexecs)


def profile(leases: int, connections: int, reexecs: int) -> int:
    import shutil

    from . import services, workloads
    from .lockers import make_locker

    root = services.scratch_root()
    timeline = root / "timeline"
    os.environ[TIMELINE_ENV] = str(timeline)
    try:
        with services.lockd(root, "w6-profile", program=["-m", "bench.reexec_profile", "daemon"]) as daemon:
            locker = make_locker({"kind": "lockd", "socket": daemon.socket})
            try:
                result = workloads.w6_reexec(locker, daemon.socket, leases, connections, reexecs, daemon.probe)
            finally:
                locker.close()
        runs = [phases(marks) for marks in read_timeline(timeline)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{leases:,} leases over {connections:,} connections, {len(runs)} re-execs; ms, median (min-max)")
    for name in [name for name, _, _ in PHASES] + ["pause"]:
        values = [run[name] for run in runs if name in run]
        if values:
            print(f"  {name:<62} {statistics.median(values):8.1f}  ({min(values):.1f}-{max(values):.1f})")
    stalls = result["stalls_ms"]
    print(f"  {'the cycling client: longest cycle around each re-exec':<62} {statistics.median(stalls):8.1f}  "
          f"({min(stalls):.1f}-{max(stalls):.1f})")
    paused = result["paused_ms"]
    print(f"  {'the daemon: Reexecuted.paused':<62} {statistics.median(paused):8.1f}  "
          f"({min(paused):.1f}-{max(paused):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

