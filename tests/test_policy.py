"""The access-control policy: rule matching, first-match order, force-release, config errors.

Uses users and groups every Debian host has: root (0), daemon (1), backup (34), nobody
(65534); groups root (0), adm (4), backup (34), nogroup (65534).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lockd_client import errors, protocol

from lockd import config
from lockd.config import ConfigError, parse_config
from lockd.policy import MODES, Decision, Policy

ROOT, DAEMON, BACKUP, NOBODY = 0, 1, 34, 65534
ADM, NOGROUP = 4, 65534


def policy(*rules: dict, **section: object) -> Policy:
    return Policy.from_config(config.PolicySection(rules=[config.Rule(**rule) for rule in rules], **section))


def allowed(p: Policy, uid: int, name: str, mode: str = "exclusive", gids: tuple[int, ...] = ()) -> bool:
    """Whether `uid` may take `name` in `mode`: a lock mode, or `semaphore` for a slot."""
    if mode == "semaphore":
        return p.check_acquire(uid, set(gids), [name], "shared", {name}) is None
    return p.check_acquire(uid, set(gids), [name], mode) is None


def refusal(p: Policy, uid: int, gids: set[int], names: list[str], mode: str) -> str | None:
    """The message of the error `check_acquire` refuses with, or None."""
    error = p.check_acquire(uid, gids, names, mode)
    return None if error is None else str(error)


# --- the default policy -----------------------------------------------------------------------


DEFAULT = Policy.from_config(parse_config("", "empty.toml").policy)


@pytest.mark.parametrize("uid", [ROOT, BACKUP, NOBODY])
@pytest.mark.parametrize("mode", MODES)
def test_default_policy_allows_every_acquire(uid: int, mode: str) -> None:
    assert DEFAULT.check_acquire(uid, {uid}, ["db", "backup-x"], mode) is None


def test_default_force_release_is_root_or_the_holders_own_user() -> None:
    p = DEFAULT
    assert p.check_force(ROOT, "db", [BACKUP, NOBODY]).allowed
    assert p.check_force(BACKUP, "db", [BACKUP]).allowed
    assert p.check_force(BACKUP, "db", [BACKUP, BACKUP]).allowed
    assert p.check_force(BACKUP, "db", []).allowed  # nothing to break
    refused = p.check_force(BACKUP, "db", [BACKUP, NOBODY])
    assert refused == Decision(
        False,
        "force_release [root] does not include uid 34, and db is held by uid 65534: "
        "only those users or the holder's own user may force a release",
    )


# --- matching -------------------------------------------------------------------------------


def test_refusal_names_the_rule_as_written() -> None:
    p = policy(
        {"names": "public-*", "allow": True},
        {"names": "backup-*", "users": ["backup"], "allow": False},
    )
    error = p.check_acquire(BACKUP, {BACKUP}, ["backup-db"], "exclusive")
    assert isinstance(error, errors.PermissionDenied)
    assert error.code == protocol.ErrorCode.PERMISSION_DENIED
    assert str(error).startswith('rule 2 (names "backup-*", users [backup]) denies uid 34 exclusive on backup-db; ')
    assert "administrator" in str(error)


def test_policy_from_a_config_file() -> None:
    cfg = parse_config(
        """
[policy]
force_release = ["root", "backup"]

[[policy.rules]]
names = "a*"
users = ["nobody", 34]
groups = ["adm", 0]
modes = ["shared"]
allow = false

