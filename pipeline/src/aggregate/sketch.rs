//! Mergeable sketches: `approx_distinct(x)` as a HyperLogLog sketch and
//! `approx_percentile_cont(x, p)` as a KLL quantile sketch, both in the
//! Apache DataSketches binary formats (the `datasketches` crate), so the
//! bytes tally stores are read by Python's `datasketches`, Druid and Pinot.
//!
//! In a rollup the two functions are tally's: they return the sketch of
//! their group (a BLOB / BYTEA cell) instead of a number. Sketches merge on
//! every commit and across windows and tiers at query time; the API turns a
//! merged sketch into its estimate and error bounds ([`estimate`]).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::{format_state_name, AggregateOrderSensitivity};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datasketches::common::{NumStdDev, SearchCriteria};
use datasketches::hash::value::{canonical_float, raw_bytes};
use datasketches::hll::{HllSketch, HllType, HllUnion};
use datasketches::kll::{KllFloat, KllSketch};

/// log2 of the HLL sketch's buckets: 4,096 buckets, a relative standard
/// error of about 1.6% (1.04 / sqrt(4096)), at most ~4 KiB a sketch.
pub(crate) const HLL_LG_K: u8 = 12;
/// The KLL sketch's size parameter: a normalized rank error of about 1.65%
/// (99% confidence), a few KiB a sketch once it holds many values.
pub(crate) const KLL_K: u16 = 200;

/// DataSketches family ids (byte 2 of every serialized sketch).
const FAMILY_HLL: u8 = 7;
const FAMILY_KLL: u8 = 15;

/// Which sketch a measure keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SketchKind {
    /// HyperLogLog (`approx_distinct`).
    Distinct,
    /// KLL over doubles (`approx_percentile_cont`).
    Quantile,
}

/// Bytes that are not a sketch of the expected kind.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SketchError(String);

fn bad(what: &str, e: impl std::fmt::Display) -> SketchError {
    SketchError(format!("{what}: {e}"))
}

/// The kind of a serialized sketch, from its family byte.
pub(crate) fn kind_of(bytes: &[u8]) -> Option<SketchKind> {
    match bytes.get(2) {
        Some(&FAMILY_HLL) => Some(SketchKind::Distinct),
        Some(&FAMILY_KLL) => Some(SketchKind::Quantile),
        _ => None,
    }
}

type Kll = KllSketch<KllFloat<f64>>;

fn hll(bytes: &[u8]) -> Result<HllSketch, SketchError> {
    HllSketch::deserialize(bytes).map_err(|e| bad("not an HLL sketch", e))
}

fn kll(bytes: &[u8]) -> Result<Kll, SketchError> {
    Kll::deserialize(bytes).map_err(|e| bad("not a KLL sketch", e))
}

fn new_hll() -> HllSketch {
    // Constant, valid parameters: lg_k 12 is within 4..=21.
    HllSketch::new(HLL_LG_K, HllType::Hll8).unwrap_or_else(|_| unreachable!())
}

fn new_kll() -> Kll {
    Kll::new(KLL_K).unwrap_or_else(|_| unreachable!())
}

/// The union of serialized sketches of one kind; `None` for no parts.
pub(crate) fn union<'a>(
    kind: SketchKind,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<Vec<u8>>, SketchError> {
    let mut parts = parts.into_iter().peekable();
    if parts.peek().is_none() {
        return Ok(None);
    }
    match kind {
        SketchKind::Distinct => {
            let mut u = HllUnion::new(HLL_LG_K).map_err(|e| bad("HLL union", e))?;
            for p in parts {
                u.update(&hll(p)?);
            }
            Ok(Some(u.to_sketch(HllType::Hll8).serialize()))
        }
        SketchKind::Quantile => {
            let mut acc: Option<Kll> = None;
            for p in parts {
                let s = kll(p)?;
                match acc.as_mut() {
                    None => acc = Some(s),
                    Some(a) => a.merge(&s).map_err(|e| bad("KLL merge", e))?,
                }
            }
            Ok(acc.map(|a| a.serialize()))
        }
    }
}

