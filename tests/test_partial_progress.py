"""The seed's partial-progress design, made to fail for real."""
from __future__ import annotations

import datetime as dt
import random

import pytest

import reference as ref
from outputs import snapshot, source_rows
from support import copy_executions, heavy_rows, check_hour
from strategies import insert_events
from tally.cli import main

UTC = dt.timezone.utc
HOUR = dt.datetime(2026, 11, 24, 5, tzinfo=UTC)
HOUR_ARG = "2026-11-24T05:00Z"


def cli(*args) -> int:
    return main(list(args))


@pytest.fixture
def hour_of_data(db_url, conn):
    rng = random.Random(5)
    copy_executions(conn, heavy_rows(400, HOUR, 1, workspaces=["w1", "w2", None], rng=rng))
    events = [{"workspace_id": rng.choice(["w1", None]), "user_id": f"u{rng.randrange(5)}",
               "session_id": rng.choice(["s1", "s2", None]), "event_type": rng.choice(["page_view", "click"]),
               "event_name": None, "page_path": "/", "metadata": None,
               "created_at": HOUR + dt.timedelta(seconds=rng.randrange(3600))} for _ in range(300)]
    with conn.transaction():
        insert_events(conn, events)
    return conn


def ledger(conn):
    return conn.execute("SELECT step, status, attempt, trigger, error FROM analytics.aggregation_runs ORDER BY id").fetchall()


def clean_run(make_db, conn):
    """The output of a clean run over the same source rows, in another database."""
    import psycopg
    from strategies import insert_executions

    executions, events = source_rows(conn)
    other = make_db()
    with psycopg.connect(other, autocommit=True) as c2:
        with c2.transaction():
            insert_executions(c2, [{k: v for k, v in r.items() if k not in ("id", "created_at")} for r in executions])
            insert_events(c2, [{k: v for k, v in r.items() if k != "id"} for r in events])
        from tally import hourly_rollup

        assert hourly_rollup(HOUR, url=other).ok
        return snapshot(c2)


def test_middle_step_fails_earlier_committed_later_ran_retry_heals(hour_of_data, conn, make_db, capsys):
    conn.execute("ALTER TABLE analytics.user_activity_hourly RENAME TO user_activity_hourly_away")
    assert cli("run", "hourly", "--hour", HOUR_ARG) == 1
    rows = ledger(conn)
    assert [(s, st) for s, st, *_ in rows] == [
        ("execution_metrics", "succeeded"), ("user_activity", "failed"), ("credit_consumption", "succeeded")]
    assert "user_activity_hourly" in rows[1][4] and rows[1][2] == 1
    executions, events = source_rows(conn)
    # the first step's rows are committed and right; the third step ran
    assert not ref.compare(
        {r[0]: {"total_executions": r[1]} for r in conn.execute(
            "SELECT workspace_id, total_executions FROM analytics.execution_metrics_hourly").fetchall()},
        {k: {"total_executions": v["total_executions"]} for k, v in ref.execution_hourly(executions, HOUR).items()})
    assert conn.execute("SELECT count(*) FROM analytics.credit_consumption_hourly").fetchone()[0] == len(
        ref.credit_hourly(executions, HOUR))
    assert conn.execute("SELECT count(*) FROM analytics.user_activity_hourly_away").fetchone()[0] == 0
    assert "user_activity" in capsys.readouterr().out

    # repair, then retry: only the failed step runs, as attempt 2 with trigger retry
    conn.execute("ALTER TABLE analytics.user_activity_hourly_away RENAME TO user_activity_hourly")
    from tally.rollups import Runner
    from tally import buckets as B

    with Runner(trigger="retry") as runner:
        healed = runner.run(B.bucket("hourly", HOUR), only_unfinished=True)
    assert healed.ok and [s.step for s in healed.steps] == ["user_activity"]
    assert ledger(conn)[-1][:4] == ("user_activity", "succeeded", 2, "retry")
    assert not check_hour(conn, HOUR, executions, events)
    assert snapshot(conn) == clean_run(make_db, conn)


def test_atomic_commits_nothing_when_a_step_fails(hour_of_data, conn):
    conn.execute("ALTER TABLE analytics.user_activity_hourly RENAME TO user_activity_hourly_away")
    assert cli("run", "hourly", "--hour", HOUR_ARG, "--atomic") == 1
    for table in ("execution_metrics_hourly", "credit_consumption_hourly", "user_activity_hourly_away"):
        assert conn.execute(f"SELECT count(*) FROM analytics.{table}").fetchone()[0] == 0
    rows = ledger(conn)
    assert [(s, st) for s, st, *_ in rows] == [("execution_metrics", "failed"), ("user_activity", "failed"),
                                               ("credit_consumption", "failed")]
    assert rows[0][4].startswith("rolled back") and "user_activity_hourly" in rows[1][4]
    assert rows[2][4].startswith("not run")  # so retry-failed runs it too
    conn.execute("ALTER TABLE analytics.user_activity_hourly_away RENAME TO user_activity_hourly")
    assert cli("run", "hourly", "--hour", HOUR_ARG, "--atomic") == 0
    executions, events = source_rows(conn)
    assert not check_hour(conn, HOUR, executions, events)


def test_step_option_runs_one_step(hour_of_data, conn):
    assert cli("run", "hourly", "--hour", HOUR_ARG, "--step", "credit_consumption") == 0
    assert [r[0] for r in ledger(conn)] == ["credit_consumption"]
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == 0


def test_a_period_with_a_failing_hour_fails_and_writes_no_row(hour_of_data, conn):
    # every write to the hourly credits table now fails (a disk-full-like fault)
    conn.execute("ALTER TABLE analytics.credit_consumption_hourly ADD CONSTRAINT fault CHECK (total_credits < 0) NOT VALID")
    assert cli("run", "daily", "--date", "2026-11-24") == 1
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_daily").fetchone()[0] == 0
    last = ledger(conn)[-1]
    assert last[0] == "daily_metrics" and last[1] == "failed" and "2026-11-24T05:00Z" in last[4]
    conn.execute("ALTER TABLE analytics.credit_consumption_hourly DROP CONSTRAINT fault")
    assert cli("run", "daily", "--date", "2026-11-24") == 0
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_daily").fetchone()[0] == 3
