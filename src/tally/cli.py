"""The ``tally`` command line: thin shells over the library functions.

Exit codes (SPEC): 0 success; 1 a step failed (the others committed); 2 invalid
input (one line naming the value, nothing written); 3 a database or broker
cannot be reached.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
from typing import List, Optional

import typer
from typer.exceptions import Abort as _Abort, Exit as _Exit

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover
    from click import ClickException as _ClickException
from rich.console import Console

from . import buckets as B
from .errors import InvalidInput, TallyError

_HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings=_HELP,
    help="Idempotent, observable rollups of AI-agent execution logs in PostgreSQL.",
)
db_app = typer.Typer(no_args_is_help=True, context_settings=_HELP,
                     help="Schema migrations and the embedded database.")
run_app = typer.Typer(no_args_is_help=True, context_settings=_HELP,
                      help="Run one rollup for one bucket (default: the last complete one).")
app.add_typer(db_app, name="db")
app.add_typer(run_app, name="run")

# Not a terminal (a pipe, a log file): wide enough that tables are not cramped.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"tally {version('tally')}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print tally's version and exit.")) -> None:
    """Idempotent, observable rollups of AI-agent execution logs in PostgreSQL."""


def say_database() -> str:
    """Check the configuration, print which database this command uses (password hidden),
    and return its URL; say so when it is a new, empty embedded database."""
    from . import db
    from .config import settings

    settings()  # every variable is checked before any work (one line, exit 2)
    err.print(f"tally: {db.describe()}")
    url = db.database_url()
    if db.created_embedded:
        err.print(f"tally: created a new, empty embedded PostgreSQL in {settings().home / 'pg'} "
                  "(`tally demo` fills it; set TALLY_DATABASE_URL to use another server)")
    return url


def _now() -> dt.datetime:
    return dt.datetime.now(B.UTC)


def _json_value(value):
    """Times in ISO 8601 with a "T" (as every --json prints them); anything else as text."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=_json_value, indent=2) + "\n")


