"""Operations: backfill (resume, interrupt, force, queue), retry-failed, status, runs, the bucket lock.

Every process here is real (the CLI as a subprocess where a signal or a second process
matters, in-process elsewhere), every database is a real PostgreSQL; "the data is right"
is checked against a clean run or the brute-force reference.
"""
from __future__ import annotations

import datetime as dt
import json
import signal
from pathlib import Path

import psycopg
import pytest

import reference as ref
from celery_support import FAULTS, Worker, wait_for
from support import cli, ledger, seed, spawn
from outputs import read, snapshot, source_rows
from tally import buckets as B
from tally import daily_rollup, hourly_rollup
from tally.backfill import plan
from tally import state as states
from tally.steps import ROLLUP_STEPS, STEPS, lock_key

pytest_plugins = ["celery_support"]

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
START = dt.datetime(2026, 11, 23, tzinfo=UTC)  # a Monday
SNAPSHOTS = Path(__file__).parent / "snapshots"


def iso(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%dT%H:00Z}"


def span(hours: int, start: dt.datetime = START) -> list[str]:
    return ["--from", iso(start), "--to", iso(start + hours * HOUR)]


def key_of(step: str, hour: dt.datetime) -> tuple[int, int]:
    return lock_key(STEPS[step], int(hour.timestamp()) // 3600)


def lock_waiters(conn, key) -> int:
    return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                        "AND classid::bigint = %s AND objid::bigint = %s", key).fetchone()[0]


def every_step(start: dt.datetime, end: dt.datetime, rollups=("hourly", "daily")) -> list[tuple]:
    """(rollup, step, bucket_start) of a whole backfill, in the order it runs them."""
    return [(b.rollup, s, b.start) for b in plan(start, end, list(rollups)) for s in ROLLUP_STEPS[b.rollup]]


# ---- backfill ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_backfill_resumes_without_redoing_finished_steps(make_db, monkeypatch, tmp_path, sig):
    clean_url, url = make_db(), make_db()
    for u in (clean_url, url):
        seed(u, START, 72)
    monkeypatch.setenv("TALLY_DATABASE_URL", clean_url)
    assert cli("backfill", *span(72)).code == 0

    # The test holds the lock of one step in the middle, so the backfill is at a known point when
    # the signal arrives: day 1 done (its hours in chunks, step by step), and day 2's chunk of
    # execution_metrics gone hour by hour (a lock was busy) up to hour 30, which waits for it.
    stop_at = START + 30 * HOUR
    key = key_of("execution_metrics", stop_at)
    errors = tmp_path / "stderr"
    with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", key)
        proc = spawn(url, "backfill", *span(72), stderr=errors.open("w"), TALLY_LOCK_WAIT="300")
        wait_for(lambda: lock_waiters(conn, key), 60, "the backfill to reach hour 30")
        proc.send_signal(sig)
        if sig == signal.SIGINT:
            wait_for(lambda: "stopping after the current step" in errors.read_text(), 30, "the stop notice")
        else:
            proc.wait(30)
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        code = proc.wait(60)
        first = ledger(conn)

    order = every_step(START, START + 72 * HOUR)
    waiting = ("hourly", "execution_metrics", stop_at)
    done_before = [s for s in order if s[2] < START + 24 * HOUR] + [  # day 1, then day 2's first step
        ("hourly", "execution_metrics", START + k * HOUR) for k in range(24, 30)]
    assert {r[4] for r in first} == {"succeeded"}
    if sig == signal.SIGINT:
        assert code == 130
        assert "run the same command again to continue" in proc.stdout.read()
        # the step that waited for its lock went on once it got it and finished: a clean stop
        assert sorted((r[1], r[2], r[3]) for r in first) == sorted(done_before + [waiting])
    else:
        assert code == -signal.SIGKILL
        # killed while it waited for the lock: that attempt had not begun, so it left no row
        assert sorted((r[1], r[2], r[3]) for r in first) == sorted(done_before)
    day_one = next(r[0] for r in first if r[1] == "daily")
    assert all(r[0] < day_one for r in first if r[1] == "hourly" and r[3] < START + 24 * HOUR)  # hours first

    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    again = cli("backfill", *span(72))
    assert again.code == 0, again.err
    with psycopg.connect(url, autocommit=True) as conn:
        everything = ledger(conn)
        second = everything[len(first):]
        finished = {(r[1], r[2], r[3]) for r in first if r[4] == "succeeded"}
        redone = finished & {(r[1], r[2], r[3]) for r in second}
        assert not redone, sorted(redone)[:5]  # nothing finished was redone
        assert sorted((r[1], r[2], r[3]) for r in second) == sorted(set(order) - finished)
        assert {(r[4], r[5]) for r in second} == {("succeeded", "backfill")}
        with psycopg.connect(clean_url, autocommit=True) as clean:
            assert snapshot(conn) == snapshot(clean)


