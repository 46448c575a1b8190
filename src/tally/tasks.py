"""The Celery app and tasks: thin shells over the rollup runner.

Tasks take plain ISO arguments and run synchronously (psycopg 3), so one worker
process runs any number of tasks in a row. The state of each bucket (tally/state.py),
not the result backend, is the record of what is done:

* retries are for transient failures only (tally/errors.py: a lost connection, a
  serialization failure or deadlock, a lock or statement timeout, exhausted
  resources, the task's own time limit), declared once on :class:`TallyTask`, backing
  off exponentially with jitter from ``TALLY_RETRY_DELAY``, capped below the broker's
  visibility timeout; a data, constraint or SQL error fails the task at once with its
  final-failure alert (when a task has both kinds, it alerts at once for the permanent
  ones and retries the rest);
* a retry and a redelivery (a worker that died mid-task) run only the steps that are
  not done, with ``trigger='retry'``;
* on the final failure: an ERROR line per failed step and the alert webhook;
* ``acks_late`` with reject-on-worker-lost and prefetch 1: a killed worker's
  task is delivered again (Redis: after ``TALLY_VISIBILITY_TIMEOUT``).

Run a worker with ``tally worker`` (or ``celery -A tally.tasks worker``), the
schedule with ``tally beat``, the UI with ``tally flower``.
"""
from __future__ import annotations

import datetime as dt
import inspect
import json
import ipaddress
import logging
import random
import uuid

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.schedules import crontab

from . import alerts
from . import buckets as B
from . import plan as P
from . import state as S
from .config import settings
from .db import redact
from .errors import InvalidInput, TallyError, Unreachable
from .rollups import TRIGGERS, RollupResult, Runner
from .state import State
from .steps import steps_of

log = logging.getLogger("tally")



class RollupFailed(TallyError):
    """Steps failed (their ledger rows say why).

    ``failures``: dicts with ``rollup``, ``bucket``, ``step``, ``attempt``, ``error``,
    ``transient`` (plain data, so the exception survives the JSON result backend);
    ``alerted``: their alert went out already (a permanent failure of an earlier attempt).
    """

    def __init__(self, failures: list[dict], alerted: bool = False):
        super().__init__(failures, alerted)
        self.failures = failures
        self.alerted = alerted

    def __str__(self) -> str:
        return "; ".join(f"{f['rollup']} {f['bucket']} {f['step']} failed (attempt {f['attempt']}): "
                         f"{(f['error'] or '').splitlines()[0] if f['error'] else '?'}" for f in self.failures)


class TransientFailure(RollupFailed):
    """Some step failed in a way a second try may cure: the task is retried."""


class PermanentFailure(RollupFailed):
    """Every failure is permanent (a data, constraint or SQL error): the task fails at once."""


def _failures(results: list[RollupResult]) -> list[dict]:
    out = []
    for r in results:
        for sub in [*r.prepared, r]:
            out += [dict(rollup=sub.bucket.rollup, bucket=sub.bucket.label, step=s.step, attempt=s.attempt,
                         error=s.error, transient=bool(s.transient)) for s in sub.failed]
    return out


