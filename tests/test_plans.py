"""Query plans, checked with EXPLAIN (never with time): every job reads only its own bucket.

An hourly step must read its source rows once, through an index range on its time column
(so its cost follows the rows in the hour, not the size of the table); a period step must
never read raw executions or events at all, and must read the hourly tables through the
period's hour range. The database holds three seeded days and 60 days of hourly history,
ANALYZEd, so the planner sees realistic proportions instead of a tiny table.
"""
from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg import sql

from support import throwaway_db
from tally import buckets as B
from tally.executor import apply_step_settings
from tally.rollups import Runner
from tally.seed import seed
from tally.steps import LN_GAMMA, LN_HALF_WIDTH, STEPS

UTC = dt.timezone.utc
DAY = dt.datetime(2026, 3, 4, tzinfo=UTC)  # a Wednesday, mid-week and mid-month
HOUR = dt.timedelta(hours=1)
SOURCES = {"execution_logs": "started_at", "user_activity": "created_at"}
HOURLY_TABLES = ("execution_metrics_hourly", "credit_consumption_hourly", "user_activity_hourly")
HISTORY_COPIES = 20  # the 72 aggregated hours copied 20 times, 3 days apart: 60 days of hourly rows


@pytest.fixture(scope="module")
def plan_db(admin_url, template_db):
    with throwaway_db(admin_url, template_db, prefix="tally_plans") as url:
        start = DAY - 24 * HOUR
        with psycopg.connect(url) as conn:
            seed(conn, start=start, hours=72, workspaces=20, executions_per_hour=300, events_per_hour=900, seed=3)
        with Runner(url, trigger="backfill") as runner:
            for h in range(72):
                assert runner.run(B.bucket("hourly", start + h * HOUR)).ok
        with psycopg.connect(url, autocommit=True) as conn:
            for table in HOURLY_TABLES:  # older hours, so the hourly tables are mostly history too
                cols = [r[0] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = 'analytics' "
                    "AND table_name = %s ORDER BY ordinal_position", [table])]
                conn.execute(sql.SQL(
                    "INSERT INTO {t} ({cols}) SELECT {vals} FROM {t}, generate_series(1, %s) AS k "
                    "WHERE hour >= %s AND hour < %s").format(
                    t=sql.Identifier("analytics", table), cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                    vals=sql.SQL(", ").join(
                        sql.SQL("hour - k * interval '3 days'") if col == "hour" else sql.Identifier(col)
                        for col in cols)),
                    [HISTORY_COPIES, start, start + 72 * HOUR])
            # and the states of those older hours (60 days of hourly history there too)
            conn.execute("INSERT INTO analytics.bucket_state (rollup, step, bucket_start, bucket_end, state, attempt_id, "
                         "attempt, ok_started_at, ok_finished_at) SELECT rollup, step, "
                         "bucket_start - k * interval '3 days', bucket_end - k * interval '3 days', state, attempt_id, "
                         "attempt, ok_started_at, ok_finished_at FROM analytics.bucket_state, generate_series(1, %s) k",
                         [HISTORY_COPIES])
            conn.execute("VACUUM ANALYZE")
        yield url


def plan(url: str, step_name: str, start: dt.datetime) -> dict:
    """EXPLAIN (FORMAT JSON) of a step's statement, with the settings the Runner gives it."""
    step = STEPS[step_name]
    bucket = B.bucket(step.rollup, start)
    params = dict(start=bucket.start, end=bucket.end, bucket=bucket.start.date(),
                  ln_gamma=LN_GAMMA, ln_half_width=LN_HALF_WIDTH)
    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        apply_step_settings(conn, step)
        plans = []
        if step.reads_separately:  # the read (materialized as the Runner does), then the write from it
            plans.append(conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + step.read_statement(),
                                      params).fetchone()[0][0]["Plan"])
            with psycopg.ClientCursor(conn) as cur:
                cur.execute(step.materialize_statement(), params)
        for first_run in (False, True) if step.reads_separately else (False,):
            plans.append(conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + step.statement(first_run),
                                      params).fetchone()[0][0]["Plan"])
        conn.rollback()
    return plans[0] if len(plans) == 1 else {"Node Type": "(read, then writes)", "Plans": plans}


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def reads_of(root: dict, table: str) -> list[dict]:
    """The scan nodes of ``table``; a bitmap heap scan carries its index condition from its child."""
    out = []
    for n in nodes(root):
        if n.get("Relation Name") != table or n["Node Type"] in ("ModifyTable",):
            continue
        cond = n.get("Index Cond", "")
        if n["Node Type"] == "Bitmap Heap Scan":
            cond = " AND ".join(c.get("Index Cond", "") for c in nodes(n) if c["Node Type"] == "Bitmap Index Scan")
        out.append({"type": n["Node Type"], "index_cond": cond})
    return out


