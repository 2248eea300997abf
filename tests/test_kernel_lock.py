"""The kernel lock follows the work: whatever happens to lockd, a lock file stays flocked
exactly as long as the work it protects runs.

Every test watches the lock file with a real `flock -n` prober that appends "probe" to the
same ledger the work writes "start" and "end" to while holding the lease: a probe between a
start and its end is two holders at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client import _keeper, cli

from .conftest import Daemon
from .test_cli import LOCKCTL, LOCKCTL_SH, finish, kill_quietly, lockctl, start_lockctl, status
from .test_cli_supervise import TIMEOUT, alive, wait_for_file
from .waiting import wait_until

#: A CMD that takes a while to clean up when told to stop, as backups and restores do.
SLOW_CLEANUP = (
    "trap 'echo term >> {ledger}; sleep 1; echo end >> {ledger}; exit 7' TERM; echo start >> {ledger}; {rest}"
)


class Prober:
    """`flock -n FILE` in a loop, appending "probe" to the ledger each time it gets the lock."""

    def __init__(self, path: Path, ledger: Path) -> None:
        self.path, self.ledger = path, ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            subprocess.run(
                ["flock", "-n", str(self.path), "sh", "-c", f"echo probe >> {self.ledger}"], timeout=TIMEOUT
            )
            time.sleep(0.005)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def lines(ledger: Path) -> list[str]:
    return ledger.read_text().split() if ledger.exists() else []


def assert_no_overlap(ledger: Path) -> None:
    """No probe got the lock while a holder's work ran (between its start and its end)."""
    running = 0
    for i, line in enumerate(lines(ledger)):
        if line == "start":
            running += 1
        elif line == "end":
            running -= 1
        elif line == "probe":
            assert running == 0, f"the lock was free while work ran: {lines(ledger)[: i + 1]}"


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


def slow_cmd(ledger: Path, rest: str = "while :; do sleep 0.05; done") -> str:
    return SLOW_CLEANUP.format(ledger=ledger, rest=rest)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_cmd_runs_on_under_the_lock_when_lockd_stops(daemon: Daemon, ledger: Path, how: str) -> None:
    done = ledger.parent / "done"
    cmd = slow_cmd(ledger, f"while [ ! -e {done} ]; do sleep 0.05; done; echo end >> {ledger}")
    proc = start_lockctl(daemon, "acquire", "y", "-c", cmd)
    try:
        wait_until(lambda: "start" in lines(ledger), "CMD started")
        with Prober(daemon.lock_dir / "y.lock", ledger):
            if how == "SIGKILL":
                daemon.kill()
            else:
                daemon.proc.send_signal(getattr(signal, how))
                assert daemon.proc.wait(TIMEOUT) == 0
            time.sleep(0.5)
            assert proc.poll() is None, "lockctl ended with the daemon"
            assert "term" not in lines(ledger)
            done.touch()
            code, err = finish(proc)
            wait_until(lambda: "probe" in lines(ledger), "the lock freed once CMD exited")
    finally:
        kill_quietly(proc)
    assert code == 0
    assert "lockd went away; CMD goes on" in err
    assert_no_overlap(ledger)


def test_a_restarted_lockd_sees_the_running_cmd_as_the_holder(daemon: Daemon, ledger: Path) -> None:
    done = ledger.parent / "done"
    cmd = slow_cmd(ledger, f"while [ ! -e {done} ]; do sleep 0.05; done; echo end >> {ledger}")
    first = start_lockctl(daemon, "acquire", "y", "-c", cmd)
    second = None
    try:
        wait_until(lambda: "start" in lines(ledger), "first CMD started")
        daemon.restart()
        busy = lockctl(daemon, "acquire", "-n", "y", "--", "true")
        assert busy.returncode == cli.EXIT_BUSY
        assert f"pid {first.pid}" in busy.stderr and "outside lockd" in busy.stderr
        [holder, *_] = status(daemon, "y")["y"]["holders"]
        assert holder["outside"] and holder["pid"] == first.pid
        second = start_lockctl(daemon, "acquire", "y", "-c", f"echo start >> {ledger}; echo end >> {ledger}")
        time.sleep(0.3)
        assert second.poll() is None, "granted while the first CMD still ran"
        done.touch()
        assert finish(first)[0] == 0
        code, err = finish(second)
        assert code == 0, err
    finally:
        kill_quietly(first, *([second] if second else []))
    assert lines(ledger) == ["start", "end", "start", "end"]


