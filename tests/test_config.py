"""Config: file parsing, error locations, flag overrides, reload planning."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import msgspec
import pytest
from lockd_client import paths

from lockd.config import (
    Config,
    ConfigError,
    Etcd,
    HistorySection,
    Limits,
    MetricsSection,
    PolicySection,
    Rule,
    default_config_path,
    load_config,
    locate,
    parse_config,
    plan_reload,
    with_overrides,
)

FULL = """\
socket = "/srv/lockd/lockd.sock"
lock_dir = "/srv/lockd/locks"
state_dir = "/srv/lockd/state"
log_level = "debug"
lock_file_mode = 0o640
socket_mode = 0o600
listen_backlog = 512
backend = "etcd"

[limits]
max_connections = 100
max_connections_per_uid = 10
max_leases_per_connection = 1000
max_pending_per_connection = 16
max_waiters_per_name = 50
max_frame = 4096
handshake_timeout = 1.5
send_timeout = 2

[etcd]
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
ttl = 3.0
prefix = "/locks/"
ca_file = "/etc/lockd/ca.pem"
cert_file = "/etc/lockd/client.pem"
key_file = "/etc/lockd/client.key"
username = "lockd"
password = "secret"

[[policy.rules]]
names = "backup-*"
users = ["root", 0]
groups = ["root"]
modes = ["exclusive"]
allow = true

[[policy.rules]]
names = "*"
allow = false

[policy]
force_release = ["root", 1000]
"""


def test_every_option_parses_into_its_typed_field() -> None:
    config = parse_config(FULL, "full.toml")
    assert config.socket == Path("/srv/lockd/lockd.sock")
    assert config.lock_file_mode == 0o640
    assert config.listen_backlog == 512
    assert config.backend == "etcd"
    assert config.limits.send_timeout == 2.0
    assert config.limits.max_frame == 4096
    assert config.etcd.endpoints[1] == "http://10.0.0.2:2379"
    assert config.etcd.key_file == Path("/etc/lockd/client.key")
    first, second = config.policy.rules
    assert (first.names, first.users, first.modes) == ("backup-*", ["root", 0], ["exclusive"])
    assert (second.users, second.modes, second.allow) == ([], ["exclusive", "shared", "semaphore"], False)
    assert config.policy.force_release == ["root", 1000]


def test_empty_file_is_all_defaults() -> None:
    assert parse_config("", "empty.toml") == Config()
    assert Config().limits.max_frame == 65536


def _toml(value: object, key: str) -> str:
    """How docs/configuration.md spells a default value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key.endswith("_mode"):
        return f"0o{value:03o}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, key) for v in value) + "]"
    return repr(value)


def _options() -> dict[str, object]:
    """Every dotted option with its default (msgspec.NODEFAULT when required)."""
    tables = {
        "limits": ("limits.", Limits),
        "etcd": ("etcd.", Etcd),
        "policy": ("policy.", PolicySection),
        "policy.rules": ("policy.rules[].", Rule),
        "metrics": ("metrics.", MetricsSection),
        "history": ("history.", HistorySection),
    }
    found: dict[str, object] = {}

    def walk(prefix: str, struct: type[msgspec.Struct]) -> None:
        for field in msgspec.structs.fields(struct):
            key = prefix + field.name
            if key in tables:
                walk(*tables[key])
            elif field.default_factory is not msgspec.NODEFAULT:
                found[key] = field.default_factory()
            else:
                found[key] = field.default

    walk("", Config)
    return found


