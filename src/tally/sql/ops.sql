-- ops_latest --
-- The latest attempt of each step and bucket of one rollup in [start, end), skipped attempts
-- left out: a run that skipped because another run held the bucket's lock says nothing about
-- the bucket, so the attempt before it stands.
SELECT DISTINCT ON (step, bucket_start) step, bucket_start, status, started_at, finished_at
FROM analytics.aggregation_runs
WHERE rollup = %(rollup)s AND bucket_start >= %(start)s AND bucket_start < %(end)s AND status <> 'skipped'
ORDER BY step, bucket_start, id DESC;

-- ops_dirty_hours --
-- The change marks of the hours in [start, end), per source table: whether one is still
-- unclaimed (no run has started reading it) and when the last one was claimed. A step that
-- started before that claim did not see the change.
SELECT hour, source, bool_or(claimed_at IS NULL) AS unclaimed, max(claimed_at) AS last_claimed
FROM analytics.dirty_log
WHERE hour >= %(start)s AND hour < %(end)s
GROUP BY hour, source;

-- ops_inputs_refreshed --
-- When the latest success of each hour's period inputs (the hourly steps a day, week or
-- month reads) started and finished.
SELECT bucket_start AS hour, step, max(started_at) AS started, max(finished_at) AS finished
FROM analytics.aggregation_runs
WHERE rollup = 'hourly' AND step = ANY(%(steps)s) AND status = 'succeeded'
  AND bucket_start >= %(start)s AND bucket_start < %(end)s
GROUP BY bucket_start, step;

-- ops_failed_steps --
-- Every step and bucket whose latest attempt (skipped ones left out) failed, optionally only
-- buckets starting at or after `since`. The partial index on status <> 'succeeded' finds the
-- candidates; the bucket index proves none of them has a later attempt.
SELECT f.rollup, f.step, f.bucket_start, f.bucket_end, f.attempt, f.error
FROM analytics.aggregation_runs f
WHERE f.status = 'failed'
  AND (%(since)s::timestamptz IS NULL OR f.bucket_start >= %(since)s::timestamptz)
  AND NOT EXISTS (SELECT 1 FROM analytics.aggregation_runs l
                  WHERE l.rollup = f.rollup AND l.step = f.step AND l.bucket_start = f.bucket_start
                    AND l.id > f.id AND l.status <> 'skipped')
ORDER BY array_position(ARRAY['hourly', 'daily', 'weekly', 'monthly'], f.rollup), f.bucket_start, f.step;

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

-- ops_attempts_since --
-- The latest attempt after a marker of each step and bucket of some rollups in [start, end):
-- what a queued backfill waits for.
SELECT DISTINCT ON (rollup, step, bucket_start) rollup, step, bucket_start, status, rows_written, error
FROM analytics.aggregation_runs
WHERE id > %(marker)s AND rollup = ANY(%(rollups)s) AND bucket_start >= %(start)s AND bucket_start < %(end)s
ORDER BY rollup, step, bucket_start, id DESC;
