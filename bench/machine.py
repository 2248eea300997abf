"""What the figures were measured on, and what a process costs while they are measured.

Invariant: everything here only reads (/proc, /sys, `platform`, git); nothing changes the
machine or the processes it looks at.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import urllib.request
from collections import Counter
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


class ProcessProbe:
    """Reads the CPU time, resident memory and open fds of one running process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_ns(self) -> int:
        """CPU time used so far by all its threads, in ns (scheduler accounting, not ticks)."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                total += int(Path(f"/proc/{self.pid}/task/{task}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that ended between listing and reading
        return total

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


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
