"""systemd integration: socket activation, sd_notify, the watchdog, the fd limit, journal logs.

Sockets come from the real `systemd-socket-activate`; notifications go to real AF_UNIX
datagram sockets; the end-to-end tests run a real `python -m lockd` under both.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from lockd_client import protocol

from lockd import logs
from lockd.systemd import Notifier, listen_fds, watchdog_interval, watchdog_loop

from .flock_tools import can_flock
from .rawclient import RawClient
from .waiting import wait_until

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> str:
    """Run `code` in a fresh interpreter (optionally under `prefix`); return its stdout."""
    result = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- listen_fds -------------------------------------------------------------------------------

ACTIVATED_CHILD = """
    import fcntl, os
    from lockd.systemd import listen_fds
    socks = listen_fds()
    for s in socks:
        print(s.fileno(), s.getsockname(), bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
    print(sorted(k for k in os.environ if k.startswith("LISTEN_")))
"""


def activate(short_tmp: Path, code: str, *listen: str, extra: tuple[str, ...] = ()) -> str:
    """Run `code` under systemd-socket-activate listening on `listen`; it starts on connect."""
    paths = [str(short_tmp / name) for name in listen]
    argv = ["systemd-socket-activate", *extra, *(f"--listen={p}" for p in paths)]
    argv += [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(Path(paths[0]), proc)
        # systemd-socket-activate starts its command only once someone connects.
        datagram = "-d" in extra
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM) as c:
            c.connect(paths[0])
            if datagram:
                c.send(b"wake up")
            out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 0, err
    return out


def wait_for_path(path: Path, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    def there() -> bool:
        assert proc.poll() is None, proc.communicate()
        return path.exists()

    wait_until(there, f"{path} appeared")


def test_inherited_sockets_are_returned_in_order_and_made_cloexec(short_tmp: Path) -> None:
    out = activate(short_tmp, ACTIVATED_CHILD, "a.sock", "b.sock")
    assert out.splitlines() == [
        f"3 {short_tmp / 'a.sock'} True",
        f"4 {short_tmp / 'b.sock'} True",
        "[]",  # LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are gone for any child
    ]


def test_fd_names_are_also_removed(short_tmp: Path) -> None:
    out = activate(short_tmp, ACTIVATED_CHILD, "a.sock", extra=("--fdname=lockd",))
    assert out.splitlines()[-1] == "[]"


def test_a_datagram_socket_is_refused_with_a_clear_error(short_tmp: Path) -> None:
    code = """
        from lockd.systemd import ActivationError, listen_fds
        try:
            listen_fds()
        except ActivationError as e:
            print(e)
    """
    out = activate(short_tmp, code, "d.sock", extra=("-d",))
    assert "descriptor 3 from systemd is an AF_UNIX SOCK_DGRAM socket;" in out
    assert "ListenStream=" in out


CHILD_WITH_FD3 = """
    import os, socket
    from lockd.systemd import ActivationError, listen_fds
    {make_fd3}
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS={count!r})
    try:
        socks = listen_fds()
        print(len(socks))
    except ActivationError as e:
        print(e)
    os.fstat(3)  # still open: a refused descriptor is not closed
