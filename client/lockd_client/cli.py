"""`lockctl`: take lockd locks from the shell, run commands under them, and inspect them.

Invariant: every way lockctl ends has one documented exit status (docs/cli.md): CMD's own,
passed through unchanged, or the one status of lockctl's outcome; a usage error or an invalid
name is 64 before the daemon is contacted.

Start-up must stay fast (lockctl runs in loops of shell scripts): only argparse and the wire
protocol are imported up front; the client, and everything else, when a command needs it;
only the parser of the command given is built; and `run` skips the interpreter's teardown.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Final, NoReturn, TextIO

from . import __version__, describe, errors, paths, protocol

# What is only for the type checker stays out of lockctl's start-up, the status document's
# TypedDicts included (at run time it is a plain dict).
if TYPE_CHECKING:
    import signal  # typeshed describes the C module only as part of this, its Python layer
    from collections.abc import Callable
    from typing import TypedDict

    from .blocking import Client, Lease

    class HolderDocument(TypedDict):
        pid: int | None
        uid: int | None
        command: str
        since: float | None
        token: int | None
        label: str | None
        outside: bool
        host: str | None

    class WaiterDocument(TypedDict):
        pid: int | None
        uid: int | None
        mode: protocol.Mode
        since: float
        command: str
        label: str | None
        host: str | None

    class LockDocument(TypedDict):
        name: str
        mode: protocol.Mode | None
        slots: int | None
        holders: list[HolderDocument]
        waiters: list[WaiterDocument]

    class StatusDocument(TypedDict):
        """`status --json`: its schema is in docs/cli.md."""

        locks: list[LockDocument]
else:
    import _signal as signal  # the C module: signal's enums cost lockctl ~2 ms at start

# Exit statuses (sysexits.h where one fits; see docs/cli.md).
#: lockctl's "no", as grep's 1: status: some NAME is held; release: nothing to release;
#: acquire without CMD: no process to tie the lease to. Nothing failed; the answer is no.
EXIT_NO: Final = 1
EXIT_USAGE: Final = 64  # EX_USAGE
EXIT_BAD_LOCK_FILE: Final = 66  # EX_NOINPUT, as flock(1) when it cannot open the file
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE
EXIT_BUSY: Final = 75  # EX_TEMPFAIL; -E replaces it for busy and timeout
EXIT_PROTOCOL: Final = 76  # EX_PROTOCOL
EXIT_DENIED: Final = 77  # EX_NOPERM
#: The lease ended while CMD ran, and CMD was terminated. Outside sysexits (64-78), the
#: shell's own codes (124-127) and 128+N, so it reads as neither CMD's verdict nor its death.
EXIT_LOST: Final = 79
#: The lock is held for the very process asking (or the lockctl running it): waiting would
#: never end. Next to 79, for the same reasons.
EXIT_DEADLOCK: Final = 80
#: A NAME is in use as a semaphore of another count, or as a lock where this asks for a slot
#: (or the other way round): every user of a name must agree on what it is. Next to 80.
EXIT_MISMATCH: Final = 81
#: `lockctl daemon reexec`: lockd did not re-execute, and serves on as it was (69 would say
#: it is gone: an upgrade script must tell the two apart).
EXIT_NOT_REEXECUTED: Final = 82
EXIT_NOT_FOUND: Final = 127  # CMD not found, as shells report it
EXIT_CANNOT_EXECUTE: Final = 126  # CMD found but not executable

#: --kill-after's default, seconds from SIGTERM to SIGKILL for CMD's tree once the lease is
#: lost: time for a program to stop cleanly, yet not long for a lock held by one that ignores
#: SIGTERM. A lockd whose leases go to others sooner (`stop_within`) shortens it.
DEFAULT_KILL_AFTER: Final = 10.0
#: How long `status`, `release` and `acquire -n` wait for a busy lockd to take their
#: connection: through a burst, and through a restart (systemd restarts a hung lockd after
#: its 30 s watchdog, and connections waiting in the socket's queue are kept), yet short
#: enough that a script hears that something is wrong. `acquire` waits as long as -w says,
#: or as long as it takes.
BUSY_WAIT: Final = 60.0
#: `status --watch`: seconds between drawings when not given, and the fewest; watch(1)'s.
DEFAULT_WATCH_INTERVAL: Final = 2.0
MIN_WATCH_INTERVAL: Final = 0.1


class UsageError(Exception):
    """The command line is wrong; the message says how (for an invalid name: the rule)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}\ntry: {self.prog} --help")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help as written (examples keep their lines), as wide as the terminal.

    argparse makes a formatter for every argument added; left to itself, each asks shutil for
    the width, and importing shutil costs lockctl more start-up than all of argparse does.
    """

    def __init__(self, prog: str) -> None:
        columns = os.environ.get("COLUMNS", "")  # honoured, as shutil does
        width = int(columns) if columns.isdigit() else _terminal_width(sys.stdout)
        super().__init__(prog, width=width - 2)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number >= 0")
    return value


def _integer(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`, else a usage error naming `what`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


#: The argparse types of -E (what an exit status can be) and --pid.
_exit_code: Final = _integer(0, 255, "an exit status (0 to 255)")
_pid: Final = _integer(1, 2**22, "a process id")  # 2**22: the kernel's largest pid_max
_count: Final = _integer(1, protocol.MAX_SLOTS, f"a number of slots (1 to {protocol.MAX_SLOTS})")


def _slots(text: str) -> tuple[str | None, int]:
    """The argparse type of --slots: `N` (every NAME: None, N) or `NAME=N`."""
    name, equals, count = text.rpartition("=")
    if equals and not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=N, or N alone for every NAME")
    if not equals and not count.lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of slots (1 to {protocol.MAX_SLOTS}) nor NAME=N"
        )
    try:
        return (name or None), _count(count)
    except argparse.ArgumentTypeError as e:
        if equals:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        raise


# Each command's --help ends with its examples and exit statuses (the man page shows them too).
ACQUIRE_EPILOG: Final = """\
examples:
  lockctl acquire backup -- rsync -a /srv/ /mnt/backup/
      run rsync holding "backup"; waits while someone else holds it
  lockctl acquire --slots 3 backups -- ./backup.sh
      at most 3 backups at once: a slot of the 3-slot semaphore "backups"
  lockctl acquire -n -E 0 cron.hourly -c 'run-parts /etc/cron.hourly'
      skip this run (status 0) if the previous one still holds the lock
  lockctl acquire -s -w 2.5 db.schema -- ./read-report
      shared with other readers; give up after 2.5 seconds (status 75)
  lockctl acquire site.com || exit; make deploy; lockctl release site.com
      a lease for this shell script itself, ended by release or when the script exits

--slots N makes every NAME a counting semaphore of N slots, at most N holders at once;
--slots NAME=N (repeatable) makes that NAME one, and -s/-x say the mode of the other NAMEs.
Everyone using a NAME must give the same N (or no --slots, for a lock): else status 81.

CMD sees LOCKD_TOKEN (fencing token of the first NAME) and LOCKD_TOKENS ("name=token ...").
Signals sent to lockctl go to CMD; if the lease is lost while CMD runs, CMD and every process
it started are terminated and lockctl exits 79. Without CMD, the lease belongs to lockctl's
parent (or --pid) and the tokens are printed, one line per NAME.

