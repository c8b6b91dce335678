"""The benchmark, in one command (see bench/README.md):

    eval "$(cdc-consumer stack env)"   # or let it find the native stack by CDC_STACK_DIR
    python bench/run.py [--events 2000000] [--rate auto|N] [--latency-seconds 60]

Phases: (1) produce N Debezium-shaped Avro change events into fresh topics; (2) our consumer from
start to caught up, then the ground-truth comparison; (3) ClickHouse's own AvroConfluent ingest of
the same messages; (4) floors: consume only, consume + decode; (5) end-to-end latency through the
real generator and Debezium at a fixed offered rate; (6) `cdc-consumer audit` on phase 2's data,
first and repeated, against a plain scan of the fact tables; (7) the table, JSON kept in
bench/results/, and as the LAST line one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import clickhouse_connect  # noqa: E402
import requests  # noqa: E402

from bench import events as ev  # noqa: E402
from bench.kafka_engine import DEFAULTS as ENGINE_DEFAULTS  # noqa: E402
from bench.kafka_engine import (  # noqa: E402
    TUNED_LATENCY,
    TUNED_THROUGHPUT,
    PeerServer,
    run_engine_catchup,
    run_engine_fault,
    run_engine_latency,
)
from bench.kafka_util import end_offsets, last_message_ends, read_all  # noqa: E402
from bench.ours import run_ours, run_ours_fault  # noqa: E402
from cdc_dev.stack.layout import StackLayout  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEBEZIUM_PREFIX = "adtech"  # topic.prefix of connectors/debezium-postgres.json
# Our consumer with other settings beside the default one in the latency phase: (settings, what).
LATENCY_VARIANTS = {
    "timed_flush": ({"CDC_FLUSH_WHEN_CAUGHT_UP": "false"}, "timed flush"),
    "sequential_inserts": ({"CDC_INSERT_CONCURRENCY": "1"}, "tables inserted one after another"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment


class Stack:
    """The stack's addresses: CDC_* variables win, else the native stack's layout."""

    def __init__(self) -> None:
        self.layout = StackLayout.from_env()
        defaults = self.layout.connection_env()
        env = {k: os.environ.get(k) or v for k, v in defaults.items()}
        self.postgres_dsn = env["CDC_POSTGRES_DSN"]
        self.kafka = env["CDC_KAFKA_BOOTSTRAP"]
        self.connect_url = env["CDC_CONNECT_URL"]
        self.registry = env["CDC_SCHEMA_REGISTRY_URL"]
        self.clickhouse = env["CDC_CLICKHOUSE_URL"].rstrip("/")
        self.env = env
        pidfile = self.layout.pidfile("clickhouse")
        self.clickhouse_pid = int(pidfile.read_text().strip()) if pidfile.exists() else None
        if self.clickhouse_pid and not Path(f"/proc/{self.clickhouse_pid}").exists():
            self.clickhouse_pid = None

    def ch(self, database: str | None = None):
        url = self.clickhouse + (f"/{database}" if database else "")
        return clickhouse_connect.get_client(dsn=url, send_receive_timeout=600)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- phase 1


def real_messages(stack: Stack, limit_per_table: int = 40):
    """Some real Debezium messages of the stack's own topics, per table and op: (table, key,
    value), and (topic, partition, key) of every message read for the partitioner check."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": stack.kafka,
            "group.id": f"bench-real-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    topics = [f"{DEBEZIUM_PREFIX}.public.{t}" for t in ev.TABLES]
    consumer.subscribe(topics)
    seen: dict[tuple[str, bytes], int] = {}
    out = []
    partitioned = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, timeout=1.0)
            if not batch and out:
                break
            for m in batch:
                if m.error():
                    continue
                partitioned.append((m.topic(), m.partition(), m.key()))
                if m.value() is None:
                    continue
                table = m.topic().rsplit(".", 1)[1]
                kind = (table, m.value()[:6])
                if seen.get(kind, 0) < limit_per_table // 4:
                    seen[kind] = seen.get(kind, 0) + 1
                    out.append((table, m.key(), m.value()))
    finally:
        consumer.close()
    return out, partitioned


def _first_messages(stack: Stack, produced: ev.Produced, per_partition: int = 200) -> list:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": stack.kafka, "group.id": f"bench-part-{uuid.uuid4().hex[:6]}"})
    parts = [TopicPartition(t, p, 0) for t in produced.topics.values() for p in range(ev.PARTITIONS)]
    consumer.assign(parts)
    out = []
    deadline = time.monotonic() + 30
    try:
        while len(out) < per_partition * len(parts) * 0.5 and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1.0):
                if not m.error():
                    out.append((m.topic(), m.partition(), m.key()))
    finally:
        consumer.close()
    return out


def ensure_templates(stack: Stack) -> dict:
    """The stack's Debezium registers its writer schemas with its first change: make one if needed."""
    try:
        return ev.template_schemas(stack.registry, DEBEZIUM_PREFIX)
    except LookupError as missing:
        log(f"  no {missing} in the registry yet: writing a little traffic so Debezium registers its schemas")
        from cdc_dev.generate import generate

        generate(stack.postgres_dsn, rate=200, duration=3)
        deadline = time.monotonic() + 120
        while True:
            try:
                return ev.template_schemas(stack.registry, DEBEZIUM_PREFIX)
            except LookupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def captured_fixture_messages() -> tuple[list[tuple[str, bytes | None, bytes | None]], dict[int, dict]]:
    """The real envelopes captured in tests/unit/test_decode.py (another stack, another day)."""
    try:
        from tests.unit.test_decode import CAPTURED, CAPTURED_SCHEMAS
    except Exception:  # tests are not installed with the package: optional
        return [], {}
    out = []
    schemas = {}
    for name, value in CAPTURED.items():
        table = name.split("_", 1)[0]
        if table not in ev.TABLES:
            continue
        schema_id = int.from_bytes(value[1:5], "big")
        schemas[schema_id] = json.loads(CAPTURED_SCHEMAS[schema_id])
        out.append((table, None, value))
    return out, schemas


