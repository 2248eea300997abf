"""Fencing tokens: one counter for the whole daemon, strictly increasing across crashes.

Invariant: every token `next` returns is larger than every token issued before it on the same
state directory, by this process or any earlier one, however that one ended (SIGKILL, power
loss). It holds because a token is only issued once a mark at or above it is durable on disk,
and a new store starts above the mark it finds. One counter for all names makes tokens
strictly increasing per name as well.

A new store also starts no lower than the current time in microseconds since 1970. So tokens
keep rising even across a lost or replaced state directory (the lock files, and the clients'
stored tokens, may well outlive it), as long as the clock has not gone back and grants have
averaged under a million a second since 1970 — the durable mark alone guarantees the rest.

The file `STATE_DIR/tokens` holds the mark as one decimal number and a newline: the highest
token that may have been issued. It is replaced atomically (write a temporary file, fsync,
rename over, fsync the directory), so a crash leaves the old mark or the new one, never a torn
one. A store holds an flock on the state directory for its lifetime, so two daemons never
issue from the same counter.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Final

from lockd_client.errors import DaemonUnavailable, LockdError

FILE: Final = "tokens"
_TEMP: Final = "tokens.tmp"
#: Tokens reserved per write of the mark. A restart skips what is left of the block, which
#: costs nothing (only order matters), while a daemon granting 20,000 leases a second writes
#: the mark (one fsync) every few seconds instead of on every grant.
BLOCK: Final = 65536

_MARK = re.compile(rb"[0-9]+\n")


class TokenStoreError(LockdError):
    """The token file cannot be read or trusted; the daemon must not start with it."""


class TokenStore:
    """Issues fencing tokens. See the module docstring; create it with `TokenStore.open`."""

    def __init__(self, path: Path, dir_fd: int, mark: int) -> None:
        self.path = path
        self._dir_fd = dir_fd
        #: Highest token that may be issued: durable on disk.
        self._mark = mark
        self._last = mark

    @classmethod
    def open(cls, state_dir: Path) -> TokenStore:
        """Open the counter in `state_dir` (created with mode 0700 if missing).

        The first token is above both the mark found and the current time in microseconds,
        and a mark covering it is made durable before returning. Raises TokenStoreError when
        the directory or file cannot be used or the file is damaged.
        """
        path = state_dir / FILE
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise TokenStoreError(f"cannot use the state directory {state_dir}: {err.strerror}") from err
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(dir_fd)
            if err.errno == errno.EWOULDBLOCK:
                raise TokenStoreError(
                    f"the state directory {state_dir} is in use by another lockd: give each "
                    "daemon its own state directory"
                ) from None
            raise TokenStoreError(f"cannot lock the state directory {state_dir}: {err.strerror}") from err
        try:
            store = cls(path, dir_fd, max(_read_mark(path, dir_fd), time.time_ns() // 1000))
            store._write_mark(store._mark + BLOCK)
        except OSError as err:
            os.close(dir_fd)
            raise TokenStoreError(
                f"cannot save the fencing-token mark to {path}: {err.strerror}; fix the state "
                "directory (space, permissions) and start again"
            ) from err
        except BaseException:
            os.close(dir_fd)
            raise
        return store

    def next(self) -> int:
        """The next token. Once a block is used up, first writes the next mark (one fsync).

        Raises DaemonUnavailable if that write fails; no token is issued then, and the next
        call tries again.
        """
        token = self._last + 1
        if token > self._mark:
            try:
                self._write_mark(self._mark + BLOCK)
            except OSError as err:
                raise DaemonUnavailable(
                    f"lockd cannot save its fencing-token mark to {self.path} ({err.strerror}), so "
                    "it grants no lock: fix the state directory (space, permissions)"
                ) from err
        self._last = token
        return token

    def close(self) -> None:
        """Let another store open the directory. Writes nothing: the mark is already ahead."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _write_mark(self, mark: int) -> None:
        data = b"%d\n" % mark
        fd = os.open(
            _TEMP,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(_TEMP, FILE, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        os.fsync(self._dir_fd)
        self._mark = mark


def _read_mark(path: Path, dir_fd: int) -> int:
    """The mark in the token file; 0 when there is none yet (a new state directory)."""

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)

    try:
        with open(FILE, "rb", opener=opener) as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise TokenStoreError(
            f"cannot read the fencing-token mark {path}: {err.strerror}; fix it rather than "
            "delete it, or lockd would reissue tokens clients have already seen"
        ) from err
    if not _MARK.fullmatch(data):
        raise TokenStoreError(
            f"{path} is damaged: it must hold one decimal number, the highest fencing token "
            "issued. Write a number larger than any token issued, or remove the file: lockd "
            "then starts from the current time in microseconds, which is larger unless the "
            "clock went back"
        )
    return int(data)
