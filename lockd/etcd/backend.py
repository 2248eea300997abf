"""The etcd backend: lockd daemons on many hosts sharing their named locks through one etcd.

Invariants:
- A claim is granted only while (1) its keys exist in etcd — one per name,
  `PREFIX/NAME/LEASE/SEQ`, all put in one txn under this daemon's etcd lease, so all share one
  create revision R, the claim's fencing token on every name; (2) no conflicting key with a
  lower create revision exists on any of its names, and on a semaphore of N slots fewer than
  N keys with a lower one; (3) this host's flock of every name is held.
- A claim is never granted behind an older key that says otherwise what one of its names is
  (a semaphore of other N, a lock for a semaphore, or the reverse): it is refused with
  `SlotsMismatch` once its keys are in the mirror, before it waits.
- The daemon vouches for its etcd lease only until `S + TTL - TTL/3`, S being when the last
  confirmed keep-alive was sent: etcd cannot expire the lease before S + TTL. At that deadline
  every held claim is reported lost and the lease is never used again; it is revoked only if
  no claim was held under it, so a holder told of a loss has TTL/3 before another host can
  have its lock.
- Every key the daemon put belongs to a live claim or is on its way out: a claim's end, a
  take that fails or is cancelled, and any key of the current lease that the watch shows with
  no live claim all hand the key to the janitor, which deletes until etcd confirms. A take's
  put may take doomed keys of its names from the janitor and delete them in the same txn;
  if that txn fails, they go back.
- A held claim whose key is deleted by anyone but this daemon is reported lost; a waiting
  one fails.
- The mirror is trusted for a take only once it shows the take's own put: a watch that does
  not within the request timeout is started over from a fresh read, and the take fails.
- Across a re-exec (`hand_over`, `adopt`) the lease, every key and every flock stay as they
  are: the new program keeps the lease alive from the last confirmed keep-alive on, a held
  claim stays held with its keys and flocks, and a claim whose keys are in etcd waits on them
  again; its key numbers go on from the old program's, so no key is ever put twice.

Order is ZooKeeper's recipe on etcd's global revision: a claim waits for the deletion of the
nearest conflicting key below R (any key for an exclusive claim, an exclusive key for a
shared one), then looks again; for a slot, for the deletion of any key on the name while N
keys below R remain. Waits never poll etcd: one watch over the prefix mirrors every key, and
a deletion wakes only the claim waiting for that key (and the slot waiters of its name). The oldest claim waits for
nobody, so there is no deadlock across hosts, whatever names a request combines.

etcd's order is the only one (`orders_requests`): the lock table hands every request over on
arrival, and a claim's keys go into etcd at once, whatever this daemon holds or awaits, so
this daemon's own earlier claims are outwaited like any other host's, and no-wait claims are
refused, by their keys' place in etcd alone. The local flock is taken only once etcd's order
lets the claim through; a process holding the file outside lockd is waited for as
lockd.filewaits does for every backend.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

import msgspec
import trio
from lockd_client.describe import holder_text
from lockd_client.errors import LimitExceeded, SlotsMismatch
from lockd_client.protocol import Holder

from ..backend import Blocked, BlockedCallback, Claim, LoseCallback
from ..config import Etcd
from ..filewaits import FileWaits
from ..histogram import Histogram
from ..hostlocks import HostLocks
from ..lockfiles import LockFiles
from . import client as etcd_client
from .client import EtcdApi, EtcdClient, EtcdError, EtcdUnreachable, WatchCompacted, WatchResponse
from .mirror import Blocker, Change, Key, Mirror, Record

log = logging.getLogger("lockd.etcd")

#: etcd's default --max-txn-ops: the most names one request may have (its keys are put in
#: one txn), and the most keys one delete txn carries.
_MAX_TXN_OPS = 128
#: gRPC codes with which etcd refuses a txn before applying any of it: InvalidArgument (too
#: many operations, a key twice), PermissionDenied, FailedPrecondition. Its other errors
#: ("request timed out": Unavailable) may come after it applied the txn.
_REFUSED = frozenset({3, 7, 9})
#: Reconnecting to etcd backs off from the first to the second (seconds).
_RECONNECT = (0.1, 1.0)
#: The most takes talking to etcd at once, well below the client's `CONNECTIONS`: the rest
#: stay free for the watch, the janitor and reads, and no take waits for a connection against
#: its timeout. More at once does not get more takes through etcd per second.
_TAKES_AT_ONCE = 16
#: The least time a renewal attempt is given (seconds), however close the deadline.
_MIN_ATTEMPT = 0.01


def _holding(queue: Iterable[Key]) -> Iterator[tuple[Key, bool]]:
    """Each key of a name's `queue` (in etcd order) with whether it holds: a semaphore's first
    N keys, a lock's first key and the shared keys before the first exclusive one."""
    exclusive_seen = False
    for index, key in enumerate(queue):
        slots = key.slots
        if slots is not None:
            yield key, index < slots
        else:
            yield key, index == 0 or (key.shared and not exclusive_seen)
            exclusive_seen = exclusive_seen or not key.shared


def _kind(slots: int | None) -> str:
    return "a plain lock" if slots is None else f"a semaphore of {slots} slot{'s' if slots > 1 else ''}"


def _vanished() -> EtcdError:
    return EtcdError(
        "this request's keys vanished from etcd before it was granted (the etcd lease expired or "
        "someone deleted them); retry the request"
    )


