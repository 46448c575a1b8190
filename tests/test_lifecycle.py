"""Data lifecycle: sealed history survives raw-data purges; retention deletes only what it may.

Real PostgreSQL, the real CLI. The data lies months in the past, so with TALLY_SEAL_AFTER_DAYS=30
its buckets can be sealed whatever day the suite runs.
"""
from __future__ import annotations

import datetime as dt
import json
import threading

import psycopg
import pytest

from outputs import snapshot
from support import cli, counts, seed
from tally import buckets as B
from tally import state as S

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
OLD = dt.datetime(2026, 7, 1, tzinfo=UTC)  # a Wednesday, long before any run of the suite
RECENT = B.HOUR.floor(dt.datetime.now(UTC)) - 5 * HOUR


def iso(t: dt.datetime) -> str:
    return B.HOUR.label(t)


@pytest.fixture(autouse=True)
def lifecycle(monkeypatch):
    monkeypatch.setenv("TALLY_SEAL_AFTER_DAYS", "30")


def old_history(db_url, hours: int = 48, rollups: str = "hourly,daily") -> None:
    seed(db_url, OLD, hours, per_hour=40, workspaces=4, events=60)
    assert cli("backfill", "--from", iso(OLD), "--to", iso(OLD + hours * HOUR), "--rollups", rollups).code == 0


def states(rollup: str, start: dt.datetime, end: dt.datetime) -> set[str]:
    got = json.loads(cli("status", "--from", iso(start), "--to", iso(end), "--rollups", rollup, "--json").out)
    return {s for b in got["buckets"] for s in b["steps"].values()}


def test_the_platforms_own_purge_then_catch_up_leaves_history_as_it_was(db_url, conn):
    """The scenario of the issue: a platform's retention DELETE of old raw rows, then catch-up."""
    old_history(db_url)
    before = snapshot(conn, with_timestamps=True)
    assert states("hourly", OLD, OLD + 48 * HOUR) == {"sealed"}  # ok, and ended long ago
    purged = [conn.execute(f"DELETE FROM {t} WHERE {c} < %s", (OLD + 24 * HOUR,)).rowcount
              for t, c in (("public.execution_logs", "started_at"), ("analytics.user_activity", "created_at"))]
    assert min(purged) > 0
    touched = conn.execute("SELECT count(DISTINCT (hour, source)) FROM analytics.dirty_log").fetchone()[0]
    result = cli("catch-up", "--json")
    assert result.code == 0, result.err
    assert all(b["rollup"] != "hourly" or not b["bucket"].startswith("2026-07") for b in json.loads(result.out)["buckets"])
    assert snapshot(conn, with_timestamps=True) == before  # not a row changed, not even updated_at
    got = json.loads(cli("status", "--from", iso(OLD), "--to", iso(OLD + 48 * HOUR), "--json").out)
    assert {s for b in got["buckets"] for s in b["steps"].values()} == {"sealed"}
    assert got["changes_ignored_for_sealed"] == touched  # one change a statement and touched hour
    stored = conn.execute("SELECT DISTINCT state FROM analytics.bucket_state WHERE bucket_start < %s",
                          (OLD + 48 * HOUR,)).fetchall()
    assert stored == [("sealed",)]  # catch-up stored the seal
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log").fetchone()[0] == 0  # counted, then dropped
    shown = cli("status", "--from", iso(OLD), "--to", iso(OLD + 48 * HOUR)).out
    assert "sealed" in shown and f"{touched} change(s) to sealed history ignored" in shown


def test_a_late_row_for_a_sealed_hour_changes_nothing_and_inside_the_horizon_late_data_flows(db_url, conn):
    old_history(db_url, hours=2, rollups="hourly")
    seed(db_url, RECENT, 2, per_hour=20, workspaces=2, events=10)
    assert cli("backfill", "--from", iso(RECENT), "--to", iso(RECENT + 2 * HOUR), "--rollups", "hourly").code == 0
    before = snapshot(conn)
    for when, eid in ((OLD + 5 * dt.timedelta(minutes=1), "late-old"), (RECENT + dt.timedelta(minutes=7), "late-new")):
        conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, status, started_at, duration) "
                     "VALUES (%s, 'ws-9', 'completed', %s, 3)", (eid, when))
    assert cli("catch-up").code == 0
    after = snapshot(conn)
    old_rows = [r for r in after["execution_metrics_hourly"] if r[1] == OLD]
    assert old_rows == [r for r in before["execution_metrics_hourly"] if r[1] == OLD]  # sealed: unchanged
    assert any(r[0] == "ws-9" and r[1] == RECENT for r in after["execution_metrics_hourly"])  # flowed
    assert json.loads(cli("status", "--from", iso(OLD), "--to", iso(OLD + HOUR), "--json").out)[
        "changes_ignored_for_sealed"] == 1


