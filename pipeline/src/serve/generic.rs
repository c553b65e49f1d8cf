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
    /// `count`, `sum`, `min`, `max`, `approx_distinct`,
    /// `approx_percentile_cont`.
    pub function: String,
    /// The percentile a quantile sketch answers.
    pub quantile: Option<f64>,
}

#[derive(Debug, Clone)]
pub(crate) struct ServedRollup {
    /// The API's name: the rollup's for the version it answers from,
    /// `rollup@N` for its other versions.
    pub name: String,
    /// The serving table (the file stem).
    pub table: String,
    /// The rollup this is a version of.
    pub base: String,
    pub version: u32,
    /// This is the version `rollup` answers from.
    pub live: bool,
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

impl ServedRollup {
    /// The index of key `name`.
    pub(crate) fn key(&self, name: &str) -> Option<usize> {
        self.keys.iter().position(|(n, _)| n == name)
    }

    /// The index of measure `name`.
    pub(crate) fn measure(&self, name: &str) -> Option<usize> {
        self.measures.iter().position(|m| m.name == name)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Family {
    /// Members, coarsest first (the order of `tiers`).
    pub members: Vec<String>,
    pub tiers: Tiers,
    /// Per tier: the tables that hold its rows (on SQLite also the delta).
    tables: Vec<Vec<String>>,
    /// Per tier: the primary key's columns in order (the window among them).
    pk: Vec<Vec<String>>,
    /// The aggregate that merges sketch cells (see `ReadPool::sketch_union`).
    sketch_union: &'static str,
    /// Every table has an index on its window (`serving.window_index`):
    /// a range of windows is an index range, no walk of the leading key
    /// is needed.
    window_index: bool,
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
    /// Measure indexes to answer, in order; empty: every measure.
    pub measures: Vec<usize>,
}

/// A statement, its arguments and the kinds of its columns: the group-by
/// keys, then the bucket start (with a granularity), then the measures
/// asked (every measure unless [`Ask::measures`] names some).
#[derive(Debug)]
pub(crate) struct Statement {
    pub text: String,
    pub args: Vec<Arg>,
    pub kinds: Vec<ColumnKind>,
    /// Every piece reads index ranges under filtered leading keys (a
    /// point read, like a count); otherwise it may scan.
    pub point: bool,
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
    /// Every rollup of `catalog`; of a rollup with versions, the one `live`
    /// names (see [`SqlCatalog::live`]) under the rollup's name, the others
    /// as `name@N` (each its own family).
    pub(crate) fn from_catalog(
        catalog: &SqlCatalog,
        retention: &RetentionConfig,
        pool: &ReadPool,
        live: &BTreeMap<String, u32>,
    ) -> Served {
        let mut rollups: Vec<ServedRollup> = catalog
            .rollups
            .iter()
            .map(|d| {
                let is_live = catalog
                    .live(&d.base, live)
                    .is_some_and(|l| l.name == d.name);
                (d, is_live)
            })
            .map(|(d, is_live)| ServedRollup {
                name: if is_live {
                    d.base.clone()
                } else {
                    format!("{}@{}", d.base, d.version)
                },
                table: d.name.clone(),
                base: d.base.clone(),
                version: d.version,
                live: is_live,
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
                            quantile: c.quantile,
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
            // A version not answered under its rollup's name is a family
            // of its own.
            let key = if r.live {
                signature(r)
            } else {
                format!("@{}", r.name)
            };
            groups.entry(key).or_default().push(i);
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
                                rollup: r.table.clone(),
                                window: r.window.clone(),
                                width_ms: r.width_ms,
                                keep: r.keep,
                            }
                        })
                        .collect(),
                };
                let tables = part
                    .iter()
                    .map(|i| pool.tables_of(&rollups[*i].table))
                    .collect();
                let pk = part
                    .iter()
                    .map(|i| {
                        catalog
                            .get(&rollups[*i].table)
                            .map(|d| d.keys().iter().map(|c| c.name.clone()).collect())
                            .unwrap_or_default()
                    })
                    .collect();
                for i in &part {
                    rollups[*i].family = families.len();
                }
                families.push(Family {
                    members: part.iter().map(|i| rollups[*i].name.clone()).collect(),
                    tiers,
                    tables,
                    pk,
                    sketch_union: pool.sketch_union(),
                    window_index: pool.window_index(),
                });
            }
        }
        Served { rollups, families }
    }

    /// The rollup behind `/v1/count` and `/v1/stats` (the tiers of
    /// `api.rollups`, at their live versions) as a served rollup and a
    /// family of exactly those tiers, so those endpoints are answered by
    /// [`statement`] like any rollup.
    pub(crate) fn seed(
        catalog: &SqlCatalog,
        tiers: &Tiers,
        pool: &ReadPool,
    ) -> Option<(ServedRollup, Family)> {
        let first = catalog.get(&tiers.tiers.first()?.rollup)?;
        let r = ServedRollup {
            name: first.base.clone(),
            table: first.name.clone(),
            base: first.base.clone(),
            version: first.version,
            live: true,
            file: first.file.display().to_string(),
            keys: first
                .keys()
                .iter()
                .filter(|c| c.name != first.window_name())
                .map(|c| (c.name.clone(), c.kind))
                .collect(),
            window: first.window_name().to_string(),
            width_ms: first.window_ms,
            measures: first
                .measures()
                .iter()
                .filter_map(|c| {
                    Some(Measure {
                        name: c.name.clone(),
                        kind: c.kind,
                        merge: c.merge?,
                        function: c.aggregate.clone().unwrap_or_default(),
                        quantile: c.quantile,
                    })
                })
                .collect(),
            keep: tiers.tiers.first()?.keep,
            fingerprint: first.fingerprint(),
            family: 0,
        };
        let family = Family {
            members: tiers.tiers.iter().map(|t| t.rollup.clone()).collect(),
            tiers: tiers.clone(),
            tables: tiers
                .tiers
                .iter()
                .map(|t| pool.tables_of(&t.rollup))
                .collect(),
            pk: tiers
                .tiers
                .iter()
                .map(|t| {
                    catalog
                        .get(&t.rollup)
                        .map(|d| d.keys().iter().map(|c| c.name.clone()).collect())
                        .unwrap_or_default()
                })
                .collect(),
            sketch_union: pool.sketch_union(),
            window_index: pool.window_index(),
        };
        Some((r, family))
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
fn merged(m: &Measure, sketch_union: &str) -> String {
    let c = format!("r.{}", quote(&m.name));
    match (m.merge, m.kind) {
        (MergeRule::Distinct | MergeRule::Quantile, _) => format!("{sketch_union}({c})"),
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
    let chosen: Vec<&Measure> = if ask.measures.is_empty() {
        r.measures.iter().collect()
    } else {
        ask.measures
            .iter()
            .filter_map(|i| r.measures.get(*i))
            .collect()
    };
    let measures: Vec<String> = chosen.iter().map(|m| quote(&m.name)).collect();
    let mut parts = Vec::new();
    let mut ctes: Vec<String> = Vec::new();
    // One walk per tier, shared by its segments (a tier has at most two).
    let mut walks: BTreeMap<usize, String> = BTreeMap::new();
    for seg in plan {
        let tier = &family.tiers.tiers[seg.tier];
        let w = quote(&tier.window);
        if let Some(skip) = skip_scan(r, family, seg.tier, ask) {
            let cte = match walks.get(&seg.tier) {
                Some(name) => name.clone(),
                None => {
                    let name = format!("tally_k{}", ctes.len());
                    ctes.push(skip.cte(&name, &family.tables[seg.tier], &mut arg));
                    walks.insert(seg.tier, name.clone());
                    name
                }
            };
            for table in &family.tables[seg.tier] {
                let mut cols: Vec<String> = keys.iter().map(|k| format!("t.{k}")).collect();
                if ask.granularity.is_some() {
                    cols.push(format!("t.{w} AS tally_bucket"));
                }
                cols.extend(measures.iter().map(|m| format!("t.{m}")));
                let on: Vec<String> = skip
                    .prefix
                    .iter()
                    .chain(std::iter::once(&skip.middle))
                    .enumerate()
                    .map(|(i, k)| format!("t.{} = {cte}.c{i}", quote(k)))
                    .collect();
                parts.push(format!(
                    "SELECT {} FROM {cte} JOIN {table} t ON {} WHERE t.{w} >= {} AND t.{w} < {}",
                    cols.join(", "),
                    on.join(" AND "),
                    arg(Arg::Int(seg.lo)),
                    arg(Arg::Int(seg.hi)),
                ));
            }
            continue;
        }
        if let Some(lead) = lead_walk(r, family, seg.tier, ask) {
            let cte = match walks.get(&seg.tier) {
                Some(name) => name.clone(),
                None => {
                    let name = format!("tally_k{}", ctes.len());
                    ctes.push(lead_walk_cte(&name, &lead, &family.tables[seg.tier]));
                    walks.insert(seg.tier, name.clone());
                    name
                }
            };
            for table in &family.tables[seg.tier] {
                let mut cols: Vec<String> = keys.iter().map(|k| format!("t.{k}")).collect();
                if ask.granularity.is_some() {
                    cols.push(format!("t.{w} AS tally_bucket"));
                }
                cols.extend(measures.iter().map(|m| format!("t.{m}")));
                let mut cond = vec![
                    format!("t.{w} >= {}", arg(Arg::Int(seg.lo))),
                    format!("t.{w} < {}", arg(Arg::Int(seg.hi))),
                ];
                for (k, values) in &ask.filters {
                    let list: Vec<String> = values.iter().map(|v| arg(v.clone())).collect();
                    cond.push(format!(
                        "t.{} IN ({})",
                        quote(&r.keys[*k].0),
                        list.join(", ")
                    ));
                }
                parts.push(format!(
                    "SELECT {} FROM {cte} JOIN {table} t ON t.{} = {cte}.c0 WHERE {}",
                    cols.join(", "),
                    quote(&lead),
                    cond.join(" AND ")
                ));
            }
            continue;
        }
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
    select.extend(chosen.iter().map(|m| merged(m, family.sketch_union)));
    let with = if ctes.is_empty() {
        String::new()
    } else {
        format!("WITH RECURSIVE {} ", ctes.join(", "))
    };
    let mut text = format!(
        "{with}SELECT {} FROM ({}) r",
        select.join(", "),
        parts.join(" UNION ALL ")
    );
    if !group.is_empty() {
        text.push_str(&format!(" GROUP BY {}", group.join(", ")));
        let mut order: Vec<String> = Vec::new();
        let position = |m: usize| {
            if ask.measures.is_empty() {
                Some(m)
            } else {
                ask.measures.iter().position(|i| *i == m)
            }
        };
        if let Some(m) = ask.order_by.and_then(position) {
            // The measure's position in the select list.
            order.push(format!("{} DESC", select.len() - chosen.len() + m + 1));
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
    kinds.extend(chosen.iter().map(|m| m.kind));
    let point = plan.iter().all(|seg| {
        family
            .pk
            .get(seg.tier)
            .and_then(|pk| pk.first())
            .is_some_and(|lead| {
                ask.filters
                    .iter()
                    .any(|(k, _)| r.keys.get(*k).is_some_and(|(n, _)| n == lead))
            })
    });
    Statement {
        text,
        args,
        kinds,
        point,
    }
}

/// Combinations of filter values a skip-scan enumerates at most.
const MAX_SKIP_PREFIXES: usize = 1_000;

/// An index skip-scan for a tier whose primary key is (filtered keys…,
/// one unfiltered key, window): without it, the filtered prefix's whole
/// history is read to find the window range under each value of the middle
/// key. A recursive CTE walks the middle key's distinct values under each
/// combination of filter values (one B-tree probe per value and table), and
/// each table is joined on the full prefix with the window range.
struct SkipScan {
    /// The filtered keys, in primary-key order, with their values.
    prefix: Vec<String>,
    values: Vec<Vec<Arg>>,
    middle: String,
}

fn skip_scan(r: &ServedRollup, family: &Family, tier: usize, ask: &Ask) -> Option<SkipScan> {
    let pk = family.pk.get(tier)?;
    let window = &family.tiers.tiers.get(tier)?.window;
    let (last, rest) = pk.split_last()?;
    let (middle, prefix) = rest.split_last()?;
    if last != window || prefix.is_empty() {
        return None;
    }
    let filtered = |name: &str| {
        ask.filters
            .iter()
            .find(|(k, _)| r.keys.get(*k).is_some_and(|(n, _)| n == name))
            .map(|(_, v)| v.clone())
    };
    if filtered(middle).is_some() {
        return None;
    }
    let values: Vec<Vec<Arg>> = prefix.iter().map(|k| filtered(k)).collect::<Option<_>>()?;
    let combos: usize = values.iter().map(Vec::len).product();
    (combos <= MAX_SKIP_PREFIXES).then(|| SkipScan {
        prefix: prefix.to_vec(),
        values,
        middle: middle.clone(),
    })
}

impl SkipScan {
    /// `name(c0, …, cN)`: each combination of prefix values with each
    /// distinct middle value found in any of `tables`.
    fn cte(&self, name: &str, tables: &[String], arg: &mut impl FnMut(Arg) -> String) -> String {
        // Every combination of filter values, as VALUES rows (column1…).
        let mut rows: Vec<Vec<Arg>> = vec![Vec::new()];
        for vals in &self.values {
            rows = rows
                .into_iter()
                .flat_map(|row| {
                    vals.iter().map(move |v| {
                        let mut r = row.clone();
                        r.push(v.clone());
                        r
                    })
                })
                .collect();
        }
        let values: Vec<String> = rows
            .into_iter()
            .map(|row| {
                let cells: Vec<String> = row.into_iter().map(&mut *arg).collect();
                format!("({})", cells.join(", "))
            })
            .collect();
        let n = self.prefix.len();
        let m = quote(&self.middle);
        let first_of = |outer: &str, after: bool| {
            let mins: Vec<String> = tables
                .iter()
                .map(|t| {
                    let mut cond: Vec<String> = self
                        .prefix
                        .iter()
                        .enumerate()
                        .map(|(i, k)| format!("{} = {outer}.{}", quote(k), col(outer, i)))
                        .collect();
                    if after {
                        cond.push(format!("{m} > {outer}.c{n}"));
                    }
                    format!("SELECT min({m}) AS v FROM {t} WHERE {}", cond.join(" AND "))
                })
                .collect();
            format!("(SELECT min(v) FROM ({}) f)", mins.join(" UNION ALL "))
        };
        let cols: Vec<String> = (0..=n).map(|i| format!("c{i}")).collect();
        let seed_prefix: Vec<String> = (0..n).map(|i| format!("p.column{}", i + 1)).collect();
        let step_prefix: Vec<String> = (0..n).map(|i| format!("{name}.c{i}")).collect();
        format!(
            "{name}({}) AS (SELECT {}, {} FROM (VALUES {}) p \
             UNION ALL SELECT {}, {} FROM {name} WHERE {name}.c{n} IS NOT NULL)",
            cols.join(", "),
            seed_prefix.join(", "),
            first_of("p", false),
            values.join(", "),
            step_prefix.join(", "),
            first_of(name, true),
        )
    }
}

/// The leading key of a tier whose primary key is (an unfiltered leading
/// key, filtered keys…, window), such as views per channel (channel,
/// event_type, window) filtered on the type: without an index on the window,
/// such a query reads the whole table. Walking the leading key's distinct
/// values (one B-tree probe each) lets every value seek its window range.
/// With an index on the window (`serving.window_index`) the range is read
/// through it instead.
fn lead_walk(r: &ServedRollup, family: &Family, tier: usize, ask: &Ask) -> Option<String> {
    if family.window_index {
        return None;
    }
    let pk = family.pk.get(tier)?;
    let window = &family.tiers.tiers.get(tier)?.window;
    let (last, rest) = pk.split_last()?;
    let (lead, middle) = rest.split_first()?;
    let filtered = |name: &str| {
        ask.filters
            .iter()
            .any(|(k, _)| r.keys.get(*k).is_some_and(|(n, _)| n == name))
    };
    (last == window && !filtered(lead) && middle.iter().all(|k| filtered(k))).then(|| lead.clone())
}

/// `name(c0)`: the distinct values of `lead` in any of `tables`, ascending.
fn lead_walk_cte(name: &str, lead: &str, tables: &[String]) -> String {
    let lead = quote(lead);
    let first = |after: Option<&str>| {
        let mins: Vec<String> = tables
            .iter()
            .map(|t| match after {
                Some(prev) => format!("SELECT min({lead}) AS v FROM {t} WHERE {lead} > {prev}"),
                None => format!("SELECT min({lead}) AS v FROM {t}"),
            })
            .collect();
        format!("(SELECT min(v) FROM ({}) f)", mins.join(" UNION ALL "))
    };
    format!(
        "{name}(c0) AS (SELECT {} UNION ALL SELECT {} FROM {name} WHERE {name}.c0 IS NOT NULL)",
        first(None),
        first(Some(&format!("{name}.c0"))),
    )
}

/// Column `i` of the prefix in `outer`: VALUES rows name theirs
/// `column1`…, the CTE `c0`….
fn col(outer: &str, i: usize) -> String {
    if outer == "p" {
        format!("column{}", i + 1)
    } else {
        format!("c{i}")
    }
}
