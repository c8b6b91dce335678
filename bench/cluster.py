"""Benchmark: one ClickHouse shard against two (docs/scaling.md), on a stack started with
`CDC_STACK_CLICKHOUSE_SHARDS=2` (and any broker count).

    python bench/cluster.py                      # 300k events; inserts: 40 batches of 20k rows
    python bench/cluster.py --events 1000000 --phases catchup
    python bench/cluster.py --phases inserts

* **inserts** — the two ways a Kafka partition's batch can reach its shard, timed on the same
  batches (each the rows of one partition, as the consumer makes them): straight into the shard's
  local table through that node's HTTP port (what the consumer does), or into the Distributed
  table on node 1 with `_partition` as sharding key and `insert_distributed_sync=1`. Wall time
  and CPU of both ClickHouse processes; and whether a retried insert (same
  `insert_deduplication_token`) is dropped on the shard both ways.
* **catchup** — the same produced topics (bench/run.py's producer: Debezium-shaped Avro, checked
  byte for byte) consumed from the start by a fresh consumer into a fresh database, once on one
  shard (node 1, no cluster mode) and once on both (cluster mode); events/s, CPU-seconds per
  million events of the consumer and of every ClickHouse process (from /proc), and the
  ground-truth comparison with Postgres.

The last line printed is one JSON object; it is also kept in bench/results/cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clickhouse_connect

from bench import events as ev
from bench import procstat
from bench.kafka_util import GroupProgress, end_offsets
from bench.ours import run_ours, start_consumer, wait_caught_up
from bench.run import RESULTS, Stack, log, machine, phase_produce
from consumer.sink.cluster_ddl import ClusterLayout
from consumer.sink.migrate import apply_to_shards

COLUMNS = ["id", "campaign_id", "created_at", "cost", "_sign", "_topic", "_partition", "_offset"]


def node_pids(stack: Stack) -> list[int]:
    pids = []
    for node in stack.layout.clickhouse_nodes:
        pidfile = stack.layout.pidfile(node.name)
        if pidfile.exists():
            pids.append(int(pidfile.read_text().strip()))
    return pids


def node_urls(stack: Stack) -> list[str]:
    return [node.url for node in stack.layout.clickhouse_nodes]


def client(url: str, database: str | None = None):
    return clickhouse_connect.get_client(dsn=url + (f"/{database}" if database else ""), send_receive_timeout=600)


def batches(count: int, rows: int, partitions: int) -> list[tuple[int, list[list]]]:
    """(partition, rows) of `count` batches, round-robin over the partitions, offsets ascending."""
    rng = random.Random(16)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    out, next_offset = [], dict.fromkeys(range(partitions), 0)
    for b in range(count):
        p = b % partitions
        data = []
        for i in range(rows):
            offset = next_offset[p] + i
            data.append(
                [
                    b * rows + i,
                    rng.randrange(1, 2000),
                    start.replace(day=1 + (b * rows + i) % 28),
                    Decimal(rng.randrange(1, 10**6)) / 10**6,
                    1,
                    "bench.public.impressions",
                    p,
                    offset,
                ]
            )
        next_offset[p] += rows
        out.append((p, data))
    return out


def phase_inserts(stack: Stack, args) -> dict:
    urls, pids = node_urls(stack), node_pids(stack)
    shards = len(urls)
    if shards < 2:
        raise SystemExit("needs a stack with CDC_STACK_CLICKHOUSE_SHARDS=2 or more")
    work = batches(args.batches, args.batch_rows, 4)
    results = {}
    for way in ("local", "distributed"):
        database = f"benchcluster_{way}_{uuid.uuid4().hex[:6]}"
        for url in urls:
            client(url).command(f"CREATE DATABASE IF NOT EXISTS {database}")
        clients = [client(url, database) for url in urls]
        apply_to_shards(clients, ClusterLayout("cdc"))
        idle = sum(procstat.idle_cpu_rate(pid, 2.0) for pid in pids)
        cpu0 = sum(map(procstat.cpu_seconds, pids))
        started = time.monotonic()
        for number, (p, rows) in enumerate(work):
            settings = {"async_insert": 0, "insert_deduplication_token": f"bench:{p}:{number}"}
            if way == "local":
                clients[p % shards].insert("fact_impressions_local", rows, column_names=COLUMNS, settings=settings)
            else:
                settings["insert_distributed_sync"] = 1
                clients[0].insert("fact_impressions", rows, column_names=COLUMNS, settings=settings)
        wall = time.monotonic() - started
        cpu = sum(map(procstat.cpu_seconds, pids)) - cpu0 - idle * wall
        # A retried insert: the last batch again, with its token. Dropped on its shard?
        p, rows = work[-1]
        retry = {"async_insert": 0, "insert_deduplication_token": f"bench:{p}:{len(work) - 1}"}
        if way == "local":
            clients[p % shards].insert("fact_impressions_local", rows, column_names=COLUMNS, settings=retry)
        else:
            clients[0].insert(
                "fact_impressions", rows, column_names=COLUMNS, settings={**retry, "insert_distributed_sync": 1}
            )
        total = int(clients[0].query("SELECT count() FROM fact_impressions").result_rows[0][0])
        placed = {
            i + 1: sorted(r[0] for r in c.query("SELECT DISTINCT _partition FROM fact_impressions_local").result_rows)
            for i, c in enumerate(clients)
        }
        expected = len(work) * args.batch_rows
        results[way] = {
            "rows": expected,
            "wall_s": round(wall, 3),
            "rows_per_s": round(expected / wall),
            "clickhouse_cpu_s": round(cpu, 3),
            "clickhouse_cpu_s_per_million_rows": round(cpu * 1e6 / expected, 3),
            "retry_deduplicated": total == expected,
            "partitions_by_shard": placed,
        }
        log(f"  {way}: {results[way]}")
        for url in urls:
            client(url).command(f"DROP DATABASE IF EXISTS {database}")
    return results


def phase_catchup(stack: Stack, args) -> dict:
    prefix = args.prefix
    if prefix is None:
        prefix = f"benchcl{datetime.now(UTC).strftime('%m%d%H%M%S')}"
        phase_produce(stack, args, prefix)
    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    ends = end_offsets(stack.kafka, topics)
    events = args.events
    urls, pids = node_urls(stack), node_pids(stack)
    results = {"prefix": prefix}
    for shards in (1, len(urls)):
        run = uuid.uuid4().hex[:6]
        database = f"benchcl_{shards}_{run}"
        group = f"{prefix}-cluster{shards}-{run}"
        env = {
            **stack.env,
            "CDC_TOPIC_PREFIX": prefix,
            "CDC_GROUP_ID": group,
            "CDC_CLICKHOUSE_URL": f"{urls[0]}/{database}",
            "CDC_DLQ_TOPIC": f"{prefix}.dlq",
            "CDC_CLICKHOUSE_CLUSTER": "cdc" if shards > 1 else "",
            "CDC_CLICKHOUSE_SHARD_URLS": ",".join(f"{url}/{database}" for url in urls) if shards > 1 else "",
        }
        log(f"[catchup] {shards} shard(s): group {group}, database {database}")
        result = run_ours(
            env=env,
            bootstrap=stack.kafka,
            group_id=group,
            ends=ends,
            clickhouse_pids=pids,
            clickhouse=client(urls[0]),
            events=events,
            log=RESULTS / "logs" / f"{prefix}-cluster{shards}.log",
            timeout=args.timeout,
            progress=log,
        )
        from cdc_dev.verify import compare

        report = compare(ev.ground_truth_dsn(stack.postgres_dsn, prefix), client(urls[0], database))
        result["verify_ok"] = report.ok
        if shards > 1:
            result["fact_rows_by_shard"] = [
                int(client(url, database).query("SELECT count() FROM fact_impressions_local").result_rows[0][0])
                for url in urls
            ]
        keep = (
            "events_per_s",
            "ingest_wall_s",
            "consumer_cpu_s_per_million",
            "clickhouse_cpu_s_per_million",
            "total_cpu_s_per_million",
            "peak_rss_mib",
            "inserts",
            "verify_ok",
            "fact_rows_by_shard",
        )
        results[f"{shards}_shard"] = {k: result[k] for k in keep if k in result}
        log(f"  {results[f'{shards}_shard']}")
        for url in urls:
            client(url).command(f"DROP DATABASE IF EXISTS {database}")
    return results


def phase_consumers(stack: Stack, args, prefix: str) -> dict:
    """Catch-up of the same topics on every shard by 1, 2, … consumers of one group, up to the
    partition count (bench/events.py's topics have ev.PARTITIONS each): events/s from the first
    start to group lag 0 (start-ups included: they overlap), CPU of every process."""
    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    ends = end_offsets(stack.kafka, topics)
    urls, pids = node_urls(stack), node_pids(stack)
    results = {}
    counts = [n for n in (1, 2, 4, 8) if n <= ev.PARTITIONS]
    for count in counts:
        run = uuid.uuid4().hex[:6]
        database = f"benchcl_c{count}_{run}"
        group = f"{prefix}-consumers{count}-{run}"
        env = {
            **stack.env,
            "CDC_TOPIC_PREFIX": prefix,
            "CDC_GROUP_ID": group,
            "CDC_DLQ_TOPIC": f"{prefix}.dlq",
            "CDC_CLICKHOUSE_CLUSTER": "cdc",
            "CDC_CLICKHOUSE_SHARD_URLS": ",".join(f"{url}/{database}" for url in urls),
        }
        for url in urls:  # migrated before the consumers start, so they do not race to create tables
            client(url).command(f"CREATE DATABASE IF NOT EXISTS {database}")
        apply_to_shards([client(url, database) for url in urls], ClusterLayout("cdc"))
        progress = GroupProgress(stack.kafka, group, list(ends))
        cpu0 = sum(map(procstat.cpu_seconds, pids))
        started = time.monotonic()
        consumers = [start_consumer(env, RESULTS / "logs" / f"{prefix}-consumers{count}-{i}.log") for i in range(count)]
        try:
            done = wait_caught_up(consumers[0], progress, ends, args.timeout)
            cpu = sum(map(procstat.cpu_seconds, pids)) + sum(procstat.cpu_seconds(c.pid) for c in consumers) - cpu0
        finally:
            for consumer in consumers:
                consumer.stop()
            progress.close()
        wall = done - started
        results[f"{count}_consumers"] = {
            "events_per_s": round(args.events / wall),
            "wall_s": round(wall, 1),
            "cpu_s_per_million": round(cpu * 1e6 / args.events, 2),
        }
        log(f"  {count} consumer(s): {results[f'{count}_consumers']}")
        for url in urls:
            client(url).command(f"DROP DATABASE IF EXISTS {database}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="inserts,catchup")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--prefix", default=None, help="reuse topics produced under this prefix (--events must match)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-rows", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    stack = Stack()
    phases = set(args.phases.split(","))
    results: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    if "inserts" in phases:
        results["inserts"] = phase_inserts(stack, args)
    if "catchup" in phases:
        results["catchup"] = phase_catchup(stack, args)
        args.prefix = results["catchup"]["prefix"]
    if "consumers" in phases:
        if args.prefix is None:
            raise SystemExit("--phases consumers needs --prefix (topics produced by a catchup run)")
        results["consumers"] = phase_consumers(stack, args, args.prefix)
    path = RESULTS / f"cluster-{datetime.now(UTC).strftime('%m%d%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
