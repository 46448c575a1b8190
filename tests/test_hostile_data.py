"""Hostile source data: every oddity a production table can hold.

Each case gives the SPEC's numbers (checked against tests/reference.py) or a clear,
logged rejection: never a failed hour. A case the step SQL cannot take yet is marked
xfail (strict) with the error it raises; the day the step SQL is fixed it shows as
XPASS, a failure, so the marker gets removed.
"""
from __future__ import annotations

import datetime as dt
import math
import random
import string
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import reference as ref
from outputs import source_rows
from strategies import insert_events, insert_executions
from support import check_hour, check_period
from tally import buckets as B
from tally import daily_rollup, hourly_rollup, monthly_rollup, weekly_rollup
from tally.cli import main

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
H = dt.datetime(2026, 11, 25, 10, tzinfo=UTC)  # a Wednesday
DAY = H.replace(hour=0)
WEEK = DAY - dt.timedelta(days=DAY.weekday())
MONTH = DAY.replace(day=1)
MAX_CREDITS = Decimal("99999999999999.9999")  # numeric(18,4)


def execution(i, **kw) -> dict:
    row = {"execution_id": f"x{i}", "workspace_id": "w", "user_id": "u", "agent_id": "a", "status": "completed",
           "started_at": H + dt.timedelta(seconds=i % 3600), "completed_at": None, "duration": 1.0,
           "credits_used": Decimal("1.5"), "metadata": None}
    row.update(kw)
    return row


def event(i, **kw) -> dict:
    row = {"workspace_id": "w", "user_id": "u", "session_id": "s", "event_type": "page_view", "event_name": None,
           "page_path": "/", "metadata": None, "created_at": H + dt.timedelta(seconds=i % 3600)}
    row.update(kw)
    return row


def load(conn, executions=(), events=()) -> tuple[list[dict], list[dict]]:
    with conn.transaction():
        insert_executions(conn, list(executions))
        insert_events(conn, list(events))
    return source_rows(conn)


def roll_all(hours=(H,), day=DAY) -> list:
    """Every hourly step of ``hours``, then the day, week and month of ``day``; all must succeed."""
    results = [hourly_rollup(h) for h in hours]
    results += [daily_rollup(day), weekly_rollup(day - dt.timedelta(days=day.weekday())), monthly_rollup(day.replace(day=1))]
    failed = [(str(r.bucket), s.step, s.error) for r in results for s in r.steps if s.status != "succeeded"]
    failed += [(str(p.bucket), s.step, s.error) for r in results for p in r.prepared for s in p.steps
               if s.status != "succeeded"]
    assert not failed, failed
    return results


def check_everything(conn, executions, events, hours=(H,), day=DAY) -> None:
    problems = []
    for h in hours:
        problems += check_hour(conn, h, executions, events)
    week = day - dt.timedelta(days=day.weekday())
    month = day.replace(day=1)
    problems += check_period(conn, "execution_metrics_daily", day, day + 24 * HOUR, executions)
    problems += check_period(conn, "execution_metrics_weekly", week, week + 7 * 24 * HOUR, executions)
    problems += check_period(conn, "execution_metrics_monthly", month, B.advance("monthly", month), executions)
    assert not problems, "\n".join(problems[:20])


def ledger_failures(conn) -> list[tuple]:
    return conn.execute("SELECT rollup, step, bucket_start, error FROM analytics.aggregation_runs "
                        "WHERE status <> 'succeeded' ORDER BY id").fetchall()


# ---- durations ---------------------------------------------------------------------------------

SPECIAL_DURATIONS = [math.nan, math.inf, -math.inf, -1.0, -1e-300, -0.0, 0.0, 5e-324, 1e-300, 1e-9, 0.5, 1.0, 1.0,
                     3600.0, 86400.0 * 365, 1e15, 1e100, None]


def test_nan_infinite_negative_and_tiny_durations(db_url, conn):
    rows = [execution(i, duration=d) for i, d in enumerate(SPECIAL_DURATIONS)]
    # a workspace whose every duration is invalid: runtime statistics NULL, counts still right
    rows += [execution(100 + i, workspace_id="no-valid", duration=d)
             for i, d in enumerate([math.nan, math.inf, -math.inf, -5.0, None])]
    executions, events = load(conn, rows)
    roll_all()
    check_everything(conn, executions, events)
    stats = conn.execute("SELECT avg_runtime, p50_runtime, p99_runtime, total_executions, runtime_count "
                         "FROM analytics.execution_metrics_hourly WHERE workspace_id = 'no-valid'").fetchone()
    assert stats == (None, None, None, 5, 0)
    valid = [d for d in SPECIAL_DURATIONS if d is not None and math.isfinite(d) and d >= 0]
    assert conn.execute("SELECT runtime_count FROM analytics.execution_metrics_hourly WHERE workspace_id = 'w'"
                        ).fetchone()[0] == len(valid)


