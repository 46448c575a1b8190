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
    for row in ("hourly step execution_metrics", "PostgreSQL's percentile_cont by workspace",
                "hourly step user_activity", "PostgreSQL's GROUP BY workspace, user, session",
                "hourly step credit_consumption", "PostgreSQL's GROUP BY workspace, user, agent",
                "hourly rollup (3 steps + ledger)", "daily rollup", "weekly rollup", "monthly rollup",
                "backfill 1 day", "peak memory of the tally process"):
        assert row in out, f"{row!r} missing from:\n{out}"
    assert "2k/day" in out and "x floor" in out
    assert raw.exists() and raw.stat().st_size > 0
    assert _bench_databases(admin_url) == before  # its scratch database is dropped
