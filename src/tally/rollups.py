"""The orchestrator: runs the steps of a rollup for one bucket.

Per-step mode (the seed's design): each step runs in its own transaction under a
per-bucket advisory lock and commits on its own; a failed step rolls back alone,
the steps before it stay committed, the steps after it still run, and the rollup
reports failure. Atomic mode: all steps in one transaction, all or nothing.
Every attempt is written to the ledger on a separate connection, so a failed
step's row survives its rollback.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from . import buckets as B
from .buckets import Bucket
from .config import settings
from .db import connect, database_url, scrub
from .errors import InvalidInput, TallyError
from .ledger import Ledger
from .steps import LN_GAMMA, LN_HALF_WIDTH, PERIOD_INPUTS, ROLLUP_STEPS, Step, lock_key, steps_of

log = logging.getLogger("tally")

TRIGGERS = ("schedule", "manual", "backfill", "retry", "catch-up")


class StepFailed(TallyError):
    """A single step (called through the step API) failed; its ledger row says why."""


class _BucketBusy(Exception):
    def __init__(self, waited: float):
        self.waited = waited


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


@dataclass
class RollupResult:
    run_id: uuid.UUID
    bucket: Bucket
    atomic: bool
    steps: list[StepResult] = field(default_factory=list)
    prepared: list["RollupResult"] = field(default_factory=list)  # hours aggregated first (period rollups)

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
            "steps": [s.__dict__ for s in self.steps],
            "prepared": [p.as_dict() for p in self.prepared],
        }


def describe_error(exc: BaseException, url: str | None = None) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, pgerrors.QueryCanceled):
        text = f"statement timeout: {text}"
    return scrub(f"{type(exc).__name__}: {text}", url)[:2000]


# Planner settings per step, SET LOCAL in the step's own transaction (docs/PERFORMANCE.md).
# Every step: no JIT (compiling costs more than these statements run) and hash tables that fit
# in memory. user_activity: a bitmap scan of the hour; events are stored session by session,
# so an index scan in time order visits one heap page per event (30x the pages at 4 M a day),
# and the planner, seeing a time-ordered table, prefers it. A value None restores the session's
# own (atomic mode runs several steps in one transaction).
STEP_SETTINGS: dict[str, dict[str, str | None]] = {
    "*": {"jit": "off", "work_mem": "64MB", "enable_indexscan": None, "enable_seqscan": None,
          # the hourly reads (CREATE TEMP TABLE ... AS) may run in parallel: cheaper Gather rows let
          # the planner take a parallel scan for a busy hour; min_parallel_index_scan_size (512 kB of
          # index) still keeps a quiet hour serial
          "parallel_setup_cost": "100", "parallel_tuple_cost": "0.001"},
    "user_activity": {"work_mem": "256MB", "enable_indexscan": "off", "enable_seqscan": "off"},
}


def step_settings(step: Step) -> dict[str, str | None]:
    """The planner settings ``step`` runs with (see STEP_SETTINGS)."""
    return {**STEP_SETTINGS["*"], **STEP_SETTINGS.get(step.name, {})}


def apply_step_settings(conn: psycopg.Connection, step: Step) -> None:
    """SET LOCAL ``step``'s planner settings in the open transaction (None: the session's own)."""
    tuning = step_settings(step)
    conn.execute("SELECT set_config(s.name, coalesce(s.value, p.reset_val), true) "
                 "FROM unnest(%s::text[], %s::text[]) AS s(name, value) JOIN pg_settings p USING (name)",
                 [list(tuning), list(tuning.values())])


def _statement_timeout(step: Step) -> float:
    raw = os.environ.get(f"TALLY_STATEMENT_TIMEOUT_{step.name.upper()}")
    if raw:
        try:
            return float(raw)
        except ValueError:
            raise InvalidInput(f"TALLY_STATEMENT_TIMEOUT_{step.name.upper()}={raw!r} is not a number") from None
    return settings().statement_timeout


class Runner:
    """Runs rollups on one pair of connections (data + ledger), reused across buckets."""

    def __init__(self, url: str | None = None, *, trigger: str = "manual", task_id: str | None = None,
                 lock_wait: float | None = None,
                 on_step: Callable[[Bucket, StepResult], None] | None = None):
        if trigger not in TRIGGERS:
            raise InvalidInput(f"unknown trigger {trigger!r} (expected one of {', '.join(TRIGGERS)})")
        self.url = url or database_url()
        self.trigger = trigger
        self.task_id = task_id
        self.lock_wait = settings().lock_wait if lock_wait is None else lock_wait
        self.on_step = on_step
        self.ledger = Ledger(self.url)
        self._data: psycopg.Connection | None = None

    # -- connections -------------------------------------------------------------------
    @property
    def data(self) -> psycopg.Connection:
        if self._data is None or self._data.closed or self._data.broken:
            if self._data is not None:
                self._data.close()
            self._data = connect(self.url, autocommit=True)
            self._data.execute("SET TIME ZONE 'UTC'")
        return self._data

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        self.ledger.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one step, inside an open transaction ----------------------------------------------
    def _execute_step(self, conn: psycopg.Connection, step: Step, bucket: Bucket) -> tuple[int, int, int]:
        key = lock_key(step, int(bucket.start.timestamp()) // 3600)
        started = time.monotonic()
        if self.lock_wait <= 0:
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", key).fetchone()[0]:
                raise _BucketBusy(0.0)
        else:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(self.lock_wait * 1000)}ms"])
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", key)
            except pgerrors.LockNotAvailable:
                raise _BucketBusy(time.monotonic() - started) from None
            conn.execute("SELECT set_config('lock_timeout', '0', true)")
        waited = time.monotonic() - started
        if waited > 1:
            log.info("%s %s: waited %.1fs for another run of this bucket", step.name, bucket, waited)
        timeout = _statement_timeout(step)
        if timeout > 0:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{int(timeout * 1000)}ms"])
        apply_step_settings(conn, step)
        params = dict(start=bucket.start, end=bucket.end, bucket=bucket.start.date(),
                      ln_gamma=LN_GAMMA, ln_half_width=LN_HALF_WIDTH)
        first_run = False
        if step.reads_separately:
            # under the bucket's lock: no other run can add this hour's rows before we commit
            first_run = not conn.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE hour = %s)").format(
                    sql.Identifier("analytics", step.table)), [bucket.start]).fetchone()[0]
            # a utility statement takes no bound parameters: the bucket's times and the sketch's
            # constant are quoted client-side (they come from Bucket and steps.py, never from text)
            with psycopg.ClientCursor(conn) as cur:
                cur.execute(step.materialize_statement(), params)
        rows, changed, removed = conn.execute(step.statement(first_run), params).fetchone()
        return rows, changed, removed

    # -- a rollup --------------------------------------------------------------------------
    def run(self, bucket: Bucket, steps: list[str] | tuple[str, ...] | None = None, *, atomic: bool = False,
            only_unfinished: bool = False, prepare: bool = True) -> RollupResult:
        """Run ``steps`` (default: all) of ``bucket``'s rollup and record every attempt.

        ``only_unfinished``: run only the steps whose latest attempt has not succeeded
        (a retry). ``prepare``: for day/week/month, first aggregate the hours of the
        period that are missing, failed or dirty, since periods are built from hours.
        """
        chosen = steps_of(bucket.rollup, steps)
        result = RollupResult(uuid.uuid4(), bucket, atomic)
        if only_unfinished:
            latest = self.ledger.latest(bucket)
            chosen = [s for s in chosen if latest.get(s.name) != "succeeded"]
            if not chosen:
                return result
        if bucket.rollup != "hourly" and prepare:
            try:
                blocked = self._prepare_hours(bucket, result)
            except Exception as exc:  # the period cannot even be planned: record it as its steps' failure
                blocked = f"inputs not ready: {describe_error(exc, self.url)}"
            if blocked:
                for step in chosen:
                    attempt = self.ledger.start(result.run_id, bucket, step.name, self.trigger, None, self.task_id)
                    self.ledger.finish(attempt, "failed", error=blocked)
                    self._record(result, StepResult(step.name, "failed", error=blocked, attempt=attempt.attempt))
                return result
        if bucket.rollup == "hourly":
            self.ledger.claim_dirty(bucket)
        if atomic:
            self._run_atomic(bucket, chosen, result)
        else:
            for step in chosen:
                self._run_one(bucket, step, result)
        if bucket.rollup == "hourly":
            self.ledger.clear_dirty(bucket, ROLLUP_STEPS["hourly"])
        return result

    def _record(self, result: RollupResult, sr: StepResult) -> None:
        result.steps.append(sr)
        if sr.status == "failed":
            log.error("step failed: rollup=%s step=%s bucket=%s attempt=%s cause=%s",
                      result.bucket.rollup, sr.step, result.bucket.label, sr.attempt, sr.error)
        else:
            log.info("step %s: rollup=%s step=%s bucket=%s rows=%s %.3fs", sr.status, result.bucket.rollup,
                     sr.step, result.bucket.label, sr.rows, sr.seconds)
        if self.on_step is not None:
            self.on_step(result.bucket, sr)

    def _run_one(self, bucket: Bucket, step: Step, result: RollupResult) -> None:
        conn = self.data
        attempt = self.ledger.start(result.run_id, bucket, step.name, self.trigger, conn.info.backend_pid, self.task_id)
        t0 = time.monotonic()
        try:
            with conn.transaction():
                rows, changed, removed = self._execute_step(conn, step, bucket)
        except _BucketBusy as busy:
            msg = f"skipped: another run held the lock of {step.name} {bucket.label} for {busy.waited:.1f}s"
            self.ledger.finish(attempt, "skipped", error=msg)
            self._record(result, StepResult(step.name, "skipped", error=msg, attempt=attempt.attempt,
                                            seconds=time.monotonic() - t0))
            return
        except Exception as exc:
            msg = describe_error(exc, self.url)
            self.ledger.finish(attempt, "failed", error=msg)
            self._record(result, StepResult(step.name, "failed", error=msg, attempt=attempt.attempt,
                                            seconds=time.monotonic() - t0))
            return
        except BaseException:  # Ctrl-C, SystemExit: the transaction rolled back; say so, then stop
            self.ledger.finish(attempt, "failed", error="interrupted before commit; rolled back")
            raise
        self.ledger.finish(attempt, "succeeded", rows=rows)
        self._record(result, StepResult(step.name, "succeeded", rows, changed, removed, attempt=attempt.attempt,
                                        seconds=time.monotonic() - t0))

    def _run_atomic(self, bucket: Bucket, steps: list[Step], result: RollupResult) -> None:
        conn = self.data
        done: list[tuple[Step, object, tuple[int, int, int], float]] = []
        current = None
        t0 = time.monotonic()
        try:
            with conn.transaction():
                for step in steps:
                    current = (step, self.ledger.start(result.run_id, bucket, step.name, self.trigger,
                                                       conn.info.backend_pid, self.task_id))
                    ts = time.monotonic()
                    counts = self._execute_step(conn, step, bucket)
                    done.append((current[0], current[1], counts, time.monotonic() - ts))
                    current = None
        except BaseException as exc:
            busy = isinstance(exc, _BucketBusy)
            if busy:
                msg = f"skipped: another run held the lock of {current[0].name} {bucket.label}"
            elif isinstance(exc, Exception):
                msg = describe_error(exc, self.url)
            else:
                msg = "interrupted before commit; rolled back"
            where = f"step {current[0].name}" if current is not None else "commit"
            for step, attempt, _, secs in done:
                why = f"rolled back: the atomic rollup failed at {where}"
                if current is None:  # the commit itself failed: its cause belongs on every step
                    why = f"{why}: {msg}"
                self.ledger.finish(attempt, "failed", error=why)
                self._record(result, StepResult(step.name, "failed", error=why, attempt=attempt.attempt, seconds=secs))
            if current is not None:
                status = "skipped" if busy else "failed"
                self.ledger.finish(current[1], status, error=msg)
                self._record(result, StepResult(current[0].name, status, error=msg, attempt=current[1].attempt,
                                                seconds=time.monotonic() - t0))
                # the steps after it never ran: record them, so a retry of the failed steps runs them too
                for step in steps[steps.index(current[0]) + 1:]:
                    why = f"not run: the atomic rollup failed at {where}"
                    attempt = self.ledger.start(result.run_id, bucket, step.name, self.trigger, None, self.task_id)
                    self.ledger.finish(attempt, "failed", error=why)
                    self._record(result, StepResult(step.name, "failed", error=why, attempt=attempt.attempt))
            if not isinstance(exc, Exception):
                raise
            return
        for step, attempt, (rows, changed, removed), secs in done:
            self.ledger.finish(attempt, "succeeded", rows=rows)
            self._record(result, StepResult(step.name, "succeeded", rows, changed, removed,
                                            attempt=attempt.attempt, seconds=secs))

    def _prepare_hours(self, bucket: Bucket, result: RollupResult) -> str | None:
        """Aggregate the period's hours that are not ready; return why the period cannot run, if so."""
        failed: list[str] = []
        for hour, dirty in self.ledger.hours_to_prepare(bucket.start, bucket.end, PERIOD_INPUTS):
            hourly = self.run(B.bucket("hourly", hour), only_unfinished=not dirty, prepare=False)
            result.prepared.append(hourly)
            if any(s.step in PERIOD_INPUTS and s.status != "succeeded" for s in hourly.steps):
                failed.append(hourly.bucket.label)
        if failed:
            return (f"inputs not ready: {len(failed)} hour(s) of {bucket.label} could not be aggregated "
                    f"(first: {failed[0]}); see `tally runs --failed`")
        return None


