"""The Celery tasks through real worker subprocesses on a real Redis and PostgreSQL.

One worker serves the module (tests/celery_support.py); the SIGKILL test runs its own.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import subprocess
import time
import urllib.request

import psycopg
import pytest

import reference as ref  # noqa: E402
from celery_support import TALLY, Worker, client, free_port, wait_for
from outputs import read, snapshot, source_rows
from tally import alerts, tasks
from tally import buckets as B
from tally.errors import InvalidInput
from tally.rollups import Runner
from tally.seed import seed
from tally.steps import STEPS, lock_key

pytest_plugins = ["celery_support"]

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
T0 = dt.datetime(2026, 3, 2, 0, tzinfo=UTC)  # a Monday
TIMEOUT = 120  # seconds a test waits for a task: generous, never a timing assertion


def label(t: dt.datetime) -> str:
    return B.bucket("hourly", t).label


def seed_hours(url: str, start: dt.datetime, hours: int, **kw) -> None:
    with psycopg.connect(url) as c:  # seed() commits itself
        seed(c, start=start, hours=hours, **{"workspaces": 6, "executions_per_hour": 120, "events_per_hour": 300,
                                             "seed": 11, **kw})


def ledger(conn, rollup: str, start: dt.datetime) -> list[tuple]:
    return conn.execute("""SELECT step, status, attempt, trigger, task_id FROM analytics.aggregation_runs
                           WHERE rollup = %s AND bucket_start = %s ORDER BY id""", (rollup, start)).fetchall()


def barrier():
    """Returns once the worker has finished everything sent before (one process, one task at a time)."""
    tasks.hourly_rollup.delay(label(T0 - 1000 * HOUR)).get(timeout=TIMEOUT)


def fault(conn, step: str, hour: dt.datetime, failing_attempts: int, errcode: str = "40001") -> None:
    """``step`` of ``hour`` fails for real in its first ``failing_attempts`` attempts, with SQLSTATE
    ``errcode`` (40001, a serialization failure, is transient; P0001 or 22003 are not)."""
    conn.execute("INSERT INTO public.test_fault VALUES (%s, %s, %s, %s)", (step, hour, failing_attempts, errcode))


# ---- throughput and equality with a direct run -----------------------------------------------

def test_worker_runs_20_hourly_tasks_in_a_row_like_a_direct_run(worker, wconn, celery_db, make_db):
    direct = make_db()
    for url in (celery_db, direct):
        seed_hours(url, T0, 20)

    started = time.perf_counter()
    sent = [tasks.hourly_rollup.delay(label(T0 + h * HOUR)) for h in range(20)]
    results = [r.get(timeout=TIMEOUT) for r in sent]
    elapsed = time.perf_counter() - started
    print(f"\none worker: 20 one-hour rollups in {elapsed:.2f}s = {20 / elapsed:.1f} tasks/s")

    assert [r["bucket"] for r in results] == [label(T0 + h * HOUR) for h in range(20)]
    assert all(r["ok"] for r in results)
    for h, r in enumerate(sent):
        assert ledger(wconn, "hourly", T0 + h * HOUR) == [
            (step, "succeeded", 1, "manual", r.id)
            for step in ("execution_metrics", "user_activity", "credit_consumption")]

    with Runner(direct, trigger="manual") as runner:
        for h in range(20):
            assert runner.run(B.bucket("hourly", T0 + h * HOUR)).ok
    with psycopg.connect(direct, autocommit=True) as dconn:
        assert snapshot(wconn) == snapshot(dconn)
    # and the totals reconcile with the source, counted independently
    executions, _ = source_rows(wconn)
    for h in range(20):
        hour = T0 + h * HOUR
        expected = ref.execution_hourly(executions, hour)
        assert {k: v["total_executions"] for k, v in read(wconn, "execution_metrics_hourly", hour).items()} == \
            {k: v["total_executions"] for k, v in expected.items()}


# ---- retries ---------------------------------------------------------------------------------

def test_a_failed_step_is_retried_alone_and_the_ledger_shows_both_attempts(worker, wconn, celery_db, webhook):
    hour = T0 + 3 * HOUR
    seed_hours(celery_db, hour, 1)
    fault(wconn, "user_activity", hour, failing_attempts=1)

    r = tasks.hourly_rollup.delay(label(hour))
    result = r.get(timeout=TIMEOUT)

    _, events = source_rows(wconn)
    expected = ref.user_activity_hourly(events, hour)
    assert result["steps"] == [dict(step="user_activity", status="succeeded", rows=len(expected), attempt=2)]
    assert ledger(wconn, "hourly", hour) == [
        ("execution_metrics", "succeeded", 1, "manual", r.id),
        ("user_activity", "failed", 1, "manual", r.id),
        ("credit_consumption", "succeeded", 1, "manual", r.id),
        ("user_activity", "succeeded", 2, "retry", r.id),
    ]
    error = wconn.execute("SELECT error FROM analytics.aggregation_runs WHERE status = 'failed'").fetchone()[0]
    assert "injected fault in user_activity_hourly" in error
    assert ref.compare(read(wconn, "user_activity_hourly", hour), expected) == []
    barrier()
    assert webhook.posts == []  # it recovered: no alert


def test_the_last_retry_failing_alerts_once_with_bucket_and_step(worker, wconn, celery_db, webhook):
    hour = T0 + 4 * HOUR
    seed_hours(celery_db, hour, 1)
    fault(wconn, "user_activity", hour, failing_attempts=99)

    r = tasks.hourly_rollup.delay(label(hour))
    r.get(timeout=TIMEOUT, propagate=False)

    assert r.state == "FAILURE"
    assert isinstance(r.result, tasks.RollupFailed)
    assert ledger(wconn, "hourly", hour) == [  # TALLY_MAX_RETRIES=2: three attempts, the others never re-run
        ("execution_metrics", "succeeded", 1, "manual", r.id),
        ("user_activity", "failed", 1, "manual", r.id),
        ("credit_consumption", "succeeded", 1, "manual", r.id),
        ("user_activity", "failed", 2, "retry", r.id),
        ("user_activity", "failed", 3, "retry", r.id),
    ]
    barrier()
    assert len(webhook.posts) == 1
    post = webhook.posts[0]
    assert (post["task"], post["task_id"], post["rollup"], post["bucket"], post["step"], post["attempts"]) == \
        ("tally.hourly_rollup", r.id, "hourly", label(hour), "user_activity", 3)
    assert "injected fault" in post["failures"][0]["error"]
    assert (f"ERROR/ForkPoolWorker-1] task tally.hourly_rollup failed for good after 3 attempt(s): rollup=hourly "
            f"step=user_activity bucket={label(hour)} cause=") in worker.text()


@pytest.mark.parametrize("errcode", ["P0001", "22003"], ids=["raise", "numeric-out-of-range"])
def test_a_permanent_failure_is_not_retried_and_alerts_at_once(worker, wconn, celery_db, webhook, errcode):
    """A data or SQL error would fail the same way on every try: no retry, the alert at once."""
    hour = T0 + 9 * HOUR + (errcode == "22003") * HOUR
    seed_hours(celery_db, hour, 1)
    fault(wconn, "user_activity", hour, failing_attempts=99, errcode=errcode)
    r = tasks.hourly_rollup.delay(label(hour))
    r.get(timeout=TIMEOUT, propagate=False)
    assert r.state == "FAILURE" and isinstance(r.result, tasks.PermanentFailure)
    assert ledger(wconn, "hourly", hour) == [
        ("execution_metrics", "succeeded", 1, "manual", r.id),
        ("user_activity", "failed", 1, "manual", r.id),
        ("credit_consumption", "succeeded", 1, "manual", r.id),
    ]
    assert wconn.execute("SELECT sqlstate, transient FROM analytics.aggregation_runs WHERE status = 'failed' "
                         "AND bucket_start = %s", (hour,)).fetchone() == (errcode, False)
    barrier()
    assert f"[{r.id}] retry" not in worker.text()
    assert [(p["task_id"], p["step"], p["attempts"]) for p in webhook.posts] == [(r.id, "user_activity", 1)]


def test_a_task_with_both_kinds_alerts_the_permanent_one_at_once_and_retries_the_other(
        worker, wconn, celery_db, webhook):
    hour = T0 + 11 * HOUR
    seed_hours(celery_db, hour, 1)
    fault(wconn, "user_activity", hour, failing_attempts=99, errcode="22003")
    wconn.execute("""CREATE OR REPLACE FUNCTION public.test_fault_cc() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                         IF EXISTS (SELECT 1 FROM analytics.aggregation_runs WHERE step = 'credit_consumption'
                                    AND status = 'running' AND attempt = 1) THEN
                             RAISE EXCEPTION 'deadlock, as it were' USING ERRCODE = '40P01';
                         END IF;
                         RETURN NULL;
                     END $$;
                     CREATE TRIGGER test_fault_cc BEFORE INSERT ON analytics.credit_consumption_hourly
                         FOR EACH STATEMENT EXECUTE FUNCTION public.test_fault_cc();""")
    try:
        r = tasks.hourly_rollup.delay(label(hour))
        r.get(timeout=TIMEOUT, propagate=False)
    finally:
        wconn.execute("DROP TRIGGER test_fault_cc ON analytics.credit_consumption_hourly")
    # the retry ran the transient failure again, not the permanent one (alerted once, at the first try)
    assert ledger(wconn, "hourly", hour) == [
        ("execution_metrics", "succeeded", 1, "manual", r.id),
        ("user_activity", "failed", 1, "manual", r.id),
        ("credit_consumption", "failed", 1, "manual", r.id),
        ("credit_consumption", "succeeded", 2, "retry", r.id),
    ]
    assert r.state == "FAILURE" and isinstance(r.result, tasks.PermanentFailure)  # the permanent one stands
    barrier()
    assert [(p["step"], p["attempts"]) for p in webhook.posts] == [("user_activity", 1)]


def test_the_trigger_says_who_sent_a_task_and_a_bucket_not_ended_is_refused(worker, wconn):
    hour = T0 + 12 * HOUR
    triggers = []
    for kwargs, options in (({}, {}), ({}, {"headers": {"tally_trigger": "schedule"}}), ({"trigger": "backfill"}, {})):
        r = tasks.hourly_rollup.apply_async(args=[label(hour)], kwargs=kwargs, **options)
        r.get(timeout=TIMEOUT)
        triggers.append(wconn.execute("SELECT DISTINCT trigger FROM analytics.aggregation_runs WHERE task_id = %s",
                                      (r.id,)).fetchall())
    assert triggers == [[("manual",)], [("schedule",)], [("backfill",)]]  # by hand: manual, unless the sender says
    now = B.HOUR.floor(dt.datetime.now(UTC))
    refused = tasks.hourly_rollup.delay(label(now))
    refused.get(timeout=TIMEOUT, propagate=False)
    assert refused.state == "FAILURE" and isinstance(refused.result, InvalidInput)
    assert "has not ended" in str(refused.result)
    assert tasks.hourly_rollup.delay(label(now), allow_open=True).get(timeout=TIMEOUT)["ok"]


def test_the_worker_warns_of_tally_tasks_waiting_in_celerys_default_queue(broker, make_db, tmp_path):
    """Another app's send_task by name without queue= lands in 'celery', which tally's worker does not
    consume (TALLY_QUEUE, default 'tally'): the worker says so when it starts."""
    import redis

    env = {**broker, "TALLY_BROKER_PREFIX": f"{broker['TALLY_BROKER_PREFIX']}stray:", "TALLY_DATABASE_URL": make_db()}
    other_app = client({**env, "TALLY_QUEUE": "celery"})  # an app with Celery's default routing
    other_app.send_task("tally.hourly_rollup", args=[label(T0)])
    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: "wait in Celery's default queue 'celery'" in worker.text(), 60, "the warning")
        assert "1 tally task(s)" in worker.text() and "queue='tally'" in worker.text()
    finally:
        worker.stop()
        r = redis.Redis.from_url(broker["TALLY_BROKER_URL"])
        for key in r.scan_iter(match=f"{env['TALLY_BROKER_PREFIX']}*"):
            r.delete(key)


def test_invalid_input_fails_at_once_without_retry(worker, wconn, webhook):
    sent = [
        tasks.hourly_rollup.delay("2026-03-02T00:30Z"),
        tasks.daily_rollup.delay("2026-03-02", steps=["no_such_step"]),
        tasks.weekly_rollup.delay("2026-03-03"),  # a Tuesday
        tasks.backfill_bucket.delay("yearly", "2026"),
    ]
    for r in sent:
        r.get(timeout=TIMEOUT, propagate=False)
        assert r.state == "FAILURE"
        assert isinstance(r.result, InvalidInput), r.result
    barrier()
    log = worker.text()
    for r in sent:
        assert f"[{r.id}] retry" not in log
    assert sorted(p["task_id"] for p in webhook.posts) == sorted(r.id for r in sent)
    assert {p["attempts"] for p in webhook.posts} == {1}
    assert wconn.execute("SELECT count(*) FROM analytics.aggregation_runs WHERE bucket_start > %s",
                         (T0 - 10 * HOUR,)).fetchone()[0] == 0


# ---- which bucket ----------------------------------------------------------------------------

def test_no_bucket_means_the_last_complete_one_when_sent_not_when_run(worker, wconn):
    # eta in the past: runs at once, but for the hour before its eta
    r = tasks.hourly_rollup.apply_async(eta=dt.datetime(2026, 3, 2, 5, 30, tzinfo=UTC))
    assert r.get(timeout=TIMEOUT)["bucket"] == "2026-03-02T04:00Z"
    r = tasks.daily_rollup.apply_async(eta=dt.datetime(2026, 3, 2, 0, 0, tzinfo=UTC))
    assert r.get(timeout=TIMEOUT)["bucket"] == "2026-03-01"
    r = tasks.monthly_rollup.apply_async(eta=dt.datetime(2026, 3, 2, 0, 0, tzinfo=UTC))
    assert r.get(timeout=TIMEOUT)["bucket"] == "2026-02"
    # the message itself carries the bucket (Flower shows it; retries keep it)
    sent = tasks.weekly_rollup.delay()
    before = B.last_complete("weekly").label
    assert sent.get(timeout=TIMEOUT)["bucket"] == before
    # sent by name, bypassing apply_async: chosen at run time, and the log says so
    r = tasks.app.send_task("tally.hourly_rollup")
    assert r.get(timeout=TIMEOUT)["bucket"] in {B.last_complete("hourly", dt.datetime.now(UTC) - dt.timedelta(seconds=TIMEOUT)).label,
                                               B.last_complete("hourly").label}
    assert "tally.hourly_rollup was sent without its hour: running" in worker.text()


# ---- backfill_bucket -----------------------------------------------------------------------------

def test_backfill_bucket_runs_what_is_not_ok_unless_forced(worker, wconn, celery_db):
    hour = T0 + 6 * HOUR
    seed_hours(celery_db, hour, 1)
    with Runner(celery_db, trigger="manual") as runner:
        assert runner.run(B.bucket("hourly", hour)).ok
        fault(wconn, "user_activity", hour, failing_attempts=1)
        assert not runner.run(B.bucket("hourly", hour)).ok  # user_activity failed, the others committed

    def backfill(rollup, bucket, **kw):
        result = tasks.backfill_bucket.delay(rollup, bucket, **kw).get(timeout=TIMEOUT)
        return [(s["step"], s["attempt"]) for s in result["steps"]]

    assert backfill("hourly", label(hour)) == [("user_activity", 2)]
    wconn.execute("TRUNCATE public.test_fault")
    assert backfill("hourly", label(hour)) == []  # done and current: nothing
    wconn.execute("UPDATE public.execution_logs SET credits_used = credits_used + 1 "
                  "WHERE id = (SELECT min(id) FROM public.execution_logs)")  # the steps reading executions are dirty
    assert backfill("hourly", label(hour)) == [("execution_metrics", 1), ("credit_consumption", 1)]
    everything = [("execution_metrics", 1), ("user_activity", 1), ("credit_consumption", 1)]
    assert backfill("hourly", label(hour), force=True) == everything
    triggers = wconn.execute("SELECT DISTINCT trigger FROM analytics.aggregation_runs WHERE task_id IS NOT NULL"
                             ).fetchall()
    assert triggers == [("backfill",)]
    executions, _ = source_rows(wconn)
    assert ref.compare(read(wconn, "execution_metrics_hourly", hour), ref.execution_hourly(executions, hour)) == []

    # a day whose hour was aggregated again after it: stale, so the day runs again
    day = B.bucket("daily", hour).label
    assert backfill("daily", day) == [("daily_metrics", 1)]
    assert backfill("daily", day) == []
    backfill("hourly", label(hour), force=True)
    assert backfill("daily", day) == [("daily_metrics", 1)]
    assert ref.compare(read(wconn, "execution_metrics_daily", B.bucket("daily", hour).start),
                       {k: {c: v for c, v in row.items() if c not in ("runtime_count", "runtime_sum")}
                        for k, row in ref.period_metrics(executions, B.bucket("daily", hour).start,
                                                         B.bucket("daily", hour).end).items()},
                       percentile_rel=0.01) == []


# ---- catch-up -------------------------------------------------------------------------------------

def test_catch_up_fills_exactly_the_missing_and_failed_hours(worker, wconn, celery_db):
    now = T0 + 7 * 24 * HOUR  # the window of missing buckets: the 168 hours before, T0 on
    window = [T0 + h * HOUR for h in range(7 * 24)]
    missing = window[-10:-5]
    failed = window[-3]
    seed_hours(celery_db, window[-12], 12)
    with Runner(celery_db, trigger="manual") as runner:
        for hour in window:
            if hour not in missing:
                assert runner.run(B.bucket("hourly", hour)).ok
        fault(wconn, "user_activity", failed, failing_attempts=1)
        assert not runner.run(B.bucket("hourly", failed)).ok  # up to date, but its latest user_activity failed
    wconn.execute("TRUNCATE public.test_fault")

    r = tasks.catch_up.delay(now=now.isoformat())
    assert r.get(timeout=TIMEOUT)["ok"]

    ran = wconn.execute("""SELECT bucket_start, step, status, trigger FROM analytics.aggregation_runs
                           WHERE rollup = 'hourly' AND task_id = %s ORDER BY bucket_start, id""", (r.id,)).fetchall()
    assert ran == [(hour, step, "succeeded", "catch-up")
                   for hour in missing for step in ("execution_metrics", "user_activity", "credit_consumption")
                   ] + [(failed, "user_activity", "succeeded", "catch-up")]
    executions, events = source_rows(wconn)
    for hour in [*missing, failed]:
        assert ref.compare(read(wconn, "execution_metrics_hourly", hour), ref.execution_hourly(executions, hour)) == []
        assert ref.compare(read(wconn, "user_activity_hourly", hour), ref.user_activity_hourly(events, hour)) == []
        assert ref.compare(read(wconn, "credit_consumption_hourly", hour), ref.credit_hourly(executions, hour)) == []
    # then the days of the window, each once, all succeeded; a second catch-up finds nothing to do
    days = wconn.execute("""SELECT bucket_start, status FROM analytics.aggregation_runs
                            WHERE rollup = 'daily' AND task_id = %s ORDER BY bucket_start""", (r.id,)).fetchall()
    assert days == [(T0 + d * 24 * HOUR, "succeeded") for d in range(7)]
    again = tasks.catch_up.delay(now=now.isoformat())
    assert again.get(timeout=TIMEOUT)["buckets"] == []


# ---- alerts --------------------------------------------------------------------------------------

def test_a_webhook_that_is_down_or_silent_costs_a_warning_not_the_worker(caplog):
    closed = f"http://127.0.0.1:{free_port()}/hook"
    assert alerts.post(closed, {"x": 1}, timeout=2) is False
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert alerts.post(f"http://127.0.0.1:{silent.getsockname()[1]}/hook", {"x": 1}, timeout=0.5) is False
    assert "alert webhook http://127.0.0.1" in caplog.text
    assert "/hook" not in caplog.text  # the path (often a token) is never logged


# ---- the schedule, beat and flower -------------------------------------------------------------------

def test_beat_schedules_catch_up_every_hour_at_minute_5():
    entry = tasks.app.conf.beat_schedule["catch-up"]
    assert entry["task"] == "tally.catch_up" and entry["task"] in tasks.app.tasks
    schedule = entry["schedule"]
    assert schedule.minute == {5} and schedule.hour == set(range(24)) and schedule.day_of_month == set(range(1, 32))


def test_beat_starts(broker, tmp_path):
    log = tmp_path / "beat.log"
    proc = subprocess.Popen([TALLY, "beat"], env={**os.environ, **broker, "TALLY_HOME": str(tmp_path)},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or "beat: Starting..." in log.read_text(), 60, "beat to start")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
    assert (tmp_path / "celerybeat-schedule").exists() or list(tmp_path.glob("celerybeat-schedule*"))


def test_flower_lists_the_task_that_ran_and_guards_its_bind(worker, wconn, broker, tmp_path):
    port = free_port()
    log = tmp_path / "flower.log"
    env = {**os.environ, **broker, "TALLY_FLOWER_AUTH": "ops:s3cret"}
    proc = subprocess.Popen([TALLY, "flower", "--port", str(port)], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def tasks_seen():
        request = urllib.request.Request(f"{base}/api/tasks",
                                         headers={"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return json.load(resp)
        except OSError:
            return None

    def succeeded(task_id):
        found = (tasks_seen() or {}).get(task_id) or {}
        return found if found.get("state") == "SUCCESS" else None

    try:
        wait_for(lambda: proc.poll() is not None or tasks_seen() is not None, 60, f"flower on {base} ({log})")
        assert proc.poll() is None, log.read_text()
        # Flower learns of tasks from events: send until one it saw whole (received to succeeded)
        for _ in range(10):
            r = tasks.hourly_rollup.delay(label(T0 + 10 * HOUR))
            r.get(timeout=TIMEOUT)
            seen = wait_for_optional(lambda: succeeded(r.id), 5)
            if seen and seen.get("name"):
                break
        assert (seen["name"], seen["state"]) == ("tally.hourly_rollup", "SUCCESS")
        assert label(T0 + 10 * HOUR) in seen["args"]
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/api/tasks", timeout=5)
        assert denied.value.code == 401
    finally:
        proc.terminate()
        proc.wait(20)

    refused = subprocess.run([TALLY, "flower", "--address", "0.0.0.0", "--port", str(port)],
                             env={k: v for k, v in env.items() if k != "TALLY_FLOWER_AUTH"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "TALLY_FLOWER_AUTH" in refused.stderr and "0.0.0.0" in refused.stderr


def wait_for_optional(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return None


# ---- a worker killed mid-task -----------------------------------------------------------------------

def test_a_task_whose_worker_is_killed_runs_again_on_a_new_worker(broker, make_db, tmp_path):
    url, clean = make_db(), make_db()
    hour = T0 + 7 * HOUR
    for u in (url, clean):
        seed_hours(u, hour, 1)
    # its own prefix, so the module's worker never takes this task; redelivery after 4 s
    env = {**broker, "TALLY_BROKER_PREFIX": f"{broker['TALLY_BROKER_PREFIX']}kill:", "TALLY_DATABASE_URL": url,
           "TALLY_VISIBILITY_TIMEOUT": "4", "TALLY_LOCK_WAIT": "600"}
    celery = client(env)
    holder = psycopg.connect(url)
    first = second = None
    try:
        # lock user_activity's output table: the task commits execution_metrics, then its user_activity
        # attempt begins and waits there
        holder.execute("LOCK TABLE analytics.user_activity_hourly IN ACCESS EXCLUSIVE MODE")
        first = Worker(env, tmp_path / "first.log")
        r = celery.send_task("tally.hourly_rollup", [label(hour)])
        wait_for(lambda: ledger(holder, "hourly", hour)[1:2] == [("user_activity", "running", 1, "manual", r.id)],
                 TIMEOUT, "the task to wait in user_activity")
        first.kill()
        # the killed worker's session is still queued on the lock: let it get it, find its client gone, and end
        pid = holder.execute("SELECT backend_pid FROM analytics.aggregation_runs WHERE status = 'running'").fetchone()[0]
        holder.rollback()
        holder.autocommit = True
        wait_for(lambda: not holder.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
                 TIMEOUT, "the dead worker's database session to end")
        second = Worker(env, tmp_path / "second.log")
        assert r.get(timeout=TIMEOUT)["ok"]
    finally:
        holder.close()
        for w in (first, second):
            if w:
                w.stop()

    with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(clean, autocommit=True) as cconn:
        with Runner(clean, trigger="manual") as runner:
            assert runner.run(B.bucket("hourly", hour)).ok
        assert snapshot(conn) == snapshot(cconn)
        # the first worker's execution_metrics stands; its abandoned attempt is marked failed;
        # the redelivered task ran only what had not succeeded
        assert ledger(conn, "hourly", hour) == [
            ("execution_metrics", "succeeded", 1, "manual", r.id),
            ("user_activity", "failed", 1, "manual", r.id),
            ("user_activity", "succeeded", 2, "retry", r.id),
            ("credit_consumption", "succeeded", 1, "retry", r.id),
        ]


def test_the_soft_time_limit_stops_the_rollup_at_the_cut_step(broker, make_db, tmp_path):
    url = make_db()
    hour = T0 + 8 * HOUR
    seed_hours(url, hour, 1)
    env = {**broker, "TALLY_BROKER_PREFIX": f"{broker['TALLY_BROKER_PREFIX']}soft:", "TALLY_DATABASE_URL": url,
           "TALLY_TASK_TIME_LIMIT": "2", "TALLY_MAX_RETRIES": "0", "TALLY_LOCK_WAIT": "600"}
    celery = client(env)
    worker = None
    with psycopg.connect(url, autocommit=True) as holder:
        try:
            # user_activity waits for this lock until the soft limit cuts it
            holder.execute("SELECT pg_advisory_lock(%s, %s)",
                           lock_key(STEPS["user_activity"], int(hour.timestamp()) // 3600))
            worker = Worker(env, tmp_path / "worker.log")
            r = celery.send_task("tally.hourly_rollup", [label(hour)])
            r.get(timeout=TIMEOUT, propagate=False)
            assert r.state == "FAILURE"
            assert isinstance(r.result, tasks.RollupFailed) and r.result.failures[0]["step"] == "user_activity"
            # the rollup stopped there: credit_consumption was not attempted on the busy connection
            assert [row[:4] for row in ledger(holder, "hourly", hour)] == [
                ("execution_metrics", "succeeded", 1, "manual"), ("user_activity", "failed", 1, "manual")]
            # and the cut statement was cancelled on the server, not left waiting for the lock
            wait_for(lambda: holder.execute(
                "SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0],
                TIMEOUT, "the cut statement to be cancelled")
        finally:
            if worker:
                worker.stop()
