"""`lockd`: start the lock broker daemon.

Invariant: nothing is served until the configuration, every directory, the token store and
the listeners are in place, so the first client is served with tokens that continue upward;
any start-up problem exits with status 1 and one line that says what to fix (a bad flag is a
usage error, status 2, from argparse). `--check-config` runs the same checks of the file and
the flags and exits the same way, with one line saying OK in place of serving.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, get_args

from . import __version__

if TYPE_CHECKING:  # imported where used: `lockd --version` and --help must start fast
    from . import handover
    from .backend import Backend, BackendKind
    from .config import Config
    from .flock.tokens import TokenStore
    from .history import HistoryStore
    from .listen import Listener
    from .lockfiles import LockFiles
    from .policy import Policy
    from .server import Server
    from .systemd import Notifier

log = logging.getLogger("lockd")

EPILOG = """\
examples:
  lockd                                   per-user daemon with the default paths
  lockd --socket /tmp/l.sock --lock-dir /tmp/locks --state-dir /tmp/state
  LOCKD_SOCKET=/tmp/l.sock lockctl status  talk to that daemon
  lockd --backend etcd --etcd-endpoints http://10.0.0.1:2379,http://10.0.0.2:2379

defaults (root / others):
  config     /etc/lockd/lockd.toml   / $XDG_CONFIG_HOME/lockd/lockd.toml (optional)
  socket     /run/lockd/lockd.sock   / $XDG_RUNTIME_DIR/lockd/lockd.sock
  lock dir   /run/lock/lockd         / $XDG_RUNTIME_DIR/lockd/locks
  state dir  /var/lib/lockd          / $XDG_STATE_HOME/lockd
  (without XDG_RUNTIME_DIR: /tmp/lockd-UID, created with mode 0700)
Flags override the config file. Every option is in docs/configuration.md.
Signals: SIGTERM/SIGINT end every lease and exit 0; SIGHUP reloads the config file;
SIGUSR2 re-executes lockd in place (an upgrade), keeping every lease and connection.
"""

#: How often the systemd status line is refreshed (only when something changed).
STATUS_INTERVAL: Final = 1.0
#: The signals lockd acts on. They are held back from the start until the event loop listens
#: for them: the socket accepts before that, and a SIGHUP sent as soon as it does (a reload
#: right after start) must reload, not kill the daemon with every lease.
SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """lockd's command line; `parse_args` and the man page generator (tools/share.py) read it."""
    from .config import BackendName, LogLevel

    parser = argparse.ArgumentParser(
        prog="lockd",
        description="Lock broker for this host: named flock() leases over a Unix socket, "
        "released the moment their holder dies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help="config file (default: see below; a missing default file is fine)",
    )
    parser.add_argument(
        "--check-config", nargs="?", const=True, type=Path, metavar="FILE",
        help="check the config file (FILE, else --config's or the default one) and the flags, "
        "say whether they are OK, and exit: 0 if they are, 1 if not",
    )
    parser.add_argument(
        "--socket", type=_socket_path, metavar="PATH",
        help="Unix socket to serve on, an absolute path (default: $LOCKD_SOCKET, else see below)",
    )
    parser.add_argument("--lock-dir", metavar="DIR", help="directory of the NAME.lock files")
    parser.add_argument("--state-dir", metavar="DIR", help="directory for durable state (fencing tokens)")
    parser.add_argument("--log-level", choices=get_args(LogLevel), help="default: info")
    parser.add_argument("--backend", choices=get_args(BackendName), help="where locks live (default: flock)")
    etcd = parser.add_argument_group("etcd backend")
    etcd.add_argument("--etcd-endpoints", type=_comma_list, metavar="URL[,URL...]", help="etcd client URLs")
    etcd.add_argument("--etcd-ttl", type=float, metavar="SECONDS", help="etcd lease TTL (default: 5)")
    etcd.add_argument("--etcd-prefix", metavar="PREFIX", help="key prefix in etcd (default: /lockd/)")
    # Run by a daemon about to re-execute into this program (lockd.reexec): not for people.
    parser.add_argument("--check-handover", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"lockd {__version__}")
    return parser


def _socket_path(text: str) -> str:
    from lockd_client.paths import socket_problem

    problem = socket_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, as plain values: `config.with_overrides` checks them like the file's."""
    args = build_parser().parse_args(argv)
    if isinstance(args.check_config, Path):
        if args.config is not None and args.config != args.check_config:
            build_parser().error("--check-config FILE and --config FILE name different files; give one")
        args.config = args.check_config
    return args


