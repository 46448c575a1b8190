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
