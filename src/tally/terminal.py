"""Everything tally shows on a terminal (Rich): grids, tables, progress bars, reports.

Only the CLI imports this module; the library, the tasks and the console never print.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import buckets as B
from .state import State
from .steps import ROLLUP_STEPS

if TYPE_CHECKING:  # rich.progress is imported where a bar is drawn: a one-bucket command never pays for it
    from rich.progress import Progress

COLORS = {State.OK: "green", State.FAILED: "bold red", State.DIRTY: "yellow", State.MISSING: "bright_black",
          State.RUNNING: "cyan", State.SEALED: "blue"}
GLYPHS = {State.OK: "■", State.FAILED: "✗", State.DIRTY: "~", State.MISSING: "·", State.RUNNING: "▸",
          State.SEALED: "▪"}
MEANING = {
    State.OK: "up to date",
    State.FAILED: "latest attempt failed",
    State.DIRTY: "source changed since",
    State.MISSING: "never run",
    State.RUNNING: "in progress",
    State.SEALED: "final history",
}
SHOWN = (State.OK, State.FAILED, State.DIRTY, State.MISSING, State.RUNNING)  # sealed: once there is any
FOLD_HOURS = 48  # longer ranges show one row per day, one mark per hour
STATUS_COLORS = {"succeeded": "green", "failed": "bold red", "skipped": "yellow", "running": "cyan"}


def first_line(error: str | None, width: int = 100) -> str:
    if not error:
        return ""
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


# ---- the status grid ------------------------------------------------------------------------

def _word(state: State) -> Text:
    return Text(state.value, style=COLORS[state])


def _cell(g, bs, step: str) -> Text:
    """A bucket's state in words; a bucket that has not ended and was never run is 'open', not missing."""
    if g.is_open(bs.bucket) and bs[step] is State.MISSING:
        return Text("open", style="dim")
    return _word(bs[step])


def _shown(counts: Counter) -> tuple[State, ...]:
    return SHOWN + ((State.SEALED,) if counts[State.SEALED.value] else ())


def _legend(states: tuple[State, ...], open_shown: bool) -> Text:
    text = Text()
    for i, s in enumerate(states):
        text.append(f"{GLYPHS[s]} {s.value}", style=COLORS[s])
        text.append(f" = {MEANING[s]}" + ("  ·  " if i < len(states) - 1 else ""))
    if open_shown:
        text.append("  ·  ")
        text.append("open", style="dim")
        text.append(" = has not ended yet")
    return text


def _summary_line(g, states: tuple[State, ...]) -> Text:
    counts = g.summary()
    opened = sum(1 for rows in g.states.values() for b, bs in rows.items() if g.is_open(b)
                 for st in bs.steps.values() if st.state is State.MISSING)
    counts[State.MISSING.value] -= opened  # not due yet: shown as open
    sizes = ", ".join(f"{len(rows)} {B.KIND[r]}{'s' if len(rows) != 1 else ''}"
                      for r, rows in g.states.items() if rows) or "no whole bucket"
    text = Text(f"{g.start:%Y-%m-%dT%H:00Z} .. {g.end:%Y-%m-%dT%H:00Z}: {sizes}; steps: ")
    for i, s in enumerate(states):
        text.append(f"{counts[s.value]} {s.value}", style=COLORS[s] if counts[s.value] else None)
        text.append(", " if i < len(states) - 1 else "")
    if opened:
        text.append(f", {opened} open")
    hints = []
    if counts[State.FAILED.value]:
        hints.append("tally retry-failed")
    if counts[State.DIRTY.value] or counts[State.MISSING.value]:
        hints.append("tally catch-up (or tally backfill)")
    if hints:
        text.append(f"  → {' · '.join(hints)}")
    return text


def _hour_strip(day: dt.datetime, step: str, hours: dict, now: dt.datetime) -> Text:
    text = Text()
    for i in range(24):
        if i and i % 6 == 0:
            text.append(" ")
        bs = hours.get(B.HOUR.bucket(day + dt.timedelta(hours=i)))
        if bs is None or (bs[step] is State.MISSING and bs.bucket.end > now):
            text.append(" ")  # outside the range, or not ended yet
        else:
            text.append(GLYPHS[bs[step]], style=COLORS[bs[step]])
    return text


