"""Prometheus metrics of the consumer, named by Prometheus conventions (`cdc_` prefix, base units).

Every metric family of the project is defined here: the consumer's, in the default registry, and
the lag exporter's, in a registry of its own (:func:`exporter_metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

messages_consumed = Counter("cdc_messages_consumed_total", "Kafka messages consumed", ["topic", "partition"])
bytes_consumed = Counter("cdc_bytes_consumed_total", "Bytes of Kafka message values consumed", ["topic", "partition"])
messages_skipped = Counter(
    "cdc_messages_already_applied_total", "Messages skipped because ClickHouse already holds them", ["topic"]
)
rows_inserted = Counter("cdc_rows_inserted_total", "Rows inserted into ClickHouse", ["table"])
batch_rows = Histogram(
    "cdc_batch_rows",
    "Rows per ClickHouse insert",
    ["table"],
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000),
)
insert_seconds = Histogram(
    "cdc_insert_duration_seconds", "ClickHouse insert latency", ["table"], buckets=LATENCY_BUCKETS
)
commit_seconds = Histogram("cdc_commit_duration_seconds", "Kafka offset commit latency", buckets=LATENCY_BUCKETS)
end_to_end_seconds = Histogram(
    "cdc_end_to_end_latency_seconds", "Postgres commit to ClickHouse insert", ["table"], buckets=LATENCY_BUCKETS
)
dead_lettered = Counter("cdc_dlq_messages_total", "Messages sent to the dead-letter topic", ["error_class"])
rebalances = Counter("cdc_rebalances_total", "Partition assignment changes", ["kind"])
insert_retries = Counter("cdc_insert_retries_total", "Failed ClickHouse inserts that will be retried", ["table"])
registry_retries = Counter("cdc_registry_retries_total", "Schema registry lookups that failed and will be retried")
paused_partitions = Gauge("cdc_paused_partitions", "Partitions paused for backpressure")
poison_breaker_open = Gauge(
    "cdc_poison_breaker_open",
    "1 while a topic's poison share is over the breaker's threshold: its poison waits instead of being dead-lettered",
    ["topic"],
)
assigned_partitions = Gauge("cdc_assigned_partitions", "Partitions assigned to this member")
latest_rows_bytes = Gauge(
    "cdc_latest_rows_bytes", "Bytes of the dimension rows kept for unchanged (TOASTed) columns, all partitions"
)
clickhouse_shard_up = Gauge(
    "cdc_clickhouse_shard_up",
    "0 after an insert into this ClickHouse shard failed (its partitions back off), 1 once one succeeds",
    ["shard"],
)
last_insert_timestamp = Gauge("cdc_last_successful_insert_timestamp_seconds", "Unix time of the last insert")
server_fallbacks = Counter(
    "cdc_server_decode_fallbacks_total",
    "Batches ClickHouse refused to decode, applied through the Python path instead",
    ["table"],
)

PARTITION_LABELS = ["topic", "partition"]


def lag_families(registry: CollectorRegistry = REGISTRY) -> tuple[Gauge, Gauge]:
    """The lag gauges (messages, seconds): the consumer reports its own partitions' in the default
    registry, the lag exporter every partition's in its own; both under the same names."""
    messages = Gauge(
        "cdc_consumer_lag_messages", "High watermark minus committed offset", PARTITION_LABELS, registry=registry
    )
    seconds = Gauge(
        "cdc_consumer_lag_seconds",
        "Now minus the Postgres commit time of the oldest change not yet committed (0 when caught up)",
        PARTITION_LABELS,
        registry=registry,
    )
    return messages, seconds


lag_messages, lag_seconds = lag_families()


@dataclass(frozen=True)
class ExporterMetrics:
    """The families of `cdc-consumer lag --serve`."""

    registry: CollectorRegistry
    lag_messages: Gauge
    lag_seconds: Gauge
    committed_offset: Gauge
    high_watermark: Gauge
    group_members: Gauge
    last_update: Gauge


def exporter_metrics() -> ExporterMetrics:
    registry = CollectorRegistry()
    messages, seconds = lag_families(registry)
    return ExporterMetrics(
        registry=registry,
        lag_messages=messages,
        lag_seconds=seconds,
        committed_offset=Gauge(
            "cdc_consumer_committed_offset", "The group's committed offset", PARTITION_LABELS, registry=registry
        ),
        high_watermark=Gauge(
            "cdc_partition_high_watermark", "The partition's high watermark", PARTITION_LABELS, registry=registry
        ),
        group_members=Gauge("cdc_consumer_group_members", "Active members of the consumer group", registry=registry),
        last_update=Gauge(
            "cdc_lag_exporter_last_update_timestamp_seconds", "Unix time of the last refresh", registry=registry
        ),
    )


def initialize_series(mapping) -> None:
    """Label values known in advance get their series at 0 from the start (Prometheus practice):
    `rate()` and alerts then see 0, not "no data", before the first retry or rebalance."""
    for table in mapping.tables:
        for family in (rows_inserted, batch_rows, insert_seconds, insert_retries, end_to_end_seconds):
            family.labels(table.table)
        messages_skipped.labels(table.topic)
        poison_breaker_open.labels(table.topic).set(0)
    for kind in ("assign", "revoke", "lost"):
        rebalances.labels(kind)


@dataclass(frozen=True)
class AuditMetrics:
    """The families of `cdc-consumer audit --serve` (consumer.ops.audit), in a registry of their own."""

    registry: CollectorRegistry
    unaccounted: Gauge
    duplicated: Gauge
    last_success: Gauge
    seconds: Gauge
    failures: Counter


def audit_metrics() -> AuditMetrics:
    registry = CollectorRegistry()
    return AuditMetrics(
        registry=registry,
        unaccounted=Gauge(
            "cdc_audit_unaccounted_offsets",
            "Offsets below the committed position neither applied nor accounted for (gaps, rows gone)",
            PARTITION_LABELS,
            registry=registry,
        ),
        duplicated=Gauge(
            "cdc_audit_duplicated_offsets",
            "Offsets applied more than once, or whose rows are not what their op writes",
            PARTITION_LABELS,
            registry=registry,
        ),
        last_success=Gauge(
            "cdc_audit_last_success_timestamp_seconds", "Unix time of the last completed audit", registry=registry
        ),
        seconds=Gauge("cdc_audit_duration_seconds", "How long the last completed audit took", registry=registry),
        failures=Counter("cdc_audit_failures_total", "Audits that could not complete", registry=registry),
    )
