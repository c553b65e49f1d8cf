//! A librdkafka mock cluster (brokers 1 and 2) in its
//! own process, so it outlives the `tally run` processes a fault test kills.
//! Prints its bootstrap address, then takes one command per line on stdin:
//! `down [id]`, `up [id]` (default: both), `rtt <ms>`,
//! `errors fetch|offsetcommit <n>`, `leader <partition> <broker id>`, `quit`.
//! (A leaderless partition is made by moving it to broker 2 and taking 2
//! down: librdkafka 2.12's mock crashes on `partition_leader(None)` while a
//! consumer fetches.)

use std::io::BufRead;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn main() {
    let mut args = std::env::args().skip(1);
    let topic = args.next().expect("usage: mock_broker TOPIC PARTITIONS");
    let partitions: i32 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: mock_broker TOPIC PARTITIONS");
    let cluster = MockCluster::new(2).expect("mock cluster");
    cluster
        .create_topic(&topic, partitions, 1)
        .expect("create topic");
    println!("{}", cluster.bootstrap_servers());
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["down"] => cluster.broker_down(1).and_then(|()| cluster.broker_down(2)),
            ["up"] => cluster.broker_up(1).and_then(|()| cluster.broker_up(2)),
            ["down", id] => cluster.broker_down(id.parse().unwrap_or(1)),
            ["up", id] => cluster.broker_up(id.parse().unwrap_or(1)),
            ["rtt", ms] => {
                let d = Duration::from_millis(ms.parse().unwrap_or(0));
                cluster
                    .broker_round_trip_time(1, d)
                    .and_then(|()| cluster.broker_round_trip_time(2, d))
            }
            ["errors", api, n] => {
                let key = if *api == "fetch" {
                    RDKafkaApiKey::Fetch
                } else {
                    RDKafkaApiKey::OffsetCommit
                };
                let err = if *api == "fetch" {
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION
                } else {
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT
                };
                cluster.request_errors(key, &vec![err; n.parse().unwrap_or(1)]);
                Ok(())
            }
            ["leader", p, id] => {
                cluster.partition_leader(&topic, p.parse().unwrap_or(0), id.parse().ok())
            }
            ["quit"] => break,
            _ => {
                eprintln!("unknown command: {line}");
                Ok(())
            }
        };
        match result {
            Ok(()) => println!("ok {line}"),
            Err(e) => println!("error {line}: {e}"),
        }
    }
}
