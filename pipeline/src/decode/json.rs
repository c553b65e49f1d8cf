//! JSON object -> typed slots -> Arrow builders, with no intermediate DOM.
//! Only declared fields are materialised; unknown fields are skipped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::schema::{ColumnBuilder, EventColumns, EventSchema, SchemaField};
use super::{Reject, RejectReason};
use crate::config::{DecodeConfig, FieldType};

/// One parsed field value, borrowing from the payload where possible.
#[derive(Debug, Clone, PartialEq, Default)]
enum Slot<'a> {
    #[default]
    Missing,
    Null,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array,
    Object,
}

impl Slot<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Slot::Missing => "nothing",
            Slot::Null => "null",
            Slot::Str(_) => "string",
            Slot::Int(_) | Slot::Float(_) => "number",
            Slot::Bool(_) => "boolean",
            Slot::Array => "array",
            Slot::Object => "object",
        }
    }
}

/// Per-message result for accepted events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOutcome {
    /// Event time in epoch milliseconds.
    pub event_time_ms: i64,
    /// Arrived more than `late_after` after its event time (still counted).
    pub late: bool,
}

/// Validates messages against the [`EventSchema`] and appends accepted rows.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    schema: EventSchema,
    max_event_bytes: usize,
    max_future_skew_ms: i64,
    max_event_age_ms: i64,
    late_after_ms: i64,
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl RecordDecoder {
    pub fn new(schema: EventSchema, cfg: &DecodeConfig) -> Self {
        RecordDecoder {
            schema,
            max_event_bytes: cfg.max_event_bytes.as_usize(),
            max_future_skew_ms: ms(cfg.max_future_skew),
            max_event_age_ms: ms(cfg.max_event_age),
            late_after_ms: ms(cfg.late_after),
        }
    }

    pub fn schema(&self) -> &EventSchema {
        &self.schema
    }

    /// Decode one message. On success the row has been appended to `out`;
    /// on rejection `out` is untouched.
    pub fn decode(
        &self,
        payload: Option<&[u8]>,
        now_ms: i64,
        out: &mut EventColumns,
    ) -> Result<DecodeOutcome, Reject> {
        let payload = match payload {
            None => return Err(Reject::new(RejectReason::Empty, "message has no payload")),
            Some([]) => return Err(Reject::new(RejectReason::Empty, "message payload is empty")),
            Some(p) => p,
        };
        if payload.len() > self.max_event_bytes {
            return Err(Reject::new(
                RejectReason::TooLarge,
                format!("{} bytes exceeds decode.max_event_bytes = {}", payload.len(), self.max_event_bytes),
            ));
        }
        let text = std::str::from_utf8(payload).map_err(|e| {
            Reject::new(RejectReason::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to()))
        })?;
        let mut slots: [Slot<'_>; 16] = Default::default();
        let n = self.schema.fields.len();
        let mut heap_slots: Vec<Slot<'_>>;
        let slots: &mut [Slot<'_>] = if n <= 16 {
            &mut slots[..n]
        } else {
            heap_slots = vec![Slot::Missing; n];
            &mut heap_slots
        };
        parse_object(text, &self.schema.fields, slots)?;

        // Validate every slot before touching the builders (all or nothing).
        let mut event_time_ms = 0;
        for (i, (field, slot)) in self.schema.fields.iter().zip(slots.iter()).enumerate() {
            check_field(field, slot)?;
            if i == self.schema.time_index {
                event_time_ms = timestamp_ms(field, slot)?.unwrap_or(0);
            }
        }
        if event_time_ms > now_ms.saturating_add(self.max_future_skew_ms) {
            return Err(Reject::new(
                RejectReason::FutureEventTime,
                format!(
                    "{} is {} ms ahead of now, over decode.max_future_skew",
                    self.schema.time_field(),
                    event_time_ms - now_ms
                ),
            ));
        }
        if event_time_ms < now_ms.saturating_sub(self.max_event_age_ms) {
            return Err(Reject::new(
                RejectReason::TooOld,
                format!(
                    "{} is {} ms old, over decode.max_event_age",
                    self.schema.time_field(),
                    now_ms - event_time_ms
                ),
            ));
        }
        for ((field, slot), col) in
            self.schema.fields.iter().zip(slots.iter()).zip(out.columns.iter_mut())
        {
            append(field, slot, col)?;
        }
        out.row_appended();
        Ok(DecodeOutcome { event_time_ms, late: now_ms - event_time_ms > self.late_after_ms })
    }
}


