"""Faults around Celery workers: real `tally worker` processes on a real Redis.

2. a worker is killed with SIGKILL in the middle of a task: the task is delivered again;
5. the same task is delivered twice at once;
6. a statement timeout fails a step: the task retries it;
7. a step fails for good: the steps around it committed, one alert after the last retry.

Each test runs its own workers under its own broker key prefix, so no other worker
(tests/test_celery.py's) ever takes its tasks.
"""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from celery_support import Worker, client, wait_for
from fault_support import (HOUR, UTC, assert_ledger_truthful, assert_no_duplicates, assert_same_outputs,
                           clean_outputs, hours_of, ledger, seed_hours)
from outputs import snapshot
from tally import buckets as B

pytest_plugins = ["celery_support"]

T0 = dt.datetime(2026, 3, 9, 0, tzinfo=UTC)  # a Monday
HOURS = 3
H1 = T0 + HOUR
TIMEOUT = 120  # seconds a test waits for a task: generous, never a timing assertion


def worker_env(broker: dict, url: str, **extra: str) -> dict:
    return {**broker, "TALLY_BROKER_PREFIX": f"tally-fault-{uuid.uuid4().hex[:8]}:", "TALLY_DATABASE_URL": url,
            "TALLY_LOCK_WAIT": "60", **extra}


# ---- 2. SIGKILL mid-task --------------------------------------------------------------------------------

@pytest.mark.slow
def test_worker_killed_mid_task_the_task_is_delivered_again(faulty, conn, make_db, broker, tmp_path):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    env = worker_env(broker, url, TALLY_VISIBILITY_TIMEOUT="4")
    day = B.bucket("daily", T0)
    # a daily task prepares its hours first, in one chunk per step: kill it in the middle of the
    # execution_metrics chunk's INSERT (at hour 01)
    gate = faults.gate("execution_metrics_hourly", H1)
    first = Worker(env, tmp_path / "first.log")
    second = None
    try:
        r = client(env).send_task("tally.daily_rollup", [day.label])
        [pid] = faults.wait_at(gate)
        first.kill()  # SIGKILL to the whole process group: the machine died
        faults.open(gate)  # the orphaned session finishes its INSERT, finds its client gone, rolls back
        wait_for(lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
                 TIMEOUT, "the dead worker's session to end")
        assert ledger(conn, "hourly") == []  # the chunk commits whole, with its ledger rows: nothing
        assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == 0
        second = Worker(env, tmp_path / "second.log")
        assert r.get(timeout=TIMEOUT)["ok"]
    finally:
        for w in (first, second):
            if w:
                w.stop()
    # the redelivered task did everything once, as a retry
    for hour in (T0, H1):
        assert [(r[1], r[3], r[4], r[5]) for r in ledger(conn, "hourly", hour)] == [
            ("execution_metrics", "succeeded", 1, "retry"), ("user_activity", "succeeded", 1, "retry"),
            ("credit_consumption", "succeeded", 1, "retry")]
    buckets = [B.bucket("hourly", h) for h in hours_of(T0, HOURS)] + [day]
    assert_same_outputs(conn, clean_outputs(make_db, T0, HOURS, buckets))
    assert_no_duplicates(conn, hours_of(T0, HOURS))
    assert_ledger_truthful(conn, buckets)


# ---- 5. duplicate delivery -------------------------------------------------------------------------------

