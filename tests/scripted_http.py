"""A scripted HTTP/1.1 server on loopback, standing in for etcd's gateway where a test needs
answers etcd would not give on demand: connections closed at chosen moments, answers split
into pieces, malformed answers.

Invariant: it listens on 127.0.0.1 only, reads each request whole (head and Content-Length
body) and records it before answering, and everything it opened is closed when the
`scripted_server` block ends.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

#: What the script answers a request with: the bytes to send (a list: pieces sent apart, so
#: the client reads them in separate pieces), HANG_UP to close without answering, or SILENT to
#: never answer.
Reply = bytes | list[bytes] | None
HANG_UP = None
SILENT = b""


@dataclass
class Request:
    connection: int
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    """The server's state, for the test to read and steer."""

    script: Callable[[Request], Reply]
    url: str = ""
    #: Every request read, in order.
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    #: Close each connection once its answer is sent (as a server that times out idle ones).
    close_after_answer: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    async def until_open(self, count: int) -> None:
        """Wait until exactly `count` connections are open."""
        while self.open_now != count:
            await self._changed.wait()

    def _opened(self, change: int) -> None:
        self.open_now += change
        self.most_open = max(self.most_open, self.open_now)
        self._changed.set()
        self._changed = trio.Event()


def answer(body: bytes, status: str = "200 OK", headers: bytes = b"") -> bytes:
    """An answer with `body` framed by Content-Length."""
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status.encode(), headers, len(body), body,
    )


def chunked(*chunks: bytes) -> list[bytes]:
    """A chunked answer, head and each chunk as a piece of its own, then the last chunk."""
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pieces += [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]
    return [*pieces, b"0\r\n\r\n"]


TXN_OK = answer(b'{"header":{"revision":"7"},"succeeded":true}')


@asynccontextmanager
async def scripted_server(
    script: Callable[[Request], Reply], context: ssl.SSLContext | None = None
) -> AsyncIterator[Scripted]:
    """Serve `script` on a free loopback port (TLS with `context`) until the block ends."""
    state = Scripted(script)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        state.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"

        async def serve(stream: trio.SocketStream) -> None:
            await _serve(state, stream, context)

        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield state
        nursery.cancel_scope.cancel()


async def _serve(state: Scripted, tcp: trio.SocketStream, context: ssl.SSLContext | None) -> None:
    number = state.connections
    state.connections += 1
    state._opened(1)
    stream: trio.abc.Stream = tcp if context is None else trio.SSLStream(tcp, context, server_side=True)
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            length = int(headers.get("Content-Length", "0"))
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            request = Request(number, lines[0].split(" ")[1], headers, buffer[:length])
            buffer = buffer[length:]
            state.requests.append(request)
            reply = state.script(request)
            if reply is HANG_UP:
                return
            if reply == SILENT:
                while await stream.receive_some(65536):  # until the client gives up
                    pass
                return
            for piece in [reply] if isinstance(reply, bytes) else reply:
                await stream.send_all(piece)
                await trio.sleep(0.01)
            if state.close_after_answer:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        state._opened(-1)
        await trio.aclose_forcefully(stream)
