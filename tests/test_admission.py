"""Admission decisions: every limit at, below and above its value, and what a refusal says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lockd_client.errors import LimitExceeded

from lockd.admission import acquire_refusal, connection_refusal
from lockd.config import Limits

LIMITS = Limits(
    max_connections=10, max_connections_per_uid=4, max_leases_per_connection=5,
    max_pending_per_connection=3, max_waiters_per_name=2, max_leases_per_uid=8, max_pending_per_uid=6,
)


def no_waiters(name: str) -> int:
    return 0


@pytest.mark.parametrize(
    ("connections", "of_uid", "limit"),
    [(10, 0, "limits.max_connections"), (20, 9, "limits.max_connections"), (9, 4, "limits.max_connections_per_uid")],
)
def test_a_connection_over_a_limit_is_refused_naming_it(connections: int, of_uid: int, limit: str) -> None:
    refusal = connection_refusal(LIMITS, connections, of_uid, 1000)
    assert refusal is not None and f"({limit})" in refusal and "retry later" in refusal


def test_a_connection_under_the_limits_is_admitted() -> None:
    assert connection_refusal(LIMITS, 9, 3, 1000) is None
    assert "uid 1000 already has 4" in (connection_refusal(LIMITS, 0, 4, 1000) or "")


def refusal(
    requests: int = 0, pending: int = 0, waits: bool = True, waiting=no_waiters, names=("a",),
    uid_requests: int = 0, uid_pending: int = 0,
) -> str | None:
    error = acquire_refusal(
        LIMITS, names, waits=waits, requests=requests, pending=pending, waiting_on=waiting,
        # As in the daemon, the uid's requests include its pending ones, each of at least one name.
        uid_requests=max(requests, uid_requests, uid_pending), uid_pending=lambda: max(pending, uid_pending),
    )
    assert error is None or isinstance(error, LimitExceeded)
    return None if error is None else str(error)


def test_leases_and_requests_of_a_connection_are_capped_whether_or_not_they_wait() -> None:
    assert refusal(requests=4) is None
    for waits in (True, False):
        message = refusal(requests=5, waits=waits)
        assert message is not None and "already cover 5 names" in message
        assert "(limits.max_leases_per_connection); release some first" in message


def test_pending_requests_are_capped_only_for_requests_that_may_wait() -> None:
    assert refusal(pending=2) is None
    message = refusal(pending=3)
    assert message is not None and "(limits.max_pending_per_connection)" in message
    assert refusal(pending=3, waits=False) is None  # answered at once either way


def test_waiters_per_name_are_capped_on_each_name() -> None:
    waiting = {"a": 1, "b": 2}.get
    assert refusal(names=("a", "c"), waiting=lambda n: waiting(n, 0)) is None
    message = refusal(names=("a", "b"), waiting=lambda n: waiting(n, 0))
    assert message == "b already has 2 waiters (limits.max_waiters_per_name); retry later"
    assert refusal(names=("b",), waiting=lambda n: waiting(n, 0), waits=False) is None


@given(st.integers(0, 10), st.integers(0, 10), st.booleans(), st.integers(0, 5))
def test_admitted_exactly_when_every_count_is_under_its_limit(
    requests: int, pending: int, waits: bool, on_name: int
) -> None:
    admitted = refusal(requests=requests, pending=pending, waits=waits, waiting=lambda n: on_name) is None
    assert admitted == (requests < 5 and (not waits or (pending < 3 and on_name < 2)))


def test_a_users_connections_together_are_capped_too() -> None:
    assert refusal(requests=1, uid_requests=7) is None
    message = refusal(requests=1, uid_requests=7, names=("a", "b"), waits=False)
    assert message is not None and "(limits.max_leases_per_uid); release some first" in message
    assert refusal(pending=1, uid_pending=5) is None
    message = refusal(pending=1, uid_pending=6)
    assert message is not None and "(limits.max_pending_per_uid)" in message
    assert refusal(pending=1, uid_pending=6, waits=False) is None


def test_a_request_is_counted_by_its_names() -> None:
    assert refusal(requests=3, names=("a", "b")) is None
    message = refusal(requests=3, names=("a", "b", "c"))
    assert message is not None and "(limits.max_leases_per_connection)" in message