[[policy.rules]]
names = "b?"
""",
        "lockd.toml",
    )
    p = Policy.from_config(cfg.policy)
    first, second = p.rules
    assert first.text == 'rule 1 (names "a*", users [nobody, 34], groups [adm, 0], modes [shared])'
    assert first.uids == {NOBODY, BACKUP} and first.gids == {ADM, ROOT}
    assert first.modes == {"shared"} and not first.allow
    assert second.text == 'rule 2 (names "b?")'  # every user, every mode, allow by default
    assert second.allow and second.modes == set(MODES) and not second.uids and not second.gids
    assert p.force_uids == {ROOT, BACKUP}


def test_first_matching_rule_wins() -> None:
    allow_first = policy({"names": "db", "allow": True}, {"names": "*", "allow": False})
    deny_first = policy({"names": "*", "allow": False}, {"names": "db", "allow": True})
    assert allowed(allow_first, NOBODY, "db")
    assert not allowed(allow_first, NOBODY, "other")
    assert not allowed(deny_first, NOBODY, "db")
    assert str(deny_first.check_acquire(NOBODY, set(), ["db"], "shared")).startswith('rule 1 (names "*")')


def test_no_matching_rule_allows() -> None:
    p = policy({"names": "secret-*", "allow": False})
    assert allowed(p, NOBODY, "public")
    assert allowed(p, NOBODY, "Secret-x")  # globs are case-sensitive, like lock file names


# Every combination of who asks (uid, groups) and how (mode) against a rule restricted by
# users, by groups, by both, and by mode: the rule applies when the mode is listed (or none
# is) and the caller is a listed user or in a listed group (or none is listed).
WHO = [(BACKUP, ()), (BACKUP, (ADM,)), (NOBODY, ()), (NOBODY, (ADM,)), (NOBODY, (NOGROUP, ADM)), (ROOT, (ROOT,))]
RESTRICTIONS = [
    ({}, lambda uid, gids: True),
    ({"users": ["backup"]}, lambda uid, gids: uid == BACKUP),
    ({"groups": ["adm"]}, lambda uid, gids: ADM in gids),
    ({"users": ["backup"], "groups": ["adm"]}, lambda uid, gids: uid == BACKUP or ADM in gids),
    ({"users": ["root", "nobody"]}, lambda uid, gids: uid in (ROOT, NOBODY)),
]
MODE_LISTS = [None, ["exclusive"], ["shared"], ["exclusive", "shared"], ["semaphore"], ["shared", "semaphore"]]


@pytest.mark.parametrize(("restriction", "applies_to"), RESTRICTIONS)
@pytest.mark.parametrize("modes", MODE_LISTS)
def test_rule_applies_exactly_to_listed_users_groups_and_modes(restriction, applies_to, modes) -> None:
    rule = {"names": "db*", "allow": False, **restriction}
    if modes is not None:
        rule["modes"] = modes
    p = policy(rule)
    for (uid, gids), mode in itertools.product(WHO, MODES):
        # A slot keeps others out as an exclusive lease does: rules about exclusive cover it.
        covered = modes is None or mode in modes or (mode == "semaphore" and "exclusive" in modes)
        applies = applies_to(uid, set(gids)) and covered
        assert allowed(p, uid, "db1", mode, gids) is not applies, (uid, gids, mode)
        assert allowed(p, uid, "other", mode, gids), "a rule never applies to a name it does not match"


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("db", "db", True),
        ("db", "db2", False),
        ("db*", "db", True),
        ("db*", "db.replica", True),
        ("*", "anything.at-all", True),
        ("db?", "db1", True),
        ("db?", "db12", False),
        ("db[0-9]", "db7", True),
        ("db[0-9]", "dbx", False),
        ("db[!0-9]", "dbx", True),
        ("*.prod", "api.prod", True),
        ("*.prod", "api.prod.old", False),
        ("DB", "db", False),
    ],
)
def test_names_are_shell_globs(pattern: str, name: str, matches: bool) -> None:
    p = policy({"names": pattern, "allow": False})
    assert allowed(p, NOBODY, name) is not matches


def test_multi_name_acquire_is_refused_on_the_first_denied_name() -> None:
    p = policy({"names": "ok-*", "allow": True}, {"names": "no-*", "allow": False})
    refused = refusal(p, NOBODY, set(), ["ok-1", "free", "no-2", "no-3"], "exclusive")
    assert refused is not None and refused.startswith('rule 2 (names "no-*") denies uid 65534 exclusive on no-2; ')
    assert p.check_acquire(NOBODY, set(), ["ok-1", "free", "ok-2"], "shared") is None


def test_rules_apply_to_root_too() -> None:
    # Root is not exempt: an administrator who fences a name off means it for every client.
    p = policy({"names": "frozen", "allow": False})
    assert not allowed(p, ROOT, "frozen", gids=(ROOT,))


def test_group_restricted_socket_policy_example() -> None:
    """The example of docs/security.md: backups only by backup, everyone else anything else."""
    p = policy(
        {"names": "backup-*", "users": ["backup"], "allow": True},
        {"names": "backup-*", "modes": ["exclusive"], "allow": False},
    )
    assert allowed(p, BACKUP, "backup-db")
    assert allowed(p, NOBODY, "backup-db", "shared")
    assert not allowed(p, NOBODY, "backup-db", "exclusive")
    assert allowed(p, NOBODY, "web")


# --- force release ----------------------------------------------------------------------------


def test_each_user_reads_their_own_events_and_read_events_everyones() -> None:
    assert [DEFAULT.events_visible_to(uid) for uid in (ROOT, BACKUP)] == [None, BACKUP]
    p = policy(read_events=["backup"])
    assert [p.events_visible_to(uid) for uid in (ROOT, BACKUP, NOBODY)] == [ROOT, None, NOBODY]


def test_force_release_list_replaces_the_default() -> None:
    p = policy(force_release=["backup", 1])
    assert p.force_uids == {BACKUP, DAEMON}
    assert p.check_force(BACKUP, "x", [NOBODY]) == Decision(True, "force_release [backup, 1] includes uid 34")
    assert p.check_force(DAEMON, "x", [NOBODY, ROOT]).allowed
    refused = p.check_force(ROOT, "x", [NOBODY])
    assert not refused.allowed
    assert refused.reason.startswith("force_release [backup, 1] does not include uid 0, and x is held by uid 65534")


def test_empty_force_release_leaves_only_the_holders_own_user() -> None:
    p = policy(force_release=[])
    assert not p.check_force(ROOT, "x", [NOBODY]).allowed
    assert p.check_force(NOBODY, "x", [NOBODY]).allowed


def test_force_refusal_lists_every_other_holder_once() -> None:
    p = DEFAULT
    refused = p.check_force(NOBODY, "cfg", [BACKUP, NOBODY, DAEMON, BACKUP])
    assert "cfg is held by uid 1, 34:" in refused.reason
    assert isinstance(refused.error(), errors.PermissionDenied)


# --- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[policy.rules]]\nnames = "x"\nusers = ["no-such-user-lockd"]\n', "no user named 'no-such-user-lockd'"),
        ('[[policy.rules]]\nnames = "x"\ngroups = ["no-such-group-lockd"]\n', "no group named 'no-such-group-lockd'"),
        ('[policy]\nforce_release = ["root", "no-such-user-lockd"]\n', "no user named 'no-such-user-lockd'"),
    ],
)
def test_unknown_users_and_groups_fail_the_load(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Policy.from_config(parse_config(toml, "lockd.toml").policy)


# --- properties -------------------------------------------------------------------------------

GLOBS = st.sampled_from(["*", "a*", "b*", "a?", "?b", "[ab]*", "ab", "ba", "c*"])
NAMES = st.sampled_from(["a", "ab", "ba", "b", "aa", "bb", "c1", "cab"])
UIDS = st.sampled_from([ROOT, DAEMON, BACKUP, NOBODY])
GIDS = st.sets(st.sampled_from([ROOT, ADM, BACKUP, NOGROUP]), max_size=3)
MODE = st.sampled_from(["exclusive", "shared"])
RULES = st.lists(
    st.fixed_dictionaries(
        {"names": GLOBS, "allow": st.booleans()},
        optional={
            "users": st.lists(st.sampled_from(["root", "daemon", "backup", "nobody", 34]), max_size=2),
            "groups": st.lists(st.sampled_from(["root", "adm", "backup", "nogroup"]), max_size=2),
            "modes": st.lists(MODE, min_size=1, max_size=2),
        },
    ),
    max_size=6,
)


@given(RULES, UIDS, GIDS, st.lists(NAMES, min_size=1, max_size=4), MODE)
def test_a_set_is_allowed_exactly_when_each_name_is(rules, uid, gids, names, mode) -> None:
    p = policy(*rules)
    each = [refusal(p, uid, gids, [name], mode) for name in names]
    together = refusal(p, uid, gids, names, mode)
    assert together == next((r for r in each if r is not None), None)


@given(RULES, RULES, UIDS, GIDS, NAMES, MODE)
def test_rules_after_the_first_match_never_change_the_decision(rules, more, uid, gids, name, mode) -> None:
    first = policy(*rules)
    if any(rule.matches(uid, gids, name, mode) for rule in first.rules):
        assert refusal(policy(*rules, *more), uid, gids, [name], mode) == refusal(first, uid, gids, [name], mode)


@given(RULES, UIDS, GIDS, st.lists(NAMES, min_size=1, max_size=4), MODE)
def test_only_a_deny_rule_can_refuse(rules, uid, gids, names, mode) -> None:
    allowing = [{**rule, "allow": True} for rule in rules]
    assert policy(*allowing).check_acquire(uid, gids, names, mode) is None


@given(st.sets(UIDS, max_size=3), UIDS, st.lists(UIDS, max_size=4))
def test_force_is_allowed_exactly_to_listed_users_or_the_sole_holder(force, uid, holders) -> None:
    p = Policy((), {u: str(u) for u in force})
    decision = p.check_force(uid, "x", holders)
    assert decision.allowed == (uid in force or set(holders) <= {uid})


def test_config_errors_and_refusals_count_rules_alike() -> None:
    """The second [[policy.rules]] is "rule 2" in a refusal and in a config error alike."""
    second = "[[policy.rules]]\nnames = 'a'\n[[policy.rules]]\nnames = 'b'\nallow = false\n"
    loaded = Policy.from_config(parse_config(second, "f.toml").policy)
    assert refusal(loaded, NOBODY, set(), ["b"], "exclusive").startswith('rule 2 (names "b")')
    with pytest.raises(ConfigError, match=r"^f\.toml:3: policy\.rules\[1\] \(rule 2\): "):
        parse_config(second + "users = ['no-such-user-x']\n", "f.toml")
