"""`python -m bench`: measure lockd against its reference floors in one run.

Invariant: lockd and every floor are measured in the same run, interleaved repetition by
repetition, so machine drift hits them alike and the ratios hold even when absolute times
move; the run's raw results, machine info and judged targets are saved together as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report, services, workloads
from .lockers import ASYNC_KINDS, make_locker
from .machine import REPO, EtcdProbe, OthersMeter, loadavg, machine_info

WORKLOADS = ("w1", "w2", "w3", "w3s", "w4", "w5", "w6", "w7", "flood", "cli", "obs")
#: Sections run only when asked for (`--etcd`, or named in `--only`).
EXTRA = ("etcd",)
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
#: The etcd lease TTL of the lock API's clients in the etcd section: lockd's default --etcd-ttl,
#: so both sides give up a dead holder's lock on the same terms.
ETCD_TTL = 5


@dataclass
class Config:
    reps: int
    w1_cycles: int
    w2_clients: int
    w2_seconds: float
    w3_clients: int
    w3_seconds: float
    #: W3 on a semaphore (w3s): clients, and the semaphore's slots; a lock is its reference.
    w3s_clients: int
    w3s_slots: int
    w4_leases: tuple[int, ...]
    w5_tries: int
    #: W6: leases held over this many connections while a client cycles through re-execs.
    w6_leases: int
    w6_connections: int
    w6_reexecs: int
    cli_runs: int
    #: W7: clients bursting at once, from this many processes, against a daemon queueing
    #: this many connections (and one queueing as many as the host allows).
    w7_clients: int
    w7_processes: int
    w7_backlog: int
    #: The flood: bad connections, from this many processes, and the idle cycles measured first.
    flood_connections: int
    flood_processes: int
    flood_idle_cycles: int
    #: The etcd section's W1 cycles, W5 tries (a try of etcd's lock API lasts up to a TTL) and CLI runs.
    etcd_w1_cycles: int
    etcd_w5_tries: int
    etcd_cli_runs: int
    #: The lockd client the targets are judged on: "lockd" (the library) or "lockd-raw".
    lockd_client: str


FULL = dict(reps=3, w1_cycles=20_000, w2_clients=32, w2_seconds=5.0, w3_clients=8, w3_seconds=5.0,
            w3s_clients=16, w3s_slots=4,
            w4_leases=(10_000, 100_000), w5_tries=10, w6_leases=10_000, w6_connections=1_000, w6_reexecs=5,
            cli_runs=20,
            w7_clients=2_000, w7_processes=16, w7_backlog=128,
            flood_connections=100_000, flood_processes=2, flood_idle_cycles=5_000,
            etcd_w1_cycles=2_000, etcd_w5_tries=3, etcd_cli_runs=10)
QUICK = dict(reps=1, w1_cycles=2_000, w2_clients=8, w2_seconds=0.5, w3_clients=8, w3_seconds=0.5,
             w3s_clients=16, w3s_slots=4,
             w4_leases=(1_000,), w5_tries=2, w6_leases=1_000, w6_connections=100, w6_reexecs=2, cli_runs=3,
             w7_clients=200, w7_processes=4, w7_backlog=16,
             flood_connections=5_000, flood_processes=1, flood_idle_cycles=1_000,
             etcd_w1_cycles=200, etcd_w5_tries=1, etcd_cli_runs=2)


def _library_ready() -> bool:
    try:
        import lockd_client
    except ImportError:
        return False
    return hasattr(lockd_client, "connect")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: tiny counts, no repetition")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS + EXTRA)} (default: %(default)s)")
    p.add_argument("--etcd", action="store_true",
                   help="also run the etcd section: W1, W3, W5 and CLI through lockd on a fresh one-member "
                        "etcd, against etcd's own lock API (needs the etcd binary; adds about 1.5 minutes)")
    p.add_argument("--reps", type=int, help="repetitions of W1-W3 (default 3, --quick 1)")
    p.add_argument("--client", choices=["lockd", "lockd-raw"],
                   help="lockd client the targets are judged on (default: lockd_client if installed)")
    p.add_argument("--cli-python", default=sys.executable,
                   help="the interpreter whose lockctl and imports the CLI measure times (default: this one; bench/run "
                        "passes one with the client alone installed, as users get it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) | ({"etcd"} if args.etcd else set())
    if unknown := only - set(WORKLOADS + EXTRA):
        sys.exit(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS + EXTRA)}")
    if "etcd" in only and services.ETCD is None:
        sys.exit("the etcd section needs the etcd binary (3.4 or later) on PATH: install it, or run without --etcd")
    client = args.client or ("lockd" if _library_ready() else "lockd-raw")
    cfg = Config(**(QUICK if args.quick else FULL) | ({"reps": args.reps} if args.reps else {}), lockd_client=client)
    lockd_systems = ["lockd-raw"] + (["lockd"] if client == "lockd" else [])
    # The trio client's rows, where the targets on the library are judged for it too (W1-W3),
    # against the raw protocol client waiting in trio as the blocking one is against it blocking.
    trio_systems = ["lockd-raw-trio", "lockd-trio"] if client == "lockd" else []

    results: dict[str, Any] = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "config": asdict(cfg),
        "machine": machine_info(),
    }
    load = results["machine"]["loadavg_start"][0]
    if load > 0.5:
        _progress(f"note: load average {load:.1f} before the run; other work on this machine skews every figure")
    root = services.scratch_root()
    started = time.monotonic()
    whole_run = OthersMeter(services.running)
    try:
        with services.echo(root, "blocking") as echo_blocking, services.echo(root, "trio") as echo_trio, \
                services.lockd(root, "shared") as daemon:
            files = str(root / "files")
            os.mkdir(files)
            specs = {
                "flock": {"kind": "flock", "dir": files},
                "filelock": {"kind": "filelock", "dir": files},
                "echo-blocking-1rt": {"kind": "echo", "socket": echo_blocking.socket, "round_trips": 1},
                "echo-blocking-2rt": {"kind": "echo", "socket": echo_blocking.socket, "round_trips": 2},
                "echo-trio-2rt": {"kind": "echo", "socket": echo_trio.socket, "round_trips": 2},
                "lockd-raw": {"kind": "lockd-raw", "socket": daemon.socket},
                "lockd": {"kind": "lockd", "socket": daemon.socket},
                "lockd-trio": {"kind": "lockd-trio", "socket": daemon.socket},
                "lockd-raw-trio": {"kind": "lockd-raw-trio", "socket": daemon.socket},
            }
            servers = {
                "echo-blocking-1rt": echo_blocking, "echo-blocking-2rt": echo_blocking,
                "echo-trio-2rt": echo_trio, "lockd-raw": daemon, "lockd": daemon, "lockd-trio": daemon,
                "lockd-raw-trio": daemon,
            }

            def probe(system: str):
                return servers[system].probe if system in servers else None

            if "w1" in only:
                systems = [
                    "flock", "filelock", "echo-blocking-1rt", "echo-blocking-2rt", "echo-trio-2rt", *lockd_systems,
                    *trio_systems,
                ]
                results["w1"] = _repeat(cfg.reps, systems, "W1", lambda s: _w1(specs[s], cfg.w1_cycles, probe(s)))
            if "w2" in only:
                systems = ["flock", "filelock", "echo-blocking-2rt", "echo-trio-2rt", *lockd_systems, *trio_systems]
                results["w2"] = _repeat(cfg.reps, systems, "W2", lambda s: workloads.w2_throughput(
                    specs[s], cfg.w2_clients, cfg.w2_seconds, probe(s)))
            if "w3" in only:
                systems = ["flock", "filelock", *lockd_systems, *trio_systems]
                results["w3"] = _repeat(cfg.reps, systems, "W3", lambda s: workloads.w3_fairness(
                    specs[s], cfg.w3_clients, cfg.w3_seconds, probe(s)))
            if "w3s" in only:
                # Each client's semaphore interleaved with its lock, the reference, under the same load.
                systems = [f"{c}{kind}" for c in lockd_systems for kind in ("", report.SLOTS_SUFFIX)]

                def w3s(system: str) -> dict[str, Any]:
                    base = system.removesuffix(report.SLOTS_SUFFIX)
                    slots = {"slots": cfg.w3s_slots} if system != base else {}
                    return workloads.w3_slots(specs[base] | slots, cfg.w3s_clients, cfg.w3_seconds, probe(base))

                results["w3s"] = _repeat(cfg.reps, systems, "W3 semaphore", w3s)
            if "w5" in only:
                _progress("W5")
                results["w5"] = {
                    "flock": workloads.w5_crash(specs["flock"], cfg.w5_tries, workloads.flock_waiting(files)),
                    client: workloads.w5_crash(specs[client], cfg.w5_tries, workloads.lockd_waiting(daemon.socket)),
                }
            if "w7" in only:
                results["w7"] = _repeat(cfg.reps, ["filelock", "lockd-small-queue", "lockd"], "W7",
                                        lambda s: _w7(s, cfg, root, files, client))
                results["w7_backlog"] = cfg.w7_backlog
            if "flood" in only:
                _progress("flood")
                with services.lockd(root, "flood", log_level="info") as d:
                    results["flood"] = workloads.flood(
                        d, cfg.flood_connections, cfg.flood_processes, cfg.flood_idle_cycles
                    )
            if "cli" in only:
                _progress("CLI")
                _compile("lockd_client")
                results["cli"] = workloads.cli_startup(
                    _cli_commands(args.cli_python, files), cfg.cli_runs, {**os.environ, "LOCKD_SOCKET": daemon.socket})
                results["cli_python"] = args.cli_python
        if "w4" in only:
            results["w4_client"] = client
            results["w4"] = {}
            for leases in cfg.w4_leases:
                _progress(f"W4 {leases:,}")
                # A daemon needs a descriptor per lease; it raises its soft limit to the hard
                # one itself, and the hard one can only be raised with CAP_SYS_RESOURCE.
                nofile, refused = _raisable_nofile(leases + 1024)
                limit = {
                    "daemon_nofile_hard": nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[1],
                    "nofile_refused": refused,
                }
                with services.lockd(root, f"w4-{leases}", nofile=nofile) as d:
                    locker = make_locker({"kind": client, "socket": d.socket})
                    try:
                        results["w4"][str(leases)] = workloads.w4_many(locker, leases, d.probe) | limit
                    finally:
                        locker.close()
                if client == "lockd":
                    with services.lockd(root, f"w4-{leases}-pipelined", nofile=nofile) as d:
                        pipelined = workloads.w4_pipelined(d.socket, leases, d.probe) | limit
                        results.setdefault("w4_pipelined", {})[str(leases)] = pipelined
        if "w6" in only:
            _progress(f"W6 {cfg.w6_leases:,} leases, {cfg.w6_connections:,} connections")
            results["w6"] = _w6(cfg, root, client)
        if "obs" in only:
            results["obs"] = _observability(cfg, root, client)
        if "etcd" in only:
            results["etcd"] = _etcd_section(cfg, root, client, args.cli_python)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    results["machine"]["loadavg_end"] = loadavg()
    results["machine"]["others_cpu_share"] = whole_run.share()
    results["seconds"] = time.monotonic() - started
    results["targets"] = report.targets(results)
    print()
    print(report.tables(results))
    print()
    print(report.target_table(results["targets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    print(f"\n{m['cpus']} × {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, commit {m['git_commit']}"
          f"{' (dirty)' if m['git_dirty'] else ''}; {results['seconds']:.0f} s; saved {args.out}")
    return 0


def _w1(spec: dict[str, Any], cycles: int, server, etcd=None) -> dict[str, Any]:
    if spec["kind"] in ASYNC_KINDS:
        return workloads.w1_cycles_async(spec, "w1", cycles, server)
    locker = make_locker(spec)
    try:
        return workloads.w1_cycles(locker, "w1", cycles, server, etcd)
    finally:
        locker.close()


def _w6(cfg: Config, root: Path, client: str) -> dict[str, Any]:
    """W6 against a fresh daemon, started (and so re-executed) from compiled bytecode, as an
    installed lockd is: else each re-exec would compile every module changed since its last
    .pyc again."""
    _compile("lockd")
    # The daemon needs a descriptor per lease and per connection, this process one per
    # connection (a grant's lock-file descriptors it closes at once).
    nofile, refused = _raisable_nofile(cfg.w6_leases + cfg.w6_connections + 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < cfg.w6_connections + 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with services.lockd(root, "w6", nofile=nofile) as d:
        locker = make_locker({"kind": client, "socket": d.socket})
        try:
            result = workloads.w6_reexec(locker, d.socket, cfg.w6_leases, cfg.w6_connections, cfg.w6_reexecs, d.probe)
        finally:
            locker.close()
    return result | {"client": client, "nofile_refused": refused}


_w7_daemons = itertools.count(1)


def _w7(system: str, cfg: Config, root: Path, files: str, client: str) -> dict[str, Any]:
    """One W7 burst against `system`: filelock, or a fresh daemon queueing `cfg.w7_backlog`
    connections (lockd-small-queue) or as many as the host allows (lockd). Either daemon
    admits every client of the burst, which all come from this uid."""
    if system == "filelock":
        return workloads.w7_burst({"kind": "filelock", "dir": files}, cfg.w7_clients, cfg.w7_processes, None)
    config = f"[limits]\nmax_connections_per_uid = {max(cfg.w7_clients, 1024)}\n"
    if system == "lockd-small-queue":
        config = f"listen_backlog = {cfg.w7_backlog}\n" + config
    with services.lockd(root, f"w7-{next(_w7_daemons)}", config=config) as d:
        return workloads.w7_burst({"kind": client, "socket": d.socket}, cfg.w7_clients, cfg.w7_processes, d.probe)


def _observability(cfg: Config, root: Path, client: str) -> dict[str, Any]:
    """W1 and W3 against a daemon keeping its history and serving its metrics to a scraper
    that reads them every second, and against one doing neither, interleaved."""
    listen = root / "obs-metrics.sock"
    on = f'[history]\nenabled = true\n[metrics]\nlisten = "unix:{listen}"\n'
    off = "[history]\nenabled = false\n"
    with services.lockd(root, "obs-on", config=on) as with_obs, services.lockd(root, "obs-off", config=off) as bare, \
            services.MetricsScraper(str(listen)) as scraper:
        daemons = {report.OBS_OFF: bare, report.OBS_ON: with_obs}
        specs = {system: {"kind": client, "socket": daemon.socket} for system, daemon in daemons.items()}
        out = {
            "w1": _repeat(cfg.reps, list(daemons), "history + metrics W1", lambda s: _w1(
                specs[s], cfg.w1_cycles, daemons[s].probe)),
            "w3": _repeat(cfg.reps, list(daemons), "history + metrics W3", lambda s: workloads.w3_fairness(
                specs[s], cfg.w3_clients, cfg.w3_seconds, daemons[s].probe)),
        }
        out["scrapes"], out["scrape_failures"] = scraper.scrapes, scraper.failures
    return out


def _etcd_section(cfg: Config, root: Path, client: str, cli_python: str) -> dict[str, Any]:
    """W1, W3, W5 and the CLI through lockd on the etcd backend and through etcd's own lock
    API, against one fresh etcd member, interleaved as in the main section."""
    out: dict[str, Any] = {"ttl": ETCD_TTL}
    with services.etcd(root) as etcd, services.lockd(root, "on-etcd", etcd=etcd.url) as daemon:
        out["etcd_version"] = _etcd_version()
        metrics = EtcdProbe(etcd.url, etcd.probe.pid)
        lockd_spec = {"kind": client, "socket": daemon.socket}
        specs = {
            "etcd-kv": {"kind": "etcd-kv", "url": etcd.url, "ttl": ETCD_TTL},
            "etcd-lock": {"kind": "etcd-lock", "url": etcd.url, "ttl": ETCD_TTL},
            "lockd-etcd": lockd_spec,
        }
        out["w1"] = _repeat(cfg.reps, list(specs), "etcd W1", lambda s: _w1(
            specs[s], cfg.etcd_w1_cycles, daemon.probe if s == "lockd-etcd" else None, metrics))
        out["w3"] = _repeat(cfg.reps, ["etcd-lock", "lockd-etcd"], "etcd W3", lambda s: workloads.w3_fairness(
            specs[s], cfg.w3_clients, cfg.w3_seconds, daemon.probe if s == "lockd-etcd" else None))
        _progress("etcd W5")
        out["w5"] = {
            "etcd-lock": workloads.w5_crash(
                specs["etcd-lock"], cfg.etcd_w5_tries, workloads.etcd_lock_waiting(etcd.url)
            ),
            "lockd-etcd": workloads.w5_crash(lockd_spec, cfg.w5_tries, workloads.lockd_waiting(daemon.socket)),
        }
        _progress("etcd CLI")
        _compile("lockd_client")
        lockctl = shutil.which("lockctl", path=os.path.dirname(cli_python))
        commands = {
            "python -c pass": [cli_python, "-c", "pass"],
            "etcdctl lock": [shutil.which("etcdctl") or "etcdctl", "--endpoints", etcd.url, "lock", "cli", "true"],
        }
        if lockctl:
            commands["lockctl acquire"] = [lockctl, "acquire", "cli", "--", "true"]
        out["cli"] = workloads.cli_startup(commands, cfg.etcd_cli_runs, {**os.environ, "LOCKD_SOCKET": daemon.socket})
    return out


def _etcd_version() -> str | None:
    proc = subprocess.run([services.ETCD or "etcd", "--version"], capture_output=True, text=True, timeout=10)
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return first.rpartition(" ")[2] or None


def _repeat(reps: int, systems: list[str], title: str, measure) -> dict[str, Any]:
    """Measure every system once per repetition, in turn; keep each run, with the share of the
    CPUs other work took meanwhile, and the medians."""
    runs: dict[str, list[Any]] = {s: [] for s in systems}
    for rep in range(reps):
        for system in systems:
            meter = OthersMeter(services.running)
            result = measure(system)
            result["others_cpu_share"] = meter.share()
            runs[system].append(result)
            others = report.pct(result["others_cpu_share"])
            _progress(f"{title} {system} ({rep + 1}/{reps}); other work took {others} of the CPUs")
    return {"runs": runs, "median": {s: report.median_of(r) for s, r in runs.items()}}


def _compile(package: str) -> None:
    """Write `package`'s bytecode, as installing a wheel does: a checkout run with
    PYTHONDONTWRITEBYTECODE (as this machine's environment sets) would otherwise compile every
    module changed since its last .pyc on each start (of lockctl, about 5 ms here)."""
    import compileall
    import importlib

    compileall.compile_dir(os.path.dirname(importlib.import_module(package).__file__ or ""), quiet=1)


def _cli_commands(python: str, files: str) -> dict[str, list[str]]:
    lockctl = shutil.which("lockctl", path=os.path.dirname(python))
    # The imports split lockctl's start-up: the interpreter, msgspec, the rest of the client.
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "import msgspec": [python, "-c", "import msgspec"],
        "import lockd_client.cli": [python, "-c", "import lockd_client.cli"],
        "flock(1)": ["flock", os.path.join(files, "cli.lock"), "true"],
    }
    if lockctl:
        commands["lockctl acquire"] = [lockctl, "acquire", "cli", "--", "true"]
    return commands


def _raisable_nofile(wanted: int) -> tuple[int | None, str | None]:
    """(`wanted`, None) if the daemon's hard fd limit must and can be raised to it; else
    (None, why not) when it cannot, (None, None) when it need not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= wanted:
        return None, None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
    except (ValueError, OSError) as exc:
        # Raising a hard limit takes CAP_SYS_RESOURCE, which root in a container may lack.
        return None, f"raising the hard fd limit from {hard:,} to {wanted:,} was refused ({exc})"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted, None


def _progress(what: str) -> None:
    print(f"  {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
