-- What `cdc-consumer audit` reads (consumer/ops/audit.py; DESIGN.md, "The audit").
--
-- The audit proves coverage from the rows themselves: every fact row already carries its change's
-- Kafka coordinates and sign, so for each offset the table says how many rows it holds and their
-- sign sum, and an op writes a known (rows, sign) (consumer.transform.fact_rules). No ledger is
-- written beside the inserts: a first design (offset-ledger views inside every insert plus two
-- more projections per fact table) cost ClickHouse 7-12x the ingest CPU (bench/README.md).
--
-- * PROJECTION offset_digests replaces applied_watermarks, so the fact insert builds one
--   aggregate projection as before: per part, topic, partition and bucket of 65,536 offsets, the
--   highest offset (the consumer's applied watermark, consumer.sink.migrate.applied_offsets), the
--   row count, the sign sum and the offset sum. The repeated audit compares these digests with
--   those stored when a bucket was proved, a few rows per part, and re-reads only a bucket that
--   changed (consumer.sink.offset_evidence.BUCKET must equal 65536).
-- * INDEX offset_range: min/max of _offset per granule, so reading one partition's offset range
--   (a new range, a changed bucket, a replay's backfill) skips the parts and granules outside it.
-- * _cdc_audit_checkpoints: per consumer group and partition, the position below which every
--   offset was proved (bucket = 2^64-1), and per bucket below it the digest seen then.

ALTER TABLE fact_impressions ADD PROJECTION IF NOT EXISTS offset_digests
(
    SELECT _topic, _partition, intDiv(_offset, 65536), max(_offset), count(), sum(_sign), sum(_offset)
    GROUP BY _topic, _partition, intDiv(_offset, 65536)
);

ALTER TABLE fact_impressions MATERIALIZE PROJECTION offset_digests SETTINGS mutations_sync = 1;

ALTER TABLE fact_impressions DROP PROJECTION IF EXISTS applied_watermarks;

ALTER TABLE fact_impressions ADD INDEX IF NOT EXISTS offset_range _offset TYPE minmax GRANULARITY 1;

ALTER TABLE fact_impressions MATERIALIZE INDEX offset_range SETTINGS mutations_sync = 1;

ALTER TABLE fact_clicks ADD PROJECTION IF NOT EXISTS offset_digests
(
    SELECT _topic, _partition, intDiv(_offset, 65536), max(_offset), count(), sum(_sign), sum(_offset)
    GROUP BY _topic, _partition, intDiv(_offset, 65536)
);

ALTER TABLE fact_clicks MATERIALIZE PROJECTION offset_digests SETTINGS mutations_sync = 1;

ALTER TABLE fact_clicks DROP PROJECTION IF EXISTS applied_watermarks;

ALTER TABLE fact_clicks ADD INDEX IF NOT EXISTS offset_range _offset TYPE minmax GRANULARITY 1;

ALTER TABLE fact_clicks MATERIALIZE INDEX offset_range SETTINGS mutations_sync = 1;

CREATE TABLE IF NOT EXISTS _cdc_audit_checkpoints
(
    group_id    String,
    _topic      LowCardinality(String),
    _partition  UInt32,
    bucket      UInt64,
    position    UInt64,
    rows        Int64,
    sign        Int64,
    offset_sum  UInt64,
    audited_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(audited_at)
ORDER BY (group_id, _topic, _partition, bucket);
