//! JSON object -> typed slots -> Arrow builders, with no intermediate DOM.
//! Declared fields are materialised as typed columns; every other field is
//! kept verbatim (its key and its JSON text) in one JSON object, the
//! `_extra` column, which is null when there are none.

use std::borrow::Cow;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};

use super::schema::{ColumnBuilder, EventColumns, EventSchema, SchemaField};
use super::{Reject, RejectReason};
use crate::config::{DecodeConfig, FieldType};

/// One parsed field value, borrowing from the payload where possible.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) enum Slot<'a> {
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
                format!(
                    "{} bytes exceeds decode.max_event_bytes = {}",
                    payload.len(),
                    self.max_event_bytes
                ),
            ));
        }
        let text = std::str::from_utf8(payload).map_err(|e| {
            Reject::new(
                RejectReason::NotUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
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
        // Undeclared fields as `{"key":value,…` (closed below); empty, and
        // never allocated, when there are none.
        let mut extra = String::new();
        if parse_flat(text, &self.schema.fields, slots, &mut extra).is_none() {
            slots.iter_mut().for_each(|s| *s = Slot::Missing);
            extra.clear();
            parse_object(text, &self.schema.fields, slots, &mut extra)?;
        }

        // Validate every slot before touching the builders (all or nothing).
        // Timestamps are parsed once, here: the slot becomes epoch ms.
        let mut event_time_ms = 0;
        for (i, (field, slot)) in self.schema.fields.iter().zip(slots.iter_mut()).enumerate() {
            if matches!(field.field_type, FieldType::Timestamp) && matches!(slot, Slot::Str(_)) {
                if let Some(ms) = timestamp_ms(field, slot)? {
                    *slot = Slot::Int(ms);
                }
            }
            check_field(field, slot)?;
            if i == self.schema.time_index {
                if let Slot::Int(ms) = slot {
                    event_time_ms = *ms;
                }
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
        for ((field, slot), col) in self
            .schema
            .fields
            .iter()
            .zip(slots.iter())
            .zip(out.columns.iter_mut())
        {
            append(field, slot, col)?;
        }
        if extra.is_empty() {
            out.extra.append_null();
        } else {
            extra.push('}');
            out.extra.append_value(&extra);
        }
        out.row_appended();
        Ok(DecodeOutcome {
            event_time_ms,
            late: now_ms - event_time_ms > self.late_after_ms,
        })
    }
}

/// Schema on read: the value of `field` in each `_extra` object, converted and
/// checked exactly as [`RecordDecoder::decode`] does; null where the object
/// is null, lacks the key or holds a value the field would reject.
pub(crate) fn extract_field(field: &SchemaField, extra: &StringArray) -> ArrayRef {
    let fields = std::slice::from_ref(field);
    let mut col = ColumnBuilder::new(field.field_type, extra.len());
    let mut others = String::new();
    for json in extra {
        let mut slot = [Slot::Missing];
        others.clear();
        let ok = json.is_some_and(|text| {
            parse_object(text, fields, &mut slot, &mut others).is_ok()
                && check_field(field, &slot[0]).is_ok()
        });
        if !ok || append(field, &slot[0], &mut col).is_err() {
            append(field, &Slot::Null, &mut col).unwrap_or_default();
        }
    }
    col.finish()
}

fn wrong_type(field: &SchemaField, expected: &str, slot: &Slot<'_>) -> Reject {
    Reject::new(
        RejectReason::WrongType,
        format!(
            "field `{}`: expected {expected}, got {}",
            field.name,
            slot.type_name()
        ),
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
            let Slot::Str(s) = slot else {
                return Err(wrong_type(field, "string", slot));
            };
            if field.required && s.is_empty() {
                return Err(Reject::new(
                    RejectReason::InvalidValue,
                    format!("field `{}` must not be empty", field.name),
                ));
            }
            if s.contains('\0') {
                // PostgreSQL's text cannot hold NUL: a store would refuse the
                // whole batch, every time it is retried.
                return Err(Reject::new(
                    RejectReason::InvalidValue,
                    format!("field `{}` contains a NUL character (\\u0000), which the serving store cannot hold", field.name),
                ));
            }
            if let Some(max) = field.max_bytes {
                if s.len() > max {
                    return Err(Reject::new(
                        RejectReason::InvalidValue,
                        format!(
                            "field `{}` is {} bytes, over the limit of {max}",
                            field.name,
                            s.len()
                        ),
                    ));
                }
            }
            if let Some(re) = &field.pattern {
                if !re.is_match(s) {
                    let shown: String = s.chars().take(64).collect();
                    return Err(Reject::new(
                        RejectReason::InvalidValue,
                        format!(
                            "field `{}` value {shown:?} does not match {}",
                            field.name,
                            re.as_str()
                        ),
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
        Slot::Str(s) => match rfc3339_ms(s) {
            Some(ms) => Ok(Some(ms)),
            None => chrono::DateTime::parse_from_rfc3339(s).map(|t| Some(t.timestamp_millis())),
        }
        .map_err(|e| {
            let shown: String = s.chars().take(64).collect();
            Reject::new(
                RejectReason::InvalidValue,
                format!("field `{}`: {shown:?} is not RFC 3339 ({e})", field.name),
            )
        }),
        other => Err(wrong_type(
            field,
            "RFC 3339 string or integer epoch milliseconds",
            other,
        )),
    }
}

/// The common RFC 3339 form, `YYYY-MM-DDTHH:MM:SS[.F{1,9}](Z|+HH:MM|-HH:MM)`,
/// to epoch milliseconds (fraction truncated, as chrono's
/// `timestamp_millis`), about ten times faster than chrono. `None` for
/// anything else, which then goes to chrono (other accepted spellings, leap
/// seconds, and the error message for invalid input).
fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let digit = |i: usize| -> Option<i64> {
        let c = b.get(i)?.wrapping_sub(b'0');
        (c < 10).then_some(i64::from(c))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let (year, month, day) = (two(0)? * 100 + two(2)?, two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while let Some(d) = digit(i) {
            if i - start < 3 {
                millis = millis * 10 + d;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset = match *b.get(i)? {
        b'Z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            if b.get(i + 3) != Some(&b':') {
                return None;
            }
            let (h, m) = (two(i + 1)?, two(i + 4)?);
            if h > 23 || m > 59 {
                return None;
            }
            i += 6;
            if sign == b'-' {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
    // days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset) * 1000 + millis)
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

/// Fast path for the common event: one flat object, keys and string values
/// without escapes, integer or literal values, no duplicate keys. Fills the
/// slots exactly as [`parse_object`] would; `None` (slots possibly partly
/// filled) for anything else, which then goes through serde_json from the
/// start, for its general parsing and its error messages.
fn parse_flat<'a>(
    text: &'a str,
    fields: &[SchemaField],
    slots: &mut [Slot<'a>],
    extra: &mut String,
) -> Option<()> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            *i += 1;
        }
    };
    // A string without escapes or control characters, starting at b[i] == '"'.
    let string = |i: &mut usize| -> Option<&'a str> {
        let start = *i + 1;
        let len = string_end(b.get(start..)?)?;
        if b[start + len] != b'"' {
            return None;
        }
        *i = start + len + 1;
        text.get(start..start + len)
    };
    let mut hint = 0;
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    ws(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let key = string(&mut i)?;
            ws(&mut i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            ws(&mut i);
            let value_start = i;
            // Producers write keys in one order: try the field after the
            // last one matched before searching them all.
            let found = if fields.get(hint).is_some_and(|f| f.name == key) {
                Some(hint)
            } else {
                fields.iter().position(|f| f.name == key)
            };
            let value = match *b.get(i)? {
                b'"' => Slot::Str(Cow::Borrowed(string(&mut i)?)),
                // An undeclared object or array is kept as text: validated
                // and skipped here (a declared one is a type error, which
                // serde_json's path words).
                b'{' | b'[' if found.is_none() => {
                    i = skip_value(b, i, 0)?;
                    Slot::Object
                }
                b't' if b.get(i..i + 4) == Some(b"true") => {
                    i += 4;
                    Slot::Bool(true)
                }
                b'f' if b.get(i..i + 5) == Some(b"false") => {
                    i += 5;
                    Slot::Bool(false)
                }
                b'n' if b.get(i..i + 4) == Some(b"null") => {
                    i += 4;
                    Slot::Null
                }
                c if c == b'-' || c.is_ascii_digit() => {
                    let neg = c == b'-';
                    let start = i + usize::from(neg);
                    let digits = b
                        .get(start..)?
                        .iter()
                        .take_while(|d| d.is_ascii_digit())
                        .count();
                    if matches!(b.get(start + digits), Some(b'.' | b'e' | b'E')) {
                        // A fraction or exponent: serde_json's own number
                        // parser on just this token, so the f64 is the same.
                        let len = b[i..]
                            .iter()
                            .take_while(|c| {
                                matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                            })
                            .count();
                        let v: f64 = serde_json::from_str(text.get(i..i + len)?).ok()?;
                        i += len;
                        Slot::Float(v)
                    } else {
                        // Integers without a leading zero that fit in i64 for
                        // sure (18 digits); longer ones to serde_json.
                        if digits == 0 || digits > 18 || (b[start] == b'0' && (digits > 1 || neg)) {
                            return None;
                        }
                        let mut v: i64 = 0;
                        for d in &b[start..start + digits] {
                            v = v * 10 + i64::from(d - b'0');
                        }
                        i = start + digits;
                        Slot::Int(if neg { -v } else { v })
                    }
                }
                _ => return None,
            };
            // The end of a value: whitespace, a comma or the closing brace
            // (so `1.5`, `1e3` or `truex` go to serde_json).
            if !matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}')) {
                return None;
            }
            if let Some(f) = found {
                if !matches!(slots[f], Slot::Missing) {
                    return None;
                }
                slots[f] = value;
                hint = f + 1;
            } else {
                // A key without escapes or control characters is its own
                // JSON text; so is the value's token.
                push_extra(extra, key, true, text.get(value_start..i)?);
            }
            ws(&mut i);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    ws(&mut i);
                }
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    ws(&mut i);
    (i == b.len()).then_some(())
}

/// The end of the JSON value at `b[i]`, validated: what serde_json accepts
/// there, in a form the fast path knows (strings without escapes, numbers in
/// JSON's grammar, literals, objects and arrays up to 64 deep). `None` for
/// anything else, which then goes to serde_json from the start.
fn skip_value(b: &[u8], mut i: usize, depth: u32) -> Option<usize> {
    let ws = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            *i += 1;
        }
    };
    match *b.get(i)? {
        b'"' => {
            let len = string_end(b.get(i + 1..)?)?;
            (b[i + 1 + len] == b'"').then_some(i + len + 2)
        }
        b't' => (b.get(i..i + 4) == Some(b"true")).then_some(i + 4),
        b'f' => (b.get(i..i + 5) == Some(b"false")).then_some(i + 5),
        b'n' => (b.get(i..i + 4) == Some(b"null")).then_some(i + 4),
        c if c == b'-' || c.is_ascii_digit() => number_end(b, i),
        open @ (b'{' | b'[') if depth < 64 => {
            let close = if open == b'{' { b'}' } else { b']' };
            i += 1;
            ws(&mut i);
            if b.get(i) == Some(&close) {
                return Some(i + 1);
            }
            loop {
                if open == b'{' {
                    if b.get(i) != Some(&b'"') {
                        return None;
                    }
                    i = skip_value(b, i, depth + 1)?;
                    ws(&mut i);
                    if b.get(i) != Some(&b':') {
                        return None;
                    }
                    i += 1;
                    ws(&mut i);
                }
                i = skip_value(b, i, depth + 1)?;
                ws(&mut i);
                match b.get(i) {
                    Some(b',') => {
                        i += 1;
                        ws(&mut i);
                    }
                    Some(c) if *c == close => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        _ => None,
    }
}

/// The end of the JSON number at `b[i]`: `-? (0 | [1-9][0-9]*) (. [0-9]+)?
/// ([eE] [+-]? [0-9]+)?`.
fn number_end(b: &[u8], i: usize) -> Option<usize> {
    let digits = |from: usize| {
        b.get(from..)
            .map_or(0, |r| r.iter().take_while(|d| d.is_ascii_digit()).count())
    };
    let start = i + usize::from(b.get(i) == Some(&b'-'));
    let n = digits(start);
    if n == 0 || (b[start] == b'0' && n > 1) {
        return None;
    }
    let mut end = start + n;
    if b.get(end) == Some(&b'.') {
        let n = digits(end + 1);
        if n == 0 {
            return None;
        }
        end += 1 + n;
    }
    if matches!(b.get(end), Some(b'e' | b'E')) {
        let j = end + 1 + usize::from(matches!(b.get(end + 1), Some(b'+' | b'-')));
        let n = digits(j);
        if n == 0 {
            return None;
        }
        end = j + n;
    }
    Some(end)
}

/// Index of the first `"`, backslash or control byte in `b`, eight bytes
/// at a time (a SWAR test of each word; a hit is then found byte by byte).
fn string_end(b: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        let quote = x ^ (LO * u64::from(b'"'));
        let backslash = x ^ (LO * u64::from(b'\\'));
        // Each term has a high bit set if some byte is zero (or below 0x20).
        let hit = (quote.wrapping_sub(LO) & !quote)
            | (backslash.wrapping_sub(LO) & !backslash)
            | (x.wrapping_sub(LO * 0x20) & !x);
        if hit & HI != 0 {
            break;
        }
        i += 8;
    }
    b[i..]
        .iter()
        .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
        .map(|p| p + i)
}

/// Append `"key":value` to the undeclared fields' object under way.
/// `plain`: the key needs no escaping (it was read without escapes).
pub(super) fn push_extra(extra: &mut String, key: &str, plain: bool, value: &str) {
    extra.push(if extra.is_empty() { '{' } else { ',' });
    if plain {
        extra.push('"');
        extra.push_str(key);
        extra.push('"');
    } else {
        // Writing a string into a String cannot fail.
        extra.push_str(&serde_json::to_string(key).unwrap_or_default());
    }
    extra.push(':');
    extra.push_str(value);
}

mod object;
use object::parse_object;

#[cfg(test)]
mod tests;
