"""The systemd units and snippets in systemd/: checked by systemd's own tools, and kept
consistent with lockd's defaults and with docs/service.md.

No systemd runs as PID 1 here, so the sandbox itself cannot be started; instead the daemon is
run under the two restrictions most likely to break a Python program (no network namespace,
no writable+executable memory) to show it still serves.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from lockd_client import paths, protocol

from lockd import config

from .conftest import Daemon
from .rawclient import RawClient

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SERVICE_DOC = REPO / "docs" / "service.md"
EXEC_START = "/opt/lockd/bin/lockd"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` → every value it is given, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    (value,) = settings[key]
    return value


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as installed, except ExecStart points at a stand-in executable: this machine
    has no /opt/lockd, and `verify` checks that the command exists."""
    stub = tmp_path / "lockd-stub"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    for name in ("lockd.service", "lockd.socket"):
        text = (UNITS / name).read_text()
        assert f"ExecStart={EXEC_START}" in text or name.endswith(".socket")
        (tmp_path / name).write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={stub}"))
    return tmp_path


def verify(*units: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in result.stderr.splitlines() if "lockd" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    verify(unit_dir / "lockd.service", unit_dir / "lockd.socket")


def test_etcd_drop_in_passes_verify_and_opens_only_the_network(unit_dir: Path) -> None:
    drop_ins = unit_dir / "lockd.service.d"
    drop_ins.mkdir()
    shutil.copy(UNITS / "lockd-etcd.conf", drop_ins / "etcd.conf")
    verify(unit_dir / "lockd.service")
    report = security(unit_dir / "lockd.service")
    assert report["PrivateNetwork="]["set"] is False
    assert report["RestrictAddressFamilies=~AF_(INET|INET6)"]["set"] is False
    assert report["ProtectSystem="]["set"] is True


def security(service: Path) -> dict[str, dict[str, object]]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--json=short", str(service)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


def test_service_is_sandboxed_as_systemd_measures_it(unit_dir: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit_dir / "lockd.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout  # overall exposure at most 2.0 of 10
    report = security(unit_dir / "lockd.service")
    unmet = [
        name
        for name in (
            "NoNewPrivileges=",
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "PrivateNetwork=",
            "PrivateDevices=",
            "RestrictAddressFamilies=~AF_(INET|INET6)",
            "RestrictAddressFamilies=~AF_NETLINK",
            "RestrictAddressFamilies=~AF_PACKET",
            "SystemCallFilter=~@mount",
            "SystemCallFilter=~@debug",
            "CapabilityBoundingSet=~CAP_SYS_ADMIN",
            "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
            "MemoryDenyWriteExecute=",
            "RestrictNamespaces=~user",
        )
        if report[name]["set"] is not True
    ]
    assert unmet == []


def test_service_runs_as_a_notify_service_with_a_watchdog() -> None:
    service = unit_settings(UNITS / "lockd.service")
    assert one(service, "Service.Type") == "notify"
    assert one(service, "Service.Restart") == "on-failure"
    watchdog = one(service, "Service.WatchdogSec")
    assert watchdog.endswith("s") and int(watchdog[:-1]) >= 10
    assert one(service, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Unit.Requires") == "lockd.socket"


def test_descriptor_limit_covers_the_default_limits() -> None:
    service = unit_settings(UNITS / "lockd.service")
    limits = config.Limits()
    # Every connection, and every name one greedy connection may hold, is a descriptor.
    needed = limits.max_connections + limits.max_leases_per_connection
    assert int(one(service, "Service.LimitNOFILE")) >= 2 * needed


def test_units_use_the_paths_a_root_daemon_defaults_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(paths.SOCKET_ENV, raising=False)
    socket_unit = unit_settings(UNITS / "lockd.socket")
    service = unit_settings(UNITS / "lockd.service")
    assert Path(one(socket_unit, "Socket.ListenStream")) == paths.default_socket()
    assert Path("/run") / one(service, "Service.RuntimeDirectory") == paths.default_lock_dir()
    assert Path("/var/lib") / one(service, "Service.StateDirectory") == paths.default_state_dir()
    assert config.default_config_path() == Path("/etc/lockd/lockd.toml")
    # The runtime directory holds lock files that must survive a restart of lockd.
    assert one(service, "Service.RuntimeDirectoryPreserve") == "yes"
    assert one(service, "Service.ExecStart") == EXEC_START


def test_socket_is_for_root_and_the_lockd_group() -> None:
    socket_unit = unit_settings(UNITS / "lockd.socket")
    assert one(socket_unit, "Socket.SocketMode") == "0660"
    assert one(socket_unit, "Socket.SocketGroup") == "lockd"
    assert one(socket_unit, "Socket.RemoveOnStop") == "yes"


def test_sysusers_creates_the_socket_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d" / "lockd.conf")],
        check=True, capture_output=True, timeout=TIMEOUT,
    )
    groups = [line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()]
    assert "lockd" in groups


def test_tmpfiles_creates_the_lock_dir_as_the_service_does(tmp_path: Path) -> None:
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(UNITS / "tmpfiles.d" / "lockd.conf")],
        check=True, capture_output=True, timeout=TIMEOUT,
    )
    service = unit_settings(UNITS / "lockd.service")
    lock_dir = tmp_path / "run" / one(service, "Service.RuntimeDirectory")
    st = lock_dir.stat()
    assert stat.S_IMODE(st.st_mode) == int(one(service, "Service.RuntimeDirectoryMode"), 8)
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_service_doc_installs_what_the_units_expect() -> None:
    doc = SERVICE_DOC.read_text()
    for needed in (
        "python3 -m venv /opt/lockd",
        "/opt/lockd/bin/pip install",
        "systemd/lockd.service",
        "systemd/lockd.socket",
        "systemd/sysusers.d/lockd.conf",
        "systemd/tmpfiles.d/lockd.conf",
        "systemd/lockd-etcd.conf",
        "systemctl enable --now lockd.socket",
        "systemctl status lockd",
        "lockctl status",
        "/etc/lockd/lockd.toml",
    ):
        assert needed in doc, needed


# --- the daemon under the sandbox's hardest restrictions ----------------------------------------

SANDBOXED = """
import ctypes, runpy, sys
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes enforces.
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE) failed: errno %d" % ctypes.get_errno())
sys.argv[0] = "lockd"
runpy.run_module("lockd", run_name="__main__", alter_sys=True)
"""


class SandboxedDaemon(Daemon):
    """The conftest daemon, started in its own network namespace with W^X memory enforced."""

    def argv(self) -> list[str]:
        python, dash_m, module, *args = super().argv()
        assert (dash_m, module) == ("-m", "lockd")
        return ["unshare", "--net", python, "-c", SANDBOXED, *args]


def test_daemon_serves_without_network_and_without_writable_code(short_tmp: Path) -> None:
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=TIMEOUT).returncode:
        pytest.skip("cannot create a network namespace here")
    daemon = SandboxedDaemon(short_tmp)
    daemon.start()
    try:
        with RawClient(daemon.socket, timeout=TIMEOUT) as client:
            assert isinstance(client.acquire("sandboxed", timeout=0), protocol.Granted)
        assert daemon.stop(TIMEOUT) == 0, daemon.log()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
