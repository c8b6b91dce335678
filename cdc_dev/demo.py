"""`cdc-consumer demo`: the whole pipeline at work, watched live.

Starts the consumer as its own process, writes ad traffic into Postgres, and shows the KPIs in
ClickHouse and the consumer group's lag as they change; at the end it compares every KPI with
Postgres and stops the consumer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cdc_dev.generate import GeneratorStats, generate, render_progress
from cdc_dev.verify import compare
from consumer.app.clients import clickhouse_client
from consumer.kafka.client_config import kafka_client_config
from consumer.kafka.lag import LagReader
from consumer.settings import Settings
from consumer.transform.mapping import load_mapping


def _kpi_tables(client) -> list[Table]:
    daily = Table("day (UTC)", "impressions", "clicks", "CTR", "spend", title="kpi_daily_performance")
    for day, impressions, clicks, ctr, spend in client.query(
        "SELECT event_date, impressions, clicks, ctr, spend FROM kpi_daily_performance ORDER BY event_date DESC LIMIT 5"
    ).result_rows:
        daily.add_row(str(day), f"{impressions:,}", f"{clicks:,}", f"{ctr:.4f}", f"{spend:,.6f}")
    top = Table("campaign", "advertiser", "impressions", "clicks", "CTR", title="kpi_campaign_ctr (top 5)")
    for _id, name, advertiser, impressions, clicks, ctr in client.query(
        "SELECT campaign_id, campaign_name, advertiser_name, impressions, clicks, ctr FROM kpi_campaign_ctr "
        "ORDER BY impressions DESC LIMIT 5"
    ).result_rows:
        top.add_row(name[:28], advertiser[:20], f"{impressions:,}", f"{clicks:,}", f"{ctr:.4f}")
    return [daily, top]


def _lag_table(reader: LagReader, topics: list[str]) -> tuple[Table, int]:
    table = Table("topic", "committed", "end", "lag (messages)", title=f"consumer group {reader.group_id}")
    total = 0
    by_topic: dict[str, list[int]] = {}
    for row in reader.read(reader.partitions(topics)):
        sums = by_topic.setdefault(row.topic, [0, 0, 0])
        sums[0] += max(row.committed or 0, 0)
        sums[1] += row.high_watermark
        sums[2] += row.lag
    for topic, (committed, end, lag) in sorted(by_topic.items()):
        table.add_row(topic, f"{committed:,}", f"{end:,}", f"{lag:,}")
        total += lag
    return table, total


def run_demo(settings: Settings, rate: float, duration: float, seed: int, log_file: Path) -> bool:
    console = Console()
    topics = load_mapping(settings.mapping_file, settings.topic_prefix).topics
    # The consumer's own clients: credentials and TLS as `run` has them (the secured stack).
    client = clickhouse_client(settings)
    lag_reader = LagReader(kafka_client_config(settings), settings.group_id)
    with log_file.open("ab") as log:
        consumer = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    console.print(f"consumer started (pid {consumer.pid}, log {log_file})")
    progress: list[GeneratorStats] = []
    writer = threading.Thread(
        target=lambda: progress.append(generate(settings.postgres_dsn, rate, duration, seed, progress.append)),
        daemon=True,
    )
    writer.start()
    try:
        with Live(console=console, refresh_per_second=2) as live:
            caught_up_since = None
            while True:
                if consumer.poll() is not None:
                    raise RuntimeError(f"the consumer exited with {consumer.returncode}; see {log_file}")
                lag_table, lag = _lag_table(lag_reader, topics)
                try:
                    kpis = _kpi_tables(client)
                except Exception:  # the consumer creates the views on start
                    kpis = []
                status = render_progress(progress[-1]) if progress else "starting the generator…"
                live.update(Group(status, lag_table, *kpis))
                if not writer.is_alive() and lag == 0:
                    caught_up_since = caught_up_since or time.monotonic()
                    if time.monotonic() - caught_up_since > 3:
                        break
                else:
                    caught_up_since = None
                time.sleep(1)
        report = compare(settings.postgres_dsn, client)
        console.print(str(report))
        return report.ok
    finally:
        lag_reader.close()
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(60)