fn wrong_type(field: &SchemaField, expected: &str, slot: &Slot<'_>) -> Reject {
    Reject::new(
        RejectReason::WrongType,
        format!("field `{}`: expected {expected}, got {}", field.name, slot.type_name()),
    )
}

fn check_field(field: &SchemaField, slot: &Slot<'_>) -> Result<(), Reject> {
    if matches!(slot, Slot::Missing | Slot::Null) {
        if field.required {
            return Err(Reject::new(
                RejectReason::MissingField,
                format!("required field `{}` is missing or null", field.name),
            ));
        }
        return Ok(());
    }
    match field.field_type {
        FieldType::String => {
            let Slot::Str(s) = slot else { return Err(wrong_type(field, "string", slot)) };
            if field.required && s.is_empty() {
                return Err(Reject::new(
                    RejectReason::InvalidValue,
                    format!("field `{}` must not be empty", field.name),
                ));
            }
            if let Some(max) = field.max_bytes {
                if s.len() > max {
                    return Err(Reject::new(
                        RejectReason::InvalidValue,
                        format!("field `{}` is {} bytes, over the limit of {max}", field.name, s.len()),
                    ));
                }
            }
            if let Some(re) = &field.pattern {
                if !re.is_match(s) {
                    let shown: String = s.chars().take(64).collect();
                    return Err(Reject::new(
                        RejectReason::InvalidValue,
                        format!("field `{}` value {shown:?} does not match {}", field.name, re.as_str()),
                    ));
                }
            }
        }
        FieldType::Int64 => {
            if !matches!(slot, Slot::Int(_)) {
                return Err(wrong_type(field, "integer", slot));
            }
        }
        FieldType::Float64 => match slot {
            Slot::Int(_) => {}
            Slot::Float(f) if f.is_finite() => {}
            Slot::Float(_) => {
                return Err(Reject::new(
                    RejectReason::InvalidValue,
                    format!("field `{}` is not a finite number", field.name),
                ))
            }
            _ => return Err(wrong_type(field, "number", slot)),
        },
        FieldType::Boolean => {
            if !matches!(slot, Slot::Bool(_)) {
                return Err(wrong_type(field, "boolean", slot));
            }
        }
        FieldType::Timestamp => {
            timestamp_ms(field, slot)?;
        }
    }
    Ok(())
}

fn timestamp_ms(field: &SchemaField, slot: &Slot<'_>) -> Result<Option<i64>, Reject> {
    match slot {
        Slot::Missing | Slot::Null => Ok(None),
        Slot::Int(ms) => Ok(Some(*ms)),
        Slot::Str(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.timestamp_millis()))
            .map_err(|e| {
                let shown: String = s.chars().take(64).collect();
                Reject::new(
                    RejectReason::InvalidValue,
                    format!("field `{}`: {shown:?} is not RFC 3339 ({e})", field.name),
                )
            }),
        other => Err(wrong_type(field, "RFC 3339 string or integer epoch milliseconds", other)),
    }
}

fn append(field: &SchemaField, slot: &Slot<'_>, col: &mut ColumnBuilder) -> Result<(), Reject> {
    let null = matches!(slot, Slot::Missing | Slot::Null);
    match col {
        ColumnBuilder::Str(b) => match slot {
            Slot::Str(s) => b.append_value(s),
            _ => b.append_null(),
        },
        ColumnBuilder::I64(b) => match slot {
            Slot::Int(i) => b.append_value(*i),
            _ => b.append_null(),
        },
        ColumnBuilder::F64(b) => match slot {
            Slot::Int(i) => b.append_value(*i as f64),
            Slot::Float(f) => b.append_value(*f),
            _ => b.append_null(),
        },
        ColumnBuilder::Bool(b) => match slot {
            Slot::Bool(v) => b.append_value(*v),
            _ => b.append_null(),
        },
        ColumnBuilder::Ts(b) => {
            if null {
                b.append_null()
            } else {
                b.append_option(timestamp_ms(field, slot)?)
            }
        }
    }
    Ok(())
}

