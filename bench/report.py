"""Turning a run's results into the printed tables, the ratios to the floors and the targets.

Invariant: everything printed is derived from the results dict that is saved as JSON, so
the table and the file never disagree; a figure a run did not measure shows as `-` and its
target as `not run`, never as met.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .workloads import W4_IN_FLIGHT

#: W1 is compared with the floor of a naive broker (two round trips), W2 with trio serving
#: the same load, as the issue sets them. The issue does not say which echo server W1's floor
#: is: the blocking one is the faster, so the stricter, and the table shows both.
W1_FLOOR = "echo-blocking-2rt"
W1_TRIO_FLOOR = "echo-trio-2rt"
W2_FLOOR = "echo-trio-2rt"

LABELS = {
    "flock": "flock() on an open fd",
    "flock(1)": "flock FILE true",
    "filelock": "filelock package",
    "echo-blocking-1rt": "echo, blocking, 1 RT",
    "echo-blocking-2rt": "echo, blocking, 2 RT",
    "echo-trio-2rt": "echo, trio, 2 RT",
    "lockd-raw": "lockd, raw protocol",
    "lockd": "lockd, lockd_client",
    "lockd-raw-trio": "lockd, raw protocol in trio",
    "lockd-trio": "lockd, trio client",
    "etcd-kv": "etcd put + delete (no lock)",
    "etcd-lock": "etcd lock API",
    "lockd-etcd": "lockd on etcd",
    "lockd-obs-off": "lockd, no history, no metrics listener",
    "lockd-obs-on": "lockd, history + metrics scraped every 1 s",
}
#: W3 on a semaphore: a system's key with this suffix is that system taking slots of a
#: semaphore; without it, the same system on a lock under the same load, its reference.
SLOTS_SUFFIX = "-slots"
#: lockd_client's trio client: where the library runs (W1-W3), its targets against the raw
#: protocol client are judged for it too, against that client waiting in trio (TRIO_RAW):
#: trio's wait costs what a blocking recvmsg does not, whichever client waits in it.
TRIO_CLIENT = "lockd-trio"
TRIO_RAW = "lockd-raw-trio"
#: The column of the share of the CPUs that work outside the run took while a row was measured.
OTHERS = "other work"
#: The daemons of the observability section: with the history and a scraped metrics
#: listener, and with neither.
OBS_ON = "lockd-obs-on"
OBS_OFF = "lockd-obs-off"
#: What lockd on etcd is compared with: etcd's lock API driven directly, in the same run.
ETCD_FLOOR = "etcd-lock"


def median_of(reps: list[Any]) -> Any:
    """The per-field median of repeated results (numbers: median; flags: all; lists, and
    fields some repetitions lack, dropped)."""
    first = reps[0]
    if isinstance(first, bool):
        return all(reps)
    if isinstance(first, (int, float)):
        kept = [r for r in reps if not math.isnan(r)]
        return statistics.median(kept) if kept else math.nan
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in reps]) for k, v in first.items()
                if not isinstance(v, list) and all(k in r for r in reps)}
    return first


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pct(share: float | None) -> str:
    """A share as a percentage; `-` where it was not measured."""
    return "-" if share is None or math.isnan(share) else f"{share:.0%}"


def _ratio(value: Any, floor: Any) -> float:
    try:
        return value / floor
    except (TypeError, ZeroDivisionError):
        return math.nan


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c, 2 if isinstance(c, float) and abs(c) < 10 else 1) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for n, row in enumerate(cells):
        aligned = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  " + "  ".join(aligned))
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tables(results: dict[str, Any]) -> str:
    cfg = results["config"]
    out = []
    if "w1" in results:
        w1 = results["w1"]["median"]
        floor = w1.get(W1_FLOOR, {}).get("p50_us")
        trio_floor = w1.get(W1_TRIO_FLOOR, {}).get("p50_us")
        spawn = results.get("cli", {}).get("flock(1)")
        rows = [
            [LABELS[s], r["p50_us"], r["p99_us"], r["cycles_per_s"], r.get("server_cpu_us_per_cycle"),
             _ratio(r["p50_us"], floor), _ratio(r["p50_us"], trio_floor), pct(r.get("others_cpu_share"))]
            for s, r in w1.items()
        ]
        if spawn:
            rows.append([LABELS["flock(1)"], spawn["p50_us"], spawn["p99_us"], 1e6 / spawn["p50_us"], None,
                         _ratio(spawn["p50_us"], floor), _ratio(spawn["p50_us"], trio_floor), None])
        out.append(_table(
            f"W1  one client, one name: {cfg['w1_cycles']:,} cycles, median of {cfg['reps']} runs",
            ["system", "p50 µs", "p99 µs", "cycles/s", "server CPU µs/cycle", f"p50 / {W1_FLOOR}",
             f"p50 / {W1_TRIO_FLOOR}", OTHERS], rows,
        ))
    if "w2" in results:
        w2 = results["w2"]["median"]
        floor = w2.get(W2_FLOOR, {}).get("cycles_per_s")
        rows = [[LABELS[s], r["cycles_per_s"], r.get("server_cpu_share"), r.get("server_cpu_us_per_cycle"),
                 r.get("client_cpu_us_per_cycle"), _ratio(r["cycles_per_s"], floor), pct(r.get("others_cpu_share"))]
                for s, r in w2.items()]
        out.append(_table(
            f"W2  {cfg['w2_clients']} client processes, one name each, {cfg['w2_seconds']:g} s, "
            f"median of {cfg['reps']} runs",
            ["system", "cycles/s", "server CPU share", "server CPU µs/cycle", "clients CPU µs/cycle",
             f"cycles/s / {W2_FLOOR}", OTHERS], rows,
        ))
    if "w3" in results:
        w3 = results["w3"]["median"]
        rows = [
            [LABELS[s], r["grants_per_s"], r["handoff"]["p50_us"], r["handoff"]["p99_us"], r["other_share"],
             r["fifo_inversions"], r.get("tokens_increase"), r.get("server_cpu_us_per_grant"),
             r.get("client_cpu_us_per_grant"), pct(r.get("others_cpu_share"))]
            for s, r in w3.items()
        ]
        out.append(_table(
            f"W3  {cfg['w3_clients']} client processes on one name, hold 0, {cfg['w3_seconds']:g} s, "
            f"median of {cfg['reps']} runs",
            ["system", "grants/s", "handoff p50 µs", "handoff p99 µs", "to another client", "FIFO inversions",
             "tokens increase", "server CPU µs/grant", "clients CPU µs/grant", OTHERS], rows,
        ))
    if "w3s" in results:
        out.append(_w3s_table(results["w3s"]["median"], cfg))
    if "w4" in results:
        ways = [(f"{results['w4_client']}, one at a time", results["w4"])]
        if "w4_pipelined" in results:
            ways.append((f"trio client, {W4_IN_FLIGHT} in flight", results["w4_pipelined"]))
        rows = [
            [way, f"{int(n):,}", r["held"], r["seconds"], r["leases_per_s"], r["rss_before_mib"], r["rss_after_mib"],
             r["rss_growth_mib"], r["fds_after"], r["daemon_nofile_hard"]]
            for way, runs in ways for n, r in runs.items()
        ]
        notes = [
            f"  {int(n):,} ({way}): stopped by {r['error']}"
            for way, runs in ways for n, r in runs.items() if r["error"]
        ]
        notes += [
            f"  {int(n):,}: {r['nofile_refused']}" for n, r in results["w4"].items() if r.get("nofile_refused")
        ]
        out.append("\n".join([_table(
            "W4  many leases held at once on one connection",
            ["acquired", "asked", "held", "time s", "leases/s", "RSS before MiB", "RSS after MiB", "growth MiB",
             "fds after", "fd limit"], rows,
        ), *notes]))
    if "w5" in results:
        rows = [[LABELS[s], r["p50_ms"], r["max_ms"], r["tries"]] for s, r in results["w5"].items()]
        out.append(_w5_table("W5", rows))
    if "w6" in results:
        out.append(_w6_table(results["w6"]))
    if "w7" in results:
        w7 = results["w7"]["median"]
        backlog = results.get("w7_backlog")
        names = {"lockd-small-queue": f"lockd, a queue of {backlog}", "lockd": "lockd, a queue of somaxconn"}
        floor = w7.get("filelock", {}).get("last_holds_s")
        rows = [
            [names.get(s, LABELS.get(s, s)), r["held"], r["clients"], r["last_holds_s"],
             _ratio(r["last_holds_s"], floor), r["holds"]["p50_us"] / 1e6,
             *([r["connected"]["max_us"] / 1e6, r["waited_over_1s_to_connect"]] if s in names else [None, None]),
             r.get("server_cpu_s"), r.get("rss_before_mib"), r.get("rss_after_mib"), r.get("fds_before"),
             r.get("fds_after"), pct(r.get("others_cpu_share"))]
            for s, r in w7.items()
        ]
        errors = [
            f"  {names.get(s, s)}: {e}" for s, runs in results["w7"]["runs"].items() for r in runs for e in r["errors"]
        ]
        out.append("\n".join([_table(
            f"W7  a burst: {cfg['w7_clients']:,} clients from {cfg['w7_processes']} processes at once on one name, "
            f"median of {cfg['reps']} runs",
            ["system", "held", "clients", "last holds s", "/ filelock", "p50 holds s", "slowest connect s",
             "connect > 1 s", "daemon CPU s", "RSS before MiB", "RSS after MiB", "fds before", "fds after", OTHERS],
            rows,
        ), *errors]))
    if "flood" in results:
        f = results["flood"]
        rows = [[label, r["p50_us"], r["p99_us"], r["max_us"], r["n"], _ratio(r["p99_us"], f["idle"]["p99_us"])]
                for label, r in (("idle", f["idle"]), ("during the flood", f["during"]))]
        out.append("\n".join([_table(
            f"flood  {f['connections']:,} bad connections from {f['flooders']} processes while one client cycles",
            ["client cycles", "p50 µs", "p99 µs", "max µs", "cycles", "p99 / idle p99"], rows,
        ), f"  flood: {f['seconds']:.1f} s, {f['connections_per_s']:,.0f} connections/s, daemon CPU "
           f"{f['server_cpu_us_per_connection']:.0f} µs per connection; log lines added: {f['log_lines']:,} "
           f"(loglimit's bound for that time: {f['log_line_bound']:,})"]))
    if "cli" in results:
        out.append(_cli_table("CLI", cfg["cli_runs"], results["cli"]))
    if "obs" in results:
        out.append(_obs_table(results["obs"], cfg))
    if "etcd" in results:
        out.append(_etcd_tables(results["etcd"], cfg))
    return "\n\n".join(out)


def _obs_table(obs: dict[str, Any], cfg: dict[str, Any]) -> str:
    w1, w3 = obs["w1"]["median"], obs["w3"]["median"]
    rows = [
        [LABELS[s], _dig(w1, s, "p50_us"), _dig(w1, s, "p99_us"), _dig(w1, s, "server_cpu_us_per_cycle"),
         _dig(w3, s, "grants_per_s"), _dig(w3, s, "handoff", "p50_us")]
        for s in (OBS_OFF, OBS_ON)
    ]
    rows.append([
        "on / off", _ratio(rows[1][1], rows[0][1]), _ratio(rows[1][2], rows[0][2]), _ratio(rows[1][3], rows[0][3]),
        _ratio(rows[1][4], rows[0][4]), _ratio(rows[1][5], rows[0][5]),
    ])
    return "\n".join([_table(
        f"history + metrics on vs off: W1 {cfg['w1_cycles']:,} cycles, W3 {cfg['w3_clients']} clients "
        f"{cfg['w3_seconds']:g} s, median of {cfg['reps']} runs, interleaved",
        ["daemon", "W1 p50 µs", "W1 p99 µs", "W1 server CPU µs/cycle", "W3 grants/s", "W3 handoff p50 µs"], rows,
    ), f"  scrapes answered: {obs['scrapes']}, failed: {obs['scrape_failures']}"])


def _w3s_table(w3s: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Each system on the semaphore next to itself on a lock, with the ratios of the two."""
    rows = []
    for system, r in w3s.items():
        base = system.removesuffix(SLOTS_SUFFIX)
        lock = w3s.get(base, {})
        kind = f"{cfg['w3s_slots']} slots" if system != base else "lock"
        rows.append([
            f"{LABELS[base]}, {kind}", r["grants_per_s"], r["handoff"]["p50_us"], r["handoff"]["p99_us"],
            r["waited_share"], r["fifo_inversions"], r["most_holders"],
            _ratio(r["grants_per_s"], lock.get("grants_per_s")),
            _ratio(r["handoff"]["p50_us"], _dig(lock, "handoff", "p50_us")),
            r.get("server_cpu_us_per_grant"), pct(r.get("others_cpu_share")),
        ])
    return _table(
        f"W3 on a semaphore  {cfg['w3s_clients']} client processes on one name, a semaphore of "
        f"{cfg['w3s_slots']} slots or a lock, hold 0, {cfg['w3_seconds']:g} s, median of {cfg['reps']} runs",
        ["system", "grants/s", "handoff p50 µs", "handoff p99 µs", "waited", "FIFO inversions", "most holders",
         "grants/s / lock", "handoff p50 / lock", "server CPU µs/grant", OTHERS], rows,
    )


