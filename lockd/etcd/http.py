"""HTTP/1.1 over trio, just as much as etcd's JSON gateway needs: POST requests with a JSON
body, answers framed by Content-Length, chunked, or by the end of the connection.

Invariants:
- `NotSent` is raised only when no byte of the request can have reached the server: the
  connection could not be made (refused, unreachable, TLS handshake failed). Once sending has
  begun, every failure is `Failed`, since the server may have acted on the request.
- A connection carries one exchange at a time, and is `reusable` only once an answer's
  framing leaves it fit for the next. Parsing is strict and fails closed: an answer it does
  not understand raises `Failed`.

Cancelled mid-exchange, or after `Failed`, a connection is in no known state: its owner
closes it (`etcd.pool` does).

Written for this one peer rather than taken from an HTTP library: per etcd request, httpx
cost lockd about 700 µs of CPU and a client on h11 about 200, against about 100 for this
module (docs/performance.md).
"""

from __future__ import annotations

import select
import socket
import ssl
import urllib.parse

import trio

#: Bytes asked of the socket at a time.
_READ = 65536
#: The most bytes of a status line and headers, and of a chunk-size line: anything longer is
#: not etcd.
_HEAD_LIMIT = 65536


class NotSent(Exception):
    """No connection could be made: nothing of the request reached the server."""


class Failed(Exception):
    """The exchange failed after sending began, or the answer was not HTTP as expected."""


