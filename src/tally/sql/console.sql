-- The operator console (tally serve) and its Prometheus metrics: read-only queries over the
-- stored state, the ledger, the change log and the output tables. Every one of them is allowed
-- to the read-only dashboard role (`tally db roles`). The state of a bucket is still decided in
-- tally/state.py: these queries only find candidates for it, and count the ledger.

-- console_ok_candidates --
-- The newest buckets of one step that started before `before`, ended by `now` and whose stored
-- state is ok or sealed, newest first: tally/state.py decides which of them are still ok (not
-- dirty), for freshness. The primary key (rollup, step, bucket_start) is read backwards.
SELECT bucket_start, bucket_end
FROM analytics.bucket_state
WHERE rollup = %(rollup)s AND step = %(step)s AND state IN ('ok', 'sealed') AND bucket_end <= %(now)s
  AND bucket_start < %(before)s
ORDER BY bucket_start DESC
LIMIT %(limit)s OFFSET %(offset)s;

-- console_last_attempts --
-- For each (rollup, step): its newest concluded attempt (succeeded or failed) and its newest
-- success, from the ledger (newest ids first: the most recent rows hold every busy step).
SELECT s.rollup, s.step,
       a.status, a.started_at, a.finished_at, extract(epoch FROM a.finished_at - a.started_at)::float8,
       a.rows_written, a.bucket_start,
       ok.finished_at, extract(epoch FROM ok.finished_at - ok.started_at)::float8, ok.rows_written, ok.bucket_start
FROM unnest(%(rollups)s::text[], %(steps)s::text[]) AS s(rollup, step)
LEFT JOIN LATERAL (SELECT r.status, r.started_at, r.finished_at, r.rows_written, r.bucket_start
                   FROM analytics.aggregation_runs r
                   WHERE r.rollup = s.rollup AND r.step = s.step AND r.status IN ('succeeded', 'failed')
                   ORDER BY r.id DESC LIMIT 1) a ON true
LEFT JOIN LATERAL (SELECT r.started_at, r.finished_at, r.rows_written, r.bucket_start
                   FROM analytics.aggregation_runs r
                   WHERE r.rollup = s.rollup AND r.step = s.step AND r.status = 'succeeded'
                   ORDER BY r.id DESC LIMIT 1) ok ON true;

-- console_recent_attempts --
-- The ledger since `since`, per (rollup, step, status): attempts, rows written, seconds spent.
SELECT rollup, step, status, count(*), coalesce(sum(rows_written), 0)::bigint,
       coalesce(sum(extract(epoch FROM finished_at - started_at)), 0)::float8
FROM analytics.aggregation_runs
WHERE started_at >= %(since)s
GROUP BY rollup, step, status;

-- console_dirty_backlog --
-- The change marks not yet read, per source table: how many, how many no run has claimed
-- yet, and when the oldest was made.
SELECT source, count(*), count(*) FILTER (WHERE claimed_at IS NULL), min(marked_at)
FROM analytics.dirty_log
GROUP BY source
ORDER BY source;

-- console_sealed --
-- Sealed buckets per (rollup, step), and the source row changes ignored because of it
-- (the data lifecycle counts them into bucket_state.ignored_changes). The partial index
-- bucket_state_open_idx holds every state but ok.
SELECT rollup, step, count(*), coalesce(sum(ignored_changes), 0)::bigint
FROM analytics.bucket_state
WHERE state = 'sealed'
GROUP BY rollup, step;

-- console_bucket_attempts --
-- Every ledger row of one bucket, newest first (index aggregation_runs_bucket_idx).
SELECT id, run_id, step, status, attempt, trigger, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8 AS seconds, rows_written, error, sqlstate, transient,
       worker, task_id
FROM analytics.aggregation_runs
WHERE rollup = %(rollup)s AND step = ANY(%(steps)s::text[]) AND bucket_start = %(start)s
ORDER BY id DESC
LIMIT %(limit)s;

-- console_bucket_marks --
-- The change marks of the hours in [start, end), per hour and source table.
SELECT hour, source, count(*), count(*) FILTER (WHERE claimed_at IS NULL), min(marked_at), max(marked_at),
       max(claimed_at)
FROM analytics.dirty_log
WHERE hour >= %(start)s AND hour < %(end)s
GROUP BY hour, source
ORDER BY hour, source;

