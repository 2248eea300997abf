"""A randomized multi-host run of the etcd backend, checked offline from its history alone.

Three `lockd --backend etcd` daemons share one etcd (one member, or three that are killed and
restarted in turn). Client processes connect to any of them and send random mixes of
exclusive and shared, one- and two-name, waiting, no-wait and timed requests, some names of
which are counting semaphores (`SLOTS`: every request agrees on their N); they are
SIGKILLed at random, and so are the daemons (or stopped with SIGTERM), which come back. Every
participant appends what it sees to one log, and a watcher process appends every change etcd
makes under the prefix. The history is then checked, as Jepsen checks a lock workload:

- mutual exclusion per name: a grant while a conflicting holder still holds is a violation,
  and so is a grant of a semaphore's slot while its N slots are held;
- tokens: each grant's token is its request's etcd revision; on a name, an exclusive grant's
  token exceeds every earlier grant's, a shared grant's (or a slot's) every earlier exclusive
  grant's, and no token is granted twice;
- etcd's order: at a revision read just after a grant, no conflicting key older than the
  grant's is left (nobody older was still waiting, or holding), and on a semaphore fewer than
  N older keys; and a request told it is queued before another was sent is older in etcd than
  that one (it queued globally, at once);
- no lease outlives its key: a holder acts only while its key exists (it starts before etcd
  deletes the key, and stops, EXIT, LOST or KILL, before too), and a holder told its lease is
  lost hears it at least the daemon's promised notice (TTL/3, less scheduling slack) before
  anyone else is granted a conflicting lease;
- only the errors a client may see in such a run (busy, timeout, unavailable, shutdown).

The run lasts LOCKD_CHECKER_SECONDS (default 5; LOCKD_CHECKER_SEED picks the randomness), and
LOCKD_CHECKER_REPORT names a file to write its figures to, as JSON (and its history next to
it, in REPORT.history).

Log lines, each one write() to a file opened O_APPEND (so they never tear), each starting with
the writer's CLOCK_MONOTONIC time (one clock for every process on the host):
  SEND CLIENT REQ DAEMON X|S TIMEOUT NAMES   CLIENT sends request REQ (its label) to DAEMON
  QUEUED REQ                                 the daemon said REQ waits
  ENTER REQ TOKEN REV                        REQ granted; REV: etcd's revision read just after
                                             (- if etcd did not answer)
  REFUSED REQ CODE                           REQ failed with error CODE
  GONE REQ                                   the daemon went away while REQ waited
  EXIT REQ                                   REQ's holder is about to release it
  LOST REQ WHY                               REQ's holder heard it is lost (or saw its daemon go)
  KILL CLIENT                                CLIENT is stopped (SIGSTOP) and about to be SIGKILLed
  DAEMON-KILLED PID / DAEMON-STOPPED PID / MEMBER-KILLED NAME / MEMBER-STARTED NAME
  PUT REV KEY REQ / DEL REV KEY              the watcher saw a lock key created / deleted
  NOTE REV KEY                               the watcher saw another key (the run's end marker)
"""

from __future__ import annotations

import base64
import bisect
import json
import os
import random
import select
import shutil
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from lockd_client import protocol

from lockd import procinfo
from lockd.etcd.client import EtcdClient, EtcdError, KeyValue, WatchResponse

from .children import fork, stop_and_kill
from .conftest import Daemon
from .etcd_cluster import EtcdCluster, requires_etcd
from .rawclient import RawClient
from .test_etcd_daemon import TTL, etcd_daemon
from .test_fuzz import internal_errors

pytestmark = requires_etcd

SECONDS = float(os.environ.get("LOCKD_CHECKER_SECONDS", "5"))
NAMES = ["c1", "c2", "c3", "c4", "s2", "s3"]
#: The names that are counting semaphores, with their slots.
SLOTS = {"s2": 2, "s3": 3}
CLIENTS = 9
#: What a client may be told in this run: held (busy), timed out, etcd or its daemon going
#: away (unavailable, shutdown).
ALLOWED_ERRORS = {"busy", "timeout", "unavailable", "shutdown"}
#: The daemons' promise: a holder hears of a loss at least TTL/3 before another host can be
#: granted the lock. Less the time a client may take to notice, on a loaded machine.
NOTICE = TTL / 3 - 0.2
INFINITY = float("inf")


