-- Independent recomputations of every output table from the raw source rows, compared with
-- what is stored. SELECT only, and written apart from the steps' SQL (no hourly rows, no
-- sketches: exact percentile_cont and exact distinct counts straight from the source), so a
-- bug in a step shows up here as drift instead of being repeated.
--
-- Every query returns one row per problem: bucket, key (jsonb), problem ('missing row',
-- 'unexpected row' or 'drift'), col, expected, actual (as text). A cell matches when both
-- sides are NULL, or both are set and |expected - actual| <= tol * max(|expected|, |actual|)
-- (tol 0: exactly equal). Parameters: start, end, float_rel (float columns: means, sums of
-- seconds, health), quotient_rel (numeric quotients), pct_rel (percentiles of a period).

-- verify_execution_hourly --
WITH raw AS (
    SELECT analytics.tally_key(workspace_id) AS workspace_id,
           date_trunc('hour', started_at, 'UTC') AS hour,
           lower(status COLLATE "C") AS status,
           coalesce(credits_used, 0) AS credits,
           CASE WHEN duration IS NOT NULL AND duration >= 0
                     AND duration NOT IN ('Infinity'::float8, 'NaN'::float8) THEN duration END AS seconds
    FROM public.execution_logs
    WHERE started_at >= %(start)s AND started_at < %(end)s
),
expected AS (
    SELECT workspace_id, hour,
           count(*) AS total_executions,
           count(*) FILTER (WHERE status IN ('completed', 'success', 'succeeded')) AS successful_executions,
           count(*) FILTER (WHERE status IN ('failed', 'failure', 'error', 'timeout', 'timed_out')) AS failed_executions,
           avg(seconds) AS avg_runtime,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50_runtime,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS p95_runtime,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds) AS p99_runtime,
           sum(credits) AS total_credits,
           sum(credits) / count(*) AS avg_credits_per_run
    FROM raw
    GROUP BY workspace_id, hour
),
stored AS (
    SELECT * FROM analytics.execution_metrics_hourly WHERE hour >= %(start)s AND hour < %(end)s
)
SELECT e.hour AS bucket, jsonb_build_object('workspace_id', e.workspace_id) AS key, 'missing row' AS problem,
       NULL::text AS col, e.total_executions || ' executions' AS expected, NULL::text AS actual
FROM expected e
WHERE NOT EXISTS (SELECT 1 FROM stored s WHERE s.workspace_id = e.workspace_id AND s.hour = e.hour)
UNION ALL
SELECT s.hour, jsonb_build_object('workspace_id', s.workspace_id), 'unexpected row',
       NULL, NULL, s.total_executions || ' executions'
FROM stored s
WHERE NOT EXISTS (SELECT 1 FROM expected e WHERE e.workspace_id = s.workspace_id AND e.hour = s.hour)
UNION ALL
SELECT e.hour, jsonb_build_object('workspace_id', e.workspace_id), 'drift', c.col, c.e::text, c.a::text
FROM expected e
JOIN stored s ON s.workspace_id = e.workspace_id AND s.hour = e.hour
CROSS JOIN LATERAL (VALUES
    ('total_executions', 0, e.total_executions::numeric, s.total_executions::numeric),
    ('successful_executions', 0, e.successful_executions, s.successful_executions),
    ('failed_executions', 0, e.failed_executions, s.failed_executions),
    ('avg_runtime', %(float_rel)s, e.avg_runtime::numeric, s.avg_runtime::numeric),
    ('p50_runtime', %(float_rel)s, e.p50_runtime::numeric, s.p50_runtime::numeric),
    ('p95_runtime', %(float_rel)s, e.p95_runtime::numeric, s.p95_runtime::numeric),
    ('p99_runtime', %(float_rel)s, e.p99_runtime::numeric, s.p99_runtime::numeric),
    ('total_credits', 0, e.total_credits, s.total_credits),
    ('avg_credits_per_run', %(quotient_rel)s, e.avg_credits_per_run, s.avg_credits_per_run)
) AS c(col, tol, e, a)
WHERE NOT CASE WHEN c.e IS NULL OR c.a IS NULL THEN c.e IS NULL AND c.a IS NULL
               ELSE c.e = c.a OR abs(c.e - c.a) <= c.tol::numeric * greatest(abs(c.e), abs(c.a)) END
