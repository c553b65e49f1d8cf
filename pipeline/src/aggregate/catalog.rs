//! Loads `sql/rollups/*.sql` and derives, from each DataFusion logical plan,
//! the key columns, the single time window and each measure's merge rule.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, LogicalPlan};

use super::dimensions::Dimensions;
use super::rollup::MergeRule;
use super::AggregateError;

/// How a column is stored in the serving table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// UTF-8 text.
    Text,
    /// 64-bit integer; timestamps are stored as epoch milliseconds.
    Int,
    /// 64-bit float.
    Real,
    /// A serialized sketch (BLOB / BYTEA).
    Bytes,
}

impl ColumnKind {
    pub fn arrow(self) -> DataType {
        match self {
            ColumnKind::Text => DataType::Utf8,
            ColumnKind::Int => DataType::Int64,
            ColumnKind::Real => DataType::Float64,
            ColumnKind::Bytes => DataType::Binary,
        }
    }
    fn of(dt: &DataType) -> Option<ColumnKind> {
        match dt {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(ColumnKind::Text),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Boolean
            | DataType::Timestamp(_, _) => Some(ColumnKind::Int),
            DataType::Float32 | DataType::Float64 => Some(ColumnKind::Real),
            DataType::Binary => Some(ColumnKind::Bytes),
            _ => None,
        }
    }
}

/// One output column of a rollup.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupColumn {
    pub name: String,
    pub kind: ColumnKind,
    /// `None` for key columns.
    pub merge: Option<MergeRule>,
    /// The aggregate function of a measure (`count`, `sum`, `min`, `max`,
    /// `approx_distinct`, `approx_percentile_cont`).
    pub aggregate: Option<String>,
    /// `approx_percentile_cont`'s percentile: the rank the measure answers.
    pub quantile: Option<f64>,
    /// Source type was a timestamp (stored as epoch ms).
    pub timestamp: bool,
}

/// A validated rollup definition.
#[derive(Debug, Clone)]
pub struct RollupDef {
    /// File stem; also the serving table name: `base` for version 1,
    /// `base@N` for version N (see [`RollupDef::base`]).
    pub name: String,
    /// The rollup this is a version of (the API's name for it).
    pub base: String,
    /// 1 for `<base>.sql`, N for `<base>@N.sql`.
    pub version: u32,
    pub file: PathBuf,
    pub sql: String,
    /// Key columns first (in SELECT order), then measures.
    pub columns: Vec<RollupColumn>,
    pub key_count: usize,
    /// Index (into `columns`) of the window start column.
    pub window_column: usize,
    pub window_ms: i64,
    /// Canonical Arrow schema of rows handed to sinks.
    pub schema: SchemaRef,
    pub(crate) plan: LogicalPlan,
}

impl RollupDef {
    /// The SQL as the parser reads it: comments, case of keywords and
    /// whitespace do not matter, anything that changes the meaning does.
    pub fn normalized_sql(&self) -> String {
        use datafusion::sql::sqlparser::{dialect::GenericDialect, parser::Parser};
        match Parser::parse_sql(&GenericDialect {}, &self.sql) {
            Ok(statements) => statements
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            Err(_) => self.sql.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    /// A stable fingerprint of [`Self::normalized_sql`] (64-bit FNV-1a, hex),
    /// recorded by the serving store to refuse a definition edited in place.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.normalized_sql().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    pub fn keys(&self) -> &[RollupColumn] {
        &self.columns[..self.key_count]
    }
    pub fn measures(&self) -> &[RollupColumn] {
        &self.columns[self.key_count..]
    }
    pub fn window_name(&self) -> &str {
        &self.columns[self.window_column].name
    }
    /// Human-readable summary for `tally check`.
    pub fn describe(&self) -> String {
        let keys: Vec<&str> = self.keys().iter().map(|c| c.name.as_str()).collect();
        let measures: Vec<String> = self
            .measures()
            .iter()
            .map(|c| {
                format!(
                    "{} ({:?}, merge {})",
                    c.name,
                    c.kind,
                    c.merge.map_or("?", |m| m.name())
                )
            })
            .collect();
        format!(
            "rollup {} ({})\n  key:     {}\n  window:  {} = {}\n  measures: {}",
            self.name,
            self.file.display(),
            keys.join(", "),
            self.window_name(),
            humantime::format_duration(std::time::Duration::from_millis(self.window_ms as u64)),
            measures.join(", ")
        )
    }
}

/// All rollups of a deployment.
#[derive(Debug, Clone)]
pub struct SqlCatalog {
    pub rollups: Vec<RollupDef>,
    /// The dimension tables the rollups were planned with.
    pub dimensions: Dimensions,
}

impl SqlCatalog {
    /// Load and validate every `*.sql` in `dir` against the event schema,
    /// without dimension tables.
    pub async fn load(
        dir: &Path,
        events: SchemaRef,
        time_field: &str,
    ) -> Result<SqlCatalog, AggregateError> {
        Self::load_with(dir, events, time_field, Dimensions::default()).await
    }

