"""Prometheus metrics of the consumer, named by Prometheus conventions (`cdc_` prefix, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
assigned_partitions = Gauge("cdc_assigned_partitions", "Partitions assigned to this member")
latest_rows_bytes = Gauge(
    "cdc_latest_rows_bytes", "Bytes of the dimension rows kept for unchanged (TOASTed) columns, all partitions"
)
last_insert_timestamp = Gauge("cdc_last_successful_insert_timestamp_seconds", "Unix time of the last insert")
lag_messages = Gauge("cdc_consumer_lag_messages", "High watermark minus committed offset", ["topic", "partition"])
lag_seconds = Gauge(
    "cdc_consumer_lag_seconds",
    "Now minus the Postgres commit time of the oldest change not yet committed (0 when caught up)",
    ["topic", "partition"],
)
