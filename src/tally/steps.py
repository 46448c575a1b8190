"""The step registry: step name -> SQL query -> bucket kind -> output table.

Every identifier that reaches SQL comes from this fixed table, never from input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from psycopg import sql

from .buckets import ROLLUPS, grain
from .errors import InvalidInput
from .queries import query

# Duration sketch: logarithmic bins of relative accuracy ALPHA (SPEC asks 1 %; 0.5 % leaves margin).
ALPHA = 0.005
GAMMA = (1 + ALPHA) / (1 - ALPHA)
LN_GAMMA = math.log(GAMMA)
LN_HALF_WIDTH = math.log(2 / (1 + GAMMA))  # a bin's value 2*gamma^i/(1+gamma): within ALPHA of all of it


_UPSERT = re.compile(r"^ *-- upsert: begin\n.*?^ *-- upsert: end\n", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Step:
    name: str
    rollup: str
    table: str
    query: str
    key: str | None = None  # the date column of a period table
    source: str = "execution_logs"
    # An hourly step reads in one statement and writes in another: the read-only query
    # ``<query>_rows`` is materialized as pg_temp.<query>_rows (CREATE TEMP TABLE ... AS may run
    # in parallel; an INSERT ... SELECT never does), then ``<query>`` writes from it.
    reads_separately: bool = False
    # Range execution (Runner.run_hours): a chunk of consecutive hours of this step reads at most
    # this many of its source rows (the planner's estimate), and spans at most 24 hours. Chosen by
    # measurement (docs/PERFORMANCE.md, "Chunk sizes"): a long chunk amortises a statement and a
    # commit over many hours, but a step that writes about one row per key pays for a large hash
    # table and scattered index inserts when the chunk holds hundreds of thousands of keys.
    chunk_rows: int = 600_000

    @property
    def rows_table(self) -> str:
        return f"{self.query}_rows"

    def read_statement(self) -> sql.Composable:
        """The read-only query of a step that reads separately (parameters: start, end, ln_gamma)."""
        return sql.SQL(query(self.rows_table).rstrip().rstrip(";"))  # type: ignore[arg-type]

    def materialize_statement(self) -> sql.Composable:
        """CREATE TEMP TABLE <rows_table> ON COMMIT DROP AS <read_statement>: a utility statement,
        so its parameters must be bound client-side (psycopg.ClientCursor)."""
        return (sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS ").format(sql.Identifier(self.rows_table))
                + self.read_statement())

    def statement(self, first_run: bool = False) -> sql.Composable:
        """The step's write statement. ``first_run``: its bucket has no output rows yet, and the
        caller holds the bucket's lock, so no key can conflict: the upsert clause is left out
        (a plain insert skips the speculative insertion an ON CONFLICT insert does per row)."""
        text = query(self.query)
        if first_run:
            text = _UPSERT.sub("", text)
        if self.key is None:
            return sql.SQL(text)  # type: ignore[arg-type]
        return sql.SQL(text).format(table=sql.Identifier("analytics", self.table), key=sql.Identifier(self.key))  # type: ignore[arg-type]


# Each source of the hourly steps: its table and the time column that puts a row in an hour.
SOURCES: dict[str, tuple[str, str, str]] = {
    "execution_logs": ("public", "execution_logs", "started_at"),
    "user_activity": ("analytics", "user_activity", "created_at"),
}


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("execution_metrics", "hourly", "execution_metrics_hourly", "execution_metrics", reads_separately=True),
        Step("user_activity", "hourly", "user_activity_hourly", "user_activity", source="user_activity",
             reads_separately=True),
        Step("credit_consumption", "hourly", "credit_consumption_hourly", "credit_consumption",
             reads_separately=True, chunk_rows=75_000),
        Step("daily_metrics", "daily", "execution_metrics_daily", "period_metrics", key="date"),
        Step("weekly_metrics", "weekly", "execution_metrics_weekly", "period_metrics", key="week_start"),
        Step("monthly_metrics", "monthly", "execution_metrics_monthly", "period_metrics", key="month"),
    )
}

ROLLUP_STEPS: dict[str, tuple[str, ...]] = {
    r: tuple(s.name for s in STEPS.values() if s.rollup == r) for r in ROLLUPS
}

# The hourly steps whose rows the period steps read.
PERIOD_INPUTS = ("execution_metrics", "credit_consumption")


def steps_of(rollup: str, names: list[str] | tuple[str, ...] | None = None) -> list[Step]:
    """The steps of ``rollup`` (all, in order, or the named ones); unknown names are invalid input."""
    grain(rollup)  # an unknown rollup is invalid input
    if not names:
        return [STEPS[n] for n in ROLLUP_STEPS[rollup]]
    for n in names:
        if n not in ROLLUP_STEPS[rollup]:
            raise InvalidInput(
                f"unknown step {n!r} for the {rollup} rollup (expected one of {', '.join(ROLLUP_STEPS[rollup])})"
            )
    return [STEPS[n] for n in ROLLUP_STEPS[rollup] if n in names]


def lock_key(step: Step, bucket_start_epoch_hours: int) -> tuple[int, int]:
    """The advisory-lock key of (step, bucket): no hashing, so no collisions."""
    return 0x7A11 + list(STEPS).index(step.name), bucket_start_epoch_hours
