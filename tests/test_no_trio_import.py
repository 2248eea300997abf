"""The blocking client and lockctl must start without importing trio (it costs ~100 ms)."""

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

