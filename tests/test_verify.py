"""``tally verify``: clean after a backfill; every corrupted cell and missing row reported exactly."""
from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import reference as ref
from ops_support import cli, seed
from outputs import snapshot, source_rows

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DAY = dt.datetime(2026, 11, 24, tzinfo=UTC)
SUNDAY = dt.datetime(2026, 11, 29, tzinfo=UTC)  # the last day of the ISO week of 2026-11-23 and of November


def iso(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%dT%H:00Z}"


def drifts(*args: str) -> tuple[int, list[dict]]:
    ran = cli("verify", *args, "--json")
    return ran.code, json.loads(ran.out)["drifts"]


def test_verify_is_clean_after_a_backfill_and_names_each_corrupted_cell_and_missing_row(db_url, conn):
    seed(db_url, DAY, 24, per_hour=60, workspaces=5)
    window = ["--from", iso(DAY), "--to", iso(DAY + 24 * HOUR)]
    assert cli("backfill", *window).code == 0
    clean = cli("verify", *window)
    assert clean.code == 0 and clean.out.startswith("clean")
    assert "24 hours, 1 day)" in clean.out

    hour, other = DAY + 7 * HOUR, DAY + 15 * HOUR
    workspace, stored = conn.execute(
        "SELECT workspace_id, total_credits FROM analytics.execution_metrics_hourly WHERE hour = %s "
        "ORDER BY total_executions DESC LIMIT 1", [hour]).fetchone()
    conn.execute("UPDATE analytics.execution_metrics_hourly SET total_credits = total_credits + 0.0001 "
                 "WHERE workspace_id = %s AND hour = %s", (workspace, hour))
    gone = conn.execute("DELETE FROM analytics.credit_consumption_hourly WHERE (workspace_id, user_id, agent_id, hour) "
                        "= (SELECT workspace_id, user_id, agent_id, hour FROM analytics.credit_consumption_hourly "
                        "   WHERE hour = %s ORDER BY executions_count DESC, user_id, agent_id LIMIT 1) "
                        "RETURNING workspace_id, user_id, agent_id, executions_count", [other]).fetchone()
    before = snapshot(conn, with_timestamps=True)
    runs = conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()

    code, found = drifts(*window)
    assert code == 1
    assert found == [
        {"table": "execution_metrics_hourly", "bucket": iso(hour), "key": {"workspace_id": workspace},
         "problem": "drift", "column": "total_credits", "expected": str(stored), "actual": str(stored + Decimal("0.0001"))},
        {"table": "credit_consumption_hourly", "bucket": iso(other),
         "key": {"workspace_id": gone[0], "user_id": gone[1], "agent_id": gone[2]},
         "problem": "missing row", "column": None, "expected": f"{gone[3]} executions", "actual": None},
    ]
    executions, _ = source_rows(conn)
    assert ref.execution_hourly(executions, hour)[workspace]["total_credits"] == Decimal(found[0]["expected"])
    assert ref.credit_hourly(executions, other)[gone[:3]]["executions_count"] == gone[3]

    shown = cli("verify", *window).out  # the human table names the same row and column
    assert "total_credits" in shown and workspace in shown and "(missing row)" in shown and "drift: 2 problem(s)" in shown
    # verify writes nothing
    assert snapshot(conn, with_timestamps=True) == before
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone() == runs


def test_verify_checks_days_weeks_and_months_from_raw_rows_with_the_spec_tolerance(db_url, conn):
    seed(db_url, SUNDAY, 24, per_hour=80, workspaces=3)
    assert cli("backfill", "--from", iso(SUNDAY), "--to", iso(SUNDAY + 24 * HOUR)).code == 0
    assert cli("run", "weekly", "--week", "2026-11-23").code == 0
    assert cli("run", "monthly", "--month", "2026-11").code == 0
    november = ["--from", "2026-11-01T00:00Z", "--to", "2026-12-01T00:00Z"]
    clean = cli("verify", *november)
    assert clean.code == 0, clean.out
    assert "720 hours, 30 days, 4 weeks, 1 month)" in clean.out

    executions, _ = source_rows(conn)
    month_end = dt.datetime(2026, 12, 1, tzinfo=UTC)
    truth = ref.period_metrics(executions, dt.datetime(2026, 11, 1, tzinfo=UTC), month_end)
    workspace = max(truth, key=lambda w: truth[w]["total_executions"])
    p95 = truth[workspace]["p95_runtime"]

    # within SPEC's 1 % for a period's percentile: not drift
    conn.execute("UPDATE analytics.execution_metrics_monthly SET p95_runtime = %s WHERE workspace_id = %s",
                 (p95 * 1.009, workspace))
    assert drifts(*november) == (0, [])
    # the bugs the seed's implementation had, planted by hand: each is reported where it is
    conn.execute("UPDATE analytics.execution_metrics_monthly SET p95_runtime = %s WHERE workspace_id = %s",
                 (p95 * 1.02, workspace))
    conn.execute("""UPDATE analytics.execution_metrics_weekly w SET avg_runtime = m.mean_of_means  -- a mean of means
                    FROM (SELECT workspace_id, avg(avg_runtime) AS mean_of_means FROM analytics.execution_metrics_hourly
                          GROUP BY workspace_id) m WHERE m.workspace_id = w.workspace_id AND w.workspace_id = %s""",
                 [workspace])
    conn.execute("UPDATE analytics.execution_metrics_daily SET unique_users = unique_users * 2 WHERE workspace_id = %s",
                 [workspace])
    code, found = drifts(*november)
    assert code == 1
    assert [(d["table"], d["bucket"], d["key"], d["column"]) for d in found] == [
        ("execution_metrics_daily", "2026-11-29", {"workspace_id": workspace}, "unique_users"),
        ("execution_metrics_weekly", "2026-11-23", {"workspace_id": workspace}, "avg_runtime"),
        ("execution_metrics_monthly", "2026-11", {"workspace_id": workspace}, "p95_runtime"),
    ]
    users, mean, pct = (d["expected"] for d in found)
    assert int(users) == truth[workspace]["unique_users"]
    assert abs(float(mean) - truth[workspace]["avg_runtime"]) <= 1e-9 * truth[workspace]["avg_runtime"]
    assert abs(float(pct) - p95) <= 1e-12 * p95  # exact percentile_cont of the month's raw durations