def _w6_table(w6: dict[str, Any]) -> str:
    rows = [[
        f"{w6['leases']:,}", f"{w6['connections']:,}", w6["reexecs"], w6["stall"]["p50_us"] / 1000,
        w6["stall"]["max_us"] / 1000, w6["paused"]["p50_us"] / 1000, w6["paused"]["max_us"] / 1000,
        w6["baseline"]["p50_us"], w6["rss_mib"], w6["fds"],
    ]]
    notes = [f"  stalls ms, in order: {', '.join(f'{ms:.0f}' for ms in w6['stalls_ms'])}"]
    if w6.get("nofile_refused"):
        notes.append(f"  {w6['nofile_refused']}")
    return "\n".join([_table(
        f"W6  re-exec under load: a client cycling ({w6['client']}) while the daemon re-executes, "
        "its longest cycle around each re-exec",
        ["leases", "connections", "re-execs", "stall p50 ms", "stall max ms", "daemon paused p50 ms",
         "daemon paused max ms", "cycle p50 µs before", "daemon RSS MiB", "daemon fds"], rows,
    ), *notes])


def _w5_table(section: str, rows: list[list[Any]]) -> str:
    title = f"{section}  holder SIGKILLed while a waiter waits: kill → waiter holds"
    return _table(title, ["system", "p50 ms", "max ms", "tries"], rows)


