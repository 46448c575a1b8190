-- period_metrics --
-- A day, ISO week or month -> analytics.execution_metrics_daily|weekly|monthly, keyed by
-- workspace. Reads only hourly rows, never raw executions:
--   sums and counts add up exactly; avg_runtime = sum of runtime sums / sum of runtime counts
--   (a weighted mean, not a mean of means); percentiles come from the merged duration sketches
--   (within the sketch's relative accuracy of the exact percentile_cont); unique users and agents
--   are exact distinct counts over the credit_consumption_hourly keys of the period.
-- Identifiers {table} and {key} come from the fixed step registry.
-- Parameters: start, end, bucket (the date stored in {key}), ln_gamma, ln_half_width.
WITH hourly AS (
    SELECT * FROM analytics.execution_metrics_hourly
    WHERE hour >= %(start)s AND hour < %(end)s
),
totals AS (
    SELECT workspace_id,
           sum(total_executions)::bigint AS total_executions,
           sum(successful_executions)::bigint AS successful_executions,
           sum(failed_executions)::bigint AS failed_executions,
           sum(total_credits) AS total_credits,
           sum(runtime_count)::bigint AS runtime_count,
           sum(runtime_sum) AS runtime_sum
    FROM hourly
    GROUP BY workspace_id
),
merged AS (
    SELECT h.workspace_id, u.bin, sum(u.n) AS n
    FROM hourly h CROSS JOIN LATERAL unnest(h.runtime_sketch_bins, h.runtime_sketch_counts) AS u(bin, n)
    GROUP BY 1, 2
),
cumulative AS (
    -- bin b holds the order statistics [below, upto); its value is the bin's log-midpoint
    SELECT workspace_id, sum(n) OVER w - n AS below, sum(n) OVER w AS upto,
           CASE WHEN bin = -2147483648 THEN 0::float8
                ELSE exp(least(bin * %(ln_gamma)s + %(ln_half_width)s, 709.78)) END AS value
    FROM merged
    WINDOW w AS (PARTITION BY workspace_id ORDER BY bin)
),
ranks AS (
    -- percentile_cont: rank q*(n-1), interpolating between its floor and ceiling
    SELECT t.workspace_id, q.i, floor(q.q * (t.runtime_count - 1)) AS lo, ceil(q.q * (t.runtime_count - 1)) AS hi,
           q.q * (t.runtime_count - 1) - floor(q.q * (t.runtime_count - 1)) AS frac
    FROM totals t CROSS JOIN (VALUES (1, 0.5::float8), (2, 0.95::float8), (3, 0.99::float8)) AS q(i, q)
    WHERE t.runtime_count > 0
),
quantiles AS (
    SELECT r.workspace_id,
           max(lo.value + (hi.value - lo.value) * r.frac) FILTER (WHERE r.i = 1) AS p50,
           max(lo.value + (hi.value - lo.value) * r.frac) FILTER (WHERE r.i = 2) AS p95,
           max(lo.value + (hi.value - lo.value) * r.frac) FILTER (WHERE r.i = 3) AS p99
    FROM ranks r
    JOIN cumulative lo ON lo.workspace_id = r.workspace_id AND r.lo >= lo.below AND r.lo < lo.upto
    JOIN cumulative hi ON hi.workspace_id = r.workspace_id AND r.hi >= hi.below AND r.hi < hi.upto
    GROUP BY r.workspace_id
),
people AS (
    SELECT workspace_id,
           count(DISTINCT user_id) FILTER (WHERE user_id <> '') AS unique_users,
           count(DISTINCT agent_id) FILTER (WHERE agent_id <> '') AS unique_agents
    FROM analytics.credit_consumption_hourly
    WHERE hour >= %(start)s AND hour < %(end)s
    GROUP BY workspace_id
),
metrics AS (
    SELECT t.workspace_id, t.total_executions, t.successful_executions, t.failed_executions,
           CASE WHEN t.runtime_count > 0 THEN t.runtime_sum / t.runtime_count END AS avg_runtime,
           q.p50, q.p95, q.p99, t.total_credits, t.total_credits / t.total_executions AS avg_credits_per_run,
           coalesce(p.unique_users, 0) AS unique_users, coalesce(p.unique_agents, 0) AS unique_agents,
           100.0::float8 * t.successful_executions / t.total_executions AS health_score
    FROM totals t
    LEFT JOIN quantiles q USING (workspace_id)
    LEFT JOIN people p USING (workspace_id)
    WHERE t.total_executions > 0
),
written AS (
    INSERT INTO {table} AS t (
        workspace_id, {key}, total_executions, successful_executions, failed_executions,
        avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits, avg_credits_per_run,
        unique_users, unique_agents, health_score)
    SELECT workspace_id, %(bucket)s, total_executions, successful_executions, failed_executions,
           avg_runtime, p50, p95, p99, total_credits, avg_credits_per_run,
           unique_users, unique_agents, health_score
    FROM metrics
    ON CONFLICT (workspace_id, {key}) DO UPDATE SET
        total_executions = EXCLUDED.total_executions,
        successful_executions = EXCLUDED.successful_executions,
        failed_executions = EXCLUDED.failed_executions,
        avg_runtime = EXCLUDED.avg_runtime,
        p50_runtime = EXCLUDED.p50_runtime,
        p95_runtime = EXCLUDED.p95_runtime,
        p99_runtime = EXCLUDED.p99_runtime,
        total_credits = EXCLUDED.total_credits,
        avg_credits_per_run = EXCLUDED.avg_credits_per_run,
        unique_users = EXCLUDED.unique_users,
        unique_agents = EXCLUDED.unique_agents,
        health_score = EXCLUDED.health_score,
        updated_at = now()
    WHERE (t.total_executions, t.successful_executions, t.failed_executions, t.avg_runtime, t.p50_runtime,
           t.p95_runtime, t.p99_runtime, t.total_credits, t.avg_credits_per_run, t.unique_users,
           t.unique_agents, t.health_score)
          IS DISTINCT FROM
          (EXCLUDED.total_executions, EXCLUDED.successful_executions, EXCLUDED.failed_executions,
           EXCLUDED.avg_runtime, EXCLUDED.p50_runtime, EXCLUDED.p95_runtime, EXCLUDED.p99_runtime,
           EXCLUDED.total_credits, EXCLUDED.avg_credits_per_run, EXCLUDED.unique_users,
           EXCLUDED.unique_agents, EXCLUDED.health_score)
    RETURNING 1
),
removed AS (
    DELETE FROM {table} t
    WHERE t.{key} = %(bucket)s AND NOT EXISTS (SELECT 1 FROM metrics m WHERE m.workspace_id = t.workspace_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM metrics) AS rows,
       (SELECT count(*) FROM written) AS changed,
       (SELECT count(*) FROM removed) AS removed;
