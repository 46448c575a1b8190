-- user_activity_rows --
-- Hours [start, end) of analytics.user_activity, aggregated by hour, workspace and user: the rows
-- user_activity writes. Parameters: start, end. A read-only query (see execution_metrics_rows).
-- Shape (docs/PERFORMANCE.md): one hashed pass over the raw events fills two groupings at once
-- (grouping sets): per session, and per event type; everything else works on those groups.
WITH cells AS (
    SELECT hour, workspace_id, user_id, session_id, event_type,
           GROUPING(event_type) = 1 AS per_session,  -- a (workspace, user, session) group
           count(*) AS n, min(created_at) AS first_at, max(created_at) AS last_at
    FROM (SELECT analytics.tally_key(workspace_id) AS workspace_id, analytics.tally_key(user_id) AS user_id,
                 session_id, event_type, created_at, date_trunc('hour', created_at, 'UTC') AS hour
          FROM analytics.user_activity
          WHERE created_at >= %(start)s AND created_at < %(end)s) src
    GROUP BY GROUPING SETS ((hour, workspace_id, user_id, session_id), (hour, workspace_id, user_id, event_type))
),
metrics AS (
    SELECT hour, workspace_id, user_id, total_events, page_views, unique_sessions, event_type_counts,
           active_duration_seconds,
           CASE WHEN unique_sessions = 0 THEN 0 ELSE active_duration_seconds / unique_sessions END
               AS avg_session_duration
    FROM (SELECT hour, workspace_id, user_id,
                 -- every event is in exactly one session group (the sessionless ones in the NULL one)
                 sum(n) FILTER (WHERE per_session)::bigint AS total_events,
                 coalesce(sum(n) FILTER (WHERE NOT per_session AND event_type = 'page_view'), 0)::bigint
                     AS page_views,
                 count(*) FILTER (WHERE per_session AND session_id IS NOT NULL) AS unique_sessions,
                 -- every event counted once under its type (not one per session)
                 jsonb_object_agg(event_type, n) FILTER (WHERE NOT per_session) AS event_type_counts,
                 -- a session's active time in this hour: its last event here minus its first event here
                 coalesce(sum(extract(epoch FROM last_at - first_at))
                              FILTER (WHERE per_session AND session_id IS NOT NULL)::float8, 0)
                     AS active_duration_seconds
          FROM cells
          GROUP BY hour, workspace_id, user_id) u
)
SELECT * FROM metrics;

-- user_activity --
-- pg_temp.user_activity_rows -> analytics.user_activity_hourly, keyed by hour, workspace and user;
-- per hour: rows, changed, removed. Parameters: start, end. On hours with no rows yet the
-- executor drops the upsert clause.
WITH metrics AS (SELECT * FROM pg_temp.user_activity_rows),
written AS (
    INSERT INTO analytics.user_activity_hourly AS t (
        workspace_id, user_id, hour, total_events, page_views, unique_sessions, event_type_counts,
        active_duration_seconds, avg_session_duration)
    SELECT workspace_id, user_id, hour, total_events, page_views, unique_sessions, event_type_counts,
           active_duration_seconds, avg_session_duration
    FROM metrics  -- unsorted, as in credit_consumption (docs/PERFORMANCE.md #15)
    -- upsert: begin
    ON CONFLICT (workspace_id, user_id, hour) DO UPDATE SET
        total_events = EXCLUDED.total_events,
        page_views = EXCLUDED.page_views,
        unique_sessions = EXCLUDED.unique_sessions,
        event_type_counts = EXCLUDED.event_type_counts,
        active_duration_seconds = EXCLUDED.active_duration_seconds,
        avg_session_duration = EXCLUDED.avg_session_duration,
        updated_at = now()
    WHERE (t.total_events, t.page_views, t.unique_sessions, t.event_type_counts, t.active_duration_seconds,
           t.avg_session_duration)
          IS DISTINCT FROM
          (EXCLUDED.total_events, EXCLUDED.page_views, EXCLUDED.unique_sessions, EXCLUDED.event_type_counts,
           EXCLUDED.active_duration_seconds, EXCLUDED.avg_session_duration)
    -- upsert: end
    RETURNING t.hour
),
removed AS (
    DELETE FROM analytics.user_activity_hourly t
    WHERE t.hour >= %(start)s AND t.hour < %(end)s
      AND NOT EXISTS (SELECT 1 FROM metrics m WHERE m.hour = t.hour AND m.workspace_id = t.workspace_id
                                                AND m.user_id = t.user_id)
    RETURNING t.hour
)
SELECT hour, count(*) FILTER (WHERE k = 0) AS rows, count(*) FILTER (WHERE k = 1) AS changed,
       count(*) FILTER (WHERE k = 2) AS removed
FROM (SELECT hour, 0 AS k FROM metrics UNION ALL SELECT hour, 1 FROM written UNION ALL SELECT hour, 2 FROM removed) c
GROUP BY hour;
