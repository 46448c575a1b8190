-- execution_metrics_rows --
-- Hours [start, end) of public.execution_logs, aggregated by hour and workspace: the rows
-- execution_metrics writes (one hour, or a chunk of consecutive hours: the same rows either way).
-- Parameters: start, end (whole hours, half-open), ln_gamma (the sketch's bin width).
-- A read-only query, so PostgreSQL may run it in parallel: the Runner materializes it as
-- pg_temp.execution_metrics_rows (CREATE TEMP TABLE ... AS may use a parallel plan; an
-- INSERT ... SELECT may not).
-- Shape (docs/PERFORMANCE.md): one hashed pass over the hour's rows collects each workspace's
-- counts, credits and valid durations; the percentiles and the sketch are then computed one
-- workspace at a time from its durations (small sorts and hash tables, no global sort).
WITH per_workspace AS (
    SELECT analytics.tally_key(workspace_id) AS workspace_id,  -- NULL -> '' (migration 0004)
           hour,
           count(*) AS total_executions,
           count(*) FILTER (WHERE status IN ('completed', 'success', 'succeeded')) AS successful_executions,
           count(*) FILTER (WHERE status IN ('failed', 'failure', 'error', 'timeout', 'timed_out')) AS failed_executions,
           coalesce(sum(credits_used), 0) AS total_credits,  -- a NULL credits_used counts as 0
           -- valid duration: non-null, finite, >= 0 (NaN sorts above Infinity, so one test covers both)
           array_agg(duration) FILTER (WHERE duration >= 0 AND duration < 'Infinity'::float8) AS runtimes
    FROM (SELECT workspace_id, duration, credits_used, date_trunc('hour', started_at, 'UTC') AS hour,
                 -- case-insensitive in ASCII, whatever the database's locale
                 lower(status COLLATE "C") AS status
          FROM public.execution_logs
          WHERE started_at >= %(start)s AND started_at < %(end)s) r
    -- no OFFSET 0 fence here (credit_consumption has one): lower() then runs once per FILTER,
    -- but the aggregation can be split across parallel workers (a fence keeps it in the leader)
    GROUP BY 1, 2
),
metrics AS (
    SELECT p.workspace_id, p.hour, p.total_executions, p.successful_executions, p.failed_executions, p.total_credits,
           s.avg_runtime, e.pct, coalesce(s.runtime_count, 0) AS runtime_count,
           coalesce(s.runtime_sum, 0) AS runtime_sum,
           coalesce(k.bins, ARRAY[]::int[]) AS bins, coalesce(k.counts, ARRAY[]::bigint[]) AS counts
    FROM per_workspace p
    -- The workspace's valid durations in ascending order, sorted once for the percentiles, the
    -- sum and the mean (one Sort feeds every aggregate below: they share their ORDER BY).
    -- Parallel workers collect the durations in no fixed order, and a float sum depends on the
    -- order of its terms: summed in sorted order, the same rows give the same bits on every run,
    -- so a rerun changes nothing (tests/test_correctness.py).
    LEFT JOIN LATERAL (
        SELECT array_agg(x ORDER BY x) AS xs,
               -- the mean as sum / count: what avg() returns, without avg()'s sum of squares, which
               -- overflows from 1e154 on; a mean that rounds to 0 (denormal durations) is 0, as in
               -- avg(), not an underflow error
               CASE WHEN count(x) = 0 THEN NULL
                    WHEN sum(x ORDER BY x)::numeric / count(x) <= 2.4703282292063e-324 THEN 0::float8
                    ELSE sum(x ORDER BY x) / count(x) END AS avg_runtime,
               count(x) AS runtime_count,
               sum(x ORDER BY x) AS runtime_sum
        FROM (SELECT unnest(p.runtimes) AS x) u
    ) s ON true
    -- percentile_cont(q) over the sorted durations, by PostgreSQL's own arithmetic
    -- (percentile_cont_final_common, float8_lerp): r = q * (n - 1); lo, hi = the floor(r)-th and
    -- ceil(r)-th values; lo + (r - floor(r)) * (hi - lo). A difference too small to scale without
    -- an underflow error (denormal durations) is left to percentile_cont itself.
    LEFT JOIN LATERAL (
        SELECT array_agg(CASE WHEN hi = lo THEN lo
                              WHEN hi - lo >= 1e-290 THEN lo + (r - floor(r)) * (hi - lo)
                              ELSE (SELECT percentile_cont(q) WITHIN GROUP (ORDER BY x)
                                    FROM (SELECT unnest(s.xs) AS x) v) END ORDER BY ord) AS pct
        FROM (SELECT q, ord, r, s.xs[floor(r)::int + 1] AS lo, s.xs[ceil(r)::int + 1] AS hi
              FROM (SELECT q, ord, q * (cardinality(s.xs) - 1)::float8 AS r
                    FROM unnest(ARRAY[0.5, 0.95, 0.99]::float8[]) WITH ORDINALITY AS t(q, ord)) t) c
        WHERE cardinality(s.xs) > 0
    ) e ON true
    -- The mergeable sketch: logarithmic bins ceil(ln(x) / ln(gamma)); exact zeros get their own bin.
    LEFT JOIN LATERAL (
        SELECT array_agg(bin ORDER BY bin) AS bins, array_agg(n ORDER BY bin) AS counts
        FROM (SELECT CASE WHEN x = 0 THEN -2147483648 ELSE ceil(ln(x) / %(ln_gamma)s)::int END AS bin,
                     count(*) AS n
              FROM (SELECT unnest(p.runtimes) AS x) u
              GROUP BY 1) b
    ) k ON true
)
SELECT * FROM metrics;

-- execution_metrics --
-- pg_temp.execution_metrics_rows -> analytics.execution_metrics_hourly, keyed by workspace and
-- hour; the keys of [start, end) no longer in the source are removed. Returns per hour: rows,
-- changed, removed. On hours with no rows yet the executor drops the upsert clause
-- (Step.statement): a plain insert costs less per row than a speculative one.
WITH metrics AS (SELECT * FROM pg_temp.execution_metrics_rows),
written AS (
    INSERT INTO analytics.execution_metrics_hourly AS t (
        workspace_id, hour, total_executions, successful_executions, failed_executions,
        avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits, avg_credits_per_run,
        runtime_count, runtime_sum, runtime_sketch_bins, runtime_sketch_counts)
    SELECT m.workspace_id, m.hour, m.total_executions, m.successful_executions, m.failed_executions,
           m.avg_runtime, m.pct[1], m.pct[2], m.pct[3], m.total_credits, m.total_credits / m.total_executions,
           m.runtime_count, m.runtime_sum, m.bins, m.counts
    FROM metrics m
    -- upsert: begin
    ON CONFLICT (workspace_id, hour) DO UPDATE SET
        total_executions = EXCLUDED.total_executions,
        successful_executions = EXCLUDED.successful_executions,
        failed_executions = EXCLUDED.failed_executions,
        avg_runtime = EXCLUDED.avg_runtime,
        p50_runtime = EXCLUDED.p50_runtime,
        p95_runtime = EXCLUDED.p95_runtime,
        p99_runtime = EXCLUDED.p99_runtime,
        total_credits = EXCLUDED.total_credits,
        avg_credits_per_run = EXCLUDED.avg_credits_per_run,
        runtime_count = EXCLUDED.runtime_count,
        runtime_sum = EXCLUDED.runtime_sum,
        runtime_sketch_bins = EXCLUDED.runtime_sketch_bins,
        runtime_sketch_counts = EXCLUDED.runtime_sketch_counts,
        updated_at = now()
    -- an unchanged row is left alone: updated_at means "the numbers changed"
    WHERE (t.total_executions, t.successful_executions, t.failed_executions, t.avg_runtime, t.p50_runtime,
           t.p95_runtime, t.p99_runtime, t.total_credits, t.avg_credits_per_run, t.runtime_count, t.runtime_sum,
           t.runtime_sketch_bins, t.runtime_sketch_counts)
          IS DISTINCT FROM
          (EXCLUDED.total_executions, EXCLUDED.successful_executions, EXCLUDED.failed_executions, EXCLUDED.avg_runtime,
           EXCLUDED.p50_runtime, EXCLUDED.p95_runtime, EXCLUDED.p99_runtime, EXCLUDED.total_credits,
           EXCLUDED.avg_credits_per_run, EXCLUDED.runtime_count, EXCLUDED.runtime_sum,
           EXCLUDED.runtime_sketch_bins, EXCLUDED.runtime_sketch_counts)
    -- upsert: end
    RETURNING t.hour
),
removed AS (
    -- keys whose source rows are gone
    DELETE FROM analytics.execution_metrics_hourly t
    WHERE t.hour >= %(start)s AND t.hour < %(end)s
      AND NOT EXISTS (SELECT 1 FROM metrics m WHERE m.workspace_id = t.workspace_id AND m.hour = t.hour)
    RETURNING t.hour
)
SELECT hour, count(*) FILTER (WHERE k = 0) AS rows, count(*) FILTER (WHERE k = 1) AS changed,
       count(*) FILTER (WHERE k = 2) AS removed
FROM (SELECT hour, 0 AS k FROM metrics UNION ALL SELECT hour, 1 FROM written UNION ALL SELECT hour, 2 FROM removed) c
GROUP BY hour;
