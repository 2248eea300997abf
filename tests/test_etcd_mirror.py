"""The mirror of etcd's lock keys: pure bookkeeping, driven by synthetic watch data."""

from __future__ import annotations

import msgspec
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lockd.etcd.client import Event, Header, KeyValue, WatchResponse
from lockd.etcd.mirror import Mirror, Record

PREFIX = "/lockd/"


def kv(
    name: str, revision: int, mode: str = "exclusive", lease: int = 7, seq: int = 1, slots: int | None = None
) -> KeyValue:
    """A lock key; with `slots`, a semaphore slot's (whose mode is shared)."""
    record = {"host": "h", "mode": "shared" if slots else mode, "since": 1.5, "pid": revision}
    if slots is not None:
        record["slots"] = slots
    value = msgspec.json.encode(record)
    key = f"{PREFIX}{name}/{lease:x}/{seq}".encode()
    return KeyValue(
        key=key, create_revision=revision, mod_revision=revision, value=value, lease=lease
    )


def nearest(mirror: Mirror, names: list[str], revision: int, shared: bool) -> int:
    """The revision of the one key a lock request must outwait first."""
    found = mirror.blocker(names, revision, shared)
    assert found is not None and len(found.keys) == 1, found
    return found.keys[0].revision


def puts(*kvs: KeyValue) -> WatchResponse:
    events = [Event(kv=k) for k in kvs]
    return WatchResponse(header=Header(revision=kvs[-1].mod_revision), events=events)


def deletion(entry: KeyValue, revision: int) -> WatchResponse:
    gone = KeyValue(key=entry.key, mod_revision=revision)
    return WatchResponse(header=Header(revision=revision), events=[Event(kv=gone, type="DELETE")])


def test_exclusive_waits_for_the_nearest_older_key_only() -> None:
    mirror = Mirror(PREFIX)
    a, b, c = kv("x", 2, seq=1), kv("x", 3, seq=2), kv("x", 4, seq=3)
    mirror.reset(4, [a, b, c])
    assert nearest(mirror, ["x"], 4, shared=False) == 3
    assert nearest(mirror, ["x"], 3, shared=False) == 2
    assert mirror.blocker(["x"], 2, shared=False) is None


def test_shared_waits_only_for_exclusive_keys() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(5, [kv("x", 2, "shared", seq=1), kv("x", 3, seq=2), kv("x", 4, "shared", seq=3)])
    assert nearest(mirror, ["x"], 5, shared=True) == 3
    assert mirror.blocker(["x"], 3, shared=True) is None
    assert nearest(mirror, ["x"], 5, shared=False) == 4


def test_any_name_of_a_multi_name_request_blocks() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(3, [kv("b", 2)])
    assert mirror.blocker(["a", "b"], 3, shared=False).name == "b"
    assert mirror.blocker(["a", "c"], 3, shared=False) is None


async def test_deletion_wakes_the_waiter_of_that_key_only() -> None:
    mirror = Mirror(PREFIX)
    a, b = kv("x", 2, seq=1), kv("y", 3, seq=2)
    mirror.reset(3, [a, b])
    first, second = mirror.blocker(["x"], 9, False), mirror.blocker(["y"], 9, False)
    mirror.apply(deletion(a, 4))
    assert first.moved.is_set() and not second.moved.is_set()
    assert mirror.revision == 4
    assert mirror.blocker(["x"], 9, False) is None
    assert mirror.names() == ["y"]


async def test_reset_wakes_only_the_waiters_of_keys_that_went() -> None:
    mirror = Mirror(PREFIX)
    stays, goes, recreated = kv("x", 2, seq=1), kv("x", 3, seq=2), kv("y", 4, seq=3)
    mirror.reset(4, [stays, goes, recreated])
    entries = [mirror.blocker(["x"], 9, False).keys[0], mirror.blocker(["y"], 9, False).keys[0]]
    entries.append(mirror.blocker(["x"], 3, False).keys[0])
    # The watch missed the deletion of `goes`, and `recreated` was deleted and put again.
    again = kv("y", 6, seq=3)
    change = mirror.reset(8, [stays, again, kv("x", 7, seq=4)])
    assert sorted(change.removed) == sorted([goes.key.decode(), recreated.key.decode()])
    assert sorted(e.revision for e in change.added) == [2, 6, 7]
    assert [e.gone.is_set() for e in entries] == [True, True, False]
    assert mirror.blocker(["x"], 3, False).keys == [entries[2]]
    assert [e.revision for e in mirror.queue("x")] == [2, 7]
    assert mirror.revision == 8


