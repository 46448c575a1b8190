-- The state of every (rollup, step, bucket): analytics.bucket_state, and its transitions.
-- Called only from tally/state.py, which names every transition and decides dirty and missing.
-- Each statement that concludes an attempt writes its ledger row and its state together.

-- attempts_begin --
-- Attempts begin, under their (step, bucket) locks: a ledger row 'running' for each bucket,
-- and the bucket's state 'running' with it. attempt = 1 + the failures since the latest success.
-- Parameters: run_id, rollup, step, starts, ends (arrays), trigger, backend_pid, worker, task_id.
WITH b AS (
    SELECT * FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[]) AS b(bucket_start, bucket_end)
),
run AS (
    INSERT INTO analytics.aggregation_runs
        (run_id, rollup, step, bucket_start, bucket_end, status, attempt, trigger, backend_pid, worker, task_id)
    SELECT %(run_id)s, %(rollup)s, %(step)s, b.bucket_start, b.bucket_end, 'running', 1 + coalesce(s.failures, 0),
           %(trigger)s, %(backend_pid)s, %(worker)s, %(task_id)s
    FROM b LEFT JOIN analytics.bucket_state s
           ON s.rollup = %(rollup)s AND s.step = %(step)s AND s.bucket_start = b.bucket_start
    ORDER BY b.bucket_start
    RETURNING id, bucket_start, bucket_end, attempt, started_at
),
state AS (
    INSERT INTO analytics.bucket_state AS s (rollup, step, bucket_start, bucket_end, state, attempt_id, attempt,
                                             changed_at)
    SELECT %(rollup)s, %(step)s, bucket_start, bucket_end, 'running', id, attempt, started_at FROM run
    ON CONFLICT (rollup, step, bucket_start) DO UPDATE
    SET state = 'running', attempt_id = EXCLUDED.attempt_id, attempt = EXCLUDED.attempt,
        changed_at = EXCLUDED.changed_at, sealed_at = NULL
)
SELECT id, bucket_start, attempt, started_at FROM run ORDER BY bucket_start;

-- attempts_succeeded --
-- Attempts succeed: run inside the step's own data transaction, so the rows, the ledger and
-- the state commit (or roll back) together. Parameters: ids, rows (arrays).
WITH done AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(rows)s::bigint[]) AS d(id, rows_written)
),
run AS (
    UPDATE analytics.aggregation_runs r
    SET status = 'succeeded', rows_written = d.rows_written, error = NULL, finished_at = clock_timestamp()
    FROM done d
    WHERE r.id = d.id AND r.status = 'running'
    RETURNING r.id, r.rollup, r.step, r.bucket_start, r.started_at, r.finished_at, r.rows_written
)
UPDATE analytics.bucket_state s
SET state = 'ok', failures = 0, ok_started_at = run.started_at, ok_finished_at = run.finished_at,
    rows_written = run.rows_written, error = NULL, sqlstate = NULL, transient = NULL, changed_at = run.finished_at
FROM run
WHERE s.rollup = run.rollup AND s.step = run.step AND s.bucket_start = run.bucket_start AND s.attempt_id = run.id;

-- attempts_done --
-- A chunk of consecutive hours of one step succeeded in one set-based statement (range
-- execution): their ledger rows, succeeded, and their states, ok, written in that statement's
-- own transaction (nothing of the chunk is visible before it commits, nothing stays if it
-- rolls back). Parameters: run_id, rollup, step, starts, ends, rows (arrays), started_at,
-- trigger, backend_pid, worker, task_id.
WITH b AS (
    SELECT * FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[], %(rows)s::bigint[])
        AS b(bucket_start, bucket_end, rows_written)
),
run AS (
    INSERT INTO analytics.aggregation_runs
        (run_id, rollup, step, bucket_start, bucket_end, status, rows_written, attempt, trigger, backend_pid,
         worker, task_id, started_at, finished_at)
    SELECT %(run_id)s, %(rollup)s, %(step)s, b.bucket_start, b.bucket_end, 'succeeded', b.rows_written,
           1 + coalesce(s.failures, 0), %(trigger)s, %(backend_pid)s, %(worker)s, %(task_id)s, %(started_at)s,
           clock_timestamp()
    FROM b LEFT JOIN analytics.bucket_state s
           ON s.rollup = %(rollup)s AND s.step = %(step)s AND s.bucket_start = b.bucket_start
    ORDER BY b.bucket_start
    RETURNING id, bucket_start, bucket_end, attempt, started_at, finished_at, rows_written
),
state AS (
    INSERT INTO analytics.bucket_state AS s (rollup, step, bucket_start, bucket_end, state, attempt_id, attempt,
                                             failures, ok_started_at, ok_finished_at, rows_written, changed_at)
    SELECT %(rollup)s, %(step)s, bucket_start, bucket_end, 'ok', id, attempt, 0, started_at, finished_at,
           rows_written, finished_at
    FROM run
    ON CONFLICT (rollup, step, bucket_start) DO UPDATE
    SET state = 'ok', attempt_id = EXCLUDED.attempt_id, attempt = EXCLUDED.attempt, failures = 0,
        ok_started_at = EXCLUDED.ok_started_at, ok_finished_at = EXCLUDED.ok_finished_at,
        rows_written = EXCLUDED.rows_written, error = NULL, sqlstate = NULL, transient = NULL,
        changed_at = EXCLUDED.changed_at, sealed_at = NULL
)
SELECT id, bucket_start, attempt FROM run ORDER BY bucket_start;