def _celery_settings() -> dict:
    """Broker, reliability and schedule settings, from the environment."""
    s = settings()
    # The soft limit stops a task cleanly (its step is recorded failed, then retried); the hard
    # limit, a minute later, kills a process that did not stop.
    soft = s.task_time_limit
    # Redis redelivers an unacknowledged message after this: longer than any task, retry delay included.
    visibility = s.visibility_timeout
    transport = {
        "visibility_timeout": visibility,
        # look for the messages of dead workers often enough for a short visibility timeout to hold
        "unacked_restore_interval": max(1, min(60, int(visibility // 10))),
        "unacked_restore_throttle": 1,
    }
    prefix = s.broker_prefix
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
        task_default_queue=s.queue,
        task_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=soft,
        task_time_limit=soft + 60,
        worker_prefetch_multiplier=1,
        # broker gone: the running task could no longer be acknowledged and will be delivered again
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,  # Flower builds its task list from these
        task_send_sent_event=True,
        task_track_started=True,
        enable_utc=True,
        timezone="UTC",
        # Every hour at minute 5: catch-up aggregates whatever is missing, failed or dirty, so a
        # stopped worker or scheduler leaves no permanent gap.
        beat_schedule={"catch-up": {"task": "tally.catch_up", "schedule": crontab(minute=5),
                                    "options": {"headers": {"tally_trigger": "catch-up"}}},
                       # Daily at 03:35: seal, then delete what sealed history no longer needs.
                       "retention": {"task": "tally.retention", "schedule": crontab(minute=35, hour=3)}},
        beat_schedule_filename=str(s.home / "celerybeat-schedule"),
    )


app = Celery("tally")
app.conf.update(_celery_settings())


class TallyTask(Task):
    """Every tally task: retried on transient failures only, with backoff; alerts on its final failure."""

    autoretry_for = (TransientFailure, Unreachable, SoftTimeLimitExceeded)
    max_retries = settings().max_retries
    acks_late = True
    reject_on_worker_lost = True

    def backoff(self, retries: int) -> float:
        """Seconds before retry ``retries + 1``: TALLY_RETRY_DELAY doubled each time, ±20 % jitter
        (retries of many tasks do not stampede a recovering database), capped below the
        visibility timeout (else Redis would hand the waiting task to a second worker)."""
        delay = settings().retry_delay * 2 ** retries * random.uniform(0.8, 1.2)
        return min(delay, 0.9 * self.app.conf.broker_transport_options.get("visibility_timeout", 3600))

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None, max_retries=None,
              **options):
        if countdown is None and eta is None:
            countdown = self.backoff(self.request.retries)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, RollupFailed):
            if exc.alerted:
                return
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

    def conclude(self, failures: list[dict], earlier: list[dict] | None = None) -> None:
        """Raise for the failures of this attempt: retried if any is transient (the permanent
        ones alerted now), failed at once if all are permanent. ``earlier``: permanent
        failures of an earlier attempt (alerted then), which keep the task failing."""
        transient = [f for f in failures if f["transient"]]
        permanent = [f for f in failures if not f["transient"]]
        if transient:
            if permanent:
                alerts.task_failed(self.name, self.request.id, self.request.retries + 1, permanent)
            raise TransientFailure(transient)
        if permanent:
            raise PermanentFailure(permanent + (earlier or []))
        if earlier:
            raise PermanentFailure(earlier, alerted=True)


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
        log.warning("%s was sent without its %s: running %s, the last complete one at %s",
                    self.name, self.bucket_arg, chosen.label, "its eta" if when else "run time")
        return chosen


def _trigger(task: Task, given: str | None) -> str:
    """Who sent the task: the sender's word (a ``trigger`` argument, or the ``tally_trigger`` header
    beat's entries carry), else ``manual``."""
    trigger = given or (task.request.headers or {}).get("tally_trigger") or getattr(task.request, "tally_trigger", None)
    if trigger is None:
        return "manual"
    if trigger not in TRIGGERS:
        raise InvalidInput(f"unknown trigger {trigger!r} (expected one of {', '.join(TRIGGERS)})")
    return trigger


def _refuse_open(bucket: B.Bucket, allow_open: bool) -> None:
    """As the CLI: a bucket that has not ended would be aggregated from part of its rows."""
    if not allow_open and bucket.end > dt.datetime.now(B.UTC):
        raise InvalidInput(f"{bucket} has not ended (it ends {bucket.end.isoformat()}): its numbers would be "
                           "partial; send allow_open=True to aggregate it anyway")


def _again(task: Task) -> bool:
    """A retry, or a message delivered again because its worker died."""
    return task.request.retries > 0 or bool((task.request.delivery_info or {}).get("redelivered"))


def _summary(result: RollupResult) -> dict:
    return dict(rollup=result.bucket.rollup, bucket=result.bucket.label, ok=result.ok, prepared=len(result.prepared),
                steps=[dict(step=s.step, status=s.status, rows=s.rows, attempt=s.attempt) for s in result.steps])


def _cut(results: list[RollupResult]) -> list[dict]:
    """The failures of rollups a task's soft time limit stopped: the cut step says so."""
    why = "the task's soft time limit (TALLY_TASK_TIME_LIMIT) cut the step"
    return [dict(f, error=why, transient=True) if SoftTimeLimitExceeded.__name__ in (f["error"] or "") else f
            for f in _failures(results)]


