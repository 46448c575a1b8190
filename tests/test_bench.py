"""bench/run.py, the documented benchmark command, runs end to end at a tiny scale.

Timings are not asserted (speed is measured by the benchmark itself, not by tests): this
checks that the command works, prints every row of its table, and leaves no scratch database.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["celery_support"]  # redis_url: a real Redis for the worker bench


def _bench_databases(admin_url: str) -> set[str]:
    with psycopg.connect(admin_url) as c:
        return {r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE 'tally_bench_%'")}


def test_bench_runs_and_prints_every_row(admin_url, tmp_path):
    before = _bench_databases(admin_url)
    raw = tmp_path / "raw.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--database-url", admin_url,
                        "--scales", "2k", "--runs", "1", "--no-history", "--json", str(raw)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for row in ("hourly step execution_metrics", "hourly step user_activity", "hourly step credit_consumption",
                "hourly rollup (3 steps + ledger)", "daily rollup", "weekly rollup", "monthly rollup",
                "backfill 1 day", "peak memory of the tally process"):
        assert row in out, f"{row!r} missing from:\n{out}"
    assert out.count("PostgreSQL's own statement, written") >= 3  # a bound under each hourly step
    assert "2k/day" in out and "x floor" in out
    assert raw.exists() and raw.stat().st_size > 0
    assert _bench_databases(admin_url) == before  # its scratch database is dropped


def test_bounds_bench_runs_both_shapes_and_checks_its_bounds(admin_url):
    """bench/bounds.py: every step beside its bound on both shapes; it fails if a bound wrote
    another number of rows than its step."""
    before = _bench_databases(admin_url)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bounds.py"), "--database-url", admin_url,
                        "--scales", "2400", "--hours", "2", "--runs", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("bench 2400/day", "small 2400/day", "hourly rollup vs sum of bounds"):
        assert row in r.stdout, r.stdout
    assert r.stdout.count("credit_consumption") == 2
    assert _bench_databases(admin_url) == before


def test_worker_bench_measures_a_real_worker(admin_url, redis_url):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "worker.py"), "--database-url", admin_url,
                        "--broker-url", redis_url, "--tasks", "10", "--runs", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollups/s" in r.stdout and "per-task overhead" in r.stdout


def test_retention_bench_purges_a_day_both_ways(admin_url):
    before = _bench_databases(admin_url)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "retention.py"), "--database-url", admin_url,
                        "--per-day", "2400"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plain tables: DELETE in batches" in r.stdout and "daily partitions: DROP" in r.stdout
    assert _bench_databases(admin_url) == before


def test_retention_bench_measures_a_plain_tables_size(conn):
    """bench/retention.py's size column on plain tables: their own size (pg_partition_tree lists
    nothing for a plain table: the first version printed 0 MB). The partitioned side runs in
    test_retention_bench_purges_a_day_both_ways."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import retention as bench_retention
    finally:
        sys.path.remove(str(ROOT / "bench"))
    conn.execute("INSERT INTO analytics.user_activity (workspace_id, user_id, session_id, event_type, created_at) "
                 "SELECT 'w', 'u', 's', 'click', now() FROM generate_series(1, 2000)")
    plain = bench_retention.source_bytes(conn)
    expected = conn.execute("SELECT pg_total_relation_size('public.execution_logs') "
                            "+ pg_total_relation_size('analytics.user_activity')").fetchone()[0]
    assert plain == expected and plain > 0
