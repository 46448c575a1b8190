"""Weekly and monthly rollups (ISO weeks, calendar months) and the merged percentiles of periods.

Periods are built from hourly rows only; their percentiles come from merged duration sketches
and must be within 1 % of the exact percentile_cont over the raw durations.
"""
from __future__ import annotations

import datetime as dt
import math
import random
from decimal import Decimal

import pytest

import reference as ref
from outputs import read, source_rows
from tally import buckets as B
from tally import daily_rollup, monthly_rollup, weekly_rollup
from tally.cli import main
from tally.errors import InvalidInput

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
US = dt.timedelta(microseconds=1)
PERCENTILES = {"p50_runtime": 0.5, "p95_runtime": 0.95, "p99_runtime": 0.99}
PERIOD_TABLE = {"daily": ("execution_metrics_daily", "date", "day"),
                "weekly": ("execution_metrics_weekly", "week_start", "week"),
                "monthly": ("execution_metrics_monthly", "month", "month")}


def copy_executions(conn, rows) -> None:
    cols = ("execution_id", "workspace_id", "user_id", "agent_id", "status", "started_at", "duration", "credits_used")
    with conn.transaction(), conn.cursor().copy(f"COPY public.execution_logs ({', '.join(cols)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row([r.get(c) for c in cols])


def row(i, started_at, *, workspace="w1", user="u1", agent="a1", status="completed", duration=1.0, credits="1.5"):
    return {"execution_id": f"e{i}", "workspace_id": workspace, "user_id": user, "agent_id": agent, "status": status,
            "started_at": started_at, "duration": duration, "credits_used": Decimal(credits) if credits else None}


def cli(*args: str) -> int:
    return main(list(args))


def expected_period(executions, start, end) -> dict:
    return {k: {c: v for c, v in r.items() if c not in ("runtime_count", "runtime_sum")}
            for k, r in ref.period_metrics(executions, start, end).items()}


def check(conn, rollup, start, end, executions) -> list[str]:
    table = PERIOD_TABLE[rollup][0]
    problems = ref.compare(read(conn, table, start), expected_period(executions, start, end), percentile_rel=0.01)
    return [f"{table} {start:%Y-%m-%d}: {p}" for p in problems]


# ---- percentiles: heavy-tailed durations, every period within 1 % -------------------------

def test_period_percentiles_are_within_one_percent_of_exact_percentile_cont(db_url, conn):
    """Durations from 1 ms to 1 h (log-uniform, plus ties and invalid values) over February 2027:
    every p50/p95/p99 of every day, ISO week and the month, per workspace, against the exact
    percentile_cont of the raw valid durations; users, agents and averages exact."""
    rng = random.Random(20270201)
    month = dt.datetime(2027, 2, 1, tzinfo=UTC)  # a Monday: February 2027 is exactly four ISO weeks
    hours = 28 * 24
    rows = []
    # dense: ~30 runs an hour; sparse: a handful a day, so small-n interpolation is exercised too
    for workspace, n in (("dense", 20_000), ("medium", 2_500), ("sparse", 90)):
        for _ in range(n):
            started = month + dt.timedelta(microseconds=rng.randrange(hours * 3600 * 10**6))
            kind = rng.random()
            if kind < 0.02:
                duration = rng.choice([None, float("nan"), float("inf"), -1.0])
            elif kind < 0.06:
                duration = rng.choice([0.001, 1.0, 3600.0])  # ties at the ends of the range
            else:
                duration = 10 ** rng.uniform(-3, math.log10(3600))
            rows.append(row(len(rows), started, workspace=workspace, user=f"u{rng.randrange(60)}",
                            agent=rng.choice([f"a{rng.randrange(15)}", None, ""]),
                            status=rng.choice(["completed", "failed", "running"]), duration=duration,
                            credits=str(Decimal(rng.randrange(10**6)) / 10000)))
    copy_executions(conn, rows)

    assert monthly_rollup(month).ok  # aggregates its hours first
    weeks = list(B.within("weekly", month, month + 28 * DAY))
    days = list(B.within("daily", month, month + 28 * DAY))
    assert len(weeks) == 4 and len(days) == 28
    for w in weeks:
        assert weekly_rollup(w.start).ok
    for d in days:
        assert daily_rollup(d.start).ok

    checked, worst, problems = 0, 0.0, []
    for rollup, (table, key, unit) in PERIOD_TABLE.items():
        exact = conn.execute(f"""
            SELECT coalesce(workspace_id, ''), date_trunc('{unit}', started_at, 'UTC')::date,
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration)
                       FILTER (WHERE duration >= 0 AND duration < 'Infinity'::float8),
                   avg(duration) FILTER (WHERE duration >= 0 AND duration < 'Infinity'::float8),
                   count(DISTINCT user_id) FILTER (WHERE user_id <> ''),
                   count(DISTINCT agent_id) FILTER (WHERE agent_id <> ''),
                   count(*)
            FROM public.execution_logs GROUP BY 1, 2""").fetchall()
        got = {(r[0], r[1]): r[2:] for r in conn.execute(f"""
            SELECT workspace_id, {key}, p50_runtime, p95_runtime, p99_runtime, avg_runtime,
                   unique_users, unique_agents, total_executions
            FROM analytics.{table}""").fetchall()}
        assert len(got) == len(exact), f"{table}: {len(got)} rows, expected {len(exact)}"
        for workspace, start, pcts, avg, users, agents, total in exact:
            g = got[(workspace, start)]
            for name, want, have in zip(PERCENTILES, pcts, g[:3]):
                err = abs(have - want) / want if want else abs(have)
                worst = max(worst, err)
                checked += 1
                if err > 0.01:
                    problems.append(f"{table} {workspace} {start} {name}: {have} vs exact {want} ({err:.3%})")
            assert g[3] == pytest.approx(avg, rel=1e-9), (table, workspace, start)
            assert g[4:] == (users, agents, total), (table, workspace, start)
    assert checked == 3 * (3 * 28 + 3 * 4 + 3)
    print(f"worst relative error of {checked} period percentiles: {worst:.3%}")
    assert not problems, "\n".join(problems[:20])
    assert worst <= 0.01


# ---- ISO weeks and months across a month and a year boundary ---------------------------

def test_iso_week_and_months_across_the_year_boundary(db_url, conn, capsys):
    """The ISO week of 2026-12-28 runs through 2027-01-03 (2027-01-01 is in ISO week 53 of 2026):
    stored under its Monday; rows on either side of each boundary land in exactly one week and
    one month."""
    rng = random.Random(53)
    start = dt.datetime(2026, 12, 27, 18, tzinfo=UTC)  # Sunday evening of the week before
    rows = [row(i, start + dt.timedelta(microseconds=rng.randrange(8 * 24 * 3600 * 10**6)),
                workspace=rng.choice(["w1", "w2", None]), user=rng.choice(["u1", "u2", "u3", None]),
                agent=rng.choice(["a1", "a2", ""]), status=rng.choice(["completed", "error", "queued"]),
                duration=10 ** rng.uniform(-3, 3.5))
            for i in range(600)]
    edges = [dt.datetime(2026, 12, 28, tzinfo=UTC), dt.datetime(2027, 1, 1, tzinfo=UTC),
             dt.datetime(2027, 1, 4, tzinfo=UTC)]
    rows += [row(f"edge{i}-{j}", t, workspace="edge", duration=float(j + 1))
             for i, e in enumerate(edges) for j, t in enumerate((e - US, e))]
    copy_executions(conn, rows)
    executions, _ = source_rows(conn)
    assert all(r["started_at"] < edges[2] + DAY for r in executions)

    weeks = [dt.datetime(2026, 12, 21, tzinfo=UTC), edges[0], edges[2]]
    for w in weeks:
        assert cli("run", "weekly", "--week", w.date().isoformat(), "--allow-open") == 0
    assert cli("run", "monthly", "--month", "2026-12", "--allow-open") == 0
    assert cli("run", "monthly", "--month", "2027-01", "--allow-open") == 0
    assert "weekly_metrics" in capsys.readouterr().out

    problems = []
    for w in weeks:
        problems += check(conn, "weekly", w, w + 7 * DAY, executions)
    problems += check(conn, "monthly", dt.datetime(2026, 12, 1, tzinfo=UTC), edges[1], executions)
    problems += check(conn, "monthly", edges[1], dt.datetime(2027, 2, 1, tzinfo=UTC), executions)
    assert not problems, "\n".join(problems[:20])

    # each boundary row in exactly one week and one month; the week is keyed by its Monday
    week_rows = conn.execute("SELECT week_start, total_executions FROM analytics.execution_metrics_weekly "
                             "WHERE workspace_id = 'edge' ORDER BY 1").fetchall()
    assert week_rows == [(dt.date(2026, 12, 21), 1), (dt.date(2026, 12, 28), 4), (dt.date(2027, 1, 4), 1)]
    month_rows = conn.execute("SELECT month, total_executions FROM analytics.execution_metrics_monthly "
                              "WHERE workspace_id = 'edge' ORDER BY 1").fetchall()
    assert month_rows == [(dt.date(2026, 12, 1), 3), (dt.date(2027, 1, 1), 3)]
    total = conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0]
    assert conn.execute("SELECT sum(total_executions) FROM analytics.execution_metrics_weekly").fetchone()[0] == total
    assert conn.execute("SELECT sum(total_executions) FROM analytics.execution_metrics_monthly").fetchone()[0] == total

    ledger = conn.execute("""SELECT rollup, step, bucket_start, bucket_end, status, trigger
                             FROM analytics.aggregation_runs WHERE rollup IN ('weekly', 'monthly') ORDER BY id""").fetchall()
    assert ledger == [
        *[("weekly", "weekly_metrics", w, w + 7 * DAY, "succeeded", "manual") for w in weeks],
        ("monthly", "monthly_metrics", dt.datetime(2026, 12, 1, tzinfo=UTC), edges[1], "succeeded", "manual"),
        ("monthly", "monthly_metrics", edges[1], dt.datetime(2027, 2, 1, tzinfo=UTC), "succeeded", "manual"),
    ]


