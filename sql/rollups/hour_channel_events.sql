-- owner: data-engineering
-- grain: 1 hour per channel and event type; a video's channel comes from the
--        `videos` dimension table (sql.dimensions.videos = data/dims/videos.csv),
--        'unknown' for a video the table does not list
-- input: events joined with videos
-- output: serving table hour_channel_events
SELECT coalesce(v.channel_id, 'unknown') AS channel_id,
       e.event_type,
       date_bin(INTERVAL '1 hour', e.event_time) AS window_start,
       count(*)       AS events,
       sum(e.value)   AS value_sum,
       count(e.value) AS value_count
FROM events e
LEFT JOIN videos v ON e.video_id = v.video_id
-- by position: `GROUP BY channel_id` would name the table's column, not the coalesce
GROUP BY 1, 2, 3
