"""EtcdClient's HTTP/1.1 against a scripted server: connection reuse, connections the server
closes, chunked watch streams, which failures move on to the next endpoint, the pool's
bound, malformed answers, TLS."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from lockd.etcd import client as etcd_client
from lockd.etcd.client import EtcdClient, EtcdError, EtcdUnreachable, WatchResponse
from lockd.etcd.http import Origin
from lockd.etcd.pool import Pool
from tests.etcd_cluster import Certs, free_ports
from tests.scripted_http import (
    HANG_UP,
    SILENT,
    TXN_OK,
    Reply,
    Request,
    answer,
    chunked,
    scripted_server,
)

WAIT = 10.0


def always(reply: Reply) -> Callable[[Request], Reply]:
    return lambda request: reply


async def txn(client: EtcdClient, within: float = 2) -> tuple[bool, int]:
    return await client.txn([etcd_client.put("/k", b"v", 0)], timeout=within)


async def test_calls_one_after_another_share_one_connection() -> None:
    async with scripted_server(always(TXN_OK)) as server:
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT):
                for _ in range(5):
                    assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert (len(server.requests), server.connections) == (5, 1)


@pytest.mark.parametrize(
    ("reply", "close_after_answer"),
    [
        (TXN_OK, True),  # the server times the idle connection out
        (answer(b'{"header":{"revision":"7"},"succeeded":true}', headers=b"Connection: close\r\n"), False),
        (TXN_OK.replace(b"HTTP/1.1", b"HTTP/1.0"), False),
    ],
    ids=["closed-when-idle", "connection-close", "http-1.0"],
)
async def test_a_connection_the_server_ends_is_not_used_again(
    reply: bytes, close_after_answer: bool
) -> None:
    """Each request reaches the server exactly once, on a fresh connection: none is lost on
    the closed one, and none is sent twice."""
    async with scripted_server(always(reply)) as server:
        server.close_after_answer = close_after_answer
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT):
                for _ in range(3):
                    assert await txn(client) == (True, 7)
                    await trio.sleep(0.05)  # the server's close arrives while idle
        finally:
            await client.aclose()
    assert [r.connection for r in server.requests] == [0, 1, 2]


async def test_an_answer_framed_by_closing_the_connection_is_read_to_its_end() -> None:
    body = b'{"header":{"revision":"7"},"succeeded":true}'
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    async with scripted_server(always([reply[:20], reply[20:]])) as server:
        server.close_after_answer = True
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT):
                assert await txn(client) == (True, 7)
                assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_interim_answers_and_a_base_path_are_handled() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + TXN_OK
    async with scripted_server(always(reply)) as server:
        client = EtcdClient([server.url + "/behind/proxy/"])
        try:
            with trio.fail_after(WAIT):
                assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert server.requests[0].path == "/behind/proxy/v3/kv/txn"


async def test_a_request_that_may_have_reached_etcd_is_not_sent_to_the_next_endpoint() -> None:
    """The first member reads the request and hangs up without answering: it may have
    applied the txn, so the call fails rather than apply it again elsewhere. The next call
    goes to the next member."""
    async with scripted_server(always(HANG_UP)) as first, scripted_server(always(TXN_OK)) as second:
        client = EtcdClient([first.url, second.url])
        try:
            with trio.fail_after(WAIT):
                with pytest.raises(EtcdUnreachable, match="closed the connection before its answer"):
                    await txn(client)
                assert (len(first.requests), len(second.requests)) == (1, 0)
                assert client.endpoint == second.url
                assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert (len(first.requests), len(second.requests)) == (1, 1)


async def test_a_request_that_got_no_answer_in_time_is_not_sent_to_the_next_endpoint() -> None:
    async with scripted_server(always(SILENT)) as first, scripted_server(always(TXN_OK)) as second:
        client = EtcdClient([first.url, second.url])
        try:
            with trio.fail_after(WAIT):
                with pytest.raises(EtcdUnreachable, match="no answer within 0.2 s"):
                    await txn(client, within=0.2)
        finally:
            await client.aclose()
    assert (len(first.requests), len(second.requests)) == (1, 0)


async def test_a_request_no_member_could_take_fails_after_trying_each_once() -> None:
    client = EtcdClient([f"http://127.0.0.1:{port}" for port in free_ports(2)])
    try:
        with trio.fail_after(WAIT), pytest.raises(EtcdUnreachable, match="cannot connect"):
            await txn(client)
    finally:
        await client.aclose()


async def test_a_refused_auth_token_is_sent_again_after_logging_in_anew() -> None:
    tokens = iter(["first", "second"])

    def script(request: Request) -> Reply:
        if request.path == "/v3/auth/authenticate":
            return answer(b'{"header":{},"token":"%s"}' % next(tokens).encode())
        if request.headers.get("Authorization") == "first":
            return answer(b'{"error":"invalid auth token","code":16}', "401 Unauthorized")
        return TXN_OK

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT):
                assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    paths = [(r.path, r.headers.get("Authorization")) for r in server.requests]
    assert paths == [
        ("/v3/auth/authenticate", None), ("/v3/kv/txn", "first"),
        ("/v3/auth/authenticate", None), ("/v3/kv/txn", "second"),
    ]


async def test_an_auth_token_that_could_end_its_header_line_is_refused() -> None:
    def script(request: Request) -> Reply:
        return answer(b'{"header":{},"token":"t\\r\\nX-Evil: 1"}')

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdError, match="auth token"):
                await txn(client)
        finally:
            await client.aclose()
    assert [r.path for r in server.requests] == ["/v3/auth/authenticate"]


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", "both"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}xx0\r\n\r\n", "chunk does not end"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\n folded: 1\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "closed the connection before"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70_000, "no end of headers in the first 65536 bytes"),
    ],
)
async def test_a_malformed_answer_fails_the_call_and_its_connection_is_dropped(
    reply: bytes, match: str
) -> None:
    def script(request: Request) -> Reply:
        return [reply] if request.connection == 0 else TXN_OK

    async with scripted_server(script) as server:
        server.close_after_answer = True  # so that an answer cut short ends
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT):
                with pytest.raises(EtcdUnreachable, match=match):
                    await txn(client)
                assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert [r.connection for r in server.requests] == [0, 1]


async def test_an_error_answer_says_what_etcd_said() -> None:
    async with scripted_server(always(answer(b"overloaded", "503 Service Unavailable"))) as server:
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdError, match="HTTP 503 overloaded"):
                await txn(client)
        finally:
            await client.aclose()


def watch_line(revision: int, key: bytes = b"") -> bytes:
    events = b'"events":[{"kv":{"key":"%s","mod_revision":"%d"}}],' % (key, revision) if key else b""
    return b'{"result":{%s"header":{"revision":"%d"}}}\n' % (events, revision)


async def test_a_watch_reads_lines_however_its_chunks_split_them() -> None:
    """Lines split across chunks, several lines in one chunk, a chunk extension, every piece
    sent apart; the last chunk ends the watch."""
    first, second, third = watch_line(1), watch_line(2, b"YQ=="), watch_line(3, b"Yg==")
    reply = chunked(first + second[:10], second[10:], third + watch_line(4))
    reply[2] = reply[2].replace(b"\r\n", b";ext=1\r\n", 1)
    reply[1:2] = [reply[1][:1], reply[1][1:]]  # the first chunk's size line, split
    seen: list[tuple[int, list[bytes]]] = []

    def collect(response: WatchResponse) -> None:
        seen.append((response.header.revision, [e.kv.key for e in response.events]))

    async with scripted_server(always(reply)) as server:
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdUnreachable, match="closed the watch stream"):
                await client.watch("/p/", 1, collect, timeout=2)
        finally:
            await client.aclose()
    assert seen == [(1, []), (2, [b"a"]), (3, [b"b"]), (4, [])]


async def test_a_watch_refused_says_why() -> None:
    reply = answer(b'{"error":"etcdserver: permission denied","code":7}', "403 Forbidden")
    async with scripted_server(always(reply)) as server:
        client = EtcdClient([server.url])
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdError, match="permission denied"):
                await client.watch("/p/", 1, lambda response: None, timeout=2)
        finally:
            await client.aclose()


async def test_a_pool_never_opens_more_connections_than_its_limit() -> None:
    async def slow_exchange(pool: Pool, origin: Origin) -> None:
        assert await pool.exchange(origin, origin.request("/v3/kv/txn", b"{}", None), 2) == (200, b"{}")

    def slowly(request: Request) -> Reply:
        return [answer(b"{}")[:10], answer(b"{}")[10:]]

    async with scripted_server(slowly) as one, scripted_server(slowly) as other:
        pool = Pool(ssl.create_default_context(), 2)
        try:
            with trio.fail_after(WAIT):
                for server in (one, other):
                    origin = Origin(server.url)
                    async with trio.open_nursery() as nursery:
                        for _ in range(6):
                            nursery.start_soon(slow_exchange, pool, origin)
                # The connections to the first server, idle, were closed to make room.
                await one.until_open(0)
                assert other.open_now == 2
        finally:
            await pool.aclose()
    assert (len(one.requests), one.most_open, len(other.requests), other.most_open) == (6, 2, 6, 2)


async def test_a_cancelled_call_closes_its_connection_and_frees_its_place() -> None:
    replies = iter([SILENT, TXN_OK])
    async with scripted_server(lambda request: next(replies)) as server:
        pool = Pool(ssl.create_default_context(), 1)
        origin = Origin(server.url)
        try:
            with trio.fail_after(WAIT):
                with trio.move_on_after(0.2):
                    await pool.exchange(origin, origin.request("/v3/kv/txn", b"{}", None), 2)
                await server.until_open(0)
                status, _ = await pool.exchange(origin, origin.request("/v3/kv/txn", b"{}", None), 2)
                assert status == 200
        finally:
            await pool.aclose()
    assert server.connections == 2


requires_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@requires_openssl
async def test_tls_connections_are_verified_and_kept_alive(tmp_path: Path) -> None:
    """A member whose certificate does not verify is skipped before anything is sent to it;
    the next one's connection carries every call."""
    certs, stranger = Certs(tmp_path / "certs"), Certs(tmp_path / "stranger")
    contexts = []
    for issued in (stranger, certs):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(issued.server_cert, issued.server_key)
        contexts.append(context)
    async with scripted_server(always(TXN_OK), contexts[0]) as untrusted, \
            scripted_server(always(TXN_OK), contexts[1]) as trusted:
        client = EtcdClient([untrusted.url, trusted.url], ca_file=certs.ca)
        try:
            with trio.fail_after(WAIT):
                for _ in range(3):
                    assert await txn(client) == (True, 7)
        finally:
            await client.aclose()
    assert (len(untrusted.requests), len(trusted.requests), trusted.connections) == (0, 3, 1)


