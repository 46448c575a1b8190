"""Retention: delete what sealed history no longer needs, and never what it does.

``tally retention`` (and the daily task ``tally.retention``), in this order:

1. seals what may be sealed (tally/state.py), so that everything below sees it;
2. with ``TALLY_RAW_RETENTION_DAYS``: the source rows of every hour older than that whose
   every step is sealed — in short batches, each its own transaction, so that no platform
   INSERT waits long (and with the change capture quiet: deleting the rows of sealed hours is
   not a change to them); whole partitions where a source table is partitioned by time and
   every hour of the partition may go; an hour that is not sealed keeps its rows, and the
   report says how many such hours there are and why;
3. with ``TALLY_HOURLY_RETENTION_DAYS``: hourly output rows older than that whose day, week
   and month are all sealed (daily, weekly and monthly rows are never deleted);
4. ``TALLY_LEDGER_RETENTION_DAYS`` (default 90): ledger history older than that, never the
   attempt behind a bucket's current state, never the record of what was purged.

Every purged hour is recorded in analytics.purged: an unseal that would rebuild a bucket
from purged rows is refused. ``dry_run`` reports exactly what the real run would delete.
"""
from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg import sql

from . import buckets as B
from . import state as S
from .config import Settings, settings
from .errors import InvalidInput
from .queries import query
from .state import State
from . import partition as PT
from .steps import ROLLUP_STEPS, SOURCES, STEPS

# source table -> its time column (identifiers from this fixed table only)
HOURLY_TABLES = tuple(STEPS[s].table for s in ROLLUP_STEPS[B.HOUR.rollup])
BATCH = 5_000  # rows a DELETE statement removes: a few ms of row locks at a time


@dataclass
class SourcePlan:
    """What retention does to one source table."""

    table: str
    hours: list[tuple[dt.datetime, int]] = field(default_factory=list)  # (hour, rows) deleted row by row
    partitions: list[tuple[str, dt.datetime, dt.datetime, int]] = field(default_factory=list)  # dropped whole
    kept: Counter = field(default_factory=Counter)  # why hours older than the cutoff keep their rows

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.hours) + sum(p[3] for p in self.partitions)


@dataclass
class Plan:
    now: dt.datetime
    raw_cutoff: dt.datetime | None
    hourly_cutoff: dt.datetime | None
    ledger_cutoff: dt.datetime
    sealed: dict[str, int] = field(default_factory=dict)  # buckets sealed by this run (a dry run: would be)
    sources: dict[str, SourcePlan] = field(default_factory=dict)
    hourly: list[tuple[dt.datetime, int]] = field(default_factory=list)  # (hour, output rows) deleted
    hourly_kept: int = 0  # hours older than the cutoff whose day, week or month is not sealed
    ledger_rows: int = 0
    dry_run: bool = True
    seconds: float = 0.0
    longest_batch: float = 0.0  # seconds of the slowest delete batch (what a writer may wait at most)

    def as_dict(self) -> dict:
        def hours(items):
            return [{"hour": B.HOUR.label(h), "rows": n} for h, n in items]
        return {
            "dry_run": self.dry_run, "now": self.now.isoformat(),
            "raw_cutoff": self.raw_cutoff and self.raw_cutoff.isoformat(),
            "hourly_cutoff": self.hourly_cutoff and self.hourly_cutoff.isoformat(),
            "ledger_cutoff": self.ledger_cutoff.isoformat(),
            "sealed": self.sealed,
            "sources": {t: {"rows": p.rows, "hours": hours(p.hours),
                            "partitions": [{"name": n, "from": a.isoformat(), "to": b.isoformat(), "rows": r}
                                           for n, a, b, r in p.partitions],
                            "kept": dict(p.kept)} for t, p in self.sources.items()},
            "hourly": {"rows": sum(n for _, n in self.hourly), "hours": hours(self.hourly),
                       "kept_hours": self.hourly_kept},
            "ledger_rows": self.ledger_rows, "seconds": round(self.seconds, 3),
            "longest_batch_seconds": round(self.longest_batch, 3),
        }