STRIP = 24 + 3  # one mark an hour, a space every six
DAILY = B.DAY.rollup


def _wide_fold_width() -> int:
    """Columns the folded grid needs with one column per hourly step (borders and padding included)."""
    names = [len(s) for s in ROLLUP_STEPS[B.HOUR.rollup]]
    cells = [len("2026-11-23"), *(max(n, STRIP) for n in names), len("daily_metrics")]
    return sum(cells) + 3 * len(cells) + 1


def render_status(console: Console, g, by: str = "auto") -> None:
    """The grid: tables of buckets × steps, a legend and a one-line summary.

    Beyond 48 hours (or with ``by='day'``) hours fold into one row per day, one mark per
    hour. On a terminal too narrow for a column per hourly step, each day takes one row
    per step instead: every bucket and every step stays visible, nothing is cut.
    """
    hours = g.states.get(B.HOUR.rollup, {})
    fold = by == "day" or (by == "auto" and len(hours) > FOLD_HOURS)
    periods = [r for r in g.states if B.grain(r).parts is not None]
    steps = ROLLUP_STEPS[B.HOUR.rollup]
    if hours and fold:
        days = list(B.touching(DAILY, min(b.start for b in hours), max(b.end for b in hours)))
        daily = g.states.get(DAILY, {})
        table = Table(title="hours by day (one mark per hour, 00-23 UTC)", title_justify="left")
        table.add_column("day", no_wrap=True)
        wide = console.width >= _wide_fold_width()
        if wide:
            for step in steps:
                table.add_column(step, no_wrap=True)
        else:
            table.add_column("step", no_wrap=True)
            table.add_column("00     06     12     18", no_wrap=True)
        if DAILY in g.states:
            table.add_column("daily_metrics" if wide else "daily", no_wrap=True)

        def day_word(day):
            bs = daily.get(day)
            return _cell(g, bs, "daily_metrics") if bs else Text("(partial day)", style="bright_black")

        for day in days:
            if wide:
                row = [day.label, *(_hour_strip(day.start, s, hours, g.now) for s in steps)]
                table.add_row(*row, *([day_word(day)] if DAILY in g.states else []))
                continue
            for i, step in enumerate(steps):
                row = [day.label if i == 0 else "", step, _hour_strip(day.start, step, hours, g.now)]
                if DAILY in g.states:
                    row.append(day_word(day) if i == 0 else "")
                table.add_row(*row, end_section=i == len(steps) - 1)
        console.print(table)
        periods = [r for r in periods if r != DAILY]  # shown beside its hours
    elif hours:
        table = Table(title=B.HOUR.rollup, title_justify="left")
        table.add_column("hour", no_wrap=True)
        for step in steps:
            table.add_column(step, no_wrap=True)
        for b, bs in hours.items():
            table.add_row(b.label, *(_cell(g, bs, s) for s in steps))
        console.print(table)
    for rollup in periods:
        rows = g.states[rollup]
        if not rows:
            continue
        table = Table(title=rollup, title_justify="left")
        table.add_column(B.KIND[rollup], no_wrap=True)
        for step in ROLLUP_STEPS[rollup]:
            table.add_column(step, no_wrap=True)
        for b, bs in rows.items():
            table.add_row(b.label, *(_cell(g, bs, s) for s in ROLLUP_STEPS[rollup]))
        console.print(table)
    states = _shown(g.summary())
    open_shown = any(g.is_open(b) for rows in g.states.values() for b in rows)
    console.print(_legend(states, open_shown))
    console.print(_summary_line(g, states))
    if g.ignored:
        console.print(Text(f"{g.ignored:,} change(s) to sealed history ignored: their output rows stay as they were "
                           "(tally run --unseal re-aggregates a bucket on purpose)", style=COLORS[State.SEALED]))


# ---- the ledger -----------------------------------------------------------------------------