def assert_range_read(read: dict, column: str) -> None:
    assert read["type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), read
    assert f"{column} >=" in read["index_cond"] and f"{column} <" in read["index_cond"], read


@pytest.mark.parametrize("step_name", ["execution_metrics", "credit_consumption", "user_activity"])
def test_every_hourly_step_reads_its_source_once_through_its_time_range(plan_db, step_name):
    step = STEPS[step_name]
    column = SOURCES[step.source]
    root = plan(plan_db, step_name, DAY + 10 * HOUR)
    reads = reads_of(root, step.source)
    assert len(reads) == 1, reads  # one pass over the hour's rows
    assert_range_read(reads[0], column)
    other = next(t for t in SOURCES if t != step.source)
    assert reads_of(root, other) == []


@pytest.mark.parametrize("step_name,start", [("daily_metrics", DAY), ("weekly_metrics", DAY - 2 * 24 * HOUR),
                                             ("monthly_metrics", DAY.replace(day=1))])
def test_period_steps_never_read_raw_rows_and_read_hourly_rows_through_the_period(plan_db, step_name, start):
    root = plan(plan_db, step_name, start)
    for source in SOURCES:
        assert reads_of(root, source) == [], f"{step_name} reads raw {source}"
    for table in ("execution_metrics_hourly", "credit_consumption_hourly"):
        reads = reads_of(root, table)
        assert reads, f"{step_name} does not read {table}"
        for read in reads:
            assert_range_read(read, "hour")


def test_stale_key_removal_and_upserts_use_the_hour_key(plan_db):
    """The hourly writes find the hour's existing rows through an index on hour, not a scan."""
    for step_name in ("execution_metrics", "credit_consumption", "user_activity"):
        table = STEPS[step_name].table
        for read in reads_of(plan(plan_db, step_name, DAY + 10 * HOUR), table):
            assert read["type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (step_name, read)
            assert "hour =" in read["index_cond"] or ("hour >=" in read["index_cond"]
                                                      and "hour <" in read["index_cond"]), (step_name, read)


def test_period_preparation_reads_states_by_index_and_probes_each_unknown_hour_once(plan_db):
    """Planning a period (which hours must be aggregated first) costs one indexed read of its
    hours' states, and for the hours never aggregated one index probe each into the source:
    never a scan of the source or of the state table (a per-hour search that PostgreSQL may
    plan as a sequential scan cost ~9 s for a month at 4 M executions a day)."""
    from tally.queries import query
    from tally.steps import PERIOD_INPUTS
    month = B.bucket("monthly", DAY)
    hours = B.hours_of(month)
    with psycopg.connect(plan_db) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        states = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + sql.SQL(query("state_of_ranges")),  # type: ignore[arg-type]
                              dict(rollup="monthly", steps=["monthly_metrics"], inputs=list(PERIOD_INPUTS),
                                   los=[month.start], his=[month.end], seal_after=dt.timedelta(days=30))
                              ).fetchone()[0][0]["Plan"]
        for table in ("bucket_state",):  # (the dirty log is small by design: marks are cleared once read)
            scans = [n for n in nodes(states) if n.get("Relation Name") == table]
            assert scans and all(n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan") for n in scans), (table, scans)
        probe = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + sql.SQL(query("hours_with_executions")),  # type: ignore[arg-type]
                             dict(hours=hours)).fetchone()[0][0]["Plan"]
        reads = [n for n in nodes(probe) if n.get("Relation Name") == "execution_logs"]
        assert reads and all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in reads), reads
        assert sum(n["Actual Loops"] for n in reads) == len(hours)  # one probe an hour
        for read in reads_of(probe, "execution_logs"):
            assert_range_read(read, "started_at")
