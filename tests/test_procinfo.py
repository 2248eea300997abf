"""procinfo against real processes: this one, children we start, and pids that are gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockd import procinfo

from .waiting import wait_until


def _started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """`proc` once its new program's arguments are in place (Popen can return just before)."""
    wait_until(lambda: procinfo.command_line(proc.pid), "the child showed its arguments", interval=0.001)
    return proc


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = _started(subprocess.Popen(["sh", "-c", "sleep 30; :", "two words", "é"]))
    yield proc
    proc.kill()
    proc.wait(10)


def test_peer_credentials_name_the_connecting_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert procinfo.peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


def test_peer_credentials_of_a_socket_without_peer() -> None:
    with socket.socket(socket.AF_UNIX) as s:
        assert procinfo.peer_credentials(s) == (0, -1, -1)


def test_command_line_joins_arguments(sleeper: subprocess.Popen[bytes]) -> None:
    assert procinfo.command_line(sleeper.pid) == "sh -c sleep 30; : two words é"


def test_command_line_is_truncated() -> None:
    proc = _started(subprocess.Popen(["sh", "-c", "sleep 30; :", "x" * 5000]))
    try:
        command = procinfo.command_line(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert len(command) == procinfo.MAX_COMMAND_LENGTH
    assert command.startswith("sh -c sleep 30; : xxx")


def test_facts_about_a_gone_process_are_empty() -> None:
    pid = _gone_pid()
    assert procinfo.command_line(pid) == ""
    assert procinfo.process_uid(pid) is None


def test_command_line_of_a_kernel_thread_is_empty() -> None:
    assert procinfo.command_line(2) == ""  # kthreadd


def test_process_uid_is_the_real_uid() -> None:
    assert procinfo.process_uid(os.getpid()) == os.getuid()


def test_process_groups_match_the_kernel_view_of_this_process() -> None:
    from lockd.procinfo import process_groups

    assert process_groups(os.getpid()) == frozenset(os.getgroups())
    assert process_groups(2**22 + 12345) == frozenset()


GROUP_CHANGER = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.setgroups([])  # after connecting: the connection keeps the groups it was made with
print("changed", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process with other groups")
def test_peer_groups_are_those_of_the_connect(short_tmp: Path) -> None:
    path = str(short_tmp / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        listener.settimeout(10)
        with subprocess.Popen(
            [sys.executable, "-c", GROUP_CHANGER, path], extra_groups=[4, 27],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as child:
            try:
                conn, _ = listener.accept()
                with conn:
                    assert child.stdout is not None and child.stdout.readline() == "changed\n"
                    assert procinfo.process_groups(child.pid) == frozenset()
                    pid, uid, gid = procinfo.peer_credentials(conn)
                    assert procinfo.peer_groups(conn, pid, gid) == {4, 27, gid}
            finally:
                child.kill()
