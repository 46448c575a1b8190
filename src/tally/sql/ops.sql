-- ops_runs --
-- The ledger, newest first: one row per step attempt.
SELECT id, run_id, rollup, step,
       CASE rollup WHEN 'hourly' THEN to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":00Z"')
                   WHEN 'monthly' THEN to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM')
                   ELSE to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') END AS bucket,
       bucket_start, bucket_end, status, rows_written, error, attempt, trigger, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8 AS seconds, worker, task_id
FROM analytics.aggregation_runs
WHERE (NOT %(failed)s OR status = 'failed')
ORDER BY id DESC
LIMIT %(limit)s;

-- ops_ledger_marker --
-- The newest ledger id: attempts after it were made after this moment.
SELECT coalesce(max(id), 0) FROM analytics.aggregation_runs;

-- backfill_unfinished --
-- The latest forced backfill of this command that did not finish: the one to resume.
SELECT id, started_at FROM analytics.backfill_runs
WHERE command = %(command)s AND id = (SELECT max(id) FROM analytics.backfill_runs WHERE command = %(command)s)
  AND finished_at IS NULL;

-- backfill_begin --
INSERT INTO analytics.backfill_runs (command) VALUES (%(command)s) RETURNING id;

-- backfill_finish --
UPDATE analytics.backfill_runs SET finished_at = clock_timestamp() WHERE id = %(id)s;