def phase_produce(stack: Stack, args, prefix: str) -> tuple[ev.Produced, dict]:
    log(f"[1] producing {args.events:,} change events into {prefix}.public.*")
    templates = ensure_templates(stack)
    report = ev.CompatReport()
    real, real_partitioned = real_messages(stack)
    real = ev.check_against_real(real, ev.registry_schema(stack.registry), report, "stack Debezium")
    debezium = ev.debezium_placed(real_partitioned, report, "stack Debezium")
    for reason, count in report.skipped.items():
        log(f"  skipped {count} poison messages of the stack's topics ({reason})")
    captured, captured_schemas = captured_fixture_messages()
    ev.check_against_real(captured, captured_schemas.__getitem__, report, "captured")
    source = {"version": "3.7.0.Final", "connector": "postgresql", "db": "adtech"}
    if real:
        import io

        import fastavro

        _table, _key, value = real[0]
        writer = ev.registry_schema(stack.registry)(int.from_bytes(value[1:5], "big"))
        record = fastavro.schemaless_reader(io.BytesIO(value[5:]), fastavro.parse_schema(writer))
        source = {k: record["source"][k] for k in ("version", "connector", "db")}
    schemas = ev.bench_schemas(stack.registry, templates, DEBEZIUM_PREFIX, prefix)
    produced = ev.produce(stack.kafka, schemas, prefix, args.events, args.seed, source, progress=log)
    ev.check_against_fastavro(schemas, produced.samples, report)
    # Partitioning: as the Java producer (murmur2 of the key bytes), for Debezium's messages and ours.
    for label, sample in (("stack Debezium", debezium), ("produced", _first_messages(stack, produced))):
        wrong = [(t, p) for t, p, key in sample if key is not None and ev.murmur2_partition(key, ev.PARTITIONS) != p]
        if wrong:
            report.problems.append(f"{label}: {len(wrong)} messages not in murmur2(key) % {ev.PARTITIONS}")
        elif sample:
            report.checked.append(f"partitioner {label} ({len(sample)} messages)")
    if not report.ok:
        raise SystemExit("byte compatibility check failed:\n  " + "\n  ".join(report.problems))
    c = produced.counts
    log(
        f"  {c.events:,} events + {c.tombstones:,} tombstones = {c.messages:,} messages, "
        f"{c.bytes / 2**20:.0f} MiB, in {produced.seconds:.1f}s; byte-compatible: {len(report.checked)} checks"
    )
    started = time.monotonic()
    truth = ev.write_ground_truth(stack.postgres_dsn, prefix, produced.world)
    log(f"  ground truth in Postgres schema {prefix}: {truth} ({time.monotonic() - started:.1f}s)")
    compat = {
        "checks": len(report.checked),
        "real_debezium_messages": sum(1 for c in report.checked if c.startswith("stack")),
        "captured_messages": sum(1 for c in report.checked if c.startswith("captured")),
        "fastavro_roundtrips": sum(1 for c in report.checked if c.startswith("produced")),
        "poison_skipped": report.skipped,
    }
    return produced, {
        "events": c.events,
        "messages": c.messages,
        "tombstones": c.tombstones,
        "bytes": c.bytes,
        "by_kind": c.by_kind,
        "produce_s": round(produced.seconds, 1),
        "ground_truth_rows": truth,
        "byte_compatibility": compat,
    }


# ----------------------------------------------------------------------------- phase 2


def ours_env(stack: Stack, args, prefix: str, group: str, database: str) -> dict[str, str]:
    return {
        **stack.env,
        "CDC_TOPIC_PREFIX": prefix,
        "CDC_GROUP_ID": group,
        "CDC_CLICKHOUSE_URL": f"{stack.clickhouse}/{database}",
        "CDC_DLQ_TOPIC": f"{prefix}.dlq",
        **dict(kv.split("=", 1) for kv in args.consumer_env),
    }


def phase_ours(stack: Stack, args, prefix: str, events: int) -> dict:
    run = uuid.uuid4().hex[:6]
    database = f"benchdb_{prefix}_{run}"
    group = f"{prefix}-ours-{run}"
    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    ends = end_offsets(stack.kafka, topics)
    log(f"[2] our consumer: group {group}, ClickHouse database {database}")
    env = ours_env(stack, args, prefix, group, database)
    result = run_ours(
        env=env,
        bootstrap=stack.kafka,
        group_id=group,
        ends=ends,
        clickhouse_pids=[stack.clickhouse_pid] if stack.clickhouse_pid else [],
        clickhouse=stack.ch(),
        events=events,
        log=RESULTS / "logs" / f"{prefix}-consumer.log",
        timeout=args.timeout,
        progress=log,
    )
    log(
        f"  caught up: {result['events_per_s']:,.0f} events/s, consumer {result['consumer_cpu_s_per_million']} "
        f"+ ClickHouse {result['clickhouse_cpu_s_per_million']} CPU-s per million, peak RSS {result['peak_rss_mib']} MiB"
    )
    if not args.no_verify:
        from cdc_dev.verify import compare

        started = time.monotonic()
        report = compare(ev.ground_truth_dsn(stack.postgres_dsn, prefix), stack.ch(database))
        result["verify_ok"] = report.ok
        result["verify_s"] = round(time.monotonic() - started, 1)
        if not report.ok:
            result["verify_report"] = str(report)[:5000]
        log(f"  ground truth: {'ClickHouse matches Postgres' if report.ok else 'MISMATCH'} ({result['verify_s']}s)")
        if not report.ok:
            log(str(report)[:5000])
    result["database"] = database
    result["group"] = group
    return result


def phase_audit(stack: Stack, args, prefix: str, ours: dict) -> dict:
    from bench.audit import run_audit_cost

    log("[audit] cdc-consumer audit on our consumer's data: first (every offset), then repeated (from its checkpoint)")
    return run_audit_cost(
        env=ours_env(stack, args, prefix, ours["group"], ours["database"]),
        clickhouse=stack.ch(ours["database"]),
        clickhouse_pid=stack.clickhouse_pid,
        progress=log,
    )


