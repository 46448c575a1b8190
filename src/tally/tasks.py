"""The Celery app and tasks: thin shells over the rollup runner.

Tasks take plain ISO arguments and run synchronously (psycopg 3, two connections
per task, closed at its end), so one worker process runs any number of tasks in
a row. The ledger, not the result backend, is the record of what is done:

* a retry (``self.retry`` through ``autoretry_for``) and a redelivery (a worker
  that died mid-task) run only the steps of the bucket whose latest attempt has
  not succeeded, with ``trigger='retry'``;
* retries are for transient errors only (a lost connection, a lock or statement
  timeout, a failed step); invalid input fails at once;
* on the final failure: an ERROR line per failed step and the alert webhook;
* ``acks_late`` with reject-on-worker-lost and prefetch 1: a killed worker's
  task is delivered again (Redis: after ``TALLY_VISIBILITY_TIMEOUT``).

Run a worker with ``tally worker`` (or ``celery -A tally.tasks worker``), the
schedule with ``tally beat``, the UI with ``tally flower``.
"""
from __future__ import annotations

import datetime as dt
import inspect
import ipaddress
import logging
import os

import psycopg
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.schedules import crontab

from . import alerts
from . import buckets as B
from .config import _float, settings
from .errors import InvalidInput, TallyError, Unreachable
from .queries import query
from .rollups import RollupResult, Runner
from .steps import PERIOD_INPUTS, steps_of

log = logging.getLogger("tally")

QUEUE = "tally"


class RollupFailed(TallyError):
    """Steps failed (their ledger rows say why); a retry runs only those steps.

    ``failures``: dicts with ``rollup``, ``bucket``, ``step``, ``attempt``, ``error``
    (plain data, so the exception survives the JSON result backend).
    """

    def __init__(self, failures: list[dict]):
        super().__init__(failures)
        self.failures = failures

    def __str__(self) -> str:
        return "; ".join(f"{f['rollup']} {f['bucket']} {f['step']} failed (attempt {f['attempt']}): "
                         f"{(f['error'] or '').splitlines()[0] if f['error'] else '?'}" for f in self.failures)

    @classmethod
    def of(cls, results: list[RollupResult]) -> "RollupFailed":
        return cls([dict(rollup=r.bucket.rollup, bucket=r.bucket.label, step=s.step, attempt=s.attempt, error=s.error)
                    for r in results for s in r.failed])


# Retried: the database went away or timed out (psycopg's OperationalError covers a lost
# connection, QueryCanceled and LockNotAvailable), a step failed, the soft time limit hit.
# Never retried: InvalidInput (a ValueError), a bug (anything else).
TRANSIENT = (RollupFailed, Unreachable, psycopg.OperationalError, SoftTimeLimitExceeded)


