"""Independent, brute-force reference implementation of every SPEC statistic.

This module is the oracle the SQL is checked against, so it is deliberately
plain: no SQL, no cleverness, one obvious loop per statistic.  Every function
takes the *source* rows (dicts shaped like the rows of ``public.execution_logs``
and ``analytics.user_activity``) and returns ``{key: {column: value}}``.

Conventions (see SPEC.md in the shared folder):

* buckets are half-open ``[start, end)``; executions are bucketed by
  ``started_at``, events by ``created_at``;
* a missing (None) ``workspace_id`` / ``user_id`` / ``agent_id`` is
  aggregated under ``''``;
* status is matched case-insensitively (ASCII lower-casing, see
  ``_ascii_lower``) against the success / failure spellings; anything else
  counts in totals only;
* a valid duration is not None, finite and >= 0;
* ``credits_used`` None is 0; credits are ``Decimal``.
"""

from __future__ import annotations

import hashlib

import decimal
import math
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Iterable

SUCCESS_STATUSES = frozenset({"completed", "success", "succeeded"})
FAILURE_STATUSES = frozenset({"failed", "failure", "error", "timeout", "timed_out"})

PERCENTILES = {"p50_runtime": 0.50, "p95_runtime": 0.95, "p99_runtime": 0.99}

# Decimal arithmetic with plenty of head-room: sums of numeric(18,4) values
# are exact, averages are correct to ~60 significant digits.
_DECIMAL_CONTEXT = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)

_ASCII_UPPER_TO_LOWER = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _ascii_lower(text: str) -> str:
    """Lower-case A-Z only.

    Python's ``str.lower`` also maps a few non-ASCII characters onto ASCII
    letters (KELVIN SIGN -> 'k', and 'İ' -> 'i' + combining dot), where the
    result of PostgreSQL's ``lower()`` depends on the collation.  For the
    status words of SPEC the only thing that matters is ASCII case folding,
    on which every PostgreSQL collation and Python agree.
    """
    return text.translate(_ASCII_UPPER_TO_LOWER)


def status_class(status: str | None) -> str:
    """'success', 'failure' or 'other'."""
    if status is None:
        return "other"
    lowered = _ascii_lower(status)
    if lowered in SUCCESS_STATUSES:
        return "success"
    if lowered in FAILURE_STATUSES:
        return "failure"
    return "other"


def is_valid_duration(duration: Any) -> bool:
    if duration is None:
        return False
    value = float(duration)
    return math.isfinite(value) and value >= 0


def credits_of(row: dict) -> Decimal:
    """credits_used as a Decimal, NULL -> 0."""
    value = row.get("credits_used")
    if value is None:
        return Decimal(0)
    if isinstance(value, Decimal):
        return value
    return Decimal(str(value))


def key_id(value: str | None) -> str:
    """NULL ids are aggregated under ''; an id over 400 bytes under its first 100 characters,
    '…' and its md5 (migration 0004: a btree key cannot hold it)."""
    if value is None:
        return ""
    if len(value.encode()) <= 400:
        return value
    return value[:100] + "…" + hashlib.md5(value.encode()).hexdigest()


def in_bucket(ts: datetime, start: datetime, end: datetime) -> bool:
    return start <= ts < end


def percentile_cont(sorted_values: list[float], q: float) -> float | None:
    """PostgreSQL's percentile_cont(q) WITHIN GROUP (ORDER BY x).

    r = q * (n - 1); result = lo + (hi - lo) * (r - floor(r)) where lo and hi
    are the floor(r)-th and ceil(r)-th order statistics (0-based).
    """
    n = len(sorted_values)
    if n == 0:
        return None
    r = q * (n - 1)
    lo_index = math.floor(r)
    hi_index = math.ceil(r)
    lo = sorted_values[lo_index]
    hi = sorted_values[hi_index]
    return lo + (hi - lo) * (r - lo_index)


def _divide(numerator: Decimal, denominator: int) -> Decimal:
    return _DECIMAL_CONTEXT.divide(numerator, Decimal(denominator))


def _decimal_sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = _DECIMAL_CONTEXT.add(total, value)
    return total


def _group(rows: Iterable[dict], key_fn) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(key_fn(row), []).append(row)
    return groups


# ---------------------------------------------------------------------------
# execution metrics (hourly and period)
# ---------------------------------------------------------------------------


