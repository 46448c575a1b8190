"""``/metrics``: tally's health in Prometheus' exposition format, computed at scrape time.

Every number comes from the stored state (tally/state.py, through :func:`views.health`), the
ledger and the change log, read when Prometheus asks: nothing is counted in this process, so
any number of workers and console processes agree, and a restart loses nothing. A scrape is
a handful of indexed queries (bench/console_metrics.py measures it).

Metric names are a public interface (docs/CONSOLE.md lists them, with alert rules).
"""
from __future__ import annotations

import contextlib
import math
import time

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..state import State
from . import views

STEP = ["rollup", "step"]


def families(health: views.Health, seconds: float | None = None) -> list[GaugeMetricFamily]:
    """The metric families of one health reading."""
    fresh = GaugeMetricFamily(
        "tally_freshness_seconds",
        "Seconds since the end of the newest bucket whose step is ok or sealed (+Inf: none ever was)", labels=STEP)
    fresh_end = GaugeMetricFamily(
        "tally_fresh_bucket_end_timestamp_seconds",
        "End (Unix time) of the newest bucket whose step is ok or sealed", labels=STEP)
    window = GaugeMetricFamily(
        "tally_window_buckets",
        "Buckets inside the catch-up window (TALLY_CATCHUP_DAYS) per state of the step", labels=STEP + ["state"])
    failing = GaugeMetricFamily(
        "tally_failing_buckets", "Buckets whose latest attempt of the step failed, at any age", labels=STEP)
    running = GaugeMetricFamily(
        "tally_running_buckets", "Buckets whose step an attempt is running now, at any age", labels=STEP)
    last_seconds = GaugeMetricFamily(
        "tally_last_attempt_duration_seconds", "Duration of the step's newest concluded attempt", labels=STEP)
    last_ok = GaugeMetricFamily(
        "tally_last_attempt_succeeded", "1 if the step's newest concluded attempt succeeded, else 0", labels=STEP)
    last_time = GaugeMetricFamily(
        "tally_last_attempt_timestamp_seconds", "When (Unix time) the step's newest concluded attempt ended",
        labels=STEP)
    success_rows = GaugeMetricFamily(
        "tally_last_success_rows", "Rows written by the step's newest successful attempt", labels=STEP)
    success_seconds = GaugeMetricFamily(
        "tally_last_success_duration_seconds", "Duration of the step's newest successful attempt", labels=STEP)
    day_attempts = GaugeMetricFamily(
        "tally_attempts_24h", "Attempts of the step started in the last 24 hours, per ledger status",
        labels=STEP + ["status"])
    day_rows = GaugeMetricFamily(
        "tally_rows_written_24h", "Rows written by the step's attempts started in the last 24 hours", labels=STEP)
    day_seconds = GaugeMetricFamily(
        "tally_attempt_seconds_24h", "Seconds spent in the step's attempts started in the last 24 hours",
        labels=STEP)
    sealed = GaugeMetricFamily("tally_sealed_buckets", "Sealed buckets of the step (final history)", labels=STEP)
    ignored = GaugeMetricFamily(
        "tally_sealed_ignored_changes", "Source row changes ignored because their bucket of the step is sealed",
        labels=STEP)
    for h in health.steps:
        key = [h.rollup, h.step]
        fresh.add_metric(key, h.age if h.age is not None else math.inf)
        if h.fresh is not None:
            fresh_end.add_metric(key, h.fresh.end.timestamp())
        for state in State:
            window.add_metric(key + [state.value], h.window[state.value])
        failing.add_metric(key, len(h.failing))
        running.add_metric(key, len(h.running))
        if h.last is not None:
            last_seconds.add_metric(key, h.last["seconds"] or 0.0)
            last_ok.add_metric(key, 1.0 if h.last["status"] == "succeeded" else 0.0)
            last_time.add_metric(key, h.last["finished_at"].timestamp())
        if h.last_ok is not None:
            success_rows.add_metric(key, h.last_ok["rows"] or 0)
            success_seconds.add_metric(key, h.last_ok["seconds"] or 0.0)
        for status, n in h.day["attempts"].items():
            day_attempts.add_metric(key + [status], n)
        day_rows.add_metric(key, h.day["rows"])
        day_seconds.add_metric(key, h.day["seconds"])
        sealed.add_metric(key, h.sealed)
        ignored.add_metric(key, h.ignored)
    marks = GaugeMetricFamily("tally_dirty_log_marks", "Change marks not yet read (analytics.dirty_log), per source",
                              labels=["source"])
    unclaimed = GaugeMetricFamily("tally_dirty_log_unclaimed_marks",
                                  "Change marks that no run has claimed yet, per source", labels=["source"])
    for b in health.backlog:
        marks.add_metric([b["source"]], b["marks"])
        unclaimed.add_metric([b["source"]], b["unclaimed"])
    for source in ("execution_logs", "user_activity"):  # a series that exists at 0, for rate() and alerts
        if source not in {b["source"] for b in health.backlog}:
            marks.add_metric([source], 0)
            unclaimed.add_metric([source], 0)
    oldest = health.oldest_mark
    backlog_age = GaugeMetricFamily("tally_dirty_log_oldest_mark_age_seconds",
                                    "Age of the oldest change mark not yet read (0: none)",
                                    value=(health.now - oldest).total_seconds() if oldest else 0.0)
    window_days = GaugeMetricFamily("tally_catchup_window_seconds", "Length of the catch-up window",
                                    value=(health.window.end - health.window.start).total_seconds())
    out = [fresh, fresh_end, window, failing, running, last_seconds, last_ok, last_time, success_rows,
           success_seconds, day_attempts, day_rows, day_seconds, sealed, ignored, marks, unclaimed, backlog_age,
           window_days]
    if seconds is not None:
        out.append(GaugeMetricFamily("tally_scrape_duration_seconds",
                                     "Seconds this scrape took to read the state", value=seconds))
    return out


class StateCollector(Collector):
    """Reads the state on every collect(): a connection from ``connect`` (a context manager)."""

    def __init__(self, connect):
        self.connect = connect

    def collect(self):
        t0 = time.perf_counter()
        with self.connect() as conn:
            health = views.health(conn)
        yield from families(health, time.perf_counter() - t0)


def render(connect) -> bytes:
    """One scrape: the exposition text of tally's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(connect))
    return generate_latest(registry)


def scrape(conn: psycopg.Connection) -> bytes:
    """One scrape on an open connection (the benchmark's entry point)."""
    return render(lambda: contextlib.nullcontext(conn))
