"""Shared fixtures: real lockd daemons on temporary sockets, and real etcd clusters."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .etcd_cluster import EtcdCluster
from .waiting import wait_until

STARTUP_TIMEOUT = 10.0


class Daemon:
    """A real `python -m lockd` process on a private socket, lock dir and state dir."""

    def __init__(
        self, root: Path, *extra_args: str, daemon_env: dict[str, str] | None = None, cwd: Path | None = None,
    ) -> None:
        self.root = root
        #: Where the daemon runs (`python -m lockd` finds the package there first).
        self.cwd = cwd
        #: Set in the daemon's environment, beside the test's own.
        self.daemon_env = daemon_env or {}
        self.socket = str(root / "lockd.sock")
        self.lock_dir = root / "locks"
        self.state_dir = root / "state"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "lockd.log"

    @property
    def env(self) -> dict[str, str]:
        """An environment whose clients (lockctl, the library) find this daemon."""
        return {**os.environ, "LOCKD_SOCKET": self.socket}

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "lockd",
            "--socket", self.socket,
            "--lock-dir", str(self.lock_dir),
            "--state-dir", str(self.state_dir),
            "--log-level", "debug",
            *self.extra_args,
        ]

    def start(self) -> None:
        self.lock_dir.mkdir(mode=0o700, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, **self.daemon_env},
            cwd=self.cwd,
        )
        log.close()
        wait_until(self.listening, f"lockd listening on {self.socket}", STARTUP_TIMEOUT, show=self.log)

    def listening(self) -> bool:
        """Whether the daemon accepts connections; raises RuntimeError if it has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"lockd exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(self.socket)
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lockd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A running daemon; killed after the test if still running."""
    d = Daemon(short_tmp)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.kill()


@pytest.fixture(scope="module")
def lockd() -> Iterator[Daemon]:
    """One daemon for the tests of a module that leave it running; each uses its own `name`."""
    root = Path(tempfile.mkdtemp(prefix="lockd-"))
    shared = Daemon(root)
    shared.start()
    yield shared
    shared.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A lock name no other test uses."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)


# --- etcd (tests/etcd_cluster.py) -------------------------------------------------------------


def _cluster(size: int) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    """A fresh single-member etcd, for tests that kill or stop it."""
    yield from _cluster(1)


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EtcdCluster]:
    """One single-member etcd for a whole module; tests keep apart by key prefix."""
    yield from _cluster(1)


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own, so tests can share one etcd."""
    return f"/lockd-test/{uuid.uuid4().hex}/"


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """A fresh three-member cluster."""
    yield from _cluster(3)
