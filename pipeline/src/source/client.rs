//! Every librdkafka client tally makes is configured here, from the
//! `[kafka.properties]` passed verbatim, filtered by what the client is:
//! the group consumer and the bare drain consumer take them all, producers
//! all but the consumer-only ones (which would make librdkafka warn), and
//! metadata and admin clients only what reaches the brokers (addresses and
//! security), so that a group setting never makes them join anything.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::SourceError;

/// What a client is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads the topic (the group member, the bare drain).
    Consumer,
    /// Writes events (`POST /v1/events`, `tally produce`).
    Producer,
    /// Metadata, watermarks and topic administration only.
    Connection,
}

/// librdkafka consumer-only properties, not passed to a producer.
pub(crate) const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "group.protocol",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "enable.partition.eof",
    "isolation.level",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "check.crcs",
];

/// Whether a property is needed to reach the brokers at all.
fn is_connection(key: &str) -> bool {
    [
        "bootstrap.servers",
        "client.id",
        "client.rack",
        "broker.address.family",
    ]
    .contains(&key)
        || key.starts_with("security.")
        || key.starts_with("sasl.")
        || key.starts_with("ssl.")
}

/// Whether a client of `role` takes the property `key`.
pub fn takes(role: Role, key: &str) -> bool {
    match role {
        Role::Consumer => true,
        Role::Producer => !CONSUMER_ONLY.contains(&key),
        Role::Connection => is_connection(key),
    }
}

/// A client configuration for `role` from `(key, value)` properties.
pub fn config<K: AsRef<str>, V: ToString>(
    properties: impl IntoIterator<Item = (K, V)>,
    role: Role,
) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in properties {
        if takes(role, k.as_ref()) {
            cc.set(k.as_ref(), v.to_string());
        }
    }
    cc
}

/// A client for metadata and watermarks only: the connection and security
/// properties, no `group.id` (it joins no group, and closing it must not
/// touch the group `tally run` members are in).
pub fn metadata_client<K: AsRef<str>, V: ToString>(
    properties: impl IntoIterator<Item = (K, V)>,
) -> Result<BaseConsumer, SourceError> {
    let mut cc = config(properties, Role::Connection);
    cc.set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    cc.create().map_err(|e| SourceError::Create(e.to_string()))
}

/// The low and high watermarks of `only` (or of every partition of `topic`).
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    only: Option<i32>,
) -> Result<BTreeMap<i32, (i64, i64)>, SourceError> {
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| SourceError::Broker(format!("metadata of `{topic}`: {e}")))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(SourceError::NotFound(format!(
            "topic `{topic}` has no partitions (does it exist?)"
        )));
    }
    if let Some(p) = only {
        if !partitions.contains(&p) {
            return Err(SourceError::NotFound(format!(
                "topic `{topic}` has no partition {p} (it has {})",
                partitions.len()
            )));
        }
    }
    let mut out = BTreeMap::new();
    for p in partitions
        .into_iter()
        .filter(|p| only.is_none_or(|o| o == *p))
    {
        let marks = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| {
            SourceError::Broker(format!("watermarks of `{topic}` partition {p}: {e}"))
        })?;
        out.insert(p, marks);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_takes_its_properties() {
        let props = [
            ("bootstrap.servers", "b:9092"),
            ("sasl.password", "x"),
            ("group.id", "tally"),
            ("fetch.wait.max.ms", "100"),
            ("linger.ms", "5"),
        ];
        let keys = |role| -> Vec<&str> {
            props
                .iter()
                .filter(|(k, _)| takes(role, k))
                .map(|(k, _)| *k)
                .collect()
        };
        assert_eq!(keys(Role::Consumer).len(), 5);
        assert_eq!(
            keys(Role::Producer),
            ["bootstrap.servers", "sasl.password", "linger.ms"]
        );
        assert_eq!(
            keys(Role::Connection),
            ["bootstrap.servers", "sasl.password"]
        );
        let cc = config(props, Role::Connection);
        assert_eq!(cc.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(cc.get("group.id"), None);
    }
}
