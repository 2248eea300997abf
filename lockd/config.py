"""lockd's configuration: one typed tree read from a TOML file, then overridden by flags.

Invariant: every `Config` this module returns is valid — each field has its documented type
and range, and every path is absolute. A file with an unknown key, a wrong type or a bad value
never becomes a Config: `load_config` raises `ConfigError` naming the file, the line and the
key. docs/configuration.md documents every field below with its default.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from argparse import Namespace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
from lockd_client import paths, protocol
from lockd_client.errors import LockdError

#: Where a root daemon reads its configuration; others read it under $XDG_CONFIG_HOME.
SYSTEM_CONFIG: Final = Path("/etc/lockd/lockd.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
BackendName = Literal["flock", "etcd"]
Positive = Annotated[int, msgspec.Meta(ge=1)]
#: A day bounds every duration: a longer one is surely a typo, and `inf` or `nan` would
#: overflow a deadline or compare false everywhere.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/]")]
FileMode = Annotated[int, msgspec.Meta(ge=0, le=0o777)]
#: listen(2) takes a C int.
Backlog = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
#: A user or group, by name or by numeric id.
Principal = str | Annotated[int, msgspec.Meta(ge=0)]


class ConfigError(LockdError):
    """The configuration cannot be used; the message names the file, line and key to fix."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every table: unknown keys are errors, fields are keyword-only and immutable."""


class Limits(_Section, frozen=True):
    max_connections: Positive = 4096
    max_connections_per_uid: Positive = 1024
    max_leases_per_connection: Positive = 100_000
    max_pending_per_connection: Positive = 1024
    #: Over all connections of one uid: a user cannot exhaust the daemon's memory by opening
    #: many connections each within its own limits.
    max_leases_per_uid: Positive = 200_000
    max_pending_per_uid: Positive = 10_000
    max_waiters_per_name: Positive = 10_000
    max_frame: Annotated[int, msgspec.Meta(ge=1024)] = protocol.MAX_REQUEST_FRAME
    handshake_timeout: Seconds = 5.0
    send_timeout: Seconds = 10.0
    max_subscriptions_per_uid: Positive = 64
    #: A forcibly released holder has this long to stop its work and let go before the lock
    #: is released under it: longer than lockctl's default --kill-after, with room to spare.
    break_grace: Seconds = 30.0


class Etcd(_Section, frozen=True):
    endpoints: Annotated[list[Url], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["http://127.0.0.1:2379"]
    )
    ttl: Seconds = 5.0
    prefix: Annotated[str, msgspec.Meta(min_length=1)] = "/lockd/"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be given together")


#: What a policy rule applies to: the lock modes, and taking a slot of a semaphore.
RuleMode = Literal["exclusive", "shared", "semaphore"]


class Rule(_Section, frozen=True):
    """Allows or denies the requests it matches; docs/configuration.md gives the matching."""

    names: Annotated[str, msgspec.Meta(min_length=1)]
    users: list[Principal] = []
    groups: list[Principal] = []
    modes: Annotated[list[RuleMode], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["exclusive", "shared", "semaphore"]
    )
    allow: bool = True

    def __post_init__(self) -> None:
        _check_glob(self.names)
        _check_known(self.users, pwd.getpwnam, "user")
        _check_known(self.groups, grp.getgrnam, "group")


class PolicySection(_Section, frozen=True):
    """The `[policy]` section as written; lockd.policy.Policy is what it decides."""

    rules: list[Rule] = []
    #: Who may break others' leases, besides each holder for its own.
    force_release: list[Principal] = msgspec.field(default_factory=lambda: ["root"])
    #: Who may read every user's lease events (history, subscriptions), besides their own.
    read_events: list[Principal] = msgspec.field(default_factory=lambda: ["root"])

    def __post_init__(self) -> None:
        _check_known(self.force_release, pwd.getpwnam, "user")
        _check_known(self.read_events, pwd.getpwnam, "user")


class ListenAddress(NamedTuple):
    """Where the metrics listener binds: a Unix socket's `path`, else TCP `host` and `port`."""

    path: Path | None
    host: str = ""
    port: int = 0


