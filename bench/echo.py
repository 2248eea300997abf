"""Reference floors for a broker: minimal Unix-socket echo servers, blocking and trio.

Invariant: a server returns every byte it receives on a connection, in order, and does
nothing else: no framing, no decoding, no state. Any broker does at least this much work per
round trip, so its cycle time over theirs is the cost of being a broker.

Run as `python -m bench.echo {blocking,trio} SOCKET`: prints `ready` once it accepts, and
serves until killed.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1024)
    return sock


def serve_blocking(path: str) -> None:
    """One thread per connection, each a recv/sendall loop: the plainest Python server."""
    listener = _listen(path)
    print("ready", flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def serve_trio(path: str) -> None:
    """One task per connection under trio, as the daemon serves its clients."""
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    async def main() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(_listen(path)))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, echo, [listener])
            print("ready", flush=True)

    trio.run(main)


if __name__ == "__main__":
    kind, path = sys.argv[1:]
    {"blocking": serve_blocking, "trio": serve_trio}[kind](path)
