-- catchup_hours --
-- The hours a catch-up re-aggregates, oldest first, each with why:
--   dirty    a source row of the hour changed (marks in dirty_log): at any age if the hour, or a day,
--            week or month containing it, was ever aggregated; inside the window otherwise (old data
--            seeded before anything was aggregated is not "late");
--   missing  inside the window [window_start, window_end) and some step never ran;
--   failed   inside the window and the latest attempt of some step did not succeed.
-- full = run every step (dirty or missing); otherwise only the steps that have not succeeded.
-- An hour that another run is aggregating right now ('running') is left to it, unless a change
-- came after that run's claim (an unclaimed mark). A skipped attempt (another run held the lock)
-- is ignored: the attempt before it decides.
-- Parameters: window_start, window_end (on the hour), steps (the hourly steps).
WITH dirty AS (
    SELECT hour, bool_or(claimed_at IS NULL) AS unclaimed
    FROM analytics.dirty_log
    GROUP BY hour
),
candidates AS (
    SELECT h AS hour
    FROM generate_series(%(window_start)s::timestamptz, %(window_end)s::timestamptz - interval '1 hour',
                         interval '1 hour') AS h
    UNION
    SELECT hour FROM dirty
),
state AS (
    -- the latest attempt of every step of every candidate hour (index: rollup, step, bucket_start, id)
    SELECT c.hour,
           count(l.status) AS attempted,
           count(*) FILTER (WHERE l.status = 'succeeded') AS succeeded,
           coalesce(bool_or(l.status = 'running'), false) AS running
    FROM candidates c
    CROSS JOIN unnest(%(steps)s::text[]) AS s(step)
    LEFT JOIN LATERAL (SELECT r.status FROM analytics.aggregation_runs r
                       WHERE r.rollup = 'hourly' AND r.step = s.step AND r.bucket_start = c.hour
                         AND r.status <> 'skipped'
                       ORDER BY r.id DESC LIMIT 1) l ON true
    GROUP BY c.hour
),
periods_ok AS (
    -- periods aggregated at least once: a change to one of their hours is late data, whatever its age
    SELECT DISTINCT rollup, bucket_start FROM analytics.aggregation_runs
    WHERE rollup IN ('daily', 'weekly', 'monthly') AND status = 'succeeded'
),
judged AS (
    SELECT st.hour, st.attempted, st.succeeded, st.running,
           d.hour IS NOT NULL AS dirty, coalesce(d.unclaimed, false) AS unclaimed,
           st.hour >= %(window_start)s AND st.hour < %(window_end)s AS in_window,
           EXISTS (SELECT 1 FROM analytics.aggregation_runs r
                   WHERE r.rollup = 'hourly' AND r.step = ANY(%(steps)s::text[])
                     AND r.bucket_start = st.hour AND r.status = 'succeeded')
           OR EXISTS (SELECT 1 FROM periods_ok p
                      WHERE (p.rollup, p.bucket_start) IN (('daily', date_trunc('day', st.hour, 'UTC')),
                                                           ('weekly', date_trunc('week', st.hour, 'UTC')),
                                                           ('monthly', date_trunc('month', st.hour, 'UTC'))))
             AS aggregated_before
    FROM state st LEFT JOIN dirty d USING (hour)
)
SELECT hour,
       CASE WHEN dirty THEN 'dirty'
            WHEN attempted < cardinality(%(steps)s::text[]) THEN 'missing'
            ELSE 'failed' END AS reason,
       dirty OR attempted < cardinality(%(steps)s::text[]) AS full
FROM judged
WHERE (NOT running OR unclaimed)
  AND ((in_window AND (dirty OR succeeded < cardinality(%(steps)s::text[])))
       OR (dirty AND aggregated_before))
ORDER BY hour;

-- catchup_periods --
-- The days, weeks or months a catch-up re-aggregates (one rollup per call), oldest first, with why:
--   missing / failed  complete (end <= now), ended inside the window (window_start, now], and its
--                     step never succeeded / its latest attempt did not succeed;
--   stale    an hour of it was aggregated (an input step, execution_metrics or credit_consumption,
--            finished successfully) after its latest successful attempt started: at any age;
--   changed  it contains an hour this catch-up re-aggregated, and it is complete or was aggregated
--            before (an incomplete period that never ran is not due yet).
-- A period another run is aggregating right now ('running') is left to it; skipped attempts are ignored.
-- Date arithmetic runs in the session time zone, which the caller sets to UTC.
-- Parameters: rollup, step, unit ('day' | 'week' | 'month'), width (interval), window_start, now,
--             hours (the hours re-aggregated so far, timestamptz[]), inputs (text[]).
WITH latest AS (
    SELECT DISTINCT ON (bucket_start) bucket_start, status
    FROM analytics.aggregation_runs
    WHERE rollup = %(rollup)s AND step = %(step)s AND status <> 'skipped'
    ORDER BY bucket_start, id DESC
),
succeeded AS (
    SELECT bucket_start, max(started_at) AS last_ok
    FROM analytics.aggregation_runs
    WHERE rollup = %(rollup)s AND step = %(step)s AND status = 'succeeded'
    GROUP BY bucket_start
),
stale AS (
    SELECT s.bucket_start
    FROM succeeded s
    WHERE EXISTS (SELECT 1 FROM analytics.aggregation_runs h
                  WHERE h.rollup = 'hourly' AND h.step = ANY(%(inputs)s::text[]) AND h.status = 'succeeded'
                    AND h.bucket_start >= s.bucket_start
                    AND h.bucket_start < s.bucket_start + %(width)s::interval
                    AND h.finished_at > s.last_ok)
),
recent AS (
    SELECT p AS bucket_start
    FROM generate_series(date_trunc(%(unit)s, %(window_start)s::timestamptz), %(now)s::timestamptz,
                         %(width)s::interval) AS p
    WHERE p + %(width)s::interval > %(window_start)s::timestamptz
      AND p + %(width)s::interval <= %(now)s::timestamptz
),
touched AS (
    SELECT DISTINCT date_trunc(%(unit)s, h) AS bucket_start
    FROM unnest(%(hours)s::timestamptz[]) AS h
),
candidates AS (
    SELECT bucket_start, true AS is_recent, false AS is_stale, false AS is_touched FROM recent
    UNION ALL
    SELECT bucket_start, false, true, false FROM stale
    UNION ALL
    SELECT bucket_start, false, false, true FROM touched
),
judged AS (
    SELECT c.bucket_start, c.bucket_start + %(width)s::interval AS bucket_end,
           bool_or(c.is_recent) AS is_recent, bool_or(c.is_stale) AS is_stale, bool_or(c.is_touched) AS is_touched,
           max(l.status) AS status, max(s.last_ok) AS last_ok
    FROM candidates c
    LEFT JOIN latest l USING (bucket_start)
    LEFT JOIN succeeded s USING (bucket_start)
    GROUP BY c.bucket_start
)
SELECT bucket_start, bucket_end,
       CASE WHEN is_recent AND status IS NULL THEN 'missing'
            WHEN is_recent AND status <> 'succeeded' THEN 'failed'
            WHEN is_stale THEN 'stale'
            ELSE 'changed' END AS reason
FROM judged
WHERE status IS DISTINCT FROM 'running'
  AND ((is_recent AND status IS DISTINCT FROM 'succeeded')
       OR is_stale
       OR (is_touched AND (bucket_end <= %(now)s::timestamptz OR last_ok IS NOT NULL)))
ORDER BY bucket_start;