def test_rerun_updates_values_and_removes_rows_whose_sources_are_gone(db_url, conn):
    week = dt.datetime(2027, 3, 8, tzinfo=UTC)
    month = dt.datetime(2027, 3, 1, tzinfo=UTC)
    copy_executions(conn, [row(i, week + dt.timedelta(hours=5 * i, minutes=7), workspace=f"w{i % 3}",
                               user=f"u{i % 4}", agent=f"a{i % 2}", duration=0.5 + i) for i in range(30)])
    assert weekly_rollup(week).ok and monthly_rollup(month).ok
    before = conn.execute("SELECT workspace_id, updated_at FROM analytics.execution_metrics_weekly ORDER BY 1").fetchall()
    assert [w for w, _ in before] == ["w0", "w1", "w2"]

    again = weekly_rollup(week)  # nothing changed: no row rewritten
    assert again.ok and again.steps[0].changed == 0 and again.steps[0].removed == 0
    assert conn.execute("SELECT workspace_id, updated_at FROM analytics.execution_metrics_weekly ORDER BY 1").fetchall() == before

    conn.execute("DELETE FROM public.execution_logs WHERE workspace_id = 'w1'")
    conn.execute("UPDATE public.execution_logs SET status = 'failed' WHERE workspace_id = 'w2'")
    assert weekly_rollup(week).ok and monthly_rollup(month).ok  # their dirty hours are re-aggregated first
    executions, _ = source_rows(conn)
    problems = check(conn, "weekly", week, week + 7 * DAY, executions)
    problems += check(conn, "monthly", month, dt.datetime(2027, 4, 1, tzinfo=UTC), executions)
    assert not problems, "\n".join(problems)
    for table in ("execution_metrics_weekly", "execution_metrics_monthly"):
        assert [r[0] for r in conn.execute(f"SELECT workspace_id FROM analytics.{table} ORDER BY 1")] == ["w0", "w2"]
    assert conn.execute("SELECT health_score FROM analytics.execution_metrics_weekly WHERE workspace_id = 'w2'"
                        ).fetchone()[0] == 0.0


