"""The man pages and shell completions: fresh from the argparse definitions, and usable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools import share

TIMEOUT = 30.0
FILES = share.files()
MAN_PAGES = [path for path in FILES if "/man/" in str(path)]
BASH = {path.name: path for path in FILES if "/bash-completion/" in str(path)}
ZSH = {path.name: path for path in FILES if "/zsh/" in str(path)}


def test_every_generated_file_is_fresh() -> None:
    """Run `python -m tools.share` after changing an option, a help text or an epilog."""
    stale = [str(path.relative_to(share.ROOT)) for path, content in FILES.items()
             if not path.exists() or path.read_text() != content]
    assert not stale, f"stale, run `python -m tools.share`: {stale}"


def test_generating_is_deterministic() -> None:
    assert share.files() == FILES


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_pages_render_without_warnings(page: Path) -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_shows_every_command_and_option() -> None:
    page = next(p for p in MAN_PAGES if p.name == "lockctl.1")
    text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=TIMEOUT,
                          env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MAN_KEEP_FORMATTING": ""}).stdout
    for command in ("acquire", "release", "status", "daemon reexec"):
        assert f"lockctl {command}" in text
    for option in ("--conflict-exit-code N", "--kill-after SEC", "--slots N|NAME=N", "--json", "--force", "--version"):
        assert option in text
    assert "exit status:" in text and "LOCKD_SOCKET" in text


def complete(script: Path, *words: str) -> list[str]:
    """What the bash completion in `script` offers for the last of `words`."""
    program = words[0]
    code = (f"source {script}; complete -p {program} >/dev/null || exit 3; "
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
            f"_{program}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    proc = subprocess.run(["bash", "--norc", "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return sorted(set(proc.stdout.split()))


def test_bash_completes_lockctl() -> None:
    lockctl = BASH["lockctl"]
    assert complete(lockctl, "lockctl", "") == [
        "--help", "--version", "-h", "acquire", "daemon", "history", "metrics", "release", "status", "watch",
    ]
    assert complete(lockctl, "lockctl", "acquire", "--no") == ["--no-wait", "--nonblock"]
    assert complete(lockctl, "lockctl", "status", "--") == ["--help", "--json", "--socket", "--watch"]
    assert complete(lockctl, "lockctl", "watch", "--") == ["--help", "--json", "--socket"]
    assert complete(lockctl, "lockctl", "release", "x", "--fo") == ["--force"]
    assert complete(lockctl, "lockctl", "acquire", "--label", "") == []  # free text
    assert complete(lockctl, "lockctl", "acquire", "--slots", "") == []  # a count, or NAME=N
    # A group's subcommand, then that one's options.
    assert complete(lockctl, "lockctl", "daemon", "") == ["reexec"]
    assert complete(lockctl, "lockctl", "daemon", "reexec", "--") == ["--help", "--json", "--socket"]
    # After --, a command line of its own: its first word is a command.
    assert "true" in complete(lockctl, "lockctl", "acquire", "x", "--", "tru")


def test_bash_completes_lockd() -> None:
    lockd = BASH["lockd"]
    assert complete(lockd, "lockd", "--log-level", "") == ["debug", "error", "info", "warning"]
    assert "--check-config" in complete(lockd, "lockd", "--che")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_loads_the_completions(tmp_path: Path) -> None:
    dirs = " ".join(sorted({str(path.parent) for path in ZSH.values()}))
    for path in ZSH.values():
        assert subprocess.run(["zsh", "-n", str(path)], timeout=TIMEOUT).returncode == 0
    code = (f"fpath=({dirs} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump; "
            "print -r -- $_comps[lockctl] $_comps[lockd]")
    proc = subprocess.run(["zsh", "-f", "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.stdout.split() == ["_lockctl", "_lockd"], proc.stderr
