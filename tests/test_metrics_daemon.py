"""The metrics of a real daemon: over its HTTP listener (TCP and Unix socket) and `lockctl
metrics`, counting what clients really did; the example dashboard and alert rules against
what it really exposes."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lockd_client import errors
from lockd_client.blocking import connect
from prometheus_client.parser import text_string_to_metric_families

from lockd import metrics_http, metrics_text
from lockd.metrics import LOSS_REASONS, Metrics

from .conftest import Daemon
from .flock_tools import outside_flock
from .test_cli import LOCKCTL, lockctl
from .test_metrics import FakeEtcd, samples
from .test_reexec import sigusr2
from .waiting import wait_until

DOCS = Path(__file__).parent.parent / "docs"
TIMEOUT = 30.0


def start(root: Path, listen: str, names: list[str]) -> Daemon:
    config = root / "lockd.toml"
    config.write_text(f"[metrics]\nlisten = {json.dumps(listen)}\nnames = {json.dumps(names)}\n")
    daemon = Daemon(root, "--config", str(config))
    daemon.start()
    return daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def open_to(listen: str) -> socket.socket:
    if not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(listen.removeprefix("unix:"))
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(listen: str, request: bytes) -> tuple[str, bytes]:
    """Send `request` raw; the status line and the body of the answer, read to its end."""
    with open_to(listen) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


def scrape(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, from GET /metrics."""
    status, body = exchange(listen, b"GET /metrics HTTP/1.1\r\nHost: lockd\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


@pytest.fixture
def tcp_daemon(short_tmp: Path) -> Iterator[tuple[Daemon, str]]:
    listen = f"127.0.0.1:{free_port()}"
    daemon = start(short_tmp, listen, ["db*"])
    yield daemon, listen
    daemon.kill()


@pytest.fixture(scope="module")
def unix_daemon() -> Iterator[tuple[Daemon, str]]:
    root = Path(tempfile.mkdtemp(prefix="lockd-"))
    listen = f"unix:{root}/metrics.sock"
    daemon = start(root, listen, ["db*"])
    yield daemon, listen
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_counters_and_gauges_match_what_clients_did(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, listen = tcp_daemon
    with connect(daemon.socket) as client, connect(daemon.socket) as other:
        for _ in range(3):
            client.acquire("db1").release()
        client.acquire("other", shared=True).release()
        holding = client.acquire("db1")
        with pytest.raises(errors.LockBusy):
            other.acquire("db1", wait=False)
        with pytest.raises(errors.LockTimeout):
            other.acquire("db1", timeout=0.05)
        waiter = subprocess.Popen([*LOCKCTL, "acquire", "-s", "db1", "--", "true"], env=daemon.env)
        try:
            got = wait_until(
                lambda: (m := scrape(listen))[("lockd_waiters", (("mode", "shared"),))] == 1 and m,
                "the waiter counted", show=daemon.log,
            )
            assert got["lockd_leases_held", (("mode", "exclusive"),)] == 1
            assert got["lockd_name_leases_held", (("mode", "exclusive"), ("name", "db1"))] == 1
            assert got["lockd_name_waiters", (("mode", "shared"), ("name", "db1"))] == 1
            assert got["lockd_lease_oldest_held_seconds", ()] > 0
            assert got["lockd_waiter_oldest_waiting_seconds", ()] > 0
            assert got["lockd_connections", ()] == 3
        finally:
            holding.release()
            assert waiter.wait(TIMEOUT) == 0
    got = wait_until(
        lambda: (m := scrape(listen))[("lockd_connections", ())] == 0 and m, "the clients gone", show=daemon.log,
    )
    assert got["lockd_grants_total", (("mode", "exclusive"),)] == 4
    assert got["lockd_grants_total", (("mode", "shared"),)] == 2
    assert got["lockd_releases_total", (("reason", "requested"),)] == 6
    assert got["lockd_refusals_total", (("code", "busy"),)] == 1
    assert got["lockd_refusals_total", (("code", "timeout"),)] == 1
    assert got["lockd_wait_seconds_count", ()] == 6
    assert got["lockd_hold_seconds_count", ()] == 6
    assert got["lockd_leases_held", (("mode", "exclusive"),)] == 0
    assert got["lockd_lease_oldest_held_seconds", ()] == 0
    # Only db1, which matches the configured glob db*, has series of its own.
    assert {dict(labels).get("name") for _, labels in got} - {None} == {"db1"}
    assert got["lockd_name_grants_total", (("mode", "exclusive"), ("name", "db1"))] == 4
    assert got["lockd_name_refusals_total", (("code", "timeout"), ("name", "db1"))] == 1


def test_a_request_blocked_by_a_flock_outside_lockd_is_a_waiter_not_a_holder(
    tcp_daemon: tuple[Daemon, str]
) -> None:
    daemon, listen = tcp_daemon
    with outside_flock(daemon.lock_dir / "db-outside.lock"):
        waiter = subprocess.Popen([*LOCKCTL, "acquire", "db-outside", "--", "true"], env=daemon.env)
        try:
            got = wait_until(
                lambda: (m := scrape(listen))[("lockd_waiters", (("mode", "exclusive"),))] == 1 and m,
                "the blocked request counted as waiting", show=daemon.log,
            )
            assert got["lockd_leases_held", (("mode", "exclusive"),)] == 0
            assert got["lockd_lease_oldest_held_seconds", ()] == 0
            assert got["lockd_name_waiters", (("mode", "exclusive"), ("name", "db-outside"))] == 1
        finally:
            waiter.kill()
            waiter.wait(TIMEOUT)


def test_a_listener_that_cannot_bind_stops_the_start_saying_why(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (short_tmp / "lockd.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        daemon = Daemon(short_tmp, "--config", str(short_tmp / "lockd.toml"))
        daemon.lock_dir.mkdir()
        done = subprocess.run(daemon.argv(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert not Path(daemon.socket).exists()


def test_a_start_that_fails_after_the_listener_is_bound_leaves_no_socket_behind(short_tmp: Path) -> None:
    listen = short_tmp / "metrics.sock"
    (short_tmp / "lockd.toml").write_text(f'[metrics]\nlisten = "unix:{listen}"\n')
    daemon = Daemon(short_tmp, "--config", str(short_tmp / "lockd.toml"))
    daemon.lock_dir.mkdir()
    Path(daemon.socket).write_text("")  # lockd's own socket cannot be bound: the start fails
    done = subprocess.run(daemon.argv(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1
    assert "exists and is not a socket" in done.stderr
    assert not listen.exists()


def test_bad_requests_get_an_error_or_are_cut_off_and_the_lock_service_goes_on(
    unix_daemon: tuple[Daemon, str], name: str
) -> None:
    daemon, listen = unix_daemon
    assert exchange(listen, b"\x16\x03\x01garbage\r\n\r\n")[0] == "HTTP/1.1 400 Bad Request"
    assert exchange(listen, b"DELETE /metrics HTTP/1.1\r\n\r\n")[0] == "HTTP/1.1 405 Method Not Allowed"
    assert exchange(listen, b"GET /admin HTTP/1.1\r\n\r\n")[0] == "HTTP/1.1 404 Not Found"
    with open_to(listen) as huge:
        try:
            huge.sendall(b"GET /metrics HTTP/1.1\r\nX-Long: " + b"x" * 1_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off before all of it was sent
        assert huge.recv(100).startswith(b"HTTP/1.1 431 ")
    # Slow clients, as many as are served at once and more, holding their connections silent:
    # the oldest make way for the newest, and a scrape still gets in.
    silent = [open_to(listen) for _ in range(metrics_http.MAX_CLIENTS + 2)]
    try:
        silent[-1].sendall(b"GET /met")
        with connect(daemon.socket) as client:
            client.acquire(name).release()
        assert lockctl(daemon, "acquire", name, "--", "true").returncode == 0
        assert scrape(listen)
        assert silent[0].recv(100) == b""  # evicted, unanswered
    finally:
        for sock in silent:
            sock.close()


def test_lockctl_metrics_prints_the_same_families_as_the_listener(unix_daemon: tuple[Daemon, str]) -> None:
    daemon, listen = unix_daemon
    done = lockctl(daemon, "metrics")
    assert (done.returncode, done.stderr) == (0, "")
    printed = {family.name for family in text_string_to_metric_families(done.stdout)}
    _, body = exchange(listen, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert printed == {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"lockd_grants", "lockd_wait_seconds", "lockd_leases_held", "lockd_connections"} <= printed


#: The line Python writes (PYTHONPROFILEIMPORTTIME) when the daemon imports prometheus_client.
PROMETHEUS_IMPORTED = re.compile(r"^import time:.*\| +prometheus_client$", re.MULTILINE)


def test_the_daemon_imports_prometheus_client_only_once_its_metrics_are_read(short_tmp: Path) -> None:
    """The import takes tens of milliseconds, which a start, and the pause of a re-exec in
    place (a new program that imports all it serves with), must not spend on metrics nobody
    may read. Python logs every import the daemon makes, in the order made."""
    listen = f"unix:{short_tmp}/metrics.sock"
    config = short_tmp / "lockd.toml"
    config.write_text(f"[metrics]\nlisten = {json.dumps(listen)}\n")
    daemon = Daemon(short_tmp, "--config", str(config), daemon_env={"PYTHONPROFILEIMPORTTIME": "1"})
    daemon.start()
    try:
        # Its socket accepts before the daemon has imported all it serves with; a handshake
        # answered, after.
        with connect(daemon.socket, timeout=TIMEOUT):
            pass
        assert not PROMETHEUS_IMPORTED.search(daemon.log())
        scrape(listen)
        assert PROMETHEUS_IMPORTED.search(daemon.log())
        before = len(daemon.log())
        sigusr2(daemon)
        assert not PROMETHEUS_IMPORTED.search(daemon.log()[before:])
        assert lockctl(daemon, "metrics").returncode == 0
        assert PROMETHEUS_IMPORTED.search(daemon.log()[before:])
    finally:
        daemon.kill()


# --- the dashboard and the alert rules --------------------------------------------------------

#: A metric's name in a PromQL expression: lockd's own, and the process's it exposes.
METRIC = re.compile(r"\b(?:lockd|process)_[a-z_]+\b")
#: What the example files may use that a daemon on the flock backend never exposes: the etcd
#: backend's (checked against what lockd.metrics renders for an etcd backend).
ETCD_ONLY = {"lockd_etcd_lease_alive", "lockd_etcd_keepalive_age_seconds", "lockd_etcd_request_seconds_bucket"}


def exposed(listen: str, daemon: Daemon) -> set[str]:
    """The sample names a daemon exposes, with a lease held on a name that has series of
    its own (so that they all have samples), and the etcd backend's."""
    with connect(daemon.socket) as client, client.acquire("db-dashboard"):
        # A scrape less than a second after another is served the same text: wait for one
        # rendered since the lease.
        held = ("lockd_name_leases_held", (("mode", "exclusive"), ("name", "db-dashboard")))
        got = wait_until(lambda: (m := scrape(listen)).get(held) and m, "a scrape showing the lease", show=daemon.log)
        return {sample_name for sample_name, _ in got} | ETCD_ONLY


def test_the_etcd_only_names_are_what_lockd_renders_for_the_etcd_backend() -> None:
    assert {name.removesuffix("_bucket") for name in ETCD_ONLY} == set(metrics_text.ETCD_FAMILIES)
    rendered = samples(Metrics(backend="etcd", etcd=FakeEtcd()))
    assert ETCD_ONLY <= {sample_name for sample_name, _ in rendered}


def test_the_dashboard_is_a_grafana_dashboard_of_metrics_the_daemon_exposes(
    unix_daemon: tuple[Daemon, str]
) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard["panels"]
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["type"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        exprs += [target["expr"] for target in panel["targets"]]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    for expr in exprs:
        assert METRIC.search(expr), expr
    assert used <= exposed(unix_daemon[1], unix_daemon[0])
    # What the issue asks the dashboard to show, and the etcd backend's session.
    for wanted in ("lockd_leases_held", "lockd_waiters", "lockd_grants_total", "lockd_refusals_total",
                   "lockd_wait_seconds_bucket", "lockd_hold_seconds_bucket", *ETCD_ONLY):
        assert wanted in used
    assert any("histogram_quantile" in expr for expr in exprs)


def test_the_alert_rules_are_a_rule_group_of_metrics_the_daemon_exposes(unix_daemon: tuple[Daemon, str]) -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())
    (group,) = rules["groups"]
    assert group["name"]
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
        assert rule["annotations"]["summary"]
    exprs = {rule["alert"]: rule["expr"] for rule in group["rules"]}
    assert set(exprs) == {
        "LockdLockHeldTooLong", "LockdWaitersWaitingTooLong", "LockdLeaseLost", "LockdEtcdLeaseDown",
        "LockdHistoryDropping", "LockdDescriptorsNearLimit",
    }
    assert "lockd_name_lease_oldest_held_seconds" in exprs["LockdLockHeldTooLong"]
    assert "lockd_waiter_oldest_waiting_seconds" in exprs["LockdWaitersWaitingTooLong"]
    used = {name for expr in exprs.values() for name in METRIC.findall(expr)}
    assert used <= exposed(unix_daemon[1], unix_daemon[0])
    # Label values the rules match on are ones the daemon gives.
    assert 'reason!="shutdown"' in exprs["LockdLeaseLost"] and "shutdown" in LOSS_REASONS