def listen_address(text: str) -> ListenAddress:
    """`[metrics] listen` as written, `HOST:PORT`, `[IPV6]:PORT` or `unix:/PATH`, parsed;
    raises ValueError saying what is wrong."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        problem = paths.socket_problem(path)
        if problem is not None:
            raise ValueError(problem)
        return ListenAddress(Path(path))
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"{text!r} is not an address to listen on: expected HOST:PORT (127.0.0.1:9750, "
            "[::1]:9750) or unix:/PATH"
        )
    return ListenAddress(None, host, int(port))


class MetricsSection(_Section, frozen=True):
    """The `[metrics]` section: lockd.metrics and its listener, lockd.metrics_http."""

    #: None: no listener (`lockctl metrics` still answers).
    listen: str | None = None
    #: Globs of the lock names that get series of their own.
    names: list[str] = []

    def __post_init__(self) -> None:
        for pattern in self.names:
            _check_glob(pattern)
        if self.listen is not None:
            listen_address(self.listen)


class HistorySection(_Section, frozen=True):
    """The `[history]` section: the lease events kept in the state directory (lockd.history)."""

    enabled: bool = True
    #: Seconds an event is kept: 90 days. At most a century, so a cutoff stays a real time.
    max_age: Annotated[float, msgspec.Meta(gt=0, le=100 * 365 * 86400)] = 90 * 86400.0
    #: Bytes the database may take; a few pages at least, for the schema and some events.
    max_size: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 256 * 1024 * 1024
    #: Events recorded but not yet written, beyond which new ones are dropped.
    max_backlog: Positive = 100_000


class Config(_Section, frozen=True):
    #: None until `load_config` fills in the default for the daemon's uid (lockd_client.paths).
    socket: Path | None = None
    lock_dir: Path | None = None
    state_dir: Path | None = None
    log_level: LogLevel = "info"
    lock_file_mode: FileMode = 0o600
    socket_mode: FileMode = 0o660
    #: None: the host's net.core.somaxconn (listen.somaxconn), read when the socket is bound.
    listen_backlog: Backlog | None = None
    backend: BackendName = "flock"
    limits: Limits = msgspec.field(default_factory=Limits)
    etcd: Etcd = msgspec.field(default_factory=Etcd)
    policy: PolicySection = msgspec.field(default_factory=PolicySection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    history: HistorySection = msgspec.field(default_factory=HistorySection)


_GLOB = re.compile(r"[A-Za-z0-9._@+\-*?\[\]!]+", re.ASCII)


def _check_glob(pattern: str) -> None:
    # A pattern with a character no lock name has can never match: surely a typo.
    if not _GLOB.fullmatch(pattern):
        raise ValueError(
            f"pattern {pattern!r} can never match a lock name ({protocol.NAME_RULE}); "
            "use the glob characters * ? [ ] !"
        )


def _check_known(principals: list[Principal], lookup: Callable[[str], object], kind: str) -> None:
    # A misspelt name in a policy would silently never match: refuse it at load.
    for principal in principals:
        if isinstance(principal, str):
            try:
                lookup(principal)
            except KeyError:
                raise ValueError(f"no {kind} named {principal!r} on this host") from None


def encode_hook(value: object) -> object:
    """Encodes a `Config`'s paths (for a handover: lockd.handover)."""
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def decode_hook(type_: type, value: object) -> object:
    """Decodes a `Config`'s paths, which must be absolute."""
    if type_ is Path:
        if isinstance(value, (str, Path)) and Path(value).is_absolute() and "\0" not in str(value):
            return Path(value)
        raise ValueError("expected an absolute path")
    raise NotImplementedError


def default_config_path() -> Path:
    """/etc/lockd/lockd.toml for root; $XDG_CONFIG_HOME/lockd/lockd.toml for others."""
    if os.geteuid() == 0:
        return SYSTEM_CONFIG
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "lockd" / "lockd.toml"


def load_config(path: Path | None, explicit: bool, socket: Path | None = None) -> Config:
    """Read and check the config file at `path` (None: `default_config_path()`).

    A missing file gives the defaults, unless `explicit` (the user named it with --config),
    when it is an error. Paths left unset are filled in from lockd_client.paths, the socket
    from `socket` first (the flag's, which then spares reading LOCKD_SOCKET), so the result
    has no None path. Raises ConfigError.
    """
    if path is None:
        path = default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file; create it or drop --config") from None
        return _with_default_paths(Config(), socket)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return _with_default_paths(parse_config(text, str(path)), socket)


