"""analytics.tally_key(): the output-table key of a source id.

Revision ID: 0004
Revises: 0003

A NULL id is aggregated under ''. An id too long for a btree key (PostgreSQL caps an
index row near 2.7 kB, and the hourly keys hold up to three ids) is aggregated under its
first 100 characters, '…' and its md5: the hour still aggregates, every row is still
counted, and distinct ids stay distinct. Ids up to 400 bytes are kept as they are.
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION analytics.tally_key(id text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN id IS NULL THEN ''
                WHEN octet_length(id) <= 400 THEN id
                ELSE left(id, 100) || '…' || md5(id) END
$$;
""")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS analytics.tally_key(text)")
