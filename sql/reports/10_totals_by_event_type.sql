-- owner: marketing-analytics
-- title: Totals by event type
-- note: Month-over-month change is against the previous calendar month (UTC).
-- chart: bar label=event_type value=events
WITH h AS (
    SELECT h.*, h.window_start >= m.month_start AS this_month
    FROM hour_video_events h CROSS JOIN report_month m
    WHERE h.window_start >= m.prev_start AND h.window_start < m.month_end
),
t AS (
    SELECT event_type,
           coalesce(sum(events) FILTER (WHERE this_month), 0)      AS events,
           coalesce(sum(events) FILTER (WHERE NOT this_month), 0)  AS prev_events,
           sum(value_sum) FILTER (WHERE this_month)                AS value_sum,
           coalesce(sum(value_count) FILTER (WHERE this_month), 0) AS value_count
    FROM h
    GROUP BY event_type
)
SELECT event_type,
       events,
       prev_events,
       round(100.0 * (events - prev_events) / nullif(prev_events, 0), 1) AS change_pct,
       value_sum,
       round(value_sum / nullif(value_count, 0), 2) AS value_avg
FROM t
ORDER BY events DESC, event_type
