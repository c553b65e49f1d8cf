//! Every rollup, served (`GET /v1/rollups`, `GET /v1/rollups/{name}`).
//!
//! Rollups with the same keys and measures (names, types, merge rules) and
//! windows that divide each other form a **family**, found from the plans:
//! a query of any member is split over the family's tiers like `/v1/count`
//! (coarsest windows in the middle, finer ones at the edges), and each
//! tier's retention is respected. The statement of a query is built here
//! from identifiers the SQL catalog validated; every value is a bound
//! parameter.

use std::collections::BTreeMap;

use crate::aggregate::{ColumnKind, MergeRule, SqlCatalog};
use crate::config::{Keep, RetentionConfig};
use crate::sink::serving::{quote, Arg, ReadPool};

use super::tiers::{Segment, Tier, Tiers};

/// A measure of a served rollup.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Measure {
    pub name: String,
    pub kind: ColumnKind,
    pub merge: MergeRule,
    /// `count`, `sum`, `min`, `max`.
    pub function: String,
}

#[derive(Debug, Clone)]
pub(crate) struct ServedRollup {
    pub name: String,
    pub file: String,
    /// The keys but the window, in SELECT order.
    pub keys: Vec<(String, ColumnKind)>,
    pub window: String,
    pub width_ms: i64,
    pub measures: Vec<Measure>,
    pub keep: Keep,
    pub fingerprint: String,
    pub family: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Family {
    /// Members, coarsest first (the order of `tiers`).
    pub members: Vec<String>,
    pub tiers: Tiers,
    /// Per tier: the tables that hold its rows (on SQLite also the delta).
    tables: Vec<Vec<String>>,
}

/// The served rollups and their families.
#[derive(Debug, Clone, Default)]
pub(crate) struct Served {
    pub rollups: Vec<ServedRollup>,
    pub families: Vec<Family>,
}

/// What a query asks, validated against its rollup.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ask {
    /// (key index, values): rows whose key is one of the values.
    pub filters: Vec<(usize, Vec<Arg>)>,
    /// Key indexes, in the order asked.
    pub group_by: Vec<usize>,
    /// Bucket width; the plan then holds one tier.
    pub granularity: Option<i64>,
    /// Measure index, descending.
    pub order_by: Option<usize>,
    pub limit: u32,
}

/// A statement, its arguments and the kinds of its columns: the group-by
/// keys, then the bucket start (with a granularity), then every measure.
#[derive(Debug)]
pub(crate) struct Statement {
    pub text: String,
    pub args: Vec<Arg>,
    pub kinds: Vec<ColumnKind>,
}

/// Keys and measures that make rollups one family.
fn signature(r: &ServedRollup) -> String {
    let mut keys: Vec<String> = r.keys.iter().map(|(n, k)| format!("{n}:{k:?}")).collect();
    keys.sort();
    let mut measures: Vec<String> = r
        .measures
        .iter()
        .map(|m| format!("{}:{:?}:{:?}", m.name, m.kind, m.merge))
        .collect();
    measures.sort();
    format!("{}|{}", keys.join(","), measures.join(","))
}