def test_a_forced_release_hands_the_lock_on_only_once_the_holders_cmd_is_gone(daemon: Daemon, ledger: Path) -> None:
    holder = start_lockctl(daemon, "acquire", "y", "-c", slow_cmd(ledger))
    waiter = None
    try:
        wait_until(lambda: "start" in lines(ledger), "holder's CMD started")
        waiter = start_lockctl(daemon, "acquire", "y", "-c", f"echo start >> {ledger}; echo end >> {ledger}")
        wait_until(lambda: status(daemon, "y")["y"]["waiters"], "waiter queued")
        with Prober(daemon.lock_dir / "y.lock", ledger):
            forced = lockctl(daemon, "release", "--force", "y")
            assert forced.returncode == 0, forced.stderr
            assert finish(holder)[0] == cli.EXIT_LOST
            assert finish(waiter)[0] == 0
    finally:
        kill_quietly(holder, *([waiter] if waiter else []))
    assert lines(ledger)[:4] == ["start", "term", "end", "start"] or lines(ledger)[:3] == ["start", "term", "end"]
    assert_no_overlap(ledger)


def test_a_holder_that_never_lets_go_loses_the_lock_after_the_break_grace(short_tmp: Path) -> None:
    (short_tmp / "lockd.toml").write_text("[limits]\nbreak_grace = 1.0\n")
    daemon = Daemon(short_tmp, "--config", str(short_tmp / "lockd.toml"))
    daemon.start()
    holder = subprocess.Popen(
        [*LOCKCTL, "acquire", "y", "--kill-after", "0.5", "--", "sleep", "60"], env=daemon.env,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: status(daemon, "y").get("y", {}).get("holders"), "held")
        holder.send_signal(signal.SIGSTOP)  # it cannot stop its CMD: a stuck holder
        started = time.monotonic()
        assert lockctl(daemon, "release", "--force", "y").returncode == 0
        assert lockctl(daemon, "acquire", "-w", "5", "y", "--", "true").returncode == 0
        assert time.monotonic() - started >= 1.0
        assert "not let go within limits.break_grace" in daemon.log()
    finally:
        holder.send_signal(signal.SIGCONT)
        kill_quietly(holder)
        daemon.kill()


def test_kill_after_must_fit_in_the_break_grace(short_tmp: Path) -> None:
    (short_tmp / "lockd.toml").write_text("[limits]\nbreak_grace = 4.0\n")
    daemon = Daemon(short_tmp, "--config", str(short_tmp / "lockd.toml"))
    daemon.start()
    try:
        refused = lockctl(daemon, "acquire", "y", "--kill-after", "3.5", "--", "true")
        assert refused.returncode == cli.EXIT_USAGE
        assert "at most --kill-after 3" in refused.stderr
        assert lockctl(daemon, "acquire", "y", "--kill-after", "3", "--", "true").returncode == 0
        assert lockctl(daemon, "acquire", "y", "--", "true").returncode == 0  # the default fits itself
    finally:
        daemon.kill()