exit status: CMD's own (128+N if it died of signal N; of SIGINT or SIGQUIT, lockctl dies of
it too); 1 (no CMD) no process to tie the lease to; 64 usage or invalid name; 66 lock file
unusable; 69 lockd unreachable, gone, or its backend down; 75 busy or timed out, lockd
included (-E N: N instead), or a lockd limit reached; 76 lockd version mismatch; 77 refused;
79 lease lost while CMD ran; 80 NAME is held for this very process (a CMD taking a lock its
lockctl holds, a script taking its own lease twice): waiting would never end; 81 NAME is in
use as a semaphore of another N, or as a lock where --slots asks for a semaphore (or the other
way round); 126 CMD cannot be executed; 127 CMD not found.
"""

RELEASE_EPILOG: Final = """\
examples:
  lockctl release site.com            end the lease this shell took with `lockctl acquire`
  lockctl release --pid 4242 a b      end the leases process 4242 holds on a and b
  lockctl release --force site.com    break whoever holds site.com (root, or the holder's user)

A lease of several names is one lease: after `lockctl acquire x a`, `lockctl release x` ends
it, and a is free too. A slot of a semaphore (acquire --slots) is released the same way, and
--force breaks every slot's holder.

exit status: 0 released; 1 not held (nothing to release or break); 64 usage; 69 lockd
unreachable; 75 lockd busy for a minute, or a lockd limit reached; 76 lockd version mismatch;
77 refused.
"""

STATUS_EPILOG: Final = """\
examples:
  lockctl status                      every lock held or waited on, and every lock file
                                      held outside lockd
  lockctl status site.com             its holders and waiters, or "free: site.com";
                                      status 1 if it is held
  lockctl status --json | jq '.locks[].holders[].pid'
  lockctl status --watch              the table redrawn every 2 seconds until Ctrl-C
  lockctl status --watch 0.5 site.com

A semaphore's first row shows its slots in use (backups 2/3 slots); its holders' MODE is slot.

exit status: 0 (with NAMEs: all free); 1 some NAME is held; 64 usage (--watch: also when
stdout is not a terminal, or with --json); 69 lockd unreachable or gone; 75 lockd busy for a
minute, or a lockd limit reached; 76 lockd version mismatch. --watch runs until interrupted.
"""

WATCH_EPILOG: Final = """\
examples:
  lockctl watch                       every lease event this user may see, as it happens
  lockctl watch site.com db           only those on site.com and db
  lockctl watch --json | jq -c 'select(.event == "refused")'
  lockctl watch --json backup | jq -r 'select(.event == "released") | "\\(.held) \\(.exit_status)"'

One line per event: local time, event (granted, released, lost, broken, refused), name, mode
or slots, token, who (pid, command, label, user), time waited or held, CMD's exit status,
and the reason. lockd sends each user the events of their own leases, and root everyone's,
unless its policy says otherwise. Runs until interrupted (Ctrl-C).

exit status: 64 usage or invalid name; 69 lockd unreachable or gone; 75 lockd dropped the
watch because its output was not read as fast as events came, lockd busy for a minute, or
a lockd limit reached; 76 lockd version mismatch (too old to send events).
"""

METRICS_EPILOG: Final = """\
examples:
  lockctl metrics                     the daemon's metrics (docs/metrics.md)
  lockctl metrics > /var/lib/node_exporter/lockd.prom.tmp &&
    mv /var/lib/node_exporter/lockd.prom.tmp /var/lib/node_exporter/lockd.prom
                                      for node_exporter's textfile collector: the file
                                      is replaced whole, never read half written

exit status: 0; 64 usage; 69 lockd unreachable; 75 lockd busy for a minute, or a lockd
limit reached; 76 lockd version mismatch (a lockd too old to serve metrics).
"""


HISTORY_EPILOG: Final = """\
examples:
  lockctl history site.com            what happened to site.com lately
  lockctl history --since 2h          every lock's events of the last two hours
  lockctl history backup --since 2026-12-06T03:00 --until 2026-12-06T04:00
  lockctl history --json backup | jq '.events[] | select(.event == "released") | .exit_status'

WHEN is a Unix time (1765000000), an ISO 8601 date or time (2026-12-06, 20261206,
2026-12-06T03:10, 2026-12-06 03:10:00+01:00), or a time ago: a number and s, m, h, d or w
(90s, 30m, 2h, 7d, 1w). Without a zone it is local time: a time that the clocks going back
repeats is the first of the two, and one that they skip going forward is read on the clock
before the change (02:30 is 03:30 summer time); give a zone to be exact.

Events are shown oldest first: the latest N of the range (lockctl says when earlier ones
match too). Each user sees their own events; the users in the daemon's policy.read_events
(by default root) see everyone's.

exit status: 0 (also when no event matched); 64 usage; 69 lockd unreachable, or it cannot
read its history now; 75 lockd busy for a minute; 76 lockd keeps no history (older than
lockctl, or history is off in its config).
"""

DAEMON_REEXEC_EPILOG: Final = """\
examples:
  sudo lockctl daemon reexec          after installing a new version of lockd: run it,
                                      keeping every lease, waiting request and connection
  lockctl daemon reexec --json        {"previous": "lockd 0.1.0", "server": "lockd 0.2.0",
                                       "paused": 0.042} (paused: seconds)

The same as sending lockd SIGUSR2, but it waits for the new program and says how it went.
Only root and lockd's own user may. If lockd does not re-execute (the new program cannot
take over its state, lockd is stopping...), it says why and serves on as before, with
everything it holds.

