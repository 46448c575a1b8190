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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Idempotent, observable rollups of AI-agent execution logs in PostgreSQL.",
)
db_app = typer.Typer(no_args_is_help=True, help="Schema migrations and the embedded database.")
run_app = typer.Typer(no_args_is_help=True, help="Run one rollup for one bucket (default: the last complete one).")
app.add_typer(db_app, name="db")
app.add_typer(run_app, name="run")

# Not a terminal (a pipe, a log file): wide enough that tables are not cramped.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def say_database() -> str:
    """Print which database this command uses (password hidden) and return its URL."""
    from .db import database_url, describe

    err.print(f"tally: {describe()}")
    return database_url()


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")


# ---- db ----------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Target revision.")) -> None:
    """Apply migrations (Alembic); safe to run again on a migrated database."""
    from . import migrate

    url = say_database()
    migrate.upgrade(url, revision)
    out.print(f"schema at revision {migrate.current(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Option("base", help="Target revision.")) -> None:
    """Revert tally's tables (the source tables are kept)."""
    from . import migrate

    url = say_database()
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
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the SQL; connect to nothing, change nothing.")) -> None:
    """Least-privilege roles: a worker (reads the source, writes only tally's analytics tables) and a read-only dashboard.

    Run as the owner of tally's tables (who ran `tally db upgrade`), again after every upgrade.
    Log in as members: CREATE ROLE alice LOGIN PASSWORD '…' IN ROLE tally_worker. See docs/SECURITY.md.
    """
    from . import roles

    plan = roles.plan(worker, dashboard)  # bad names are invalid input, before any connection
    if dry_run:
        sys.stdout.write(roles.render(plan) + "\n")
        return
    url = say_database()
    for line in roles.apply(url, plan):
        out.print(line, markup=False)


# ---- seed --------------------------------------------------------------------------------

@app.command()
def seed(
    from_: Optional[str] = typer.Option(None, "--from", help="First hour (ISO 8601, on the hour). Default: 24 h before the current hour."),
    hours: int = typer.Option(24, help="How many hours to fill."),
    workspaces: int = typer.Option(20, help="Number of workspaces."),
    executions_per_hour: int = typer.Option(500, help="Executions per hour."),
    events_per_hour: int = typer.Option(1500, help="User-activity events per hour."),
    seed_: int = typer.Option(42, "--seed", help="Random seed: the same seed gives the same rows."),
) -> None:
    """Write realistic synthetic source data (deterministic for a given --seed)."""
    from rich.progress import Progress

    from . import seed as seeding
    from .db import connection

    if from_ is None:
        start = B.floor("hourly", dt.datetime.now(B.UTC)) - dt.timedelta(hours=24)
    else:
        start = B.parse_time(from_, "--from")
    try:
        seeding._validate(start, hours, workspaces, executions_per_hour, events_per_hour, seed_)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    url = say_database()
    with connection(url) as conn, Progress(console=err, transient=True) as progress:
        task = progress.add_task("seeding", total=hours)
        result = seeding.seed(conn, start=start, hours=hours, workspaces=workspaces,
                              executions_per_hour=executions_per_hour, events_per_hour=events_per_hour,
                              seed=seed_, progress=lambda done, total: progress.update(task, completed=done))
    out.print(f"seeded {result.executions:,} executions and {result.events:,} events "
              f"for {B.bucket('hourly', result.start).label} .. {B.bucket('hourly', result.end).label}"
              + (f" ({result.executions_skipped:,} executions already present)" if result.executions_skipped else ""))


# ---- run ---------------------------------------------------------------------------------

def print_rollup(result, as_json: bool = False) -> None:
    if as_json:
        _emit_json(result.as_dict())
        return
    from .terminal import print_rollup as show

    show(out, result)


def _run(rollup: str, when: Optional[str], steps: Optional[List[str]], atomic: bool, as_json: bool) -> None:
    from .rollups import Runner
    from .steps import steps_of

    bucket = B.parse_bucket(rollup, when)
    steps_of(rollup, steps)  # unknown step names are rejected before anything is written
    url = say_database()
    with Runner(url, trigger="manual") as runner:
        result = runner.run(bucket, steps, atomic=atomic)
    print_rollup(result, as_json)
    if not result.ok:
        raise typer.Exit(1)


_STEP_HELP = "Run only this step (repeatable)."
_ATOMIC_HELP = "All steps in one transaction: all or nothing."


@run_app.command("hourly")
def run_hourly(hour: Optional[str] = typer.Option(None, help="The hour, ISO 8601 on the hour (UTC if no offset)."),
               step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
               atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """execution_metrics, user_activity, credit_consumption for one hour."""
    _run("hourly", hour, step, atomic, as_json)


@run_app.command("daily")
def run_daily(date: Optional[str] = typer.Option(None, help="The UTC day, YYYY-MM-DD."),
              step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
              atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
              as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """daily_metrics for one day (its missing, failed or dirty hours are aggregated first)."""
    _run("daily", date, step, atomic, as_json)


@run_app.command("weekly")
def run_weekly(week: Optional[str] = typer.Option(None, help="The ISO week, given by its Monday (YYYY-MM-DD)."),
               step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
               atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """weekly_metrics for one ISO week (its missing, failed or dirty hours first)."""
    _run("weekly", week, step, atomic, as_json)


@run_app.command("monthly")
def run_monthly(month: Optional[str] = typer.Option(None, help="The month, YYYY-MM."),
                step: Optional[List[str]] = typer.Option(None, help=_STEP_HELP),
                atomic: bool = typer.Option(False, help=_ATOMIC_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """monthly_metrics for one calendar month (its missing, failed or dirty hours first)."""
    _run("monthly", month, step, atomic, as_json)


# ---- catch-up (logic in catchup.py) -------------------------------------------------------

@app.command("catch-up")
def catch_up(as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Every dirty, missing or failed bucket: hours first, then the days, weeks and months due."""
    from . import catchup
    from .terminal import CatchUpView

    url = say_database()
    say = err.print if as_json else out.print  # with --json, stdout holds only the JSON
    with CatchUpView(say, err) as view:
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
    queue: bool = typer.Option(False, "--queue", help="One tally.backfill_bucket task per bucket, for the workers."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Every whole bucket of a range, hours before the days that contain them; resumable.

    A bucket whose steps all succeeded (and whose source has not changed) is skipped
    unless --force. Ctrl-C stops after the current step; run the command again to continue.
    """
    from . import backfill as bf
    from . import terminal as T

    start, end = _range(from_, to)
    names = B.parse_rollups(rollups)
    url = say_database()
    job = bf.Backfill(url, start, end, names, force=force)
    with T.ProgressView(err, "backfill") as view, T.stop_on_signals(job.stop, err):
        job.on_update = view.update
        report = job.run_queued() if queue else job.run()
    T.print_report(err if as_json else out, report,
                   f"backfill {B.bucket('hourly', start).label} .. {B.bucket('hourly', end).label}")
    if as_json:
        _emit_json(report.as_dict())
    if report.stopped:
        raise typer.Exit(130)
    if report.failed:
        raise typer.Exit(1)


@app.command("retry-failed")
def retry_failed(
    since: Optional[str] = typer.Option(None, "--since", help="Only buckets starting at or after this hour."),
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
    from_: Optional[str] = typer.Option(None, "--from", help="Start (on the hour). Default: TALLY_CATCHUP_DAYS days before today."),
    to: Optional[str] = typer.Option(None, "--to", help="End, exclusive (on the hour). Default: the current hour."),
    rollups: str = typer.Option("hourly,daily,weekly,monthly", help="Rollups to show, comma-separated."),
    by: str = typer.Option("auto", help="auto (days beyond 48 hours), hour or day."),
    as_json: bool = typer.Option(False, "--json", help="Print every bucket's states as JSON."),
) -> None:
    """A grid of buckets x steps: ok, failed, dirty, missing, running; a legend and a summary."""
    from . import status as st
    from .config import settings
    from .db import connection

    now = B.floor("hourly", dt.datetime.now(B.UTC))
    if to is None:
        to = f"{now:%Y-%m-%dT%H:00Z}"
    if from_ is None:
        to_day = B.floor("daily", B.parse_time(to, "--to"))
        year_one = dt.datetime(1, 1, 1, tzinfo=B.UTC)  # no default before it (timedelta would overflow)
        default = to_day - dt.timedelta(days=min(settings().catchup_days, (to_day - year_one).days))
        from_ = f"{default.year:04d}-{default:%m-%dT%H}:00Z"  # %Y drops the padding before 1000
    start, end = _range(from_, to)
    names = B.parse_rollups(rollups)
    if by not in ("auto", "hour", "day"):
        raise InvalidInput(f"invalid --by {by!r}: expected auto, hour or day")
    url = say_database()
    with connection(url, autocommit=True) as conn:
        grid = st.grid(conn, start, end, names)
    if as_json:
        _emit_json(grid.as_dict())
        return
    from .terminal import render_status

    render_status(out, grid, by)


@app.command()
def runs(failed: bool = typer.Option(False, "--failed", help="Only failed attempts."),
         limit: int = typer.Option(50, min=1, max=100000, help="How many rows."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The run ledger, newest first: duration, rows, attempt, trigger, the error's first line."""
    from . import ledger
    from . import state as S
    from .db import connection

    url = say_database()
    with connection(url, autocommit=True) as conn:
        S.reap(conn)
        rows = ledger.runs(conn, failed=failed, limit=limit)
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
    from .terminal import DemoView

    url = say_database()
    code = demo_mod.run(url, DemoView(out, err), hours=hours, executions_per_hour=executions_per_hour,
                        workspaces=workspaces)
    if code:
        raise typer.Exit(code)


# ---- entry point -------------------------------------------------------------------------

def _fail(message: str) -> None:
    """An error as exactly one line on stderr: never wrapped, embedded line breaks flattened."""
    err.print(" ".join(line.strip() for line in message.splitlines() if line.strip()), markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error is one line on stderr and a SPEC exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("tally").setLevel(logging.WARNING)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="tally")
        code = rv if isinstance(rv, int) else 0
    except _Exit as exc:
        code = exc.exit_code
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
        if isinstance(exc, psycopg.OperationalError):
            _fail(f"tally: error: lost the database {redact(url) if url else '(embedded)'}: {scrub(first, url)}")
            code = 3
        else:
            _fail(f"tally: error: database error: {type(exc).__name__}: {scrub(first, url)}")
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
