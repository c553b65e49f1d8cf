-- owner: marketing-analytics
-- title: Top 10 channels
-- note: Videos missing from data/dims/videos.csv are grouped under "(unknown)".
-- chart: bar label=channel value=events
WITH h AS (
    SELECT h.*, h.window_start >= m.month_start AS this_month
    FROM hour_video_events h CROSS JOIN report_month m
    WHERE h.window_start >= m.prev_start AND h.window_start < m.month_end
),
t AS (
    SELECT coalesce(v.channel_id, '') AS channel_id,
           count(DISTINCT h.video_id) FILTER (WHERE this_month)    AS videos,
           coalesce(sum(h.events) FILTER (WHERE this_month), 0)     AS events,
           coalesce(sum(h.events) FILTER (WHERE NOT this_month), 0) AS prev_events
    FROM h LEFT JOIN videos v ON v.video_id = h.video_id
    GROUP BY 1
)
SELECT coalesce(c.name, '(unknown)') AS channel,
       t.videos,
       t.events,
       t.prev_events,
       round(100.0 * (t.events - t.prev_events) / nullif(t.prev_events, 0), 1) AS change_pct
FROM t LEFT JOIN channels c ON c.channel_id = t.channel_id
WHERE t.events > 0
ORDER BY t.events DESC, channel
LIMIT 10
