"""lockctl's counting semaphores (`acquire --slots`) against a real daemon: real lockctl
processes, real shells, real flock(1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from lockd_client import cli

from .flock_tools import can_flock
from .test_cli import LOCKCTL_SH, finish, held, kill_quietly, lockctl, shell, start_lockctl, status
from .test_cli_supervise import TIMEOUT, wait_for_file
from .waiting import wait_until


def hold_slot(daemon, tmp_path: Path, tag: str, *args: str) -> subprocess.Popen[str]:
    """A lockctl holding what `args` ask for around `sleep 60`, once it holds it."""
    proc = start_lockctl(daemon, "acquire", *args, "-c", f"echo > {tmp_path}/{tag}; exec sleep 60")
    wait_for_file(tmp_path / tag)
    return proc


@pytest.fixture
def two_of_three(lockd, name: str, tmp_path: Path):
    """Two lockctls holding a slot each of `name`, a semaphore of 3 slots."""
    holders = [hold_slot(lockd, tmp_path, f"h{i}", "--slots", "3", "--label", f"job {i}", name) for i in range(2)]
    yield holders
    kill_quietly(*holders)


def test_at_most_n_run_at_once_and_the_next_gets_the_first_free_slot(lockd, name: str, two_of_three, tmp_path) -> None:
    third = hold_slot(lockd, tmp_path, "third", "--slots", "3", name)
    waiter = start_lockctl(lockd, "acquire", "--slots", "3", name, "--", "touch", str(tmp_path / "ran"))
    try:
        wait_until(lambda: status(lockd, name)[name]["waiters"], "the fourth queued")
        lock = status(lockd, name)[name]
        assert (lock["slots"], len(lock["holders"]), [w["pid"] for w in lock["waiters"]]) == (3, 3, [waiter.pid])
        assert not (tmp_path / "ran").exists()
        two_of_three[0].kill()
        assert finish(waiter) == (0, "")
        assert (tmp_path / "ran").exists()
    finally:
        kill_quietly(third, waiter)


def test_busy_and_timeout_name_every_holder_of_the_full_semaphore(lockd, name: str, two_of_three, tmp_path) -> None:
    third = hold_slot(lockd, tmp_path, "third", "--slots", "3", name)
    try:
        busy = lockctl(lockd, "acquire", "--slots", "3", "-n", name, "--", "true")
        timeout = lockctl(lockd, "acquire", "--slots", "3", "-w", "0.2", "-E", "3", name, "--", "true")
    finally:
        kill_quietly(third)
    assert busy.returncode == cli.EXIT_BUSY and timeout.returncode == 3
    assert busy.stderr.splitlines()[0] == f"lockctl: a slot of {name}: busy, and -n says not to wait"
    assert timeout.stderr.splitlines()[0] == f"lockctl: gave up waiting for a slot of {name} after 0.2s"
    for err in (busy.stderr, timeout.stderr):
        held_by = sorted(line.split()[3] for line in err.splitlines() if line.startswith("  held by pid "))
        assert held_by == sorted(str(p.pid) for p in [*two_of_three, third]), err
        assert "[job 0]" in err and "[job 1]" in err and "earlier requests" not in err


def test_a_free_slot_that_earlier_requests_wait_for_is_busy_and_names_them(lockd, name: str, tmp_path: Path) -> None:
    """The request for the semaphore and a held lock waits in both queues: the one free slot is
    its, ahead of a later request for the semaphore alone."""
    lock, sem = f"{name}.lock", f"{name}.sem"
    holders = [hold_slot(lockd, tmp_path, "lock", lock), hold_slot(lockd, tmp_path, "sem", "--slots", "2", sem)]
    both = start_lockctl(lockd, "acquire", "--slots", f"{sem}=2", sem, lock, "--", "true")
    try:
        wait_until(lambda: status(lockd, sem).get(sem, {}).get("waiters"), "the request for both queued")
        proc = lockctl(lockd, "acquire", "--slots", "2", "-n", sem, "--", "true")
    finally:
        kill_quietly(*holders, both)
    assert proc.returncode == cli.EXIT_BUSY
    lines = proc.stderr.splitlines()
    assert lines[1].startswith(f"  held by pid {holders[1].pid} ")
    assert lines[2] == f"  a slot is free, but earlier requests wait for {sem} first:"
    assert lines[3].startswith(f"  waiting: pid {both.pid} ") and lines[3].endswith("(slot)")


@pytest.mark.parametrize(
    ("asked", "wanted"),
    [(["--slots", "4"], "a semaphore of 4 slots"), ([], "a plain lock"), (["-s"], "a plain lock")],
)
def test_disagreeing_with_a_semaphores_count_is_81_at_once(
    lockd, name: str, two_of_three, tmp_path, asked: list[str], wanted: str
) -> None:
    proc = lockctl(lockd, "acquire", *asked, name, "--", "touch", str(tmp_path / "ran"))
    assert proc.returncode == cli.EXIT_MISMATCH == 81
    assert f"{name} is a semaphore of 3 slots (held by pid " in proc.stderr
    assert f"and this request asked for {wanted}: every user of a name must give the same --slots" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_a_slot_of_a_name_in_use_as_a_lock_is_81_at_once(lockd, name: str, tmp_path: Path) -> None:
    holder = hold_slot(lockd, tmp_path, "held", "-s", name)
    try:
        proc = lockctl(lockd, "acquire", "--slots", "2", "-w", "30", name, "--", "true")
    finally:
        kill_quietly(holder)
    assert proc.returncode == cli.EXIT_MISMATCH
    assert f"{name} is a plain lock (held by pid {holder.pid} " in proc.stderr
    assert "asked for a semaphore of 2 slots" in proc.stderr


def test_status_shows_slots_in_use_holders_and_waiters(lockd, name: str, two_of_three, tmp_path) -> None:
    lock = f"{name}.lock"
    third = hold_slot(lockd, tmp_path, "third", "--slots", f"{name}=3", name, lock)
    waiter = start_lockctl(lockd, "acquire", "--slots", "3", name, "--", "true")
    try:
        wait_until(lambda: status(lockd, name)[name]["waiters"], "the fourth queued")
        table = lockctl(lockd, "status", name, lock)
        doc = status(lockd, name, lock)
    finally:
        kill_quietly(third, waiter)
    assert table.returncode == 1  # held
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0][:2] == ["NAME", "MODE"]
    by_pid = {row[row.index("slot") + 1]: row for row in rows if "slot" in row}
    assert rows[1][:4] == [name, "3/3", "slots", "slot"]
    assert set(by_pid) == {str(p.pid) for p in [*two_of_three, third, waiter]}
    assert by_pid[str(waiter.pid)][:2] == ["waits", "slot"]
    assert [r[:3] for r in rows if r[0] == lock] == [[lock, "exclusive", str(third.pid)]]
    assert (doc[name]["slots"], doc[name]["mode"]) == (3, "shared")
    assert (doc[lock]["slots"], doc[lock]["mode"]) == (None, "exclusive")
    assert [w["pid"] for w in doc[name]["waiters"]] == [waiter.pid]


def test_a_request_mixes_slots_and_locks(lockd, name: str, two_of_three, tmp_path: Path) -> None:
    lock = f"{name}.lock"
    script = f'echo "$LOCKD_TOKENS"; {LOCKCTL_SH} status --json {name} {lock}'
    proc = lockctl(lockd, "acquire", "-s", "--slots", f"{name}=3", name, lock, "-c", script)
    assert proc.returncode == 1, proc.stderr  # status's: the names are held
    tokens, document = proc.stdout.splitlines()
    locks = {lock["name"]: lock for lock in json.loads(document)["locks"]}
    assert locks[lock]["mode"] == "shared" and len(locks[name]["holders"]) == 3
    mine = dict(pair.split("=") for pair in tokens.split())
    assert int(mine[name]) == max(h["token"] for h in locks[name]["holders"])


def test_a_process_tied_slot_is_released_by_name(lockd, name: str, two_of_three) -> None:
    script = (
        f"{LOCKCTL_SH} acquire --slots 3 {name} && echo $$ && "
        f"{{ {LOCKCTL_SH} status --json {name}; {LOCKCTL_SH} release {name}; }} && {LOCKCTL_SH} status --json {name}"
    )
    proc = shell(lockd, script)
    assert proc.returncode == 1, proc.stderr  # the other two still hold theirs
    token, pid, during, after = proc.stdout.splitlines()
    [during_lock], [after_lock] = json.loads(during)["locks"], json.loads(after)["locks"]
    assert (int(pid), int(token)) in {(h["pid"], h["token"]) for h in during_lock["holders"]}
    assert {h["pid"] for h in after_lock["holders"]} == {p.pid for p in two_of_three}


@pytest.mark.parametrize(("slots", "expected"), [(2, 0), (1, cli.EXIT_DEADLOCK)])
def test_a_cmd_may_take_another_slot_of_its_lockctls_semaphore_but_not_the_only_one(
    lockd, name: str, slots: int, expected: int
) -> None:
    """With 2 slots the CMD takes the other; with 1 it would wait for its own lockctl for ever."""
    inner = f"{LOCKCTL_SH} acquire --slots {slots} {name} -- true"
    proc = lockctl(lockd, "acquire", "--slots", str(slots), name, "-c", inner)
    assert proc.returncode == expected, proc.stderr
    assert ("held by the lockctl that runs this command" in proc.stderr) is bool(expected)
    assert not held(lockd, name)


def test_force_release_breaks_every_holder_of_a_semaphore(lockd, name: str, tmp_path: Path) -> None:
    holders = [
        start_lockctl(lockd, "acquire", "--slots", "3", "--kill-after", "1", name, "-c",
                      f"echo > {tmp_path}/h{i}; exec sleep 60")
        for i in range(2)
    ]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for i in range(2):
            wait_for_file(tmp_path / f"h{i}")
        tied = lockctl(lockd, "acquire", "--slots", "3", "--pid", str(sleeper.pid), name)
        assert tied.returncode == 0, tied.stderr
        forced = lockctl(lockd, "release", "--force", name)
        assert (forced.returncode, forced.stderr) == (0, f"lockctl: broke 3 leases on {name}\n")
        assert [finish(p)[0] for p in holders] == [cli.EXIT_LOST] * 2
        wait_until(lambda: not held(lockd, name), "every slot free")
    finally:
        kill_quietly(*holders)
        sleeper.kill()
        sleeper.wait(TIMEOUT)


def test_slots_exclude_an_outside_exclusive_flock_and_not_a_shared_one(lockd, name: str, two_of_three) -> None:
    lock_file = lockd.lock_dir / f"{name}.lock"
    assert not can_flock(lock_file)
    assert can_flock(lock_file, shared=True)


def test_an_outside_exclusive_flock_makes_a_slot_wait(lockd, name: str, tmp_path: Path) -> None:
    outside = subprocess.Popen(
        ["flock", str(lockd.lock_dir / f"{name}.lock"), "-c", f"echo > {tmp_path}/held; exec sleep 60"],
        process_group=0,  # flock(1) forks: its child must go too
    )
    waiter = None
    try:
        wait_for_file(tmp_path / "held")
        busy = lockctl(lockd, "acquire", "--slots", "2", "-n", name, "--", "true")
        assert busy.returncode == cli.EXIT_BUSY
        assert "outside lockd" in busy.stderr
        waiter = start_lockctl(lockd, "acquire", "--slots", "2", name, "--", "touch", str(tmp_path / "ran"))
        wait_until(lambda: status(lockd, name).get(name, {}).get("waiters"), "the slot request queued")
        os.killpg(outside.pid, signal.SIGKILL)
        assert finish(waiter)[0] == 0
        assert (tmp_path / "ran").exists()
    finally:
        os.killpg(outside.pid, signal.SIGKILL)
        outside.wait(TIMEOUT)
        if waiter is not None:
            kill_quietly(waiter)
