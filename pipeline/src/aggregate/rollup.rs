//! The merge algebra of rollup measures, and [`RollupTable`], an in-memory
//! reference store used by tests and by jobs that merge partial results.
//!
//! count and sum add, min takes the least, max the greatest; NULL (no value
//! seen) is the identity of every rule. The serving store implements the same
//! rules in SQL.

#[cfg(test)]
use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
#[cfg(test)]
use datafusion::arrow::record_batch::RecordBatch;

#[cfg(test)]
use super::catalog::RollupDef;
use super::sketch::SketchKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRule {
    Sum,
    Min,
    Max,
    /// The union of HyperLogLog sketches.
    Distinct,
    /// The merge of KLL quantile sketches.
    Quantile,
}

impl MergeRule {
    pub fn name(&self) -> &'static str {
        match self {
            MergeRule::Sum => "sum",
            MergeRule::Min => "min",
            MergeRule::Max => "max",
            MergeRule::Distinct => "hll_union",
            MergeRule::Quantile => "kll_merge",
        }
    }

    /// The sketch a sketch measure keeps.
    pub(crate) fn sketch(self) -> Option<SketchKind> {
        match self {
            MergeRule::Distinct => Some(SketchKind::Distinct),
            MergeRule::Quantile => Some(SketchKind::Quantile),
            _ => None,
        }
    }

    pub fn merge(self, a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Null, x) | (x, Value::Null) => x.clone(),
            (Value::Bytes(x), Value::Bytes(y)) => match self
                .sketch()
                .and_then(|k| super::sketch::merge(k, x, y).ok())
            {
                Some(m) => Value::Bytes(m),
                None => Value::Null,
            },
            (Value::Int(x), Value::Int(y)) => Value::Int(match self {
                MergeRule::Sum => x.wrapping_add(*y),
                MergeRule::Min => *x.min(y),
                _ => *x.max(y),
            }),
            (x, y) => {
                let (x, y) = (x.as_f64(), y.as_f64());
                Value::Real(match self {
                    MergeRule::Sum => x + y,
                    MergeRule::Min => x.min(y),
                    _ => x.max(y),
                })
            }
        }
    }
}

/// A cell value in canonical form.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    /// A serialized sketch.
    Bytes(Vec<u8>),
}

impl Value {
    fn as_f64(&self) -> f64 {
        match self {
            Value::Int(i) => *i as f64,
            Value::Real(f) => *f,
            _ => f64::NAN,
        }
    }

    /// Read row `i` of a canonical column.
    pub fn from_array(arr: &dyn Array, i: usize) -> Value {
        if arr.is_null(i) {
            return Value::Null;
        }
        match arr.data_type() {
            DataType::Int64 => Value::Int(arr.as_primitive::<Int64Type>().value(i)),
            DataType::Float64 => Value::Real(arr.as_primitive::<Float64Type>().value(i)),
            DataType::Utf8 => Value::Text(arr.as_string::<i32>().value(i).to_string()),
            DataType::Binary => Value::Bytes(arr.as_binary::<i32>().value(i).to_vec()),
            _ => Value::Null,
        }
    }
}

#[cfg(test)]
/// Key of a rollup row: the key columns as text/integers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum KeyPart {
    Int(i64),
    Text(String),
}

#[cfg(test)]
/// An in-memory rollup: key -> measures, merged with the rollup's rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RollupTable {
    pub rows: BTreeMap<Vec<KeyPart>, Vec<Value>>,
}

#[cfg(test)]
impl RollupTable {
    /// Merge canonical output rows of `def` into the table.
    pub(crate) fn merge_batch(&mut self, def: &RollupDef, batch: &RecordBatch) {
        let rules: Vec<_> = def.measures().iter().filter_map(|c| c.merge).collect();
        for i in 0..batch.num_rows() {
            let key: Vec<KeyPart> = (0..def.key_count)
                .map(|c| match Value::from_array(batch.column(c).as_ref(), i) {
                    Value::Int(v) => KeyPart::Int(v),
                    Value::Text(s) => KeyPart::Text(s),
                    other => KeyPart::Text(format!("{other:?}")),
                })
                .collect();
            let vals: Vec<Value> = (def.key_count..batch.num_columns())
                .map(|c| Value::from_array(batch.column(c).as_ref(), i))
                .collect();
            self.merge_row(key, &rules, vals);
        }
    }

    pub(crate) fn merge_row(&mut self, key: Vec<KeyPart>, rules: &[MergeRule], vals: Vec<Value>) {
        match self.rows.get_mut(&key) {
            Some(existing) => {
                for ((e, v), rule) in existing.iter_mut().zip(vals.iter()).zip(rules) {
                    *e = rule.merge(e, v);
                }
            }
            None => {
                self.rows.insert(key, vals);
            }
        }
    }

    /// The table with each sketch in its canonical form (see
    /// [`super::sketch::canonical`]).
    pub(crate) fn canonical(&self) -> RollupTable {
        let mut t = self.clone();
        for vals in t.rows.values_mut() {
            for v in vals.iter_mut() {
                if let Value::Bytes(b) = v {
                    *v = Value::Text(super::sketch::canonical(b));
                }
            }
        }
        t
    }