def test_a_truncate_marks_the_aggregated_hours_that_are_not_sealed(db_url, conn):
    old_history(db_url, hours=1, rollups="hourly")
    assert cli("catch-up").code == 0  # stores the seal of the old hour
    seed(db_url, RECENT, 1, per_hour=20, workspaces=2, events=10)
    assert cli("run", "hourly", "--hour", iso(RECENT)).code == 0
    conn.execute("TRUNCATE public.execution_logs")
    marked = conn.execute("SELECT hour, source FROM analytics.dirty_log").fetchall()
    assert (RECENT, "execution_logs") in marked and {s for _, s in marked} == {"execution_logs"}
    assert OLD not in {h for h, _ in marked}  # not the sealed hour
    assert S.of(conn, B.HOUR.bucket(RECENT)).where(S.State.DIRTY) == ["execution_metrics", "credit_consumption"]


def test_unseal_on_purpose_and_never_over_purged_rows(db_url, conn, monkeypatch):
    old_history(db_url)
    hour = OLD + 3 * HOUR
    refused = cli("run", "hourly", "--hour", iso(hour))
    assert refused.code == 2 and "is sealed" in refused.err and "--unseal" in refused.err
    conn.execute("UPDATE public.execution_logs SET credits_used = credits_used + 1 WHERE started_at >= %s "
                 "AND started_at < %s", (hour, hour + HOUR))
    assert cli("run", "hourly", "--hour", iso(hour), "--unseal").code == 0  # re-aggregated on purpose
    total = conn.execute("SELECT sum(total_credits) FROM analytics.execution_metrics_hourly WHERE hour = %s",
                         (hour,)).fetchone()[0]
    assert total == conn.execute("SELECT sum(coalesce(credits_used, 0)) FROM public.execution_logs WHERE "
                                 "started_at >= %s AND started_at < %s", (hour, hour + HOUR)).fetchone()[0]
    assert cli("backfill", "--from", iso(OLD), "--to", iso(OLD + 24 * HOUR), "--unseal").code == 2  # needs --force
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", "30")
    assert cli("retention").code == 0
    for args in (["run", "hourly", "--hour", iso(hour), "--unseal"], ["run", "daily", "--date", "2026-07-01", "--unseal"],
                 ["backfill", "--from", iso(OLD), "--to", iso(OLD + 24 * HOUR), "--force", "--unseal"]):
        again = cli(*args)
        assert again.code == 2 and "retention purged" in again.err, args
    forced = cli("backfill", "--from", iso(OLD), "--to", iso(OLD + 48 * HOUR), "--force", "--json")
    assert forced.code == 0 and json.loads(forced.out)["sealed"] == 50 and json.loads(forced.out)["ran"] == 0


