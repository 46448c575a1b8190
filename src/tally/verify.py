"""``tally verify``: recompute every output row of a range from the source and list the drift.

The recomputation (sql/verify.sql) is independent of the steps: it reads only raw
source rows, with exact ``percentile_cont`` and exact distinct counts for days,
weeks and months, and writes nothing. Tolerances are SPEC's: sums and counts
exact, float means within floating-point noise, numeric quotients within 1e-12,
percentiles of a day, week or month within 1 %.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Callable

import psycopg
from psycopg import sql

from . import buckets as B
from .queries import query
from .steps import STEPS

FLOAT_REL = 1e-9  # float sums in another order
QUOTIENT_REL = 1e-12  # numeric divisions of the same exact sums
PERCENTILE_REL = 0.01  # SPEC: a period's percentiles within 1 % of the exact percentile_cont

HOURLY = (
    ("execution_metrics_hourly", "verify_execution_hourly"),
    ("user_activity_hourly", "verify_user_activity_hourly"),
    ("credit_consumption_hourly", "verify_credit_consumption_hourly"),
)
PERIODS = tuple((s.rollup, s) for s in STEPS.values() if B.grain(s.rollup).parts is not None)
KEY_ORDER = ("workspace_id", "user_id", "agent_id")


@dataclass
class Drift:
    """One missing row, unexpected row, or differing cell."""

    table: str
    bucket: str
    key: dict
    problem: str  # missing row | unexpected row | drift
    column: str | None
    expected: str | None
    actual: str | None


@dataclass
class VerifyReport:
    start: dt.datetime
    end: dt.datetime
    checked: dict[str, int] = field(default_factory=dict)  # hours, days, weeks, months checked
    drifts: list[Drift] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.drifts

    def as_dict(self) -> dict:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(), "clean": self.clean,
                "checked": self.checked, "drifts": [asdict(d) for d in self.drifts]}


def plan(start: dt.datetime, end: dt.datetime) -> list[tuple[str, str, dt.datetime, dt.datetime]]:
    """(rollup, table, start, end) chunks: the hourly tables a day at a time, then every whole period."""
    chunks = []
    for day in B.touching(B.DAY.rollup, start, end):
        lo, hi = max(start, day.start), min(end, day.end)
        chunks += [(B.HOUR.rollup, table, lo, hi) for table, _ in HOURLY]
    for rollup, step in PERIODS:
        chunks += [(rollup, step.table, b.start, b.end) for b in B.within(rollup, start, end)]
    return chunks


def verify(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime,
           on_chunk: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Compare every output row of [start, end) (hours, and whole days/weeks/months) with the source."""
    report = VerifyReport(start, end)
    chunks = plan(start, end)
    tol = dict(float_rel=FLOAT_REL, quotient_rel=QUOTIENT_REL, pct_rel=PERCENTILE_REL)
    hourly_queries = dict(HOURLY)
    periods = {rollup: step for rollup, step in PERIODS}
    for i, (rollup, table, lo, hi) in enumerate(chunks):
        if B.grain(rollup).parts is None:
            statement = sql.SQL(query(hourly_queries[table]))  # type: ignore[arg-type]
            params = dict(start=lo, end=hi, **tol)
            if table == HOURLY[0][0]:
                report.checked["hours"] = report.checked.get("hours", 0) + int((hi - lo).total_seconds() // 3600)
        else:
            step = periods[rollup]
            statement = sql.SQL(query("verify_period_metrics")).format(  # type: ignore[arg-type]
                table=sql.Identifier("analytics", step.table), key=sql.Identifier(step.key))
            params = dict(start=lo, end=hi, bucket=lo.date(), **tol)
            kind = f"{B.KIND[rollup]}s"
            report.checked[kind] = report.checked.get(kind, 0) + 1
        for bucket, key, problem, col, expected, actual in conn.execute(statement, params):
            label = B.bucket(rollup, bucket.astimezone(B.UTC)).label
            key = {k: key[k] for k in KEY_ORDER if k in key}  # jsonb sorts keys by length
            report.drifts.append(Drift(table, label, key, problem, col, expected, actual))
        if on_chunk is not None:
            on_chunk(i + 1, len(chunks))
    return report