# ---- the Python API (SPEC): plain synchronous functions ---------------------------------

def _as_start(rollup: str, value) -> Bucket:
    if isinstance(value, Bucket):
        return value
    if isinstance(value, str):
        return B.parse_bucket(rollup, value)
    if isinstance(value, dt.datetime):
        v = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        b = B.bucket(rollup, v)
        if b.start != v.astimezone(dt.timezone.utc):
            raise InvalidInput(f"invalid {B.KIND[rollup]} {value.isoformat()!r}: not the start of a {B.KIND[rollup]}")
        return b
    if isinstance(value, dt.date):
        return _as_start(rollup, dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc))
    raise InvalidInput(f"invalid {B.KIND[rollup]} {value!r}")


def run_rollup(rollup: str, when, *, steps=None, atomic: bool = False, trigger: str = "manual",
               only_unfinished: bool = False, url: str | None = None, task_id: str | None = None,
               on_step=None) -> RollupResult:
    """Run one rollup for the bucket starting at ``when`` (datetime, date or ISO text)."""
    bucket = _as_start(rollup, when)
    with Runner(url, trigger=trigger, task_id=task_id, on_step=on_step) as runner:
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
    bucket = _as_start(rollup, start)
    if end is not None:
        e = end if not isinstance(end, str) else B.parse_time(end, "end") if rollup == "hourly" else B.parse_date(end)
        if isinstance(e, dt.datetime) and e.tzinfo is None:
            e = e.replace(tzinfo=dt.timezone.utc)
        if isinstance(e, dt.date) and not isinstance(e, dt.datetime):
            e = dt.datetime(e.year, e.month, e.day, tzinfo=dt.timezone.utc)
        if e != bucket.end:
            raise InvalidInput(f"invalid bucket end {end!r}: a {B.KIND[rollup]} starting {bucket.label} ends {bucket.end.isoformat()}")
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
