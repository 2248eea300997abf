"""Who may lock which names, in which modes, and who may break other users' leases.

Invariants:
- A decision depends only on the caller's kernel-reported identity (uid and gids, from
  SO_PEERCRED at connect time), the names, the mode and the rules: never on anything the
  client says about itself. Checking does no I/O; user and group names are resolved to ids
  once, when the policy is loaded, and an unknown name fails the load.
- Rules are tried in the order written, per name; the first rule that matches decides. A name
  no rule matches is allowed: the policy denies only where the administrator wrote a rule
  that denies. An acquire is allowed only if every one of its names is.
- A forced release is allowed to the users listed in `force_release` (default: root) and to
  anyone whose own uid is the only one holding the lock.
- Every user may read the lease events (history, subscriptions) of their own uid; the users
  listed in `read_events` (default: root) may read everyone's.
- Every refusal names the rule that refused, as the administrator wrote it, counting rules
  from 1 as config errors do (`policy.rules[1] (rule 2)`).
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final, get_args

from lockd_client.errors import PermissionDenied

from . import config
from .config import ConfigError

MODES: tuple[str, ...] = get_args(config.RuleMode)
_ADVICE: Final = "the daemon's policy ([policy] in its config file) decides this; ask its administrator"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a forced-release check. `reason` names what decided."""

    allowed: bool
    reason: str

    def error(self) -> PermissionDenied:
        """The error a refused client receives."""
        return _denied(self.reason)


def _denied(reason: str) -> PermissionDenied:
    return PermissionDenied(f"{reason}; {_ADVICE}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[policy.rules]]` entry, ids resolved. Empty `uids` and `gids` match every user."""

    #: How the rule reads in messages: 'rule 2 (names "backup-*", users [backup])'.
    text: str
    #: A shell-style glob (fnmatch), matched case-sensitively against the whole name.
    pattern: str
    uids: frozenset[int]
    gids: frozenset[int]
    modes: frozenset[str]
    allow: bool

    def matches(self, uid: int, gids: Collection[int], name: str, mode: str) -> bool:
        # A slot keeps plain-lock users and outside exclusive flocks out as an exclusive
        # lease does (and one slot of one is a mutex): a rule about `exclusive` covers it.
        if mode not in self.modes and not (mode == "semaphore" and "exclusive" in self.modes):
            return False
        if (self.uids or self.gids) and uid not in self.uids and self.gids.isdisjoint(gids):
            return False
        return fnmatchcase(name, self.pattern)


class Policy:
    """An access-control policy: ordered rules plus the force-release list. Immutable."""

    __slots__ = ("rules", "force_uids", "_force_text", "event_reader_uids")

    def __init__(
        self, rules: Iterable[Rule], force_uids: Mapping[int, str], event_reader_uids: Iterable[int] = (0,)
    ) -> None:
        """`force_uids` maps each uid that may force any release to how the config named it;
        `event_reader_uids` may read every user's lease events."""
        self.rules = tuple(rules)
        self.force_uids = frozenset(force_uids)
        self._force_text = f"force_release [{', '.join(force_uids.values())}]"
        self.event_reader_uids = frozenset(event_reader_uids)

    @classmethod
    def from_config(cls, section: config.PolicySection) -> Policy:
        """Build the policy from the config's `[policy]` table, resolving user and group names.

        Reads the user and group databases; raises ConfigError for a name they do not know.
        """
        rules = [_load_rule(index, rule) for index, rule in enumerate(section.rules)]
        where = "policy.force_release"
        force_uids = {_resolve(user, pwd.getpwnam, "user", where): str(user) for user in section.force_release}
        readers = [_resolve(user, pwd.getpwnam, "user", "policy.read_events") for user in section.read_events]
        return cls(rules, force_uids, readers)

    def check_acquire(
        self, uid: int, gids: Collection[int], names: Iterable[str], mode: str, semaphores: Collection[str] = ()
    ) -> PermissionDenied | None:
        """None if `uid` (member of `gids`) may hold every one of `names`, a slot of those in
        `semaphores` (mode `semaphore`) and the others in `mode`; else the error the client
        receives, naming the rule that refused the first name it refuses.

        Runs on every acquire, so an allowed one builds nothing.
        """
        if not self.rules:
            return None
        for name in names:
            used = "semaphore" if name in semaphores else mode
            rule = self._first_match(uid, gids, name, used)
            if rule is not None and not rule.allow:
                return _denied(f"{rule.text} denies uid {uid} {used} on {name}")
        return None

    def events_visible_to(self, uid: int) -> int | None:
        """Whose lease events `uid` may read: None for everyone's, else the uid itself."""
        return None if uid in self.event_reader_uids else uid

    def check_force(self, uid: int, name: str, holder_uids: Iterable[int]) -> Decision:
        """May `uid` break every lease on `name`, whose holders run as `holder_uids`?"""
        others = sorted(set(holder_uids) - {uid})
        if not others:
            return Decision(True, f"uid {uid} holds every lease on {name} itself")
        if uid in self.force_uids:
            return Decision(True, f"{self._force_text} includes uid {uid}")
        whose = ", ".join(map(str, others))
        return Decision(
            False,
            f"{self._force_text} does not include uid {uid}, and {name} is held by uid {whose}: "
            "only those users or the holder's own user may force a release",
        )

    def _first_match(self, uid: int, gids: Collection[int], name: str, mode: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(uid, gids, name, mode):
                return rule
        return None


def _load_rule(index: int, rule: config.Rule) -> Rule:
    ordinal = config.rule_ordinal(index)
    where = f"policy.rules[{index}] ({ordinal})"
    parts = [f'names "{rule.names}"']
    parts += [f"{label} [{', '.join(map(str, values))}]" for label, values in
              (("users", rule.users), ("groups", rule.groups)) if values]
    if set(rule.modes) != set(MODES):
        parts.append(f"modes [{', '.join(rule.modes)}]")
    return Rule(
        text=f"{ordinal} ({', '.join(parts)})",
        pattern=rule.names,
        uids=frozenset(_resolve(u, pwd.getpwnam, "user", f"{where}.users") for u in rule.users),
        gids=frozenset(_resolve(g, grp.getgrnam, "group", f"{where}.groups") for g in rule.groups),
        modes=frozenset(rule.modes),
        allow=rule.allow,
    )


def _resolve(principal: str | int, lookup: Callable[[str], Any], kind: str, where: str) -> int:
    if isinstance(principal, int):
        return principal
    try:
        number: int = lookup(principal)[2]  # pw_uid / gr_gid
        return number
    except KeyError:
        raise ConfigError(f"{where}: no {kind} named {principal!r} on this host; create it or fix the name") from None
