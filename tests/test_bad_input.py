"""Bad input to the operations commands: exit 2, one line naming the value, nothing written."""
from __future__ import annotations

import datetime as dt

import pytest

from support import cli, counts, seed, spawn

UTC = dt.timezone.utc
START = dt.datetime(2026, 11, 23, tzinfo=UTC)
OK_RANGE = ["--from", "2026-11-23T00:00Z", "--to", "2026-11-23T03:00Z"]

CASES = {
    "from after to": (["backfill", "--from", "2026-11-24T00:00Z", "--to", "2026-11-23T00:00Z"], "2026-11-24T00:00Z"),
    "from equals to": (["verify", "--from", "2026-11-24T00:00Z", "--to", "2026-11-24T00:00Z"], "2026-11-24T00:00Z"),
    "unaligned hour": (["backfill", "--from", "2026-11-23T00:30Z", "--to", "2026-11-24T00:00Z"], "2026-11-23T00:30Z"),
    "unaligned --to": (["status", "--from", "2026-11-23T00:00Z", "--to", "2026-11-23T05:00:01Z"], "2026-11-23T05:00:01Z"),
    "malformed time": (["verify", "--from", "2026-11-2xT00:00Z", "--to", "2026-11-24T00:00Z"], "2026-11-2xT00:00Z"),
    "malformed date": (["run", "daily", "--date", "2026-02-30"], "2026-02-30"),
    "malformed --since": (["retry-failed", "--since", "yesterday"], "yesterday"),
    "unknown rollup": (["backfill", *OK_RANGE, "--rollups", "hourly,yearly"], "yearly"),
    "unknown rollup in status": (["status", *OK_RANGE, "--rollups", "quarterly"], "quarterly"),
    "unknown step": (["run", "hourly", "--hour", "2026-11-23T01:00Z", "--step", "page_metrics"], "page_metrics"),
    "week not a Monday": (["run", "weekly", "--week", "2026-11-25"], "2026-11-25"),
    "month 13": (["run", "monthly", "--month", "2026-13"], "2026-13"),
    "range over the maximum": (["backfill", "--from", "2026-11-23T00:00Z", "--to", "2026-11-26T01:00Z"], "2 days"),
    "verify over the maximum": (["verify", "--from", "2026-11-23T00:00Z", "--to", "2026-11-26T01:00Z"], "2 days"),
    "status over the maximum": (["status", "--from", "2026-11-23T00:00Z", "--to", "2026-11-26T01:00Z"], "2 days"),
    "status --by": (["status", *OK_RANGE, "--by", "week"], "week"),
}


@pytest.fixture
def aggregated(db_url, conn, monkeypatch):
    """Source rows for three hours, one of them backfilled: a ledger, outputs and change marks that must not change."""
    monkeypatch.setenv("TALLY_MAX_RANGE_DAYS", "2")
    seed(db_url, START, 3)
    assert cli("backfill", "--from", "2026-11-23T00:00Z", "--to", "2026-11-23T01:00Z").code == 0
    return counts(conn)


@pytest.mark.parametrize("args, value", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(aggregated, conn, args, value):
    ran = cli(*args)
    assert ran.code == 2, (ran.out, ran.err)
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tally: error:") and value in lines[0], ran.err
    assert ran.out == ""
    assert counts(conn) == aggregated


def test_the_real_command_exits_2_too(aggregated, db_url, conn):
    proc = spawn(db_url, "backfill", "--from", "2026-11-23T00:00Z", "--to", "2026-11-24T00:00Z", "--rollups", "daily,hourlyy")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "tally: error: unknown rollup 'hourlyy' (expected one of hourly, daily, weekly, monthly)"
    assert counts(conn) == aggregated
