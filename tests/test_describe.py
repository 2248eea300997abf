"""The one phrasing of holders for people, and making client-chosen text safe to print."""

from __future__ import annotations

import os
import pwd

import pytest
from lockd_client import describe, protocol

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("make deploy --fast", "make deploy --fast"),
        ("\x1b[31mred\x1b[0m", "?[31mred?[0m"),
        ("\x1b]0;title\x07", "?]0;title?"),
        ("one\ntwo\rthree\ttab", "one?two?three?tab"),
        ("\x9b2J c1 \x7f", "?2J c1 ?"),
        ("abc\u202edcba\u2066x\u2069\u200b\u2028", "abc?dcba?x???"),
        ("café ✓ 日本", "café ✓ 日本"),
    ],
)
def test_sanitize_makes_controls_inert_and_keeps_the_rest(text: str, shown: str) -> None:
    assert describe.sanitize(text) == shown
    assert len(describe.sanitize(text)) == len(text)


def holder(**fields) -> protocol.Holder:
    return protocol.Holder(**{"pid": 4242, "uid": os.getuid(), "since": 1000.0, **fields})


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"command": "make deploy"}, f"pid 4242 (make deploy) of {ME} for 3m05s"),
        ({"command": "rsync", "label": "nightly"}, f"pid 4242 (rsync) [nightly] of {ME} for 3m05s"),
        (
            {"command": "flock x.lock sh", "outside": True, "since": 0.0},
            f"pid 4242 (flock x.lock sh) of {ME}, outside lockd",
        ),
        ({"pid": None, "uid": None, "since": 0.0}, "an unknown process"),
        ({"uid": None, "command": "a\x1bb", "label": "\n"}, "pid 4242 (a?b) [?] for 3m05s"),
    ],
)
def test_holder_text(fields: dict, text: str) -> None:
    assert describe.holder_text(holder(**fields), now=1185.0) == text


def test_an_unknown_uid_shows_as_its_number() -> None:
    assert describe.user_name(2**31 - 7) == str(2**31 - 7)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1, "0.0s"),
        (0.42, "0.4s"),
        (9.96, "10s"),
        (42.4, "42s"),
        (185, "3m05s"),
        (7620, "2h07m"),
        (273600, "3d04h"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert describe.duration(seconds) == text


def lease_event(**fields) -> protocol.LeaseEvent:
    return protocol.LeaseEvent(**{
        "time": 1000.0, "event": "granted", "name": "site.com", "mode": "exclusive", "token": 17, "pid": 4242,
        "uid": 1000, "user": "alice", "command": "./backup.sh", **fields,
    })


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"waited": 3.14}, "granted   site.com  exclusive  token 17  pid 4242 (./backup.sh) of alice  waited 3.1s"),
        (
            {"event": "released", "held": 7620.0, "exit_status": 3, "label": "nightly"},
            "released  site.com  exclusive  token 17  pid 4242 (./backup.sh) [nightly] of alice  held 2h07m  exit 3",
        ),
        (
            {"event": "refused", "token": None, "mode": "shared", "slots": 3, "waited": 2.5, "reason": "timeout"},
            "refused   site.com  3 slots  pid 4242 (./backup.sh) of alice  waited 2.5s  timeout",
        ),
        (
            {"event": "lost", "held": 1.0, "reason": "broken by pid 1 (\x1b[2Jx)", "user": None},
            "lost      site.com  exclusive  token 17  pid 4242 (./backup.sh) of 1000  held 1.0s  "
            "broken by pid 1 (?[2Jx)",
        ),
        (
            {"pid": None, "uid": None, "user": None, "command": ""},
            "granted   site.com  exclusive  token 17  an unknown process",
        ),
    ],
)
def test_event_text(fields: dict, text: str) -> None:
    assert describe.event_text(lease_event(**fields)) == text