-- attempts_failed --
-- Running attempts fail (their data transaction rolled back): ledger and state in one
-- statement. An attempt whose commit did succeed after all is 'succeeded' and is left alone.
-- Parameters: ids, errors, sqlstates, transients (arrays).
WITH bad AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(sqlstates)s::text[], %(transients)s::boolean[])
        AS f(id, error, sqlstate, transient)
),
run AS (
    UPDATE analytics.aggregation_runs r
    SET status = 'failed', error = f.error, sqlstate = f.sqlstate, transient = f.transient,
        finished_at = clock_timestamp()
    FROM bad f
    WHERE r.id = f.id AND r.status = 'running'
    RETURNING r.id, r.error, r.sqlstate, r.transient, r.finished_at
)
UPDATE analytics.bucket_state s
SET state = 'failed', failures = s.failures + 1, error = run.error, sqlstate = run.sqlstate,
    transient = run.transient, changed_at = run.finished_at
FROM run
WHERE s.attempt_id = run.id AND s.state = 'running';

-- attempt_skipped --
-- Another run held the lock: a ledger row, and no change of state (it says nothing of the bucket).
INSERT INTO analytics.aggregation_runs
    (run_id, rollup, step, bucket_start, bucket_end, status, attempt, trigger, backend_pid, worker, task_id,
     error, finished_at)
SELECT %(run_id)s, %(rollup)s, %(step)s, %(start)s, %(end)s, 'skipped',
       1 + coalesce((SELECT failures FROM analytics.bucket_state
                     WHERE rollup = %(rollup)s AND step = %(step)s AND bucket_start = %(start)s), 0),
       %(trigger)s, %(backend_pid)s, %(worker)s, %(task_id)s, %(error)s, clock_timestamp()
RETURNING id, attempt;

-- attempts_not_run --
-- Attempts that failed before they could start (an atomic rollup's steps after the failing one;
-- a period whose hours could not be aggregated): a failed ledger row each, and the state failed,
-- unless another run is on that bucket right now (its own attempt will decide).
-- Parameters: run_id, rollup, step, starts, ends (arrays), trigger, worker, task_id, error, transient.
WITH b AS (
    SELECT * FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[]) AS b(bucket_start, bucket_end)
),
run AS (
    INSERT INTO analytics.aggregation_runs
        (run_id, rollup, step, bucket_start, bucket_end, status, attempt, trigger, worker, task_id, error,
         transient, finished_at)
    SELECT %(run_id)s, %(rollup)s, %(step)s, b.bucket_start, b.bucket_end, 'failed', 1 + coalesce(s.failures, 0),
           %(trigger)s, %(worker)s, %(task_id)s, %(error)s, %(transient)s, clock_timestamp()
    FROM b LEFT JOIN analytics.bucket_state s
           ON s.rollup = %(rollup)s AND s.step = %(step)s AND s.bucket_start = b.bucket_start
    ORDER BY b.bucket_start
    RETURNING id, bucket_start, bucket_end, attempt, error, transient, finished_at
),
state AS (
    INSERT INTO analytics.bucket_state AS s (rollup, step, bucket_start, bucket_end, state, attempt_id, attempt,
                                             failures, error, transient, changed_at)
    SELECT %(rollup)s, %(step)s, bucket_start, bucket_end, 'failed', id, attempt, 1, error, transient, finished_at
    FROM run
    ON CONFLICT (rollup, step, bucket_start) DO UPDATE
    SET state = 'failed', attempt_id = EXCLUDED.attempt_id, attempt = EXCLUDED.attempt, failures = s.failures + 1,
        error = EXCLUDED.error, sqlstate = NULL, transient = EXCLUDED.transient, changed_at = EXCLUDED.changed_at,
        sealed_at = NULL
    WHERE s.state <> 'running'
)
SELECT id, bucket_start, attempt FROM run ORDER BY bucket_start;