exit status: 0 re-executed; 64 usage; 69 lockd unreachable, or it went away meanwhile
(start it again); 75 lockd busy for a minute, or a lockd limit reached; 76 lockd version
mismatch (a lockd too old to re-execute in place: restart it instead); 77 refused (neither
root nor lockd's user); 82 lockd did not re-execute: it serves on as before, and says why.
"""


#: What each command is for, as `lockctl --help` lists it.
COMMANDS: Final = {
    "acquire": "take locks, for CMD or for the calling shell",
    "release": "end process-tied leases, or break a lease with --force",
    "status": "who holds and who waits for locks",
    "history": "what happened to locks: grants, releases, losses, refusals",
    "watch": "print lease events as they happen",
    "metrics": "the daemon's metrics, in the Prometheus text format",
    "daemon": "act on the running daemon itself: re-execute it in place",
}

#: The subcommands of `lockctl daemon`, and what each is for.
DAEMON_COMMANDS: Final = {
    "reexec": "re-execute the running lockd in place (after an upgrade), keeping every lease and connection",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """lockctl's parser: every command's, or with `command` only that one's.

    Building a command's parser costs start-up, so a command line names the one it needs;
    `lockctl --help`, a line with no known command, and the man page and completion
    generators (tools/share.py) get them all.
    """
    parser = _Parser(
        prog="lockctl",
        description="Take lockd locks from the shell, run commands under them, and inspect them.",
        epilog="Run `lockctl COMMAND --help` for examples and exit statuses. Status 1 is\n"
        "lockctl's \"no\" (a NAME is held, nothing to release): an answer, not a failure.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"lockctl {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name, add in _COMMAND_PARSERS.items():
        if command is None or command == name:
            # No abbreviated long options: a script's meaning must not change when one is added.
            sub = commands.add_parser(
                name, help=COMMANDS[name], formatter_class=_Formatter, allow_abbrev=False
            )
            if add is not _add_daemon:  # a group's subcommands take it, after their name
                _add_socket(sub)
            add(sub)
    return parser


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=_socket_path,
        metavar="PATH",
        help=f"lockd's socket, an absolute path (default: ${paths.SOCKET_ENV}, else the "
        "user's own daemon's socket if it exists, else the system daemon's, "
        f"{paths.SYSTEM_SOCKET})",
    )


def _socket_path(text: str) -> str:
    problem = paths.socket_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _add_acquire(acquire: argparse.ArgumentParser) -> None:
    acquire.usage = "%(prog)s [options] NAME... [-- CMD [ARG...] | -c 'shell command']"
    acquire.epilog = ACQUIRE_EPILOG
    acquire.description = (
        "Take every NAME together. With CMD: run it holding them and release them\n"
        "when it exits. Without: tie the lease to the calling process."
    )
    # Every spelling flock(1) accepts, so that a flock line converts by changing the word;
    # as in flock(1), the last of -s/-x wins.
    acquire.set_defaults(shared=False)
    acquire.add_argument(
        "-s", "--shared", dest="shared", action="store_const", const=True, help="a shared lease"
    )
    acquire.add_argument(
        "-x",
        "-e",
        "--exclusive",
        dest="shared",
        action="store_const",
        const=False,
        help="an exclusive lease (the default)",
    )
    acquire.add_argument(
        "--slots",
        dest="given_slots",
        action="append",
        type=_slots,
        metavar="N|NAME=N",
        help=f"N: every NAME is a counting semaphore of N slots (1 to {protocol.MAX_SLOTS}), and the "
        "lease takes one slot of each; NAME=N: that NAME only (repeatable)",
    )
    acquire.add_argument(
        "-n",
        "--no-wait",
        "--nonblock",
        "--nb",
        action="store_true",
        help="fail at once if any NAME is held",
    )
    acquire.add_argument(
        "-w",
        "--timeout",
        "--wait",
        type=_seconds,
        metavar="SEC",
        help="give up after SEC seconds, a busy lockd included (fractions allowed; 0 is -n)",
    )
    acquire.add_argument(
        "-E",
        "--conflict-exit-code",
        type=_exit_code,
        default=EXIT_BUSY,
        metavar="N",
        help=f"exit status when busy or timed out (default {EXIT_BUSY})",
    )
    acquire.add_argument(
        "--label",
        metavar="TEXT",
        help="shown next to the lease in `lockctl status` (at most 256 characters)",
    )
    acquire.add_argument(
        "-c",
        "--command",
        dest="shell_command",
        metavar="'shell command'",
        help="run the command with sh -c",
    )
    acquire.add_argument(
        "--kill-after",
        type=_seconds,
        metavar="SEC",
        help=f"if the lease is lost, SIGKILL CMD this long after SIGTERM (default {DEFAULT_KILL_AFTER:g}, "
        "less if lockd needs the lock back sooner)",
    )
    acquire.add_argument(
        "--pid",
        type=_pid,
        help="without CMD: tie the lease to this process (default: lockctl's parent)",
    )
    acquire.add_argument(
        "-v", "--verbose", action="store_true", help="say what is waited for and done"
    )
    acquire.add_argument(
        "-o",
        "--close",
        action="store_true",
        help="accepted as in flock(1); CMD never holds the lease in any case",
    )
    acquire.add_argument("names", nargs="+", metavar="NAME")


def _add_release(release: argparse.ArgumentParser) -> None:
    release.epilog = RELEASE_EPILOG
    release.description = (
        "End the leases that lockctl's parent (or --pid) took with\n"
        "`lockctl acquire NAME` (no CMD), whole: a lease that includes any NAME ends with all\n"
        "its names. With --force, break every lease on NAME, whoever holds it."
    )
    target = release.add_mutually_exclusive_group()
    target.add_argument(
        "--pid", type=_pid, help="the process whose leases end (default: lockctl's parent)"
    )
    target.add_argument(
        "--force", action="store_true", help="break every lease on NAME; its holders see it lost"
    )
    release.add_argument("names", nargs="+", metavar="NAME")


def _interval(text: str) -> float:
    value = _seconds(text)
    if value < MIN_WATCH_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: the interval must be at least {MIN_WATCH_INTERVAL:g} seconds")
    return value


def _add_status(status: argparse.ArgumentParser) -> None:
    status.epilog = STATUS_EPILOG
    status.description = "Show holders and waiters of every lock in use, or of NAMEs."
    status.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    status.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_INTERVAL,
        type=_interval,
        metavar="SEC",
        help=f"on a terminal, redraw the table every SEC seconds (default {DEFAULT_WATCH_INTERVAL:g}, "
        f"at least {MIN_WATCH_INTERVAL:g}) until interrupted",
    )
    status.add_argument("names", nargs="*", metavar="NAME")


def _add_metrics(metrics: argparse.ArgumentParser) -> None:
    metrics.epilog = METRICS_EPILOG
    metrics.description = "Print the daemon's metrics in the Prometheus text exposition format."
    metrics.set_defaults(names=[])


def _add_watch(watch: argparse.ArgumentParser) -> None:
    watch.epilog = WATCH_EPILOG
    watch.description = "Print lease events on NAMEs (every lock if none are given) as they happen."
    watch.add_argument(
        "--json", action="store_true", help="one JSON object per event and line (schema in docs/cli.md)"
    )
    watch.add_argument("names", nargs="*", metavar="NAME")


def _add_history(history: argparse.ArgumentParser) -> None:
    history.epilog = HISTORY_EPILOG
    history.description = (
        "Show the lease events lockd recorded on NAMEs (every lock when none are given):\n"
        "granted, released (with CMD's exit status), lost, broken, refused."
    )
    history.add_argument("--since", type=_when, metavar="WHEN", help="only events at or after WHEN")
    history.add_argument("--until", type=_when, metavar="WHEN", help="only events before WHEN")
    most = protocol.MAX_HISTORY_LIMIT
    history.add_argument(
        "--limit", type=_integer(1, most, f"a number of events (1 to {most})"), default=1000, metavar="N",
        help="at most the latest N events (default 1000)",
    )
    history.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    history.add_argument("names", nargs="*", metavar="NAME")


def _add_daemon(daemon: argparse.ArgumentParser) -> None:
    daemon.description = "Act on the running lockd itself."
    commands = daemon.add_subparsers(
        dest="daemon_command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    reexec = commands.add_parser(
        "reexec", help=DAEMON_COMMANDS["reexec"], formatter_class=_Formatter, allow_abbrev=False
    )
    _add_socket(reexec)
    reexec.epilog = DAEMON_REEXEC_EPILOG
    reexec.description = (
        "Re-execute the running lockd in place: the lockd installed now takes over under the\n"
        "same pid, with every lease, waiting request (in its place in the queue), connection\n"
        "and lock file, so its clients notice at most a pause. Run it after installing a new\n"
        "version of lockd: unlike a restart, it ends no connection and no wait."
    )
    reexec.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    reexec.set_defaults(names=[])


#: A time ago (`2h`): seconds per unit.
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _when(text: str) -> float:
    """WHEN (see HISTORY_EPILOG) as a Unix time."""
    word = text.strip()
    if len(word) == 8 and word.isascii() and word.isdigit():
        # A date in ISO 8601's basic form (20261206), not a Unix time in 1970.
        return _local_time(word, f"{text!r} is not a date: 8 digits are read as YYYYMMDD")
    try:
        value = float(word)
    except ValueError:
        pass
    else:
        if math.isfinite(value) and value >= 0:
            return value
        raise argparse.ArgumentTypeError(f"{text!r} is not a Unix time")
    if word[-1:] in _UNITS:
        try:
            ago = float(word[:-1]) * _UNITS[word[-1]]
        except ValueError:
            ago = math.nan
        if math.isfinite(ago) and ago >= 0:
            return time.time() - ago
    return _local_time(
        word,
        f"{text!r} is not a time: give a Unix time, an ISO 8601 date or time (2026-12-06T03:10), "
        "or a time ago (30m, 2h, 7d)",
    )


def _local_time(word: str, problem: str) -> float:
    """An ISO 8601 date or time as a Unix time; without a zone, in local time, as a user
    reading a clock means it (see HISTORY_EPILOG for the hours a DST change skips or
    repeats). Raises ArgumentTypeError(`problem`) if it is none."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(word).timestamp()
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(problem) from None


#: What adds each command's arguments to its parser: only the command given is built.
_COMMAND_PARSERS: Final = {
    "acquire": _add_acquire, "release": _add_release, "status": _add_status, "history": _add_history,
    "watch": _add_watch, "metrics": _add_metrics, "daemon": _add_daemon,
}


class Args(argparse.Namespace):
    """A parsed lockctl command line. Only the fields of its `command` (and `socket`, `names`)
    are set: argparse sets every one its parser has, and a default here would hide the
    parser's own."""

    command: str
    socket: str | None
    names: list[str]
    # acquire
    shared: bool
    no_wait: bool
    timeout: float | None
    conflict_exit_code: int
    label: str | None
    shell_command: str | None
    kill_after: float | None
    verbose: bool
    close: bool
    #: CMD and its arguments (from `-- CMD` or `-c`); None without CMD. Set by parse_args.
    cmd: list[str] | None
    #: Each --slots as given: (None, N) for every NAME, (NAME, N) for one; None without any.
    given_slots: list[tuple[str | None, int]] | None
    #: The NAMEs that are semaphores, with their counts ({}: none). Set by parse_args.
    slots: dict[str, int]
    # acquire and release
    pid: int | None
    # release
    force: bool
    # status, watch, history and daemon reexec
    json: bool
    # status
    watch: float | None
    # history
    since: float | None
    until: float | None
    limit: int
    # daemon
    daemon_command: str


def parse_args(argv: list[str]) -> Args:
    """Parse a lockctl command line; raise UsageError if it is wrong.

    For `acquire`, everything after the first `--` is CMD, verbatim (argparse would otherwise
    read CMD's own options as lockctl's); `-c TEXT` stands for CMD `sh -c TEXT`.
    """
    cmd: list[str] | None = None
    head = argv
    # The top level has no options but --help and --version, so the command is always the
    # first word; without a known one, the parser of every command says what is wrong.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command == "acquire" and "--" in argv:
        cut = argv.index("--")
        head, cmd = argv[:cut], argv[cut + 1 :]
    if command == "status" and "--watch" in argv:
        head = _watch_interval_given(argv)
    args = build_parser(command).parse_args(head, namespace=Args())
    for name in args.names:
        problem = protocol.name_problem(name)
        if problem is not None:
            raise UsageError(problem)
    if args.command == "acquire":
        _check_acquire(args, cmd)
    problem = protocol.label_problem(getattr(args, "label", None))
    if problem is not None:
        raise UsageError(f"--label: {problem}")
    if args.command == "release" and args.force and len(args.names) != 1:
        raise UsageError("release --force takes exactly one NAME")
    if args.command == "status" and args.watch is not None and args.json:
        raise UsageError(
            "--watch redraws a table for people; a script runs `lockctl status --json` as often as it needs"
        )
    if args.command == "history" and args.since is not None and args.until is not None and args.since > args.until:
        raise UsageError("--since is after --until: no event could match")
    return args


def _watch_interval_given(argv: list[str]) -> list[str]:
    """`argv` with the SEC of `status --watch` made explicit when a NAME follows `--watch`
    (argparse would take that NAME for SEC): a lock name may be a number, but a word is never
    an interval."""
    at = argv.index("--watch")
    following = argv[at + 1 : at + 2]
    if following and not following[0].startswith("-"):
        try:
            float(following[0])
        except ValueError:
            return [*argv[:at], f"--watch={DEFAULT_WATCH_INTERVAL:g}", *argv[at + 1 :]]
    return argv


def _check_acquire(args: Args, cmd: list[str] | None) -> None:
    if args.shell_command is not None:
        if cmd is not None:
            raise UsageError("give either -c 'shell command' or -- CMD, not both")
        cmd = ["sh", "-c", args.shell_command]
    if cmd == []:
        raise UsageError("no CMD after --; to take a lease for the calling shell, leave out --")
    if cmd is not None and args.pid is not None:
        raise UsageError("--pid is for a lease without CMD; with CMD, the lease is lockctl's own")
    # As in flock(1): -w 0 is -n, and -n wins over any -w.
    if args.timeout == 0:
        args.no_wait = True
    if args.no_wait:
        args.timeout = None
    args.cmd = cmd
    args.slots = _semaphores(args.given_slots or [], args.names)
    if args.shared and args.slots.keys() >= set(args.names):
        raise UsageError(
            "--shared is for locks, and every NAME here is a semaphore: a slot has no mode; leave "
            "out --shared, or name the locks to share as well"
        )


def _semaphores(given: list[tuple[str | None, int]], names: list[str]) -> dict[str, int]:
    """The NAMEs that --slots makes semaphores, with their counts."""
    every = {count for name, count in given if name is None}
    each = [(name, count) for name, count in given if name is not None]
    if every and each:
        raise UsageError(
            "give either --slots N (every NAME is a semaphore) or --slots NAME=N (that NAME is), "
            "not both; to give one NAME another count, give every semaphore as NAME=N"
        )
    if len(every) > 1:
        raise UsageError(f"--slots is given {len(every)} different counts for every NAME; give one")
    if every:
        return dict.fromkeys(names, every.pop())
    slots: dict[str, int] = {}
    for name, count in each:
        if name not in names:
            raise UsageError(
                f"--slots {name}={count}: {name} is not among the NAMEs ({', '.join(names)}); "
                "name it as well, or fix the spelling"
            )
        if slots.setdefault(name, count) != count:
            raise UsageError(f"--slots gives {name} two counts, {slots[name]} and {count}; give one")
    return slots


def main(argv: list[str] | None = None) -> int:
    """Run lockctl with `argv` (default: sys.argv[1:]); return the exit status.

    Interrupted by SIGINT, or with CMD killed by SIGINT or SIGQUIT, lockctl cleans up and
    then kills itself with that signal instead of returning, so that the shell running it
    stops its loop or script as it would for CMD run directly.
    """
    # Read first: by the time the daemon is asked, the parent may have exited (see _tie_to).
    parent = os.getppid()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        _say(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        socket_path = args.socket or paths.socket_path()
    except errors.InvalidArgument as e:
        _say(str(e))
        return EXIT_USAGE
    try:
        if args.command == "acquire":
            return _acquire(args, socket_path, parent)
        if args.command == "release":
            return _release(args, socket_path, parent)
        if args.command == "metrics":
            return _metrics(socket_path)
        if args.command == "watch":
            return _watch(args, socket_path)
        if args.command == "history":
            return _history(args, socket_path)
        if args.command == "daemon":
            return _daemon_reexec(args, socket_path)
        if args.watch is not None:
            return _status_watch(args, socket_path)
        return _status(args, socket_path)
    except KeyboardInterrupt:
        return _die_of(signal.SIGINT, group=False)
    except _Interrupted as e:
        return _die_of(e.signum, group=e.group)
    except UsageError as e:
        _say(str(e))
        return EXIT_USAGE
    except errors.LockdError as e:
        _say(_explain(e, socket_path))
        return next((code for cls, code in _EXIT_STATUS if isinstance(e, cls)), EXIT_PROTOCOL)


# The first class that matches decides; any other LockdError is EXIT_PROTOCOL.
_EXIT_STATUS: Final[tuple[tuple[type[errors.LockdError], int], ...]] = (
    (errors.DaemonBusy, EXIT_BUSY),
    (errors.DaemonUnavailable, EXIT_UNAVAILABLE),
    (errors.PermissionDenied, EXIT_DENIED),
    (errors.InvalidName, EXIT_USAGE),
    (errors.InvalidArgument, EXIT_USAGE),
    (errors.NotHeld, EXIT_NO),
    (errors.LimitExceeded, EXIT_BUSY),
    (errors.BadLockFile, EXIT_BAD_LOCK_FILE),
    (errors.LeaseLost, EXIT_LOST),
    (errors.WouldDeadlock, EXIT_DEADLOCK),
    (errors.SlotsMismatch, EXIT_MISMATCH),
    (errors.NotReexecuted, EXIT_NOT_REEXECUTED),
)


def _explain(e: errors.LockdError, socket_path: str) -> str:
    # The daemon's messages may quote what other clients chose (labels, command lines).
    text = describe.sanitize(str(e))
    if isinstance(e, errors.DaemonUnavailable) and socket_path not in text:
        return f"{text} (lockd socket: {socket_path})"
    if isinstance(e, errors.PermissionDenied):
        return f"refused: {text}"
    if not any(isinstance(e, cls) for cls, _ in _EXIT_STATUS):
        return f"{text} (is lockd newer or older than this lockctl?)"
    return text


class _Interrupted(Exception):
    """lockctl is to die of signal `signum` once it has cleaned up: CMD died of SIGINT or
    SIGQUIT, or the reader of `watch`'s output went away (SIGPIPE, as for any filter)."""

    def __init__(self, signum: int, *, group: bool) -> None:
        super().__init__(signum)
        self.signum = signum
        #: CMD had the terminal, so the keyboard's signal reached CMD's group alone: lockctl
        #: sends it to its own group (the shell script running it), as the terminal would.
        self.group = group


def _die_of(signum: int, *, group: bool) -> int:
    """Kill lockctl with `signum` (a shell stops a loop or script only for a command that
    died of SIGINT, not for one that exited 130); returns 128+N if it somehow survives."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # nobody reads it any more: dying matters, not the output
    if signum == signal.SIGQUIT:
        import resource

        # SIGQUIT dumps core by default; lockctl's core would tell nobody anything.
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    if group:
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)
    return 128 + signum


def _connect(socket_path: str, bound: float | None) -> Client:
    """A connection to lockd, waiting up to `bound` seconds (None: as long as it takes) for a
    busy lockd to take it. After a second of that, stderr says so, wherever it goes: a cron
    job's mail should say why the job started late."""
    from .blocking import connect

    notice = f"lockd at {socket_path} is busy; waiting for it to take this connection"
    if bound is not None:
        notice += f" (for at most {bound:g}s)"
    return connect(socket_path, timeout=bound, on_busy=lambda: _say(notice))


# --- acquire -------------------------------------------------------------------------------


def _acquire(args: Args, socket_path: str, parent: int) -> int:
    # -w bounds the whole wait: for a busy lockd to take the connection, then for the lock.
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    waiting = _WaitLine(_wanted(args), verbose=args.verbose)
    try:
        client = _connect(socket_path, BUSY_WAIT if args.no_wait else args.timeout)
    except errors.DaemonBusy as e:
        _say(f"{_explain(e, socket_path)}{_not_run(args)}")
        return args.conflict_exit_code
    with client:
        if not args.no_wait:
            # A slot of a semaphore of more slots can still come free: others hold the rest.
            _refuse_what_encloses_this(client, [n for n in args.names if args.slots.get(n, 1) == 1])
        if args.cmd is not None:
            kill_after = _kill_after(args.kill_after, client.server.stop_within)
            tied_to = None
        else:
            tied_to = _tie_to(args.pid, parent)
            # The keeper holds the lease's descriptors for as long as that process lives.
            client._conn.keep_tied_descriptors = True
        try:
            lease = client.acquire(
                *args.names,
                shared=args.shared,
                wait=not args.no_wait,
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                label=args.label,
                pid=tied_to,
                slots=args.slots,
                on_queued=waiting.show,
            )
        except errors.BackendUnavailable as e:
            # The daemon is still there: its own message says what failed.
            raise errors.BackendUnavailable(
                f"lockd cannot grant {waiting.wanted} now: {e}{_not_run(args)}"
            ) from None
        except errors.DaemonUnavailable as e:
            raise errors.DaemonUnavailable(
                f"lockd at {socket_path} went away before the lock was granted ({e})"
                f"{_not_run(args)}"
            ) from None
        except errors.LockBusy as e:
            waiting.clear()
            _say_busy(e, args, client)
            return args.conflict_exit_code
        finally:
            waiting.clear()
        if args.verbose:
            _say(f"acquired {_tokens_text(lease.tokens)}")
        if args.cmd is None:
            assert tied_to is not None
            _start_keeper(client, lease, tied_to)
            print("\n".join(str(lease.tokens[name]) for name in args.names))
            return 0
        return _run_under(args, args.cmd, client, lease, kill_after)


def _kill_after(asked: float | None, stop_within: float | None) -> float:
    """The --kill-after to use: what was asked (else the default), if it lets CMD's tree be
    gone before lockd may give the lock to someone else after a loss (`stop_within`)."""
    if stop_within is None:
        return DEFAULT_KILL_AFTER if asked is None else asked
    # Room for the SIGKILL to take effect and the tree to be seen gone.
    most = stop_within - min(1.0, stop_within / 4)
    if asked is None:
        return min(DEFAULT_KILL_AFTER, most)
    if asked > most:
        raise UsageError(
            f"--kill-after {asked:g} is too long for this lockd: after a lost lease it may give the "
            f"lock to someone else {stop_within:g} s later, so CMD must be gone by then; give at "
            f"most --kill-after {most:g}"
        )
    return asked


def _start_keeper(client: Client, lease: Lease, pid: int) -> None:
    """Start the process that holds the lease's descriptors for as long as `pid` lives."""
    from . import _keeper

    try:
        _keeper.start(client, lease, pid)
    except OSError as e:
        lease.release()  # tied to the process, it would outlive this failure
        if isinstance(e, ProcessLookupError):
            raise errors.NotHeld(f"process {pid} exited before its lease was granted") from None
        raise errors.LimitExceeded(f"cannot start the process that keeps the lease: {e.strerror}") from None


def _refuse_what_encloses_this(client: Client, names: list[str]) -> None:
    """Raise WouldDeadlock for a name that the lockctl running this process holds (it told
    its CMD so in LOCKD_TOKENS, and the daemon still shows that lease with that token): that
    lease ends only once its CMD, and so this, has ended. A token in an environment that
    outlived its lease (a server started from CMD) is no reason to refuse."""
    tokens = dict(item.partition("=")[::2] for item in os.environ.get("LOCKD_TOKENS", "").split())
    asked = [name for name in names if name in tokens]
    if not asked:
        return
    live = {(lock.name, str(h.token)) for lock in client.status(*asked) for h in lock.holders}
    enclosing = [name for name in asked if (name, tokens[name]) in live]
    if enclosing:
        raise errors.WouldDeadlock(
            f"{', '.join(enclosing)} is held by the lockctl that runs this command (LOCKD_TOKENS "
            "says so), until the command ends: waiting for it here would never end; leave it "
            "out, the command already holds it"
        )


def _not_run(args: Args) -> str:
    return "" if args.cmd is None else "; CMD was not started"


#: Programs that run a command as their child and exit when it does (`uv run lockctl`,
#: `timeout 60 lockctl`, `sudo -u backup lockctl`): a lease tied to one of them would end
#: as soon as lockctl has printed its tokens. Programs that exec the command (env, nice,
#: nohup) leave no process behind to skip. A shell is one only when it runs nothing but
#: lockctl (`sh -c 'lockctl acquire x'`, as PHP's exec() and Python's shell=True do).
LAUNCHERS: Final = frozenset({
    "uv", "uvx", "pipx", "poetry", "pdm", "hatch", "timeout", "time", "sudo", "doas", "su",
    "runuser",
})
#: Shells, which are launchers only when they run nothing but lockctl (see LAUNCHERS).
_SHELLS: Final = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox"})


def _tie_to(pid: int | None, parent: int) -> int:
    """The process a lease without CMD is tied to: `pid`, else lockctl's parent, if that is
    still the process that ran lockctl, or the first of its ancestors that is not a launcher
    (LAUNCHERS) that would exit with lockctl.

    A parent that exited before the lease was asked for hands lockctl to init or to a
    subreaper, which never exits: a lease tied to it would be held for ever.
    """
    if pid is not None:
        return pid
    if parent == 1 or os.getppid() != parent:
        raise errors.NotHeld(
            f"lockctl's parent process (pid {parent}) is gone or is init, so there is no process "
            "to tie the lease to; run lockctl from the shell that is to hold the lease, or give "
            "--pid PID"
        )
    tied = _beyond_launchers(parent)
    if tied <= 1:
        raise errors.NotHeld(
            f"lockctl was run through a launcher (pid {parent}) whose caller is gone or is init, "
            "so there is no process to tie the lease to; give --pid PID"
        )
    return tied


def _beyond_launchers(pid: int) -> int:
    """`pid`, or if it is a launcher (LAUNCHERS), the first of its ancestors that is not;
    1 if none is left."""
    from . import _proctree

    while pid > 1 and (_proctree.command_name(pid) in LAUNCHERS or _runs_one_command(pid)):
        try:
            pid = int(_proctree.stat_fields(pid)[1])  # its parent (field 4)
        except (OSError, IndexError, ValueError):
            return 1
        if _proctree.command_name(pid) == "systemd":
            return 1  # a service manager (a subreaper, pid 1 of a container): it never exits
    return pid


def _runs_one_command(pid: int) -> bool:
    """Whether `pid` is a shell run as `sh -c STRING` whose STRING is one simple command (no
    list, pipe, background or subshell): it exits when that command does."""
    from . import _proctree

    if _proctree.command_name(pid) not in _SHELLS:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if len(argv) < 3 or not argv[1].startswith(b"-") or b"c" not in argv[1] or argv[1].startswith(b"--"):
        return False
    script = argv[2].decode(errors="replace")
    # Anything that may run more than the one command: not something to guess about.
    if any(sign in script for sign in ("\n", "#", "`", "$(", "<(", ">(")):
        return False
    import shlex

    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.commenters = ""
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes
        return False
    operators = [w for w in words if w and all(c in "();<>|&" for c in w) and not w.startswith(("<", ">"))]
    # One simple command, and lockctl's (not `. job.sh`, `eval …`, or a script of its own).
    return (
        not operators and words[:1] not in ([], ["."], ["source"], ["eval"])
        and any(os.path.basename(w) == "lockctl" or w == "lockd_client.cli" for w in words)
    )


def _run_under(args: Args, cmd: list[str], client: Client, lease: Lease, kill_after: float) -> int:
    from . import _supervise

    env = {
        **os.environ,
        "LOCKD_TOKEN": str(lease.token),
        "LOCKD_TOKENS": _tokens_text(lease.tokens),
    }
    names = ", ".join(args.names)

    def lost_reason() -> str | None:
        return (lease.lost_reason or "the lease ended") if lease.lost else None

    try:
        ended = _supervise.run(
            cmd,
            env,
            client.fileno(),
            lease._record.fds,
            client.process_events,
            lost_reason,
            lambda: lease.detached,
            kill_after=kill_after,
        )
    except _supervise.NotStarted as e:
        # As if the lease had never been granted: the daemon went away (69), or someone
        # broke the lease and may hold the lock now (75).
        try:
            locks = client.status(*args.names)
        except errors.DaemonUnavailable:
            raise errors.DaemonUnavailable(f"the lease on {names} ended: {e}") from None
        _say(f"the lease on {names} was broken right after it was granted: {e}")
        now = time.time()
        for holder in (holder for lock in locks for holder in lock.holders):
            print(f"  held by {describe.holder_text(holder, now)}", file=sys.stderr)
        return EXIT_BUSY
    except errors.LeaseLost as e:
        raise errors.LeaseLost(f"the lease on {names} was lost: {e}") from None
    except _supervise.ExecError as e:
        _say(f"cannot run {cmd[0]!r}: {e.strerror}")
        return EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
    lease.release(exit_status=ended.status)
    if args.verbose:
        _say(f"CMD exited with status {ended.status}; released {names}")
    if ended.signal in (signal.SIGINT, signal.SIGQUIT):
        raise _Interrupted(ended.signal, group=ended.foreground)
    return ended.status


def _tokens_text(tokens: dict[str, int]) -> str:
    return " ".join(f"{name}={token}" for name, token in tokens.items())


class _WaitLine:
    """What a waiting acquire shows: one line on a terminal, rewritten as the holders change;
    nothing elsewhere, unless verbose (then one line per change)."""

    def __init__(self, wanted: str, *, verbose: bool) -> None:
        self.wanted = wanted
        self.tty = sys.stderr.isatty()
        self.verbose = verbose
        self.shown = False

    def show(self, holders: list[protocol.Holder]) -> None:
        now = time.time()
        who = "; ".join(describe.holder_text(h, now) for h in holders) or "earlier waiters"
        text = f"lockctl: waiting for {self.wanted}: held by {who}"
        if self.tty:
            width = _terminal_width(sys.stderr)
            sys.stderr.write(f"\r{text[: width - 1]}\x1b[K")
            sys.stderr.flush()
            self.shown = True
        elif self.verbose:
            _say(text.removeprefix("lockctl: "))

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _terminal_width(stream: TextIO | None) -> int:
    """The width of the terminal `stream` writes to; 80 when it is not one."""
    if stream is None:  # started without it
        return 80
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal, closed, or no descriptor
        return 80


def _say_busy(e: errors.LockBusy, args: Args, client: Client) -> None:
    wanted = _wanted(args)
    if args.timeout is not None:  # a LockTimeout, or a LockBusy if lockd took all of -w
        _say(f"gave up waiting for {wanted} after {args.timeout:g}s")
    else:
        _say(f"{wanted}: busy, and -n says not to wait")
    now = time.time()
    for holder in e.holders:
        print(f"  held by {describe.holder_text(holder, now)}", file=sys.stderr)
    if not args.slots and any(not (args.shared and holder.mode == "shared") for holder in e.holders):
        return  # a holder this request cannot share with: that says why
    # Free, or held only by holders it could share with (or with a slot to spare), but requests
    # that came first wait (for these names and others, all or none; or an exclusive one, for
    # those holders): the queue is first come, first served.
    try:
        locks = client.status(*args.names)
    except errors.LockdError:
        return  # the message above stands on its own
    if any(not _has_room(lock, args) for lock in locks):
        return  # every slot of a semaphore is taken, or a lock's holder cannot share: as said
    if args.slots and e.holders:
        lead = f"a slot is free, but earlier requests wait for {', '.join(args.names)} first"
    elif e.holders:
        lead = f"they would share {wanted}, but earlier requests wait for it first"
    else:
        lead = f"nobody holds {wanted}, but earlier requests wait for it first"
    print(f"  {lead}:", file=sys.stderr)
    seen = set()
    for lock in locks:
        for waiter in lock.waiters:
            if (waiter.pid, waiter.since) not in seen:  # one request waiting for several names
                seen.add((waiter.pid, waiter.since))
                print(f"  waiting: {describe.holder_text(waiter, now)} ({_mode_text(lock, waiter)})", file=sys.stderr)


def _has_room(lock: protocol.LockInfo, args: Args) -> bool:
    """Whether `lock`'s holders alone would let this request have it: a slot is free, or they
    could all share it with this request."""
    if lock.slots is not None:
        return _slots_used(lock) < lock.slots
    shared = args.shared and lock.name not in args.slots
    return all(shared and holder.mode == "shared" for holder in lock.holders)


def _wanted(args: Args) -> str:
    """What the request asks for, for people: `site.com, a slot of backups`."""
    return ", ".join(f"a slot of {name}" if name in args.slots else name for name in args.names)


# --- release -------------------------------------------------------------------------------


def _release(args: Args, socket_path: str, parent: int) -> int:
    if args.force:
        with _connect(socket_path, BUSY_WAIT) as client:
            (name,) = args.names
            count = client.force_release(name)
        if count == 0:
            _say(f"{name} was not held: nothing to break")
            return EXIT_NO
        _say(f"broke {count} lease{'s' if count != 1 else ''} on {name}")
        return 0
    # A shell runs its last command by exec (`bash -c 'lockctl acquire x && work && lockctl
    # release x'`): that lockctl is the shell that took the lease, with the shell's parent.
    pids = [args.pid] if args.pid else list(dict.fromkeys([parent, _beyond_launchers(parent), os.getpid()]))
    try:
        with _connect(socket_path, BUSY_WAIT) as client:
            for pid in pids:
                try:
                    client.release_pid(pid, *args.names)
                    return 0
                except errors.NotHeld:
                    if pid == pids[-1]:
                        raise
    except errors.DaemonBusy:
        raise  # lockd is there, and holds the lease: its keeper going would not end it
    except (errors.NotHeld, errors.DaemonUnavailable):
        # A lockd restarted since the lease was taken does not know it: its keeper holds it.
        from . import _keeper

        if not any(_keeper.release(pid, args.names) for pid in pids):
            raise
    return 0


# --- metrics -------------------------------------------------------------------------------


def _metrics(socket_path: str) -> int:
    with _connect(socket_path, BUSY_WAIT) as client:
        text = client.metrics()
    sys.stdout.write(text)
    return 0


# --- daemon --------------------------------------------------------------------------------


def _daemon_reexec(args: Args, socket_path: str) -> int:
    with _connect(socket_path, BUSY_WAIT) as client:
        try:
            done = client.reexec()
        except errors.PermissionDenied as e:
            raise errors.PermissionDenied(f"{e}; run it as root (sudo lockctl daemon reexec)") from None
        except errors.NotReexecuted as e:
            raise errors.NotReexecuted(
                f"{e}; lockd serves on as before, with everything it held: fix what it says, then run "
                "lockctl daemon reexec again"
            ) from None
        except errors.DaemonUnavailable as e:
            raise errors.DaemonUnavailable(
                f"no answer to the re-exec: {e}; if lockd is gone, its new program could not take over: "
                "start lockd again"
            ) from None
    if args.json:
        import msgspec

        document = {"previous": done.previous, "server": done.server, "paused": done.paused}
        sys.stdout.write(msgspec.json.encode(document).decode() + "\n")
    else:
        print(f"lockd re-executed: {done.previous} -> {done.server}, paused {pause_text(done.paused)}")
    return 0


def pause_text(seconds: float) -> str:
    """How long lockd paused: `42 ms` below a second, as pauses are; else `1.3s`."""
    if seconds < 0.9995:  # what rounds to 1000 ms reads better as 1.0s
        return f"{max(seconds, 0.0) * 1000:.0f} ms"
    return describe.duration(seconds)


# --- status --------------------------------------------------------------------------------


def _status(args: Args, socket_path: str) -> int:
    with _connect(socket_path, BUSY_WAIT) as client:
        locks = _in_use(client, args.names)
    if args.json:
        import msgspec

        sys.stdout.write(msgspec.json.encode(status_document(locks)).decode() + "\n")
    else:
        sys.stdout.write(_status_text(locks, args.names, time.time()))
    return EXIT_NO if args.names and any(lock.holders for lock in locks) else 0


def _in_use(client: Client, names: list[str]) -> list[protocol.LockInfo]:
    return [lock for lock in client.status(*names) if lock.holders or lock.waiters]


def _status_text(locks: list[protocol.LockInfo], names: list[str], now: float) -> str:
    """The status table, and which NAMEs are free; never nothing."""
    text = status_table(locks, now) if locks else ""
    # Said, not left blank: an empty answer reads like a hung or broken lockctl.
    shown = {lock.name for lock in locks}
    free = [name for name in dict.fromkeys(names) if name not in shown]
    if free:
        text += f"free: {', '.join(free)}\n"
    elif not locks:
        text += "no lock is held or waited on\n"
    return text


def _status_watch(args: Args, socket_path: str) -> int:
    """Redraw the status table on the terminal every `args.watch` seconds until interrupted."""
    if not sys.stdout.isatty():
        raise UsageError(
            "--watch redraws the table on a terminal, and stdout is not one; "
            "a script runs `lockctl status --json` as often as it needs"
        )
    interval = args.watch
    assert interval is not None
    heading = " ".join(["Every", f"{interval:g}s:", "lockctl status", *args.names])
    with _connect(socket_path, BUSY_WAIT) as client:
        while True:
            locks = _in_use(client, args.names)
            now = time.time()
            size = os.get_terminal_size(sys.stdout.fileno())
            columns, rows = size.columns or 80, size.lines or 24  # 0: a terminal that does not say
            clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            room = max(0, columns - len(clock) - 2)  # the time in the top right, as watch(1)
            header = f"{heading[:room].ljust(room)}  {clock}"
            lines = [header, "", *_status_text(locks, args.names, now).splitlines()]
            # Home, then each line over the last drawing's, erasing what is left of it: no
            # blank flash between drawings. The bottom line stays free for the cursor.
            screen = "".join(f"{line[:columns]}\x1b[K\n" for line in lines[: max(1, rows - 1)])
            sys.stdout.write(f"\x1b[H{screen}\x1b[J")
            sys.stdout.flush()
            time.sleep(interval)


def status_document(locks: list[protocol.LockInfo]) -> StatusDocument:
    """The `status --json` document (schema in docs/cli.md)."""
    return {
        "locks": [
            {
                "name": lock.name,
                "mode": lock.mode,
                "slots": lock.slots,
                "holders": [
                    {
                        "pid": h.pid,
                        "uid": h.uid,
                        "command": h.command,
                        "since": h.since or None,  # unknown for outside holders
                        "token": h.token,
                        "label": h.label,
                        "outside": h.outside,
                        "host": h.host,
                    }
                    for h in lock.holders
                ],
                "waiters": [
                    {
                        "pid": w.pid,
                        "uid": w.uid,
                        "mode": w.mode,
                        "since": w.since,
                        "command": w.command,
                        "label": w.label,
                        "host": w.host,
                    }
                    for w in lock.waiters
                ],
            }
            for lock in locks
        ]
    }


#: The header of `status_table`, one per column of its rows.
_COLUMNS: Final = ("NAME", "MODE", "PID", "USER", "FOR", "TOKEN", "COMMAND")


def status_table(locks: list[protocol.LockInfo], now: float) -> str:
    """Holders, then waiters in queue order, one row each; the name only on a lock's first row,
    with a semaphore's slots in use (`backups 2/3 slots`)."""
    rows = []
    for lock in locks:
        first = True
        parties = [*(("holder", h) for h in lock.holders), *(("waiter", w) for w in lock.waiters)]
        for role, party in parties:
            if role == "waiter":
                mode = f"waits {_mode_text(lock, party)}"
            elif party.outside:
                mode = f"{party.mode} (outside lockd)"
            else:
                mode = _mode_text(lock, party)
            command = party.command + (f" [{party.label}]" if party.label else "")
            name = lock.name if lock.slots is None else f"{lock.name} {_slots_used(lock)}/{lock.slots} slots"
            rows.append(
                (
                    name if first else "",
                    mode,
                    ("" if party.pid is None else str(party.pid))
                    + (f"@{describe.sanitize(party.host)}" if party.host else ""),
                    "" if party.uid is None else describe.user_name(party.uid),
                    describe.duration(now - party.since) if party.since else "",
                    "" if party.token is None else str(party.token),
                    describe.sanitize(command),
                )
            )
            first = False
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS) - 1)]
    lines = [
        # The last column is not padded: `widths` stops short of it.
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in [_COLUMNS, *rows]
    ]
    return "".join(line.rstrip() + "\n" for line in lines)