# Finite durations whose squares (PostgreSQL's float8 avg keeps a sum of squares) or sums
# overflow float8. SPEC: a valid duration is any finite one >= 0, so these count.
HUGE = [1e154, 1e200, 1e300, 1.7e308]


@pytest.mark.parametrize("huge", HUGE)
def test_huge_finite_durations(db_url, conn, huge):
    rows = [execution(0, duration=huge), execution(1, duration=1.0), execution(2, duration=2.0)]
    executions, events = load(conn, rows)
    result = hourly_rollup(H)
    assert result.ok, [(s.step, s.error) for s in result.steps if s.status != "succeeded"]
    roll_all()
    check_everything(conn, executions, events)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="two durations of 1e308 fail execution_metrics (NumericValueOutOfRange): their sum "
                          "overflows float8 (runtime_sum); strict, so a fix shows as XPASS")
def test_two_durations_whose_sum_overflows_float8(db_url, conn):
    """1e308 + 1e308 is not a float8: the mean (1e308) is, and SPEC asks for it."""
    executions, events = load(conn, [execution(0, duration=1e308), execution(1, duration=1e308)])
    result = hourly_rollup(H)
    assert result.ok, [(s.step, s.error) for s in result.steps if s.status != "succeeded"]
    roll_all()
    assert conn.execute("SELECT avg_runtime FROM analytics.execution_metrics_hourly").fetchone()[0] == 1e308


# ---- credits --------------------------------------------------------------------------------------

def test_credits_at_the_limits_of_numeric_18_4(db_url, conn):
    values = [MAX_CREDITS, -MAX_CREDITS, Decimal("0.0001"), Decimal("-0.0001"), Decimal(0), None,
              Decimal("12345678901234.5678")]
    rows = [execution(i, credits_used=v, status=("completed" if i % 2 else "failed")) for i, v in enumerate(values)]
    # a thousand maximal runs: a total of ~1e17 no numeric(18,4) can hold, summed exactly
    rows += [execution(1000 + i, workspace_id="rich", user_id=f"u{i % 3}", credits_used=MAX_CREDITS,
                       status=("completed" if i % 3 else "timeout")) for i in range(1000)]
    executions, events = load(conn, rows)
    roll_all()
    check_everything(conn, executions, events)
    total = conn.execute("SELECT total_credits FROM analytics.execution_metrics_monthly WHERE workspace_id = 'rich'"
                         ).fetchone()[0]
    assert total == MAX_CREDITS * 1000
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):  # the source itself refuses more
        with conn.transaction():
            insert_executions(conn, [execution(5000, credits_used=MAX_CREDITS * 10)])


# ---- ids -----------------------------------------------------------------------------------------------

def _random_id(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits + "é漢🤖") for _ in range(n))


NON_ASCII = ["é", "e\u0301",  # NFC and NFD: different strings, different groups
             "工作区", "🤖🤖", "\u202eRTL", "zero\u200bwidth", "tab\tid", "new\nline", " ", "İ", "ß", "Σ", "σ", "ς"]


def test_non_ascii_and_long_but_indexable_ids(db_url, conn):
    rows = [execution(i, workspace_id=w, user_id=w, agent_id=w) for i, w in enumerate(NON_ASCII)]
    rows += [execution(100 + i, workspace_id="x" * 10_000, user_id="y" * 10_000, agent_id="z" * 10_000)
             for i in range(3)]  # 10,000 characters that compress: fit the key index
    rows += [execution(200, workspace_id=_random_id(600, 1), user_id=_random_id(600, 2), agent_id=_random_id(600, 3))]
    events = [event(i, workspace_id=w, user_id=w or "u", session_id=w) for i, w in enumerate(NON_ASCII)]
    events += [event(100, workspace_id="x" * 10_000, user_id="y" * 10_000, session_id="s" * 10_000,
                     event_type="t" * 10_000, event_name="n" * 10_000, page_path="/" * 10_000)]
    executions, events = load(conn, rows, events)
    roll_all()
    check_everything(conn, executions, events)
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == len(
        ref.execution_hourly(executions, H))