def test_retention_deletes_only_sealed_hours_older_than_its_window(db_url, conn, monkeypatch):
    old_history(db_url)  # 48 sealed hours
    never = OLD - 10 * 24 * HOUR  # seeded, never aggregated: kept
    seed(db_url, never, 1, per_hour=10, workspaces=2, events=10, seed_value=3)
    failing = OLD + 48 * HOUR  # aggregated and failed: kept
    seed(db_url, failing, 1, per_hour=10, workspaces=2, events=10, seed_value=4)
    conn.execute("""CREATE FUNCTION public.boom() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '22000'; END $$;
                    CREATE TRIGGER boom BEFORE INSERT ON analytics.user_activity_hourly
                    FOR EACH STATEMENT EXECUTE FUNCTION public.boom()""")
    assert cli("run", "hourly", "--hour", iso(failing)).code == 1
    conn.execute("DROP TRIGGER boom ON analytics.user_activity_hourly")
    outputs = snapshot(conn)
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", "30")
    before = counts(conn)
    dry = json.loads(cli("retention", "--dry-run", "--json").out)
    assert counts(conn) == before  # a dry run writes nothing (not even the seal)
    sealed_rows = conn.execute("SELECT count(*) FROM public.execution_logs WHERE started_at >= %s AND started_at < %s",
                               (OLD, OLD + 48 * HOUR)).fetchone()[0]
    events = conn.execute("SELECT count(*) FROM analytics.user_activity WHERE created_at >= %s AND created_at < %s",
                          (OLD, OLD + 48 * HOUR)).fetchone()[0]
    assert dry["sources"]["execution_logs"]["rows"] == sealed_rows and len(dry["sources"]["execution_logs"]["hours"]) == 48
    assert dry["sources"]["user_activity"]["rows"] == events
    assert dry["sources"]["execution_logs"]["kept"] == {"never aggregated": 1, "failed": 1}
    ran = json.loads(cli("retention", "--json").out)
    assert ran["sources"] == dry["sources"] and not ran["dry_run"]
    left = conn.execute("SELECT date_trunc('hour', started_at, 'UTC'), count(*) FROM public.execution_logs "
                        "GROUP BY 1 ORDER BY 1").fetchall()
    assert [h for h, _ in left] == [never, failing]  # only what was not sealed stays
    assert snapshot(conn) == outputs  # outputs unchanged
    assert conn.execute("SELECT count(*) FROM analytics.purged WHERE source = 'execution_logs'").fetchone()[0] == 48
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour >= %s AND hour < %s",
                        (OLD, OLD + 48 * HOUR)).fetchone()[0] == 0  # its own deletes left no marks
    checked = cli("verify", "--from", iso(OLD), "--to", iso(OLD + 48 * HOUR), "--json")
    report = json.loads(checked.out)
    assert checked.code == 0 and report["clean"] and report["purged"], report  # purged, not drift
    shown = cli("retention", "--dry-run").out
    assert "would delete 0 row(s)" in shown and "1 never aggregated" in shown and "1 failed" in shown


def test_hourly_output_and_ledger_retention(db_url, conn, monkeypatch):
    old_history(db_url, hours=24 * 7, rollups="hourly,daily")  # 2026-07-01 .. 07-07: two ISO weeks, one month
    for args in (("weekly", "--week", "2026-06-29"), ("weekly", "--week", "2026-07-06"), ("monthly", "--month", "2026-07")):
        assert cli("run", *args).code == 0
    assert cli("run", "daily", "--date", "2026-07-02", "--unseal").code == 0  # its first attempt is history now
    conn.execute("UPDATE analytics.aggregation_runs SET started_at = started_at - interval '200 days'")
    monkeypatch.setenv("TALLY_HOURLY_RETENTION_DAYS", "40")
    ran = json.loads(cli("retention", "--json").out)
    # every seeded hour's day, week (2026-06-29 or 2026-07-06) and month (July) are sealed
    assert ran["hourly"]["rows"] > 0 and ran["hourly"]["kept_hours"] == 0
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_daily").fetchone()[0] > 0  # never deleted
    kept = conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()[0]
    assert kept == conn.execute("SELECT count(*) FROM analytics.bucket_state").fetchone()[0]  # the current ones
    assert ran["ledger_rows"] == 1
    refused = cli("run", "monthly", "--month", "2026-07", "--unseal")
    assert refused.code == 2 and "hourly output rows" in refused.err


def test_retention_settings_and_rights_are_checked(db_url, conn, monkeypatch):
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", "10")
    bad = cli("retention")
    assert bad.code == 2 and "TALLY_RAW_RETENTION_DAYS" in bad.err
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", "30")
    monkeypatch.setenv("TALLY_SEAL_AFTER_DAYS", "3")
    bad = cli("status")
    assert bad.code == 2 and "TALLY_SEAL_AFTER_DAYS" in bad.err  # below the catch-up window (7)


def test_retention_while_the_platform_inserts(db_url, conn, monkeypatch):
    """Rows written while retention purges: nothing lost, no error, no insert waits long."""
    old_history(db_url, hours=24)
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", "30")
    stop = threading.Event()
    written, errors = [], []

    def platform():
        with psycopg.connect(db_url, autocommit=True) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.execute("INSERT INTO public.execution_logs (execution_id, status, started_at) "
                              "VALUES (%s, 'completed', now())", (f"live-{i}",))
                    written.append(i)
                except psycopg.Error as exc:  # pragma: no cover - the failure this test looks for
                    errors.append(exc)
                i += 1

    thread = threading.Thread(target=platform)
    thread.start()
    try:
        result = cli("retention", "--json")
    finally:
        stop.set()
        thread.join(30)
    assert result.code == 0 and not errors
    assert json.loads(result.out)["sources"]["execution_logs"]["rows"] > 0
    assert conn.execute("SELECT count(*) FROM public.execution_logs WHERE execution_id LIKE 'live-%'").fetchone()[0] \
        == len(written) > 0


