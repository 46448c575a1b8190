"""Bucket arithmetic: every bucket is a half-open UTC interval [start, end).

A :class:`Grain` is one kind of bucket — hour, day, ISO week, calendar month —
and knows how to floor a time to its bucket, step to the next one, parse what a
user typed, label a bucket, and which column names it in its output table. A
rollup works on one grain (``hourly`` on hours, ``daily`` on UTC days, …); the
rollup names are SPEC's, the grain is what code asks.

A new grain (a day in a workspace's own time zone, say) is one more subclass:
``floor`` and ``advance`` in its zone, ``parse`` and ``label`` for its text.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Iterator

from .errors import InvalidInput

UTC = dt.timezone.utc
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class Grain:
    """One kind of bucket. Subclasses define ``floor``, ``_next``, ``parse`` and ``label``."""

    rollup: str  # the rollup that works on this grain (SPEC's name)
    name: str  # hour | day | week | month
    column: str  # the bucket column of the rollup's output table
    unit: str  # the date_trunc field of this grain (SQL)
    parts: "Grain | None" = None  # the finer grain this one is built from (None: read from the source)

    def floor(self, t: dt.datetime) -> dt.datetime:
        """Start of the bucket that contains ``t``."""
        raise NotImplementedError

    def _next(self, start: dt.datetime) -> dt.datetime:
        raise NotImplementedError

    def parse(self, text: str) -> dt.datetime:
        """The start of the bucket a user named (one-line InvalidInput otherwise)."""
        raise NotImplementedError

    def label(self, start: dt.datetime) -> str:
        """How a bucket is written for people and in ``--json`` (it parses back)."""
        raise NotImplementedError

    def advance(self, start: dt.datetime) -> dt.datetime:
        """Start of the bucket after the one starting at ``start``."""
        try:
            return self._next(start)
        except (OverflowError, ValueError):  # past 9999-12-31: Python's datetime ends there
            raise InvalidInput(f"the {self.name} after {start.isoformat()} is out of range") from None

    def bucket(self, t: dt.datetime) -> "Bucket":
        """The bucket that contains ``t``."""
        start = self.floor(t)
        return Bucket(self.rollup, start, self.advance(start))

    def __repr__(self) -> str:
        return f"<grain {self.name}>"


class _Hour(Grain):
    rollup, name, column, unit = "hourly", "hour", "hour", "hour"

    def floor(self, t):
        return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    def _next(self, start):
        return start + dt.timedelta(hours=1)

    def parse(self, text):
        return parse_time(text, "hour")

    def label(self, start):
        return f"{start.year:04d}-{start:%m-%dT%H}:00Z"  # %Y drops the padding before 1000


def _midnight(t: dt.datetime) -> dt.datetime:
    return t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class _Day(Grain):
    rollup, name, column, unit = "daily", "day", "date", "day"

    def floor(self, t):
        return _midnight(t)

    def _next(self, start):
        return start + dt.timedelta(days=1)

    def parse(self, text):
        return parse_date(text)

    def label(self, start):
        return start.date().isoformat()


class _Week(Grain):
    rollup, name, column, unit = "weekly", "week", "week_start", "week"

    def floor(self, t):
        day = _midnight(t)
        return day - dt.timedelta(days=day.weekday())

    def _next(self, start):
        return start + dt.timedelta(days=7)

    def parse(self, text):
        start = parse_date(text, "week")
        if start.weekday() != 0:
            monday = start - dt.timedelta(days=start.weekday())
            raise InvalidInput(f"invalid week {text!r}: not a Monday (that ISO week starts {monday.date()})")
        return start

    def label(self, start):
        return start.date().isoformat()


class _Month(Grain):
    rollup, name, column, unit = "monthly", "month", "month", "month"

    def floor(self, t):
        return _midnight(t).replace(day=1)

    def _next(self, start):
        return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)

    def parse(self, text):
        m = _MONTH.match(text.strip())
        if not m:
            raise InvalidInput(f"invalid month {text!r}: expected YYYY-MM")
        year, month = int(m.group(1)), int(m.group(2))
        if not (1 <= month <= 12) or year < 1:
            raise InvalidInput(f"invalid month {text!r}: no such month")
        return dt.datetime(year, month, 1, tzinfo=UTC)

    def label(self, start):
        return f"{start.year:04d}-{start:%m}"


HOUR, DAY, WEEK, MONTH = _Hour(), _Day(), _Week(), _Month()
for _g in (DAY, WEEK, MONTH):
    _g.parts = HOUR  # days, weeks and months are built from hourly rows, never from the source
GRAINS: dict[str, Grain] = {g.rollup: g for g in (HOUR, DAY, WEEK, MONTH)}
ROLLUPS = tuple(GRAINS)  # hourly, daily, weekly, monthly: finest first
KIND = {r: g.name for r, g in GRAINS.items()}


def grain(rollup: str) -> Grain:
    """The grain of ``rollup``; an unknown rollup is invalid input (one line)."""
    try:
        return GRAINS[rollup]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown rollup {rollup!r} (expected one of {', '.join(ROLLUPS)})") from None


@dataclass(frozen=True, order=True)
class Bucket:
    """One bucket of one rollup."""

    rollup: str
    start: dt.datetime
    end: dt.datetime

    @property
    def grain(self) -> Grain:
        return GRAINS[self.rollup]

    @property
    def kind(self) -> str:
        return self.grain.name

    @property
    def label(self) -> str:
        return self.grain.label(self.start)

    def __str__(self) -> str:
        return f"{self.rollup} {self.label}"


def floor(rollup: str, t: dt.datetime) -> dt.datetime:
    """Start of the bucket of ``rollup`` that contains ``t``."""
    return grain(rollup).floor(t)


def advance(rollup: str, start: dt.datetime) -> dt.datetime:
    """Start of the bucket after the one starting at ``start``."""
    return grain(rollup).advance(start)


def bucket(rollup: str, start: dt.datetime) -> Bucket:
    """The bucket of ``rollup`` that contains ``start``."""
    return grain(rollup).bucket(start)


def last_complete(rollup: str, now: dt.datetime | None = None) -> Bucket:
    """The newest bucket of ``rollup`` that has ended by ``now``."""
    g = grain(rollup)
    now = now or dt.datetime.now(UTC)
    return g.bucket(g.floor(now) - dt.timedelta(microseconds=1))


def within(rollup: str, start: dt.datetime, end: dt.datetime) -> Iterator[Bucket]:
    """Every bucket of ``rollup`` lying wholly inside [start, end)."""
    g = grain(rollup)
    s = g.floor(start)
    if s < start:
        s = g.advance(s)
    while True:
        e = g.advance(s)
        if e > end:
            return
        yield Bucket(rollup, s, e)
        s = e


def touching(rollup: str, start: dt.datetime, end: dt.datetime) -> Iterator[Bucket]:
    """Every bucket of ``rollup`` that overlaps [start, end)."""
    g = grain(rollup)
    s = g.floor(start)
    while s < end:
        e = g.advance(s)
        yield Bucket(rollup, s, e)
        s = e


def hours_of(b: Bucket) -> list[dt.datetime]:
    """The start of every hour inside ``b``."""
    return [b.start + dt.timedelta(hours=i) for i in range(int((b.end - b.start).total_seconds()) // 3600)]


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
    return WEEK.parse(text)


def parse_month(text: str) -> dt.datetime:
    return MONTH.parse(text)


def parse_bucket(rollup: str, text: str | None, now: dt.datetime | None = None) -> Bucket:
    """The bucket a user named for ``rollup`` (default: the last complete one)."""
    g = grain(rollup)
    if text is None:
        return last_complete(rollup, now)
    return g.bucket(g.parse(text))


def as_bucket(rollup: str, value) -> Bucket:
    """A bucket from a Bucket, ISO text, a datetime or a date that starts one (Python API input)."""
    g = grain(rollup)
    if isinstance(value, Bucket):
        return value
    if isinstance(value, str):
        return parse_bucket(rollup, value)
    if isinstance(value, dt.datetime):
        v = value if value.tzinfo else value.replace(tzinfo=UTC)
        b = g.bucket(v)
        if b.start != v.astimezone(UTC):
            raise InvalidInput(f"invalid {g.name} {value.isoformat()!r}: not the start of a {g.name}")
        return b
    if isinstance(value, dt.date):
        return as_bucket(rollup, dt.datetime(value.year, value.month, value.day, tzinfo=UTC))
    raise InvalidInput(f"invalid {g.name} {value!r}")


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
        grain(n)
    return [r for r in ROLLUPS if r in names]
