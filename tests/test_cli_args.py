"""lockctl's command line and output formats: pure logic, no daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lockd_client
import pytest
from lockd_client import cli, protocol

from .waiting import wait_until

TIMEOUT = 10.0


def parse(*argv: str):
    return cli.parse_args(list(argv))


def test_everything_after_the_double_dash_is_cmd_verbatim() -> None:
    args = parse("acquire", "-n", "a", "b", "--", "ls", "-n", "--", "-x")
    assert args.names == ["a", "b"]
    assert args.cmd == ["ls", "-n", "--", "-x"]
    assert args.no_wait


def test_dash_c_runs_through_sh() -> None:
    assert parse("acquire", "x", "-c", "echo $HOME | wc").cmd == ["sh", "-c", "echo $HOME | wc"]


def test_without_cmd_the_lease_is_process_tied() -> None:
    args = parse("acquire", "x", "--pid", "42")
    assert (args.cmd, args.pid) == (None, 42)


def test_defaults() -> None:
    args = parse("acquire", "x", "--", "true")
    assert not args.shared
    assert not args.no_wait
    assert args.timeout is None
    assert args.conflict_exit_code == cli.EXIT_BUSY == 75
    assert args.kill_after is None  # DEFAULT_KILL_AFTER, or less if lockd needs it sooner
    assert args.socket is None
    assert args.pid is None


@pytest.mark.parametrize(
    ("flags", "shared"), [(["-s"], True), (["-x"], False), (["-s", "-x"], False), (["-x", "--shared"], True)]
)
def test_mode_flags_last_one_wins_as_in_flock(flags: list[str], shared: bool) -> None:
    assert parse("acquire", *flags, "x", "--", "true").shared is shared


def test_flock_spellings_are_accepted() -> None:
    args = parse("acquire", "-e", "--nonblock", "--wait", "3", "-o", "x", "--", "true")
    assert (args.shared, args.no_wait) == (False, True)
    assert parse("acquire", "--nb", "x", "--", "true").no_wait
    assert parse("acquire", "--wait", "0.5", "x", "--", "true").timeout == 0.5


def test_a_label_over_the_protocol_cap_is_a_usage_error() -> None:
    assert parse("acquire", "--label", "x" * 256, "x").label == "x" * 256
    with pytest.raises(cli.UsageError, match="--label: a label is at most 256 characters"):
        parse("acquire", "--label", "x" * 257, "x")


def test_long_options_are_never_abbreviated() -> None:
    with pytest.raises(cli.UsageError):
        parse("acquire", "--time", "1", "x", "--", "true")


def test_fractional_timeout() -> None:
    args = parse("acquire", "-w", "0.25", "x", "--", "true")
    assert (args.timeout, args.no_wait) == (0.25, False)


def test_zero_timeout_means_no_wait() -> None:
    args = parse("acquire", "--timeout", "0", "x", "--", "true")
    assert (args.no_wait, args.timeout) == (True, None)


def test_no_wait_wins_over_a_timeout() -> None:
    args = parse("acquire", "-w", "5", "-n", "x", "--", "true")
    assert (args.no_wait, args.timeout) == (True, None)


@pytest.mark.parametrize(
    ("argv", "interval", "names"),
    [
        (["--watch"], cli.DEFAULT_WATCH_INTERVAL, []),
        (["--watch", "0.5", "a"], 0.5, ["a"]),
        (["--watch=5", "a"], 5.0, ["a"]),
        # A word after --watch is a NAME, not SEC; a number is SEC, though it could be a name.
        (["--watch", "site.com", "db"], cli.DEFAULT_WATCH_INTERVAL, ["site.com", "db"]),
        (["a", "--watch", "3"], 3.0, ["a"]),
        ([], None, []),
    ],
)
def test_status_watch_takes_an_optional_interval(argv: list[str], interval: float | None, names: list[str]) -> None:
    args = parse("status", *argv)
    assert (args.watch, args.names) == (interval, names)


def test_conflict_exit_code() -> None:
    assert parse("acquire", "-E", "0", "x", "--", "true").conflict_exit_code == 0


@pytest.mark.parametrize(
    ("argv", "slots", "shared"),
    [
        (["x", "--", "true"], {}, False),
        (["--slots", "3", "a", "b", "--", "true"], {"a": 3, "b": 3}, False),
        (["--slots=1000", "a", "a"], {"a": 1000}, False),
        (["--slots", "3", "--slots", "3", "a"], {"a": 3}, False),
        (["-s", "--slots", "a=2", "a", "b", "-c", "true"], {"a": 2}, True),
        (["--slots", "a=2", "--slots", "b=5", "a", "b", "c"], {"a": 2, "b": 5}, False),
        (["--slots", "a=2", "--slots", "a=2", "a", "b"], {"a": 2}, False),
    ],
)
def test_slots_make_every_name_or_the_names_given_semaphores(
    argv: list[str], slots: dict[str, int], shared: bool
) -> None:
    args = parse("acquire", *argv)
    assert (args.slots, args.shared) == (slots, shared)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slots", "0", "a"], "argument --slots: '0' is not a number of slots (1 to 1000)"),
        (["--slots", "1001", "a"], "'1001' is not a number of slots (1 to 1000)"),
        (["--slots", "-3", "a"], "'-3' is not a number of slots (1 to 1000)"),
        (["--slots", "three", "a"], "'three' is neither a number of slots (1 to 1000) nor NAME=N"),
        (["--slots", "a=", "a"], "'a=': '' is not a number of slots"),
        (["--slots", "a=2.5", "a"], "'a=2.5': '2.5' is not a number of slots"),
        (["--slots", "=2", "a"], "'=2': give NAME=N, or N alone for every NAME"),
        (["--slots", "b=2", "a", "--", "true"], "--slots b=2: b is not among the NAMEs (a); name it as well"),
        (["--slots", "3", "--slots", "a=2", "a", "b"], "give either --slots N (every NAME is a semaphore) or"),
        (["--slots", "3", "--slots", "4", "a"], "--slots is given 2 different counts for every NAME; give one"),
        (["--slots", "a=2", "--slots", "a=3", "a"], "--slots gives a two counts, 2 and 3; give one"),
        (["-s", "--slots", "3", "a", "b"], "every NAME here is a semaphore: a slot has no mode; leave out --shared"),
        (["--slots", "a=3", "--shared", "a"], "a slot has no mode"),
    ],
)
def test_slots_usage_errors_say_what_to_do(argv: list[str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        parse("acquire", *argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["acquire", "-w", "-1", "x", "--", "true"],
        ["acquire", "-w", "soon", "x", "--", "true"],
        ["acquire", "-w", "nan", "x", "--", "true"],
        ["acquire", "-w", "inf", "x", "--", "true"],
        ["acquire", "--kill-after", "-2", "x", "--", "true"],
        ["acquire", "-E", "256", "x", "--", "true"],
        ["acquire", "-E", "one", "x", "--", "true"],
        ["acquire", "x", "--"],
        ["acquire", "x", "-c", "true", "--", "true"],
        ["acquire", "--pid", "42", "x", "--", "true"],
        ["acquire", "--pid", "0", "x"],
        ["acquire", "--", "true"],
        ["release", "--force", "a", "b"],
        ["release", "--force", "--pid", "42", "a"],
        ["release"],
        ["status", "--watch", "--json"],
        ["status", "--watch", "0.05"],
        ["status", "--watch", "-1"],
        ["status", "--watch=soon"],
        ["watch", "--pid", "42"],
        ["daemon"],
        ["daemon", "frobnicate"],
        ["daemon", "reexec", "x"],
        ["daemon", "--socket", "/s", "reexec"],
        ["frobnicate", "x"],
        [],
    ],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(cli.UsageError):
        cli.parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["acquire", "{}", "--", "true"], ["acquire", "{}"], ["release", "{}"], ["status", "ok", "{}"],
        ["watch", "ok", "{}"], ["status", "--watch", "{}"],
    ],
)
@pytest.mark.parametrize("bad", ["", "../etc", ".hidden", "-n", "a/b", "a b", "x" * 251])
def test_invalid_names_state_the_rule(argv: list[str], bad: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args([bad if word == "{}" else word for word in argv])
    if not bad.startswith("-"):  # "-n" is read as an option, and so a usage error of its own
        assert protocol.NAME_RULE in str(info.value)


def test_socket_option_on_every_command() -> None:
    for argv in (["acquire", "x", "--", "true"], ["release", "x"], ["status"], ["watch"]):
        assert cli.parse_args([argv[0], "--socket", "/s", *argv[1:]]).socket == "/s"
    # A group's subcommand takes it after its name.
    assert cli.parse_args(["daemon", "reexec", "--socket", "/s"]).socket == "/s"


def test_daemon_reexec() -> None:
    args = parse("daemon", "reexec")
    assert (args.command, args.daemon_command, args.json, args.socket, args.names) == (
        "daemon", "reexec", False, None, [],
    )
    assert parse("daemon", "reexec", "--json").json


def test_daemon_help_lists_its_subcommands(capsys) -> None:
    assert cli.main(["daemon", "--help"]) == 0
    out = capsys.readouterr().out
    for command, summary in cli.DAEMON_COMMANDS.items():
        assert re.search(rf"^ +{command} +{re.escape(summary[:40])}", out, re.M), out


@pytest.mark.parametrize("argv", [["acquire", "x", "--", "true"], ["release", "x"], ["status"], ["watch"]])
def test_a_relative_socket_is_a_usage_error(capsys, argv: list[str]) -> None:
    assert cli.main([argv[0], "--socket", "lockd.sock", *argv[1:]]) == cli.EXIT_USAGE
    assert "--socket: the socket must be an absolute path, not 'lockd.sock'" in capsys.readouterr().err


def test_a_relative_lockd_socket_in_the_environment_is_a_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LOCKD_SOCKET", "run/lockd.sock")
    assert cli.main(["status"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "LOCKD_SOCKET: the socket must be an absolute path, not 'run/lockd.sock'" in err
    # --socket is what is used, so a broken LOCKD_SOCKET does not matter then.
    assert cli.main(["status", "--socket", "/nonexistent/lockd.sock"]) == cli.EXIT_UNAVAILABLE


def test_version(capsys) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"lockctl {lockd_client.__version__}\n"


def test_top_level_help_lists_every_command_though_a_command_line_builds_only_its_own(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command, summary in cli.COMMANDS.items():
        assert re.search(rf"^ +{command} +{re.escape(summary)}$", out, re.M), out
    assert "--version" in out
    only = cli.build_parser("status")._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(only) == ["status"]


def test_main_reports_usage_errors_with_64_before_contacting_the_daemon(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LOCKD_SOCKET", "/nonexistent/lockd.sock")
    assert cli.main(["acquire", "no/slash", "--", "true"]) == 64
    err = capsys.readouterr().err
    assert protocol.NAME_RULE in err
    assert "/nonexistent" not in err


@pytest.mark.parametrize("command", ["acquire", "release", "status", "watch", "daemon reexec"])
def test_help_has_examples(capsys, command: str) -> None:
    assert cli.main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"lockctl {command} " in out


@pytest.mark.parametrize(
    ("epilog", "statuses"),
    [
        (cli.ACQUIRE_EPILOG, {1, 64, 66, 69, 75, 76, 77, 79, 80, 81, 126, 127}),
        (cli.RELEASE_EPILOG, {0, 1, 64, 69, 75, 76, 77}),
        (cli.STATUS_EPILOG, {0, 1, 64, 69, 75, 76}),
        (cli.WATCH_EPILOG, {64, 69, 75, 76}),
        (cli.DAEMON_REEXEC_EPILOG, {0, 64, 69, 75, 76, 77, 82}),
    ],
)
def test_help_lists_every_exit_status_of_its_command(epilog: str, statuses: set[int]) -> None:
    listed = epilog.split("exit status:", 1)[1]
    assert {int(n) for n in re.findall(r"(?<![+\w])(\d+) ", listed)} == statuses


def test_lockctl_never_imports_trio() -> None:
    code = (
        "import sys; from lockd_client import cli; "
        "status = cli.main(['acquire', 'x', '--', 'true']); "
        "assert 'trio' not in sys.modules, 'trio imported'; sys.exit(status)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"LOCKD_SOCKET": "/nonexistent/lockd.sock", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == cli.EXIT_UNAVAILABLE, proc.stderr


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "0 ms"), (0.0424, "42 ms"), (0.9994, "999 ms"), (0.9996, "1.0s"), (75.0, "1m15s")],
)
def test_a_pause_reads_in_milliseconds_below_a_second(seconds: float, text: str) -> None:
    assert cli.pause_text(seconds) == text


def holder(**fields) -> protocol.Holder:
    return protocol.Holder(**{"pid": 10, "uid": 0, "command": "make deploy", "since": 1000.0, "token": 7, **fields})


LOCKS = [
    protocol.LockInfo(
        name="site.com",
        mode="exclusive",
        holders=[holder()],
        waiters=[holder(pid=11, command="lockctl acquire -s site.com", mode="shared", token=None, since=1090.0)],
    ),
    protocol.LockInfo(name="db", mode=None, holders=[], waiters=[holder(pid=12, token=None)]),
    protocol.LockInfo(
        name="cron", mode="exclusive", holders=[holder(pid=13, outside=True, token=None, since=0.0)], waiters=[]
    ),
    protocol.LockInfo(
        name="backups",
        mode="shared",
        holders=[holder(pid=14, mode="shared", token=8), holder(pid=15, mode="shared", token=9),
                 holder(pid=16, mode="shared", outside=True, token=None, since=0.0)],
        waiters=[holder(pid=17, mode="shared", token=None, since=1095.0)],
        slots=3,
    ),
]


def test_status_document_schema() -> None:
    doc = cli.status_document(LOCKS)
    site, db, cron, backups = doc["locks"]
    assert site["name"] == "site.com" and site["mode"] == "exclusive" and site["slots"] is None
    assert site["holders"] == [
        {
            "pid": 10, "uid": 0, "command": "make deploy", "since": 1000.0, "token": 7, "label": None,
            "outside": False, "host": None,
        }
    ]
    assert [(w["pid"], w["uid"], w["mode"], w["since"]) for w in site["waiters"]] == [(11, 0, "shared", 1090.0)]
    assert db["mode"] is None and db["holders"] == []
    assert cron["holders"][0]["outside"] is True
    assert (backups["slots"], backups["mode"], len(backups["holders"])) == (3, "shared", 3)


def test_a_party_on_another_host_says_which() -> None:
    remote = protocol.LockInfo(name="site.com", mode="exclusive", holders=[holder(pid=10, host="web2")], waiters=[])
    assert cli.status_document([remote])["locks"][0]["holders"][0]["host"] == "web2"
    assert "10@web2" in cli.status_table([remote], now=1000.0)


def test_status_document_gives_no_time_for_a_holder_outside_lockd() -> None:
    """Nobody knows when a flock(1) holder took the lock: null, not the epoch."""
    cron = cli.status_document(LOCKS)["locks"][2]
    assert cron["holders"][0]["since"] is None


def test_status_table_lists_holders_then_waiters_in_order() -> None:
    lines = cli.status_table(LOCKS, now=1100.0).splitlines()
    assert lines[0].split() == ["NAME", "MODE", "PID", "USER", "FOR", "TOKEN", "COMMAND"]
    assert lines[1].split() == ["site.com", "exclusive", "10", "root", "1m40s", "7", "make", "deploy"]
    assert lines[2].split() == ["waits", "shared", "11", "root", "10s", "lockctl", "acquire", "-s", "site.com"]
    assert lines[3].split()[:3] == ["db", "waits", "exclusive"]
    assert "(outside lockd)" in lines[4]


def test_status_table_gives_a_semaphores_slots_in_use_and_its_holders_slots() -> None:
    """The outside shared flock is listed, as a flock, and takes none of the slots."""
    lines = cli.status_table(LOCKS, now=1100.0).splitlines()[5:]
    assert lines[0].split()[:6] == ["backups", "2/3", "slots", "slot", "14", "root"]
    assert lines[1].split()[:2] == ["slot", "15"]
    assert lines[2].split()[:4] == ["shared", "(outside", "lockd)", "16"]
    assert lines[3].split()[:4] == ["waits", "slot", "17", "root"]


@pytest.mark.parametrize(
    ("shell", "script", "only_lockctl"),
    [
        ("sh", "read x lockctl", True),  # stands for `lockctl acquire x`: one command, then done
        ("bash", "read x /usr/bin/lockctl 2>/dev/null", True),
        ("sh", "read x lockctl; read y", False),  # the shell goes on: it is the holder
        ("sh", "read x lockctl && read y", False),
        ("sh", "read x lockctl#1", False),  # what a comment might hide is not guessed at
        ("sh", "read x $(echo lockctl)", False),
        ("sh", "eval read x lockctl", False),
        ("sh", "read x", False),  # not lockctl's
    ],
)
def test_a_shell_running_only_lockctl_is_a_launcher(shell: str, script: str, only_lockctl: bool) -> None:
    with subprocess.Popen([shell, "-c", script], stdin=subprocess.PIPE) as proc:
        try:
            wait_until(lambda: b"-c" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), "the shell exec'd", 5)
            assert cli._runs_one_command(proc.pid) is only_lockctl
        finally:
            proc.kill()
