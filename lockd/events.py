"""Lease events: how the service builds them (`lease_events`, `refusal_events`, `ending`),
and who receives them live (`Subscribers`). What to record, why (`protocol.Cause`), and who
may read what are the service's decisions (lockd.service); this keeps the books.

Invariants:
- Every live subscription is indexed exactly once: under each name it asks for, or among
  those for every name. An event is looked at only by the subscriptions indexed under its
  name and those for every name, so its cost follows the subscriptions that want it, not
  all of them.
- A subscription is in its subscriber's `subscriptions`, in the index and in its uid's
  count from `subscribe` to `unsubscribe` (its client releases it, goes away, or lags), and
  nowhere after; no empty entry lingers (`Subscribers.check`).
- `publish` gives each subscription that wants an event and may read it (`visible`, as
  the policy says now: `revisit` applies a reloaded one) one `Publish` order, in the order
  the events come.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from lockd_client import protocol
from lockd_client.protocol import Cause

from .backend import Claim
from .orders import Order, Peer, Publish

#: How a lease's end reads for the causes that come without a reason of their own: the event,
#: and its reason for people.
_ENDINGS: Final[dict[str, tuple[protocol.EventKind, str | None]]] = {
    Cause.REQUESTED: ("released", None),
    Cause.RELEASED_BY_OTHER: ("released", None),
    Cause.CLIENT_GONE: ("released", "its client went away without releasing it"),
    Cause.PROCESS_EXITED: ("released", "its process exited without releasing it"),
    Cause.OVERDUE: ("lost", "broken, and not let go within limits.break_grace"),
    Cause.DAEMON_STOPPED: (
        "released", "lockd stopped; the holder's lock-file descriptors keep the lock until it lets go",
    ),
}


def ending(cause: str, lost: str | None) -> tuple[protocol.EventKind, str | None]:
    """The event that ends a lease for `cause`, and its reason: `lost` with `lost` when the
    lease was lost for that reason, else as `cause` reads without one."""
    if lost is not None:
        return "lost", lost
    return _ENDINGS[cause]


class Subscriber(Protocol):
    """A connection with subscriptions (the service's Client)."""

    @property
    def peer(self) -> Peer: ...

    @property
    def uid(self) -> int: ...

    #: Its subscriptions by request id: `Subscribers` alone changes them.
    subscriptions: dict[int, Subscription]


@dataclass(eq=False, slots=True)
class Subscription:
    """One subscription to lease events."""

    peer: Peer
    #: The subscriber's uid, whose count it is in.
    uid: int
    id: int
    #: None: every name's.
    names: frozenset[str] | None
    #: Whose events its reader may read (`Policy.events_visible_to`): None, everyone's.
    visible: int | None


class Subscribers:
    """Every live subscription, indexed by the names it wants. See the module docstring."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[Subscription, None]] = {}
        self._every: dict[Subscription, None] = {}
        self._per_uid: dict[int, int] = {}
        #: How many subscriptions are live: with none, no event need be offered to anyone.
        self.live = 0

    def count(self, uid: int) -> int:
        """How many live subscriptions the connections of `uid` hold."""
        return self._per_uid.get(uid, 0)

    def subscribe(
        self, subscriber: Subscriber, subscription_id: int, names: frozenset[str] | None, visible: int | None,
    ) -> None:
        """Register a subscription of `subscriber` (whose request ids the caller checked)."""
        subscription = Subscription(subscriber.peer, subscriber.uid, subscription_id, names, visible)
        subscriber.subscriptions[subscription_id] = subscription
        if names is None:
            self._every[subscription] = None
        else:
            for name in names:
                self._by_name.setdefault(name, {})[subscription] = None
        self._per_uid[subscription.uid] = self._per_uid.get(subscription.uid, 0) + 1
        self.live += 1

    def unsubscribe(self, subscriber: Subscriber, subscription_id: int) -> bool:
        """End a subscription of `subscriber`; False if it has none of that id (ended already)."""
        subscription = subscriber.subscriptions.pop(subscription_id, None)
        if subscription is None:
            return False
        if subscription.names is None:
            del self._every[subscription]
        else:
            for name in subscription.names:
                wanting = self._by_name[name]
                del wanting[subscription]
                if not wanting:
                    del self._by_name[name]
        left = self._per_uid[subscription.uid] - 1
        if left:
            self._per_uid[subscription.uid] = left
        else:
            del self._per_uid[subscription.uid]
        self.live -= 1
        return True

    def revisit(self, visible_to: Callable[[int], int | None]) -> None:
        """Apply a new policy: from now on each subscription carries what its reader may read
        as `visible_to` (`Policy.events_visible_to`) says."""
        for wanting in (self._every, *self._by_name.values()):
            for subscription in wanting:
                subscription.visible = visible_to(subscription.uid)

    def client_gone(self, subscriber: Subscriber) -> None:
        """End every subscription of `subscriber`, which has gone away."""
        for subscription_id in list(subscriber.subscriptions):
            self.unsubscribe(subscriber, subscription_id)

    def publish(self, events: Iterable[protocol.LeaseEvent], orders: deque[Order]) -> None:
        """Order each of `events`, in turn, offered to every subscription that wants it and
        may read it."""
        by_name, every = self._by_name, self._every
        for event in events:
            named = by_name.get(event.name)
            if named is None and not every:
                continue
            uid = event.uid
            for wanting in (named, every) if named else (every,):
                for subscription in wanting:
                    if subscription.visible is None or subscription.visible == uid:
                        orders.append(Publish(subscription.peer, subscription.id, event))

    def check(self, subscribers: Iterable[Subscriber]) -> None:
        """Assert the invariants, given every connected subscriber. For tests."""
        live: set[Subscription] = set()
        per_uid: dict[int, int] = {}
        for subscriber in subscribers:
            for subscription_id, subscription in subscriber.subscriptions.items():
                assert (subscription.id, subscription.peer, subscription.uid) == (
                    subscription_id, subscriber.peer, subscriber.uid,
                ), subscription
                live.add(subscription)
                per_uid[subscription.uid] = per_uid.get(subscription.uid, 0) + 1
                wanted = subscription.names
                if wanted is None:
                    assert subscription in self._every, subscription
                else:
                    assert all(subscription in self._by_name.get(name, ()) for name in wanted), subscription
        indexed = set(self._every)
        for name, wanting in self._by_name.items():
            assert wanting and all(s.names is not None and name in s.names for s in wanting), name
            indexed.update(wanting)
        assert indexed == live, indexed.symmetric_difference(live)
        assert self._per_uid == per_uid, (self._per_uid, per_uid)
        assert self.live == len(live), (self.live, len(live))


def lease_events(
    time: float, kind: protocol.EventKind, names: tuple[str, ...], tokens: list[int] | None, claim: Claim, *,
    waited: float | None, held: float | None, reason: str | None, cause: str | None, exit_status: int | None,
) -> list[protocol.LeaseEvent]:
    """The events of `kind` of a lease (or request) on `names`, one per name, for `claim`."""
    events = []
    # Two per lease, each name's: a loop, not a comprehension.
    slots, who = claim.slots, claim.requester
    for index, name in enumerate(names):
        events.append(protocol.LeaseEvent(
            time, kind, name, claim.mode_on(name), slots.get(name) if slots else None,
            tokens[index] if tokens else None, who.pid, who.uid, None, who.command, who.label, waited, held,
            reason, exit_status, cause,
        ))
    return events


def refusal_events(
    time: float, request: protocol.Acquire, *, pid: int, uid: int, command: str, label: str | None, reason: str,
) -> list[protocol.LeaseEvent]:
    """The `refused` events of `request`, refused before it became a ticket for `reason` (an
    error code, its cause too), one per name."""
    return [
        protocol.LeaseEvent(
            time, "refused", name, "shared" if name in request.slots else request.mode, request.slots.get(name),
            None, pid, uid, None, command, label, 0.0, None, reason, None, reason,
        )
        for name in dict.fromkeys(request.names)
    ]
