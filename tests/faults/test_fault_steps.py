"""Faults inside a step, through the real CLI in a real process.

1. the database connection is killed (pg_terminate_backend) in the middle of a step;
6. a statement timeout cancels a step;
7. a step fails for good: earlier steps committed, later steps ran, exit 1 on every try;
8. a disk-full error (SQLSTATE 53100) mid-rollup in --atomic mode: nothing committed.

"In the middle of a step" is exact: a gate (tests/faults/conftest.py) holds the step's
INSERT inside its transaction until the fault is injected, so nothing depends on timing.
"""
from __future__ import annotations

import datetime as dt

import pytest

from celery_support import wait_for
from fault_support import (HOUR, UTC, assert_ledger_truthful, assert_no_duplicates, assert_same_outputs,
                           clean_outputs, hours_of, ledger, one_error_line, run_tally, seed_hours, start_tally,
                           tally_env)
from outputs import snapshot
from tally import buckets as B

T0 = dt.datetime(2026, 3, 2, 0, tzinfo=UTC)  # a Monday
HOURS = 3
H1 = T0 + HOUR  # the hour the faults hit
DAY = B.bucket("daily", T0)


def tally_pids(conn, url: str) -> dict[str, int]:
    """The backends of tally processes on this database (application_name 'tally'), by pid."""
    db = url.rsplit("/", 1)[1].split("?")[0]
    return {r[0]: r[1] for r in conn.execute(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE datname = %s AND application_name = 'tally'", (db,))}


# ---- 1. the connection is killed mid-step ----------------------------------------------------------------

@pytest.mark.parametrize("kill, rollup, table, atomic", [
    ("data", "hourly", "execution_metrics_hourly", False),  # the step's own connection
    ("all", "hourly", "user_activity_hourly", False),       # and the ledger's, at once
    ("data", "hourly", "user_activity_hourly", True),        # --atomic: the first step rolls back too
    ("data", "daily", "execution_metrics_daily", False),     # a period step, after its hours committed
])
def test_connection_killed_mid_step(faulty, make_db, conn, tmp_path, kill, rollup, table, atomic):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    bucket = B.bucket(rollup, H1 if rollup == "hourly" else T0)
    gate = faults.gate(table, H1 if rollup == "hourly" else None)
    argv = ["run", rollup, "--hour" if rollup == "hourly" else "--date", bucket.label] + (["--atomic"] if atomic else [])
    log = tmp_path / "run.log"
    proc = start_tally(argv, tally_env(url), log)
    try:
        [pid] = faults.wait_at(gate)
        victims = [pid] if kill == "data" else list(tally_pids(conn, url))
        assert pid in victims and (kill == "data" or len(victims) >= 2)
        for victim in victims:
            conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
        # terminating is asynchronous: open the gate only once the victims are gone, or one may pass it first
        wait_for(lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (victims,)).fetchone(),
                 60, "the killed sessions to end")
        faults.open(gate)
        assert proc.wait(120) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text

    rows = ledger(conn, rollup, bucket.start)
    failed = [r for r in rows if r[3] == "failed"]
    assert not [r for r in ledger(conn) if r[3] == "running"]
    killed_step = {"execution_metrics_hourly": "execution_metrics", "user_activity_hourly": "user_activity",
                   "execution_metrics_daily": "daily_metrics"}[table]
    [killed] = [r for r in failed if r[1] == killed_step]
    assert "terminat" in killed[6].lower(), killed  # "terminating connection due to administrator command"
    if atomic:  # all or nothing: the step before it was rolled back, the one after never ran
        assert [(r[1], r[3]) for r in rows] == [("execution_metrics", "failed"), ("user_activity", "failed"),
                                                ("credit_consumption", "failed")]
        assert rows[0][6].startswith("rolled back") and rows[2][6].startswith("not run")
        assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == 0
    elif rollup == "hourly":  # the other steps committed (before) or ran (after, on a new connection)
        assert {r[1] for r in rows if r[3] == "succeeded"} == {"execution_metrics", "user_activity",
                                                              "credit_consumption"} - {killed_step}
    else:  # the day's hours were aggregated and committed before the period step was killed
        assert all(r[3] == "succeeded" for r in ledger(conn, "hourly"))

    # the retry: only what did not succeed runs (after --atomic: every step, the one that never ran
    # included, since it is recorded as failed), and the result is a clean run's.
    retry = run_tally(["retry-failed"], tally_env(url))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    buckets = [B.bucket("hourly", h) for h in hours_of(T0, HOURS)] if rollup == "daily" else [bucket]
    buckets += [bucket] if rollup == "daily" else []
    assert_same_outputs(conn, clean_outputs(make_db, T0, HOURS, buckets))
    assert_no_duplicates(conn, [b.start for b in buckets if b.rollup == "hourly"])
    assert_ledger_truthful(conn, buckets)
    retried = [r for r in ledger(conn, rollup, bucket.start) if r[5] == "retry"]
    assert {r[1] for r in retried} == {r[1] for r in failed} and all(r[3] == "succeeded" for r in retried)


# ---- 6. a statement timeout -------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["TALLY_STATEMENT_TIMEOUT_USER_ACTIVITY", "TALLY_STATEMENT_TIMEOUT"])
def test_statement_timeout_fails_the_step_and_a_retry_completes_it(faulty, make_db, conn, setting):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    gate = faults.gate("user_activity_hourly", H1)  # held for good: only the timeout ends the wait
    env = tally_env(url, **{setting: "0.5"})
    run = run_tally(["run", "hourly", "--hour", B.bucket("hourly", H1).label], env)
    assert run.returncode == 1, run.stderr
    rows = ledger(conn, "hourly", H1)
    assert [(r[1], r[3]) for r in rows] == [("execution_metrics", "succeeded"), ("user_activity", "failed"),
                                            ("credit_consumption", "succeeded")]
    assert rows[1][6].startswith("QueryCanceled: statement timeout"), rows[1][6]
    assert "user_activity" in run.stdout and "statement timeout" in run.stdout
    faults.open(gate)
    retry = run_tally(["retry-failed"], env)  # same timeout, the gate is gone: it completes
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert ledger(conn, "hourly", H1)[-1][1:6] == ("user_activity", H1, "succeeded", 2, "retry")
    bucket = B.bucket("hourly", H1)
    assert_same_outputs(conn, clean_outputs(make_db, T0, HOURS, [bucket]))
    assert_ledger_truthful(conn, [bucket])


def test_a_bad_statement_timeout_setting_is_invalid_input(faulty, conn):
    url, _ = faulty
    run = run_tally(["run", "hourly", "--hour", "2026-03-02T01:00Z"], tally_env(url, TALLY_STATEMENT_TIMEOUT="soon"))
    assert run.returncode == 2 and "TALLY_STATEMENT_TIMEOUT" in one_error_line(run.stderr)
    assert ledger(conn) == []


# ---- 7. a step that fails for good -----------------------------------------------------------------------

def test_a_permanently_failing_step(faulty, make_db, conn):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    faults.fail("user_activity_hourly", "division by zero in a broken step")
    label = B.bucket("hourly", H1).label
    env = tally_env(url)
    for attempt in (1, 2, 3):
        run = run_tally(["run", "hourly", "--hour", label] if attempt == 1 else ["retry-failed"], env)
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr
        latest = [r for r in ledger(conn, "hourly", H1) if r[1] == "user_activity"][-1]
        assert latest[1:5] == ("user_activity", H1, "failed", attempt)
        assert "division by zero in a broken step" in latest[6]
    rows = ledger(conn, "hourly", H1)
    # the steps around it ran once each and committed; only the failing one was retried
    assert [(r[1], r[3], r[4]) for r in rows if r[1] != "user_activity"] == [
        ("execution_metrics", "succeeded", 1), ("credit_consumption", "succeeded", 1)]
    clean = clean_outputs(make_db, T0, HOURS, [B.bucket("hourly", H1)])
    got = snapshot(conn)
    for table in ("execution_metrics_hourly", "credit_consumption_hourly"):
        assert got[table] == clean[table] or _close_tables(got[table], clean[table]), table
    assert got["user_activity_hourly"] == []
    status = run_tally(["status", "--from", "2026-03-02T00:00Z", "--to", "2026-03-02T03:00Z", "--rollups", "hourly",
                        "--json"], env)
    assert status.returncode == 0 and '"failed"' in status.stdout


def _close_tables(a, b) -> bool:
    from fault_support import _close

    return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))


