"""The two distributions release together: one version, and the daemon's wheel asks for the
client of that very version (they share the wire protocol and the paths)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import lockd_client

import lockd

ROOT = Path(__file__).resolve().parent.parent


def project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_one_version_everywhere() -> None:
    daemon, client = project(ROOT / "pyproject.toml"), project(ROOT / "client" / "pyproject.toml")
    assert daemon["version"] == client["version"] == lockd.__version__ == lockd_client.__version__
    assert f"lockd-client=={client['version']}" in daemon["dependencies"]


def test_every_command_belongs_to_one_distribution() -> None:
    """Two wheels owning one file: uninstalling one would remove the other's."""
    daemon, client = project(ROOT / "pyproject.toml"), project(ROOT / "client" / "pyproject.toml")
    assert daemon["scripts"] == {"lockd": "lockd.__main__:main"}
    assert client["scripts"] == {"lockctl": "lockd_client.cli:run"}
