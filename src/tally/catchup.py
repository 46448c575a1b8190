"""Catch-up: re-aggregate every dirty, missing or failed bucket, hours first.

Late data is the normal case: executions finish after their hour was aggregated,
events arrive late, rows are corrected or deleted. Change capture marks the
touched hours dirty (analytics.dirty_log); a catch-up then

1. re-aggregates every hour that is dirty (at any age), or missing or failed within
   the last ``TALLY_CATCHUP_DAYS`` days;
2. then, in turn, every day, week and month that is dirty (one of its hours changed or
   was aggregated again after it), that contains an hour this catch-up re-aggregated,
   or that ended within the window and is missing or failed.

What is due is decided by tally/plan.py from the state of each bucket (tally/state.py);
the work goes through :class:`tally.rollups.Runner`.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Callable

from . import buckets as B
from . import plan as P
from . import state as S
from .config import settings
from .db import database_url
from .plan import Planned, Window
from .rollups import RollupResult, Runner

log = logging.getLogger("tally")


@dataclass
class CatchUpResult:
    """What one catch-up planned and ran."""

    now: dt.datetime
    window_start: dt.datetime
    plans: dict[str, list[Planned]] = field(default_factory=dict)  # rollup -> planned, in run order
    buckets: list[RollupResult] = field(default_factory=list)  # every bucket run, in run order
    dry_run: bool = False
    stopped: bool = False  # a stop was asked for (or a step hit the task's time limit)

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
            if r.bucket.grain.parts is None:
                seen.add(r.bucket.start)
            seen.update(p.bucket.start for p in r.prepared)
        return sorted(seen)

    def count(self, rollup: str) -> int:
        return len(self.plans.get(rollup, []))

    def as_dict(self) -> dict:
        reasons = {p.bucket: p.reason for plan in self.plans.values() for p in plan}
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "window_start": self.window_start.isoformat(),
            "planned": {r: self.count(r) for r in B.ROLLUPS},
            "plan": {r: [p.as_dict() for p in plan] for r, plan in self.plans.items()},
            "failed": [f"{r.bucket}" for r in self.failed],
            "buckets": [
                {"rollup": r.bucket.rollup, "bucket": r.bucket.label, "reason": reasons.get(r.bucket),
                 "ok": r.ok, "rows": r.rows, "prepared_hours": len(r.prepared),
                 "steps": {s.step: s.status for s in r.steps}}
                for r in self.buckets
            ],
        }


def catch_up(url: str | None = None, *, trigger: str = "catch-up", now: dt.datetime | None = None,
             on_bucket: Callable[[RollupResult], None] | None = None,
             days: int | None = None, task_id: str | None = None, lock_wait: float | None = None,
             on_plan: Callable[[str, list[Planned]], None] | None = None, dry_run: bool = False,
             should_stop: Callable[[], bool] | None = None,
             stop_on: tuple[type[BaseException], ...] = (), pooled: bool = False) -> CatchUpResult:
    """Re-aggregate every dirty, missing or failed hour, then the days, weeks and months due.

    ``now`` (default: the current time) decides which buckets are complete and where the
    window of ``days`` (default ``TALLY_CATCHUP_DAYS``) for missing buckets starts.
    ``on_plan(rollup, planned)`` is called before each phase, ``on_bucket(result)`` after
    each bucket. A failed step does not stop the catch-up: see ``result.ok``/``.failed``.
    ``dry_run``: plan every phase and run nothing (a period's plan then does not know
    which hours this catch-up would re-aggregate: it lists the periods that contain them).
    ``pooled``: borrow connections from this process's pool (a worker) instead of opening them.
    """
    now = (now or dt.datetime.now(B.UTC))
    now = (now if now.tzinfo else now.replace(tzinfo=B.UTC)).astimezone(B.UTC)
    days = settings().catchup_days if days is None else days
    window = Window.of(now, days)
    url = url or database_url()
    result = CatchUpResult(now=now, window_start=window.start, dry_run=dry_run)

    with Runner(url, trigger=trigger, task_id=task_id, lock_wait=lock_wait, should_stop=should_stop,
                stop_on=stop_on, pooled=pooled) as runner:
        conn = runner.ledger.conn  # autocommit, UTC: planning reads and state writes
        reaped = S.reap(conn) if not dry_run else 0
        if reaped:
            log.warning("catch-up: %d abandoned attempt(s) marked failed", reaped)
        if not dry_run:  # history that may no longer change is stored as sealed, before anything is planned
            sealed = S.seal(conn, now)
            if sealed:
                log.info("catch-up: sealed %s", ", ".join(f"{n} {r}" for r, n in sealed.items()))
        for rollup in B.ROLLUPS:
            if B.grain(rollup).parts is None:
                planned = P.catch_up_hours(conn, window)
            else:
                hours = [p.bucket.start for p in result.plans[B.HOUR.rollup]] if dry_run else result.hours
                planned = P.catch_up_periods(conn, rollup, window, hours)
            result.plans[rollup] = planned
            log.info("catch-up: %s: %d bucket(s) to run", rollup, len(planned))
            if on_plan is not None:
                on_plan(rollup, planned)
            if dry_run:
                continue
            if B.grain(rollup).parts is None:  # the hours together, in set-based chunks
                ran = runner.run_hours([(p.bucket, list(p.steps)) for p in planned])
            else:
                ran = (runner.run(p.bucket, p.steps) for p in planned)
            for r in ran:
                if r.stopped or runner.stopping():
                    result.stopped = True
                    return result
                result.buckets.append(r)
                if on_bucket is not None:
                    on_bucket(r)
    return result
