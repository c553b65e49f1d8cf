//! `tally run`: wires source -> decode/batch (consumer thread) -> aggregate +
//! archive -> serving commit (committer task).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::aggregate::{Dimensions, RollupAggregator, SqlCatalog};
use crate::batch::{Batch, BatchBuilder};
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::sink::{ArchiveLocation, ParquetArchiveSink, ServingStore};
use crate::source::kafka::GroupCommitter;

mod archiving;
mod committer;
pub(crate) mod retention;
mod sweeper;
use crate::source::{ConsumerControl, KafkaSource};
pub(crate) use archiving::publish_pending;
pub(crate) use committer::{discard_uncommitted, Committer, Done, Retry};
use sweeper::OrphanSweeper;

/// Everything built from settings before consuming: fails fast on bad SQL,
/// bad schema or an unreachable serving store.
pub(crate) struct Stages {
    pub settings: Settings,
    pub schema: EventSchema,
    pub catalog: SqlCatalog,
    pub store: ServingStore,
    pub archive: ParquetArchiveSink,
}

/// `retention.rollups` names rollups of the SQL directory, each kept at
/// least one window.
fn check_retention(settings: &Settings, catalog: &SqlCatalog) -> Result<(), Error> {
    for (name, keep) in &settings.retention.rollups {
        let key = format!("retention.rollups.{name}");
        let Some(def) = catalog.get(name) else {
            let have: Vec<&str> = catalog.rollups.iter().map(|r| r.name.as_str()).collect();
            return Err(crate::config::ConfigError::Invalid {
                key,
                message: format!(
                    "no rollup named `{name}` in {}; it defines: {}",
                    settings.sql.rollups_dir.display(),
                    have.join(", ")
                ),
            }
            .into());
        };
        if let crate::config::Keep::For(d) = keep {
            if (d.as_millis() as i64) < def.window_ms {
                return Err(crate::config::ConfigError::Invalid {
                    key,
                    message: format!(
                        "{keep} is shorter than one window of `{name}` ({} ms); keep at least one window",
                        def.window_ms
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

impl Stages {
    /// The event schema and the rollups planned from `sql.rollups_dir`:
    /// what every command starts from.
    pub(crate) async fn definitions(
        settings: &Settings,
    ) -> Result<(EventSchema, SqlCatalog), Error> {
        let schema = EventSchema::from_config(&settings.schema)?;
        let dimensions = Dimensions::load(&settings.sql.dimensions).await?;
        let catalog = SqlCatalog::load_with(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
            dimensions,
        )
        .await?;
        check_retention(settings, &catalog)?;
        Ok((schema, catalog))
    }

    /// The serving store of `serving.url` with the settings' tuning,
    /// its tables created or checked against `catalog`.
    pub(crate) async fn open_store(
        settings: &Settings,
        catalog: &SqlCatalog,
    ) -> Result<ServingStore, Error> {
        Ok(ServingStore::open_with(
            &settings.serving_url(),
            &catalog.rollups,
            settings.serving.window_index,
        )
        .await?
        .with_fold_rows(settings.serving.sqlite_fold_rows)
        .with_direct_rows(settings.serving.sqlite_direct_rows))
    }

    /// The archive of `storage.archive_url`.
    pub(crate) fn archive(
        settings: &Settings,
        schema: &EventSchema,
    ) -> Result<ParquetArchiveSink, Error> {
        let location = ArchiveLocation::open(&settings.storage)?;
        Ok(ParquetArchiveSink::open(
            &location,
            schema.time_index,
            settings.storage.zstd_level,
            settings.storage.multipart_threshold.0,
        )?)
    }

    /// Everything `tally run` and `tally replay` use.
    pub(crate) async fn build(settings: Settings) -> Result<Stages, Error> {
        let (schema, catalog) = Stages::definitions(&settings).await?;
        let store = Stages::open_store(&settings, &catalog).await?;
        let archive = Stages::archive(&settings, &schema)?;
        Ok(Stages {
            settings,
            schema,
            catalog,
            store,
            archive,
        })
    }
}

/// The open raw files of `topic` (spooled under the data directory).
pub(crate) fn raw_writer(
    settings: &Settings,
    archive: &ParquetArchiveSink,
    topic: &str,
) -> Result<crate::sink::archive::RawWriter, Error> {
    let s = &settings.storage;
    Ok(crate::sink::archive::RawWriter::new(
        archive.clone(),
        &s.data_dir,
        topic,
        crate::sink::archive::Rotation {
            file_bytes: s.archive_file_bytes.0,
            roll_interval: s.archive_roll_interval,
            max_open_files: s.archive_max_open_files,
            row_group_bytes: s.archive_row_group_bytes.as_usize(),
        },
    )?)
}

/// Totals for a run (logged at exit).
#[derive(Debug, Default, Clone)]
pub(crate) struct RunStats {
    pub batches: u64,
    pub messages: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub fenced: u64,
    pub dropped_stale: u64,
}

/// Run the pipeline until `shutdown` resolves.
pub(crate) async fn run(
    stages: Stages,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunStats, Error> {
    let Stages {
        settings,
        schema,
        catalog,
        store,
        archive,
    } = stages;
    let mut aggregator = RollupAggregator::new(&catalog, schema.arrow.clone()).await?;
    let _reloader = catalog.dimensions.watch(settings.sql.dimension_reload);
    metrics.watch_dimensions(&catalog.dimensions);
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let builder = BatchBuilder::new(
        decoder,
        &settings.batch,
        settings.decode.dlq_payload_bytes.as_usize(),
    );
    let heartbeat = settings.batch.linger.max(Duration::from_secs(1));
    refuse_lost_store(&settings.kafka.topic, &store, &archive).await?;
    let source = KafkaSource::new(
        &settings.kafka,
        Arc::new(store.clone()),
        Arc::new(archiving::ArchiveRecovery {
            archive: archive.clone(),
            store: store.clone(),
        }),
        tokio::runtime::Handle::current(),
        metrics.clone(),
        heartbeat,
    )?;
    let control = source.control();
    let group = source.committer();
    let (tx, mut rx) = mpsc::channel::<Batch>(1);
    let consumer_thread = std::thread::Builder::new()
        .name("tally-consumer".into())
        .spawn(move || source.run(builder, tx))
        .map_err(|e| Error::Internal(format!("cannot start the consumer thread: {e}")))?;
    tracing::info!(topic = %settings.kafka.topic, serving = %crate::sink::serving::redact(store.url()), data_dir = %settings.storage.data_dir.display(), archive = %archive.describe(), "tally running");

    let mut raw = raw_writer(&settings, &archive, &settings.kafka.topic)?;
    let mut sweeper = OrphanSweeper::new(
        &settings.kafka.topic,
        settings.storage.orphan_sweep_interval,
        settings.decode.max_event_age,
    );
    let committer = async {
        let mut stats = RunStats::default();
        let mut last_log = Instant::now();
        let mut window = RunStats::default();
        while let Some(batch) = rx.recv().await {
            let with = RunCommit {
                control: &control,
                aggregator: &mut aggregator,
                archive: &archive,
                raw: &mut raw,
                store: &store,
                group: &group,
                sweeper: &mut sweeper,
                metrics: &metrics,
            };
            let result = commit_batch(&batch, with, &mut stats).await;
            control.done.fetch_add(1, Ordering::AcqRel);
            result?;
            if last_log.elapsed() >= Duration::from_secs(10) {
                let secs = last_log.elapsed().as_secs_f64();
                tracing::info!(
                    batches = stats.batches - window.batches,
                    events_per_sec = ((stats.messages - window.messages) as f64 / secs).round(),
                    accepted_total = stats.accepted,
                    rejected_total = stats.rejected,
                    "progress"
                );
                window = stats.clone();
                last_log = Instant::now();
            }
        }
        // Shutdown: commit every open file.
        let mut committer = Committer {
            aggregator: &mut aggregator,
            archive: &archive,
            raw: Some(&mut raw),
            store: &store,
            metrics: Some(&metrics),
        };
        let flushed = committer.flush_all(Retry::Times(8)).await;
        raw.close_spool();
        flushed?;
        sweeper.finish().await;
        Ok::<RunStats, Error>(stats)
    };
    let control_for_shutdown = control.clone();
    tokio::pin!(committer);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut committer => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: flushing the open batch");
            control_for_shutdown.shutdown.store(true, Ordering::Release);
            committer.await
        }
    };
    control.shutdown.store(true, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || consumer_thread.join())
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let stats = result?;
    match joined {
        Ok(r) => r?,
        Err(_) => return Err(Error::Internal("consumer thread panicked".into())),
    }
    store.close().await;
    crate::batch::rejects::flush_all();
    tracing::info!(?stats, "stopped");
    Ok(stats)
}

/// A store without offsets for the topic beside an archive that holds its
/// files means the store was lost or swapped: consuming would re-read (or
/// skip) the history, and the orphan sweep would then delete every archive
/// file the new store does not list. Refuse to start instead.
async fn refuse_lost_store(
    topic: &str,
    store: &ServingStore,
    archive: &ParquetArchiveSink,
) -> Result<(), Error> {
    if !store.load_offsets(topic).await?.is_empty() {
        return refuse_store_behind(topic, store, archive).await;
    }
    let example = match archive.any_file_of(topic).await? {
        Some(f) => Some(f),
        None => match archive.manifest_partitions(topic).await?.first() {
            Some(p) => archive
                .manifest_beyond(topic, *p, None)
                .await?
                .into_iter()
                .next(),
            None => None,
        },
    };
    match example {
        None => Ok(()),
        Some(example) => Err(crate::source::SourceError::StoreLost {
            topic: topic.to_string(),
            store: crate::sink::serving::redact(store.url()),
            archive: archive.describe(),
            example,
        }
        .into()),
    }
}

/// A visible manifest entry of a partition at or beyond the store's
/// archive position that the store does not record is a commit the store
/// does not hold (a store restored from a backup). Entries the store
/// records are its own: an `offsets reset` moved the position back over
/// them. A live writer records an entry before it is visible, so no race.
async fn refuse_store_behind(
    topic: &str,
    store: &ServingStore,
    archive: &ParquetArchiveSink,
) -> Result<(), Error> {
    let positions = store.archive_positions(topic).await?;
    for p in archive.manifest_partitions(topic).await? {
        let at = positions.get(&p).copied();
        let beyond = archive.manifest_beyond(topic, p, at).await?;
        if beyond.is_empty() {
            continue;
        }
        let known = store.committed_among(&beyond).await?;
        let Some(entry) = beyond.into_iter().find(|e| !known.contains(e)) else {
            continue;
        };
        return Err(crate::source::SourceError::StoreBehind {
            topic: topic.to_string(),
            partition: p,
            store: crate::sink::serving::redact(store.url()),
            archive: archive.describe(),
            position: at,
            entry,
        }
        .into());
    }
    Ok(())
}

/// What `tally run` commits each batch with.
struct RunCommit<'a> {
    control: &'a Arc<ConsumerControl>,
    aggregator: &'a mut RollupAggregator,
    archive: &'a ParquetArchiveSink,
    raw: &'a mut crate::sink::archive::RawWriter,
    store: &'a ServingStore,
    group: &'a GroupCommitter,
    sweeper: &'a mut OrphanSweeper,
    metrics: &'a Arc<Metrics>,
}

/// Commit one batch of `tally run`, then act on how it ended: a committed
/// batch goes to Kafka's group commit, the orphan sweeper and the metrics;
/// a fenced or stale one makes the consumer read its messages again.
async fn commit_batch(
    original: &Batch,
    with: RunCommit<'_>,
    stats: &mut RunStats,
) -> Result<(), Error> {
    let RunCommit {
        control,
        aggregator,
        archive,
        raw,
        store,
        group,
        sweeper,
        metrics,
    } = with;
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    let current = |b: &Batch| b.epoch == control.epoch.load(Ordering::Acquire);
    let mut committer = Committer {
        aggregator,
        archive,
        raw: Some(raw),
        store,
        metrics: Some(metrics),
    };
    let outcome = committer.commit(original, Retry::Forever, current).await?;
    if let Done::Committed { archive_fenced, .. } = &outcome {
        if !archive_fenced.is_empty() {
            // Another writer flushed these partitions' archive: what this
            // process held open is dropped, and read again from there.
            metrics.batches_fenced.fetch_add(1, Ordering::Relaxed);
            control.bump_epoch();
            control.reset_requested.store(true, Ordering::Release);
        }
    }
    match outcome {
        Done::Stale => {
            stats.dropped_stale += 1;
            tracing::debug!(
                epoch = original.epoch,
                "dropping a batch from before a rebalance"
            );
            // Its messages must be read again: with the cooperative protocol a
            // kept partition is not re-seeked by the assignment itself.
            control.reset_requested.store(true, Ordering::Release);
        }
        Done::Committed { batch, .. } if batch.is_heartbeat() => {
            sweeper
                .after_commit(&batch, control, archive, store, metrics)
                .await;
        }
        Done::Committed {
            batch, files, rows, ..
        } => {
            group.commit(&batch.partitions);
            sweeper
                .after_commit(&batch, control, archive, store, metrics)
                .await;
            record_commit(metrics, &batch, &files, rows, started.elapsed());
            let folds = store.fold_stats();
            metrics.sqlite_folds.store(folds.folds, Ordering::Relaxed);
            metrics
                .sqlite_fold_micros
                .store((folds.seconds * 1e6) as u64, Ordering::Relaxed);
            metrics
                .sqlite_fold_rows
                .store(folds.rows, Ordering::Relaxed);
            metrics.observe_batch_latency(
                batch.oldest_produced_ms,
                batch.opened_at_ms,
                batch.sealed_at_ms,
                started_ms,
                chrono::Utc::now().timestamp_millis(),
            );
            stats.batches += 1;
            stats.messages += batch.stats.messages;
            stats.accepted += batch.stats.accepted;
            stats.rejected += batch.stats.rejected.values().sum::<u64>();
            tracing::debug!(topic = %batch.topic, offsets = %batch.offsets_field(), rows = batch.events.num_rows(), "batch committed");
        }
        Done::Fenced {
            partition,
            expected,
            stored,
            files,
        } => {
            stats.fenced += 1;
            metrics.batches_fenced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                partition,
                ?expected,
                ?stored,
                "batch fenced: another writer advanced the partition; re-reading"
            );
            discard_uncommitted(archive, store, files).await;
            control.bump_epoch();
            control.reset_requested.store(true, Ordering::Release);
        }
    }
    Ok(())
}

fn record_commit(
    metrics: &Metrics,
    batch: &Batch,
    files: &[crate::sink::WrittenFile],
    rows_merged: u64,
    took: Duration,
) {
    let add = |c: &std::sync::atomic::AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
    add(&metrics.batches_committed, 1);
    add(&metrics.messages_consumed, batch.stats.messages);
    add(&metrics.events_accepted, batch.stats.accepted);
    add(&metrics.events_late, batch.stats.late);
    for (reason, n) in &batch.stats.rejected {
        metrics.add_rejected(*reason, *n);
    }
    add(
        &metrics.raw_bytes_written,
        files.iter().map(|f| f.bytes).sum(),
    );
    add(&metrics.archive_files_written, files.len() as u64);
    add(&metrics.rollup_rows_merged, rows_merged);
    for (partition, range) in &batch.partitions {
        metrics.set_committed_offset(*partition, range.next_offset());
    }
    if let Some(newest) = batch.max_event_ms.values().max() {
        metrics
            .newest_committed_event_ms
            .fetch_max(*newest, Ordering::Relaxed);
    }
    metrics.commit_duration.observe(took.as_secs_f64());
}