class _Session:
    """One etcd lease and everything that lives only as long as it does."""

    def __init__(self, lease: int, ttl: int, sent: float, prefix: str) -> None:
        self.lease = lease
        self.ttl = ttl
        self.confirmed(sent, ttl)
        self.alive = True
        self.mirror = Mirror(prefix)
        #: Cancel scopes of the takes running under this lease.
        self.takes: set[trio.CancelScope] = set()
        #: The scope of the mirror's current read-and-watch (cancelling it starts over), and
        #: when the watch last delivered anything.
        self.watch = trio.CancelScope()
        self.heard = -math.inf
        #: Keys to delete, and the janitor's wake-up call.
        self.doomed: set[str] = set()
        self.wake = trio.Event()
        #: Why the watch or the janitor died, if one did (set once, with `broken`).
        self.failure = ""
        self.broken = trio.Event()
        #: Key → create revision, for the keys of a lease adopted from the previous program
        #: (`EtcdBackend.adopt`) until the mirror's first read: one it lacks went unseen.
        self.adopted: dict[str, int] = {}

    def confirmed(self, sent: float, ttl: int) -> None:
        """etcd granted or renewed the lease, for `ttl` seconds, on a request sent at `sent`."""
        #: When the request that last confirmed the lease was sent, and until when the lease
        #: is vouched for (trio clock).
        self.sent = sent
        self.deadline = sent + ttl - ttl / 3

    def doom(self, keys: Iterable[str]) -> None:
        if self.alive:  # otherwise the keys go with the lease
            self.doomed.update(keys)
            self.wake.set()


class _Attempt:
    """One claim's keys, from `take` until `drop`."""

    __slots__ = ("claim", "session", "seq", "keys", "revision", "held", "ended", "scope", "vanished")

    def __init__(self, claim: Claim, session: _Session, seq: int, prefix: str) -> None:
        self.claim = claim
        self.session = session
        #: The SEQ of its keys, and name → key.
        self.seq = seq
        self.keys = {name: f"{prefix}{name}/{session.lease:x}/{seq}" for name in claim.names}
        #: The keys' create revision, once etcd has answered their put.
        self.revision: int | None = None
        self.held = False
        self.ended = False
        #: The take's scope, cancelled if a key of the take is deleted by someone else
        #: (`vanished`) or the session ends.
        self.scope = trio.CancelScope()
        self.vanished = False


