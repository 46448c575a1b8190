-- period_metrics --
-- A day, ISO week or month -> analytics.execution_metrics_daily|weekly|monthly, keyed by
-- workspace. Reads only hourly rows, never raw executions:
--   sums and counts add up exactly; avg_runtime = sum of runtime sums / sum of runtime counts
--   (a weighted mean, not a mean of means); percentiles come from the merged duration sketches
--   (within the sketch's relative accuracy of the exact percentile_cont); unique users and agents
--   are exact distinct counts over the credit_consumption_hourly keys of the period.
-- Identifiers {table} and {key} come from the fixed step registry.
-- Parameters: start, end, bucket (the date stored in {key}), ln_gamma, ln_half_width.
WITH totals AS (
    SELECT workspace_id,
           sum(total_executions)::bigint AS total_executions,
           sum(successful_executions)::bigint AS successful_executions,
           sum(failed_executions)::bigint AS failed_executions,
           sum(total_credits) AS total_credits,
           sum(runtime_count)::bigint AS runtime_count,
           -- in hour order: a float sum depends on the order of its terms, and the hourly rows'
           -- physical order depends on which worker wrote which hour first
           sum(runtime_sum ORDER BY hour) AS runtime_sum
    FROM analytics.execution_metrics_hourly
    WHERE hour >= %(start)s AND hour < %(end)s
    GROUP BY workspace_id
),
people AS (
    -- one row per distinct (workspace, user) and per distinct (workspace, agent), both in one
    -- hashed pass; the other grouping set's column is NULL there, and count() skips NULLs
    SELECT workspace_id,
           count(user_id) FILTER (WHERE user_id <> '') AS unique_users,
           count(agent_id) FILTER (WHERE agent_id <> '') AS unique_agents
    FROM (SELECT workspace_id, user_id, agent_id FROM analytics.credit_consumption_hourly
          WHERE hour >= %(start)s AND hour < %(end)s
          GROUP BY GROUPING SETS ((workspace_id, user_id), (workspace_id, agent_id))) k
    GROUP BY workspace_id
),
metrics AS (
    SELECT t.workspace_id, t.total_executions, t.successful_executions, t.failed_executions,
           -- a mean that rounds to 0 (denormal durations) is 0, as in C's avg(), not an underflow error
           CASE WHEN t.runtime_count = 0 THEN NULL
                WHEN t.runtime_sum::numeric / t.runtime_count <= 2.4703282292063e-324 THEN 0::float8
                ELSE t.runtime_sum / t.runtime_count END AS avg_runtime,
           -- percentile_cont's interpolation lo + (hi - lo) * (rank - floor(rank)). A product of at most
           -- half the smallest double (2^-1075: denormal durations) is 0 in C but an underflow error in
           -- SQL, so it is tested first in numeric (which has no underflow; 15 digits, hence the margin).
           CASE WHEN (q.hi1_value - q.lo1_value)::numeric * (r.rank1 - r.lo1)::numeric <= 2.4703282292063e-324
                THEN q.lo1_value ELSE q.lo1_value + (q.hi1_value - q.lo1_value) * (r.rank1 - r.lo1) END AS p50,
           CASE WHEN (q.hi2_value - q.lo2_value)::numeric * (r.rank2 - r.lo2)::numeric <= 2.4703282292063e-324
                THEN q.lo2_value ELSE q.lo2_value + (q.hi2_value - q.lo2_value) * (r.rank2 - r.lo2) END AS p95,
           CASE WHEN (q.hi3_value - q.lo3_value)::numeric * (r.rank3 - r.lo3)::numeric <= 2.4703282292063e-324
                THEN q.lo3_value ELSE q.lo3_value + (q.hi3_value - q.lo3_value) * (r.rank3 - r.lo3) END AS p99,
           t.total_credits, t.total_credits / t.total_executions AS avg_credits_per_run,
           coalesce(p.unique_users, 0) AS unique_users, coalesce(p.unique_agents, 0) AS unique_agents,
           100.0::float8 * t.successful_executions / t.total_executions AS health_score
    FROM totals t
    CROSS JOIN LATERAL (
        -- percentile_cont: rank q*(n-1), interpolating between its floor (lo) and ceiling (hi)
        SELECT rank1, floor(rank1) AS lo1, ceil(rank1) AS hi1,
               rank2, floor(rank2) AS lo2, ceil(rank2) AS hi2,
               rank3, floor(rank3) AS lo3, ceil(rank3) AS hi3
        FROM (SELECT 0.5::float8 * (t.runtime_count - 1) AS rank1, 0.95::float8 * (t.runtime_count - 1) AS rank2,
                     0.99::float8 * (t.runtime_count - 1) AS rank3) ranks
    ) r
    LEFT JOIN LATERAL (
        -- One workspace at a time (its hourly rows through the primary key): merge its sketches,
        -- accumulate the counts in bin order, and keep the value of the bin holding each rank.
        -- Small per-workspace sorts cost a fraction of one global (workspace, bin) merge.
        SELECT max(c.value) FILTER (WHERE r.lo1 >= c.below AND r.lo1 < c.upto) AS lo1_value,
               max(c.value) FILTER (WHERE r.hi1 >= c.below AND r.hi1 < c.upto) AS hi1_value,
               max(c.value) FILTER (WHERE r.lo2 >= c.below AND r.lo2 < c.upto) AS lo2_value,
               max(c.value) FILTER (WHERE r.hi2 >= c.below AND r.hi2 < c.upto) AS hi2_value,
               max(c.value) FILTER (WHERE r.lo3 >= c.below AND r.lo3 < c.upto) AS lo3_value,
               max(c.value) FILTER (WHERE r.hi3 >= c.below AND r.hi3 < c.upto) AS hi3_value
        FROM (
            -- bin b holds the order statistics [below, upto); its value is the bin's log-midpoint.
            -- Counts as float8: exact below 2^53, and compared with the float8 ranks without casts.
            SELECT sum(m.n) OVER w - m.n AS below, sum(m.n) OVER w AS upto,
                   CASE WHEN m.bin = -2147483648 THEN 0::float8
                        ELSE exp(least(m.bin * %(ln_gamma)s + %(ln_half_width)s, 709.78)) END AS value
            FROM (
                -- unnest in the select list walks the two arrays in step
                SELECT u.bin, sum(u.n::float8) AS n
                FROM (SELECT unnest(h.runtime_sketch_bins) AS bin, unnest(h.runtime_sketch_counts) AS n
                      FROM analytics.execution_metrics_hourly h
                      WHERE h.workspace_id = t.workspace_id AND h.hour >= %(start)s AND h.hour < %(end)s) u
                GROUP BY u.bin
            ) m
            WINDOW w AS (ORDER BY m.bin)
        ) c
    ) q ON t.runtime_count > 0
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
