"""A mirror of etcd's lock keys under one prefix, fed by one watch, with no I/O.

Invariant: at `Mirror.revision` the mirror holds exactly the keys etcd held under the prefix
then (those whose name a request may have), each name's keys kept in etcd order (create
revision, then key); a key's `gone` event is set once the mirror no longer holds that key.

A lock key is `PREFIX/NAME/LEASE/SEQ`, its value a JSON `Record`; a value that is not a
record counts as an exclusive lock request, so a foreign key is outwaited, never ignored.

Who blocks whom, on each name of a request with create revision R (`Mirror.blocker`): a lock
request waits for the nearest older key it conflicts with (any, if exclusive; an exclusive
one, if shared); a request for one of a semaphore's N slots waits while N or more keys older
than R are on the name, holders and waiters alike. A request is refused at once where an
older key on one of its names says something else of the name (`Mirror.mismatch`): a
semaphore of other N, or a lock where the request says semaphore, or the reverse. So two
keys that disagree are never both granted: the younger one saw the older one when it looked.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import msgspec
import trio
from lockd_client.protocol import Holder, Mode, Slots, name_problem

from .client import KeyValue, WatchResponse


class Record(msgspec.Struct, omit_defaults=True):
    """The value of a lock key: who asked, for `status` on every host, and what it asked for.

    A semaphore slot's record says `mode: "shared"` and its `slots`. A daemon that predates
    semaphores ignores `slots` (msgspec skips unknown fields) and so takes the key for a
    shared lock request: its exclusive requests wait for the slot holders, and its shared ones
    may share with them, as an outside `flock -s` on the lock file would. It never takes a
    slot itself, and this daemon's semaphore requests count its keys and refuse to mix with
    them, so there are never more than N slot holders (see docs/etcd.md).
    """

    host: str
    #: "shared" for a semaphore slot.
    mode: Mode
    #: Unix time of the request.
    since: float
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    command: str = ""
    label: str | None = None
    #: The semaphore's number of slots; None for a lock (and in every record of a daemon
    #: that predates semaphores).
    slots: Slots | None = None


_decode_record = msgspec.json.Decoder(Record).decode


class Key:
    """A lock key as the mirror knows it."""

    __slots__ = ("key", "name", "revision", "lease", "record", "gone")

    def __init__(
        self, key: str, name: str, revision: int, lease: int, record: Record | None
    ) -> None:
        self.key = key
        self.name = name
        self.revision = revision
        self.lease = lease
        #: None for a value that is not a lockd record: it then counts as exclusive.
        self.record = record
        #: Set when the key is deleted (or the mirror starts over and may not see it go).
        self.gone = trio.Event()

    @property
    def shared(self) -> bool:
        return self.record is not None and self.record.mode == "shared"

    @property
    def slots(self) -> int | None:
        """The semaphore's slots this key asked for one of; None for a lock."""
        return self.record.slots if self.record is not None else None

    def holder(self) -> Holder:
        r = self.record or Record(host="?", mode="exclusive", since=0.0)
        return Holder(
            pid=r.pid, uid=r.uid, gid=r.gid, command=r.command, label=r.label,
            since=r.since, mode=r.mode, token=self.revision, host=r.host,
        )


_order = operator.attrgetter("revision", "key")
_NO_SLOTS: Mapping[str, int] = {}
_revision = operator.attrgetter("revision")


class Blocker(NamedTuple):
    """What a request waits for on one of its names."""

    name: str
    #: The keys it waits for: for a lock, the nearest older key it conflicts with; for a
    #: semaphore of N slots, the N oldest keys of the name (who holds the slots, or will first).
    keys: list[Key]
    #: Set once the request may have moved up: when that key goes, for a lock; when any key on
    #: the name goes, for a semaphore (any older one going frees a place).
    moved: trio.Event


class Change(NamedTuple):
    """What a range or watch response changed in the mirror."""

    added: list[Key]
    #: Keys deleted (or, after a reset, created anew since).
    removed: list[str]


