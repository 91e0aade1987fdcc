//! The event hub behind `GET /api/signals/stream`: every event a dashboard needs, with a
//! resumable id, a bounded replay ring, and the latest signal per symbol for new clients.
//!
//! Events: `signal` (a symbol's dashboard message — the envelope), `cycle` (a cycle summary),
//! `status` (breaker, kill switch, readiness changes).
//!
//! Where signals come from decides the id:
//! - memory backend: from this process; the id is a local sequence number (`"42"`). The
//!   sequence starts where the process's start time says ([`Hub::starting_at`]: microseconds
//!   since the epoch), not at 1, so an id from before a restart is older than every id of
//!   this process and its client is told its replay is incomplete instead of being sent
//!   nothing until the new sequence catches up;
//! - redis backend: from `stream:dashboard-signals`, followed by one reader per process, so any
//!   replica serves every replica's signals; the id pairs the stream entry id with the local
//!   sequence of cycle/status events (`"1732752000000-0_42"`). A client that reconnects with it
//!   gets exactly the signals after it — from the ring, or from Redis when the ring no longer
//!   reaches back. Cycle and status events are each replica's own.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A Redis stream entry id `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// Parses `ms-seq`.
    pub fn parse(s: &str) -> Option<StreamId> {
        let (a, b) = s.split_once('-')?;
        Some(StreamId(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// A position in the event sequence: the last stream entry and local event seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Last dashboard-stream entry (redis backend only).
    pub stream: Option<StreamId>,
    /// Last local event.
    pub local: u64,
}

impl Cursor {
    /// Parses an id produced by [`Cursor`]'s `Display`.
    pub fn parse(s: &str) -> Option<Cursor> {
        let s = s.trim();
        match s.split_once('_') {
            Some((st, loc)) => Some(Cursor {
                stream: Some(StreamId::parse(st)?),
                local: loc.parse().ok()?,
            }),
            None => Some(Cursor {
                stream: None,
                local: s.parse().ok()?,
            }),
        }
    }
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The Redis dashboard stream.
    Stream(StreamId),
    /// This process.
    Local(u64),
}

/// One event as the SSE stream sends it.
#[derive(Debug)]
pub struct HubEvent {
    /// The id to send (the position after this event).
    pub id: String,
    /// The same position, for ordering.
    pub at: Cursor,
    /// Where it came from.
    pub origin: Origin,
    /// `signal`, `cycle`, `status`.
    pub kind: &'static str,
    /// The event as SSE text (`id:`, `event:`, `data:` lines and the blank line), rendered once
    /// when it enters the hub: every client's stream sends these same bytes, so 5,000 clients
    /// cost 5,000 reference counts instead of 5,000 formatted copies.
    wire: Bytes,
    /// The JSON text: where it sits in `wire`, or its own copy when it spans several lines
    /// (data written by others; SSE sends each line as a `data:` line of its own).
    data: Data,
}

#[derive(Debug)]
enum Data {
    /// `wire[from..to]`.
    Span(usize, usize),
    Own(Arc<str>),
}

impl HubEvent {
    fn new(id: String, at: Cursor, origin: Origin, kind: &'static str, data: &str) -> HubEvent {
        let mut text = String::with_capacity(id.len() + kind.len() + data.len() + 24);
        text.push_str("id: ");
        text.push_str(&id);
        text.push_str("\nevent: ");
        text.push_str(kind);
        text.push('\n');
        let data_field = if data.contains(['\n', '\r']) {
            // Any of CRLF, LF, CR ends a line in SSE: each line its own `data:` field, which
            // the client joins back with LF.
            for line in data.replace("\r\n", "\n").split(['\n', '\r']) {
                text.push_str("data: ");
                text.push_str(line);
                text.push('\n');
            }
            Data::Own(Arc::from(data))
        } else {
            text.push_str("data: ");
            let from = text.len();
            text.push_str(data);
            let span = Data::Span(from, text.len());
            text.push('\n');
            span
        };
        text.push('\n');
        HubEvent {
            id,
            at,
            origin,
            kind,
            wire: Bytes::from(text),
            data: data_field,
        }
    }

    /// The event's JSON text.
    pub fn data(&self) -> &str {
        match &self.data {
            // `wire` was made from a `String`, and the span lies between ASCII characters.
            Data::Span(from, to) => std::str::from_utf8(&self.wire[*from..*to]).unwrap_or(""),
            Data::Own(d) => d,
        }
    }

    /// The event as SSE text, ready to send.
    pub fn wire(&self) -> Bytes {
        self.wire.clone()
    }

    /// The same event at another position (a snapshot's last event carries the hub's).
    fn at(&self, hub: &Hub, at: Cursor) -> HubEvent {
        HubEvent::new(hub.id_of(&at), at, self.origin, self.kind, self.data())
    }
}

struct State {
    cursor: Cursor,
    ring: VecDeque<Arc<HubEvent>>,
    latest: BTreeMap<String, Arc<HubEvent>>,
}

/// The hub.
pub struct Hub {
    tx: broadcast::Sender<Arc<HubEvent>>,
    cap: usize,
    state: Mutex<State>,
    /// `Some` in redis mode: where signals come from and gaps are filled from.
    redis: Option<RedisSource>,
    /// Times following the stream failed since start (the warning is rate-limited; this is
    /// not), shown in `/health/detailed`.
    follow_failures: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
struct RedisSource {
    client: redis::Client,
    key: String,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("cap", &self.cap)
            .field("redis", &self.redis.as_ref().map(|r| &r.key))
            .finish()
    }
}

/// What a new or resuming client starts with.
pub struct Subscription {
    /// Events to send first, in order.
    pub backlog: Vec<Arc<HubEvent>>,
    /// Live events after them (none missed, none repeated).
    pub live: broadcast::Receiver<Arc<HubEvent>>,
    /// False when some missed events could not be replayed (too old).
    pub complete: bool,
}

/// The symbol a dashboard message names; `None` for one that names none (written by
/// something else), which then has no place among the latest per symbol.
fn symbol_of(data: &str) -> Option<String> {
    // Only the part read: a message with a payload naming its symbol has a place, whatever
    // else its writer put beside it.
    #[derive(serde::Deserialize)]
    struct Message {
        payload: Named,
    }
    #[derive(serde::Deserialize)]
    struct Named {
        symbol: String,
    }
    let m: Message = serde_json::from_str(data).ok()?;
    Some(m.payload.symbol)
}

impl Hub {
    /// A hub keeping `cap` events for replay. `redis`: `(client, dashboard stream key)` when
    /// signals come from Redis.
    ///
    /// The local sequence starts at 1: for tests and replays, which have no earlier process.
    pub fn new(cap: usize, redis: Option<(redis::Client, String)>) -> Arc<Hub> {
        Hub::starting_at(cap, redis, 0)
    }

    /// A hub whose local sequence continues after `last_local` — the service passes its start
    /// time in microseconds since the epoch, so ids keep growing across restarts (a process
    /// would have to send a million events a second to catch up with its successor).
    pub fn starting_at(
        cap: usize,
        redis: Option<(redis::Client, String)>,
        last_local: u64,
    ) -> Arc<Hub> {
        // Each client reads from this broadcast buffer; one that falls this far behind is
        // dropped (with an `error` event) rather than slowing anyone else.
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Hub {
            tx,
            cap: cap.max(1),
            state: Mutex::new(State {
                cursor: Cursor {
                    stream: None,
                    local: last_local,
                },
                ring: VecDeque::new(),
                latest: BTreeMap::new(),
            }),
            redis: redis.map(|(client, key)| RedisSource { client, key }),
            follow_failures: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether signals come from Redis.
    pub fn follows_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// How often following the Redis stream failed since start.
    pub fn follow_failures(&self) -> u64 {
        self.follow_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn id_of(&self, c: &Cursor) -> String {
        match (self.redis.is_some(), c.stream) {
            (false, _) => c.local.to_string(),
            (true, s) => format!("{}_{}", s.unwrap_or_default(), c.local),
        }
    }

    fn push(&self, origin: Origin, kind: &'static str, data: Arc<str>) {
        let mut st = self.lock();
        match origin {
            Origin::Stream(id) => {
                if st.cursor.stream.is_some_and(|c| c >= id) {
                    return; // already seen (a reconnecting follower re-reads)
                }
                st.cursor.stream = Some(id);
            }
            Origin::Local(n) => st.cursor.local = n,
        }
        let ev = Arc::new(HubEvent::new(
            self.id_of(&st.cursor),
            st.cursor,
            origin,
            kind,
            &data,
        ));
        if kind == "signal"
            && let Some(sym) = symbol_of(ev.data())
        {
            st.latest.insert(sym, ev.clone());
        }
        if st.ring.len() == self.cap {
            st.ring.pop_front();
        }
        st.ring.push_back(ev.clone());
        // Sent under the lock so subscribers see events in ring order.
        let _ = self.tx.send(ev);
    }

    /// A local event (`cycle`, `status`, or `signal` in memory mode).
    pub fn push_local(&self, kind: &'static str, data: Arc<str>) {
        let next = self.lock().cursor.local + 1;
        self.push(Origin::Local(next), kind, data);
    }

    /// A signal read from the Redis stream.
    pub fn push_stream(&self, id: StreamId, data: Arc<str>) {
        self.push(Origin::Stream(id), "signal", data);
    }

    /// The latest `signal` event of every symbol seen (its data is an envelope).
    pub fn latest_signals(&self) -> Vec<Arc<HubEvent>> {
        self.lock().latest.values().cloned().collect()
    }

    /// A new client: the latest signal of every symbol, then live events.
    ///
    /// The snapshot goes out in the order the signals arrived, each with its own id, so a
    /// client cut off in the middle of it resumes after the last one it got; the last one
    /// carries the hub's current position, so a client that got all of it resumes exactly
    /// where the live events begin.
    pub fn subscribe_fresh(&self) -> Subscription {
        let st = self.lock();
        let live = self.tx.subscribe();
        let mut latest: Vec<&Arc<HubEvent>> = st.latest.values().collect();
        // Both parts of a position only ever grow, so ordering by the pair is arrival order.
        latest.sort_by_key(|e| (e.at.stream, e.at.local));
        let now = st.cursor;
        let last = latest.len().saturating_sub(1);
        let backlog = latest
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                if i == last && e.at != now {
                    Arc::new(e.at(self, now))
                } else {
                    e.clone()
                }
            })
            .collect();
        Subscription {
            backlog,
            live,
            complete: true,
        }
    }

    /// A resuming client: every event after `after`, then live events.
    pub async fn subscribe_after(&self, after: Cursor) -> Subscription {
        let (mut backlog, live, ring_first_stream, local_complete) = {
            let st = self.lock();
            let live = self.tx.subscribe();
            let backlog: Vec<Arc<HubEvent>> = st
                .ring
                .iter()
                .filter(|e| match e.origin {
                    Origin::Stream(id) => after.stream.is_none_or(|c| id > c),
                    Origin::Local(n) => n > after.local,
                })
                .cloned()
                .collect();
            let first_stream = st.ring.iter().find_map(|e| match e.origin {
                Origin::Stream(id) => Some(id),
                Origin::Local(_) => None,
            });
            let first_local = st.ring.iter().find_map(|e| match e.origin {
                Origin::Local(n) => Some(n),
                Origin::Stream(_) => None,
            });
            let local_complete =
                first_local.is_none_or(|f| f <= after.local + 1) || st.cursor.local <= after.local;
            (backlog, live, first_stream, local_complete)
        };
        let mut complete = local_complete;
        // Stream entries older than the ring: read them from Redis.
        if let (Some(src), Some(from)) = (&self.redis, after.stream) {
            let ring_reaches = ring_first_stream.is_none_or(|f| f <= from);
            if !ring_reaches {
                match fetch_range(src, from, ring_first_stream).await {
                    Ok(older) => {
                        let mut merged: Vec<Arc<HubEvent>> = older
                            .into_iter()
                            .map(|(id, data)| {
                                let c = Cursor {
                                    stream: Some(id),
                                    local: after.local,
                                };
                                Arc::new(HubEvent::new(
                                    self.id_of(&c),
                                    c,
                                    Origin::Stream(id),
                                    "signal",
                                    &data,
                                ))
                            })
                            .collect();
                        merged.append(&mut backlog);
                        backlog = merged;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot replay older signals from Redis");
                        complete = false;
                    }
                }
            }
        }
        Subscription {
            backlog,
            live,
            complete,
        }
    }

    /// Follows the Redis dashboard stream until `stop` (redis mode): first the newest entries
    /// (to fill the ring and the latest-per-symbol), then every new one as it is added.
    pub async fn follow_redis(self: Arc<Self>, stop: CancellationToken) {
        let Some(src) = self.redis.clone() else {
            return;
        };
        let mut failures = 0u32;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.follow_once(&src, &mut failures) => r,
            };
            if let Err(e) = r {
                failures += 1;
                self.follow_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "following the dashboard stream failed; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Follows until an error; `failures` is reset by every command that succeeds, so the
    /// warning above counts consecutive failures, not failures since start.
    async fn follow_once(&self, src: &RedisSource, failures: &mut u32) -> Result<(), String> {
        // A connection of its own: XREAD BLOCK would stall every other command on a shared one.
        // Its response timeout must outlast the BLOCK: redis-rs times out responses after
        // 500 ms by default, which cut every idle XREAD short (the "following the dashboard
        // stream failed … Io" warning every ~45 s on a healthy Redis).
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(XREAD_BLOCK + Duration::from_secs(5)));
        let mut conn = src
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("{:?}", e.kind()))?;
        let mut last = self.lock().cursor.stream;
        if last.is_none() {
            let v: redis::Value = redis::cmd("XREVRANGE")
                .arg(&src.key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.cap)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("{:?}", e.kind()))?;
            let mut entries = parse_entries(v);
            entries.reverse();
            for (id, data) in entries {
                self.push_stream(id, data);
            }
            last = self.lock().cursor.stream;
        }
        loop {
            let from = last.map_or_else(|| "$".to_string(), |l| l.to_string());
            let v: redis::Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(XREAD_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&src.key)
                .arg(&from)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("{:?}", e.kind()))?;
            *failures = 0;
            // XREAD answers [[key, [entries…]]] or nil on timeout.
            if let redis::Value::Array(streams) = v {
                for s in streams {
                    if let redis::Value::Array(mut kv) = s
                        && kv.len() == 2
                    {
                        for (id, data) in parse_entries(kv.remove(1)) {
                            self.push_stream(id, data);
                            last = Some(id);
                        }
                    }
                }
            }
        }
    }
}

