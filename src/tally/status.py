"""The status grid: the state of every step of every bucket over a range.

It only reads: the states come from tally/state.py (stored once, decided once), after
dead runs are reaped. Rendering it on a terminal is tally/terminal.py's business.
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

import psycopg

from . import state as S
from .state import State


@dataclass
class Grid:
    """The states of every rollup's buckets over one range."""

    start: dt.datetime
    end: dt.datetime
    states: dict[str, dict]  # rollup -> {Bucket: BucketState}, in order

    def summary(self) -> Counter:
        return Counter(st.state.value for rows in self.states.values() for bs in rows.values()
                       for st in bs.steps.values())

    def as_dict(self) -> dict:
        summary = self.summary()
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "buckets": [
                {"rollup": b.rollup, "bucket": b.label, "start": b.start.isoformat(), "end": b.end.isoformat(),
                 "steps": {s: st.state.value for s, st in bs.steps.items()}}
                for rows in self.states.values() for b, bs in rows.items()
            ],
            "summary": {s.value: summary[s.value] for s in State},
        }


def grid(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime, rollups: list[str]) -> Grid:
    """Reap dead runs, then the state of every step of every whole bucket in [start, end)."""
    S.reap(conn)
    return Grid(start, end, {r: S.read_range(conn, r, start, end) for r in rollups})