# --- the checker --------------------------------------------------------------------------------


@dataclass
class _Request:
    label: str
    client: str
    names: tuple[str, ...]
    shared: bool
    #: The line that said it was queued, if one did.
    queued: int | None = None
    #: Its keys' create revision, and the revisions at which they were deleted (the watcher's).
    revision: int | None = None
    deleted: list[int] = field(default_factory=list)
    #: The line that said it was granted, with what: its token, and etcd's revision just after.
    entered: int | None = None
    token: int | None = None
    seen_at: int | None = None


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _conflict(name: str, a: _Request, b: _Request) -> bool:
    """Whether `a` and `b` exclude each other on `name` (slots of a semaphore are counted
    instead)."""
    return name not in SLOTS and not (a.shared and b.shared)


def check(lines: list[str]) -> Verdict:
    """Every property of the module docstring, from the log alone."""
    verdict = Verdict()
    requests, owners = _requests(lines, verdict)
    _check_etcd_order(requests, verdict)
    _check_queue_on_arrival(lines, requests, verdict)
    _check_holding(lines, requests, owners, verdict)
    return verdict


def _requests(lines: list[str], verdict: Verdict) -> tuple[dict[str, _Request], dict[str, str]]:
    """Every request, with what the watcher saw of its keys; and key → request."""
    requests: dict[str, _Request] = {}
    owner: dict[str, str] = {}
    counts = verdict.counts
    for number, line in enumerate(lines, 1):
        _, kind, *fields = line.split()
        if kind == "SEND":
            client, label, _, mode, _, names = fields
            requests[label] = _Request(label, client, tuple(names.split(",")), mode == "S")
            counts["requests"] += 1
        elif kind == "PUT":
            revision, key, label = int(fields[0]), fields[1], fields[2]
            owner[key] = label
            request = requests.get(label)
            if request is None:
                verdict.violations.append(f"line {number}: key {key} of no request sent")
                continue
            if request.revision not in (None, revision):
                verdict.violations.append(f"line {number}: {label}'s keys at revisions {request.revision}, {revision}")
            request.revision = revision
        elif kind == "DEL":
            label = owner.get(fields[1])
            if label is not None:
                requests[label].deleted.append(int(fields[0]))
        elif kind == "QUEUED":
            request = requests[fields[0]]
            if request.queued is None:
                request.queued = number
                counts["queued"] += 1
        elif kind == "ENTER":
            request = requests[fields[0]]
            request.entered, request.token = number, int(fields[1])
            request.seen_at = None if fields[2] == "-" else int(fields[2])
            counts["grants"] += 1
            counts["grants checked against etcd's order" if request.seen_at else "grants unchecked (etcd down)"] += 1
            if not SLOTS.keys().isdisjoint(request.names):
                counts["grants of slots"] += 1
            if request.revision is not None and request.token != request.revision:
                verdict.violations.append(
                    f"line {number}: {request.label} granted token {request.token}, its keys are at {request.revision}"
                )
        elif kind == "REFUSED":
            counts[f"refused {fields[1]}"] += 1
            if fields[1] not in ALLOWED_ERRORS:
                verdict.violations.append(f"line {number}: {fields[0]} failed with {fields[1]}")
        elif kind == "GONE":
            counts["gone while waiting"] += 1
        elif kind == "LOST":
            counts["leases lost" if requests[fields[0]].entered else "lost before use"] += 1
        elif kind == "KILL":
            counts["clients killed"] += 1
        elif kind in ("DAEMON-KILLED", "DAEMON-STOPPED", "MEMBER-KILLED"):
            counts[kind.lower().replace("-", " ")] += 1
        elif kind not in ("EXIT", "NOTE", "MEMBER-STARTED"):
            verdict.violations.append(f"line {number}: unexpected {line!r}")
    return requests, owner


