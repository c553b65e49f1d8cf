//! `tally topic create`: create the input topic (idempotent).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::source::SourceError;

pub async fn create(
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
) -> Result<bool, SourceError> {
    let cc = crate::source::client::config(
        properties.iter().map(|(k, v)| (k, v)),
        crate::source::client::Role::Connection,
    );
    let admin: AdminClient<DefaultClientContext> = cc
        .create()
        .map_err(|e| SourceError::Create(e.to_string()))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| SourceError::Broker(format!("create topic `{topic}`: {e}")))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => Ok(false),
        Some(Err((t, code))) => Err(SourceError::Broker(format!("create topic `{t}`: {code}"))),
    }
}