def test_atomic_and_step_options_of_period_rollups(db_url, conn, capsys):
    week = dt.datetime(2027, 3, 8, tzinfo=UTC)
    copy_executions(conn, [row(1, week + HOUR), row(2, week + 30 * HOUR, user="u2")])
    assert cli("run", "weekly", "--week", "2027-03-08", "--atomic", "--step", "weekly_metrics", "--allow-open") == 0
    assert cli("run", "monthly", "--month", "2027-03", "--json", "--allow-open") == 0
    out = capsys.readouterr().out
    assert '"rollup": "monthly"' in out and '"ok": true' in out
    executions, _ = source_rows(conn)
    assert not check(conn, "weekly", week, week + 7 * DAY, executions)
    users = conn.execute("SELECT unique_users, unique_agents FROM analytics.execution_metrics_monthly").fetchone()
    assert users == (2, 1)


@pytest.mark.parametrize("args, message", [
    (("run", "weekly", "--week", "2026-12-29"), "not a Monday (that ISO week starts 2026-12-28)"),
    (("run", "weekly", "--week", "2026-02-30"), "2026-02-30"),
    (("run", "weekly", "--week", "2026-W53"), "2026-W53"),
    (("run", "monthly", "--month", "2026-13"), "2026-13"),
    (("run", "monthly", "--month", "2026-1"), "expected YYYY-MM"),
    (("run", "monthly", "--month", "2026-12-01"), "expected YYYY-MM"),
    (("run", "weekly", "--week", "2026-12-28", "--step", "daily_metrics"), "daily_metrics"),
])
def test_bad_weeks_and_months_exit_2_and_write_nothing(db_url, conn, capsys, args, message):
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()[0] == 0


