"""Bucket arithmetic: every bucket is a half-open UTC interval [start, end).

A rollup works on one kind of bucket: hourly on hours, daily on UTC days,
weekly on ISO weeks (Monday 00:00), monthly on calendar months.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Iterator

from .errors import InvalidInput

UTC = dt.timezone.utc
ROLLUPS = ("hourly", "daily", "weekly", "monthly")
KIND = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass(frozen=True, order=True)
class Bucket:
    """One bucket of one rollup."""

    rollup: str
    start: dt.datetime
    end: dt.datetime

    @property
    def kind(self) -> str:
        return KIND[self.rollup]

    @property
    def label(self) -> str:
        if self.rollup == "hourly":
            return f"{self.start.year:04d}-{self.start:%m-%dT%H}:00Z"  # %Y drops the padding before 1000
        if self.rollup == "monthly":
            return f"{self.start.year:04d}-{self.start:%m}"
        return self.start.date().isoformat()

    def __str__(self) -> str:
        return f"{self.rollup} {self.label}"


def floor(rollup: str, t: dt.datetime) -> dt.datetime:
    """Start of the bucket of ``rollup`` that contains ``t``."""
    t = t.astimezone(UTC)
    if rollup == "hourly":
        return t.replace(minute=0, second=0, microsecond=0)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if rollup == "daily":
        return day
    if rollup == "weekly":
        return day - dt.timedelta(days=day.weekday())
    if rollup == "monthly":
        return day.replace(day=1)
    raise InvalidInput(f"unknown rollup {rollup!r} (expected one of {', '.join(ROLLUPS)})")


def advance(rollup: str, start: dt.datetime) -> dt.datetime:
    """Start of the bucket after the one starting at ``start``."""
    try:
        return _advance(rollup, start)
    except (OverflowError, ValueError) as exc:  # past 9999-12-31: Python's datetime ends there
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"the {KIND.get(rollup, rollup)} after {start.isoformat()} is out of range") from None


def _advance(rollup: str, start: dt.datetime) -> dt.datetime:
    if rollup == "hourly":
        return start + dt.timedelta(hours=1)
    if rollup == "daily":
        return start + dt.timedelta(days=1)
    if rollup == "weekly":
        return start + dt.timedelta(days=7)
    if rollup == "monthly":
        return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    raise InvalidInput(f"unknown rollup {rollup!r} (expected one of {', '.join(ROLLUPS)})")


def bucket(rollup: str, start: dt.datetime) -> Bucket:
    start = floor(rollup, start)
    return Bucket(rollup, start, advance(rollup, start))


def containing(rollup: str, t: dt.datetime) -> Bucket:
    return bucket(rollup, t)


def last_complete(rollup: str, now: dt.datetime | None = None) -> Bucket:
    """The newest bucket of ``rollup`` that has ended by ``now``."""
    now = now or dt.datetime.now(UTC)
    current = floor(rollup, now)
    previous = floor(rollup, current - dt.timedelta(microseconds=1))
    return bucket(rollup, previous)


def within(rollup: str, start: dt.datetime, end: dt.datetime) -> Iterator[Bucket]:
    """Every bucket of ``rollup`` lying wholly inside [start, end)."""
    s = floor(rollup, start)
    if s < start:
        s = advance(rollup, s)
    while True:
        e = advance(rollup, s)
        if e > end:
            return
        yield Bucket(rollup, s, e)
        s = e


def touching(rollup: str, start: dt.datetime, end: dt.datetime) -> Iterator[Bucket]:
    """Every bucket of ``rollup`` that overlaps [start, end)."""
    s = floor(rollup, start)
    while s < end:
        e = advance(rollup, s)
        yield Bucket(rollup, s, e)
        s = e


# ---- parsing user input: one-line errors naming the value --------------------------

def parse_time(text: str, what: str = "time") -> dt.datetime:
    """An ISO 8601 instant on the hour; no offset means UTC."""
    raw = text.strip()
    try:
        value = dt.datetime.fromisoformat(raw.replace("z", "Z"))
    except (ValueError, TypeError):
        raise InvalidInput(f"invalid {what} {text!r}: expected ISO 8601 like 2026-11-25T14:00Z") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInput(f"invalid {what} {text!r}: out of range") from None
    if value.minute or value.second or value.microsecond:
        raise InvalidInput(f"invalid {what} {text!r}: not on the hour (use {value.year:04d}-{value:%m-%dT%H}:00Z)")
    if not (1 <= value.year <= 9998):
        raise InvalidInput(f"invalid {what} {text!r}: year out of range")
    return value


def parse_date(text: str, what: str = "date") -> dt.datetime:
    raw = text.strip()
    if not _DATE.match(raw):
        raise InvalidInput(f"invalid {what} {text!r}: expected YYYY-MM-DD")
    try:
        d = dt.date.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidInput(f"invalid {what} {text!r}: {exc}") from None
    return dt.datetime(d.year, d.month, d.day, tzinfo=UTC)


def parse_week(text: str) -> dt.datetime:
    start = parse_date(text, "week")
    if start.weekday() != 0:
        monday = start - dt.timedelta(days=start.weekday())
        raise InvalidInput(f"invalid week {text!r}: not a Monday (that ISO week starts {monday.date()})")
    return start


def parse_month(text: str) -> dt.datetime:
    m = _MONTH.match(text.strip())
    if not m:
        raise InvalidInput(f"invalid month {text!r}: expected YYYY-MM")
    year, month = int(m.group(1)), int(m.group(2))
    if not (1 <= month <= 12) or year < 1:
        raise InvalidInput(f"invalid month {text!r}: no such month")
    return dt.datetime(year, month, 1, tzinfo=UTC)


def parse_bucket(rollup: str, text: str | None, now: dt.datetime | None = None) -> Bucket:
    """The bucket a user named for ``rollup`` (default: the last complete one)."""
    if rollup not in ROLLUPS:
        raise InvalidInput(f"unknown rollup {rollup!r} (expected one of {', '.join(ROLLUPS)})")
    if text is None:
        return last_complete(rollup, now)
    if rollup == "hourly":
        return bucket(rollup, parse_time(text, "hour"))
    if rollup == "daily":
        return bucket(rollup, parse_date(text))
    if rollup == "weekly":
        return bucket(rollup, parse_week(text))
    return bucket(rollup, parse_month(text))


def parse_range(start: str, end: str, max_days: int | None = None) -> tuple[dt.datetime, dt.datetime]:
    """A half-open range of whole hours; ``--from`` must precede ``--to``."""
    s = parse_time(start, "--from")
    e = parse_time(end, "--to")
    if s >= e:
        raise InvalidInput(f"invalid range: --from {start!r} is not before --to {end!r}")
    if max_days is not None and e - s > dt.timedelta(days=max_days):
        raise InvalidInput(
            f"invalid range {start!r}..{end!r}: longer than {max_days} days (raise TALLY_MAX_RANGE_DAYS to allow it)"
        )
    return s, e


def parse_rollups(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InvalidInput(f"invalid --rollups {text!r}: expected a list like hourly,daily")
    for n in names:
        if n not in ROLLUPS:
            raise InvalidInput(f"unknown rollup {n!r} (expected one of {', '.join(ROLLUPS)})")
    return [r for r in ROLLUPS if r in names]
