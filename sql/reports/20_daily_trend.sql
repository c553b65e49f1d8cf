-- owner: marketing-analytics
-- title: Daily trend
-- note: Events per UTC day and event type; days without events show 0. A day still in progress is marked partial.
-- chart: line x=day series=event_type y=events
-- input: report_days (one row per UTC day of the period, `partial` for the day in progress), hour_video_events
WITH h AS (
    SELECT h.*
    FROM hour_video_events h CROSS JOIN report_month m
    WHERE h.window_start >= m.month_start AND h.window_start < m.month_end
),
types AS (SELECT DISTINCT event_type FROM h),
daily AS (
    SELECT date_trunc('day', window_start) AS day, event_type, sum(events) AS events
    FROM h
    GROUP BY 1, 2
)
SELECT arrow_cast(d.day, 'Date32') AS day,
       t.event_type,
       coalesce(c.events, 0) AS events,
       d.partial
FROM report_days d
CROSS JOIN types t
LEFT JOIN daily c ON c.day = d.day AND c.event_type = t.event_type
ORDER BY day, event_type
