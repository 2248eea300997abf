"""Re-exec in place under load, against real daemons and real client processes: nothing any
client holds, waits for or runs is lost, reordered or interrupted by a re-exec.

The contention test's clients are `lockctl acquire NAME -c CMD` processes whose CMD writes
"start I TOKEN" to a ledger after its grant and "end I" before its release (each line one
O_APPEND write); a `flock -n` prober writes "probe" to the same ledger whenever it gets the
lock file. From the ledger alone: a start or probe among more holders than the name allows
is an overlap, and a client's lines say it held the lease once and ran to its end.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client import protocol

from .conftest import Daemon
from .etcd_cluster import EtcdCluster, requires_etcd
from .flock_tools import outside_flock
from .rawclient import RawClient
from .test_cli import LOCKCTL, kill_quietly, lockctl, start_lockctl
from .test_cli_watch import Watcher
from .test_kernel_lock import Prober
from .test_reexec import granted, next_reply, reexecs
from .test_systemd import lockd_argv, received, wait_for_path
from .waiting import wait_until

#: Generous: 30 client processes, the check of the new program and its start-up share two
#: busy cores.
TIMEOUT = 60.0
CLIENTS = 30
#: The etcd lease's TTL: a re-exec's pause, several seconds on a busy machine, must not outlast
#: the keep-alive's margin (a third of it).
ETCD_TTL = 10
#: How long each contending client's CMD holds its lease; a semaphore's clients hold theirs
#: `slots` times as long, so a queue builds up either way.
HOLD = 0.3


def reexec(daemon: Daemon) -> None:
    """Re-exec by SIGUSR2, and wait until the new program serves."""
    assert daemon.proc is not None
    before = reexecs(daemon)
    daemon.proc.send_signal(signal.SIGUSR2)
    wait_until(lambda: reexecs(daemon) > before, "the re-exec", TIMEOUT, show=daemon.log)


def status(client: RawClient, name: str) -> protocol.LockInfo | None:
    reply = client.request(protocol.Status(1, [name]))
    assert isinstance(reply, protocol.StatusReply), reply
    return reply.locks[0] if reply.locks else None


def labels(client: RawClient, name: str) -> set[str | None]:
    """The labels of `name`'s holders and waiters."""
    lock = status(client, name)
    return set() if lock is None else {h.label for h in [*lock.holders, *lock.waiters]}


# --- many contending clients ------------------------------------------------------------------


def check_ledger(lines: list[str], slots: int) -> dict[int, int]:
    """Each client's token, checking from the ledger that no more than `slots` held the
    name at once (a probe holds it all) and that every client held it exactly once, ran its
    CMD to the end and was never told to stop."""
    holding: set[str] = set()
    tokens: dict[int, int] = {}
    ended: set[int] = set()
    for number, line in enumerate(lines, 1):
        kind, *fields = line.split()
        if kind == "start":
            who, token = int(fields[0]), int(fields[1])
            assert who not in tokens, f"line {number}: client {who} was granted twice"
            assert "probe" not in holding and len(holding) < slots, f"line {number}: {who} joined {holding}"
            tokens[who] = token
            holding.add(fields[0])
        elif kind == "end":
            assert fields[0] in holding, f"line {number}: client {fields[0]} ended what it did not hold"
            holding.discard(fields[0])
            ended.add(int(fields[0]))
        elif kind == "probe":
            assert not holding, f"line {number}: flock(1) got the lock file while {holding} held the name"
        else:
            raise AssertionError(f"line {number}: {line!r}")
    assert sorted(tokens) == sorted(ended) == list(range(CLIENTS)), (sorted(tokens), sorted(ended))
    return tokens