def test_backfill_skips_what_is_done_reruns_what_changed_and_forces(db_url, conn):
    seed(db_url, START, 48)
    first = cli("backfill", *span(48))
    assert first.code == 0, first.err
    rows = ledger(conn)
    assert sorted((r[1], r[2], r[3]) for r in rows) == sorted(every_step(START, START + 48 * HOUR))
    for day in (START, START + 24 * HOUR):  # every hour before the day that holds it
        day_id = next(r[0] for r in rows if r[1] == "daily" and r[3] == day)
        assert all(r[0] < day_id for r in rows if r[1] == "hourly" and day <= r[3] < day + 24 * HOUR)
    assert {(r[4], r[5]) for r in rows} == {("succeeded", "backfill")}
    assert "50 ran, 0 already done" in first.out

    again = cli("backfill", *span(48))
    assert again.code == 0 and "0 ran, 50 already done" in again.out
    assert len(ledger(conn)) == len(rows)

    late = START + 29 * HOUR  # a late execution: that hour and its day run again, nothing else
    conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, status, started_at, duration, "
                 "credits_used) VALUES ('late', 'ws-0001', 'completed', %s, 2.5, 1.5)", [late + 10 * dt.timedelta(minutes=1)])
    assert cli("backfill", *span(48)).code == 0  # user_activity does not read executions: still current
    assert [(r[1], r[2], r[3]) for r in ledger(conn)[len(rows):]] == [
        ("hourly", s, late) for s in ("execution_metrics", "credit_consumption")] + [
        ("daily", "daily_metrics", START + 24 * HOUR)]

    before = len(ledger(conn))
    forced = cli("backfill", *span(48), "--rollups", "daily", "--force")
    assert forced.code == 0
    assert [(r[1], r[2], r[3]) for r in ledger(conn)[before:]] == [
        ("daily", "daily_metrics", START), ("daily", "daily_metrics", START + 24 * HOUR)]

    executions, _ = source_rows(conn)
    for day in (START, START + 24 * HOUR):
        expected = {k: {c: v for c, v in row.items() if c not in ("runtime_count", "runtime_sum")}
                    for k, row in ref.period_metrics(executions, day, day + 24 * HOUR).items()}
        assert ref.compare(read(conn, "execution_metrics_daily", day), expected, percentile_rel=0.01) == []


