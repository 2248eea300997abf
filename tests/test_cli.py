"""lockctl against a real daemon: real processes, real signals, real flock(1)."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lockd_client import cli

from .conftest import Daemon
from .flock_tools import can_flock
from .test_cli_supervise import TIMEOUT, alive, read_terminal, wait_for_file, wait_pid
from .waiting import wait_until

LOCKCTL = [sys.executable, "-m", "lockd_client.cli"]
LOCKCTL_SH = " ".join(LOCKCTL)  # for command lines run by sh


def lockctl(daemon, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKCTL, *args], env=daemon.env, capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )


def shell(daemon, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` with sh, as a shell script using lockctl would run."""
    return subprocess.run(
        ["sh", "-c", script], env=daemon.env, capture_output=True, text=True, timeout=TIMEOUT
    )


def start_lockctl(daemon, *args: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LOCKCTL, *args], env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Exit status and stderr of a started lockctl."""
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def status(daemon, *names: str) -> dict[str, dict]:
    proc = lockctl(daemon, "status", "--json", *names)
    assert proc.returncode in (0, 1), proc.stderr
    return {lock["name"]: lock for lock in json.loads(proc.stdout)["locks"]}


def held(daemon, name: str) -> bool:
    return bool(status(daemon, name).get(name, {}).get("holders"))


def kill_quietly(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


# --- acquire -- CMD ------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "expected"), [("exit 0", 0), ("exit 3", 3), ("kill -USR1 $$", 128 + 10)])
def test_exit_status_of_cmd_passes_through(lockd, name: str, script: str, expected: int) -> None:
    assert lockctl(lockd, "acquire", name, "--", "sh", "-c", script).returncode == expected
    assert not held(lockd, name)


def test_cmd_sees_fencing_tokens_and_the_lock_is_held_while_it_runs(lockd, name: str) -> None:
    script = f'echo "$LOCKD_TOKEN|$LOCKD_TOKENS"; {LOCKCTL_SH} status --json'
    first = lockctl(lockd, "acquire", f"{name}.a", f"{name}.b", "-c", script)
    second = lockctl(lockd, "acquire", f"{name}.a", f"{name}.b", "-c", script)
    assert first.returncode == second.returncode == 0, first.stderr
    token_line, status_line = first.stdout.splitlines()
    token, tokens = token_line.split("|")
    a, b = (int(pair.split("=")[1]) for pair in tokens.split())
    assert tokens.startswith(f"{name}.a=") and f" {name}.b=" in tokens and int(token) == a
    assert int(second.stdout.split("|")[0]) > a
    holders = {lock["name"]: lock["holders"] for lock in json.loads(status_line)["locks"]}
    assert [h["token"] for h in holders[f"{name}.a"]] == [a] and [h["token"] for h in holders[f"{name}.b"]] == [b]


def test_command_not_found(lockd, name: str) -> None:
    proc = lockctl(lockd, "acquire", name, "--", "/nonexistent/program")
    assert proc.returncode == cli.EXIT_NOT_FOUND
    assert "/nonexistent/program" in proc.stderr


def test_signal_is_forwarded_and_the_lease_kept_until_cmd_exits(lockd, name: str, tmp_path: Path) -> None:
    got, go = tmp_path / "got", tmp_path / "go"
    # CMD notes the signal, then "cleans up" until the test lets it finish.
    cleanup = f"echo TERM > {got}; while [ ! -e {go} ]; do sleep 0.02; done; exit 7"
    script = f"trap '{cleanup}' TERM; echo > {got}.ready; while :; do sleep 0.05; done"
    proc = start_lockctl(lockd, "acquire", name, "-c", script)
    try:
        wait_for_file(tmp_path / "got.ready")
        proc.send_signal(signal.SIGTERM)
        wait_for_file(got)
        assert held(lockd, name)  # CMD is still cleaning up: the lease must not be gone
        assert proc.poll() is None
        go.touch()
        assert finish(proc)[0] == 7
    finally:
        kill_quietly(proc)
    assert not held(lockd, name)


def test_sigkill_of_lockctl_terminates_cmd_tree_before_the_lock_is_free(lockd, name: str, tmp_path: Path) -> None:
    script = f"echo $$ > {tmp_path}/sh; sleep 60 & echo $! > {tmp_path}/gc; wait"
    proc = start_lockctl(lockd, "acquire", name, "-c", script)
    try:
        shell = int(wait_for_file(tmp_path / "sh"))
        grandchild = int(wait_for_file(tmp_path / "gc"))
        proc.kill()
        wait_until(lambda: not held(lockd, name), "lock freed")
        # The moment the lock is free, nothing of CMD may still run.
        assert not alive(shell)
        assert not alive(grandchild)
    finally:
        kill_quietly(proc)


def test_sigkill_of_lockctls_whole_job_terminates_cmd_tree_before_the_lock_is_free(
    lockd, name: str, tmp_path: Path
) -> None:
    """As `kill -9 %1` or `timeout -k` do: the guardian is not part of the job."""
    script = f"echo $$ > {tmp_path}/sh; trap 'sleep 0.5; exit' TERM; while :; do sleep 0.05; done"
    proc = start_lockctl(lockd, "acquire", name, "-c", script, process_group=0)
    try:
        shell = int(wait_for_file(tmp_path / "sh"))
        os.killpg(proc.pid, signal.SIGKILL)
        wait_until(lambda: not held(lockd, name), "lock freed")
        assert not alive(shell)  # it took a while to clean up, with the lock still held
    finally:
        kill_quietly(proc)


def test_forced_release_terminates_the_holders_cmd(lockd, name: str, tmp_path: Path) -> None:
    proc = start_lockctl(lockd, "acquire", name, "--kill-after", "1", "-c", f"echo > {tmp_path}/ready; sleep 60")
    try:
        wait_for_file(tmp_path / "ready")
        forced = lockctl(lockd, "release", "--force", name)
        assert forced.returncode == 0, forced.stderr
        code, err = finish(proc)
    finally:
        kill_quietly(proc)
    assert code == cli.EXIT_LOST
    assert "lost" in err
    assert not held(lockd, name)


def test_force_release_of_a_free_lock_fails(lockd, name: str) -> None:
    proc = lockctl(lockd, "release", "--force", f"{name}.free")
    assert proc.returncode == 1
    assert "not held" in proc.stderr


def test_daemonising_grandchild_does_not_keep_the_lock(lockd, name: str, tmp_path: Path) -> None:
    script = f"setsid sleep 60 > /dev/null 2>&1 < /dev/null & echo $! > {tmp_path}/gc"
    proc = lockctl(lockd, "acquire", name, "-c", script)
    grandchild = int(wait_for_file(tmp_path / "gc"))
    try:
        assert proc.returncode == 0, proc.stderr
        assert alive(grandchild)
        assert not held(lockd, name)
    finally:
        os.kill(grandchild, signal.SIGKILL)


class OnTerminal:
    """`program` run with `argv` and `env` on a new pseudo-terminal, as its session leader;
    `master` is the terminal's other end. Killed on leaving the block unless `wait`ed for."""

    def __init__(self, program: str, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:
            os.execvpe(program, argv, env)
        self.status: int | None = None

    def wait(self) -> int:
        """Its wait status, once it has exited."""
        self.status = wait_pid(self.pid)
        return self.status

    def __enter__(self) -> OnTerminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.status is None:  # it hung, or the test failed
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.master)


