"""`python -m bench.profile`: where lockd's time goes, under one benchmark workload.

Invariant: the profiled processes are the real ones (a `python -m lockd` daemon and
`bench.worker` clients), sampled from outside by py-spy without pausing them, so the profile
shows the code paths of a normal run; the raw samples are kept next to the summary.

Writes, under --out: `daemon.txt` and `client.txt` (py-spy's collapsed stacks, one line per
distinct stack with its sample count, loadable by speedscope or flamegraph.pl), and prints
for each the functions with the most samples, on CPU in themselves (self) and with callees
(total). Only samples holding the GIL count, so time blocked in epoll or recv is left out
and shares are of busy time.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import services, workloads
from .machine import REPO


def _spy(pid: int, out: Path, rate: int, lines: bool) -> subprocess.Popen[bytes]:
    # The environment's own scripts first: `.venv/bin/python -m bench.profile` without the
    # venv activated is how the docs run it.
    py_spy = shutil.which("py-spy", path=Path(sys.executable).parent) or shutil.which("py-spy")
    if py_spy is None:
        sys.exit(
            "py-spy is not installed: run `bench/run --help` once (it installs bench/requirements.txt), "
            "or pip install py-spy"
        )
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
         "--nonblocking", "--gil", *([] if lines else ["--function"]), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _stop(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


def summarize(collapsed: Path, top: int) -> str:
    """The `top` functions by self and by total samples in a collapsed-stacks file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return f"{collapsed.name}: no samples"
    lines = [f"{collapsed.name}: {samples} busy samples"]
    for title, counter in (("package, self", packages), ("self", own), ("total", total)):
        lines.append(f"  by {title}:")
        lines += [f"    {100 * n / samples:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def _package(frame: str) -> str:
    """`trio` for `f (trio/_core/_run.py:12)`: the top-level package (or module) of a frame."""
    _, _, where = frame.rpartition(" (")
    where = where.removeprefix("<attrs generated methods ")  # attrs' generated __init__ etc.
    return where.split("/", 1)[0].split(":", 1)[0].split(".", 1)[0] or "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--workload", choices=["w1", "w2", "w3"], default="w1",
                   help="w1: one client cycling on one name; w2: 32 clients, a name each; w3: 8 clients on one name")
    p.add_argument("--client", choices=["lockd", "lockd-trio", "lockd-raw"], default="lockd")
    p.add_argument("--etcd", action="store_true", help="the daemon on the etcd backend, on a fresh one-member etcd")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=1000, help="samples per second (default %(default)s)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--lines", action="store_true", help="attribute samples to source lines, not to whole functions")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clients, same_name = {"w1": (1, True), "w2": (32, False), "w3": (8, True)}[args.workload]
    names = ["p"] * clients if same_name else [f"p-{i}" for i in range(clients)]
    root = services.scratch_root()
    try:
        with contextlib.ExitStack() as stack:
            etcd = stack.enter_context(services.etcd(root)).url if args.etcd else None
            daemon = stack.enter_context(services.lockd(root, "profiled", etcd=etcd))
            spec = {"kind": args.client, "socket": daemon.socket}
            spies = [_spy(daemon.probe.pid, args.out / "daemon.txt", args.rate, args.lines)]
            # The first client is profiled too: its own process, so py-spy can attach to it.
            fleet = workloads.Fleet(spec, "cycle", names, args.seconds)
            try:
                spies.append(_spy(fleet.workers[0].pid, args.out / "client.txt", args.rate, args.lines))
                time.sleep(1.0)  # py-spy attaches before the measured interval starts
                cycles = sum(r["cycles"] for r in fleet.run())
            finally:
                fleet.close()
                for spy in spies:
                    _stop(spy)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    backend = " on etcd" if args.etcd else ""
    print(f"{args.workload} through {args.client}{backend}: {cycles / args.seconds:,.0f} cycles/s "
          f"over {args.seconds:g} s with py-spy attached\n")
    for name in ("daemon.txt", "client.txt"):
        print(summarize(args.out / name, args.top), end="\n\n")
    print(f"collapsed stacks in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