def _slots_used(lock: protocol.LockInfo) -> int:
    """How many of semaphore `lock`'s slots are taken: a process flocking its lock file shared
    from outside lockd takes none."""
    return sum(not holder.outside for holder in lock.holders)


def _mode_text(lock: protocol.LockInfo, party: protocol.Holder) -> str:
    """`party`'s mode on `lock` for people: `slot` for a semaphore's, which has no mode."""
    return "slot" if lock.slots is not None and not party.outside else party.mode


# --- watch ---------------------------------------------------------------------------------


def _watch(args: Args, socket_path: str) -> int:
    """Print lease events as they come until interrupted, each line flushed at once."""
    import pwd

    import msgspec

    encode = msgspec.json.Encoder().encode
    users: dict[int, str | None] = {}

    def user_of(uid: int) -> str | None:
        if uid not in users:
            try:
                users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                users[uid] = None
        return users[uid]

    with _connect(socket_path, BUSY_WAIT) as client, client.events(*args.names) as events:
        if sys.stderr.isatty():
            _say(f"watching lease events on {', '.join(args.names) or 'every lock'}; Ctrl-C to stop")
        try:
            while True:  # until interrupted: a subscription ends only with an error
                event = next(events)
                if event.user is None and event.uid is not None:
                    event.user = user_of(event.uid)  # lockd sends the uid alone
                if args.json:
                    line = encode(event).decode()
                else:
                    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
                    line = f"{clock}.{int(event.time * 1000) % 1000:03d}  {describe.event_text(event)}"
                sys.stdout.write(line + "\n")
                sys.stdout.flush()  # for a pipe, as each event happens
        except BrokenPipeError:
            raise _Interrupted(signal.SIGPIPE, group=False) from None
        except errors.SubscriptionDropped:
            _say(
                "lockd stopped sending events to this watch: they came faster than its output was read; "
                "start it again, and read its output as it comes (`lockctl history` has the events missed)"
            )
            return EXIT_BUSY