def test_ten_thousand_random_characters_in_an_id(db_url, conn):
    """An id that does not compress exceeds a btree key (max ~2.7 kB): it is aggregated under its
    first 100 characters, '…' and its md5 (migration 0004), and the hour aggregates."""
    long_ws, long_user = _random_id(10_000, 7), _random_id(10_000, 8)
    rows = [execution(0, workspace_id=long_ws, user_id=long_user), execution(1),
            execution(2, workspace_id=long_ws[:9_999], agent_id=_random_id(3_000, 10))]
    executions, events = load(conn, rows, [event(0, user_id=_random_id(10_000, 9))])
    result = hourly_rollup(H)
    assert result.ok, [(s.step, s.error) for s in result.steps]
    roll_all()
    check_everything(conn, executions, events)
    # two ids that share their first 100 characters stay two keys
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == 3


# ---- NULLs, duplicates, times --------------------------------------------------------------------------

EXEC_NULLABLE = ["workspace_id", "user_id", "agent_id", "completed_at", "duration", "credits_used", "metadata",
                 "created_at"]
EVENT_NULLABLE = ["workspace_id", "session_id", "event_name", "page_path", "metadata"]


def test_nulls_in_every_nullable_column(db_url, conn):
    rows = [execution(i, **{col: None}) for i, col in enumerate(EXEC_NULLABLE)]
    rows.append(execution(99, **{col: None for col in EXEC_NULLABLE}))
    events = [event(i, **{col: None}) for i, col in enumerate(EVENT_NULLABLE)]
    events.append(event(99, **{col: None for col in EVENT_NULLABLE}))
    executions, events = load(conn, rows, events)
    assert conn.execute("SELECT count(*) FROM public.execution_logs WHERE created_at IS NULL").fetchone()[0] == 2
    roll_all()
    check_everything(conn, executions, events)
    # nothing dropped: every source row is in a total
    assert conn.execute("SELECT sum(total_executions) FROM analytics.execution_metrics_hourly").fetchone()[0] == len(rows)
    assert conn.execute("SELECT sum(total_events) FROM analytics.user_activity_hourly").fetchone()[0] == len(events)


def test_duplicate_execution_id_attempts(db_url, conn, monkeypatch):
    monkeypatch.setenv("TALLY_CATCHUP_DAYS", "0")  # only the dirty hour, not a week of empty ones
    executions, events = load(conn, [execution(0, status="running", duration=None), execution(1)])
    roll_all()
    # the platform inserts the same execution again: the source refuses it, nothing double-counts
    with pytest.raises(psycopg.errors.UniqueViolation):
        with conn.transaction():
            insert_executions(conn, [execution(0, status="completed")])
    # ... or upserts the finished attempt: the hour is dirty, catch-up re-aggregates it once
    conn.execute("""INSERT INTO public.execution_logs (execution_id, status, started_at, duration, credits_used,
                        workspace_id, user_id, agent_id)
                    VALUES ('x0', 'completed', %s, 7.5, 3, 'w', 'u', 'a')
                    ON CONFLICT (execution_id) DO UPDATE SET status = EXCLUDED.status, duration = EXCLUDED.duration,
                        credits_used = EXCLUDED.credits_used""", (H,))
    assert main(["catch-up"]) == 0
    executions, events = source_rows(conn)
    assert len(executions) == 2
    check_everything(conn, executions, events)
    assert conn.execute("SELECT total_executions, successful_executions FROM analytics.execution_metrics_daily"
                        ).fetchone() == (2, 2)


FAR = [dt.datetime(1, 1, 1, 0, 30, tzinfo=UTC), dt.datetime(1, 1, 1, 23, 59, 59, 999999, tzinfo=UTC),
       dt.datetime(1970, 1, 1, tzinfo=UTC) - dt.timedelta(microseconds=1),
       dt.datetime(9998, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), dt.datetime(9999, 12, 31, 23, 0, tzinfo=UTC)]
# beyond what Python's datetime holds, but valid in PostgreSQL: a bucket tally can never name
UNREPRESENTABLE = ["infinity", "-infinity", "20000-01-01 00:00:00+00", "4000-01-01 00:00:00+00 BC"]


