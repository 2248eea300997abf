"""What the figures were measured on, and what a process costs while they are measured.

Invariant: everything here only reads (/proc, /sys, `platform`, git); nothing changes the
machine or the processes it looks at.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    return proc.stdout.strip()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_mib": _mem_total_mib(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "packages": {d: _version(d) for d in ("trio", "msgspec", "filelock", "lockd", "lockd-client")},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": loadavg(),
    }


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class ProcessProbe:
    """Reads the CPU time, resident memory and open fds of one running process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_ns(self) -> int:
        """CPU time used so far by all its threads, those that have ended included, in ns (of
        clock-tick resolution: measure over a second or more)."""
        # The fields after the command, which may hold spaces and parentheses.
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) * _TICK_NS

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def _busy_ticks() -> int:
    """Clock ticks all CPUs spent busy since boot, the hypervisor's steal included."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return user + nice + system + irq + softirq + steal


class OthersMeter:
    """How much of the machine's CPUs other work took from the moment it is made: busy time
    (/proc/stat) less this process's, its reaped children's and its live `servers`' CPU time.

    A measure is only as good as its share of the CPUs: on a shared machine this says how
    much of them was taken while it ran. Clock ticks make it coarse (10 ms), so it is meant
    for intervals of a second or more.
    """

    def __init__(self, servers: Callable[[], list[ProcessProbe]]) -> None:
        self._servers = servers
        self._tick = 1 / os.sysconf("SC_CLK_TCK")
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        ours += sum(probe.cpu_ns() for probe in self._servers()) / 1e9
        return time.monotonic(), _busy_ticks() * self._tick, ours

    #: Below this many seconds a clock tick more or less would swing the share by 1/100 or more.
    SHORTEST = 1.0

    def share(self) -> float:
        """Other work's CPU time since the start, as a share of all CPUs' time (0 to 1); NaN
        if less than SHORTEST seconds have passed."""
        then, busy_then, ours_then = self._start
        now, busy, ours = self._sample()
        if now - then < self.SHORTEST:
            return math.nan
        others = (busy - busy_then) - (ours - ours_then)
        return max(0.0, others / ((now - then) * (os.cpu_count() or 1)))


class EtcdProbe:
    """What an etcd member has done so far, from its Prometheus `/metrics`: requests served by
    gRPC method (the JSON gateway's calls and v3lock's included), raft proposals committed
    (every write), and its process's CPU."""

    #: `grpc_server_handled_total{...grpc_method="Txn"...} 12`: unary calls answered.
    _HANDLED = re.compile(r'^grpc_server_handled_total\{([^}]*)\} (\S+)$', re.M)
    _PROPOSALS = re.compile(r"^etcd_server_proposals_committed_total (\S+)$", re.M)

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.process = ProcessProbe(pid)

    def counters(self) -> Counter[str]:
        """Unary requests answered so far by method, and `proposals` committed."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
        counts: Counter[str] = Counter()
        for labels, value in self._HANDLED.findall(text):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("grpc_type") == "unary":
                counts[fields["grpc_method"]] += int(float(value))
        proposals = self._PROPOSALS.search(text)
        counts["proposals"] = int(float(proposals.group(1))) if proposals else 0
        return counts
