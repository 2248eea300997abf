"""The metrics listener (`[metrics] listen`): `GET /metrics` over HTTP/1.1, on a TCP address
or a Unix socket, for Prometheus to scrape.

Invariants:
- It can cost the lock service no more than rendering the metrics. At most MAX_CLIENTS
  connections are served at once, one more while it waits for a slot (others wait in the
  kernel's backlog, holding none of lockd's descriptors); each may send a request head of at
  most MAX_HEAD bytes within REQUEST_TIMEOUT, gets one answer within SEND_TIMEOUT, and is
  closed (`Connection: close`). Anything but `GET` or `HEAD` of `/metrics` is answered with
  an error status.
- Idle connections cannot keep a scraper out: a connection that arrives when every slot is
  taken evicts the oldest of those still waiting for their request head (closed at once,
  unanswered), and takes its slot.
- No failure of the listener or of a connection reaches the rest of the daemon: it is
  logged, and at worst the metrics are no longer served.

A responder of our own rather than a library: the one request it serves needs a few dozen
lines, and the HTTP servers that run on trio bring a framework and more dependencies than
the whole daemon has.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

import trio

from .config import ListenAddress
from .listen import bind_unix_listener

log = logging.getLogger("lockd")

#: Scrapes served at once: Prometheus sends one at a time per target.
MAX_CLIENTS: Final = 8
#: The longest request head (request line and headers) read; a longer one gets 431.
MAX_HEAD: Final = 8192
#: Seconds a client has to send its request head (a scraper sends it at once), and to take
#: the answer.
REQUEST_TIMEOUT: Final = 2.0
SEND_TIMEOUT: Final = 10.0
#: How long to wait before accepting again when accept() fails for want of resources.
ACCEPT_RETRY: Final = 0.1
#: The Unix socket's mode: every local user may read the metrics, as with `lockctl metrics`.
UNIX_MODE: Final = 0o666
_BACKLOG: Final = 64
#: The text format lockd.metrics writes: every name in it is a classic one, so the format of
#: 0.0.4, which every scraper and node_exporter's textfile collector read.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: The status lines this responder sends.
_REASONS: Final = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 505: "HTTP Version Not Supported",
}


def bind(address: ListenAddress) -> socket.socket:
    """A listening socket at `address`. Raises OSError saying what to fix."""
    if address.path is not None:
        return bind_unix_listener(str(address.path), UNIX_MODE, _BACKLOG, option="metrics.listen")
    where = f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE,
        )[0]
    except socket.gaierror as exc:
        raise OSError(errno.EINVAL, f"metrics.listen: cannot resolve {address.host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"metrics.listen: cannot listen on {where}: {exc.strerror}") from None
    return sock


async def serve(sock: socket.socket, render: Callable[[], bytes]) -> None:
    """Answer scrapes on `sock` with `render()` until cancelled; `sock` is closed then.
    A failure of the listener itself is logged and ends only this."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    free = trio.Semaphore(MAX_CLIENTS)
    #: The scopes of the connections still reading their request head, oldest first.
    idle: dict[trio.CancelScope, None] = {}
    try:
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors or memory: the lock service needs them more.
                    log.warning("metrics listener: cannot accept a connection: %s; retrying", exc.strerror)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if free.value == 0 and idle:
                    next(iter(idle)).cancel()  # its task gives its slot back as it ends
                await free.acquire()
                nursery.start_soon(_answer, stream, render, free, idle)
    except Exception:
        log.exception("the metrics listener failed; lockd serves on without it")


async def _answer(
    stream: trio.SocketStream, render: Callable[[], bytes], free: trio.Semaphore,
    idle: dict[trio.CancelScope, None],
) -> None:
    """Read one request from `stream`, answer it, close it; while reading, its scope is in
    `idle`, where cancelling it (an eviction) closes the connection unanswered.
    Cancellation closes it at once."""
    try:
        with trio.CancelScope() as evicted:
            idle[evicted] = None
            try:
                with trio.move_on_after(REQUEST_TIMEOUT) as reading:
                    head = await _read_head(stream)
            finally:
                del idle[evicted]
        if evicted.cancelled_caught:
            return
        if reading.cancelled_caught:
            response = _response(408, f"send the request within {REQUEST_TIMEOUT:g} seconds\n")
        elif head is None:
            return  # closed without asking
        else:
            response = _respond(head, render)
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        log.exception("internal error answering a metrics request; carrying on")
    finally:
        free.release()
        await trio.aclose_forcefully(stream)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head (up to its blank line; at most MAX_HEAD + 1 bytes, which is too
    many), or None if the client closed before sending anything."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) <= MAX_HEAD:
        chunk = await stream.receive_some(MAX_HEAD + 1 - len(data))
        if not chunk:
            return data or None
        data += chunk
    return data


def _respond(head: bytes, render: Callable[[], bytes]) -> bytes:
    """The whole answer to the request whose head is `head`."""
    if len(head) > MAX_HEAD and b"\n\n" not in head[:MAX_HEAD] and b"\r\n\r\n" not in head[:MAX_HEAD]:
        return _response(431, f"the request head is longer than {MAX_HEAD} bytes\n")
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, "expected a request line such as: GET /metrics HTTP/1.1\n")
    method, target, version = parts
    if not version.startswith(b"HTTP/1."):
        return _response(505, "this listener speaks HTTP/1.1\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, "only GET and HEAD are served\n", extra="Allow: GET, HEAD\r\n")
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, "lockd serves its metrics at /metrics\n")
    try:
        body = render()
    except Exception:
        log.exception("internal error rendering the metrics")
        return _response(500, "internal error in lockd (it is logged)\n")
    return _response(200, body, content_type=CONTENT_TYPE, head_only=method == b"HEAD")


def _response(
    status: int, body: str | bytes, *, content_type: str = "text/plain; charset=utf-8", extra: str = "",
    head_only: bool = False,
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else data)