fn parse_object<'a>(
    text: &'a str,
    fields: &[SchemaField],
    slots: &mut [Slot<'a>],
) -> Result<(), Reject> {
    let mut de = serde_json::Deserializer::from_str(text);
    let result = de.deserialize_any(ObjectVisitor { fields, slots });
    match result {
        Ok(()) => de.end().map_err(|e| Reject::new(RejectReason::NotJson, e.to_string())),
        Err(e) => {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix(DUPLICATE) {
                Err(Reject::new(RejectReason::DuplicateKey, format!("duplicate key `{}`", cut(rest))))
            } else if msg.starts_with(NOT_OBJECT) {
                Err(Reject::new(RejectReason::NotObject, cut(&msg).to_string()))
            } else {
                Err(Reject::new(RejectReason::NotJson, msg))
            }
        }
    }
}

fn cut(s: &str) -> &str {
    s.split(" at line ").next().unwrap_or(s)
}

const DUPLICATE: &str = "tally-duplicate-key:";
const NOT_OBJECT: &str = "expected a JSON object";

struct ObjectVisitor<'f, 's, 'a> {
    fields: &'f [SchemaField],
    slots: &'s mut [Slot<'a>],
}

impl<'de, 'f, 's> Visitor<'de> for ObjectVisitor<'f, 's, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(idx) = map.next_key_seed(KeySeed { fields: self.fields })? {
            match idx {
                Some(i) => {
                    if !matches!(self.slots[i], Slot::Missing) {
                        return Err(de::Error::custom(format!("{DUPLICATE}{}", self.fields[i].name)));
                    }
                    self.slots[i] = map.next_value_seed(SlotSeed)?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format!("{NOT_OBJECT}, got an array")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got a string")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got a number")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got a number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got a number")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got a boolean")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT}, got null")))
    }
}

struct KeySeed<'f> {
    fields: &'f [SchemaField],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.fields.iter().position(|f| f.name == v))
    }
}

struct SlotSeed;