def _cli_table(section: str, runs: int, cli: dict[str, Any]) -> str:
    title = f"{section}  wall time from spawn to exit, {runs} runs each, interleaved"
    bare = cli.get("python -c pass", {}).get("p50_us")
    bare_min = cli.get("python -c pass", {}).get("min_us")
    floor = cli.get("import msgspec", {}).get("p50_us")
    rows = [
        [label, r["p50_us"] / 1000, r["min_us"] / 1000, r["p99_us"] / 1000, _ratio(r["p50_us"], bare),
         _ratio(r["min_us"], bare_min), _ratio(r["p50_us"], floor)]
        for label, r in cli.items()
    ]
    return _table(title, ["command", "p50 ms", "min ms", "p99 ms", "p50 / python -c pass", "min / python -c pass",
                          "p50 / import msgspec"], rows)


def _etcd_tables(etcd: dict[str, Any], cfg: dict[str, Any]) -> str:
    """lockd on the etcd backend next to etcd's own lock API, with ratios to the latter."""
    version = etcd.get("etcd_version") or ""
    out = [f"etcd section: one etcd {version} member on loopback (data on tmpfs), lease TTL {etcd['ttl']} s"]
    w1 = etcd["w1"]["median"]
    floor = w1.get(ETCD_FLOOR, {})
    rows = [
        [LABELS[s], r["p50_us"], r["p99_us"], r["cycles_per_s"], r.get("etcd_requests_total_per_cycle"),
         r.get("etcd_writes_per_cycle"), r.get("etcd_cpu_us_per_cycle"), r.get("server_cpu_us_per_cycle"),
         _ratio(r["p50_us"], floor.get("p50_us")), pct(r.get("others_cpu_share"))]
        for s, r in w1.items()
    ]
    requests = [
        f"  {LABELS[s]}: etcd requests per cycle " + ", ".join(f"{m} {n:.2f}" for m, n in per_cycle.items())
        for s, r in w1.items() if (per_cycle := r.get("etcd_requests_per_cycle"))
    ]
    out.append("\n".join([_table(
        f"etcd W1  one client, one name: {cfg['etcd_w1_cycles']:,} cycles, median of {cfg['reps']} runs",
        ["system", "p50 µs", "p99 µs", "cycles/s", "etcd requests/cycle", "etcd writes/cycle",
         "etcd CPU µs/cycle", "lockd CPU µs/cycle", f"p50 / {ETCD_FLOOR}", OTHERS], rows,
    ), *requests]))
    w3 = etcd["w3"]["median"]
    floor = w3.get(ETCD_FLOOR, {})
    rows = [
        [LABELS[s], r["grants_per_s"], r["handoff"]["p50_us"], r["handoff"]["p99_us"], r["other_share"],
         r["fifo_inversions"], r.get("tokens_increase"), _ratio(r["grants_per_s"], floor.get("grants_per_s")),
         _ratio(r["handoff"]["p50_us"], _dig(floor, "handoff", "p50_us")), pct(r.get("others_cpu_share"))]
        for s, r in w3.items()
    ]
    out.append(_table(
        f"etcd W3  {cfg['w3_clients']} client processes on one name, hold 0, {cfg['w3_seconds']:g} s, "
        f"median of {cfg['reps']} runs",
        ["system", "grants/s", "handoff p50 µs", "handoff p99 µs", "to another client", "FIFO inversions",
         "tokens increase", f"grants/s / {ETCD_FLOOR}", f"handoff p50 / {ETCD_FLOOR}", OTHERS], rows,
    ))
    rows = [[LABELS[s], r["p50_ms"], r["max_ms"], r["tries"]] for s, r in etcd["w5"].items()]
    out.append(_w5_table("etcd W5", rows))
    out.append(_cli_table("etcd CLI", cfg["etcd_cli_runs"], etcd["cli"]))
    return "\n\n".join(out)


