"""The log limiter on its own: times are passed in, so its bounds are checked exactly."""

from __future__ import annotations

import logging
import math

from hypothesis import given
from hypothesis import strategies as st

from lockd.loglimit import KEPT, LINES, PER_UID, SHOWN, WINDOW, Kind, LogLimiter

CUT = Kind(logging.INFO, "cut off {count} more connections")
REFUSED = Kind(logging.WARNING, "refused {count} more requests by policy")


def test_each_uid_gets_its_own_lines_until_the_window_is_full() -> None:
    limiter = LogLimiter()
    assert [limiter.admit(CUT, 1.0, 1000, "broke") for _ in range(PER_UID + 3)] == [True] * PER_UID + [False] * 3
    # Another uid is still heard, and another kind has a budget of its own.
    assert limiter.admit(CUT, 1.0, 0, "broke")
    assert limiter.admit(REFUSED, 1.0, 1000, "denied")
    for uid in range(1, LINES):
        limiter.admit(CUT, 2.0, uid, "broke")
    assert not limiter.admit(CUT, 2.0, 5000, "broke")  # LINES reached: everyone is counted now


def test_counted_events_are_summed_up_once_their_window_ends() -> None:
    limiter = LogLimiter()
    assert limiter.next_summary() is None
    for _ in range(PER_UID):
        limiter.admit(CUT, 3.0, 1000, "broke")
    assert limiter.next_summary() is None  # everything so far was logged
    for _ in range(1732):
        limiter.admit(CUT, 4.0, 1000, "the connection broke")
    for _ in range(PER_UID + 1):
        limiter.admit(CUT, 5.0, 33, "no handshake within 5 s")
    assert limiter.next_summary() == WINDOW
    assert limiter.summaries(WINDOW - 0.001) == []
    [summary] = limiter.summaries(WINDOW)
    assert (summary.kind, summary.count, summary.end) == (CUT, 1733, WINDOW)
    assert summary.text() == (
        "cut off 1,733 more connections in the last 10 s, not logged one by one: from uid 1000 "
        '(1,732), uid 33 (1); why: "the connection broke" (1,732), "no handshake within 5 s" (1)'
    )
    assert limiter.summaries(WINDOW * 5) == [] and limiter.next_summary() is None


def test_a_new_window_has_a_new_budget() -> None:
    limiter = LogLimiter()
    for _ in range(PER_UID + 1):
        limiter.admit(CUT, 9.0, 1000, "broke")
    assert limiter.admit(CUT, WINDOW + 1, 1000, "broke")
    # The previous window's summary is due, though nobody asked before the new window began.
    assert limiter.next_summary() == WINDOW
    assert [s.count for s in limiter.summaries(WINDOW + 1)] == [1]


def test_flush_returns_what_is_counted_in_windows_not_ended() -> None:
    limiter = LogLimiter()
    for _ in range(PER_UID + 2):
        limiter.admit(REFUSED, 1.0, None, "denied")
    [summary] = limiter.flush()
    assert summary.count == 2
    assert "from unknown uid (2)" in summary.text()
    assert limiter.flush() == []


def test_what_is_kept_and_shown_of_many_uids_and_reasons_is_bounded() -> None:
    limiter = LogLimiter()
    for i in range(10 * KEPT):
        limiter.admit(CUT, 1.0, 10_000 + i, f"reason {i}")
    [summary] = limiter.flush()
    assert len(summary.uids) == len(summary.reasons) == KEPT + 1  # the rest as "others"
    assert sum(summary.uids.values()) == summary.count == 10 * KEPT - LINES
    shown = summary.text()
    assert shown.count("uid 1") == SHOWN and shown.count('"reason') == SHOWN
    assert f"others ({summary.count - SHOWN:,})" in shown


events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=20 * WINDOW),
        st.sampled_from([CUT, REFUSED]),
        st.integers(min_value=0, max_value=200),
    ),
    max_size=3000,
)


@given(events)
def test_no_event_is_lost_and_each_kind_writes_at_most_lines_plus_one_per_window(events) -> None:
    limiter = LogLimiter()
    lines: dict[tuple[Kind, int], int] = {}
    logged = 0
    summaries = []
    for now, kind, uid in sorted(events, key=lambda e: e[0]):
        summaries += limiter.summaries(now)
        if limiter.admit(kind, now, uid, "why"):
            logged += 1
            key = (kind, math.floor(now / WINDOW))
            lines[key] = lines.get(key, 0) + 1
    summaries += limiter.flush()
    assert logged + sum(s.count for s in summaries) == len(events)
    for s in summaries:
        key = (s.kind, round(s.end / WINDOW) - 1)
        lines[key] = lines.get(key, 0) + 1
    assert all(n <= LINES + 1 for n in lines.values())
