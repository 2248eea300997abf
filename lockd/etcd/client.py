"""A thin async client for etcd's v3 JSON gateway (`/v3/...`): only the calls lockd needs.

Invariant: a call either returns etcd's decoded answer or raises an `EtcdError` (a
`DaemonUnavailable`); a request is sent again, to the next endpoint, only when it cannot have
reached etcd (the connection was never made, or etcd refused the auth token), so a txn is
applied at most once per call.

Keys are `str`, values `bytes`; a key's bytes that are not UTF-8 (another tool may write any)
are carried as surrogate escapes, so every key read can be written back. The gateway's base64
and int64-as-string encodings stay in here; HTTP and the connections are `etcd.http`'s and
`etcd.pool`'s.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import trio
from lockd_client.errors import DaemonUnavailable

from ..histogram import Histogram
from .http import Failed, NotSent, Origin
from .pool import Pool

# gRPC status codes etcd answers with (google.golang.org/grpc/codes).
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_UNAUTHENTICATED = 16

#: What etcd says, with InvalidArgument, when it refuses a request at the auth check for its
#: token rather than for the request: a JWT token issued before an auth change, a token that
#: names no user. Logging in anew is the cure, as for Unauthenticated.
_TOKEN_REFUSALS = ("etcdserver: revision of auth store is old", "etcdserver: user name is empty")

_T = TypeVar("_T")

#: Connections to etcd per pool. A request holds one until answered, the watch one for its
#: life; a request that finds none waits, and its timeout counts only once it has one (a
#: request that timed out waiting was never sent; the caller's own deadline bounds the wait).
CONNECTIONS = 100
#: Upper bounds (seconds) of the buckets of the calls' times (`EtcdClient.request_seconds`).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EtcdError(DaemonUnavailable):
    """etcd answered, with an error; `status` is its gRPC status code."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _refused_for_token(status: int, message: str) -> bool:
    """Whether etcd refused a request at its auth check, for the token it carried: it applied
    none of it, and it may be sent again once logged in anew."""
    if status == _UNAUTHENTICATED:
        return True
    return status == _INVALID_ARGUMENT and any(reason in message for reason in _TOKEN_REFUSALS)


