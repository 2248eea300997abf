"""The mirror of etcd's lock keys: pure bookkeeping, driven by synthetic watch data."""

from __future__ import annotations

import msgspec
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lockd.etcd.client import Event, Header, KeyValue, WatchResponse
from lockd.etcd.mirror import Mirror

PREFIX = "/lockd/"


def kv(name: str, revision: int, mode: str = "exclusive", lease: int = 7, seq: int = 1) -> KeyValue:
    value = msgspec.json.encode({"host": "h", "mode": mode, "since": 1.5, "pid": revision})
    key = f"{PREFIX}{name}/{lease:x}/{seq}".encode()
    return KeyValue(
        key=key, create_revision=revision, mod_revision=revision, value=value, lease=lease
    )


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
    assert mirror.blocker(["x"], 4, shared=False).revision == 3
    assert mirror.blocker(["x"], 3, shared=False).revision == 2
    assert mirror.blocker(["x"], 2, shared=False) is None


def test_shared_waits_only_for_exclusive_keys() -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(5, [kv("x", 2, "shared", seq=1), kv("x", 3, seq=2), kv("x", 4, "shared", seq=3)])
    assert mirror.blocker(["x"], 5, shared=True).revision == 3
    assert mirror.blocker(["x"], 3, shared=True) is None
    assert mirror.blocker(["x"], 5, shared=False).revision == 4


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
    assert first.gone.is_set() and not second.gone.is_set()
    assert mirror.revision == 4
    assert mirror.blocker(["x"], 9, False) is None
    assert mirror.names() == ["y"]


async def test_reset_wakes_only_the_waiters_of_keys_that_went() -> None:
    mirror = Mirror(PREFIX)
    stays, goes, recreated = kv("x", 2, seq=1), kv("x", 3, seq=2), kv("y", 4, seq=3)
    mirror.reset(4, [stays, goes, recreated])
    entries = [mirror.blocker(["x"], 9, False), mirror.blocker(["y"], 9, False)]
    entries.append(mirror.blocker(["x"], 3, False))
    # The watch missed the deletion of `goes`, and `recreated` was deleted and put again.
    again = kv("y", 6, seq=3)
    change = mirror.reset(8, [stays, again, kv("x", 7, seq=4)])
    assert sorted(change.removed) == sorted([goes.key.decode(), recreated.key.decode()])
    assert sorted(e.revision for e in change.added) == [2, 6, 7]
    assert [e.gone.is_set() for e in entries] == [True, True, False]
    assert mirror.blocker(["x"], 3, False) is entries[2]
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
    assert mirror.blocker(["x"], 3, shared=True).revision == 2


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


_operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abc"), st.booleans()),
        st.tuples(st.just("delete"), st.integers(0, 50)),
        st.tuples(st.just("reset")),
    ),
    max_size=40,
)


@given(_operations)
def test_blocker_and_queue_agree_with_a_scan_of_every_key(operations: list[tuple]) -> None:
    mirror = Mirror(PREFIX)
    mirror.reset(1, [])
    present: dict[bytes, KeyValue] = {}
    revision = 1
    for operation in operations:
        if operation[0] == "put":
            _, name, shared = operation
            revision += 1
            # Some puts share a revision, as the keys of one txn do.
            created = revision - (revision % 3 == 0)
            entry = kv(name, created, "shared" if shared else "exclusive", seq=revision)
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
                    assert (found and found.revision) == (max(older) if older else None)
