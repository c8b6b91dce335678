-- Readable KPI views. Names and columns are a contract (tests, verify.py and other tools use them).
--
-- Correct before any merge: dimensions are read with FINAL (the winning version per id; deleted ids
-- hidden, and `_is_deleted = 0` kept explicit), the aggregate is always re-aggregated with GROUP BY,
-- and (campaign, day) / day groups whose sums are all zero are dropped (Postgres has no row there).
--
-- Which rows, when a campaign is deleted:
-- * Per-campaign and per-advertiser views (kpi_campaign_ctr, kpi_cost_efficiency,
--   kpi_advertiser_overview) have one row per LIVE dimension row; a deleted campaign disappears
--   as soon as its delete is applied, and traffic is attributed through the campaign's CURRENT
--   advertiser_id.
-- * Traffic views (kpi_daily_performance, kpi_campaign_daily) are pure fact aggregates and do not
--   join the dimensions: they show every live fact. In Postgres the cascade deletes a campaign's
--   impressions and clicks, whose -1 rows retract that traffic when they arrive; until then (the
--   topics are consumed independently) the traffic stays visible. Not filtering by live campaigns
--   also keeps traffic visible whose campaign row has not arrived yet (the same race the other way).
--
-- Types: counts Int64, spend Decimal(38, 6) (exact), ratios Float64 (computed in Float64, not with
-- Decimal division, which would truncate to the dividend's scale). ctr = 0 without impressions;
-- budget_used / cpm / cpc are NULL when their denominator is 0.

CREATE OR REPLACE VIEW kpi_daily_performance AS
SELECT
    event_date,
    imp                                                 AS impressions,
    clk                                                 AS clicks,
    if(imp = 0, 0., toFloat64(clk) / toFloat64(imp))    AS ctr,
    amt                                                 AS spend
FROM
(
    SELECT
        event_date,
        sum(impressions)    AS imp,
        sum(clicks)         AS clk,
        sum(spend)          AS amt
    FROM agg_campaign_daily
    GROUP BY event_date
)
WHERE imp != 0 OR clk != 0 OR amt != 0;

CREATE OR REPLACE VIEW kpi_campaign_daily AS
SELECT
    campaign_id,
    event_date,
    imp                                                 AS impressions,
    clk                                                 AS clicks,
    if(imp = 0, 0., toFloat64(clk) / toFloat64(imp))    AS ctr,
    amt                                                 AS spend
FROM
(
    SELECT
        campaign_id,
        event_date,
        sum(impressions)    AS imp,
        sum(clicks)         AS clk,
        sum(spend)          AS amt
    FROM agg_campaign_daily
    GROUP BY campaign_id, event_date
)
WHERE imp != 0 OR clk != 0 OR amt != 0;

CREATE OR REPLACE VIEW kpi_campaign_ctr AS
SELECT
    c.id                                                AS campaign_id,
    c.name                                              AS campaign_name,
    a.name                                              AS advertiser_name,
    ifNull(t.imp, 0)                                    AS impressions,
    ifNull(t.clk, 0)                                    AS clicks,
    if(impressions = 0, 0., toFloat64(clicks) / toFloat64(impressions)) AS ctr
FROM
(
    SELECT id, name, advertiser_id FROM dim_campaign FINAL WHERE _is_deleted = 0
) AS c
LEFT JOIN
(
    SELECT id, name FROM dim_advertiser FINAL WHERE _is_deleted = 0
) AS a ON a.id = c.advertiser_id
LEFT JOIN
(
    SELECT campaign_id, sum(impressions) AS imp, sum(clicks) AS clk
    FROM agg_campaign_daily
    GROUP BY campaign_id
) AS t ON t.campaign_id = c.id;

CREATE OR REPLACE VIEW kpi_cost_efficiency AS
SELECT
    c.id                                                AS campaign_id,
    ifNull(t.amt, toDecimal128(0, 6))                   AS spend,
    c.budget                                            AS budget,
    if(c.budget = 0, NULL, toFloat64(spend) / toFloat64(c.budget))     AS budget_used,
    if(ifNull(t.imp, 0) = 0, NULL, 1000. * toFloat64(spend) / toFloat64(t.imp)) AS cpm,
    if(ifNull(t.clk, 0) = 0, NULL, toFloat64(spend) / toFloat64(t.clk))         AS cpc
FROM
(
    SELECT id, budget FROM dim_campaign FINAL WHERE _is_deleted = 0
) AS c
LEFT JOIN
(
    SELECT campaign_id, sum(impressions) AS imp, sum(clicks) AS clk, sum(spend) AS amt
    FROM agg_campaign_daily
    GROUP BY campaign_id
) AS t ON t.campaign_id = c.id;

CREATE OR REPLACE VIEW kpi_advertiser_overview AS
SELECT
    a.id                                                AS advertiser_id,
    a.name                                              AS advertiser_name,
    ifNull(x.n_campaigns, 0)                            AS campaigns,
    ifNull(x.imp, 0)                                    AS impressions,
    ifNull(x.clk, 0)                                    AS clicks,
    if(impressions = 0, 0., toFloat64(clicks) / toFloat64(impressions)) AS ctr,
    ifNull(x.amt, toDecimal128(0, 6))                   AS spend
FROM
(
    SELECT id, name FROM dim_advertiser FINAL WHERE _is_deleted = 0
) AS a
LEFT JOIN
(
    SELECT
        c.advertiser_id             AS advertiser_id,
        toInt64(count())            AS n_campaigns,
        sum(ifNull(t.imp, 0))       AS imp,
        sum(ifNull(t.clk, 0))       AS clk,
        sum(ifNull(t.amt, toDecimal128(0, 6))) AS amt
    FROM
    (
        SELECT id, advertiser_id FROM dim_campaign FINAL WHERE _is_deleted = 0
    ) AS c
    LEFT JOIN
    (
        SELECT campaign_id, sum(impressions) AS imp, sum(clicks) AS clk, sum(spend) AS amt
        FROM agg_campaign_daily
        GROUP BY campaign_id
    ) AS t ON t.campaign_id = c.id
    GROUP BY c.advertiser_id
) AS x ON x.advertiser_id = a.id;
