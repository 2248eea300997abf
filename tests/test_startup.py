"""Starting the daemon with something wrong: exit status 1 and one line saying what to fix,
never a traceback, and nothing left listening."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Daemon
from .waiting import wait_until

TIMEOUT = 30.0


def start(root: Path, *args: str, config: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the daemon in `root` to completion."""
    daemon = Daemon(root, *args)
    argv = daemon.argv()
    if config is not None:
        (root / "lockd.toml").write_text(config)
        argv += ["--config", str(root / "lockd.toml")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


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
    refused(
        start(short_tmp, "--etcd-endpoints", "10.0.0.1:2379"), "--etcd-endpoints: expected an http:// or https:// URL"
    )


def test_an_endpoint_that_is_no_url_stops_start_up(short_tmp: Path) -> None:
    refused(start(short_tmp, config='[etcd]\nendpoints = ["127.0.0.1:2379"]\n'),
            "etcd.endpoints[0]: expected an http:// or https:// URL")


def test_an_unreadable_tls_file_stops_start_up(short_tmp: Path) -> None:
    missing = short_tmp / "missing.pem"
    proc = start(short_tmp, "--backend", "etcd", config=f'[etcd]\nca_file = "{missing}"\n')
    refused(proc)
    assert not (short_tmp / "lockd.sock").exists()


#: Runs lockd's main with prometheus_client not to be found, as on a host installed without it.
WITHOUT_PROMETHEUS = (
    "import sys; sys.modules['prometheus_client'] = None; "
    "from lockd.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def test_a_missing_prometheus_client_stops_start_up_and_a_re_exec(short_tmp: Path) -> None:
    argv = [sys.executable, "-c", WITHOUT_PROMETHEUS, *Daemon(short_tmp).argv()[3:]]
    refused(subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT), "cannot find prometheus_client")
    assert not (short_tmp / "lockd.sock").exists()
    # The program to re-execute into is asked first (lockd.reexec): the daemon serves on.
    argv = [sys.executable, "-c", WITHOUT_PROMETHEUS, "--check-handover"]
    proc = subprocess.run(argv, input="", capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1 and "cannot find prometheus_client" in proc.stderr, proc


NOBODY = 65534


def as_nobody_with_default_paths(base: Path) -> subprocess.Popen[str]:
    """`lockd` with every path defaulted, as uid nobody whose XDG dirs live under `base`."""
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(base), "XDG_RUNTIME_DIR": str(base / "run"),
        "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config"),
    }
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m", "lockd"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
def test_a_private_runtime_dir_someone_else_made_is_refused_and_ours_is_made_private(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    for shared in ("run", "state"):
        (short_tmp / shared).mkdir()
        (short_tmp / shared).chmod(0o1777)
    (short_tmp / "run" / "lockd").mkdir(mode=0o755)  # made first, by root: not nobody's
    proc = as_nobody_with_default_paths(short_tmp)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "must be a directory of uid 65534" in err and "mode 0700" in err
    (short_tmp / "run" / "lockd").rmdir()
    proc = as_nobody_with_default_paths(short_tmp)
    try:
        sock = short_tmp / "run" / "lockd" / "lockd.sock"

        def bound() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return sock.exists()

        wait_until(bound, "the socket bound", TIMEOUT, interval=0.02)
        st = (short_tmp / "run" / "lockd").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def test_a_relative_socket_is_a_usage_error(short_tmp: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lockd", "--socket", "lockd.sock"], cwd=short_tmp,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc
    assert "--socket: the socket must be an absolute path, not 'lockd.sock'" in proc.stderr
    assert not (short_tmp / "lockd.sock").exists()
    env = {**os.environ, "LOCKD_SOCKET": "lockd.sock"}
    proc = subprocess.run([sys.executable, "-m", "lockd", "--lock-dir", str(short_tmp / "locks"),
                           "--state-dir", str(short_tmp / "state")], cwd=short_tmp, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    refused(proc, "LOCKD_SOCKET: the socket must be an absolute path, not 'lockd.sock'")
    # --socket says where: LOCKD_SOCKET is not read, and its being relative does not matter.
    proc = subprocess.run([sys.executable, "-m", "lockd", "--check-config", "--socket", str(short_tmp / "s"),
                           "--lock-dir", str(short_tmp / "locks"), "--state-dir", str(short_tmp / "state")],
                          cwd=short_tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr


def check_config(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lockd", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_check_config_says_ok_and_serves_nothing(short_tmp: Path) -> None:
    config = short_tmp / "lockd.toml"
    config.write_text('backend = "flock"\n[[policy.rules]]\nnames = "backup-*"\nusers = ["root"]\n')
    sock = short_tmp / "lockd.sock"
    proc = check_config("--check-config", str(config), "--socket", str(sock), cwd=short_tmp)
    assert proc.returncode == 0, proc
    assert proc.stdout == f"lockd: {config}: configuration OK (backend flock, socket {sock}, 1 policy rule)\n"
    assert not sock.exists() and list(short_tmp.iterdir()) == [config]
    # The same with --config FILE, and with the default file missing (the defaults apply).
    assert check_config("--config", str(config), "--check-config", cwd=short_tmp).returncode == 0
    env_home = {"XDG_CONFIG_HOME": str(short_tmp / "nothing")}
    proc = subprocess.run([sys.executable, "-m", "lockd", "--check-config"], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **env_home})
    missing = Path("/etc/lockd/lockd.toml") if os.geteuid() == 0 else short_tmp / "nothing" / "lockd" / "lockd.toml"
    if missing.exists():
        return  # this host has a config file of its own: the check above read it
    assert proc.returncode == 0 and proc.stdout.startswith(f"lockd: the defaults (no {missing}): configuration OK (")


def test_check_config_names_the_problem_and_fails(short_tmp: Path) -> None:
    config = short_tmp / "lockd.toml"
    config.write_text('[[policy.rules]]\nnames = "a"\n[[policy.rules]]\nnames = "b"\nusers = ["no-such-user-x"]\n')
    proc = check_config("--check-config", str(config), cwd=short_tmp)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"lockd: {config}:3: policy.rules[1] (rule 2): no user named 'no-such-user-x' on "
                           "this host; fix it (options are in docs/configuration.md)\n")
    assert check_config("--check-config", str(short_tmp / "missing.toml"), cwd=short_tmp).returncode == 1
    assert check_config("--check-config", "--etcd-ttl", "0", cwd=short_tmp).returncode == 1
    config.write_text(f'backend = "etcd"\n[etcd]\nca_file = "{short_tmp}/missing.pem"\n')
    proc = check_config("--check-config", str(config), cwd=short_tmp)
    assert proc.returncode == 1 and f"etcd.ca_file: cannot read {short_tmp}/missing.pem" in proc.stderr
