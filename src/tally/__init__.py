"""tally: idempotent, observable rollups of AI-agent execution logs in PostgreSQL.

The Python API (SPEC) is loaded on first use, so ``tally --help`` and ``import
tally.tasks`` do not pay for what they do not call.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "RollupResult", "StepFailed", "StepResult",
    "aggregate_credit_consumption", "aggregate_daily_metrics", "aggregate_execution_metrics",
    "aggregate_user_activity", "daily_rollup", "hourly_rollup", "monthly_rollup", "run_rollup",
    "weekly_rollup",
]

if TYPE_CHECKING:  # pragma: no cover
    from .rollups import (RollupResult, StepFailed, StepResult, aggregate_credit_consumption,  # noqa: F401
                          aggregate_daily_metrics, aggregate_execution_metrics, aggregate_user_activity,
                          daily_rollup, hourly_rollup, monthly_rollup, run_rollup, weekly_rollup)


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".rollups", __name__), name)
    raise AttributeError(f"module 'tally' has no attribute {name!r}")
