"""A stand-in for `EtcdClient` that injects faults: tests of the etcd backend put it where the
daemon's client goes, and break etcd's answers without touching the backend's insides.

Invariant: every call goes to a real `EtcdClient` and comes back unchanged, unless a fault
injected for that call says otherwise; the faults are the ones named below, and nothing else
differs. Call names are the client's method names ("grant", "keep_alive", "revoke",
"range_prefix", "txn", "watch").

- `delay(call, s)`: each such call waits `s` seconds before it is sent.
- `answer_late(call, s)`: etcd's answer is handed back `s` seconds after it came (the call
  took effect in etcd meanwhile, as with a slow network on the way back).
- `fail(call, times)`: the next `times` such calls raise EtcdUnreachable, never reaching etcd;
  with `applied=True`, they reach etcd and take effect, and the answer is lost on the way back.
- `before(call, hook)` / `after(call, hook)`: `await hook(call)` just before the call is sent,
  or between etcd's answer and its return, to act at exactly that moment.
- Watches: `drop_events(predicate)` makes every watch leave out the events it matches (the
  daemon never hears of them); `silence_watches()` makes the watches open now deliver nothing
  more, their streams staying open; `break_watches(error)` ends them with `error`.
  `delivered(predicate)` waits until a watch has handed the daemon a matching event (with
  `dropped=True`, one it left out).
- `sever()`: what an exec does to the daemon's connections: nothing reaches etcd from now on
  (every call raises EtcdUnreachable at once, and is not recorded), and the watches end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from lockd.etcd.client import EtcdClient, EtcdUnreachable, Event, KeyValue, WatchResponse
from lockd.histogram import Histogram

Hook = Callable[["Call"], Awaitable[None]]


@dataclass
class Call:
    """One call to the double: its name, its arguments, and etcd's answer once it came."""

    name: str
    args: dict[str, Any]
    answer: Any = None

    @property
    def puts(self) -> list[bytes]:
        """The keys a txn puts."""
        return [op["request_put"]["key"] for op in self.args.get("success", ()) if "request_put" in op]

    @property
    def compared(self) -> list[bytes]:
        """The keys a txn compares (a take's last check that its keys are still there)."""
        return [c["key"] for c in self.args.get("compare", ())]


