//! Schema on read. An archive file written before a field was declared keeps
//! that field in its `_extra` column; jobs that read the archive (verify,
//! backfill) see it as if it had always been declared: the typed column where
//! the file has one, else the value from `_extra`, converted and checked by
//! the decoder's own rules (a value the field would reject reads as null).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{new_null_array, Array, AsArray};
use datafusion::arrow::compute::is_not_null;
use datafusion::arrow::compute::kernels::zip::zip;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use super::json::extract_field;
use super::schema::{arrow_type, EventSchema, SchemaField, EXTRA_COLUMN};

/// `extra_field_<i>(field, _extra)`: field `i`, or its value from the
/// undeclared fields where the file has none.
#[derive(Debug)]
struct ExtraField {
    name: String,
    field: SchemaField,
    signature: Signature,
}

impl PartialEq for ExtraField {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.field.name == other.field.name
    }
}
impl Eq for ExtraField {}
impl Hash for ExtraField {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.field.name.hash(state);
    }
}

impl ScalarUDFImpl for ExtraField {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(arrow_type(self.field.field_type))
    }
    /// `(typed column, _extra)`: the typed value where there is one, else
    /// the value from `_extra`. The common case (a file written since the
    /// field was declared, or no undeclared fields) returns the typed
    /// column itself, without a copy.
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let mut args = args.args.into_iter();
        let (Some(typed), Some(extra)) = (args.next(), args.next()) else {
            return Ok(ColumnarValue::Array(new_null_array(
                &arrow_type(self.field.field_type),
                rows,
            )));
        };
        let typed = typed.into_array(rows)?;
        let extra = extra.into_array(rows)?;
        if typed.null_count() == 0 || extra.null_count() == extra.len() {
            return Ok(ColumnarValue::Array(typed));
        }
        let from_extra = extract_field(&self.field, extra.as_string::<i32>());
        let has_typed = is_not_null(&typed)?;
        Ok(ColumnarValue::Array(zip(&has_typed, &typed, &from_extra)?))
    }
}

/// The schema archive files are read with: every declared field and
/// `_extra`, all nullable (a file older than a field's declaration, or than
/// `_extra`, has no such column; its rows read null there).
pub(crate) fn read_schema(schema: &EventSchema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .arrow
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// Register the extraction functions in `ctx` and return the SELECT list
/// that turns a table read with [`read_schema`] into the events as the
/// current schema declares them.
pub(crate) fn events_select(schema: &EventSchema, ctx: &SessionContext) -> String {
    let mut cols = Vec::with_capacity(schema.fields.len() + 1);
    for (i, f) in schema.fields.iter().enumerate() {
        let q = quote(&f.name);
        if i == schema.time_index {
            cols.push(q);
            continue;
        }
        let name = format!("extra_field_{i}");
        ctx.register_udf(ScalarUDF::new_from_impl(ExtraField {
            name: name.clone(),
            field: f.clone(),
            signature: Signature::exact(
                vec![arrow_type(f.field_type), DataType::Utf8],
                Volatility::Immutable,
            ),
        }));
        cols.push(format!(
            "{name}({q}, {extra}) AS {q}",
            extra = quote(EXTRA_COLUMN)
        ));
    }
    cols.push(quote(EXTRA_COLUMN));
    cols.join(", ")
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FieldConfig, FieldType, SchemaConfig};
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;

    fn schema(fields: &[(&str, FieldType)]) -> EventSchema {
        let cfg = SchemaConfig {
            time_field: "t".into(),
            fields: fields
                .iter()
                .map(|(n, t)| FieldConfig {
                    name: (*n).into(),
                    field_type: *t,
                    required: *n == "t",
                    max_bytes: None,
                    pattern: None,
                })
                .collect(),
        };
        EventSchema::from_config(&cfg).expect("schema")
    }

    /// An old file (no `country` column; the value in `_extra`) and a new
    /// one (typed column) read the same through the events view.
    #[tokio::test]
    async fn a_field_declared_later_reads_from_extra() {
        let old = schema(&[("t", FieldType::Int64), ("n", FieldType::Int64)]);
        let new = schema(&[
            ("t", FieldType::Int64),
            ("n", FieldType::Int64),
            ("country", FieldType::String),
        ]);
        let read = read_schema(&new);
        // Rows as the old file holds them, projected onto the new schema
        // (what the Parquet reader does for a missing column).
        let old_rows = RecordBatch::try_new(
            read_schema(&old),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(Int64Array::from(vec![10, 20, 30, 40])),
                Arc::new(StringArray::from(vec![
                    Some(r#"{"country":"FR","x":[1]}"#),
                    None,
                    Some(r#"{"country":7}"#),
                    Some(r#"{"c\u006fu":1,"country":"D\u00e9"}"#),
                ])),
            ],
        )
        .expect("batch");
        let ctx = SessionContext::new();
        let mut cols: Vec<Arc<dyn Array>> = old_rows.columns().to_vec();
        cols.insert(2, new_null_array(&DataType::Utf8, 4));
        let projected = RecordBatch::try_new(read.clone(), cols).expect("projected");
        let new_rows = RecordBatch::try_new(
            read.clone(),
            vec![
                Arc::new(Int64Array::from(vec![5])),
                Arc::new(Int64Array::from(vec![50])),
                Arc::new(StringArray::from(vec![Some("US")])),
                Arc::new(StringArray::from(vec![Some(r#"{"y":true}"#)])),
            ],
        )
        .expect("batch");
        let table = MemTable::try_new(read, vec![vec![projected, new_rows]]).expect("table");
        ctx.register_table("raw", Arc::new(table))
            .expect("register");
        let select = events_select(&new, &ctx);
        let out = ctx
            .sql(&format!(
                "SELECT t, country FROM (SELECT {select} FROM raw) ORDER BY t"
            ))
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let batch = &out[0];
        let country: Vec<Option<&str>> = batch.column(1).as_string::<i32>().iter().collect();
        // A number where a string is declared is what the decoder rejects:
        // null, as the issue's "schema on read" rule says.
        assert_eq!(
            country,
            vec![Some("FR"), None, None, Some("Dé"), Some("US")]
        );
    }
}
