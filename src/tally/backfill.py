"""Backfill a range and retry failed steps: the operator's bulk re-runs.

A backfill runs every bucket of the chosen rollups lying wholly inside a range,
each hour before the day, week and month that contain it. It is resumable: a
bucket whose steps are all ``ok`` (see :func:`tally.status.bucket_states`) is
skipped unless forced, and of a partly done bucket only the steps that are not
``ok`` run. A stop request (Ctrl-C) takes effect after the step that is running,
so a re-run continues where this one stopped.

With a queue, every bucket becomes one ``tally.backfill_bucket`` task: the hours
first; once the workers have finished them (the ledger says so), the days, weeks
and months, which read only hourly rows.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from . import buckets as B
from .buckets import Bucket
from .db import connect
from .queries import query
from .rollups import RollupResult, Runner, StepResult
from .status import DIRTY, OK, RUNNING, bucket_states, failed_steps, first_line, reap_abandoned
from .steps import ROLLUP_STEPS

_RANK = {r: i for i, r in enumerate(B.ROLLUPS)}


class Stopped(BaseException):
    """Raised between two steps once a stop was requested (not an error: nothing is half done)."""


def plan(start: dt.datetime, end: dt.datetime, rollups: list[str]) -> list[Bucket]:
    """Every whole bucket of ``rollups`` in [start, end): each after the finer buckets it contains."""
    found = [b for r in rollups for b in B.within(r, start, end)]
    return sorted(found, key=lambda b: (b.end, _RANK[b.rollup], b.start))


def pending_steps(conn, bucket: Bucket, force: bool = False) -> list[str]:
    """The steps of ``bucket`` a backfill must run: all if forced, else those that are not ok."""
    if force:
        return list(ROLLUP_STEPS[bucket.rollup])
    cells = bucket_states(conn, bucket.rollup, bucket.start, bucket.end)[bucket]
    if bucket.rollup == "hourly" and DIRTY in cells.values():
        # the whole hour, as catch-up does: only a success of every step clears its change marks
        return list(ROLLUP_STEPS["hourly"])
    return [step for step, state in cells.items() if state != OK]


@dataclass
class Report:
    """What a backfill (or retry) did so far."""

    total: int = 0  # buckets planned
    done: int = 0  # buckets handled (ran or skipped)
    ran: int = 0  # buckets that ran at least one step
    skipped: int = 0  # buckets already done
    steps: int = 0  # steps that ran (hours prepared by a period included)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (bucket, step, error)
    rows: int = 0  # output rows written
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stopped: bool = False
    current: str = ""
    queued: int = 0  # tasks sent (queue mode)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def record(self, bucket: Bucket, sr: StepResult) -> None:
        """Count one step that ran (called after its commit or rollback and its ledger row)."""
        self.steps += 1
        self.rows += sr.rows or 0
        if sr.status == "failed":
            self.failed.append((str(bucket), sr.step, sr.error or ""))

    def as_dict(self) -> dict:
        return dict(total=self.total, done=self.done, ran=self.ran, skipped=self.skipped, steps=self.steps,
                    failed=[dict(bucket=b, step=s, error=e) for b, s, e in self.failed], rows=self.rows,
                    seconds=round(self.seconds, 3), stopped=self.stopped, queued=self.queued)


class Backfill:
    """One backfill of a range, in this process or through the queue."""

    def __init__(self, url: str, start: dt.datetime, end: dt.datetime, rollups: list[str], *, force: bool = False,
                 on_update: Callable[[Report], None] | None = None):
        self.url = url
        self.start, self.end = start, end
        self.rollups = rollups
        self.force = force
        self.on_update = on_update or (lambda report: None)
        self.report = Report()
        self._stop = False

    def stop(self) -> None:
        """Stop after the step that is running now."""
        self._stop = True

    def _on_step(self, bucket: Bucket, sr: StepResult) -> None:
        # the Runner calls this after the step's commit (or rollback) and its ledger row:
        # raising here stops between two steps, with nothing half done
        self.report.record(bucket, sr)
        self.on_update(self.report)
        if self._stop:
            raise Stopped

    # -- in this process -------------------------------------------------------------------
    def run(self) -> Report:
        """Run the plan here; returns the report (``stopped`` if a stop was requested)."""
        work = plan(self.start, self.end, self.rollups)
        self.report.total = len(work)
        with connect(self.url, autocommit=True) as conn, \
                Runner(self.url, trigger="backfill", on_step=self._on_step) as runner:
            reap_abandoned(conn)
            try:
                for bucket in work:
                    if self._stop:
                        raise Stopped
                    self.report.current = str(bucket)
                    self.on_update(self.report)
                    steps = pending_steps(conn, bucket, self.force)  # a period: after its hours ran
                    if steps:
                        runner.run(bucket, steps)
                        self.report.ran += 1
                    else:
                        self.report.skipped += 1
                    self.report.done += 1
                    self.on_update(self.report)
            except Stopped:
                self.report.stopped = True
        self.report.finished = time.monotonic()
        return self.report

    # -- through the queue -----------------------------------------------------------------
    def run_queued(self, poll: float = 0.5) -> Report:
        """Send one ``tally.backfill_bucket`` task per bucket that needs work; wait for the workers.

        Hours go first; days, weeks and months (built from hourly rows only) are sent once
        every queued hour has a finished ledger row, so no worker re-does an hour another
        worker is running.
        """
        from .tasks import app, check_broker

        check_broker()
        phases = [[r for r in self.rollups if r == "hourly"], [r for r in self.rollups if r != "hourly"]]
        self.report.total = len(plan(self.start, self.end, self.rollups))
        with connect(self.url, autocommit=True) as conn:
            reap_abandoned(conn)
            for rollups in phases:
                if not rollups or self._stop:
                    continue
                marker = conn.execute(query("ops_ledger_marker")).fetchone()[0]
                wanted: dict[Bucket, list[str]] = {}
                for rollup in rollups:
                    for bucket in B.within(rollup, self.start, self.end):
                        steps = pending_steps(conn, bucket, self.force)
                        if steps:
                            wanted[bucket] = steps
                        else:
                            self.report.skipped += 1
                            self.report.done += 1
                sent = {}
                for bucket in sorted(wanted, key=lambda b: (b.end, _RANK[b.rollup])):
                    sent[bucket] = app.send_task("tally.backfill_bucket", args=[bucket.rollup, bucket.label],
                                                 kwargs={"force": self.force})
                    self.report.queued += 1
                self.on_update(self.report)
                self._wait(conn, rollups, wanted, sent, marker, poll)
        self.report.finished = time.monotonic()
        return self.report

    def _wait(self, conn, rollups: list[str], wanted: dict[Bucket, list[str]], sent: dict, marker: int,
              poll: float) -> None:
        """Until every wanted step has an attempt after ``marker`` that is no longer running
        (or its task failed for good before it could write one)."""
        waiting = dict(wanted)
        rows_before = self.report.rows
        polls = 0
        while waiting:
            polls += 1
            if self._stop:
                self.report.stopped = True
                return
            reap_abandoned(conn)
            latest = {(r, s, t): (status, written, error) for r, s, t, status, written, error in conn.execute(
                query("ops_attempts_since"), dict(marker=marker, rollups=rollups, start=self.start, end=self.end))}
            self.report.rows = rows_before + sum(w or 0 for _, w, _ in latest.values())
            for bucket in list(waiting):
                seen = [latest.get((bucket.rollup, s, bucket.start)) for s in waiting[bucket]]
                if all(st is not None and st[0] != RUNNING for st in seen):
                    self.report.failed += [(str(bucket), step, st[2] or "")
                                           for step, st in zip(waiting[bucket], seen) if st[0] == "failed"]
                    self.report.steps += len(seen)
                    self.report.ran += 1
                    self.report.done += 1
                    del waiting[bucket]
                # every 20 polls (~10 s), ask the result backend for tasks that died without a ledger row
                elif polls % 20 == 0 and (lost := _final_failure(sent.get(bucket))) is not None:
                    self.report.failed.append((str(bucket), "(task)", lost))
                    self.report.done += 1
                    del waiting[bucket]
            self.report.current = (f"waiting for the workers (`tally worker`): {len(waiting)} bucket(s)"
                                   if waiting else "")
            self.on_update(self.report)
            if waiting:
                time.sleep(poll)


def _final_failure(result) -> str | None:
    """The error of a task that failed for good (no result backend: unknown, None)."""
    try:
        if result is not None and result.state in ("FAILURE", "REVOKED"):
            return f"task {result.id} {result.state.lower()}: {result.result!r}"
    except Exception:  # no result backend, or it is unreachable: the ledger alone decides
        return None
    return None


def retry_failed(url: str, since: dt.datetime | None = None,
                 on_update: Callable[[Report], None] | None = None) -> tuple[Report, list[RollupResult]]:
    """Re-run every step whose latest attempt failed (trigger ``retry``), hours first."""
    on_update = on_update or (lambda report: None)
    report = Report()
    results: list[RollupResult] = []

    def on_step(bucket: Bucket, sr: StepResult) -> None:
        report.record(bucket, sr)
        on_update(report)

    with connect(url, autocommit=True) as conn, Runner(url, trigger="retry", on_step=on_step) as runner:
        reap_abandoned(conn)
        todo = failed_steps(conn, since)
        report.total = len(todo)
        for bucket, steps in todo.items():
            report.current = str(bucket)
            on_update(report)
            # an earlier retry in this loop (a period preparing its hours) may have fixed it already
            steps = [s for s in steps if s in pending_steps(conn, bucket)]
            if steps:
                results.append(runner.run(bucket, steps))
                report.ran += 1
            else:
                report.skipped += 1
            report.done += 1
            on_update(report)
    report.finished = time.monotonic()
    return report, results


# ---- on a terminal ----------------------------------------------------------------------------

class _Rates(ProgressColumn):
    """Output rows and buckets per second since the start."""

    def render(self, task) -> Text:
        report: Report | None = task.fields.get("report")
        if report is None or report.seconds <= 0:
            return Text("")
        return Text(f"{report.rows / report.seconds:,.0f} rows/s · {report.ran / report.seconds:.1f} buckets/s",
                    style="progress.data.speed")


class ProgressView:
    """A Rich progress bar fed with :class:`Report` updates: buckets done, rates, ETA."""

    def __init__(self, console: Console, title: str):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("buckets"), _Rates(), TimeRemainingColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)
        self.task = self.progress.add_task(title, total=None, report=None)

    def __enter__(self) -> "ProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, report: Report) -> None:
        self.progress.update(self.task, total=report.total or None, completed=report.done, report=report,
                             description=report.current or "")


@contextlib.contextmanager
def stop_on_signals(job: Backfill, console: Console) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) once: stop after the current step. Ctrl-C twice: stop now (rolled back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame) -> None:
        job.stop()
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


def print_report(console: Console, report: Report, what: str) -> None:
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
        console.print(f"  [bold red]failed[/] {bucket} {step}: {first_line(error)}")
    if len(report.failed) > 20:
        console.print(f"  … and {len(report.failed) - 20} more: `tally runs --failed`")
    if report.failed:
        console.print("  re-run them with `tally retry-failed`")
    if report.stopped and report.queued:
        console.print("[yellow]stopped waiting[/]: the tasks sent stay queued; run the same command again "
                      "to send the rest")
    elif report.stopped:
        console.print("[yellow]stopped[/]: what finished is committed; run the same command again to continue")
