"""`lockd`: start the lock broker daemon.

Invariant: nothing is served until every directory, the token store and the listeners are in
place, so a client that connects is served with tokens that continue upward; any start-up
problem exits with status 1 and one line that says what to fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from lockd_client import paths

from . import __version__

log = logging.getLogger("lockd")

EPILOG = """\
examples:
  lockd                                   per-user daemon with the default paths
  lockd --socket /tmp/l.sock --lock-dir /tmp/locks --state-dir /tmp/state
  LOCKD_SOCKET=/tmp/l.sock lockctl status  talk to that daemon

defaults (root / others):
  socket     /run/lockd/lockd.sock   / $XDG_RUNTIME_DIR/lockd/lockd.sock
  lock dir   /run/lock/lockd         / $XDG_RUNTIME_DIR/lockd/locks
  state dir  /var/lib/lockd          / $XDG_STATE_HOME/lockd
  (without XDG_RUNTIME_DIR: /tmp/lockd-UID, created with mode 0700)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lockd",
        description="Lock broker for this host: named flock() leases over a Unix socket, "
        "released the moment their holder dies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", help="Unix socket to serve on (default: $LOCKD_SOCKET, else see below)")
    parser.add_argument("--lock-dir", type=Path, help="directory of the NAME.lock files")
    parser.add_argument("--state-dir", type=Path, help="directory for durable state (fencing tokens)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument("--version", action="version", version=f"lockd {__version__}")
    return parser.parse_args(argv)


def _private_dir(path: Path) -> None:
    """Create `path` (mode 0700) if missing. An existing directory is used as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="lockd: %(levelname)s: %(message)s", stream=sys.stderr)

    import trio

    from .flock_backend import FlockBackend
    from .lockfiles import LockFiles
    from .server import Limits, Server, bind_unix_listener
    from .table import LockTable
    from .tokens import TokenStore

    socket_path = Path(args.socket) if args.socket else paths.default_socket()
    lock_dir = args.lock_dir or paths.default_lock_dir()
    state_dir = args.state_dir or paths.default_state_dir()
    try:
        if not args.socket and not os.environ.get(paths.SOCKET_ENV):
            _private_dir(socket_path.parent)
        _private_dir(lock_dir)
        tokens = TokenStore.open(state_dir)
        files = LockFiles(lock_dir)
        listener = bind_unix_listener(str(socket_path), 0o600 if os.geteuid() else 0o660)
        bound = os.stat(socket_path)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1

    backend = FlockBackend(files, tokens)
    server = Server(LockTable(), backend, Limits())

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]
                await nursery.start(server.serve, listeners)
                log.info("serving on %s (locks in %s, state in %s)", socket_path, lock_dir, state_dir)
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    server.stop()
                    break

    try:
        trio.run(run)
    finally:
        try:
            if os.stat(socket_path).st_ino == bound.st_ino:
                os.unlink(socket_path)  # ours; a socket some other daemon bound since is left alone
        except FileNotFoundError:
            pass
        files.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
