-- The offset ledger: what each insert wrote, per Kafka offset, for `cdc-consumer audit`
-- (consumer/ops/audit.py; DESIGN.md, "The audit").
--
-- * One materialized view per target table appends, for every inserted block, one ledger row per
--   offset in it: how many rows the change wrote and the sum of their signs (a dimension row
--   counts +1). The view runs inside the same INSERT as the rows, so the ledger is written with
--   them, deduplicated with them by the insert's token (the window below, as for the aggregate),
--   and never by anything else the consumer does. Appended, never merged: a second insert of an
--   offset is a second ledger row, however the table's parts merge.
-- * What the audit reads from it: each ledger row of an offset is one insert of it, whose
--   (rows, sign) must be its op's (consumer.transform.fact_rules), and the fact table must hold
--   exactly one insert's worth of that offset's rows. A row deleted later (ALTER … DELETE) leaves
--   the table short of a row; a row inserted again adds a second ledger row and a second row.
--   (Fact rows removed and restored by a replay: two ledger rows, one insert's rows: applied once.)
-- * Dimension tables are ReplacingMergeTree: superseded versions merge away, so for them the
--   audit holds the table to "never more rows than the ledger", and the ledger to "each change
--   once". The ledger itself keeps every version's entry.
-- * PROJECTION audit_buckets (here and on the fact tables): per 65,536 offsets of a partition,
--   the count, sign sum and offset sum, so the audit compares the whole history of ledger and
--   facts from a few rows per part (consumer.ops.audit.BUCKET must equal 65536).
-- * PROJECTION by_offset on the fact tables: their rows ordered by Kafka coordinates (4 narrow
--   columns), so the audit and replay read one partition's offset range without a full scan.
-- * The ledger is backfilled once from the rows present when this migration runs (stop the
--   consumers for it, like every migration): dimension versions merged away before then have no
--   entry, and the audit reports their offsets until it is told where to start (README).

CREATE TABLE IF NOT EXISTS _cdc_offset_ledger
(
    _topic      LowCardinality(String),
    _partition  UInt32  CODEC(T64, ZSTD(1)),
    _offset     UInt64  CODEC(Delta, ZSTD(1)),
    rows        UInt32  CODEC(T64, ZSTD(1)),
    sign        Int32   CODEC(T64, ZSTD(1)),
    PROJECTION audit_buckets
    (
        SELECT _topic, _partition, intDiv(_offset, 65536), count(), sum(rows), sum(sign), sum(_offset * rows)
        GROUP BY _topic, _partition, intDiv(_offset, 65536)
    )
)
ENGINE = MergeTree
ORDER BY (_topic, _partition, _offset)
SETTINGS non_replicated_deduplication_window = 1000;

INSERT INTO _cdc_offset_ledger
SELECT _topic, _partition, _offset, toUInt32(count()), toInt32(count())
FROM dim_advertiser
WHERE (_topic, _partition, _offset) NOT IN (SELECT _topic, _partition, _offset FROM _cdc_offset_ledger)
GROUP BY _topic, _partition, _offset;

INSERT INTO _cdc_offset_ledger
SELECT _topic, _partition, _offset, toUInt32(count()), toInt32(count())
FROM dim_campaign
WHERE (_topic, _partition, _offset) NOT IN (SELECT _topic, _partition, _offset FROM _cdc_offset_ledger)
GROUP BY _topic, _partition, _offset;

INSERT INTO _cdc_offset_ledger
SELECT _topic, _partition, _offset, toUInt32(count()), toInt32(sum(_sign))
FROM fact_impressions
WHERE (_topic, _partition, _offset) NOT IN (SELECT _topic, _partition, _offset FROM _cdc_offset_ledger)
GROUP BY _topic, _partition, _offset;

INSERT INTO _cdc_offset_ledger
SELECT _topic, _partition, _offset, toUInt32(count()), toInt32(sum(_sign))
FROM fact_clicks
WHERE (_topic, _partition, _offset) NOT IN (SELECT _topic, _partition, _offset FROM _cdc_offset_ledger)
GROUP BY _topic, _partition, _offset;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_offset_ledger_dim_advertiser TO _cdc_offset_ledger AS
SELECT _topic, _partition, _offset, toUInt32(count()) AS rows, toInt32(count()) AS sign
FROM dim_advertiser
GROUP BY _topic, _partition, _offset;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_offset_ledger_dim_campaign TO _cdc_offset_ledger AS
SELECT _topic, _partition, _offset, toUInt32(count()) AS rows, toInt32(count()) AS sign
FROM dim_campaign
GROUP BY _topic, _partition, _offset;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_offset_ledger_fact_impressions TO _cdc_offset_ledger AS
SELECT _topic, _partition, _offset, toUInt32(count()) AS rows, toInt32(sum(_sign)) AS sign
FROM fact_impressions
GROUP BY _topic, _partition, _offset;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_offset_ledger_fact_clicks TO _cdc_offset_ledger AS
SELECT _topic, _partition, _offset, toUInt32(count()) AS rows, toInt32(sum(_sign)) AS sign
FROM fact_clicks
GROUP BY _topic, _partition, _offset;

ALTER TABLE fact_impressions ADD PROJECTION IF NOT EXISTS audit_buckets
(
    SELECT _topic, _partition, intDiv(_offset, 65536), count(), sum(_sign), sum(_offset)
    GROUP BY _topic, _partition, intDiv(_offset, 65536)
);

ALTER TABLE fact_impressions ADD PROJECTION IF NOT EXISTS by_offset
(
    SELECT _topic, _partition, _offset, _sign
    ORDER BY _topic, _partition, _offset
);

ALTER TABLE fact_impressions MATERIALIZE PROJECTION audit_buckets SETTINGS mutations_sync = 1;

ALTER TABLE fact_impressions MATERIALIZE PROJECTION by_offset SETTINGS mutations_sync = 1;

ALTER TABLE fact_clicks ADD PROJECTION IF NOT EXISTS audit_buckets
(
    SELECT _topic, _partition, intDiv(_offset, 65536), count(), sum(_sign), sum(_offset)
    GROUP BY _topic, _partition, intDiv(_offset, 65536)
);

ALTER TABLE fact_clicks ADD PROJECTION IF NOT EXISTS by_offset
(
    SELECT _topic, _partition, _offset, _sign
    ORDER BY _topic, _partition, _offset
);

ALTER TABLE fact_clicks MATERIALIZE PROJECTION audit_buckets SETTINGS mutations_sync = 1;

ALTER TABLE fact_clicks MATERIALIZE PROJECTION by_offset SETTINGS mutations_sync = 1;

-- Where the audit got to, per consumer group and partition: every offset below `position` was
-- proved, and per bucket below it the digests of the ledger (entries, rows, sign, offset sum) and
-- of the fact table's rows (rows, sign, offset sum; 0 for dimensions) as they were then. A later
-- run reads Kafka only from `position` on and re-checks the older buckets from the projections,
-- proving again, offset by offset, only a bucket whose digests changed.
CREATE TABLE IF NOT EXISTS _cdc_audit_checkpoints
(
    group_id    String,
    _topic      LowCardinality(String),
    _partition  UInt32,
    bucket      UInt64,
    position    UInt64,
    entries     UInt64,
    rows        Int64,
    sign        Int64,
    offset_sum  UInt64,
    table_rows  Int64,
    table_sign  Int64,
    table_offset_sum UInt64,
    audited_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(audited_at)
ORDER BY (group_id, _topic, _partition, bucket);