    /// Load and validate every `*.sql` in `dir` against the event schema
    /// and the dimension tables.
    pub async fn load_with(
        dir: &Path,
        events: SchemaRef,
        time_field: &str,
        dimensions: Dimensions,
    ) -> Result<SqlCatalog, AggregateError> {
        let dir_name = dir.display().to_string();
        let entries = std::fs::read_dir(dir).map_err(|e| AggregateError::Catalog {
            dir: dir_name.clone(),
            message: format!("cannot read the rollup directory ({e}); set sql.rollups_dir"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(AggregateError::Catalog {
                dir: dir_name,
                message: "no rollup files (*.sql) found; add one SELECT ... GROUP BY per file"
                    .into(),
            });
        }
        let ctx = super::executor::planning_context(events.clone(), &dimensions)?;
        let mut rollups = Vec::with_capacity(files.len());
        for file in files {
            let sql = std::fs::read_to_string(&file).map_err(|e| AggregateError::Plan {
                file: file.display().to_string(),
                message: e.to_string(),
            })?;
            rollups.push(plan_rollup(&ctx, &file, &sql, time_field).await?);
        }
        Ok(SqlCatalog {
            rollups,
            dimensions,
        })
    }

    pub fn get(&self, name: &str) -> Option<&RollupDef> {
        self.rollups.iter().find(|r| r.name == name)
    }

    /// The versions of rollup `base`, lowest first.
    pub fn versions(&self, base: &str) -> Vec<&RollupDef> {
        let mut v: Vec<&RollupDef> = self.rollups.iter().filter(|r| r.base == base).collect();
        v.sort_by_key(|r| r.version);
        v
    }

    /// The version of `base` the API answers: the one `live` names
    /// (`tally rollup promote`) if it is deployed here, else the lowest.
    pub fn live(
        &self,
        base: &str,
        live: &std::collections::BTreeMap<String, u32>,
    ) -> Option<&RollupDef> {
        let versions = self.versions(base);
        live.get(base)
            .and_then(|n| versions.iter().find(|d| d.version == *n).copied())
            .or_else(|| versions.first().copied())
    }

    /// Every rollup name (versions share one), in file order.
    pub fn bases(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rollups {
            if !out.contains(&r.base) {
                out.push(r.base.clone());
            }
        }
        out
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Plan one rollup file and derive its definition.
pub(crate) async fn plan_rollup(
    ctx: &datafusion::prelude::SessionContext,
    file: &Path,
    sql: &str,
    time_field: &str,
) -> Result<RollupDef, AggregateError> {
    let fname = file.display().to_string();
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let refuse = |column: Option<&str>, message: String| AggregateError::NotMergeable {
        file: fname.clone(),
        column: column.map(str::to_string),
        message,
    };
    // `<base>@<N>.sql` is version N of rollup `base` (see docs/rollups.md).
    let (base, version) = match name.split_once('@') {
        None => (name.clone(), Some(1)),
        Some((b, v)) => (
            b.to_string(),
            // Canonical digits only: `x@02` and `x@2` would be one version.
            v.parse::<u32>()
                .ok()
                .filter(|n| *n >= 2 && n.to_string() == v),
        ),
    };
    let Some(version) = version else {
        return Err(refuse(
            None,
            format!("the file stem {name:?} is not a version: a new version of rollup `{base}` is the file {base}@N.sql, N = 2, 3, … ({base}.sql is version 1)"),
        ));
    };
    if !is_identifier(&base) || base.starts_with("tally_") || base.contains("__") {
        return Err(refuse(
            None,
            format!("the file stem {name:?} names the rollup and its table; rename the file to [a-z_][a-z0-9_]*.sql (not tally_*, no \"__\": tally's own tables use them)"),
        ));
    }
    let plan = ctx
        .state()
        .create_logical_plan(sql)
        .await
        .map_err(|e| AggregateError::Plan {
            file: fname.clone(),
            message: e.to_string(),
        })?;

    let (projection, aggregate) = match &plan {
        LogicalPlan::Projection(p) => match p.input.as_ref() {
            LogicalPlan::Aggregate(a) => (Some(p), a),
            other => return Err(refuse(None, shape_error(other))),
        },
        LogicalPlan::Aggregate(a) => (None, a),
        other => return Err(refuse(None, shape_error(other))),
    };
    if aggregate
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(refuse(
            None,
            "GROUPING SETS, ROLLUP and CUBE are not supported; write one GROUP BY per rollup file"
                .into(),
        ));
    }

    let outputs = output_columns(projection, aggregate, &fname, &refuse)?;
    let (columns_keys, columns_measures, (window_name, window_ms)) =
        split_columns(&outputs, aggregate, time_field, &refuse)?;
    // Types come from the plan's output schema.
    let out_schema: Schema = plan.schema().as_arrow().clone();
    let named = columns_keys.into_iter().chain(columns_measures);
    let (columns, fields) = typed_columns(&out_schema, named, &window_name, &refuse)?;
    let key_count = columns.iter().take_while(|c| c.merge.is_none()).count();
    let window_column = columns
        .iter()
        .position(|c| c.name == window_name)
        .unwrap_or(0);
    if !columns[window_column].timestamp {
        return Err(refuse(
            Some(&window_name),
            "the window must be a timestamp".into(),
        ));
    }
    for c in &columns[key_count..] {
        let ok = match c.merge {
            Some(MergeRule::Sum) => c.kind != ColumnKind::Text,
            _ => true,
        };
        if !ok {
            return Err(refuse(Some(&c.name), "sum needs a numeric input".into()));
        }
    }
    Ok(RollupDef {
        name,
        base,
        version,
        file: file.to_path_buf(),
        sql: sql.to_string(),
        columns,
        key_count,
        window_column,
        window_ms,
        schema: Arc::new(Schema::new(fields)),
        plan,
    })
}

/// A measure's merge rule, aggregate function and percentile.
type Measure = (MergeRule, String, Option<f64>);

/// A refusal naming the file, the column (if any) and the fix.
type Refuse<'a> = dyn Fn(Option<&str>, String) -> AggregateError + 'a;

/// Each output column's name and where it comes from in the aggregate's
/// output (keys first, then measures). Anything but a plain key or
/// aggregate is refused: expressions over aggregates cannot be merged.
fn output_columns(
    projection: Option<&datafusion::logical_expr::Projection>,
    aggregate: &datafusion::logical_expr::Aggregate,
    fname: &str,
    refuse: &Refuse<'_>,
) -> Result<Vec<(String, usize)>, AggregateError> {
    Ok(match projection {
        Some(p) => {
            let mut v = Vec::new();
            for (j, e) in p.expr.iter().enumerate() {
                let out_name = p.schema.field(j).name().clone();
                match strip_alias(e) {
                    Expr::Column(c) => {
                        let idx = aggregate.schema.index_of_column(c).map_err(|e| {
                            AggregateError::Plan { file: fname.to_string(), message: e.to_string() }
                        })?;
                        v.push((out_name, idx));
                    }
                    _ => {
                        return Err(refuse(
                            Some(&out_name),
                            "is an expression over aggregates or keys, which cannot be merged; \
                             select plain keys and count/sum/min/max, and compute ratios such as avg at query time"
                                .into(),
                        ))
                    }
                }
            }
            v
        }
        None => (0..aggregate.schema.fields().len())
            .map(|i| (aggregate.schema.field(i).name().clone(), i))
            .collect(),
    })
}

/// Key columns (in order), measures with their merge rules, and the one
/// time window (its column and width in ms) among the keys; a rollup
/// without exactly one window or without measures is refused.
#[allow(clippy::type_complexity)]
fn split_columns(
    outputs: &[(String, usize)],
    aggregate: &datafusion::logical_expr::Aggregate,
    time_field: &str,
    refuse: &Refuse<'_>,
) -> Result<
    (
        Vec<(String, Option<Measure>)>,
        Vec<(String, Option<Measure>)>,
        (String, i64),
    ),
    AggregateError,
> {
    let group_len = aggregate.group_expr.len();
    let mut columns_keys = Vec::new();
    let mut columns_measures = Vec::new();
    let mut window: Option<(String, i64)> = None;
    for (out_name, idx) in outputs {
        if !is_identifier(out_name) {
            return Err(refuse(
                Some(out_name),
                "output column names become serving-table columns; alias it: AS some_name ([a-z_][a-z0-9_]*)".into(),
            ));
        }
        if *idx < group_len {
            if !columns_measures.is_empty() {
                return Err(refuse(
                    Some(out_name),
                    "select the key columns first, then the measures".into(),
                ));
            }
            let expr = &aggregate.group_expr[*idx];
            if let Some(width) =
                window_width(expr, time_field).map_err(|m| refuse(Some(out_name), m))?
            {
                if window.is_some() {
                    return Err(refuse(
                        Some(out_name),
                        "a rollup has exactly one time window; remove the second".into(),
                    ));
                }
                window = Some((out_name.clone(), width));
            }
            columns_keys.push((out_name.clone(), None));
        } else {
            let expr = &aggregate.aggr_expr[*idx - group_len];
            let (rule, quantile) = merge_rule(expr).map_err(|m| refuse(Some(out_name), m))?;
            let function = match strip_alias(expr) {
                Expr::AggregateFunction(af) => af.func.name().to_ascii_lowercase(),
                _ => rule.name().to_string(),
            };
            columns_measures.push((out_name.clone(), Some((rule, function, quantile))));
        }
    }
    // A window in GROUP BY that is not selected cannot be stored.
    let group_windows = aggregate
        .group_expr
        .iter()
        .filter(|e| matches!(window_width(e, time_field), Ok(Some(_))))
        .count();
    let Some((window_name, window_ms)) = window else {
        return Err(refuse(
            None,
            format!(
                "no time window: GROUP BY and SELECT exactly one date_bin(INTERVAL '1 hour', {time_field}) AS window_start (or date_trunc('hour', {time_field}))"
            ),
        ));
    };
    if group_windows != 1 {
        return Err(refuse(
            None,
            "a rollup has exactly one time window in GROUP BY".into(),
        ));
    }
    if columns_measures.is_empty() {
        return Err(refuse(
            None,
            "no measures; select at least one of count(*), sum(x), min(x), max(x), approx_distinct(x), approx_percentile_cont(x, p)".into(),
        ));
    }
    Ok((columns_keys, columns_measures, (window_name, window_ms)))
}

/// The stored columns (kind, merge rule, whether a timestamp) and the Arrow
/// fields of the rollup's output, checked: storable types, no nullable keys.
fn typed_columns(
    out_schema: &Schema,
    named: impl Iterator<Item = (String, Option<Measure>)>,
    window_name: &str,
    refuse: &Refuse<'_>,
) -> Result<(Vec<RollupColumn>, Vec<Field>), AggregateError> {
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    for (i, (col_name, measure)) in named.enumerate() {
        let (merge, aggregate, quantile) = match measure {
            Some((rule, function, q)) => (Some(rule), Some(function), q),
            None => (None, None, None),
        };
        let field = out_schema.field(i);
        debug_assert_eq!(field.name(), &col_name);
        let kind = ColumnKind::of(field.data_type()).ok_or_else(|| {
            refuse(
                Some(&col_name),
                format!(
                    "type {} cannot be stored; cast it to a string, integer, float or timestamp",
                    field.data_type()
                ),
            )
        })?;
        if (kind == ColumnKind::Bytes) != merge.is_some_and(|m| m.sketch().is_some()) {
            return Err(refuse(
                Some(&col_name),
                "binary values are stored only as sketches (approx_distinct, approx_percentile_cont); cast the column to a string".into(),
            ));
        }
        if merge.is_none() && field.is_nullable() && col_name != window_name {
            // NULL keys would defeat the primary key (NULLs never conflict).
            return Err(refuse(
                Some(&col_name),
                "key columns must not be NULL; group by required schema fields or coalesce(x, '') AS name".into(),
            ));
        }
        let timestamp = matches!(field.data_type(), DataType::Timestamp(_, _));
        fields.push(Field::new(
            &col_name,
            kind.arrow(),
            merge.is_some() || field.is_nullable(),
        ));
        columns.push(RollupColumn {
            name: col_name,
            kind,
            merge,
            aggregate,
            quantile,
            timestamp,
        });
    }
    Ok((columns, fields))
}

fn shape_error(plan: &LogicalPlan) -> String {
    let what = match plan {
        LogicalPlan::Filter(_) => "HAVING filters aggregated rows, which cannot be merged per batch; filter in WHERE or at query time",
        LogicalPlan::Sort(_) => "ORDER BY has no meaning for a rollup; remove it",
        LogicalPlan::Limit(_) => "LIMIT cannot be merged across batches; remove it (use the API's top-K at query time)",
        LogicalPlan::Distinct(_) => "SELECT DISTINCT is not a mergeable aggregate; use GROUP BY with count(*)",
        LogicalPlan::Window(_) => "window functions (OVER) cannot be merged; use GROUP BY with count/sum/min/max",
        _ => "a rollup is one SELECT keys..., count/sum/min/max ... FROM events [WHERE ...] GROUP BY keys",
    };
    format!("not a mergeable rollup: {what}")
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        other => other,
    }
}

fn is_time_column(e: &Expr, time_field: &str) -> bool {
    matches!(strip(e), Expr::Column(c) if c.name == time_field)
}

/// `Ok(Some(width_ms))` if `expr` is a supported window over the time field.
fn window_width(expr: &Expr, time_field: &str) -> Result<Option<i64>, String> {
    let Expr::ScalarFunction(f) = strip(expr) else {
        return Ok(None);
    };
    let fname = f.func.name().to_ascii_lowercase();
    match fname.as_str() {
        "date_bin" => {
            if f.args.len() < 2 || !is_time_column(&f.args[1], time_field) {
                return Ok(None);
            }
            if f.args.len() > 2 {
                let zero = matches!(strip(&f.args[2]), Expr::Literal(v, _) if is_zero_timestamp(v));
                if !zero {
                    return Err("date_bin with an origin other than the Unix epoch is not supported; drop the third argument".into());
                }
            }
            let width = match strip(&f.args[0]) {
                Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) => {
                    if v.months != 0 {
                        return Err("month windows are not fixed-width; use hours or days and roll up at query time".into());
                    }
                    i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000
                }
                Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => {
                    i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds)
                }
                _ => {
                    return Err(
                        "the date_bin width must be a literal INTERVAL, e.g. INTERVAL '1 hour'"
                            .into(),
                    )
                }
            };
            if width <= 0 {
                return Err("the window width must be positive".into());
            }
            Ok(Some(width))
        }
        "date_trunc" | "datetrunc" => {
            if f.args.len() != 2 || !is_time_column(&f.args[1], time_field) {
                return Ok(None);
            }
            let unit = match strip(&f.args[0]) {
                Expr::Literal(ScalarValue::Utf8(Some(s)), _)
                | Expr::Literal(ScalarValue::Utf8View(Some(s)), _)
                | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _) => s.to_ascii_lowercase(),
                _ => return Err("the date_trunc unit must be a literal such as 'hour'".into()),
            };
            match unit.as_str() {
                "second" => Ok(Some(1_000)),
                "minute" => Ok(Some(60_000)),
                "hour" => Ok(Some(3_600_000)),
                "day" => Ok(Some(86_400_000)),
                other => Err(format!("date_trunc('{other}', ...) is not a fixed-width window; use second, minute, hour or day")),
            }
        }
        _ => Ok(None),
    }
}

