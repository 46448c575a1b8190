-- credit_consumption_rows --
-- Hours [start, end) of public.execution_logs, aggregated by hour, workspace, user and agent: the
-- rows credit_consumption writes. Parameters: start, end. A read-only query, so PostgreSQL may
-- run it in parallel: the Runner materializes it as pg_temp.credit_consumption_rows
-- (CREATE TEMP TABLE ... AS, which may use a parallel plan; an INSERT ... SELECT may not).
-- Shape (docs/PERFORMANCE.md): one hashed pass over the hour's rows.
SELECT workspace_id, user_id, agent_id, hour,
       sum(credits) AS total_credits,
       max(credits) AS peak_credits_per_execution,
       count(*) AS executions_count,
       count(*) FILTER (WHERE succeeded) AS successful_executions,
       coalesce(sum(credits) FILTER (WHERE succeeded), 0) AS success_credits
FROM (SELECT analytics.tally_key(workspace_id) AS workspace_id,
             analytics.tally_key(user_id) AS user_id,
             analytics.tally_key(agent_id) AS agent_id,
             date_trunc('hour', started_at, 'UTC') AS hour,
             -- case-insensitive in ASCII, whatever the database's locale
             lower(status COLLATE "C") IN ('completed', 'success', 'succeeded') AS succeeded,
             coalesce(credits_used, 0) AS credits
      FROM public.execution_logs
      WHERE started_at >= %(start)s AND started_at < %(end)s
      OFFSET 0) r  -- a fence: lower() runs once per row, not once per FILTER
GROUP BY 1, 2, 3, 4;

-- credit_consumption --
-- pg_temp.credit_consumption_rows -> analytics.credit_consumption_hourly, keyed by hour,
-- workspace, user and agent; per hour: rows, changed, removed. Parameters: start, end. The key is hour-first (migration 0003), so an hour's new
-- keys land together at one place in the index; they are written in the order the read left
-- them (sorting them into key order first cost more than it saved: docs/PERFORMANCE.md #15).
-- On an hour with no rows yet the Runner drops the upsert clause (see Step.statement): a plain
-- insert costs less per row.
WITH metrics AS (SELECT * FROM pg_temp.credit_consumption_rows),
written AS (
    INSERT INTO analytics.credit_consumption_hourly AS t (
        workspace_id, user_id, agent_id, hour, total_credits, avg_credits_per_execution,
        peak_credits_per_execution, executions_count, successful_executions, credits_per_success)
    SELECT workspace_id, user_id, agent_id, hour, total_credits, total_credits / executions_count,
           peak_credits_per_execution, executions_count, successful_executions,
           -- numeric division, never integer division (25 / 2 = 12.5)
           CASE WHEN successful_executions = 0 THEN 0 ELSE success_credits / successful_executions END
    FROM metrics
    -- upsert: begin
    ON CONFLICT (workspace_id, user_id, agent_id, hour) DO UPDATE SET
        total_credits = EXCLUDED.total_credits,
        avg_credits_per_execution = EXCLUDED.avg_credits_per_execution,
        peak_credits_per_execution = EXCLUDED.peak_credits_per_execution,
        executions_count = EXCLUDED.executions_count,
        successful_executions = EXCLUDED.successful_executions,
        credits_per_success = EXCLUDED.credits_per_success,
        updated_at = now()
    WHERE (t.total_credits, t.avg_credits_per_execution, t.peak_credits_per_execution, t.executions_count,
           t.successful_executions, t.credits_per_success)
          IS DISTINCT FROM
          (EXCLUDED.total_credits, EXCLUDED.avg_credits_per_execution, EXCLUDED.peak_credits_per_execution,
           EXCLUDED.executions_count, EXCLUDED.successful_executions, EXCLUDED.credits_per_success)
    -- upsert: end
    RETURNING t.hour
),
removed AS (
    DELETE FROM analytics.credit_consumption_hourly t
    WHERE t.hour >= %(start)s AND t.hour < %(end)s
      AND NOT EXISTS (SELECT 1 FROM metrics m WHERE m.hour = t.hour AND m.workspace_id = t.workspace_id
                                                AND m.user_id = t.user_id AND m.agent_id = t.agent_id)
    RETURNING t.hour
)
SELECT hour, count(*) FILTER (WHERE k = 0) AS rows, count(*) FILTER (WHERE k = 1) AS changed,
       count(*) FILTER (WHERE k = 2) AS removed
FROM (SELECT hour, 0 AS k FROM metrics UNION ALL SELECT hour, 1 FROM written UNION ALL SELECT hour, 2 FROM removed) c
GROUP BY hour;