def _execution_columns(rows: list[dict]) -> dict:
    """Every execution_metrics_* column for one non-empty group of rows."""
    statuses = [status_class(row["status"]) for row in rows]
    durations = sorted(
        float(row.get("duration"))
        for row in rows
        if is_valid_duration(row.get("duration"))
    )
    total_executions = len(rows)
    total_credits = _decimal_sum(credits_of(row) for row in rows)

    columns = {
        "total_executions": total_executions,
        "successful_executions": statuses.count("success"),
        "failed_executions": statuses.count("failure"),
        "avg_runtime": math.fsum(durations) / len(durations) if durations else None,
    }
    for column, q in PERCENTILES.items():
        columns[column] = percentile_cont(durations, q)
    columns["total_credits"] = total_credits
    columns["avg_credits_per_run"] = _divide(total_credits, total_executions)
    columns["runtime_count"] = len(durations)
    columns["runtime_sum"] = math.fsum(durations)
    return columns


def execution_hourly(rows: Iterable[dict], hour_start: datetime) -> dict[str, dict]:
    """analytics.execution_metrics_hourly for the hour starting at hour_start."""
    return execution_period(rows, hour_start, hour_start + timedelta(hours=1))


def execution_period(rows: Iterable[dict], start: datetime, end: datetime) -> dict[str, dict]:
    """Execution columns for an arbitrary half-open bucket [start, end)."""
    selected = [row for row in rows if in_bucket(row["started_at"], start, end)]
    groups = _group(selected, lambda row: key_id(row.get("workspace_id")))
    return {workspace: _execution_columns(group) for workspace, group in groups.items()}


def period_metrics(rows: Iterable[dict], start: datetime, end: datetime) -> dict[str, dict]:
    """execution_metrics_daily / _weekly / _monthly for the period [start, end)."""
    selected = [row for row in rows if in_bucket(row["started_at"], start, end)]
    groups = _group(selected, lambda row: key_id(row.get("workspace_id")))
    result = {}
    for workspace, group in groups.items():
        columns = _execution_columns(group)
        users = {key_id(row.get("user_id")) for row in group} - {""}
        agents = {key_id(row.get("agent_id")) for row in group} - {""}
        columns["unique_users"] = len(users)
        columns["unique_agents"] = len(agents)
        columns["health_score"] = (
            100.0 * columns["successful_executions"] / columns["total_executions"]
        )
        result[workspace] = columns
    return result


# ---------------------------------------------------------------------------
# user activity
# ---------------------------------------------------------------------------


def user_activity_hourly(
    events: Iterable[dict], hour_start: datetime
) -> dict[tuple[str, str], dict]:
    """analytics.user_activity_hourly for the hour starting at hour_start."""
    hour_end = hour_start + timedelta(hours=1)
    selected = [event for event in events if in_bucket(event["created_at"], hour_start, hour_end)]
    groups = _group(
        selected,
        lambda event: (key_id(event.get("workspace_id")), key_id(event.get("user_id"))),
    )
    result = {}
    for key, group in groups.items():
        event_type_counts: dict[str, int] = {}
        for event in group:
            event_type = event["event_type"]
            event_type_counts[event_type] = event_type_counts.get(event_type, 0) + 1

        # only the events of this hour are in `group`, so a session crossing
        # the hour boundary contributes only its in-hour span.
        sessions = _group(
            (event for event in group if event.get("session_id") is not None),
            lambda event: event["session_id"],
        )
        active = timedelta(0)
        for session_events in sessions.values():
            times = [event["created_at"] for event in session_events]
            active += max(times) - min(times)
        active_seconds = active.total_seconds()
        unique_sessions = len(sessions)

        result[key] = {
            "total_events": len(group),
            "page_views": sum(1 for event in group if event["event_type"] == "page_view"),
            "unique_sessions": unique_sessions,
            "event_type_counts": event_type_counts,
            "active_duration_seconds": active_seconds,
            "avg_session_duration": active_seconds / unique_sessions if unique_sessions else 0.0,
        }
    return result


# ---------------------------------------------------------------------------
# credit consumption
# ---------------------------------------------------------------------------