def _check_etcd_order(requests: dict[str, _Request], verdict: Verdict) -> None:
    """At the revision read after a grant, no conflicting key older than the grant's is left.

    Per name, keys sorted by revision with the running maximum of their deletion revisions:
    a grant at R read at Y is wrong iff a conflicting key below R is deleted after Y.
    """
    for name in NAMES:
        on_name = sorted((r for r in requests.values() if name in r.names and r.revision is not None), key=_revision)
        if name in SLOTS:
            _check_slots_order(name, on_name, verdict)
            continue
        # An exclusive grant must outwait every older key; a shared one, the exclusive ones.
        for for_shared in (False, True):
            keys = [r for r in on_name if not (for_shared and r.shared)]
            revisions = [r.revision for r in keys]
            latest: list[float] = []
            for request in keys:
                latest.append(max(latest[-1], _gone(request)) if latest else _gone(request))
            for granted in on_name:
                if granted.seen_at is None or granted.shared != for_shared:
                    continue
                older = bisect.bisect_left(revisions, granted.revision)
                if older and latest[older - 1] > granted.seen_at:
                    culprit = next(k for k in keys[:older] if _gone(k) > granted.seen_at)
                    verdict.violations.append(
                        f"{granted.label} ({_mode(granted)}, revision {granted.revision}) granted {name} while "
                        f"{culprit.label} ({_mode(culprit)}, revision {culprit.revision}) was still in etcd at "
                        f"revision {granted.seen_at}"
                    )


def _check_slots_order(name: str, on_name: list[_Request], verdict: Verdict) -> None:
    """At the revision read after a grant of a slot, fewer than N older keys are left."""
    for place, granted in enumerate(on_name):
        if granted.seen_at is None:
            continue
        left = [older for older in on_name[:place] if _gone(older) > granted.seen_at]
        if len(left) >= SLOTS[name]:
            verdict.violations.append(
                f"{granted.label} (revision {granted.revision}) granted a slot of {name} while "
                f"{', '.join(r.label for r in left)} were still in etcd at revision {granted.seen_at}"
            )


def _gone(request: _Request) -> float:
    """The revision at which the first of `request`'s keys was deleted (infinity: never)."""
    return min(request.deleted, default=INFINITY)


def _check_queue_on_arrival(lines: list[str], requests: dict[str, _Request], verdict: Verdict) -> None:
    """A request told it waits before another was sent is older in etcd, where they conflict."""
    #: (name, for a shared request) → the queued request on it with the highest revision, of
    #: any mode (what an exclusive request must come after), or exclusive (a shared one).
    newest: dict[tuple[str, bool], _Request] = {}
    for number, line in enumerate(lines, 1):
        _, kind, *fields = line.split()
        if kind == "QUEUED":
            request = requests[fields[0]]
            if request.queued == number and request.revision is not None:
                for name in request.names:
                    for for_shared in (False, True):
                        if for_shared and request.shared and name not in SLOTS:
                            continue
                        current = newest.get((name, for_shared))
                        if current is None or _revision(current) < request.revision:
                            newest[(name, for_shared)] = request
        elif kind == "SEND":
            request = requests[fields[1]]
            if request.revision is None:
                continue
            for name in request.names:
                ahead = newest.get((name, request.shared))
                if ahead is not None and _revision(ahead) > request.revision:
                    verdict.violations.append(
                        f"line {number}: {ahead.label} ({_mode(ahead)}) was queued for {name} before {request.label} "
                        f"({_mode(request)}) was sent, yet etcd has it later ({ahead.revision} > {request.revision})"
                    )


