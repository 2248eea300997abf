"""Real etcd processes on loopback for the etcd backend tests: one member or a cluster of
three, and a relay that cuts one daemon off from etcd like a network partition.

Invariant: every member listens on 127.0.0.1 only, on ports that were free when the cluster
started, with its data in a private temporary directory; `close()` (the fixtures call it)
kills every process the cluster started and removes its directories. The fixtures that
start clusters are in conftest.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from lockd.etcd.client import EtcdClient, KeyValue

from .waiting import wait_until, wait_until_async

ETCD = shutil.which("etcd")

requires_etcd = pytest.mark.skipif(
    ETCD is None,
    reason="the etcd binary is not on PATH: install etcd 3.4+ to run the etcd backend tests",
)

STARTUP_TIMEOUT = 15.0


def free_ports(count: int) -> list[int]:
    """Ports that are free right now (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Certs:
    """A throw-away CA with a certificate for etcd (127.0.0.1) and one for its clients."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.ca = directory / "ca.crt"
        self.server_cert, self.server_key = directory / "server.crt", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.crt", directory / "client.key"
        ca_key = directory / "ca.key"
        _openssl("req", "-x509", "-days", "1", *_NEW_KEY, "-keyout", ca_key, "-out", self.ca,
                 "-subj", "/CN=test CA")
        self._issue(ca_key, "/CN=etcd", self.server_cert, self.server_key,
                    "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        # No CommonName: etcd's JSON gateway refuses client certificates that have one.
        self._issue(
            ca_key, "/O=lockd", self.client_cert, self.client_key, "extendedKeyUsage=clientAuth\n"
        )

    def _issue(self, ca_key: Path, subject: str, cert: Path, key: Path, extensions: str) -> None:
        request, ext = cert.with_suffix(".csr"), cert.with_suffix(".ext")
        ext.write_text(extensions)
        _openssl("req", *_NEW_KEY, "-keyout", key, "-out", request, "-subj", subject)
        _openssl("x509", "-req", "-in", request, "-CA", self.ca, "-CAkey", ca_key,
                 "-CAcreateserial", "-days", "1", "-out", cert, "-extfile", ext)


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class Member:
    """One etcd process. It keeps its data directory across `kill` and `start`."""

    def __init__(
        self,
        name: str,
        root: Path,
        client_port: int,
        peer_port: int,
        certs: Certs | None,
        extra: Sequence[str],
    ) -> None:
        self.name = name
        self.url = f"{'https' if certs else 'http'}://127.0.0.1:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.flags = list(extra)
        self._context: ssl.SSLContext | None = None
        if certs is not None:
            self.flags += [
                "--cert-file", str(certs.server_cert), "--key-file", str(certs.server_key),
                "--trusted-ca-file", str(certs.ca), "--client-cert-auth",
            ]
            self._context = ssl.create_default_context(cafile=certs.ca)
            self._context.load_cert_chain(certs.client_cert, certs.client_key)

    def start(self, initial_cluster: str, token: str) -> None:
        assert ETCD is not None
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-level", "warn",
            *self.flags,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def get(self, path: str, timeout: float = 1.0) -> dict:
        with urllib.request.urlopen(
            self.url + path, timeout=timeout, context=self._context
        ) as response:
            return json.load(response)

    def post(self, path: str, body: dict, timeout: float = 1.0) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout, context=self._context) as response:
            return json.load(response)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        """Put a key of any bytes, as another tool might, without lockd's client."""
        self.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)})

    def delete(self, key: bytes) -> None:
        self.post("/v3/kv/deleterange", {"key": _b64(key)})

    def healthy(self) -> bool:
        try:
            return self.get("/health").get("health") == "true"
        except OSError:
            return False

    def is_leader(self) -> bool:
        status = self.post("/v3/maintenance/status", {})
        return status.get("leader") == status["header"]["member_id"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdCluster:
    """`size` members forming one cluster, started by `start()`.

    With `tls`, clients must use https and present a certificate from `self.certs`; `extra`
    flags go to every member.
    """

    def __init__(self, size: int = 1, *, tls: bool = False, extra: Sequence[str] = ()) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsync on tmpfs is free
        self.root = Path(tempfile.mkdtemp(prefix="lockd-etcd-", dir=base))
        self.certs = Certs(self.root / "certs") if tls else None
        ports = free_ports(2 * size)
        self.members = [
            Member(f"m{i}", self.root, ports[2 * i], ports[2 * i + 1], self.certs, extra)
            for i in range(size)
        ]
        self._initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self._token = self.root.name

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> None:
        for member in self.members:
            member.start(self._initial, self._token)
        self.wait_healthy()

    def restart(self, member: Member) -> None:
        """Start a killed member again on its old data (it rejoins the cluster)."""
        member.start(self._initial, self._token)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Wait until every running member answers /health with a leader."""
        wait_until(self._healthy, "every running etcd member healthy", STARTUP_TIMEOUT, interval=0.05, show=self._logs)

    def _healthy(self) -> bool:
        for member in self.members:
            died = member.proc is not None and member.proc.poll() not in (None, -signal.SIGKILL)
            if died:
                raise RuntimeError(f"etcd {member.name} exited:\n{member.log()}")
        return all(m.healthy() for m in self.members if m.running)

    def _logs(self) -> str:
        return "\n".join(m.log() for m in self.members)

    def etcdctl(self, *args: str) -> None:
        """Run `etcdctl ARGS` against the cluster (as root, once auth is on)."""
        argv = ["etcdctl", "--endpoints", ",".join(self.endpoints)]
        if self.certs is not None:
            argv += ["--cacert", str(self.certs.ca), "--cert", str(self.certs.client_cert),
                     "--key", str(self.certs.client_key)]
        subprocess.run([*argv, *args], check=True, capture_output=True, timeout=30)

    def enable_auth(self, user: str, password: str, prefix: str) -> None:
        """Turn auth on, with `user` allowed to read and write keys under `prefix` only."""
        self.etcdctl("user", "add", "root:root-secret")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", "locker")
        self.etcdctl("role", "grant-permission", "locker", "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", user, "locker")
        self.etcdctl("auth", "enable")

    def leader(self) -> Member:
        def current() -> Member | None:
            return next((m for m in self.members if m.running and m.is_leader()), None)

        return wait_until(current, "the etcd cluster has a leader", STARTUP_TIMEOUT, interval=0.05)

    def close(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.root, ignore_errors=True)


async def entries_under(endpoints: list[str], prefix: str) -> list[KeyValue]:
    """Every key in etcd under `prefix`, read afresh, oldest first (etcd's queue order)."""
    client = EtcdClient(endpoints)
    try:
        _, kvs = await client.range_prefix(prefix, timeout=2)
    finally:
        await client.aclose()
    return sorted(kvs, key=lambda kv: kv.create_revision)


async def keys_under(endpoints: list[str], prefix: str) -> list[str]:
    """Every key in etcd under `prefix`, read afresh."""
    return [kv.text for kv in await entries_under(endpoints, prefix)]


async def wait_no_keys(endpoints: list[str], prefix: str) -> None:
    async def none_left() -> bool:
        return not await keys_under(endpoints, prefix)

    await wait_until_async(none_left, f"no keys left under {prefix}", interval=0.02)


async def wait_keys(endpoints: list[str], prefix: str, count: int) -> None:
    async def enough() -> bool:
        return len(await keys_under(endpoints, prefix)) >= count

    await wait_until_async(enough, f"{count} keys under {prefix}", interval=0.02)


class Relay:
    """A TCP relay to one etcd member that a test can cut like a network partition.

    `run` it in a nursery (`await nursery.start(relay.run)`), then point a client at `url`.
    While cut, connections stay open but nothing crosses in either direction, so the client
    sees silence rather than an error, as behind a real partition. `silence_watches` does that
    to the watch streams open at the time only, as a firewall that drops idle flows would;
    with `refuse_watches` set, a connection that asks for a watch is closed at once. `delays`
    holds what is sent to etcd for that many seconds when it contains the pattern given (a
    path, a txn operation) before passing it on.
    """

    def __init__(self, target_url: str) -> None:
        self._target = int(target_url.rsplit(":", 1)[1])
        self.url = ""
        self.cut = False
        self.refuse_watches = False
        self.delays: dict[bytes, float] = {}
        #: (trio time, path) of every request passed on to etcd.
        self.requests: list[tuple[float, str]] = []
        self._links: set[_Link] = set()

    @property
    def keep_alives(self) -> list[float]:
        """trio times at which a keep-alive request was passed on to etcd."""
        return [at for at, path in self.requests if path == "/v3/lease/keepalive"]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def heal(self) -> None:
        """Let traffic through again; connections cut so far are closed, as after a timeout."""
        self.cut = False
        for link in self._links:
            for stream in link.streams:
                stream.socket.close()
        self._links.clear()

    def silence_watches(self) -> None:
        for link in self._links:
            link.silent = link.silent or link.watch

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self._target)
        except OSError:
            await client.aclose()
            return
        link = _Link((client, upstream))
        self._links.add(link)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, link, client, upstream, True, nursery.cancel_scope)
                nursery.start_soon(self._pipe, link, upstream, client, False, nursery.cancel_scope)
        finally:
            self._links.discard(link)
            with trio.CancelScope(shield=True):
                for stream in link.streams:
                    await stream.aclose()

    async def _pipe(
        self, link: _Link, source: trio.SocketStream, sink: trio.SocketStream, to_etcd: bool,
        both: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if to_etcd:
                    for path in _REQUEST_LINE.findall(data):
                        self.requests.append((trio.current_time(), path.decode()))
                        link.watch = link.watch or path == b"/v3/watch"
                    if link.watch and self.refuse_watches:
                        break
                    await trio.sleep(sum(t for p, t in self.delays.items() if p in data))
                if not (self.cut or link.silent):
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        both.cancel()


@asynccontextmanager
async def relay_to(url: str) -> AsyncIterator[Relay]:
    """A Relay to the etcd member at `url`, running until the block ends."""
    async with trio.open_nursery() as nursery:
        relay = Relay(url)
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


_REQUEST_LINE = re.compile(rb"POST (/v3/[a-z/]+) HTTP/1")


class _Link:
    """One client connection through a Relay."""

    def __init__(self, streams: tuple[trio.SocketStream, trio.SocketStream]) -> None:
        self.streams = streams
        #: Whether the client asked for a watch on it, and whether the relay now drops its data.
        self.watch = False
        self.silent = False
