use super::*;
use proptest::prelude::*;

/// JSON-ish text: objects over the default schema's keys and others,
/// with every kind of value, whitespace, escapes, duplicates and noise.
fn jsonish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => prop_oneof![Just("video_id"), Just("event_type"), Just("event_time"), Just("value"), Just("user_id"), Just("event_id"), Just("other")],
        1 => prop_oneof![Just("vid\\u0065o_id"), Just(""), Just("c\\u006fu\\n"), Just("é")],
    ];
    let good = prop_oneof![
        "\"[a-z0-9 _é-]{0,12}\"",
        "-?[0-9]{1,19}",
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
        Just("\"2026-11-29T02:03:35.188Z\"".to_string()),
        Just("1795919201079".to_string()),
        Just("0".to_string()),
        "-?[0-9]{1,4}\\.[0-9]{1,17}",
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?[eE][+-]?[0-9]{1,3}",
    ];
    let bad = prop_oneof![
        Just("\"a\\\"b\"".to_string()),
        Just("\"tab\\tx\"".to_string()),
        "[0-9.eE+-]{1,6}",
        Just("-0".to_string()),
        Just("00".to_string()),
        Just("nul".to_string()),
        Just("[1, {\"a\": 2}]".to_string()),
        Just("{\"x\": \"y\"}".to_string()),
        Just("{\"a\":[1,-0.5e3,{\"b\":null, \"c\" : [ ]}],\"d\":{}}".to_string()),
        Just("[[[\"x\"], 0, true]]".to_string()),
        Just("[1,,2]".to_string()),
        Just("{\"a\" 1}".to_string()),
        Just("{\"a\":1,}".to_string()),
        Just("[tru]".to_string()),
        Just("[01]".to_string()),
        Just("[1.]".to_string()),
        Just("{\"a\":1]".to_string()),
        Just("[\"q\\\"x\"]".to_string()),
        Just("{1:2}".to_string()),
        Just("truex".to_string()),
        Just("\"ctl\u{1}\"".to_string()),
    ];
    // Nested values, well and badly formed (numbers in and out of JSON's
    // grammar, missing commas and colons, escapes, mismatched brackets).
    let nested = prop_oneof![
        "\\[[0-9.eE+, -]{0,8}\\]",
        "\\{\"k\": ?[0-9.eE+-]{1,5} ?\\}",
        "[\\[{]{1,3}[\"a-z0-9:, \\]}]{0,10}",
    ];
    let value = prop_oneof![20 => good, 1 => bad, 3 => nested];
    let sp = prop_oneof![Just(""), Just(" "), Just("\n\t "), Just("\r")];
    (
        proptest::collection::vec((key, value, sp.clone()), 0..8),
        sp,
        prop_oneof![Just(""), Just("}"), Just(","), Just(" x"), Just("\n")],
        proptest::option::of(Just("[")),
    )
        .prop_map(|(entries, ws, tail, open)| {
            let body: Vec<String> = entries
                .iter()
                .map(|(k, v, s)| format!("{s}\"{k}\"{s}:{s}{v}{s}"))
                .collect();
            format!("{ws}{}{}}}{tail}", open.unwrap_or("{"), body.join(","))
        })
}

proptest! {
    /// The fast path fills the slots exactly as serde_json does, on
    /// every input it accepts.
    #[test]
    fn fast_flat_objects_match_serde(text in jsonish()) {
        let (d, _) = decoder();
        let fields = &d.schema().fields;
        let mut fast = vec![Slot::Missing; fields.len()];
        let mut slow = vec![Slot::Missing; fields.len()];
        let (mut fast_extra, mut slow_extra) = (String::new(), String::new());
        let serde = parse_object(&text, fields, &mut slow, &mut slow_extra);
        if serde.is_ok() && !slow_extra.is_empty() {
            // The undeclared fields are one valid JSON object (values as
            // text: `1E310` is JSON, though no f64 holds it).
            let object: Result<
                std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>,
                _,
            > = serde_json::from_str(&format!("{slow_extra}}}"));
            prop_assert!(object.is_ok(), "{:?} from {:?}", slow_extra, text);
        }
        if parse_flat(&text, fields, &mut fast, &mut fast_extra).is_some() {
            prop_assert!(serde.is_ok(), "fast path accepted {:?}, serde_json rejects it: {:?}", text, serde);
            prop_assert_eq!(fast, slow, "{}", text);
            prop_assert_eq!(fast_extra, slow_extra, "{}", text);
        }
    }
}

proptest! {
    #[test]
    fn string_end_finds_the_first_stop_byte(b in proptest::collection::vec(prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'"'), 1 => Just(b'\\'), 1 => 0u8..0x20, 1 => 0x80u8..=0xff], 0..40)) {
        prop_assert_eq!(string_end(&b), b.iter().position(|c| *c == b'"' || *c == b'\\' || *c < 0x20));
    }
}