def _check_holding(lines: list[str], requests: dict[str, _Request], owner: dict[str, str], verdict: Verdict) -> None:
    """Mutual exclusion and tokens per name; holders stop before their keys go, and hear of a
    loss at least NOTICE before a conflicting grant."""
    inside: dict[str, dict[str, _Request]] = {name: {} for name in NAMES}
    floors = {name: [0, 0] for name in NAMES}  # exclusive, shared
    tokens: dict[str, set[int]] = {name: set() for name in NAMES}
    losses: dict[str, list[tuple[float, _Request]]] = {name: [] for name in NAMES}
    holding: dict[str, _Request] = {}  # client → what it holds
    gone: set[str] = set()  # requests a key of which etcd has deleted
    for number, line in enumerate(lines, 1):
        at, kind, *fields = line.split()
        now = float(at)
        if kind == "ENTER":
            request = requests[fields[0]]
            if request.label in gone:
                verdict.violations.append(f"line {number}: {request.label} acted on after etcd deleted its keys")
            for name in request.names:
                others = ", ".join(r.label for r in inside[name].values() if _conflict(name, r, request))
                if others:
                    verdict.violations.append(
                        f"line {number}: {request.label} took {name} ({_mode(request)}) while {others} held it"
                    )
                # Slots held, and those whose holders may still be at work after being told
                # they were lost.
                taken = [*inside[name].values(), *(r for t, r in losses[name] if now - t < NOTICE)]
                if name in SLOTS and len(taken) >= SLOTS[name]:
                    verdict.violations.append(
                        f"line {number}: {request.label} took a slot of {name} while "
                        f"{', '.join(r.label for r in taken)} held its {SLOTS[name]}"
                    )
                inside[name][request.label] = request
                _check_token(verdict, number, request, name, floors[name], tokens[name])
                for lost_at, lost in losses[name]:
                    if _conflict(name, lost, request) and now - lost_at < NOTICE:
                        verdict.violations.append(
                            f"line {number}: {request.label} granted {name} {now - lost_at:.3f} s after {lost.label} "
                            f"was told its lease was lost (less than the notice, {NOTICE:.2f} s)"
                        )
            holding[request.client] = request
        elif kind in ("EXIT", "LOST"):
            request = requests[fields[0]]
            if request.entered is not None and holding.get(request.client) is request:
                _stop_holding(request, inside, holding)
                if kind == "LOST":
                    for name in request.names:
                        losses[name] = [(t, r) for t, r in losses[name] if now - t < NOTICE] + [(now, request)]
        elif kind == "KILL":
            request = holding.get(fields[0])
            if request is not None:
                _stop_holding(request, inside, holding)
        elif kind == "DEL":
            label = owner.get(fields[1])
            request = requests.get(label) if label else None
            if request is None:
                continue
            gone.add(request.label)
            if holding.get(request.client) is request:
                verdict.violations.append(
                    f"line {number}: {request.label}'s key {fields[1]} was deleted while its holder still held it"
                )


def _stop_holding(request: _Request, inside: dict[str, dict[str, _Request]], holding: dict[str, _Request]) -> None:
    del holding[request.client]
    for name in request.names:
        inside[name].pop(request.label, None)


def _check_token(verdict: Verdict, number: int, request: _Request, name: str, floor: list[int], seen: set[int]) -> None:
    token = request.token
    assert token is not None
    shared = request.shared or name in SLOTS
    least = floor[1] if shared else floor[0]
    if token in seen:
        verdict.violations.append(f"line {number}: token {token} on {name} granted twice")
    elif token <= least:
        verdict.violations.append(f"line {number}: token {token} on {name} ({_mode(request)}) after token {least}")
    seen.add(token)
    floor[0] = max(floor[0], token)
    if not shared:
        floor[1] = max(floor[1], token)


def _mode(request: _Request) -> str:
    return "shared" if request.shared else "exclusive"


def _revision(request: _Request) -> int:
    assert request.revision is not None
    return request.revision


def _history(*lines: str) -> list[str]:
    """Lines without times, for the checker's own tests: one second apart."""
    return [f"{i}.0 {line}" for i, line in enumerate(lines)]


def test_checker_accepts_a_correct_history() -> None:
    verdict = check(_history(
        "SEND a a1 100 X - c1", "PUT 10 /p/c1/1/1 a1", "ENTER a1 10 10",
        "SEND b b1 200 S - c1", "PUT 11 /p/c1/2/1 b1", "QUEUED b1",
        "SEND c c1 200 S 0 c1", "PUT 12 /p/c1/2/2 c1", "REFUSED c1 busy", "DEL 13 /p/c1/2/2",
        "EXIT a1", "DEL 14 /p/c1/1/1", "ENTER b1 11 14",
        "SEND a a2 100 S - c1,c2", "PUT 15 /p/c1/1/2 a2", "PUT 15 /p/c2/1/2 a2", "ENTER a2 15 15",
        "KILL b", "DEL 16 /p/c1/2/1",
        "LOST a2 daemon-gone", "DEL 17 /p/c1/1/2", "DEL 17 /p/c2/1/2",
        "SEND d d1 300 X - c2", "PUT 18 /p/c2/3/1 d1", "ENTER d1 18 -",
        "NOTE 19 /p/.end",
    ))
    assert verdict.violations == []
    assert verdict.counts["grants"] == 4 and verdict.counts["leases lost"] == 1