def render_runs(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"ledger, newest first ({len(rows)} rows)", title_justify="left")
    for col in ("id", "started", "rollup", "step", "bucket", "status", "seconds", "rows", "attempt", "trigger"):
        table.add_column(col, justify="right" if col in ("id", "seconds", "rows", "attempt") else "left", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=64)
    for r in rows:
        table.add_row(
            str(r["id"]), f"{r['started_at'].astimezone(B.UTC):%Y-%m-%d %H:%M:%SZ}", r["rollup"], r["step"], r["bucket"],
            Text(r["status"], style=STATUS_COLORS.get(r["status"])),
            "" if r["seconds"] is None else f"{r['seconds']:.3f}",
            "" if r["rows_written"] is None else f"{r['rows_written']:,}",
            str(r["attempt"]), r["trigger"], first_line(r["error"]),
        )
    console.print(table)


# ---- one rollup -------------------------------------------------------------------------------

def print_rollup(console: Console, result) -> None:
    """The steps of one rollup (and how many hours it prepared first)."""
    if result.prepared:
        n_ok = sum(1 for p in result.prepared if p.ok)
        console.print(f"prepared {len(result.prepared)} hour(s) of {result.bucket.label} first "
                      f"({n_ok} ok, {len(result.prepared) - n_ok} failed)")
    if not result.steps:
        console.print(f"{result.bucket}: nothing to do (every step already succeeded)")
        return
    table = Table(title=f"{result.bucket}{' (atomic)' if result.atomic else ''}", title_justify="left")
    for col in ("step", "status", "rows", "attempt", "seconds", "error"):
        table.add_column(col, justify="right" if col in ("rows", "attempt", "seconds") else "left")
    for s in result.steps:
        table.add_row(s.step, Text(s.status, style=STATUS_COLORS.get(s.status, "white")),
                      "" if s.rows is None else f"{s.rows:,}", str(s.attempt), f"{s.seconds:.3f}",
                      first_line(s.error, 10_000))
    console.print(table)


# ---- backfill, retry-failed and catch-up progress -------------------------------------------

def _rates_column():
    """A column of output rows and buckets per second since the start."""
    from rich.progress import ProgressColumn

    class Rates(ProgressColumn):
        def render(self, task) -> Text:
            report = task.fields.get("report")
            if report is None or report.seconds <= 0:
                return Text("")
            return Text(f"{report.rows / report.seconds:,.0f} rows/s · {report.ran / report.seconds:.1f} buckets/s",
                        style="progress.data.speed")

    return Rates()


class ProgressView:
    """A Rich progress bar fed with backfill Report updates: buckets done, rates, ETA."""

    def __init__(self, console: Console, title: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("buckets"), _rates_column(), TimeRemainingColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)
        self.task = self.progress.add_task(title, total=None, report=None)

    def __enter__(self) -> "ProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, report) -> None:
        self.progress.update(self.task, total=report.total or None, completed=report.done, report=report,
                             description=report.current or "")


class Stop:
    """A stop asked for by a signal: which one, and the exit code it means."""

    def __init__(self):
        self.signal: str | None = None

    def __call__(self, why: str = "SIGINT") -> None:
        self.signal = self.signal or why

    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return exit_code(self.signal)


