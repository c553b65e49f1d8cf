-- Unique viewers per video per day: a HyperLogLog sketch of user_id
-- (Apache DataSketches, lg_k 12: about 1.6% relative standard error).
-- Sketches merge on every commit and across days at query time, so two days
-- of unique viewers is the union of the days, not their sum.
-- Served by GET /v1/rollups/day_video_uniques and /v1/stats?function=unique.
SELECT
  video_id,
  date_bin(INTERVAL '1 day', event_time) AS window_start,
  count(*) AS views,
  approx_distinct(user_id) AS unique_viewers
FROM events
WHERE event_type = 'view'
GROUP BY video_id, window_start