def test_checker_catches_a_request_overtaken_by_a_later_host() -> None:
    """The issue's case: a writer queued on its own host reaches etcd after a later reader."""
    verdict = check(_history(
        "SEND a a1 100 S - c1", "PUT 10 /p/c1/1/1 a1", "ENTER a1 10 10",
        "SEND a w 100 X - c1", "QUEUED w",
        "SEND b r 200 S - c1", "PUT 12 /p/c1/2/1 r", "ENTER r 12 12",
        "PUT 13 /p/c1/1/2 w",
    ))
    assert verdict.violations == [
        "line 6: w (exclusive) was queued for c1 before r (shared) was sent, yet etcd has it later (13 > 12)",
    ]


def test_checker_catches_grants_out_of_etcd_order_and_overlaps() -> None:
    verdict = check(_history(
        "SEND a a1 100 X - c1", "PUT 10 /p/c1/1/1 a1",
        "SEND b b1 200 X - c1", "PUT 11 /p/c1/2/1 b1", "ENTER b1 11 12",  # a1 still waits
        "ENTER a1 10 12",  # and both hold
    ))
    assert verdict.violations == [
        "b1 (exclusive, revision 11) granted c1 while a1 (exclusive, revision 10) was still in etcd at revision 12",
        "line 6: a1 took c1 (exclusive) while b1 held it",
        "line 6: token 10 on c1 (exclusive) after token 11",
    ]


def test_checker_counts_the_slots_of_a_semaphore() -> None:
    verdict = check(_history(
        "SEND a a1 100 X - s2", "PUT 10 /p/s2/1/1 a1", "ENTER a1 10 10",
        "SEND b b1 200 X - s2,c1", "PUT 11 /p/s2/2/1 b1", "PUT 11 /p/c1/2/1 b1", "ENTER b1 11 11",
        "SEND c c1 300 X - s2", "PUT 12 /p/s2/3/1 c1", "QUEUED c1",
        "EXIT b1", "DEL 13 /p/s2/2/1", "DEL 13 /p/c1/2/1", "ENTER c1 12 13",  # b1's slot
        "SEND d d1 400 X - s2", "PUT 14 /p/s2/4/1 d1", "ENTER d1 14 14",  # a third holder
    ))
    assert verdict.violations == [
        "d1 (revision 14) granted a slot of s2 while a1, c1 were still in etcd at revision 14",
        "line 17: d1 took a slot of s2 while a1, c1 held its 2",
    ]
    verdict = check([
        "0.0 SEND a a1 100 X - s2", "0.1 PUT 10 /p/s2/1/1 a1", "0.2 ENTER a1 10 10",
        "0.3 SEND b b1 200 X - s2", "0.4 PUT 11 /p/s2/2/1 b1", "0.5 ENTER b1 11 11",
        "1.0 LOST a1 told", "1.01 DEL 12 /p/s2/1/1",  # its key went with the notice
        "1.1 SEND c c1 300 X - s2", "1.11 PUT 13 /p/s2/3/1 c1", "1.12 ENTER c1 13 13",
    ])
    assert verdict.violations == ["line 11: c1 took a slot of s2 while b1, a1 held its 2"]


def test_checker_catches_leases_that_outlive_their_keys_or_their_notice() -> None:
    verdict = check([
        "0.0 SEND a a1 100 X - c1", "0.1 PUT 10 /p/c1/1/1 a1", "0.2 ENTER a1 10 10",
        "0.3 DEL 11 /p/c1/1/1", "0.4 EXIT a1",  # its key went first
        "1.0 SEND a a2 100 X - c1", "1.1 PUT 12 /p/c1/1/2 a2", "1.2 ENTER a2 12 12",
        "1.3 LOST a2 lease-expired", "1.31 DEL 13 /p/c1/1/2",
        "1.4 SEND b b1 200 X - c1", "1.41 PUT 14 /p/c1/2/1 b1", "1.42 ENTER b1 14 14",  # 0.12 s later
        "1.5 SEND b b2 200 X - c1", "1.6 REFUSED b2 protocol", "1.7 BOGUS",
        "3.0 SEND c c3 300 X - c2", "3.1 PUT 15 /p/c2/3/1 c3", "3.2 DEL 16 /p/c2/3/1", "3.3 ENTER c3 15 16",
    ])
    assert verdict.violations == [
        "line 15: b2 failed with protocol",
        "line 16: unexpected '1.7 BOGUS'",
        "line 4: a1's key /p/c1/1/1 was deleted while its holder still held it",
        f"line 13: b1 granted c1 0.120 s after a2 was told its lease was lost (less than the notice, {NOTICE:.2f} s)",
        "line 20: c3 acted on after etcd deleted its keys",
    ]