/// The merge of two serialized sketches of one kind.
pub(crate) fn merge(kind: SketchKind, a: &[u8], b: &[u8]) -> Result<Vec<u8>, SketchError> {
    Ok(union(kind, [a, b])?.unwrap_or_default())
}

/// A sketch's answer: the estimate and bounds that hold it with about 95%
/// confidence (HLL: two standard errors; KLL: the values at the rank
/// `p` ± the sketch's normalized rank error).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// The estimate of a serialized sketch: the distinct count, or the value at
/// rank `quantile` (`None` for a quantile sketch that saw no values).
pub(crate) fn estimate(
    bytes: &[u8],
    quantile: Option<f64>,
) -> Result<Option<Estimate>, SketchError> {
    match kind_of(bytes) {
        Some(SketchKind::Distinct) => {
            let s = hll(bytes)?;
            Ok(Some(Estimate {
                value: s.estimate(),
                low: s.lower_bound(NumStdDev::Two),
                high: s.upper_bound(NumStdDev::Two),
            }))
        }
        Some(SketchKind::Quantile) => {
            let s = kll(bytes)?;
            let p = quantile.unwrap_or(0.5).clamp(0.0, 1.0);
            let at = |r: f64| -> Result<Option<f64>, SketchError> {
                Ok(s.quantile(r.clamp(0.0, 1.0), SearchCriteria::Inclusive)
                    .map_err(|e| bad("KLL quantile", e))?
                    .map(|v| v.into_inner()))
            };
            let eps = s.normalized_rank_error();
            let Some(value) = at(p)? else {
                return Ok(None);
            };
            Ok(Some(Estimate {
                value,
                low: at(p - eps)?.unwrap_or(value),
                high: at(p + eps)?.unwrap_or(value),
            }))
        }
        None => Err(SketchError(
            "not a DataSketches HLL or KLL sketch (unknown family byte)".into(),
        )),
    }
}

/// A form of a sketch that two sketches of the same rows share, for
/// `tally verify`: an HLL sketch's composite estimate after a union (it
/// depends only on the registers, where a sketch built in one pass and one
/// merged from parts differ by their estimator); a KLL sketch's count, least
/// and greatest value (its compactions are random).
pub(crate) fn canonical(bytes: &[u8]) -> String {
    let out = match kind_of(bytes) {
        Some(SketchKind::Distinct) => union(SketchKind::Distinct, [bytes])
            .and_then(|u| hll(&u.unwrap_or_default()))
            .map(|s| format!("hll {:.6}", s.composite_estimate())),
        Some(SketchKind::Quantile) => kll(bytes).map(|s| {
            format!(
                "kll n={} min={:?} max={:?}",
                s.n(),
                s.min_item().map(|v| v.into_inner()),
                s.max_item().map(|v| v.into_inner())
            )
        }),
        None => Err(SketchError("unknown sketch".into())),
    };
    out.unwrap_or_else(|e| format!("invalid sketch ({e})"))
}

// ------------------------------------------------------------ the UDAFs

/// Give `ctx` tally's sketch-building `approx_distinct` and
/// `approx_percentile_cont` in place of DataFusion's: every session that
/// runs rollup SQL needs them.
pub(crate) fn register(ctx: &datafusion::prelude::SessionContext) {
    for udaf in udafs() {
        ctx.register_udaf(udaf);
    }
}

