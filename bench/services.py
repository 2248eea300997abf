"""The server processes a benchmark run talks to: lockd daemons and echo servers.

Invariant: every server is started by a `Service` context manager and is gone (SIGTERM,
then SIGKILL after a grace period) when the block exits, whatever happened inside it, so a
failed or interrupted run leaves no process behind.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .machine import REPO, ProcessProbe

START_TIMEOUT = 15.0


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class Service:
    """A server process listening on a Unix socket, with a probe for its costs."""

    def __init__(self, argv: list[str], socket_path: str, log_path: Path, nofile: int | None = None) -> None:
        self.argv = argv
        self.socket = socket_path
        self.log_path = log_path
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None

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
        deadline = time.monotonic() + START_TIMEOUT
        while not _connectable(self.socket):
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


def lockd(root: Path, tag: str, nofile: int | None = None) -> Service:
    """A daemon with its own socket, lock dir and state dir under `root`; logs warnings only,
    as a production daemon would."""
    base = root / tag
    base.mkdir()
    (base / "locks").mkdir(mode=0o700)
    sock = str(base / "lockd.sock")
    argv = [
        sys.executable, "-m", "lockd", "--socket", sock, "--lock-dir", str(base / "locks"),
        "--state-dir", str(base / "state"), "--log-level", "warning",
    ]
    return Service(argv, sock, base / "lockd.log", nofile)


def echo(root: Path, kind: str) -> Service:
    sock = str(root / f"echo-{kind}.sock")
    argv = [sys.executable, "-m", "bench.echo", kind, sock]
    return Service(argv, sock, root / f"echo-{kind}.log")


def scratch_root() -> Path:
    """A private directory for sockets and lock files: on tmpfs, like /run/lock in
    production, so lock-file creation is not a disk benchmark."""
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return Path(tempfile.mkdtemp(prefix="lockd-bench-", dir=base))
