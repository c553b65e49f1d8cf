use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::record_batch::RecordBatch;

use super::*;
use crate::aggregate::rollup::{MergeRule, Value};
use crate::aggregate::RollupAggregator;
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder};

const BASE: i64 = 1_764_300_000_000;

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn hll_of<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut s = new_hll();
    for v in values {
        s.update(raw_bytes::from_str(v));
    }
    s.serialize()
}

fn kll_of(values: impl IntoIterator<Item = f64>) -> Vec<u8> {
    let mut s = new_kll();
    for v in values {
        s.update(KllFloat::<f64>::new(v).unwrap());
    }
    s.serialize()
}

#[test]
fn a_union_of_parts_is_the_sketch_of_the_whole() {
    let mut rng = Rng(7);
    let users: Vec<String> = (0..40_000)
        .map(|_| format!("u{}", rng.next() % 25_000))
        .collect();
    let exact = users.iter().collect::<BTreeSet<_>>().len() as f64;
    let whole = hll_of(users.iter().map(String::as_str));
    let parts: Vec<Vec<u8>> = users
        .chunks(3_000)
        .map(|c| hll_of(c.iter().map(String::as_str)))
        .collect();
    let merged = union(SketchKind::Distinct, parts.iter().map(Vec::as_slice))
        .unwrap()
        .unwrap();
    assert_eq!(canonical(&whole), canonical(&merged));
    // Pairwise merges in another order give the same registers.
    let mut folded = parts[parts.len() - 1].clone();
    for p in parts.iter().rev().skip(1) {
        folded = merge(SketchKind::Distinct, p, &folded).unwrap();
    }
    assert_eq!(canonical(&folded), canonical(&merged));
    for bytes in [&whole, &merged] {
        let e = estimate(bytes, None).unwrap().unwrap();
        // Within 3 standard errors of lg_k 12 (1.04 / 64).
        assert!(
            (e.value - exact).abs() <= 3.0 * 0.01625 * exact,
            "{} vs {exact}",
            e.value
        );
        assert!(e.low <= e.value && e.value <= e.high, "{e:?}");
        assert!(
            e.low <= exact * 1.05 && e.high >= exact * 0.95,
            "{e:?} vs {exact}"
        );
    }
    // Different rows, different canonical form.
    assert_ne!(canonical(&whole), canonical(&hll_of(["a", "b"])));
}

#[test]
fn small_distinct_counts_are_exact() {
    let e = estimate(&hll_of(["a", "b", "a", "c"]), None)
        .unwrap()
        .unwrap();
    assert!((e.value - 3.0).abs() < 0.01, "{e:?}");
}

#[test]
fn quantiles_merge_within_the_rank_error() {
    let mut rng = Rng(11);
    let values: Vec<f64> = (0..100_000)
        .map(|_| (rng.next() % 10_000) as f64 / 10.0)
        .collect();
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let parts: Vec<Vec<u8>> = values
        .chunks(7_000)
        .map(|c| kll_of(c.iter().copied()))
        .collect();
    let merged = union(SketchKind::Quantile, parts.iter().map(Vec::as_slice))
        .unwrap()
        .unwrap();
    for p in [0.5, 0.95, 0.99] {
        let e = estimate(&merged, Some(p)).unwrap().unwrap();
        // The true rank of the estimate is within the normalized rank error.
        let rank = sorted.partition_point(|v| *v <= e.value) as f64 / sorted.len() as f64;
        assert!(
            (rank - p).abs() <= 0.0165,
            "p{p}: value {} has rank {rank}",
            e.value
        );
        assert!(e.low <= e.value && e.value <= e.high, "{e:?}");
    }
    assert_eq!(
        canonical(&merged),
        format!(
            "kll n=100000 min=Some({:?}) max=Some({:?})",
            sorted[0],
            sorted[sorted.len() - 1]
        )
    );
}

#[test]
fn bytes_that_are_not_a_sketch_are_an_error_not_a_panic() {
    for junk in [
        &b""[..],
        b"\x01\x02\x07",
        b"\x02\x01\x07\x08\x03\x00\x00\x00\xff",
        b"\x05\x01\x0f\x00",
    ] {
        // An error, never a panic (the last is a KLL header with no body).
        let _ = estimate(junk, Some(0.5));
        assert!(union(SketchKind::Distinct, [junk]).is_err());
        assert!(union(SketchKind::Quantile, [junk]).is_err());
        let _ = canonical(junk);
    }
    assert_eq!(kind_of(&hll_of(["x"])), Some(SketchKind::Distinct));
    assert_eq!(kind_of(&kll_of([1.0])), Some(SketchKind::Quantile));
    assert_eq!(kind_of(b"xy"), None);
}