/// The aggregate functions a rollup's SQL sees under the names of
/// DataFusion's own: they build sketches (Binary) instead of numbers.
fn udafs() -> [AggregateUDF; 2] {
    [
        AggregateUDF::from(SketchUdaf {
            kind: SketchKind::Distinct,
            signature: Signature::any(1, Volatility::Immutable),
        }),
        AggregateUDF::from(SketchUdaf {
            kind: SketchKind::Quantile,
            signature: Signature::variadic_any(Volatility::Immutable),
        }),
    ]
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchUdaf {
    kind: SketchKind,
    signature: Signature,
}

impl AggregateUDFImpl for SketchUdaf {
    fn name(&self) -> &str {
        match self.kind {
            SketchKind::Distinct => "approx_distinct",
            SketchKind::Quantile => "approx_percentile_cont",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if self.kind == SketchKind::Quantile {
            if !(2..=3).contains(&args.len()) {
                return Err(DataFusionError::Plan(
                    "approx_percentile_cont(value, percentile) takes a value and a percentile"
                        .into(),
                ));
            }
            if !args[0].is_numeric() {
                return Err(DataFusionError::Plan(format!(
                    "approx_percentile_cont needs a numeric value, not {}",
                    args[0]
                )));
            }
        }
        Ok(DataType::Binary)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "sketch"),
            DataType::Binary,
            true,
        ))])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(match self.kind {
            SketchKind::Distinct => Box::new(HllAccumulator(new_hll())),
            SketchKind::Quantile => Box::new(KllAccumulator(new_kll())),
        })
    }

    fn supports_within_group_clause(&self) -> bool {
        self.kind == SketchKind::Quantile
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::Insensitive
    }
}

fn df(e: SketchError) -> DataFusionError {
    DataFusionError::Execution(e.0)
}

#[derive(Debug)]
struct HllAccumulator(HllSketch);

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let Some(arr) = values.first() else {
            return Ok(());
        };
        let s = &mut self.0;
        match arr.data_type() {
            DataType::Utf8 => arr
                .as_string::<i32>()
                .iter()
                .flatten()
                .for_each(|v| s.update(raw_bytes::from_str(v))),
            DataType::LargeUtf8 => arr
                .as_string::<i64>()
                .iter()
                .flatten()
                .for_each(|v| s.update(raw_bytes::from_str(v))),
            DataType::Utf8View => arr
                .as_string_view()
                .iter()
                .flatten()
                .for_each(|v| s.update(raw_bytes::from_str(v))),
            DataType::Float32 | DataType::Float64 => {
                let f = cast(arr, &DataType::Float64)?;
                f.as_primitive::<Float64Type>()
                    .iter()
                    .flatten()
                    .for_each(|v| s.update(canonical_float::from_f64(v)));
            }
            dt if dt.is_integer()
                || matches!(
                    dt,
                    DataType::Boolean
                        | DataType::Timestamp(_, _)
                        | DataType::Date32
                        | DataType::Date64
                ) =>
            {
                let i = cast(arr, &DataType::Int64)?;
                i.as_primitive::<Int64Type>()
                    .iter()
                    .flatten()
                    .for_each(|v| s.update(v));
            }
            _ => {
                let t = cast(arr, &DataType::Utf8)?;
                t.as_string::<i32>()
                    .iter()
                    .flatten()
                    .for_each(|v| s.update(raw_bytes::from_str(v)));
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.0.serialize())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.0.estimated_size()
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let Some(arr) = states.first() else {
            return Ok(());
        };
        let parts: &BinaryArray = arr.as_binary::<i32>();
        let mut all: Vec<&[u8]> = parts.iter().flatten().collect();
        if all.is_empty() {
            return Ok(());
        }
        let mine = self.0.serialize();
        all.push(&mine);
        if let Some(u) = union(SketchKind::Distinct, all).map_err(df)? {
            self.0 = hll(&u).map_err(df)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct KllAccumulator(Kll);

impl Accumulator for KllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let Some(arr) = values.first() else {
            return Ok(());
        };
        let f = cast(arr, &DataType::Float64)?;
        for v in f.as_primitive::<Float64Type>().iter().flatten() {
            // NaN has no rank: skipped, as DataFusion's own percentiles do.
            if let Ok(v) = KllFloat::<f64>::new(v) {
                self.0.update(v);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.0.serialize())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.0.num_retained() * 8
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let Some(arr) = states.first() else {
            return Ok(());
        };
        for p in arr.as_binary::<i32>().iter().flatten() {
            let other = kll(p).map_err(df)?;
            self.0
                .merge(&other)
                .map_err(|e| DataFusionError::Execution(format!("KLL merge: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