ORDER BY 1, 2, 4;

-- verify_user_activity_hourly --
WITH raw AS (
    SELECT analytics.tally_key(workspace_id) AS workspace_id, analytics.tally_key(user_id) AS user_id,
           session_id, event_type, created_at,
           date_trunc('hour', created_at, 'UTC') AS hour
    FROM analytics.user_activity
    WHERE created_at >= %(start)s AND created_at < %(end)s
),
counts AS (
    SELECT workspace_id, user_id, hour,
           count(*) AS total_events,
           count(*) FILTER (WHERE event_type = 'page_view') AS page_views
    FROM raw
    GROUP BY workspace_id, user_id, hour
),
types AS (
    SELECT workspace_id, user_id, hour, jsonb_object_agg(event_type, n) AS event_type_counts
    FROM (SELECT workspace_id, user_id, hour, event_type, count(*) AS n
          FROM raw GROUP BY workspace_id, user_id, hour, event_type) t
    GROUP BY workspace_id, user_id, hour
),
sessions AS (
    -- each session's first-to-last event span inside the hour
    SELECT workspace_id, user_id, hour, count(*) AS sessions, sum(extract(epoch FROM span)) AS active
    FROM (SELECT workspace_id, user_id, hour, session_id, max(created_at) - min(created_at) AS span
          FROM raw WHERE session_id IS NOT NULL
          GROUP BY workspace_id, user_id, hour, session_id) s
    GROUP BY workspace_id, user_id, hour
),
expected AS (
    SELECT c.workspace_id, c.user_id, c.hour, c.total_events, c.page_views,
           coalesce(s.sessions, 0) AS unique_sessions, t.event_type_counts,
           coalesce(s.active, 0) AS active_duration_seconds,
           CASE WHEN s.sessions > 0 THEN s.active / s.sessions ELSE 0 END AS avg_session_duration
    FROM counts c
    JOIN types t USING (workspace_id, user_id, hour)
    LEFT JOIN sessions s USING (workspace_id, user_id, hour)
),
stored AS (
    SELECT * FROM analytics.user_activity_hourly WHERE hour >= %(start)s AND hour < %(end)s
)
SELECT e.hour AS bucket, jsonb_build_object('workspace_id', e.workspace_id, 'user_id', e.user_id) AS key,
       'missing row' AS problem, NULL::text AS col, e.total_events || ' events' AS expected, NULL::text AS actual
FROM expected e
WHERE NOT EXISTS (SELECT 1 FROM stored s
                  WHERE s.workspace_id = e.workspace_id AND s.user_id = e.user_id AND s.hour = e.hour)
UNION ALL
SELECT s.hour, jsonb_build_object('workspace_id', s.workspace_id, 'user_id', s.user_id), 'unexpected row',
       NULL, NULL, s.total_events || ' events'
FROM stored s
WHERE NOT EXISTS (SELECT 1 FROM expected e
                  WHERE e.workspace_id = s.workspace_id AND e.user_id = s.user_id AND e.hour = s.hour)
UNION ALL
SELECT e.hour, jsonb_build_object('workspace_id', e.workspace_id, 'user_id', e.user_id), 'drift', c.col,
       coalesce(c.e::text, c.ej::text), coalesce(c.a::text, c.aj::text)
FROM expected e
JOIN stored s ON s.workspace_id = e.workspace_id AND s.user_id = e.user_id AND s.hour = e.hour
CROSS JOIN LATERAL (VALUES
    ('total_events', 0, e.total_events::numeric, s.total_events::numeric, NULL::jsonb, NULL::jsonb),
    ('page_views', 0, e.page_views, s.page_views, NULL, NULL),
    ('unique_sessions', 0, e.unique_sessions, s.unique_sessions, NULL, NULL),
    ('event_type_counts', 0, NULL, NULL, e.event_type_counts, s.event_type_counts),
    ('active_duration_seconds', %(float_rel)s, e.active_duration_seconds, s.active_duration_seconds::numeric, NULL, NULL),
    ('avg_session_duration', %(float_rel)s, e.avg_session_duration, s.avg_session_duration::numeric, NULL, NULL)
) AS c(col, tol, e, a, ej, aj)
WHERE NOT CASE WHEN c.ej IS NOT NULL OR c.aj IS NOT NULL THEN c.ej IS NOT DISTINCT FROM c.aj
               WHEN c.e IS NULL OR c.a IS NULL THEN c.e IS NULL AND c.a IS NULL
               ELSE c.e = c.a OR abs(c.e - c.a) <= c.tol::numeric * greatest(abs(c.e), abs(c.a)) END