def test_ctrl_z_stops_lockctl_with_cmd_and_fg_continues_both(lockd, name: str) -> None:
    """Under an interactive shell's job control, lockctl and CMD behave as one job."""
    with OnTerminal("bash", ["bash", "--norc", "--noprofile", "-i"], {**lockd.env, "PS1": "$ "}) as bash:
        master = bash.master
        os.write(master, f"{LOCKCTL_SH} acquire {name} -- sh -c 'read l; echo finished:$l'\n".encode())
        wait_until(lambda: held(lockd, name), "CMD running")
        os.write(master, b"\x1a")  # Ctrl-Z
        assert b"Stopped" in read_terminal(master, until=b"Stopped")
        assert held(lockd, name)
        os.write(master, b"fg\ngo\n")
        assert b"finished:go" in read_terminal(master, until=b"finished:go")
        os.write(master, b"echo status=$?; exit\n")
        assert b"status=0" in read_terminal(master, until=b"status=0")
        bash.wait()
    assert not held(lockd, name)


# --- busy, timeout, errors -----------------------------------------------------------------


@pytest.fixture
def holder(lockd, name: str, tmp_path: Path):
    """A lockctl holding `name` exclusively around `sleep 60`, until the test ends."""
    proc = start_lockctl(lockd, "acquire", name, "-c", f"echo > {tmp_path}/held; exec sleep 60")
    wait_for_file(tmp_path / "held")
    yield proc
    kill_quietly(proc)


