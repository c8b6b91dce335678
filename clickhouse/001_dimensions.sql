-- Dimensions: one row per VERSION of a Postgres row; readers use FINAL (or argMax by _version).
--
-- * ReplacingMergeTree(_version, _is_deleted): the row with the highest _version per id wins,
--   and FINAL hides it when that winning version is a delete (_is_deleted = 1).
-- * _version = (source LSN << 64) | Kafka offset, computed by the consumer: it never ties and
--   never goes backwards for a key, so a replay of old versions can never win.
-- * A delete (REPLICA IDENTITY DEFAULT sends only the key) is written as a row with the key,
--   _is_deleted = 1 and default values elsewhere; FINAL never shows those values.
-- * Deleted rows stay until `OPTIMIZE TABLE ... FINAL CLEANUP`, which needs the table setting
--   allow_experimental_replacing_merge_with_cleanup = 1 (deliberately not enabled here).
-- * _topic/_partition/_offset: the Kafka coordinates of the change; the consumer's applied watermark
--   (max _offset per partition) lives in the same rows, so it can never disagree with the data.
--   Replays above a receded watermark are harmless for dimensions (the versions are idempotent).
-- * non_replicated_deduplication_window: a retried INSERT with the same insert_deduplication_token
--   is dropped (the consumer must insert with async_insert = 0, or async_insert_deduplicate = 1).
--
-- Column-add friendly: source columns first, the bookkeeping columns all start with `_`, nothing
-- reads `SELECT *`, and inserts name their columns. A new Postgres column becomes a later migration
--     ALTER TABLE dim_campaign ADD COLUMN IF NOT EXISTS <name> <type> DEFAULT <the Postgres default>;
-- (the DEFAULT must equal the Postgres one: versions written before the ALTER read it).

CREATE TABLE IF NOT EXISTS dim_advertiser
(
    id          Int64                  CODEC(Delta, ZSTD(1)),
    name        String                 CODEC(ZSTD(1)),
    created_at  DateTime64(6, 'UTC')   CODEC(Delta, ZSTD(1)),
    updated_at  DateTime64(6, 'UTC')   CODEC(Delta, ZSTD(1)),
    _version    UInt128                CODEC(ZSTD(1)),
    _is_deleted UInt8       DEFAULT 0  CODEC(ZSTD(1)),
    _topic      LowCardinality(String),
    _partition  UInt32                 CODEC(T64, ZSTD(1)),
    _offset     UInt64                 CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS dim_campaign
(
    id            Int64                  CODEC(Delta, ZSTD(1)),
    advertiser_id Int64                  CODEC(ZSTD(1)),
    name          String                 CODEC(ZSTD(1)),
    bid_amount    Decimal(12, 4)         CODEC(ZSTD(1)),
    budget        Decimal(14, 2)         CODEC(ZSTD(1)),
    status        LowCardinality(String),
    creative      String                 CODEC(ZSTD(3)),
    created_at    DateTime64(6, 'UTC')   CODEC(Delta, ZSTD(1)),
    updated_at    DateTime64(6, 'UTC')   CODEC(Delta, ZSTD(1)),
    _version      UInt128                CODEC(ZSTD(1)),
    _is_deleted   UInt8       DEFAULT 0  CODEC(ZSTD(1)),
    _topic        LowCardinality(String),
    _partition    UInt32                 CODEC(T64, ZSTD(1)),
    _offset       UInt64                 CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;
