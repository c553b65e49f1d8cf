use super::params::parse_time;
use super::*;

#[test]
fn ct_eq_matches_only_equal_strings() {
    assert!(ct_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
    assert!(!ct_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
    assert!(!ct_eq(b"abc", b"abcd"));
    assert!(!ct_eq(b"", b"a"));
}

#[test]
fn times_format_as_rfc3339_utc() {
    assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
    assert_eq!(fmt_time(1_500), "1970-01-01T00:00:01.500Z");
    assert_eq!(
        parse_time("start", "2026-11-28T10:00:00+01:00").ok(),
        Some(1_795_856_400_000)
    );
    assert!(parse_time("start", "yesterday").is_err());
}