def _run(task: TallyTask, bucket: B.Bucket, *, trigger: str, steps=None, atomic: bool = False,
         backfill_force: bool | None = None, unseal: bool = False) -> dict:
    """Run ``steps`` (default all) of ``bucket``; a retry or redelivery runs only those not done.

    ``backfill_force`` (backfill only): False runs just the steps that need work (missing,
    failed, dirty), the same choice as ``tally backfill``; True runs them all.
    """
    again = _again(task)
    earlier: list[dict] = []
    with Runner(trigger="retry" if again else trigger, task_id=task.request.id,
                stop_on=(SoftTimeLimitExceeded,), pooled=True) as runner:
        conn = runner.ledger.conn
        if (task.request.delivery_info or {}).get("redelivered"):
            S.reap(conn)  # the dead worker's 'running' rows, once their sessions are gone
        chosen = [s.name for s in steps_of(bucket.rollup, steps)]
        if backfill_force is None and not again:
            P.check_sealed(conn, bucket, chosen, unseal)  # an explicit rollup of a sealed bucket: refused
        elif unseal:
            P.refuse_purged(conn, bucket.start, bucket.end, str(bucket))
        if again or backfill_force is not None:
            bs = S.of(conn, bucket)
            todo = P.forced(bs, unseal) if backfill_force and not again else P.work(bs)
            # a permanent failure of an earlier attempt was alerted then: not retried
            kept = [s for s in todo if not (again and bs[s] is State.FAILED and bs.steps[s].facts.transient is False)]
            earlier = [dict(rollup=bucket.rollup, bucket=bucket.label, step=s, attempt=bs.steps[s].facts.attempt,
                            error=bs.steps[s].facts.error, transient=False) for s in todo if s not in kept]
            steps = [s for s in chosen if s in kept]
            if not steps:
                task.conclude([], earlier)
                return _summary(RollupResult(uuid.uuid4(), bucket, atomic))
        result = runner.run(bucket, steps, atomic=atomic)
    if result.stopped:  # the soft time limit cut a step (the Runner cancelled its statement on closing)
        raise TransientFailure(_cut([result]))
    task.conclude(_failures([result]), earlier)
    return _summary(result)


def _rollup(task: RollupTask, when: str | None, steps, atomic: bool, allow_open: bool, trigger: str | None) -> dict:
    bucket = task.bucket(when)
    steps_of(task.rollup, steps)  # an unknown step is invalid input: fails now, never retried
    _refuse_open(bucket, allow_open)
    return _run(task, bucket, trigger=_trigger(task, trigger), steps=steps, atomic=atomic)


@app.task(name="tally.hourly_rollup", base=RollupTask, rollup="hourly", bucket_arg="hour", bind=True)
def hourly_rollup(self, hour: str | None = None, steps: list[str] | None = None, atomic: bool = False,
                  allow_open: bool = False, trigger: str | None = None) -> dict:
    """execution_metrics, user_activity, credit_consumption for one hour (ISO, on the hour)."""
    return _rollup(self, hour, steps, atomic, allow_open, trigger)


@app.task(name="tally.daily_rollup", base=RollupTask, rollup="daily", bucket_arg="date", bind=True)
def daily_rollup(self, date: str | None = None, steps: list[str] | None = None, atomic: bool = False,
                 allow_open: bool = False, trigger: str | None = None) -> dict:
    """daily_metrics for one UTC day (YYYY-MM-DD); its unready hours first."""
    return _rollup(self, date, steps, atomic, allow_open, trigger)


@app.task(name="tally.weekly_rollup", base=RollupTask, rollup="weekly", bucket_arg="week", bind=True)
def weekly_rollup(self, week: str | None = None, steps: list[str] | None = None, atomic: bool = False,
                  allow_open: bool = False, trigger: str | None = None) -> dict:
    """weekly_metrics for one ISO week, given by its Monday."""
    return _rollup(self, week, steps, atomic, allow_open, trigger)


@app.task(name="tally.monthly_rollup", base=RollupTask, rollup="monthly", bucket_arg="month", bind=True)
def monthly_rollup(self, month: str | None = None, steps: list[str] | None = None, atomic: bool = False,
                   allow_open: bool = False, trigger: str | None = None) -> dict:
    """monthly_metrics for one calendar month (YYYY-MM)."""
    return _rollup(self, month, steps, atomic, allow_open, trigger)