-- console_runs --
-- The ledger, newest first, filtered (every filter optional: NULL means any) and paginated:
-- rollup, step, status, trigger; buckets overlapping [start, end); attempts started at or
-- after `since`; `failing`: only the latest attempt of each (step, bucket) whose state is failed. tally/ledger.py checks the values; they only ever travel as parameters.
SELECT id, run_id, rollup, step,
       CASE rollup WHEN 'hourly' THEN to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":00Z"')
                   WHEN 'monthly' THEN to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM')
                   ELSE to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') END AS bucket,
       bucket_start, bucket_end, status, rows_written, error, attempt, trigger, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8 AS seconds, worker, task_id, sqlstate, transient
FROM analytics.aggregation_runs
WHERE (%(rollup)s::text IS NULL OR rollup = %(rollup)s::text)
  AND (%(step)s::text IS NULL OR step = %(step)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(trigger)s::text IS NULL OR trigger = %(trigger)s::text)
  AND (%(start)s::timestamptz IS NULL OR bucket_end > %(start)s::timestamptz)
  AND (%(end)s::timestamptz IS NULL OR bucket_start < %(end)s::timestamptz)
  AND (%(since)s::timestamptz IS NULL OR started_at >= %(since)s::timestamptz)
  AND (NOT %(failing)s OR id IN (SELECT attempt_id FROM analytics.bucket_state WHERE state = 'failed'))
ORDER BY id DESC
LIMIT %(limit)s OFFSET %(offset)s;

-- console_output_top --
-- The workspaces with the most executions over [start, end) in the execution-metrics table of
-- one grain (hour, day, week, month: the other branches are cut by their one-time filter);
-- their totals. Days, weeks and months are named by their first day (start_day .. end_day).
WITH rows AS (
    SELECT workspace_id, total_executions, failed_executions, total_credits
    FROM analytics.execution_metrics_hourly
    WHERE %(grain)s::text = 'hour' AND hour >= %(start)s AND hour < %(end)s
    UNION ALL
    SELECT workspace_id, total_executions, failed_executions, total_credits
    FROM analytics.execution_metrics_daily
    WHERE %(grain)s::text = 'day' AND date >= %(start_day)s AND date < %(end_day)s
    UNION ALL
    SELECT workspace_id, total_executions, failed_executions, total_credits
    FROM analytics.execution_metrics_weekly
    WHERE %(grain)s::text = 'week' AND week_start >= %(start_day)s AND week_start < %(end_day)s
    UNION ALL
    SELECT workspace_id, total_executions, failed_executions, total_credits
    FROM analytics.execution_metrics_monthly
    WHERE %(grain)s::text = 'month' AND month >= %(start_day)s AND month < %(end_day)s
)
SELECT workspace_id, sum(total_executions)::bigint AS executions, sum(failed_executions)::bigint AS failed,
       sum(total_credits) AS credits
FROM rows
GROUP BY workspace_id
ORDER BY executions DESC, workspace_id
LIMIT %(limit)s;

-- console_output_rows --
-- The rows of some workspaces over [start, end) in the execution-metrics table of one grain,
-- in time order (each bucket as the timestamptz it starts at).
SELECT hour AS t, workspace_id, total_executions, successful_executions, failed_executions,
       avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits
FROM analytics.execution_metrics_hourly
WHERE %(grain)s::text = 'hour' AND hour >= %(start)s AND hour < %(end)s AND workspace_id = ANY(%(workspaces)s::text[])
UNION ALL
SELECT date::timestamp AT TIME ZONE 'UTC', workspace_id, total_executions, successful_executions, failed_executions,
       avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits
FROM analytics.execution_metrics_daily
WHERE %(grain)s::text = 'day' AND date >= %(start_day)s AND date < %(end_day)s
  AND workspace_id = ANY(%(workspaces)s::text[])
UNION ALL
SELECT week_start::timestamp AT TIME ZONE 'UTC', workspace_id, total_executions, successful_executions,
       failed_executions, avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits
FROM analytics.execution_metrics_weekly
WHERE %(grain)s::text = 'week' AND week_start >= %(start_day)s AND week_start < %(end_day)s
  AND workspace_id = ANY(%(workspaces)s::text[])
UNION ALL
SELECT month::timestamp AT TIME ZONE 'UTC', workspace_id, total_executions, successful_executions,
       failed_executions, avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits
FROM analytics.execution_metrics_monthly
WHERE %(grain)s::text = 'month' AND month >= %(start_day)s AND month < %(end_day)s
  AND workspace_id = ANY(%(workspaces)s::text[])
ORDER BY t, workspace_id;