    /// Merge another table into this one.
    pub(crate) fn merge_table(&mut self, rules: &[MergeRule], other: &RollupTable) {
        for (k, v) in &other.rows {
            self.merge_row(k.clone(), rules, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::RollupAggregator;
    use crate::config::Settings;
    use crate::decode::{EventSchema, RecordDecoder};
    use proptest::prelude::*;

    const BASE: i64 = 1_764_300_000_000;

    #[derive(Debug, Clone)]
    struct Ev {
        video: u8,
        kind: u8,
        minute: i64,
        value: Option<i32>,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        (
            0u8..6,
            0u8..3,
            0i64..180,
            proptest::option::of(-50i32..1000),
        )
            .prop_map(|(video, kind, minute, value)| Ev {
                video,
                kind,
                minute,
                value,
            })
    }

    fn json(e: &Ev) -> String {
        let kinds = ["view", "like", "share"];
        let t = BASE - 200 * 60_000 + e.minute * 60_000 + 1234;
        match e.value {
            Some(v) => format!(
                r#"{{"video_id":"v{}","event_type":"{}","event_time":{t},"value":{v}}}"#,
                e.video, kinds[e.kind as usize]
            ),
            None => format!(
                r#"{{"video_id":"v{}","event_type":"{}","event_time":{t}}}"#,
                e.video, kinds[e.kind as usize]
            ),
        }
    }

    fn to_batch(s: &Settings, events: &[Ev]) -> RecordBatch {
        let schema = EventSchema::from_config(&s.schema).unwrap();
        let mut cols = schema.new_columns(events.len());
        let d = RecordDecoder::new(schema, &s.decode);
        for e in events {
            d.decode(Some(json(e).as_bytes()), BASE, &mut cols).unwrap();
        }
        cols.finish().unwrap()
    }

    /// The naive oracle: hourly and minutely rollups computed directly.
    fn oracle(events: &[Ev], width_min: i64) -> RollupTable {
        let kinds = ["view", "like", "share"];
        let mut t = RollupTable::default();
        // events, value_sum, value_count, value_min, value_max
        let rules = [
            MergeRule::Sum,
            MergeRule::Sum,
            MergeRule::Sum,
            MergeRule::Min,
            MergeRule::Max,
        ];
        for e in events {
            let ts = BASE - 200 * 60_000 + e.minute * 60_000 + 1234;
            let w = ts - ts.rem_euclid(width_min * 60_000);
            let key = vec![
                KeyPart::Text(format!("v{}", e.video)),
                KeyPart::Text(kinds[e.kind as usize].to_string()),
                KeyPart::Int(w),
            ];
            let v = e.value.map_or(Value::Null, |v| Value::Real(f64::from(v)));
            let counted = Value::Int(i64::from(e.value.is_some()));
            t.merge_row(
                key,
                &rules,
                vec![Value::Int(1), v.clone(), counted, v.clone(), v],
            );
        }
        t
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn sql_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rollups")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any split into batches, applied in any order, equals one pass and
        /// equals the naive oracle.
        #[test]
        fn chunking_and_order_do_not_change_rollups(
            events in proptest::collection::vec(ev(), 0..120),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
            order_seed in any::<u64>(),
        ) {
            let s = Settings::defaults().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let schema = EventSchema::from_config(&s.schema).unwrap();
                let catalog = crate::testing::catalog(&sql_dir(), schema.arrow.clone(), "event_time").await.unwrap();
                let mut agg = RollupAggregator::new(&catalog, schema.arrow.clone()).await.unwrap();

                let mut bounds: Vec<usize> = cuts.iter().map(|i| i.index(events.len() + 1)).collect();
                bounds.push(0);
                bounds.push(events.len());
                bounds.sort();
                let mut chunks: Vec<&[Ev]> = bounds.windows(2).map(|w| &events[w[0]..w[1]]).collect();
                // deterministic shuffle
                let mut x = order_seed | 1;
                for i in (1..chunks.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    chunks.swap(i, (x % (i as u64 + 1)) as usize);
                }

                let single = agg.aggregate(&[to_batch(&s, &events)]).await.unwrap();
                let defs: Vec<RollupDef> = agg.defs().cloned().collect();
                let mut merged: Vec<RollupTable> = vec![RollupTable::default(); defs.len()];
                for chunk in chunks {
                    let out = agg.aggregate(&[to_batch(&s, chunk)]).await.unwrap();
                    for (i, o) in out.iter().enumerate() {
                        let rules: Vec<_> = defs[i].measures().iter().filter_map(|c| c.merge).collect();
                        let mut part = RollupTable::default();
                        for b in &o.batches { part.merge_batch(&defs[i], b); }
                        merged[i].merge_table(&rules, &part);
                    }
                }
                for (i, def) in defs.iter().enumerate() {
                    let mut one = RollupTable::default();
                    for b in &single[i].batches { one.merge_batch(def, b); }
                    // Sketches merged from parts equal the one-pass sketch
                    // in their canonical form.
                    prop_assert_eq!(&merged[i].canonical(), &one.canonical(), "rollup {}", def.name);
                    if !def.name.ends_with("_video_events") {
                        continue; // the oracle knows the per-video rollups
                    }
                    let width_min = def.window_ms / 60_000;
                    prop_assert_eq!(&one, &oracle(&events, width_min), "rollup {} vs oracle", def.name);
                }
                Ok(())
            })?;
        }

        #[test]
        fn merge_has_identity_and_commutes(a in proptest::option::of(-1000i64..1000), b in proptest::option::of(-1000i64..1000), c in proptest::option::of(-1000i64..1000)) {
            let v = |x: Option<i64>| x.map_or(Value::Null, Value::Int);
            for rule in [MergeRule::Sum, MergeRule::Min, MergeRule::Max] {
                prop_assert_eq!(rule.merge(&v(a), &Value::Null), v(a));
                prop_assert_eq!(rule.merge(&v(a), &v(b)), rule.merge(&v(b), &v(a)));
                prop_assert_eq!(
                    rule.merge(&rule.merge(&v(a), &v(b)), &v(c)),
                    rule.merge(&v(a), &rule.merge(&v(b), &v(c)))
                );
            }
        }
    }
}