# ----------------------------------------------------------------------------- phase 3


def writer_schemas(stack: Stack, topics: list[str]) -> dict[str, dict]:
    out = {}
    for topic in topics:
        response = requests.get(f"{stack.registry}/subjects/{topic}-value/versions/latest", timeout=10)
        response.raise_for_status()
        out[topic] = json.loads(response.json()["schema"])
    return out


def read_values(stack: Stack, prefix: str, messages: int) -> dict[str, list[bytes]]:
    """Every value of the benchmark's topics, read once for the native ingest (not measured)."""
    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    started = time.monotonic()
    by_topic: dict[str, list[bytes]] = {t: [] for t in topics}
    for topic, _partition, _offset, value in read_all(stack.kafka, topics, messages):
        if value is not None:
            by_topic[topic].append(value)
    log(
        f"  read {sum(len(v) for v in by_topic.values()):,} values once ({time.monotonic() - started:.1f}s, not measured)"
    )
    return by_topic


def phase_native(stack: Stack, prefix: str, events: int, by_topic: dict[str, list[bytes]]) -> dict:
    from bench.native import run_native
    from consumer.transform.mapping import load_mapping

    log("[3] ClickHouse's own ingest: the same messages, one INSERT ... FORMAT AvroConfluent per topic")
    result = run_native(
        ch_client=stack.ch(),
        clickhouse_url=stack.clickhouse,
        database=f"benchnative_{prefix}",
        registry_url=stack.registry,
        mapping=load_mapping(topic_prefix=prefix),
        writer_schemas=writer_schemas(stack, list(by_topic)),
        messages_by_topic=by_topic,
        events=events,
        clickhouse_pid=stack.clickhouse_pid,
        progress=log,
    )
    log(f"  native: {result['cpu_s_per_million']} ClickHouse CPU-s per million, {result['events_per_s']:,.0f} events/s")
    return result


def cpu_rounds(
    stack: Stack, args, phases: set[str], prefix: str, events: int, messages: int, server: PeerServer | None
) -> dict:
    """Ours and the native ingest, alternately, `--rounds` times; each reported by its round of
    least CPU, every round kept. A fresh ClickHouse server spends up to 1.5× as much CPU on its
    first large inserts as on the same inserts later (the native ingest here: 2.49, 1.92, 1.69
    CPU-s per million in three rounds after a restart), so one round each would compare whichever
    ran first on a cold server with the other on a warm one."""
    by_topic = read_values(stack, prefix, messages) if "native" in phases else {}
    rounds: dict[str, list[dict]] = {"ours": [], "native": [], "kafka_engine": []}
    for n in range(1, args.rounds + 1):
        if args.rounds > 1:
            log(f"-- round {n} of {args.rounds}")
        if "ours" in phases:
            rounds["ours"].append(phase_ours(stack, args, prefix, events))
        if "native" in phases:
            rounds["native"].append(phase_native(stack, prefix, events, by_topic))
        if "engine" in phases:
            rounds["kafka_engine"].append(phase_engine(stack, args, server, prefix, events))
    out: dict = {}
    for key, cpu in (
        ("ours", "total_cpu_s_per_million"),
        ("native", "cpu_s_per_million"),
        ("kafka_engine", "cpu_s_per_million"),
    ):
        if rounds[key]:
            out[key] = min(rounds[key], key=lambda r: r.get(cpu) or float("inf"))
            out[f"{key}_rounds"] = rounds[key]
    return out


# ----------------------------------------------------------------------------- the Kafka engine


def peer_server(stack: Stack) -> PeerServer:
    """The Kafka engine's own ClickHouse (bench/kafka_engine.py), fresh for every run."""
    data_dir = stack.layout.data("bench-kafka-engine")
    shutil.rmtree(data_dir, ignore_errors=True)
    server = PeerServer(data_dir, RESULTS / "logs" / f"kafka-engine-clickhouse-{uuid.uuid4().hex[:6]}.log")
    server.start()
    log(f"  the Kafka engine's ClickHouse: pid {server.pid}, {server.url}, {data_dir}")
    return server


def fact_changes(produce: dict) -> int:
    return sum(n for kind, n in produce["by_kind"].items() if kind.split(".")[0] in ("impressions", "clicks"))


def fact_rows(produce: dict) -> int:
    """Rows the facts get: one per create and delete, two per update (its before and after)."""
    return sum(
        n * (2 if kind.endswith(".u") else 1)
        for kind, n in produce["by_kind"].items()
        if kind.split(".")[0] in ("impressions", "clicks")
    )


def phase_engine(stack: Stack, args, server: PeerServer, prefix: str, events: int) -> dict:
    from consumer.transform.mapping import load_mapping

    run = uuid.uuid4().hex[:6]
    database = f"benchke_{prefix}_{run}"
    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    log(f"[3b] ClickHouse's Kafka engine: group {prefix}-ke-{run}, database {database} in its own ClickHouse")
    result = run_engine_catchup(
        server,
        database=database,
        group_id=f"{prefix}-ke-{run}",
        mapping=load_mapping(topic_prefix=prefix),
        writer_schemas=writer_schemas(stack, topics),
        bootstrap=stack.kafka,
        registry=stack.registry,
        ends=last_message_ends(stack.kafka, end_offsets(stack.kafka, topics)),
        events=events,
        settings=TUNED_THROUGHPUT,
        timeout=args.timeout,
        progress=log,
    )
    if not args.no_verify:
        from cdc_dev.verify import KPIS, compare

        report = compare(ev.ground_truth_dsn(stack.postgres_dsn, prefix), server.client(database))
        kpi_views = {kpi.view for kpi in KPIS}
        result["verify_ok"] = report.ok
        result["verify_failed"] = report.failed
        result["kpis_exact"] = not [name for name in report.failed if name in kpi_views]
        if not report.ok:
            result["verify_report"] = str(report)[:5000]
        log(
            f"  ground truth: KPIs {'equal Postgres' if result['kpis_exact'] else 'DIFFER'}"
            + (f"; differs in {', '.join(report.failed)}" if report.failed else "")
        )
    return result


