"""Data lifecycle: the record of what retention purged; change capture of TRUNCATE.

Revision ID: 0007
Revises: 0006

* analytics.purged: one row per hour whose source rows (execution_logs, user_activity) or
  hourly output rows ('hourly') tally's retention deleted. Never pruned: an unseal of a
  bucket that holds such an hour is refused, since it would erase its history.
* analytics.tally_mark_dirty(): a TRUNCATE of a source table marks every aggregated hour
  that is not sealed dirty (a TRUNCATE carries no rows); and tally's own retention (which
  sets tally.purging for its session) leaves no marks: deleting the rows of sealed hours is
  not a change to them.
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_HEAD = """
CREATE OR REPLACE FUNCTION analytics.tally_mark_dirty() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- Static SQL, one statement per (table, operation): PL/pgSQL plans each once per session,
-- where a dynamic one would be parsed and planned again on every statement (~5 us against
-- ~12-45 us a single-row INSERT, bench/late_data.py). An UPDATE marks the old and the new hour.
BEGIN
"""
# tally's retention deleting the rows of sealed hours (it sets tally.purging) leaves no marks
_GUARD = """    IF current_setting('tally.purging', true) = 'on' THEN
        RETURN NULL;  -- tally's retention deleting the source rows of sealed hours
    END IF;
"""
_TRUNCATE = """    IF TG_OP = 'TRUNCATE' THEN  -- no rows to look at: every aggregated hour of the table that is not sealed
        INSERT INTO analytics.dirty_log (hour, source)
        SELECT DISTINCT bucket_start, TG_TABLE_NAME FROM analytics.bucket_state
        WHERE rollup = 'hourly' AND state <> 'sealed'
          AND step = ANY(CASE TG_TABLE_NAME WHEN 'execution_logs' THEN ARRAY['execution_metrics', 'credit_consumption']
                                            ELSE ARRAY['user_activity'] END);
        RETURN NULL;
    END IF;
"""
_ROWS = """    IF TG_TABLE_NAME = 'execution_logs' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT DISTINCT date_trunc('hour', started_at, 'UTC'), 'execution_logs' FROM new_rows;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT DISTINCT date_trunc('hour', started_at, 'UTC'), 'execution_logs' FROM old_rows;
        ELSE
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT date_trunc('hour', started_at, 'UTC'), 'execution_logs' FROM old_rows
            UNION SELECT date_trunc('hour', started_at, 'UTC'), 'execution_logs' FROM new_rows;
        END IF;
    ELSE  -- analytics.user_activity
        IF TG_OP = 'INSERT' THEN
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT DISTINCT date_trunc('hour', created_at, 'UTC'), 'user_activity' FROM new_rows;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT DISTINCT date_trunc('hour', created_at, 'UTC'), 'user_activity' FROM old_rows;
        ELSE
            INSERT INTO analytics.dirty_log (hour, source)
            SELECT date_trunc('hour', created_at, 'UTC'), 'user_activity' FROM old_rows
            UNION SELECT date_trunc('hour', created_at, 'UTC'), 'user_activity' FROM new_rows;
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;
"""
FUNCTION = _HEAD + _GUARD + _TRUNCATE + _ROWS
FUNCTION_0002 = _HEAD + _ROWS  # 0002's function again, for a downgrade

UPGRADE = """
CREATE TABLE analytics.purged (
    source text NOT NULL CHECK (source IN ('execution_logs', 'user_activity', 'hourly')),
    hour timestamptz NOT NULL,
    rows bigint NOT NULL,
    purged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, hour)
);
CREATE INDEX purged_hour_idx ON analytics.purged (hour);

-- ledger retention keeps the attempt behind each current state: found by this index
CREATE INDEX bucket_state_attempt_idx ON analytics.bucket_state (attempt_id);
DROP INDEX analytics.bucket_state_running_idx;

CREATE TRIGGER tally_dirty_truncate AFTER TRUNCATE ON public.execution_logs
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.tally_mark_dirty();
CREATE TRIGGER tally_dirty_truncate AFTER TRUNCATE ON analytics.user_activity
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.tally_mark_dirty();
"""

DOWNGRADE = """
CREATE INDEX bucket_state_running_idx ON analytics.bucket_state (attempt_id) WHERE state = 'running';
DROP INDEX IF EXISTS analytics.bucket_state_attempt_idx;
DROP TRIGGER IF EXISTS tally_dirty_truncate ON public.execution_logs;
DROP TRIGGER IF EXISTS tally_dirty_truncate ON analytics.user_activity;
DROP TABLE IF EXISTS analytics.purged;
"""


def upgrade() -> None:
    # CREATE OR REPLACE keeps the owner and grants, not SECURITY DEFINER: run `tally db roles` again after it
    op.execute(FUNCTION)
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
    # the function of 0002 again (without the TRUNCATE branch and the purge guard)
    op.execute(FUNCTION_0002)
