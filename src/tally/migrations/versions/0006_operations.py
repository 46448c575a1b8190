"""Forced backfills in progress, so the identical command can resume one.

Revision ID: 0006
Revises: 0005

analytics.backfill_runs: one row per forced backfill (`tally backfill --force`), by the
command's range and rollups; finished_at stays NULL until it ends. The identical command
run again after an interruption resumes it: a step of a bucket that succeeded after that
backfill began is not forced again.
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE analytics.backfill_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command text NOT NULL,  -- range, rollups and --force: what "the identical command" means
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX backfill_runs_command_idx ON analytics.backfill_runs (command, id DESC);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS analytics.backfill_runs;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