fn is_zero_timestamp(v: &ScalarValue) -> bool {
    match v {
        ScalarValue::TimestampNanosecond(Some(0), _)
        | ScalarValue::TimestampMicrosecond(Some(0), _)
        | ScalarValue::TimestampMillisecond(Some(0), _)
        | ScalarValue::TimestampSecond(Some(0), _) => true,
        ScalarValue::Utf8(Some(s)) => s.starts_with("1970-01-01T00:00:00"),
        _ => false,
    }
}

fn merge_rule(expr: &Expr) -> Result<(MergeRule, Option<f64>), String> {
    let inner = strip_alias(expr);
    let Expr::AggregateFunction(af) = inner else {
        return Err("is not an aggregate; select count(*), sum(x), min(x) or max(x)".into());
    };
    let name = af.func.name().to_ascii_lowercase();
    if af.params.distinct {
        return Err(format!(
            "{name}(DISTINCT ...) cannot be merged across batches; use approx_distinct(x) (a mergeable HyperLogLog sketch), or add the column to GROUP BY"
        ));
    }
    let rule = match name.as_str() {
        "count" => MergeRule::Sum,
        "sum" => MergeRule::Sum,
        "min" => MergeRule::Min,
        "max" => MergeRule::Max,
        // tally's own (see `aggregate::sketch`): mergeable sketches.
        "approx_distinct" => MergeRule::Distinct,
        "approx_percentile_cont" => {
            let p = match af.params.args.get(1).map(strip) {
                Some(Expr::Literal(ScalarValue::Float64(Some(p)), _)) => *p,
                Some(Expr::Literal(ScalarValue::Float32(Some(p)), _)) => f64::from(*p),
                Some(Expr::Literal(ScalarValue::Int64(Some(p)), _)) => *p as f64,
                _ => return Err("approx_percentile_cont needs a literal percentile: approx_percentile_cont(value, 0.95)".into()),
            };
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("the percentile {p} is not between 0 and 1"));
            }
            if af.params.args.len() > 2 {
                return Err("approx_percentile_cont keeps a KLL sketch (k = 200); drop the centroids argument".into());
            }
            return Ok((MergeRule::Quantile, Some(p)));
        }
        "avg" | "mean" => return Err("avg cannot be merged; store sum(x) and count(x); avg is derived at query time".into()),
        "median" | "approx_median" | "approx_percentile_cont_with_weight" | "percentile_cont" => {
            return Err(format!(
                "{name} cannot be merged; use approx_percentile_cont(value, p), stored as a mergeable quantile sketch"
            ))
        }
        other => {
            return Err(format!(
                "{other} cannot be merged; use count, sum, min, max, approx_distinct or approx_percentile_cont"
            ))
        }
    };
    Ok((rule, None))
}