class _ClaimState(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A claim whose keys are in etcd, as `hand_over` leaves it to the next program."""

    #: Its place in the claims handed over.
    index: int
    #: The SEQ of its keys (`PREFIX/NAME/LEASE/SEQ`), and their create revision.
    seq: int
    revision: int
    held: bool
    #: The descriptors of its flocks, as `LockFiles.descriptors` and `slots_of` give them: a
    #: held claim's, or a waiting one's that has taken its files already.
    fds: list[int]
    slots: list[tuple[str, int]]


class _LeaseState(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The lease being served, as `hand_over` leaves it to the next program."""

    lease: int
    #: The TTL etcd gave at the last confirmation, and when (CLOCK_MONOTONIC, which is the
    #: whole host's and goes on across exec) the keep-alive it answered was sent.
    ttl: int
    sent: float
    claims: list[_ClaimState]


class _State(msgspec.Struct, frozen=True, tag="etcd", tag_field="backend", forbid_unknown_fields=True):
    """Everything `hand_over` leaves to the next program: whose it is (the cluster, by its
    endpoints, and the prefix), the SEQ of the next claim's keys, the leases given up but not
    revoked yet, and the lease being served, if any."""

    endpoints: list[str]
    prefix: str
    sequence: int
    stale: list[int]
    lease: _LeaseState | None


_encode_state = msgspec.msgpack.Encoder().encode
_decode_state = msgspec.msgpack.Decoder(_State).decode


class EtcdBackend:
    """Named locks shared by every lockd on the same etcd cluster and prefix.

    `take` needs a live etcd lease: until `run` has one (and whenever it has lost it) takes
    raise `DaemonUnavailable`. See the module docstring for the guarantees.
    """

    name = "etcd"
    #: etcd's revision order is the one queue of every host (see the module docstring).
    orders_requests = True
    #: The etcd key, not the local flock, is what other hosts respect, and it ends with the
    #: daemon's etcd lease.
    leases_outlive_daemon = False

    def __init__(
        self, files: LockFiles, client: EtcdApi, *, host: str, ttl: float = 5.0,
        prefix: str = "/lockd/",
    ) -> None:
        """`ttl` is the etcd lease's, in whole seconds (rounded up; etcd may raise it to its
        minimum): how long a dead or cut-off daemon's locks outlive it. `host` is shown with
        this daemon's holders on the other hosts. The backend owns `client` and closes it.
        """
        self._files = files
        self._client = client
        self._host = host
        self._ttl = max(1, math.ceil(ttl))
        self._prefix = prefix.rstrip("/") + "/"
        #: Bound on every etcd request but the watch.
        self._timeout = max(1.0, self._ttl / 3)
        self._session: _Session | None = None
        self._attempts: dict[Claim, _Attempt] = {}
        #: key → claim, for every key of a live claim.
        self._owners: dict[str, Claim] = {}
        #: The SEQ of the next claim's keys.
        self._sequence = 1
        #: The lease adopted from the previous program, not served yet, with the CLOCK_MONOTONIC
        #: time the keep-alive that last confirmed it was sent.
        self._adopted: tuple[_Session, float] | None = None
        #: Leases given up with no claim held under them, maybe not yet expired in etcd: revoked
        #: when etcd answers again.
        self._stale: set[int] = set()
        self._problem = "no etcd lease yet: lockd is still connecting"
        self._take_slots = trio.CapacityLimiter(_TAKES_AT_ONCE)
        self._host_locks = HostLocks(files)
        self._file_waits = FileWaits(files, self._host_locks)

    @classmethod
    def from_config(cls, files: LockFiles, config: Etcd, host: str) -> EtcdBackend:
        """The backend the `[etcd]` configuration describes. Raises OSError if a TLS file is
        unusable."""
        client = EtcdClient(
            config.endpoints, ca_file=config.ca_file, cert_file=config.cert_file,
            key_file=config.key_file, username=config.username, password=config.password,
        )
        return cls(files, client, host=host, ttl=config.ttl, prefix=config.prefix)

    @property
    def request_seconds(self) -> Mapping[str, Histogram]:
        """How long each kind of etcd call took (the client's), for the metrics."""
        return self._client.request_seconds

    def lease_state(self) -> tuple[bool, float | None]:
        """Whether this daemon holds an etcd lease it vouches for, and how many seconds ago the
        keep-alive that last confirmed it was sent (None: no lease yet). For the metrics."""
        session = self._session
        if session is None:
            return False, None
        now = trio.current_time()
        return session.alive and now < session.deadline, now - session.sent

    # --- Backend ------------------------------------------------------------------------------

    def take_now(self, claim: Claim) -> list[int] | None:
        return None  # etcd is across the network

    async def take(self, claim: Claim, blocked: BlockedCallback) -> list[int]:
        """Put the claim's keys, outwait conflicting older keys, flock; return R per name.

        The older keys are every host's, this daemon's included. A claim adopted while it was
        being taken (`adopt`) puts nothing: it waits on its keys where they are. Raises
        `Blocked` (no-wait claim behind an older conflicting key, or a file held outside lockd),
        `DaemonUnavailable` (no etcd lease, an etcd request failed, the watch did not show
        the claim's keys in time, someone deleted them, or the lease was lost meanwhile),
        `LimitExceeded` (more names than one etcd txn takes), or what `LockFiles.try_lock`
        raises. On any exception, cancellation included (the edge cancels a take at its
        request's deadline), the keys go to the janitor and the flocks are released.
        """
        attempt = self._attempts.get(claim)
        if attempt is None:
            attempt = self._attempt(claim)
        # Otherwise adopted (`adopt`): its keys are in etcd already, and the take goes on
        # waiting on them, under the lease it adopted.
        session = attempt.session
        session.takes.add(attempt.scope)
        try:
            if not session.alive:
                raise self._unavailable()
            with attempt.scope:
                return await self._obtain(attempt, blocked)
            # The session ended under the take, or its keys were deleted; unless the caller
            # cancelled it as well.
            await trio.lowlevel.checkpoint()
            raise _vanished() if attempt.vanished else self._unavailable()
        except BaseException:
            self._end(attempt)
            raise
        finally:
            session.takes.discard(attempt.scope)

    def _attempt(self, claim: Claim) -> _Attempt:
        """A new attempt at `claim`, under the current lease, its keys not put yet."""
        if len(claim.names) > _MAX_TXN_OPS:
            raise LimitExceeded(
                f"the etcd backend takes at most {_MAX_TXN_OPS} names in one request (etcd's "
                "--max-txn-ops): split the request, or use a name that stands for the group"
            )
        session = self._session
        if session is None or not session.alive:
            raise self._unavailable()
        attempt = _Attempt(claim, session, self._sequence, self._prefix)
        self._sequence += 1
        self._attempts[claim] = attempt
        self._owners.update(dict.fromkeys(attempt.keys.values(), claim))
        return attempt

    @property
    def loss_notice(self) -> float:
        """A holder hears that its lease is lost, or sees the daemon go, at least TTL/3
        before etcd can let another host have the lock (see docs/etcd.md)."""
        return self._ttl / 3

    def descriptors(self, claim: Claim) -> Sequence[int]:
        return self._files.descriptors(claim)

    def drop(self, claim: Claim, *, unlock: bool) -> None:
        attempt = self._attempts.get(claim)
        if attempt is not None:
            attempt.ended = True
            self._end(attempt, unlock=unlock)

    def place_of(self, claim: Claim) -> int | None:
        """The revision of the claim's keys (its token once granted), once etcd answered their put."""
        attempt = self._attempts.get(claim)
        return attempt.revision if attempt is not None else None

    async def outside_holders_of(self, names: list[str], *, every_file: bool = False) -> dict[str, list[Holder]]:
        """Local processes flocking each name outside lockd, then holders on other hosts (of
        every name, with `every_file`).

        The other hosts' holders come from the watch's mirror (none while etcd is
        unreachable). A key counts as holding once no older conflicting key is left.
        """
        found = await self._host_locks.holders_of(names, every_file=every_file)
        # Read after the look: the mirror is as of now.
        for name in dict.fromkeys([*names, *(self.outside_names() if every_file else ())]):
            remote = [e.holder() for e in self._remote(name, holding=True)]
            if remote:
                found[name] = found.get(name, []) + remote
        return found

    def outside_waiters_of(self, names: list[str]) -> dict[str, list[Holder]]:
        """Requests on other hosts that wait behind an older conflicting key, per name."""
        found = {}
        for name in names:
            waiting = [e.holder() for e in self._remote(name, holding=False)]
            if waiting:
                found[name] = waiting
        return found

    def outside_names(self) -> list[str]:
        """Names that other hosts hold or wait for, as far as the watch has seen."""
        session = self._session
        if session is None:
            return []
        mirror = session.mirror
        return [
            n for n in mirror.names() if any(e.key not in self._owners for e in mirror.queue(n))
        ]

    def outside_slots(self, name: str) -> int | None:
        """The slots of `name` as its oldest key in etcd says, whichever host put it: the
        semaphore's, or None for a lock (or a name without keys, as far as the watch has seen)."""
        session = self._session
        oldest = session.mirror.oldest(name) if session is not None else None
        return oldest.slots if oldest is not None else None

    async def run(self, lose: LoseCallback) -> None:
        """Hold an etcd lease for as long as the daemon serves, and a fresh one after a loss.

        When a lease can no longer be vouched for, every claim held under it is reported to
        `lose` and takes under it fail. Cancellation (shutdown) revokes any earlier lease not
        revoked yet, and the lease itself unless a claim was granted under it: so the other
        hosts get this daemon's locks at once, except those whose holders were just told
        their leases are lost, which are left to expire with the lease (`ttl`), by which time
        the holders have stopped their work. It closes the connections to etcd.

        After `adopt`, the first lease served is the one adopted. A re-exec runs none of this
        method's ending: the lease and keys go on in the next program.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._file_waits.run)
                while True:
                    session = self._taken_over() or await self._open_session()
                    reason = await self._serve(session, lose)
                    log.warning(
                        "%s; lockd reconnects to etcd and serves again once it has a new lease", reason
                    )
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._timeout):
                    # The leases given up but not yet revoked hold keys too.
                    leases = sorted(self._stale)
                    last = self._session
                    held = sum(a.session is last and a.held for a in self._attempts.values())
                    if held:
                        log.info(
                            "leaving etcd lease %x to expire: %d lease(s) held under it end once "
                            "their holders have stopped", last.lease if last else 0, held,
                        )
                    elif last is not None and last.alive:
                        leases.insert(0, last.lease)
                    for lease in leases:
                        try:
                            await self._client.revoke(lease, timeout=self._timeout)
                        except EtcdError as exc:
                            log.warning(
                                "could not revoke etcd lease %x at shutdown: %s", lease, exc
                            )
                await self._client.aclose()

    # --- re-exec ------------------------------------------------------------------------------

    def unattended(self) -> float | None:
        """Until the lease being served is no longer vouched for without a renewal."""
        session = self._session
        return None if session is None else max(0.0, session.deadline - trio.current_time())

    def hand_over(self, claims: Sequence[Claim]) -> tuple[bytes, list[int]]:
        """The lease being served, and each of `claims` whose keys it holds in etcd (see
        `Backend.hand_over`), with the descriptors of their flocks.

        A claim left out is taken afresh by the next program: its take had not heard from etcd
        yet (whatever its put did, the keys are this lease's with no claim, which the next
        program's watch hands to the janitor), or ran under a lease that is no longer served
        (it is failing; a held one was reported lost).
        """
        session = self._session
        lease = None
        fds: list[int] = []
        if session is not None and session.alive:
            handed = []
            for index, claim in enumerate(claims):
                attempt = self._attempts.get(claim)
                if attempt is None or attempt.session is not session or attempt.revision is None:
                    continue
                own = list(self._files.descriptors(claim))
                fds += own
                handed.append(_ClaimState(
                    index, attempt.seq, attempt.revision, attempt.held, own, self._files.slots_of(claim),
                ))
            sent = time.monotonic() - (trio.current_time() - session.sent)
            lease = _LeaseState(session.lease, session.ttl, sent, handed)
        state = _State(
            list(self._client.endpoints), self._prefix, self._sequence, sorted(self._stale), lease,
        )
        return _encode_state(state), fds

    def adopt(self, state: bytes, claims: Sequence[Claim]) -> None:
        """Serve the lease `state` names from `run` on, from its last confirmation on (renewed at
        once if that was TTL/4 ago or more; lost at once if the re-exec took so long that it can
        no longer be vouched for), hold its held claims, and put its waiting claims back in
        line for `take` (see `Backend.adopt`). Raises ValueError; nothing is adopted then."""
        found = self.check_handover(state, claims)
        if found.prefix != self._prefix:
            raise ValueError(
                f"the handed-over etcd state is for prefix {found.prefix!r}, and this daemon's is "
                f"{self._prefix!r}"
            )
        if set(found.endpoints) != set(self._client.endpoints):
            raise ValueError(
                f"the handed-over etcd state is for endpoints {', '.join(found.endpoints)}, and this "
                f"daemon's are {', '.join(self._client.endpoints)}"
            )
        lease = found.lease
        attempts: list[_Attempt] = []
        if lease is not None:
            # Its times are set from `sent` when `run` serves it.
            session = _Session(lease.lease, lease.ttl, -math.inf, self._prefix)
            for handed in lease.claims:
                attempt = _Attempt(claims[handed.index], session, handed.seq, self._prefix)
                attempt.revision = handed.revision
                attempt.held = handed.held
                attempts.append(attempt)
                session.adopted.update(dict.fromkeys(attempt.keys.values(), handed.revision))
            # A held claim holds its flocks (LockFiles refuses one without descriptors).
            self._files.adopt([
                (attempt.claim, handed.fds, handed.slots)
                for attempt, handed in zip(attempts, lease.claims, strict=True) if handed.held or handed.fds
            ])
            self._adopted = session, lease.sent
        self._stale.update(found.stale)
        self._sequence = found.sequence
        for attempt in attempts:
            self._attempts[attempt.claim] = attempt
            self._owners.update(dict.fromkeys(attempt.keys.values(), attempt.claim))
        if lease is not None:
            log.info(
                "etcd lease %x taken over, with %d held and %d waiting request(s)", lease.lease,
                sum(a.held for a in attempts), sum(not a.held for a in attempts),
            )

    @staticmethod
    def check_handover(state: bytes, claims: Sequence[Claim]) -> _State:
        """The state `hand_over` gave, decoded and checked against `claims`, short of this
        daemon's endpoints, prefix and descriptors (which `adopt` checks). Raises ValueError."""
        try:
            found = _decode_state(state)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a handover state of the etcd backend: {exc}") from None
        if found.lease is not None:
            for handed in found.lease.claims:
                if not 0 <= handed.index < len(claims) or handed.seq >= found.sequence:
                    raise ValueError(f"the handed-over etcd state names a claim it cannot have had: {handed}")
            if len({handed.index for handed in found.lease.claims}) < len(found.lease.claims):
                raise ValueError("the handed-over etcd state names a claim twice")
        return found

    def _taken_over(self) -> _Session | None:
        """The lease adopted, if not served yet, its times now on the trio clock."""
        if self._adopted is None:
            return None
        session, sent = self._adopted
        self._adopted = None
        session.confirmed(trio.current_time() - (time.monotonic() - sent), session.ttl)
        return session

    # --- takes --------------------------------------------------------------------------------

    async def _obtain(self, attempt: _Attempt, blocked: BlockedCallback) -> list[int]:
        claim, session = attempt.claim, attempt.session
        revision = attempt.revision
        if revision is None:
            since, who = time.time(), claim.requester
            values = {
                key: msgspec.json.encode(Record(
                    host=self._host, mode=claim.mode_on(name), since=since, pid=who.pid,
                    uid=who.uid, gid=who.gid, command=who.command, label=who.label,
                    slots=claim.slots.get(name),
                ))
                for name, key in attempt.keys.items()
            }
            revision = attempt.revision = await self._put(attempt, values)
        await self._caught_up(session, revision)
        mirror = session.mirror
        # At or past the put's revision the mirror holds exactly what etcd held then: a key
        # missing is gone, even if its deletion never reached `_follow` (a watch restarted
        # over it, or put and delete in one batch).
        if not all(mirror.holds(key, revision) for key in attempt.keys.values()):
            raise _vanished()
        # Once is enough: older keys only ever go, so none that disagrees can turn up later.
        disagreeing = mirror.mismatch(claim.names, revision, claim.slots)
        if disagreeing is not None:
            raise self._mismatch(mirror, claim, revision, disagreeing)
        waited = False
        shown: list[Key] = []
        while (blocker := mirror.blocker(claim.names, revision, claim.shared, claim.slots)) is not None:
            waited = True
            if not claim.wait:
                await self._outwait_leftover(session, claim, revision, blocker)
            elif blocker.keys != shown:
                shown = blocker.keys
                blocked([self._party(key) for key in shown])
            await blocker.moved.wait()
        # etcd lets the claim through: any holder of a lock file now is outside lockd (or
        # work that outlives a lease of this daemon whose holder went away).
        if not self._files.try_lock(claim):
            waited = True
            if not claim.wait:
                names = "+".join(claim.names)
                raise Blocked(f"{names}: held by a process outside lockd on this host")
            await self._file_waits.wait(claim, blocked)
        if waited:
            # While this waited, the mirror may have gone stale (a watch stalled silently is
            # noticed only within TTL/3 + 1 s), so its keys may have gone unseen, with an
            # expired lease (the etcd issue #11456 class) or by hand: grant only if etcd still
            # has every one of them. A take that did not wait needs no such round trip: its
            # keys were just in the mirror, and a deletion from now on reaches `_follow`.
            compare = [etcd_client.created_at(key, revision) for key in attempt.keys.values()]
            await self._slot()
            try:
                present, _ = await self._client.txn([], compare=compare, timeout=self._timeout)
            finally:
                self._take_slots.release()
            if not present:
                raise _vanished()
        if attempt.vanished:
            # `_follow` saw the keys go after the last await: its cancellation of the scope
            # arrives only at the next checkpoint, which a grant never reaches.
            raise _vanished()
        # The session may have ended while the answer was on its way (its cancellation then
        # arrives only at the next checkpoint, which a grant never reaches).
        if not session.alive or trio.current_time() >= session.deadline:
            raise EtcdUnreachable(
                "the etcd lease could not be kept alive while this request waited; retry it"
            )
        if attempt.ended:
            self._end(attempt)  # dropped while the last request was under way: let go again
        else:
            attempt.held = True
        return [revision] * len(claim.names)

    async def _slot(self) -> None:
        """Take one of the `_TAKES_AT_ONCE` slots; the caller releases it. A free one is taken
        at once: `async with` the limiter would cost a scheduling round before every put, on
        the path of every take. Cancellation while waiting for one takes none."""
        try:
            self._take_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._take_slots.acquire()

    async def _put(self, attempt: _Attempt, values: dict[str, bytes]) -> int:
        """Put the keys of `attempt` in one txn, each with its value in `values`; return their
        create revision R.

        The txn also deletes this daemon's doomed keys on the same names, taken from the
        janitor: a client that lets go of a lock and asks for it again at once must not queue
        behind its own released key, which a put that overtook the janitor's delete would
        (waiting for the watch to show the delete, then checking etcd again). If the txn fails
        or is cancelled, whether it deleted them is unknown: they go back to the janitor, as
        do those beyond what one txn may carry. If etcd definitely refused it (InvalidArgument,
        PermissionDenied or FailedPrecondition: a key it will not delete, a cluster with a
        lower --max-txn-ops; the janitor copes with both), it applied none of it, and the keys
        are put alone. Any other failure (etcd's "request timed out", an answer lockd cannot
        read, no answer) may have come after etcd applied it: the take fails.
        """
        session, names = attempt.session, attempt.claim.names
        puts = [etcd_client.put(key, values[key], session.lease) for key in attempt.keys.values()]
        await self._slot()
        try:
            leftovers = [key for key in session.doomed if self._name_of(key) in names]
            leftovers = leftovers[:_MAX_TXN_OPS - len(puts)]
            session.doomed.difference_update(leftovers)
            deletes = [etcd_client.delete(key) for key in leftovers]
            try:
                _, revision = await self._client.txn(deletes + puts, timeout=self._timeout)
            except BaseException as exc:
                session.doom(leftovers)
                refused = (
                    isinstance(exc, EtcdError) and not isinstance(exc, EtcdUnreachable)
                    and exc.status in _REFUSED
                )
                if not (refused and leftovers):
                    raise
                _, revision = await self._client.txn(puts, timeout=self._timeout)
        finally:
            self._take_slots.release()
        return revision

    def _name_of(self, key: str) -> str:
        return key[len(self._prefix):].partition("/")[0]

    async def _outwait_leftover(
        self, session: _Session, claim: Claim, revision: int, blocker: Blocker
    ) -> None:
        """Raise Blocked for a no-wait request, unless only keys of claims of this daemon that
        have just ended (their deletion is on its way) keep it from its lock or slot: those
        are waited for, up to the request timeout."""
        name, slots = blocker.name, claim.slots.get(blocker.name)
        # For a lock, the one key in the way; for a semaphore, every older key takes a place.
        ahead = blocker.keys if slots is None else session.mirror.ahead(name, revision)
        live = [key for key in ahead if key.lease != session.lease or key.key in self._owners]
        if len(live) >= (slots or 1):
            raise Blocked(f"{name}: held or asked for earlier")
        with trio.move_on_after(self._timeout):
            await blocker.moved.wait()
            return
        raise Blocked(f"{name}: released here, but etcd has not deleted its key yet")

    async def _caught_up(self, session: _Session, revision: int) -> None:
        """Return once the mirror has seen `revision` (a change this daemon made).

        A watch that does not show it within the timeout is taken for silently broken (a
        member cut off from the cluster, a firewall that dropped the flow): it is restarted
        from a fresh read, and EtcdUnreachable is raised.
        """
        watch = session.watch
        with trio.move_on_after(self._timeout):
            await session.mirror.wait_for(revision)
            return
        if not watch.cancel_called:
            log.warning(
                "the etcd watch did not show revision %d within %.2g s; reading etcd again",
                revision, self._timeout,
            )
            watch.cancel()
        raise EtcdUnreachable(
            f"etcd's watch did not show this request's change within {self._timeout:.2g} s; "
            "lockd restarted the watch: retry the request"
        )

    def _end(self, attempt: _Attempt, *, unlock: bool = True) -> None:
        """Let go of everything of `attempt`; its local flocks only as `Backend.drop` says.
        Idempotent."""
        if self._attempts.get(attempt.claim) is attempt:
            del self._attempts[attempt.claim]
        self._file_waits.withdraw(attempt.claim)
        for key in attempt.keys.values():
            self._owners.pop(key, None)
        attempt.session.doom(attempt.keys.values())
        if unlock:
            self._files.unlock(attempt.claim)
        else:
            self._files.abandon(attempt.claim)

    def _unavailable(self) -> EtcdUnreachable:
        return EtcdUnreachable(
            f"the etcd backend is unavailable ({self._problem}); lockd reconnects by itself: "
            "retry shortly, and check that etcd is up if this persists"
        )

    def _note_problem(self, problem: str) -> None:
        """Note why etcd does not serve; log it if it is news."""
        if problem != self._problem:
            log.warning("%s", problem)
        self._problem = problem

    def _party(self, key: Key) -> Holder:
        """Who asked for `key`, as clients are shown it: a claim of this daemon's is on this
        host (no `host`), whatever host name its record gives."""
        holder = key.holder()
        return msgspec.structs.replace(holder, host=None) if key.key in self._owners else holder

    def _remote(self, name: str, *, holding: bool) -> list[Key]:
        """Keys on `name` of no live local claim, holding or waiting per etcd's order."""
        session = self._session
        if session is None:
            return []
        return [
            key for key, is_holding in _holding(session.mirror.queue(name))
            if is_holding == holding and key.key not in self._owners
        ]

    def _mismatch(self, mirror: Mirror, claim: Claim, revision: int, disagreeing: Key) -> SlotsMismatch:
        """The refusal of `claim`, whose keys went in at `revision` behind `disagreeing`, an
        older key that says otherwise what the name is: worded as the service words a mismatch
        on this host, naming who holds the name that way on every host (or, if nobody holds it
        yet, who awaits it)."""
        name, have, want = disagreeing.name, disagreeing.slots, claim.slots.get(disagreeing.name)
        ahead = [(self._party(key), is_holding) for key, is_holding in _holding(mirror.ahead(name, revision))
                 if key.slots == have]
        holders = [party for party, is_holding in ahead if is_holding]
        now = time.time()
        users = ", ".join(holder_text(party, now) for party in holders or [party for party, _ in ahead])
        return SlotsMismatch(
            f"{name} is {_kind(have)}, and this request asked for {_kind(want)}: every user of a name must give "
            f"the same number of slots (none for a plain lock), on every host; use the name's, or another name; "
            f"{'held' if holders else 'awaited'} by {users}",
            holders,
        )

    # --- the lease ----------------------------------------------------------------------------

    async def _open_session(self) -> _Session:
        """Get a lease from etcd, retrying with back-off until one is granted."""
        delay = _RECONNECT[0]
        while True:
            sent = trio.current_time()
            try:
                lease, ttl = await self._client.grant(self._ttl, timeout=self._timeout)
            except EtcdError as exc:
                self._note_problem(str(exc))
                await trio.sleep(delay)
                delay = min(2 * delay, _RECONNECT[1])
                continue
            session = _Session(lease, ttl, sent, self._prefix)
            if trio.current_time() >= session.deadline:
                self._stale.add(lease)
                self._note_problem(
                    f"etcd took {trio.current_time() - sent:.1f} s to grant a lease, more than "
                    f"2/3 of its TTL ({ttl} s): lockd cannot vouch for it, and asks again"
                )
                continue
            log.info("etcd lease %x granted by %s, TTL %d s", lease, self._client.endpoint, ttl)
            self._problem = ""
            return session

    async def _serve(self, session: _Session, lose: LoseCallback) -> str:
        """Serve under `session` until it is lost; then report its held claims lost.

        An exception from the watch or the janitor (etcd's errors are handled in them, so this
        is a bug, or a foreign key lockd trips over) ends the session as a lost lease would:
        the daemon then carries on with a fresh lease and mirror, and the log has the traceback.
        """
        async with trio.open_nursery() as nursery:
            self._session = session
            if self._stale:
                session.wake.set()
            for what, duty in [
                ("watch", functools.partial(self._mirror, session, lose)),
                ("janitor", functools.partial(self._janitor, session)),
                ("watchdog", functools.partial(self._watchdog, session)),
            ]:
                nursery.start_soon(self._guard, session, what, duty)
            reason = await self._keep_alive(session)
            session.alive = False
            self._problem = reason
            held = [a for a in self._attempts.values() if a.held and a.session is session]
            if not held:
                # Revoked once etcd answers, to free its keys at once. One with holders is left
                # to expire instead: they are told now, and etcd's TTL is their time to stop.
                self._stale.add(session.lease)
            for scope in session.takes:
                scope.cancel()
            for attempt in held:
                lose(attempt.claim, reason)
            nursery.cancel_scope.cancel()
        self._session = None
        return reason

    async def _guard(
        self, session: _Session, what: str, duty: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await duty()
        except Exception as exc:
            log.exception("lockd's etcd %s failed", what)
            if not session.failure:
                session.failure = f"lockd's etcd {what} failed ({exc!r}); see lockd's log"
                session.broken.set()

    async def _keep_alive(self, session: _Session) -> str:
        """Renew the lease every TTL/4; return why it cannot be vouched for any longer, or why
        the session broke.

        A renewal is tried again until the deadline, each attempt given a third of the time
        left: a member that stopped answering with its connections open (frozen, or cut off
        by a silent firewall) costs one attempt, and the next goes to the next endpoint.
        """
        period = session.ttl / 4
        # From when the grant was sent: a grant answered late is renewed at once.
        next_send = session.sent + period
        failure = "no renewal was answered in time"
        while True:
            with trio.move_on_at(min(next_send, session.deadline)):
                await session.broken.wait()
                return session.failure
            sent = trio.current_time()
            if sent >= session.deadline:
                return f"etcd lease could not be kept alive ({failure})"
            left = session.deadline - sent
            attempt = min(left, max(left / 3, _MIN_ATTEMPT))
            try:
                ttl = await self._client.keep_alive(session.lease, timeout=attempt)
            except EtcdError as exc:
                failure = str(exc)
                self._note_problem(failure)
                next_send = sent + attempt  # at once after a timeout, not at once after a refusal
                continue
            if ttl <= 0:
                return "the etcd lease expired"
            session.confirmed(sent, ttl)
            next_send = sent + period

    async def _mirror(self, session: _Session, lose: LoseCallback) -> None:
        """Keep `session.mirror` in step with etcd: read the prefix, then watch it.

        Only a watch that lasted resets the back-off: one that etcd (or a proxy) ends as soon
        as it starts must not make every retry a read of the whole prefix at full rate. A
        watch found silent (`session.watch` cancelled) starts over at once.
        """
        delay = _RECONNECT[0]
        while True:
            watching = math.inf
            with trio.CancelScope() as session.watch:
                try:
                    revision, kvs = await self._client.range_prefix(
                        self._prefix, timeout=self._timeout
                    )
                    change = session.mirror.reset(revision, kvs)
                    change.removed.extend(
                        key for key, created in session.adopted.items()
                        if not session.mirror.holds(key, created)
                    )
                    session.adopted = {}
                    self._follow(session, change, lose)
                    watching = trio.current_time()
                    await self._client.watch(
                        self._prefix, revision + 1, functools.partial(self._watched, session, lose),
                        timeout=self._timeout,
                    )
                except WatchCompacted:
                    continue
                except EtcdError as exc:
                    self._note_problem(str(exc))
            if session.watch.cancelled_caught:
                continue
            if trio.current_time() - watching >= _RECONNECT[1]:
                delay = _RECONNECT[0]
            await trio.sleep(delay)
            delay = min(2 * delay, _RECONNECT[1])

    def _watched(self, session: _Session, lose: LoseCallback, response: WatchResponse) -> None:
        session.heard = trio.current_time()
        self._follow(session, session.mirror.apply(response), lose)

    async def _watchdog(self, session: _Session) -> None:
        """While takes wait on the watch, check that it still delivers.

        etcd sends nothing on a watch with no changes, so silence alone proves nothing: when
        the watch has been quiet for TTL/3 while takes run, this daemon puts its heartbeat key
        (`PREFIX.heartbeat/LEASE`, under a name no request can have) and expects to see it.
        """
        key = f"{self._prefix}.heartbeat/{session.lease:x}"
        period = session.ttl / 3
        while True:
            await trio.sleep(period)
            if not session.takes or trio.current_time() - session.heard < period:
                continue
            try:
                heartbeat = etcd_client.put(key, b"", session.lease)
                _, revision = await self._client.txn([heartbeat], timeout=self._timeout)
                await self._caught_up(session, revision)
            except EtcdError as exc:
                self._note_problem(str(exc))

    def _follow(self, session: _Session, change: Change, lose: LoseCallback) -> None:
        """Act on what etcd did: keys of this lease that no live claim owns go to the janitor;
        a held claim whose key someone else deleted is lost, and a take whose key someone else
        deleted fails (it no longer has a place in the queue)."""
        session.doom(
            e.key for e in change.added if e.lease == session.lease and e.key not in self._owners
        )
        for key in change.removed:
            claim = self._owners.get(key)
            attempt = self._attempts.get(claim) if claim is not None else None
            if attempt is None:
                continue
            if attempt.held:
                lose(attempt.claim, "its etcd key was deleted (by hand or by another tool)")
            else:
                attempt.vanished = True
                attempt.scope.cancel()

    async def _janitor(self, session: _Session) -> None:
        """Delete doomed keys and revoke stale leases, retrying with back-off until etcd
        confirms; neither waits for the other."""
        delay = _RECONNECT[0]
        while True:
            await session.wake.wait()
            # One scheduling round first: a take started along with the release that doomed
            # a key (a client letting go and asking again at once) then deletes it in its own
            # put, one etcd write where there would be two, each waiting for the other.
            await trio.lowlevel.checkpoint()
            session.wake = trio.Event()
            revoked = await self._revoke_stale()
            if await self._delete_doomed(session) and revoked:
                delay = _RECONNECT[0]
                continue
            await trio.sleep(delay)
            delay = min(2 * delay, _RECONNECT[1])
            session.wake.set()

    async def _revoke_stale(self) -> bool:
        """Revoke the leases given up; return whether none is left."""
        done = True
        for lease in list(self._stale):
            try:
                await self._client.revoke(lease, timeout=self._timeout)
            except EtcdUnreachable as exc:
                self._note_problem(str(exc))
                return False
            except EtcdError as exc:
                self._note_problem(f"etcd refuses to revoke lease {lease:x}: {exc}")
                done = False
                continue
            self._stale.discard(lease)
        return done

    async def _delete_doomed(self, session: _Session) -> bool:
        """Delete the doomed keys, many per txn; return whether none is left.

        A txn etcd refuses is split in halves, down to single keys, so that neither a key etcd
        will not delete nor a cluster with a lower --max-txn-ops holds up the other keys.
        """
        keys = list(session.doomed)
        batches = [keys[i:i + _MAX_TXN_OPS] for i in range(0, len(keys), _MAX_TXN_OPS)]
        done = True
        while batches:
            batch = batches.pop()
            try:
                deletes = [etcd_client.delete(key) for key in batch]
                await self._client.txn(deletes, timeout=self._timeout)
            except EtcdUnreachable as exc:
                self._note_problem(str(exc))
                return False
            except EtcdError as exc:
                if len(batch) > 1:
                    batches += [batch[len(batch) // 2:], batch[:len(batch) // 2]]
                else:
                    self._note_problem(f"etcd refuses to delete {batch[0]!r}: {exc}")
                    done = False
                continue
            session.doomed.difference_update(batch)
        return done
