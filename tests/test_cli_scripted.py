"""lockctl against a stand-in daemon that says what each test scripts: what no real daemon
does on purpose (a broken frame, a lease ended right after its grant), at the moment a test
needs it."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import msgspec
import pytest
from lockd_client import cli, protocol

from .test_cli import LOCKCTL, LOCKCTL_SH
from .test_cli_supervise import TIMEOUT, alive, parent_of, wait_for_file
from .waiting import wait_until


class Peer:
    """One accepted lockctl connection, spoken to frame by frame."""

    def __init__(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        self.conn = conn
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = protocol.request_decoder()
        self.frames = protocol.FrameBuffer(protocol.MAX_REQUEST_FRAME)
        pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        self.pid = pid

    def send(self, *messages: object) -> None:
        """All in one write, so that lockctl reads them together."""
        out = bytearray()
        for message in messages:
            protocol.encode_frame(self.encoder, message, out)
        self.conn.sendall(out)

    def recv(self) -> object:
        """The next request; EOFError once lockctl has closed the connection."""
        while (body := self.frames.next_frame()) is None:
            data = self.conn.recv(65536)
            if not data:
                raise EOFError
            self.frames.feed(data)
        return self.decoder.decode(body)

    def greet(self, *features: str) -> None:
        assert isinstance(self.recv(), protocol.Hello)
        self.send(protocol.Welcome(protocol.PROTOCOL_VERSION, "scripted", "none", features=list(features)))

    def wait_for_close(self) -> list[object]:
        """Requests received until lockctl's side of the connection is closed everywhere."""
        received = []
        while True:
            try:
                received.append(self.recv())
            except EOFError:
                return received


@pytest.fixture
def scripted(short_tmp: Path):
    """The stand-in daemon's socket; `accept()` returns the next connection as a Peer."""
    path = str(short_tmp / "scripted.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        listener.settimeout(TIMEOUT)

        peers: list[Peer] = []

        class Daemon:
            socket = path
            env = {**os.environ, "LOCKD_SOCKET": path}

            @staticmethod
            def accept() -> Peer:
                peers.append(Peer(listener.accept()[0]))
                return peers[-1]

        yield Daemon
        for peer in peers:
            peer.conn.close()


def start(daemon, *args: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LOCKCTL, *args], env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def grant(peer: Peer, *more: object) -> protocol.Acquire:
    """Answer the handshake and grant the acquire that follows, sending `more` right after."""
    peer.greet()
    request = peer.recv()
    assert isinstance(request, protocol.Acquire)
    peer.send(protocol.Granted(request.id, [7] * len(request.names)), *(m(request) for m in more))
    return request


def test_a_protocol_violation_keeps_the_lease_until_cmd_is_gone(scripted, tmp_path: Path) -> None:
    """lockctl gives up on a connection it cannot trust, but the daemon must not see it end
    (and free the lock) before CMD, which takes a while to clean up, has exited."""
    script = f"trap 'sleep 1; exit 3' TERM; echo $$ > {tmp_path}/cmd; while :; do sleep 0.05; done"
    proc = start(scripted, "acquire", "x", "-c", script)
    try:
        peer = scripted.accept()
        grant(peer)
        cmd = int(wait_for_file(tmp_path / "cmd"))
        peer.conn.sendall(b"\0\0\0\1\xc1")  # a frame no msgpack decoder accepts
        peer.wait_for_close()
        assert not alive(cmd)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == cli.EXIT_LOST, err
    assert "broke the protocol" in err and "CMD was terminated" in err


def lost(request: protocol.Acquire) -> protocol.Lost:
    return protocol.Lost(request.id, "forcibly released by uid 0")


def test_a_lease_broken_before_cmd_starts_is_busy_and_cmd_never_runs(scripted, tmp_path: Path) -> None:
    proc = start(scripted, "acquire", "x", "--", "touch", str(tmp_path / "ran"))
    try:
        peer = scripted.accept()
        grant(peer, lost)
        status = peer.recv()  # lockctl asks who holds it now, to say so
        assert isinstance(status, protocol.Status)
        holder = protocol.Holder(pid=4242, uid=0, command="the breaker", since=1.0, token=8)
        peer.send(protocol.StatusReply(status.id, [protocol.LockInfo("x", "exclusive", [holder], [])]))
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == cli.EXIT_BUSY, err
    assert "CMD was not started" in err and "pid 4242 (the breaker)" in err
    assert not (tmp_path / "ran").exists()


def test_a_daemon_gone_before_cmd_starts_is_unavailable_and_cmd_never_runs(scripted, tmp_path: Path) -> None:
    proc = start(scripted, "acquire", "x", "--", "touch", str(tmp_path / "ran"))
    try:
        peer = scripted.accept()
        grant(peer)
        peer.conn.close()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == cli.EXIT_UNAVAILABLE, err
    assert "CMD was not started" in err
    assert not (tmp_path / "ran").exists()


def test_a_lease_is_not_tied_to_whoever_inherits_lockctl_from_its_dead_parent(scripted) -> None:
    """The shell that ran lockctl exits while lockctl connects: lockctl is re-parented to
    init or a subreaper, neither of which ever exits, so a lease tied to it would stay."""
    shell = subprocess.Popen(
        ["sh", "-c", f"{LOCKCTL_SH} acquire x; echo never"],
        env=scripted.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peer = scripted.accept()  # lockctl waits for the welcome now: its parent dies
    try:
        shell.kill()
        shell.wait(TIMEOUT)
        wait_until(lambda: parent_of(peer.pid) != shell.pid, "lockctl re-parented")
        peer.greet()
        assert peer.wait_for_close() == []  # no acquire, for a wrong process or any other
        _, err = shell.communicate(timeout=TIMEOUT)  # lockctl writes to the dead shell's stderr
    finally:
        if alive(peer.pid):
            os.kill(peer.pid, signal.SIGKILL)
        shell.communicate(timeout=TIMEOUT)
    assert "is gone" in err and "--pid" in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # A daemon older than semaphores ignores `slots` and would grant a plain lock.
        (["acquire", "--slots", "3", "x", "--", "touch", "{ran}"], "does not serve semaphores (slots); upgrade it"),
        (["watch", "x"], "this lockd (scripted) does not send lease events; upgrade it"),
        (["daemon", "reexec"], "this lockd (scripted) cannot re-execute itself in place: it is older than this client; "
         "restart it instead"),
    ],
    ids=["slots", "watch", "reexec"],
)
def test_a_feature_a_daemon_does_not_serve_is_never_asked_for(
    scripted, tmp_path: Path, argv: list[str], said: str
) -> None:
    proc = start(scripted, *(arg.format(ran=tmp_path / "ran") for arg in argv))
    try:
        peer = scripted.accept()
        peer.greet()  # a Welcome that lists no features
        assert peer.wait_for_close() == []
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == cli.EXIT_PROTOCOL, err
    assert said in err
    assert not (tmp_path / "ran").exists()