#[test]
fn null_is_the_identity_of_a_sketch_merge() {
    let a = Value::Bytes(hll_of(["a"]));
    assert_eq!(MergeRule::Distinct.merge(&a, &Value::Null), a);
    assert_eq!(MergeRule::Distinct.merge(&Value::Null, &a), a);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn batch(s: &Settings, lines: &[String]) -> RecordBatch {
    let schema = EventSchema::from_config(&s.schema).unwrap();
    let mut cols = schema.new_columns(lines.len());
    let d = RecordDecoder::new(schema, &s.decode);
    for l in lines {
        d.decode(Some(l.as_bytes()), BASE, &mut cols).unwrap();
    }
    cols.finish().unwrap()
}

/// The shipped sketch rollups, run batch by batch and merged as the store
/// merges, against exact answers computed here.
#[test]
fn shipped_sketch_rollups_are_within_their_error_of_exact() {
    let s = Settings::defaults().unwrap();
    let mut rng = Rng(99);
    let day = 86_400_000;
    let lines: Vec<String> = (0..30_000)
        .map(|i| {
            let video = rng.next() % 3;
            let user = rng.next() % 4_000;
            let t = BASE - 2 * day + (rng.next() % (2 * day as u64)) as i64;
            let kind = if i % 5 == 0 { "like" } else { "view" };
            let value = rng.next() % 1_000;
            format!(r#"{{"video_id":"v{video}","event_type":"{kind}","event_time":{t},"user_id":"u{user}","value":{value}}}"#)
        })
        .collect();
    // Exact: unique viewers per (video, day); values per (video, hour).
    let mut users: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    let mut values: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
    let mut views: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["event_type"] != "view" {
            continue;
        }
        let t = v["event_time"].as_i64().unwrap();
        let video = v["video_id"].as_str().unwrap().to_string();
        *views
            .entry((video.clone(), t - t.rem_euclid(day)))
            .or_default() += 1;
        users
            .entry((video.clone(), t - t.rem_euclid(day)))
            .or_default()
            .insert(v["user_id"].as_str().unwrap().to_string());
        values
            .entry((video, t - t.rem_euclid(3_600_000)))
            .or_default()
            .push(v["value"].as_f64().unwrap());
    }
    runtime().block_on(async {
        let schema = EventSchema::from_config(&s.schema).unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rollups");
        let catalog = crate::testing::catalog(&dir, schema.arrow.clone(), "event_time")
            .await
            .unwrap();
        let mut agg = RollupAggregator::new(&catalog, schema.arrow.clone())
            .await
            .unwrap();
        let mut stored: BTreeMap<(String, String, i64), Vec<Value>> = BTreeMap::new();
        for chunk in lines.chunks(2_500) {
            for out in agg.aggregate(&[batch(&s, chunk)]).await.unwrap() {
                if !["day_video_uniques", "hour_video_watch"].contains(&out.rollup.as_str()) {
                    continue;
                }
                let def = catalog.get(&out.rollup).unwrap();
                let rules: Vec<MergeRule> = def.measures().iter().filter_map(|c| c.merge).collect();
                for b in &out.batches {
                    for r in 0..b.num_rows() {
                        let Value::Text(video) = Value::from_array(b.column(0).as_ref(), r) else {
                            panic!()
                        };
                        let Value::Int(w) = Value::from_array(b.column(1).as_ref(), r) else {
                            panic!()
                        };
                        let vals: Vec<Value> = (2..b.num_columns())
                            .map(|c| Value::from_array(b.column(c).as_ref(), r))
                            .collect();
                        let e = stored
                            .entry((out.rollup.clone(), video, w))
                            .or_insert_with(|| vec![Value::Null; vals.len()]);
                        for ((e, v), rule) in e.iter_mut().zip(vals).zip(&rules) {
                            *e = rule.merge(e, &v);
                        }
                    }
                }
            }
        }
        let mut checked = 0;
        for ((rollup, video, w), cells) in &stored {
            if rollup == "day_video_uniques" {
                let exact = users[&(video.clone(), *w)].len() as f64;
                let Value::Bytes(b) = &cells[1] else {
                    panic!("{cells:?}")
                };
                let e = estimate(b, None).unwrap().unwrap();
                assert!(
                    (e.value - exact).abs() <= 3.0 * 0.01625 * exact + 0.5,
                    "{video} {w}: {} vs {exact}",
                    e.value
                );
                assert_eq!(cells[0], Value::Int(views[&(video.clone(), *w)]));
            } else {
                let mut v = values[&(video.clone(), *w)].clone();
                v.sort_by(f64::total_cmp);
                assert_eq!(cells[0], Value::Int(v.len() as i64));
                for (cell, p) in [(&cells[1], 0.5), (&cells[2], 0.95)] {
                    let Value::Bytes(b) = cell else { panic!() };
                    let e = estimate(b, Some(p)).unwrap().unwrap();
                    let lo = v.partition_point(|x| *x < e.value) as f64 / v.len() as f64;
                    let hi = v.partition_point(|x| *x <= e.value) as f64 / v.len() as f64;
                    // Small windows keep every value: the rank is exact.
                    assert!(
                        lo - 0.0165 <= p && p <= hi + 0.0165,
                        "{video} {w} p{p}: {} ranks {lo}..{hi}",
                        e.value
                    );
                }
            }
            checked += 1;
        }
        assert!(checked > 50, "{checked}");
    });
}