def _celery_settings() -> dict:
    """Broker, reliability and schedule settings, from the environment."""
    s = settings()
    hard = _float("TALLY_TASK_TIME_LIMIT", 3300.0, minimum=1)
    # Redis redelivers an unacknowledged message after this: longer than any task, retry delay included.
    visibility = _float("TALLY_VISIBILITY_TIMEOUT", 3600.0, minimum=1)
    transport = {
        "visibility_timeout": visibility,
        # look for the messages of dead workers often enough for a short visibility timeout to hold
        "unacked_restore_interval": max(1, min(60, int(visibility // 10))),
        "unacked_restore_throttle": 1,
    }
    prefix = os.environ.get("TALLY_BROKER_PREFIX")
    if prefix:  # several deployments (or test runs) sharing one Redis
        transport["global_keyprefix"] = prefix
    redis = s.broker_url.startswith(("redis://", "rediss://", "unix://"))
    return dict(
        broker_url=s.broker_url,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # Results only help callers wait; the ledger is the record.
        result_backend=s.broker_url if redis else None,
        result_backend_transport_options={"global_keyprefix": prefix} if prefix else {},
        result_expires=dt.timedelta(days=1),
        result_extended=True,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=hard,
        task_soft_time_limit=hard * 0.9,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,  # Flower builds its task list from these
        task_send_sent_event=True,
        task_track_started=True,
        enable_utc=True,
        timezone="UTC",
        # Every hour at minute 5: catch-up aggregates whatever is missing, failed or dirty, so a
        # stopped worker or scheduler leaves no permanent gap.
        beat_schedule={"catch-up": {"task": "tally.catch_up", "schedule": crontab(minute=5)}},
        beat_schedule_filename=str(s.home / "celerybeat-schedule"),
    )


app = Celery("tally")
app.conf.update(_celery_settings())


class TallyTask(Task):
    """Alerts on a task's final failure (not on a retry)."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, RollupFailed):
            failures = exc.failures
        else:
            rollup, bucket = self.target(args, kwargs)
            failures = [dict(rollup=rollup, bucket=bucket, step=None, attempt=None,
                             error=f"{type(exc).__name__}: {exc}")]
        alerts.task_failed(self.name, task_id, self.request.retries + 1, failures)

    def target(self, args, kwargs) -> tuple[str | None, str | None]:
        """(rollup, bucket) as the caller named them, for a failure outside any step."""
        try:
            given = inspect.signature(self.run).bind_partial(*(args or ()), **(kwargs or {})).arguments
        except TypeError:
            return getattr(self, "rollup", None), None
        bucket = next((given[k] for k in ("hour", "date", "week", "month", "bucket") if given.get(k)), None)
        return getattr(self, "rollup", None) or given.get("rollup"), None if bucket is None else str(bucket)


class RollupTask(TallyTask):
    """A rollup of one bucket; no bucket means the last complete one *when the task is sent*."""

    rollup = ""
    bucket_arg = ""

    def apply_async(self, args=None, kwargs=None, **options):
        # Pinned at send time (or at the eta): a task that runs late still aggregates the
        # bucket it was sent for, and its retries carry the same bucket.
        args, kwargs = list(args or ()), dict(kwargs or {})
        if (args[0] if args else kwargs.get(self.bucket_arg)) is None:
            when = options.get("eta") or dt.datetime.now(B.UTC) + dt.timedelta(seconds=options.get("countdown") or 0)
            if isinstance(when, dt.datetime) and when.tzinfo is None:
                when = when.replace(tzinfo=B.UTC)
            label = B.last_complete(self.rollup, when).label
            if args:
                args[0] = label
            else:
                kwargs[self.bucket_arg] = label
        return super().apply_async(args, kwargs, **options)

    def bucket(self, value: str | None) -> B.Bucket:
        if value is not None:
            return B.parse_bucket(self.rollup, value)
        # Sent by name without a bucket (send_task bypasses apply_async): the eta, else now - loudly.
        when = dt.datetime.fromisoformat(self.request.eta) if self.request.eta else None
        chosen = B.last_complete(self.rollup, when)
        log.warning("%s was sent without a %s: running %s, the last complete one at %s",
                    self.name, self.bucket_arg, chosen.label, "its eta" if when else "run time")
        return chosen


OPTIONS = dict(
    bind=True,
    autoretry_for=TRANSIENT,
    retry_kwargs={"max_retries": settings().max_retries, "countdown": settings().retry_delay},
    retry_backoff=False,
    acks_late=True,
    reject_on_worker_lost=True,
)


def _again(task: Task) -> bool:
    """A retry, or a message delivered again because its worker died."""
    return task.request.retries > 0 or bool((task.request.delivery_info or {}).get("redelivered"))


def _summary(result: RollupResult) -> dict:
    return dict(rollup=result.bucket.rollup, bucket=result.bucket.label, ok=result.ok, prepared=len(result.prepared),
                steps=[dict(step=s.step, status=s.status, rows=s.rows, attempt=s.attempt) for s in result.steps])


def _run(task: Task, bucket: B.Bucket, *, trigger: str, steps=None, atomic: bool = False,
         force: bool = True) -> dict:
    """Run ``bucket``; a retry or redelivery (or ``force=False``) runs only unfinished steps."""
    again = _again(task)
    with Runner(trigger="retry" if again else trigger, task_id=task.request.id) as runner:
        if task.request.delivery_info and task.request.delivery_info.get("redelivered"):
            runner.ledger.reap_abandoned()  # the dead worker's 'running' rows, once their sessions are gone
        only_unfinished = again or (not force and not _stale(runner, bucket))
        result = runner.run(bucket, steps, atomic=atomic, only_unfinished=only_unfinished)
    if not result.ok:
        raise RollupFailed.of([result])
    return _summary(result)


def _stale(runner: Runner, bucket: B.Bucket) -> bool:
    """Source rows of ``bucket`` changed since it succeeded (so its succeeded steps are out of date)."""
    row = runner.ledger.conn.execute(query("bucket_stale"), dict(
        rollup=bucket.rollup, start=bucket.start, end=bucket.end, inputs=list(PERIOD_INPUTS))).fetchone()
    return bool(row[0])


def _rollup(task: RollupTask, when: str | None, steps, atomic: bool) -> dict:
    bucket = task.bucket(when)
    steps_of(task.rollup, steps)  # an unknown step is invalid input: fails now, never retried
    return _run(task, bucket, trigger="schedule", steps=steps, atomic=atomic)


@app.task(name="tally.hourly_rollup", base=RollupTask, rollup="hourly", bucket_arg="hour", **OPTIONS)
def hourly_rollup(self, hour: str | None = None, steps: list[str] | None = None, atomic: bool = False) -> dict:
    """execution_metrics, user_activity, credit_consumption for one hour (ISO, on the hour)."""
    return _rollup(self, hour, steps, atomic)


@app.task(name="tally.daily_rollup", base=RollupTask, rollup="daily", bucket_arg="date", **OPTIONS)
def daily_rollup(self, date: str | None = None, steps: list[str] | None = None, atomic: bool = False) -> dict:
    """daily_metrics for one UTC day (YYYY-MM-DD); its unready hours first."""
    return _rollup(self, date, steps, atomic)


@app.task(name="tally.weekly_rollup", base=RollupTask, rollup="weekly", bucket_arg="week", **OPTIONS)
def weekly_rollup(self, week: str | None = None, steps: list[str] | None = None, atomic: bool = False) -> dict:
    """weekly_metrics for one ISO week, given by its Monday."""
    return _rollup(self, week, steps, atomic)


@app.task(name="tally.monthly_rollup", base=RollupTask, rollup="monthly", bucket_arg="month", **OPTIONS)
def monthly_rollup(self, month: str | None = None, steps: list[str] | None = None, atomic: bool = False) -> dict:
    """monthly_metrics for one calendar month (YYYY-MM)."""
    return _rollup(self, month, steps, atomic)


@app.task(name="tally.backfill_bucket", base=TallyTask, **OPTIONS)
def backfill_bucket(self, rollup: str, bucket: str, force: bool = False) -> dict:
    """One bucket of a backfill. Without ``force``, only its unfinished steps — all of them
    if its source changed since they succeeded; nothing if it is done."""
    if bucket is None:
        raise InvalidInput(f"backfill_bucket needs a bucket for the {rollup} rollup")
    return _run(self, B.parse_bucket(rollup, bucket), trigger="backfill", force=force)


@app.task(name="tally.catch_up", base=TallyTask, **OPTIONS)
def catch_up(self) -> dict:
    """Every missing, failed or dirty bucket, hourly first (scheduled every hour at minute 5)."""
    from .catchup import catch_up as run_catch_up

    result = run_catch_up(trigger="retry" if _again(self) else "catch-up")
    if not result.ok:
        raise RollupFailed.of(result.failed)
    return dict(ok=True, buckets=len(getattr(result, "results", ()) or ()))


# ---- worker, beat, flower ------------------------------------------------------------------

def check_broker() -> None:
    """Raise Unreachable (exit 3) unless the broker answers within a few seconds."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # kombu raises OperationalError or the transport's own errors
        raise Unreachable(f"cannot reach the broker {_redact(app.conf.broker_url)}: {exc}") from None


def _redact(url: str) -> str:
    from .db import redact

    return redact(url)


def _start(argv: list[str]) -> int:
    """Run a celery sub-command in this process; its usage errors are invalid input."""
    import click

    try:
        code = app.start(argv)
    except click.ClickException as exc:
        raise InvalidInput(exc.format_message()) from None
    return code or 0


def run_worker(extra: list[str], *, concurrency: int | None, loglevel: str) -> int:
    check_broker()
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={QUEUE}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    return _start(argv + extra)


def run_beat(extra: list[str], *, loglevel: str) -> int:
    check_broker()
    settings().home.mkdir(parents=True, exist_ok=True)
    return _start(["beat", f"--loglevel={loglevel}", f"--schedule={app.conf.beat_schedule_filename}", *extra])


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def flower_auth(address: str) -> str | None:
    """TALLY_FLOWER_AUTH, checked; refuses (invalid input) to bind anything but loopback without it."""
    auth = settings().flower_auth
    if auth is not None and (":" not in auth or auth.startswith(":") or auth.endswith(":")):
        raise InvalidInput("TALLY_FLOWER_AUTH must be user:password")
    if auth is None and not _loopback(address):
        raise InvalidInput(f"refusing to serve Flower on {address or 'every address'!r} without "
                           "TALLY_FLOWER_AUTH=user:password (Flower can revoke tasks and shows their arguments)")
    return auth


def run_flower(extra: list[str], *, address: str, port: int, auth: str | None) -> int:
    """Flower on ``address:port`` with basic auth ``auth`` (see :func:`flower_auth`)."""
    check_broker()
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if auth:
        argv.append(f"--basic-auth={auth}")  # in-process: the password never shows in `ps`
    return _start(argv + extra)