# --- history -------------------------------------------------------------------------------


def _history(args: Args, socket_path: str) -> int:
    with _connect(socket_path, BUSY_WAIT) as client:
        # One more than shown: whether the limit left out earlier events.
        events = client.history(*args.names, since=args.since, until=args.until, limit=args.limit + 1)
    more = len(events) > args.limit
    if more:
        del events[0]
        _say(
            f"showing the latest {args.limit} events; earlier ones match too: narrow --since, or raise --limit "
            f"(at most {protocol.MAX_HISTORY_LIMIT})"
        )
    if args.json:
        import msgspec

        sys.stdout.write(msgspec.json.encode({"events": events, "more": more}).decode() + "\n")
    elif events:
        width = _terminal_width(sys.stdout) if sys.stdout.isatty() else None
        sys.stdout.write(history_table(events, width))
    else:
        print("no event recorded" + (f" on {', '.join(args.names)}" if args.names else "") + " in that time")
    return 0


#: The header of `history_table`, one per column of its rows.
_HISTORY_COLUMNS: Final = ("TIME", "EVENT", "NAME", "MODE", "TOKEN", "PID", "USER", "WAITED", "HELD", "EXIT",
                           "COMMAND [LABEL] / REASON")


def history_table(events: list[protocol.LeaseEvent], width: int | None) -> str:
    """One row per event, in the order given. Within `width` characters (None: no bound),
    a row whose last column (the reason where there is one, the command and label) does
    not fit has it on a line of its own, indented, and every line is cut at the width."""
    rows = []
    for event in events:
        detail = event.command + (f" [{event.label}]" if event.label else "")
        if event.reason:
            detail = f"{event.reason}: {detail}" if detail else event.reason
        rows.append((
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time)),
            event.event,
            event.name,
            event.mode if event.slots is None else f"slot/{event.slots}",
            "" if event.token is None else str(event.token),
            "" if event.pid is None else str(event.pid),
            event.user or ("" if event.uid is None else str(event.uid)),
            "" if event.waited is None else describe.duration(event.waited),
            "" if event.held is None else describe.duration(event.held),
            "" if event.exit_status is None else str(event.exit_status),
            describe.sanitize(detail),
        ))
    widths = [max(len(row[i]) for row in [_HISTORY_COLUMNS, *rows]) for i in range(len(_HISTORY_COLUMNS) - 1)]
    lines = []
    for row in [_HISTORY_COLUMNS, *rows]:
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        if width is None or len(head) + 2 + len(row[-1]) <= width:
            lines.append(f"{head}  {row[-1]}")
        else:
            lines += [head[:width], f"    {row[-1]}"[:width]]
    return "".join(line.rstrip() + "\n" for line in lines)


def _say(message: str) -> None:
    print(f"lockctl: {message}", file=sys.stderr)


def run() -> None:
    """The `lockctl` command: `main()`, then exit at once with its status.

    Once lockctl's output is flushed, the interpreter's teardown (freeing every module's
    objects one by one) does nothing the kernel does not do at exit, and would cost lockctl
    about 5 ms of the 40 that a run takes.
    """
    status = main()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: lockctl was started with that descriptor closed
                stream.flush()
    except (OSError, ValueError):
        sys.exit(status)  # the interpreter reports an output it could not write, as ever
    os._exit(status)


if __name__ == "__main__":
    run()