@pytest.mark.parametrize("lock_wait", ["60", "0"])  # the second delivery waits for the bucket lock, or skips
def test_the_same_task_delivered_twice_at_once(faulty, conn, make_db, broker, tmp_path, lock_wait):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    env = worker_env(broker, url, TALLY_LOCK_WAIT=lock_wait)
    label = B.bucket("hourly", H1).label
    gate = faults.gate("execution_metrics_hourly", H1)
    workers = [Worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        celery = client(env)
        task_id = str(uuid.uuid4())
        for _ in range(2):  # one message, delivered twice: same id, same arguments
            celery.send_task("tally.hourly_rollup", [label], task_id=task_id)
        faults.wait_at(gate)  # the first delivery is mid-INSERT, holding execution_metrics' bucket lock
        wait_for(lambda: faults.bucket_waiters("execution_metrics", H1) or any(
            r[1] == "execution_metrics" and r[3] == "skipped" for r in ledger(conn, "hourly", H1)),
            TIMEOUT, "the second delivery to reach the same step")
        faults.open(gate)
        wait_for(lambda: (rows := ledger(conn, "hourly", H1)) and len(rows) == 6
                 and not [r for r in rows if r[3] == "running"], TIMEOUT, "both deliveries to finish")
    finally:
        for w in workers:
            w.stop()
    rows = ledger(conn, "hourly", H1)
    assert {r[3] for r in rows} <= {"succeeded", "skipped"}
    assert conn.execute("SELECT count(DISTINCT task_id) FROM analytics.aggregation_runs").fetchone()[0] == 1
    skipped = [r for r in rows if r[3] == "skipped"]
    if lock_wait == "0":
        assert skipped and all("another run held the lock" in r[6] for r in skipped)
    else:
        assert not skipped and [r[1] for r in rows].count("execution_metrics") == 2
    bucket = B.bucket("hourly", H1)
    assert_same_outputs(conn, clean_outputs(make_db, T0, HOURS, [bucket]))
    assert_no_duplicates(conn, [H1])
    assert_ledger_truthful(conn, [bucket], attempts_in_order=False)


# ---- 6. a statement timeout, retried by the task ---------------------------------------------------------

def test_a_statement_timeout_is_retried_by_the_task(faulty, conn, make_db, broker, tmp_path):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    env = worker_env(broker, url, TALLY_STATEMENT_TIMEOUT_USER_ACTIVITY="0.5", TALLY_MAX_RETRIES="5",
                     TALLY_RETRY_DELAY="1")
    gate = faults.gate("user_activity_hourly", H1)
    w = Worker(env, tmp_path / "worker.log")
    try:
        r = client(env).send_task("tally.hourly_rollup", [B.bucket("hourly", H1).label])
        wait_for(lambda: [x for x in ledger(conn, "hourly", H1) if x[1] == "user_activity" and x[3] == "failed"],
                 TIMEOUT, "the step to time out")
        faults.open(gate)
        assert r.get(timeout=TIMEOUT)["ok"]
    finally:
        w.stop()
    rows = ledger(conn, "hourly", H1)
    ua = [x for x in rows if x[1] == "user_activity"]
    assert all(x[3] == "failed" and x[6].startswith("QueryCanceled: statement timeout") for x in ua[:-1])
    assert ua[-1][3:6] == ("succeeded", len(ua), "retry")
    assert [(x[1], x[4]) for x in rows if x[1] != "user_activity"] == [("execution_metrics", 1),
                                                                       ("credit_consumption", 1)]
    bucket = B.bucket("hourly", H1)
    assert_same_outputs(conn, clean_outputs(make_db, T0, HOURS, [bucket]))
    assert_ledger_truthful(conn, [bucket])


# ---- 7. a step that fails for good -------------------------------------------------------------------------

def test_a_permanently_failing_step_alerts_at_once_without_retries(faulty, conn, make_db, broker, webhook,
                                                                  tmp_path):
    """A broken step (an SQL error, 42P01) fails the same way every time: no retry, one alert now."""
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    faults.fail("user_activity_hourly", "relation \"user_sessions\" does not exist (a broken step)", sqlstate="42P01")
    env = worker_env(broker, url, TALLY_MAX_RETRIES="2", TALLY_RETRY_DELAY="0.5", TALLY_ALERT_WEBHOOK=webhook.url)
    webhook.posts.clear()
    w = Worker(env, tmp_path / "worker.log")
    label = B.bucket("hourly", H1).label
    try:
        r = client(env).send_task("tally.hourly_rollup", [label])
        with pytest.raises(Exception) as failure:
            r.get(timeout=TIMEOUT)
        assert r.state == "FAILURE" and "user_activity" in str(failure.value)
        wait_for(lambda: webhook.posts, 30, "the alert")
    finally:
        w.stop()
    rows = ledger(conn, "hourly", H1)
    assert [(x[1], x[3], x[4], x[5]) for x in rows] == [
        ("execution_metrics", "succeeded", 1, "manual"), ("user_activity", "failed", 1, "manual"),
        ("credit_consumption", "succeeded", 1, "manual")]
    [alert] = webhook.posts  # one alert, at once
    assert alert["bucket"] == label and alert["step"] == "user_activity" and alert["attempts"] == 1
    assert "user_sessions" in alert["text"]
    assert "failed for good" in w.text()
    # the steps around the failing one committed exactly what a clean run writes
    clean = clean_outputs(make_db, T0, HOURS, [B.bucket("hourly", H1)])
    got = snapshot(conn)
    for table in ("execution_metrics_hourly", "credit_consumption_hourly"):
        assert len(got[table]) == len(clean[table]) and got[table] == clean[table], table
    assert got["user_activity_hourly"] == []
    assert not [x for x in ledger(conn) if x[3] == "running"]


# ---- 16.4: a worker keeps its connections, and a database restart does not break it ------------------------

@pytest.mark.slow
def test_a_worker_reuses_its_connections_and_survives_a_database_restart(private_pg, broker, tmp_path):
    import psycopg

    from tally import migrate

    name = f"tally_pool_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(private_pg.admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = private_pg.url(name)
    migrate.upgrade(url)
    seed_hours(url, T0, 8)
    env = worker_env(broker, url)
    w = Worker(env, tmp_path / "worker.log")
    app = client(env)

    def run(hour: dt.datetime) -> None:
        result = app.send_task("tally.hourly_rollup", [B.HOUR.label(hour)]).get(timeout=TIMEOUT)
        assert result["ok"], result

    def sessions(hours: list[dt.datetime]) -> set[int]:
        """The sessions the steps of ``hours`` ran on (a task borrows two: data, ledger)."""
        with psycopg.connect(url) as c:
            return {p for p, in c.execute("SELECT DISTINCT backend_pid FROM analytics.aggregation_runs "
                                          "WHERE bucket_start = ANY(%s)", [hours])}

    before, after = hours_of(T0, 4), hours_of(T0 + 4 * HOUR, 4)
    try:
        for hour in before:
            run(hour)
        # four tasks, one after the other, on the two connections the first one left in the pool
        assert len(sessions(before)) <= 2
        private_pg.restart()  # every session of the pool is gone
        for hour in after:  # first deliveries, no retry: the pool replaced the dead connections when lending
            run(hour)
        assert len(sessions(after)) <= 2 and not sessions(after) & sessions(before)
    finally:
        w.stop()
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT bucket_start, step, status, attempt, trigger FROM analytics.aggregation_runs "
                         "ORDER BY id").fetchall()
    assert [(r[2], r[3]) for r in rows] == [("succeeded", 1)] * 24 and {r[4] for r in rows} == {"manual"}
    assert "Traceback" not in w.text()
    with psycopg.connect(private_pg.admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