def credit_hourly(
    rows: Iterable[dict], hour_start: datetime
) -> dict[tuple[str, str, str], dict]:
    """analytics.credit_consumption_hourly for the hour starting at hour_start."""
    hour_end = hour_start + timedelta(hours=1)
    selected = [row for row in rows if in_bucket(row["started_at"], hour_start, hour_end)]
    groups = _group(
        selected,
        lambda row: (
            key_id(row.get("workspace_id")),
            key_id(row.get("user_id")),
            key_id(row.get("agent_id")),
        ),
    )
    result = {}
    for key, group in groups.items():
        credits = [credits_of(row) for row in group]
        successful = [row for row in group if status_class(row["status"]) == "success"]
        total = _decimal_sum(credits)
        success_credits = _decimal_sum(credits_of(row) for row in successful)
        result[key] = {
            "total_credits": total,
            "avg_credits_per_execution": _divide(total, len(group)),
            "peak_credits_per_execution": max(credits),
            "executions_count": len(group),
            "successful_executions": len(successful),
            "credits_per_success": (
                _divide(success_credits, len(successful)) if successful else Decimal(0)
            ),
        }
    return result


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------

# Decimal columns that are quotients (compared with a relative tolerance);
# every other Decimal column is a sum or a max and must match exactly.
DECIMAL_AVERAGE_COLUMNS = frozenset(
    {"avg_credits_per_run", "avg_credits_per_execution", "credits_per_success"}
)


def _floats_close(a: float, b: float, rel: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def _decimals_close(a: Decimal, b: Decimal, rel: Decimal) -> bool:
    diff = abs(a - b)
    scale = max(abs(a), abs(b))
    return diff == 0 or diff <= rel * scale


def _compare_value(column: str, actual: Any, expected: Any, *, rel: float,
                   percentile_rel: float | None, decimal_rel: float) -> str | None:
    """None if equal under the rules, else a short reason."""
    if expected is None or actual is None:
        return None if expected is None and actual is None else "one side is NULL"

    if isinstance(expected, dict) or isinstance(actual, dict):
        return None if actual == expected else "jsonb differs"

    if isinstance(expected, bool) or isinstance(actual, bool):
        return None if actual == expected else "differs"

    if isinstance(expected, int) and isinstance(actual, int):
        return None if actual == expected else "differs"

    if isinstance(expected, Decimal):
        if not isinstance(actual, (int, Decimal)):
            # a float cannot hold a numeric sum exactly: that is a bug.
            return f"type mismatch (expected Decimal, got {type(actual).__name__})"
        a, e = Decimal(actual), expected
        if column in DECIMAL_AVERAGE_COLUMNS:
            ok = _decimals_close(a, e, Decimal(str(decimal_rel)))
            return None if ok else f"differs beyond rel {decimal_rel}"
        return None if a == e else "differs (must be exact)"

    if isinstance(expected, int) and isinstance(actual, Decimal):
        # e.g. sum(bigint) comes back as numeric: fine if the value is exact.
        return None if actual == expected else "differs"

    if isinstance(expected, (int, float)) and isinstance(actual, (int, float, Decimal)):
        tolerance = rel
        if percentile_rel is not None and column in PERCENTILES:
            tolerance = percentile_rel
        ok = _floats_close(float(actual), float(expected), tolerance)
        return None if ok else f"differs beyond rel {tolerance}"

    return None if actual == expected else "differs"


def compare(actual: dict, expected: dict, *, rel: float = 1e-9,
            percentile_rel: float | None = None,
            decimal_rel: float = 1e-12) -> list[str]:
    """Human-readable differences between two ``{key: {column: value}}`` maps.

    Only the columns present in each expected row are compared, so callers
    may leave internal columns out of ``expected`` (or out of the reference
    output).  An empty list means the two agree.
    """
    problems: list[str] = []
    for key in sorted(set(expected) - set(actual), key=repr):
        problems.append(f"missing row {key!r}: expected {expected[key]!r}")
    for key in sorted(set(actual) - set(expected), key=repr):
        problems.append(f"unexpected row {key!r}: {actual[key]!r}")
    for key in sorted(set(expected) & set(actual), key=repr):
        expected_row, actual_row = expected[key], actual[key]
        for column, expected_value in expected_row.items():
            if column not in actual_row:
                problems.append(f"row {key!r}: column {column!r} missing from actual")
                continue
            actual_value = actual_row[column]
            reason = _compare_value(
                column, actual_value, expected_value,
                rel=rel, percentile_rel=percentile_rel, decimal_rel=decimal_rel,
            )
            if reason is not None:
                problems.append(
                    f"row {key!r} column {column!r}: actual {actual_value!r} != "
                    f"expected {expected_value!r} ({reason})"
                )
    return problems