def parse_config(text: str, source: str) -> Config:
    """Decode TOML `text` into a Config; `source` names it in errors. Raises ConfigError."""
    try:
        return msgspec.toml.decode(text, type=Config, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        problem, keys = _split_validation_error(str(exc))
        problem = _plain_problem(keys, problem)
        line = locate(text, keys)
        where = f"{source}:{line}" if line else source
        key = _dotted(keys) or "(top level)"
        raise ConfigError(
            f"{where}: {key}: {problem}; fix it (options are in docs/configuration.md)"
        ) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from None


def _plain_problem(keys: list[Key], problem: str) -> str:
    """msgspec's wording, except where it would quote a bound or a regex at the user."""
    named = [key for key in keys if isinstance(key, str)]
    last = named[-1] if named else ""
    if last.endswith("_mode") and problem.startswith("Expected `int`"):
        return "expected a file mode from 0o000 to 0o777"
    if last == "endpoints" and "regex" in problem:
        return "expected an http:// or https:// URL"
    return problem


def _with_default_paths(config: Config, flag_socket: Path | None) -> Config:
    try:
        socket = flag_socket or config.socket or paths.default_socket()
    except LockdError as exc:  # a relative LOCKD_SOCKET
        raise ConfigError(str(exc)) from None
    return msgspec.structs.replace(
        config,
        socket=socket,
        lock_dir=config.lock_dir or paths.default_lock_dir(),
        state_dir=config.state_dir or paths.default_state_dir(),
    )


# --- command-line overrides ---------------------------------------------------------------------

_TOP_FIELDS = {f.name: f.type for f in msgspec.structs.fields(Config)}
_ETCD_FIELDS = {f.name: f.type for f in msgspec.structs.fields(Etcd)}
#: Flags that set a field of the `[etcd]` table: `etcd_ttl` sets `etcd.ttl`.
_ETCD_FLAG: Final = "etcd_"


def with_overrides(config: Config, flags: Namespace | Mapping[str, Any]) -> Config:
    """`config` with each field replaced by the flag of the same name, if given.

    A flag names a top-level field (`log_level`) or, prefixed `etcd_`, a field of `[etcd]`
    (`etcd_ttl`). Flags whose value is None, and names that are no field (such as `config`),
    are ignored; relative paths are taken from the current directory. Each value is checked
    as strictly as the file's: raises ConfigError naming the flag when it is not valid.
    """
    values = vars(flags) if isinstance(flags, Namespace) else flags
    changes: dict[str, Any] = {}
    etcd: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name in _TOP_FIELDS:
            if isinstance(value, (str, os.PathLike)) and _TOP_FIELDS[name] == Path | None:
                value = Path(value).absolute()
            changes[name] = _flag_value(name, value, _TOP_FIELDS[name])
        elif name.startswith(_ETCD_FLAG) and name[len(_ETCD_FLAG):] in _ETCD_FIELDS:
            field = name[len(_ETCD_FLAG):]
            etcd[field] = _flag_value(name, value, _ETCD_FIELDS[field])
    if etcd:
        changes["etcd"] = msgspec.structs.replace(changes.get("etcd", config.etcd), **etcd)
    return msgspec.structs.replace(config, **changes)


def _flag_value(name: str, value: object, type_: object) -> Any:
    try:
        return msgspec.convert(value, type_, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        problem, _ = _split_validation_error(str(exc))
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag}: {_plain_problem([name.removeprefix(_ETCD_FLAG)], problem)}") from None


# --- reload -------------------------------------------------------------------------------------

#: Top-level fields a running daemon can take from a reloaded file; the rest need a restart.
LIVE_FIELDS: Final = frozenset({"log_level", "limits", "policy"})


class Reload(NamedTuple):
    #: What to run with now: the live fields of the new config, everything else as before.
    config: Config
    #: Dotted keys that changed and now apply.
    applied: list[str]
    #: Dotted keys that changed but apply only after a restart.
    needs_restart: list[str]


def plan_reload(current: Config, new: Config) -> Reload:
    """Compare the running config with a freshly loaded one. Pure."""
    applied: list[str] = []
    needs_restart: list[str] = []
    live: dict[str, Any] = {}
    for name in _TOP_FIELDS:
        changed = _changed_keys(name, getattr(current, name), getattr(new, name))
        if not changed:
            continue
        if name in LIVE_FIELDS:
            applied += changed
            live[name] = getattr(new, name)
        else:
            needs_restart += changed
    return Reload(msgspec.structs.replace(current, **live), applied, needs_restart)


def _changed_keys(key: str, old: object, new: object) -> list[str]:
    # Descend into tables so a log line can say `limits.max_connections`, not just `limits`;
    # lists (rules, endpoints) are compared whole.
    if old == new:
        return []
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        return [
            changed
            for field in old.__struct_fields__
            for changed in _changed_keys(f"{key}.{field}", getattr(old, field), getattr(new, field))
        ]
    return [key]


# --- finding the line of a key ------------------------------------------------------------------

_AT = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")

Key = str | int


def _split_validation_error(message: str) -> tuple[str, list[Key]]:
    """Split msgspec's "problem - at `$.a.b[0]`" into the problem and the path's parts."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any string
    problem, path = match["problem"], match["path"] or ""
    keys: list[Key] = [
        name if name else int(index) for name, index in _PATH_PART.findall(path)
    ]
    unknown = _UNKNOWN.match(problem)
    if unknown:
        keys.append(unknown["field"])
        problem = "unknown key"
    return problem, keys


def _dotted(keys: list[Key]) -> str:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    if keys[:2] == ["policy", "rules"] and len(keys) > 2 and isinstance(keys[2], int):
        out += f" ({rule_ordinal(keys[2])})"
    return out


def rule_ordinal(index: int) -> str:
    """How users see `policy.rules[index]`: refusals count rules from 1, as people do."""
    return f"rule {index + 1}"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_ASSIGN = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", dotted)]


def locate(text: str, keys: list[Key]) -> int | None:
    """The 1-based line of `text` that defines the deepest known prefix of `keys`, if any.

    `keys` is a path into the decoded document (array-of-tables entries are numbered in order).
    Good enough for error messages: multi-line strings are not tracked.
    """
    best: tuple[int, int] | None = None  # (matched parts, line)
    table: list[Key] = []
    array_counts: dict[tuple[str, ...], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            names = _split_key(header[2])
            if header[1] == "[[":
                index = array_counts.get(tuple(names), -1) + 1
                array_counts[tuple(names)] = index
                table = [*names, index]
            else:
                table = list(names)
            here: list[Key] = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            here = [*table, *_split_key(assign[1])]
        if keys[: len(here)] == here and (best is None or len(here) > best[0]):
            best = (len(here), lineno)
    return best[1] if best else None
