"""TokenStore on real files, including a writer process killed with SIGKILL mid-stream."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockd_client.errors import DaemonUnavailable

from lockd.flock.tokens import BLOCK, FILE, TokenStore, TokenStoreError


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "var" / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[TokenStore]:
    store = TokenStore.open(state_dir)
    yield store
    store.close()


#: A mark far above the clock (the year 5000 or so, in microseconds): only the file decides.
FUTURE = 10**17


def mark(state_dir: Path) -> int:
    return int((state_dir / FILE).read_bytes())


def now_us() -> int:
    return time.time_ns() // 1000


def test_a_new_store_counts_from_the_clock_with_its_block_already_durable(state_dir: Path) -> None:
    before = now_us()
    store = TokenStore.open(state_dir)
    try:
        first = store.next()
        assert before < first <= now_us() + 1
        assert mark(state_dir) == first - 1 + BLOCK
        assert [store.next() for _ in range(2)] == [first + 1, first + 2]
    finally:
        store.close()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / FILE).stat().st_mode) == 0o600


def test_a_reopened_store_continues_above_everything_issued(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / FILE).write_bytes(b"%d\n" % FUTURE)
    issued = []
    for _ in range(3):
        store = TokenStore.open(state_dir)
        issued += [store.next() for _ in range(5)]
        store.close()
    assert issued[0] == FUTURE + 1 and issued[5] == FUTURE + BLOCK + 1 and issued[10] == FUTURE + 2 * BLOCK + 1


def test_tokens_keep_rising_when_the_state_directory_is_lost(state_dir: Path) -> None:
    store = TokenStore.open(state_dir)
    # Far fewer than a million a second: the rate up to which the clock floor keeps order.
    issued = [store.next() for _ in range(3)]
    store.close()
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()
    store = TokenStore.open(state_dir)
    try:
        assert store.next() > issued[-1]
    finally:
        store.close()


def test_the_mark_moves_only_when_a_block_is_used_up(store: TokenStore, state_dir: Path) -> None:
    first = store.next()
    for _ in range(BLOCK - 1):
        store.next()
    assert mark(state_dir) == first - 1 + BLOCK
    assert store.next() == first + BLOCK
    assert mark(state_dir) == first - 1 + 2 * BLOCK


def test_a_second_store_on_the_same_directory_is_refused(store: TokenStore, state_dir: Path) -> None:
    with pytest.raises(TokenStoreError, match=f"{state_dir} is in use by another lockd"):
        TokenStore.open(state_dir)
    issued = store.next()
    store.close()
    again = TokenStore.open(state_dir)
    try:
        assert again.next() > issued
    finally:
        again.close()


WRITER = """
import sys
import threading
from pathlib import Path
from lockd.flock.tokens import TokenStore
store = TokenStore.open(Path(sys.argv[1]))
while True:
    print(store.next(), flush=True)
"""


@pytest.mark.parametrize("kill_after", [1, BLOCK - 1, BLOCK + 3])
def test_sigkill_at_any_point_never_lets_a_token_repeat(state_dir: Path, kill_after: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    hang_guard = threading.Timer(20, proc.kill)  # a stuck writer ends the readline loop below
    hang_guard.start()
    try:
        seen = [int(proc.stdout.readline()) for _ in range(kill_after)]
    finally:
        hang_guard.cancel()
        proc.kill()
        proc.wait(10)
    # Whatever it printed before dying was issued too; a torn last line is left out.
    seen += [int(line) for line in proc.stdout.read().split(b"\n")[:-1]]
    proc.stdout.close()
    assert seen == list(range(seen[0], seen[0] + len(seen)))
    store = TokenStore.open(state_dir)
    try:
        assert store.next() > seen[-1]
    finally:
        store.close()


def test_a_temporary_file_left_by_a_crash_is_ignored(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / FILE).write_bytes(b"%d\n" % FUTURE)
    (state_dir / "tokens.tmp").write_bytes(b"9")
    store = TokenStore.open(state_dir)
    try:
        assert store.next() == FUTURE + 1
    finally:
        store.close()


@pytest.mark.parametrize("content", [b"", b"abc\n", b"-5\n", b"12", b"12\n13\n", b" 7\n", b"\xff\n"])
def test_a_damaged_file_stops_start_up_and_is_kept(state_dir: Path, content: bytes) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / FILE).write_bytes(content)
    with pytest.raises(TokenStoreError, match=f"{state_dir / FILE} is damaged.*or remove the file"):
        TokenStore.open(state_dir)
    assert (state_dir / FILE).read_bytes() == content
    # The refusal released the directory: once repaired, the store opens.
    (state_dir / FILE).write_bytes(b"%d\n" % FUTURE)
    store = TokenStore.open(state_dir)
    try:
        assert store.next() == FUTURE + 1
    finally:
        store.close()


def test_an_unreadable_file_stops_start_up(state_dir: Path, tmp_path: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / FILE).mkdir()
    with pytest.raises(TokenStoreError, match=f"cannot read the fencing-token mark {state_dir / FILE}"):
        TokenStore.open(state_dir)
    (state_dir / FILE).rmdir()
    (tmp_path / "elsewhere").write_bytes(b"5\n")
    (state_dir / FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TokenStoreError, match="cannot read"):
        TokenStore.open(state_dir)


def test_an_unusable_state_directory_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    with pytest.raises(TokenStoreError, match="cannot use the state directory"):
        TokenStore.open(tmp_path / "file" / "state")


def test_a_failed_mark_write_issues_nothing_and_is_retried(store: TokenStore, state_dir: Path) -> None:
    first = store.next()
    for _ in range(BLOCK - 1):
        store.next()
    blocker = state_dir / "tokens.tmp"
    os.mkdir(blocker)  # the next mark cannot be written while a directory sits there
    with pytest.raises(DaemonUnavailable, match=f"cannot save its fencing-token mark to {state_dir / FILE}"):
        store.next()
    assert mark(state_dir) == first - 1 + BLOCK
    os.rmdir(blocker)
    assert store.next() == first + BLOCK
    assert mark(state_dir) == first - 1 + 2 * BLOCK
