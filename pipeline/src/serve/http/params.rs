//! Query parameters: strict parsing (unknown or repeated ones refused),
//! RFC 3339 times, ids, ranges checked against `api.max_range`, and the
//! tier plan of a range.

use super::*;

pub(super) struct Params(pub(super) BTreeMap<String, String>);

pub(super) fn params(
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&str],
) -> Result<Params, ApiError> {
    let Query(pairs) = q.map_err(|e| {
        ApiError::bad(
            "invalid_query",
            format!("the query string cannot be parsed: {e}"),
        )
    })?;
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            let shown: String = k.chars().take(64).collect();
            return Err(ApiError::bad(
                "unknown_parameter",
                format!(
                    "unknown parameter `{shown}`; this endpoint takes {}",
                    allowed.join(", ")
                ),
            ));
        }
        if map.contains_key(&k) {
            return Err(ApiError::bad(
                "invalid_parameter",
                format!("parameter `{k}` is given more than once"),
            ));
        }
        map.insert(k, v);
    }
    Ok(Params(map))
}

pub(super) fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            let shown: String = v.chars().take(64).collect();
            ApiError::bad(
                "invalid_parameter",
                format!(
                    "`{name}` = {shown:?} is not an RFC 3339 time such as 2026-11-28T10:00:00Z"
                ),
            )
        })
}

pub(crate) fn fmt_time(ms: i64) -> String {
    let format = if ms % 1000 == 0 {
        SecondsFormat::Secs
    } else {
        SecondsFormat::Millis
    };
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(format, true))
}

impl Params {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub(super) fn required(&self, name: &str) -> Result<&str, ApiError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(ApiError::bad(
                "invalid_parameter",
                format!("`{name}` is empty"),
            )),
            None => Err(ApiError::bad(
                "missing_parameter",
                format!("missing required parameter `{name}`"),
            )),
        }
    }

    pub(super) fn id(&self, name: &str, required: bool) -> Result<Option<&str>, ApiError> {
        let v = if required {
            Some(self.required(name)?)
        } else {
            self.get(name)
        };
        match v {
            Some("") => Err(ApiError::bad(
                "invalid_parameter",
                format!("`{name}` is empty; omit it instead"),
            )),
            Some(v) if v.len() > MAX_ID_BYTES => Err(ApiError::bad(
                "invalid_parameter",
                format!(
                    "`{name}` is {} bytes; ids are at most {MAX_ID_BYTES} bytes",
                    v.len()
                ),
            )),
            v => Ok(v),
        }
    }

    /// `[start, end)`, checked against `api.max_range`.
    pub(super) fn range(&self, s: &ApiState) -> Result<(i64, i64), ApiError> {
        let start = parse_time("start", self.required("start")?)?;
        let end = parse_time("end", self.required("end")?)?;
        if start < 0 {
            return Err(ApiError::bad(
                "invalid_parameter",
                "`start` must not be before 1970-01-01T00:00:00Z",
            ));
        }
        if start >= end {
            return Err(ApiError::bad(
                "invalid_range",
                "`start` must be before `end` (the range is [start, end))",
            ));
        }
        let max = i64::try_from(s.cfg.max_range.as_millis()).unwrap_or(i64::MAX);
        if end - start > max {
            return Err(ApiError::bad(
                "range_too_long",
                format!(
                    "`end` - `start` is {}; api.max_range allows at most {}",
                    humantime::format_duration(std::time::Duration::from_millis(
                        (end - start).unsigned_abs()
                    )),
                    humantime::format_duration(s.cfg.max_range)
                ),
            ));
        }
        Ok((start, end))
    }

    pub(super) fn plan(
        &self,
        tiers: &crate::serve::tiers::Tiers,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::serve::tiers::Segment>, ApiError> {
        let plan = tiers
            .plan(start, end)
            .map_err(|(_, message)| ApiError::bad("unaligned_range", message))?;
        let now = chrono::Utc::now().timestamp_millis();
        tiers
            .check_retained(&plan, start, end, now)
            .map_err(not_retained)?;
        Ok(plan)
    }
}
