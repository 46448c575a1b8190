"""Migrations, configuration, the CLI's input rules and exit codes, seeding."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tally import migrate
from tally.cli import main
from tally.db import redact

TALLY = str(Path(sys.executable).with_name("tally"))
TABLES = {"execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly", "execution_metrics_daily",
          "execution_metrics_weekly", "execution_metrics_monthly", "aggregation_runs", "dirty_log", "user_activity", "bucket_state"}


def cli(*args) -> int:
    return main(list(args))


def tables(url):
    with psycopg.connect(url) as c:
        return {r[0] for r in c.execute("SELECT table_name FROM information_schema.tables WHERE table_schema IN "
                                        "('analytics', 'public') AND table_type = 'BASE TABLE'")}


def test_upgrade_twice_downgrade_to_base_and_up_again(empty_db, capsys):
    assert cli("db", "upgrade") == 0
    assert TABLES | {"execution_logs"} <= tables(empty_db)
    assert cli("db", "upgrade") == 0  # again, on a migrated database
    assert f"schema at revision {migrate.head()}" in capsys.readouterr().out
    newest = max(p.name[:4] for p in (migrate.MIGRATIONS / "versions").glob("0*.py"))
    assert migrate.current(empty_db) == migrate.head() == newest
    assert cli("db", "downgrade", "--yes") == 0
    left = tables(empty_db)
    assert not (TABLES - {"user_activity"}) & left
    assert {"execution_logs", "user_activity"} <= left  # the platform's raw data is never dropped
    assert migrate.current(empty_db) is None
    assert cli("db", "upgrade") == 0
    assert TABLES <= tables(empty_db)


def test_every_command_names_its_database_with_the_password_hidden(monkeypatch, capsys):
    url = "postgresql://tally:hunter2secret@127.0.0.1:1/nowhere"
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    assert cli("runs") == 3
    err = capsys.readouterr().err
    assert "hunter2secret" not in err and "tally:***@127.0.0.1:1/nowhere" in err
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if "error" in l]) == 1


def test_unreachable_database_exits_3_without_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, TALLY_DATABASE_URL="postgresql://u:pw-9d8c7b@127.0.0.1:1/x")
    for args in (["run", "hourly", "--hour", "2026-11-24T05:00Z"], ["db", "upgrade"], ["seed", "--hours", "1"]):
        proc = subprocess.run([TALLY, *args], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, (args, proc.stderr)
        assert "pw-9d8c7b" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("tally: error: cannot reach postgresql://u:***@")


@pytest.mark.parametrize("args, needle", [
    (["run", "hourly", "--hour", "2026-11-24T05:30Z"], "'2026-11-24T05:30Z'"),
    (["run", "hourly", "--hour", "yesterday"], "'yesterday'"),
    (["run", "daily", "--date", "2026-02-30"], "'2026-02-30'"),
    (["run", "daily", "--date", "2026-11-24T00:00"], "'2026-11-24T00:00'"),
    (["run", "weekly", "--week", "2026-11-25"], "'2026-11-25'"),
    (["run", "monthly", "--month", "2026-13"], "'2026-13'"),
    (["run", "hourly", "--step", "daily_metrics"], "'daily_metrics'"),
    (["run", "hourly", "--step", "x; DROP TABLE analytics.aggregation_runs"], "DROP TABLE"),
    (["run", "yearly"], "'yearly'"),
    (["seed", "--hours", "0"], "0"),
    (["seed", "--from", "2026-11-24T05:01Z"], "'2026-11-24T05:01Z'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(db_url, conn, capsys, args, needle):
    assert cli(*args) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("tally: error")]
    assert len(err) == 1 and needle in err[0]
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] == 0


def test_seed_is_deterministic_and_realistic(make_db, monkeypatch):
    counts = []
    for _ in range(2):
        url = make_db()
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        assert cli("seed", "--from", "2026-11-24T00:00Z", "--hours", "3", "--executions-per-hour", "300",
                   "--events-per-hour", "600", "--workspaces", "8", "--seed", "9") == 0
        with psycopg.connect(url) as c:
            rows = c.execute("SELECT execution_id, workspace_id, user_id, agent_id, status, started_at, duration, "
                             "credits_used FROM public.execution_logs ORDER BY execution_id").fetchall()
            events = c.execute("SELECT workspace_id, user_id, session_id, event_type, created_at "
                               "FROM analytics.user_activity ORDER BY 1, 2, 3, 4, 5").fetchall()
        counts.append((rows, events))
    assert counts[0] == counts[1] and len(counts[0][0]) == 900 and len(counts[0][1]) == 1800
    rows, events = counts[0]
    statuses = {r[4].lower() for r in rows}
    assert {"running", "failed"} <= statuses and len({r[1] for r in rows}) >= 5
    assert any(r[1] is None for r in rows) or any(r[2] is None for r in rows)
    assert any(r[6] is None for r in rows)  # unfinished runs
    durations = sorted(r[6] for r in rows if r[6] is not None)
    assert durations[-1] > 20 * durations[len(durations) // 2]  # heavy tail
    sessions = {}
    for e in events:
        sessions.setdefault((e[1], e[2]), 0)
        sessions[(e[1], e[2])] += 1
    assert max(sessions.values()) >= 3


def test_redact_hides_passwords_in_both_url_forms():
    assert redact("postgresql://a:b%40c@h:5/d") == "postgresql://a:***@h:5/d"
    assert redact("host=h password=xyz dbname=d") == "host=h password=*** dbname=d"
    assert redact("postgresql://a@h/d") == "postgresql://a@h/d"