def _target(what: str, value: Any, limit: float, at_most: bool) -> dict[str, Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"target": what, "value": None, "limit": limit, "status": "not run"}
    met = value <= limit if at_most else value >= limit
    return {"target": what, "value": value, "limit": limit, "status": "met" if met else "MISSED"}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the library client where it ran, else the raw one."""
    client = results["config"]["lockd_client"]
    w1 = _dig(results, "w1", "median")
    w2 = _dig(results, "w2", "median")
    w3_all = _dig(results, "w3", "median")
    w3 = _dig(w3_all, client)
    cli = results.get("cli")
    ten_k = _dig(results, "w4", "10000")

    def against(table: Any, floor: str, key: str, system: str = client) -> Any:
        """`system`'s `key` in `table` (the client's by default) over the `floor` system's."""
        return _ratio(_dig(table, system, key), _dig(table, floor, key))

    # The library's trio client, judged as the blocking one, against the raw client in trio.
    trio = [
        _target("W1 p50 / raw protocol in trio p50, trio client",
                against(w1, TRIO_RAW, "p50_us", TRIO_CLIENT), 1.1, True),
        _target("W2 cycles/s / raw protocol in trio cycles/s, trio client",
                against(w2, TRIO_RAW, "cycles_per_s", TRIO_CLIENT), 0.9, False),
        _target("W3 grants/s / raw protocol in trio grants/s, trio client",
                against(w3_all, TRIO_RAW, "grants_per_s", TRIO_CLIENT), 0.9, False),
    ] if client == "lockd" else []

    return [
        _target(f"W1 p50 / {W1_FLOOR} p50", against(w1, W1_FLOOR, "p50_us"), 1.0, True),
        _target(f"W1 p50 / {W1_TRIO_FLOOR} p50", against(w1, W1_TRIO_FLOOR, "p50_us"), 1.0, True),
        _target("W1 p50 / filelock p50", against(w1, "filelock", "p50_us"), 1.0, True),
        _target(f"W2 cycles/s / {W2_FLOOR} cycles/s", against(w2, W2_FLOOR, "cycles_per_s"), 1.0, False),
        _target("W2 cycles/s / filelock cycles/s", against(w2, "filelock", "cycles_per_s"), 1.0, False),
        # What the library adds to the wire: within 10% of the raw protocol client.
        _target("W1 p50 / raw protocol p50", against(w1, "lockd-raw", "p50_us"), 1.1, True),
        _target("W2 cycles/s / raw protocol cycles/s", against(w2, "lockd-raw", "cycles_per_s"), 0.9, False),
        _target("W3 grants/s / raw protocol grants/s", against(w3_all, "lockd-raw", "grants_per_s"), 0.9, False),
        *trio,
        _target(f"W1 server CPU / {W1_TRIO_FLOOR} server CPU",
                against(w1, W1_TRIO_FLOOR, "server_cpu_us_per_cycle"), 1.2, True),
        _target(
            "W3 FIFO inversions, all runs", _total(_dig(results, "w3", "runs", client), "fifo_inversions"), 0, True
        ),
        _target("W3 grants/s", _dig(w3, "grants_per_s"), 10_000, False),
        _target("W3 handoff p50 µs", _dig(w3, "handoff", "p50_us"), 100, True),
        _target("W3 on a semaphore: FIFO inversions, all runs",
                _total(_dig(results, "w3s", "runs", client + SLOTS_SUFFIX), "fifo_inversions"), 0, True),
        _target("W3 on a semaphore: most holders at once, all runs",
                _most(_dig(results, "w3s", "runs", client + SLOTS_SUFFIX), "most_holders"),
                results["config"]["w3s_slots"], True),
        _target("W4 10k leases held (count)", _dig(ten_k, "held"), 10_000, False),
        _target("W4 10k leases: seconds to acquire, one at a time", _dig(ten_k, "seconds"), 1.0, True),
        _target(f"W4 10k leases: seconds to acquire, {W4_IN_FLIGHT} in flight",
                _dig(results, "w4_pipelined", "10000", "seconds"), 0.5, True),
        _target("W4 10k leases: daemon RSS growth KiB per lease", _per_lease(ten_k), 0.5, True),
        _target("W4 leases up to the fd limit: daemon RSS growth KiB per lease",
                _per_lease(_dig(results, "w4", "100000")), 0.5, True),
        _target("W4 100k leases held (count)", _dig(results, "w4", "100000", "held"), 100_000, False),
        _target("W5 kill → waiter holds, p50 ms", _dig(results, "w5", client, "p50_ms"), 10, True),
        _target("W6 stall during a re-exec, 10k leases over 1k connections, p50 ms", _w6_stall(results, "p50_us"),
                100, True),
        _target("W6 stall during a re-exec, 10k leases over 1k connections, max ms", _w6_stall(results, "max_us"),
                100, True),
        _target("W7 clients that held, every run, small queue",
                _least(_dig(results, "w7", "runs", "lockd-small-queue"), "held"),
                results["config"]["w7_clients"], False),
        _target("flood: client p99 / idle p99", _dig(results, "flood", "p99_ratio"), 10, True),
        _target("flood: log lines added / loglimit's bound",
                _ratio(_dig(results, "flood", "log_lines"), _dig(results, "flood", "log_line_bound")), 1.0, True),
        _target("CLI lockctl / python -c pass",
                _ratio(_dig(cli, "lockctl acquire", "p50_us"), _dig(cli, "python -c pass", "p50_us")), 2.0, True),
        # The wire is msgspec's (one definition of the protocol), so msgspec's import is the floor.
        _target("CLI lockctl / import msgspec",
                _ratio(_dig(cli, "lockctl acquire", "p50_us"), _dig(cli, "import msgspec", "p50_us")), 1.4, True),
    ] + (_obs_targets(results["obs"]) if "obs" in results else []) + (
        _etcd_targets(results["etcd"]) if "etcd" in results else []
    )


