"""The server processes a benchmark run talks to: lockd daemons, echo servers and etcd.

Invariant: every server is started by a `Service` context manager and is gone (SIGTERM,
then SIGKILL after a grace period) when the block exits, whatever happened inside it, so a
failed or interrupted run leaves no process behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .machine import REPO, ProcessProbe

START_TIMEOUT = 15.0


#: Services started and not stopped yet: the servers whose CPU time is the run's own.
_running: set[Service] = set()


def running() -> list[ProcessProbe]:
    """Probes of every server this run has started and not stopped (reaped ones count among
    the run's children)."""
    return [s.probe for s in _running if s.proc is not None and s.proc.poll() is None]


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class Service:
    """A server process, ready once its Unix socket `socket` accepts, with a probe for its costs."""

    def __init__(self, argv: list[str], socket_path: str, log_path: Path, nofile: int | None = None) -> None:
        self.argv = argv
        self.socket = socket_path
        self.log_path = log_path
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        return _connectable(self.socket)

    def _limits(self) -> None:
        # Runs in the child between fork and exec: only the server gets the higher limit.
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def __enter__(self) -> Service:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
                preexec_fn=self._limits if self.nofile else None,
            )
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(self.argv)} did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.01)
        return self

    @property
    def probe(self) -> ProcessProbe:
        assert self.proc is not None
        return ProcessProbe(self.proc.pid)

    def stop(self) -> None:
        _running.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lockd(
    root: Path, tag: str, nofile: int | None = None, etcd: str | None = None, config: str = "",
    log_level: str = "warning", program: list[str] | None = None,
) -> Service:
    """A daemon with its own socket, lock dir and state dir under `root`, reading `config`
    (TOML) as its config file; logs warnings only, as a production daemon would, unless
    `log_level` says otherwise. With `etcd` (a client URL), on the etcd backend, with the
    default TTL and keys under a prefix of its own. `program`: what the interpreter runs
    instead of `-m lockd` (taking lockd's arguments)."""
    base = root / tag
    base.mkdir()
    (base / "locks").mkdir(mode=0o700)
    (base / "lockd.toml").write_text(config)
    sock = str(base / "lockd.sock")
    argv = [
        sys.executable, *(program or ["-m", "lockd"]), "--config", str(base / "lockd.toml"), "--socket", sock,
        "--lock-dir", str(base / "locks"), "--state-dir", str(base / "state"), "--log-level", log_level,
    ]
    if etcd is not None:
        argv += ["--backend", "etcd", "--etcd-endpoints", etcd, "--etcd-prefix", f"/lockd-bench/{tag}/"]
    return Service(argv, sock, base / "lockd.log", nofile)


class MetricsScraper:
    """Reads `GET /metrics` from a daemon's Unix-socket listener every `interval` seconds,
    as Prometheus would, in a thread of its own from entry until exit."""

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def __enter__(self) -> MetricsScraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(self.path)
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: lockd\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                ok = answer.startswith(b"HTTP/1.1 200 ")
            except OSError:
                ok = False
            self.scrapes += ok
            self.failures += not ok


def echo(root: Path, kind: str) -> Service:
    sock = str(root / f"echo-{kind}.sock")
    argv = [sys.executable, "-m", "bench.echo", kind, sock]
    return Service(argv, sock, root / f"echo-{kind}.log")


class EtcdService(Service):
    """A single-member etcd serving clients on `url`; ready once it reports itself healthy."""

    def __init__(self, argv: list[str], url: str, log_path: Path) -> None:
        super().__init__(argv, "", log_path)
        self.url = url

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
                return json.load(answer).get("health") == "true"
        except (OSError, ValueError):
            return False


ETCD = shutil.which("etcd")


def etcd(root: Path) -> EtcdService:
    """A fresh one-member etcd on loopback ports that were free a moment ago, its data under
    `root`: on tmpfs, so its fsyncs cost nothing and the figures compare round trips, not disks."""
    if ETCD is None:
        raise RuntimeError("the etcd section needs the etcd binary on PATH (etcd 3.4 or later)")
    client, peer = _free_ports(2)
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    argv = [
        ETCD, "--name", "bench", "--data-dir", str(root / "etcd-data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"bench={peer_url}", "--initial-cluster-state", "new",
        "--logger", "zap", "--log-level", "warn",
    ]
    return EtcdService(argv, url, root / "etcd.log")


def _free_ports(count: int) -> list[int]:
    """Loopback ports free right now, all different (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def scratch_root() -> Path:
    """A private directory for sockets and lock files: on tmpfs, like /run/lock in
    production, so lock-file creation is not a disk benchmark."""
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return Path(tempfile.mkdtemp(prefix="lockd-bench-", dir=base))
