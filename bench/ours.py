"""Phase 2: our consumer (`python -m consumer.cli run`, a real process) from start to caught up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import procstat
from bench.kafka_util import GroupProgress, Partition
from cdc_dev.stack.process import terminate

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class ConsumerProcess:
    proc: subprocess.Popen
    log: Path
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60) -> int:
        return terminate(self.proc, timeout)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def start_consumer(env: dict[str, str], log: Path) -> ConsumerProcess:
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            env={**os.environ, **env, "CDC_METRICS_PORT": str(port)},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ConsumerProcess(proc, log, port)


def wait_started(consumer: ConsumerProcess, timeout: float = 120, nothing_left=lambda: False) -> float:
    """Seconds until the consumer has consumed its first message (imports, migrations, group join),
    or, once past its start-up and its assignment (partitions assigned, their watermarks read),
    `nothing_left()` says there is no message for it to consume."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if consumer.proc.poll() is not None:
            raise RuntimeError(f"consumer exited with {consumer.proc.returncode}:\n{consumer.tail()}")
        if _started(consumer, nothing_left):
            return time.monotonic() - began
        time.sleep(0.05)
    raise RuntimeError(f"consumer consumed nothing within {timeout}s:\n{consumer.tail()}")


def _started(consumer: ConsumerProcess, nothing_left) -> bool:
    try:
        metrics = scrape(consumer.metrics_port)
    except OSError:  # not serving yet: still starting
        return False
    if metric_sum(metrics, "cdc_messages_consumed_total") > 0:
        return True
    return metric_sum(metrics, "cdc_assigned_partitions") > 0 and nothing_left()


def wait_caught_up(
    consumer: ConsumerProcess, progress: GroupProgress, ends: dict[Partition, int], timeout: float, interval=0.25
) -> float:
    began = time.monotonic()
    lag = -1
    while time.monotonic() - began < timeout:
        if consumer.proc.poll() is not None:
            raise RuntimeError(f"consumer exited with {consumer.proc.returncode}:\n{consumer.tail()}")
        lag = progress.lag(ends)
        if lag == 0:
            return time.monotonic()
        time.sleep(interval)
    raise RuntimeError(f"consumer not caught up after {timeout}s (lag {lag}):\n{consumer.tail()}")