# ---- 8. disk full mid-rollup, --atomic --------------------------------------------------------------------

def test_disk_full_mid_atomic_rollup_commits_nothing(faulty, make_db, conn):
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    label = B.bucket("hourly", H1).label
    env = tally_env(url)
    assert run_tally(["run", "hourly", "--hour", label], env).returncode == 0
    # the source changes (late data), then the re-aggregation hits a full disk at its last step
    conn.execute("UPDATE public.execution_logs SET status = 'completed', duration = 2.5 "
                 "WHERE started_at >= %s AND started_at < %s AND status = 'running'", (H1, H1 + HOUR))
    conn.execute("DELETE FROM analytics.user_activity WHERE created_at >= %s AND created_at < %s "
                 "AND event_type = 'page_view'", (H1, H1 + HOUR))
    before = snapshot(conn, with_timestamps=True)
    dirty_before = conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour = %s", (H1,)).fetchone()[0]
    assert dirty_before > 0
    faults.fail("credit_consumption_hourly", "could not extend file: No space left on device", sqlstate="53100")
    run = run_tally(["run", "hourly", "--hour", label, "--atomic"], env)
    assert run.returncode == 1, run.stderr
    assert snapshot(conn, with_timestamps=True) == before  # not a row, not an updated_at moved
    rows = ledger(conn, "hourly", H1)[3:]
    assert [(r[1], r[3]) for r in rows] == [("execution_metrics", "failed"), ("user_activity", "failed"),
                                            ("credit_consumption", "failed")]
    assert all(r[6].startswith("rolled back") for r in rows[:2]) and rows[2][6].startswith("DiskFull:")
    # the hour is still dirty: its change is not lost
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour = %s", (H1,)).fetchone()[0] == dirty_before
    status = run_tally(["status", "--from", "2026-03-02T01:00Z", "--to", "2026-03-02T02:00Z", "--rollups", "hourly",
                        "--json"], env)
    assert status.returncode == 0 and '"failed"' in status.stdout  # the grid says so

    faults.clear()  # space freed
    again = run_tally(["run", "hourly", "--hour", label, "--atomic"], env)
    assert again.returncode == 0, again.stderr
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour = %s", (H1,)).fetchone()[0] == 0

    # a clean run over today's source (which the fault run must not have touched)
    import reference as ref
    from outputs import read, source_rows

    executions, events = source_rows(conn)
    problems = ref.compare(read(conn, "execution_metrics_hourly", H1), ref.execution_hourly(executions, H1))
    problems += ref.compare(read(conn, "user_activity_hourly", H1), ref.user_activity_hourly(events, H1))
    problems += ref.compare(read(conn, "credit_consumption_hourly", H1), ref.credit_hourly(executions, H1))
    assert not problems, problems[:5]
    assert_no_duplicates(conn, [H1])
    assert_ledger_truthful(conn, [B.bucket("hourly", H1)])


def test_disk_full_in_per_step_mode_keeps_the_steps_before(faulty, conn):
    """The same fault without --atomic: the seed's partial progress (steps before committed, after ran)."""
    url, faults = faulty
    seed_hours(url, T0, HOURS)
    faults.fail("user_activity_hourly", "could not extend file: No space left on device", sqlstate="53100")
    run = run_tally(["run", "hourly", "--hour", B.bucket("hourly", H1).label], tally_env(url))
    assert run.returncode == 1
    assert [(r[1], r[3]) for r in ledger(conn, "hourly", H1)] == [
        ("execution_metrics", "succeeded"), ("user_activity", "failed"), ("credit_consumption", "succeeded")]
    for table, n in (("execution_metrics_hourly", True), ("credit_consumption_hourly", True),
                     ("user_activity_hourly", False)):
        assert bool(conn.execute(f"SELECT count(*) FROM analytics.{table}").fetchone()[0]) is n, table