def reexec(scripted, *argv: str, answer) -> tuple[int, str, str]:
    """Run `lockctl daemon reexec ARGV` against a daemon that answers its Reexec with
    `answer(request)` (None: it hangs up instead); its status, stdout and stderr."""
    proc = start(scripted, "daemon", "reexec", *argv)
    try:
        peer = scripted.accept()
        peer.greet(protocol.Feature.REEXEC)
        request = peer.recv()
        assert isinstance(request, protocol.Reexec)
        reply = answer(request)
        if reply is None:
            peer.conn.close()
        else:
            peer.send(reply)
            assert peer.wait_for_close() == []
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    return proc.returncode, out, err


def test_daemon_reexec_says_what_ran_before_and_after_and_how_long_lockd_paused(scripted) -> None:
    status, out, err = reexec(
        scripted, answer=lambda request: protocol.Reexecuted(request.id, "lockd 0.1.0", "lockd 0.2.0", 0.0424),
    )
    assert (status, out, err) == (0, "lockd re-executed: lockd 0.1.0 -> lockd 0.2.0, paused 42 ms\n", "")


def test_daemon_reexec_json(scripted) -> None:
    status, out, _ = reexec(
        scripted, "--json", answer=lambda request: protocol.Reexecuted(request.id, "lockd 0.1.0", "lockd 0.2.0", 0.5),
    )
    assert status == 0
    assert msgspec.json.decode(out) == {"previous": "lockd 0.1.0", "server": "lockd 0.2.0", "paused": 0.5}


@pytest.mark.parametrize(
    ("code", "message", "exit_status", "said"),
    [
        (
            protocol.ErrorCode.NOT_REEXECUTED, "not re-executed: the daemon is stopping", cli.EXIT_NOT_REEXECUTED,
            "lockctl: not re-executed: the daemon is stopping; lockd serves on as before, with everything it held: "
            "fix what it says, then run lockctl daemon reexec again",
        ),
        (
            protocol.ErrorCode.PERMISSION_DENIED,
            "only root or uid 0 (lockd's user) may re-execute lockd; you are uid 7", cli.EXIT_DENIED,
            "lockctl: refused: only root or uid 0 (lockd's user) may re-execute lockd; you are uid 7; run it as root "
            "(sudo lockctl daemon reexec)",
        ),
    ],
    ids=["not_reexecuted", "permission_denied"],
)
def test_a_refused_reexec_says_why_and_what_to_do(
    scripted, code: str, message: str, exit_status: int, said: str,
) -> None:
    status, out, err = reexec(scripted, answer=lambda request: protocol.Error(request.id, code, message))
    assert (status, out) == (exit_status, "")
    assert err.startswith(said), err


def test_a_daemon_gone_during_the_reexec_is_unavailable(scripted) -> None:
    status, out, err = reexec(scripted, answer=lambda request: None)
    assert (status, out) == (cli.EXIT_UNAVAILABLE, "")
    assert "no answer to the re-exec: the daemon closed the connection" in err
    assert "its new program could not take over: start lockd again" in err
