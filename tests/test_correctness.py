"""Every output column against the brute-force reference (tests/reference.py)."""
from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings

import reference as ref
from outputs import snapshot, source_rows
from strategies import activity_events, execution_rows, insert_events, insert_executions
from support import check_hour, check_period, copy_executions, heavy_rows
from tally import daily_rollup, hourly_rollup, monthly_rollup, weekly_rollup
from tally.seed import seed

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
# The window crosses midnight, so two days (and the rows 1 µs before it) are exercised.
BASE = dt.datetime(2026, 11, 25, 22, tzinfo=UTC)
TRUNCATE = """TRUNCATE public.execution_logs, analytics.user_activity, analytics.execution_metrics_hourly,
    analytics.user_activity_hourly, analytics.credit_consumption_hourly, analytics.execution_metrics_daily,
    analytics.execution_metrics_weekly, analytics.execution_metrics_monthly, analytics.aggregation_runs,
    analytics.dirty_log, analytics.bucket_state"""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(executions=execution_rows(BASE, hours=3), events=activity_events(BASE, hours=3))
def test_every_hourly_and_daily_column_matches_brute_force(db_url, conn, executions, events):
    conn.execute(TRUNCATE)
    with conn.transaction():
        insert_executions(conn, executions)
        insert_events(conn, events)
    # read back what PostgreSQL stored (timestamps normalised, numeric scale applied)
    executions, events = source_rows(conn)
    problems = []
    for k in range(-1, 4):
        hour = BASE + k * HOUR
        result = hourly_rollup(hour)
        assert result.ok, [s.error for s in result.steps]
        problems += check_hour(conn, hour, executions, events)
    for day in (dt.datetime(2026, 11, 25, tzinfo=UTC), dt.datetime(2026, 11, 26, tzinfo=UTC)):
        result = daily_rollup(day)
        assert result.ok, [s.error for s in result.steps]
        problems += check_period(conn, "execution_metrics_daily", day, day + 24 * HOUR, executions)
    assert not problems, "\n".join(problems[:20])


def test_fifty_thousand_executions_in_one_workspace_day(db_url, conn):
    """The scale at which the earlier implementation overflowed int4 and multiplied sums."""
    rng = random.Random(7)
    day = dt.datetime(2026, 11, 24, tzinfo=UTC)
    rows = heavy_rows(50_000, day, 24, workspaces=["big"], rng=rng)
    copy_executions(conn, rows)
    executions, _ = source_rows(conn)
    result = daily_rollup(day)
    assert result.ok and len(result.prepared) == 24  # every hour has executions
    assert ref.period_metrics(executions, day, day + 24 * HOUR)["big"]["total_executions"] == 50_000
    problems = check_period(conn, "execution_metrics_daily", day, day + 24 * HOUR, executions)
    for k in range(24):
        problems += check_hour(conn, day + k * HOUR, executions, [])
    assert not problems, "\n".join(problems[:20])
    # huge credit values: sums exact in numeric
    total = conn.execute("SELECT total_credits FROM analytics.execution_metrics_daily").fetchone()[0]
    assert total == sum((r["credits_used"] or Decimal(0)) for r in executions)


def test_weekly_and_monthly_match_brute_force(db_url, conn):
    rng = random.Random(11)
    # ISO week 2026-12-28 .. 2027-01-03 spans a month and a year boundary
    start = dt.datetime(2026, 12, 27, 20, tzinfo=UTC)
    rows = heavy_rows(3_000, start, 24 * 8, workspaces=["w1", "w2", None, "w3"], rng=rng)
    copy_executions(conn, rows)
    executions, _ = source_rows(conn)
    week = dt.datetime(2026, 12, 28, tzinfo=UTC)
    assert weekly_rollup(week).ok
    problems = check_period(conn, "execution_metrics_weekly", week, week + 7 * 24 * HOUR, executions)
    for month, end in ((dt.datetime(2026, 12, 1, tzinfo=UTC), dt.datetime(2027, 1, 1, tzinfo=UTC)),
                       (dt.datetime(2027, 1, 1, tzinfo=UTC), dt.datetime(2027, 2, 1, tzinfo=UTC))):
        assert monthly_rollup(month).ok
        problems += check_period(conn, "execution_metrics_monthly", month, end, executions)
    assert not problems, "\n".join(problems[:20])


def test_rerun_changes_nothing_and_deleted_sources_disappear(db_url, conn):
    rng = random.Random(3)
    hour = dt.datetime(2026, 11, 24, 5, tzinfo=UTC)
    copy_executions(conn, heavy_rows(500, hour, 1, workspaces=["w1", "w2", "w3"], rng=rng))
    assert hourly_rollup(hour).ok and daily_rollup(hour.replace(hour=0)).ok
    before = snapshot(conn, with_timestamps=True)
    again = hourly_rollup(hour)
    assert again.ok and all(s.changed == 0 and s.removed == 0 for s in again.steps)
    assert daily_rollup(hour.replace(hour=0)).ok
    assert snapshot(conn, with_timestamps=True) == before  # not even updated_at moved

    conn.execute("DELETE FROM public.execution_logs WHERE workspace_id = 'w2'")
    assert hourly_rollup(hour).ok and daily_rollup(hour.replace(hour=0)).ok
    for table in ("execution_metrics_hourly", "credit_consumption_hourly", "execution_metrics_daily"):
        assert conn.execute(f"SELECT count(*) FROM analytics.{table} WHERE workspace_id = 'w2'").fetchone()[0] == 0
    executions, _ = source_rows(conn)
    assert not check_hour(conn, hour, executions, [])
    assert not check_period(conn, "execution_metrics_daily", hour.replace(hour=0), hour.replace(hour=0) + 24 * HOUR,
                            executions)


