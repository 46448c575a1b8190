"""Unit tests of the reference implementation on hand-computed examples (no database)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings

try:  # tests/ as a plain directory (rootdir on sys.path via pytest's prepend mode)
    import reference as ref
    import strategies
except ImportError:  # tests/ as a package
    from tests import reference as ref
    from tests import strategies

H = datetime(2026, 11, 25, 10, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


def ex(**overrides):
    row = {
        "execution_id": overrides.pop("execution_id", "e"),
        "workspace_id": "w1",
        "user_id": "u1",
        "agent_id": "a1",
        "status": "completed",
        "started_at": H + timedelta(minutes=5),
        "completed_at": None,
        "duration": 1.0,
        "credits_used": Decimal("1.0000"),
        "metadata": None,
    }
    row.update(overrides)
    return row


def ev(**overrides):
    row = {
        "workspace_id": "w1",
        "user_id": "u1",
        "session_id": "s1",
        "event_type": "page_view",
        "event_name": None,
        "page_path": "/",
        "metadata": None,
        "created_at": H + timedelta(minutes=5),
    }
    row.update(overrides)
    return row


# --- percentiles -------------------------------------------------------------


def test_percentile_cont_interpolates():
    values = [1.0, 2.0, 3.0, 4.0]
    assert ref.percentile_cont(values, 0.5) == 2.5
    assert ref.percentile_cont(values, 0.95) == pytest.approx(3.85, rel=1e-15)
    assert ref.percentile_cont(values, 0.99) == pytest.approx(3.97, rel=1e-15)
    assert ref.percentile_cont([7.0], 0.99) == 7.0
    assert ref.percentile_cont([], 0.5) is None


def test_execution_hourly_percentiles_and_avg():
    rows = [ex(execution_id=str(d), duration=d) for d in (4.0, 1.0, 3.0, 2.0)]
    out = ref.execution_hourly(rows, H)["w1"]
    assert out["p50_runtime"] == 2.5
    assert out["p95_runtime"] == pytest.approx(3.85)
    assert out["avg_runtime"] == 2.5
    assert out["runtime_count"] == 4
    assert out["runtime_sum"] == 10.0


# --- status and durations ----------------------------------------------------


def test_invalid_durations_are_excluded():
    rows = [
        ex(execution_id="1", duration=math.nan),
        ex(execution_id="2", duration=-1.0),
        ex(execution_id="3", duration=math.inf),
        ex(execution_id="4", duration=-math.inf),
        ex(execution_id="5", duration=None),
        ex(execution_id="6", duration=0.0),
        ex(execution_id="7", duration=10.0),
    ]
    out = ref.execution_hourly(rows, H)["w1"]
    assert out["total_executions"] == 7
    assert out["runtime_count"] == 2
    assert out["avg_runtime"] == 5.0
    assert out["p50_runtime"] == 5.0
    assert out["runtime_sum"] == 10.0


def test_no_valid_duration_gives_null_runtime_stats():
    out = ref.execution_hourly([ex(duration=math.nan), ex(execution_id="2", duration=None)], H)["w1"]
    for column in ("avg_runtime", "p50_runtime", "p95_runtime", "p99_runtime"):
        assert out[column] is None
    assert out["runtime_count"] == 0
    assert out["runtime_sum"] == 0.0


def test_status_classes_case_insensitive_and_other():
    rows = [
        ex(execution_id="1", status="COMPLETED"),
        ex(execution_id="2", status="Succeeded"),
        ex(execution_id="3", status="success"),
        ex(execution_id="4", status="Timed_Out"),
        ex(execution_id="5", status="ERROR"),
        ex(execution_id="6", status="running"),
        ex(execution_id="7", status="completed "),  # not trimmed: other
        ex(execution_id="8", status="\u212a"),  # KELVIN SIGN is not ASCII 'k'
    ]
    out = ref.execution_hourly(rows, H)["w1"]
    assert out["total_executions"] == 8
    assert out["successful_executions"] == 3
    assert out["failed_executions"] == 2


def test_running_counts_in_total_only():
    out = ref.execution_hourly([ex(status="running")], H)["w1"]
    assert out["total_executions"] == 1
    assert out["successful_executions"] == 0
    assert out["failed_executions"] == 0


# --- keys and buckets --------------------------------------------------------


def test_null_workspace_is_aggregated_under_empty_string():
    rows = [ex(execution_id="1", workspace_id=None), ex(execution_id="2", workspace_id="")]
    out = ref.execution_hourly(rows, H)
    assert set(out) == {""}
    assert out[""]["total_executions"] == 2


def test_hour_is_half_open():
    rows = [
        ex(execution_id="start", started_at=H),
        ex(execution_id="last", started_at=H + timedelta(hours=1) - US),
        ex(execution_id="next", started_at=H + timedelta(hours=1)),
        ex(execution_id="before", started_at=H - US),
    ]
    assert ref.execution_hourly(rows, H)["w1"]["total_executions"] == 2
    assert ref.execution_hourly(rows, H + timedelta(hours=1))["w1"]["total_executions"] == 1
    assert ref.execution_hourly(rows, H + timedelta(hours=2)) == {}


def test_credits_null_is_zero_and_avg_is_exact_decimal():
    rows = [
        ex(execution_id="1", credits_used=None),
        ex(execution_id="2", credits_used=Decimal("1.0000")),
        ex(execution_id="3", credits_used=Decimal("0.0001")),
    ]
    out = ref.execution_hourly(rows, H)["w1"]
    assert out["total_credits"] == Decimal("1.0001")
    assert abs(out["avg_credits_per_run"] - Decimal("0.33336666666666666666666666666")) < Decimal("1e-28")
    assert isinstance(out["avg_credits_per_run"], Decimal)


# --- credit consumption --------------------------------------------------------


def test_credit_hourly():
    rows = [
        ex(execution_id="1", status="completed", credits_used=Decimal("10")),
        ex(execution_id="2", status="SUCCESS", credits_used=Decimal("15")),
        ex(execution_id="3", status="failed", credits_used=Decimal("100")),
        ex(execution_id="4", status="running", credits_used=None),
        ex(execution_id="5", agent_id=None, credits_used=Decimal("-1")),
    ]
    out = ref.credit_hourly(rows, H)
    assert set(out) == {("w1", "u1", "a1"), ("w1", "u1", "")}
    row = out[("w1", "u1", "a1")]
    assert row["credits_per_success"] == Decimal("12.5")
    assert row["total_credits"] == Decimal("125")
    assert row["avg_credits_per_execution"] == Decimal("31.25")
    assert row["peak_credits_per_execution"] == Decimal("100")
    assert row["executions_count"] == 4
    assert row["successful_executions"] == 2


def test_credit_hourly_peak_treats_null_as_zero_and_no_success_gives_zero():
    rows = [
        ex(execution_id="1", status="failed", credits_used=None),
        ex(execution_id="2", status="failed", credits_used=Decimal("-2")),
    ]
    row = ref.credit_hourly(rows, H)[("w1", "u1", "a1")]
    assert row["peak_credits_per_execution"] == Decimal("0")
    assert row["credits_per_success"] == Decimal("0")


def test_credits_per_success_is_real_division():
    rows = [ex(execution_id=str(i), credits_used=Decimal("1")) for i in range(3)]
    row = ref.credit_hourly(rows, H)[("w1", "u1", "a1")]
    assert row["credits_per_success"] == Decimal(1)
    rows[0]["credits_used"] = Decimal("2")
    row = ref.credit_hourly(rows, H)[("w1", "u1", "a1")]
    assert abs(row["credits_per_success"] - Decimal(4) / Decimal(3)) < Decimal("1e-25")


# --- user activity -------------------------------------------------------------


def test_user_activity_counts():
    events = [
        ev(event_type="page_view", session_id="s1", created_at=H + timedelta(minutes=1)),
        ev(event_type="page_view", session_id="s1", created_at=H + timedelta(minutes=1)),
        ev(event_type="click", session_id="s1", created_at=H + timedelta(minutes=11)),
        ev(event_type="Page_View", session_id="s2", created_at=H + timedelta(minutes=2)),
        ev(event_type="click", session_id=None, created_at=H + timedelta(minutes=59)),
        ev(event_type="page_view", user_id="u2", workspace_id=None, session_id=None),
    ]
    out = ref.user_activity_hourly(events, H)
    assert set(out) == {("w1", "u1"), ("", "u2")}
    row = out[("w1", "u1")]
    assert row["total_events"] == 5
    assert row["page_views"] == 2
    assert row["unique_sessions"] == 2
    assert row["event_type_counts"] == {"page_view": 2, "click": 2, "Page_View": 1}
    assert row["active_duration_seconds"] == 600.0  # s1: 10 min, s2: single event
    assert row["avg_session_duration"] == 300.0
    other = out[("", "u2")]
    assert other["unique_sessions"] == 0
    assert other["active_duration_seconds"] == 0.0
    assert other["avg_session_duration"] == 0.0


def test_session_crossing_an_hour_counts_only_in_hour_events():
    events = [
        ev(created_at=H - timedelta(minutes=30)),
        ev(created_at=H + timedelta(minutes=10)),
        ev(created_at=H + timedelta(minutes=40)),
        ev(created_at=H + timedelta(hours=1)),  # next hour
        ev(created_at=H + timedelta(hours=1, minutes=20)),
    ]
    this_hour = ref.user_activity_hourly(events, H)[("w1", "u1")]
    assert this_hour["total_events"] == 2
    assert this_hour["active_duration_seconds"] == 1800.0
    next_hour = ref.user_activity_hourly(events, H + timedelta(hours=1))[("w1", "u1")]
    assert next_hour["active_duration_seconds"] == 1200.0
    previous = ref.user_activity_hourly(events, H - timedelta(hours=1))[("w1", "u1")]
    assert previous["active_duration_seconds"] == 0.0
    assert previous["unique_sessions"] == 1


def test_empty_string_session_is_a_session():
    events = [ev(session_id="", created_at=H), ev(session_id="", created_at=H + timedelta(seconds=1.5))]
    row = ref.user_activity_hourly(events, H)[("w1", "u1")]
    assert row["unique_sessions"] == 1
    assert row["active_duration_seconds"] == 1.5


# --- periods -------------------------------------------------------------------


def test_period_metrics():
    day = datetime(2026, 11, 25, tzinfo=timezone.utc)
    rows = [
        ex(execution_id="1", started_at=day, user_id="u1", agent_id="a1", duration=1.0),
        ex(execution_id="2", started_at=day + timedelta(hours=5), user_id=None, agent_id="", duration=3.0),
        ex(execution_id="3", started_at=day + timedelta(hours=23, minutes=59), user_id="", agent_id="a2",
           status="failed", duration=8.0),
        ex(execution_id="4", started_at=day + timedelta(hours=12), user_id="u2", agent_id="a1", status="queued",
           duration=None),
        ex(execution_id="5", started_at=day + timedelta(days=1), user_id="u9"),  # next day
    ]
    out = ref.period_metrics(rows, day, day + timedelta(days=1))
    row = out["w1"]
    assert row["total_executions"] == 4
    assert row["unique_users"] == 2  # u1, u2: '' and NULL excluded
    assert row["unique_agents"] == 2  # a1, a2
    assert row["health_score"] == 50.0
    assert row["avg_runtime"] == 4.0  # mean of 1, 3, 8 (not a mean of hourly means)
    assert row["p50_runtime"] == 3.0
    assert row["failed_executions"] == 1


def test_period_health_score_is_float():
    day = datetime(2026, 11, 25, tzinfo=timezone.utc)
    rows = [ex(execution_id=str(i), started_at=day, status=s) for i, s in enumerate(["completed", "x", "x"])]
    row = ref.period_metrics(rows, day, day + timedelta(days=1))["w1"]
    assert row["health_score"] == pytest.approx(100.0 / 3)


# --- compare -------------------------------------------------------------------


def test_compare_equal_and_tolerances():
    expected = {"w1": {"total_executions": 3, "avg_runtime": 1.0, "p50_runtime": 2.0,
                       "total_credits": Decimal("1.5"), "avg_credits_per_run": Decimal("0.5"),
                       "p99_runtime": None, "event_type_counts": {"a": 1}}}
    actual = {"w1": {"total_executions": 3, "avg_runtime": 1.0 + 1e-12, "p50_runtime": 2.01,
                     "total_credits": Decimal("1.5000"), "avg_credits_per_run": Decimal("0.50000000000000001"),
                     "p99_runtime": None, "event_type_counts": {"a": 1}, "internal": 42}}
    assert ref.compare(actual, expected, percentile_rel=0.01) == []
    problems = ref.compare(actual, expected)
    assert len(problems) == 1 and "p50_runtime" in problems[0]


def test_compare_reports_differences():
    expected = {"a": {"n": 1, "total_credits": Decimal("1"), "x": None, "j": {"k": 1}, "f": 0.0},
                "gone": {"n": 1}}
    actual = {"a": {"n": 2, "total_credits": Decimal("1.0001"), "x": 0.0, "j": {"k": 2}, "f": 1e-10},
              "extra": {"n": 1}}
    problems = ref.compare(actual, expected)
    text = "\n".join(problems)
    assert "missing row 'gone'" in text
    assert "unexpected row 'extra'" in text
    for column in ("'n'", "'total_credits'", "'x'", "'j'"):
        assert column in text
    assert "'f'" not in text  # within abs 1e-9 of 0
    assert len(problems) == 6


def test_compare_decimal_sum_must_not_be_float():
    problems = ref.compare({"k": {"total_credits": 1.5}}, {"k": {"total_credits": Decimal("1.5")}})
    assert len(problems) == 1


# --- the strategies produce data the reference accepts ----------------------


@settings(max_examples=30, deadline=None)
@given(rows=strategies.execution_rows(H), events=strategies.activity_events(H))
def test_reference_runs_on_generated_data(rows, events):
    assert len({row["execution_id"] for row in rows}) == len(rows)
    total = 0
    for k in range(-1, 4):
        hour = H + timedelta(hours=k)
        hourly = ref.execution_hourly(rows, hour)
        total += sum(r["total_executions"] for r in hourly.values())
        credit = ref.credit_hourly(rows, hour)
        assert sum(r["executions_count"] for r in credit.values()) == sum(
            r["total_executions"] for r in hourly.values()
        )
        assert sum((r["total_credits"] for r in credit.values()), Decimal(0)) == sum(
            (r["total_credits"] for r in hourly.values()), Decimal(0)
        )
        activity = ref.user_activity_hourly(events, hour)
        for row in activity.values():
            assert sum(row["event_type_counts"].values()) == row["total_events"]
            assert row["active_duration_seconds"] >= 0
    assert total == len(rows)  # every row lies in [H - 1us, H + 3h]
    period = ref.period_metrics(rows, H - timedelta(hours=1), H + timedelta(hours=4))
    assert sum(r["total_executions"] for r in period.values()) == len(rows)
