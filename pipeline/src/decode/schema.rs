//! The event schema declared in config, as Arrow types and column builders.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use regex::Regex;

use crate::config::{FieldType, SchemaConfig};

/// The time zone every timestamp carries.
pub(super) const UTC: &str = "UTC";

/// The column that keeps every undeclared field of an event: one JSON object
/// of them in the order they came, null when there are none. Always last.
pub(crate) const EXTRA_COLUMN: &str = "_extra";

#[derive(Debug, Clone)]
pub struct SchemaField {
    pub name: String,
    pub field_type: FieldType,
    pub required: bool,
    pub max_bytes: Option<usize>,
    pub pattern: Option<Regex>,
}

/// The validated event schema: field rules plus the Arrow schema.
#[derive(Debug, Clone)]
pub struct EventSchema {
    pub fields: Vec<SchemaField>,
    pub time_index: usize,
    pub arrow: SchemaRef,
}

impl EventSchema {
    /// Build from an already validated [`SchemaConfig`].
    pub fn from_config(cfg: &SchemaConfig) -> Result<Self, crate::config::ConfigError> {
        let mut fields = Vec::with_capacity(cfg.fields.len());
        let mut arrow_fields = Vec::with_capacity(cfg.fields.len());
        for (i, f) in cfg.fields.iter().enumerate() {
            let pattern = match &f.pattern {
                Some(p) => {
                    Some(
                        Regex::new(p).map_err(|e| crate::config::ConfigError::Invalid {
                            key: format!("schema.fields[{i}].pattern"),
                            message: e.to_string(),
                        })?,
                    )
                }
                None => None,
            };
            arrow_fields.push(Field::new(&f.name, arrow_type(f.field_type), !f.required));
            fields.push(SchemaField {
                name: f.name.clone(),
                field_type: f.field_type,
                required: f.required,
                max_bytes: f.max_bytes,
                pattern,
            });
        }
        let time_index = cfg
            .fields
            .iter()
            .position(|f| f.name == cfg.time_field)
            .ok_or_else(|| crate::config::ConfigError::Invalid {
                key: "schema.time_field".into(),
                message: format!("{:?} is not declared in schema.fields", cfg.time_field),
            })?;
        arrow_fields.push(Field::new(EXTRA_COLUMN, DataType::Utf8, true));
        Ok(EventSchema {
            fields,
            time_index,
            arrow: Arc::new(Schema::new(arrow_fields)),
        })
    }

    pub fn time_field(&self) -> &str {
        &self.fields[self.time_index].name
    }

    pub fn new_columns(&self, capacity: usize) -> EventColumns {
        EventColumns {
            schema: self.arrow.clone(),
            columns: self
                .fields
                .iter()
                .map(|f| ColumnBuilder::new(f.field_type, capacity))
                .collect(),
            extra: StringBuilder::new(),
            rows: 0,
        }
    }
}

pub(super) fn arrow_type(t: FieldType) -> DataType {
    match t {
        FieldType::String => DataType::Utf8,
        FieldType::Int64 => DataType::Int64,
        FieldType::Float64 => DataType::Float64,
        FieldType::Boolean => DataType::Boolean,
        FieldType::Timestamp => DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into())),
    }
}

#[derive(Debug)]
pub(crate) enum ColumnBuilder {
    Str(StringBuilder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Ts(TimestampMillisecondBuilder),
}

impl ColumnBuilder {
    pub(crate) fn new(t: FieldType, capacity: usize) -> Self {
        match t {
            FieldType::String => {
                ColumnBuilder::Str(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            FieldType::Int64 => ColumnBuilder::I64(Int64Builder::with_capacity(capacity)),
            FieldType::Float64 => ColumnBuilder::F64(Float64Builder::with_capacity(capacity)),
            FieldType::Boolean => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            FieldType::Timestamp => ColumnBuilder::Ts(
                TimestampMillisecondBuilder::with_capacity(capacity).with_timezone(UTC),
            ),
        }
    }

    pub(crate) fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Str(b) => Arc::new(b.finish()),
            ColumnBuilder::I64(b) => Arc::new(b.finish()),
            ColumnBuilder::F64(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Ts(b) => Arc::new(b.finish()),
        }
    }
}

/// Column builders for one micro-batch of accepted events.
#[derive(Debug)]
pub struct EventColumns {
    schema: SchemaRef,
    pub(crate) columns: Vec<ColumnBuilder>,
    /// [`EXTRA_COLUMN`].
    pub(crate) extra: StringBuilder,
    rows: usize,
}

impl EventColumns {
    pub fn len(&self) -> usize {
        self.rows
    }
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
    pub(crate) fn row_appended(&mut self) {
        self.rows += 1;
    }

    /// Finish into a record batch; the builders are reset for reuse.
    pub fn finish(&mut self) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
        let mut arrays: Vec<ArrayRef> = self.columns.iter_mut().map(|c| c.finish()).collect();
        arrays.push(Arc::new(self.extra.finish()));
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}