#[test]
fn common_events_take_the_fast_path() {
    let (d, _) = decoder();
    let fields = &d.schema().fields;
    for text in [
        r#"{"event_id":"1-1","video_id":"vid-55602","event_type":"view","event_time":"2026-11-29T02:03:35.188Z","user_id":"u25455","value":311}"#,
        r#"{ "video_id": "v", "event_type": "like", "event_time": 1795919201079, "value": null, "extra": true }"#,
        r#"{"video_id":"v","app":{"os":"ios","v":[1,2.5e3,null,{}]},"event_type":"view","event_time":1}"#,
        "{}",
    ] {
        let mut slots = vec![Slot::Missing; fields.len()];
        let mut extra = String::new();
        assert!(
            parse_flat(text, fields, &mut slots, &mut extra).is_some(),
            "{text}"
        );
    }
}

proptest! {
    /// The fast RFC 3339 path agrees with chrono on every string it
    /// accepts, and accepts every well-formed one in its form.
    #[test]
    fn fast_rfc3339_agrees_with_chrono(
        year in 0i64..10_000, month in 0i64..14, day in 0i64..33, hour in 0i64..26, minute in 0i64..62, second in 0i64..62,
        frac in proptest::option::of("[0-9]{0,11}"),
        zone in prop_oneof![Just("Z".to_string()), Just("z".to_string()), (0i64..26, 0i64..62, any::<bool>()).prop_map(|(h, m, neg)| format!("{}{h:02}:{m:02}", if neg { '-' } else { '+' }))],
        cut in proptest::option::of((0usize..40, any::<u8>())),
    ) {
        let frac_s = frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default();
        let mut s = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{frac_s}{zone}");
        if let Some((at, byte)) = cut {
            // A corrupted byte somewhere (kept ASCII so the string stays valid UTF-8).
            let mut b = s.into_bytes();
            if at < b.len() { b[at] = byte % 128; }
            s = String::from_utf8(b).unwrap();
        }
        let chrono_ms = chrono::DateTime::parse_from_rfc3339(&s).map(|t| t.timestamp_millis());
        match rfc3339_ms(&s) {
            Some(ms) => prop_assert_eq!(chrono_ms.ok(), Some(ms), "{}", s),
            None => {
                let in_form = cut.is_none() && frac.as_ref().is_none_or(|f| (1..=9).contains(&f.len())) && zone != "z" && second < 60;
                prop_assert!(!(in_form && chrono_ms.is_ok()), "{} is in the fast form but was left to chrono", s);
            }
        }
    }
}
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
    let a = format!(
        r#"{{"video_id":"v1","event_type":"view","event_time":{NOW},"value":2.5,"extra":[1,{{"x":2}}]}}"#
    );
    let out = d.decode(Some(a.as_bytes()), NOW, &mut cols).unwrap();
    assert_eq!(
        out,
        DecodeOutcome {
            event_time_ms: NOW,
            late: false
        }
    );
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
    assert!(
        batch.column(4).is_null(0),
        "optional event_id absent -> null"
    );
}