impl Served {
    pub(crate) fn from_catalog(
        catalog: &SqlCatalog,
        retention: &RetentionConfig,
        pool: &ReadPool,
    ) -> Served {
        let mut rollups: Vec<ServedRollup> = catalog
            .rollups
            .iter()
            .map(|d| ServedRollup {
                name: d.name.clone(),
                file: d.file.display().to_string(),
                keys: d
                    .keys()
                    .iter()
                    .filter(|c| c.name != d.window_name())
                    .map(|c| (c.name.clone(), c.kind))
                    .collect(),
                window: d.window_name().to_string(),
                width_ms: d.window_ms,
                measures: d
                    .measures()
                    .iter()
                    .filter_map(|c| {
                        Some(Measure {
                            name: c.name.clone(),
                            kind: c.kind,
                            merge: c.merge?,
                            function: c
                                .aggregate
                                .clone()
                                .unwrap_or_else(|| c.merge.map(|m| m.name()).unwrap_or("").into()),
                        })
                    })
                    .collect(),
                keep: retention.rollup(&d.name),
                fingerprint: d.fingerprint(),
                family: 0,
            })
            .collect();
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in rollups.iter().enumerate() {
            groups.entry(signature(r)).or_default().push(i);
        }
        let mut families = Vec::new();
        for (_, mut members) in groups {
            members.sort_by_key(|i| std::cmp::Reverse(rollups[*i].width_ms));
            let chain = members.windows(2).all(|w| {
                let (a, b) = (rollups[w[0]].width_ms, rollups[w[1]].width_ms);
                a != b && b > 0 && a % b == 0
            });
            let parts: Vec<Vec<usize>> = if chain {
                vec![members]
            } else {
                members.into_iter().map(|i| vec![i]).collect()
            };
            for part in parts {
                let tiers = Tiers {
                    tiers: part
                        .iter()
                        .map(|i| {
                            let r = &rollups[*i];
                            Tier {
                                rollup: r.name.clone(),
                                window: r.window.clone(),
                                width_ms: r.width_ms,
                                keep: r.keep,
                            }
                        })
                        .collect(),
                };
                let tables = part
                    .iter()
                    .map(|i| pool.tables_of(&rollups[*i].name))
                    .collect();
                for i in &part {
                    rollups[*i].family = families.len();
                }
                families.push(Family {
                    members: part.iter().map(|i| rollups[*i].name.clone()).collect(),
                    tiers,
                    tables,
                });
            }
        }
        Served { rollups, families }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&ServedRollup> {
        self.rollups.iter().find(|r| r.name == name)
    }

    pub(crate) fn family(&self, r: &ServedRollup) -> &Family {
        &self.families[r.family]
    }

    pub(crate) fn names(&self) -> String {
        self.rollups
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The merged value of a measure over the rows `r`; integer sums cast back
/// to BIGINT (PostgreSQL sums BIGINT into NUMERIC).
fn merged(m: &Measure) -> String {
    let c = format!("r.{}", quote(&m.name));
    match (m.merge, m.kind) {
        (MergeRule::Sum, ColumnKind::Int) => format!("CAST(coalesce(sum({c}), 0) AS BIGINT)"),
        (MergeRule::Sum, _) => format!("coalesce(sum({c}), 0.0)"),
        (MergeRule::Min, _) => format!("min({c})"),
        (MergeRule::Max, _) => format!("max({c})"),
    }
}

/// The statement answering `ask` over `plan` (pieces of `family`'s tiers).
pub(crate) fn statement(
    r: &ServedRollup,
    family: &Family,
    plan: &[Segment],
    ask: &Ask,
) -> Statement {
    let mut args: Vec<Arg> = Vec::new();
    let mut arg = |a: Arg| {
        args.push(a);
        format!("?{}", args.len())
    };
    let keys: Vec<String> = ask.group_by.iter().map(|k| quote(&r.keys[*k].0)).collect();
    let measures: Vec<String> = r.measures.iter().map(|m| quote(&m.name)).collect();
    let mut parts = Vec::new();
    for seg in plan {
        let tier = &family.tiers.tiers[seg.tier];
        let w = quote(&tier.window);
        for table in &family.tables[seg.tier] {
            let mut cols: Vec<String> = keys.clone();
            if ask.granularity.is_some() {
                cols.push(format!("{w} AS tally_bucket"));
            }
            cols.extend(measures.iter().cloned());
            let mut cond = vec![
                format!("{w} >= {}", arg(Arg::Int(seg.lo))),
                format!("{w} < {}", arg(Arg::Int(seg.hi))),
            ];
            for (k, values) in &ask.filters {
                let list: Vec<String> = values.iter().map(|v| arg(v.clone())).collect();
                cond.push(format!("{} IN ({})", quote(&r.keys[*k].0), list.join(", ")));
            }
            parts.push(format!(
                "SELECT {} FROM {table} WHERE {}",
                cols.join(", "),
                cond.join(" AND ")
            ));
        }
    }
    let mut select: Vec<String> = keys.iter().map(|k| format!("r.{k}")).collect();
    let mut group: Vec<String> = select.clone();
    if let Some(g) = ask.granularity {
        let g = arg(Arg::Int(g));
        select.push(format!("(r.tally_bucket / {g}) * {g} AS tally_b"));
        group.push("tally_b".into());
    }
    select.extend(r.measures.iter().map(merged));
    let mut text = format!(
        "SELECT {} FROM ({}) r",
        select.join(", "),
        parts.join(" UNION ALL ")
    );
    if !group.is_empty() {
        text.push_str(&format!(" GROUP BY {}", group.join(", ")));
        let mut order: Vec<String> = Vec::new();
        if let Some(m) = ask.order_by {
            // The measure's position in the select list.
            order.push(format!("{} DESC", select.len() - r.measures.len() + m + 1));
        }
        order.extend(group.iter().cloned());
        text.push_str(&format!(" ORDER BY {}", order.join(", ")));
        // One more than asked: tells whether the answer was cut.
        let limit = arg(Arg::Int(i64::from(ask.limit) + 1));
        text.push_str(&format!(" LIMIT {limit}"));
    }
    let mut kinds: Vec<ColumnKind> = ask.group_by.iter().map(|k| r.keys[*k].1).collect();
    if ask.granularity.is_some() {
        kinds.push(ColumnKind::Int);
    }
    kinds.extend(r.measures.iter().map(|m| m.kind));
    Statement { text, args, kinds }
}
