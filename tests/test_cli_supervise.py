"""Supervision of CMD under a lease (lockd_client._supervise), with real processes.

The daemon is stood in for by one end of a socketpair: the supervisor gets the other end as
its "connection", and the lease counts as lost once anything (or EOF) arrives on it. That
lets these tests check the invariant directly: the stand-in sees its end close only after
CMD's process tree is gone.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lockd_client import _proctree

from .waiting import wait_until

TIMEOUT = 10.0

# Runs _supervise.run in its own process, as lockctl does: argv is FD KILL_AFTER CMD...
# Exit status: CMD's, or 79 with "LOST <message>" on stderr, or 127 with "OSERROR <errno>"
# (CMD could not be executed); any other error is a traceback and status 1. In the
# environment, IGNORE_HUP ignores SIGHUP first, as nohup does; DIE_AT_GATE has the supervisor
# SIGKILL itself just before it opens the gate, and DIE_AT_GATE=all its guardian first;
# KILL_CMD_AT_GATE has it SIGKILL CMD's child there instead, and go on.
HARNESS = """
import os, signal, socket, sys, time
from lockd_client import _supervise, errors
if os.environ.get("IGNORE_HUP"):  # as under nohup
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
fd, kill_after, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
conn = socket.socket(fileno=fd)
lost, killed = [], []
def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found
def process_events():
    # With the stand-in silent, nothing calls this before the lease check at the gate.
    if os.environ.get("KILL_CMD_AT_GATE") and not killed:
        killed.append(True)
        for guardian in children("self"):
            for cmd in children(guardian):
                os.kill(cmd, signal.SIGKILL)
                while os.path.exists(f"/proc/{cmd}"):  # till reaped: the guardian has the gate closed
                    time.sleep(0.001)
        return
    if os.environ.get("DIE_AT_GATE") == "all":
        for child in children("self"):
            os.kill(child, signal.SIGKILL)
    if os.environ.get("DIE_AT_GATE"):
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        lost.append(conn.recv(100, socket.MSG_DONTWAIT).decode() or "eof")
    except BlockingIOError:
        pass
try:
    ended = _supervise.run(argv, {**os.environ, "HARNESS": "yes"}, fd, [], process_events,
                           lambda: lost[0] if lost else None, lambda: False, kill_after=kill_after)
except errors.LeaseLost as e:
    print("LOST", e, file=sys.stderr, flush=True)
    sys.exit(79)
except _supervise.ExecError as e:
    print("OSERROR", e.errno, file=sys.stderr, flush=True)
    sys.exit(127)
sys.exit(ended.status)
"""


class Supervised:
    """A supervisor process running CMD, and the stand-in daemon's end of its connection."""

    def __init__(self, cmd: list[str], *, kill_after: float = 5.0, **popen) -> None:
        self.daemon_end, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HARNESS, str(theirs.fileno()), str(kill_after), *cmd],
            pass_fds=[theirs.fileno()],
            stderr=subprocess.PIPE,
            **popen,
        )
        theirs.close()

    def wait(self) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        finally:
            self.daemon_end.close()
        return self.proc.returncode, err.decode()

    def lose_lease(self) -> None:
        self.daemon_end.send(b"forced")

    def wait_for_close(self) -> None:
        """Until the supervisor side of the connection is closed in every process."""
        self.daemon_end.settimeout(TIMEOUT)
        assert self.daemon_end.recv(100) == b""


def wait_for_file(path: Path) -> str:
    """What `path` holds once it is written: it exists and ends with a newline."""

    def written() -> str | None:
        text = path.read_text() if path.exists() else ""
        return text if text.endswith("\n") else None

    return wait_until(written, f"{path} written")


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (a zombie runs no code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_pid(pid: int) -> int:
    """The wait status of child `pid`, once it has exited."""

    def reaped() -> tuple[int, int] | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return (done, status) if done else None

    return wait_until(reaped, f"child {pid} exited")[1]


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 128 + 9), ("kill -TERM $$", 128 + 15)],
)
def test_exit_status_is_cmds_own(script: str, status: int) -> None:
    assert Supervised(["sh", "-c", script]).wait()[0] == status


