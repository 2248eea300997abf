"""A mirror of etcd's lock keys under one prefix, fed by one watch, with no I/O.

Invariant: at `Mirror.revision` the mirror holds exactly the keys etcd held under the prefix
then (those whose name a request may have), each name's keys kept in etcd order (create
revision, then key); a key's `gone` event is set once the mirror no longer holds that key.

A lock key is `PREFIX/NAME/LEASE/SEQ`, its value a JSON `Record`; a value that is not a
record counts as an exclusive request, so a foreign key is outwaited, never ignored.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec
import trio
from lockd_client.protocol import Holder, Mode, name_problem

from .client import KeyValue, WatchResponse


class Record(msgspec.Struct, omit_defaults=True):
    """The value of a lock key: who asked, for `status` on every host."""

    host: str
    mode: Mode
    #: Unix time of the request.
    since: float
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    command: str = ""
    label: str | None = None


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

    def holder(self) -> Holder:
        r = self.record or Record(host="?", mode="exclusive", since=0.0)
        return Holder(
            pid=r.pid, uid=r.uid, gid=r.gid, command=r.command, label=r.label,
            since=r.since, mode=r.mode, token=self.revision, host=r.host,
        )


_order = operator.attrgetter("revision", "key")
_revision = operator.attrgetter("revision")


class Change(NamedTuple):
    """What a range or watch response changed in the mirror."""

    added: list[Key]
    #: Keys deleted (or, after a reset, created anew since).
    removed: list[str]


class Mirror:
    """Every key under the prefix as of `revision`, fed by one watch. No I/O.

    Keys arrive in revision order and a revision is never split across watch responses, so
    at `revision` the mirror holds exactly what etcd held then. Each name's keys are kept in
    etcd order, all of them and the exclusive ones apart, so the nearest blocker is a bisection.
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
        self._queues, self._exclusive = {}, {}
        for entry in self._keys.values():
            self._queues.setdefault(entry.name, []).append(entry)
            if not entry.shared:
                self._exclusive.setdefault(entry.name, []).append(entry)
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

    def blocker(self, names: Sequence[str], revision: int, shared: bool) -> Key | None:
        """The nearest key below `revision` that a request on `names` must outwait, if any."""
        for name in names:
            queue = (self._exclusive if shared else self._queues).get(name)
            if queue:
                below = bisect.bisect_left(queue, revision, key=_revision)
                if below:
                    return queue[below - 1]
        return None

    def holds(self, key: str, revision: int) -> bool:
        """Whether `key` is in the mirror as created at `revision`."""
        entry = self._keys.get(key)
        return entry is not None and entry.revision == revision

    def queue(self, name: str) -> list[Key]:
        """The keys on `name` in etcd order (create revision, then key)."""
        return list(self._queues.get(name, ()))

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

    def _remove(self, key: str) -> bool:
        entry = self._keys.pop(key, None)
        if entry is None:
            return False
        for queues in (self._queues, self._exclusive) if not entry.shared else (self._queues,):
            queue = queues[entry.name]
            del queue[bisect.bisect_left(queue, _order(entry), key=_order)]
            if not queue:
                del queues[entry.name]
        entry.gone.set()
        return True

    def _advance(self, revision: int) -> None:
        """Make `revision` the mirror's, waking the waits it may end."""
        if revision > self.revision:
            self._advanced.set()
            self._advanced = trio.Event()
        self.revision = revision
