"""Chaos: client processes acquire, hold briefly and are SIGKILLed at random; lockctl runs
commands under leases, and is itself SIGKILLed at random moments of some runs (its guardian
then terminates CMD before the lease goes); outside flock(1) users take the same lock files; the daemon itself is
SIGKILLed or SIGTERMed, and restarted, mid-run, and re-executes in place (SIGUSR2) at random
moments, sometimes while the previous re-exec is still under way. Some names are locks,
others counting semaphores, each always asked for with the same number of slots.

An independent checker reads an append-only log that every holder writes while it holds a
lock or a slot (lockd clients after their grant, flock(1) probes while they hold the file),
and verifies mutual exclusion, at most N holders of a semaphore of N slots, and fencing-token
order from it alone; and that a re-exec costs nobody anything: no client whose daemon lives
loses its connection or a lease, no CMD is told to stop, and lockctl finds lockd gone only
while it was. The run lasts LOCKD_CHAOS_SECONDS (default 12) and must end with zero
violations and zero leases held.

Log lines, each written with one write() to a file opened O_APPEND, so they never tear:
  ENTER WHO NAME TOKEN X|S|N DAEMON  WHO holds NAME exclusive, shared, or one slot of its N
                                     (TOKEN and DAEMON are "-" for flock(1))
  EXIT WHO NAME                      WHO is about to release NAME
  KILL WHO                           WHO is stopped and about to be SIGKILLed
  DAEMON-KILLED PID                  daemon PID is about to die (stopped, then SIGKILLed; or
                                     about to be SIGTERMed): every lease it granted to a raw
                                     client counts as ended from here
  DAEMON-STARTED PID                 daemon PID serves (it started before this line)
  REEXEC PID                         daemon PID is sent SIGUSR2 (nothing of it ends by it)
  DROPPED WHO DAEMON                 WHO's connection to DAEMON ended under it (only a
                                     daemon's death may do that)
  TERM WHO                           lockctl's CMD WHO was told to stop (never should be)
  LOCKCTL WHO STATUS                 a lockctl run of runner WHO ended with STATUS (69, lockd
                                     unreachable or gone, only if a daemon died or none
                                     served since WHO's previous run ended; -9, SIGKILLed
                                     by WHO on purpose)
WHO is stopped (SIGSTOP) before its KILL line is written, so nothing of it follows that line.
A raw lockd client names in DAEMON the daemon it was granted by (SO_PEERCRED of its socket):
an ENTER from a daemon already dead is stale, written by a client that had not yet noticed.
Raw clients read no lock-file descriptors, so their leases last only as long as the daemon;
a CMD run by lockctl (WHO "cmdPID", DAEMON "kernel") holds its lock through lockctl's
descriptors whatever happens to the daemon, and counts as holding until its EXIT.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lockd_client import protocol
from lockd_client.protocol import Granted, Release, Status

from lockd import procinfo

from .children import fork, stop_and_kill
from .conftest import Daemon
from .flock_tools import can_flock
from .rawclient import RawClient
from .test_cli import LOCKCTL
from .test_fuzz import internal_errors
from .waiting import wait_until

SECONDS = float(os.environ.get("LOCKD_CHAOS_SECONDS", "12"))
NAMES = ["c1", "c2", "c3", "c4"]
#: The names used as counting semaphores, with their slots.
SEMAPHORES = {"s2": 2, "s3": 3}
WORKERS = 8
LOCKCTL_WORKERS = 3
TIMEOUT = 10.0
#: A lockctl run ends with CMD's status (0), 75 (timed out waiting), or 69 (lockd went away
#: while it waited or connected: `LOCKCTL_GONE`); 79 would mean CMD was stopped for a lost lease.
LOCKCTL_OK = {"0", "69", "75"}
LOCKCTL_GONE = "69"
#: A lockctl run its runner SIGKILLed on purpose: its CMD, terminated by lockctl's guardian,
#: logs its EXIT as it goes, and holds the lock until then.
LOCKCTL_KILLED = "-9"


# --- the checker --------------------------------------------------------------------------------


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class _Name:
    #: Who holds it now, and how: X, S, or the slots of the semaphore it holds a slot of.
    inside: dict[str, str] = field(default_factory=dict)
    #: A new exclusive grant must exceed every token granted before it; a shared one, every
    #: exclusive one. The log has conflicting grants in the order they were made (a holder
    #: logs its ENTER before it lets go), but shared holders log in any order.
    floor_exclusive: int = 0
    floor_shared: int = 0
    #: Every token logged before the last daemon's death: a grant by a daemon started since
    #: must exceed them all. A grant logged after the death may still be the dead daemon's,
    #: made before it died and logged late: a stale one, or a CMD's (its lockctl holds on
    #: through the lock files' descriptors), so those are held to the floors above only.
    floor_restart: int = 0
    tokens: set[int] = field(default_factory=set)


def _together(mode: str, other: str) -> bool:
    """Whether holders in `mode` and `other` may hold a name at once (as far as the two go: a
    semaphore's count of holders is checked apart). A slot is a shared flock on the file."""
    if "X" in (mode, other):
        return False
    if mode.isdigit() and other.isdigit():
        return mode == other
    return True


def check(lines: list[str]) -> Verdict:
    """Mutual exclusion, at most N holders of a semaphore of N slots, and token order, from
    the log alone (see the module docstring)."""
    verdict = Verdict()
    names: dict[str, _Name] = {}
    dead: set[str] = set()
    #: Whether no daemon serves now; and for each lockctl runner, as its previous run ended,
    #: how many daemons had died and whether none served (a runner not seen yet: as at the
    #: start, when one served).
    down = False
    runner_ended: dict[str, tuple[int, bool]] = {}
    for number, line in enumerate(lines, 1):
        kind, *fields = line.split()
        if kind == "ENTER":
            who, name, token, mode, daemon = fields
            entry = names.setdefault(name, _Name())
            shared = mode != "X"  # a slot's token orders as a shared grant's
            if token != "-":
                restarted = daemon not in dead and daemon != "kernel"
                _check_token(verdict, number, entry, name, int(token), shared, restarted)
            if daemon in dead:
                verdict.counts["stale grants"] += 1
                continue
            verdict.counts["lockd grants" if token != "-" else "flock holds"] += 1
            conflicting = sorted(w for w, m in entry.inside.items() if not _together(mode, m))
            if conflicting:
                holders = ", ".join(conflicting)
                verdict.violations.append(f"line {number}: {who} took {name} ({mode}) while {holders} held it")
            entry.inside[who] = mode
            if mode.isdigit():
                verdict.counts["slots taken"] += 1
                slots = sum(m.isdigit() for m in entry.inside.values())
                if slots > int(mode):
                    verdict.violations.append(f"line {number}: {who} is holder {slots} of {name}'s {mode} slots")
                most = f"most holders of {name} ({mode} slots)"
                verdict.counts[most] = max(verdict.counts[most], slots)
        elif kind == "EXIT":
            who, name = fields
            names.setdefault(name, _Name()).inside.pop(who, None)
        elif kind == "KILL":
            verdict.counts["clients killed"] += 1
            for entry in names.values():
                entry.inside.pop(fields[0], None)
        elif kind == "DAEMON-KILLED":
            verdict.counts["daemon kills"] += 1
            dead.add(fields[0])
            down = True
            for entry in names.values():
                entry.inside = {w: m for w, m in entry.inside.items() if w.startswith(("flock", "cmd"))}
                entry.floor_restart = entry.floor_exclusive
                running_on = sum(w.startswith("cmd") for w in entry.inside)
                verdict.counts["commands running on through a daemon's death"] += running_on
        elif kind == "DAEMON-STARTED":
            down = False
        elif kind == "REEXEC":
            verdict.counts["re-execs asked"] += 1
            running = sum(w.startswith("cmd") for entry in names.values() for w in entry.inside)
            verdict.counts["commands running as a re-exec was asked"] += running
        elif kind == "DROPPED":
            who, daemon = fields
            if daemon in dead:
                verdict.counts["connections ended by a daemon's death"] += 1
            else:
                verdict.violations.append(f"line {number}: {who} lost its connection to daemon {daemon}, alive")
        elif kind == "TERM":
            verdict.violations.append(f"line {number}: {fields[0]} was told to stop its work")
        elif kind == "LOCKCTL":
            who, status = fields
            verdict.counts["lockctl runs"] += 1
            if status == LOCKCTL_KILLED:
                verdict.counts["lockctl runs killed"] += 1
            elif status not in LOCKCTL_OK:
                verdict.violations.append(f"line {number}: lockctl exited {status}")
            elif status == LOCKCTL_GONE:
                deaths, was_down = runner_ended.get(who, (0, False))
                if not was_down and deaths == verdict.counts["daemon kills"]:
                    verdict.violations.append(f"line {number}: lockctl {who} exited {status} while lockd served")
            runner_ended[who] = verdict.counts["daemon kills"], down
        else:
            verdict.violations.append(f"line {number}: unexpected {line!r}")
    return verdict


def _check_token(
    verdict: Verdict, number: int, entry: _Name, name: str, token: int, shared: bool, restarted: bool,
) -> None:
    """`restarted`: the grant is surely by a daemon started after every death logged so far."""
    floor = entry.floor_shared if shared else entry.floor_exclusive
    if restarted:
        floor = max(floor, entry.floor_restart)
    if token in entry.tokens:
        verdict.violations.append(f"line {number}: token {token} on {name} granted twice")
    elif token <= floor:
        verdict.violations.append(f"line {number}: token {token} on {name} after token {floor}")
    entry.tokens.add(token)
    entry.floor_exclusive = max(entry.floor_exclusive, token)
    if not shared:
        entry.floor_shared = max(entry.floor_shared, token)


def test_checker_accepts_correct_histories() -> None:
    verdict = check([
        "ENTER w1 a 1 X 100", "EXIT w1 a",
        "ENTER w2 a 2 S 100", "ENTER w3 a 3 S 100", "EXIT w3 a",
        "KILL w2",
        "ENTER flock7 a - X -", "EXIT flock7 a",
        "ENTER w4 b 1 X 100",
        "ENTER flock8 c - S -",
        "ENTER cmd9 d 1 X kernel",
        "REEXEC 100",
        "DAEMON-KILLED 100",
        "ENTER w4 a 4 X 100",  # stale: granted by the dead daemon, not yet noticed
        "DROPPED w4 100",
        "LOCKCTL r1 69",  # lockctl found no daemon
        "DAEMON-STARTED 200",
        "ENTER w5 b 2 X 200",
        "EXIT w4 b",
        "ENTER w6 c 1 S 200",
        "EXIT cmd9 d", "LOCKCTL r2 0",
        "LOCKCTL r1 69",  # its run began while no daemon served
        "ENTER w7 d 2 X 200",
        "DAEMON-KILLED 200",
        "LOCKCTL r2 69",  # the daemon died during its run
        "LOCKCTL r1 -9",  # killed before its grant
    ])
    assert verdict.violations == []
    assert verdict.counts == Counter({"lockd grants": 8, "flock holds": 2, "stale grants": 1,
                                      "clients killed": 1, "daemon kills": 2, "lockctl runs": 5,
                                      "lockctl runs killed": 1,
                                      "commands running on through a daemon's death": 1, "re-execs asked": 1,
                                      "commands running as a re-exec was asked": 1,
                                      "connections ended by a daemon's death": 1})


def test_checker_accepts_shared_grants_logged_after_their_daemon_died() -> None:
    verdict = check([
        "ENTER w1 a 3 S 100", "EXIT w1 a",
        "ENTER w2 b 4 S 100",
        "DAEMON-KILLED 100",
        "ENTER cmd3 a 1 S kernel",  # its lockctl had a (shared) before w1 did
        "ENTER w4 b 2 S 100",  # stale: granted b (shared) before w2 was
        "ENTER w5 a 5 S 200", "EXIT cmd3 a", "LOCKCTL r1 0", "EXIT w5 a",
        "ENTER w6 a 6 X 200",
    ])
    assert verdict.violations == []


def test_checker_catches_overlaps() -> None:
    verdict = check([
        "ENTER w1 a 1 X 100", "ENTER w2 a 2 X 100",
        "ENTER w3 b 1 S 100", "ENTER flock9 b - X -",
        "ENTER flock8 c - X -", "DAEMON-KILLED 100", "ENTER w4 c 1 S 200",
        "ENTER cmd5 d 1 X kernel", "DAEMON-KILLED 200", "ENTER w6 d 2 X 300",
        "TERM cmd5", "LOCKCTL r1 79",
        "DAEMON-STARTED 300", "REEXEC 300", "DROPPED w7 300", "LOCKCTL r1 0", "LOCKCTL r1 69",
    ])
    assert verdict.violations == [
        "line 2: w2 took a (X) while w1 held it",
        "line 4: flock9 took b (X) while w3 held it",
        "line 7: w4 took c (S) while flock8 held it",
        "line 10: w6 took d (X) while cmd5 held it",
        "line 11: cmd5 was told to stop its work",
        "line 12: lockctl exited 79",
        "line 15: w7 lost its connection to daemon 300, alive",
        "line 17: lockctl r1 exited 69 while lockd served",
    ]


def test_checker_accepts_up_to_n_holders_of_a_semaphore() -> None:
    verdict = check([
        "ENTER w1 s 1 3 100", "ENTER w2 s 2 3 100", "ENTER flock9 s - S -", "ENTER w3 s 3 3 100",
        "EXIT w1 s", "EXIT flock9 s", "KILL w2", "ENTER w4 s 5 3 100", "ENTER w5 s 4 3 100",
        "EXIT w3 s", "EXIT w4 s", "EXIT w5 s", "ENTER flock8 s - X -",
    ])
    assert verdict.violations == []
    assert verdict.counts["most holders of s (3 slots)"] == 3


def test_checker_catches_semaphore_overruns() -> None:
    verdict = check([
        "ENTER w1 s 1 2 100", "ENTER w2 s 2 2 100", "ENTER w3 s 3 2 100", "ENTER flock9 s - X -",
        "ENTER w4 t 1 2 100", "ENTER w5 t 2 3 100",
        "ENTER w6 u 1 X 100", "ENTER w7 u 2 2 100",
    ])
    assert verdict.violations == [
        "line 3: w3 is holder 3 of s's 2 slots",
        "line 4: flock9 took s (X) while w1, w2, w3 held it",
        "line 6: w5 took t (3) while w4 held it",
        "line 8: w7 took u (2) while w6 held it",
    ]


def test_checker_catches_tokens_out_of_order() -> None:
    verdict = check([
        "ENTER w1 a 5 X 100", "EXIT w1 a",
        "ENTER w2 a 5 X 100", "EXIT w2 a",
        "ENTER w3 a 4 S 100", "EXIT w3 a",
        "ENTER w4 b 7 S 100", "EXIT w4 b", "DAEMON-KILLED 100", "ENTER w5 b 6 S 200",
    ])
    assert verdict.violations == [
        "line 3: token 5 on a granted twice",
        "line 5: token 4 on a after token 5",
        "line 10: token 6 on b after token 7",
    ]


# --- the participants ---------------------------------------------------------------------------


def _append(fd: int, text: str) -> None:
    os.write(fd, text.encode())


def _worker(socket_path: str, log_fd: int, seed: int) -> None:  # pragma: no cover - a child
    """Acquire random names, note the holding in the log, hold briefly, release; forever."""
    rng = random.Random(seed)
    me = f"w{os.getpid()}"
    while True:
        try:
            client = RawClient(socket_path, timeout=TIMEOUT)
        except (OSError, EOFError, AssertionError):
            time.sleep(0.02)  # the daemon is restarting
            continue
        daemon = procinfo.peer_credentials(client.sock)[0]
        try:
            while True:
                names = rng.sample(NAMES + list(SEMAPHORES), rng.choice([1, 1, 1, 2]))
                mode = "shared" if rng.random() < 0.25 else "exclusive"
                slots = {n: SEMAPHORES[n] for n in names if n in SEMAPHORES}
                reply = client.acquire(*names, mode=mode, timeout=rng.choice([None, 1.0, 0]), slots=slots)
                if not isinstance(reply, Granted):
                    if isinstance(reply, protocol.Error) and reply.code == "shutdown":
                        raise EOFError  # the daemon is stopping: connect to the next one
                    if not (isinstance(reply, protocol.Error) and reply.code in ("busy", "timeout")):
                        _append(log_fd, f"UNEXPECTED {me} {reply!r}\n")  # repr() escapes newlines
                    continue
                tag = "S" if mode == "shared" else "X"
                granted = zip(names, reply.tokens, strict=True)
                _append(log_fd, "".join(f"ENTER {me} {n} {t} {slots.get(n, tag)} {daemon}\n" for n, t in granted))
                time.sleep(rng.uniform(0, 0.02))
                _append(log_fd, "".join(f"EXIT {me} {n}\n" for n in names))
                client.send(Release(reply.id))
        except (OSError, EOFError):
            _append(log_fd, f"DROPPED {me} {daemon}\n")
            client.close()  # the daemon died under us


def _prober(lock_dir: Path, log_path: Path, seed: int) -> None:  # pragma: no cover - a child
    """Take the lock files with flock(1) now and then, noting each holding; until SIGTERM."""
    rng = random.Random(seed)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        name = rng.choice(NAMES + list(SEMAPHORES))
        mode, tag = rng.choice([("-x", "X"), ("-x", "X"), ("-s", "S")])
        script = (f'echo "ENTER flock$$ {name} - {tag} -" >> {log_path}; sleep 0.01; '
                  f'echo "EXIT flock$$ {name}" >> {log_path}')
        subprocess.run(["flock", "-n", mode, str(lock_dir / f"{name}.lock"), "sh", "-c", script], timeout=TIMEOUT)
        time.sleep(rng.uniform(0.01, 0.05))


def _lockctl_worker(socket_path: str, log_path: Path, seed: int) -> None:  # pragma: no cover - a child
    """Run commands under leases with lockctl, each noting its holding, until SIGTERM. A CMD
    that is told to stop notes it, and takes a while to clean up, as real work does; but in
    a run that SIGKILLs lockctl at a random moment (waiting, granted, CMD at the gate or
    running), being told to stop is expected, and CMD notes only its end."""
    rng = random.Random(seed)
    me = f"r{os.getpid()}"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    env = {**os.environ, "LOCKD_SOCKET": socket_path}
    while not stop:
        name = rng.choice(NAMES + list(SEMAPHORES))
        slots = SEMAPHORES.get(name)
        shared = slots is None and rng.random() < 0.25
        how = ["--slots", str(slots)] if slots else ["-s"] if shared else []
        log = str(log_path)
        kill_after = rng.uniform(0, 0.3) if rng.random() < 0.25 else None
        told = "" if kill_after is not None else f'echo "TERM cmd$$" >> {log}; '
        script = (
            f'echo "ENTER cmd$$ {name} $LOCKD_TOKEN {slots or ("S" if shared else "X")} kernel" >> {log}; '
            f"trap '{told}sleep 0.3; echo \"EXIT cmd$$ {name}\" >> {log}; exit 0' TERM; "
            f'sleep {rng.uniform(0, 0.3):.3f}; echo "EXIT cmd$$ {name}" >> {log}'
        )
        run = subprocess.Popen(
            [*LOCKCTL, "acquire", *how, "-w", "2", name, "-c", script],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            status = run.wait(TIMEOUT if kill_after is None else kill_after)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            run.kill()
            status = run.wait(TIMEOUT)
        with open(log_path, "a") as f:
            f.write(f"LOCKCTL {me} {status}\n")


def _stop_and_kill(pid: int, log_fd: int) -> None:
    stop_and_kill(pid, lambda line: _append(log_fd, f"{line}\n"), f"w{pid}")


#: What the daemon logs when a re-exec is done, and when it is refused (then also why).
REEXECUTED = "re-executed from"
NOT_REEXECUTED = "not re-executed, serving on as before: "
#: Why a re-exec may be refused here: SIGUSR2 came while one was under way, or while the
#: daemon was stopping.
EXPECTED_REFUSALS = ("a re-exec is under way already", "the daemon is stopping")


def _reexec(daemon: Daemon, log_fd: int, wait: bool) -> None:
    """Note the re-exec and send SIGUSR2; with `wait`, return once the daemon has logged a
    re-exec done or refused since."""
    assert daemon.proc is not None
    with open(daemon.log_path, "rb") as log:
        log.seek(0, os.SEEK_END)
        _append(log_fd, f"REEXEC {daemon.proc.pid}\n")
        daemon.proc.send_signal(signal.SIGUSR2)
        if wait:
            said = b""

            def done() -> bool:
                nonlocal said
                said += log.read()
                return REEXECUTED.encode() in said or NOT_REEXECUTED.encode() in said

            wait_until(done, "the re-exec", TIMEOUT, show=lambda: said.decode(errors="replace")[-3000:])


# --- the run ------------------------------------------------------------------------------------


def test_chaos(daemon: Daemon) -> None:
    rng = random.Random(int(os.environ.get("LOCKD_CHAOS_SEED", "1")))
    log_path = daemon.root / "holders.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    workers = [fork(_worker, daemon.socket, log_fd, rng.randrange(2**32)) for _ in range(WORKERS)]
    prober = fork(_prober, daemon.lock_dir, log_path, rng.randrange(2**32))
    runners = [fork(_lockctl_worker, daemon.socket, log_path, rng.randrange(2**32)) for _ in range(LOCKCTL_WORKERS)]
    daemon_kills_at = [SECONDS * f for f in (0.3, 0.55, 0.8)] if SECONDS < 30 else list(range(10, int(SECONDS), 15))
    reexec_at = rng.uniform(0.5, 2.5)
    reexecs_asked = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < SECONDS:
            time.sleep(rng.uniform(0.05, 0.25))
            victim = rng.randrange(WORKERS)
            _stop_and_kill(workers[victim], log_fd)
            workers[victim] = fork(_worker, daemon.socket, log_fd, rng.randrange(2**32))
            if elapsed >= reexec_at:
                # Waited for or not: one not waited for may meet the next under way, or a
                # kill. The first two are waited for, so that two surely happen.
                _reexec(daemon, log_fd, wait=reexecs_asked < 2 or rng.random() < 0.5)
                reexecs_asked += 1
                reexec_at = elapsed + rng.uniform(0.5, 3.0)
            if daemon_kills_at and elapsed >= daemon_kills_at[0]:
                daemon_kills_at.pop(0)
                assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
                if len(daemon_kills_at) % 2:
                    # Stopped, then logged, then killed: the flocks only it holds are free the
                    # moment it dies, and a flock(1) probe may log its holding before this
                    # process could log the death; stopped, it grants nothing after the line.
                    os.kill(daemon.proc.pid, signal.SIGSTOP)
                    os.waitpid(daemon.proc.pid, os.WUNTRACED)
                    _append(log_fd, f"DAEMON-KILLED {daemon.proc.pid}\n")
                    daemon.kill()
                else:
                    # A graceful stop: what it grants between the line and its exit is stale.
                    _append(log_fd, f"DAEMON-KILLED {daemon.proc.pid}\n")
                    assert daemon.stop() == 0
                daemon.start()
                _append(log_fd, f"DAEMON-STARTED {daemon.proc.pid}\n")
    finally:
        for pid in workers:
            _stop_and_kill(pid, log_fd)
        for pid in [prober, *runners]:
            os.kill(pid, signal.SIGTERM)
        for pid in [prober, *runners]:
            os.waitpid(pid, 0)
        os.close(log_fd)

    verdict = check(log_path.read_text().splitlines())
    counts = verdict.counts
    said = daemon.log().splitlines()
    counts["re-execs done"] = sum(REEXECUTED in line for line in said)
    refusals = [line.partition(NOT_REEXECUTED)[2] for line in said if NOT_REEXECUTED in line]
    counts["re-execs refused"] = len(refusals)
    verdict.violations += [f"re-exec refused: {why}" for why in refusals if why not in EXPECTED_REFUSALS]
    print(f"chaos: {SECONDS:g} s, {dict(counts)}, violations: {len(verdict.violations)}")
    assert verdict.violations == [], "\n".join(verdict.violations[:20])
    assert counts["daemon kills"] >= 1 and counts["clients killed"] >= 10
    assert counts["lockd grants"] >= 50 and counts["flock holds"] >= 10 and counts["lockctl runs"] >= 10
    assert counts["lockctl runs killed"] >= 1
    assert counts["commands running on through a daemon's death"] >= (1 if SECONDS >= 60 else 0)
    assert counts["re-execs done"] >= 2
    assert counts["commands running as a re-exec was asked"] >= (1 if SECONDS >= 60 else 0)
    for name, slots in SEMAPHORES.items():  # the semaphores were shared, not taken in turn
        assert counts[f"most holders of {name} ({slots} slots)"] >= 2, counts

    with RawClient(daemon.socket) as c:

        def leases() -> list[protocol.LockInfo]:
            reply = c.request(Status(1))
            assert isinstance(reply, protocol.StatusReply), reply
            return reply.locks

        wait_until(lambda: not leases(), "every lease ended", interval=0.05, show=leases)
    for name in NAMES + list(SEMAPHORES):
        assert can_flock(daemon.lock_dir / f"{name}.lock"), f"{name}.lock is still locked"
    assert internal_errors(daemon) == []
