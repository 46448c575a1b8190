import datetime as dt

from tally import hourly_rollup

UTC = dt.timezone.utc


def test_empty_hour_succeeds_with_no_rows(db_url, conn):
    result = hourly_rollup("2026-11-25T10:00Z")
    assert result.ok
    assert [s.rows for s in result.steps] == [0, 0, 0]
    statuses = conn.execute("SELECT step, status FROM analytics.aggregation_runs ORDER BY id").fetchall()
    assert statuses == [("execution_metrics", "succeeded"), ("user_activity", "succeeded"),
                        ("credit_consumption", "succeeded")]