@pytest.mark.parametrize(
    "refusal",
    [
        b'{"error":"etcdserver: revision of auth store is old","code":3}',
        b'{"error":"etcdserver: user name is empty","code":3}',
    ],
    ids=["old-auth-revision", "empty-user-name"],
)
async def test_a_token_from_before_an_auth_change_is_replaced(refusal: bytes) -> None:
    """etcd refuses such a token with InvalidArgument, not Unauthenticated: the client logs
    in anew and sends the request again, once; a refusal logging in does not cure fails."""
    tokens = iter(["first", "second", "third"])

    def script(request: Request) -> Reply:
        if request.path == "/v3/auth/authenticate":
            return answer(b'{"header":{},"token":"%s"}' % next(tokens).encode())
        if request.headers.get("Authorization") in ("first", "third"):
            return answer(refusal, "400 Bad Request")
        return TXN_OK

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT):
                assert await txn(client) == (True, 7)
                client._token = "third"
                with pytest.raises(EtcdError, match="etcdserver: "):
                    await txn(client)
        finally:
            await client.aclose()
    paths = [(r.path, r.headers.get("Authorization")) for r in server.requests]
    assert paths == [
        ("/v3/auth/authenticate", None), ("/v3/kv/txn", "first"),
        ("/v3/auth/authenticate", None), ("/v3/kv/txn", "second"),
        ("/v3/kv/txn", "third"), ("/v3/auth/authenticate", None), ("/v3/kv/txn", "third"),
    ]