def phase_faults(stack: Stack, args, server: PeerServer, prefix: str, produce: dict) -> dict:
    """The same catch-up with a kill -9 in its middle: the Kafka engine's ClickHouse; and ours,
    into the same ClickHouse, its consumer and then that ClickHouse."""
    from consumer.transform.mapping import load_mapping

    topics = [f"{prefix}.public.{t}" for t in ev.TABLES]
    rows = fact_rows(produce)
    run = uuid.uuid4().hex[:6]
    log(f"[6] faults: kill -9 during the catch-up of {produce['events']:,} events ({rows:,} fact rows)")
    engine = run_engine_fault(
        server,
        database=f"benchkefault_{prefix}_{run}",
        group_id=f"{prefix}-kefault-{run}",
        mapping=load_mapping(topic_prefix=prefix),
        writer_schemas=writer_schemas(stack, topics),
        bootstrap=stack.kafka,
        registry=stack.registry,
        ends=last_message_ends(stack.kafka, end_offsets(stack.kafka, topics)),
        fact_changes=fact_changes(produce),
        settings=TUNED_THROUGHPUT,
        kill_at_rows=int(rows * 0.4),
        timeout=args.timeout,
        progress=log,
    )
    group = f"{prefix}-oursfault-{run}"
    ours = run_ours_fault(
        env={
            **stack.env,
            "CDC_TOPIC_PREFIX": prefix,
            "CDC_GROUP_ID": group,
            # As deployed (the pod's name): a restarted member gets its partitions back at once.
            "CDC_GROUP_INSTANCE_ID": f"{group}-0",
            "CDC_DLQ_TOPIC": f"{prefix}.dlq",
            **dict(kv.split("=", 1) for kv in args.consumer_env),
        },
        bootstrap=stack.kafka,
        group_id=group,
        ends=end_offsets(stack.kafka, topics),
        server=server,
        database=f"benchoursfault_{prefix}_{run}",
        fact_changes=fact_changes(produce),
        kill_consumer_at_rows=int(rows * 0.25),
        kill_clickhouse_at_rows=int(rows * 0.55),
        timeout=args.timeout,
        log=RESULTS / "logs" / f"{prefix}-fault-consumer.log",
        progress=log,
    )
    if not args.no_verify:
        from cdc_dev.verify import compare

        for result in (engine, ours):
            report = compare(ev.ground_truth_dsn(stack.postgres_dsn, prefix), server.client(result["database"]))
            result["verify_ok"] = report.ok
            result["verify_failed"] = report.failed
    return {"kafka_engine": engine, "ours": ours}


# ----------------------------------------------------------------------------- phase 4


def phase_floors(stack: Stack, args, prefix: str, events: int) -> dict:
    log("[4] floors: consume only, consume + decode (our decoder), each in a fresh process")
    topics = ",".join(f"{prefix}.public.{t}" for t in ev.TABLES)
    out = {}
    for mode in ("consume", "decode"):
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "floors.py"),
                mode,
                "--bootstrap",
                stack.kafka,
                "--topics",
                topics,
                "--events",
                str(events),
                "--registry",
                stack.registry,
                "--prefix",
                prefix,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=args.timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"floor {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {mode}: {out[mode]['events_per_s']:,.0f} events/s, {out[mode]['cpu_s_per_million']} CPU-s per million")
    return out


# ----------------------------------------------------------------------------- phase 5