def _obs_targets(obs: dict[str, Any]) -> list[dict[str, Any]]:
    """History + metrics cost the hot path nothing measurable: within 5% of a daemon without."""
    w1, w3 = obs["w1"]["median"], obs["w3"]["median"]
    return [
        _target("W1 p50, history + metrics on / off",
                _ratio(_dig(w1, OBS_ON, "p50_us"), _dig(w1, OBS_OFF, "p50_us")), 1.05, True),
        _target("W3 grants/s, history + metrics on / off",
                _ratio(_dig(w3, OBS_ON, "grants_per_s"), _dig(w3, OBS_OFF, "grants_per_s")), 0.95, False),
    ]


def _etcd_targets(etcd: dict[str, Any]) -> list[dict[str, Any]]:
    """The guarantees that must hold on the etcd backend too (strict FIFO, a crashed holder's
    lock passed on within W5's limit), and a W1 cycle within 1.3× etcd's own lock API's."""
    w1 = _dig(etcd, "w1", "median")
    return [
        _target(f"etcd: W1 p50 / {LABELS[ETCD_FLOOR]} p50",
                _ratio(_dig(w1, "lockd-etcd", "p50_us"), _dig(w1, ETCD_FLOOR, "p50_us")), 1.3, True),
        _target("etcd: W3 FIFO inversions, all runs",
                _total(_dig(etcd, "w3", "runs", "lockd-etcd"), "fifo_inversions"), 0, True),
        _target("etcd: W5 kill → waiter holds, p50 ms", _dig(etcd, "w5", "lockd-etcd", "p50_ms"), 10, True),
    ]