async def test_reset_takes_the_revision_read_even_when_it_is_lower() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(1, [])
    mirror.apply(puts(kv("x", 10)))
    # etcd restored from an older backup: its revision went back.
    mirror.reset(5, [kv("y", 4)])
    assert mirror.revision == 5
    with trio.move_on_after(0.1) as waiting:
        await mirror.wait_for(10)  # revision 10 of the new history is still to come
    assert waiting.cancelled_caught


def test_apply_reports_new_keys_and_advances() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(1, [])
    a, b = kv("x", 2, seq=1), kv("x", 2, seq=2, mode="shared")
    change = mirror.apply(puts(a, b))
    assert [e.key for e in change.added] == [a.key.decode(), b.key.decode()]
    assert mirror.revision == 2
    # A put over a key already known (etcd `put` to the same key) adds nothing.
    assert mirror.apply(puts(kv("x", 2, seq=1))) == ([], [])
    assert mirror.apply(deletion(a, 3)).removed == [a.key.decode()]
    assert mirror.apply(deletion(a, 4)).removed == []  # already gone


def test_queue_is_in_create_revision_order_with_records() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(9, [kv("x", 5, seq=2), kv("x", 3, "shared", seq=1)])
    queue = mirror.queue("x")
    assert [e.revision for e in queue] == [3, 5]
    holder = queue[0].holder()
    assert (holder.pid, holder.mode, holder.token, holder.since) == (3, "shared", 3, 1.5)


def test_a_foreign_value_counts_as_exclusive() -> None:
    mirror = Mirror(PREFIX)
    odd = KeyValue(
        key=f"{PREFIX}x/1".encode(), create_revision=2, mod_revision=2, value=b"not json"
    )
    mirror.reset(3, [odd])
    assert nearest(mirror, ["x"], 3, shared=True) == 2


async def test_wait_for_blocks_until_the_watch_reaches_the_revision() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(4, [])
    reached = []

    async def wait() -> None:
        await mirror.wait_for(6)
        reached.append(mirror.revision)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            mirror.apply(puts(kv("x", 5)))
            await trio.testing.wait_all_tasks_blocked()
            assert reached == []
            mirror.apply(puts(kv("x", 6, seq=2)))
    assert reached == [6]


def semaphore(name: str, revision: int, slots: int = 3) -> KeyValue:
    return kv(name, revision, seq=revision, slots=slots)


def test_a_slot_waits_while_as_many_older_keys_as_slots_are_on_the_name() -> None:
    mirror = Mirror(PREFIX)
    keys = [semaphore("s", r) for r in (2, 3, 4, 5)]
    mirror.reset(5, keys)
    # Holders and waiters alike take a place: the fourth waits for any of the three before it.
    assert mirror.blocker(["s"], 4, shared=False, slots={"s": 3}) is None
    found = mirror.blocker(["s"], 5, shared=False, slots={"s": 3})
    assert found is not None and [k.revision for k in found.keys] == [2, 3, 4]
    assert mirror.blocker(["s"], 6, shared=False, slots={"s": 3}).keys == found.keys


async def test_any_older_key_going_wakes_a_slot_waiter() -> None:
    mirror = Mirror(PREFIX)
    keys = [semaphore("s", r) for r in (2, 3, 4, 5)]
    mirror.reset(5, keys)
    waiting = mirror.blocker(["s"], 5, shared=False, slots={"s": 3})
    other = mirror.blocker(["t"], 9, shared=False, slots={"t": 1})
    assert other is None
    # Not a holder's key: the waiter just ahead gives up its place.
    mirror.apply(deletion(keys[2], 6))
    assert waiting.moved.is_set()
    assert mirror.blocker(["s"], 5, shared=False, slots={"s": 3}) is None


def test_a_multi_name_request_mixing_a_semaphore_and_a_lock_waits_for_either() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(4, [semaphore("s", 2, slots=1), kv("x", 3, seq=9)])
    found = mirror.blocker(["x", "s"], 5, shared=False, slots={"s": 1})
    assert found is not None and found.name == "x"
    found = mirror.blocker(["s", "x"], 5, shared=True, slots={"s": 1})
    assert found is not None and found.name == "s"
    assert mirror.blocker(["s", "x"], 2, shared=False, slots={"s": 1}) is None


