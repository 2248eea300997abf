"""EtcdClient against real etcd: TLS with client certificates, auth, failover, watches."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
import trio

from lockd.backend import Claim, Requester
from lockd.config import Etcd
from lockd.etcd import client as etcd_client
from lockd.etcd.backend import EtcdBackend
from lockd.etcd.client import EtcdClient, EtcdError, EtcdUnreachable, WatchCompacted, WatchResponse
from lockd.lockfiles import LockFiles

from .etcd_cluster import EtcdCluster, free_ports, relay_to, requires_etcd

pytestmark = requires_etcd

WAIT = 10.0
USER, PASSWORD, PREFIX = "lockd", "s3cret", "/lockd-test/"


def ignore_blocked(holders: list) -> None:
    """Tests that do not care whom a take waits for."""


@pytest.fixture(scope="module")
def secured() -> Iterator[EtcdCluster]:
    """etcd over TLS with client certificates and auth on; auth tokens expire after 1 s idle."""
    cluster = EtcdCluster(1, tls=True, extra=["--auth-token-ttl", "1"])
    try:
        cluster.start()
        cluster.enable_auth(USER, PASSWORD, PREFIX)
        yield cluster
    finally:
        cluster.close()


def secured_client(cluster: EtcdCluster, **overrides: object) -> EtcdClient:
    assert cluster.certs is not None
    options: dict = {
        "ca_file": cluster.certs.ca, "cert_file": cluster.certs.client_cert,
        "key_file": cluster.certs.client_key, "username": USER, "password": PASSWORD,
    }
    return EtcdClient(cluster.endpoints, **(options | overrides))


async def test_tls_and_auth_then_login_again_once_the_token_expired(secured: EtcdCluster) -> None:
    client = secured_client(secured)
    try:
        with trio.fail_after(WAIT):
            await client.txn([etcd_client.put(PREFIX + "a", b"1", 0)], timeout=2)
            await trio.sleep(2.5)  # the token is dropped after 1 s idle (checked every second)
            _, kvs = await client.range_prefix(PREFIX, timeout=2)
            assert [kv.value for kv in kvs] == [b"1"]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"password": "wrong"}, EtcdError, "authentication failed"),
        ({"username": None}, EtcdError, "user name is empty"),
        ({"cert_file": None, "key_file": None}, EtcdUnreachable, "unreachable"),
        ({"ca_file": None}, EtcdUnreachable, "CERTIFICATE_VERIFY_FAILED"),
    ],
)
async def test_refusals_say_what_etcd_objected_to(
    secured: EtcdCluster, overrides: dict, error: type[Exception], match: str
) -> None:
    client = secured_client(secured, **overrides)
    try:
        with trio.fail_after(WAIT), pytest.raises(error, match=match):
            await client.range_prefix(PREFIX, timeout=2)
    finally:
        await client.aclose()


async def test_permissions_outside_the_prefix_are_refused(secured: EtcdCluster) -> None:
    client = secured_client(secured)
    try:
        with trio.fail_after(WAIT), pytest.raises(EtcdError, match="permission denied"):
            await client.txn([etcd_client.put("/elsewhere/a", b"1", 0)], timeout=2)
    finally:
        await client.aclose()


async def test_backend_from_config_takes_locks_over_tls_with_auth(
    secured: EtcdCluster, short_tmp: Path
) -> None:
    assert secured.certs is not None
    config = Etcd(
        endpoints=secured.endpoints, ttl=2, prefix=PREFIX + "backend/",
        ca_file=secured.certs.ca, cert_file=secured.certs.client_cert,
        key_file=secured.certs.client_key,
        username=USER, password=PASSWORD,
    )
    files = LockFiles(short_tmp)
    backend = EtcdBackend.from_config(files, config, "web1")
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.run, lambda ticket, reason: None)
                while True:
                    try:
                        ticket = Claim(
                            names=("x",), shared=False, wait=True, requester=Requester(1, 0, 0, "cmd", None)
                        )
                        (token,) = await backend.take(ticket, ignore_blocked)
                        break
                    except EtcdError:
                        await trio.sleep(0.05)
                assert token > 0
                nursery.cancel_scope.cancel()
    finally:
        files.close()


async def test_an_endpoint_that_refuses_connections_is_skipped(shared_etcd: EtcdCluster) -> None:
    (dead,) = free_ports(1)
    client = EtcdClient([f"http://127.0.0.1:{dead}", *shared_etcd.endpoints])
    try:
        with trio.fail_after(WAIT):
            _, revision = await client.txn([], timeout=2)
            assert revision > 0
            assert client.endpoint == shared_etcd.endpoints[0]
    finally:
        await client.aclose()


async def test_calls_that_time_out_together_on_a_silent_endpoint_all_move_past_it(
    shared_etcd: EtcdCluster,
) -> None:
    """A member that accepts connections and answers nothing (frozen, or behind a firewall
    that drops packets): each call gives up within its timeout and the next goes elsewhere."""
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen()
    client = EtcdClient([f"http://127.0.0.1:{silent.getsockname()[1]}", *shared_etcd.endpoints])
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(expect_unreachable, client.txn([], timeout=0.3))
            assert client.endpoint == shared_etcd.endpoints[0]
            await client.txn([], timeout=2)
    finally:
        await client.aclose()
        silent.close()


async def expect_unreachable(call: Awaitable[object]) -> None:
    with pytest.raises(EtcdUnreachable, match="no answer within 0.3 s"):
        await call


async def test_lease_calls_do_not_wait_behind_a_burst_of_other_calls(
    shared_etcd: EtcdCluster,
) -> None:
    async with relay_to(shared_etcd.endpoints[0]) as relay:
        client = EtcdClient([relay.url])
        try:
            with trio.fail_after(WAIT):
                lease, _ = await client.grant(5, timeout=2)
                relay.delays[b"/v3/kv/txn"] = 2.0
                async with trio.open_nursery() as nursery:
                    for _ in range(etcd_client.CONNECTIONS + 10):
                        nursery.start_soon(functools.partial(client.txn, [], timeout=WAIT))
                    await trio.sleep(0.2)  # every connection of the pool taken, some txns waiting
                    assert await client.keep_alive(lease, timeout=1.0) > 0
                    nursery.cancel_scope.cancel()
                await client.revoke(lease, timeout=2)
        finally:
            await client.aclose()


async def test_watch_from_a_compacted_revision_says_so(
    shared_etcd: EtcdCluster, prefix: str
) -> None:
    client = EtcdClient(shared_etcd.endpoints)
    try:
        with trio.fail_after(WAIT):
            await client.txn([etcd_client.put(prefix + "a", b"1", 0)], timeout=2)
            _, revision = await client.txn([etcd_client.put(prefix + "a", b"2", 0)], timeout=2)
            shared_etcd.members[0].post("/v3/kv/compaction", {"revision": revision})
            with pytest.raises(WatchCompacted):
                await client.watch(prefix, revision - 1, lambda response: None, timeout=2)
    finally:
        await client.aclose()


async def test_watch_streams_puts_and_deletes_in_order(
    shared_etcd: EtcdCluster, prefix: str
) -> None:
    client = EtcdClient(shared_etcd.endpoints)
    seen: list[tuple[str, str, int]] = []
    both = trio.Event()

    def collect(response: WatchResponse) -> None:
        seen.extend((e.type, e.kv.key.decode(), e.kv.mod_revision) for e in response.events)
        if len(seen) >= 2:
            both.set()

    try:
        with trio.fail_after(WAIT):
            _, start = await client.txn([], timeout=2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.watch(prefix, start + 1, collect, timeout=2))
                _, put_at = await client.txn([etcd_client.put(prefix + "a", b"1", 0)], timeout=2)
                _, deleted_at = await client.txn([etcd_client.delete(prefix + "a")], timeout=2)
                beside = etcd_client.put(prefix.rstrip("/") + "-other", b"1", 0)
                await client.txn([beside], timeout=2)
                await both.wait()
                nursery.cancel_scope.cancel()
        assert seen == [("PUT", prefix + "a", put_at), ("DELETE", prefix + "a", deleted_at)]
    finally:
        await client.aclose()