def test_every_option_is_documented_with_its_default() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^### `([a-z_.\[\]]+)`\n(.*?)(?=^#)", doc + "\n#", re.M | re.S))
    options = _options()
    assert sorted(sections) == sorted(options)
    for key, default in options.items():
        if default is msgspec.NODEFAULT:
            expected = "Required."
        elif default is None:
            expected = "Default: unset"
        else:
            expected = f"Default: `{_toml(default, key)}`"
        assert expected in sections[key], key


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("log_level = 'info'\n\n[limits]\nmax_connections = 'many'\n", 4, "limits.max_connections"),
        ("[limits]\nmax_connections = 0\n", 2, "limits.max_connections"),
        ("# comment\nsocket_path = '/x'\n", 2, "socket_path"),
        ("[limits]\nsend_timeout = 1.0\nmax_conections = 5\n", 3, "limits.max_conections"),
        ("[limits]\nhandshake_timeout = -1\n", 2, "limits.handshake_timeout"),
        ("log_level = 'loud'\n", 1, "log_level"),
        ("backend = 'zookeeper'\n", 1, "backend"),
        ("lock_file_mode = 0o1777\n", 1, "lock_file_mode"),
        ("state_dir = 'relative/dir'\n", 1, "state_dir"),
        ("limits = { max_frame = 10 }\n", 1, "limits.max_frame"),
        ("[etcd]\nendpoints = []\n", 2, "etcd.endpoints"),
        ("\n[etcd]\ncert_file = '/c.pem'\n", 2, "etcd"),
        ("[etcd]\nusername = 'u'\n", 1, "etcd"),
        (
            "[[policy.rules]]\nnames = 'a-*'\n\n[[policy.rules]]\nnames = 'b-*'\n"
            "modes = ['exclusive', 'sharde']\n",
            6,
            "policy.rules[1].modes[1] (rule 2)",
        ),
        ("[[policy.rules]]\nnames = 'a-*'\n[[policy.rules]]\nnames = 'b/*'\n", 3, "policy.rules[1] (rule 2)"),
        ("[[policy.rules]]\nnames = 'a'\nusers = ['no-such-user-x']\n", 1, "policy.rules[0] (rule 1)"),
        ("[[policy.rules]]\nnames = 'a'\ngroups = ['no-such-group-x']\n", 1, "policy.rules[0] (rule 1)"),
        ("[[policy.rules]]\nusers = ['root']\n", 1, "policy.rules[0] (rule 1)"),
        ("[policy]\nforce_release = [-3]\n", 2, "policy.force_release[0]"),
        ("[policy]\nforce_release = ['no-such-user-x']\n", 1, "policy"),
        ('[policy]\n"rules" = 5\n', 2, "policy.rules"),
    ],
)
def test_bad_value_is_reported_with_file_line_and_key(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/lockd/lockd.toml")
    assert str(caught.value).startswith(f"/etc/lockd/lockd.toml:{line}: {key}: ")


def test_error_messages_say_what_is_wrong() -> None:
    def error(text: str) -> str:
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "f.toml")
        return str(caught.value)

    assert "unknown key" in error("colour = 'blue'\n")
    assert "0o000 to 0o777" in error("socket_mode = 0o1000\n")
    assert "absolute path" in error("lock_dir = 'locks'\n")
    assert "no user named 'no-such-user-x'" in error(
        "[[policy.rules]]\nnames = 'a'\nusers = ['no-such-user-x']\n"
    )
    assert "given together" in error("[etcd]\nkey_file = '/k'\n")
    assert "can never match" in error("[[policy.rules]]\nnames = 'a b'\n")


def test_broken_toml_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^f\.toml: not valid TOML: .*line 3"):
        parse_config("a = 1\nb = 2\nc = = 3\n", "f.toml")


def test_nesting_too_deep_for_the_parser_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^deep.toml: not valid TOML: .*nested too deeply"):
        parse_config("a = " + "[" * 100_000 + "]" * 100_000, "deep.toml")


def test_locate_finds_the_deepest_defined_key() -> None:
    text = (
        "[limits]\n"
        "max_frame = 1\n"
        "[[policy.rules]]\n"
        "names = 'a'\n"
        "[[policy.rules]]\n"
        "names = 'b'\n"
        "users = [\n  'x',\n]\n"
        "[policy]\n"
        "force_release = []\n"
    )
    assert locate(text, ["limits", "max_frame"]) == 2
    assert locate(text, ["limits", "send_timeout"]) == 1
    assert locate(text, ["policy", "rules", 1, "users", 0]) == 7
    assert locate(text, ["policy", "rules", 0]) == 3
    assert locate(text, ["policy", "force_release"]) == 11
    assert locate(text, ["etcd", "ttl"]) is None


