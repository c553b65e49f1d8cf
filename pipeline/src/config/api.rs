//! `[api]`: the HTTP API's address, rollups, limits and tokens.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::ByteSize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Rollups that answer `/v1` queries (same keys and measures, different widths).
    pub rollups: Vec<String>,
    /// Longest `[start, end)` a query may ask for.
    #[serde(with = "humantime_serde")]
    pub max_range: Duration,
    /// Most buckets one `/v1/series` answer may hold.
    pub max_series_points: usize,
    /// Largest accepted request body (`POST /v1/events`).
    pub max_body: ByteSize,
    /// A request that takes longer gets a 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests served at once; more get an immediate 503.
    pub max_concurrency: usize,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
    /// Bearer tokens for the read endpoints; empty means open.
    pub read_tokens: Tokens,
    /// Bearer tokens for `POST /v1/events`; empty means open.
    pub write_tokens: Tokens,
    /// Host header values answered besides the listen address (and the
    /// loopback names when it listens on loopback).
    pub allowed_hosts: Vec<String>,
    /// `POST /v1/sql`: memory per query (loaded rollup rows included).
    pub sql_memory: ByteSize,
    /// `POST /v1/sql`: longest run of a query (at most 90% of request_timeout
    /// applies, which ends any request).
    #[serde(with = "humantime_serde")]
    pub sql_timeout: Duration,
    /// `POST /v1/sql`: most rows in an answer.
    pub sql_max_rows: usize,
    /// `POST /v1/sql`: queries run at once; more get a 429.
    pub sql_concurrency: usize,
}

/// Bearer tokens: a list, or one token as a string (handy in the
/// environment: `TALLY__API__READ_TOKENS=s3cret`). Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens(pub Vec<String>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for Tokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let v = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a token string or a list of token strings")
        })? {
            Raw::One(s) if s.is_empty() => Vec::new(),
            Raw::One(s) => s
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            Raw::Many(v) => v,
        };
        Ok(Tokens(v))
    }
}
