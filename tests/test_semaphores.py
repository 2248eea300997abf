"""Counting semaphores through a real daemon, the client library and real lockctl processes:
at most N holders, FIFO, refusals, a killed holder's slot, flock(1) on the same file, force.

The real-process tests judge from what the processes themselves log (CLOCK_MONOTONIC, one
O_APPEND write a line) and from the daemon's status, never from how long something took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lockd_client
import pytest
from lockd_client import errors, protocol

from .conftest import Daemon
from .flock_tools import can_flock, outside_flock
from .rawclient import RawClient
from .test_cli import LOCKCTL, LOCKCTL_SH, lockctl
from .waiting import wait_until

WAIT = 10.0


def test_at_most_n_holders_then_the_next_in_line(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b, \
            lockd_client.connect(lockd.socket) as c:
        first = a.acquire(name, slots=2)
        second = b.acquire(name, slots=2)
        with pytest.raises(errors.LockBusy) as busy:
            c.acquire(name, slots=2, wait=False)
        assert sorted(h.token for h in busy.value.holders) == sorted([first.tokens[name], second.tokens[name]])
        assert second.tokens[name] > first.tokens[name]
        (info,) = c.status(name)
        assert (info.slots, info.mode, len(info.holders), info.waiters) == (2, "shared", 2, [])
        first.release()
        third = c.acquire(name, slots=2, timeout=5)
        assert third.tokens[name] > second.tokens[name]
        second.release()
        third.release()
        wait_until(lambda: a.status(name) == [], "the releases of other connections to be done")


def test_a_name_is_one_kind_while_in_use(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
        lease = a.acquire(name, slots=3)
        three = rf"{name} is a semaphore of 3 slots, and this request asked for "
        with pytest.raises(errors.SlotsMismatch, match=three + "a semaphore of 4 slots") as mismatch:
            b.acquire(name, slots=4)
        assert [holder.pid for holder in mismatch.value.holders] == [os.getpid()]
        with pytest.raises(errors.SlotsMismatch, match=three + "a plain lock"):
            b.acquire(name)
        lease.release()
        lock = a.acquire(name)
        with pytest.raises(errors.SlotsMismatch, match=rf"{name} is a plain lock, .*; held by pid"):
            b.acquire(name, slots=1, timeout=5)
        lock.release()
        a.acquire(name, slots=4).release()  # nobody left on it: any kind again (in order after the release)


def test_a_request_mixes_locks_and_semaphores(lockd: Daemon, name: str) -> None:
    slots, lock = f"{name}-slots", f"{name}-lock"
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
        mixed = a.acquire(lock, slots, slots={slots: 2})
        other = b.acquire(slots, slots=2, wait=False)
        with pytest.raises(errors.LockBusy):
            b.acquire(lock, wait=False)
        infos = {info.name: info for info in b.status(slots, lock)}
        assert (infos[slots].slots, infos[lock].slots, infos[lock].mode) == (2, None, "exclusive")
        mixed.release()
        other.release()


def test_the_client_checks_slots_before_sending(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as client:
        for slots in (0, protocol.MAX_SLOTS + 1, True, 2.5):
            with pytest.raises(errors.InvalidArgument, match="whole number"):
                client.acquire(name, slots=slots)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match="does not name"):
            client.acquire(name, slots={"other": 2})
        with pytest.raises(errors.InvalidArgument, match="a slot has no mode"):
            client.acquire(name, slots=2, shared=True)
        assert client.status(name) == []


def test_the_daemon_refuses_slots_for_names_not_asked_for(lockd: Daemon, name: str) -> None:
    with RawClient(lockd.socket) as raw:
        reply = raw.request(protocol.Acquire(1, [name], slots={"other": 2}))
        assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.PROTOCOL
        assert "does not name" in reply.message
        granted = raw.request(protocol.Acquire(2, [name], slots={name: 2}))
        assert isinstance(granted, protocol.Granted)


# --- real processes ----------------------------------------------------------------------------

SLOTS = 3
#: The work done under a slot: note START (with the fencing token lockctl gives CMD) and END,
#: each with CLOCK_MONOTONIC, shared by every process of the host, in one O_APPEND write to the
#: shared log, so lines never tear; in between, hold until stdin closes (the test says when).
WORK = """
import os, sys, time
who, log = sys.argv[1:3]
def note(line):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{line} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}\\n".encode())
    os.close(fd)
