"""Edges a new user hits: each item of the issue with a test that runs the real `tally` command
(a subprocess where a terminal, a signal or a fresh process matters)."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from celery_support import wait_for
from support import TALLY, cli, counts, seed, spawn
from tally import buckets as B
from tally.steps import STEPS, lock_key

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
START = dt.datetime(2026, 11, 23, tzinfo=UTC)  # a Monday, in the past


def iso(t: dt.datetime) -> str:
    return B.HOUR.label(t)


def run(*args: str, env: dict | None = None, cwd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``tally ARGS`` as a subprocess (its own environment on top of this one's)."""
    return subprocess.run([TALLY, *args], env={**os.environ, "NO_COLOR": "1", **(env or {})}, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The one error line of stderr (after the database line), asserting there is no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("tally: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


# ---- 1, 10: unreachable, malformed or unmigrated databases ----------------------------------------

@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:1/x", "postgresql://postgres@127.0.0.1:5432/no_such_db_x"],
                         ids=["closed-port", "no-such-database"])
def test_db_current_on_an_unreachable_database_is_one_line_exit_3(url):
    p = run("db", "current", env={"TALLY_DATABASE_URL": url})
    assert p.returncode == 3
    assert "cannot reach" in one_line_error(p)


def test_a_malformed_database_url_names_the_variable_exit_2():
    p = run("status", env={"TALLY_DATABASE_URL": "notaurl"})
    assert p.returncode == 2
    assert "TALLY_DATABASE_URL" in one_line_error(p)


def test_a_database_without_tallys_schema_says_to_upgrade(empty_db):
    p = run("status", env={"TALLY_DATABASE_URL": empty_db})
    assert p.returncode == 2
    assert "tally db upgrade" in one_line_error(p)


# ---- 2, 9: everything validated before any work -----------------------------------------------------

def test_demo_with_zero_hours_is_refused_before_anything_is_written(empty_db):
    p = run("demo", "--hours", "0", env={"TALLY_DATABASE_URL": empty_db})
    assert p.returncode == 2
    assert "hours" in one_line_error(p)
    with psycopg.connect(empty_db) as c:  # not even the migrations ran
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'analytics'").fetchone()[0] == 0


def test_a_bad_step_timeout_is_refused_before_any_step(db_url, conn):
    seed(db_url, START, 1)
    before = counts(conn)
    p = run("run", "hourly", "--hour", iso(START), env={"TALLY_DATABASE_URL": db_url,
                                                        "TALLY_STATEMENT_TIMEOUT_USER_ACTIVITY": "abc"})
    assert p.returncode == 2
    assert "TALLY_STATEMENT_TIMEOUT_USER_ACTIVITY" in one_line_error(p)
    assert counts(conn) == before


# ---- 3, 4, 5: seed --------------------------------------------------------------------------------

def test_seeding_the_same_range_twice_leaves_the_tables_as_the_first_time(db_url, conn):
    args = ("seed", "--from", "2026-11-01T00:00Z", "--hours", "2")
    assert cli(*args).code == 0
    first = conn.execute("SELECT (SELECT count(*) FROM public.execution_logs), "
                         "(SELECT count(*) FROM analytics.user_activity)").fetchone()
    assert first == (1_000, 3_000)
    again = cli(*args)
    assert again.code == 0 and "1,000 executions and 3,000 events already present" in again.out
    assert conn.execute("SELECT (SELECT count(*) FROM public.execution_logs), "
                        "(SELECT count(*) FROM analytics.user_activity)").fetchone() == first


def test_seed_inputs_are_bounded(db_url):
    for args, name in ((["--executions-per-hour", "1000000000"], "executions_per_hour"),
                       (["--events-per-hour", "2000000"], "events_per_hour"),
                       (["--workspaces", "100001"], "workspaces"),
                       (["--hours", str(401 * 24)], "--hours")):
        p = run("seed", "--hours", "1", *args, env={"TALLY_DATABASE_URL": db_url})
        assert p.returncode == 2, args
        line = one_line_error(p)
        assert name in line and ("limit" in line or "longer than" in line), line


def test_seed_memory_stays_flat_on_a_big_hour(db_url):
    """300 k executions in one hour: written in batches; the process never holds them all."""
    # a fresh parent whose only child is the seed, so its peak RSS is the seed's own
    probe = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", probe, TALLY, "seed", "--from", "2026-11-02T00:00Z", "--hours", "1",
                        "--executions-per-hour", "300000", "--events-per-hour", "0"],
                       env={**os.environ, "TALLY_DATABASE_URL": db_url}, capture_output=True, text=True, timeout=300)
    code, peak_kb = map(int, p.stdout.split())
    assert code == 0, p.stderr
    assert peak_kb < 250_000, peak_kb  # kB: the hour's rows alone are ~60 MB of text, ~300 MB as Python strings