def test_busy_names_the_holder(lockd, name: str, holder) -> None:
    proc = lockctl(lockd, "acquire", "-n", name, "--", "true")
    assert proc.returncode == cli.EXIT_BUSY == 75
    assert f"pid {holder.pid}" in proc.stderr
    assert "sleep 60" in proc.stderr  # the holder's command line
    assert " for " in proc.stderr


def test_timeout_names_the_holder(lockd, name: str, holder) -> None:
    proc = lockctl(lockd, "acquire", "-w", "0.2", name, "--", "true")
    assert proc.returncode == cli.EXIT_BUSY
    assert f"gave up waiting for {name} after 0.2s" in proc.stderr
    assert f"pid {holder.pid}" in proc.stderr


def test_busy_though_free_names_the_earlier_requests(lockd, name: str, holder) -> None:
    """Nobody holds `.a`, but a request for `.a` and the held name came first: it goes first."""
    first = start_lockctl(lockd, "acquire", f"{name}.a", name, "--", "true")
    try:
        wait_until(lambda: status(lockd, f"{name}.a").get(f"{name}.a"), "first request queued")
        proc = lockctl(lockd, "acquire", "-n", f"{name}.a", "--", "true")
    finally:
        kill_quietly(first)
    assert proc.returncode == cli.EXIT_BUSY
    assert f"nobody holds {name}.a, but earlier requests wait for it first" in proc.stderr
    assert f"waiting: pid {first.pid} " in proc.stderr


def test_busy_behind_a_waiting_writer_names_the_shared_holders_and_the_writer(lockd, name: str, tmp_path: Path) -> None:
    """Two readers hold, a writer waits for them: a reader that may not wait is refused, and
    is told who holds and that the writer goes first."""
    readers = [start_lockctl(lockd, "acquire", "-s", name, "-c", f"echo > {tmp_path}/r{i}; exec sleep 60")
               for i in range(2)]
    writer = None
    try:
        for i in range(2):
            wait_for_file(tmp_path / f"r{i}")
        writer = start_lockctl(lockd, "acquire", name, "--", "true")
        wait_until(lambda: status(lockd, name)[name]["waiters"], "the writer queued")
        proc = lockctl(lockd, "acquire", "-s", "-n", name, "--", "true")
    finally:
        kill_quietly(*readers, *([writer] if writer else []))
    assert proc.returncode == cli.EXIT_BUSY
    lines = proc.stderr.splitlines()
    assert lines[0] == f"lockctl: {name}: busy, and -n says not to wait"
    assert all(any(line.startswith(f"  held by pid {r.pid} ") for line in lines[1:3]) for r in readers), lines
    assert lines[3] == f"  they would share {name}, but earlier requests wait for it first:"
    assert lines[4].startswith(f"  waiting: pid {writer.pid} ") and lines[4].endswith("(exclusive)")
    assert "nobody holds" not in proc.stderr


