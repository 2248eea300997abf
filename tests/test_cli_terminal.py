"""lockctl under job control: an interactive bash on a pseudo-terminal, typed at as a user
would, with a real daemon; and job-control signals sent to lockctl directly."""

from __future__ import annotations

import os
import pty
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cli import LOCKCTL_SH, finish, held, kill_quietly, lockctl, start_lockctl, status
from .test_cli_supervise import read_terminal, wait_for_file, wait_pid
from .waiting import wait_until


class Terminal:
    """An interactive bash on a pty. `expect` returns what appeared since the last `expect`,
    up to and including a marker; markers are printed as `echo mark$((1+1))` so that the
    echo of the typed line does not count."""

    def __init__(self, env: dict[str, str]) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], {**env, "PS1": "$ "})
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, marker: str) -> str:
        self.seen += read_terminal(self.master, until=marker.encode())
        before, found, self.seen = self.seen.partition(marker.encode())
        assert found, f"never appeared: {marker!r}; the terminal showed:\n{before.decode(errors='replace')}"
        return before.decode(errors="replace")

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        wait_pid(self.pid)
        os.close(self.master)


@pytest.fixture
def terminal(lockd) -> Iterator[Terminal]:
    term = Terminal(lockd.env)
    yield term
    term.close()


# --- Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["{}", "bash -c '{}'"], ids=["interactive", "script"])
def test_ctrl_c_stops_the_loop_running_lockctl(lockd, name: str, terminal: Terminal, tmp_path: Path, run: str) -> None:
    """A shell stops a loop only for a command that died of SIGINT: lockctl must die of it
    like CMD, not exit 130, whether it runs at the prompt or in a script."""
    loop = (
        f"for i in 1 2; do {LOCKCTL_SH} acquire {name} -c \"echo > {tmp_path}/ready; sleep 5\"; "
        "echo next$((i*100)); done"
    )
    terminal.type(run.format(loop) + "; echo after$((40+2))\n")
    wait_for_file(tmp_path / "ready")
    terminal.type("\x03")
    terminal.type("echo mark$((1+1))\n")
    shown = terminal.expect("mark2")
    assert "next100" not in shown and "after42" not in shown
    assert not held(lockd, name)


def test_ctrl_c_while_waiting_stops_the_loop(lockd, name: str, terminal: Terminal, tmp_path: Path) -> None:
    holder = start_lockctl(lockd, "acquire", name, "-c", f"echo > {tmp_path}/held; exec sleep 60")
    try:
        wait_for_file(tmp_path / "held")
        terminal.type(f"for i in 1 2; do {LOCKCTL_SH} acquire {name} -- true; echo next$((i*100)); done\n")
        wait_until(lambda: status(lockd, name)[name]["waiters"], "waiting")
        terminal.type("\x03")
        terminal.type("echo mark$((1+1))\n")
        assert "next100" not in terminal.expect("mark2")
    finally:
        kill_quietly(holder)


# --- the terminal is CMD's, unless others in lockctl's job need it -----------------------


def test_a_pipeline_after_lockctl_keeps_the_terminal(lockd, name: str, terminal: Terminal, tmp_path: Path) -> None:
    """`lockctl ... | less`: the pager reads the terminal, so CMD must not be given it."""
    ready = tmp_path / "ready"
    terminal.type(
        f"{LOCKCTL_SH} acquire {name} -c 'echo > {ready}; echo out; sleep 0.3' | "
        f"(while [ ! -e {ready} ]; do sleep 0.02; done; read line < /dev/tty; echo got:$line; cat); "
        "echo mark$((1+1))\n"
    )
    terminal.type("typed\n")
    shown = terminal.expect("mark2")
    assert "got:typed" in shown and "out" in shown
    assert "Stopped" not in shown


def test_ctrl_z_in_a_script_stops_the_whole_job_at_once(lockd, name: str, terminal: Terminal) -> None:
    script = f"{LOCKCTL_SH} acquire {name} -- sh -c 'read l; echo finished:\\$l'; echo script-end"
    terminal.type(f'bash -c "{script}"\n')
    wait_until(lambda: held(lockd, name), "CMD running")
    terminal.type("\x1a")  # Ctrl-Z, once
    terminal.expect("Stopped")
    assert held(lockd, name)
    terminal.type("fg\n")
    terminal.type("go\n")
    terminal.expect("finished:go")
    terminal.expect("script-end")


def test_fg_of_a_background_lockctl_gives_cmd_the_terminal(
    lockd, name: str, terminal: Terminal, tmp_path: Path
) -> None:
    """CMD reads the terminal only after `fg`: it must find it its own, not stop."""
    terminal.type(
        f"{LOCKCTL_SH} acquire {name} -- sh -c 'echo > {tmp_path}/ready; sleep 1; read l; echo finished:$l' &\n"
    )
    wait_for_file(tmp_path / "ready")
    terminal.type("fg\n")
    terminal.type("go\n")
    terminal.type("echo mark$((1+1))\n")
    shown = terminal.expect("mark2")
    assert "finished:go" in shown
    assert "Stopped" not in shown


def test_a_lease_lost_while_stopped_is_not_continued(lockd, name: str, terminal: Terminal, tmp_path: Path) -> None:
    terminal.type(f"{LOCKCTL_SH} acquire {name} -c 'kill -STOP $$; echo continued > {tmp_path}/ran'\n")
    terminal.expect("Stopped")
    forced = lockctl(lockd, "release", "--force", name)
    assert forced.returncode == 0, forced.stderr
    terminal.type("fg\n")
    terminal.type("echo status=$?\n")
    assert "lost" in terminal.expect("status=79")
    assert not (tmp_path / "ran").exists()


# --- job-control signals sent to lockctl ---------------------------------------------------


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_sigtstp_and_sigcont_to_lockctl_reach_cmd(lockd, name: str, tmp_path: Path) -> None:
    # Its own process group, which its parent's keeps from being orphaned: a stop is obeyed.
    proc = start_lockctl(lockd, "acquire", name, "-c", f"echo $$ > {tmp_path}/cmd; exec sleep 60", process_group=0)
    try:
        cmd = int(wait_for_file(tmp_path / "cmd"))
        proc.send_signal(signal.SIGTSTP)
        wait_until(lambda: state(cmd) == "T" and state(proc.pid) == "T", "both stopped")
        proc.send_signal(signal.SIGCONT)
        wait_until(lambda: state(cmd) != "T" and state(proc.pid) != "T", "both continued")
        proc.terminate()
        assert finish(proc)[0] == 128 + signal.SIGTERM
    finally:
        kill_quietly(proc)