# --- the participants ---------------------------------------------------------------------------


def _append(fd: int, text: str) -> None:
    os.write(fd, f"{time.monotonic():.6f} {text}\n".encode())


def _revision_now(endpoints: list[str], prefix: str) -> str:
    """etcd's revision, read linearizably from whichever member answers first; "-" if none."""
    body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(), "count_only": True}).encode()
    for endpoint in endpoints:
        read = urllib.request.Request(endpoint + "/v3/kv/range", data=body)
        try:
            with urllib.request.urlopen(read, timeout=0.5) as answer:
                return str(json.load(answer)["header"]["revision"])
        except (OSError, ValueError, KeyError):
            continue
    return "-"


def _client(  # pragma: no cover - a child
    sockets: list[str], endpoints: list[str], prefix: str, log_fd: int, seed: int
) -> None:
    """Send random requests to random daemons, noting what happens; forever."""
    rng = random.Random(seed)
    me = f"c{os.getpid()}"
    sequence = 0
    while True:
        try:
            client = RawClient(rng.choice(sockets), timeout=None)
        except (OSError, EOFError, AssertionError):
            time.sleep(0.05)  # that daemon is restarting
            continue
        daemon = procinfo.peer_credentials(client.sock)[0]
        waiting = ""
        try:
            while True:
                sequence += 1
                request = f"{os.getpid()}.{sequence}"
                names = rng.sample(NAMES, rng.choice([1, 1, 2]))
                shared = rng.random() < 0.35
                timeout = rng.choice([None, None, 0, 0.2, 1.0])
                tag, waits = "S" if shared else "X", "-" if timeout is None else timeout
                _append(log_fd, f"SEND {me} {request} {daemon} {tag} {waits} {','.join(names)}")
                mode: protocol.Mode = "shared" if shared else "exclusive"
                slots = {name: SLOTS[name] for name in names if name in SLOTS}
                client.send(protocol.Acquire(sequence, names, mode, timeout, label=request, slots=slots))
                waiting = request
                while isinstance(reply := _recv(client, log_fd, request), protocol.Queued):
                    pass
                waiting = ""
                if isinstance(reply, protocol.Error):
                    _append(log_fd, f"REFUSED {request} {reply.code}")
                    if reply.code in ("shutdown", "unavailable"):
                        time.sleep(0.05)  # as a client retrying would: try a daemon again
                        break
                    continue
                assert isinstance(reply, protocol.Granted), reply
                seen_at = _revision_now(endpoints, prefix)
                if _readable(client, 0):  # lost while etcd was read: never acted on
                    _append(log_fd, f"LOST {request} before-use")
                    break
                _append(log_fd, f"ENTER {request} {reply.tokens[0]} {seen_at}")
                if _readable(client, rng.uniform(0, 0.05)):
                    _append(log_fd, f"LOST {request} {'told' if _lost(client) else 'daemon-gone'}")
                    break
                _append(log_fd, f"EXIT {request}")
                client.send(protocol.Release(sequence))
        except (OSError, EOFError):
            if waiting:
                _append(log_fd, f"GONE {waiting}")
        client.close()


def _recv(client: RawClient, log_fd: int, request: str) -> object:
    reply = client.recv()
    if isinstance(reply, protocol.Queued):
        _append(log_fd, f"QUEUED {request}")
    return reply


def _readable(client: RawClient, seconds: float) -> bool:
    """Whether the daemon said something (a loss) or went away within `seconds`."""
    return client.frames.pending > 0 or bool(select.select([client.sock], [], [], seconds)[0])


def _lost(client: RawClient) -> bool:
    """Read what made the connection readable: True for a Lost, False for the daemon gone."""
    try:
        return isinstance(client.recv(), protocol.Lost)
    except (OSError, EOFError):
        return False


