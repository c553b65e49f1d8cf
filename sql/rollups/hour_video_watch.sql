-- The distribution of `value` (say, seconds watched) per video per hour, as
-- KLL quantile sketches (Apache DataSketches, k = 200: about 1.65% rank
-- error). Each measure answers its own percentile; /v1/stats?function=p50,
-- p95 or p99 asks any rank of the same sketch.
SELECT
  video_id,
  date_bin(INTERVAL '1 hour', event_time) AS window_start,
  count(value) AS value_count,
  approx_percentile_cont(value, 0.5) AS value_p50,
  approx_percentile_cont(value, 0.95) AS value_p95
FROM events
WHERE event_type = 'view'
GROUP BY video_id, window_start
