"""Backfill a range and retry failed steps: the operator's bulk re-runs.

A backfill runs every bucket of the chosen rollups lying wholly inside a range,
each hour before the day, week and month that contain it. It is resumable: of each
bucket it runs the steps that need work (tally/plan.py: missing, failed or dirty),
all of them when forced. A stop request (Ctrl-C) takes effect before the next step,
so a re-run continues where this one stopped.

With a queue, every bucket becomes one ``tally.backfill_bucket`` task: the hours
first; once the workers have finished them (their states say so), the days, weeks
and months, which read only hourly rows.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Callable

import psycopg

from . import buckets as B
from . import ledger as L
from . import plan as P
from . import state as S
from .buckets import Bucket
from .db import connect
from .errors import InvalidInput
from .queries import query
from .rollups import RollupResult, Runner, StepResult

_RANK = {r: i for i, r in enumerate(B.ROLLUPS)}


def plan(start: dt.datetime, end: dt.datetime, rollups: list[str]) -> list[Bucket]:
    """Every whole bucket of ``rollups`` in [start, end): each after the finer buckets it contains."""
    found = [b for r in rollups for b in B.within(r, start, end)]
    return sorted(found, key=lambda b: (b.end, _RANK[b.rollup], b.start))


def pending_steps(conn: psycopg.Connection, bucket: Bucket, force: bool = False, unseal: bool = False) -> list[str]:
    """The steps of ``bucket`` a backfill runs: those that need work, or all if forced (sealed
    ones only when unsealing)."""
    bs = S.of(conn, bucket)
    return P.forced(bs, unseal) if force else P.work(bs)


def _done_since(st: S.StepState, since: dt.datetime) -> bool:
    """The step succeeded after ``since`` (the forced backfill being resumed did it) and is done."""
    return (st.facts is not None and st.facts.ok_started_at is not None and st.facts.ok_started_at >= since
            and st.state in S.DONE)


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
    signal: str = ""  # what stopped it: SIGINT | SIGTERM
    current: str = ""
    queued: int = 0  # tasks sent (queue mode)
    left_open: list[str] = field(default_factory=list)  # buckets of the range that have not ended
    sealed: int = 0  # buckets left because they are sealed (a forced backfill without --unseal)
    resumed: str | None = None  # a forced backfill resumed: when the interrupted one began (ISO)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def record(self, bucket: Bucket, sr: StepResult) -> None:
        """Count one step that ran (called after its commit or rollback and its ledger row)."""
        self.steps += 1
        self.rows += sr.rows or 0
        if sr.status == "failed":
            self.failed.append((str(bucket), sr.step, sr.error or ""))

    def as_dict(self) -> dict:
        return dict(total=self.total, done=self.done, ran=self.ran, skipped=self.skipped, steps=self.steps,
                    failed=[dict(bucket=b, step=s, error=e) for b, s, e in self.failed], rows=self.rows,
                    seconds=round(self.seconds, 3), stopped=self.stopped, queued=self.queued,
                    left_open=self.left_open, resumed=self.resumed, sealed=self.sealed)


class Backfill:
    """One backfill of a range, in this process or through the queue.

    Buckets that have not ended by ``now`` are left (``report.left_open``) unless
    ``allow_open``. A forced backfill is resumable: it is recorded in
    analytics.backfill_runs by its range and rollups, and the identical command run
    after an interruption does not force again the steps of buckets that
    succeeded after the interrupted run began; once one has finished, the identical
    command forces everything again.
    """

    def __init__(self, url: str, start: dt.datetime, end: dt.datetime, rollups: list[str], *, force: bool = False,
                 allow_open: bool = False, unseal: bool = False, now: dt.datetime | None = None,
                 on_update: Callable[[Report], None] | None = None, jobs: int = 1):
        if not 1 <= jobs <= 16:
            raise InvalidInput(f"invalid jobs {jobs}: expected 1 to 16")
        self.jobs = jobs
        self.url = url
        self.start, self.end = start, end
        self.rollups = rollups
        self.force = force
        self.unseal = unseal
        self.now = now or dt.datetime.now(B.UTC)
        self.allow_open = allow_open
        self.on_update = on_update or (lambda report: None)
        self.report = Report()
        self._stop = False

    @property
    def command(self) -> str:
        """What makes two backfills the identical command."""
        return (f"--from {self.start.isoformat()} --to {self.end.isoformat()} --rollups {','.join(self.rollups)} "
                f"--force{' --unseal' if self.unseal else ''}")

    def stop(self, why: str = "SIGINT") -> None:
        """Stop before the next step (the one running now finishes and commits)."""
        self._stop = True
        self.report.signal = self.report.signal or why

    def _on_step(self, bucket: Bucket, sr: StepResult) -> None:
        self.report.record(bucket, sr)
        self.on_update(self.report)

    def buckets(self) -> list[Bucket]:
        """The buckets to run, in order; the open ones are noted in the report and left out."""
        work = plan(self.start, self.end, self.rollups)
        if not self.allow_open:
            self.report.left_open = [str(b) for b in work if b.end > self.now]
            work = [b for b in work if b.end <= self.now]
        self.report.total = len(work)
        return work

    def _check_unseal(self, conn: psycopg.Connection) -> None:
        if self.unseal:
            P.refuse_purged(conn, self.start, self.end, f"{B.HOUR.label(self.start)} .. {B.HOUR.label(self.end)}")

    def _resume(self, conn: psycopg.Connection) -> tuple[int, dt.datetime | None]:
        """(this forced backfill's row, when the interrupted one it resumes began — None if none)."""
        row = conn.execute(query("backfill_unfinished"), dict(command=self.command)).fetchone()
        if row is not None:
            self.report.resumed = row[1].astimezone(B.UTC).isoformat()
            return row[0], row[1]
        return conn.execute(query("backfill_begin"), dict(command=self.command)).fetchone()[0], None

    def steps_for(self, conn: psycopg.Connection, bucket: Bucket, since: dt.datetime | None) -> list[str]:
        """The steps this backfill runs for ``bucket`` (none: it is done)."""
        bs = S.of(conn, bucket)
        steps = P.forced(bs, self.unseal) if self.force else P.work(bs)
        if self.force and since is not None:  # forced already by the run this one resumes: not again
            steps = [s for s in steps if not _done_since(bs.steps[s], since)]
        if self.force and not steps and bs.where(S.State.SEALED) and since is None:
            self.report.sealed += 1
        return steps

    # -- in this process -------------------------------------------------------------------
    def run(self) -> Report:
        """Run the plan here; returns the report (``stopped`` if a stop was requested)."""
        work = self.buckets()
        with connect(self.url, autocommit=True) as conn, \
                Runner(self.url, trigger="backfill", on_step=self._on_step, should_stop=lambda: self._stop) as runner:
            S.reap(conn)
            self._check_unseal(conn)
            run_id, since = self._resume(conn) if self.force else (None, None)
            hours: list[tuple[Bucket, list[str]]] = []  # run together, in set-based chunks
            periods: list[Bucket] = []  # whose hours are gathered above: they run after them

            def run_hours() -> bool:
                """The hours gathered so far; False if a stop came."""
                if hours:
                    self.report.current = f"{hours[0][0]} .. {hours[-1][0].label}"
                    self.on_update(self.report)
                    for result in runner.run_hours(hours, jobs=self.jobs):
                        if result.stopped:
                            return False
                        self.report.ran += 1
                        self.report.done += 1
                    hours.clear()
                    self.on_update(self.report)
                return True

            def todo(bucket: Bucket) -> list[str]:
                """The steps to run for ``bucket``; none: it counts as done, skipped."""
                steps = self.steps_for(conn, bucket, since)
                if not steps:
                    self.report.skipped += 1
                    self.report.done += 1
                return steps

            def run_periods() -> bool:
                """The hours gathered so far, then the periods after them; False if a stop came.
                A period's steps are decided once its hours have run (they may change it)."""
                if not run_hours():
                    return False
                ready = [(bucket, steps) for bucket in periods if (steps := todo(bucket))]
                periods.clear()
                if ready:
                    first, last = ready[0][0], ready[-1][0]
                    self.report.current = str(first) if first == last else f"{first} .. {last}"
                    self.on_update(self.report)
                for result in runner.run_periods(ready, jobs=self.jobs):
                    self.report.ran += 1
                    if result.stopped:
                        return False
                    self.report.done += 1
                self.on_update(self.report)
                return not self._stop

            # With one job a period runs as soon as its hours have (a day's rows appear day by
            # day); with more, hours gather for up to PERIODS_AFTER_HOURS, so that the lanes
            # stay busy across days, and the periods then run side by side.
            for bucket in work:
                if self._stop:
                    break
                if bucket.grain.parts is None:
                    if steps := todo(bucket):
                        hours.append((bucket, steps))
                    continue
                periods.append(bucket)
                if (self.jobs == 1 or len(hours) >= PERIODS_AFTER_HOURS) and not run_periods():
                    break
            else:
                run_periods()
            if run_id is not None and not self._stop:
                conn.execute(query("backfill_finish"), dict(id=run_id))
        self.report.stopped = self._stop
        self.report.finished = time.monotonic()
        return self.report

    def dry_run(self) -> list[P.Planned]:
        """What :meth:`run` would run, bucket by bucket and step by step, and why; changes nothing.

        A day, week or month runs after its hours: if the backfill runs one of them, the
        period will be behind it then (``changed``), whatever its state now.
        """
        work = self.buckets()
        planned: list[P.Planned] = []
        hours_run: set[dt.datetime] = set()
        with connect(self.url, autocommit=True) as conn:
            self._check_unseal(conn)
            since = None
            if self.force:
                row = conn.execute(query("backfill_unfinished"), dict(command=self.command)).fetchone()
                since = row[1] if row else None
            for bucket in work:
                bs = S.of(conn, bucket)
                steps = self.steps_for(conn, bucket, since)
                if steps:
                    planned.append(P.planned(bs, steps, "forced" if self.force else None))
                    if bucket.grain.parts is None:
                        hours_run.add(bucket.start)
                elif bucket.grain.parts is not None and any(bucket.start <= h < bucket.end for h in hours_run) \
                        and P.forced(bs, self.unseal):
                    planned.append(P.Planned(bucket, tuple(P.forced(bs, self.unseal)), "changed",
                                             "its hours run first in this backfill"))
        return planned

    # -- through the queue -----------------------------------------------------------------
    def run_queued(self, poll: float = 0.5) -> Report:
        """Send one ``tally.backfill_bucket`` task per bucket that needs work; wait for the workers.

        Hours go first; days, weeks and months (built from hourly rows only) are sent once
        every queued hour has a finished attempt, so no worker re-does an hour another
        worker is running.
        """
        from .tasks import app, check_broker

        check_broker()
        phases = [[r for r in self.rollups if B.grain(r).parts is None],
                  [r for r in self.rollups if B.grain(r).parts is not None]]
        work = self.buckets()
        with connect(self.url, autocommit=True) as conn:
            S.reap(conn)
            self._check_unseal(conn)
            run_id, since = self._resume(conn) if self.force else (None, None)
            for rollups in phases:
                if not rollups or self._stop:
                    continue
                marker = L.marker(conn)
                wanted: dict[Bucket, list[str]] = {}
                for rollup in rollups:
                    for bucket in (b for b in work if b.rollup == rollup):
                        steps = self.steps_for(conn, bucket, since)
                        if steps:
                            wanted[bucket] = steps
                        else:
                            self.report.skipped += 1
                            self.report.done += 1
                sent = {}
                options = {"force": self.force, "unseal": self.unseal, "allow_open": self.allow_open}
                hours = sorted(b for b in wanted if b.grain.parts is None)
                for chunk in _chunks_of(hours, QUEUE_CHUNK_HOURS):  # hours: a task per chunk, set-based
                    task = app.send_task("tally.backfill_hours", args=[chunk[0].start.isoformat(),
                                                                       chunk[-1].end.isoformat()], kwargs=options)
                    sent.update({b: task for b in chunk})
                    self.report.queued += 1
                for bucket in sorted((b for b in wanted if b.grain.parts is not None),
                                     key=lambda b: (b.end, _RANK[b.rollup])):
                    sent[bucket] = app.send_task("tally.backfill_bucket", args=[bucket.rollup, bucket.label],
                                                 kwargs=options)
                    self.report.queued += 1
                self.on_update(self.report)
                self._wait(conn, rollups, wanted, sent, marker, poll)
            if run_id is not None and not self._stop:
                conn.execute(query("backfill_finish"), dict(id=run_id))
        self.report.finished = time.monotonic()
        return self.report

    def _wait(self, conn, rollups: list[str], wanted: dict[Bucket, list[str]], sent: dict, marker: int,
              poll: float) -> None:
        """Until every wanted step has an attempt after ``marker`` that is no longer running
        (or its task failed for good before it could make one)."""
        waiting = dict(wanted)
        rows_before = self.report.rows
        polls = 0
        while waiting:
            polls += 1
            if self._stop:
                self.report.stopped = True
                return
            S.reap(conn)
            latest = {(r, s, t): (st, written, error) for r, s, t, st, written, error in conn.execute(
                query("state_changed_after"), dict(marker=marker, rollups=rollups, start=self.start, end=self.end))}
            self.report.rows = rows_before + sum(w or 0 for _, w, _ in latest.values())
            for bucket in list(waiting):
                seen = [latest.get((bucket.rollup, s, bucket.start)) for s in waiting[bucket]]
                if all(st is not None and st[0] != "running" for st in seen):
                    self.report.failed += [(str(bucket), step, st[2] or "")
                                           for step, st in zip(waiting[bucket], seen) if st[0] == "failed"]
                    self.report.steps += len(seen)
                    self.report.ran += 1
                    self.report.done += 1
                    del waiting[bucket]
                # every 20 polls (~10 s), ask the result backend for tasks that died without an attempt
                elif polls % 20 == 0 and (lost := _final_failure(sent.get(bucket))) is not None:
                    self.report.failed.append((str(bucket), "(task)", lost))
                    self.report.done += 1
                    del waiting[bucket]
            self.report.current = (f"waiting for the workers (`tally worker`): {len(waiting)} bucket(s)"
                                   if waiting else "")
            self.on_update(self.report)
            if waiting:
                time.sleep(poll)


PERIODS_AFTER_HOURS = 7 * 24  # backfill --jobs > 1: hours gathered before the periods they hold run
QUEUE_CHUNK_HOURS = 24  # hours a tally.backfill_hours task runs: workers share a range by days


def _chunks_of(hours: list[Bucket], width: int) -> list[list[Bucket]]:
    """Consecutive hours in pieces of at most ``width`` hours (a gap starts a new piece)."""
    chunks: list[list[Bucket]] = []
    for b in hours:
        if chunks and chunks[-1][-1].end == b.start and len(chunks[-1]) < width:
            chunks[-1].append(b)
        else:
            chunks.append([b])
    return chunks


def _final_failure(result) -> str | None:
    """The error of a task that failed for good (no result backend: unknown, None)."""
    try:
        if result is not None and result.state in ("FAILURE", "REVOKED"):
            return f"task {result.id} {result.state.lower()}: {result.result!r}"
    except Exception:  # no result backend, or it is unreachable: the state alone decides
        return None
    return None


def retry_failed(url: str, since: dt.datetime | None = None,
                 on_update: Callable[[Report], None] | None = None) -> tuple[Report, list[RollupResult]]:
    """Re-run every step whose latest attempt failed (trigger ``retry``), hours first."""
    on_update = on_update or (lambda report: None)
    report = Report()
    results: list[RollupResult] = []

    def on_step(bucket: Bucket, sr: StepResult) -> None:
        report.record(bucket, sr)
        on_update(report)

    with connect(url, autocommit=True) as conn, Runner(url, trigger="retry", on_step=on_step) as runner:
        S.reap(conn)
        todo = P.failing(conn, since)
        report.total = len(todo)
        for planned in todo:
            report.current = str(planned.bucket)
            on_update(report)
            # an earlier retry in this loop (a period preparing its hours) may have fixed it already
            steps = [s for s in planned.steps if s in P.retryable(S.of(conn, planned.bucket))]
            if steps:
                results.append(runner.run(planned.bucket, steps))
                report.ran += 1
            else:
                report.skipped += 1
            report.done += 1
            on_update(report)
    report.finished = time.monotonic()
    return report, results
