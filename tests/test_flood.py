"""A local flood of bad connections cannot flood lockd's log: a real daemon, logging at info
as in production, is sent thousands of connections it must cut off while a well-behaved
client cycles; the log grows by a bounded number of lines, and every cut-off is still
counted. (The flood of 100,000 and the client's latency meanwhile are `bench/run --only
flood`.)"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import lockd_client

from lockd.loglimit import LINES, WINDOW

from .conftest import Daemon
from .test_fuzz import daemon_fds
from .waiting import wait_until

FLOOD = 3000
TIMEOUT = 60.0
#: A frame prefix announcing 4 GiB: the daemon cuts the connection off before reading more.
TOO_LARGE = b"\xff\xff\xff\xff"


def test_a_flood_of_bad_connections_adds_a_bounded_number_of_log_lines(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp, "--log-level", "info")
    daemon.start()
    try:
        with lockd_client.connect(daemon.socket) as client:
            client.status()
            idle_fds = daemon_fds(daemon)
            before = len(daemon.log().splitlines())
            cycles: list[int] = []
            stop = threading.Event()

            def cycle() -> None:
                while not stop.is_set():
                    client.acquire("x").release()
                    cycles.append(len(client.status("x")))

            cycling = threading.Thread(target=cycle)
            started = time.monotonic()
            cycling.start()
            try:
                for _ in range(FLOOD):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
                        bad.connect(daemon.socket)
                        bad.sendall(TOO_LARGE)
                wait_until(
                    lambda: daemon_fds(daemon) <= idle_fds, "the daemon got through the flood", TIMEOUT, interval=0.05
                )
            finally:
                stop.set()
                cycling.join(TIMEOUT)
            elapsed = time.monotonic() - started
            assert cycles, "the well-behaved client was not served during the flood"
        assert daemon.stop() == 0  # the summary of a window not ended yet is logged on the way out
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    # The well-behaved client's lease events are logged one by one, as they should be.
    added = [line for line in daemon.log().splitlines()[before:] if not re.search(r" x (granted|released) ", line)]
    one_by_one = [line for line in added if " cut off: " in line]
    summaries = [re.search(r"cut off ([\d,]+) more connections", line) for line in added]
    counted = [int(m[1].replace(",", "")) for m in summaries if m]
    assert len(one_by_one) + sum(counted) == FLOOD
    windows = elapsed / WINDOW + 2  # the flood's, each begun or ended
    stopping = 5  # the lines of a daemon shutting down
    assert len(added) <= (LINES + 1) * windows + stopping, "\n".join(added[:50])
    assert len(added) < FLOOD / 10