note(f"START {who} {os.environ['LOCKD_TOKEN']}")
sys.stdin.read()
note(f"END {who}")
"""


def start_contender(lockd: Daemon, name: str, who: str, log: Path) -> subprocess.Popen[bytes]:
    """`lockctl acquire --slots 3 NAME -- WORK` in a session of its own (so it dies whole),
    whose work holds its slot until the test closes lockctl's stdin, which WORK shares."""
    return subprocess.Popen(
        [*LOCKCTL, "acquire", "--slots", str(SLOTS), name, "--", sys.executable, "-c", WORK, who, str(log)],
        env=lockd.env, stdin=subprocess.PIPE, start_new_session=True,
    )


def finish_work(contender: subprocess.Popen[bytes]) -> int:
    """Close the contender's stdin, which ends its work; its exit status."""
    assert contender.stdin is not None
    contender.stdin.close()
    return contender.wait(WAIT)


def lines_of(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def started(log: Path, who: str) -> bool:
    return any(fields[:2] == ["START", who] for fields in lines_of(log))


def users_of(client: lockd_client.Client, name: str) -> tuple[list[int], list[int]]:
    """The pids holding and awaiting `name`, the waiters in queue order."""
    infos = client.status(name)
    if not infos:
        return [], []
    (info,) = infos
    assert info.slots == SLOTS, info
    return [h.pid for h in info.holders], [w.pid for w in info.waiters]


def most_at_once(log: Path) -> int:
    """The most contenders between their START and END (or KILL) at any instant of the log."""
    events = []
    for fields in lines_of(log):
        kind, who, at = fields[0], fields[1], int(fields[-1])
        events.append((at, kind == "START", who))
    inside: set[str] = set()
    most = 0
    for _, starts, who in sorted(events):
        if starts:
            inside.add(who)
            most = max(most, len(inside))
        else:
            inside.discard(who)
    return most


def test_n_plus_2_contenders_fifo_at_most_n_and_a_killed_holder_frees_its_slot(
    lockd: Daemon, name: str, tmp_path: Path,
) -> None:
    log = tmp_path / "slots.log"
    contenders: list[subprocess.Popen[bytes]] = []
    with lockd_client.connect(lockd.socket) as observer:
        try:
            # Each starts once the one before it holds or waits: arrival order is c0 ... c4.
            for i in range(SLOTS + 2):
                contenders.append(start_contender(lockd, name, f"c{i}", log))
                wait_until(lambda: sum(map(len, users_of(observer, name))) == len(contenders),
                           f"c{i}'s request reached the daemon", show=log.read_text if log.exists() else None)
            pids = [c.pid for c in contenders]
            wait_until(lambda: all(started(log, f"c{i}") for i in range(SLOTS)), "the first three at work")
            assert users_of(observer, name) == (pids[:SLOTS], pids[SLOTS:])

            # A holder SIGKILLed (stopped first, so it writes nothing after its KILL line):
            # its slot goes to the first in line, c3, and to nobody else.
            os.killpg(pids[0], signal.SIGSTOP)
            with open(log, "a") as f:
                f.write(f"KILL c0 {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}\n")
            os.killpg(pids[0], signal.SIGKILL)
            wait_until(lambda: started(log, "c3") or started(log, "c4"), "someone took the killed holder's slot")
            assert not started(log, "c4"), lines_of(log)
            assert users_of(observer, name) == ([*pids[1:SLOTS], pids[3]], [pids[4]])

            assert finish_work(contenders[1]) == 0
            wait_until(lambda: started(log, "c4"), "c4 took c1's slot", show=log.read_text)
            for contender in contenders[2:]:
                assert finish_work(contender) == 0
            wait_until(lambda: users_of(observer, name) == ([], []), "every slot free")
        finally:
            for contender in contenders:
                if contender.poll() is None:
                    os.killpg(contender.pid, signal.SIGKILL)
                finish_work(contender)

    lines = lines_of(log)
    starts = [fields for fields in lines if fields[0] == "START"]
    assert [fields[1] for fields in starts] == [f"c{i}" for i in range(SLOTS + 2)], lines  # FIFO
    tokens = [int(fields[2]) for fields in starts]
    assert tokens == sorted(set(tokens)), f"tokens not strictly increasing: {tokens}"
    assert most_at_once(log) == SLOTS, lines
    ends = {fields[1]: int(fields[-1]) for fields in lines if fields[0] in ("END", "KILL")}
    assert int(starts[3][-1]) > ends["c0"] and int(starts[4][-1]) > ends["c1"], lines


def test_the_log_checker_counts_overlaps(tmp_path: Path) -> None:
    log = tmp_path / "slots.log"
    log.write_text("START a 1 10\nSTART b 2 20\nEND a 30\nSTART c 3 25\nKILL b 40\nSTART d 4 41\nEND c 50\n")
    assert most_at_once(log) == 3


def test_any_slot_held_excludes_an_outside_exclusive_flock(lockd: Daemon, name: str) -> None:
    lock_file = lockd.lock_dir / f"{name}.lock"
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
        first = a.acquire(name, slots=SLOTS)
        assert not can_flock(lock_file)
        assert can_flock(lock_file, shared=True)  # a slot is a shared flock: readers agree
        second = b.acquire(name, slots=SLOTS)
        first.release()
        wait_until(lambda: len(users_of(b, name)[0]) == 1, "the first slot let go")
        assert not can_flock(lock_file)  # one slot left is enough to keep flock(1) out
        second.release()
        wait_until(lambda: can_flock(lock_file), "flock -n gets the file once every slot is free")


def test_an_outside_exclusive_flock_makes_a_slot_wait_until_it_exits(lockd: Daemon, name: str) -> None:
    told: list[list[protocol.Holder]] = []
    granted: list[lockd_client.Lease] = []
    with lockd_client.connect(lockd.socket) as waiter, lockd_client.connect(lockd.socket) as observer:
        with outside_flock(lockd.lock_dir / f"{name}.lock") as outside:
            request = threading.Thread(
                target=lambda: granted.append(waiter.acquire(name, slots=SLOTS, timeout=WAIT, on_queued=told.append))
            )
            request.start()
            wait_until(lambda: told, "the semaphore request was queued")
            assert [h.pid for h in told[0]] == [outside.pid], told
            (info,) = observer.status(name)
            assert [h.pid for h in info.holders] == [outside.pid] and len(info.waiters) == 1, info
            assert not granted
        # Leaving the block killed flock(1): that alone lets the request through.
        request.join(WAIT)
        assert not request.is_alive() and granted, "the semaphore request never got its slot"
        (lease,) = granted
        (info,) = observer.status(name)
        assert (info.slots, [h.token for h in info.holders]) == (SLOTS, [lease.token])
        lease.release()


def test_a_process_tied_slot_ends_when_its_process_is_killed(lockd: Daemon, name: str, tmp_path: Path) -> None:
    """`lockctl acquire --slots` without CMD ties the slot to the shell that ran it."""
    script = f"{LOCKCTL_SH} acquire --slots 2 {name} > {tmp_path}/token && echo $$ > {tmp_path}/sh && exec sleep 60"
    shell = subprocess.Popen(["sh", "-c", script], env=lockd.env)
    try:
        wait_until(lambda: (tmp_path / "sh").exists() and (tmp_path / "sh").read_text(), "the shell holds a slot")
        shell_pid = int((tmp_path / "sh").read_text())
        with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b:
            (info,) = a.status(name)
            assert [(h.pid, h.token) for h in info.holders] == [(shell_pid, int((tmp_path / "token").read_text()))]
            other = a.acquire(name, slots=2, wait=False)
            with pytest.raises(errors.LockBusy):
                b.acquire(name, slots=2, wait=False)
            shell.kill()
            shell.wait(WAIT)
            wait_until(lambda: [h.pid for h in a.status(name)[0].holders] == [os.getpid()],
                       "the slot ended with its process")
            b.acquire(name, slots=2, wait=False).release()
            other.release()
    finally:
        shell.kill()
        shell.wait(WAIT)


def test_force_release_breaks_every_slot(lockd: Daemon, name: str) -> None:
    with lockd_client.connect(lockd.socket) as a, lockd_client.connect(lockd.socket) as b, \
            lockd_client.connect(lockd.socket) as c:
        leases = [client.acquire(name, slots=SLOTS) for client in (a, b, c)]
        forced = lockctl(lockd, "release", "--force", name)
        assert forced.returncode == 0, forced.stderr
        assert f"broke {SLOTS} leases on {name}" in forced.stderr
        wait_until(lambda: all(lease.lost for lease in leases), "every slot's holder told its lease is lost")
        for lease in leases:
            lease.release()
        wait_until(lambda: a.status(name) == [], "every broken slot let go")
        again = a.acquire(name, slots=SLOTS, wait=False)
        assert again.token > max(lease.token for lease in leases)
        again.release()
