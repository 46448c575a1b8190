-- bucket_stale --
-- Source rows of a bucket changed since its steps succeeded: one of its hours has change
-- marks, or (a day, week or month) one of its hours was aggregated again after the period's
-- latest success. A backfill then runs every step of the bucket, not only the unfinished ones.
SELECT EXISTS (SELECT 1 FROM analytics.dirty_log WHERE hour >= %(start)s AND hour < %(end)s)
    OR (%(rollup)s <> 'hourly' AND EXISTS (
        SELECT 1 FROM analytics.aggregation_runs h
        WHERE h.rollup = 'hourly' AND h.step = ANY(%(inputs)s) AND h.status = 'succeeded'
          AND h.bucket_start >= %(start)s AND h.bucket_start < %(end)s
          AND h.finished_at > (SELECT max(p.started_at) FROM analytics.aggregation_runs p
                               WHERE p.rollup = %(rollup)s AND p.bucket_start = %(start)s
                                 AND p.status = 'succeeded')));