def _watcher(endpoints: list[str], prefix: str, log_fd: int) -> None:  # pragma: no cover - a child
    """Note every change etcd makes under `prefix`, from its first revision on, until killed."""

    def note(kv: KeyValue, deleted: bool) -> None:
        key = kv.text
        if key[len(prefix):].partition("/")[0] not in NAMES:
            _append(log_fd, f"NOTE {kv.mod_revision} {key}")
        elif deleted:
            _append(log_fd, f"DEL {kv.mod_revision} {key}")
        elif kv.create_revision == kv.mod_revision:
            _append(log_fd, f"PUT {kv.create_revision} {key} {json.loads(kv.value).get('label')}")

    async def watch() -> None:
        client = EtcdClient(endpoints)
        revision, kvs = await client.range_prefix(prefix, timeout=2)
        for kv in kvs:
            note(kv, deleted=False)

        def follow(response: WatchResponse) -> None:
            nonlocal revision
            for event in response.events:
                note(event.kv, event.type == "DELETE")
                revision = event.kv.mod_revision

        while True:
            try:
                await client.watch(prefix, revision + 1, follow, timeout=2)
            except EtcdError:
                await trio.sleep(0.1)  # a member went: carry on from the last revision seen

    trio.run(watch)


def _stop_and_kill(pid: int, log_fd: int) -> None:
    stop_and_kill(pid, lambda line: _append(log_fd, line), f"c{pid}")


# --- the run ------------------------------------------------------------------------------------


@dataclass
class _Faults:
    """The harness's schedule: which daemon or member is down, and until when."""

    rng: random.Random
    log_fd: int
    daemons: list[Daemon]
    cluster: EtcdCluster
    restart_members: bool
    down: dict[int, float] = field(default_factory=dict)  # daemon index → when it comes back
    member_down: tuple[int, float] | None = None
    next_daemon_fault: float = 0.0
    next_member_fault: float = 0.0

    def step(self, now: float) -> None:
        for index, back in list(self.down.items()):
            if now >= back:
                self.daemons[index].start()
                del self.down[index]
        if self.member_down is not None and now >= self.member_down[1]:
            member = self.cluster.members[self.member_down[0]]
            self.cluster.restart(member)
            _append(self.log_fd, f"MEMBER-STARTED {member.name}")
            self.member_down = None
            self.next_member_fault = time.monotonic() + self.rng.uniform(2, 6)
        if now >= self.next_daemon_fault and not self.down:
            self._daemon_fault(now)
        if self.restart_members and self.member_down is None and now >= self.next_member_fault:
            index = self.rng.randrange(len(self.cluster.members))
            member = self.cluster.members[index]
            _append(self.log_fd, f"MEMBER-KILLED {member.name}")
            member.kill()
            self.member_down = (index, now + self.rng.uniform(0.5, 3))

    def _daemon_fault(self, now: float) -> None:
        index = self.rng.randrange(len(self.daemons))
        daemon = self.daemons[index]
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
        if self.rng.random() < 0.6:
            # Stopped, then logged, then killed: it grants nothing after the line.
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            _append(self.log_fd, f"DAEMON-KILLED {daemon.proc.pid}")
            daemon.kill()
        else:
            _append(self.log_fd, f"DAEMON-STOPPED {daemon.proc.pid}")
            assert daemon.stop() == 0
        self.down[index] = now + self.rng.uniform(0.2, 2)
        self.next_daemon_fault = now + self.rng.uniform(*((1.5, 3) if SECONDS < 30 else (5, 15)))

    def heal(self) -> None:
        for index in list(self.down):
            self.daemons[index].start()
        self.down.clear()
        if self.member_down is not None:
            self.cluster.restart(self.cluster.members[self.member_down[0]])
            self.member_down = None