def test_backfill_queue_with_two_workers_gives_the_data_of_a_direct_run(broker, make_db, monkeypatch, tmp_path):
    clean_url, url = make_db(), make_db()
    for u in (clean_url, url):
        seed(u, START, 24)
    monkeypatch.setenv("TALLY_DATABASE_URL", clean_url)
    assert cli("backfill", *span(24)).code == 0

    env = {**broker, "TALLY_DATABASE_URL": url}
    workers = [Worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        queued = cli("backfill", *span(24), "--queue", "--json")
        assert queued.code == 0, queued.err
    finally:
        for w in workers:
            w.stop()
    report = json.loads(queued.out)
    assert (report["queued"], report["done"], report["failed"]) == (2, 25, [])  # the 24 hours in one task
    with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(clean_url, autocommit=True) as clean:
        runs = conn.execute("SELECT rollup, step, bucket_start, status, trigger, task_id, id "
                            "FROM analytics.aggregation_runs ORDER BY id").fetchall()
        assert sorted(r[:3] for r in runs) == sorted(every_step(START, START + 24 * HOUR))
        assert all(r[3] == "succeeded" and r[4] == "backfill" and r[5] for r in runs)  # each through a task
        day = next(r for r in runs if r[0] == "daily")
        assert all(r[6] < day[6] for r in runs if r[0] == "hourly")  # the day after all its hours
        assert snapshot(conn) == snapshot(clean)


# ---- retry-failed --------------------------------------------------------------------------------

def test_retry_failed_reruns_exactly_the_failed_steps(db_url, conn):
    conn.execute(FAULTS)
    seed(db_url, START, 3)
    hour = START + HOUR
    conn.execute("INSERT INTO public.test_fault VALUES ('user_activity', %s, 1)", [hour])
    assert cli("backfill", *span(3)).code == 1  # one step failed; the others committed
    assert [(r[2], r[4]) for r in ledger(conn) if r[3] == hour] == [
        ("execution_metrics", "succeeded"), ("user_activity", "failed"), ("credit_consumption", "succeeded")]

    dry = cli("retry-failed", "--dry-run", "--json")
    assert json.loads(dry.out) == [{"rollup": "hourly", "bucket": iso(hour), "steps": ["user_activity"]}]
    later = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + 2 * HOUR
    assert cli("retry-failed", "--since", iso(later)).code == 0  # --since is attempt time: nothing failed since then
    before = len(ledger(conn))

    retried = cli("retry-failed")
    assert retried.code == 0, retried.out
    assert [(r[2], r[3], r[4], r[5]) for r in ledger(conn)[before:]] == [("user_activity", hour, "succeeded", "retry")]
    assert conn.execute("SELECT attempt FROM analytics.aggregation_runs ORDER BY id DESC LIMIT 1").fetchone() == (2,)
    _, events = source_rows(conn)
    assert ref.compare(read(conn, "user_activity_hourly", hour), ref.user_activity_hourly(events, hour)) == []
    assert cli("retry-failed").out.startswith("retry-failed: nothing to retry")

    conn.execute("INSERT INTO public.test_fault VALUES ('user_activity', %s, 9)", [START])
    hourly_rollup(START, steps=["user_activity"], trigger="manual")
    still = cli("retry-failed")
    assert still.code == 1 and "injected fault" in still.out


# ---- status and runs -----------------------------------------------------------------------------

def build_mixed_ledger(db_url, conn):
    """Hours 0-5 of START: ok, ok (+ a dead run), failed step, missing, dirty, running."""
    conn.execute(FAULTS)
    seed(db_url, START, 6)
    h = [START + i * HOUR for i in range(6)]
    hourly_rollup(h[0])
    hourly_rollup(h[1])
    conn.execute("INSERT INTO public.test_fault VALUES ('user_activity', %s, 1)", [h[2]])
    hourly_rollup(h[2])
    hourly_rollup(h[4])
    conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, status, started_at, duration) "
                 "VALUES ('late', 'ws-0002', 'failed', %s, 4.0)", [h[4] + dt.timedelta(minutes=59)])
    hour = lambda t: B.bucket("hourly", t)  # noqa: E731
    # a later attempt that skipped (lock busy) does not change what hour 0 is
    states.skip(conn, states.Run("manual"), "execution_metrics", hour(h[0]), None, "skipped: another run held the lock")
    # a run whose process died (no such backend): reaped into a failure
    states.begin(conn, states.Run("schedule"), "credit_consumption", [hour(h[1])], 2_000_000_000)
    # a run in progress: the backend of the test's own connection
    states.begin(conn, states.Run("manual"), "execution_metrics", [hour(h[5])], conn.info.backend_pid)
    return h


EXPECTED_STATES = [
    ("ok", "ok", "ok"),
    ("ok", "ok", "failed"),
    ("ok", "failed", "ok"),
    ("missing", "missing", "missing"),
    ("dirty", "ok", "dirty"),  # a late execution: user activity is still current
    ("running", "missing", "missing"),
]


def test_status_and_runs_show_exactly_what_the_ledger_holds(db_url, conn):
    h = build_mixed_ledger(db_url, conn)
    got = cli("status", *span(6), "--json")
    assert got.code == 0
    grid = json.loads(got.out)
    assert [(b["rollup"], b["bucket"]) for b in grid["buckets"]] == [("hourly", iso(t)) for t in h]
    assert [tuple(b["steps"][s] for s in ROLLUP_STEPS["hourly"]) for b in grid["buckets"]] == EXPECTED_STATES
    assert grid["summary"] == {"ok": 8, "failed": 2, "dirty": 2, "missing": 5, "running": 1, "sealed": 0}

    runs = json.loads(cli("runs", "--json", "--limit", "100").out)
    rows = ledger(conn)
    assert [r["id"] for r in runs] == [r[0] for r in reversed(rows)]  # newest first
    assert [(r["step"], r["bucket"], r["status"], r["trigger"]) for r in runs] == [
        (r[2], iso(r[3]), r[4], r[5]) for r in reversed(rows)]
    dead = next(r for r in runs if r["status"] == "failed" and r["trigger"] == "schedule")
    assert dead["error"].startswith("abandoned") and dead["bucket"] == iso(h[1])
    failed = json.loads(cli("runs", "--failed", "--json").out)
    assert [(r["step"], r["bucket"]) for r in failed] == [("credit_consumption", iso(h[1])),
                                                          ("user_activity", iso(h[2]))]
    assert "injected fault in user_activity_hourly" in failed[1]["error"]
    assert [r["id"] for r in json.loads(cli("runs", "--limit", "2", "--json").out)] == [rows[-1][0], rows[-2][0]]

    table = cli("runs", "--failed").out
    assert "injected fault in user_activity_hourly" in table and "abandoned" in table


