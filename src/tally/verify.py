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
from . import state as S
from .queries import query
from .state import State
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
    # buckets whose differences are history, not drift: "<table> <bucket>" -> problems found there
    sealed: dict[str, int] = field(default_factory=dict)  # sealed: changes to the source since are ignored
    purged: dict[str, int] = field(default_factory=dict)  # retention purged their source or hourly rows

    @property
    def clean(self) -> bool:
        return not self.drifts

    def as_dict(self) -> dict:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(), "clean": self.clean,
                "checked": self.checked, "drifts": [asdict(d) for d in self.drifts],
                "sealed": self.sealed, "purged": self.purged}


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
    _history(conn, report)
    return report


# the purge records that explain differences in each output table
_PURGE_SOURCES = {"execution_metrics_hourly": ("execution_logs", "hourly"),
                  "credit_consumption_hourly": ("execution_logs", "hourly"),
                  "user_activity_hourly": ("user_activity", "hourly")}


def _history(conn: psycopg.Connection, report: VerifyReport) -> None:
    """Move the differences of sealed or purged buckets out of the drift: they are history.

    A purged bucket (retention deleted its source or hourly rows) cannot be compared; a sealed
    one differs from today's source by the changes ignored since it was sealed."""
    if not report.drifts:
        return
    purged = {(source, h.astimezone(B.UTC)) for source, h in conn.execute(
        query("verify_purged"), dict(start=report.start, end=report.end))}
    by_table = {t: r for r, step in PERIODS for t in [step.table]} | {t: B.HOUR.rollup for t, _ in HOURLY}
    touched: dict[str, set] = {}
    for d in report.drifts:
        touched.setdefault(by_table[d.table], set()).add(d.bucket)
    sealed_buckets: set[tuple[str, str]] = set()
    for rollup, labels in touched.items():
        g = B.grain(rollup)
        states = S.read(conn, rollup, [g.bucket(g.parse(label)) for label in labels])
        sealed_buckets |= {(rollup, b.label) for b, bs in states.items() if State.SEALED in bs.states.values()}
    drifts = []
    for d in report.drifts:
        rollup = by_table[d.table]
        g = B.grain(rollup)
        b = g.bucket(g.parse(d.bucket))
        where = f"{d.table} {d.bucket}"
        if g.parts is None:
            gone = any((src, b.start) in purged for src in _PURGE_SOURCES[d.table])
        else:
            gone = any(b.start <= h < b.end for _, h in purged)
        if gone:
            report.purged[where] = report.purged.get(where, 0) + 1
        elif (rollup, d.bucket) in sealed_buckets:
            report.sealed[where] = report.sealed.get(where, 0) + 1
        else:
            drifts.append(d)
    report.drifts = drifts

