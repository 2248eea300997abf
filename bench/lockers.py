"""The things a benchmark worker can lock with, behind one small interface.

Invariant: every locker does, per `acquire` + `release` cycle, exactly what a real user of
that mechanism does per cycle — no batching across cycles, no deferred writes — so cycle
times compare like for like. A locker is used by one thread and is built from a plain-dict
spec (`make_locker`; the async ones, in a trio run, `make_async_locker`), so a worker process
can be told what to use on its command line.

Specs:
  {"kind": "flock", "dir": D}        fcntl.flock on D/NAME.lock, file opened once per name
  {"kind": "filelock", "dir": D}     filelock.FileLock(D/NAME.lock): opens and flocks each time
  {"kind": "echo", "socket": S, "round_trips": R}
                                     R request/response round trips per cycle to an echo server
  {"kind": "lockd-raw", "socket": S} the wire protocol by hand: what the protocol allows
  {"kind": "lockd", "socket": S}     lockd_client, the library users get
  {"kind": "lockd-trio", "socket": S}
                                     lockd_client's trio client, one task on its connection
  {"kind": "lockd-raw-trio", "socket": S}
                                     the raw protocol client waiting in trio: the trio
                                     client's floor
      (those two async: `make_async_locker`, in a trio run)
      any lockd one with "slots": N  a slot of each name, a counting semaphore of N slots
  {"kind": "etcd-lock", "url": U, "ttl": T}
                                     etcd's own lock API (v3lock, through its JSON gateway)
                                     under an etcd lease of T seconds, kept alive
  {"kind": "etcd-kv", "url": U, "ttl": T}
                                     not a lock: one put and one delete per cycle, the two
                                     etcd writes any lock kept in etcd needs at least
"""

from __future__ import annotations

import array
import base64
import fcntl
import http.client
import itertools
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from lockd_client import errors, protocol

#: Room for the descriptors of one grant of a few names (the bench asks for one).
_ANCILLARY = socket.CMSG_SPACE(16 * 4)

#: Called with no argument when the daemon says a request waits (lockd only).
OnQueued = Callable[[], object]


class Locker(Protocol):
    #: Whether `acquire` calls `on_queued`: only then does a request's queue position show.
    reports_queue: bool

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> Any:
        """Block until `name` is held exclusively (or a slot of it, for lockd with slots);
        return a handle for `release`."""

    def release(self, handle: Any) -> None: ...

    def token(self, handle: Any) -> int | None:
        """The fencing token of a held handle, where the mechanism has one."""

    def close(self) -> None: ...


