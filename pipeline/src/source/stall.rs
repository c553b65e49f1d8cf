//! Stalled partitions, whatever the broker does: every 10 s, for **every**
//! partition of the topic (owned by this process or not), the messages
//! waiting after the serving store's offset (broker watermarks) and the
//! time of the partition's last commit. A partition whose data has waited
//! while nobody committed it for `kafka.stall_after` is stalled: a dead
//! member the broker has not expired (tansu 0.6.0 keeps them), a member
//! stuck in a rebalance, a crash loop. Logged when it starts and ends,
//! counted, and `/readyz` fails meanwhile.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::OffsetStore;
use crate::config::Settings;
use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(10);

/// Watch until `shutdown` resolves.
pub async fn watch(
    settings: Settings,
    store: Arc<dyn OffsetStore>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let stall_after_ms = i64::try_from(settings.kafka.stall_after.as_millis()).unwrap_or(i64::MAX);
    let topic = settings.kafka.topic.clone();
    // Since when a partition without a stored offset has had data waiting.
    let mut waiting_since: BTreeMap<i32, i64> = BTreeMap::new();
    let mut stalled: Vec<i32> = Vec::new();
    let client = match super::client::metadata_client(&settings.kafka.properties) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "stalled-partition checks are off");
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let (c, t) = (client.clone(), topic.clone());
        let marks = match tokio::task::spawn_blocking(move || {
            super::client::watermarks(&c, &t, None)
        })
        .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "stall check: cannot read the watermarks");
                continue;
            }
            Err(_) => continue,
        };
        let stored = match store.committed(&topic).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "stall check: cannot read the stored offsets");
                continue;
            }
        };
        let now = chrono::Utc::now().timestamp_millis();
        let (lag, now_stalled) = assess(&marks, &stored, &mut waiting_since, now, stall_after_ms);
        for p in now_stalled.iter().filter(|p| !stalled.contains(p)) {
            metrics.partition_stalls.fetch_add(1, Ordering::Relaxed);
            let waiting = lag.get(p).copied().unwrap_or(0);
            let last = stored
                .get(p)
                .map(|(_, at)| crate::serve::http::fmt_time(*at));
            tracing::warn!(
                partition = p,
                waiting,
                last_commit = last.as_deref().unwrap_or("never"),
                stall_after = %humantime::format_duration(settings.kafka.stall_after),
                "partition stalled: {waiting} messages wait and no member has committed it; a dead member may still hold it (a broker that does not expire dead members), or its owner is stuck. Restart the members, or run one instance with kafka.assignment = \"manual\""
            );
        }
        for p in stalled.iter().filter(|p| !now_stalled.contains(p)) {
            tracing::info!(partition = p, "partition no longer stalled");
        }
        stalled = now_stalled.clone();
        metrics.set_topic_lag(lag, now_stalled);
    }
}

/// Lag per partition and the stalled ones. A partition with a stored
/// offset is stalled when data waits and its last commit is older than
/// `stall_after_ms`; one without, when data has waited that long.
pub fn assess(
    marks: &BTreeMap<i32, (i64, i64)>,
    stored: &BTreeMap<i32, (i64, i64)>,
    waiting_since: &mut BTreeMap<i32, i64>,
    now_ms: i64,
    stall_after_ms: i64,
) -> (BTreeMap<i32, i64>, Vec<i32>) {
    let mut lag = BTreeMap::new();
    let mut stalled = Vec::new();
    for (p, (low, high)) in marks {
        let from = stored.get(p).map_or(*low, |(next, _)| (*next).max(*low));
        let waiting = (high - from).max(0);
        lag.insert(*p, waiting);
        if waiting == 0 {
            waiting_since.remove(p);
            continue;
        }
        let since = match stored.get(p) {
            Some((_, committed_at)) => *committed_at,
            None => *waiting_since.entry(*p).or_insert(now_ms),
        };
        if now_ms.saturating_sub(since) >= stall_after_ms {
            stalled.push(*p);
        }
    }
    (lag, stalled)
}

#[cfg(test)]
mod tests {
    use super::assess;
    use std::collections::BTreeMap;

    #[test]
    fn a_partition_stalls_when_data_waits_and_nobody_commits() {
        let marks: BTreeMap<i32, (i64, i64)> =
            [(0, (0, 100)), (1, (0, 50)), (2, (10, 10)), (3, (0, 7))]
                .into_iter()
                .collect();
        // 0: committed long ago, data waits -> stalled; 1: committed just now;
        // 2: empty; 3: never committed, data waiting since the first look.
        let stored: BTreeMap<i32, (i64, i64)> =
            [(0, (40, 1_000)), (1, (20, 95_000))].into_iter().collect();
        let mut since = BTreeMap::new();
        let (lag, stalled) = assess(&marks, &stored, &mut since, 100_000, 60_000);
        assert_eq!(
            lag,
            [(0, 60), (1, 30), (2, 0), (3, 7)].into_iter().collect()
        );
        assert_eq!(stalled, vec![0]);
        let (_, stalled) = assess(&marks, &stored, &mut since, 170_000, 60_000);
        assert_eq!(stalled, vec![0, 1, 3]);
        // Caught up: no longer stalled, and the wait starts again.
        let caught: BTreeMap<i32, (i64, i64)> = [(0, (100, 1_000)), (1, (50, 170_000))]
            .into_iter()
            .collect();
        let marks2: BTreeMap<i32, (i64, i64)> = [(0, (0, 100)), (1, (0, 50)), (3, (0, 0))]
            .into_iter()
            .collect();
        let (_, stalled) = assess(&marks2, &caught, &mut since, 180_000, 60_000);
        assert!(stalled.is_empty());
        assert!(since.is_empty());
    }
}
