"""A minimal blocking client that speaks the wire protocol directly, for daemon tests that
must not depend on the client library (and for sending what no real client would)."""

from __future__ import annotations

import socket

import msgspec
from lockd_client import protocol


class RawClient:
    def __init__(self, path: str, *, hello: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = protocol.reply_decoder()
        self.frames = protocol.FrameBuffer(protocol.MAX_REPLY_FRAME)
        self.next_id = 1
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            if hello:
                self.send(protocol.Hello(protocol.PROTOCOL_VERSION, label="test"))
                welcome = self.recv()
                assert isinstance(welcome, protocol.Welcome), welcome
        except BaseException:
            self.sock.close()
            raise

    def send(self, message: object) -> None:
        out = bytearray()
        protocol.encode_frame(self.encoder, message, out)
        self.sock.sendall(out)

    def recv(self) -> object:
        """The next message; raises EOFError when the daemon closed the connection."""
        while (body := self.frames.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.frames.feed(data)
        return self.decoder.decode(body)

    def request(self, message: object) -> object:
        """Send a request and return its reply, skipping pushed Queued events."""
        self.send(message)
        while True:
            reply = self.recv()
            if not isinstance(reply, protocol.Queued):
                return reply

    def acquire(self, *names: str, **kwargs: object) -> object:
        rid = self.next_id
        self.next_id += 1
        return self.request(protocol.Acquire(rid, list(names), **kwargs))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
