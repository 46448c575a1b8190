-- ledger_start --
-- A step attempt begins. attempt = 1 + the failures since the step's last success for this bucket.
INSERT INTO analytics.aggregation_runs
    (run_id, rollup, step, bucket_start, bucket_end, status, attempt, trigger, backend_pid, worker, task_id)
SELECT %(run_id)s, %(rollup)s, %(step)s, %(start)s, %(end)s, 'running',
       1 + (SELECT count(*) FROM analytics.aggregation_runs r
            WHERE r.rollup = %(rollup)s AND r.step = %(step)s AND r.bucket_start = %(start)s
              AND r.status = 'failed'
              AND r.id > coalesce((SELECT max(s.id) FROM analytics.aggregation_runs s
                                   WHERE s.rollup = %(rollup)s AND s.step = %(step)s
                                     AND s.bucket_start = %(start)s AND s.status = 'succeeded'), 0)),
       %(trigger)s, %(backend_pid)s, %(worker)s, %(task_id)s
RETURNING id, attempt;

-- ledger_finish --
UPDATE analytics.aggregation_runs
SET status = %(status)s, rows_written = %(rows)s, error = %(error)s, finished_at = clock_timestamp()
WHERE id = %(id)s;

-- ledger_latest_for_bucket --
-- The latest attempt of each step of one bucket.
SELECT DISTINCT ON (step) step, status, id, started_at, finished_at
FROM analytics.aggregation_runs
WHERE rollup = %(rollup)s AND bucket_start = %(start)s
ORDER BY step, id DESC;

-- ledger_reap_abandoned --
-- A 'running' attempt whose database session is gone died with its process: it failed.
UPDATE analytics.aggregation_runs r
SET status = 'failed', finished_at = clock_timestamp(),
    error = 'abandoned: the process running this step died before it finished'
WHERE r.status = 'running'
  -- another role's session shows backend_start NULL (no pg_read_all_stats): a live pid counts as alive
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.pid = r.backend_pid AND (a.backend_start <= r.started_at OR a.backend_start IS NULL))
RETURNING r.id;

-- dirty_claim --
-- Claim the change marks of an hour before reading its source rows.
UPDATE analytics.dirty_log SET claimed_at = clock_timestamp()
WHERE hour = %(start)s AND claimed_at IS NULL;

-- dirty_clear --
-- Drop the marks claimed before the latest success of every hourly step began: each of those
-- successes read the changes behind them. A mark claimed later, or never, keeps the hour dirty.
DELETE FROM analytics.dirty_log d
WHERE d.hour = %(start)s AND d.claimed_at IS NOT NULL
  AND d.claimed_at <= (
      SELECT CASE WHEN count(*) = %(nsteps)s AND bool_and(l.status = 'succeeded') THEN min(l.started_at) END
      FROM (SELECT DISTINCT ON (step) step, status, started_at FROM analytics.aggregation_runs
            WHERE rollup = 'hourly' AND bucket_start = %(start)s AND step = ANY(%(steps)s)
            ORDER BY step, id DESC) l);

-- hours_to_prepare --
-- Hours inside a period whose inputs to the period step are not ready: dirty (changed since
-- aggregated), or not aggregated / failed while they have executions or output rows.
-- The hours holding output rows come from one skip scan of each output table's hour-first
-- key (one index probe per hour present): a per-hour EXISTS let PostgreSQL choose a
-- sequential scan of the whole table for every hour never aggregated (docs/PERFORMANCE.md).
WITH RECURSIVE hours AS (
    SELECT h FROM generate_series(%(start)s::timestamptz, %(end)s::timestamptz - interval '1 hour', interval '1 hour') AS h
),
latest AS (
    SELECT DISTINCT ON (step, bucket_start) step, bucket_start, status
    FROM analytics.aggregation_runs
    WHERE rollup = 'hourly' AND bucket_start >= %(start)s AND bucket_start < %(end)s AND step = ANY(%(steps)s)
    ORDER BY step, bucket_start, id DESC
),
ready AS (
    SELECT bucket_start FROM latest GROUP BY bucket_start
    HAVING count(*) FILTER (WHERE status = 'succeeded') = cardinality(%(steps)s::text[])
),
dirty AS (
    SELECT DISTINCT hour FROM analytics.dirty_log WHERE hour >= %(start)s AND hour < %(end)s
),
metrics_hours(h) AS (
    (SELECT hour FROM analytics.execution_metrics_hourly
     WHERE hour >= %(start)s AND hour < %(end)s ORDER BY hour LIMIT 1)
    UNION ALL
    SELECT (SELECT m.hour FROM analytics.execution_metrics_hourly m
            WHERE m.hour > p.h AND m.hour < %(end)s ORDER BY m.hour LIMIT 1)
    FROM metrics_hours p WHERE p.h IS NOT NULL
),
credit_hours(h) AS (
    (SELECT hour FROM analytics.credit_consumption_hourly
     WHERE hour >= %(start)s AND hour < %(end)s ORDER BY hour LIMIT 1)
    UNION ALL
    SELECT (SELECT c.hour FROM analytics.credit_consumption_hourly c
            WHERE c.hour > p.h AND c.hour < %(end)s ORDER BY c.hour LIMIT 1)
    FROM credit_hours p WHERE p.h IS NOT NULL
),
with_output AS (
    SELECT h FROM metrics_hours WHERE h IS NOT NULL
    UNION
    SELECT h FROM credit_hours WHERE h IS NOT NULL
)
SELECT hours.h AS hour, (hours.h IN (SELECT hour FROM dirty)) AS dirty
FROM hours
WHERE hours.h IN (SELECT hour FROM dirty)
   OR (hours.h NOT IN (SELECT bucket_start FROM ready)
       -- an hour never aggregated with no executions has nothing to contribute: not work
       AND (hours.h IN (SELECT h FROM with_output)
            OR EXISTS (SELECT 1 FROM public.execution_logs e
                       WHERE e.started_at >= hours.h AND e.started_at < hours.h + interval '1 hour')))
ORDER BY 1;