class FlockLocker:
    """The kernel floor: one pre-opened file per name, flock(LOCK_EX) / flock(LOCK_UN)."""

    reports_queue = False

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._fds: dict[str, int] = {}

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(os.path.join(self._dir, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def release(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def token(self, fd: int) -> None:
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class FileLockLocker:
    """The `filelock` package as its users call it: one FileLock object per path."""

    reports_queue = False

    def __init__(self, directory: str) -> None:
        import filelock

        self._dir = directory
        self._make = filelock.FileLock
        self._locks: dict[str, Any] = {}

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> Any:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = self._make(os.path.join(self._dir, name + ".lock"))
        lock.acquire()
        return lock

    def release(self, lock: Any) -> None:
        lock.release()

    def token(self, lock: Any) -> None:
        return None

    def close(self) -> None:
        self._locks.clear()


class EchoLocker:
    """A broker's floor: `round_trips` request/response exchanges with an echo server per
    cycle, split between acquire and release (a naive broker needs two: one each)."""

    reports_queue = False
    #: About the size of a framed Acquire of one short name.
    PAYLOAD = b"\x00\x00\x00\x1c" + b"\x85" + b"a" * 27

    def __init__(self, path: str, round_trips: int) -> None:
        if round_trips not in (1, 2):
            raise ValueError("an echo cycle is one or two round trips")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._release_trips = round_trips - 1

    def _round_trip(self) -> None:
        sock = self._sock
        sock.sendall(self.PAYLOAD)
        want = len(self.PAYLOAD)
        while want:
            data = sock.recv(want)
            if not data:
                raise EOFError("the echo server closed the connection")
            want -= len(data)

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> None:
        self._round_trip()

    def release(self, handle: None) -> None:
        if self._release_trips:
            self._round_trip()

    def token(self, handle: None) -> None:
        return None

    def close(self) -> None:
        self._sock.close()


class RawLockdLocker:
    """lockd over the wire protocol with nothing in between: one round trip per acquire, a
    release written at once with no reply to wait for, one Encoder/Decoder/buffer reused.

    It pays what any client of the protocol must for a grant's lock-file descriptors
    (SCM_RIGHTS): it receives them, as the kernel installs them, and closes them on release.
    Reading with plain recv() would have the kernel drop them instead, sparing this client a
    cost no real client can avoid.
    """

    reports_queue = True

    def __init__(self, path: str, label: str = "bench", slots: int | None = None) -> None:
        self._slots = slots
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = protocol.reply_decoder()
        self._frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
        self._out = bytearray()
        self._ids = itertools.count(1)
        self._fds: list[int] = []
        self._send(protocol.Hello(protocol.PROTOCOL_VERSION, label=label))
        welcome = self._recv()
        if isinstance(welcome, protocol.Error):
            raise errors.from_reply(welcome)
        if not isinstance(welcome, protocol.Welcome):
            raise errors.RemoteProtocolError(f"expected welcome, got {welcome!r}")

    def _send(self, message: object) -> None:
        out = self._out
        del out[:]
        protocol.encode_frame(self._encoder, message, out)
        self._sock.sendall(out)

    def _recv(self) -> object:
        frames = self._frames
        while (body := frames.next_frame()) is None:
            data, ancdata, _, _ = self._sock.recvmsg(65536, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            if not data:
                raise errors.DaemonUnavailable("the daemon closed the connection")
            for _, _, fds in ancdata:
                self._fds += array.array("i", fds)
            frames.feed(data)
        return self._decoder.decode(body)

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> tuple[protocol.Granted, list[int]]:
        rid = next(self._ids)
        self._send(protocol.Acquire(rid, [name], slots={name: self._slots} if self._slots else {}))
        while True:
            reply = self._recv()
            if isinstance(reply, protocol.Granted) and reply.id == rid:
                fds = self._fds[: reply.descriptors]
                del self._fds[: reply.descriptors]
                return reply, fds
            if isinstance(reply, protocol.Error):
                raise errors.from_reply(reply)
            if isinstance(reply, protocol.Lost):
                raise errors.LeaseLost(reply.reason)
            if isinstance(reply, protocol.Queued) and on_queued is not None:
                on_queued()

    def release(self, grant: tuple[protocol.Granted, list[int]]) -> None:
        granted, fds = grant
        self._send(protocol.Release(granted.id))
        for fd in fds:
            os.close(fd)

    def waiters(self, name: str) -> int:
        """How many requests wait for `name`, by the daemon's `status`."""
        rid = next(self._ids)
        self._send(protocol.Status(rid, [name]))
        while True:
            reply = self._recv()
            if isinstance(reply, protocol.StatusReply) and reply.id == rid:
                return sum(len(lock.waiters) for lock in reply.locks)
            if isinstance(reply, protocol.Error) and reply.id == rid:
                raise errors.from_reply(reply)

    def reexec(self) -> float:
        """Have the daemon re-execute itself; the pause it reports (`Reexecuted.paused`, s)."""
        rid = next(self._ids)
        self._send(protocol.Reexec(rid))
        while True:
            reply = self._recv()
            if isinstance(reply, protocol.Reexecuted) and reply.id == rid:
                return reply.paused
            if isinstance(reply, protocol.Error) and reply.id == rid:
                raise errors.from_reply(reply)

    def token(self, grant: tuple[protocol.Granted, list[int]]) -> int:
        return grant[0].tokens[0]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._sock.close()


class LibLockdLocker:
    """lockd through `lockd_client`'s blocking client, waiting for a busy daemon as long as
    it takes, as `lockctl acquire` does."""

    reports_queue = True

    def __init__(self, path: str, label: str = "bench", slots: int | None = None) -> None:
        import lockd_client

        self._client = lockd_client.connect(path, label=label, timeout=None)
        self._slots = slots

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> Any:
        if on_queued is None:
            return self._client.acquire(name, slots=self._slots)
        return self._client.acquire(name, slots=self._slots, on_queued=lambda holders: on_queued())

    def release(self, lease: Any) -> None:
        lease.release()

    def token(self, lease: Any) -> int:
        return lease.token

    def close(self) -> None:
        self._client.close()


class TrioLockdLocker:
    """lockd through `lockd_client.trio_client`, as a program of one task uses it: what
    LibLockdLocker does, awaited. Made (`open`) and used in a trio run."""

    reports_queue = True

    def __init__(self, client: Any, slots: int | None) -> None:
        self._client = client
        self._slots = slots

    @classmethod
    async def open(cls, path: str, label: str = "bench", slots: int | None = None) -> TrioLockdLocker:
        from lockd_client import trio_client

        return cls(await trio_client.connect(path, label=label), slots)

    async def acquire(self, name: str, on_queued: OnQueued | None = None) -> Any:
        if on_queued is None:
            return await self._client.acquire(name, slots=self._slots)
        return await self._client.acquire(name, slots=self._slots, on_queued=lambda holders: on_queued())

    async def release(self, lease: Any) -> None:
        await lease.release()

    def token(self, lease: Any) -> int:
        return lease.token

    async def aclose(self) -> None:
        await self._client.aclose()


class TrioRawLockdLocker:
    """RawLockdLocker waiting for its grant in trio (wait_readable, then recvmsg): the floor
    of a trio program's cycle, which pays trio's wait where a blocking recvmsg sleeps in the
    kernel, and so what the trio client is judged against. Connects, writes and releases as
    RawLockdLocker does, blocking: a frame this small goes at once."""

    reports_queue = True

    def __init__(self, raw: RawLockdLocker) -> None:
        import trio  # here, as the trio client's: the blocking lockers' workers do without

        self._raw = raw
        self._wait_readable = trio.lowlevel.wait_readable

    async def acquire(self, name: str, on_queued: OnQueued | None = None) -> tuple[protocol.Granted, list[int]]:
        # RawLockdLocker.acquire with its wait in trio, written out as it is: a call fewer
        # here or there would make the floors differ in more than how they wait.
        raw = self._raw
        rid = next(raw._ids)
        raw._send(protocol.Acquire(rid, [name], slots={name: raw._slots} if raw._slots else {}))
        frames, sock = raw._frames, raw._sock
        while True:
            while (body := frames.next_frame()) is None:
                # The reply is never there yet right after the request: wait first, then read.
                await self._wait_readable(sock)
                data, ancdata, _, _ = sock.recvmsg(65536, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    raise errors.DaemonUnavailable("the daemon closed the connection")
                for _, _, fds in ancdata:
                    raw._fds += array.array("i", fds)
                frames.feed(data)
            reply = raw._decoder.decode(body)
            if isinstance(reply, protocol.Granted) and reply.id == rid:
                fds = raw._fds[: reply.descriptors]
                del raw._fds[: reply.descriptors]
                return reply, fds
            if isinstance(reply, protocol.Error):
                raise errors.from_reply(reply)
            if isinstance(reply, protocol.Lost):
                raise errors.LeaseLost(reply.reason)
            if isinstance(reply, protocol.Queued) and on_queued is not None:
                on_queued()

    async def release(self, grant: tuple[protocol.Granted, list[int]]) -> None:
        self._raw.release(grant)

    def token(self, grant: tuple[protocol.Granted, list[int]]) -> int:
        return self._raw.token(grant)

    async def aclose(self) -> None:
        self._raw.close()


class EtcdGateway:
    """One persistent HTTP/1.1 connection to etcd's v3 JSON gateway, as a client would keep."""

    def __init__(self, url: str) -> None:
        where = urllib.parse.urlsplit(url)
        self._conn = http.client.HTTPConnection(where.hostname, where.port)

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = self._conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"etcd answered {path} with {answer.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self._conn.close()


def b64(text: str) -> str:
    """The gateway's encoding of keys and values."""
    return base64.b64encode(text.encode()).decode()


class _EtcdLease:
    """An etcd lease kept alive on a connection of its own every TTL/3, as etcd's clients do,
    until `close` revokes it; a process killed meanwhile leaves it to expire after TTL."""

    def __init__(self, url: str, ttl: int) -> None:
        self._gateway = EtcdGateway(url)
        self.id = self._gateway.call("/v3/lease/grant", {"TTL": ttl})["ID"]
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew, args=(ttl / 3,), daemon=True)
        self._renewer.start()

    def _renew(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self._gateway.call("/v3/lease/keepalive", {"ID": self.id})

    def close(self) -> None:
        self._closed.set()
        self._renewer.join()
        self._gateway.call("/v3/lease/revoke", {"ID": self.id})
        self._gateway.close()


class _EtcdLocker:
    """A client of etcd's JSON gateway with a lease of its own, as a program using etcd keeps."""

    reports_queue = False

    def __init__(self, url: str, ttl: int) -> None:
        self._lease = _EtcdLease(url, ttl)
        self._gateway = EtcdGateway(url)

    def token(self, key: str) -> None:
        return None

    def close(self) -> None:
        self._gateway.close()
        self._lease.close()


class EtcdLockLocker(_EtcdLocker):
    """etcd's own lock API, driven directly: `/v3/lock/lock` blocks until the name's key is the
    oldest (FIFO by create revision) and returns it; `/v3/lock/unlock` deletes it."""

    PREFIX = "bench-lock/"

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> str:
        return self._gateway.call("/v3/lock/lock", {"name": b64(self.PREFIX + name), "lease": self._lease.id})["key"]

    def release(self, key: str) -> None:
        self._gateway.call("/v3/lock/unlock", {"key": key})


class EtcdKvLocker(_EtcdLocker):
    """The etcd floor: put a key under a lease, delete it; no check that anyone else holds it."""

    PREFIX = "bench-kv/"

    def acquire(self, name: str, on_queued: OnQueued | None = None) -> str:
        key = b64(self.PREFIX + name)
        self._gateway.call("/v3/kv/put", {"key": key, "value": "", "lease": self._lease.id})
        return key

    def release(self, key: str) -> None:
        self._gateway.call("/v3/kv/deleterange", {"key": key})


#: The kinds `make_async_locker` makes: their acquire and release are awaited, in a trio run.
ASYNC_KINDS = frozenset({"lockd-trio", "lockd-raw-trio"})


async def make_async_locker(spec: dict[str, Any]) -> TrioLockdLocker | TrioRawLockdLocker:
    if spec["kind"] == "lockd-trio":
        return await TrioLockdLocker.open(spec["socket"], slots=spec.get("slots"))
    if spec["kind"] == "lockd-raw-trio":
        return TrioRawLockdLocker(RawLockdLocker(spec["socket"], slots=spec.get("slots")))
    raise ValueError(f"unknown async locker kind {spec['kind']!r}")


def make_locker(spec: dict[str, Any]) -> Locker:
    kind = spec["kind"]
    if kind == "flock":
        return FlockLocker(spec["dir"])
    if kind == "filelock":
        return FileLockLocker(spec["dir"])
    if kind == "echo":
        return EchoLocker(spec["socket"], spec["round_trips"])
    if kind == "lockd-raw":
        return RawLockdLocker(spec["socket"], slots=spec.get("slots"))
    if kind == "lockd":
        return LibLockdLocker(spec["socket"], slots=spec.get("slots"))
    if kind == "etcd-lock":
        return EtcdLockLocker(spec["url"], spec["ttl"])
    if kind == "etcd-kv":
        return EtcdKvLocker(spec["url"], spec["ttl"])
    raise ValueError(f"unknown locker kind {kind!r}")