"""


@pytest.mark.parametrize(
    ("make_fd3", "count", "expected"),
    [
        ("os.dup2(os.open('/dev/null', os.O_RDONLY), 3)", "1", "descriptor 3 from systemd is not a socket"),
        (
            "s = socket.socket(socket.AF_UNIX); os.dup2(s.fileno(), 3)",
            "1",
            "is an AF_UNIX SOCK_STREAM socket that is not listening",
        ),
        (
            "s = socket.socket(socket.AF_INET); s.bind(('127.0.0.1', 0)); s.listen(); os.dup2(s.fileno(), 3)",
            "1",
            "is an AF_INET SOCK_STREAM socket;",
        ),
        (
            "s = socket.socket(socket.AF_UNIX); s.bind(''); s.listen(); os.dup2(s.fileno(), 3)",
            "2",
            "systemd was to pass descriptor 4, but it is not open",
        ),
        ("os.dup2(os.open('/dev/null', os.O_RDONLY), 3)", "one", "bad socket activation environment"),
        ("os.dup2(os.open('/dev/null', os.O_RDONLY), 3)", "-1", "bad socket activation environment"),
        (
            "s = socket.socket(socket.AF_UNIX); s.bind(''); s.listen(); os.dup2(s.fileno(), 3)",
            "1",
            "1",
        ),
    ],
)
def test_descriptors_are_checked(make_fd3: str, count: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    out = run_python(CHILD_WITH_FD3.format(make_fd3=make_fd3, count=count), env=env)
    assert expected in out


def test_variables_meant_for_another_process_are_ignored_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "lockd")
    assert listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_without_systemd_there_are_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert listen_fds() == []


# --- Notifier ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[tuple[str, socket.socket]]:
    """A real datagram socket standing in for systemd's notify socket: (NOTIFY_SOCKET, sock)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = str(short_tmp / "notify")
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        yield path, sock


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notifier_sends_each_state_as_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    with Notifier(address) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving: 0 leases, 0 waiters")
        assert notifier.status("3 leases, 1 waiter")
        assert notifier.watchdog()
        assert notifier.reloading()
        assert notifier.stopping()
    assert received(sock) == ["READY=1", "STATUS=serving: 0 leases, 0 waiters"]
    assert received(sock) == ["STATUS=3 leases, 1 waiter"]
    assert received(sock) == ["WATCHDOG=1"]
    reloading, monotonic = received(sock)
    assert reloading == "RELOADING=1"
    usec = int(monotonic.removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.monotonic_ns() // 1000) < TIMEOUT * 1_000_000
    assert received(sock) == ["STOPPING=1", "STATUS=shutting down"]


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"lockd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(TIMEOUT)
        with Notifier("@" + name) as notifier:
            assert notifier.ready("up")
        assert received(sock) == ["READY=1", "STATUS=up"]


def test_notifier_from_environment(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with Notifier.from_environment() as notifier:
        notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    with Notifier.from_environment() as notifier:
        assert not notifier.enabled
        assert not notifier.ready("up")


def test_a_failing_notifier_warns_once_and_never_raises(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Notifier(str(short_tmp / "nobody-listens")) as notifier:
        assert notifier.enabled
        assert not notifier.ready("up")
        assert not notifier.watchdog()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0].getMessage()


def test_an_unusable_address_disables_the_notifier(caplog: pytest.LogCaptureFixture) -> None:
    with Notifier("relative/path") as notifier:
        assert not notifier.enabled
        assert not notifier.ready("up")
    assert "neither a path nor @abstract" in caplog.text


def test_a_full_systemd_queue_drops_messages_instead_of_blocking(
    notify_socket: tuple[str, socket.socket],
) -> None:
    address, _ = notify_socket  # never read: its queue fills up
    sent = 0
    with Notifier(address) as notifier:
        while notifier.watchdog():
            sent += 1
            assert sent < 1_000_000, "the queue never filled"
    assert sent > 0


# --- watchdog ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert watchdog_interval() == expected


async def test_watchdog_loop_pings_at_once_then_every_interval(
    notify_socket: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    address, sock = notify_socket
    sock.setblocking(False)
    with Notifier(address) as notifier:
        with trio.move_on_after(35):
            await watchdog_loop(notifier, 10)
    pings = []
    while True:
        try:
            pings.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 4  # at 0, 10, 20 and 30 s


# --- descriptor limit -------------------------------------------------------------------------


def test_soft_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE above 256 (have {hard})")
    code = """
        import resource
        from lockd.fdlimit import raise_nofile_limit
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(before[0], raise_nofile_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
    """
    out = run_python(code, prefix=["prlimit", "--nofile=256:"])
    assert out.split() == ["256", str(hard), str(hard), str(hard)]


# --- journal-friendly logging -----------------------------------------------------------------


class Stderr:
    """What was logged to stderr (pytest's capture of it) since configure_logging."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def getvalue(self) -> str:
        return self._capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    yield Stderr(capsys)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logs._Handler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lockd").setLevel(logging.NOTSET)


def test_journal_lines_carry_a_priority_and_no_timestamp(stderr: Stderr) -> None:
    logs.configure_logging("info", under_systemd=True)
    logging.getLogger("lockd.server").info("serving %d", 3)
    logging.getLogger("lockd.server").warning("two\nlines")
    logging.getLogger("lockd.server").debug("hidden")
    assert stderr.getvalue() == "<6>serving 3\n<4>two\n<4>lines\n"


def test_terminal_lines_have_a_timestamp_and_level(stderr: Stderr) -> None:
    logs.configure_logging("debug", under_systemd=False)
    logging.getLogger("lockd.table").debug("queued")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG queued\n", stderr.getvalue())


def test_reconfiguring_replaces_the_handler_and_level(stderr: Stderr) -> None:
    logs.configure_logging("debug", under_systemd=True)
    logs.configure_logging("error", under_systemd=True)
    logging.getLogger("lockd.x").warning("dropped")
    logging.getLogger("lockd.x").error("kept")
    assert stderr.getvalue() == "<3>kept\n"


def test_other_libraries_stay_at_warning(stderr: Stderr) -> None:
    logs.configure_logging("debug", under_systemd=True)
    logging.getLogger("httpx").info("HTTP Request: POST ...")
    logging.getLogger("httpx").warning("retrying")
    assert stderr.getvalue() == "<4>retrying\n"


def test_under_systemd_detection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with open(tmp_path / "err", "w") as err:
        monkeypatch.setattr("sys.stderr", err)
        assert not logs.under_systemd()
        st = os.fstat(err.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_systemd()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.under_systemd()  # stderr was redirected away from the journal
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        assert logs.under_systemd()


# --- the daemon under systemd's tools ---------------------------------------------------------

def _used_by_the_daemon(name: str) -> pytest.MarkDecorator:
    """Skip until the daemon's entry point calls lockd.systemd's `name` (it is wired in
    separately); from then on these tests hold it to the behaviour systemd expects."""
    users = [p for p in (REPO / "lockd").glob("*.py") if p.name != "systemd.py" and name in p.read_text()]
    return pytest.mark.skipif(not users, reason=f"the daemon does not call lockd.systemd.{name} yet")


def lockd_argv(root: Path) -> list[str]:
    (root / "locks").mkdir(mode=0o700, exist_ok=True)
    return [
        sys.executable, "-m", "lockd",
        "--lock-dir", str(root / "locks"),
        "--state-dir", str(root / "state"),
        "--log-level", "debug",
    ]


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(TIMEOUT)
        raise


@_used_by_the_daemon("listen_fds")
def test_socket_activated_daemon_grants_a_lease_that_flock_sees(short_tmp: Path) -> None:
    sock_path = short_tmp / "lockd.sock"
    log = open(short_tmp / "lockd.log", "wb")
    # systemd-socket-activate gives its command a minimal environment, as systemd does: no
    # LOCKD_SOCKET, so only the inherited socket can tell lockd where to serve.
    proc = subprocess.Popen(
        ["systemd-socket-activate", f"--listen={sock_path}", *lockd_argv(short_tmp)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        wait_for_path(sock_path, proc)
        # The first connection starts lockd, which must serve the socket it inherited.
        with RawClient(str(sock_path), timeout=TIMEOUT) as client:
            reply = client.acquire("db-migrate", timeout=0)
            assert isinstance(reply, protocol.Granted), reply
            assert not can_flock(short_tmp / "locks" / "db-migrate.lock")  # lockd's lease is a real flock on it
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    # The socket file belongs to whoever bound it (lockd.socket), which may start lockd again.
    assert sock_path.exists()


@_used_by_the_daemon("Notifier")
def test_daemon_tells_systemd_ready_status_watchdog_and_stopping(
    short_tmp: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    address, notify = notify_socket
    sock_path = short_tmp / "lockd.sock"
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    log = open(short_tmp / "lockd.log", "wb")
    proc = subprocess.Popen(
        [*lockd_argv(short_tmp), "--socket", str(sock_path)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
    )
    log.close()
    try:
        messages: list[list[str]] = []
        while not any("READY=1" in m for m in messages):
            messages.append(received(notify))
        # READY only once it serves: a client is answered right away.
        with RawClient(str(sock_path), timeout=TIMEOUT) as client:
            assert isinstance(client.acquire("x", timeout=0), protocol.Granted)
            ready = next(m for m in messages if "READY=1" in m)
            assert any(line.startswith("STATUS=") for line in ready)
            pings = 0
            while pings < 3:  # every 0.1 s: half of WATCHDOG_USEC
                pings += received(notify) == ["WATCHDOG=1"]
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in received(notify):
            pass
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