# ---- db ----------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Target revision.")) -> None:
    """Apply migrations (Alembic); safe to run again on a migrated database."""
    from . import migrate

    url = say_database()
    migrate.upgrade(url, revision)
    out.print(f"schema at revision {migrate.current(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Option("base", help="Target revision."),
                 yes: bool = typer.Option(False, "--yes", "-y", help="Do it: the output tables, the ledger and the "
                                          "state go (the source tables are kept).")) -> None:
    """Revert tally's tables: every output row and the ledger are dropped (the source tables are kept)."""
    from . import migrate

    url = say_database()
    if not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise InvalidInput("tally db downgrade drops tally's output tables and ledger: add --yes to do it")
        if not typer.confirm(f"Drop tally's tables down to revision {revision!r} (every output row and the "
                             "ledger)?", default=False, err=True):
            err.print("tally: nothing changed")
            raise typer.Exit(1)
    migrate.downgrade(url, revision)
    out.print(f"schema at revision {migrate.current(url) or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision."""
    from . import migrate

    url = say_database()
    out.print(migrate.current(url) or "base (not migrated)")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL, if one is running."""
    from .config import settings
    from .db import redact  # noqa: F401  (installs tally's warning filters before pgserver loads)

    pgdata = settings().home / "pg"
    if not (pgdata / "postmaster.pid").exists():
        out.print(f"no embedded PostgreSQL running in {pgdata}")
        return
    import pgserver

    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    server.cleanup()
    out.print(f"stopped the embedded PostgreSQL in {pgdata}")


@db_app.command("roles")
def db_roles(worker: str = typer.Option("tally_worker", help="Role the workers and CLI run as (created NOLOGIN if absent)."),
             dashboard: str = typer.Option("tally_dashboard", help="Read-only role for dashboards (created NOLOGIN if absent)."),
             retention: Optional[str] = typer.Option(None, help="Also a role for `tally retention`: the worker's rights and deleting purged rows (created NOLOGIN if absent)."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the SQL; connect to nothing, change nothing.")) -> None:
    """Least-privilege roles: a worker (reads the source, writes only tally's analytics tables) and a read-only dashboard.

    Run as the owner of tally's tables (who ran `tally db upgrade`), again after every upgrade.
    Log in as members: CREATE ROLE alice LOGIN PASSWORD '…' IN ROLE tally_worker. See docs/SECURITY.md.
    """
    from . import roles

    plan = roles.plan(worker, dashboard, retention)  # bad names are invalid input, before any connection
    if dry_run:
        sys.stdout.write(roles.render(plan) + "\n")
        return
    url = say_database()
    for line in roles.apply(url, plan):
        out.print(line, markup=False)


@db_app.command("partition")
def db_partition(dry_run: bool = typer.Option(False, "--dry-run", help="Print the DDL; change nothing."),
                 ahead: int = typer.Option(7, help="Days of empty partitions past the later of the last row's day and today."),
                 drop_old: bool = typer.Option(False, "--drop-old", help="Drop the plain tables once replaced "
                                               "(default: kept as <name>_unpartitioned).")) -> None:
    """Partition tally's own source tables by UTC day: copied day by day, compared (counts and
    checksums), then swapped in one transaction. Refused for tables tally did not create or that
    are partitioned already. See docs/OPERATIONS.md, Partitioned sources."""
    from . import migrate
    from . import partition as P
    from .db import connection

    if not 0 <= ahead <= P.MAX_AHEAD:
        raise InvalidInput(f"invalid --ahead {ahead}: expected 0 to {P.MAX_AHEAD} days")
    url = say_database()
    if migrate.current(url) != migrate.head():
        raise InvalidInput("this database is not at tally's schema head: run `tally db upgrade` first")
    with connection(url, autocommit=True) as conn:
        if dry_run:
            sys.stdout.write(P.render(conn, P.plan(conn, ahead=ahead), drop_old=drop_old))
            return
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:
            import time

            if phase == "copy" and (done == total or time.monotonic() - last[0] > 5):
                last[0] = time.monotonic()
                err.print(f"tally: copied {done}/{total} day(s)")

        result = P.convert(conn, ahead=ahead, drop_old=drop_old, progress=progress)
    for t in result.tables:
        again = f"; {len(t.recopied)} day(s) changed during the copy, copied again" if t.recopied else ""
        out.print(f"{t.source}: {t.rows:,} rows in {t.partitions} daily partitions, counts and checksums equal{again}",
                  markup=False)
    out.print("took " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()), markup=False)
    if result.dropped_old:
        out.print("dropped public.execution_logs_unpartitioned and analytics.user_activity_unpartitioned")
    else:
        out.print("kept the plain tables: DROP TABLE public.execution_logs_unpartitioned, "
                  "analytics.user_activity_unpartitioned; once you no longer need them", markup=False)
    out.print("new days need partitions before their rows arrive (pg_partman, or your own job); "
              "see docs/OPERATIONS.md, Partitioned sources", markup=False)


# ---- seed --------------------------------------------------------------------------------

@app.command()
def seed(
    from_: Optional[str] = typer.Option(None, "--from", help="First hour (ISO 8601, on the hour). Default: --hours before the current hour, so the range ends now."),
    hours: int = typer.Option(24, help="How many hours to fill."),
    workspaces: int = typer.Option(20, help="Number of workspaces."),
    executions_per_hour: int = typer.Option(500, help="Executions per hour (at most 1,000,000)."),
    events_per_hour: int = typer.Option(1500, help="User-activity events per hour (at most 1,000,000)."),
    seed_: int = typer.Option(42, "--seed", help="Random seed: the same seed gives the same rows."),
) -> None:
    """Write realistic synthetic source data (deterministic for a given --seed).

    Seeding a range again with the same arguments changes nothing. Ctrl-C stops after the
    hour being written; what was written is reported and stays.
    """
    from rich.progress import Progress

    from . import seed as seeding
    from . import terminal as T
    from .config import settings
    from .db import connection

    if hours > settings().max_range_days * 24:
        raise InvalidInput(f"invalid --hours {hours}: longer than {settings().max_range_days} days "
                           "(raise TALLY_MAX_RANGE_DAYS to allow it)")
    start = B.parse_time(from_, "--from") if from_ is not None else B.HOUR.floor(_now()) - dt.timedelta(hours=max(hours, 0))
    try:
        seeding._validate(start, hours, workspaces, executions_per_hour, events_per_hour, seed_)
    except ValueError as exc:
        raise InvalidInput(f"invalid seed: {exc}") from None
    url = say_database()
    stop = T.Stop()
    with connection(url) as conn, Progress(console=err, transient=True) as progress, T.stop_on_signals(stop, err):
        task = progress.add_task("seeding", total=hours)
        result = seeding.seed(conn, start=start, hours=hours, workspaces=workspaces,
                              executions_per_hour=executions_per_hour, events_per_hour=events_per_hour,
                              seed=seed_, progress=lambda done, total: progress.update(task, completed=done),
                              should_stop=stop.requested)
    span = f"{B.HOUR.label(result.start)} .. {B.HOUR.label(result.end)}"
    present = [f"{n:,} {what}" for n, what in ((result.executions_skipped, "executions"),
                                                 (result.events_skipped, "events")) if n]
    out.print(f"seeded {result.executions:,} executions and {result.events:,} events in {result.hours_seeded} hour(s) "
              f"of {span}" + (f" ({' and '.join(present)} already present, left as they were)" if present else ""))
    if result.stopped:
        out.print("[yellow]stopped[/]: the hours after those are not written; run the same command again to "
                  "write them")
        raise typer.Exit(stop.exit_code)


# ---- run ---------------------------------------------------------------------------------

def print_rollup(result, as_json: bool = False) -> None:
    if as_json:
        _emit_json(result.as_dict())
        return
    from .terminal import print_rollup as show

    show(out, result)


def _run(rollup: str, when: Optional[str], steps: Optional[List[str]], atomic: bool, as_json: bool,
         allow_open: bool, unseal: bool) -> None:
    from . import plan as P
    from .rollups import Runner
    from .steps import steps_of

    bucket = B.parse_bucket(rollup, when)
    chosen = [s.name for s in steps_of(rollup, steps)]  # unknown step names are rejected before anything is written
    refuse_open(bucket, allow_open, "--allow-open")
    url = say_database()
    with Runner(url, trigger="manual") as runner:
        P.check_sealed(runner.ledger.conn, bucket, chosen, unseal)
        result = runner.run(bucket, steps, atomic=atomic)
    print_rollup(result, as_json)
    if not result.ok:
        raise typer.Exit(1)


def refuse_open(bucket: B.Bucket, allow_open: bool, how: str) -> None:
    """A bucket that has not ended would be aggregated from part of its rows: only when asked."""
    if not allow_open and bucket.end > _now():
        raise InvalidInput(f"{bucket} has not ended (it ends {bucket.end.isoformat()}): its numbers would be "
                           f"partial; add {how} to aggregate it anyway")


_STEP_HELP = "Run only this step (repeatable)."
_ATOMIC_HELP = "All steps in one transaction: all or nothing."
_OPEN_HELP = "Aggregate the bucket even if it has not ended yet (its numbers are then partial)."
_UNSEAL_HELP = "Re-aggregate a sealed bucket (final history) on purpose; refused if retention purged its rows."


@run_app.command("hourly")
def run_hourly(hour: Optional[str] = typer.Option(None, help="The hour, ISO 8601 on the hour (UTC if no offset)."),
               step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
               atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
               allow_open: bool = typer.Option(False, "--allow-open", help=_OPEN_HELP),
               unseal: bool = typer.Option(False, "--unseal", help=_UNSEAL_HELP)) -> None:
    """execution_metrics, user_activity, credit_consumption for one hour."""
    _run("hourly", hour, step, atomic, as_json, allow_open, unseal)


@run_app.command("daily")
def run_daily(date: Optional[str] = typer.Option(None, help="The UTC day, YYYY-MM-DD."),
              step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
              atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
              as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
              allow_open: bool = typer.Option(False, "--allow-open", help=_OPEN_HELP),
              unseal: bool = typer.Option(False, "--unseal", help=_UNSEAL_HELP)) -> None:
    """daily_metrics for one day (its missing, failed or dirty hours are aggregated first)."""
    _run("daily", date, step, atomic, as_json, allow_open, unseal)


@run_app.command("weekly")
def run_weekly(week: Optional[str] = typer.Option(None, help="The ISO week, given by its Monday (YYYY-MM-DD)."),
               step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
               atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
               allow_open: bool = typer.Option(False, "--allow-open", help=_OPEN_HELP),
               unseal: bool = typer.Option(False, "--unseal", help=_UNSEAL_HELP)) -> None:
    """weekly_metrics for one ISO week (its missing, failed or dirty hours first)."""
    _run("weekly", week, step, atomic, as_json, allow_open, unseal)


@run_app.command("monthly")
def run_monthly(month: Optional[str] = typer.Option(None, help="The month, YYYY-MM."),
                step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
                atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
                allow_open: bool = typer.Option(False, "--allow-open", help=_OPEN_HELP),
                unseal: bool = typer.Option(False, "--unseal", help=_UNSEAL_HELP)) -> None:
    """monthly_metrics for one calendar month (its missing, failed or dirty hours first)."""
    _run("monthly", month, step, atomic, as_json, allow_open, unseal)


# ---- catch-up (logic in catchup.py) -------------------------------------------------------

@app.command("catch-up")
def catch_up(as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run, bucket by bucket and step "
                                          "by step, and why; change nothing.")) -> None:
    """Every dirty, missing or failed bucket: hours first, then the days, weeks and months due."""
    from . import catchup
    from . import terminal as T

    url = say_database()
    say = err.print if as_json else out.print  # with --json, stdout holds only the JSON
    if dry_run:
        result = catchup.catch_up(url, dry_run=True)
        if as_json:
            _emit_json(result.as_dict())
            return
        for rollup, planned in result.plans.items():
            T.render_plan(out, planned, f"catch-up, {rollup}")
        out.print("(a day, week or month is listed when it is due now; the hours above may make more of them due)")
        return
    with T.CatchUpView(say, err) as view:
        result = catchup.catch_up(url, on_plan=view.on_plan, on_bucket=view.on_bucket)
    n = len(result.buckets)
    prepared = sum(len(r.prepared) for r in result.buckets)
    say(f"catch-up: {n} bucket(s) run" + (f", {prepared} hour(s) prepared for them" if prepared else "")
        + f", {len(result.failed)} failed" if n else "catch-up: nothing to do")
    if as_json:
        _emit_json(result.as_dict())
    if not result.ok:
        raise typer.Exit(1)


# ---- operations: backfill, retry-failed, status, runs, verify (logic in backfill.py, status.py, verify.py)

def _range(from_: str, to: str) -> tuple[dt.datetime, dt.datetime]:
    from .config import settings

    return B.parse_range(from_, to, settings().max_range_days)


@app.command()
def backfill(
    from_: str = typer.Option(..., "--from", help="First hour of the range (ISO 8601, on the hour)."),
    to: str = typer.Option(..., "--to", help="End of the range, exclusive (on the hour)."),
    rollups: str = typer.Option("hourly,daily,weekly,monthly", help="Rollups to run, comma-separated."),
    force: bool = typer.Option(False, "--force", help="Also re-run buckets that are already done."),
    queue: bool = typer.Option(False, "--queue", help="Send the work to the workers: tally.backfill_hours tasks of "
                               "at most a day of hours, then one tally.backfill_bucket task per day, week, month."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, max=16, help="Run up to this many steps (or days, weeks, "
                             "months) at once, each on its own database connection (a database server with idle "
                             "cores backfills faster); hours then gather up to a week before their days run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run, bucket by bucket and step by "
                                 "step, and why; change nothing."),
    allow_open: bool = typer.Option(False, "--allow-open", help="Also aggregate buckets that have not ended "
                                    "(their numbers are then partial)."),
    unseal: bool = typer.Option(False, "--unseal", help="With --force: re-aggregate sealed buckets too (final "
                                "history); refused if retention purged rows of the range."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Every whole bucket of a range, hours before the days that contain them; resumable.

    A bucket whose steps all succeeded (and whose source has not changed) is skipped
    unless --force. Buckets that have not ended are left (and named) unless --allow-open.
    Ctrl-C stops after the current step; the same command continues where it stopped,
    a forced one included.
    """
    from . import backfill as bf
    from . import terminal as T

    start, end = _range(from_, to)
    names = B.parse_rollups(rollups)
    if unseal and not force:
        raise InvalidInput("--unseal goes with --force: only a forced backfill re-aggregates what is done")
    url = say_database()
    if jobs > 1 and queue:
        raise InvalidInput("--jobs runs steps at once in this process; with --queue the workers do (tally worker -c N)")
    job = bf.Backfill(url, start, end, names, force=force, allow_open=allow_open, unseal=unseal, jobs=jobs)
    if dry_run:
        planned = job.dry_run()
        if as_json:
            _emit_json({"plan": [p.as_dict() for p in planned], "left_open": job.report.left_open})
            return
        T.render_plan(out, planned, f"backfill {B.HOUR.label(start)} .. {B.HOUR.label(end)}")
        if job.report.left_open:
            out.print(f"left {len(job.report.left_open)} bucket(s) that have not ended (add --allow-open)")
        return
    with T.ProgressView(err, "backfill") as view, T.stop_on_signals(job.stop, err):
        job.on_update = view.update
        report = job.run_queued() if queue else job.run()
    T.print_report(err if as_json else out, report,
                   f"backfill {B.bucket('hourly', start).label} .. {B.bucket('hourly', end).label}")
    if as_json:
        _emit_json(report.as_dict())
    if report.stopped:
        raise typer.Exit(T.exit_code(report.signal))
    if report.failed:
        raise typer.Exit(1)


@app.command("retry-failed")
def retry_failed(
    since: Optional[str] = typer.Option(None, "--since", help="Only steps that failed at or after this time (attempt time, ISO 8601 on the hour)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be retried; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Re-run every step whose latest attempt failed (trigger 'retry'), hours first."""
    from . import backfill as bf
    from . import plan as P
    from . import state as S
    from . import terminal as T
    from .db import connection

    start = B.parse_time(since, "--since") if since is not None else None
    url = say_database()
    if dry_run:
        with connection(url, autocommit=True) as conn:
            S.reap(conn)
            todo = P.failing(conn, start)
        if as_json:
            _emit_json([dict(rollup=p.bucket.rollup, bucket=p.bucket.label, steps=list(p.steps)) for p in todo])
        else:
            for p in todo:
                out.print(f"{p.bucket}: {', '.join(p.steps)}", markup=False)
            out.print(f"{sum(len(p.steps) for p in todo)} failed step(s) in {len(todo)} bucket(s) would be retried")
        return
    with T.ProgressView(err, "retry") as view:
        report, results = bf.retry_failed(url, start, on_update=view.update)
    if as_json:
        _emit_json([r.as_dict() for r in results])
    else:
        for result in results:
            print_rollup(result)
    if report.total:
        T.print_report(err if as_json else out, report, "retry-failed")
    else:
        (err if as_json else out).print("retry-failed: nothing to retry (no step's latest attempt failed)")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def status(
    from_: Optional[str] = typer.Option(None, "--from", help="Start (on the hour). Default: for each rollup, TALLY_CATCHUP_DAYS days before today and at least its previous bucket."),
    to: Optional[str] = typer.Option(None, "--to", help="End, exclusive (on the hour). Default: the end of each rollup's current bucket."),
    rollups: str = typer.Option("hourly,daily,weekly,monthly", help="Rollups to show, comma-separated."),
    by: str = typer.Option("auto", help="auto (days beyond 48 hours), hour or day."),
    as_json: bool = typer.Option(False, "--json", help="Print every bucket's states as JSON."),
) -> None:
    """A grid of buckets x steps: ok, failed, dirty, missing, running, sealed; a legend and a summary.

    Without --from/--to each rollup shows the catch-up window and at least its previous
    and current bucket (a bucket that has not ended shows as open).
    """
    from . import status as st
    from .config import settings
    from .db import connection

    names = B.parse_rollups(rollups)
    if by not in ("auto", "hour", "day"):
        raise InvalidInput(f"invalid --by {by!r}: expected auto, hour or day")
    now = _now()
    if from_ is None and to is None:
        ranges = st.default_ranges(names, now, settings().catchup_days)
    else:
        if to is None:
            to = B.HOUR.label(B.HOUR.floor(now))
        if from_ is None:
            to_day = B.DAY.floor(B.parse_time(to, "--to"))
            year_one = dt.datetime(1, 1, 1, tzinfo=B.UTC)  # no default before it (timedelta would overflow)
            from_ = B.HOUR.label(to_day - dt.timedelta(days=min(settings().catchup_days, (to_day - year_one).days)))
        start, end = _range(from_, to)
        ranges = {r: (start, end) for r in names}
    url = say_database()
    with connection(url, autocommit=True) as conn:
        grid = st.grid(conn, ranges, now)
    if as_json:
        _emit_json(grid.as_dict())
        return
    from .terminal import render_status

    render_status(out, grid, by)


@app.command()
def runs(failed: bool = typer.Option(False, "--failed", help="Only failed attempts (same as --status failed)."),
         failing: bool = typer.Option(False, "--failing", help="What is failing now: of each step of each "
                                      "bucket, its latest attempt, if it failed."),
         rollup: Optional[str] = typer.Option(None, "--rollup", help="Only this rollup (hourly, daily, weekly, "
                                              "monthly)."),
         step: Optional[str] = typer.Option(None, "--step", help="Only this step."),
         status_: Optional[str] = typer.Option(None, "--status", help="Only attempts in this status: running, "
                                               "succeeded, failed, skipped."),
         trigger: Optional[str] = typer.Option(None, "--trigger", help="Only attempts of this trigger (schedule, "
                                               "manual, backfill, retry, catch-up)."),
         from_: Optional[str] = typer.Option(None, "--from", help="Only buckets that end after this time "
                                             "(bucket time, ISO 8601)."),
         to: Optional[str] = typer.Option(None, "--to", help="Only buckets that start before this time "
                                          "(bucket time, ISO 8601)."),
         since: Optional[str] = typer.Option(None, "--since", help="Only attempts started at or after this "
                                             "time (attempt time, ISO 8601)."),
         limit: int = typer.Option(50, min=1, max=100000, help="How many rows."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The run ledger, newest first: duration, rows, attempt, trigger, the error's first line.

    Filters combine (all must hold). --from/--to select by the bucket's time, --since by
    when the attempt started.
    """
    from . import ledger
    from . import state as S
    from .db import connection

    if failed and status_ not in (None, "failed"):
        raise InvalidInput(f"--failed and --status {status_} contradict each other")
    filters = dict(rollup=rollup, step=step, status=status_ or ("failed" if failed else None), trigger=trigger,
                   start=B.parse_time(from_, "--from") if from_ is not None else None,
                   end=B.parse_time(to, "--to") if to is not None else None,
                   since=B.parse_time(since, "--since") if since is not None else None, failing=failing)
    url = say_database()
    with connection(url, autocommit=True) as conn:
        S.reap(conn)
        rows = ledger.find_runs(conn, limit=limit, **filters)
    if as_json:
        _emit_json(rows)
        return
    from .terminal import render_runs

    render_runs(out, rows)


@app.command()
def verify(
    from_: str = typer.Option(..., "--from", help="Start (on the hour)."),
    to: str = typer.Option(..., "--to", help="End, exclusive (on the hour)."),
    limit: int = typer.Option(200, min=1, help="Most drift lines to print (--json lists all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Recompute every output row of the range from the source; list drifted rows; exit 1 on drift.

    Hourly tables for every hour of the range; daily, weekly and monthly rows for the
    periods lying wholly inside it. Reads only; writes nothing.
    """
    from . import terminal as T
    from . import verify as vf
    from .db import connection

    start, end = _range(from_, to)
    url = say_database()
    with connection(url, autocommit=True) as conn, T.verify_progress(err) as progress:
        task = progress.add_task("verify", total=None)
        conn.execute("SET TIME ZONE 'UTC'")
        report = vf.verify(conn, start, end, on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        _emit_json(report.as_dict())
    else:
        T.render_verify(out, report, limit)
    if not report.clean:
        raise typer.Exit(1)


# ---- retention (logic in retention.py) ---------------------------------------------------------

@app.command()
def retention(dry_run: bool = typer.Option(False, "--dry-run", help="Print exactly what would be deleted; change nothing."),
              as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Seal what may be sealed, then delete what sealed history no longer needs.

    TALLY_RAW_RETENTION_DAYS: source rows of sealed hours older than that (whole partitions where
    a source is partitioned); TALLY_HOURLY_RETENTION_DAYS: hourly output rows whose day, week and
    month are sealed; TALLY_LEDGER_RETENTION_DAYS (90): ledger history. Daily, weekly and monthly
    rows are never deleted; an hour that is not sealed keeps its rows. See docs/OPERATIONS.md.
    """
    from . import retention as R
    from . import terminal as T
    from .db import connection

    url = say_database()
    stop = T.Stop()
    with connection(url, autocommit=True) as conn, T.stop_on_signals(stop, err):
        conn.execute("SET TIME ZONE 'UTC'")
        report = R.run(conn, dry_run=dry_run, should_stop=stop.requested)
    if as_json:
        _emit_json(report.as_dict())
    else:
        T.render_retention(out, report)
    if stop.requested():
        raise typer.Exit(stop.exit_code)


# ---- Celery: worker, beat, flower (logic in tasks.py) --------------------------------------

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _celery(loglevel: str, *, database: bool):
    from . import tasks
    from .db import redact

    if loglevel.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidInput(f"invalid --loglevel {loglevel!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if database:  # beat and flower only talk to the broker
        say_database()
    err.print(f"tally: broker: {redact(tasks.app.conf.broker_url)}")
    logging.getLogger("tally").setLevel(loglevel.upper())
    return tasks


@app.command(context_settings=_PASS_THROUGH)
def worker(ctx: typer.Context,
           concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", min=1,
                                                     help="Worker processes (default: one per CPU)."),
           loglevel: str = typer.Option("INFO", help="Log level.")) -> None:
    """The Celery worker: runs the rollup tasks. Other options go to `celery worker`."""
    tasks = _celery(loglevel, database=True)
    raise typer.Exit(tasks.run_worker(ctx.args, concurrency=concurrency, loglevel=loglevel))


@app.command(context_settings=_PASS_THROUGH)
def beat(ctx: typer.Context, loglevel: str = typer.Option("INFO", help="Log level.")) -> None:
    """The Celery scheduler: sends tally.catch_up every hour at minute 5."""
    tasks = _celery(loglevel, database=False)
    raise typer.Exit(tasks.run_beat(ctx.args, loglevel=loglevel))


@app.command(context_settings=_PASS_THROUGH)
def flower(ctx: typer.Context,
           address: str = typer.Option("127.0.0.1", help="Address to bind; not loopback needs TALLY_FLOWER_AUTH."),
           port: int = typer.Option(5555, min=1, max=65535, help="Port.")) -> None:
    """The Flower UI and HTTP API (tasks, workers); basic auth from TALLY_FLOWER_AUTH."""
    from . import tasks

    auth = tasks.flower_auth(address)  # refuses an unprotected public bind before anything starts
    _celery("INFO", database=False)
    raise typer.Exit(tasks.run_flower(ctx.args, address=address, port=port, auth=auth))


@app.command()
def serve(address: str = typer.Option("127.0.0.1", help="Address to bind; not loopback needs TALLY_WEB_AUTH."),
          port: int = typer.Option(8787, min=1, max=65535, help="Port.")) -> None:
    """The operator console: rollup health, the grid, buckets, runs, the output as charts; /metrics for Prometheus.

    Pages work with the read-only dashboard role. Actions (retry, re-run, backfill, verify) go to the
    workers as Celery tasks and need TALLY_WEB_AUTH=user:password (then every page asks for it).
    """
    from . import tasks
    from .config import settings

    auth = tasks.bind_auth(address, settings().web_auth, "TALLY_WEB_AUTH", "the console",
                           "its actions run rollups; its pages show every failure")
    url = say_database()
    from .db import redact
    from .web import serve as run

    err.print(f"tally: broker: {redact(tasks.app.conf.broker_url)}")
    err.print(f"tally: console on http://{'[' + address + ']' if ':' in address else address}:{port}/ "
              f"(actions {'need TALLY_WEB_AUTH' if auth is None else 'enabled, with basic auth'})")
    raise typer.Exit(run(url, address, port, auth))


# ---- demo --------------------------------------------------------------------------------

@app.command()
def demo(hours: int = typer.Option(48, help="Hours of synthetic data ending at the current hour."),
         executions_per_hour: int = typer.Option(500, help="Executions per hour."),
         workspaces: int = typer.Option(20, help="Number of workspaces.")) -> None:
    """The whole job on a fresh machine: database, migrations, seed, rollups, status."""
    from . import demo as demo_mod
    from . import seed as seeding
    from .terminal import DemoView

    try:  # every argument checked before anything is written
        seeding._validate(B.HOUR.floor(_now()), hours, workspaces, executions_per_hour, 3 * executions_per_hour, 42)
    except ValueError as exc:
        raise InvalidInput(f"invalid demo: {exc}") from None
    url = say_database()
    code = demo_mod.run(url, DemoView(out, err), hours=hours, executions_per_hour=executions_per_hour,
                        workspaces=workspaces)
    if code:
        raise typer.Exit(code)


# ---- entry point -------------------------------------------------------------------------

def _fail(message: str) -> None:
    """An error as exactly one line on stderr: never wrapped, embedded line breaks flattened."""
    err.print(" ".join(line.strip() for line in message.splitlines() if line.strip()), markup=False, soft_wrap=True)


class Terminated(BaseException):
    """SIGTERM outside a command that stops gracefully: what runs is rolled back."""


def _terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error is one line on stderr and a SPEC exit code."""
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("tally").setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="tally")
        code = rv if isinstance(rv, int) else 0
    except _Exit as exc:
        code = exc.exit_code
    except Terminated:
        err.print("tally: terminated (SIGTERM)")
        code = 143
    except _Abort:
        err.print("tally: interrupted")
        code = 130
    except _ClickException as exc:  # usage errors: unknown command, bad option value
        _fail(f"tally: error: {exc.format_message()}")
        code = 2
    except TallyError as exc:
        _fail(f"tally: error: {exc}")
        code = exc.exit_code
    except KeyboardInterrupt:
        err.print("tally: interrupted")
        code = 130
    except Exception as exc:  # a database error outside any step: one line, never a traceback
        import psycopg

        from .db import redact, scrub, settings

        if not isinstance(exc, psycopg.Error):
            raise
        url = settings().database_url
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
                            psycopg.errors.UndefinedColumn, psycopg.errors.InvalidSchemaName)) \
                and "analytics" in str(exc):
            _fail(f"tally: error: this database lacks tally's schema (or an older one): run `tally db upgrade` "
                  f"({scrub(first, url)})")
            code = 2
        elif isinstance(exc, psycopg.OperationalError):
            _fail(f"tally: error: lost the database {redact(url) if url else '(embedded)'}: {scrub(first, url)}")
            code = 3
        else:
            hint = (" (create the partitions of those days first: docs/OPERATIONS.md, Partitioned sources)"
                    if "no partition of relation" in first else "")
            _fail(f"tally: error: database error: {type(exc).__name__}: {scrub(first, url)}{hint}")
            code = 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