@pytest.mark.parametrize("value", [0.0, 5e-324, 1e-9, 123.456, 3600.0, 1e12])
def test_sketch_bin_of_a_single_value_is_within_half_a_percent(db_url, conn, value):
    hour = dt.datetime(2026, 11, 24, 5, tzinfo=UTC)
    copy_executions(conn, [{"execution_id": "x", "workspace_id": "w", "user_id": "u", "agent_id": "a",
                             "status": "completed", "started_at": hour, "duration": value, "credits_used": 1}])
    assert daily_rollup(hour.replace(hour=0)).ok
    p50, p99 = conn.execute("SELECT p50_runtime, p99_runtime FROM analytics.execution_metrics_daily").fetchone()
    assert p50 == pytest.approx(value, rel=0.005, abs=0) and p99 == p50


def test_first_run_insert_and_rerun_upsert_write_the_same_rows(db_url, conn):
    """An hour with no output rows is written with a plain INSERT (Step.statement(first_run=True));
    an hour with rows goes through the upsert. Both must leave exactly the same rows."""
    from tally.steps import STEPS
    for name in ("execution_metrics", "user_activity", "credit_consumption"):
        plain, upsert = STEPS[name].statement(True).as_string(None), STEPS[name].statement().as_string(None)
        assert "ON CONFLICT" in upsert and "ON CONFLICT" not in plain and "INSERT INTO" in plain, name
    rng = random.Random(11)
    hour = dt.datetime(2026, 11, 24, 7, tzinfo=UTC)
    copy_executions(conn, heavy_rows(400, hour, 1, workspaces=["w1", "w2", "w3", None], rng=rng))
    seed(conn, start=hour, hours=1, workspaces=3, executions_per_hour=0, events_per_hour=300, seed=5)
    first = hourly_rollup(hour)
    assert first.ok and all(s.changed == s.rows and s.rows > 0 for s in first.steps), first.steps
    clean = snapshot(conn)
    # wrong values in every row and a stale key in every table: the upsert path must repair all of it
    conn.execute("UPDATE analytics.execution_metrics_hourly SET total_executions = 0, p50_runtime = -1")
    conn.execute("UPDATE analytics.user_activity_hourly SET total_events = 0, event_type_counts = '{}'")
    conn.execute("UPDATE analytics.credit_consumption_hourly SET total_credits = -1, executions_count = 0")
    conn.execute("INSERT INTO analytics.execution_metrics_hourly (workspace_id, hour, total_executions, "
                 "successful_executions, failed_executions, total_credits, avg_credits_per_run) "
                 "VALUES ('stale', %s, 1, 0, 0, 0, 0)", [hour])
    again = hourly_rollup(hour)
    assert again.ok and all(s.changed == s.rows for s in again.steps), again.steps
    assert again.steps[0].removed == 1
    assert snapshot(conn) == clean


def test_a_parallel_read_gives_the_same_bits_on_every_run(db_url, conn):
    """With parallel workers, the hour's durations reach each workspace in no fixed order; float
    sums must not depend on it, or a rerun would rewrite unchanged rows (and move updated_at)."""
    import psycopg
    from psycopg import sql

    from tally.executor import apply_step_settings
    from tally.steps import LN_GAMMA, STEPS
    dbname = conn.info.dbname
    conn.execute(sql.SQL("ALTER DATABASE {} SET min_parallel_index_scan_size = 0").format(sql.Identifier(dbname)))
    conn.execute(sql.SQL("ALTER DATABASE {} SET min_parallel_table_scan_size = 0").format(sql.Identifier(dbname)))
    rng = random.Random(5)
    hour = dt.datetime(2026, 11, 24, 9, tzinfo=UTC)
    copy_executions(conn, heavy_rows(30_000, hour, 1, workspaces=["w1", "w2", "w3"], rng=rng))
    conn.execute("ANALYZE public.execution_logs")
    step = STEPS["execution_metrics"]
    with psycopg.connect(db_url) as c:  # the plan the Runner gets: parallel, or this test proves nothing
        apply_step_settings(c, step)
        text = "\n".join(r[0] for r in c.execute(
            sql.SQL("EXPLAIN ") + step.read_statement(),
            dict(start=hour, end=hour + HOUR, ln_gamma=LN_GAMMA)).fetchall())
    assert "Gather" in text, text
    first = hourly_rollup(hour, steps=["execution_metrics"])
    assert first.ok
    before = snapshot(conn, with_timestamps=True)
    for _ in range(4):
        again = hourly_rollup(hour, steps=["execution_metrics"])
        assert again.ok and again.steps[0].changed == 0, again.steps
    assert snapshot(conn, with_timestamps=True) == before
