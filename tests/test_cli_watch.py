"""`lockctl watch` and `lockctl status --watch` as real processes against a real daemon."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time

import lockd_client
import msgspec
from lockd_client import protocol

from .conftest import Daemon
from .test_cli import LOCKCTL, LOCKCTL_SH, OnTerminal, kill_quietly, lockctl, start_lockctl
from .test_cli_supervise import TIMEOUT
from .waiting import wait_until

ME = pwd.getpwuid(os.getuid()).pw_name


class Watcher:
    """A `lockctl watch` on NAME and NAME.ready, its output lines collected as they come."""

    def __init__(self, daemon: Daemon, name: str, *options: str) -> None:
        self.name = name
        self.proc = start_lockctl(daemon, "watch", *options, name, f"{name}.ready")
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

        def subscribed() -> bool:
            """Whether an event on NAME.ready has shown; if not, make one more."""
            if self.lines:
                return True
            lockctl(daemon, "acquire", f"{name}.ready", "--", "true")
            return False

        wait_until(subscribed, "lockctl watch printing an event", show=self.proc.poll)

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def of(self, count: int) -> list[str]:
        """The first `count` lines about NAME, once they have come."""
        def mine() -> list[str]:
            return [line for line in self.lines if f'"{self.name}"' in line or f"  {self.name}  " in line]

        return wait_until(lambda: len(mine()) >= count and mine()[:count], f"{count} events on {self.name}")

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=TIMEOUT)
        self._reader.join(TIMEOUT)
        return self.proc.returncode, err


def test_watch_json_shows_a_lockctl_acquire_cycle_in_order(lockd: Daemon, name: str) -> None:
    watcher = Watcher(lockd, name, "--json")
    try:
        inner = f"{LOCKCTL_SH} acquire -n {name} -- true"
        outer = subprocess.Popen(
            [*LOCKCTL, "acquire", "--label", "outer", name, "--", "sh", "-c", inner],
            env=lockd.env, stderr=subprocess.PIPE, text=True,
        )
        _, busy = outer.communicate(timeout=TIMEOUT)
        assert outer.returncode == 75 and "busy" in busy  # the inner acquire found it held
        events = [json.loads(line) for line in watcher.of(3)]
        watcher.proc.send_signal(signal.SIGINT)
        status, err = watcher.finish()
    finally:
        kill_quietly(watcher.proc)
    assert [(e["event"], e["name"]) for e in events] == [("granted", name), ("refused", name), ("released", name)]
    # Every field of a LeaseEvent, nulls kept, and the user's name filled in.
    assert all(list(e) == list(protocol.LeaseEvent.__struct_fields__) for e in events)
    assert all((e["uid"], e["user"], e["mode"], e["slots"]) == (os.getuid(), ME, "exclusive", None) for e in events)
    granted, refused, released = events
    assert (granted["pid"], granted["label"], granted["held"], granted["reason"]) == (outer.pid, "outer", None, None)
    assert granted["waited"] >= 0 and f"acquire --label outer {name}" in granted["command"]
    assert (refused["token"], refused["reason"], refused["label"]) == (None, "busy", None)
    assert refused["pid"] != outer.pid and f"acquire -n {name}" in refused["command"]
    assert (released["pid"], released["token"], released["waited"]) == (outer.pid, granted["token"], None)
    assert released["held"] >= 0 and granted["time"] <= refused["time"] <= released["time"]
    # Interrupted, it dies of SIGINT quietly, as lockctl does, so a shell loop stops.
    assert (status, err) == (-signal.SIGINT, "")


def test_watch_prints_a_line_per_event_and_exits_69_when_lockd_goes(daemon: Daemon, name: str) -> None:
    watcher = Watcher(daemon, name)
    try:
        with lockd_client.connect(daemon.socket) as c:
            lease = c.acquire(name, label="web")
            lease.release()
        granted, released = watcher.of(2)
        clock = r"\d\d:\d\d:\d\d\.\d\d\d"
        lock = f"{name}  exclusive  token {lease.token}  pid {os.getpid()} \\(.*pytest.*\\) \\[web\\] of {ME}"
        assert re.fullmatch(rf"{clock}  granted   {lock}  waited \S+s\n", granted)
        assert re.fullmatch(rf"{clock}  released  {lock}  held \S+s\n", released)
        daemon.kill()
        status, err = watcher.finish()
    finally:
        kill_quietly(watcher.proc)
    assert status == 69
    assert "is lockd still running?" in err and daemon.socket in err


def test_a_watch_whose_output_is_not_read_is_dropped_with_a_notice_and_75(daemon: Daemon, name: str) -> None:
    watcher = start_lockctl(daemon, "watch", "--json")  # its output is not read for now
    try:
        with lockd_client.connect(daemon.socket) as c:
            # Once its pipe is full, it stops reading the socket, and lockd drops it.
            def dropped() -> bool:
                for _ in range(200):
                    c.acquire(name).release()
                return "dropped: it did not read its events in time" in daemon.log()

            wait_until(dropped, "lockd dropping the watcher", show=daemon.log)
        out, err = watcher.communicate(timeout=TIMEOUT)
    finally:
        kill_quietly(watcher)
    assert watcher.returncode == 75
    assert "lockd stopped sending events to this watch" in err and "start it again" in err
    # Everything it was sent until then, whole lines of events as they happened.
    events = [msgspec.json.decode(line, type=protocol.LeaseEvent) for line in out.splitlines()]
    assert len(events) > 2 and [e.event for e in events[:2]] in (["granted", "released"], ["released", "granted"])
    assert all(a.time <= b.time for a, b in zip(events, events[1:], strict=False))


def test_a_watch_whose_reader_goes_dies_of_sigpipe(lockd: Daemon, name: str) -> None:
    pipeline = subprocess.Popen(
        ["bash", "-c", f'{LOCKCTL_SH} watch --json {name} | head -n 1 >/dev/null; echo "${{PIPESTATUS[0]}}" >&2'],
        env=lockd.env, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Once subscribed, head takes the first event and exits; lockctl's next line meets
        # no reader.
        wait_until(
            lambda: lockctl(lockd, "acquire", name, "--", "true") and pipeline.poll() is not None,
            "lockctl watch ending",
        )
        _, err = pipeline.communicate(timeout=TIMEOUT)
    finally:
        kill_quietly(pipeline)
    assert err == f"{128 + signal.SIGPIPE}\n"  # died of SIGPIPE, quietly, as a filter does


# --- status --watch ---------------------------------------------------------------------------


def read_until_count(master: int, marker: bytes, count: int) -> bytes:
    """What appears on the pty `master` until `marker` has appeared `count` times."""
    output = b""
    deadline = time.monotonic() + TIMEOUT
    while output.count(marker) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([master], [], [], remaining)[0], output
        output += os.read(master, 4096)
    return output


def test_status_watch_redraws_the_table_in_place_until_interrupted(lockd: Daemon, name: str) -> None:
    argv = [*LOCKCTL, "status", "--watch", "0.2", name]
    with lockd_client.connect(lockd.socket) as c, c.lock(name), OnTerminal(LOCKCTL[0], argv, lockd.env) as watch:
        fcntl.ioctl(watch.master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
        output = read_until_count(watch.master, b"Every 0.2s: lockctl status", 3)
        os.kill(watch.pid, signal.SIGINT)
        status = watch.wait()
    drawings = output.split(b"\x1b[H")[1:]  # each starts at the top left
    assert len(drawings) >= 3
    for drawing in drawings[:3]:
        header, blank, columns, row, *_ = drawing.split(b"\n")
        assert header.startswith(b"Every 0.2s: lockctl status " + name.encode())
        assert re.search(rb"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\x1b\[K\r$", header) and len(header) == 160 + 4
        assert columns.startswith(b"NAME ") and row.startswith(name.encode() + b" ")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT


def test_status_watch_is_for_a_terminal(lockd: Daemon) -> None:
    proc = lockctl(lockd, "status", "--watch")
    assert proc.returncode == 64 and proc.stdout == ""
    assert "stdout is not one; a script runs `lockctl status --json`" in proc.stderr