class Origin:
    """The server an endpoint URL names, and the path prefix requests go under."""

    __slots__ = ("url", "host", "port", "tls", "_prefix", "_authority")

    def __init__(self, url: str) -> None:
        """Raises ValueError for a URL that is not http:// or https:// with a host."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, not {url!r}")
        self.url = url
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self._prefix = parts.path.rstrip("/").encode()
        self._authority = parts.netloc.rpartition("@")[2].encode("idna")

    def request(self, path: str, body: bytes, token: str | None) -> bytes:
        """The bytes of a POST of the JSON `body` to `path`, with the auth `token` if any."""
        auth = b"" if token is None else b"Authorization: %s\r\n" % token.encode("ascii")
        # etcd's gateway passes Accept on to etcd as gRPC metadata; without any, etcd refuses a
        # request that lacks credentials with a bare "permission denied" instead of saying
        # that the user name is empty.
        return (
            b"POST %s%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Accept: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        ) % (self._prefix, path.encode("ascii"), self._authority, auth, len(body), body)


class Connection:
    """One connection to an `Origin`, reading answers from its own buffer."""

    __slots__ = ("origin", "_stream", "_fd", "_buffer", "reusable", "_chunked", "_remaining")

    def __init__(self, origin: Origin, stream: _Plain | trio.SSLStream[trio.SocketStream], fd: int) -> None:
        self.origin = origin
        self._stream = stream
        self._fd = fd
        self._buffer = bytearray()
        #: Whether the answer being read leaves the connection fit for another exchange.
        self.reusable = False
        #: How the body being read is framed: chunked, or its bytes left (None: until closed).
        self._chunked = False
        self._remaining: int | None = 0

    @classmethod
    async def open(cls, origin: Origin, context: ssl.SSLContext) -> Connection:
        """Connect, with the TLS handshake for https; raises `NotSent`. Cancellation closes
        whatever was opened (and nothing has been sent)."""
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as exc:
            raise NotSent(f"cannot connect: {_describe(exc)}") from exc
        fd = tcp.socket.fileno()
        if not origin.tls:
            sock = socket.socket(fileno=tcp.socket.detach())
            sock.setblocking(False)  # as trio left the descriptor; the object must know it too
            return cls(origin, _Plain(sock), fd)
        stream = trio.SSLStream(tcp, context, server_hostname=origin.host, https_compatible=True)
        try:
            await stream.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.BrokenResourceError):
                raise NotSent(f"TLS handshake failed: {_describe(exc)}") from exc
            raise
        return cls(origin, stream, fd)

    def stale(self) -> bool:
        """Whether the server closed this idle connection (or sent what nobody asked for)."""
        # poll(), not select(): lockd's descriptors run well past select's limit of 1024.
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(self._buffer) or bool(poller.poll(0))

    async def send(self, request: bytes) -> None:
        try:
            await self._stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Failed(f"the connection broke while sending: {_describe(exc)}") from exc

    async def answer_head(self) -> int:
        """Read an answer's status line and headers, skipping interim (1xx) answers; return
        its status. The body is then read with `part`."""
        while True:
            status, length, chunked, keep = _parse_head(await self._until(b"\r\n\r\n", "headers"))
            if not 100 <= status < 200:
                break
        self._chunked = chunked
        self._remaining = 0 if status in (204, 304) else length
        # An answer without a length ends with the connection.
        self.reusable = keep and (chunked or self._remaining is not None)
        return status

    async def part(self) -> bytes | None:
        """The next piece of the body (a chunk, or what has arrived); None at its end."""
        if self._chunked:
            return await self._chunk()
        if self._remaining is None:
            if not self._buffer and not await self._fill():
                return None
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        if not self._remaining:
            return None
        if not self._buffer:
            await self._need()
        data = bytes(self._buffer[:self._remaining])
        del self._buffer[:len(data)]
        self._remaining -= len(data)
        return data

    async def answer(self) -> tuple[int, bytes]:
        """Read a whole answer: its status and body."""
        status = await self.answer_head()
        parts = []
        while (part := await self.part()) is not None:
            parts.append(part)
        return status, b"".join(parts)

    async def aclose(self) -> None:
        """Close at once, without waiting for the peer (TLS: no close_notify)."""
        self.reusable = False
        await trio.aclose_forcefully(self._stream)

    # --- reading ------------------------------------------------------------------------------

    async def _fill(self) -> bool:
        """Read what the server sent next into the buffer; False if it closed the connection."""
        try:
            data = await self._stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Failed(f"the connection broke: {_describe(exc)}") from exc
        self._buffer += data
        return bool(data)

    async def _need(self) -> None:
        if not await self._fill():
            raise Failed("the server closed the connection before its answer was complete")

    async def _chunk(self) -> bytes | None:
        size_line = await self._until(b"\r\n", "line")
        size_text = size_line.split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
            raise Failed(f"bad chunk size {size_line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await self._until(b"\r\n", "line"):  # trailers, up to the empty line
                pass
            return None
        while len(self._buffer) < size + 2:
            await self._need()
        if self._buffer[size:size + 2] != b"\r\n":
            raise Failed("a chunk does not end where its size says")
        data = bytes(self._buffer[:size])
        del self._buffer[:size + 2]
        return data

    async def _until(self, mark: bytes, what: str) -> bytes:
        """The buffered bytes up to `mark`, reading until it comes; `mark` is dropped."""
        searched = 0
        while (end := self._buffer.find(mark, searched)) < 0:
            if len(self._buffer) > _HEAD_LIMIT:
                raise Failed(f"no end of {what} in the first {_HEAD_LIMIT} bytes")
            searched = max(0, len(self._buffer) - len(mark) + 1)
            await self._need()
        found = bytes(self._buffer[:end])
        del self._buffer[:end + len(mark)]
        return found


class _Plain(trio.abc.AsyncResource):
    """A plain TCP connection's socket, used directly.

    trio's SocketStream yields to the scheduler after every send or receive that did not
    have to wait: a scheduling round per call that an exchange, which waits for its answer
    right after sending, does not need. A receive that finds data waiting still yields, so
    that a server that never pauses (a busy watch) cannot keep the other tasks from running.
    Errors are trio's, as from a SocketStream.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self._sock.send(view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while True:
                await trio.lowlevel.wait_readable(self._sock)
                try:
                    return self._sock.recv(max_bytes)
                except BlockingIOError:
                    continue
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """Status, Content-Length (None if absent), whether chunked, and whether the connection
    stays open, from an answer's head; raises `Failed` for anything not HTTP/1.x as sent."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise Failed(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    keep = version == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in b" \t":
            raise Failed(f"malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise Failed(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise Failed(f"unsupported Transfer-Encoding {value[:40]!r}")
            chunked = True
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            keep = b"close" not in tokens and (keep or b"keep-alive" in tokens)
    if chunked and length is not None:
        # RFC 9112 6.1: a message with both may be an attempt at smuggling; trust neither.
        raise Failed("an answer with both Content-Length and chunked Transfer-Encoding")
    return int(code), length, chunked, keep


def _describe(cause: BaseException) -> str:
    """The first message in `cause`'s chain: trio wraps the telling one (TLS alerts, errno)."""
    current: BaseException | None = cause
    while current is not None:
        if str(current):
            return str(current)
        current = current.__cause__ or current.__context__
    return type(cause).__name__