def test_missing_default_file_gives_defaults_with_per_uid_paths(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.toml", explicit=False)
    assert config.socket == paths.default_socket()
    assert config.lock_dir == paths.default_lock_dir()
    assert config.state_dir == paths.default_state_dir()
    assert config.limits == Limits()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.toml: no such file"):
        load_config(tmp_path / "absent.toml", explicit=True)


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, explicit=True)  # a directory


def test_load_reads_the_file_and_fills_only_unset_paths(tmp_path: Path) -> None:
    file = tmp_path / "lockd.toml"
    file.write_text('lock_dir = "/srv/locks"\n[limits]\nmax_connections = 7\n')
    config = load_config(file, explicit=True)
    assert config.lock_dir == Path("/srv/locks")
    assert config.socket == paths.default_socket()
    assert config.limits.max_connections == 7


def test_load_error_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "lockd.toml"
    file.write_text("\n\nbackend = 'nfs'\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(file))}:3: backend: "):
        load_config(file, explicit=True)


def test_default_config_path_is_etc_for_root_else_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_config_path() == Path("/etc/lockd/lockd.toml")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/.cfg")
    assert default_config_path() == Path("/home/u/.cfg/lockd/lockd.toml")


def test_flags_override_the_file() -> None:
    config = parse_config(FULL, "full.toml")
    flags = argparse.Namespace(
        socket="/tmp/s.sock", lock_dir=None, log_level="warning", config="/x.toml", foreground=True
    )
    result = with_overrides(config, flags)
    assert result.socket == Path("/tmp/s.sock")
    assert result.lock_dir == config.lock_dir  # None: not given
    assert result.log_level == "warning"
    assert result.limits == config.limits


def test_relative_path_flags_are_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = with_overrides(Config(), {"state_dir": "state", "lock_dir": Path("locks")})
    assert result.state_dir == tmp_path / "state"
    assert result.lock_dir == tmp_path / "locks"


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="^--log-level: "):
        with_overrides(Config(), {"log_level": "chatty"})


def test_etcd_flags_set_the_etcd_table_and_are_checked_like_the_file() -> None:
    config = parse_config(FULL, "full.toml")
    result = with_overrides(config, {"etcd_ttl": 2.5, "etcd_endpoints": ["https://e1:2379"], "etcd_prefix": None})
    assert result.etcd == msgspec.structs.replace(config.etcd, ttl=2.5, endpoints=["https://e1:2379"])
    with pytest.raises(ConfigError, match="^--etcd-ttl: "):
        with_overrides(config, {"etcd_ttl": float("inf")})
    with pytest.raises(ConfigError, match="^--etcd-endpoints: expected an http:// or https:// URL"):
        with_overrides(config, {"etcd_endpoints": ["e1:2379"]})


def test_reload_applies_live_fields_and_lists_the_rest() -> None:
    current = parse_config(FULL, "old")
    new_text = FULL.replace('log_level = "debug"', 'log_level = "error"')
    new_text = new_text.replace("max_connections = 100", "max_connections = 200")
    new_text = new_text.replace('backend = "etcd"', 'backend = "flock"')
    new_text = new_text.replace("ttl = 3.0", "ttl = 4.0")
    new_text = new_text.replace('names = "*"', 'names = "x-*"')
    new = parse_config(new_text, "new")

    plan = plan_reload(current, new)

    assert plan.applied == ["log_level", "limits.max_connections", "policy.rules"]
    assert plan.needs_restart == ["backend", "etcd.ttl"]
    assert plan.config.log_level == "error"
    assert plan.config.limits == new.limits
    assert plan.config.policy == new.policy
    assert plan.config.backend == "etcd"  # kept until a restart
    assert plan.config.etcd == current.etcd


def test_reload_of_an_unchanged_file_changes_nothing() -> None:
    config = parse_config(FULL, "f")
    plan = plan_reload(config, parse_config(FULL, "f"))
    assert (plan.applied, plan.needs_restart) == ([], [])
    assert plan.config == config


def test_config_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Config().log_level = "debug"  # type: ignore[misc]