@pytest.mark.parametrize("flags", [["-n"], ["-w", "0.1"], ["-w", "0"]])
def test_conflict_exit_code(lockd, name: str, holder, flags: list[str]) -> None:
    assert lockctl(lockd, "acquire", *flags, "-E", "3", name, "--", "true").returncode == 3


def test_waiters_get_the_lock_when_the_holder_is_done_and_only_v_says_so(lockd, name: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    until_go = f"while [ ! -e {go} ]; do sleep 0.02; done"
    first = start_lockctl(lockd, "acquire", name, "-c", f"echo > {tmp_path}/held; {until_go}")
    quiet = verbose = None
    try:
        wait_for_file(tmp_path / "held")
        quiet = start_lockctl(lockd, "acquire", "-s", name, "--", "true")
        verbose = start_lockctl(lockd, "acquire", "-s", "-v", name, "--", "true")
        wait_until(lambda: len(status(lockd, name)[name]["waiters"]) == 2, "both waiting")
        go.touch()
        assert finish(first)[0] == 0
        assert finish(quiet) == (0, "")  # off a terminal, waiting is silent
        code, err = finish(verbose)
        assert code == 0
        assert f"waiting for {name}: held by pid {first.pid}" in err
    finally:
        kill_quietly(*(p for p in (first, quiet, verbose) if p is not None))


def test_waiting_on_a_terminal_shows_one_updating_line(lockd, name: str, holder) -> None:
    with OnTerminal(sys.executable, [*LOCKCTL, "acquire", name, "--", "true"], lockd.env) as waiter:
        line = f"\rlockctl: waiting for {name}: held by pid {holder.pid}".encode()
        output = read_terminal(waiter.master, until=line)
        holder.kill()  # its lease ends: the waiter gets the lock, runs CMD and exits
        output += read_terminal(waiter.master, until=b"never printed")
        status = waiter.wait()
    assert line in output
    assert output.endswith(b"\r\x1b[K")  # the line is cleared once the lock is granted
    assert os.waitstatus_to_exitcode(status) == 0


def test_daemon_not_running_names_the_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    proc = subprocess.run(
        [*LOCKCTL, "acquire", "--socket", sock, "x", "--", "touch", str(tmp_path / "ran")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == cli.EXIT_UNAVAILABLE == 69
    assert sock in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_daemon_gone_while_waiting_means_69_and_cmd_never_runs(daemon, tmp_path: Path) -> None:
    holder = start_lockctl(daemon, "acquire", "x", "-c", f"echo > {tmp_path}/held; exec sleep 60")
    wait_for_file(tmp_path / "held")
    waiter = start_lockctl(daemon, "acquire", "x", "--", "touch", str(tmp_path / "ran"))
    try:
        wait_until(lambda: status(daemon, "x")["x"]["waiters"], "waiter queued")
        daemon.kill()
        code, err = finish(waiter)
    finally:
        kill_quietly(waiter, holder)
    assert code == cli.EXIT_UNAVAILABLE
    assert daemon.socket in err
    assert "went away before the lock was granted" in err
    assert not (tmp_path / "ran").exists()


def test_a_live_daemon_whose_backend_is_down_is_69_with_its_own_message(short_tmp: Path, tmp_path: Path) -> None:
    # Port 1: nothing listens there, so every etcd request fails at once.
    daemon = Daemon(short_tmp, "--backend", "etcd", "--etcd-endpoints", "http://127.0.0.1:1")
    daemon.start()
    try:
        proc = lockctl(daemon, "acquire", "a", "b", "--", "touch", str(tmp_path / "ran"))
        assert daemon.proc is not None and daemon.proc.poll() is None  # still there
    finally:
        daemon.kill()
    assert proc.returncode == cli.EXIT_UNAVAILABLE
    assert "went away" not in proc.stderr
    assert "lockd cannot grant a, b now: " in proc.stderr
    assert "etcd" in proc.stderr and "CMD was not started" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_refused_by_policy_is_77_and_cmd_never_runs(short_tmp: Path, tmp_path: Path) -> None:
    config = short_tmp / "lockd.toml"
    config.write_text('[[policy.rules]]\nnames = "secret*"\nallow = false\n')
    daemon = Daemon(short_tmp, "--config", str(config))
    daemon.start()
    try:
        proc = lockctl(daemon, "acquire", "secret", "--", "touch", str(tmp_path / "ran"))
    finally:
        daemon.kill()
    assert proc.returncode == cli.EXIT_DENIED == 77
    assert "refused" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_invalid_name_is_64_without_a_daemon(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*LOCKCTL, "acquire", "--socket", str(tmp_path / "none.sock"), "../x", "--", "true"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == cli.EXIT_USAGE == 64
    assert "starting with a letter or digit" in proc.stderr


def test_lock_held_by_flock_is_busy_and_shown_as_outside(lockd, name: str, tmp_path: Path) -> None:
    outside = subprocess.Popen(
        ["flock", str(lockd.lock_dir / f"{name}.lock"), "-c", f"echo > {tmp_path}/held; exec sleep 60"],
        process_group=0,  # flock(1) forks: its child must go too
    )
    try:
        wait_for_file(tmp_path / "held")
        proc = lockctl(lockd, "acquire", "-n", name, "--", "true")
        assert proc.returncode == cli.EXIT_BUSY
        assert "outside lockd" in proc.stderr
        shown = lockctl(lockd, "status", name)
        assert shown.returncode == 1 and "outside lockd" in shown.stdout
    finally:
        os.killpg(outside.pid, signal.SIGKILL)
        outside.wait(TIMEOUT)


def test_lease_excludes_flock_on_the_same_file(lockd, name: str, holder) -> None:
    assert not can_flock(lockd.lock_dir / f"{name}.lock")


# --- process-tied leases -------------------------------------------------------------------


def test_process_tied_lease_ends_with_the_shell(lockd, name: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        f"{LOCKCTL_SH} acquire {name} > {tmp_path}/token && echo $$ > {tmp_path}/sh && "
        f"while [ ! -e {go} ]; do sleep 0.02; done"
    )
    shell = subprocess.Popen(["sh", "-c", script], env=lockd.env)
    try:
        shell_pid = int(wait_for_file(tmp_path / "sh"))
        [tied] = status(lockd, name)[name]["holders"]
        assert tied["pid"] == shell_pid
        assert tied["token"] == int(wait_for_file(tmp_path / "token"))
        go.touch()
        assert shell.wait(TIMEOUT) == 0
        wait_until(lambda: not held(lockd, name), "lease ended with its shell")
    finally:
        shell.kill()
        shell.wait(TIMEOUT)


def test_release_as_the_last_command_of_a_shell_that_execs_it(lockd, name: str) -> None:
    """bash runs the last command of `-c` by exec: that lockctl is the shell holding the lease."""
    script = f"{LOCKCTL_SH} acquire {name} >/dev/null && echo $$ && exec {LOCKCTL_SH} release {name}"
    proc = subprocess.run(["bash", "-c", script], env=lockd.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert not held(lockd, name)


def test_release_of_a_process_tied_lease(lockd, name: str) -> None:
    script = (
        f"{LOCKCTL_SH} acquire {name} >/dev/null && {LOCKCTL_SH} acquire {name}.a >/dev/null && "
        f"{LOCKCTL_SH} release {name} && {LOCKCTL_SH} status --json {name} {name}.a"
    )
    proc = shell(lockd, script)
    assert proc.returncode == 1, proc.stderr  # a is still held
    assert [lock["name"] for lock in json.loads(proc.stdout)["locks"]] == [f"{name}.a"]


def test_releasing_one_name_of_a_lease_ends_the_whole_lease(lockd, name: str) -> None:
    script = (
        f"{LOCKCTL_SH} acquire {name} {name}.a >/dev/null && {LOCKCTL_SH} release {name} && "
        f"{LOCKCTL_SH} status --json {name} {name}.a"
    )
    proc = shell(lockd, script)
    assert proc.returncode == 0, proc.stderr  # both free
    assert json.loads(proc.stdout)["locks"] == []


def test_release_with_pid_and_of_what_is_not_held(lockd, name: str) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert lockctl(lockd, "acquire", "--pid", str(sleeper.pid), name).returncode == 0
        assert status(lockd, name)[name]["holders"][0]["pid"] == sleeper.pid
        assert lockctl(lockd, "release", "--pid", str(sleeper.pid), name).returncode == 0
        assert not held(lockd, name)
        again = lockctl(lockd, "release", "--pid", str(sleeper.pid), name)
        assert again.returncode == 1
        assert name in again.stderr
    finally:
        sleeper.kill()
        sleeper.wait(TIMEOUT)


# --- status --------------------------------------------------------------------------------


def test_status_json_schema(lockd, name: str, holder, tmp_path: Path) -> None:
    waiter = start_lockctl(lockd, "acquire", "-s", name, "--", "true")
    try:
        wait_until(lambda: status(lockd, name)[name]["waiters"], "waiter queued")
        proc = lockctl(lockd, "status", "--json")
        assert proc.returncode == 0
        doc = json.loads(proc.stdout)
        [lock] = doc["locks"]  # only what is held or waited on
        assert lock["name"] == name and lock["mode"] == "exclusive"
        [h] = lock["holders"]
        assert h["pid"] == holder.pid and isinstance(h["uid"], int) and isinstance(h["token"], int)
        assert "sleep 60" in h["command"] and abs(h["since"] - time.time()) < 60
        [w] = lock["waiters"]
        assert w["pid"] == waiter.pid and w["mode"] == "shared" and isinstance(w["uid"], int)
        assert isinstance(w["since"], float)
    finally:
        kill_quietly(waiter)


def test_status_says_when_nothing_is_held(daemon) -> None:
    proc = lockctl(daemon, "status")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "no lock is held or waited on\n", "")
    proc = lockctl(daemon, "status", "a", "b", "a")
    assert (proc.returncode, proc.stdout) == (0, "free: a, b\n")
    assert lockctl(daemon, "status", "--json").stdout == '{"locks":[]}\n'


def test_plain_status_shows_lock_files_held_outside_lockd(lockd, name: str, tmp_path: Path) -> None:
    """Nobody asked lockd for `name`: only the host's lock list knows a process flocks its file."""
    outside = subprocess.Popen(
        ["flock", "-s", str(lockd.lock_dir / f"{name}.lock"), "-c", f"echo > {tmp_path}/held; exec sleep 60"],
        process_group=0,
    )
    try:
        wait_for_file(tmp_path / "held")
        (lockd.lock_dir / f"{name}.other.lock").touch()  # a lock file nobody holds is not shown
        shown = lockctl(lockd, "status")
        assert shown.returncode == 0
        [row] = [line for line in shown.stdout.splitlines() if line.startswith(f"{name} ")]
        assert row.split()[:4] == [name, "shared", "(outside", "lockd)"]
        assert f"{name}.other" not in shown.stdout
        locks = json.loads(lockctl(lockd, "status", "--json").stdout)["locks"]
        [lock] = [lock for lock in locks if lock["name"] == name]
        assert lock["holders"][0]["outside"] and lock["holders"][0]["command"].startswith("flock -s ")
    finally:
        os.killpg(outside.pid, signal.SIGKILL)
        outside.wait(TIMEOUT)


def test_status_exit_code_says_whether_names_are_free(lockd, name: str, holder) -> None:
    assert lockctl(lockd, "status", f"{name}.free").returncode == 0
    assert lockctl(lockd, "status", f"{name}.free", name).returncode == 1
    assert lockctl(lockd, "status", "--json", f"{name}.free").stdout.strip() == '{"locks":[]}'
    table = lockctl(lockd, "status").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "MODE"] and table[1].split()[:3] == [name, "exclusive", str(holder.pid)]


def test_labels_and_commands_reach_the_terminal_inert(lockd, name: str, tmp_path: Path) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J\u202eevil"
    proc = start_lockctl(lockd, "acquire", "--label", hostile, name, "-c", f"echo > {tmp_path}/held; exec sleep 60")
    try:
        wait_for_file(tmp_path / "held")
        busy = lockctl(lockd, "acquire", "-n", name, "--", "true")
        table = lockctl(lockd, "status", name)
    finally:
        kill_quietly(proc)
    assert busy.returncode == cli.EXIT_BUSY
    assert "[?]0;owned??[2J?evil]" in busy.stderr  # the holder, with its label made inert
    assert "[?]0;owned??[2J?evil]" in table.stdout
    for text in (busy.stderr, table.stdout):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text


# --- a lock held for the very process asking -------------------------------------------------


def test_a_cmd_taking_the_lock_its_lockctl_holds_is_refused_at_once(lockd, name: str) -> None:
    inner = f"{LOCKCTL_SH} acquire {name} -- true"
    proc = lockctl(lockd, "acquire", name, "-c", inner)
    assert proc.returncode == cli.EXIT_DEADLOCK == 80, proc.stderr
    assert "held by the lockctl that runs this command" in proc.stderr
    other = f"{LOCKCTL_SH} acquire {name}.other -- true"  # another name is fine
    assert lockctl(lockd, "acquire", name, "-c", other).returncode == 0


def test_a_script_taking_its_own_lease_twice_is_refused_at_once(lockd, name: str) -> None:
    script = f"{LOCKCTL_SH} acquire {name} >/dev/null && {LOCKCTL_SH} acquire {name}; echo $?"
    proc = shell(lockd, script)
    assert proc.stdout.split() == ["80"], proc.stderr
    assert "already holds" in proc.stderr and "lockctl release" in proc.stderr


def test_a_lease_taken_through_a_launcher_is_tied_to_the_launchers_caller(lockd, name: str, tmp_path: Path) -> None:
    """`timeout 60 lockctl acquire x` (like `uv run lockctl …`): the launcher exits with lockctl."""
    go = tmp_path / "go"
    script = (
        f"timeout 60 {LOCKCTL_SH} acquire {name} >/dev/null && echo $$ > {tmp_path}/sh && "
        f"while [ ! -e {go} ]; do sleep 0.02; done && timeout 60 {LOCKCTL_SH} release {name}"
    )
    shell = subprocess.Popen(["sh", "-c", script], env=lockd.env, stderr=subprocess.PIPE, text=True)
    try:
        shell_pid = int(wait_for_file(tmp_path / "sh"))
        time.sleep(0.2)  # the launcher has exited by now
        [tied] = status(lockd, name)[name]["holders"]
        assert tied["pid"] == shell_pid
        go.touch()
        _, err = shell.communicate(timeout=TIMEOUT)
        assert shell.returncode == 0, err
        assert not held(lockd, name)
    finally:
        kill_quietly(shell)


@pytest.mark.skipif(shutil.which("php") is None, reason="php-cli is not installed (.ci/run installs it)")
def test_the_php_recipe_holds_a_lease_for_the_php_process_and_excludes_flock_both_ways(lockd, name: str) -> None:
    recipe = Path(__file__).parent / "data" / "lock-recipe.php"
    lock_file = lockd.lock_dir / f"{name}.lock"
    proc = subprocess.run(
        ["php", str(recipe), LOCKCTL_SH, name, str(lock_file)],
        env=lockd.env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.stdout.splitlines() == [
        "acquire 0", "while held: held", "release 0", "after release: free", "lockctl while PHP flocks: 75",
    ], proc.stderr