def load(args: argparse.Namespace) -> Config:
    """The config file with the flags applied. Raises ConfigError."""
    from .config import load_config, with_overrides

    flag_socket = Path(args.socket).absolute() if args.socket else None
    return with_overrides(load_config(args.config, explicit=args.config is not None, socket=flag_socket), args)


def _own_runtime_dir(path: Path) -> None:
    """Create the default runtime directory, or check the one that is there.

    Root's (/run/lockd) is 0755: who may connect is the socket's mode. Another user's is
    private (0700) and must be theirs: a /tmp/lockd-UID that someone else made first would let
    them replace the socket clients connect to.
    """
    from lockd_client.errors import LockdError

    root = os.geteuid() == 0
    try:
        os.mkdir(path, 0o755 if root else 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or (not root and (st.st_uid != os.geteuid() or st.st_mode & 0o077)):
        raise LockdError(
            f"{path} must be a directory of uid {os.geteuid()} that only it can use (mode 0700), "
            f"but it is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; remove it, "
            "or choose other places with --socket, --lock-dir and LOCKD_SOCKET"
        )


def main(argv: list[str] | None = None) -> int:
    # Start-up (and a re-exec's adoption, all of it inside the pause) makes objects that live
    # as long as the daemon: the collector would only walk them, again and again, until they
    # are frozen once serving begins (`_serve`).
    gc.disable()
    args = parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    if args.check_handover:
        return _check_handover()
    from . import handover, reexec
    from .config import ConfigError
    from .logs import configure_logging, under_systemd

    try:
        adopted = reexec.received()
    except handover.Unreadable as exc:
        # The daemon it came from is gone: its leases live on in their holders' descriptors.
        print(f"lockd: re-executed, but {exc}; every lease stays with its holder, start lockd anew", file=sys.stderr)
        return 1
    try:
        conf = adopted.config if adopted is not None else load(args)
        if args.check_config:
            return _check(args, conf)
    except ConfigError as exc:
        print(f"lockd: {exc}", file=sys.stderr)
        return 1
    journald = under_systemd()
    configure_logging(conf.log_level, journald)

    from lockd_client import paths
    from lockd_client.errors import LockdError

    from .fdlimit import raise_nofile_limit
    from .flock.tokens import TokenStore
    from .history import HistoryStore
    from .listen import Listener, bind_unix_listener, somaxconn
    from .lockfiles import LockFiles, prepare_lock_dir
    from .policy import Policy
    from .systemd import listen_fds

    if (missing := _missing_library()) is not None:
        log.error("%s", missing)
        return 1
    raise_nofile_limit()
    sock_path, lock_dir, state_dir = conf.socket, conf.lock_dir, conf.state_dir
    assert sock_path and lock_dir and state_dir, "load() fills in the default paths"
    tokens = files = history = None
    listeners: list[Listener] = []
    metrics: Listener | None = None
    try:
        policy = Policy.from_config(conf.policy)
        if not os.environ.get(paths.SOCKET_ENV) and conf.socket == paths.default_socket():
            _own_runtime_dir(sock_path.parent)
        prepare_lock_dir(lock_dir, 0o700)
        files = LockFiles(lock_dir, conf.lock_file_mode)
        if conf.backend == "flock":
            tokens = TokenStore.open(state_dir)
        if conf.history.enabled:
            # Its files are open, and its writer runs, before the first client can come.
            history = HistoryStore(state_dir, conf.history)
            history.start(backlog=adopted.history if adopted is not None else ())
        backend = _backend(conf, files, tokens)
        if adopted is not None:
            listeners = [Listener.adopted(listener) for listener in adopted.listeners]
            if adopted.metrics_listener is not None:
                metrics = Listener.adopted(adopted.metrics_listener)
        # Before lockd's own socket: once that accepts, the metrics listener is there too.
        elif conf.metrics.listen is not None:
            from .config import listen_address
            from .metrics_http import bind

            address = listen_address(conf.metrics.listen)
            sock = bind(address)
            metrics = Listener(sock) if address.path is None else Listener.bound(sock, address.path)
        listeners = listeners or [Listener(sock) for sock in listen_fds()]
        if not listeners:
            sock = bind_unix_listener(str(sock_path), conf.socket_mode, conf.listen_backlog)
            listeners = [Listener.bound(sock, sock_path)]
            if conf.listen_backlog is not None and conf.listen_backlog > (cap := somaxconn()):
                log.warning(
                    "listen_backlog = %d, but the kernel queues at most net.core.somaxconn = %d "
                    "connections; raise that sysctl to get more", conf.listen_backlog, cap,
                )
    except (LockdError, OSError) as exc:
        log.error("%s", exc)
        for listener in listeners:
            listener.sock.close()
        if metrics is not None:
            metrics.sock.close()
            metrics.unlink()
        if files is not None:
            files.close()
        if tokens is not None:
            tokens.close()
        if history is not None:
            history.stop()
        return 1

    try:
        import trio

        if adopted is not None:
            where = "the sockets handed over"
        elif listeners[0].path is not None:
            where = str(listeners[0].path)
        else:
            where = f"{len(listeners)} socket(s) from systemd"
        trio.run(_serve, args, conf, backend, policy, listeners, metrics, where, history, adopted)
    finally:
        if history is not None:
            history.stop()
        for listener in listeners:
            listener.unlink()
        if metrics is not None:
            metrics.unlink()
        files.close()
        if tokens is not None:
            tokens.close()
    return 0


def _check_handover() -> int:
    """Check mode (lockd.reexec): can this program take over the state on stdin?"""
    from . import reexec

    problem = _missing_library() or reexec.check(sys.stdin.buffer.read(), _backend_kind)
    if problem is not None:
        print(f"lockd: {problem}", file=sys.stderr)
        return 1
    print(f"lockd {__version__}: can take over")
    return 0


def _missing_library() -> str | None:
    """Why this program could not write its metrics, or None if it can.

    prometheus_client is imported at the first render only (lockd.metrics_text says why), so
    without this a daemon installed without it would start, and fail every scrape instead.
    Only looked up, not imported: that is the cost the late import avoids.
    """
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        return f"cannot find prometheus_client, which lockd writes its metrics with; install it for {sys.executable}"
    return None


def _check(args: argparse.Namespace, conf: Config) -> int:
    """`--check-config`: what start-up would make of the configuration, short of touching the
    directories, the socket or etcd. Raises ConfigError for a problem."""
    from .config import ConfigError, default_config_path
    from .policy import Policy

    Policy.from_config(conf.policy)
    if conf.backend == "etcd":
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(conf.etcd, key)
            try:
                if path is not None:
                    path.open("rb").close()
            except OSError as exc:
                raise ConfigError(f"etcd.{key}: cannot read {path}: {exc.strerror}") from None
    path = args.config or default_config_path()
    source = str(path) if path.exists() else f"the defaults (no {path})"
    print(
        f"lockd: {source}: configuration OK (backend {conf.backend}, socket {conf.socket}, "
        f"{len(conf.policy.rules)} policy rule{'' if len(conf.policy.rules) == 1 else 's'})"
    )
    return 0


def _backend(conf: Config, files: LockFiles, tokens: TokenStore | None) -> Backend:
    """The backend `conf` names, over `files` (and `tokens` for flock). Raises LockdError or
    OSError (an unreadable TLS file)."""
    if conf.backend == "flock":
        from .flock.backend import FlockBackend

        assert tokens is not None
        return FlockBackend(files, tokens)
    from .etcd.backend import EtcdBackend

    return EtcdBackend.from_config(files, conf.etcd, socket.gethostname())


def _backend_kind(name: str) -> BackendKind:
    """The class of the backend `name`."""
    if name == "flock":
        from .flock.backend import FlockBackend

        return FlockBackend
    if name == "etcd":
        from .etcd.backend import EtcdBackend

        return EtcdBackend
    raise ValueError(f"no backend is called {name!r}")


async def _serve(
    args: argparse.Namespace, conf: Config, backend: Backend, policy: Policy, listeners: list[Listener],
    metrics_listener: Listener | None, where: str, history: HistoryStore | None, adopted: handover.State | None,
) -> None:
    import trio

    from .journal import EventLog
    from .metrics import Metrics
    from .reexec import Reexecutor
    from .server import Server
    from .systemd import Notifier, watchdog_interval, watchdog_loop
    from .table import LockTable

    etcd = None
    if conf.backend == "etcd":
        from .etcd.backend import EtcdBackend

        assert isinstance(backend, EtcdBackend)
        etcd = backend
    metrics = Metrics(conf.metrics.names, backend=backend.name, etcd=etcd, history=history)
    events = EventLog.from_environment()
    observers = [events.record] if history is None else [history.record, events.record]
    server = Server(
        LockTable(ordered_by_backend=backend.orders_requests), backend, conf.limits, policy, observers,
        metrics=metrics, history=history,
    )
    # What start-up made (modules, configuration) lives as long as the daemon: frozen, the
    # collector's full passes, which come as leases pile up, no longer walk it. Before a
    # re-exec's adoption: its leases end as any others do, and must stay collectable.
    gc.freeze()
    if adopted is not None:
        paused = time.monotonic() - adopted.paused_at
        try:
            server.adopt(adopted, paused)
        except Exception:
            log.exception(
                "re-executed, but could not take over what lockd %s handed over; serving afresh on the same "
                "sockets: every granted lease stays with its holder (held outside lockd now), waiting requests "
                "and connections are dropped", adopted.server,
            )
            adopted = None
            server = Server(
                LockTable(ordered_by_backend=backend.orders_requests), backend, conf.limits, policy, observers,
                metrics=metrics, history=history,
            )
    with events, Notifier.from_environment() as notifier, trio.open_signal_receiver(*SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        reexecutor = server.reexecutor = Reexecutor(
            server, conf, [listener.hand_over() for listener in listeners],
            None if metrics_listener is None else metrics_listener.hand_over(), history, notifier, SIGNALS,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener.sock for listener in listeners])
            gc.enable()
            if adopted is not None:
                log.info(
                    "lockd %s re-executed from %s in %.0f ms: %d leases and requests, %d connections kept",
                    __version__, adopted.server, paused * 1000, len(adopted.tickets),
                    sum(connection.session is not None for connection in adopted.connections),
                )
            else:
                log.info(
                    "lockd %s serving on %s (backend %s, locks in %s)", __version__, where, backend.name,
                    conf.lock_dir,
                )
            notifier.ready(_summary(server))
            async with trio.open_nursery() as duties:
                interval = watchdog_interval()
                if interval is not None:
                    duties.start_soon(watchdog_loop, notifier, interval)
                if notifier.enabled:
                    duties.start_soon(_report_status, notifier, server)
                if metrics_listener is not None:
                    from .metrics_http import serve as serve_metrics

                    duties.start_soon(serve_metrics, metrics_listener.sock, server.render_metrics)
                    log.info("serving metrics on %s", conf.metrics.listen)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        notifier.reloading()
                        conf = reexecutor.config = _reload(args, conf, server)
                        notifier.ready(_summary(server))
                        continue
                    if signum == signal.SIGUSR2:
                        server.reexec()
                        continue
                    log.info("%s: ending every lease and shutting down", signal.Signals(signum).name)
                    notifier.stopping()
                    server.stop()  # serve() returns once clients were told
                    break
                duties.cancel_scope.cancel()


def _summary(server: Server) -> str:
    held, waiting, clients = server.service.counts()
    return f"{held} leases held, {waiting} waiting, {clients} clients"


async def _report_status(notifier: Notifier, server: Server) -> None:
    import trio

    last = None
    while True:
        summary = _summary(server)
        if summary != last:
            notifier.status(summary)
            last = summary
        await trio.sleep(STATUS_INTERVAL)


def _reload(args: argparse.Namespace, current: Config, server: Server) -> Config:
    """Apply what a reloaded config file may change live; keep running on any error."""
    from .config import ConfigError, plan_reload
    from .logs import configure_logging, under_systemd
    from .policy import Policy

    try:
        plan = plan_reload(current, load(args))
        policy = Policy.from_config(plan.config.policy)
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return current
    except Exception:
        # Whatever the file holds, a reload must never cost the running leases.
        log.exception("reload failed, keeping the running configuration")
        return current
    configure_logging(plan.config.log_level, under_systemd())
    server.service.reconfigure(plan.config.limits, policy)
    if plan.applied:
        log.info("reloaded: applied %s", ", ".join(plan.applied))
    else:
        log.info("reloaded: nothing changed that applies live")
    if plan.needs_restart:
        log.warning("changed but only applied after a restart: %s", ", ".join(plan.needs_restart))
    return plan.config


if __name__ == "__main__":
    sys.exit(main())