@app.task(name="tally.backfill_bucket", base=TallyTask, bind=True)
def backfill_bucket(self, rollup: str, bucket: str, force: bool = False, allow_open: bool = False,
                    unseal: bool = False) -> dict:
    """One bucket of a backfill: its steps that are missing, failed or dirty (all with ``force``,
    sealed ones too with ``unseal``); nothing if it is done and current."""
    if bucket is None:
        raise InvalidInput(f"backfill_bucket needs a bucket for the {rollup} rollup")
    target = B.parse_bucket(rollup, bucket)
    _refuse_open(target, allow_open)
    return _run(self, target, trigger="backfill", backfill_force=bool(force), unseal=bool(unseal))


@app.task(name="tally.backfill_hours", base=TallyTask, bind=True)
def backfill_hours(self, start: str, end: str, force: bool = False, allow_open: bool = False,
                   unseal: bool = False) -> dict:
    """The hours [start, end) of a backfill (ISO, on the hour), in set-based chunks: of each hour,
    its steps that are missing, failed or dirty (all with ``force``, sealed ones too with
    ``unseal``); a retry runs what is not done."""
    first, last = B.parse_range(start, end, settings().max_range_days)
    hours = list(B.within(B.HOUR.rollup, first, last))
    _refuse_open(hours[-1], allow_open)
    again = _again(self)
    with Runner(trigger="retry" if again else "backfill", task_id=self.request.id,
                stop_on=(SoftTimeLimitExceeded,), pooled=True) as runner:
        conn = runner.ledger.conn
        if unseal:
            P.refuse_purged(conn, first, last, f"{B.HOUR.label(first)} .. {B.HOUR.label(last)}")
        if (self.request.delivery_info or {}).get("redelivered"):
            S.reap(conn)
        states = S.read(conn, B.HOUR.rollup, hours)
        work = [(b, steps) for b, bs in states.items()
                if (steps := P.forced(bs, unseal) if force and not again else P.work(bs))]
        results = runner.run_hours(work)
    if any(r.stopped for r in results):
        raise TransientFailure(_cut(results))
    self.conclude(_failures(results))
    return dict(start=first.isoformat(), end=last.isoformat(), hours=len(results),
                failed=sum(1 for r in results if not r.ok))


@app.task(name="tally.catch_up", base=TallyTask, bind=True)
def catch_up(self, now: str | None = None) -> dict:
    """Every missing, failed or dirty bucket, hourly first (scheduled every hour at minute 5).

    ``now``: the hour (ISO) to catch up as of (default: when the task runs; a late catch-up
    simply finds more to do).
    """
    from .catchup import catch_up as run_catch_up

    as_of = None if now is None else B.parse_time(now, "now")
    result = run_catch_up(trigger="retry" if _again(self) else _trigger(self, "catch-up"), task_id=self.request.id, now=as_of,
                          stop_on=(SoftTimeLimitExceeded,), pooled=True)
    if result.stopped:
        raise TransientFailure(_cut(result.buckets))
    self.conclude(_failures(result.buckets))
    return result.as_dict()