def test_ctrl_c_stops_a_seed_cleanly_and_the_same_command_finishes_it(db_url, conn, tmp_path):
    args = ["seed", "--from", "2026-10-01T00:00Z", "--hours", "200", "--executions-per-hour", "2000",
            "--events-per-hour", "0"]
    proc = subprocess.Popen([TALLY, *args], env={**os.environ, "TALLY_DATABASE_URL": db_url, "NO_COLOR": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] >= 20_000, 120,
             "some hours to be committed")
    proc.send_signal(signal.SIGINT)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs
    assert "stopped" in out and "Traceback" not in errs
    seeded = int(re.search(r"in (\d+) hour\(s\)", out).group(1))
    assert 0 < seeded < 200
    assert conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] == seeded * 2000  # whole hours
    assert cli(*args).code == 0  # the same command writes the rest
    assert conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] == 200 * 2000


def test_seed_by_default_ends_at_the_current_hour(db_url, conn):
    assert cli("seed", "--hours", "3", "--executions-per-hour", "50", "--events-per-hour", "0").code == 0
    now = dt.datetime.now(UTC)
    latest = conn.execute("SELECT max(started_at) FROM public.execution_logs").fetchone()[0]
    assert B.HOUR.floor(now) - 3 * HOUR <= latest < B.HOUR.floor(now) + HOUR  # not in the future


def test_a_bucket_that_has_not_ended_is_refused_unless_asked(db_url, conn):
    current = B.HOUR.floor(dt.datetime.now(UTC))
    if current.minute == 59 and dt.datetime.now(UTC).second > 50:  # pragma: no cover - the hour is about to end
        time.sleep(15)
        current = B.HOUR.floor(dt.datetime.now(UTC))
    refused = cli("run", "hourly", "--hour", iso(current))
    assert refused.code == 2 and "has not ended" in refused.err and "--allow-open" in refused.err
    assert counts(conn)["aggregation_runs"] == 0
    assert cli("run", "hourly", "--hour", iso(current), "--allow-open").code == 0
    month = cli("run", "monthly", "--month", f"{current:%Y-%m}")
    assert month.code == 2 and "has not ended" in month.err


def test_a_backfill_past_now_runs_what_ended_and_names_what_it_left(db_url, conn):
    now = B.HOUR.floor(dt.datetime.now(UTC))
    ran = cli("backfill", "--from", iso(now - 2 * HOUR), "--to", iso(now + 3 * HOUR), "--rollups", "hourly", "--json")
    assert ran.code == 0, ran.err
    report = json.loads(ran.out)
    assert report["left_open"] == [f"hourly {iso(now + k * HOUR)}" for k in range(3)]
    assert "left 3 bucket(s) that have not ended" in ran.err
    starts = {r[0] for r in conn.execute("SELECT DISTINCT bucket_start FROM analytics.aggregation_runs")}
    assert starts == {now - 2 * HOUR, now - HOUR}


# ---- 6: a forced backfill resumes ------------------------------------------------------------------