def run_ours(
    *,
    env: dict[str, str],
    bootstrap: str,
    group_id: str,
    ends: dict[Partition, int],
    clickhouse_pids: list[int],
    clickhouse,
    events: int,
    log: Path,
    timeout: float,
    progress=print,
) -> dict:
    """Start the consumer on fresh topics, wait for group lag 0; CPU of both processes from /proc,
    ClickHouse's up to the end of the merges of what the consumer wrote."""
    settle_s = procstat.merges_settled(clickhouse)
    # Every ClickHouse node's CPU (a cluster's shards), each less its idle rate.
    ch_idle = sum(procstat.idle_cpu_rate(pid) for pid in clickhouse_pids)
    ch_cpu0 = sum(map(procstat.cpu_seconds, clickhouse_pids))
    group = GroupProgress(bootstrap, group_id, list(ends))
    spawned = time.monotonic()
    consumer = start_consumer(env, log)
    sampler = procstat.Sampler(consumer.pid, interval=0.5).start()
    try:
        startup_s = wait_started(consumer)
        startup_cpu = procstat.cpu_seconds(consumer.pid)
        started = spawned + startup_s
        progress(f"  consumer pid {consumer.pid} consuming after {startup_s:.1f}s")
        done = wait_caught_up(consumer, group, ends, timeout)
        consumer_cpu = procstat.cpu_seconds(consumer.pid)
        threads = procstat.thread_cpu(consumer.pid)
        merges_s = procstat.merges_settled(clickhouse)
        ch_cpu1 = sum(map(procstat.cpu_seconds, clickhouse_pids))
        settled = time.monotonic()
        sampler.stop()
        peak = max(sampler.peak_rss, procstat.peak_rss_bytes(consumer.pid))
        inserts = rows = 0.0
        try:
            text = scrape(consumer.metrics_port)
            inserts = metric_sum(text, "cdc_insert_duration_seconds_count")
            rows = metric_sum(text, "cdc_rows_inserted_total")
        except OSError:
            pass
    finally:
        sampler.stop()
        code = consumer.stop()
        group.close()
    if code not in (0, None):
        raise RuntimeError(f"consumer exited with {code}:\n{consumer.tail()}")
    ingest_s = done - started
    ch_cpu = max(0.0, ch_cpu1 - ch_cpu0 - ch_idle * (settled - spawned)) if clickhouse_pids else None
    per_million = 1e6 / events
    # Start-up (interpreter, imports, migrations, group join) is reported apart: per-million
    # figures are for the ingest itself.
    consumer_cpu -= startup_cpu
    return {
        "events": events,
        "wall_s": round(done - spawned, 3),
        "startup_s": round(startup_s, 3),
        "ingest_wall_s": round(ingest_s, 3),
        "events_per_s": round(events / ingest_s, 1),
        "consumer_cpu_s": round(consumer_cpu, 3),
        "consumer_startup_cpu_s": round(startup_cpu, 3),
        "consumer_threads_cpu_s": threads,  # start-up included
        "clickhouse_cpu_s": None if ch_cpu is None else round(ch_cpu, 3),
        "clickhouse_idle_cpu_per_s": round(ch_idle, 4),
        "clickhouse_quiet_before_s": settle_s,
        "clickhouse_merges_after_s": merges_s,
        "consumer_cpu_s_per_million": round(consumer_cpu * per_million, 3),
        "clickhouse_cpu_s_per_million": None if ch_cpu is None else round(ch_cpu * per_million, 3),
        "total_cpu_s_per_million": None if ch_cpu is None else round((consumer_cpu + ch_cpu) * per_million, 3),
        "events_per_cpu_s": None if ch_cpu is None else round(events / (consumer_cpu + ch_cpu), 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "memory": procstat.memory_trend(sampler.samples, skip_s=2.0),
        "inserts": int(inserts),
        "rows_inserted": int(rows),
    }


def run_ours_fault(
    *,
    env: dict[str, str],
    bootstrap: str,
    group_id: str,
    ends: dict[Partition, int],
    server,
    database: str,
    fact_changes: int,
    kill_consumer_at_rows: int,
    kill_clickhouse_at_rows: int,
    timeout: float,
    log: Path,
    progress=print,
) -> dict:
    """Our consumer catching up into the peer's ClickHouse (bench/kafka_engine.PeerServer),
    killed (-9) and started again once `kill_consumer_at_rows` fact rows are in, then that
    ClickHouse killed (-9) and started again at `kill_clickhouse_at_rows`; then lost and
    duplicated fact changes, counted by their coordinates as for the Kafka engine."""
    from bench.kafka_engine import fact_delivery, wait_rows

    env = {**env, "CDC_CLICKHOUSE_URL": f"{server.url}/{database}"}
    group = GroupProgress(bootstrap, group_id, list(ends))
    consumer = start_consumer(env, log)
    try:
        wait_rows(server, database, kill_consumer_at_rows, timeout)
        consumer.proc.kill()
        consumer.proc.wait(30)
        consumer = start_consumer(env, log.with_suffix(".restarted.log"))
        # Running again before ClickHouse goes: at start-up the consumer exits on an unreachable
        # ClickHouse (a supervisor restarts it); once running, it waits for ClickHouse. On a small
        # run the killed consumer may have written and committed everything in its first insert
        # (seen in CI at 20,000 events): then there is nothing left to consume.
        wait_started(consumer, nothing_left=lambda: group.lag(ends) == 0)
        wait_rows(server, database, kill_clickhouse_at_rows, timeout)
        restart_s = server.restart()
        wait_caught_up(consumer, group, ends, timeout)
    finally:
        code = consumer.stop()
        group.close()
    if code not in (0, None):
        raise RuntimeError(f"consumer exited with {code}:\n{consumer.tail()}")
    result = {
        "database": database,
        "killed_consumer_at_rows": kill_consumer_at_rows,
        "killed_clickhouse_at_rows": kill_clickhouse_at_rows,
        "clickhouse_restart_s": restart_s,
    }
    result.update(fact_delivery(server.client(database), fact_changes))
    progress(
        f"  ours, consumer killed at {kill_consumer_at_rows:,} and ClickHouse at {kill_clickhouse_at_rows:,} fact rows: "
        f"{result['lost']} fact changes lost, {result['duplicated']} duplicated ({result['duplicated_rows']} extra rows)"
    )
    return result
