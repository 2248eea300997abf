"""Waiting for what a test cannot be told about (another process, the daemon, etcd) by polling.

`wait_until` is for plain test code; `wait_until_async` is its twin for trio tests, bounded by
the enclosing cancel scope (the test's `trio.fail_after`) rather than by a timeout of its own.
Both return the predicate's first true value, and fail the test saying what never happened.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

TIMEOUT = 10.0
INTERVAL = 0.01

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    what: str,
    timeout: float = TIMEOUT,
    *,
    interval: float = INTERVAL,
    show: Callable[[], object] | None = None,
) -> T:
    """Call `predicate` every `interval` seconds until it returns something true, and return
    that; after `timeout` seconds fail, naming `what` and adding `show()` if given."""
    started = time.monotonic()
    while not (result := predicate()):
        if time.monotonic() - started >= timeout:
            raise AssertionError(_never(what, timeout, show))
        time.sleep(interval)
    return result


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    interval: float = INTERVAL,
    show: Callable[[], object] | None = None,
) -> T:
    """`wait_until` in a trio task; `predicate` may be async. It polls until just before the
    enclosing cancel scope's deadline (TIMEOUT from now if there is none), then fails."""
    started = trio.current_time()
    deadline = trio.current_effective_deadline()
    if deadline == math.inf:
        deadline = started + TIMEOUT
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if trio.current_time() + interval >= deadline:
            raise AssertionError(_never(what, trio.current_time() - started, show))
        await trio.sleep(interval)


def _never(what: str, seconds: float, show: Callable[[], object] | None) -> str:
    message = f"never happened within {seconds:.1f} s: {what}"
    return message if show is None else f"{message}\n{show()}"
