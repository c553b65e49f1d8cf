-- owner: data-engineering
-- grain: 1 hour per video and event type
-- input: events (the configured event schema)
-- output: serving table hour_video_events
SELECT video_id,
       event_type,
       date_bin(INTERVAL '1 hour', event_time) AS window_start,
       count(*)   AS events,
       sum(value) AS value_sum,
       count(value) AS value_count,
       min(value) AS value_min,
       max(value) AS value_max
FROM events
GROUP BY video_id, event_type, window_start