def test_ledger_check_catches_what_it_must() -> None:
    fine = [line for i in range(CLIENTS) for line in (f"start {i} {i + 1}", f"end {i}")]
    assert check_ledger(["probe", *fine, "probe"], 1) == {i: i + 1 for i in range(CLIENTS)}
    for bad, slots in [
        (["start 0 1", "start 1 2", "end 0", "end 1", *fine[4:]], 1),  # overlap
        (["start 0 1", "start 1 2", "start 2 3", "end 0", "end 1", "end 2", *fine[6:]], 2),  # three in two slots
        ([*fine[:1], "probe", *fine[1:]], 3),  # flock(1) beside a holder
        ([*fine, "start 0 99", "end 0"], 1),  # granted twice
        ([*fine[:1], "term 0", *fine[1:]], 1),  # told to stop
        (fine[2:], 1),  # never granted
    ]:
        with pytest.raises(AssertionError):
            check_ledger(bad, slots)


@pytest.mark.parametrize("slots", [None, 3], ids=["lock", "semaphore"])
def test_contending_clients_across_three_reexecs(daemon: Daemon, slots: int | None) -> None:
    """30 lockctl processes queue one after the other for one name while the daemon
    re-executes three times: every one is granted exactly once, in the order it asked, with
    tokens rising in that order, holders never overlap, and every CMD runs to its end."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    name = "contended"
    ledger = daemon.root / "ledger"
    ledger.touch()
    hold = HOLD * (slots or 1)
    how = ["--slots", str(slots)] if slots else []
    clients: list[subprocess.Popen[bytes]] = []
    signals: list[threading.Thread] = []
    errors = open(daemon.root / "lockctl.err", "wb")
    try:
        with RawClient(daemon.socket, timeout=TIMEOUT) as looker, Prober(daemon.lock_dir / f"{name}.lock", ledger):
            for i in range(CLIENTS):
                cmd = (
                    f"""echo "start {i} $LOCKD_TOKEN" >> {ledger}; trap 'echo "term {i}" >> {ledger}' TERM; """
                    f'sleep {hold}; echo "end {i}" >> {ledger}'
                )
                clients.append(subprocess.Popen(
                    [*LOCKCTL, "acquire", *how, "--label", f"c{i}", name, "-c", cmd],
                    env=daemon.env, stdout=subprocess.DEVNULL, stderr=errors,
                ))
                # The next client asks only once this one is queued (or further): so the
                # order they asked in is their order here.
                def queued(i: int = i, client: subprocess.Popen[bytes] = clients[-1]) -> bool:
                    assert client.poll() in (None, 0), (daemon.root / "lockctl.err").read_text() + daemon.log()[-4000:]
                    return f"c{i}" in labels(looker, name) or f"start {i} " in ledger.read_text()

                wait_until(queued, f"client {i} in the queue", TIMEOUT, show=lambda: daemon.log()[-5000:])
                if i in (9, 19, CLIENTS - 1):  # the last one while the queue drains
                    for thread in signals:
                        thread.join(TIMEOUT)
                    signals.append(threading.Thread(target=reexec, args=(daemon,)))
                    signals[-1].start()
            statuses = [client.wait(TIMEOUT + CLIENTS * hold) for client in clients]
            for thread in signals:
                thread.join(TIMEOUT)
    finally:
        errors.close()
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(TIMEOUT)
    assert statuses == [0] * CLIENTS, (statuses, (daemon.root / "lockctl.err").read_text())
    assert reexecs(daemon) == 3 and daemon.proc.poll() is None and daemon.proc.pid == pid
    tokens = check_ledger(ledger.read_text().splitlines(), slots or 1)
    in_order = [tokens[i] for i in range(CLIENTS)]
    assert len(set(in_order)) == CLIENTS, f"tokens repeated: {in_order}"
    # A token is issued when the backend's take ends. Takes of a semaphore's free slots run
    # side by side, and when they all wait for the probe's brief flock to go, the kernel wakes
    # them in any order: so a client may only be sure to come before those `slots` places
    # behind it, which had to wait for a slot to be let go.
    width = slots or 1
    out_of_order = [(i, j) for i in range(CLIENTS) for j in range(i + width, CLIENTS) if in_order[j] < in_order[i]]
    assert not out_of_order, f"grants out of request order: {out_of_order} in {in_order}"
    assert "ERROR" not in daemon.log()


# --- shared holders and a writer --------------------------------------------------------------


def test_shared_holders_and_a_queued_writer(daemon: Daemon) -> None:
    """Two readers hold, a writer waits, and a third reader waits behind the writer; after a
    re-exec the writer is granted only once both readers are gone, and the third reader
    only once the writer is."""
    readers = [RawClient(daemon.socket, timeout=TIMEOUT) for _ in range(2)]
    writer, late = RawClient(daemon.socket, timeout=TIMEOUT), RawClient(daemon.socket, timeout=TIMEOUT)
    looker = RawClient(daemon.socket, timeout=TIMEOUT)
    try:
        first = [granted(r.acquire("db", mode="shared", label=f"r{i}")).tokens[0] for i, r in enumerate(readers)]
        writer.send(protocol.Acquire(1, ["db"], label="writer"))
        assert isinstance(writer.recv(), protocol.Queued)
        late.send(protocol.Acquire(1, ["db"], mode="shared", label="late"))
        assert isinstance(late.recv(), protocol.Queued)
        reexec(daemon)

        def lock() -> protocol.LockInfo:
            info = status(looker, "db")
            assert info is not None
            return info

        def waiting() -> list[str | None]:
            return [w.label for w in lock().waiters]

        assert waiting() == ["writer", "late"]
        readers[0].send(protocol.Release(1))
        wait_until(lambda: len(lock().holders) == 1, "the first reader gone")
        assert waiting() == ["writer", "late"]
        readers[1].send(protocol.Release(1))
        write = granted(next_reply(writer)).tokens[0]
        assert write > max(first)
        assert waiting() == ["late"]
        writer.send(protocol.Release(1))
        assert granted(next_reply(late)).tokens[0] > write
    finally:
        for client in [*readers, writer, late, looker]:
            client.close()


# --- lockctl: a running CMD, its history, a watch ---------------------------------------------


def test_running_command_goes_on_and_its_end_is_in_the_history(daemon: Daemon) -> None:
    """`lockctl acquire NAME -c CMD` whose CMD runs across a re-exec: CMD is not told to stop,
    the lease ends when CMD does, and the history, written partly by each program, has the
    grant and the release with CMD's exit status."""
    go, ledger = daemon.root / "go", daemon.root / "ledger"
    cmd = (
        f"trap 'echo term >> {ledger}' TERM; echo start >> {ledger}; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo end >> {ledger}; exit 7"
    )
    run = start_lockctl(daemon, "acquire", "backup", "-c", cmd)
    try:
        wait_until(lambda: ledger.exists() and "start" in ledger.read_text(), "CMD running", TIMEOUT)
        reexec(daemon)
        go.touch()
        _, err = run.communicate(timeout=TIMEOUT)
        assert run.returncode == 7, err
        # The release comes just before or after this re-exec: its event is written by the
        # old program or the new, or handed over unwritten between them.
        reexec(daemon)
    finally:
        kill_quietly(run)
    assert ledger.read_text().split() == ["start", "end"]
    with RawClient(daemon.socket, timeout=TIMEOUT) as other:
        granted(other.acquire("backup", timeout=0))

    def events() -> list[dict[str, object]]:
        shown = lockctl(daemon, "history", "backup", "--json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)["events"]  # type: ignore[no-any-return]

    wait_until(lambda: len(events()) >= 3, "the history of backup", TIMEOUT, show=events)
    cycle = [(e["event"], e["exit_status"]) for e in events()][:3]
    assert cycle == [("granted", None), ("released", 7), ("granted", None)], cycle


def test_watch_goes_on_receiving_events(daemon: Daemon) -> None:
    """A `lockctl watch` across a re-exec asked for by `lockctl daemon reexec` sees the
    events of both programs, in order, on its one connection."""
    watcher = Watcher(daemon, "site.com", "--json")
    try:
        assert lockctl(daemon, "acquire", "site.com", "--", "true").returncode == 0
        done = lockctl(daemon, "daemon", "reexec")
        assert done.returncode == 0 and "lockd re-executed: " in done.stdout, done.stderr
        assert lockctl(daemon, "acquire", "site.com", "--", "true").returncode == 0
        events = [json.loads(line) for line in watcher.of(4)]
        assert [e["event"] for e in events] == ["granted", "released", "granted", "released"]
        assert events[3]["token"] > events[1]["token"]
        assert watcher.proc.poll() is None
    finally:
        kill_quietly(watcher.proc)


# --- the etcd backend -------------------------------------------------------------------------


def etcd_daemon(root: Path, endpoints: list[str], prefix: str, ttl: int) -> Daemon:
    root.mkdir()
    return Daemon(
        root, "--backend", "etcd", "--etcd-endpoints", ",".join(endpoints), "--etcd-ttl", str(ttl),
        "--etcd-prefix", prefix,
    )


@requires_etcd
def test_etcd_lease_and_waiter_kept(etcd: EtcdCluster, short_tmp: Path, prefix: str) -> None:
    """On the etcd backend: a lease and a waiter on host a, a waiter on host b behind it; host
    a re-executes: the lease keeps its token and b cannot take it, and the waiters are then
    granted in the order they asked."""
    a, b = (etcd_daemon(short_tmp / host, etcd.endpoints, prefix, ETCD_TTL) for host in "ab")
    clients: list[RawClient] = []
    try:
        for d in (a, b):
            d.start()
            # The etcd session may still be on its way when the socket first accepts.
            with RawClient(d.socket, timeout=TIMEOUT) as probe:
                wait_until(lambda probe=probe: isinstance(probe.acquire("ready"), protocol.Granted),
                           f"{d.root.name} serving", TIMEOUT)
        holder = RawClient(a.socket, timeout=TIMEOUT)
        clients.append(holder)
        lease = granted(holder.acquire("db"))
        first, second = RawClient(a.socket, timeout=TIMEOUT), RawClient(b.socket, timeout=TIMEOUT)
        clients += [first, second]
        first.send(protocol.Acquire(1, ["db"], label="first"))
        assert isinstance(first.recv(), protocol.Queued)
        second.send(protocol.Acquire(1, ["db"], label="second"))
        assert isinstance(second.recv(), protocol.Queued)
        reexec(a)
        with RawClient(a.socket, timeout=TIMEOUT) as looker:
            lock = status(looker, "db")
        assert lock is not None and [h.token for h in lock.holders] == [lease.tokens[0]], lock
        with RawClient(b.socket, timeout=TIMEOUT) as other:
            refused = other.acquire("db", timeout=0)
        assert isinstance(refused, protocol.Error) and refused.code == "busy", refused
        holder.send(protocol.Release(lease.id))
        got = granted(next_reply(first)).tokens[0]
        assert got > lease.tokens[0]
        first.send(protocol.Release(1))
        assert granted(next_reply(second)).tokens[0] > got
        assert "ERROR" not in a.log()
    finally:
        for client in clients:
            client.close()
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.kill()


# --- under systemd ----------------------------------------------------------------------------


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket: (NOTIFY_SOCKET, sock)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = str(short_tmp / "notify")
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        yield path, sock


def test_socket_activated_daemon_reexecs_and_tells_systemd(
    short_tmp: Path, notify: tuple[str, socket.socket],
) -> None:
    """Started by `systemd-socket-activate` with a notify socket: the daemon says RELOADING=1,
    then READY=1, around a re-exec, and serves on the activated socket all along."""
    address, notifications = notify
    sock_path = short_tmp / "lockd.sock"
    log_path = short_tmp / "lockd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", f"--listen={sock_path}", f"--setenv=NOTIFY_SOCKET={address}",
             *lockd_argv(short_tmp)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_path(sock_path, proc)
        with RawClient(str(sock_path), timeout=TIMEOUT) as holder:  # this connection starts lockd
            granted(holder.acquire("db-migrate"))
            while "READY=1" not in received(notifications):
                pass
            proc.send_signal(signal.SIGUSR2)
            told = []
            while "READY=1" not in (message := received(notifications)):
                told += message
            assert "RELOADING=1" in told, told
            assert any(m.startswith("MONOTONIC_USEC=") for m in told), told
            assert "re-executed from" in log_path.read_text()
            with RawClient(str(sock_path), timeout=TIMEOUT) as other:
                refused = other.acquire("db-migrate", timeout=0)
                assert isinstance(refused, protocol.Error) and refused.code == "busy", refused
            holder.send(protocol.Release(1))
            with RawClient(str(sock_path), timeout=TIMEOUT) as other:
                granted(other.acquire("db-migrate", timeout=0))
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert sock_path.exists()



# --- connections coming in --------------------------------------------------------------------


def test_connections_arriving_during_reexecs_are_kept(daemon: Daemon) -> None:
    """Clients connecting in a tight loop while the daemon re-executes again and again: every
    connection is greeted and served, whether it came before, during or after a re-exec
    (one accepted just before the state is taken is handed over too, and one whose hello
    came while the sessions' gate was shut). A client asking for the status over and over
    keeps a request under way (its look at the host's locks), which a re-exec waits for
    with the gate shut: meanwhile the other tasks run."""
    stop = threading.Event()
    served = [0] * 4
    failures: list[str] = []

    def connect_again_and_again(me: int) -> None:
        while not stop.is_set():
            try:
                with RawClient(daemon.socket, timeout=TIMEOUT) as client:
                    granted(client.acquire(f"n{me}"))
                served[me] += 1
            except (OSError, EOFError, AssertionError) as exc:
                failures.append(f"client {me}, connection {served[me] + 1}: {exc!r}")
                return

    def look_again_and_again() -> None:
        with RawClient(daemon.socket, timeout=TIMEOUT) as looker:
            while not stop.is_set():
                status(looker, "n0")

    threads = [threading.Thread(target=connect_again_and_again, args=(me,)) for me in range(len(served))]
    threads.append(threading.Thread(target=look_again_and_again))
    for thread in threads:
        thread.start()
    try:
        for _ in range(5):
            reexec(daemon)
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert failures == [], failures
    assert min(served) > 0, served


# --- a take waiting outside lockd ---------------------------------------------------------------


def test_a_take_blocked_outside_lockd_behind_an_older_waiter(daemon: Daemon) -> None:
    """A request waiting in line on one name, and a later one let through on another whose
    lock file flock(1) holds (the daemon's take waits for it): the new program takes this
    over (the oldest request waiting is still the older one), and both are granted after."""
    with RawClient(daemon.socket, timeout=TIMEOUT) as holder, \
            RawClient(daemon.socket, timeout=TIMEOUT) as waiter, \
            RawClient(daemon.socket, timeout=TIMEOUT) as taker:
        held = granted(holder.acquire("x"))
        waiter.send(protocol.Acquire(1, ["x"]))
        assert isinstance(waiter.recv(), protocol.Queued)
        with outside_flock(daemon.lock_dir / "y.lock"):
            taker.send(protocol.Acquire(1, ["y"]))
            assert isinstance(taker.recv(), protocol.Queued)
            with RawClient(daemon.socket, timeout=TIMEOUT) as admin:
                reply = admin.request(protocol.Reexec(1))
            assert isinstance(reply, protocol.Reexecuted), reply
        granted(next_reply(taker))
        holder.send(protocol.Release(held.id))
        granted(next_reply(waiter))
