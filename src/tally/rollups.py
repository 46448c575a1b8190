"""The Runner: runs the steps of a rollup for one bucket, and records every attempt.

Per-step mode (the seed's design): each step runs in its own transaction under a
per-(step, bucket) lock and commits on its own; a failed step rolls back alone, the
steps before it stay committed, the steps after it still run, and the rollup reports
failure. Atomic mode: all steps in one transaction, all or nothing.

The parts, each in its own room:

* what must run first — a period's hours that are not done — is planned by
  :func:`tally.plan.hours_to_prepare`;
* a step runs in :mod:`tally.executor` (lock, settings, SQL);
* an attempt begins and ends in :mod:`tally.state` (ledger row and state together),
  concluded in one place here, :meth:`Runner._conclude`;
* a stop is asked for, never raised at the Runner: ``should_stop()`` is checked before
  each step, and an exception of ``stop_on`` (a task's time limit) ends the rollup
  after its step is recorded failed.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import psycopg

from . import buckets as B
from . import errors
from . import executor as X
from . import plan as P
from . import state as S
from .buckets import Bucket
from .config import settings
from .db import Session, database_url
from .errors import InvalidInput, TallyError
from .ledger import Ledger
from .steps import PERIOD_INPUTS, STEPS, Step, steps_of

log = logging.getLogger("tally")

TRIGGERS = ("schedule", "manual", "backfill", "retry", "catch-up")
INTERRUPTED = "interrupted before commit; rolled back"


# Range execution (Runner.run_hours): a chunk spans at most this many hours, and reads at most its
# step's Step.chunk_rows source rows (the planner's estimate). Measured in docs/PERFORMANCE.md.
MAX_CHUNK_HOURS = 24


class StepFailed(TallyError):
    """A single step (called through the step API) failed; its ledger row says why."""


class _Stop(Exception):
    """A stop was asked for between two steps of run_hours."""


def _consecutive(buckets: list[Bucket]) -> list[list[Bucket]]:
    """``buckets`` (in order) split where one does not start at the end of the one before."""
    runs: list[list[Bucket]] = []
    for b in buckets:
        if runs and runs[-1][-1].end == b.start:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


@dataclass
class StepResult:
    step: str
    status: str  # succeeded | failed | skipped
    rows: int | None = None
    changed: int | None = None
    removed: int | None = None
    error: str | None = None
    attempt: int = 1
    seconds: float = 0.0
    transient: bool | None = None  # of a failure: whether a second try may cure it


@dataclass
class RollupResult:
    run_id: uuid.UUID
    bucket: Bucket
    atomic: bool
    steps: list[StepResult] = field(default_factory=list)
    prepared: list["RollupResult"] = field(default_factory=list)  # hours aggregated first (period rollups)
    stopped: bool = False  # a stop was asked for: the steps not in ``steps`` did not run

    @property
    def ok(self) -> bool:
        """No step failed (a step skipped because another run held its lock is not a failure)."""
        return all(s.status != "failed" for s in self.steps)

    @property
    def failed(self) -> list[StepResult]:
        return [s for s in self.steps if s.status == "failed"]

    @property
    def rows(self) -> int:
        return sum(s.rows or 0 for s in self.steps)

    def as_dict(self) -> dict:
        return {
            "run_id": str(self.run_id),
            "rollup": self.bucket.rollup,
            "bucket": self.bucket.label,
            "bucket_start": self.bucket.start.isoformat(),
            "bucket_end": self.bucket.end.isoformat(),
            "atomic": self.atomic,
            "ok": self.ok,
            "stopped": self.stopped,
            "steps": [s.__dict__ for s in self.steps],
            "prepared": [p.as_dict() for p in self.prepared],
        }


@dataclass
class _Outcome:
    """How an attempt ended, before it is recorded."""

    status: str  # succeeded | failed | skipped
    counts: X.Counts | None = None
    error: str | None = None
    sqlstate: str | None = None
    transient: bool | None = None
    seconds: float = 0.0


class Runner:
    """Runs rollups on one pair of connections (data + ledger), reused across buckets."""

    def __init__(self, url: str | None = None, *, trigger: str = "manual", task_id: str | None = None,
                 lock_wait: float | None = None, should_stop: Callable[[], bool] | None = None,
                 stop_on: tuple[type[BaseException], ...] = (), pooled: bool = False,
                 on_step: Callable[[Bucket, StepResult], None] | None = None):
        if trigger not in TRIGGERS:
            raise InvalidInput(f"unknown trigger {trigger!r} (expected one of {', '.join(TRIGGERS)})")
        self.url = url or database_url()
        self.trigger = trigger
        self.task_id = task_id
        self.lock_wait = settings().lock_wait if lock_wait is None else lock_wait
        self.should_stop = should_stop or (lambda: False)
        self.stop_on = stop_on
        self.on_step = on_step  # told of every concluded step (progress views); it must not raise
        self.ledger = Ledger(self.url, pooled)  # pooled: a worker keeps its connections across tasks
        self._data = Session(self.url, pooled)
        self._halted = False  # an exception of stop_on ended a step
        self._pooled = pooled
        self._told = threading.Lock()  # one attempt concluded at a time (run_hours' lanes share it)

    # -- connections -------------------------------------------------------------------
    @property
    def data(self) -> psycopg.Connection:
        return self._data.conn

    def close(self) -> None:
        if self._halted and self._data._conn is not None:
            # a step was cut mid-statement: it may still run (and hold locks) on the server
            self._data._conn.cancel_safe()
        self._data.release()
        self.ledger.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stopping(self) -> bool:
        return self._halted or self.should_stop()

    # -- a rollup --------------------------------------------------------------------------
    def run(self, bucket: Bucket, steps: list[str] | tuple[str, ...] | None = None, *, atomic: bool = False,
            only_unfinished: bool = False, prepare: bool = True) -> RollupResult:
        """Run ``steps`` (default: all) of ``bucket``'s rollup and record every attempt.

        ``only_unfinished``: of those, only the steps that need work (missing, failed,
        dirty). ``prepare``: for a day, week or month, first aggregate its hours whose
        inputs are not done, since periods are built from hours.
        """
        chosen = steps_of(bucket.rollup, steps)
        result = RollupResult(uuid.uuid4(), bucket, atomic)
        if only_unfinished:
            todo = P.work(S.of(self.ledger.conn, bucket))
            chosen = [s for s in chosen if s.name in todo]
            if not chosen:
                return result
        if bucket.grain.parts is not None and prepare:
            blocked = self._prepare(bucket, result)
            if result.stopped:
                return result
            if blocked:
                for step in chosen:
                    self._conclude(result, step.name, None, _Outcome("failed", error=blocked, transient=True))
                return result
        hourly = bucket.grain.parts is None
        if hourly:  # before any step reads: a change claimed now is read by every step that follows
            self.ledger.call(S.claim_marks, [bucket.start], {s.source for s in chosen})
        if atomic:
            self._run_atomic(bucket, chosen, result)
        else:
            for step in chosen:
                if self.stopping():
                    result.stopped = True
                    break
                self._run_one(bucket, step, result)
        if hourly:
            self.ledger.call(S.clear_marks, [bucket.start])
        return result

    def _prepare(self, period: Bucket, result: RollupResult) -> str | None:
        """Aggregate the period's hours that are not ready; return why the period cannot run, if so."""
        try:
            todo = P.hours_to_prepare(self.ledger.conn, period)
        except Exception as exc:  # the period cannot even be planned: its steps' failure
            return f"inputs not ready: {X.describe_error(exc, self.url)}"
        failed: list[str] = []
        for hourly in self.run_hours([(p.bucket, list(p.steps)) for p in todo]):
            result.prepared.append(hourly)
            if hourly.stopped:
                result.stopped = True
                return None
            if any(s.step in PERIOD_INPUTS and s.status != "succeeded" for s in hourly.steps):
                failed.append(hourly.bucket.label)
        if failed:
            return (f"inputs not ready: {len(failed)} hour(s) of {period.label} could not be aggregated "
                    f"(first: {failed[0]}); see `tally runs --failed`")
        return None

    # -- many hours: set-based chunks ----------------------------------------------------------
    def run_hours(self, work: list[tuple[Bucket, list[str]]], jobs: int = 1) -> list[RollupResult]:
        """Run hours, each with the steps it needs, in set-based chunks of consecutive hours.

        For each chunk and step, one statement aggregates every hour of the chunk, and one
        transaction holds its rows, the ledger rows and the states of those hours, under
        the locks of every (step, hour), taken in time order. The outputs are the same as
        hour by hour, bit for bit. A chunk that cannot run whole (a lock busy, a failure)
        runs again hour by hour, so a failing hour is isolated and the others commit. A
        single hour runs as :meth:`run` does. ``jobs`` > 1: that many (chunk, step) pieces
        at once, each lane on its own connections (the steps of an hour are independent:
        each has its own lock, transaction and state). Returns one result per hour, in order.
        """
        work = sorted(work, key=lambda w: w[0])
        results = {b: RollupResult(uuid.uuid4(), b, False) for b, _ in work}
        if not work:
            return []
        hours = [b.start for b, _ in work]
        self.ledger.call(S.claim_marks, hours, {STEPS[s].source for _, steps in work for s in steps})
        pieces = deque(functools.partial(Runner._run_piece, step=step, run=run, results=results)
                       for step, run in self._pieces(work))
        try:
            self._run_lanes(pieces, jobs)
        except _Stop:
            for r in results.values():
                r.stopped = True
        self.ledger.call(S.clear_marks, hours)
        return [results[b] for b, _ in work]

    def run_periods(self, work: list[tuple[Bucket, list[str]]], jobs: int = 1) -> list[RollupResult]:
        """Days, weeks or months, each with the steps it needs, as :meth:`run` runs them; ``jobs``
        > 1: that many at once, each lane on its own connections (a period's steps read hourly
        rows only, and each period has its own locks, transactions and states). Returns one
        result per period, in order; a stop leaves the ones not begun out."""
        results: dict[Bucket, RollupResult] = {}

        def one(lane: Runner, bucket: Bucket, steps: list[str]) -> None:
            if lane.stopping():
                raise _Stop
            results[bucket] = result = lane.run(bucket, steps)
            if result.stopped:
                raise _Stop

        try:
            self._run_lanes(deque(functools.partial(one, bucket=b, steps=s) for b, s in work), jobs)
        except _Stop:
            pass
        return [results[b] for b, _ in work if b in results]

    def _run_piece(self, step: Step, run: list[Bucket], results: dict[Bucket, RollupResult]) -> None:
        """Consecutive hours of one step: as one chunk, else (a busy lock, a failure) hour by hour."""
        if len(run) > 1 and not self.stopping() and self._run_range(step, run, results):
            return
        for b in run:
            if self.stopping():
                raise _Stop
            self._run_one(b, step, results[b])

    def _run_lanes(self, pieces: deque, jobs: int) -> None:
        """``pieces`` (callables taking the lane's Runner) taken in order by ``jobs`` lanes: this
        runner (in the calling thread, where signals arrive) and runners of its own on their
        own connections, in threads; one lane: one after another, here."""
        if jobs <= 1 or len(pieces) <= 1:
            while pieces:
                pieces.popleft()(self)
            return
        lanes = [self] + [Runner(self.url, trigger=self.trigger, task_id=self.task_id, lock_wait=self.lock_wait,
                                 should_stop=self.should_stop, stop_on=self.stop_on, pooled=self._pooled,
                                 on_step=self.on_step) for _ in range(jobs - 1)]
        for lane in lanes[1:]:
            lane._told = self._told
        taking, ended, raised = threading.Lock(), threading.Event(), []

        def drain(lane: Runner) -> None:
            while not ended.is_set():
                if any(x._halted for x in lanes):
                    raise _Stop
                with taking:
                    if not pieces:
                        return
                    piece = pieces.popleft()
                piece(lane)

        def thread(lane: Runner) -> None:
            try:
                drain(lane)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                raised.append(exc)
                ended.set()

        threads = [threading.Thread(target=thread, args=(lane,), name=f"tally-lane-{i}", daemon=True)
                   for i, lane in enumerate(lanes[1:], 1)]
        for t in threads:
            t.start()
        try:
            drain(self)
        except BaseException:
            ended.set()  # the other lanes finish the piece they are in, then stop
            raise
        finally:
            for t in threads:
                t.join()
            for lane in lanes[1:]:
                self._halted = self._halted or lane._halted
                lane.close()
        if raised:
            raise raised[0]

    def _pieces(self, work: list[tuple[Bucket, list[str]]]) -> list[tuple[Step, list[Bucket]]]:
        """(step, consecutive hours) to run as one chunk each, in time order (then step order):
        each step's hours cut every ``width`` hours, the width following the step's source rows
        an hour (the planner's estimate over the span) up to its Step.chunk_rows, at most
        MAX_CHUNK_HOURS."""
        first, last = work[0][0].start, work[-1][0].end
        per_hour = {name: max(1, rows * 3600 // max(1, int((last - first).total_seconds())))
                    for name, rows in X.estimate_rows(self.data, first, last).items()}
        pieces: list[tuple[dt.datetime, int, Step, list[Bucket]]] = []
        for order, step in enumerate(steps_of(B.HOUR.rollup)):
            width = dt.timedelta(hours=max(1, min(MAX_CHUNK_HOURS, step.chunk_rows // per_hour[step.source])))
            chunk: list[Bucket] = []
            for b, steps in work:
                if step.name not in steps:
                    continue
                if chunk and b.start >= chunk[0].start + width:
                    pieces += [(run[0].start, order, step, run) for run in _consecutive(chunk)]
                    chunk = []
                chunk.append(b)
            pieces += [(run[0].start, order, step, run) for run in _consecutive(chunk)]
        return [(step, run) for _, _, step, run in sorted(pieces, key=lambda p: p[:2])]

    def _run_range(self, step: Step, hours: list[Bucket], results: dict[Bucket, RollupResult]) -> bool:
        """One chunk of one step in one transaction; False (nothing recorded) if it must go hour by hour."""
        conn = self.data
        t0 = time.monotonic()
        try:
            with conn.transaction():
                if not all(X.try_lock(conn, step, b) for b in hours):
                    raise X.BucketBusy(0.0)  # another run holds one of them: hour by hour, waiting as usual
                started = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                counts = X.run_range(conn, step, hours[0].start, hours[-1].end)
                attempts = S.done(conn, self._run_info(results[hours[0]]), step.name, hours,
                                  [counts.get(b.start, X.NOTHING).rows for b in hours], started,
                                  conn.info.backend_pid)
        except Exception as exc:
            if isinstance(exc, self.stop_on):  # a task's time limit: nothing of the chunk stays
                self._halted = True
                return True
            log.info("%s %s .. %s: %s; hour by hour instead", step.name, hours[0].label, hours[-1].label,
                     "a lock was busy" if isinstance(exc, X.BucketBusy) else X.describe_error(exc, self.url))
            return False
        seconds = (time.monotonic() - t0) / len(hours)
        for attempt in attempts:
            b = attempt.bucket
            self._conclude(results[b], step.name, attempt,
                           _Outcome("succeeded", counts=counts.get(b.start, X.NOTHING), seconds=seconds))
        return True

    # -- attempts --------------------------------------------------------------------------
    def _run_info(self, result: RollupResult) -> S.Run:
        return S.Run(self.trigger, self.task_id, result.run_id)

    def _begin(self, result: RollupResult, step: Step, conn: psycopg.Connection) -> S.Attempt:
        return self.ledger.call(S.begin, self._run_info(result), step.name, [result.bucket], conn.info.backend_pid)[0]

    def _failure(self, exc: BaseException, t0: float) -> _Outcome:
        if isinstance(exc, self.stop_on):
            self._halted = True
        transient = isinstance(exc, self.stop_on) or errors.is_transient(exc)
        return _Outcome("failed", error=X.describe_error(exc, self.url), sqlstate=errors.sqlstate(exc),
                        transient=transient, seconds=time.monotonic() - t0)

    def _conclude(self, result: RollupResult, step: str, attempt: S.Attempt | None, outcome: _Outcome) -> None:
        """The one place an attempt ends: its ledger row and state (a success's were written in
        its own transaction, with its rows), the rollup's result, the log, the progress."""
        with self._told:
            self._concluded(result, step, attempt, outcome)

    def _concluded(self, result: RollupResult, step: str, attempt: S.Attempt | None, outcome: _Outcome) -> None:
        if outcome.status == "failed":
            if attempt is not None:
                self.ledger.call(S.fail, [attempt], [outcome.error], [outcome.sqlstate], [outcome.transient])
            else:  # it never began: an atomic rollup's later step, or a period whose hours failed
                attempt = self.ledger.call(S.fail_unstarted, self._run_info(result), step, [result.bucket],
                                           outcome.error, bool(outcome.transient))[0]
        elif outcome.status == "skipped":
            attempt = self.ledger.call(S.skip, self._run_info(result), step, result.bucket,
                                       self.data.info.backend_pid, outcome.error)
        counts = outcome.counts
        sr = StepResult(step, outcome.status, counts and counts.rows, counts and counts.changed,
                        counts and counts.removed, outcome.error, attempt.attempt if attempt else 1,
                        outcome.seconds, outcome.transient)
        result.steps.append(sr)
        if sr.status == "failed":
            log.error("step failed: rollup=%s step=%s bucket=%s attempt=%s cause=%s",
                      result.bucket.rollup, sr.step, result.bucket.label, sr.attempt, sr.error)
        else:
            log.info("step %s: rollup=%s step=%s bucket=%s rows=%s %.3fs", sr.status, result.bucket.rollup,
                     sr.step, result.bucket.label, sr.rows, sr.seconds)
        if self.on_step is not None:
            self.on_step(result.bucket, sr)

    def _busy(self, step: Step, bucket: Bucket, waited: float, t0: float) -> _Outcome:
        return _Outcome("skipped", error=f"skipped: another run held the lock of {step.name} {bucket.label} "
                                         f"for {waited:.1f}s", seconds=time.monotonic() - t0)

    # -- per-step and atomic execution ------------------------------------------------------
    def _run_one(self, bucket: Bucket, step: Step, result: RollupResult) -> None:
        conn = self.data
        attempt: S.Attempt | None = None
        t0 = time.monotonic()
        try:
            with conn.transaction():
                X.lock(conn, step, bucket, self.lock_wait)
                attempt = self._begin(result, step, conn)
                counts = X.run_step(conn, step, bucket)
                S.succeed(conn, [attempt], [counts.rows])
        except X.BucketBusy as busy:
            self._conclude(result, step.name, None, self._busy(step, bucket, busy.waited, t0))
            return
        except Exception as exc:  # before it began (attempt None: say so), or in the step
            self._conclude(result, step.name, attempt, self._failure(exc, t0))
            return
        except BaseException:  # Ctrl-C, SystemExit: the transaction rolled back; say so, then stop
            if attempt is not None:
                self.ledger.call(S.fail, [attempt], [INTERRUPTED], [None], [True])
            raise
        self._conclude(result, step.name, attempt,
                       _Outcome("succeeded", counts=counts, seconds=time.monotonic() - t0))

    def _run_atomic(self, bucket: Bucket, steps: list[Step], result: RollupResult) -> None:
        conn = self.data
        done: list[tuple[Step, S.Attempt, X.Counts, float]] = []
        current: Step | None = None
        attempt: S.Attempt | None = None
        t0 = time.monotonic()
        try:
            with conn.transaction():
                for step in steps:
                    current, attempt, ts = step, None, time.monotonic()
                    X.lock(conn, step, bucket, self.lock_wait)
                    attempt = self._begin(result, step, conn)
                    counts = X.run_step(conn, step, bucket)
                    done.append((step, attempt, counts, time.monotonic() - ts))
                    current = attempt = None
                S.succeed(conn, [a for _, a, _, _ in done], [c.rows for _, _, c, _ in done])
        except BaseException as exc:
            if isinstance(exc, X.BucketBusy):
                outcome = self._busy(current, bucket, exc.waited, t0)
            elif isinstance(exc, Exception):
                outcome = self._failure(exc, t0)
            else:
                outcome = _Outcome("failed", error=INTERRUPTED, transient=True)
            where = f"step {current.name}" if current is not None else "commit"
            for step, began, _, secs in done:
                why = f"rolled back: the atomic rollup failed at {where}"
                if current is None:  # the commit itself failed: its cause belongs on every step
                    why = f"{why}: {outcome.error}"
                self._conclude(result, step.name, began, _Outcome("failed", error=why, transient=outcome.transient,
                                                                  sqlstate=outcome.sqlstate, seconds=secs))
            if current is not None:
                self._conclude(result, current.name, attempt, outcome)
                # the steps after it never ran: record them, so a retry of the failed steps runs them too
                for step in steps[steps.index(current) + 1:]:
                    self._conclude(result, step.name, None, _Outcome(
                        "failed", error=f"not run: the atomic rollup failed at {where}", transient=True))
            if not isinstance(exc, Exception):
                raise
            return
        for step, began, counts, secs in done:
            self._conclude(result, step.name, began, _Outcome("succeeded", counts=counts, seconds=secs))


# ---- the Python API (SPEC): plain synchronous functions ---------------------------------

def run_rollup(rollup: str, when, *, steps=None, atomic: bool = False, trigger: str = "manual",
               only_unfinished: bool = False, unseal: bool = False, url: str | None = None,
               task_id: str | None = None) -> RollupResult:
    """Run one rollup for the bucket starting at ``when`` (datetime, date or ISO text).

    A sealed bucket (final history) is refused (InvalidInput) unless ``unseal``, and even then
    if retention purged what it is built from."""
    bucket = B.as_bucket(rollup, when)
    with Runner(url, trigger=trigger, task_id=task_id) as runner:
        P.check_sealed(runner.ledger.conn, bucket, [s.name for s in steps_of(rollup, steps)], unseal)
        return runner.run(bucket, steps, atomic=atomic, only_unfinished=only_unfinished)


def hourly_rollup(hour, **kw) -> RollupResult:
    """execution_metrics, user_activity, credit_consumption for one hour."""
    return run_rollup("hourly", hour, **kw)


def daily_rollup(date, **kw) -> RollupResult:
    """daily_metrics for one UTC day (its missing, failed or dirty hours first)."""
    return run_rollup("daily", date, **kw)


def weekly_rollup(week_start, **kw) -> RollupResult:
    """weekly_metrics for one ISO week, given by its Monday."""
    return run_rollup("weekly", week_start, **kw)


def monthly_rollup(month, **kw) -> RollupResult:
    """monthly_metrics for one calendar month, given by its first day (or 'YYYY-MM')."""
    return run_rollup("monthly", month, **kw)


def _one_step(rollup: str, step: str, start, end, url) -> int:
    bucket = B.as_bucket(rollup, start)
    if end is not None and B.as_bucket(rollup, end).start != bucket.end:
        raise InvalidInput(f"invalid bucket end {end!r}: the {bucket.kind} {bucket.label} ends "
                           f"{bucket.end.isoformat()}")
    result = run_rollup(rollup, bucket, steps=[step], url=url)
    sr = result.steps[0]
    if sr.status == "failed":
        raise StepFailed(f"{step} {bucket.label} failed: {sr.error}")
    return sr.rows or 0


def aggregate_execution_metrics(start, end=None, *, url: str | None = None) -> int:
    """Aggregate one hour of executions into execution_metrics_hourly; commit; return rows written."""
    return _one_step("hourly", "execution_metrics", start, end, url)


def aggregate_user_activity(start, end=None, *, url: str | None = None) -> int:
    """Aggregate one hour of user activity into user_activity_hourly; commit; return rows written."""
    return _one_step("hourly", "user_activity", start, end, url)


def aggregate_credit_consumption(start, end=None, *, url: str | None = None) -> int:
    """Aggregate one hour of credits into credit_consumption_hourly; commit; return rows written."""
    return _one_step("hourly", "credit_consumption", start, end, url)


def aggregate_daily_metrics(date, end=None, *, url: str | None = None) -> int:
    """Aggregate one day into execution_metrics_daily; commit; return rows written."""
    return _one_step("daily", "daily_metrics", date, end, url)
