"""tally: idempotent, observable rollups of AI-agent execution logs in PostgreSQL."""
from .rollups import (
    RollupResult,
    StepFailed,
    StepResult,
    aggregate_credit_consumption,
    aggregate_daily_metrics,
    aggregate_execution_metrics,
    aggregate_user_activity,
    daily_rollup,
    hourly_rollup,
    monthly_rollup,
    run_rollup,
    weekly_rollup,
)

__all__ = [
    "RollupResult", "StepFailed", "StepResult",
    "aggregate_credit_consumption", "aggregate_daily_metrics", "aggregate_execution_metrics",
    "aggregate_user_activity", "daily_rollup", "hourly_rollup", "monthly_rollup", "run_rollup",
    "weekly_rollup",
]