def phase_latency(stack: Stack, args, server: PeerServer | None) -> dict:
    from bench.latency import debezium_probe, run_latency

    log("[5] end-to-end latency through the generator, Postgres, Debezium and our consumer")
    logs = RESULTS / "logs"
    probe = None
    if args.rate == "auto":
        probe = debezium_probe(
            dsn=stack.postgres_dsn,
            bootstrap=stack.kafka,
            prefix=DEBEZIUM_PREFIX,
            seconds=args.probe_seconds,
            rate=args.probe_rate,
            seed=args.seed + 1,
            log=logs / "debezium-probe-generator.log",
            progress=log,
        )
        sustained = min(probe["debezium_messages_per_s"], probe["generator_events_per_s"])
        rate = max(100.0, (sustained * args.rate_fraction) // 100 * 100)
        log(f"  offering {rate:,.0f} events/s ({args.rate_fraction:.0%} of what the pipeline upstream sustains)")
    else:
        rate = float(args.rate)
    run = uuid.uuid4().hex[:6]
    database = f"benchlat_{run}"
    group = f"bench-latency-{run}"
    env = {
        **stack.env,
        "CDC_TOPIC_PREFIX": DEBEZIUM_PREFIX,
        "CDC_GROUP_ID": group,
        "CDC_CLICKHOUSE_URL": f"{stack.clickhouse}/{database}",
        "CDC_DLQ_TOPIC": f"bench-latency-{run}.dlq",
        **dict(kv.split("=", 1) for kv in args.consumer_env),
    }
    result = run_latency(
        env=env,
        dsn=stack.postgres_dsn,
        bootstrap=stack.kafka,
        registry=stack.registry,
        clickhouse_url=stack.clickhouse,
        database=database,
        group_id=group,
        prefix=DEBEZIUM_PREFIX,
        rate=rate,
        seconds=args.latency_seconds,
        seed=args.seed + 2,
        clickhouse_pid=stack.clickhouse_pid,
        logs=logs,
        # On the same changes: the adaptive flush against the timed one (before 2026-12-03), and
        # tables inserted side by side against one after another (before 2026-12-04).
        variants={name: settings for name, (settings, _) in LATENCY_VARIANTS.items()},
        progress=log,
    )
    result["debezium_probe"] = probe
    result["database"] = database
    if not args.no_verify:
        from cdc_dev.verify import compare

        report = compare(stack.postgres_dsn, stack.ch(database))
        result["verify_ok"] = report.ok
        if not report.ok:
            result["verify_report"] = str(report)[:5000]
        log(f"  ground truth (the stack's Postgres): {'ClickHouse matches Postgres' if report.ok else 'MISMATCH'}")
    if server is not None:
        from consumer.transform.mapping import load_mapping

        log("[5b] the same, ClickHouse's Kafka engine: its defaults and tuned for latency, side by side")
        topics = [f"{DEBEZIUM_PREFIX}.public.{t}" for t in ev.TABLES]
        result["kafka_engine"] = run_engine_latency(
            server,
            variants={"defaults": ENGINE_DEFAULTS, "tuned": TUNED_LATENCY},
            mapping=load_mapping(topic_prefix=DEBEZIUM_PREFIX),
            writer_schemas=writer_schemas(stack, topics),
            dsn=stack.postgres_dsn,
            bootstrap=stack.kafka,
            registry=stack.registry,
            prefix=DEBEZIUM_PREFIX,
            rate=rate,
            seconds=args.latency_seconds,
            seed=args.seed + 3,
            logs=logs,
            progress=log,
        )
    return result


# ----------------------------------------------------------------------------- results


def headline(results: dict) -> dict:
    ours = results.get("ours", {})
    ours_rounds = results.get("ours_rounds", [])
    native = results.get("native", {})
    floors = results.get("floors", {})
    latency = results.get("latency", {})
    ours_cpu = ours.get("total_cpu_s_per_million")
    native_cpu = native.get("cpu_s_per_million")
    engine = results.get("kafka_engine", {})
    engine_rounds = results.get("kafka_engine_rounds", [])
    engine_cpu = engine.get("cpu_s_per_million")
    engine_latency = latency.get("kafka_engine", {})
    timed = latency.get("variants", {}).get("timed_flush", {})
    sequential = latency.get("variants", {}).get("sequential_inserts", {})
    faults = results.get("faults", {})
    audit = results.get("audit", {})
    return {
        "date": results["date"],
        "events": results.get("produce", {}).get("events"),
        "ours_events_per_s": ours.get("events_per_s"),
        "ours_cpu_s_per_million": ours_cpu,
        "ours_consumer_cpu_s_per_million": ours.get("consumer_cpu_s_per_million"),
        "ours_clickhouse_cpu_s_per_million": ours.get("clickhouse_cpu_s_per_million"),
        "ours_events_per_cpu_s": ours.get("events_per_cpu_s"),
        "ours_peak_rss_mib": ours.get("peak_rss_mib"),
        # Every round's, not only the reported one's.
        "ours_verify_ok": all(r["verify_ok"] for r in ours_rounds) if ours_rounds and "verify_ok" in ours else None,
        "native_cpu_s_per_million": native_cpu,
        "native_events_per_s": native.get("events_per_s"),
        "cpu_ratio_ours_to_native": round(ours_cpu / native_cpu, 2) if ours_cpu and native_cpu else None,
        # The limit: what reading the bytes from Kafka and ClickHouse's native ingest of them cost.
        "cpu_ratio_ours_to_limit": round(ours_cpu / (native_cpu + consume), 2)
        if ours_cpu and native_cpu and (consume := floors.get("consume", {}).get("cpu_s_per_million"))
        else None,
        "ours_rounds_cpu_s_per_million": [r.get("total_cpu_s_per_million") for r in ours_rounds],
        "native_rounds_cpu_s_per_million": [r.get("cpu_s_per_million") for r in results.get("native_rounds", [])],
        "floor_consume_events_per_s": floors.get("consume", {}).get("events_per_s"),
        "floor_consume_cpu_s_per_million": floors.get("consume", {}).get("cpu_s_per_million"),
        "floor_decode_events_per_s": floors.get("decode", {}).get("events_per_s"),
        "floor_decode_cpu_s_per_million": floors.get("decode", {}).get("cpu_s_per_million"),
        "e2e_offered_rate": latency.get("offered_rate"),
        "e2e_p50_s": latency.get("p50_s"),
        "e2e_p99_s": latency.get("p99_s"),
        "e2e_consumer_part_p99_s": latency.get("consumer_p99_s"),
        "e2e_debezium_part_p99_s": latency.get("debezium_p99_s"),
        "e2e_transaction_part_p99_s": latency.get("transaction_p99_s"),
        "e2e_consumer_rss_slope_mib_per_min": latency.get("consumer_memory", {}).get("rss_slope_mib_per_min"),
        "e2e_consumer_rss_slope_second_half_mib_per_min": latency.get("consumer_memory", {}).get(
            "rss_slope_second_half_mib_per_min"
        ),
        "kafka_engine_cpu_s_per_million": engine_cpu,
        "kafka_engine_rounds_cpu_s_per_million": [r.get("cpu_s_per_million") for r in engine_rounds],
        "kafka_engine_events_per_s": engine.get("events_per_s"),
        "cpu_ratio_ours_to_kafka_engine": round(ours_cpu / engine_cpu, 2) if ours_cpu and engine_cpu else None,
        # Every round's; None when not checked.
        "kafka_engine_kpis_exact": all(r["kpis_exact"] for r in engine_rounds)
        if engine_rounds and all("kpis_exact" in r for r in engine_rounds)
        else None,
        "kafka_engine_e2e_p99_s": engine_latency.get("tuned", {}).get("p99_s"),
        "kafka_engine_e2e_p99_defaults_s": engine_latency.get("defaults", {}).get("p99_s"),
        "ours_part_p99_s": latency.get("consumer_p99_s"),
        "ours_timed_flush_part_p99_s": timed.get("consumer_p99_s"),
        "ours_inserts_per_s": latency.get("inserts_per_s"),
        "ours_timed_flush_inserts_per_s": timed.get("inserts_per_s"),
        "ours_consumer_cores_streaming": latency.get("consumer_cpu_cores"),
        "ours_timed_flush_consumer_cores_streaming": timed.get("consumer_cpu_cores"),
        "ours_sequential_inserts_part_p99_s": sequential.get("consumer_p99_s"),
        "kafka_engine_fault_lost": faults.get("kafka_engine", {}).get("lost"),
        "kafka_engine_fault_duplicated": faults.get("kafka_engine", {}).get("duplicated"),
        "ours_fault_lost": faults.get("ours", {}).get("lost"),
        "ours_fault_duplicated": faults.get("ours", {}).get("duplicated"),
        "audit_scan_cpu_s_per_million_rows": audit.get("scan_cpu_s_per_million_rows"),
        "audit_first_cpu_s_per_million_offsets": audit.get("first_audit_cpu_s_per_million_offsets"),
        "audit_first_to_scan": audit.get("first_to_scan"),
        "audit_repeat_clickhouse_cpu_s_per_million_rows": audit.get("repeat_audit_clickhouse_cpu_s_per_million_rows"),
        "audit_repeat_to_scan": audit.get("repeat_to_scan"),
        "audit_ok": audit.get("audit_ok"),
        "audit_gap_to_clean_peak_rss": audit.get("gap_to_clean_peak_rss"),
    }


def table(results: dict, head: dict) -> str:
    """The results as a Markdown table (also what bench/README.md shows)."""
    ours, native, floors, latency, engine, faults = (
        results.get(k, {}) for k in ("ours", "native", "floors", "latency", "kafka_engine", "faults")
    )
    memory = latency.get("consumer_memory", {})

    def f(x, digits=1, suffix=""):
        if x is None:
            return "–"
        return f"{x:,.{digits}f}{suffix}" if isinstance(x, float | int) else str(x)

    def verdict(value, holds) -> str:
        return "not measured" if value is None else "met" if holds(value) else "not met"

    def ratio(a, b):
        return f"{a / b:.2f}×" if a and b else "–"

    consume, decode = floors.get("consume", {}), floors.get("decode", {})
    lines = [
        "| measure | events/s (wall) | CPU-s per million events | events per CPU-second | vs native CPU |",
        "|---|---:|---:|---:|---:|",
        f"| **ours** (consumer + ClickHouse) | {f(ours.get('events_per_s'), 0)} | "
        f"{f(ours.get('total_cpu_s_per_million'), 2)} ({f(ours.get('consumer_cpu_s_per_million'), 2)} + "
        f"{f(ours.get('clickhouse_cpu_s_per_million'), 2)}) | {f(ours.get('events_per_cpu_s'), 0)} | "
        f"{ratio(ours.get('total_cpu_s_per_million'), native.get('cpu_s_per_million'))} |",
        f"| ClickHouse's Kafka engine (its ClickHouse) | {f(engine.get('events_per_s'), 0)} | "
        f"{f(engine.get('cpu_s_per_million'), 2)} | {f(engine.get('events_per_cpu_s'), 0)} | "
        f"{ratio(engine.get('cpu_s_per_million'), native.get('cpu_s_per_million'))} |",
        f"| ClickHouse native AvroConfluent ingest | {f(native.get('events_per_s'), 0)} | "
        f"{f(native.get('cpu_s_per_million'), 2)} | {f(native.get('events_per_cpu_s'), 0)} | 1.00× |",
        f"| floor: consume only (Python) | {f(consume.get('events_per_s'), 0)} | "
        f"{f(consume.get('cpu_s_per_million'), 2)} | {f(consume.get('events_per_cpu_s'), 0)} | "
        f"{ratio(consume.get('cpu_s_per_million'), native.get('cpu_s_per_million'))} |",
        f"| floor: consume + decode (our decoder) | {f(decode.get('events_per_s'), 0)} | "
        f"{f(decode.get('cpu_s_per_million'), 2)} | {f(decode.get('events_per_cpu_s'), 0)} | "
        f"{ratio(decode.get('cpu_s_per_million'), native.get('cpu_s_per_million'))} |",
    ]
    if len(head.get("ours_rounds_cpu_s_per_million") or head.get("native_rounds_cpu_s_per_million") or []) > 1:
        lines.append(
            f"\nCPU-s per million by round (the least of each above): ours {head['ours_rounds_cpu_s_per_million']}, "
            f"native {head['native_rounds_cpu_s_per_million']}"
        )
    if latency:
        hist = latency.get("consumer_histogram", {})
        lines += [
            "",
            "| end to end (Postgres commit → row in ClickHouse) | value |",
            "|---|---:|",
            f"| offered / achieved rate | {f(latency.get('offered_rate'), 0)} / {f(latency.get('achieved_rate'), 0)} events/s |",
            f"| p50 / p90 / p99 / max (polled every {latency.get('poll_interval_s')} s) | "
            f"{f(latency.get('p50_s'), 2)} / {f(latency.get('p90_s'), 2)} / {f(latency.get('p99_s'), 2)} / "
            f"{f(latency.get('max_s'), 2)} s |",
            f"| of which commit → record produced (Debezium) p50 / p99 | {f(latency.get('debezium_p50_s'), 2)} / "
            f"{f(latency.get('debezium_p99_s'), 2)} s |",
            f"| of which record → readable (Connect's exactly-once transactions) p50 / p99 | "
            f"{f(latency.get('transaction_p50_s'), 2)} / {f(latency.get('transaction_p99_s'), 2)} s |",
            f"| of which readable in Kafka → row in ClickHouse (ours) p50 / p99 | {f(latency.get('consumer_p50_s'), 2)} / "
            f"{f(latency.get('consumer_p99_s'), 2)} s |",
            f"| consumer histogram p50 / p99 (commit → insert returned) | {f(hist.get('p50'), 2)} / {f(hist.get('p99'), 2)} s |",
            f"| consumer CPU while streaming | {f(latency.get('consumer_cpu_cores'), 3)} cores |",
            f"| consumer RSS first / last / slope (all; second half) | {f(memory.get('rss_first_mib'))} / "
            f"{f(memory.get('rss_last_mib'))} MiB, {f(memory.get('rss_slope_mib_per_min'), 2)}; "
            f"{f(memory.get('rss_slope_second_half_mib_per_min'), 2)} MiB/min |",
            "| of that RSS: dimension rows kept for TOASTed columns, first / last | "
            + " / ".join(f(m) for m in latency.get("consumer_latest_rows_mib") or [None, None])
            + " MiB |",
        ]
        probe = latency.get("debezium_probe") or {}
        if probe:
            lines.append(
                f"| Debezium sustained (probe) / generator | {f(probe.get('debezium_messages_per_s'), 0)} msg/s / "
                f"{f(probe.get('generator_events_per_s'), 0)} events/s |"
            )
    engine_latency = latency.get("kafka_engine", {})
    variants = latency.get("variants", {})
    if engine_latency or variants:
        lines += [
            "",
            "| at the same offered rate | p50 / p99 end to end | its own part p99 | inserts/s | consumer cores |",
        ]
        lines.append("|---|---:|---:|---:|---:|")
        lines.append(
            f"| ours, as shipped (adaptive flush, tables side by side) | {f(latency.get('p50_s'), 2)} / {f(latency.get('p99_s'), 2)} s | "
            f"{f(latency.get('consumer_p99_s'), 2)} s | {f(latency.get('inserts_per_s'), 1)} | "
            f"{f(latency.get('consumer_cpu_cores'), 3)} |"
        )
        for name, v in variants.items():
            settings, described = LATENCY_VARIANTS.get(name, (v.get("settings", {}), name))
            shown = ", ".join(f"{k}={x}" for k, x in settings.items())
            lines.append(
                f"| ours, {described} ({shown}) | {f(v.get('p50_s'), 2)} / "
                f"{f(v.get('p99_s'), 2)} s | {f(v.get('consumer_p99_s'), 2)} s | "
                f"{f(v.get('inserts_per_s'), 1)} | {f(v.get('consumer_cpu_cores'), 3)} |"
            )
        for label in ("defaults", "tuned"):
            v = engine_latency.get(label)
            if v:
                lines.append(
                    f"| Kafka engine, {label} {v.get('settings') or ''} | {f(v.get('p50_s'), 2)} / "
                    f"{f(v.get('p99_s'), 2)} s | {f(v.get('engine_p99_s'), 2)} s | – | – |"
                )
    if faults:
        lines += ["", "| kill -9 in the middle of the catch-up | fact changes lost | duplicated | ground truth |"]
        lines.append("|---|---:|---:|---|")
        for label, key in (
            ("Kafka engine (its ClickHouse killed)", "kafka_engine"),
            ("ours (consumer, then ClickHouse killed)", "ours"),
        ):
            r = faults.get(key, {})
            lines.append(
                f"| {label} | {f(r.get('lost'), 0)} | {f(r.get('duplicated'), 0)} | "
                f"{ {True: 'holds', False: 'differs: ' + ', '.join(r.get('verify_failed') or []), None: '–'}[r.get('verify_ok')] } |"
            )
    audit = results.get("audit", {})
    if audit:
        lines += [
            "",
            "| `cdc-consumer audit` | CPU-s per million | vs a scan of the fact tables |",
            "|---|---:|---:|",
            f"| baseline: `SELECT sum(id)` over the fact tables (ClickHouse) | "
            f"{f(audit.get('scan_cpu_s_per_million_rows'), 3)} per million rows | 1.00× |",
            f"| first audit, every offset from Kafka (audit + ClickHouse) | "
            f"{f(audit.get('first_audit_cpu_s_per_million_offsets'), 3)} per million offsets | "
            f"{f(audit.get('first_to_scan'), 2)}× |",
            f"| repeated audit, history from the projection (ClickHouse; + {f(audit.get('repeat_audit_cpu_s', [None])[0], 2)}"
            f" CPU-s of its own) | {f(audit.get('repeat_audit_clickhouse_cpu_s_per_million_rows'), 3)} per million rows | "
            f"{f(audit.get('repeat_to_scan'), 2)}× |",
            "",
            f"Peak memory of the audit with every one of {audit.get('gap_audit_unaccounted')} offsets missing "
            f"(each decoded): {f(audit.get('gap_audit_peak_rss_mb'), 1)} MB, "
            f"{f(audit.get('gap_to_clean_peak_rss'), 2)}× a clean first audit's "
            f"{f(audit.get('first_audit_peak_rss_mb'), 1)} MB.",
        ]
    native_cpu, consume_cpu = native.get("cpu_s_per_million"), floors.get("consume", {}).get("cpu_s_per_million")
    limit = native_cpu + consume_cpu if native_cpu and consume_cpu else None
    targets = [
        "",
        "Targets (reported, not asserted):",
        f"- total CPU per million ≤ 2× native: {ratio(ours.get('total_cpu_s_per_million'), native.get('cpu_s_per_million'))}"
        f" → {verdict(head.get('cpu_ratio_ours_to_native'), lambda r: r <= 2)}",
        f"- ≥ 100k events/s per core: {f(ours.get('events_per_cpu_s'), 0)} events per CPU-second → "
        f"{verdict(ours.get('events_per_cpu_s'), lambda e: e >= 100_000)}",
        f"- p99 end to end < 2 s: {f(latency.get('p99_s'), 2)} s → {verdict(latency.get('p99_s'), lambda p: p < 2)}",
        f"- flat memory: {f(memory.get('rss_slope_mib_per_min'), 2)} MiB/min over {f(latency.get('seconds'), 0)} s, "
        f"{f(memory.get('rss_slope_second_half_mib_per_min'), 2)} MiB/min over its second half",
        f"- total CPU per million ≤ 1.0× (native + the consume floor): "
        f"{ratio(ours.get('total_cpu_s_per_million'), limit)} → "
        f"{verdict(head.get('cpu_ratio_ours_to_limit'), lambda r: r <= 1.0)}",
        f"- total CPU per million ≤ 0.5× the Kafka engine's: "
        f"{ratio(ours.get('total_cpu_s_per_million'), engine.get('cpu_s_per_million'))} → "
        f"{verdict(head.get('cpu_ratio_ours_to_kafka_engine'), lambda r: r <= 0.5)}",
        f"- our part of the p99 ≤ 0.3 s: {f(latency.get('consumer_p99_s'), 2)} s → "
        f"{verdict(latency.get('consumer_p99_s'), lambda p: p <= 0.3)}",
        f"- faults: ours 0 lost, 0 duplicated → "
        f"{verdict(head.get('ours_fault_lost'), lambda _x: head.get('ours_fault_lost') == 0 and head.get('ours_fault_duplicated') == 0)}",
        f"- ground truth on the benchmark's data: "
        f"{ {True: 'holds', False: 'FAILED', None: 'not checked'}[head.get('ours_verify_ok')] }",
    ]
    return "\n".join(lines + targets)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000, help="change events to produce (default 2M)")
    parser.add_argument("--rate", default="auto", help="offered rate for the latency phase: events/s or 'auto'")
    parser.add_argument("--latency-seconds", type=float, default=60.0, help="length of the latency phase")
    parser.add_argument(
        "--rate-fraction", type=float, default=0.5, help="with --rate auto: share of the sustained rate"
    )
    parser.add_argument("--probe-seconds", type=float, default=15.0, help="length of the Debezium probe burst")
    parser.add_argument("--probe-rate", type=float, default=20_000.0, help="rate offered in the Debezium probe")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument(
        "--phases",
        default="produce,ours,native,engine,faults,floors,latency,audit",
        help="comma-separated subset of phases to run",
    )
    parser.add_argument("--prefix", default=None, help="reuse topics already produced under this prefix")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of ours and native, each reported by its least CPU"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a consumer may take to catch up")
    parser.add_argument("--no-verify", action="store_true", help="skip the ground-truth comparison")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's databases and Postgres schema")
    parser.add_argument("--label", default="", help="free text stored with the results")
    parser.add_argument(
        "--consumer-env", action="append", default=[], metavar="CDC_X=V", help="extra settings for our consumer"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = set(args.phases.split(","))
    stack = Stack()
    prefix = args.prefix or f"bench{datetime.now(UTC):%m%d%H%M%S}"
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_head(),
        "label": args.label,
        "machine": machine(),
        "prefix": prefix,
        "args": {
            "events": args.events,
            "rate": args.rate,
            "latency_seconds": args.latency_seconds,
            "seed": args.seed,
            "phases": sorted(phases),
            "consumer_env": args.consumer_env,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if "produce" in phases:
        _produced, results["produce"] = phase_produce(stack, args, prefix)
        del _produced
    elif phases & {"ours", "native", "engine", "faults", "floors"}:  # topics of an earlier run
        # The run that produced them, whatever its label.
        earlier = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]
        produced = [r["produce"] for r in earlier if r.get("produce")]
        if not produced:
            raise SystemExit(f"--prefix {prefix}: no bench/results/{prefix}*.json with a produce phase (produce first)")
        results["produce"] = produced[0]
    events = results.get("produce", {}).get("events", 0)
    server = peer_server(stack) if phases & {"engine", "faults", "latency"} else None
    try:
        if phases & {"ours", "native", "engine"}:
            results.update(cpu_rounds(stack, args, phases, prefix, events, results["produce"]["messages"], server))
        if "faults" in phases:
            results["faults"] = phase_faults(stack, args, server, prefix, results["produce"])
        if "floors" in phases:
            results["floors"] = phase_floors(stack, args, prefix, events)
        if "latency" in phases:
            results["latency"] = phase_latency(stack, args, server)
        if "audit" in phases and results.get("ours"):
            results["audit"] = phase_audit(stack, args, prefix, results["ours"])
    except BaseException as failed:
        # What the phases before measured stays: kept with the error, then the error goes on.
        results["error"] = f"{type(failed).__name__}: {failed}"
        (RESULTS / f"{prefix}{'-' + args.label if args.label else ''}-failed.json").write_text(
            json.dumps(results, indent=1, sort_keys=True, default=str) + "\n"
        )
        raise
    finally:
        if server is not None:
            server.stop()
            if not args.keep:
                shutil.rmtree(server.data_dir, ignore_errors=True)
    if not args.keep:
        cleanup(stack, prefix, results, produced_here="produce" in phases)
    results["wall_s"] = round(time.monotonic() - started, 1)
    head = headline(results)
    results["headline"] = head
    results["table"] = table(results, head)
    suffix = f"-{args.label}" if args.label else ""
    out = RESULTS / f"{prefix}{suffix}.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(results["table"])
    print(f"results kept in {out.relative_to(REPO)} ({results['wall_s']:.0f}s in all)")
    print(json.dumps(head, sort_keys=True))
    return 0


def cleanup(stack: Stack, prefix: str, results: dict, produced_here: bool) -> None:
    """Drop what the run created: its ClickHouse databases and, for topics it produced, the
    topics and the ground-truth schema in Postgres (`--keep` keeps all, for `--prefix` reruns)."""
    client = stack.ch()
    latency = results.get("latency", {})
    runs = [
        *results.get("ours_rounds", []),
        *results.get("native_rounds", []),
        latency,
        *latency.get("variants", {}).values(),
    ]
    for database in {run.get("database") for run in runs} - {None}:
        client.command(f"DROP DATABASE IF EXISTS `{database}`")
    if produced_here:
        from confluent_kafka.admin import AdminClient

        ev.drop_ground_truth(stack.postgres_dsn, prefix)
        topics = [f"{prefix}.public.{t}" for t in ev.TABLES] + [f"{prefix}.dlq"]
        admin = AdminClient({"bootstrap.servers": stack.kafka})
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                future.result(60)


if __name__ == "__main__":
    sys.exit(main())