@dataclass(eq=False)
class _Stream:
    """One watch stream as the double hands it on."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    silent: bool = False
    error: BaseException | None = None


class FaultyEtcd:
    """`lockd.etcd.client.EtcdApi` over a real client, with faults (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.real = EtcdClient(endpoints)
        #: Every call made, in order, with the trio time it was made.
        self.calls: list[tuple[float, Call]] = []
        #: Events a watch left out (`drop_events`).
        self.dropped: list[Event] = []
        self._delays: dict[str, float] = {}
        self._late: dict[str, float] = {}
        #: call → (how many more fail, whether they reach etcd first)
        self._failures: dict[str, tuple[int, bool]] = {}
        self._before: dict[str, Hook] = {}
        self._after: dict[str, Hook] = {}
        self._drop: Callable[[Event], bool] = lambda event: False
        self._streams: set[_Stream] = set()
        self._delivered: list[Event] = []
        self._news = trio.Event()
        self._severed = False

    # --- faults -------------------------------------------------------------------------------

    def delay(self, call: str, seconds: float) -> None:
        self._delays[call] = seconds

    def answer_late(self, call: str, seconds: float) -> None:
        self._late[call] = seconds

    def fail(self, call: str, times: int = 1, *, applied: bool = False) -> None:
        self._failures[call] = (times, applied)

    def before(self, call: str, hook: Hook | None) -> None:
        self._set(self._before, call, hook)

    def after(self, call: str, hook: Hook | None) -> None:
        self._set(self._after, call, hook)

    def drop_events(self, predicate: Callable[[Event], bool]) -> None:
        self._drop = predicate

    def silence_watches(self) -> None:
        for stream in self._streams:
            stream.silent = True

    def break_watches(self, error: BaseException) -> None:
        for stream in self._streams:
            stream.error = error
            stream.scope.cancel()

    def sever(self) -> None:
        self._severed = True
        self.break_watches(EtcdUnreachable("etcd is unreachable: the connections are severed"))

    async def delivered(self, predicate: Callable[[Event], bool], *, dropped: bool = False) -> Event:
        """The first event a watch handed on (or left out) that matches, once there is one."""
        while True:
            for event in self.dropped if dropped else self._delivered:
                if predicate(event):
                    return event
            news = self._news
            await news.wait()

    @staticmethod
    def _set(hooks: dict[str, Hook], call: str, hook: Hook | None) -> None:
        if hook is None:
            hooks.pop(call, None)
        else:
            hooks[call] = hook

    # --- EtcdApi ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.real.endpoint

    @property
    def endpoints(self) -> Sequence[str]:
        return self.real.endpoints

    @property
    def request_seconds(self) -> Mapping[str, Histogram]:
        return self.real.request_seconds

    async def aclose(self) -> None:
        await self.real.aclose()

    # Plain functions returning the call's awaitable: the timeouts are the real client's.

    def grant(self, ttl: int, *, timeout: float) -> Awaitable[tuple[int, int]]:
        return self._call(Call("grant", {"ttl": ttl}), lambda: self.real.grant(ttl, timeout=timeout))

    def keep_alive(self, lease: int, *, timeout: float) -> Awaitable[int]:
        return self._call(Call("keep_alive", {"lease": lease}), lambda: self.real.keep_alive(lease, timeout=timeout))

    def revoke(self, lease: int, *, timeout: float) -> Awaitable[None]:
        return self._call(Call("revoke", {"lease": lease}), lambda: self.real.revoke(lease, timeout=timeout))

    def range_prefix(self, prefix: str, *, timeout: float) -> Awaitable[tuple[int, list[KeyValue]]]:
        call = Call("range_prefix", {"prefix": prefix})
        return self._call(call, lambda: self.real.range_prefix(prefix, timeout=timeout))

    def txn(
        self, success: list[dict[str, Any]], *, compare: Sequence[dict[str, Any]] = (), timeout: float,
    ) -> Awaitable[tuple[bool, int]]:
        call = Call("txn", {"success": success, "compare": compare})
        return self._call(call, lambda: self.real.txn(success, compare=compare, timeout=timeout))

    def watch(
        self, prefix: str, start_revision: int, on_response: Callable[[WatchResponse], None], *,
        timeout: float,
    ) -> Awaitable[None]:
        stream = _Stream()

        def hand_on(response: WatchResponse) -> None:
            if stream.silent:
                return
            kept: list[Event] = []
            for event in response.events:
                (self.dropped if self._drop(event) else kept).append(event)
            if kept or not response.events:
                on_response(msgspec.structs.replace(response, events=kept))
                self._delivered += kept
            self._news.set()
            self._news = trio.Event()

        async def watch() -> None:
            self._streams.add(stream)
            try:
                with stream.scope:
                    await self.real.watch(prefix, start_revision, hand_on, timeout=timeout)
                assert stream.error is not None, "only a broken stream is cancelled"
                raise stream.error
            finally:
                self._streams.discard(stream)

        return self._call(Call("watch", {"prefix": prefix, "start_revision": start_revision}), watch)

    async def _call(self, call: Call, send: Callable[[], Awaitable[Any]]) -> Any:
        if self._severed:
            raise EtcdUnreachable(f"etcd at {self.endpoint} is unreachable: the connections are severed")
        self.calls.append((trio.current_time(), call))
        if (hook := self._before.get(call.name)) is not None:
            await hook(call)
        await trio.sleep(self._delays.get(call.name, 0))
        failures, applied = self._failures.get(call.name, (0, False))
        if failures:
            self._failures[call.name] = (failures - 1, applied)
            if applied:
                await send()
            raise EtcdUnreachable(f"etcd at {self.endpoint} is unreachable: a fault injected into {call.name}")
        call.answer = await send()
        await trio.sleep(self._late.get(call.name, 0))
        if (hook := self._after.get(call.name)) is not None:
            await hook(call)
        return call.answer
