"""Phase 5: end-to-end latency, Postgres commit -> row in ClickHouse, through the real pipeline.

The real generator writes into the stack's Postgres, the stack's Debezium captures it into its
own topics (`adtech.public.*`), and our consumer (a fresh group and database, caught up first)
applies it. Two measurements:

* independent of the consumer: a reader (its own process) follows the same topics and notes by
  (partition, offset) when each change became readable and, for a sample, its Postgres commit
  time (`source.ts_ms`, SAMPLE_EVERY); a poller asks ClickHouse every
  POLL_S for the applied watermark (max `_offset` per partition of every table). A change's
  latency is the time of the first poll that saw it, minus its commit time: an upper bound, at
  most POLL_S above the truth;
* the consumer's own histogram `cdc_end_to_end_latency_seconds` (Postgres commit -> insert
  returned), scraped before and after, its quantiles interpolated within buckets.

First, what the stack's Debezium sustains: a burst from the generator faster than Debezium,
and the rate at which its messages arrive in Kafka. The offered rate must stay below that,
or the measurement is of Debezium's backlog, not of the consumer.
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect
from confluent_kafka import Consumer, TopicPartition

from bench import procstat
from bench.kafka_util import GroupProgress, end_offsets
from bench.ours import metric_sum, scrape, start_consumer, wait_caught_up, wait_started
from consumer.decode.envelope import EnvelopeDecoder
from consumer.decode.registry import SchemaRegistry

POLL_S = 0.1
TABLES = ("advertiser", "campaign", "impressions", "clicks")
CH_TABLES = ("dim_advertiser", "dim_campaign", "fact_impressions", "fact_clicks")
REPO = Path(__file__).resolve().parents[1]


def run_generator(dsn: str, rate: float, seconds: float, seed: int, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "consumer.cli",
                "generate",
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
                "--seed",
                str(seed),
                "--dsn",
                dsn,
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )


def debezium_probe(
    *, dsn: str, bootstrap: str, prefix: str, seconds: float, rate: float, seed: int, log: Path, progress=print
) -> dict:
    """Offer more than Debezium can take; its sustained rate is how fast messages arrive in Kafka."""
    topics = [f"{prefix}.public.{t}" for t in TABLES]
    base = sum(end_offsets(bootstrap, topics).values())
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    generator = run_generator(dsn, rate, seconds, seed, log)
    while True:
        n = sum(end_offsets(bootstrap, topics).values()) - base
        samples.append((time.monotonic(), n))
        done = generator.poll() is not None
        if done and len(samples) > 8 and samples[-1][1] == samples[-7][1]:
            break
        if time.monotonic() - started > seconds + 300:
            break
        time.sleep(0.5)
    generated = _generated(log)
    total = samples[-1][1]
    last = next(t for t, n in samples if n == total)
    generator_s = _generator_seconds(log) or seconds
    # The steady middle of the burst: from 10 % to 90 % of the messages.
    t10, n10 = next((t, n) for t, n in samples if n >= 0.1 * total)
    t90, n90 = next((t, n) for t, n in samples if n >= 0.9 * total)
    rate_debezium = (n90 - n10) / (t90 - t10) if t90 > t10 else 0.0
    progress(
        f"  generator: {generated:,} events at {generated / generator_s:,.0f}/s; Debezium delivered "
        f"{total:,} messages at {rate_debezium:,.0f}/s"
    )
    return {
        "offered_rate": rate,
        "generator_events": generated,
        "generator_events_per_s": round(generated / generator_s, 1),
        "kafka_messages": total,
        "debezium_messages_per_s": round(rate_debezium, 1),
        "debezium_behind_generator_s": round(last - started - generator_s, 1),
    }


def _generated(log: Path) -> int:
    import re

    text = log.read_text(errors="replace")
    found = re.findall(r"([\d,]+) events", text)
    return int(found[-1].replace(",", "")) if found else 0


def _generator_seconds(log: Path) -> float | None:
    import re

    found = re.findall(r"^\s*([\d.]+)s\s+[\d,]+ events", log.read_text(errors="replace"), flags=re.M)
    return float(found[-1]) if found else None


# One change in SAMPLE_EVERY (by offset) is decoded for its Postgres commit time. Decoding every
# change cost the reader a quarter of a core at 10,000/s, on a machine the pipeline under test
# already saturates; the parts after the commit need no decoding and are measured for every change.
SAMPLE_EVERY = 8


@dataclass
class Commits:
    """(topic, partition) -> per change read: offset, Postgres commit (ms, sampled changes only),
    the record's CreateTime (ms), when a read_committed reader got it (s)."""

    by_partition: dict[tuple[str, int], list[tuple[int, int | None, int, float]]] = field(default_factory=dict)