def _cutoff(now: dt.datetime, days: int | None) -> dt.datetime | None:
    return None if days is None else B.HOUR.floor(now) - dt.timedelta(days=days)


def check_rights(conn: psycopg.Connection, s: Settings) -> None:
    """One clear line when the role may not do what the settings ask."""
    needs = []
    if s.raw_retention_days is not None:
        needs += [(f"{schema}.{table}", "DELETE") for schema, table, _ in SOURCES.values()]
    if s.hourly_retention_days is not None:
        needs += [(f"analytics.{t}", "DELETE") for t in HOURLY_TABLES]
    needs += [("analytics.aggregation_runs", "DELETE"), ("analytics.purged", "INSERT")]
    for table, right in needs:
        if not conn.execute("SELECT has_table_privilege(%s, %s)", (table, right)).fetchone()[0]:
            user = conn.execute("SELECT current_user").fetchone()[0]
            raise InvalidInput(f"retention needs {right} on {table}, which the role {user!r} lacks: run it as a role "
                               "that has it (`tally db roles --retention NAME` makes one)")


def _why_kept(bs: S.BucketState) -> str:
    states = set(bs.states.values())
    for st, why in ((State.FAILED, "failed"), (State.RUNNING, "running"), (State.DIRTY, "dirty"),
                    (State.MISSING, "never aggregated")):
        if st in states:
            return why
    return "not sealed yet"


def plan(conn: psycopg.Connection, *, now: dt.datetime | None = None, s: Settings | None = None) -> Plan:
    """What retention deletes now (read only: the seal it would store is counted, not stored)."""
    s = s or settings()
    now = now or dt.datetime.now(B.UTC)
    p = Plan(now, _cutoff(now, s.raw_retention_days), _cutoff(now, s.hourly_retention_days),
             now - dt.timedelta(days=s.ledger_retention_days))
    if p.raw_cutoff is not None:
        for table, (schema, _, column) in SOURCES.items():
            p.sources[table] = _source_plan(conn, table, schema, column, p.raw_cutoff, now)
    if p.hourly_cutoff is not None:
        hours = [h.astimezone(B.UTC) for (h,) in conn.execute(query("retention_hourly_hours"),
                                                                dict(cutoff=p.hourly_cutoff))]
        periods = _sealed_periods(conn, hours, now)
        for hour in hours:
            if all(g.bucket(hour) in periods[r] for r, g in B.GRAINS.items() if g.parts is not None):
                rows = sum(conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE hour = %s").format(
                    sql.Identifier("analytics", t)), (hour,)).fetchone()[0] for t in HOURLY_TABLES)
                p.hourly.append((hour, rows))
            else:
                p.hourly_kept += 1
    p.ledger_rows = conn.execute(query("retention_ledger_count"), dict(cutoff=p.ledger_cutoff)).fetchone()[0]
    return p


def _sealed_periods(conn: psycopg.Connection, hours: list[dt.datetime], now: dt.datetime) -> dict[str, set]:
    """Per period rollup, which of the periods holding ``hours`` are sealed (stored or as good as)."""
    out = {}
    for rollup, g in B.GRAINS.items():
        if g.parts is None:
            continue
        states = S.read(conn, rollup, {g.bucket(h) for h in hours}, now)
        out[rollup] = {b for b, bs in states.items() if bs.states and set(bs.states.values()) == {State.SEALED}}
    return out


