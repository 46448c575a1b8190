"""Query plans, checked with EXPLAIN (never with time): every job reads only its own bucket.

An hourly step must read its source rows once, through an index range on its time column
(so its cost follows the rows in the hour, not the size of the table); a period step must
never read raw executions or events at all, and must read the hourly tables through the
period's hour range. The database holds three seeded days and 60 days of hourly history,
ANALYZEd, so the planner sees realistic proportions instead of a tiny table.
"""
from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest
from psycopg import sql

from tally import buckets as B
from tally.rollups import Runner, apply_step_settings
from tally.seed import seed
from tally.steps import LN_GAMMA, LN_HALF_WIDTH, STEPS

UTC = dt.timezone.utc
DAY = dt.datetime(2026, 3, 4, tzinfo=UTC)  # a Wednesday, mid-week and mid-month
HOUR = dt.timedelta(hours=1)
SOURCES = {"execution_logs": "started_at", "user_activity": "created_at"}
HOURLY_TABLES = ("execution_metrics_hourly", "credit_consumption_hourly", "user_activity_hourly")
HISTORY_COPIES = 20  # the 72 aggregated hours copied 20 times, 3 days apart: 60 days of hourly rows


def _with_db(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def plan_db(admin_url, template_db):
    name = f"tally_plans_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    url = _with_db(admin_url, name)
    try:
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
            conn.execute("VACUUM ANALYZE")
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
            assert "hour =" in read["index_cond"], (step_name, read)


def test_period_preparation_probes_each_hour_with_output_once(plan_db):
    """Planning a period (which hours must be aggregated first) costs one index probe per hour
    that holds output rows, not a search per hour that is not ready.

    Here most of the month is not ready (its hours hold copied hourly rows but no ledger runs).
    A per-hour EXISTS on credit_consumption_hourly used to run for every such hour, and
    PostgreSQL may plan each as a sequential scan (~9 s for a month at 4 M executions a day)."""
    from tally.queries import query
    from tally.steps import PERIOD_INPUTS
    month = B.bucket("monthly", DAY)
    params = dict(start=month.start, end=month.end, steps=list(PERIOD_INPUTS))
    with psycopg.connect(plan_db) as conn:
        root = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + sql.SQL(query("hours_to_prepare")),  # type: ignore[arg-type]
                            params).fetchone()[0][0]["Plan"]
        for table in ("execution_metrics_hourly", "credit_consumption_hourly"):
            present = conn.execute(sql.SQL("SELECT count(DISTINCT hour) FROM {} WHERE hour >= %s AND hour < %s").format(
                sql.Identifier("analytics", table)), [month.start, month.end]).fetchone()[0]
            scans = [n for n in nodes(root) if n.get("Relation Name") == table]
            assert scans, f"hours_to_prepare does not look at {table}"
            assert all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in scans), (table, scans)
            probes = sum(n["Actual Loops"] for n in scans)
            assert 0 < present and probes <= present + 2, (table, probes, present)
    for read in reads_of(root, "execution_logs"):
        assert_range_read(read, "started_at")
