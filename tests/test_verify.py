"""``tally verify``: clean after a backfill; every corrupted cell and missing row reported exactly."""
from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import reference as ref
from support import cli, seed
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


# ---- every compared column of every table: each planted fault, and only it, is reported -----------

COMPARED = {
    "execution_metrics_hourly": ["total_executions", "successful_executions", "failed_executions", "avg_runtime",
                                 "p50_runtime", "p95_runtime", "p99_runtime", "total_credits", "avg_credits_per_run"],
    "user_activity_hourly": ["total_events", "page_views", "unique_sessions", "event_type_counts",
                             "active_duration_seconds", "avg_session_duration"],
    "credit_consumption_hourly": ["total_credits", "avg_credits_per_execution", "peak_credits_per_execution",
                                  "executions_count", "successful_executions", "credits_per_success"],
}
PERIOD_COLUMNS = ["total_executions", "successful_executions", "failed_executions", "avg_runtime", "p50_runtime",
                  "p95_runtime", "p99_runtime", "total_credits", "avg_credits_per_run", "unique_users",
                  "unique_agents", "health_score"]
for _t in ("execution_metrics_daily", "execution_metrics_weekly", "execution_metrics_monthly"):
    COMPARED[_t] = PERIOD_COLUMNS
KEYS = {"execution_metrics_hourly": ("workspace_id",), "user_activity_hourly": ("workspace_id", "user_id"),
        "credit_consumption_hourly": ("workspace_id", "user_id", "agent_id"),
        "execution_metrics_daily": ("workspace_id",), "execution_metrics_weekly": ("workspace_id",),
        "execution_metrics_monthly": ("workspace_id",)}
BUCKET = {"execution_metrics_daily": "date", "execution_metrics_weekly": "week_start",
          "execution_metrics_monthly": "month"}
WEEK = dt.datetime(2026, 11, 23, tzinfo=UTC)


def _label(table: str, bucket) -> str:
    if table.endswith("_monthly"):
        return f"{bucket:%Y-%m}"
    if table.endswith(("_daily", "_weekly")):
        return bucket.isoformat()
    return iso(bucket.astimezone(UTC))


def _wrong(column: str) -> str:
    """An SQL expression for a value of ``column`` outside every tolerance verify allows."""
    if column == "event_type_counts":
        return "event_type_counts || '{\"planted\": 1}'::jsonb"
    return f"{column} * 2 + 1"


def test_every_compared_column_of_every_table_is_checked(db_url, conn):
    """A wrong value in each compared column of each output table (each in its own row), one missing
    row and one unexpected row per table: verify reports each of them, and nothing else."""
    seed(db_url, WEEK, 7 * 24, per_hour=40, workspaces=16, events=80)
    assert cli("backfill", "--from", iso(WEEK), "--to", iso(WEEK + 7 * 24 * HOUR)).code == 0
    assert cli("run", "monthly", "--month", "2026-11").code == 0
    planted = set()
    for table, columns in COMPARED.items():
        key, bucket_col = KEYS[table], BUCKET.get(table, "hour")
        # rows with every compared value set (a NULL avg_runtime would stay NULL when doubled)
        rows = conn.execute(
            f"SELECT {bucket_col}, {', '.join(key)} FROM analytics.{table} "
            f"WHERE {' AND '.join(f'{c} IS NOT NULL' for c in columns)} ORDER BY {bucket_col}, {', '.join(key)}"
        ).fetchall()
        assert len(rows) >= len(columns) + 1, (table, len(rows))
        for column, row in zip(columns, rows):
            conn.execute(f"UPDATE analytics.{table} SET {column} = {_wrong(column)} "
                         f"WHERE ({bucket_col}, {', '.join(key)}) = ({', '.join(['%s'] * len(row))})", row)
            planted.add((table, _label(table, row[0]), tuple(row[1:]), "drift", column))
        gone = rows[len(columns)]
        conn.execute(f"DELETE FROM analytics.{table} WHERE ({bucket_col}, {', '.join(key)}) "
                     f"= ({', '.join(['%s'] * len(gone))})", gone)
        planted.add((table, _label(table, gone[0]), tuple(gone[1:]), "missing row", None))
        cols = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                           "'analytics' AND table_name = %s ORDER BY ordinal_position", [table])]
        conn.execute(f"INSERT INTO analytics.{table} ({', '.join(cols)}) SELECT "
                     + ", ".join("'ghost'" if c == "workspace_id" else c for c in cols)
                     + f" FROM analytics.{table} WHERE ({bucket_col}, {', '.join(key)}) "
                       f"= ({', '.join(['%s'] * len(rows[0]))})", rows[0])
        planted.add((table, _label(table, rows[0][0]), ("ghost", *rows[0][2:]), "unexpected row", None))
    code, found = drifts("--from", "2026-11-01T00:00Z", "--to", "2026-12-01T00:00Z")
    assert code == 1
    got = {(d["table"], d["bucket"], tuple(d["key"][k] for k in KEYS[d["table"]]), d["problem"], d["column"])
           for d in found}
    assert len(found) == len(got)  # nothing reported twice
    assert got == planted


def test_a_workspace_id_too_long_for_a_key_is_no_false_drift(db_url, conn):
    """An id over 400 bytes is stored under its tally_key (prefix, …, md5): verify keys the same way."""
    long_id = "w" * 500
    for i in range(30):
        conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, "
                     "started_at, duration, credits_used) VALUES (%s, %s, 'u', 'a', 'completed', %s, 1.5, 2)",
                     (f"long{i}", long_id, DAY + dt.timedelta(minutes=2 * i)))
    window = ["--from", iso(DAY), "--to", iso(DAY + 24 * HOUR)]
    assert cli("backfill", *window).code == 0
    assert drifts(*window) == (0, [])
