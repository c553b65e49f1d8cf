//! Rollup versions in the serving store: which version of each rollup the
//! API answers (`tally_rollup_live`), when each version's table was deployed
//! (`tally_rollups.recorded_at_ms`), a version's resumable backfill
//! (`tally_backfills`), and dropping a retired version's tables.

use std::collections::BTreeMap;

use rusqlite::params_from_iter;
use rusqlite::types::Value;
use sqlx::{AssertSqlSafe, Row};

use super::schema::{delta_table, merged_view, quote, Dialect};
use super::{db, Arg, Backend, ServingStore, SinkError};
use crate::serve::blocking;

/// A deployed rollup table.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployed {
    pub table: String,
    pub fingerprint: String,
    pub deployed_at_ms: i64,
}

/// A version's backfill by chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillProgress {
    pub from_ms: i64,
    pub to_ms: i64,
    /// Windows in `[from_ms, done_to_ms)` are backfilled.
    pub done_to_ms: i64,
}

fn values(args: &[Arg]) -> Vec<Value> {
    args.iter()
        .map(|a| match a {
            Arg::Int(v) => Value::Integer(*v),
            Arg::Text(v) => Value::Text(v.clone()),
        })
        .collect()
}

impl ServingStore {
    /// Run statements (`?` placeholders) in one transaction.
    async fn exec_all(
        &self,
        operation: &'static str,
        statements: Vec<(String, Vec<Arg>)>,
    ) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn(operation, |c| {
                    let tx = c.transaction()?;
                    for (text, args) in &statements {
                        tx.execute(text, params_from_iter(values(args)))?;
                    }
                    tx.commit()
                })
            }),
            Backend::Postgres(p) => {
                let mut tx = p.pool.begin().await.map_err(db(operation))?;
                for (text, args) in statements {
                    let mut q = sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(&text)));
                    for a in args {
                        q = match a {
                            Arg::Int(v) => q.bind(v),
                            Arg::Text(v) => q.bind(v),
                        };
                    }
                    q.execute(&mut *tx).await.map_err(db(operation))?;
                }
                tx.commit().await.map_err(db(operation))
            }
        }
    }

    /// Rows of `texts` text columns, then `ints` integer columns.
    async fn rows_of(
        &self,
        operation: &'static str,
        text: &str,
        args: Vec<Arg>,
        texts: usize,
        ints: usize,
    ) -> Result<Vec<(Vec<String>, Vec<i64>)>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn(operation, |c| {
                    let mut st = c.prepare_cached(text)?;
                    let rows = st.query_map(params_from_iter(values(&args)), |r| {
                        Ok((
                            (0..texts)
                                .map(|i| r.get::<_, String>(i))
                                .collect::<rusqlite::Result<Vec<String>>>()?,
                            (texts..texts + ints)
                                .map(|i| r.get::<_, i64>(i))
                                .collect::<rusqlite::Result<Vec<i64>>>()?,
                        ))
                    })?;
                    rows.collect()
                })
            }),
            Backend::Postgres(p) => {
                let mut q = sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(text)));
                for a in args {
                    q = match a {
                        Arg::Int(v) => q.bind(v),
                        Arg::Text(v) => q.bind(v),
                    };
                }
                let rows = q.fetch_all(&p.pool).await.map_err(db(operation))?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            (0..texts)
                                .map(|i| r.try_get::<String, _>(i))
                                .collect::<Result<Vec<String>, _>>()?,
                            (texts..texts + ints)
                                .map(|i| r.try_get::<i64, _>(i))
                                .collect::<Result<Vec<i64>, _>>()?,
                        ))
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(db(operation))
            }
        }
    }

    /// The version each promoted rollup answers from.
    pub async fn live_versions(&self) -> Result<BTreeMap<String, u32>, SinkError> {
        let rows = self
            .rows_of(
                "read live versions",
                "SELECT name, version FROM tally_rollup_live",
                Vec::new(),
                1,
                1,
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(n, v)| (n[0].clone(), u32::try_from(v[0]).unwrap_or(1)))
            .collect())
    }

    /// Make `version` the one the API answers for rollup `base`.
    pub async fn set_live(&self, base: &str, version: u32, now_ms: i64) -> Result<(), SinkError> {
        self.exec_all(
            "promote a rollup version",
            vec![(
                "INSERT INTO tally_rollup_live (name, version, promoted_at_ms) VALUES (?, ?, ?)
                 ON CONFLICT (name) DO UPDATE SET version = excluded.version, promoted_at_ms = excluded.promoted_at_ms"
                    .into(),
                vec![Arg::Text(base.into()), Arg::Int(i64::from(version)), Arg::Int(now_ms)],
            )],
        )
        .await
    }

    /// Every rollup table this store has been given, with the fingerprint of
    /// its definition and when it was created.
    pub async fn deployed(&self) -> Result<Vec<Deployed>, SinkError> {
        let text = "SELECT name, fingerprint, recorded_at_ms FROM tally_rollups ORDER BY name";
        let rows = self
            .rows_of("read rollup definitions", text, Vec::new(), 2, 1)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(t, i)| Deployed {
                table: t[0].clone(),
                fingerprint: t[1].clone(),
                deployed_at_ms: i[0],
            })
            .collect())
    }

    /// Where the chunked backfill of rollup table `table` is.
    pub async fn backfill_progress(
        &self,
        table: &str,
    ) -> Result<Option<BackfillProgress>, SinkError> {
        let rows = self
            .rows_of(
                "read backfill progress",
                "SELECT rollup, from_ms, to_ms, done_to_ms FROM tally_backfills WHERE rollup = ?",
                vec![Arg::Text(table.into())],
                1,
                3,
            )
            .await?;
        Ok(rows.first().map(|(_, v)| BackfillProgress {
            from_ms: v[0],
            to_ms: v[1],
            done_to_ms: v[2],
        }))
    }

    /// Record how far the chunked backfill of `table` has come.
    pub async fn record_backfill(
        &self,
        table: &str,
        p: BackfillProgress,
        now_ms: i64,
    ) -> Result<(), SinkError> {
        self.exec_all(
            "record backfill progress",
            vec![(
                "INSERT INTO tally_backfills (rollup, from_ms, to_ms, done_to_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (rollup) DO UPDATE SET from_ms = excluded.from_ms, to_ms = excluded.to_ms,
                   done_to_ms = excluded.done_to_ms, updated_at_ms = excluded.updated_at_ms"
                    .into(),
                vec![
                    Arg::Text(table.into()),
                    Arg::Int(p.from_ms),
                    Arg::Int(p.to_ms),
                    Arg::Int(p.done_to_ms),
                    Arg::Int(now_ms),
                ],
            )],
        )
        .await
    }

    /// Drop rollup table `table` (on SQLite also its delta table and view)
    /// and forget its definition and backfill, in one transaction.
    pub async fn drop_rollup(&self, table: &str) -> Result<(), SinkError> {
        let mut statements: Vec<(String, Vec<Arg>)> = Vec::new();
        if matches!(self.backend, Backend::Sqlite(_)) {
            statements.push((
                format!("DROP VIEW IF EXISTS {}", quote(&merged_view(table))),
                Vec::new(),
            ));
            statements.push((
                format!("DROP TABLE IF EXISTS {}", quote(&delta_table(table))),
                Vec::new(),
            ));
        }
        statements.push((format!("DROP TABLE IF EXISTS {}", quote(table)), Vec::new()));
        for t in [
            "tally_rollups WHERE name = ?",
            "tally_backfills WHERE rollup = ?",
        ] {
            statements.push((format!("DELETE FROM {t}"), vec![Arg::Text(table.into())]));
        }
        self.exec_all("drop a rollup version", statements).await
    }
}
