"""Backfill a range and retry failed steps: the operator's bulk re-runs.

A backfill runs every bucket of the chosen rollups lying wholly inside a range,
each hour before the day, week and month that contain it. It is resumable: a
bucket whose steps are all ``ok`` (see :func:`tally.status.bucket_states`) is
skipped unless forced, and of a partly done bucket only the steps that are not
``ok`` run. A stop request (Ctrl-C) takes effect after the step that is running,
so a re-run continues where this one stopped.

With a queue, every bucket becomes one ``tally.backfill_bucket`` task: the hours
first; once the workers have finished them (the ledger says so), the days, weeks
and months, which read only hourly rows.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Callable

from . import buckets as B
from .buckets import Bucket
from .db import connect
from .errors import Unreachable
from .queries import query
from .rollups import RollupResult, Runner, StepResult
from .status import OK, RUNNING, bucket_states, failed_steps, reap_abandoned
from .steps import ROLLUP_STEPS

_RANK = {r: i for i, r in enumerate(B.ROLLUPS)}


class Stopped(BaseException):
    """Raised between two steps once a stop was requested (not an error: nothing is half done)."""


def plan(start: dt.datetime, end: dt.datetime, rollups: list[str]) -> list[Bucket]:
    """Every whole bucket of ``rollups`` in [start, end): each after the finer buckets it contains."""
    found = [b for r in rollups for b in B.within(r, start, end)]
    return sorted(found, key=lambda b: (b.end, _RANK[b.rollup], b.start))


def pending_steps(conn, bucket: Bucket, force: bool = False) -> list[str]:
    """The steps of ``bucket`` a backfill must run: all if forced, else those that are not ok."""
    if force:
        return list(ROLLUP_STEPS[bucket.rollup])
    cells = bucket_states(conn, bucket.rollup, bucket.start, bucket.end)[bucket]
    return [step for step, state in cells.items() if state != OK]


def run_bucket(runner: Runner, conn, bucket: Bucket, force: bool = False) -> RollupResult | None:
    """Backfill one bucket with ``runner``; None when it was already done (and not forced)."""
    steps = pending_steps(conn, bucket, force)
    if not steps:
        return None
    return runner.run(bucket, steps)


@dataclass
class Report:
    """What a backfill (or retry) did so far."""

    total: int = 0  # buckets planned
    done: int = 0  # buckets handled (ran or skipped)
    ran: int = 0  # buckets that ran at least one step
    skipped: int = 0  # buckets already done
    steps: int = 0  # steps that ran (hours prepared by a period included)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (bucket, step, error)
    rows: int = 0  # output rows written
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stopped: bool = False
    current: str = ""
    queued: int = 0  # tasks sent (queue mode)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict:
        return dict(total=self.total, done=self.done, ran=self.ran, skipped=self.skipped, steps=self.steps,
                    failed=[dict(bucket=b, step=s, error=e) for b, s, e in self.failed], rows=self.rows,
                    seconds=round(self.seconds, 3), stopped=self.stopped, queued=self.queued)


class Backfill:
    """One backfill of a range, in this process or through the queue."""

    def __init__(self, url: str, start: dt.datetime, end: dt.datetime, rollups: list[str], *, force: bool = False,
                 trigger: str = "backfill", on_update: Callable[[Report], None] | None = None):
        self.url = url
        self.start, self.end = start, end
        self.rollups = rollups
        self.force = force
        self.trigger = trigger
        self.on_update = on_update or (lambda report: None)
        self.report = Report()
        self._stop = False

    def stop(self) -> None:
        """Stop after the step that is running now."""
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    def _on_step(self, bucket: Bucket, sr: StepResult) -> None:
        # called after the step committed (or rolled back) and its ledger row was written
        self.report.steps += 1
        self.report.rows += sr.rows or 0
        if sr.status == "failed":
            self.report.failed.append((str(bucket), sr.step, sr.error or ""))
        self.on_update(self.report)
        if self._stop:
            raise Stopped

    # -- in this process -------------------------------------------------------------------
    def run(self) -> Report:
        """Run the plan here; returns the report (``stopped`` if a stop was requested)."""
        work = plan(self.start, self.end, self.rollups)
        self.report.total = len(work)
        with connect(self.url, autocommit=True) as conn, \
                Runner(self.url, trigger=self.trigger, on_step=self._on_step) as runner:
            reap_abandoned(conn)
            try:
                for bucket in work:
                    if self._stop:
                        raise Stopped
                    self.report.current = str(bucket)
                    self.on_update(self.report)
                    result = run_bucket(runner, conn, bucket, self.force)
                    self.report.done += 1
                    if result is None:
                        self.report.skipped += 1
                    else:
                        self.report.ran += 1
                    self.on_update(self.report)
            except Stopped:
                self.report.stopped = True
        self.report.finished = time.monotonic()
        return self.report

    # -- through the queue -----------------------------------------------------------------
    def run_queued(self, app, poll: float = 0.5) -> Report:
        """Send one ``tally.backfill_bucket`` task per bucket that needs work; wait for the workers.

        Hours go first; days, weeks and months (built from hourly rows only) are sent once
        every queued hour has a finished ledger row, so no worker re-does an hour another
        worker is running.
        """
        _check_broker(app)
        phases = [[r for r in self.rollups if r == "hourly"], [r for r in self.rollups if r != "hourly"]]
        self.report.total = len(plan(self.start, self.end, self.rollups))
        with connect(self.url, autocommit=True) as conn:
            reap_abandoned(conn)
            for rollups in phases:
                if not rollups or self._stop:
                    continue
                marker = conn.execute(query("ops_ledger_marker")).fetchone()[0]
                wanted: dict[Bucket, list[str]] = {}
                for rollup in rollups:
                    for bucket, cells in bucket_states(conn, rollup, self.start, self.end).items():
                        steps = [s for s, state in cells.items() if self.force or state != OK]
                        if steps:
                            wanted[bucket] = steps
                        else:
                            self.report.skipped += 1
                            self.report.done += 1
                for bucket in sorted(wanted, key=lambda b: (b.end, _RANK[b.rollup])):
                    app.send_task("tally.backfill_bucket", args=[bucket.rollup, bucket.label],
                                  kwargs={"force": self.force})
                    self.report.queued += 1
                self.on_update(self.report)
                self._wait(conn, rollups, wanted, marker, poll)
        self.report.finished = time.monotonic()
        return self.report

    def _wait(self, conn, rollups: list[str], wanted: dict[Bucket, list[str]], marker: int, poll: float) -> None:
        """Until every wanted step has an attempt after ``marker`` that is no longer running."""
        waiting = dict(wanted)
        rows_before = self.report.rows
        while waiting:
            if self._stop:
                self.report.stopped = True
                return
            reap_abandoned(conn)
            latest = {(r, s, t): (status, written, error) for r, s, t, status, written, error in conn.execute(
                query("ops_attempts_since"), dict(marker=marker, rollups=rollups, start=self.start, end=self.end))}
            self.report.rows = rows_before + sum(w or 0 for _, w, _ in latest.values())
            for bucket in list(waiting):
                seen = [latest.get((bucket.rollup, s, bucket.start)) for s in waiting[bucket]]
                if all(st is not None and st[0] != RUNNING for st in seen):
                    self.report.failed += [(str(bucket), step, st[2] or "")
                                           for step, st in zip(waiting[bucket], seen) if st[0] == "failed"]
                    self.report.steps += len(seen)
                    self.report.ran += 1
                    self.report.done += 1
                    del waiting[bucket]
            self.report.current = f"waiting for workers: {len(waiting)} bucket(s)" if waiting else ""
            self.on_update(self.report)
            if waiting:
                time.sleep(poll)


def _check_broker(app) -> None:
    try:
        with app.connection_for_write() as c:
            c.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # kombu raises OperationalError and friends
        raise Unreachable(f"cannot reach the broker {app.conf.broker_url!r}: {exc}") from None


def retry_failed(url: str, since: dt.datetime | None = None,
                 on_update: Callable[[Report], None] | None = None) -> tuple[Report, list[RollupResult]]:
    """Re-run every step whose latest attempt failed (trigger ``retry``), hours first."""
    on_update = on_update or (lambda report: None)
    report = Report()
    results: list[RollupResult] = []

    def on_step(bucket: Bucket, sr: StepResult) -> None:
        report.steps += 1
        report.rows += sr.rows or 0
        if sr.status == "failed":
            report.failed.append((str(bucket), sr.step, sr.error or ""))
        on_update(report)

    with connect(url, autocommit=True) as conn, Runner(url, trigger="retry", on_step=on_step) as runner:
        reap_abandoned(conn)
        todo = failed_steps(conn, since)
        report.total = len(todo)
        for bucket, steps in todo.items():
            report.current = str(bucket)
            on_update(report)
            # an earlier retry in this loop (a period preparing its hours) may have fixed it already
            steps = [s for s in steps if s in pending_steps(conn, bucket)]
            if steps:
                results.append(runner.run(bucket, steps))
                report.ran += 1
            else:
                report.skipped += 1
            report.done += 1
            on_update(report)
    report.finished = time.monotonic()
    return report, results