def test_retention_drops_whole_sealed_partitions_and_deletes_the_rest_hour_by_hour(db_url, conn, monkeypatch):
    """Partitioned sources (``tally db partition``): a day whose every hour is sealed and older than
    the window goes as one partition (detached concurrently, dropped); a day the window cuts is
    deleted hour by hour; outputs, marks and verify as on plain tables."""
    from tally import partition as P

    old_history(db_url, hours=72)  # three sealed days
    with psycopg.connect(db_url, autocommit=True) as c:
        P.convert(c, ahead=0, today=(OLD + 3 * 24 * HOUR).date())
    assert P.is_partitioned(conn, "public.execution_logs")
    outputs = snapshot(conn)
    per_day = {d: conn.execute("SELECT count(*) FROM public.execution_logs WHERE started_at >= %s AND started_at < %s",
                               (OLD + d * 24 * HOUR, OLD + (d + 1) * 24 * HOUR)).fetchone()[0] for d in range(3)}
    # the window ends inside the second day (at its start when the suite runs at 00:xx UTC): the
    # first day goes whole, the second day's hours before the cut one by one, the third stays
    now = dt.datetime.now(UTC)
    days = (B.HOUR.floor(now) - (OLD + 24 * HOUR)) // dt.timedelta(days=1)
    cut = B.HOUR.floor(now) - dt.timedelta(days=days)
    assert OLD + 24 * HOUR <= cut < OLD + 48 * HOUR
    monkeypatch.setenv("TALLY_RAW_RETENTION_DAYS", str(days))
    ran = json.loads(cli("retention", "--json").out)
    source = ran["sources"]["execution_logs"]
    assert [p["name"] for p in source["partitions"]] == [f"execution_logs_p{OLD:%Y%m%d}"]
    assert source["partitions"][0]["rows"] == per_day[0]
    names = {p.name for p in P.partitions(conn, "public.execution_logs")}
    assert f"execution_logs_p{OLD:%Y%m%d}" not in names and f"execution_logs_p{OLD + 24 * HOUR:%Y%m%d}" in names
    left = conn.execute("SELECT min(started_at) FROM public.execution_logs").fetchone()[0]
    assert left >= cut  # the second day's hours before the cut were deleted
    assert conn.execute("SELECT sum(rows) FROM analytics.purged WHERE source = 'execution_logs'").fetchone()[0] == \
        sum(per_day.values()) - conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0]
    assert snapshot(conn) == outputs
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log").fetchone()[0] == 0
    checked = json.loads(cli("verify", "--from", iso(OLD), "--to", iso(OLD + 72 * HOUR), "--json").out)
    assert checked["clean"] and checked["purged"], checked
    assert cli("run", "hourly", "--hour", iso(OLD)).code == 2  # sealed history over purged rows stays as it is
    assert cli("run", "hourly", "--hour", iso(OLD), "--unseal").code == 2


def test_an_interrupted_concurrent_detach_is_finished_by_the_next_drop(db_url, conn):
    from tally import partition as P

    seed(db_url, OLD, 2, per_hour=10, workspaces=2, events=10)
    with psycopg.connect(db_url, autocommit=True) as c:
        P.convert(c, ahead=0, today=OLD.date())
    name = f"execution_logs_p{OLD:%Y%m%d}"
    with psycopg.connect(db_url) as reader, psycopg.connect(db_url, autocommit=True) as c:
        reader.execute("SELECT count(*) FROM public.execution_logs")  # a transaction that sees the partition
        c.execute("SET statement_timeout = '500ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):  # its second phase waits for the reader: cut
            c.execute(f"ALTER TABLE public.execution_logs DETACH PARTITION public.{name} CONCURRENTLY")
        reader.rollback()
        assert c.execute("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = %s::regclass",
                         [f"public.{name}"]).fetchone()[0]
        c.execute("RESET statement_timeout")
        P.drop_partition(c, "execution_logs", name)  # finishes the pending detach, then drops it
    assert conn.execute("SELECT to_regclass(%s)", [f"public.{name}"]).fetchone()[0] is None
    assert conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] == 0