ORDER BY 1, 2, 4;

-- verify_credit_consumption_hourly --
WITH raw AS (
    SELECT analytics.tally_key(workspace_id) AS workspace_id, analytics.tally_key(user_id) AS user_id,
           analytics.tally_key(agent_id) AS agent_id,
           date_trunc('hour', started_at, 'UTC') AS hour,
           lower(status COLLATE "C") IN ('completed', 'success', 'succeeded') AS succeeded,
           coalesce(credits_used, 0) AS credits
    FROM public.execution_logs
    WHERE started_at >= %(start)s AND started_at < %(end)s
),
expected AS (
    SELECT workspace_id, user_id, agent_id, hour,
           sum(credits) AS total_credits,
           sum(credits) / count(*) AS avg_credits_per_execution,
           max(credits) AS peak_credits_per_execution,
           count(*) AS executions_count,
           count(*) FILTER (WHERE succeeded) AS successful_executions,
           CASE WHEN count(*) FILTER (WHERE succeeded) = 0 THEN 0
                ELSE sum(credits) FILTER (WHERE succeeded) / count(*) FILTER (WHERE succeeded) END AS credits_per_success
    FROM raw
    GROUP BY workspace_id, user_id, agent_id, hour
),
stored AS (
    SELECT * FROM analytics.credit_consumption_hourly WHERE hour >= %(start)s AND hour < %(end)s
)
SELECT e.hour AS bucket,
       jsonb_build_object('workspace_id', e.workspace_id, 'user_id', e.user_id, 'agent_id', e.agent_id) AS key,
       'missing row' AS problem, NULL::text AS col, e.executions_count || ' executions' AS expected,
       NULL::text AS actual
FROM expected e
WHERE NOT EXISTS (SELECT 1 FROM stored s
                  WHERE s.workspace_id = e.workspace_id AND s.user_id = e.user_id AND s.agent_id = e.agent_id
                    AND s.hour = e.hour)
UNION ALL
SELECT s.hour, jsonb_build_object('workspace_id', s.workspace_id, 'user_id', s.user_id, 'agent_id', s.agent_id),
       'unexpected row', NULL, NULL, s.executions_count || ' executions'
FROM stored s
WHERE NOT EXISTS (SELECT 1 FROM expected e
                  WHERE e.workspace_id = s.workspace_id AND e.user_id = s.user_id AND e.agent_id = s.agent_id
                    AND e.hour = s.hour)
UNION ALL
SELECT e.hour, jsonb_build_object('workspace_id', e.workspace_id, 'user_id', e.user_id, 'agent_id', e.agent_id),
       'drift', c.col, c.e::text, c.a::text
FROM expected e
JOIN stored s ON s.workspace_id = e.workspace_id AND s.user_id = e.user_id AND s.agent_id = e.agent_id
             AND s.hour = e.hour
CROSS JOIN LATERAL (VALUES
    ('total_credits', 0, e.total_credits, s.total_credits),
    ('avg_credits_per_execution', %(quotient_rel)s, e.avg_credits_per_execution, s.avg_credits_per_execution),
    ('peak_credits_per_execution', 0, e.peak_credits_per_execution, s.peak_credits_per_execution),
    ('executions_count', 0, e.executions_count::numeric, s.executions_count::numeric),
    ('successful_executions', 0, e.successful_executions, s.successful_executions),
    ('credits_per_success', %(quotient_rel)s, e.credits_per_success, s.credits_per_success)
) AS c(col, tol, e, a)
WHERE NOT CASE WHEN c.e IS NULL OR c.a IS NULL THEN c.e IS NULL AND c.a IS NULL
               ELSE c.e = c.a OR abs(c.e - c.a) <= c.tol::numeric * greatest(abs(c.e), abs(c.a)) END
ORDER BY 1, 2, 4;

