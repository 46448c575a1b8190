"""Read tally's output tables into the ``{key: {column: value}}`` maps of tests/reference.py."""
from __future__ import annotations

import datetime as dt

TABLE_KEYS = {
    "execution_metrics_hourly": ("workspace_id",),
    "user_activity_hourly": ("workspace_id", "user_id"),
    "credit_consumption_hourly": ("workspace_id", "user_id", "agent_id"),
    "execution_metrics_daily": ("workspace_id",),
    "execution_metrics_weekly": ("workspace_id",),
    "execution_metrics_monthly": ("workspace_id",),
}
BUCKET_COLUMN = {
    "execution_metrics_hourly": "hour", "user_activity_hourly": "hour", "credit_consumption_hourly": "hour",
    "execution_metrics_daily": "date", "execution_metrics_weekly": "week_start", "execution_metrics_monthly": "month",
}
SKIP = {"created_at", "updated_at", "runtime_sketch_bins", "runtime_sketch_counts"}


def read(conn, table: str, bucket) -> dict:
    """Rows of one bucket of ``table`` keyed like the reference (a 1-tuple key becomes a plain id)."""
    col = BUCKET_COLUMN[table]
    if isinstance(bucket, dt.datetime) and col != "hour":
        bucket = bucket.date()
    cur = conn.execute(f"SELECT * FROM analytics.{table} WHERE {col} = %s", (bucket,))
    names = [c.name for c in cur.description]
    keys = TABLE_KEYS[table]
    result = {}
    for row in cur.fetchall():
        rec = dict(zip(names, row))
        key = tuple(rec[k] for k in keys)
        result[key[0] if len(key) == 1 else key] = {
            k: v for k, v in rec.items() if k not in SKIP and k not in keys and k != col
        }
    return result


def snapshot(conn, *, with_timestamps: bool = False) -> dict[str, list[tuple]]:
    """Every output table, sorted: for 'equals a clean run' comparisons."""
    out = {}
    for table in TABLE_KEYS:
        cur = conn.execute(f"SELECT * FROM analytics.{table}")
        names = [c.name for c in cur.description]
        keep = [i for i, n in enumerate(names) if with_timestamps or n not in ("created_at", "updated_at")]
        out[table] = sorted((tuple(r[i] for i in keep) for r in cur.fetchall()), key=repr)
    return out


def source_rows(conn) -> tuple[list[dict], list[dict]]:
    """The current source rows (executions, events) as dicts."""
    cur = conn.execute("SELECT * FROM public.execution_logs")
    names = [c.name for c in cur.description]
    executions = [dict(zip(names, r)) for r in cur.fetchall()]
    cur = conn.execute("SELECT * FROM analytics.user_activity")
    names = [c.name for c in cur.description]
    events = [dict(zip(names, r)) for r in cur.fetchall()]
    return executions, events