async def test_an_invalid_argument_that_is_not_about_the_token_is_not_sent_again() -> None:
    refusal = answer(b'{"error":"etcdserver: too many operations in txn request","code":3}', "400 Bad Request")

    def script(request: Request) -> Reply:
        if request.path == "/v3/auth/authenticate":
            return answer(b'{"header":{},"token":"t"}')
        return refusal

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdError, match="too many operations"):
                await txn(client)
        finally:
            await client.aclose()
    assert [r.path for r in server.requests] == ["/v3/auth/authenticate", "/v3/kv/txn"]


async def test_calls_without_a_token_share_one_login_and_keep_the_newer_token() -> None:
    """Calls that start together log in once; a refusal of the old token that arrives after
    another call has logged in anew does not throw the new token away."""
    tokens = iter(["first", "second", "third"])

    def script(request: Request) -> Reply:
        if request.path == "/v3/auth/authenticate":
            return answer(b'{"header":{},"token":"%s"}' % next(tokens).encode())
        if request.headers.get("Authorization") == "first":
            return answer(b'{"error":"invalid auth token","code":16}', "401 Unauthorized")
        return TXN_OK

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(txn, client)
        finally:
            await client.aclose()
    logins = [r for r in server.requests if r.path == "/v3/auth/authenticate"]
    assert len(logins) == 2
    assert [r.headers.get("Authorization") for r in server.requests if r.path == "/v3/kv/txn"] == (
        ["first"] * 5 + ["second"] * 5
    )


