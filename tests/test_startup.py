"""Starting the daemon with something wrong: exit status 1 and one line saying what to fix,
never a traceback, and nothing left listening."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Daemon

TIMEOUT = 30.0


def start(root: Path, *args: str, config: str | None = None, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run the daemon in `root` to completion; `prelude` runs first in the same interpreter."""
    daemon = Daemon(root, *args)
    argv = daemon.argv()
    if config is not None:
        (root / "lockd.toml").write_text(config)
        argv += ["--config", str(root / "lockd.toml")]
    code = f"{prelude}\nimport sys\nfrom lockd.__main__ import main\nsys.exit(main({argv[3:]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)


def refused(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()
    for text in expected:
        assert text in line, line


@pytest.mark.parametrize("value", ["inf", "nan", "-1.0", "1e300"])
def test_a_duration_that_is_not_a_finite_positive_number_stops_start_up(short_tmp: Path, value: str) -> None:
    refused(start(short_tmp, config=f"[etcd]\nttl = {value}\n"), "lockd.toml:2: etcd.ttl")
    refused(start(short_tmp, config=f"[limits]\nsend_timeout = {value}\n"), "limits.send_timeout")


def test_flags_are_checked_like_the_file(short_tmp: Path) -> None:
    refused(start(short_tmp, "--etcd-ttl", "inf"), "--etcd-ttl")
    refused(start(short_tmp, "--etcd-endpoints", "10.0.0.1:2379"), "--etcd-endpoints: expected an http:// or https:// URL")


def test_an_endpoint_that_is_no_url_stops_start_up(short_tmp: Path) -> None:
    refused(start(short_tmp, config='[etcd]\nendpoints = ["127.0.0.1:2379"]\n'),
            "etcd.endpoints[0]: expected an http:// or https:// URL")


def test_an_unreadable_tls_file_stops_start_up(short_tmp: Path) -> None:
    missing = short_tmp / "missing.pem"
    proc = start(short_tmp, "--backend", "etcd", config=f'[etcd]\nca_file = "{missing}"\n')
    refused(proc)
    assert not (short_tmp / "lockd.sock").exists()


def test_the_etcd_backend_without_its_package_says_what_to_install(short_tmp: Path) -> None:
    proc = start(short_tmp, "--backend", "etcd", prelude="import sys; sys.modules['httpx'] = None")
    refused(proc, "httpx", "lockd[etcd]")
