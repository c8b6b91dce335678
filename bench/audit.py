"""The audit phase: what `cdc-consumer audit` costs on the database our consumer just filled, against a
baseline measured in the same run: a plain scan of the fact tables (`SELECT sum(id)`, one
column of every row; `count()` and `sum(_sign)` are answered from part metadata and the
`offset_digests` projection and read nothing).

* **first audit** (`--full`): every offset read from Kafka and compared with the rows, offset by
  offset: what an audit costs for offsets it has not seen yet;
* **repeat audit**: from its checkpoint with nothing new, so only the history check from the
  projections: what an audit every few minutes costs for the billions of rows already proved;
* **gap audit**: the same group against an empty database, so every offset is a gap and its value
  is decoded: the audit's peak memory against the clean first audit's shows that what it holds
  stays within one bucket of offsets, however many are missing.

CPU is the audit process's (its own rusage) plus ClickHouse's (from /proc, less its idle rate).
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procstat

REPO = Path(__file__).resolve().parents[1]
FACTS = ("fact_impressions", "fact_clicks")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measured(clickhouse_pid: int | None, idle: float, work) -> tuple[float, float, float, object]:
    """(own CPU of children, ClickHouse CPU, wall seconds, result) of `work()`."""
    own0, wall0 = _children_cpu(), time.monotonic()
    ch0 = procstat.cpu_seconds(clickhouse_pid) if clickhouse_pid else 0.0
    result = work()
    wall = time.monotonic() - wall0
    ch = procstat.cpu_seconds(clickhouse_pid) - ch0 - idle * wall if clickhouse_pid else 0.0
    return _children_cpu() - own0, max(ch, 0.0), wall, result


def run_audit_cost(*, env: dict, clickhouse, clickhouse_pid: int | None, progress=print) -> dict:
    procstat.merges_settled(clickhouse)
    idle = procstat.idle_cpu_rate(clickhouse_pid) if clickhouse_pid else 0.0
    rows = sum(int(clickhouse.query(f"SELECT count() FROM {t}").result_rows[0][0]) for t in FACTS)

    def scan():
        for table in FACTS:
            clickhouse.query(
                f"SELECT sum(id) FROM {table}", settings={"use_query_cache": 0, "optimize_use_projections": 0}
            )

    scans = [_measured(clickhouse_pid, idle, scan) for _ in range(3)]
    _, scan_cpu, scan_wall, _ = min(scans, key=lambda m: m[1])

    def audit(*args: str, env: dict = env) -> dict:
        report, peak = _audit_with_peak_rss(env, *args)
        peaks.append(peak)
        return report

    peaks: list[int] = []
    first_own, first_ch, first_wall, first = _measured(clickhouse_pid, idle, lambda: audit("--full"))
    repeat_own, repeat_ch, repeat_wall, repeat = _measured(clickhouse_pid, idle, audit)
    offsets = sum(p["applied"] + sum(p["accounted"].values()) for p in first["partitions"])
    empty = {**env, "CDC_CLICKHOUSE_URL": env["CDC_CLICKHOUSE_URL"] + "_empty"}
    database = empty["CDC_CLICKHOUSE_URL"].rsplit("/", 1)[1]
    _cli(empty, "migrate")
    try:
        gaps = audit("--full", env=empty)
    finally:
        clickhouse.command(f"DROP DATABASE IF EXISTS {database}")
    first_peak, gap_peak = peaks[0], peaks[2]

    def per_million(cpu: float, count: int) -> float | None:
        return round(cpu / count * 1e6, 3) if count else None

    scan_pm = per_million(scan_cpu, rows)
    first_pm = per_million(first_own + first_ch, offsets)
    # What grows with the history is ClickHouse's part; the process's own is a fixed start-up cost.
    repeat_pm = per_million(repeat_ch, rows)
    result = {
        "fact_rows": rows,
        "offsets": offsets,
        "applied": sum(p["applied"] for p in first["partitions"]),
        "audit_ok": first["ok"] and repeat["ok"],
        "scan_clickhouse_cpu_s": round(scan_cpu, 3),
        "scan_wall_s": round(scan_wall, 3),
        "scan_cpu_s_per_million_rows": scan_pm,
        "first_audit_cpu_s": [round(first_own, 3), round(first_ch, 3)],
        "first_audit_wall_s": round(first_wall, 2),
        "first_audit_cpu_s_per_million_offsets": first_pm,
        "repeat_audit_cpu_s": [round(repeat_own, 3), round(repeat_ch, 3)],
        "repeat_audit_wall_s": round(repeat_wall, 2),
        "repeat_audit_clickhouse_cpu_s_per_million_rows": repeat_pm,
        "repeat_buckets_checked": repeat["buckets_checked"],
        "first_audit_peak_rss_mb": round(first_peak / 2**20, 1),
        "gap_audit_unaccounted": gaps["unaccounted"],
        "gap_audit_peak_rss_mb": round(gap_peak / 2**20, 1),
        "gap_to_clean_peak_rss": round(gap_peak / first_peak, 2) if first_peak else None,
        "first_to_scan": round(first_pm / scan_pm, 2) if first_pm and scan_pm else None,
        "repeat_to_scan": round(repeat_pm / scan_pm, 2) if repeat_pm and scan_pm else None,
    }
    progress(
        f"  audit: first {first_pm} CPU-s per million offsets ({result['first_to_scan']}× the scan's "
        f"{scan_pm} per million rows), repeat: ClickHouse {repeat_pm} per million rows ({result['repeat_to_scan']}×) "
        f"+ {repeat_own:.2f} CPU-s of its own; peak memory with all {gaps['unaccounted']} offsets missing "
        f"{result['gap_to_clean_peak_rss']}× a clean audit's ({result['first_audit_peak_rss_mb']} MB); "
        f"{'clean' if result['audit_ok'] else 'NOT CLEAN'}"
    )
    return result


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )


def _audit_with_peak_rss(env: dict, *args: str) -> tuple[dict, int]:
    """`audit --json` as an operator runs it: (its report, its peak resident memory in bytes).
    The peak is the process's VmHWM, sampled until it exits: its rusage would start from the
    forking bench's resident set, which is larger than the audit's."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "audit", "--json", *args], env=env, cwd=REPO, stdout=out, stderr=err
        )
        peak = 0
        while child.poll() is None:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it exited meanwhile
                peak = max(peak, procstat.peak_rss_bytes(child.pid))
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        report = out.read()
        if not report.lstrip().startswith("{"):
            raise RuntimeError(f"audit failed ({child.returncode}):\n{err.read()[-3000:]}")
    return json.loads(report), peak
