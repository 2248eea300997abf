"""Where clients look for lockd, and where a daemon binds, by default."""

from __future__ import annotations

from pathlib import Path

import pytest
from lockd_client import paths
from lockd_client.errors import InvalidArgument


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A non-root user with a runtime dir under tmp_path and a system socket path there too."""
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.delenv(paths.SOCKET_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run-user"))
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", str(tmp_path / "system.sock"))
    return tmp_path


def test_a_user_without_a_daemon_of_their_own_finds_the_system_one(user: Path) -> None:
    own = user / "run-user" / "lockd" / "lockd.sock"
    assert paths.socket_path() == str(own)  # neither exists: name the one `lockd` would make
    (user / "system.sock").touch()
    assert paths.socket_path() == str(user / "system.sock")
    own.parent.mkdir(parents=True)
    own.touch()
    assert paths.socket_path() == str(own)  # their own daemon wins
    assert paths.default_socket() == own  # and a daemon never binds the system socket


def test_lockd_socket_overrides_everything(user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (user / "system.sock").touch()
    monkeypatch.setenv(paths.SOCKET_ENV, str(user / "chosen.sock"))
    assert paths.socket_path() == str(user / "chosen.sock")
    assert paths.default_socket() == user / "chosen.sock"


def test_a_relative_lockd_socket_is_refused_by_clients_and_daemons(user: Path, monkeypatch) -> None:
    monkeypatch.setenv(paths.SOCKET_ENV, "lockd.sock")
    with pytest.raises(InvalidArgument, match="LOCKD_SOCKET: the socket must be an absolute path"):
        paths.socket_path()
    with pytest.raises(InvalidArgument, match="LOCKD_SOCKET"):
        paths.default_socket()
    monkeypatch.setenv(paths.SOCKET_ENV, str(user / "l.sock"))
    assert paths.socket_path() == str(user / "l.sock")