@app.task(name="tally.retention", base=TallyTask, bind=True)
def retention(self, dry_run: bool = False) -> dict:
    """Seal, then delete what sealed history no longer needs (scheduled daily at 03:35)."""
    from . import retention as R
    from .db import connect

    with connect(autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        return R.run(conn, dry_run=bool(dry_run)).as_dict()


# ---- worker, beat, flower ------------------------------------------------------------------

def check_broker() -> None:
    """Raise Unreachable (exit 3) unless the broker answers within a few seconds."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # kombu raises OperationalError or the transport's own errors
        raise Unreachable(f"cannot reach the broker {redact(app.conf.broker_url)}: {exc}") from None


def _start(argv: list[str]) -> int:
    """Run a celery sub-command in this process; its usage errors are invalid input."""
    import click

    try:
        code = app.start(argv)
    except click.ClickException as exc:
        raise InvalidInput(exc.format_message()) from None
    return code or 0


def stray_tasks(default: str = "celery") -> int:
    """How many tally tasks wait in Celery's default queue, which tally's worker does not consume
    (another app sent them by name without ``queue=``). Redis only; elsewhere 0."""
    if default == app.conf.task_default_queue:
        return 0
    try:
        with app.connection_for_read() as conn:
            client = getattr(conn.default_channel, "client", None)
            if client is None:
                return 0
            prefix = app.conf.broker_transport_options.get("global_keyprefix", "")
            messages = client.lrange(f"{prefix}{default}", 0, 999)
    except Exception:  # an unreachable or unusual broker: nothing to say here
        return 0
    found = 0
    for raw in messages:
        try:
            name = json.loads(raw).get("headers", {}).get("task", "")
        except (ValueError, AttributeError):
            continue
        found += name.startswith("tally.")
    return found


def run_worker(extra: list[str], *, concurrency: int | None, loglevel: str) -> int:
    check_broker()
    stray = stray_tasks()
    if stray:
        log.warning("%d tally task(s) wait in Celery's default queue 'celery', which this worker does not consume "
                    "(it consumes %r, TALLY_QUEUE): their sender must pass queue=%r to send_task", stray,
                    app.conf.task_default_queue, app.conf.task_default_queue)
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    if visibility <= max(app.conf.task_time_limit, settings().retry_delay):
        log.warning("TALLY_VISIBILITY_TIMEOUT=%ss is not longer than a task may run (%ss) or wait for its retry "
                    "(%ss): Redis will deliver such a task twice", visibility, app.conf.task_time_limit,
                    settings().retry_delay)
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={app.conf.task_default_queue}"]
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


def bind_auth(address: str, auth: str | None, variable: str, what: str, why: str) -> str | None:
    """``auth`` (the value of ``variable``), checked; refuses (invalid input) to serve ``what`` on
    anything but loopback without it (``why``: what a stranger could do with it)."""
    if auth is not None and (":" not in auth or auth.startswith(":") or auth.endswith(":")):
        raise InvalidInput(f"{variable} must be user:password")
    if auth is None and not _loopback(address):
        raise InvalidInput(f"refusing to serve {what} on {address or 'every address'!r} without "
                           f"{variable}=user:password ({why})")
    return auth


def flower_auth(address: str) -> str | None:
    """TALLY_FLOWER_AUTH, checked; refuses (invalid input) to bind anything but loopback without it."""
    return bind_auth(address, settings().flower_auth, "TALLY_FLOWER_AUTH", "Flower",
                     "Flower can revoke tasks and shows their arguments")


def run_flower(extra: list[str], *, address: str, port: int, auth: str | None) -> int:
    """Flower on ``address:port`` with basic auth ``auth`` (see :func:`flower_auth`)."""
    check_broker()
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if auth:
        argv.append(f"--basic-auth={auth}")  # in-process: the password never shows in `ps`
    return _start(argv + extra)


# ---- the operator console's actions (tally serve) -----------------------------------------------
# The console never writes: its actions are these tasks (and tally.backfill_bucket), run by the
# workers, which hold the worker role; the console's read-only role only reads what they did.

@app.task(name="tally.retry_bucket", base=TallyTask, bind=True)
def retry_bucket(self, rollup: str, bucket: str) -> dict:
    """The steps of one bucket whose latest attempt failed (trigger ``retry``); nothing if none did."""
    from .db import connection

    b = B.parse_bucket(rollup, bucket)
    if not _again(self):
        with connection(autocommit=True) as conn:
            failed = P.retryable(S.of(conn, b))
        if not failed:
            return _summary(RollupResult(uuid.uuid4(), b, False))
    else:
        failed = None  # _run runs what is not done yet
    return _run(self, b, trigger="retry", steps=failed)


VERIFY_DRIFTS = 200  # drift rows a verify task returns (every drift is counted per column)


@app.task(name="tally.verify_bucket", base=TallyTask, bind=True)
def verify_bucket(self, rollup: str, bucket: str) -> dict:
    """``tally verify`` over one bucket's span: its output recomputed from the raw rows (which the
    console's role may not read); the drift counted per table and column, the first rows listed."""
    from collections import Counter

    from .db import connection
    from .verify import verify

    b = B.parse_bucket(rollup, bucket)
    with connection(autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        report = verify(conn, b.start, b.end)
    result = report.as_dict()
    columns = Counter((d.table, d.column or d.problem) for d in report.drifts)
    result.update(rollup=rollup, bucket=b.label, drift_count=len(report.drifts),
                  columns=[dict(table=t, column=c, rows=n) for (t, c), n in sorted(columns.items())],
                  drifts=result["drifts"][:VERIFY_DRIFTS])
    return result