def test_cmd_gets_the_environment_and_inherits_stdout() -> None:
    run = Supervised(["sh", "-c", 'echo "$HARNESS"'], stdout=subprocess.PIPE)
    out = run.proc.stdout.read()
    assert run.wait()[0] == 0
    assert out == b"yes\n"


def test_missing_command_is_an_oserror_and_never_runs() -> None:
    status, err = Supervised(["/nonexistent/cmd"]).wait()
    assert (status, err.split()) == (127, ["OSERROR", "2"])


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2]
)
def test_signals_are_forwarded_and_the_lease_kept_until_cmd_exits(tmp_path: Path, sig: signal.Signals) -> None:
    got, go = tmp_path / "got", tmp_path / "go"
    # CMD notes the signal, then finishes only when the test says: the supervisor must wait.
    cleanup = f"echo {sig.name} > {got}; while [ ! -e {go} ]; do sleep 0.02; done; exit 7"
    script = f"trap '{cleanup}' {sig.name[3:]}; echo > {got}.ready; while :; do sleep 0.05; done"
    # A shell cannot trap a signal ignored when it started, and a test run in the background
    # (`.ci/run &`) inherits SIGINT and SIGQUIT ignored: CMD must start with `sig` at its
    # default, as it does under an interactive caller.
    run = Supervised(["sh", "-c", script], preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    wait_for_file(tmp_path / "got.ready")
    run.proc.send_signal(sig)
    assert wait_for_file(got) == f"{sig.name}\n"
    assert run.proc.poll() is None
    go.touch()
    assert run.wait()[0] == 7


def test_a_signal_ignored_by_the_caller_stays_ignored(tmp_path: Path) -> None:
    script = f"echo > {tmp_path}/ready; sleep 0.3; kill -HUP $$; echo alive"
    run = Supervised(["sh", "-c", script], stdout=subprocess.PIPE, env={**os.environ, "IGNORE_HUP": "1"})
    wait_for_file(tmp_path / "ready")
    run.proc.send_signal(signal.SIGHUP)  # neither kills lockctl nor is passed on
    out = run.proc.stdout.read()
    assert run.wait()[0] == 0
    assert out == b"alive\n"


def test_lost_lease_terminates_the_whole_group(tmp_path: Path) -> None:
    script = f"sleep 60 & echo $! > {tmp_path}/gc; wait"
    run = Supervised(["sh", "-c", script])
    grandchild = int(wait_for_file(tmp_path / "gc"))
    run.lose_lease()
    status, err = run.wait()
    assert status == 79
    assert "LOST forced; CMD was terminated" in err
    assert not alive(grandchild)


def test_lost_lease_kills_a_cmd_that_ignores_sigterm(tmp_path: Path) -> None:
    script = f"trap '' TERM; echo > {tmp_path}/ready; while :; do sleep 0.05; done"
    run = Supervised(["sh", "-c", script], kill_after=0.3)
    wait_for_file(tmp_path / "ready")
    run.lose_lease()
    assert run.wait()[0] == 79


def test_lease_lost_before_cmd_starts_means_cmd_never_runs(tmp_path: Path) -> None:
    daemon_end, theirs = socket.socketpair()
    with daemon_end, theirs:
        daemon_end.send(b"gone already")
        proc = subprocess.run(
            [sys.executable, "-c", HARNESS, str(theirs.fileno()), "1", "touch", str(tmp_path / "ran")],
            pass_fds=[theirs.fileno()],
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert proc.returncode == 79
    assert b"CMD was not started" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_sigkilled_supervisor_terminates_cmd_tree_before_the_connection_closes(tmp_path: Path) -> None:
    script = f"echo $$ > {tmp_path}/sh; sleep 60 & echo $! > {tmp_path}/gc; wait"
    run = Supervised(["sh", "-c", script])
    shell = int(wait_for_file(tmp_path / "sh"))
    grandchild = int(wait_for_file(tmp_path / "gc"))
    run.proc.kill()
    run.wait_for_close()
    # The guardian let go of the connection: by then nothing of CMD may still run.
    assert not alive(shell)
    assert not alive(grandchild)
    _, err = run.wait()
    assert "ended without releasing its lease" in err


def test_sigkilled_supervisor_at_the_gate_lets_the_lease_go_and_cmd_never_runs(tmp_path: Path) -> None:
    """A lockctl SIGKILLed after the grant, while CMD's child waits at the gate: the guardian
    must still see lockctl's EOF (the child keeps no copy of lockctl's end of the orders
    pipe), terminate the tree and let the lease go; CMD never runs."""
    ran = tmp_path / "ran"
    run = Supervised(["touch", str(ran)], env={**os.environ, "DIE_AT_GATE": "1"})
    run.wait_for_close()
    status, err = run.wait()
    assert status == -signal.SIGKILL
    assert "ended without releasing its lease" in err
    assert not ran.exists()


def test_cmd_killed_at_the_gate_is_reported_as_killed(tmp_path: Path) -> None:
    """Its child gone before the gate opens, lockctl finds no reader on the gate (once the
    guardian has closed its copy), and must report CMD's death, not fail on the pipe."""
    ran = tmp_path / "ran"
    status, err = Supervised(["touch", str(ran)], env={**os.environ, "KILL_CMD_AT_GATE": "1"}).wait()
    assert (status, err) == (128 + signal.SIGKILL, "")
    assert not ran.exists()


def test_sigkilled_supervisor_and_guardian_at_the_gate_leave_cmd_nothing_to_wait_for(tmp_path: Path) -> None:
    """Both killed while CMD's child waits at the gate: it sees the gate close (it keeps no
    copy of the gate's write end) and exits without running CMD."""
    ran = tmp_path / "ran"
    run = Supervised(["touch", str(ran)], env={**os.environ, "DIE_AT_GATE": "all"})
    run.wait_for_close()
    assert run.wait()[0] == -signal.SIGKILL  # once the child, which has its stderr, is gone
    assert not ran.exists()


def test_sigkill_of_the_supervisors_whole_process_group_spares_the_guardian(tmp_path: Path) -> None:
    """What kills a job (kill -9 %1, timeout(1) killing its group) must not reach the guardian."""
    script = f"echo $$ > {tmp_path}/sh; sleep 60 & echo $! > {tmp_path}/gc; wait"
    run = Supervised(["sh", "-c", script], process_group=0)
    shell = int(wait_for_file(tmp_path / "sh"))
    grandchild = int(wait_for_file(tmp_path / "gc"))
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.wait_for_close()
    assert not alive(shell)
    assert not alive(grandchild)
    run.wait()


def test_the_guardian_is_named_apart_from_lockctl(tmp_path: Path) -> None:
    """So that `pkill lockctl` or `pkill -f 'lockctl acquire'` cannot kill it by accident."""
    run = Supervised(["sh", "-c", f"echo $$ > {tmp_path}/sh; exec sleep 60"])
    try:
        guardian = parent_of(int(wait_for_file(tmp_path / "sh")))
        assert guardian != run.proc.pid
        assert Path(f"/proc/{guardian}/comm").read_text() == "lockd-guardian\n"
        assert Path(f"/proc/{guardian}/cmdline").read_bytes().rstrip(b"\0") == b"lockd-guardian"
        assert os.getpgid(guardian) not in (os.getpgid(run.proc.pid), os.getpgid(os.getpid()))
    finally:
        run.lose_lease()
        run.wait()


def test_lost_lease_terminates_processes_that_left_cmds_group_and_session(tmp_path: Path) -> None:
    # setsid: its own session and group, as timeout(1), sudo and `set -m` shells do; the
    # subshell exits at once, so the second one is orphaned too (a double fork).
    script = (
        f"setsid sleep 60 & echo $! > {tmp_path}/own; "
        f"(setsid sleep 60 & echo $! > {tmp_path}/orphan); wait"
    )
    run = Supervised(["sh", "-c", script], kill_after=1)
    escaped = [int(wait_for_file(tmp_path / "own")), int(wait_for_file(tmp_path / "orphan"))]
    run.lose_lease()
    run.wait_for_close()
    assert [pid for pid in escaped if alive(pid)] == []
    status, err = run.wait()
    assert status == 79
    assert "CMD was terminated" in err


def test_a_cmd_that_may_not_be_signalled_is_waited_for(tmp_path: Path) -> None:
    """CMD runs as another user (as through sudo): no signal reaches it, and the lease is held
    until it has exited by itself."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run CMD as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    daemon_end, theirs = socket.socketpair()
    # Without CAP_KILL, root may signal only its own processes, as any other user.
    proc = subprocess.Popen(
        ["setpriv", "--bounding-set=-kill", "--inh-caps=-kill",
         sys.executable, "-c", HARNESS, str(theirs.fileno()), "0.2",
         *as_nobody, "sh", "-c", "echo $$; sleep 1.5"],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    with daemon_end:
        cmd = int(proc.stdout.readline())
        daemon_end.send(b"forced")
        daemon_end.settimeout(TIMEOUT)
        assert daemon_end.recv(100) == b""
        assert not alive(cmd)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 79, err
    assert b"not allowed to signal process" in err


# CMD's main thread exits while another runs on, ignoring SIGTERM: /proc shows the process
# as a zombie, yet it runs.
MAIN_THREAD_EXITS = """
import ctypes, os, signal, sys, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
threading.Thread(target=lambda: time.sleep(60)).start()
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()}\\n")
ctypes.CDLL(None).syscall(60, 0)  # exit(2), which ends the calling thread only
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the syscall number is x86_64's")
def test_a_process_whose_main_thread_exited_is_killed_before_the_lease_goes(tmp_path: Path) -> None:
    run = Supervised([sys.executable, "-c", MAIN_THREAD_EXITS, str(tmp_path / "pid")], kill_after=0.3)
    cmd = int(wait_for_file(tmp_path / "pid"))
    # Its main thread has exited once /proc shows it as a zombie.
    wait_until(lambda: Path(f"/proc/{cmd}/stat").read_text().split(") ")[1][0] == "Z", "a zombie")
    run.lose_lease()
    run.wait_for_close()
    assert not Path(f"/proc/{cmd}").exists()  # reaped: every thread is gone
    assert run.wait()[0] == 79


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def test_cmd_and_its_daemonised_grandchild_do_not_hold_the_connection(tmp_path: Path) -> None:
    # setsid: the grandchild leaves CMD's process group, as a daemon does.
    script = f"setsid sleep 60 > /dev/null 2>&1 < /dev/null & echo $! > {tmp_path}/gc"
    run = Supervised(["sh", "-c", script])
    grandchild = int(wait_for_file(tmp_path / "gc"))
    try:
        assert run.proc.wait(TIMEOUT) == 0
        run.wait_for_close()
        assert alive(grandchild)
    finally:
        kill_quietly(grandchild)
        run.wait()


def test_interactive_cmd_reads_the_terminal(tmp_path: Path) -> None:
    """On a terminal, CMD becomes the foreground job: it can read it instead of stopping."""
    daemon_end, theirs = socket.socketpair()
    argv = [sys.executable, "-c", HARNESS, str(theirs.fileno()), "1", "sh", "-c", "read line; echo got:$line"]
    os.set_inheritable(theirs.fileno(), True)
    pid, master = pty.fork()
    if pid == 0:  # the child is a session leader with the pty as its controlling terminal
        os.execv(sys.executable, argv)
    theirs.close()
    try:
        os.write(master, b"hello\n")
        output = read_terminal(master, until=b"got:hello")
        status = wait_pid(pid)
    finally:
        kill_quietly(pid)  # only matters if it hung
        os.close(master)
        daemon_end.close()
    assert b"got:hello" in output
    assert status is not None and os.waitstatus_to_exitcode(status) == 0


def read_terminal(master: int, until: bytes) -> bytes:
    """What appears on the pty `master` until `until` does, the terminal closes, or TIMEOUT."""
    output = b""
    deadline = time.monotonic() + TIMEOUT
    while until not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([master], [], [], remaining)[0]:
            break
        try:
            output += os.read(master, 1024)
        except OSError:
            break  # EIO: every process on the terminal has closed it
    return output


def test_group_alive_ignores_zombies() -> None:
    child = subprocess.Popen(["sleep", "60"], process_group=0)
    try:
        assert _proctree.group_alive(child.pid)
        child.kill()  # a zombie until reaped below: must already count as gone
        wait_until(lambda: not _proctree.group_alive(child.pid), "the group counted as gone")
    finally:
        child.kill()
        child.wait(TIMEOUT)
    assert not _proctree.group_alive(child.pid)
