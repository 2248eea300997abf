"""The blocking client and lockctl must start without importing trio (it costs ~100 ms), and
the daemon's decisions must not depend on it (they are tested, and reasoned about, without it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["lockd_client", "lockd_client.blocking", "lockd_client.cli"])
def test_importing_does_not_import_trio(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    check = f"import sys, {module}; assert 'trio' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=30)


@pytest.mark.parametrize("module", ["lockd.service", "lockd.orders", "lockd.processes", "lockd.table"])
def test_the_daemons_core_does_not_import_trio(module):
    """The service and what it is built on are I/O-free: only the shell (lockd.server) runs
    them under trio. A fresh interpreter, since this one has trio loaded already."""
    check = f"import sys, {module}; assert 'trio' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=30)


def test_lockctl_acquire_imports_nothing_it_does_not_need():
    """pathlib and shutil (which argparse would import for the terminal width), and the
    socket module's Python layer (enums of every constant), cost lockctl milliseconds of
    start-up each and are needed on none of its paths."""
    check = (
        "import sys; from lockd_client import cli; "
        "status = cli.main(['acquire', 'x', '--', 'true']); "
        "assert status == cli.EXIT_UNAVAILABLE, status; "
        "loaded = {'trio', 'pathlib', 'shutil', 'socket'} & set(sys.modules); assert not loaded, loaded"
    )
    env = {"LOCKD_SOCKET": "/nonexistent/lockd.sock", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", check], env=env, check=True, timeout=30, capture_output=True
    )