-- attempts_reap --
-- A 'running' attempt whose database session is gone died with its process: it failed, and so
-- did its bucket's state (one statement).
WITH dead AS (
    UPDATE analytics.aggregation_runs r
    SET status = 'failed', finished_at = clock_timestamp(), transient = true,
        error = 'abandoned: the process running this step died before it finished'
    WHERE r.status = 'running'
      -- another role's session shows backend_start NULL (no pg_read_all_stats): a live pid counts as alive
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                      WHERE a.pid = r.backend_pid AND (a.backend_start <= r.started_at OR a.backend_start IS NULL))
    RETURNING r.id, r.error, r.finished_at
),
states AS (
    UPDATE analytics.bucket_state s
    SET state = 'failed', failures = s.failures + 1, error = dead.error, sqlstate = NULL, transient = true,
        changed_at = dead.finished_at
    FROM dead
    WHERE s.attempt_id = dead.id AND s.state = 'running'
)
SELECT id FROM dead;

-- state_of_ranges --
-- Everything the state of some buckets is decided from, in one indexed round trip, for the
-- disjoint ranges [los[i], his[i]):
--   'state'  the stored state of the rollup's steps (and, for a period, of the hourly steps it
--            reads: inputs), of every bucket starting in a range;
--   'mark'   the change marks of every hour in a range, per source table: how many came after
--            the hour could be sealed (ignored), how many before, whether one of those is still
--            unclaimed, and when the last of them was claimed.
-- Parameters: rollup, steps, inputs (hourly steps; empty for hours), los, his (arrays), seal_after.
WITH ranges AS (
    SELECT * FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[]) AS r(lo, hi)
),
stored AS (
    SELECT s.* FROM ranges r
    JOIN analytics.bucket_state s
      ON s.rollup = %(rollup)s AND s.step = ANY(%(steps)s::text[]) AND s.bucket_start >= r.lo AND s.bucket_start < r.hi
    UNION ALL
    SELECT s.* FROM ranges r
    JOIN analytics.bucket_state s
      ON s.rollup = 'hourly' AND s.step = ANY(%(inputs)s::text[]) AND s.bucket_start >= r.lo AND s.bucket_start < r.hi
)
SELECT 'state' AS kind, rollup, step, bucket_start, bucket_end, state, attempt_id, attempt, failures,
       ok_started_at, ok_finished_at, rows_written, error, transient, changed_at, sealed_at, ignored_changes,
       NULL::bigint AS marks, NULL::boolean AS unclaimed, NULL::timestamptz AS last_claimed
FROM stored
UNION ALL
-- a mark made after its hour could be sealed (it ended more than seal_after ago) is a change
-- ignored, whatever the hour's state: counted apart, never making it dirty
SELECT 'mark', NULL, d.source, d.hour, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       count(*) FILTER (WHERE d.marked_at >= d.hour + interval '1 hour' + %(seal_after)s::interval),
       count(*) FILTER (WHERE d.marked_at < d.hour + interval '1 hour' + %(seal_after)s::interval),
       coalesce(bool_or(d.claimed_at IS NULL)
                    FILTER (WHERE d.marked_at < d.hour + interval '1 hour' + %(seal_after)s::interval), false),
       max(d.claimed_at) FILTER (WHERE d.marked_at < d.hour + interval '1 hour' + %(seal_after)s::interval)
FROM ranges r
JOIN analytics.dirty_log d ON d.hour >= r.lo AND d.hour < r.hi
GROUP BY d.hour, d.source;

-- state_starts --
-- The buckets of one rollup whose stored state is one of `states`, optionally only those whose
-- state changed (their latest attempt ended) at or after `since`, oldest first (the partial
-- index holds every state but ok).
SELECT DISTINCT bucket_start, bucket_end
FROM analytics.bucket_state
WHERE rollup = %(rollup)s AND state = ANY(%(states)s::text[])
  AND (%(since)s::timestamptz IS NULL OR changed_at >= %(since)s::timestamptz)
