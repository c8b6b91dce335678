-- KPI aggregate: additive per (campaign, UTC day) sums of the signed fact rows, maintained by one
-- materialized view per fact table (insert triggers: each INSERT block into a fact table is
-- aggregated and appended here).
--
-- * Every column is a plain sum of _sign-weighted values, so retractions (-1 rows) just subtract,
--   and rows of unmerged parts add up: READERS MUST ALWAYS RE-AGGREGATE (sum ... GROUP BY).
--   SummingMergeTree only shrinks the table in background merges (and drops rows whose sums
--   are all zero, e.g. the traffic of a deleted campaign); it is never needed for correctness.
-- * spend is Decimal(38, 6): exact; sum over impressions.cost and clicks.cost.
-- * non_replicated_deduplication_window on THIS table too: ClickHouse deduplicates the view's
--   block separately (deduplicate_blocks_in_dependent_materialized_views = 1), and without a window
--   here a token-deduplicated retry of a fact insert was still counted twice in the aggregate.
-- * Caveat (measured): the aggregate is written AFTER the fact part is committed, in a separate
--   part. If the view's insert fails (or the server dies in between) the facts, and so the applied
--   watermark, contain the change but the aggregate does not. consumer.verify.compare reports that
--   as the section "agg_campaign_daily vs facts"; rebuilding the aggregate from the facts repairs it.
-- * The views are created without POPULATE: apply the migrations before the consumer starts.

CREATE TABLE IF NOT EXISTS agg_campaign_daily
(
    campaign_id Int64           CODEC(Delta, ZSTD(1)),
    event_date  Date            CODEC(Delta, ZSTD(1)),
    impressions Int64           CODEC(ZSTD(1)),
    clicks      Int64           CODEC(ZSTD(1)),
    spend       Decimal(38, 6)  CODEC(ZSTD(1))
)
ENGINE = SummingMergeTree((impressions, clicks, spend))
PARTITION BY toYYYYMM(event_date)
ORDER BY (campaign_id, event_date)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_agg_campaign_daily_impressions
TO agg_campaign_daily
AS SELECT
    campaign_id,
    toDate(created_at, 'UTC')                   AS event_date,
    sum(toInt64(_sign))                         AS impressions,
    toInt64(0)                                  AS clicks,
    CAST(sum(_sign * cost) AS Decimal(38, 6))   AS spend
FROM fact_impressions
GROUP BY campaign_id, event_date;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_agg_campaign_daily_clicks
TO agg_campaign_daily
AS SELECT
    campaign_id,
    toDate(created_at, 'UTC')                   AS event_date,
    toInt64(0)                                  AS impressions,
    sum(toInt64(_sign))                         AS clicks,
    CAST(sum(_sign * cost) AS Decimal(38, 6))   AS spend
FROM fact_clicks
GROUP BY campaign_id, event_date;