class Mirror:
    """Every key under the prefix as of `revision`, fed by one watch. No I/O.

    Keys arrive in revision order and a revision is never split across watch responses, so
    at `revision` the mirror holds exactly what etcd held then. Each name's keys are kept in
    etcd order, all of them and the exclusive ones apart, so the nearest blocker is a bisection,
    and how many keys of each kind (a semaphore's slots, None for a lock) it has, so that a
    name used one way only is checked for a mismatch at once.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        #: 0 until the first `reset`.
        self.revision = 0
        self._keys: dict[str, Key] = {}
        #: name → its keys in etcd order (create revision, then key)
        self._queues: dict[str, list[Key]] = {}
        #: name → its exclusive keys in etcd order
        self._exclusive: dict[str, list[Key]] = {}
        #: name → {slots (None: lock) → how many of its keys say so}
        self._kinds: dict[str, dict[int | None, int]] = {}
        #: name → set when a key on it goes; made when a semaphore request waits on the name.
        self._departures: dict[str, trio.Event] = {}
        self._advanced = trio.Event()

    def reset(self, revision: int, kvs: Iterable[KeyValue]) -> Change:
        """Start over from a range read at `revision`, which becomes the mirror's even if it is
        lower (etcd restored from a backup): the mirror never claims a revision it has not seen.

        A key still there with the same create revision stays the same entry, so only the
        waiters of keys that went (deleted, or created anew) look again. The change lists every
        key now present as added (the watch may have missed its put), and the keys that went.
        """
        old = self._keys
        self._keys = {}
        for kv in kvs:
            entry = old.get(kv.text)
            if entry is None or entry.revision != kv.create_revision:
                entry = self._entry(kv)
            if entry is not None:
                self._keys[entry.key] = entry
        removed = [key for key, entry in old.items() if self._keys.get(key) is not entry]
        for key in removed:
            old[key].gone.set()
        for departure in self._departures.values():
            departure.set()
        self._queues, self._exclusive, self._kinds, self._departures = {}, {}, {}, {}
        for entry in self._keys.values():
            self._queues.setdefault(entry.name, []).append(entry)
            if not entry.shared:
                self._exclusive.setdefault(entry.name, []).append(entry)
            self._count_kind(entry, 1)
        for queue in itertools.chain(self._queues.values(), self._exclusive.values()):
            queue.sort(key=_order)
        self._advance(revision)
        return Change(list(self._keys.values()), removed)

    def apply(self, response: WatchResponse) -> Change:
        """Apply a watch response."""
        change = Change([], [])
        for event in response.events:
            key = event.kv.text
            if event.type == "DELETE":
                if self._remove(key):
                    change.removed.append(key)
            elif key not in self._keys:  # a put over an existing key changes nothing here
                entry = self._entry(event.kv)
                if entry is not None:
                    self._insert(entry)
                    change.added.append(entry)
        if response.events:
            self._advance(response.events[-1].kv.mod_revision)
        return change

    async def wait_for(self, revision: int) -> None:
        """Return once the mirror has caught up with `revision`."""
        while self.revision < revision:
            await self._advanced.wait()

    def blocker(
        self, names: Sequence[str], revision: int, shared: bool, slots: Mapping[str, int] = _NO_SLOTS
    ) -> Blocker | None:
        """What a request on `names` at `revision` must outwait first, if anything: one slot
        of each name in `slots` (a semaphore of that many), the others locked as `shared` says.
        """
        for name in names:
            limit = slots.get(name)
            if limit is None:
                queue = (self._exclusive if shared else self._queues).get(name)
                if queue:
                    below = bisect.bisect_left(queue, revision, key=_revision)
                    if below:
                        key = queue[below - 1]
                        return Blocker(name, [key], key.gone)
            else:
                queue = self._queues.get(name, [])
                if bisect.bisect_left(queue, revision, key=_revision) >= limit:
                    departure = self._departures.get(name)
                    if departure is None:
                        departure = self._departures[name] = trio.Event()
                    return Blocker(name, queue[:limit], departure)
        return None

    def mismatch(
        self, names: Sequence[str], revision: int, slots: Mapping[str, int] = _NO_SLOTS
    ) -> Key | None:
        """The oldest key below `revision` on one of `names` that says otherwise what the name
        is than a request with `slots` does (a semaphore of other slots, a lock where the
        request asks for a semaphore, or the reverse), if any."""
        for name in names:
            want = slots.get(name)
            kinds = self._kinds.get(name)
            if kinds is None or kinds.keys() == {want}:
                continue
            for key in self._queues[name]:
                if key.revision >= revision:
                    break
                if key.slots != want:
                    return key
        return None

    def ahead(self, name: str, revision: int) -> list[Key]:
        """The keys on `name` below `revision`, in etcd order."""
        queue = self._queues.get(name, [])
        return queue[:bisect.bisect_left(queue, revision, key=_revision)]

    def holds(self, key: str, revision: int) -> bool:
        """Whether `key` is in the mirror as created at `revision`."""
        entry = self._keys.get(key)
        return entry is not None and entry.revision == revision

    def queue(self, name: str) -> list[Key]:
        """The keys on `name` in etcd order (create revision, then key)."""
        return list(self._queues.get(name, ()))

    def oldest(self, name: str) -> Key | None:
        """The first key on `name` in etcd order, if any."""
        queue = self._queues.get(name)
        return queue[0] if queue else None

    def names(self) -> list[str]:
        return list(self._queues)

    def _entry(self, kv: KeyValue) -> Key | None:
        """The entry for `kv`; None if its name is one no request can ask for: then nobody
        waits for it."""
        key = kv.text
        name = key[len(self.prefix):].partition("/")[0]
        if name_problem(name) is not None:
            return None
        try:
            record: Record | None = _decode_record(kv.value)
        except msgspec.DecodeError:
            record = None
        return Key(key, name, kv.create_revision, kv.lease, record)

    def _insert(self, entry: Key) -> None:
        self._keys[entry.key] = entry
        bisect.insort(self._queues.setdefault(entry.name, []), entry, key=_order)
        if not entry.shared:
            bisect.insort(self._exclusive.setdefault(entry.name, []), entry, key=_order)
        self._count_kind(entry, 1)

    def _remove(self, key: str) -> bool:
        entry = self._keys.pop(key, None)
        if entry is None:
            return False
        for queues in (self._queues, self._exclusive) if not entry.shared else (self._queues,):
            queue = queues[entry.name]
            del queue[bisect.bisect_left(queue, _order(entry), key=_order)]
            if not queue:
                del queues[entry.name]
        self._count_kind(entry, -1)
        departure = self._departures.pop(entry.name, None)
        if departure is not None:
            departure.set()
        entry.gone.set()
        return True

    def _count_kind(self, entry: Key, delta: int) -> None:
        kinds = self._kinds.setdefault(entry.name, {})
        left = kinds[entry.slots] = kinds.get(entry.slots, 0) + delta
        if not left:
            del kinds[entry.slots]
            if not kinds:
                del self._kinds[entry.name]

    def _advance(self, revision: int) -> None:
        """Make `revision` the mirror's, waking the waits it may end."""
        if revision > self.revision:
            self._advanced.set()
            self._advanced = trio.Event()
        self.revision = revision