class CommitReader:
    """Follows the topics from their ends in a process of its own, so that its work neither
    waits on the pollers' GIL nor delays their clocks. Start it before the first change."""

    def __init__(self, bootstrap: str, topics: list[str], registry: str):
        context = multiprocessing.get_context("spawn")  # librdkafka's threads do not survive a fork
        self._stop, self._ready = context.Event(), context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=follow_commits, args=(bootstrap, topics, registry, self._stop, self._ready, sender), daemon=True
        )

    def start(self, timeout: float = 60.0) -> CommitReader:
        self._process.start()
        if not self._ready.wait(timeout):
            self.close()
            raise RuntimeError(f"the commit reader was not positioned within {timeout:.0f}s")
        return self

    def stop(self) -> Commits:
        self._stop.set()
        if not self._results.poll(60):
            self.close()
            raise RuntimeError("the commit reader ended without its results")
        by_partition = self._results.recv()
        self._process.join(10)
        return Commits(by_partition)

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)


def follow_commits(bootstrap: str, topics: list[str], registry: str, stop, ready, results) -> None:
    starts = end_offsets(bootstrap, topics)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-latency-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
    decoder = EnvelopeDecoder(SchemaRegistry(registry))
    by_partition: dict[tuple[str, int], list[tuple[int, int | None, int, float]]] = {}
    try:
        consumer.consume(1, timeout=0.5)  # fetches positioned at the ends
        ready.set()
        while not stop.is_set():
            # The first message as soon as it is there, then what is queued: a batch consume
            # waits out its timeout, which would be counted as Connect's.
            first = consumer.poll(0.05)
            if first is None:
                continue
            batch = [first, *consumer.consume(1000, timeout=0)]
            received = time.time()
            for m in batch:
                if m.error() is not None or m.value() is None:
                    continue
                commit_ms = None
                if m.offset() % SAMPLE_EVERY == 0:
                    try:
                        event = decoder.decode(m.value())
                    except Exception:
                        continue
                    if event is None or event.commit_ts_ms is None:
                        continue
                    commit_ms = event.commit_ts_ms
                kafka_ms = m.timestamp()[1]  # CreateTime: when Connect produced it
                by_partition.setdefault((m.topic(), m.partition()), []).append(
                    (m.offset(), commit_ms, kafka_ms, received)
                )
    finally:
        consumer.close()
        results.send(by_partition)


def poll_watermarks(url: str, stop: threading.Event, polls: list[tuple[float, dict]]) -> None:
    client = clickhouse_connect.get_client(dsn=url)
    query = " UNION ALL ".join(
        f"SELECT _topic, _partition, max(_offset) FROM {t} GROUP BY _topic, _partition" for t in CH_TABLES
    )
    while not stop.is_set():
        asked = time.time()
        try:
            rows = client.query(query).result_rows
        except Exception:
            time.sleep(POLL_S)
            continue
        polls.append((asked, {(t, int(p)): int(o) for t, p, o in rows}))
        time.sleep(max(0.0, POLL_S - (time.time() - asked)))