def test_a_request_disagreeing_with_an_older_key_is_a_mismatch() -> None:
    mirror = Mirror(PREFIX)
    lock, three, four = kv("x", 2, seq=1), semaphore("s", 3), semaphore("s", 5, slots=4)
    mirror.reset(5, [lock, three, four])
    assert mirror.mismatch(["x"], 9, {"x": 3}).key == lock.key.decode()
    assert mirror.mismatch(["x"], 9) is None
    assert mirror.mismatch(["s"], 9).key == three.key.decode()
    assert mirror.mismatch(["s"], 9, {"s": 4}).key == three.key.decode()
    # Only older keys count: the younger one will be refused in its turn.
    assert mirror.mismatch(["s"], 4, {"s": 3}) is None
    assert mirror.mismatch(["s"], 9, {"s": 3}).key == four.key.decode()
    assert mirror.mismatch(["x"], 2, {"x": 3}) is None


def test_keys_without_slots_are_locks_whoever_wrote_them() -> None:
    previous_version = kv("s", 2, "shared", seq=1)  # a daemon that predates semaphores
    foreign = KeyValue(key=f"{PREFIX}s/1".encode(), create_revision=3, mod_revision=3, value=b"?")
    mirror = Mirror(PREFIX)
    mirror.reset(3, [previous_version, foreign])
    assert mirror.mismatch(["s"], 9, {"s": 3}).key == previous_version.key.decode()
    assert mirror.mismatch(["s"], 9) is None


def test_a_daemon_that_predates_semaphores_reads_a_slot_as_a_shared_request() -> None:
    class PreviousRecord(msgspec.Struct, omit_defaults=True):
        """The record as it was before semaphores."""

        host: str
        mode: str
        since: float
        pid: int | None = None
        uid: int | None = None
        gid: int | None = None
        command: str = ""
        label: str | None = None

    value = msgspec.json.encode(Record(host="web1", mode="shared", since=1.5, pid=4, slots=3))
    assert msgspec.json.decode(value, type=PreviousRecord) == PreviousRecord("web1", "shared", 1.5, 4)
    # And a lock's value is what it always was.
    lock = Record(host="web1", mode="exclusive", since=1.5, pid=4)
    assert b"slots" not in msgspec.json.encode(lock)


def test_slots_out_of_range_make_a_foreign_value() -> None:
    mirror = Mirror(PREFIX)
    odd = kv("s", 2, seq=1, slots=0)
    mirror.reset(2, [odd])
    assert mirror.queue("s")[0].record is None
    assert nearest(mirror, ["s"], 3, shared=True) == 2


_KINDS = ["exclusive", "shared", 2, 3]

_operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abc"), st.sampled_from(_KINDS)),
        st.tuples(st.just("delete"), st.integers(0, 50)),
        st.tuples(st.just("reset")),
    ),
    max_size=40,
)


@given(_operations)
def test_blocker_mismatch_and_queue_agree_with_a_scan_of_every_key(operations: list[tuple]) -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(1, [])
    present: dict[bytes, KeyValue] = {}
    revision = 1
    for operation in operations:
        if operation[0] == "put":
            _, name, kind = operation
            revision += 1
            # Some puts share a revision, as the keys of one txn do.
            created = revision - (revision % 3 == 0)
            if isinstance(kind, int):
                entry = kv(name, created, seq=revision, slots=kind)
            else:
                entry = kv(name, created, kind, seq=revision)
            present[entry.key] = entry
            mirror.apply(puts(entry))
        elif operation[0] == "delete" and present:
            revision += 1
            gone = present.pop(sorted(present)[operation[1] % len(present)])
            mirror.apply(deletion(gone, revision))
        elif operation[0] == "reset":
            mirror.reset(revision, list(present.values()))
        for name in "abc":
            mine = [k for k in present.values() if k.key.startswith(f"{PREFIX}{name}/".encode())]
            order = sorted(mine, key=lambda k: (k.create_revision, k.key))
            assert [e.key for e in mirror.queue(name)] == [k.key.decode() for k in order]
            for below in range(revision + 2):
                for shared in (False, True):
                    older = [
                        k.create_revision for k in mine
                        if k.create_revision < below and not (shared and b'"shared"' in k.value)
                    ]
                    found = mirror.blocker([name], below, shared)
                    assert (found and found.keys[0].revision) == (max(older) if older else None)
                ahead = [k for k in order if k.create_revision < below]
                for slots in (2, 3):
                    found = mirror.blocker([name], below, False, {name: slots})
                    expected = [k.key.decode() for k in ahead[:slots]] if len(ahead) >= slots else None
                    assert (found and [e.key for e in found.keys]) == expected
                for want in (None, 2, 3):
                    other = [k for k in ahead if msgspec.json.decode(k.value).get("slots") != want]
                    disagreeing = mirror.mismatch([name], below, {name: want} if want else {})
                    assert (disagreeing and disagreeing.key) == (other[0].key.decode() if other else None)