def test_timestamps_far_in_the_past_and_future(db_url, conn, monkeypatch):
    monkeypatch.setenv("TALLY_CATCHUP_DAYS", "0")
    rows = [execution(i, started_at=t, execution_id=f"far{i}") for i, t in enumerate(FAR)]
    rows += [execution(50 + i) for i in range(5)]  # an ordinary hour beside them
    events = [event(i, created_at=t) for i, t in enumerate(FAR)] + [event(50 + i) for i in range(5)]
    executions, events = load(conn, rows, events)
    for i, t in enumerate(UNREPRESENTABLE):
        conn.execute("INSERT INTO public.execution_logs (execution_id, status, started_at, duration) "
                     "VALUES (%s, 'completed', %s::timestamptz, 1)", (f"inf{i}", t))
        conn.execute("INSERT INTO analytics.user_activity (user_id, event_type, created_at) "
                     "VALUES ('u', 'page_view', %s::timestamptz)", (t,))
    # the reference sees only what Python can hold; those rows fall in no bucket below anyway
    executions = [e for e in executions if not e["execution_id"].startswith("inf")]

    hours = [B.floor("hourly", t) for t in FAR[:4]] + [H]
    roll_all(hours=hours)
    for day in {B.floor("daily", t) for t in FAR[:4]}:
        roll_all(hours=(), day=day)
        check_everything(conn, executions, events, hours=(), day=day)
    check_everything(conn, executions, events, hours=hours)
    assert main(["run", "monthly", "--month", "9999-12"]) == 2  # year 9999 has no next month: a clear refusal

    # the dirty marks of hours no one can name stay put and harm nothing: every command still works
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour = 'infinity'").fetchone()[0] >= 1
    for argv in (["catch-up"], ["status", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z"],
                 ["runs", "--limit", "500"], ["verify", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z"],
                 ["retry-failed"]):
        assert main(argv) == 0, argv
    assert not ledger_failures(conn)


def test_hostile_statuses_and_event_types(db_url, conn):
    statuses = ["COMPLETED", "Succeeded", "timed_out", "TIMEOUT", "ErRoR", "completed ", " failed", "complete",
                "s" * 10_000, "", "İ", "\u212a", "running", "succeeded\x01", "完成", "failed'; DROP TABLE x; --"]
    rows = [execution(i, status=s) for i, s in enumerate(statuses)]
    types = ["page_view", "Page_View", "page_view ", "", "t" * 5_000, "é", "e\u0301", '{"json": 1}', "null",
             "a\"b", "a\\b", "\x01"]
    events = [event(i, event_type=t, session_id=f"s{i % 3}") for i, t in enumerate(types)]
    executions, events = load(conn, rows, events)
    roll_all()
    check_everything(conn, executions, events)


# Durations that stress percentile interpolation: zeros of both signs, denormals (whose
# differences cannot be scaled without an SQL underflow error), neighbours one ulp apart, huge
# values, ties.
INTERPOLATION_DURATIONS = [0.0, -0.0, 5e-324, 1e-323, 2.2250738585072014e-308, 1e-300, 1e-9, 0.1,
                           math.nextafter(0.1, 1), 1.0, 1.0, 3.0, 3600.0, 1e154, 1e300, 1.7e308]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(durations=st.lists(st.one_of(st.sampled_from(INTERPOLATION_DURATIONS),
                                    st.floats(min_value=0, max_value=1e6, allow_nan=False)),
                          min_size=1, max_size=60))
@example(durations=[0.0, 5e-324])  # p50 = 0 + 0.5 * 5e-324: rounds to 0, an underflow error in SQL
@example(durations=[5e-324, 1e-323, 0.0, 2.2250738585072014e-308, 1.0, 1.0, 1.7e308])
@example(durations=[-0.0, 0.0, 0.0, 1e-9])
def test_hourly_percentiles_equal_postgres_percentile_cont_to_the_bit(make_db, monkeypatch, durations):
    """The hourly step computes p50/p95/p99 from the sorted durations with percentile_cont's own
    arithmetic (execution_metrics.sql); they must equal PostgreSQL's percentile_cont exactly."""
    assume(sum(durations) < math.inf)  # a float8 sum that overflows fails the hour (the xfail above)
    url = make_db()
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    with psycopg.connect(url, autocommit=True) as conn:
        load(conn, [execution(i, duration=d) for i, d in enumerate(durations)])
        assert hourly_rollup(H, steps=["execution_metrics"]).ok
        mine = conn.execute("SELECT ARRAY[p50_runtime, p95_runtime, p99_runtime] "
                            "FROM analytics.execution_metrics_hourly").fetchone()[0]
        theirs = conn.execute("SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration) "
                              "FROM public.execution_logs").fetchone()[0]
    assert mine == theirs, (durations, mine, theirs)  # float ==: bit for bit, except that -0.0 == 0.0