ORDER BY bucket_start;

-- state_changed_after --
-- The stored state of some rollups' buckets in [start, end) whose latest attempt came after a
-- ledger marker: what a queued backfill waits for.
SELECT rollup, step, bucket_start, state, rows_written, error
FROM analytics.bucket_state
WHERE attempt_id > %(marker)s AND rollup = ANY(%(rollups)s) AND bucket_start >= %(start)s AND bucket_start < %(end)s;

-- marks_claim --
-- Claim the change marks of some hours and source tables before their steps read them.
UPDATE analytics.dirty_log SET claimed_at = clock_timestamp()
WHERE hour = ANY(%(hours)s::timestamptz[]) AND source = ANY(%(sources)s::text[]) AND claimed_at IS NULL;

-- marks_claimed --
-- The claimed marks of some hours: tally/state.py decides which of them have been read.
SELECT id, hour, source, claimed_at
FROM analytics.dirty_log
WHERE hour = ANY(%(hours)s::timestamptz[]) AND claimed_at IS NOT NULL;

-- marks_delete --
DELETE FROM analytics.dirty_log WHERE id = ANY(%(ids)s::bigint[]);

-- marks_hours --
-- Every hour with a change mark, and whether one of them is still unclaimed, oldest first.
-- The hours no one can name (timestamps beyond Python's years 1-9998, infinity) stay put.
SELECT hour, bool_or(claimed_at IS NULL) FROM analytics.dirty_log
WHERE hour >= '0001-01-01 00:00+00' AND hour < '9999-01-01 00:00+00'
GROUP BY hour ORDER BY hour;

-- hours_with_executions --
-- Which of some hours hold at least one execution (an index probe each).
SELECT h FROM unnest(%(hours)s::timestamptz[]) AS h
WHERE EXISTS (SELECT 1 FROM public.execution_logs e WHERE e.started_at >= h AND e.started_at < h + interval '1 hour');

-- seal_candidates --
-- Buckets of one rollup whose steps are stored ok and that ended at least seal_after before now:
-- state.py decides which of them are sealed (every step ok, no change before they could be).
SELECT DISTINCT bucket_start, bucket_end FROM analytics.bucket_state
WHERE rollup = %(rollup)s AND state = 'ok' AND bucket_end <= %(now)s::timestamptz - %(seal_after)s::interval
ORDER BY bucket_start;

-- stored_seals --
-- The steps of one bucket stored as sealed (one index lookup).
SELECT step FROM analytics.bucket_state
WHERE rollup = %(rollup)s AND bucket_start = %(start)s AND state = 'sealed';

-- seal --
-- Buckets sealed: every step of them, still ok, becomes sealed (final history).
UPDATE analytics.bucket_state SET state = 'sealed', sealed_at = %(now)s, changed_at = clock_timestamp()
WHERE rollup = %(rollup)s AND bucket_start = ANY(%(starts)s::timestamptz[]) AND state = 'ok';

-- sweep_ignored --
-- The change marks of sealed hours, counted into the ignored changes of the steps reading
-- their source and deleted (one statement).
WITH gone AS (
    DELETE FROM analytics.dirty_log d
    USING (SELECT DISTINCT bucket_start FROM analytics.bucket_state WHERE rollup = 'hourly' AND state = 'sealed') s
    WHERE d.hour = s.bucket_start
    RETURNING d.hour, d.source
),
counted AS (
    SELECT hour, source, count(*) AS n FROM gone GROUP BY hour, source
)
UPDATE analytics.bucket_state b SET ignored_changes = b.ignored_changes + c.n
FROM counted c, unnest(%(sources)s::text[], %(steps)s::text[]) AS r(source, step)
WHERE b.rollup = 'hourly' AND b.bucket_start = c.hour AND r.source = c.source AND b.step = r.step
RETURNING b.step;

-- ignored_total --
-- Changes ignored for sealed buckets: counted ones, and marks of hours that could be sealed.
SELECT ((SELECT coalesce(sum(ignored_changes), 0) FROM analytics.bucket_state WHERE rollup = 'hourly')
        + (SELECT count(*) FROM analytics.dirty_log
           WHERE marked_at >= hour + interval '1 hour' + %(seal_after)s::interval))::bigint;

-- purged_in --
-- The first hour in [start, end) whose source or hourly rows tally's retention purged.
SELECT source, hour FROM analytics.purged WHERE hour >= %(start)s AND hour < %(end)s ORDER BY hour, source LIMIT 1;
