-- owner: marketing-analytics
-- title: Month at a glance
-- note: All events in the month, compared with the month before.
-- input: hour_video_events (hourly rollup), videos (data/dims/videos.csv), report_month
WITH h AS (
    SELECT h.video_id,
           h.events,
           h.window_start >= m.month_start AS this_month
    FROM hour_video_events h CROSS JOIN report_month m
    WHERE h.window_start >= m.prev_start AND h.window_start < m.month_end
),
t AS (
    SELECT coalesce(sum(h.events) FILTER (WHERE h.this_month), 0)     AS events,
           coalesce(sum(h.events) FILTER (WHERE NOT h.this_month), 0) AS prev_events,
           count(DISTINCT h.video_id) FILTER (WHERE h.this_month)     AS active_videos,
           count(DISTINCT v.channel_id) FILTER (WHERE h.this_month)   AS active_channels
    FROM h LEFT JOIN videos v ON v.video_id = h.video_id
)
SELECT events,
       prev_events,
       round(100.0 * (events - prev_events) / nullif(prev_events, 0), 1) AS change_pct,
       active_videos,
       active_channels
FROM t