impl<'de> DeserializeSeed<'de> for SlotSeed {
    type Value = Slot<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Slot<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SlotSeed {
    type Value = Slot<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot<'de>, E> {
        Ok(Slot::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot<'de>, E> {
        Ok(i64::try_from(v).map(Slot::Int).unwrap_or(Slot::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Slot<'de>, E> {
        Ok(Slot::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Slot<'de>, E> {
        Ok(Slot::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Slot::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Slot::Object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, TimestampMillisecondType};

    const NOW: i64 = 1_764_300_000_000; // 2025-11-28T03:20:00Z

    fn decoder() -> (RecordDecoder, EventColumns) {
        let s = Settings::defaults().unwrap();
        let schema = EventSchema::from_config(&s.schema).unwrap();
        let cols = schema.new_columns(8);
        (RecordDecoder::new(schema, &s.decode), cols)
    }

    fn reject(payload: &[u8]) -> Reject {
        let (d, mut cols) = decoder();
        let r = d.decode(Some(payload), NOW, &mut cols).unwrap_err();
        assert_eq!(cols.len(), 0, "a rejected message must not append a row");
        r
    }

    #[test]
    fn accepts_valid_events_with_both_time_forms() {
        let (d, mut cols) = decoder();
        let a = format!(r#"{{"video_id":"v1","event_type":"view","event_time":{NOW},"value":2.5,"extra":[1,{{"x":2}}]}}"#);
        let out = d.decode(Some(a.as_bytes()), NOW, &mut cols).unwrap();
        assert_eq!(out, DecodeOutcome { event_time_ms: NOW, late: false });
        let b = r#"{"event_time":"2025-11-28T03:10:00.5Z","video_id":"v\u00e9","event_type":"like","value":3}"#;
        let out = d.decode(Some(b.as_bytes()), NOW, &mut cols).unwrap();
        assert_eq!(out.event_time_ms, NOW - 599_500);
        assert!(out.late, "ten minutes behind is late with late_after = 1m");
        let batch = cols.finish().unwrap();
        assert_eq!(batch.num_rows(), 2);
        let vid = batch.column(0).as_string::<i32>();
        assert_eq!(vid.value(1), "vé");
        let ts = batch.column(2).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), NOW);
        let v = batch.column(3).as_primitive::<Float64Type>();
        assert_eq!(v.value(1), 3.0);
        assert!(batch.column(4).is_null(0), "optional event_id absent -> null");
    }

    #[test]
    fn rejects_each_kind_of_bad_input_with_reason() {
        let t = NOW;
        let cases: Vec<(Vec<u8>, RejectReason, &str)> = vec![
            (b"".to_vec(), RejectReason::Empty, "empty"),
            (b"not json".to_vec(), RejectReason::NotJson, ""),
            (vec![b'{', 0xff, 0xfe, b'}'], RejectReason::NotUtf8, "UTF-8"),
            (b"[1,2]".to_vec(), RejectReason::NotObject, "array"),
            (format!(r#"{{"event_type":"view","event_time":{t}}}"#).into_bytes(), RejectReason::MissingField, "video_id"),
            (format!(r#"{{"video_id":null,"event_type":"view","event_time":{t}}}"#).into_bytes(), RejectReason::MissingField, "video_id"),
            (format!(r#"{{"video_id":7,"event_type":"view","event_time":{t}}}"#).into_bytes(), RejectReason::WrongType, "video_id"),
            (format!(r#"{{"video_id":"v","event_type":"View!","event_time":{t}}}"#).into_bytes(), RejectReason::InvalidValue, "event_type"),
            (format!(r#"{{"video_id":"","event_type":"view","event_time":{t}}}"#).into_bytes(), RejectReason::InvalidValue, "video_id"),
            (format!(r#"{{"video_id":"{}","event_type":"view","event_time":{t}}}"#, "x".repeat(257)).into_bytes(), RejectReason::InvalidValue, "257 bytes"),
            (format!(r#"{{"video_id":"v","event_type":"view","event_time":{t},"value":"3"}}"#).into_bytes(), RejectReason::WrongType, "value"),
            (format!(r#"{{"video_id":"v","video_id":"w","event_type":"view","event_time":{t}}}"#).into_bytes(), RejectReason::DuplicateKey, "video_id"),
            (r#"{"video_id":"v","event_type":"view","event_time":"yesterday"}"#.as_bytes().to_vec(), RejectReason::InvalidValue, "RFC 3339"),
            (format!(r#"{{"video_id":"v","event_type":"view","event_time":{}}}"#, t + 3_600_000).into_bytes(), RejectReason::FutureEventTime, "max_future_skew"),
            (format!(r#"{{"video_id":"v","event_type":"view","event_time":{}}}"#, t - 30 * 86_400_000).into_bytes(), RejectReason::TooOld, "max_event_age"),
            (format!(r#"{{"video_id":"v","event_type":"view","event_time":{t},"value":NaN}}"#).into_bytes(), RejectReason::NotJson, ""),
            (format!(r#"{{"video_id":"v","event_type":"view","event_time":{t}}} trailing"#).into_bytes(), RejectReason::NotJson, "trailing"),
        ];
        for (payload, reason, needle) in cases {
            let r = reject(&payload);
            assert_eq!(r.reason, reason, "{:?} -> {r}", String::from_utf8_lossy(&payload));
            assert!(r.detail.contains(needle), "{r} should mention {needle}");
        }
    }

    #[test]
    fn oversized_and_deeply_nested_payloads_are_rejected_not_panicking() {
        let big = vec![b' '; 70 * 1024];
        assert_eq!(reject(&big).reason, RejectReason::TooLarge);
        // Deep nesting is skipped iteratively (no stack overflow): accepted in
        // an unknown field, a type error in a declared one.
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (d, mut cols) = decoder();
        let d = RecordDecoder { max_event_bytes: usize::MAX, ..d };
        let unknown = format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW},"x":{nested}}}"#);
        d.decode(Some(unknown.as_bytes()), NOW, &mut cols).unwrap();
        let declared = format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW},"value":{nested}}}"#);
        let r = d.decode(Some(declared.as_bytes()), NOW, &mut cols).unwrap_err();
        assert_eq!(r.reason, RejectReason::WrongType, "{r}");
        let unbalanced = format!(r#"{{"video_id":"v","x":{}}}"#, "[".repeat(100_000));
        let r = d.decode(Some(unbalanced.as_bytes()), NOW, &mut cols).unwrap_err();
        assert_eq!(r.reason, RejectReason::NotJson, "{r}");
    }

    #[test]
    fn no_partial_rows_after_rejects() {
        let (d, mut cols) = decoder();
        let good = format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW}}}"#);
        let bad = format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW},"value":true}}"#);
        d.decode(Some(good.as_bytes()), NOW, &mut cols).unwrap();
        d.decode(Some(bad.as_bytes()), NOW, &mut cols).unwrap_err();
        d.decode(Some(good.as_bytes()), NOW, &mut cols).unwrap();
        let b = cols.finish().unwrap();
        assert_eq!(b.num_rows(), 2);
        for c in b.columns() {
            assert_eq!(c.len(), 2);
        }
    }
}