def exit_code(signal_name: str | None) -> int:
    """128 + the signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 143 if signal_name == "SIGTERM" else 130


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[str], None], console: Console) -> Iterator[None]:
    """Ctrl-C or SIGTERM once: ``stop(signal name)``, and the work stops after the step (or hour) it
    is in. Ctrl-C twice: stop now (what is not committed is rolled back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame) -> None:
        name = signal.Signals(signum).name
        stop(name)
        if name == "SIGTERM":
            console.print("[yellow]terminated (SIGTERM)[/]: stopping after the current step")
        else:
            console.print("[yellow]stopping after the current step[/] (Ctrl-C again to stop at once; "
                          "that step is then rolled back)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, first)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def print_report(console: Console, report, what: str) -> None:
    """The one-paragraph outcome of a backfill or retry."""
    secs = max(report.seconds, 1e-9)
    line = (f"{what}: {report.done} of {report.total} bucket(s) done: {report.ran} ran, "
            f"{report.skipped} already done; {report.steps} step(s), {len(report.failed)} failed; "
            f"{report.rows:,} rows in {report.seconds:.1f}s "
            f"({report.rows / secs:,.0f} rows/s, {report.ran / secs:.1f} buckets/s)")
    if report.queued:
        line += f"; {report.queued} task(s) queued"
    console.print(line)
    for bucket, step, error in report.failed[:20]:
        console.print(f"  [bold red]failed[/] {bucket} {step}: {escape(first_line(error))}")
    if len(report.failed) > 20:
        console.print(f"  … and {len(report.failed) - 20} more: `tally runs --failed`")
    if report.failed:
        console.print("  re-run them with `tally retry-failed`")
    if getattr(report, "resumed", None):
        console.print(f"resumed the forced backfill that began {report.resumed}: buckets it had done were not "
                      "forced again")
    if getattr(report, "sealed", 0):
        console.print(f"left {report.sealed} sealed bucket(s) as they are (final history): add --unseal to "
                      "re-aggregate them")
    left = getattr(report, "left_open", [])
    if left:
        console.print(f"left {len(left)} bucket(s) that have not ended ({left[0]}"
                      + (f" … {left[-1]}" if len(left) > 1 else "") + "): run them once they have, or add --allow-open")
    if report.stopped and report.queued:
        console.print("[yellow]stopped waiting[/]: the tasks sent stay queued; run the same command again "
                      "to send the rest")
    elif report.stopped:
        console.print("[yellow]stopped[/]: what finished is committed; run the same command again to continue")


class CatchUpView:
    """Catch-up's plan per phase, a progress bar, and every step that did not succeed."""

    def __init__(self, say: Callable[[str], None], console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.say = say
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 console=console, transient=True)
        self.task = None

    def __enter__(self) -> "CatchUpView":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_plan(self, rollup: str, planned) -> None:
        why = ", ".join(f"{n} {r}" for r, n in sorted(Counter(p.reason for p in planned).items()))
        self.say(f"{rollup}: {len(planned)} to run" + (f" ({why})" if why else ""))
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(rollup, total=len(planned))

    def on_bucket(self, result) -> None:
        self.progress.update(self.task, advance=1, description=str(result.bucket))
        for r in [*result.prepared, result]:
            if not r.ok or any(s.status == "skipped" for s in r.steps):
                for s in r.steps:
                    if s.status != "succeeded":
                        first = escape(s.error.splitlines()[0]) if s.error else ""
                        self.progress.console.print(
                            f"  {r.bucket} {s.step}: [{STATUS_COLORS[s.status]}]{s.status}[/] {first}")


def render_plan(console: Console, planned, title: str) -> None:
    """A plan before work: every bucket and step that would run, and why (nothing runs)."""
    if not planned:
        console.print(f"{title}: nothing to run")
        return
    table = Table(title=f"{title}: {len(planned)} bucket(s) would run", title_justify="left")
    for col in ("bucket", "steps", "reason", "why"):
        table.add_column(col, no_wrap=col != "why", overflow="fold")
    for p in planned:
        table.add_row(str(p.bucket), "\n".join(p.steps), p.reason, p.why)
    console.print(table)


def render_retention(console: Console, p) -> None:
    """What retention deleted (or, in a dry run, would delete), and what it kept and why."""
    verb = "would delete" if p.dry_run else "deleted"
    if p.sealed:
        console.print("sealed: " + ", ".join(f"{n} {r}" for r, n in p.sealed.items()))
    if p.raw_cutoff is None:
        console.print("source rows: kept (TALLY_RAW_RETENTION_DAYS is not set)")
    for table, sp in p.sources.items():
        hours = [h for h, _ in sp.hours]
        span = f" ({B.HOUR.label(hours[0])} .. {B.HOUR.label(hours[-1])})" if hours else ""
        console.print(f"{table}: {verb} {sp.rows:,} row(s) of {len(hours)} sealed hour(s) before "
                      f"{B.HOUR.label(p.raw_cutoff)}{span}"
                      + (f" and {len(sp.partitions)} whole partition(s): "
                         + ", ".join(n for n, *_ in sp.partitions) if sp.partitions else ""))
        if sp.kept:
            console.print(f"  kept the rows of {sum(sp.kept.values())} older hour(s) that are not sealed: "
                          + ", ".join(f"{n} {why}" for why, n in sp.kept.most_common()))
    if p.hourly_cutoff is None:
        console.print("hourly output rows: kept (TALLY_HOURLY_RETENTION_DAYS is not set)")
    else:
        console.print(f"hourly output rows: {verb} {sum(n for _, n in p.hourly):,} row(s) of {len(p.hourly)} hour(s) "
                      f"before {B.HOUR.label(p.hourly_cutoff)} whose day, week and month are sealed"
                      + (f"; kept {p.hourly_kept} hour(s) whose day, week or month is not" if p.hourly_kept else ""))
    console.print(f"ledger: {verb} {p.ledger_rows:,} attempt(s) started before {p.ledger_cutoff:%Y-%m-%dT%H:%MZ} "
                  "(never one behind a bucket's current state)")
    if not p.dry_run:
        console.print(f"retention finished in {p.seconds:.1f}s; the longest delete batch took "
                      f"{p.longest_batch * 1000:.0f} ms")


# ---- verify ----------------------------------------------------------------------------------

def render_verify(console: Console, report, limit: int = 200) -> None:
    """The drift table (at most ``limit`` lines) and a one-line verdict."""
    checked = ", ".join(f"{n} {kind if n != 1 else kind[:-1]}" for kind, n in report.checked.items() if n)
    span = f"{report.start:%Y-%m-%dT%H:00Z} .. {report.end:%Y-%m-%dT%H:00Z}"
    if report.sealed:
        console.print(f"sealed: {len(report.sealed)} table bucket(s) differ from today's source by changes ignored "
                      f"since they were sealed (history, not drift): {', '.join(list(report.sealed)[:5])}"
                      + (" …" if len(report.sealed) > 5 else ""), markup=False)
    if report.purged:
        console.print(f"purged: {len(report.purged)} table bucket(s) whose source or hourly rows retention deleted "
                      f"were not compared: {', '.join(list(report.purged)[:5])}"
                      + (" …" if len(report.purged) > 5 else ""), markup=False)
    if report.clean:
        console.print(f"[green]clean[/]: every output row of {span} matches its source ({checked})")
        return
    table = Table(title=f"drift in {span}", title_justify="left")
    for col in ("table", "bucket", "key", "column", "expected", "actual"):
        table.add_column(col)
    for d in report.drifts[:limit]:
        key = ", ".join(f"{k}={v!r}" for k, v in d.key.items())
        column = d.column if d.problem == "drift" else f"({d.problem})"
        table.add_row(d.table, d.bucket, key, column, d.expected or "", d.actual or "")
    console.print(table)
    more = f" (first {limit} shown; --json lists all)" if len(report.drifts) > limit else ""
    rows = len({(d.table, d.bucket, tuple(d.key.items())) for d in report.drifts})
    console.print(f"[bold red]drift[/]: {len(report.drifts)} problem(s) in {rows} row(s){more}; checked {checked}. "
                  f"Re-run the buckets with `tally backfill --from … --to … --force`.")


def verify_progress(console: Console) -> "Progress":
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("verify"), BarColumn(), MofNCompleteColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


# ---- demo -----------------------------------------------------------------------------------

class DemoView:
    """What ``tally demo`` shows: numbered stages, a progress bar for the rollups, the busiest workspaces."""

    def __init__(self, out: Console, err: Console):
        self.out, self.err = out, err

    def stage(self, text: str) -> None:
        self.out.print(text)

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Callable[[str], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]3. rollups[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.err, transient=True) as progress:
            task = progress.add_task("", total=total)

            def advance(description: str) -> None:
                progress.update(task, description=description, advance=1)

            yield advance

    def busiest(self, title: str, rows: list[tuple]) -> None:
        table = Table(title=title, title_justify="left")
        for col in ("workspace", "runs", "ok", "failed", "avg s", "p50 s", "p95 s", "p99 s", "credits", "users",
                    "agents", "health"):
            table.add_column(col, justify="left" if col == "workspace" else "right")
        for r in rows:
            table.add_row(r[0] or "''", f"{r[1]:,}", f"{r[2]:,}", f"{r[3]:,}", f"{r[4] or 0:.2f}", f"{r[5] or 0:.2f}",
                          f"{r[6] or 0:.2f}", f"{r[7] or 0:.2f}", f"{r[8]:,.2f}", str(r[9]), str(r[10]),
                          f"{r[11]:.1f}")
        self.out.print(table)
