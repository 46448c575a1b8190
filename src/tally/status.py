"""The status grid: the state of every step of every bucket over a range.

It only reads: the states come from tally/state.py (stored once, decided once), after
dead runs are reaped. Rendering it on a terminal is tally/terminal.py's business.
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

import psycopg

from . import buckets as B
from . import state as S
from .state import State

Range = tuple[dt.datetime, dt.datetime]


@dataclass
class Grid:
    """The states of every rollup's buckets, each rollup over its own range."""

    ranges: dict[str, Range]  # rollup -> [start, end)
    now: dt.datetime
    states: dict[str, dict]  # rollup -> {Bucket: BucketState}, in order
    ignored: int = 0  # changes to sealed history ignored, all told

    @property
    def start(self) -> dt.datetime:
        return min(s for s, _ in self.ranges.values())

    @property
    def end(self) -> dt.datetime:
        return max(e for _, e in self.ranges.values())

    def is_open(self, bucket: B.Bucket) -> bool:
        """The bucket has not ended yet: nothing is due for it (its state may say missing)."""
        return bucket.end > self.now

    def summary(self) -> Counter:
        return Counter(st.state.value for rows in self.states.values() for bs in rows.values()
                       for st in bs.steps.values())

    def as_dict(self) -> dict:
        summary = self.summary()
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "ranges": {r: {"from": s.isoformat(), "to": e.isoformat()} for r, (s, e) in self.ranges.items()},
            "buckets": [
                {"rollup": b.rollup, "bucket": b.label, "start": b.start.isoformat(), "end": b.end.isoformat(),
                 "open": self.is_open(b), "steps": {s: st.state.value for s, st in bs.steps.items()}}
                for rows in self.states.values() for b, bs in rows.items()
            ],
            "summary": {s.value: summary[s.value] for s in State},
            "changes_ignored_for_sealed": self.ignored,
        }


def default_ranges(rollups: list[str], now: dt.datetime, days: int) -> dict[str, Range]:
    """What ``tally status`` shows without --from/--to: for each rollup, the last ``days`` days
    (the catch-up window) and at least its previous and its current bucket, up to the end of
    the current one."""
    today = B.DAY.floor(now)
    year_one = dt.datetime(1, 1, 1, tzinfo=B.UTC)
    window = today - dt.timedelta(days=min(days, (today - year_one).days))
    ranges = {}
    for rollup in rollups:
        g = B.grain(rollup)
        current = g.bucket(now)
        previous = g.bucket(current.start - dt.timedelta(microseconds=1)) if current.start > year_one else current
        ranges[rollup] = (min(previous.start, window), current.end)
    return ranges


def grid(conn: psycopg.Connection, ranges: dict[str, Range], now: dt.datetime | None = None) -> Grid:
    """Reap dead runs, then the state of every step of every whole bucket of each rollup's range."""
    S.reap(conn)
    now = now or dt.datetime.now(B.UTC)
    return Grid(ranges, now, {r: S.read(conn, r, B.within(r, start, end), now) for r, (start, end) in ranges.items()},
                S.ignored_total(conn))
