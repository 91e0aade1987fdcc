//! The Redis sink's outbox on a real Redis: overflow while Redis is down, and a delivery whose
//! outcome was unknown (it landed, but the answer never came back) retried without a duplicate.

use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::coordination::redis::connect;
use autonomous_runner::model::{Action, examples};
use autonomous_runner::pipeline::{Stage, StageMessage};
use autonomous_runner::publish::Sink;
use autonomous_runner::publish::redis::RedisSink;
use autonomous_runner::resilience::{Breaker, BreakerMode, BreakerSettings};
use autonomous_runner::schedule::CycleId;
use tokio_util::sync::CancellationToken;

use crate::redis_server::RedisServer;

fn breaker() -> Breaker {
    // Never opens: these tests are about the outbox, not the breaker.
    Breaker::new(
        autonomous_runner::resilience::BreakerKind::Redis,
        BreakerSettings {
            failure_threshold: 1_000,
            recovery_timeout: Duration::from_secs(1),
            half_open_max_calls: 1,
            success_threshold: 1,
            mode: BreakerMode::Normal,
        },
    )
}

/// The report of the tick at 10:`n` (n < 60), so its minute says which message it was.
fn message(n: usize) -> StageMessage {
    let cycle: CycleId = format!("2026-11-28T10:{n:02}:00Z")
        .parse()
        .expect("a cycle id");
    let signal = examples::signal("ETH/USD", cycle, Action::Hold, 0.5, 3000.0);
    StageMessage::new(examples::payload(Stage::Report, signal), 1, "rules")
}

/// The tick minute (`n`) of every dashboard-stream entry, in order.
async fn stream_ns(redis: &RedisServer) -> Vec<u64> {
    redis
        .stream("stream:dashboard-signals")
        .await
        .iter()
        .map(|(_, env)| {
            let cycle: CycleId =
                serde_json::from_value(env["payload"]["cycle_id"].clone()).expect("a cycle id");
            u64::from(chrono::Timelike::minute(&cycle.time()))
        })
        .collect()
}

#[tokio::test]
async fn a_full_outbox_drops_the_oldest_counts_them_and_delivers_the_rest_in_order() {
    let mut redis = RedisServer::start().await;
    let sink = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 3);
    redis.stop();
    for n in 1..=5 {
        sink.publish(&message(n)).await;
    }
    assert_eq!(sink.depth(), 3);
    assert_eq!(sink.dropped(), 2);
    redis.restart().await;
    sink.flush(Duration::from_secs(20)).await;
    assert_eq!(sink.depth(), 0);
    assert_eq!(
        stream_ns(&redis).await,
        vec![3, 4, 5],
        "the newest three, in order"
    );
}

#[tokio::test]
async fn a_delivery_whose_outcome_was_unknown_is_retried_without_a_duplicate() {
    let redis = RedisServer::start().await;
    let sink = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 100);
    let stop = CancellationToken::new();
    let deliverer = tokio::spawn(Arc::clone(&sink).run(stop.clone()));
    // Redis holds writes for 3 s: the sink's request times out after 2 s (outcome unknown),
    // and the held write is applied when the pause ends — the message did land.
    let mut admin = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    sink.publish(&message(1)).await;
    sink.publish(&message(2)).await;
    // The retry finds both messages already in the stream and adds neither again.
    crate::helpers::eventually("the outbox to drain", Duration::from_secs(30), || async {
        match sink.depth() {
            0 => Ok(()),
            d => Err(format!("{d} waiting")),
        }
    })
    .await;
    stop.cancel();
    let _ = deliverer.await;
    assert_eq!(
        stream_ns(&redis).await,
        vec![1, 2],
        "each message exactly once"
    );
}

/// The spool round trip: a flush that cannot reach Redis writes the outbox to the spool; a
/// new sink queues it first (in order, before its own messages) and delivers it once; a line
/// someone else broke is kept aside in `.rejected`, not dropped and not fatal.
#[tokio::test]
async fn the_spool_carries_the_outbox_to_the_next_sink_in_order() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("outbox-spool.jsonl");
    let first = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 100);
    assert_eq!(first.with_spool(spool.clone()), 0, "nothing to restore yet");
    redis.stop();
    for n in 1..=3 {
        first.publish(&message(n)).await;
    }
    first.flush(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&spool).expect("spooled");
    assert_eq!(text.lines().count(), 3);
    std::fs::write(&spool, format!("{text}{{\"not\": \"a message\"}}\n")).unwrap();

    redis.restart().await;
    let second = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 100);
    assert_eq!(second.with_spool(spool.clone()), 3);
    // Restored, the file is the journal of what is still to deliver: the three good lines.
    assert_eq!(std::fs::read_to_string(&spool).unwrap().lines().count(), 3);
    let aside = std::fs::read_to_string(dir.path().join("outbox-spool.jsonl.rejected")).unwrap();
    assert_eq!(aside, "{\"not\": \"a message\"}\n");
    second.publish(&message(4)).await;
    second.flush(Duration::from_secs(20)).await;
    assert_eq!(second.depth(), 0);
    assert_eq!(stream_ns(&redis).await, vec![1, 2, 3, 4]);
    assert_eq!(
        std::fs::read_to_string(&spool).unwrap(),
        "",
        "everything delivered: the journal is empty"
    );
}

/// The spool is a journal: every message is in the file from the moment `publish` returns
/// until it is delivered, so a process that dies without a shutdown (the sink dropped
/// without a flush, as SIGKILL would) leaves it for the next one — while Redis is down and
/// while it is up but the deliverer has not run yet.
#[tokio::test]
async fn a_sink_that_dies_without_a_flush_leaves_every_undelivered_message_in_its_journal() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("outbox-spool.jsonl");
    let first = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 100);
    first.with_spool(spool.clone());
    // Redis up, no deliverer running: published, not yet delivered.
    first.publish(&message(1)).await;
    redis.stop();
    first.publish(&message(2)).await;
    first.publish(&message(3)).await;
    assert_eq!(std::fs::read_to_string(&spool).unwrap().lines().count(), 3);
    drop(first);
    redis.restart().await;
    let second = RedisSink::new(connect(&redis.url()).unwrap(), breaker(), "", 1000, 100);
    assert_eq!(second.with_spool(spool.clone()), 3);
    second.flush(Duration::from_secs(20)).await;
    assert_eq!(stream_ns(&redis).await, vec![1, 2, 3]);
    assert_eq!(std::fs::read_to_string(&spool).unwrap(), "");
}
