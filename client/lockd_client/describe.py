"""How lockd describes the parties of a lock to people: one phrasing for lockctl's output and
the daemon's messages alike.

Invariant: text that a client or a process chose (labels, command lines) goes into a
description only through `sanitize`, so a description is always safe to print on a terminal or
write to a log as it is.
"""

from __future__ import annotations

import pwd
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .protocol import Holder, LeaseEvent

# C0, DEL and C1 controls (ESC starts every escape sequence, so without it a sequence is inert
# text), and the Unicode marks that reorder, hide or break lines of the text around them.
_UNSAFE: Final = {
    c: "?"
    for c in [
        *range(0x20),
        *range(0x7F, 0xA0),
        *range(0x200B, 0x2010),
        *range(0x2028, 0x202F),
        *range(0x2066, 0x206A),
        0xFEFF,
    ]
}


def sanitize(text: str) -> str:
    """`text` with every control character, and so every escape sequence, made a harmless `?`.

    The length is kept, so a column of sanitized text still lines up.
    """
    return text.translate(_UNSAFE)


def holder_text(holder: Holder, now: float) -> str:
    """Who holds (or awaits) a lock, as of Unix time `now`, in one line.

    `pid 4242 (make deploy) [nightly] of alice for 3m05s`; `pid 977 (flock x.lock sh) of root,
    outside lockd` for a process holding the lock file itself; `an unknown process` when the
    daemon could not tell.
    """
    who = party_text(holder.pid, holder.command, holder.label, None if holder.uid is None else user_name(holder.uid))
    if holder.host:
        who += f" on {sanitize(holder.host)}"
    if holder.outside:
        return f"{who}, outside lockd"
    if holder.since:
        who += f" for {duration(now - holder.since)}"
    return who


def party_text(pid: int | None, command: str, label: str | None, user: str | None) -> str:
    """`pid 4242 (make deploy) [nightly] of alice`: a process, as far as it is known."""
    who = "an unknown process" if pid is None else f"pid {pid}"
    if command:
        who += f" ({sanitize(command)})"
    if label:
        who += f" [{sanitize(label)}]"
    if user is not None:
        who += f" of {sanitize(user)}"
    return who


def event_text(event: LeaseEvent) -> str:
    """A lease event in one line, without its time: what, which lock, how, who, and what
    came of it::

        granted   site.com  exclusive  token 1733821650412377  pid 4242 (./backup.sh) of alice  waited 3.1s
        released  site.com  exclusive  token 1733821650412377  pid 4242 (./backup.sh) of alice  held 2h07m  exit 0
        refused   db  3 slots  pid 4300 (./restore) of bob  waited 2.5s  timeout

    The user is `event.user`, else the number `event.uid`; the caller fills in `user` (the
    daemon leaves it out of the events it sends).
    """
    how = event.mode if event.slots is None else f"{event.slots} slots"
    parts = [event.event.ljust(8), event.name, how]
    if event.token is not None:
        parts.append(f"token {event.token}")
    user = event.user if event.user is not None or event.uid is None else str(event.uid)
    parts.append(party_text(event.pid, event.command, event.label, user))
    if event.waited is not None:
        parts.append(f"waited {duration(event.waited)}")
    if event.held is not None:
        parts.append(f"held {duration(event.held)}")
    if event.exit_status is not None:
        parts.append(f"exit {event.exit_status}")
    if event.reason:
        parts.append(sanitize(event.reason))
    return "  ".join(parts)


def user_name(uid: int) -> str:
    """The name of user `uid`, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def duration(seconds: float) -> str:
    """`0.4s`, `42s`, `3m05s`, `2h07m`, `3d04h`: precise enough to tell a stuck holder."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 9.95:  # what rounds to 10.0 reads better as 10s
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