def test_python_api_accepts_only_period_starts(db_url, conn):
    with pytest.raises(InvalidInput, match="not the start of a week"):
        weekly_rollup(dt.datetime(2027, 3, 9, tzinfo=UTC))
    with pytest.raises(InvalidInput, match="not a Monday"):
        weekly_rollup("2027-03-09")
    with pytest.raises(InvalidInput, match="not the start of a month"):
        monthly_rollup(dt.datetime(2027, 3, 2, tzinfo=UTC))
    assert monthly_rollup(dt.date(2027, 3, 1)).bucket == B.Bucket("monthly", dt.datetime(2027, 3, 1, tzinfo=UTC),
                                                                   dt.datetime(2027, 4, 1, tzinfo=UTC))
    assert monthly_rollup("2027-02").bucket.end == dt.datetime(2027, 3, 1, tzinfo=UTC)


def test_default_week_and_month_are_the_last_complete_ones(db_url, conn):
    before = (B.last_complete("weekly"), B.last_complete("monthly"))
    assert cli("run", "weekly", "--allow-open") == 0 and cli("run", "monthly", "--allow-open") == 0
    after = (B.last_complete("weekly"), B.last_complete("monthly"))
    got = conn.execute("SELECT rollup, bucket_start, bucket_end FROM analytics.aggregation_runs "
                       "WHERE rollup IN ('weekly', 'monthly') ORDER BY id").fetchall()
    assert [(b.rollup, b.start, b.end) for b in before] == got or [(b.rollup, b.start, b.end) for b in after] == got
    assert got[0][1].weekday() == 0 and got[1][1].day == 1


def test_a_period_is_the_same_to_the_bit_whatever_order_its_hours_were_written_in(make_db, monkeypatch):
    """Backfill workers write hours in any order; the day's float sums (avg_runtime) must not
    depend on the physical order of the hourly rows. Float addition is not associative:
    1 + 1 + 1e16 = 10000000000000002 but 1e16 + 1 + 1 = 1e16."""
    import psycopg

    from outputs import snapshot
    from tally import hourly_rollup
    day = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    durations = {0: 1.0, 1: 1.0, 2: 1e16, 3: 1.0, 4: 1.0}
    hours = [day + h * HOUR for h in durations]
    results = []
    for order in (hours, hours[::-1], [hours[2], hours[4], hours[0], hours[3], hours[1]]):
        url = make_db()
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        with psycopg.connect(url) as conn:
            # read the hourly rows in their physical order, as a bitmap or sequential scan does
            conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET enable_indexscan = off')
            for h, d in durations.items():
                conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, "
                             "status, started_at, duration) VALUES (%s, 'w', 'u', 'a', 'completed', %s, %s)",
                             [f"x{h}", day + h * HOUR + dt.timedelta(minutes=5), d])
        for hour in order:
            assert hourly_rollup(hour, steps=["execution_metrics", "credit_consumption"]).ok
        assert daily_rollup(day).ok
        with psycopg.connect(url) as conn:
            results.append(snapshot(conn)["execution_metrics_daily"])
    assert results[0] == results[1] == results[2]
    # and the sum is the one in hour order
    assert results[0][0][5] == (1.0 + 1.0 + 1e16 + 1.0 + 1.0) / 5, results[0]
