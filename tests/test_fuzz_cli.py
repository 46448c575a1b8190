"""Bad input: hypothesis feeds every CLI argument that takes a time, date, week, month,
range, rollup list or step name.

Each input is either accepted and does the right thing (the bucket the text names, the
numbers of tests/reference.py), or rejected with exit 2 and exactly one line on stderr,
having written nothing. Never a traceback (an unexpected exception fails the test here,
since the CLI runs in-process), never a partial write (a fingerprint of every table tally
can write is compared before and after each rejection).

The oracle for a generated time is independent of tally: it is built from the fields the
text was rendered from. Canonical spellings must be accepted; other spellings Python's
ISO parser happens to know may be accepted, but then they must mean the same instant.
Examples are derandomized (the same every run); TALLY_FUZZ_EXAMPLES=2000 TALLY_FUZZ_RANDOM=1
runs a longer, fresh search locally.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from outputs import source_rows
from strategies import insert_events
from support import copy_executions, heavy_rows, check_hour, check_period
from tally.cli import main

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
BASE = dt.datetime(2026, 11, 25, 22, tzinfo=UTC)  # data in 22:00 .. 01:00, across midnight
DATA_HOURS = [BASE + k * HOUR for k in range(3)]
EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "60"))
RANDOM = bool(os.environ.get("TALLY_FUZZ_RANDOM"))  # explore new examples (locally) instead of the fixed ones
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# Every table a command could write: outputs, ledger, change log, source.
WRITABLE = ("analytics.execution_metrics_hourly", "analytics.user_activity_hourly",
            "analytics.credit_consumption_hourly", "analytics.execution_metrics_daily",
            "analytics.execution_metrics_weekly", "analytics.execution_metrics_monthly",
            "analytics.aggregation_runs", "analytics.bucket_state", "analytics.dirty_log", "public.execution_logs", "analytics.user_activity")

# Strings that have broken parsers, shells and SQL before.
NASTY = [
    "", " ", "\t", "\n", "\x00", "2026-11-25T14:00Z\x00", "\u202e2026-11-25T14:00Z", "２０２６-11-25T14:00Z",
    "2026-11-25T14:00Z'; DROP TABLE public.execution_logs; --", "' OR '1'='1", "%(start)s", "%s", "{table}",
    "$$; DELETE FROM analytics.aggregation_runs; $$", "-1", "--hour", "-", "nan", "inf", "1e309", "0",
    "9" * 400, "2026-11-25T14:00Z" + "x" * 5000, "2026-02-30T00:00Z", "2026-13-01T00:00Z", "0000-01-01T00:00Z",
    "10000-01-01T00:00Z", "2026-11-25T14:00+24:00", "2026-11-25T14:00:60Z", "2026-11-25T25:00Z",
    "2026-11-25T14:00Z\n2026-11-25T15:00Z", "now", "yesterday", "1764079200", "2026-W48-3T14", "2026-330T14:00Z",
    "-2026-11-25T14:00Z", "+2026-11-25T14:00Z", "2026-11-25T14:00Z/2026-11-25T15:00Z", "\udcff", "🕐",
]


# None (use the structured value) three times in five, else a nasty or random string
JUNK = st.integers(0, 4).flatmap(lambda i: st.none() if i < 3 else st.one_of(st.sampled_from(NASTY), st.text(max_size=30)))


# ---- running the CLI in-process --------------------------------------------------------------

@dataclass
class Outcome:
    code: int
    out: str
    err: str


def invoke(*argv: str) -> Outcome:
    """Run ``tally *argv`` in this process; any exception other than SystemExit propagates (a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def fingerprint(conn) -> tuple:
    """A digest of every row a command could have written."""
    parts = []
    for table in WRITABLE:
        parts.append(conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t").fetchone())
    return tuple(parts)


def assert_rejected(o: Outcome, *argv: str) -> None:
    assert o.code == 2, f"tally {argv!r}: exit {o.code}\n{o.err}{o.out}"
    lines = [line for line in o.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tally: error: ")]
    assert len(errors) == 1, f"tally {argv!r}: not one error line:\n{o.err}"
    assert all(line.startswith("tally: database: ") for line in lines if line not in errors), o.err
    assert "Traceback" not in o.err and o.out == ""


def check_outcome(conn, before: tuple, o: Outcome, *argv: str) -> bool:
    """True if accepted (exit 0); a rejection must be exit 2, one line, nothing written."""
    event(f"exit {o.code}")  # pytest --hypothesis-show-statistics: how many were accepted
    if o.code == 0:
        assert "Traceback" not in o.err and "tally: error" not in o.err
        return True
    assert_rejected(o, *argv)
    assert fingerprint(conn) == before, f"tally {argv!r} was rejected but wrote something"
    return False


def latest_runs(conn, after_id: int) -> list[tuple]:
    return conn.execute("SELECT rollup, step, bucket_start, bucket_end, status FROM analytics.aggregation_runs "
                        "WHERE id > %s ORDER BY id", (after_id,)).fetchall()


def max_id(conn) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM analytics.aggregation_runs").fetchone()[0]


# ---- an independent oracle for generated times --------------------------------------------------

@dataclass
class TimeText:
    text: str
    instant: dt.datetime | None  # the UTC instant the fields denote; None if they denote none
    canonical: bool  # a spelling SPEC promises (YYYY-MM-DDTHH:MM[:SS]Z or ±HH:MM or no offset)

    @property
    def hour(self) -> dt.datetime | None:
        """The hour it names, if it is a valid input for an hour (on the hour, year 1..9998)."""
        i = self.instant
        if i is None or i.minute or i.second or i.microsecond or not 1 <= i.year <= 9998:
            return None
        return i


OFFSETS = [("Z", 0, True), ("+00:00", 0, True), ("-00:00", 0, True), ("", 0, True), ("+05:30", 330, True),
           ("-08:00", -480, True), ("+14:00", 840, True), ("-03:30", -210, True), ("z", 0, False),
           ("+0100", 60, False), ("+01", 60, False), ("+24:00", None, False), ("UTC", None, False),
           ("+00:00:30", 0.5, False)]


@st.composite
def time_texts(draw, near: dt.datetime = BASE) -> TimeText:
    """A time spelled out from fields, some of them out of range, with what it should mean."""
    if draw(st.integers(0, 2)):  # mostly near the data, so accepted runs have numbers to check
        t = near + dt.timedelta(hours=draw(st.integers(-30, 30)))
        year, month, day, hour = t.year, t.month, t.day, t.hour
    else:
        year = draw(st.one_of(st.integers(1, 9999), st.sampled_from([1, 2, 1970, 2026, 9998, 9999])))
        month, day, hour = draw(st.integers(0, 13)), draw(st.integers(0, 32)), draw(st.integers(0, 25))
    minute = draw(st.sampled_from([0] * 6 + [30, 59, 60]))
    second = draw(st.sampled_from([None] * 3 + [0, 0, 1, 60]))
    micro = draw(st.sampled_from([None, None, 0, 1]))
    sep, sep_ok = draw(st.sampled_from([("T", True)] * 4 + [(" ", False), ("t", False), ("_", False)]))
    zone, offset_min, zone_ok = draw(st.sampled_from(OFFSETS[:4] * 3 + OFFSETS))
    text = f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}"
    if second is not None:
        text += f":{second:02d}" + (f".{micro:06d}" if micro is not None else "")
    text += zone
    instant = None
    if offset_min is not None and second != 60 and minute < 60 and hour < 24:
        try:
            local = dt.datetime(year, month, day, hour, minute, second or 0, (micro or 0) if second is not None else 0)
            instant = (local - dt.timedelta(minutes=offset_min)).replace(tzinfo=UTC)
        except (ValueError, OverflowError):
            instant = None
    return TimeText(text, instant, sep_ok and zone_ok)


def check_time_acceptance(accepted: bool, t: TimeText, got: dt.datetime | None) -> None:
    """Canonical valid input must be accepted; anything accepted must mean the hour the fields denote."""
    if t.canonical and t.hour is not None:
        assert accepted, f"{t.text!r} is a valid hour but was rejected"
    if accepted:
        assert t.hour is not None, f"{t.text!r} names no valid hour but was accepted (as {got})"
        assert got == t.hour, f"{t.text!r} means {t.hour} but tally ran {got}"


# ---- the database the fuzzing runs against ---------------------------------------------------------

@pytest.fixture
def fuzz_db(db_url, conn, monkeypatch):
    """Three hours of ugly data; TALLY_MAX_RANGE_DAYS=2 keeps accepted ranges small."""
    monkeypatch.setenv("TALLY_MAX_RANGE_DAYS", "2")
    monkeypatch.setenv("TALLY_CATCHUP_DAYS", "1")  # status's default --from: the day before --to's day
    monkeypatch.setenv("TALLY_LOCK_WAIT", "5")
    rng = random.Random(17)
    copy_executions(conn, heavy_rows(240, BASE, 3, workspaces=["w1", "w2", None, "wé"], rng=rng))
    events = [{"workspace_id": rng.choice(["w1", None]), "user_id": f"u{rng.randrange(4)}",
               "session_id": rng.choice(["s1", "s2", None]), "event_type": rng.choice(["page_view", "click"]),
               "event_name": None, "page_path": "/", "metadata": None,
               "created_at": BASE + dt.timedelta(seconds=rng.randrange(3 * 3600))} for _ in range(150)]
    with conn.transaction():
        insert_events(conn, events)
    executions, events = source_rows(conn)
    return FuzzDB(conn, executions, events)


class FuzzDB(tuple):
    """(conn, executions, events), with a short repr for hypothesis' failure reports."""

    def __new__(cls, *parts):
        return super().__new__(cls, parts)

    def __repr__(self) -> str:
        return f"<fuzz database: {len(self[1])} executions, {len(self[2])} events>"


def hours_ok(conn, hours, executions, events) -> None:
    problems = []
    for h in hours:
        if h in DATA_HOURS:
            problems += check_hour(conn, h, executions, events)
    assert not problems, "\n".join(problems[:10])


# ---- hours, dates, weeks, months -----------------------------------------------------------------------

@FUZZ
@given(t=time_texts(), junk=JUNK)
def test_run_hourly_hour(fuzz_db, t, junk):
    conn, executions, events = fuzz_db
    text = t.text if junk is None else junk
    before, first = fingerprint(conn), max_id(conn)
    o = invoke("run", "hourly", "--hour", text)
    accepted = check_outcome(conn, before, o, "run", "hourly", "--hour", text)
    runs = latest_runs(conn, first)
    if accepted:
        assert {r[2] for r in runs} == {runs[0][2]} and [r[1] for r in runs] == [
            "execution_metrics", "user_activity", "credit_consumption"]
        assert all(r[4] == "succeeded" and r[3] - r[2] == HOUR for r in runs)
        hours_ok(conn, [runs[0][2]], executions, events)
    if junk is None:
        check_time_acceptance(accepted, t, runs[0][2] if accepted else None)


def _period_text(draw, kind: str) -> tuple[str, dt.datetime | None, bool]:
    """(text, the period start it names or None, canonical)."""
    if draw(st.booleans()):
        d = (BASE + dt.timedelta(days=draw(st.integers(-40, 40)))).date()
        year, month, day = d.year, d.month, d.day
    else:
        year = draw(st.one_of(st.integers(0, 9999), st.sampled_from([1, 9998, 9999])))
        month, day = draw(st.integers(0, 13)), draw(st.integers(0, 32))
    try:
        date = dt.date(year, month, day)
    except ValueError:
        date = None
    if kind == "monthly":
        text = f"{year:04d}-{month:02d}"
        ok = 1 <= month <= 12 and 1 <= year and (year, month) != (9999, 12)
        start = dt.datetime(year, month, 1, tzinfo=UTC) if ok else None
    else:
        text = f"{year:04d}-{month:02d}-{day:02d}"
        span = 1 if kind == "daily" else 7
        ok = date is not None and (kind == "daily" or date.weekday() == 0) and date <= dt.date(9999, 12, 31) - dt.timedelta(days=span)
        start = dt.datetime(date.year, date.month, date.day, tzinfo=UTC) if ok else None
    spelled = draw(st.sampled_from(["plain", "plain", "plain", "padded", "T", "slash"]))
    if spelled == "padded":
        text = f" {text} "
    elif spelled == "T":
        text += "T00:00Z"
    elif spelled == "slash":
        text = text.replace("-", "/")
    return text, start, spelled in ("plain", "padded")


PERIODS = {"daily": ("--date", "daily_metrics"), "weekly": ("--week", "weekly_metrics"),
           "monthly": ("--month", "monthly_metrics")}


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("rollup", list(PERIODS))
def test_run_period_bucket(fuzz_db, rollup, data):
    conn, executions, events = fuzz_db
    option, step = PERIODS[rollup]
    if data.draw(st.integers(0, 4)) == 0:
        text, start, canonical = data.draw(st.one_of(st.sampled_from(NASTY), st.text(max_size=20))), None, False
        structured = False
    else:
        text, start, canonical = _period_text(data.draw, rollup)
        structured = True
    before, first = fingerprint(conn), max_id(conn)
    o = invoke("run", rollup, option, text, "--allow-open")  # (buckets of any year: not about time)
    accepted = check_outcome(conn, before, o, "run", rollup, option, text)
    runs = [r for r in latest_runs(conn, first) if r[0] == rollup]
    if accepted:
        assert [r[1] for r in runs] == [step] and runs[0][4] == "succeeded"
        got = runs[0][2]
        if rollup == "daily" and got <= DATA_HOURS[0] < runs[0][3]:
            table = "execution_metrics_daily"
            assert not check_period(conn, table, got, runs[0][3], executions)
    if structured:
        if canonical and start is not None:
            assert accepted, f"{text!r} is a valid {rollup} bucket but was rejected:\n{o.err}"
        if accepted:
            assert start is not None and runs[0][2] == start, f"{text!r} means {start}, tally ran {runs[0][2]}"


@FUZZ
@given(name=st.one_of(st.sampled_from(["execution_metrics", "user_activity", "credit_consumption", "daily_metrics"]),
                      st.sampled_from(["Execution_Metrics", "execution_metrics ", " user_activity", "execution-metrics",
                                       "all", "*", "execution_metrics,user_activity"]),
                      st.sampled_from(NASTY), st.text(max_size=25)),
       rollup=st.sampled_from(["hourly", "daily"]))
def test_run_step_name(fuzz_db, name, rollup):
    conn, executions, events = fuzz_db
    option, bucket = ("--hour", "2026-11-25T23:00Z") if rollup == "hourly" else ("--date", "2026-11-25")
    before, first = fingerprint(conn), max_id(conn)
    o = invoke("run", rollup, option, bucket, "--step", name, "--allow-open")
    accepted = check_outcome(conn, before, o, "run", rollup, "--step", name)
    valid = {"hourly": {"execution_metrics", "user_activity", "credit_consumption"}, "daily": {"daily_metrics"}}[rollup]
    assert accepted == (name in valid), f"--step {name!r} for {rollup}: exit {o.code}"
    if accepted:
        assert [r[1] for r in latest_runs(conn, first) if r[0] == rollup] == [name]


# ---- ranges and rollup lists ------------------------------------------------------------------------

@st.composite
def ranges(draw):
    """(from TimeText, to TimeText): mostly a few hours apart near the data."""
    start = draw(time_texts())
    if start.instant is not None and draw(st.integers(0, 3)):
        span = draw(st.one_of(st.integers(1, 4), st.integers(-3, 30)))
        end_t = (start.instant + dt.timedelta(hours=span)).replace(second=0, microsecond=0)  # spelled to the minute
        zone = draw(st.sampled_from(["Z", "+00:00", "+02:00", ""]))
        shift = {"Z": 0, "+00:00": 0, "+02:00": 120, "": 0}[zone]
        try:
            local = end_t + dt.timedelta(minutes=shift)
            end = TimeText(f"{local.year:04d}-{local:%m-%dT%H:%M}{zone}", end_t, True)
        except (ValueError, OverflowError):
            end = TimeText("9999-12-31T23:00Z", None, True)
    else:
        end = draw(time_texts())
    return start, end


def range_ok(start: TimeText, end: TimeText) -> bool:
    return (start.hour is not None and end.hour is not None and start.hour < end.hour
            and end.hour - start.hour <= dt.timedelta(days=2))


ROLLUP_LISTS = ["hourly", "hourly,daily", "daily,hourly", " hourly , daily ", "hourly,,daily", "hourly,daily,weekly,monthly",
                "HOURLY", "hourly;daily", "hourly daily", "", ",", "minutely", "hourly,minutely", "hourly,daily'--"]


@FUZZ
@given(r=ranges(), rollups=st.one_of(st.sampled_from(ROLLUP_LISTS), st.text(max_size=15)))
def test_backfill_range_and_rollups(fuzz_db, r, rollups):
    conn, executions, events = fuzz_db
    start, end = r
    before, first = fingerprint(conn), max_id(conn)
    argv = ("backfill", "--from", start.text, "--to", end.text, "--rollups", rollups)
    o = invoke(*argv)
    accepted = check_outcome(conn, before, o, *argv)
    names = [n.strip() for n in rollups.split(",") if n.strip()]
    rollups_valid = bool(names) and all(n in ("hourly", "daily", "weekly", "monthly") for n in names)
    if start.canonical and end.canonical and range_ok(start, end) and rollups_valid:
        assert accepted, f"{argv!r} is valid but was rejected:\n{o.err}"
    if accepted:
        assert range_ok(start, end) and rollups_valid, f"{argv!r} was accepted"
        assert latest_runs(conn, first) is not None
        # every hour of the range is aggregated (now or by an earlier example) and right
        if "hourly" in names:
            hours = []
            h = start.hour
            while h < end.hour:
                hours.append(h)
                h += HOUR
            latest = dict(((r[0], r[1]), r[2]) for r in conn.execute(
                "SELECT bucket_start, step, status FROM analytics.aggregation_latest WHERE rollup = 'hourly' "
                "AND bucket_start = ANY(%s)", (hours,)))
            assert all(latest.get((hh, s)) == "succeeded" for hh in hours
                       for s in ("execution_metrics", "user_activity", "credit_consumption")), latest
            hours_ok(conn, hours, executions, events)


@FUZZ
@given(r=ranges(), command=st.sampled_from(["status", "verify", "status-by", "status-to"]),
       by=st.one_of(st.sampled_from(["auto", "hour", "day", "week", "HOUR", ""]), st.text(max_size=8)))
def test_status_and_verify_range(fuzz_db, r, command, by):
    conn, executions, events = fuzz_db
    start, end = r
    argv = ["status" if command.startswith("status") else "verify", "--from", start.text, "--to", end.text]
    if command == "status-by":
        argv += ["--by", by]
    if command == "status-to":  # the default --from: midnight TALLY_CATCHUP_DAYS (1) before --to's day
        argv = ["status", "--to", end.text]
        if end.hour is not None:
            day = end.hour.replace(hour=0)
            start = TimeText("(default)", max(day - dt.timedelta(days=1), dt.datetime(1, 1, 1, tzinfo=UTC)), True)
    before = fingerprint(conn)
    o = invoke(*argv)
    # verify exits 1 on drift: hours never aggregated here are drift, which is a correct answer
    if argv[0] == "verify" and o.code == 1:
        assert "tally: error" not in o.err and range_ok(start, end)
        accepted = True
    else:
        accepted = check_outcome(conn, before, o, *argv)
    assert fingerprint(conn) == before, f"{argv!r} is read-only but wrote"
    by_ok = command != "status-by" or by in ("auto", "hour", "day")
    if start.canonical and end.canonical and range_ok(start, end) and by_ok:
        assert accepted, f"{argv!r} is valid but was rejected:\n{o.err}"
    if accepted:
        assert range_ok(start, end) and by_ok


@FUZZ
@given(t=time_texts(), junk=JUNK)
def test_retry_failed_since(fuzz_db, t, junk):
    conn, _, _ = fuzz_db
    text = t.text if junk is None else junk
    before = fingerprint(conn)
    o = invoke("retry-failed", "--since", text)
    accepted = check_outcome(conn, before, o, "retry-failed", "--since", text)
    assert fingerprint(conn) == before  # nothing has failed: nothing to retry
    if junk is None:
        check_time_acceptance(accepted, t, t.hour if accepted else None)


@FUZZ
@given(t=time_texts(), junk=JUNK)
def test_seed_from(fuzz_db, t, junk):
    conn, _, _ = fuzz_db
    text = t.text if junk is None else junk
    before = fingerprint(conn)
    argv = ("seed", "--from", text, "--hours", "1", "--workspaces", "1", "--executions-per-hour", "2",
            "--events-per-hour", "1", "--seed", "5")
    o = invoke(*argv)
    accepted = check_outcome(conn, before, o, *argv)
    if accepted:
        # every seeded row lies in the hour named (the fixture's own rows are named r<n>)
        hours = {h for (h,) in conn.execute("SELECT DISTINCT date_trunc('hour', started_at) FROM public.execution_logs "
                                            "WHERE execution_id !~ '^r[0-9]+$'")}
        if junk is None:
            assert t.hour in hours and conn.execute(
                "SELECT count(*) FROM public.execution_logs WHERE started_at >= %s AND started_at < %s "
                "AND execution_id !~ '^r[0-9]+$'", (t.hour, t.hour + HOUR)).fetchone()[0] == 2
    if junk is None:
        check_time_acceptance(accepted, t, t.hour if accepted else None)


@FUZZ
@given(name=st.one_of(st.sampled_from(["tally_worker", "w-1", "W$2", "_x", "1abc", "pg_worker", "public", "a" * 63,
                                       "a" * 64, "x'; DROP ROLE postgres; --", 'x"y', "x y", "é"]),
                      st.sampled_from(NASTY), st.text(max_size=20)),
       which=st.sampled_from(["--worker", "--dashboard"]))
def test_db_roles_names(name, which):
    o = invoke("db", "roles", "--dry-run", which, name)
    if o.code == 0:
        assert f'"{name}"' in o.out  # quoted as an identifier, never spliced
        assert name[:1].isascii() and (name[:1].isalpha() or name[:1] == "_") and not name.lower().startswith("pg_")
    else:
        assert_rejected(o, "db", "roles", which, name)


def test_the_bugs_fuzzing_found_stay_fixed(fuzz_db):
    """Each of these once escaped as a traceback or a wrapped multi-line message."""
    conn, _, _ = fuzz_db
    before = fingerprint(conn)
    for argv in (["run", "monthly", "--month", "9999-12"], ["run", "daily", "--date", "9999-12-31"],
                 ["run", "weekly", "--week", "9999-12-27"], ["db", "upgrade", "--revision", "x'; DROP TABLE t; --"],
                 ["db", "upgrade", "--revision", ""], ["run", "hourly", "--hour", "2026-11-25T14:00Z" + "x" * 500],
                 ["run", "hourly", "--hour", "-x\ny"]):
        assert_rejected(invoke(*argv), *argv)
    assert fingerprint(conn) == before
    # years before 1000: strftime's %Y drops the zero padding, which PostgreSQL then misread
    # (seed wrote year 242 for year 1, or failed) and tally's own parser refused (labels, defaults)
    o = invoke("seed", "--from", "0013-01-01T00:00Z", "--hours", "1", "--executions-per-hour", "3",
               "--events-per-hour", "0", "--workspaces", "1")
    assert o.code == 0 and "0013-01-01T00:00Z" in o.out, o.err
    assert conn.execute("SELECT count(*) FROM public.execution_logs WHERE started_at >= '0013-01-01T00:00Z' "
                        "AND started_at < '0013-01-01T01:00Z'").fetchone()[0] == 3
    assert invoke("run", "hourly", "--hour", "0013-01-01T00:00Z").code == 0
    assert invoke("status", "--to", "0001-01-03T00:00Z").code == 0  # the default --from stops at year 1
    assert [r[0] for r in conn.execute("SELECT DISTINCT bucket_start FROM analytics.aggregation_runs")] == [
        dt.datetime(13, 1, 1, tzinfo=UTC)]
    from tally import buckets as B

    for rollup in B.ROLLUPS:
        b = B.bucket(rollup, dt.datetime(5, 1, 1, tzinfo=UTC))
        assert B.parse_bucket(rollup, b.label) == b, b.label  # a label always parses back