def _w6_stall(results: dict[str, Any], key: str) -> Any:
    """W6's stall figure `key` in ms, if W6 ran at the scale its target is set for."""
    w6 = results.get("w6")
    if not w6 or w6["leases"] < 10_000 or w6["connections"] < 1_000:
        return None
    return w6["stall"][key] / 1000


def _per_lease(w4: Any) -> Any:
    """A W4 run's daemon RSS growth per lease held, in KiB."""
    if not w4 or not w4["held"]:
        return None
    return w4["rss_growth_mib"] * 1024 / w4["held"]


def _total(runs: list[dict[str, Any]] | None, key: str) -> Any:
    """The sum of `key` over runs: a guarantee broken in any run is broken."""
    if not runs or any(r.get(key) is None for r in runs):
        return None
    return sum(r[key] for r in runs)


def _least(runs: list[dict[str, Any]] | None, key: str) -> Any:
    """The smallest `key` over runs: a guarantee broken in any run is broken."""
    if not runs:
        return None
    return min(r[key] for r in runs)


def _most(runs: list[dict[str, Any]] | None, key: str) -> Any:
    """The largest `key` over runs: a bound broken in any run is broken."""
    if not runs:
        return None
    return max(r[key] for r in runs)


def _dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def target_table(rows: list[dict[str, Any]]) -> str:
    cells = [[r["target"], r["value"], r["limit"], r["status"]] for r in rows]
    return _table("Targets", ["target", "value", "limit", "status"], cells)
