//! The general path: serde_json over any JSON text, with its error messages;
//! duplicate declared keys and non-objects are refused here.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{push_extra, SchemaField, Slot};
use crate::decode::{Reject, RejectReason};

pub(super) fn parse_object<'a>(
    text: &'a str,
    fields: &[SchemaField],
    slots: &mut [Slot<'a>],
    extra: &mut String,
) -> Result<(), Reject> {
    let mut de = serde_json::Deserializer::from_str(text);
    let result = de.deserialize_any(ObjectVisitor {
        fields,
        slots,
        extra,
    });
    match result {
        Ok(()) => de
            .end()
            .map_err(|e| Reject::new(RejectReason::NotJson, e.to_string())),
        Err(e) => {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix(DUPLICATE) {
                Err(Reject::new(
                    RejectReason::DuplicateKey,
                    format!("duplicate key `{}`", cut(rest)),
                ))
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
    extra: &'s mut String,
}

impl<'de, 'f, 's> Visitor<'de> for ObjectVisitor<'f, 's, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(idx) = map.next_key_seed(KeySeed {
            fields: self.fields,
        })? {
            match idx {
                Key::Declared(i) => {
                    if !matches!(self.slots[i], Slot::Missing) {
                        return Err(de::Error::custom(format!(
                            "{DUPLICATE}{}",
                            self.fields[i].name
                        )));
                    }
                    self.slots[i] = map.next_value_seed(SlotSeed)?;
                }
                Key::Other(key) => {
                    let value: &'de RawValue = map.next_value()?;
                    let plain = matches!(key, Cow::Borrowed(_));
                    push_extra(self.extra, &key, plain, value.get());
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

/// A key: a declared field's index, or an undeclared key (borrowed from the
/// payload when it has no escapes).
enum Key<'de> {
    Declared(usize),
    Other(Cow<'de, str>),
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(match self.fields.iter().position(|f| f.name == v) {
            Some(i) => Key::Declared(i),
            None => Key::Other(Cow::Borrowed(v)),
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(match self.fields.iter().position(|f| f.name == v) {
            Some(i) => Key::Declared(i),
            None => Key::Other(Cow::Owned(v.to_string())),
        })
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
        Ok(i64::try_from(v)
            .map(Slot::Int)
            .unwrap_or(Slot::Float(v as f64)))
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