@pytest.fixture(params=[1, 3], ids=["one-member", "three-members"])
def cluster(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(request.param)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def test_checker_run(cluster: EtcdCluster, short_tmp: Path) -> None:
    rng = random.Random(int(os.environ.get("LOCKD_CHECKER_SEED", "1")))
    prefix = f"/lockd-checker/{short_tmp.name}/"
    endpoints = cluster.endpoints
    # Each daemon starts with a different member, as daemons on different hosts would.
    daemons = [
        etcd_daemon(short_tmp / host, endpoints[i:] + endpoints[:i], prefix) for i, host in enumerate("abc")
    ]
    log_path = short_tmp / "history.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    watcher = fork(_watcher, endpoints, prefix, log_fd)
    clients: list[int] = []
    faults = _Faults(rng, log_fd, daemons, cluster, restart_members=len(cluster.members) > 1)
    started = time.monotonic()
    try:
        for daemon in daemons:
            daemon.start()
        for daemon in daemons:
            _until_serving(daemon)
        started = time.monotonic()
        sockets = [d.socket for d in daemons]
        clients = [fork(_client, sockets, endpoints, prefix, log_fd, rng.randrange(2**32)) for _ in range(CLIENTS)]
        faults.next_daemon_fault = started + rng.uniform(1, 2)
        faults.next_member_fault = started + rng.uniform(1, 3)
        while (now := time.monotonic()) - started < SECONDS:
            time.sleep(rng.uniform(0.05, 0.25))
            victim = rng.randrange(CLIENTS)
            _stop_and_kill(clients[victim], log_fd)
            clients[victim] = fork(_client, sockets, endpoints, prefix, log_fd, rng.randrange(2**32))
            faults.step(now)
        elapsed = time.monotonic() - started
    finally:
        for pid in clients:
            _stop_and_kill(pid, log_fd)
        faults.heal()
        try:
            _drain(cluster, prefix, log_fd, log_path)
        finally:
            os.kill(watcher, signal.SIGKILL)
            os.waitpid(watcher, 0)
            os.close(log_fd)
            for daemon in daemons:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.kill()

    verdict = check(log_path.read_text().splitlines())
    counts = verdict.counts
    figures = {"seconds": round(elapsed, 1), "etcd members": len(cluster.members), **counts,
               "violations": len(verdict.violations)}
    print(f"etcd checker: {figures}")
    if report := os.environ.get("LOCKD_CHECKER_REPORT"):
        Path(report).write_text(json.dumps({**figures, "examples": verdict.violations[:50]}, indent=1))
        shutil.copyfile(log_path, f"{report}.history")
    assert verdict.violations == [], "\n".join(verdict.violations[:20])
    assert counts["grants"] >= 20 and counts["clients killed"] >= 10, figures
    assert counts["daemon killed"] + counts["daemon stopped"] >= 1, figures
    assert counts["refused busy"] >= 1 and counts["queued"] >= 5, figures
    assert counts["grants of slots"] >= 5, figures
    if len(cluster.members) > 1:
        assert counts["member killed"] >= 1, figures
    assert [error for d in daemons for error in internal_errors(d)] == []


def _until_serving(daemon: Daemon) -> None:
    """Return once `daemon` grants locks (it has its etcd lease)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with RawClient(daemon.socket) as client:
            if isinstance(client.acquire("ready"), protocol.Granted):
                return
        time.sleep(0.05)
    raise AssertionError(f"{daemon.root.name} never served:\n{daemon.log()[-3000:]}")


def _drain(cluster: EtcdCluster, prefix: str, log_fd: int, log_path: Path) -> None:
    """Wait until every lock key is gone (a killed daemon's expire with its lease) and the
    watcher has seen everything up to now."""
    cluster.wait_healthy()
    deadline = time.monotonic() + 4 * TTL + 5
    while _lock_keys(cluster, prefix):
        assert time.monotonic() < deadline, f"keys left: {_lock_keys(cluster, prefix)}"
        time.sleep(0.1)
    end = f"{prefix}.end"
    cluster.members[0].put(end.encode(), b"")
    while not any(line.endswith(f" {end}") for line in log_path.read_text().splitlines()):
        assert time.monotonic() < deadline, "the watcher fell behind"
        time.sleep(0.05)


def _lock_keys(cluster: EtcdCluster, prefix: str) -> list[str]:
    async def read() -> list[str]:
        client = EtcdClient(cluster.endpoints)
        try:
            _, kvs = await client.range_prefix(prefix, timeout=2)
        finally:
            await client.aclose()
        return [kv.text for kv in kvs if kv.text[len(prefix):].partition("/")[0] in NAMES]

    return trio.run(read)