class EtcdUnreachable(EtcdError):
    """No endpoint answered in time."""


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted away: read the range again and re-watch."""


# --- decoded answers (unset proto3 fields are left out of the JSON: defaults here) -----------


class KeyValue(msgspec.Struct):
    key: bytes
    create_revision: int = 0
    mod_revision: int = 0
    value: bytes = b""
    lease: int = 0

    @property
    def text(self) -> str:
        """The key as the `str` the calls here take."""
        return self.key.decode("utf-8", "surrogateescape")


class Header(msgspec.Struct):
    revision: int = 0


class _Range(msgspec.Struct):
    header: Header
    kvs: list[KeyValue] = []


class _Grant(msgspec.Struct):
    header: Header
    ID: int = 0
    TTL: int = 0
    error: str = ""


class _KeepAlive(msgspec.Struct):
    ID: int = 0
    TTL: int = 0


class _KeepAliveLine(msgspec.Struct):
    result: _KeepAlive | None = None
    error: dict[str, Any] | None = None


class _Txn(msgspec.Struct):
    header: Header
    succeeded: bool = False


class _Auth(msgspec.Struct):
    token: str


class Event(msgspec.Struct):
    kv: KeyValue
    type: Literal["PUT", "DELETE"] = "PUT"


class WatchResponse(msgspec.Struct):
    header: Header
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0
    events: list[Event] = []


class _WatchLine(msgspec.Struct):
    result: WatchResponse | None = None
    error: dict[str, Any] | None = None


class _Failure(msgspec.Struct):
    message: str = ""
    error: str = ""
    code: int = 0


# --- txn operations ---------------------------------------------------------------------------


def put(key: str, value: bytes, lease: int) -> dict[str, Any]:
    return {"request_put": {"key": _raw(key), "value": value, "lease": lease}}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _raw(key)}}


def created_at(key: str, revision: int) -> dict[str, Any]:
    """Compare: `key` exists and was created at `revision`."""
    return {"key": _raw(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision}


def prefix_end(prefix: str) -> bytes:
    """The `range_end` that makes a range cover every key starting with `prefix`."""
    raw = _raw(prefix)
    return raw[:-1] + bytes([raw[-1] + 1])


def _raw(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


class EtcdApi(Protocol):
    """What the etcd backend asks of a client: `EtcdClient`'s calls, as documented there
    (tests put a double that injects faults in its place)."""

    @property
    def endpoint(self) -> str: ...

    @property
    def endpoints(self) -> Sequence[str]: ...

    @property
    def request_seconds(self) -> Mapping[str, Histogram]: ...

    def aclose(self) -> Awaitable[None]: ...

    def grant(self, ttl: int, *, timeout: float) -> Awaitable[tuple[int, int]]: ...

    def keep_alive(self, lease: int, *, timeout: float) -> Awaitable[int]: ...

    def revoke(self, lease: int, *, timeout: float) -> Awaitable[None]: ...

    def range_prefix(self, prefix: str, *, timeout: float) -> Awaitable[tuple[int, list[KeyValue]]]: ...

    def txn(
        self, success: list[dict[str, Any]], *, compare: Sequence[dict[str, Any]] = (),
        timeout: float,
    ) -> Awaitable[tuple[bool, int]]: ...

    def watch(
        self, prefix: str, start_revision: int, on_response: Callable[[WatchResponse], None], *,
        timeout: float,
    ) -> Awaitable[None]: ...


class EtcdClient:
    """Talks to one etcd cluster through the endpoints given, moving on when one fails.

    Every call's `timeout` (seconds) bounds each attempt with an endpoint, from connecting to
    the whole answer, not the wait for a free connection before it (`watch`: waiting for a
    connection, connecting and sending only; it waits for events as long as its stream
    lives). An endpoint that lets the time pass, or fails, is skipped by the next
    call: a member that stopped answering with its connections still open costs one attempt,
    not every call. Cancellation abandons the request; whether etcd applied it is then
    unknown, which callers must allow for.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        """Raises OSError (an `ssl.SSLError` among them) if a TLS file cannot be loaded,
        ValueError if an endpoint is not an http:// or https:// URL.

        `ca_file` verifies etcd's certificate (default: the system's CAs); `cert_file` and
        `key_file` are this client's certificate for etcd's `--client-cert-auth`; `username`
        and `password` log in when etcd has auth enabled.
        """
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._origins = [Origin(e) for e in self.endpoints]
        self._current = 0
        self._credentials = {"name": username, "password": password or ""} if username else None
        self._token: str | None = None
        #: Held while logging in: calls that find no token wait for one login, not one each.
        self._login = trio.Lock()
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
        context.set_alpn_protocols(["http/1.1"])
        self._pool = Pool(context, CONNECTIONS)
        # Lease calls have connections of their own: a renewal that waited behind a burst of
        # other requests would lose every lock of the daemon.
        self._leases = Pool(context, CONNECTIONS)
        self._encoder = msgspec.json.Encoder()
        self._decoders: dict[type, msgspec.json.Decoder[Any]] = {}
        #: API path (`kv/txn`) → how long its calls took, from the call to its answer or
        #: failure (retries on other endpoints included): for the metrics.
        self.request_seconds: dict[str, Histogram] = {}

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to first."""
        return self.endpoints[self._current]

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self._leases.aclose()

    # --- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int, *, timeout: float) -> tuple[int, int]:
        """Grant a lease of `ttl` seconds; return its id and the TTL etcd actually gave."""
        answer = await self._call("/v3/lease/grant", {"TTL": ttl}, _Grant, timeout)
        if answer.error:
            raise EtcdError(f"etcd at {self.endpoint} refused a lease: {answer.error}")
        return answer.ID, answer.TTL

    async def keep_alive(self, lease: int, *, timeout: float) -> int:
        """Renew `lease`; return its TTL, 0 if it has already expired."""
        line = await self._call("/v3/lease/keepalive", {"ID": lease}, _KeepAliveLine, timeout)
        if line.result is None:
            raise EtcdError(f"etcd at {self.endpoint} failed a keep-alive: {line.error}")
        return line.result.TTL

    async def revoke(self, lease: int, *, timeout: float) -> None:
        """Revoke `lease`, deleting its keys. A lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": lease}, msgspec.Raw, timeout)
        except EtcdError as exc:
            if exc.status != _NOT_FOUND:
                raise

    # --- keys ---------------------------------------------------------------------------------

    async def range_prefix(self, prefix: str, *, timeout: float) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` (a linearizable read), and the revision read at."""
        body = {"key": _raw(prefix), "range_end": prefix_end(prefix)}
        answer = await self._call("/v3/kv/range", body, _Range, timeout)
        return answer.header.revision, answer.kvs

    async def txn(
        self, success: list[dict[str, Any]], *, compare: Sequence[dict[str, Any]] = (),
        timeout: float,
    ) -> tuple[bool, int]:
        """Run one transaction; return whether its compares held and the revision after it."""
        body = {"compare": list(compare), "success": success}
        answer = await self._call("/v3/kv/txn", body, _Txn, timeout)
        return answer.succeeded, answer.header.revision

    async def watch(
        self,
        prefix: str,
        start_revision: int,
        on_response: Callable[[WatchResponse], None],
        *,
        timeout: float,
    ) -> None:
        """Stream every change under `prefix` from `start_revision` on into `on_response`.

        Returns only by raising: `WatchCompacted` if `start_revision` is gone, another
        `EtcdError` when the stream breaks or etcd ends it. `timeout` bounds connecting,
        sending and closing, not the wait for events. However it ends, the stream is closed
        (shielded from cancellation, within `timeout`); events not yet handed over are dropped.
        """
        request = {
            "create_request": {
                "key": _raw(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": start_revision,
            }
        }
        origin = self._origins[self._current]
        endpoint = origin.url
        decoder = self._decoder(_WatchLine)
        content = self._encoder.encode(request)
        try:
            with trio.move_on_after(timeout) as logging_in:
                await self._pool.hold()
                try:
                    token = await self._token_for(self._pool, origin, timeout)
                finally:
                    self._pool.release()
            if logging_in.cancelled_caught:
                raise self._unreachable(endpoint, f"no answer to logging in within {timeout:.2g} s")
            stream = await self._pool.stream(origin, origin.request("/v3/watch", content, token), timeout)
        except (NotSent, Failed) as exc:
            raise self._unreachable(endpoint, exc) from exc
        try:
            status = await stream.status()
            if status != 200:
                raise self._failure(endpoint, status, await stream.rest())
            while (line := await stream.line()) is not None:
                if line:
                    on_response(self._watch_answer(endpoint, decoder, line, start_revision, token))
        except Failed as exc:
            raise self._unreachable(endpoint, exc) from exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                await stream.aclose()
        raise self._unreachable(endpoint, "it closed the watch stream")

    def _watch_answer(
        self, endpoint: str, decoder: msgspec.json.Decoder[_WatchLine], line: bytes,
        start_revision: int, token: str | None,
    ) -> WatchResponse:
        """One line of a watch stream (sent with `token`); raises if it ends the watch."""
        decoded = _decode(decoder, endpoint, line)
        if decoded.result is None:
            raise EtcdError(f"etcd at {endpoint} broke the watch: {decoded.error}")
        answer = decoded.result
        if answer.compact_revision:
            raise WatchCompacted(f"revision {start_revision} is compacted at {endpoint}")
        if answer.canceled:
            reason = answer.cancel_reason
            if "Unauthenticated" in reason or any(r in reason for r in _TOKEN_REFUSALS):
                self._forget(token)
            raise EtcdError(f"etcd at {endpoint} cancelled the watch: {answer.cancel_reason}")
        return answer

    # --- plumbing -----------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any], answer: type[_T], limit: float) -> _T:
        started = trio.current_time()
        try:
            return await self._exchange(path, body, answer, limit)
        finally:
            call = path.removeprefix("/v3/")
            seen = self.request_seconds.get(call)
            if seen is None:
                seen = self.request_seconds[call] = Histogram(REQUEST_BUCKETS)
            seen.observe(trio.current_time() - started)

    async def _exchange(self, path: str, body: dict[str, Any], answer: type[_T], limit: float) -> _T:
        content = self._encoder.encode(body)
        failure: EtcdError | None = None
        pool = self._leases if path.startswith("/v3/lease/") else self._pool
        # One round per endpoint, and one more for a request refused for its token (expired,
        # or issued before an auth change): only once, lest a refusal that logging in does
        # not cure send it round and round.
        # Connecting gets half the time, so that a member that does not answer SYNs leaves
        # time to try the next one within the same attempt bound.
        logged_in_anew = False
        for _ in range(len(self.endpoints) + 1):
            origin = self._origins[self._current]
            endpoint = origin.url
            # The place in the pool is waited for outside the attempt's bound: a request that
            # never left was not lost by the member, and must not count against it.
            await pool.hold()
            try:
                with trio.move_on_after(limit) as attempt:
                    try:
                        token = await self._token_for(pool, origin, limit / 2)
                        request = origin.request(path, content, token)
                        status, data = await pool.exchange(origin, request, limit / 2, held=True)
                    except NotSent as exc:
                        # Nothing was sent: the next member can safely take the same request.
                        failure = self._unreachable(endpoint, exc)
                        continue
                    except Failed as exc:
                        raise self._unreachable(endpoint, exc) from exc
            finally:
                pool.release()
            if attempt.cancelled_caught:
                raise self._unreachable(endpoint, f"no answer within {limit:.2g} s")
            if status == 200:
                return _decode(self._decoder(answer), endpoint, data)
            failure = self._failure(endpoint, status, data)
            if logged_in_anew or not _refused_for_token(failure.status, str(failure)):
                raise failure
            logged_in_anew = True
            self._forget(token)
        assert failure is not None
        raise failure

    async def _token_for(self, pool: Pool, origin: Origin, connect_timeout: float) -> str | None:
        """The auth token to send, logging in through `pool` first if there is none yet;
        None without credentials. The caller holds a place in `pool` (taken before the lock on
        logging in, so that the one logging in never waits for a place another waiter holds).
        Raises `NotSent`, `Failed`, or EtcdError if etcd refuses.

        One call logs in at a time; those that found no token meanwhile take the one it got
        (etcd checks each password with bcrypt: a login per call would load it for nothing).
        """
        if self._credentials is None or self._token is not None:
            return self._token
        async with self._login:
            if self._token is not None:
                return self._token
            return await self._log_in(pool, origin, connect_timeout)

    async def _log_in(self, pool: Pool, origin: Origin, connect_timeout: float) -> str:
        assert self._credentials is not None
        credentials = self._encoder.encode(self._credentials)
        login = origin.request("/v3/auth/authenticate", credentials, None)
        status, data = await pool.exchange(origin, login, connect_timeout, held=True)
        if status != 200:
            raise self._failure(origin.url, status, data)
        token = _decode(self._decoder(_Auth), origin.url, data).token
        # It goes into a header line: a token that could end the line is no token.
        if not (token.isascii() and token.isprintable()):
            raise EtcdError(f"etcd at {origin.url} sent an auth token lockd cannot send back")
        self._token = token
        return token

    def _forget(self, token: str | None) -> None:
        """Drop `token`, which etcd refused, unless another call has already replaced it: a
        late refusal of the old one must not throw away the new one."""
        if self._token == token:
            self._token = None

    def _decoder(self, answer: type[_T]) -> msgspec.json.Decoder[_T]:
        decoder = self._decoders.get(answer)
        if decoder is None:
            decoder = self._decoders[answer] = msgspec.json.Decoder(answer, strict=False)
        return decoder

    def _failure(self, endpoint: str, status: int, data: bytes) -> EtcdError:
        try:
            failure = msgspec.json.decode(data, type=_Failure)
        except msgspec.DecodeError:
            failure = _Failure(message=f"HTTP {status} {data[:200].decode(errors='replace')}")
        message = failure.message or failure.error or f"HTTP {status}"
        return EtcdError(f"etcd at {endpoint} answered: {message}", failure.code)

    def _unreachable(self, endpoint: str, cause: Exception | str) -> EtcdUnreachable:
        """The error for `endpoint` not answering; the next call tries the next one first.

        Calls that fail on the same endpoint together move past it once, not once each (which
        could bring them back to it).
        """
        if self.endpoint == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)
        return EtcdUnreachable(f"etcd at {endpoint} is unreachable: {cause}")


def _decode(decoder: msgspec.json.Decoder[_T], endpoint: str, data: bytes) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EtcdError(f"etcd at {endpoint} sent an answer lockd cannot read: {exc}") from exc
