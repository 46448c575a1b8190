"""analytics.bucket_state: the current state of every (rollup, step, bucket), stored once.

Revision ID: 0005
Revises: 0004

The ledger (analytics.aggregation_runs) stays the history of attempts; this table holds
the one current state each attempt leaves behind, written by the same statement (or in the
same transaction) as the ledger row that causes it (tally/state.py names every transition).
Stored: running, ok, failed, sealed. Derived when read: dirty (from the change marks) and
missing (no row). The fill below takes, for each bucket and step, its latest attempt that
was not skipped (a run that skipped because another held the lock says nothing about it).
The view analytics.aggregation_latest keeps its name and columns: the ledger row of each
bucket's current state.
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE analytics.aggregation_runs
    ADD COLUMN sqlstate text,     -- of a failure the database raised
    ADD COLUMN transient boolean; -- of a failure: whether a second try may cure it (tally/errors.py)

CREATE TABLE analytics.bucket_state (
    rollup text NOT NULL,
    step text NOT NULL,
    bucket_start timestamptz NOT NULL,
    bucket_end timestamptz NOT NULL,
    state text NOT NULL CHECK (state IN ('running', 'ok', 'failed', 'sealed')),
    attempt_id bigint NOT NULL,           -- the ledger row of the latest attempt that was not skipped
    attempt integer NOT NULL,             -- its attempt number
    failures integer NOT NULL DEFAULT 0,  -- failed attempts since the latest success
    ok_started_at timestamptz,            -- the latest success began: it read every change claimed before
    ok_finished_at timestamptz,           -- ... and ended: a period that began before did not read it
    rows_written bigint,                  -- by the latest success
    error text,                           -- of the latest failure, while the state is failed
    sqlstate text,
    transient boolean,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    sealed_at timestamptz,
    ignored_changes bigint NOT NULL DEFAULT 0,  -- source row changes after the bucket was sealed
    PRIMARY KEY (rollup, step, bucket_start)
);
CREATE INDEX bucket_state_open_idx ON analytics.bucket_state (state, rollup, bucket_start) WHERE state <> 'ok';
CREATE INDEX bucket_state_running_idx ON analytics.bucket_state (attempt_id) WHERE state = 'running';

INSERT INTO analytics.bucket_state (rollup, step, bucket_start, bucket_end, state, attempt_id, attempt, failures,
                                    ok_started_at, ok_finished_at, rows_written, error, changed_at)
SELECT l.rollup, l.step, l.bucket_start, l.bucket_end,
       CASE l.status WHEN 'succeeded' THEN 'ok' WHEN 'running' THEN 'running' ELSE 'failed' END,
       l.id, l.attempt,
       (SELECT count(*) FROM analytics.aggregation_runs f
        WHERE f.rollup = l.rollup AND f.step = l.step AND f.bucket_start = l.bucket_start
          AND f.status = 'failed' AND f.id > coalesce(s.id, 0)),
       s.started_at, s.finished_at, s.rows_written,
       CASE WHEN l.status = 'failed' THEN l.error END,
       coalesce(l.finished_at, l.started_at)
FROM (SELECT DISTINCT ON (rollup, step, bucket_start) *
      FROM analytics.aggregation_runs WHERE status <> 'skipped'
      ORDER BY rollup, step, bucket_start, id DESC) l
LEFT JOIN LATERAL (SELECT r.id, r.started_at, r.finished_at, r.rows_written
                   FROM analytics.aggregation_runs r
                   WHERE r.rollup = l.rollup AND r.step = l.step AND r.bucket_start = l.bucket_start
                     AND r.status = 'succeeded'
                   ORDER BY r.id DESC LIMIT 1) s ON true;

CREATE OR REPLACE VIEW analytics.aggregation_latest AS
SELECT r.*
FROM analytics.bucket_state s JOIN analytics.aggregation_runs r ON r.id = s.attempt_id;
"""

DOWNGRADE = """
DROP VIEW analytics.aggregation_latest;
CREATE VIEW analytics.aggregation_latest AS
SELECT DISTINCT ON (rollup, step, bucket_start) id, run_id, rollup, step, bucket_start, bucket_end, status,
       rows_written, error, attempt, trigger, started_at, finished_at, backend_pid, worker, task_id
FROM analytics.aggregation_runs
ORDER BY rollup, step, bucket_start, id DESC;
DROP TABLE IF EXISTS analytics.bucket_state;
ALTER TABLE analytics.aggregation_runs DROP COLUMN IF EXISTS sqlstate, DROP COLUMN IF EXISTS transient;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
