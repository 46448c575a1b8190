-- user_activity --
-- One hour of analytics.user_activity -> analytics.user_activity_hourly, keyed by workspace and user.
-- Parameters: start, end.
WITH src AS (
    SELECT coalesce(workspace_id, '') AS workspace_id, user_id, session_id, event_type, created_at
    FROM analytics.user_activity
    WHERE created_at >= %(start)s AND created_at < %(end)s
),
-- one pass over the raw events; everything below works on these groups
cells AS (
    SELECT workspace_id, user_id, session_id, event_type,
           count(*) AS n, min(created_at) AS first_at, max(created_at) AS last_at
    FROM src
    GROUP BY 1, 2, 3, 4
),
per_user AS (
    SELECT workspace_id, user_id,
           sum(n)::bigint AS total_events,
           coalesce(sum(n) FILTER (WHERE event_type = 'page_view'), 0)::bigint AS page_views
    FROM cells GROUP BY 1, 2
),
per_type AS (
    -- every event counted once under its type (not one per session)
    SELECT workspace_id, user_id, jsonb_object_agg(event_type, n) AS event_type_counts
    FROM (SELECT workspace_id, user_id, event_type, sum(n)::bigint AS n FROM cells GROUP BY 1, 2, 3) t
    GROUP BY 1, 2
),
per_session AS (
    -- a session's active time in this hour: its last event here minus its first event here
    SELECT workspace_id, user_id, count(*) AS sessions,
           sum(extract(epoch FROM last_at - first_at))::float8 AS active
    FROM (SELECT workspace_id, user_id, session_id, min(first_at) AS first_at, max(last_at) AS last_at
          FROM cells WHERE session_id IS NOT NULL GROUP BY 1, 2, 3) s
    GROUP BY 1, 2
),
metrics AS (
    SELECT u.workspace_id, u.user_id, u.total_events, u.page_views,
           coalesce(s.sessions, 0) AS unique_sessions, t.event_type_counts,
           coalesce(s.active, 0) AS active_duration_seconds,
           CASE WHEN coalesce(s.sessions, 0) = 0 THEN 0 ELSE s.active / s.sessions END AS avg_session_duration
    FROM per_user u
    JOIN per_type t USING (workspace_id, user_id)
    LEFT JOIN per_session s USING (workspace_id, user_id)
),
written AS (
    INSERT INTO analytics.user_activity_hourly AS t (
        workspace_id, user_id, hour, total_events, page_views, unique_sessions, event_type_counts,
        active_duration_seconds, avg_session_duration)
    SELECT workspace_id, user_id, %(start)s, total_events, page_views, unique_sessions, event_type_counts,
           active_duration_seconds, avg_session_duration
    FROM metrics
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
    RETURNING 1
),
removed AS (
    DELETE FROM analytics.user_activity_hourly t
    WHERE t.hour = %(start)s
      AND NOT EXISTS (SELECT 1 FROM metrics m WHERE m.workspace_id = t.workspace_id AND m.user_id = t.user_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM metrics) AS rows,
       (SELECT count(*) FROM written) AS changed,
       (SELECT count(*) FROM removed) AS removed;
