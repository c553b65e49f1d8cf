-- owner: marketing-analytics
-- title: Top 10 videos
-- note: By events this month; videos missing from data/dims/videos.csv show their id.
-- chart: bar label=title value=events
WITH h AS (
    SELECT h.*, h.window_start >= m.month_start AS this_month
    FROM hour_video_events h CROSS JOIN report_month m
    WHERE h.window_start >= m.prev_start AND h.window_start < m.month_end
),
t AS (
    SELECT video_id,
           coalesce(sum(events) FILTER (WHERE this_month), 0)                          AS events,
           coalesce(sum(events) FILTER (WHERE this_month AND event_type = 'view'), 0)  AS views,
           coalesce(sum(events) FILTER (WHERE this_month AND event_type = 'like'), 0)  AS likes,
           coalesce(sum(events) FILTER (WHERE this_month AND event_type = 'share'), 0) AS shares,
           coalesce(sum(events) FILTER (WHERE NOT this_month), 0)                      AS prev_events
    FROM h
    GROUP BY video_id
)
SELECT t.video_id,
       coalesce(v.title, t.video_id) AS title,
       coalesce(c.name, '(unknown)') AS channel,
       t.events,
       t.views,
       t.likes,
       t.shares,
       t.prev_events,
       round(100.0 * (t.events - t.prev_events) / nullif(t.prev_events, 0), 1) AS change_pct
FROM t
LEFT JOIN videos v ON v.video_id = t.video_id
LEFT JOIN channels c ON c.channel_id = v.channel_id
WHERE t.events > 0
ORDER BY t.events DESC, t.video_id
LIMIT 10