#[test]
fn rejects_each_kind_of_bad_input_with_reason() {
    let t = NOW;
    let cases: Vec<(Vec<u8>, RejectReason, &str)> = vec![
        (b"".to_vec(), RejectReason::Empty, "empty"),
        (b"not json".to_vec(), RejectReason::NotJson, ""),
        (vec![b'{', 0xff, 0xfe, b'}'], RejectReason::NotUtf8, "UTF-8"),
        (b"[1,2]".to_vec(), RejectReason::NotObject, "array"),
        (
            format!(r#"{{"event_type":"view","event_time":{t}}}"#).into_bytes(),
            RejectReason::MissingField,
            "video_id",
        ),
        (
            format!(r#"{{"video_id":null,"event_type":"view","event_time":{t}}}"#).into_bytes(),
            RejectReason::MissingField,
            "video_id",
        ),
        (
            format!(r#"{{"video_id":7,"event_type":"view","event_time":{t}}}"#).into_bytes(),
            RejectReason::WrongType,
            "video_id",
        ),
        (
            format!(r#"{{"video_id":"v","event_type":"View!","event_time":{t}}}"#).into_bytes(),
            RejectReason::InvalidValue,
            "event_type",
        ),
        (
            format!(r#"{{"video_id":"","event_type":"view","event_time":{t}}}"#).into_bytes(),
            RejectReason::InvalidValue,
            "video_id",
        ),
        (
            format!(
                r#"{{"video_id":"{}","event_type":"view","event_time":{t}}}"#,
                "x".repeat(257)
            )
            .into_bytes(),
            RejectReason::InvalidValue,
            "257 bytes",
        ),
        (
            format!(r#"{{"video_id":"v","event_type":"view","event_time":{t},"value":"3"}}"#)
                .into_bytes(),
            RejectReason::WrongType,
            "value",
        ),
        (
            format!(r#"{{"video_id":"v","video_id":"w","event_type":"view","event_time":{t}}}"#)
                .into_bytes(),
            RejectReason::DuplicateKey,
            "video_id",
        ),
        (
            r#"{"video_id":"v","event_type":"view","event_time":"yesterday"}"#
                .as_bytes()
                .to_vec(),
            RejectReason::InvalidValue,
            "RFC 3339",
        ),
        (
            format!(r#"{{"video_id":"a\u0000b","event_type":"view","event_time":{t}}}"#)
                .into_bytes(),
            RejectReason::InvalidValue,
            "NUL character",
        ),
        (
            format!(
                r#"{{"video_id":"v","event_type":"view","event_time":{t},"user_id":"\u0000"}}"#
            )
            .into_bytes(),
            RejectReason::InvalidValue,
            "`user_id` contains a NUL",
        ),
        (
            format!("{{\"video_id\":\"a\u{0}b\",\"event_type\":\"view\",\"event_time\":{t}}}")
                .into_bytes(),
            RejectReason::NotJson,
            "",
        ),
        (
            format!(
                r#"{{"video_id":"v","event_type":"view","event_time":{}}}"#,
                t + 3_600_000
            )
            .into_bytes(),
            RejectReason::FutureEventTime,
            "max_future_skew",
        ),
        (
            format!(
                r#"{{"video_id":"v","event_type":"view","event_time":{}}}"#,
                t - 30 * 86_400_000
            )
            .into_bytes(),
            RejectReason::TooOld,
            "max_event_age",
        ),
        (
            format!(r#"{{"video_id":"v","event_type":"view","event_time":{t},"value":NaN}}"#)
                .into_bytes(),
            RejectReason::NotJson,
            "",
        ),
        (
            format!(r#"{{"video_id":"v","event_type":"view","event_time":{t}}} trailing"#)
                .into_bytes(),
            RejectReason::NotJson,
            "trailing",
        ),
    ];
    for (payload, reason, needle) in cases {
        let r = reject(&payload);
        assert_eq!(
            r.reason,
            reason,
            "{:?} -> {r}",
            String::from_utf8_lossy(&payload)
        );
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
    let d = RecordDecoder {
        max_event_bytes: usize::MAX,
        ..d
    };
    let unknown =
        format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW},"x":{nested}}}"#);
    d.decode(Some(unknown.as_bytes()), NOW, &mut cols).unwrap();
    let declared =
        format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW},"value":{nested}}}"#);
    let r = d
        .decode(Some(declared.as_bytes()), NOW, &mut cols)
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::WrongType, "{r}");
    let unbalanced = format!(r#"{{"video_id":"v","x":{}}}"#, "[".repeat(100_000));
    let r = d
        .decode(Some(unbalanced.as_bytes()), NOW, &mut cols)
        .unwrap_err();
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

/// Every undeclared field reaches `_extra` verbatim, in order, on both
/// paths; an event without any has a null there.
#[test]
fn undeclared_fields_are_kept_verbatim() {
    let (d, mut cols) = decoder();
    let cases = [
        (
            format!(
                r#"{{"video_id":"v","country":"FR","event_type":"view","event_time":{NOW},"n":1.50}}"#
            ),
            Some(r#"{"country":"FR","n":1.50}"#.to_string()),
        ),
        (
            format!(r#"{{"video_id":"v","event_type":"view","event_time":{NOW}}}"#),
            None,
        ),
        (
            // Nested values, escapes and big integers take serde_json's path.
            format!(
                r#"{{ "tags": ["a", {{"b": null}}], "video_id":"v","event_type":"view","event_time":{NOW}, "k\u00e9y":"x\"y", "big":123456789012345678901234567890 }}"#
            ),
            Some(
                r#"{"tags":["a", {"b": null}],"kéy":"x\"y","big":123456789012345678901234567890}"#
                    .to_string(),
            ),
        ),
    ];
    for (payload, _) in &cases {
        d.decode(Some(payload.as_bytes()), NOW, &mut cols).unwrap();
    }
    let batch = cols.finish().unwrap();
    let extra = batch
        .column_by_name(super::super::schema::EXTRA_COLUMN)
        .expect("_extra column")
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("utf8")
        .clone();
    let got: Vec<Option<String>> = extra.iter().map(|v| v.map(str::to_string)).collect();
    let want: Vec<Option<String>> = cases.iter().map(|(_, w)| w.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(
        batch.schema().fields().last().map(|f| f.name().as_str()),
        Some("_extra")
    );
}
