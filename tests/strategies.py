"""Hypothesis strategies for ugly source data, and helpers to insert it.

Everything is generated inside a small window ``[base, base + hours h]`` (plus
a few rows one microsecond before ``base`` / exactly at the window's end) so
that hour boundaries matter.  ``base`` must be a timezone-aware UTC datetime,
normally on the hour.

The insert helpers do not commit; the caller owns the transaction.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from decimal import Decimal

from hypothesis import strategies as st
from psycopg.types.json import Jsonb

MICROSECOND = timedelta(microseconds=1)
HOUR = timedelta(hours=1)

# --- identifiers -----------------------------------------------------------
# Small alphabets so that groups collide; '' is a real (non-NULL) id that
# lands in the same output group as NULL; 'W1' and 'w1 ' are *different* ids.
WORKSPACE_IDS = ["w1", "w2", None, "w3", "", "W1", "w1 ", "wé", "工作区"]
USER_IDS = ["u1", "u2", None, "u3", "", "ü1", "用户"]
AGENT_IDS = ["a1", "a2", None, "a3", "", "agent-ß", "🤖"]
EVENT_USER_IDS = ["u1", "u2", "u3", "", "ü1", "用户"]  # user_id is NOT NULL
SESSION_IDS = ["s1", "s2", None, "s3", "", "sé"]

# --- statuses ----------------------------------------------------------------
# Every success and failure spelling in several cases, plus statuses that
# count in totals only.  Near misses ('complete', 'timed out', 'completed ')
# are *other* under SPEC (case-insensitive equality, no trimming).  No
# status contains characters whose lower-casing is collation dependent
# (e.g. 'İ', KELVIN SIGN), so PostgreSQL's lower() and Python agree.
STATUSES = [
    "completed", "failed", "running",
    "success", "succeeded", "failure", "error", "timeout", "timed_out",
    "COMPLETED", "Completed", "SUCCESS", "Succeeded", "FAILED", "Failure",
    "ERROR", "Error", "TIMEOUT", "TimeOut", "TIMED_OUT", "Timed_Out",
    "pending", "queued", "cancelled", "canceled", "RUNNING", "other", "",
    "complete", "timed out", "completed ", " failed", "échec", "完成",
]

EVENT_TYPES = ["page_view", "click", "api_call", "login", "Page_View", "page_view ", "logout", "ération"]


def _safe_text(max_size: int = 8) -> st.SearchStrategy[str]:
    """Text PostgreSQL accepts in text and jsonb: no NUL, no surrogates."""
    return st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=max_size,
    )


def metadata_values() -> st.SearchStrategy[dict | None]:
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**53), max_value=2**53),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        _safe_text(),
    )
    return st.one_of(
        st.none(),
        st.dictionaries(_safe_text(6), scalar, max_size=3),
    )


def _times(base: datetime, hours: int) -> st.SearchStrategy[datetime]:
    """A time in or right at the edge of [base, base + hours h]."""
    boundaries = [base + k * HOUR for k in range(hours + 1)]
    window_us = hours * 3600 * 1_000_000
    return st.one_of(
        st.sampled_from(boundaries),                                 # exactly on the hour
        st.sampled_from([b - MICROSECOND for b in boundaries]),      # hour end - 1us
        st.sampled_from([b + MICROSECOND for b in boundaries[:-1]]),
        st.integers(min_value=0, max_value=window_us - 1).map(
            lambda us: base + timedelta(microseconds=us)
        ),
    )


def durations() -> st.SearchStrategy[float | None]:
    heavy_tailed = st.floats(min_value=-6.0, max_value=math.log10(3600)).map(lambda e: 10.0**e)
    return st.one_of(
        heavy_tailed,
        st.none(),
        st.sampled_from([0.0, 1e-6, 0.5, 1.0, 1.0, 2.5, 30.0, 3600.0]),  # ties matter for percentiles
        st.floats(min_value=0.0, max_value=3600.0),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, -1e-9, 1e9]),
        st.floats(max_value=-1e-12, allow_infinity=False, allow_nan=False),
    )


def credits() -> st.SearchStrategy[Decimal | None]:
    return st.one_of(
        st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False),
        st.none(),
        st.sampled_from([Decimal("0"), Decimal("0.0000"), Decimal("0.0001"), Decimal("1.5"),
                         Decimal("99999999999.9999")]),
    )


@st.composite
def execution_rows(draw, base: datetime, hours: int = 3, max_size: int = 40) -> list[dict]:
    """Rows for public.execution_logs (without id / created_at)."""
    count = draw(st.integers(min_value=0, max_value=max_size))
    id_suffixes = st.sampled_from(["", "-é", " ", "-x"])
    rows = []
    for index in range(count):
        started_at = draw(_times(base, hours))
        completed_at = draw(st.one_of(
            st.none(),
            st.integers(min_value=0, max_value=3 * 3600 * 1_000_000).map(
                lambda us, s=started_at: s + timedelta(microseconds=us)
            ),
        ))
        rows.append({
            "execution_id": f"exec-{index:05d}{draw(id_suffixes)}",
            "workspace_id": draw(st.sampled_from(WORKSPACE_IDS)),
            "user_id": draw(st.sampled_from(USER_IDS)),
            "agent_id": draw(st.sampled_from(AGENT_IDS)),
            "status": draw(st.sampled_from(STATUSES)),
            "started_at": started_at,
            "completed_at": completed_at,
            "duration": draw(durations()),
            "credits_used": draw(credits()),
            "metadata": draw(metadata_values()),
        })
    return rows


@st.composite
def activity_events(draw, base: datetime, hours: int = 3, max_sessions: int = 6,
                    max_stray: int = 10) -> list[dict]:
    """Rows for analytics.user_activity (without id).

    Sessions start within half an hour of an hour boundary and last up to two
    hours, so many cross a boundary.  The same session_id may be reused by
    another user or workspace, and there are stray events without a session.
    """
    window_start = base - MICROSECOND
    window_end = base + hours * HOUR
    boundaries = [base + k * HOUR for k in range(hours + 1)]

    def event(workspace_id, user_id, session_id, created_at):
        return {
            "workspace_id": workspace_id,
            "user_id": user_id,
            "session_id": session_id,
            "event_type": draw(st.sampled_from(EVENT_TYPES)),
            "event_name": draw(st.one_of(st.none(), _safe_text(10))),
            "page_path": draw(st.one_of(st.none(), st.sampled_from(["/", "/agents", "/billing?x=1", "/é"]))),
            "metadata": draw(metadata_values()),
            "created_at": min(max(created_at, window_start), window_end),
        }

    events = []
    for _ in range(draw(st.integers(min_value=0, max_value=max_sessions))):
        workspace_id = draw(st.sampled_from(WORKSPACE_IDS))
        user_id = draw(st.sampled_from(EVENT_USER_IDS))
        session_id = draw(st.sampled_from(SESSION_IDS))
        start = draw(st.sampled_from(boundaries)) + timedelta(
            microseconds=draw(st.integers(min_value=-1800 * 10**6, max_value=1800 * 10**6))
        )
        offsets = draw(st.lists(
            st.one_of(
                st.just(0),  # duplicate timestamps
                st.integers(min_value=0, max_value=2 * 3600 * 10**6),
            ),
            min_size=1, max_size=6,
        ))
        for offset in offsets:
            events.append(event(workspace_id, user_id, session_id,
                                start + timedelta(microseconds=offset)))

    for _ in range(draw(st.integers(min_value=0, max_value=max_stray))):
        events.append(event(
            draw(st.sampled_from(WORKSPACE_IDS)),
            draw(st.sampled_from(EVENT_USER_IDS)),
            draw(st.sampled_from(SESSION_IDS)),
            draw(_times(base, hours)),
        ))
    return events


# ---------------------------------------------------------------------------
# inserting into PostgreSQL (psycopg 3); the caller commits
# ---------------------------------------------------------------------------

_EXECUTION_COLUMNS = (
    "execution_id", "workspace_id", "user_id", "agent_id", "status",
    "started_at", "completed_at", "duration", "credits_used", "metadata",
)
_EVENT_COLUMNS = (
    "workspace_id", "user_id", "session_id", "event_type", "event_name",
    "page_path", "metadata", "created_at",
)


def _jsonb(value):
    return None if value is None else Jsonb(value)


def _insert(conn, table: str, columns: tuple[str, ...], rows: list[dict]) -> None:
    if not rows:
        return
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )
    params = [
        tuple(_jsonb(row.get(c)) if c == "metadata" else row.get(c) for c in columns)
        for row in rows
    ]
    with conn.cursor() as cur:
        cur.executemany(sql, params)


def insert_executions(conn, rows: list[dict]) -> None:
    """INSERT rows into public.execution_logs (created_at takes its default
    unless a row carries one)."""
    columns = _EXECUTION_COLUMNS + (("created_at",) if any("created_at" in r for r in rows) else ())
    if "created_at" in columns:
        # rows without created_at would otherwise get NULL, not now()
        missing = [r for r in rows if "created_at" not in r]
        _insert(conn, "public.execution_logs", _EXECUTION_COLUMNS, missing)
        rows = [r for r in rows if "created_at" in r]
    _insert(conn, "public.execution_logs", columns, rows)


def insert_events(conn, rows: list[dict]) -> None:
    """INSERT rows into analytics.user_activity."""
    _insert(conn, "analytics.user_activity", _EVENT_COLUMNS, rows)
