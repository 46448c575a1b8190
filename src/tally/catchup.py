"""Catch-up: re-aggregate every dirty, missing or failed bucket, hours first.

Late data is the normal case: executions finish after their hour was aggregated,
events arrive late, rows are corrected or deleted. Change capture marks the
touched hours dirty (analytics.dirty_log); a catch-up then

1. re-aggregates every hour that is dirty (at any age, if it was ever aggregated),
   or missing or failed within the last ``TALLY_CATCHUP_DAYS`` days;
2. then, in turn, every day, week and month that contains a re-aggregated hour,
   that is stale (one of its hours was aggregated after it), or that is complete,
   ended within the window and was never aggregated or failed.

Planning is SQL (sql/catchup.sql, one query per rollup kind); the work goes through
:class:`tally.rollups.Runner`, whose claim/clear of the dirty marks keeps an hour
dirty when a change lands while it is being aggregated.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Callable

import psycopg

from . import buckets as B
from .buckets import Bucket
from .config import settings
from .db import connect, database_url
from .queries import query
from .rollups import RollupResult, Runner
from .steps import PERIOD_INPUTS, ROLLUP_STEPS

log = logging.getLogger("tally")

PERIODS = ("daily", "weekly", "monthly")
# date_trunc field and bucket width of each period rollup (values, not SQL text)
_PERIOD_UNITS = {"daily": ("day", "1 day"), "weekly": ("week", "7 days"), "monthly": ("month", "1 month")}


@dataclass(frozen=True)
class Planned:
    """One bucket a catch-up will run, and why."""

    bucket: Bucket
    reason: str  # dirty | missing | failed | stale | changed
    only_unfinished: bool = False  # a failed hour: run only the steps that have not succeeded


@dataclass
class CatchUpResult:
    """What one catch-up planned and ran."""

    now: dt.datetime
    window_start: dt.datetime
    plans: dict[str, list[Planned]] = field(default_factory=dict)  # rollup -> planned, in run order
    buckets: list[RollupResult] = field(default_factory=list)  # every bucket run, in run order

    @property
    def failed(self) -> list[RollupResult]:
        """Every bucket with a failed step, including hours prepared for a period."""
        bad = []
        for r in self.buckets:
            bad.extend(p for p in r.prepared if not p.ok)
            if not r.ok:
                bad.append(r)
        return bad

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def hours(self) -> list[dt.datetime]:
        """Every hour aggregated, planned or prepared for a period."""
        seen: set[dt.datetime] = set()
        for r in self.buckets:
            if r.bucket.rollup == "hourly":
                seen.add(r.bucket.start)
            seen.update(p.bucket.start for p in r.prepared)
        return sorted(seen)

    def count(self, rollup: str) -> int:
        return len(self.plans.get(rollup, []))

    def as_dict(self) -> dict:
        reasons = {p.bucket: p.reason for plan in self.plans.values() for p in plan}
        return {
            "ok": self.ok,
            "now": self.now.isoformat(),
            "window_start": self.window_start.isoformat(),
            "planned": {r: self.count(r) for r in B.ROLLUPS},
            "failed": [f"{r.bucket}" for r in self.failed],
            "buckets": [
                {"rollup": r.bucket.rollup, "bucket": r.bucket.label, "reason": reasons.get(r.bucket),
                 "ok": r.ok, "rows": r.rows, "prepared_hours": len(r.prepared),
                 "steps": {s.step: s.status for s in r.steps}}
                for r in self.buckets
            ],
        }


def _window(now: dt.datetime, days: int) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the hours looked at for missing buckets: whole hours ending by ``now``."""
    end = B.floor("hourly", now)
    return end - dt.timedelta(days=days), end


def plan_hours(conn: psycopg.Connection, window_start: dt.datetime, window_end: dt.datetime) -> list[Planned]:
    """The hours to re-aggregate, oldest first (one query)."""
    rows = conn.execute(query("catchup_hours"), dict(
        window_start=window_start, window_end=window_end, steps=list(ROLLUP_STEPS["hourly"]),
    )).fetchall()
    return [Planned(B.bucket("hourly", hour), reason, not full) for hour, reason, full in rows]


def plan_periods(conn: psycopg.Connection, rollup: str, now: dt.datetime, window_start: dt.datetime,
                 hours: list[dt.datetime]) -> list[Planned]:
    """The days, weeks or months to re-aggregate, oldest first (one query)."""
    unit, width = _PERIOD_UNITS[rollup]
    (step,) = ROLLUP_STEPS[rollup]
    rows = conn.execute(query("catchup_periods"), dict(
        rollup=rollup, step=step, unit=unit, width=width, window_start=window_start, now=now,
        hours=list(hours), inputs=list(PERIOD_INPUTS),
    )).fetchall()
    return [Planned(Bucket(rollup, start.astimezone(B.UTC), end.astimezone(B.UTC)), reason)
            for start, end, reason in rows]


def catch_up(url: str | None = None, *, trigger: str = "catch-up", now: dt.datetime | None = None,
             on_bucket: Callable[[RollupResult], None] | None = None,
             days: int | None = None, task_id: str | None = None, lock_wait: float | None = None,
             on_plan: Callable[[str, list[Planned]], None] | None = None) -> CatchUpResult:
    """Re-aggregate every dirty, missing or failed hour, then the days, weeks and months due.

    ``now`` (default: the current time) decides which buckets are complete and where the
    window of ``days`` (default ``TALLY_CATCHUP_DAYS``) for missing buckets starts.
    ``on_plan(rollup, planned)`` is called before each phase, ``on_bucket(result)`` after
    each bucket. A failed step does not stop the catch-up: see ``result.ok``/``.failed``.
    """
    now = (now or dt.datetime.now(B.UTC))
    now = (now if now.tzinfo else now.replace(tzinfo=B.UTC)).astimezone(B.UTC)
    days = settings().catchup_days if days is None else days
    window_start, window_end = _window(now, days)
    url = url or database_url()
    result = CatchUpResult(now=now, window_start=window_start)

    def run(runner: Runner, planned: list[Planned]) -> None:
        for p in planned:
            r = runner.run(p.bucket, only_unfinished=p.only_unfinished)
            result.buckets.append(r)
            if on_bucket is not None:
                on_bucket(r)

    with Runner(url, trigger=trigger, task_id=task_id, lock_wait=lock_wait) as runner, \
            connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")  # the period arithmetic of catchup_periods
        reaped = runner.ledger.reap_abandoned()
        if reaped:
            log.warning("catch-up: %d abandoned attempt(s) marked failed", reaped)
        phases = ("hourly", *PERIODS)
        for rollup in phases:
            if rollup == "hourly":
                planned = plan_hours(conn, window_start, window_end)
            else:
                planned = plan_periods(conn, rollup, now, window_start, result.hours)
            result.plans[rollup] = planned
            log.info("catch-up: %s: %d bucket(s) to run", rollup, len(planned))
            if on_plan is not None:
                on_plan(rollup, planned)
            run(runner, planned)
    return result