def _source_plan(conn: psycopg.Connection, table: str, schema: str, column: str, cutoff: dt.datetime,
                 now: dt.datetime) -> SourcePlan:
    sp = SourcePlan(table)
    hours = [h.astimezone(B.UTC) for (h,) in conn.execute(sql.SQL(query("retention_source_hours")).format(
        table=sql.Identifier(schema, table), column=sql.Identifier(column)), dict(cutoff=cutoff))]
    states = S.read(conn, B.HOUR.rollup, [B.HOUR.bucket(h) for h in hours], now)
    sealed = {b.start for b, bs in states.items() if set(bs.states.values()) == {State.SEALED}}
    for b, bs in states.items():
        if b.start not in sealed:
            sp.kept[_why_kept(bs)] += 1
    count = sql.SQL("SELECT count(*) FROM {} WHERE {col} >= %s AND {col} < %s").format(
        sql.Identifier(schema, table), col=sql.Identifier(column))
    whole: set[dt.datetime] = set()
    for part in PT.partitions(conn, f"{schema}.{table}"):
        if part.is_default or part.start is None or part.end is None:
            continue  # a DEFAULT partition or one bounded by MINVALUE/MAXVALUE is never dropped
        name, lo, hi = part.name, part.start.astimezone(B.UTC), part.end.astimezone(B.UTC)
        inside = [h for h in hours if lo <= h < hi]
        if hi <= cutoff and all(h in sealed for h in inside):
            rows = conn.execute(count, (lo, hi)).fetchone()[0]
            sp.partitions.append((name, lo, hi, rows))
            whole.update(inside)
    for hour in sorted(sealed - whole):
        sp.hours.append((hour, conn.execute(count, (hour, hour + dt.timedelta(hours=1))).fetchone()[0]))
    return sp


def run(conn: psycopg.Connection, *, dry_run: bool = False, now: dt.datetime | None = None,
        should_stop: Callable[[], bool] = lambda: False) -> Plan:
    """Seal, then delete what the plan says (``dry_run``: only say it). ``conn``: autocommit."""
    t0 = time.monotonic()
    s = settings()
    now = now or dt.datetime.now(B.UTC)
    if not dry_run:
        check_rights(conn, s)
        sealed = S.seal(conn, now)
    p = plan(conn, now=now, s=s)
    p.dry_run = dry_run
    if dry_run:
        p.seconds = time.monotonic() - t0
        return p
    p.sealed = sealed
    conn.execute("SET tally.purging = 'on'")  # the change capture leaves these deletes unmarked
    try:
        for table, sp in p.sources.items():
            schema, _, column = SOURCES[table]
            for name, lo, hi, rows in sp.partitions:
                if should_stop():
                    break
                hours = [lo + dt.timedelta(hours=i) for i in range(int((hi - lo).total_seconds()) // 3600)]
                PT.drop_partition(conn, f"{schema}.{table}", name)
                _record(conn, table, [(h, 0) for h in hours], rows)
            delete = sql.SQL(query("retention_delete_batch")).format(
                table=sql.Identifier(schema, table), column=sql.Identifier(column))
            for hour, _ in sp.hours:
                if should_stop():
                    break
                removed = 0
                while True:
                    tb = time.monotonic()
                    n = conn.execute(delete, dict(start=hour, end=hour + dt.timedelta(hours=1), batch=BATCH)).rowcount
                    p.longest_batch = max(p.longest_batch, time.monotonic() - tb)
                    removed += n
                    if n < BATCH:
                        break
                _record(conn, table, [(hour, removed)])
        for hour, _ in p.hourly:
            if should_stop():
                break
            with conn.transaction():
                rows = sum(conn.execute(sql.SQL("DELETE FROM {} WHERE hour = %s").format(
                    sql.Identifier("analytics", t)), (hour,)).rowcount for t in HOURLY_TABLES)
                _record(conn, "hourly", [(hour, rows)])
        while not should_stop():
            n = conn.execute(query("retention_ledger_delete"), dict(cutoff=p.ledger_cutoff, batch=BATCH)).rowcount
            if n < BATCH:
                break
    finally:
        conn.execute("RESET tally.purging")
    p.seconds = time.monotonic() - t0
    return p


def _record(conn: psycopg.Connection, source: str, hours: list[tuple[dt.datetime, int]], total: int | None = None
            ) -> None:
    """What was purged, for good: an unseal that would need it is refused."""
    if total is not None and hours:  # a partition: its rows counted once, on its first hour
        hours = [(hours[0][0], total)] + [(h, 0) for h, _ in hours[1:]]
    conn.execute(query("retention_record"), dict(source=source, hours=[h for h, _ in hours],
                                                 rows=[n for _, n in hours]))