/// How long one XREAD waits for new entries before asking again.
const XREAD_BLOCK: Duration = Duration::from_secs(5);

/// Entries `(id, message field)` of an XRANGE/XREAD answer; malformed entries (written by
/// someone else) are skipped with a log line.
fn parse_entries(v: redis::Value) -> Vec<(StreamId, Arc<str>)> {
    let mut out = vec![];
    let redis::Value::Array(entries) = v else {
        return out;
    };
    for e in entries {
        let redis::Value::Array(parts) = e else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let id: Option<StreamId> = redis::from_redis_value::<String>(parts[0].clone())
            .ok()
            .and_then(|s| StreamId::parse(&s));
        let fields: Vec<String> = redis::from_redis_value(parts[1].clone()).unwrap_or_default();
        let msg = fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && kv[0] == "message")
            .map(|kv| kv[1].clone());
        match (id, msg) {
            (Some(id), Some(m)) if serde_json::from_str::<serde_json::Value>(&m).is_ok() => {
                out.push((id, Arc::from(m)))
            }
            (id, _) => {
                tracing::warn!(entry = ?id, "skipping a dashboard-stream entry without a JSON `message` field")
            }
        }
    }
    out
}

/// Entries after `from` and before `until` (exclusive both), oldest first.
async fn fetch_range(
    src: &RedisSource,
    from: StreamId,
    until: Option<StreamId>,
) -> Result<Vec<(StreamId, Arc<str>)>, String> {
    let mut conn = src
        .client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("{:?}", e.kind()))?;
    let end = until.map_or_else(|| "+".to_string(), |u| format!("({u}"));
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(&src.key)
        .arg(format!("({from}"))
        .arg(end)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("{:?}", e.kind()))?;
    Ok(parse_entries(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(sym: &str, n: u32) -> Arc<str> {
        Arc::from(format!(r#"{{"payload":{{"symbol":"{sym}","n":{n}}}}}"#))
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(
            Cursor::parse("42"),
            Some(Cursor {
                stream: None,
                local: 42
            })
        );
        let c = Cursor {
            stream: Some(StreamId(1732752000000, 3)),
            local: 7,
        };
        assert_eq!(Cursor::parse("1732752000000-3_7"), Some(c));
        assert_eq!(Cursor::parse("garbage"), None);
        assert_eq!(Cursor::parse("1-x_3"), None);
    }

    #[tokio::test]
    async fn resume_gets_exactly_what_was_missed_in_order() {
        let hub = Hub::new(100, None);
        for i in 0..5 {
            hub.push_local("signal", sig("ETH/USD", i));
        }
        let mut fresh = hub.subscribe_fresh();
        assert_eq!(fresh.backlog.len(), 1, "latest per symbol");
        assert_eq!(fresh.backlog[0].id, "5");
        hub.push_local("cycle", Arc::from("{}"));
        assert_eq!(fresh.live.recv().await.expect("live").id, "6");
        let s = hub.subscribe_after(Cursor::parse("3").expect("c")).await;
        assert!(s.complete);
        assert_eq!(
            s.backlog.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            vec!["4", "5", "6"]
        );
    }

    #[tokio::test]
    async fn a_snapshot_has_one_id_per_event_in_arrival_order_ending_at_the_position() {
        let hub = Hub::new(100, None);
        hub.push_local("signal", sig("B/USD", 0)); // 1
        hub.push_local("signal", sig("A/USD", 0)); // 2
        hub.push_local("signal", sig("C/USD", 0)); // 3
        hub.push_local("signal", sig("B/USD", 1)); // 4
        hub.push_local("cycle", Arc::from("{}")); // 5
        let s = hub.subscribe_fresh();
        let ids: Vec<&str> = s.backlog.iter().map(|e| e.id.as_str()).collect();
        // A(2), C(3), B(4) in arrival order; the last one at the hub's position (5).
        assert_eq!(ids, vec!["2", "3", "5"]);
        let syms: Vec<Option<String>> = s.backlog.iter().map(|e| symbol_of(e.data())).collect();
        assert_eq!(
            syms,
            ["A/USD", "C/USD", "B/USD"].map(|x| Some(x.to_string()))
        );
        // A client cut off after the first resumes with everything after it, none missed.
        let r = hub.subscribe_after(Cursor::parse("2").expect("c")).await;
        assert_eq!(r.backlog.len(), 3);
    }

    #[tokio::test]
    async fn ids_continue_after_a_restart_and_an_older_id_is_incomplete() {
        let before = Hub::starting_at(100, None, 1_000);
        before.push_local("signal", sig("A/USD", 0));
        let old_id = before.subscribe_fresh().backlog[0].id.clone();
        assert_eq!(old_id, "1001");
        // The next process starts later (a larger start).
        let after = Hub::starting_at(100, None, 2_000_000);
        after.push_local("signal", sig("A/USD", 1));
        let s = after
            .subscribe_after(Cursor::parse(&old_id).expect("c"))
            .await;
        assert!(
            !s.complete,
            "an id from before the restart cannot be resumed exactly"
        );
        assert_eq!(s.backlog.len(), 1, "everything this process has");
        assert_eq!(s.backlog[0].id, "2000001");
    }

    #[tokio::test]
    async fn a_ring_that_no_longer_reaches_back_says_so() {
        let hub = Hub::new(3, None);
        for i in 0..10 {
            hub.push_local("signal", sig("ETH/USD", i));
        }
        let s = hub.subscribe_after(Cursor::parse("2").expect("c")).await;
        assert!(!s.complete);
        assert_eq!(s.backlog.len(), 3);
        let s = hub.subscribe_after(Cursor::parse("7").expect("c")).await;
        assert!(s.complete);
    }

    #[tokio::test]
    async fn stream_entries_are_deduplicated() {
        let hub = Hub::new(10, None);
        hub.push_stream(StreamId(5, 0), sig("A/USD", 1));
        hub.push_stream(StreamId(5, 0), sig("A/USD", 1));
        hub.push_stream(StreamId(4, 0), sig("A/USD", 0));
        assert_eq!(hub.lock().ring.len(), 1);
    }
}
