-- roles_exists --
-- Whether a role of this name exists (cluster-wide).
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %(name)s);

-- roles_create --
-- A group role with no login of its own: people and services log in as members of it
-- (CREATE ROLE alice LOGIN PASSWORD '…' IN ROLE tally_worker); the name is quoted by psycopg.sql.
CREATE ROLE {role} NOLOGIN;

-- roles_worker --
-- The role tally's workers and CLI run as: reads the source tables, writes only what tally
-- owns in analytics. Privileges on tally's objects are reset first, so running this again
-- converges to exactly this list; the role's rights on any other object are left alone.
-- The ledger is append-and-finish only (no DELETE): a worker cannot erase its history.
-- (TEMPORARY on the database, for the hourly steps' temporary tables: roles_worker_temporary.)
REVOKE ALL ON public.execution_logs, analytics.user_activity,
    analytics.execution_metrics_hourly, analytics.user_activity_hourly, analytics.credit_consumption_hourly,
    analytics.execution_metrics_daily, analytics.execution_metrics_weekly, analytics.execution_metrics_monthly,
    analytics.aggregation_runs, analytics.aggregation_latest, analytics.dirty_log, analytics.bucket_state,
    analytics.backfill_runs, analytics.purged
    FROM {role};
GRANT USAGE ON SCHEMA public, analytics TO {role};
GRANT SELECT ON public.execution_logs, analytics.user_activity TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON
    analytics.execution_metrics_hourly, analytics.user_activity_hourly, analytics.credit_consumption_hourly,
    analytics.execution_metrics_daily, analytics.execution_metrics_weekly, analytics.execution_metrics_monthly
    TO {role};
GRANT SELECT, INSERT, UPDATE ON analytics.aggregation_runs TO {role};
-- the current state of every bucket changes with the ledger attempt that moves it
GRANT SELECT, INSERT, UPDATE ON analytics.bucket_state TO {role};
-- a forced backfill records when it began and ended, so the identical command can resume it
GRANT SELECT, INSERT, UPDATE ON analytics.backfill_runs TO {role};
-- what retention purged: an unseal is refused where it would rebuild from purged rows
GRANT SELECT ON analytics.purged TO {role};
GRANT SELECT ON analytics.aggregation_latest TO {role};
-- a rollup claims its hour's change marks (UPDATE) and clears them once read (DELETE)
GRANT SELECT, UPDATE, DELETE ON analytics.dirty_log TO {role};

-- roles_worker_temporary --
-- The hourly steps read into session-private temporary tables, dropped at each step's commit
-- (docs/PERFORMANCE.md, tuning #10): TEMPORARY on tally's database. PUBLIC holds it by default;
-- granted here too, so a DBA may revoke it from PUBLIC.
GRANT TEMPORARY ON DATABASE {database} TO {role};

-- roles_dashboard --
-- A read-only role for dashboards and people: the output tables, the ledger and the change
-- log; not the raw source rows, and nothing it can write.
REVOKE ALL ON public.execution_logs, analytics.user_activity,
    analytics.execution_metrics_hourly, analytics.user_activity_hourly, analytics.credit_consumption_hourly,
    analytics.execution_metrics_daily, analytics.execution_metrics_weekly, analytics.execution_metrics_monthly,
    analytics.aggregation_runs, analytics.aggregation_latest, analytics.dirty_log, analytics.bucket_state,
    analytics.backfill_runs, analytics.purged
    FROM {role};
GRANT USAGE ON SCHEMA analytics TO {role};
GRANT SELECT ON
    analytics.execution_metrics_hourly, analytics.user_activity_hourly, analytics.credit_consumption_hourly,
    analytics.execution_metrics_daily, analytics.execution_metrics_weekly, analytics.execution_metrics_monthly,
    analytics.aggregation_runs, analytics.aggregation_latest, analytics.dirty_log, analytics.bucket_state,
    analytics.purged
    TO {role};

-- roles_source_writers --
-- The change-capture triggers fire in the platform's own writes to the source tables. As
-- SECURITY DEFINER (with a fixed search_path) they append to analytics.dirty_log with the
-- rights of the function's owner, so the platform's writer roles need no privilege on
-- analytics at all; no one else may call the function.
ALTER FUNCTION analytics.tally_mark_dirty() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION analytics.tally_mark_dirty() FROM PUBLIC;

-- roles_retention --
-- The role `tally retention` runs as: a member of the worker role (everything a worker may), and
-- what only retention does: delete the source rows of sealed hours, hourly output rows of sealed
-- days, weeks and months, and old ledger history, and record what it purged. Dropping whole
-- partitions of a partitioned source needs the ownership of that table, which no grant gives.
REVOKE ALL ON public.execution_logs, analytics.user_activity, analytics.aggregation_runs, analytics.purged
    FROM {role};
GRANT {worker} TO {role};
GRANT SELECT, DELETE ON public.execution_logs, analytics.user_activity TO {role};
GRANT DELETE ON analytics.aggregation_runs TO {role};
GRANT SELECT, INSERT, UPDATE ON analytics.purged TO {role};