async def test_a_watch_cancelled_for_an_old_token_drops_it() -> None:
    cancelled = (
        b'{"result":{"header":{"revision":"1"},"canceled":true,'
        b'"cancel_reason":"etcdserver: revision of auth store is old"}}\n'
    )

    def script(request: Request) -> Reply:
        if request.path == "/v3/auth/authenticate":
            return answer(b'{"header":{},"token":"t"}')
        return chunked(cancelled)

    async with scripted_server(script) as server:
        client = EtcdClient([server.url], username="u", password="p")
        try:
            with trio.fail_after(WAIT), pytest.raises(EtcdError, match="cancelled the watch"):
                await client.watch("/p/", 1, lambda response: None, timeout=2)
            assert client._token is None
        finally:
            await client.aclose()


async def test_waiting_for_a_free_connection_does_not_count_against_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call queued behind another for the only connection is sent once it is free, however
    long it waited: it was never sent, so it was not lost, and the member is not skipped."""
    monkeypatch.setattr(etcd_client, "CONNECTIONS", 1)
    replies = iter([SILENT, TXN_OK])
    async with scripted_server(lambda request: next(replies)) as server:
        client = EtcdClient([server.url])
        outcomes: list[object] = []

        async def first() -> None:
            with pytest.raises(EtcdUnreachable, match="no answer within 0.6 s"):
                await txn(client, within=0.6)
            outcomes.append("first timed out")

        async def second() -> None:
            await server.until_open(1)
            outcomes.append(await txn(client, within=0.3))

        try:
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(first)
                    nursery.start_soon(second)
        finally:
            await client.aclose()
    assert outcomes == ["first timed out", (True, 7)]
    assert len(server.requests) == 2
