-- Retention (tally/retention.py). {table} and {column} are a source table and its time column,
-- from retention.SOURCES, quoted by psycopg.sql.Identifier.

-- retention_source_hours --
-- Every hour before the cutoff that holds source rows, oldest first: a skip scan of the time
-- index (one probe an hour present), never a scan of the rows.
WITH RECURSIVE h(hour) AS (
    (SELECT date_trunc('hour', {column}, 'UTC') FROM {table} WHERE {column} < %(cutoff)s ORDER BY {column} LIMIT 1)
    UNION ALL
    SELECT (SELECT date_trunc('hour', t.{column}, 'UTC') FROM {table} t
            WHERE t.{column} >= h.hour + interval '1 hour' AND t.{column} < %(cutoff)s
            ORDER BY t.{column} LIMIT 1)
    FROM h WHERE h.hour IS NOT NULL
)
SELECT hour FROM h WHERE hour IS NOT NULL;

-- retention_delete_batch --
-- One short batch of an hour's source rows (its own transaction: row locks held for
-- milliseconds, so a platform INSERT never waits on retention).
DELETE FROM {table} t
WHERE t.{column} >= %(start)s AND t.{column} < %(end)s
  AND t.id IN (SELECT s.id FROM {table} s WHERE s.{column} >= %(start)s AND s.{column} < %(end)s LIMIT %(batch)s);

-- retention_hourly_hours --
-- Every hour before the cutoff that holds hourly output rows (skip scans of the hour keys).
WITH RECURSIVE m(hour) AS (
    (SELECT hour FROM analytics.execution_metrics_hourly WHERE hour < %(cutoff)s ORDER BY hour LIMIT 1)
    UNION ALL
    SELECT (SELECT e.hour FROM analytics.execution_metrics_hourly e WHERE e.hour > m.hour AND e.hour < %(cutoff)s
            ORDER BY e.hour LIMIT 1) FROM m WHERE m.hour IS NOT NULL
),
c(hour) AS (
    (SELECT hour FROM analytics.credit_consumption_hourly WHERE hour < %(cutoff)s ORDER BY hour LIMIT 1)
    UNION ALL
    SELECT (SELECT x.hour FROM analytics.credit_consumption_hourly x WHERE x.hour > c.hour AND x.hour < %(cutoff)s
            ORDER BY x.hour LIMIT 1) FROM c WHERE c.hour IS NOT NULL
),
u(hour) AS (
    (SELECT hour FROM analytics.user_activity_hourly WHERE hour < %(cutoff)s ORDER BY hour LIMIT 1)
    UNION ALL
    SELECT (SELECT y.hour FROM analytics.user_activity_hourly y WHERE y.hour > u.hour AND y.hour < %(cutoff)s
            ORDER BY y.hour LIMIT 1) FROM u WHERE u.hour IS NOT NULL
)
SELECT hour FROM m WHERE hour IS NOT NULL
UNION SELECT hour FROM c WHERE hour IS NOT NULL
UNION SELECT hour FROM u WHERE hour IS NOT NULL
ORDER BY 1;

-- retention_ledger_count --
-- Ledger rows older than the cutoff that are not the attempt behind a bucket's current state.
SELECT count(*) FROM analytics.aggregation_runs r
WHERE r.started_at < %(cutoff)s
  AND NOT EXISTS (SELECT 1 FROM analytics.bucket_state s WHERE s.attempt_id = r.id);

-- retention_ledger_delete --
DELETE FROM analytics.aggregation_runs
WHERE id IN (SELECT r.id FROM analytics.aggregation_runs r
             WHERE r.started_at < %(cutoff)s
               AND NOT EXISTS (SELECT 1 FROM analytics.bucket_state s WHERE s.attempt_id = r.id)
             LIMIT %(batch)s);

-- retention_record --
-- Hours purged, for good (a second purge of an hour adds its rows).
INSERT INTO analytics.purged (source, hour, rows)
SELECT %(source)s, h, n FROM unnest(%(hours)s::timestamptz[], %(rows)s::bigint[]) AS x(h, n)
ON CONFLICT (source, hour) DO UPDATE SET rows = analytics.purged.rows + EXCLUDED.rows, purged_at = now();