@pytest.fixture
def script_shell(daemon: Daemon, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A shell script holding y as a process-tied lease, working until `go` exists."""
    go = tmp_path / "go"
    script = (
        f"{LOCKCTL_SH} acquire y > {tmp_path}/token || exit 9; echo start >> {tmp_path}/ledger; "
        f"while [ ! -e {go} ]; do sleep 0.02; done; echo end >> {tmp_path}/ledger"
    )
    shell = subprocess.Popen(["sh", "-c", script], env=daemon.env)
    try:
        wait_until(lambda: "start" in lines(tmp_path / "ledger"), "script started its work")
        yield shell, go
    finally:
        shell.kill()
        shell.wait(TIMEOUT)


def test_a_process_tied_lease_survives_a_restart_and_ends_with_its_process(daemon, script_shell, ledger) -> None:
    shell, go = script_shell
    with Prober(daemon.lock_dir / "y.lock", ledger):
        daemon.restart()
        time.sleep(0.3)
        busy = lockctl(daemon, "acquire", "-n", "y", "--", "true")
        assert busy.returncode == cli.EXIT_BUSY
        assert "lockd-keeper" in busy.stderr
        go.touch()
        assert shell.wait(TIMEOUT) == 0
        wait_until(lambda: "probe" in lines(ledger), "the lock freed once the script exited")
    assert_no_overlap(ledger)


def test_a_keeper_killed_while_lockd_runs_leaves_the_lease_to_lockd(daemon, script_shell, ledger) -> None:
    shell, go = script_shell
    [keeper] = _keeper._keepers_of(shell.pid)
    with Prober(daemon.lock_dir / "y.lock", ledger):
        os.kill(keeper, signal.SIGTERM)
        wait_until(lambda: not alive(keeper), "the keeper gone")
        time.sleep(0.3)
        assert status(daemon, "y")["y"]["holders"][0]["pid"] == shell.pid
        go.touch()
        assert shell.wait(TIMEOUT) == 0
        wait_until(lambda: "probe" in lines(ledger), "the lock freed once the script exited")
    assert_no_overlap(ledger)


def test_release_ends_a_process_tied_lease_taken_before_a_restart(daemon: Daemon, tmp_path: Path) -> None:
    script = (
        f"{LOCKCTL_SH} acquire y >/dev/null && echo > {tmp_path}/held && "
        f"while [ ! -e {tmp_path}/restarted ]; do sleep 0.02; done && {LOCKCTL_SH} release y && "
        f"{LOCKCTL_SH} acquire -n y -- true"
    )
    shell = subprocess.Popen(["sh", "-c", script], env=daemon.env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(tmp_path / "held")
        daemon.restart()
        (tmp_path / "restarted").touch()
        _, err = shell.communicate(timeout=TIMEOUT)
        assert shell.returncode == 0, err
    finally:
        kill_quietly(shell)


def test_the_keeper_does_not_hold_up_a_caller_reading_lockctls_output(daemon: Daemon, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sh", "-c", f"token=$({LOCKCTL_SH} acquire y) && echo $token && {LOCKCTL_SH} release y"],
        env=daemon.env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 0


def test_sigkill_of_lockctl_after_lockd_died_still_ends_cmd_before_the_lock_is_free(daemon, ledger) -> None:
    proc = start_lockctl(daemon, "acquire", "y", "--kill-after", "5", "-c", slow_cmd(ledger))
    try:
        wait_until(lambda: "start" in lines(ledger), "CMD started")
        daemon.kill()
        time.sleep(0.3)
        with Prober(daemon.lock_dir / "y.lock", ledger):
            proc.kill()  # the guardian terminates CMD, which cleans up for a second
            wait_until(lambda: "probe" in lines(ledger), "the lock freed once CMD was gone")
    finally:
        kill_quietly(proc)
    assert lines(ledger)[:3] == ["start", "term", "end"]
    assert_no_overlap(ledger)


def test_a_waiting_lockctl_whose_lockd_dies_never_runs_cmd(daemon: Daemon, tmp_path: Path, ledger) -> None:
    holder = start_lockctl(daemon, "acquire", "y", "-c", slow_cmd(ledger))
    wait_until(lambda: "start" in lines(ledger), "holder's CMD started")
    waiter = start_lockctl(daemon, "acquire", "y", "--", "touch", str(tmp_path / "ran"))
    try:
        wait_until(lambda: status(daemon, "y")["y"]["waiters"], "waiter queued")
        daemon.proc.send_signal(signal.SIGTERM)
        code, err = finish(waiter)
        assert code == cli.EXIT_UNAVAILABLE, err
        assert alive(holder.pid)
    finally:
        kill_quietly(holder, waiter)
    assert not (tmp_path / "ran").exists()


# --- semaphores: each slot is a shared flock that follows its work the same way -----------------


def start_slot_holders(daemon: Daemon, ledger: Path, done: Path, count: int) -> list[subprocess.Popen[str]]:
    """`count` lockctls each running work under a slot of y, a semaphore of `count` slots,
    until `done` exists; returned once every work has started."""
    cmd = slow_cmd(ledger, f"while [ ! -e {done} ]; do sleep 0.05; done; echo end >> {ledger}")
    holders = [start_lockctl(daemon, "acquire", "--slots", str(count), "y", "-c", cmd) for _ in range(count)]
    wait_until(lambda: lines(ledger).count("start") == count, "every slot's work started")
    return holders


def test_the_slots_run_on_under_the_kernel_lock_when_lockd_is_killed(daemon: Daemon, ledger: Path) -> None:
    done = ledger.parent / "done"
    holders = start_slot_holders(daemon, ledger, done, 2)
    try:
        with Prober(daemon.lock_dir / "y.lock", ledger):
            daemon.kill()
            time.sleep(0.5)
            assert [h.poll() for h in holders] == [None, None], "a lockctl ended with the daemon"
            done.touch()
            codes = [finish(h)[0] for h in holders]
            wait_until(lambda: "probe" in lines(ledger), "the file free once every slot's work exited")
    finally:
        kill_quietly(*holders)
    assert codes == [0, 0] and "term" not in lines(ledger)
    assert_no_overlap(ledger)


def test_a_restarted_lockd_counts_the_slots_running_work_holds(daemon: Daemon, ledger: Path) -> None:
    done = ledger.parent / "done"
    holders = start_slot_holders(daemon, ledger, done, 2)
    try:
        daemon.restart()
        third = lockctl(daemon, "acquire", "--slots", "2", "-n", "y", "--", "true")
    finally:
        done.touch()
        kill_quietly(*holders)
    assert third.returncode == cli.EXIT_BUSY, "a third slot of 2 granted while both slots' work ran"