-- verify_period_metrics --
-- One day, ISO week or month ([start, end), unit 'day' | 'week' | 'month') of
-- analytics.execution_metrics_daily|weekly|monthly, straight from raw executions.
-- {table} and {key} come from the fixed step registry. Extra parameter: bucket (the date in {key}).
WITH raw AS (
    SELECT analytics.tally_key(workspace_id) AS workspace_id, user_id, agent_id,
           lower(status COLLATE "C") AS status,
           coalesce(credits_used, 0) AS credits,
           CASE WHEN duration IS NOT NULL AND duration >= 0
                     AND duration NOT IN ('Infinity'::float8, 'NaN'::float8) THEN duration END AS seconds
    FROM public.execution_logs
    WHERE started_at >= %(start)s AND started_at < %(end)s
),
expected AS (
    SELECT workspace_id,
           count(*) AS total_executions,
           count(*) FILTER (WHERE status IN ('completed', 'success', 'succeeded')) AS successful_executions,
           count(*) FILTER (WHERE status IN ('failed', 'failure', 'error', 'timeout', 'timed_out')) AS failed_executions,
           avg(seconds) AS avg_runtime,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50_runtime,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS p95_runtime,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds) AS p99_runtime,
           sum(credits) AS total_credits,
           sum(credits) / count(*) AS avg_credits_per_run,
           count(DISTINCT user_id) FILTER (WHERE user_id <> '') AS unique_users,
           count(DISTINCT agent_id) FILTER (WHERE agent_id <> '') AS unique_agents,
           100.0::float8 * count(*) FILTER (WHERE status IN ('completed', 'success', 'succeeded')) / count(*)
               AS health_score
    FROM raw
    GROUP BY workspace_id
),
stored AS (
    SELECT * FROM {table} WHERE {key} = %(bucket)s
)
SELECT %(start)s::timestamptz AS bucket, jsonb_build_object('workspace_id', e.workspace_id) AS key,
       'missing row' AS problem, NULL::text AS col, e.total_executions || ' executions' AS expected,
       NULL::text AS actual
FROM expected e
WHERE NOT EXISTS (SELECT 1 FROM stored s WHERE s.workspace_id = e.workspace_id)
UNION ALL
SELECT %(start)s::timestamptz, jsonb_build_object('workspace_id', s.workspace_id), 'unexpected row',
       NULL, NULL, s.total_executions || ' executions'
FROM stored s
WHERE NOT EXISTS (SELECT 1 FROM expected e WHERE e.workspace_id = s.workspace_id)
UNION ALL
SELECT %(start)s::timestamptz, jsonb_build_object('workspace_id', e.workspace_id), 'drift', c.col,
       c.e::text, c.a::text
FROM expected e
JOIN stored s ON s.workspace_id = e.workspace_id
CROSS JOIN LATERAL (VALUES
    ('total_executions', 0, e.total_executions::numeric, s.total_executions::numeric),
    ('successful_executions', 0, e.successful_executions, s.successful_executions),
    ('failed_executions', 0, e.failed_executions, s.failed_executions),
    ('avg_runtime', %(float_rel)s, e.avg_runtime::numeric, s.avg_runtime::numeric),
    ('p50_runtime', %(pct_rel)s, e.p50_runtime::numeric, s.p50_runtime::numeric),
    ('p95_runtime', %(pct_rel)s, e.p95_runtime::numeric, s.p95_runtime::numeric),
    ('p99_runtime', %(pct_rel)s, e.p99_runtime::numeric, s.p99_runtime::numeric),
    ('total_credits', 0, e.total_credits, s.total_credits),
    ('avg_credits_per_run', %(quotient_rel)s, e.avg_credits_per_run, s.avg_credits_per_run),
    ('unique_users', 0, e.unique_users, s.unique_users),
    ('unique_agents', 0, e.unique_agents, s.unique_agents),
    ('health_score', %(float_rel)s, e.health_score::numeric, s.health_score::numeric)
) AS c(col, tol, e, a)
WHERE NOT CASE WHEN c.e IS NULL OR c.a IS NULL THEN c.e IS NULL AND c.a IS NULL
               ELSE c.e = c.a OR abs(c.e - c.a) <= c.tol::numeric * greatest(abs(c.e), abs(c.a)) END
ORDER BY 2, 4;

-- verify_purged --
-- The hours of [start, end) whose source or hourly rows retention purged (analytics.purged).
SELECT source, hour FROM analytics.purged WHERE hour >= %(start)s AND hour < %(end)s;