def test_status_screen_snapshot(db_url, conn):
    build_mixed_ledger(db_url, conn)
    hours = cli("status", *span(6)).out
    days = cli("status", *span(48), "--by", "day").out
    for name, text in (("status_hours.txt", hours), ("status_days.txt", days)):
        got = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
        path = SNAPSHOTS / name
        if not path.exists():  # first run writes the snapshot; review it, then it is the contract
            path.parent.mkdir(exist_ok=True)
            path.write_text(got)
        assert got == path.read_text()


def test_a_period_is_dirty_when_its_hours_changed_after_it(db_url, conn):
    seed(db_url, START + 2 * HOUR, 3)
    day = START
    assert daily_rollup(day).ok  # prepares the three hours with data first

    def day_state():
        out = json.loads(cli("status", "--from", iso(day), "--to", iso(day + 24 * HOUR), "--json").out)
        return {b["bucket"]: b["steps"] for b in out["buckets"]}

    assert day_state()[day.date().isoformat()] == {"daily_metrics": "ok"}
    hourly_rollup(START + 3 * HOUR)  # an hour aggregated again after the day
    assert day_state()[day.date().isoformat()] == {"daily_metrics": "dirty"}
    assert daily_rollup(day).ok
    assert day_state()[day.date().isoformat()] == {"daily_metrics": "ok"}
    conn.execute("INSERT INTO analytics.user_activity (user_id, event_type, created_at) VALUES ('u', 'click', %s)",
                 [START + 2 * HOUR])  # user activity does not feed the day: only the hour is dirty
    states = day_state()
    assert states[iso(START + 2 * HOUR)] == {"execution_metrics": "ok", "user_activity": "dirty",
                                             "credit_consumption": "ok"}
    assert states[day.date().isoformat()] == {"daily_metrics": "ok"}
    conn.execute("INSERT INTO public.execution_logs (execution_id, status, started_at) VALUES ('x', 'queued', %s)",
                 [START + 4 * HOUR])
    assert day_state()[day.date().isoformat()] == {"daily_metrics": "dirty"}


# ---- the per-bucket lock: two processes, one hour --------------------------------------------------

@pytest.mark.parametrize("second_waits", [True, False], ids=["waits", "skips"])
def test_two_concurrent_runs_of_one_hour_never_interleave(db_url, conn, second_waits):
    hour = START + 5 * HOUR
    seed(db_url, hour, 1, per_hour=200)
    key = key_of("execution_metrics", hour)
    holders = ("SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
               "AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s")
    with psycopg.connect(db_url) as blocker:
        # Run A takes the bucket lock, then waits on the source table this transaction locks:
        # A holds the bucket while B arrives.
        blocker.execute("LOCK TABLE public.execution_logs IN ACCESS EXCLUSIVE MODE")
        a = spawn(db_url, "run", "hourly", "--hour", iso(hour), TALLY_LOCK_WAIT="120")
        a_pid = wait_for(lambda: conn.execute(holders, key).fetchone(), 60, "run A to hold the bucket lock")[0]
        b = spawn(db_url, "run", "hourly", "--hour", iso(hour), TALLY_LOCK_WAIT="120" if second_waits else "0")
        if second_waits:
            wait_for(lambda: lock_waiters(conn, key), 60, "run B to wait for the bucket lock")
        else:
            wait_for(lambda: conn.execute("SELECT 1 FROM analytics.aggregation_runs WHERE status = 'skipped'"
                                          ).fetchone(), 60, "run B to skip the bucket")
        blocker.rollback()  # A goes on; B gets the lock only once A committed
    (_, a_err), (b_out, b_err) = a.communicate(timeout=60), b.communicate(timeout=60)
    assert (a.returncode, b.returncode) == (0, 0), a_err + b_err

    attempts = conn.execute("SELECT status, backend_pid, started_at, finished_at, error FROM analytics.aggregation_runs "
                            "WHERE step = 'execution_metrics' ORDER BY id").fetchall()
    first = next(r for r in attempts if r[1] == a_pid)
    other = next(r for r in attempts if r[1] != a_pid)
    assert first[0] == "succeeded"
    if second_waits:
        # B waited while A held the bucket (seen in pg_locks above); its attempt began after A's ended
        assert other[0] == "succeeded" and other[2] >= first[3]
    else:
        assert other[0] == "skipped" and "another run held the lock" in other[4]
        assert "skipped" in b_out
    executions, _ = source_rows(conn)
    assert ref.compare(read(conn, "execution_metrics_hourly", hour), ref.execution_hourly(executions, hour)) == []
    states = json.loads(cli("status", *span(1, hour), "--json").out)["buckets"][0]["steps"]
    assert states == {s: "ok" for s in ROLLUP_STEPS["hourly"]}