def test_an_interrupted_forced_backfill_resumes_then_forces_everything_again(db_url, conn, tmp_path):
    seed(db_url, START, 12)
    span = ["--from", iso(START), "--to", iso(START + 12 * HOUR), "--rollups", "hourly", "--force"]
    assert cli("backfill", *span).code == 0
    marker = conn.execute("SELECT max(id) FROM analytics.aggregation_runs").fetchone()[0]

    stop_at = START + 5 * HOUR  # hold one step's lock: the forced run waits there, then is stopped
    key = lock_key(STEPS["execution_metrics"], int(stop_at.timestamp()) // 3600)
    errors = tmp_path / "stderr"
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", key)
        proc = spawn(db_url, "backfill", *span, stderr=errors.open("w"), TALLY_LOCK_WAIT="300")
        wait_for(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                 .fetchone()[0], 60, "the forced backfill to reach hour 5")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping after the current step" in errors.read_text(), 30, "the stop notice")
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        assert proc.wait(60) == 130

    def run_since(mark: int) -> set[tuple[str, dt.datetime]]:
        return set(conn.execute("SELECT step, bucket_start FROM analytics.aggregation_runs WHERE id > %s",
                                (mark,)).fetchall())

    everything = {(s, START + k * HOUR) for s in ("execution_metrics", "user_activity", "credit_consumption")
                  for k in range(12)}
    first = run_since(marker)  # step by step: execution_metrics of hours 0-4, then hour 5's, which waited
    assert first == {("execution_metrics", START + k * HOUR) for k in range(6)}
    marker = conn.execute("SELECT max(id) FROM analytics.aggregation_runs").fetchone()[0]
    resumed = cli("backfill", *span)
    assert resumed.code == 0 and "resumed the forced backfill" in resumed.out
    assert run_since(marker) == everything - first  # continued where it stopped, nothing forced twice
    marker = conn.execute("SELECT max(id) FROM analytics.aggregation_runs").fetchone()[0]
    assert cli("backfill", *span).code == 0  # it finished: the identical command forces everything again
    assert run_since(marker) == everything


# ---- 7, 8: status on a narrow terminal, and its default window --------------------------------------

def test_status_at_80_columns_shows_every_bucket_and_step(db_url, conn):
    seed(db_url, START, 72, per_hour=10)
    assert cli("backfill", "--from", iso(START), "--to", iso(START + 72 * HOUR)).code == 0
    conn.execute("INSERT INTO public.execution_logs (execution_id, status, started_at) VALUES ('late', 'done', %s)",
                 (START + 30 * HOUR,))  # a dirty hour, and so a dirty day
    command = f"stty cols 80; {TALLY} status --from {iso(START)} --to {iso(START + 72 * HOUR)}"
    p = subprocess.run(["script", "-qc", command, "/dev/null"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TALLY_DATABASE_URL": db_url, "NO_COLOR": "1", "TERM": "xterm"})
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", p.stdout).replace("\r", "")
    lines = screen.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in screen
    for day in ("2026-11-23", "2026-11-24", "2026-11-25"):
        assert day in screen
    rows = [line for line in lines if "execution_metrics" in line or "credit_consumption" in line
            or "user_activity" in line]
    strips = [re.search(r"(?:[■~✗·▸]{6} ){3}[■~✗·▸]{6}", line) for line in rows]
    assert len(rows) == 9 and all(strips), rows  # 24 marks for every day and step
    assert "~" in screen and "dirty" in screen  # the late hour and its day


def test_status_by_default_shows_each_rollups_previous_and_current_bucket(db_url):
    now = dt.datetime.now(UTC)
    got = json.loads(cli("status", "--rollups", "monthly,weekly", "--json").out)
    months = [b["bucket"] for b in got["buckets"] if b["rollup"] == "monthly"]
    previous = B.MONTH.bucket(B.MONTH.floor(now) - dt.timedelta(days=1))
    assert months == [previous.label, B.MONTH.bucket(now).label]
    assert [b["open"] for b in got["buckets"] if b["rollup"] == "monthly"] == [False, True]
    weeks = [b["bucket"] for b in got["buckets"] if b["rollup"] == "weekly"]
    assert B.WEEK.bucket(now).label == weeks[-1] and len(weeks) >= 2
    shown = cli("status", "--rollups", "monthly").out
    assert previous.label in shown and "open" in shown


# ---- 11: the embedded database lives in the user's data directory ----------------------------------

@pytest.mark.slow
def test_the_embedded_database_is_found_from_any_folder_and_a_new_one_is_announced(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="th", dir="/tmp"))  # short: PostgreSQL's socket path has a limit
    env = {k: v for k, v in os.environ.items() if k not in ("TALLY_DATABASE_URL", "TALLY_HOME")}
    env.update(HOME=str(top), XDG_DATA_HOME="", NO_COLOR="1")
    home = top / ".local" / "share" / "tally" / "pg"
    try:
        first = subprocess.run([TALLY, "db", "current"], env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=180)
        assert first.returncode == 0, first.stderr
        assert f"created a new, empty embedded PostgreSQL in {home}" in first.stderr
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        second = subprocess.run([TALLY, "db", "current"], env=env, cwd=elsewhere, capture_output=True, text=True,
                                timeout=180)
        assert second.returncode == 0 and f"embedded PostgreSQL in {home}" in second.stderr
        assert "created" not in second.stderr
    finally:
        subprocess.run([TALLY, "db", "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(top, ignore_errors=True)


# ---- 12: downgrade asks ------------------------------------------------------------------------------

def test_downgrade_needs_yes(db_url, conn):
    p = run("db", "downgrade", env={"TALLY_DATABASE_URL": db_url}, timeout=60)
    assert p.returncode == 2 and "--yes" in one_line_error(p)
    assert conn.execute("SELECT to_regclass('analytics.aggregation_runs') IS NOT NULL").fetchone()[0]


# ---- 14: signals, help, version, JSON times -----------------------------------------------------------

def test_sigterm_exits_143_and_says_terminated(db_url, conn, tmp_path):
    seed(db_url, START, 6)
    key = lock_key(STEPS["execution_metrics"], int((START + 2 * HOUR).timestamp()) // 3600)
    errors = tmp_path / "stderr"
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", key)
        proc = spawn(db_url, "backfill", "--from", iso(START), "--to", iso(START + 6 * HOUR), "--rollups", "hourly",
                     stderr=errors.open("w"), TALLY_LOCK_WAIT="300")
        wait_for(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                 .fetchone()[0], 60, "the backfill to wait at hour 2")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "terminated" in errors.read_text(), 30, "the notice")
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        assert proc.wait(60) == 143
    assert "Ctrl-C" not in errors.read_text()
    # a command with no graceful stop (catch-up, waiting for a lock): what runs rolls back, it says so, 143
    first = B.HOUR.floor(dt.datetime.now(UTC)) - dt.timedelta(days=7)
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", lock_key(STEPS["execution_metrics"], int(first.timestamp()) // 3600))
        slow = spawn(db_url, "catch-up", TALLY_LOCK_WAIT="300")
        wait_for(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                 .fetchone()[0], 60, "catch-up to wait for the first hour of its window")
        slow.send_signal(signal.SIGTERM)
        _, slow_err = slow.communicate(timeout=60)
    assert slow.returncode == 143 and "terminated" in slow_err and "Traceback" not in slow_err


def test_short_help_and_version():
    assert run("-h").returncode == 0 and "Usage: tally" in run("-h").stdout
    assert run("backfill", "-h").returncode == 0
    version = run("--version")
    assert version.returncode == 0 and re.fullmatch(r"tally \d+\.\d+\.\d+\s*", version.stdout)


def test_every_json_time_is_iso_8601_with_a_t(db_url, conn):
    seed(db_url, START, 1)
    assert cli("run", "hourly", "--hour", iso(START)).code == 0
    for args in (["runs", "--json"], ["status", "--from", iso(START), "--to", iso(START + HOUR), "--json"]):
        text = cli(*args).out
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", text), args  # no "2026-11-23 00:00"
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text), args


# ---- 15: a plan before work ---------------------------------------------------------------------------

def test_backfill_and_catch_up_dry_runs_show_the_plan_and_change_nothing(db_url, conn):
    seed(db_url, START, 3)
    assert cli("backfill", "--from", iso(START), "--to", iso(START + 2 * HOUR), "--rollups", "hourly").code == 0
    conn.execute("INSERT INTO analytics.user_activity (user_id, event_type, created_at) VALUES ('u', 'click', %s)",
                 (START + dt.timedelta(minutes=5),))  # hour 0's user_activity is dirty now
    before = counts(conn)
    plan = json.loads(cli("backfill", "--from", iso(START), "--to", iso(START + 24 * HOUR), "--rollups",
                          "hourly,daily", "--dry-run", "--json").out)["plan"]
    by = {p["bucket"]: p for p in plan}
    assert by[iso(START)]["steps"] == ["user_activity"] and by[iso(START)]["reason"] == "dirty"
    assert "changed since" in by[iso(START)]["why"]
    assert iso(START + HOUR) not in by  # done
    assert by[iso(START + 2 * HOUR)]["reason"] == "missing" and len(by[iso(START + 2 * HOUR)]["steps"]) == 3
    assert by["2026-11-23"]["reason"] == "missing"
    shown = cli("backfill", "--from", iso(START), "--to", iso(START + 24 * HOUR), "--dry-run").out
    assert "would run" in shown and "user_activity" in shown
    catch = json.loads(cli("catch-up", "--dry-run", "--json").out)
    assert catch["dry_run"] and any(p["bucket"] == iso(START) and p["reason"] == "dirty"
                                    for p in catch["plan"]["hourly"])
    assert counts(conn) == before


# ---- 16: runs you can find ------------------------------------------------------------------------------

def test_runs_filters_and_what_is_failing_now(db_url, conn):
    seed(db_url, START, 3)
    assert cli("backfill", "--from", iso(START), "--to", iso(START + 2 * HOUR), "--rollups", "hourly").code == 0
    conn.execute("UPDATE analytics.aggregation_runs SET started_at = started_at - interval '3 hours', "
                 "finished_at = finished_at - interval '3 hours'")  # the backfill ran before the current hour
    conn.execute("""CREATE FUNCTION public.t_boom() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '22000'; END $$;
                    CREATE TRIGGER t_boom BEFORE INSERT OR UPDATE ON analytics.credit_consumption_hourly
                    FOR EACH ROW EXECUTE FUNCTION public.t_boom()""")
    since = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # hour 2 fails twice, hour 0 once then heals: only hour 2 is failing now
    for hour in (START + 2 * HOUR, START + 2 * HOUR, START):
        assert cli("run", "hourly", "--hour", iso(hour), "--step", "credit_consumption").code == 1
    conn.execute("DROP TRIGGER t_boom ON analytics.credit_consumption_hourly")
    assert cli("run", "hourly", "--hour", iso(START), "--step", "credit_consumption").code == 0

    def rows(*args):
        p = run("runs", "--json", "--limit", "1000", *args, env={"TALLY_DATABASE_URL": db_url})
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    everything = rows()
    assert len(everything) == len(conn.execute("SELECT id FROM analytics.aggregation_runs").fetchall())
    failed = rows("--failed")
    assert [(r["bucket"], r["step"]) for r in failed] == [(iso(START), "credit_consumption")] + \
        [(iso(START + 2 * HOUR), "credit_consumption")] * 2
    assert rows("--status", "failed") == failed
    failing = rows("--failing")  # the latest attempt of each failing (step, bucket) only
    assert [(r["bucket"], r["step"], r["attempt"]) for r in failing] == [(iso(START + 2 * HOUR), "credit_consumption", 2)]
    assert all(r["step"] == "user_activity" for r in rows("--step", "user_activity"))
    assert {r["trigger"] for r in rows("--trigger", "backfill")} == {"backfill"}
    assert {r["trigger"] for r in rows("--trigger", "manual")} == {"manual"}
    assert {r["bucket"] for r in rows("--from", iso(START + HOUR), "--to", iso(START + 2 * HOUR))} == {iso(START + HOUR)}
    assert rows("--rollup", "daily") == []
    recent = rows("--since", iso(since))
    assert {r["trigger"] for r in recent} == {"manual"} and all(r["started_at"] >= since.isoformat() for r in recent)
    assert rows("--since", iso(since + 2 * HOUR)) == []
    text = run("runs", "--failing", env={"TALLY_DATABASE_URL": db_url, "COLUMNS": "80"})
    assert text.returncode == 0 and "credit_consumption" in text.stdout and "boom" in text.stdout
    for bad, named in ((["--status", "done"], "'done'"), (["--rollup", "yearly"], "'yearly'"),
                       (["--step", "nope"], "'nope'"), (["--trigger", "cron"], "'cron'"),
                       (["--since", "yesterday"], "'yesterday'"),
                       (["--from", iso(START + HOUR), "--to", iso(START)], iso(START + HOUR)[:13]),
                       (["--failed", "--status", "succeeded"], "succeeded")):
        p = run("runs", *bad, env={"TALLY_DATABASE_URL": db_url})
        assert p.returncode == 2 and named in one_line_error(p), (bad, p.stderr)


def test_ctrl_c_stops_every_lane_of_a_backfill_with_jobs_and_the_same_command_finishes(db_url, conn, tmp_path):
    seed(db_url, START, 12)
    span = ["--from", iso(START), "--to", iso(START + 12 * HOUR), "--rollups", "hourly", "--jobs", "2"]
    key = lock_key(STEPS["execution_metrics"], int((START + 5 * HOUR).timestamp()) // 3600)
    errors = tmp_path / "stderr"
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", key)  # one lane waits at execution_metrics 05:00
        proc = spawn(db_url, "backfill", *span, stderr=errors.open("w"), TALLY_LOCK_WAIT="300")
        wait_for(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                 .fetchone()[0], 60, "the backfill to reach hour 5")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping after the current step" in errors.read_text(), 30, "the stop notice")
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        assert proc.wait(60) == 130
    assert "Traceback" not in errors.read_text()
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs WHERE status <> 'succeeded'").fetchone()[0] == 0
    first = conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()[0]
    assert 6 <= first < 36  # stopped: the waiting hour finished, not everything ran
    assert cli("backfill", *span).code == 0
    runs = conn.execute("SELECT step, bucket_start, count(*) FROM analytics.aggregation_runs "
                        "GROUP BY 1, 2").fetchall()
    assert len(runs) == 36 and {n for _, _, n in runs} == {1}  # the rest, and nothing twice
