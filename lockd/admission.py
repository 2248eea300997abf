"""Admission: whether a new connection or a new acquire stays within `[limits]`.

Invariant: these are pure decisions — counts and limits in, a refusal or None out, no I/O and
no state — and every refusal names the limit it hit (its config key) and what to do next.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from lockd_client.errors import LimitExceeded

from .config import Limits


def connection_refusal(limits: Limits, connections: int, of_uid: int, uid: int) -> str | None:
    """Why a new connection of `uid` is refused, given `connections` open in all and `of_uid`
    of them from that uid; None to admit it."""
    if connections >= limits.max_connections:
        return (
            f"the daemon serves its maximum of {limits.max_connections} connections "
            "(limits.max_connections); retry later"
        )
    if of_uid >= limits.max_connections_per_uid:
        return (
            f"uid {uid} already has {limits.max_connections_per_uid} connections "
            "(limits.max_connections_per_uid); close some or retry later"
        )
    return None


def acquire_refusal(
    limits: Limits,
    names: Collection[str],
    *,
    waits: bool,
    requests: int,
    pending: int,
    waiting_on: Callable[[str], int],
    uid_requests: int,
    uid_pending: Callable[[], int],
) -> LimitExceeded | None:
    """The error refusing an acquire of `names` from a connection whose leases and requests
    cover `requests` names, `pending` of the requests not yet granted; None to admit it.

    An acquire that cannot wait (`waits` false) is never refused for the waiting limits: it
    is answered at once either way. `waiting_on(name)` counts the requests waiting on a name;
    `uid_requests` and `uid_pending()` count over every connection of the caller's uid.
    `uid_pending()` costs a pass over those connections, so it is called only when it could
    reach its limit: every pending request covers at least one name, so it is at most
    `uid_requests`.
    """
    adding = len(set(names))
    if requests + adding > limits.max_leases_per_connection:
        return LimitExceeded(
            f"this connection's leases and requests already cover {limits.max_leases_per_connection} names "
            "(limits.max_leases_per_connection); release some first"
        )
    if uid_requests + adding > limits.max_leases_per_uid:
        return LimitExceeded(
            f"your user's leases and requests already cover {limits.max_leases_per_uid} names over all "
            "its connections (limits.max_leases_per_uid); release some first"
        )
    if not waits:
        return None
    if pending >= limits.max_pending_per_connection:
        return LimitExceeded(
            f"this connection already has {limits.max_pending_per_connection} waiting requests "
            "(limits.max_pending_per_connection); wait for some to be granted first"
        )
    if uid_requests >= limits.max_pending_per_uid and uid_pending() >= limits.max_pending_per_uid:
        return LimitExceeded(
            f"your user already has {limits.max_pending_per_uid} waiting requests over all its "
            "connections (limits.max_pending_per_uid); wait for some to be granted first"
        )
    for name in names:
        if waiting_on(name) >= limits.max_waiters_per_name:
            return LimitExceeded(
                f"{name} already has {limits.max_waiters_per_name} waiters "
                "(limits.max_waiters_per_name); retry later"
            )
    return None