def latencies(commits: Commits, polls: list[tuple[float, dict]]) -> tuple[dict[str, list[float]], int]:
    """Per change: seconds from its Postgres commit to the first poll that saw it in ClickHouse
    ("total"), and its parts: commit -> record produced ("debezium"), produced -> readable by a
    read_committed consumer ("transaction": Connect's exactly-once commits), readable -> seen in
    ClickHouse ("consumer"). And how many were never seen. The commit time, so "total" and
    "debezium", is known for the sampled changes only (SAMPLE_EVERY)."""
    parts: dict[str, list[float]] = {"total": [], "debezium": [], "transaction": [], "consumer": []}
    unseen = 0
    for key, changes in commits.by_partition.items():
        seen_at = [(t, w.get(key, -1)) for t, w in polls]
        # Watermarks only grow: for each change, binary search the first poll at or above it.
        marks = [m for _, m in seen_at]
        running = []
        best = -1
        for m in marks:
            best = max(best, m)
            running.append(best)
        for offset, commit_ms, kafka_ms, readable in changes:
            i = bisect.bisect_left(running, offset)
            if i == len(running):
                unseen += 1
                continue
            if commit_ms is not None:
                parts["total"].append(max(0.0, seen_at[i][0] - commit_ms / 1000))
                parts["debezium"].append(max(0.0, (kafka_ms - commit_ms) / 1000))
            parts["transaction"].append(max(0.0, readable - kafka_ms / 1000))
            parts["consumer"].append(max(0.0, seen_at[i][0] - readable))
    for values in parts.values():
        values.sort()
    return parts, unseen


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def histogram_quantiles(before: str, after: str, name: str, qs=(0.5, 0.9, 0.99)) -> dict:
    """Quantiles of a Prometheus histogram's increase between two scrapes (all label sets)."""

    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    b0, b1 = buckets(before), buckets(after)
    bounds = sorted(b1)
    counts = [b1[b] - b0.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    result: dict[str, float | None] = {"observations": total}
    for q in qs:
        if not total:
            result[f"p{q * 100:g}"] = None
            continue
        rank = q * total
        previous_bound, previous_count = 0.0, 0.0
        value = None
        for bound, count in zip(bounds, counts, strict=True):
            if count >= rank:
                if bound == float("inf"):
                    value = previous_bound
                else:
                    span = count - previous_count
                    value = previous_bound + (bound - previous_bound) * ((rank - previous_count) / span if span else 1)
                break
            previous_bound, previous_count = bound, count
        result[f"p{q * 100:g}"] = round(value, 3) if value is not None else None
    return result


def run_latency(
    *,
    env: dict[str, str],
    dsn: str,
    bootstrap: str,
    registry: str,
    clickhouse_url: str,
    database: str,
    group_id: str,
    prefix: str,
    rate: float,
    seconds: float,
    seed: int,
    clickhouse_pid: int | None,
    logs: Path,
    variants: dict[str, dict[str, str]] | None = None,
    progress=print,
) -> dict:
    """`variants`: more of our consumers, each with these settings on top of `env`, a database
    and group of its own, running beside the first on the same changes (an A/B in one run)."""
    topics = [f"{prefix}.public.{t}" for t in TABLES]
    partitions = [(t, p) for (t, p) in end_offsets(bootstrap, topics)]
    consumer = start_consumer(env, logs / f"{database}-consumer.log")
    group = GroupProgress(bootstrap, group_id, partitions)
    others = {
        label: (
            f"{database}_{label}",
            start_consumer(
                {
                    **env,
                    **settings,
                    "CDC_GROUP_ID": f"{group_id}-{label}",
                    "CDC_CLICKHOUSE_URL": f"{clickhouse_url}/{database}_{label}",
                },
                logs / f"{database}_{label}-consumer.log",
            ),
            GroupProgress(bootstrap, f"{group_id}-{label}", partitions),
        )
        for label, settings in (variants or {}).items()
    }
    reader = None
    try:
        wait_started(consumer)
        wait_caught_up(consumer, group, end_offsets(bootstrap, topics), timeout=1800)
        for _db, other, other_group in others.values():
            wait_started(other)
            wait_caught_up(other, other_group, end_offsets(bootstrap, topics), timeout=1800)
        progress(
            f"  consumer caught up with the existing {prefix}.* topics; offering {rate:,.0f} events/s for {seconds:.0f}s"
        )
        stop = threading.Event()
        reader = CommitReader(bootstrap, topics, registry).start()
        polls: list[tuple[float, dict]] = []
        threads = [
            threading.Thread(target=poll_watermarks, args=(f"{clickhouse_url}/{database}", stop, polls), daemon=True),
        ]
        other_polls: dict[str, list[tuple[float, dict]]] = {label: [] for label in others}
        threads += [
            threading.Thread(
                target=poll_watermarks, args=(f"{clickhouse_url}/{db}", stop, other_polls[label]), daemon=True
            )
            for label, (db, _c, _g) in others.items()
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the pollers' first answers
        scraped_before = scrape(consumer.metrics_port)
        others_before = {
            label: (scrape(c.metrics_port), procstat.cpu_seconds(c.pid)) for label, (_d, c, _g) in others.items()
        }
        sampler = procstat.Sampler(consumer.pid, interval=1.0).start()
        ch_cpu0 = procstat.cpu_seconds(clickhouse_pid) if clickhouse_pid else 0.0
        cpu0 = procstat.cpu_seconds(consumer.pid)
        started = time.monotonic()
        generator = run_generator(dsn, rate, seconds, seed, logs / f"{database}-generator.log")
        generator.wait()
        generated_s = time.monotonic() - started
        # The tail: Debezium's last messages, then the consumer's last batch.
        wait_caught_up(consumer, group, end_offsets(bootstrap, topics), timeout=600)
        drained_s = time.monotonic() - started - generated_s
        for _db, other, other_group in others.values():
            wait_caught_up(other, other_group, end_offsets(bootstrap, topics), timeout=600)
        time.sleep(3 * POLL_S + 0.5)
        cpu = procstat.cpu_seconds(consumer.pid) - cpu0
        ch_cpu = (procstat.cpu_seconds(clickhouse_pid) - ch_cpu0) if clickhouse_pid else None
        wall = time.monotonic() - started
        sampler.stop()
        scraped_after = scrape(consumer.metrics_port)
        others_after = {
            label: (scrape(c.metrics_port), procstat.cpu_seconds(c.pid)) for label, (_d, c, _g) in others.items()
        }
        stop.set()
        for t in threads:
            t.join(10)
        commits = reader.stop()
    finally:
        if reader is not None:
            reader.close()
        code = consumer.stop()
        group.close()
        for _db, other, other_group in others.values():
            other.stop()
            other_group.close()
    parts, unseen = latencies(commits, polls)
    values = parts["total"]
    generated = _generated(logs / f"{database}-generator.log")
    result = {
        "offered_rate": rate,
        "seconds": seconds,
        "generator_events": generated,
        "generator_wall_s": round(generated_s, 1),
        "achieved_rate": round(generated / generated_s, 1) if generated_s else None,
        "drain_after_generator_s": round(drained_s, 2),
        "changes_measured": len(parts["consumer"]),
        "changes_with_commit_time": len(values),
        "changes_not_seen": unseen,
        "poll_interval_s": POLL_S,
        "p50_s": _r(quantile(values, 0.5)),
        "p90_s": _r(quantile(values, 0.9)),
        "p99_s": _r(quantile(values, 0.99)),
        "p999_s": _r(quantile(values, 0.999)),
        "max_s": _r(values[-1] if values else None),
        # Where it goes: Postgres commit -> record in Kafka (Debezium), record in Kafka -> row seen.
        **{
            f"{part}_p{q}_s": _r(quantile(parts[part], int(q) / 100))
            for part in ("debezium", "transaction", "consumer")
            for q in ("50", "99")
        },
        "consumer_histogram": histogram_quantiles(scraped_before, scraped_after, "cdc_end_to_end_latency_seconds"),
        "consumer_cpu_cores": round(cpu / wall, 3),
        "clickhouse_cpu_cores": round(ch_cpu / wall, 3) if ch_cpu is not None else None,
        "consumer_memory": procstat.memory_trend(sampler.samples, skip_s=min(10.0, seconds / 4)),
        # The dimension rows kept for TOASTed columns grow with the source's live keys, up to their
        # byte budget: RSS growth beyond that is the consumer's own.
        "consumer_latest_rows_mib": [
            round(metric_sum(scraped, "cdc_latest_rows_bytes") / 2**20, 1)
            for scraped in (scraped_before, scraped_after)
        ],
        "consumer_exit": code,
        "consumer_messages": metric_sum(scraped_after, "cdc_messages_consumed_total"),
        **insert_stats(scraped_before, scraped_after, wall),
    }
    result["variants"] = {}
    for label, (db, _c, _g) in others.items():
        other_parts, other_unseen = latencies(commits, other_polls[label])
        (before, cpu_before), (after, cpu_after) = others_before[label], others_after[label]
        result["variants"][label] = {
            "settings": variants[label],
            "database": db,
            "changes_measured": len(other_parts["consumer"]),
            "changes_not_seen": other_unseen,
            "p50_s": _r(quantile(other_parts["total"], 0.5)),
            "p99_s": _r(quantile(other_parts["total"], 0.99)),
            "consumer_p50_s": _r(quantile(other_parts["consumer"], 0.5)),
            "consumer_p99_s": _r(quantile(other_parts["consumer"], 0.99)),
            "consumer_cpu_cores": round((cpu_after - cpu_before) / wall, 3),
            **insert_stats(before, after, wall),
        }
        v = result["variants"][label]
        progress(
            f"  variant {label} {variants[label]}: p99 {v['p99_s']}s, ours {v['consumer_p99_s']}s; "
            f"{v['consumer_cpu_cores']} cores, {v['inserts_per_s']} inserts/s"
        )
    progress(
        f"  latency p50 {result['p50_s']}s p99 {result['p99_s']}s max {result['max_s']}s over {len(values):,} sampled changes "
        f"(Debezium p50/p99 {result['debezium_p50_s']}/{result['debezium_p99_s']}s, Connect's transactions "
        f"{result['transaction_p50_s']}/{result['transaction_p99_s']}s, ours {result['consumer_p50_s']}/"
        f"{result['consumer_p99_s']}s); consumer {result['consumer_cpu_cores']} cores, "
        f"{result['inserts_per_s']} inserts/s of {result['insert_mean_s']}s on average, "
        f"commits of {result['commit_mean_s']}s; per table {result['per_table']}"
    )
    return result


def insert_stats(before: str, after: str, wall: float) -> dict:
    """How often the consumer inserted while streaming, and how long an insert took on average
    (in all and per table): its share of the latency beyond the batch age."""

    def delta(name: str, table: str | None = None) -> float:
        if table is None:
            return metric_sum(after, name) - metric_sum(before, name)
        label = f'{name}{{table="{table}"}}'
        return metric_sum(after, label) - metric_sum(before, label)

    def mean(table: str | None = None) -> float | None:
        count = delta("cdc_insert_duration_seconds_count", table)
        return round(delta("cdc_insert_duration_seconds_sum", table) / count, 4) if count else None

    inserts = delta("cdc_insert_duration_seconds_count")
    commits = delta("cdc_commit_duration_seconds_count")
    return {
        "inserts_per_s": round(inserts / wall, 2) if wall else None,
        "insert_mean_s": mean(),
        "commit_mean_s": round(delta("cdc_commit_duration_seconds_sum") / commits, 4) if commits else None,
        "per_table": {
            table: {
                "inserts_per_s": round(delta("cdc_insert_duration_seconds_count", table) / wall, 2) if wall else None,
                "insert_mean_s": mean(table),
            }
            for table in CH_TABLES
        },
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
