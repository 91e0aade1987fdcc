//! `GET /api/signals/stream`: Server-Sent Events from the [`Hub`](crate::publish::hub::Hub).
//!
//! - A new client first gets the latest signal of every symbol, then live events.
//! - A client that sends `Last-Event-ID` (or `?last_event_id=`) gets exactly the events it
//!   missed, in order, then live ones — none twice. An id this stream never sent is treated
//!   as none (with a `status` event saying the replay is incomplete), never refused.
//! - The stream opens with `retry: 3000` and carries `X-Accel-Buffering: no` for nginx.
//! - A comment after 15 s of quiet keeps proxies from closing an idle stream.
//! - Each event is rendered as SSE text once, by the hub, and the same bytes go to every
//!   client (see [`HubEvent::wire`](crate::publish::hub::HubEvent::wire)).
//! - A client too slow to keep up falls behind the hub's buffer: it gets an `error` event and is
//!   dropped; nobody else waits for it.
//! - Streams end when the server stops.
//! - Streams are capped ([`StreamSlots`]): in all, below the connection cap, so the probes,
//!   `/metrics` and the admin paths always find a connection, and per client address. A
//!   stream beyond a cap is refused with 503 and `Retry-After` (counted, logged).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use crate::publish::hub::{Cursor, HubEvent};
use crate::telemetry::names;

/// How long after a cut a client should reconnect (the stream's `retry:` field).
const RECONNECT_AFTER: Duration = Duration::from_secs(3);

/// How long a refused client is told to wait before it tries again.
const RETRY_AFTER_SECONDS: u64 = 5;

/// How many SSE streams may be open: in all, and from one client address.
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    /// 0: no limit per address.
    per_client: usize,
    open: std::sync::Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_client: std::collections::HashMap<std::net::IpAddr, usize>,
    /// Refusals since the last warning, and when that was (one line per 10 s at most).
    refused: u64,
    logged: Option<tokio::time::Instant>,
}

/// Why a stream was refused (the label of `sse_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every stream slot is taken.
    Full,
    /// This client address holds its share already.
    ClientLimit,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "streams_full",
            Refusal::ClientLimit => "client_limit",
        }
    }
}

/// An open stream's place, given back when the stream ends.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<StreamSlots>,
    client: std::net::IpAddr,
    _gauge: ClientGuard,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.slots.lock();
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                o.by_client.remove(&self.client);
            }
        }
    }
}

impl StreamSlots {
    /// At most `max` streams, `per_client` from one address (0: no such limit).
    pub fn new(max: usize, per_client: usize) -> Arc<StreamSlots> {
        Arc::new(StreamSlots {
            max: max.max(1),
            per_client,
            open: std::sync::Mutex::new(Open::default()),
        })
    }

    /// The streams allowed beside a connection cap of `connections`: `configured`, but
    /// never more than three quarters of the cap, so a quarter (at least 8) always remains
    /// for probes, `/metrics`, the API and the admin paths.
    pub fn cap_for(configured: usize, connections: usize) -> usize {
        let reserve = (connections / 4).max(8);
        configured.min(connections.saturating_sub(reserve)).max(1)
    }

    /// The cap in force.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Streams open now.
    pub fn open_now(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a stream from `client`, or why not (counted, and logged at most every
    /// 10 s with how many were refused since).
    pub fn try_open(self: &Arc<Self>, client: std::net::IpAddr) -> Result<Slot, Refusal> {
        let mut o = self.lock();
        let mine = o.by_client.get(&client).copied().unwrap_or(0);
        let refusal = if o.total >= self.max {
            Some(Refusal::Full)
        } else if self.per_client > 0 && mine >= self.per_client {
            Some(Refusal::ClientLimit)
        } else {
            None
        };
        if let Some(r) = refusal {
            metrics::counter!(names::SSE_REJECTED, "reason" => r.as_str()).increment(1);
            o.refused += 1;
            if o.logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                tracing::warn!(
                    reason = r.as_str(),
                    refused = o.refused,
                    open = o.total,
                    max = self.max,
                    per_client = self.per_client,
                    client = %client,
                    "SSE stream refused (503, Retry-After); the probes and the API are still served"
                );
                o.refused = 0;
                o.logged = Some(tokio::time::Instant::now());
            }
            return Err(r);
        }
        o.total += 1;
        *o.by_client.entry(client).or_insert(0) += 1;
        drop(o);
        Ok(Slot {
            slots: self.clone(),
            client,
            _gauge: ClientGuard::new(),
        })
    }
}

/// The 503 for a refused stream: JSON naming the cap, and when to retry.
fn refused(r: Refusal, slots: &StreamSlots) -> Response {
    let detail = match r {
        Refusal::Full => format!("every SSE stream slot is taken ({} open)", slots.max()),
        Refusal::ClientLimit => format!(
            "this client address holds {} SSE streams, the most allowed (http.max_sse_streams_per_client)",
            slots.per_client
        ),
    };
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        // Closed after the answer: a refused client must not hold a connection idle.
        [
            (
                axum::http::header::RETRY_AFTER,
                RETRY_AFTER_SECONDS.to_string(),
            ),
            (axum::http::header::CONNECTION, "close".to_string()),
        ],
        axum::Json(serde_json::json!({"error": detail, "reason": r.as_str()})),
    )
        .into_response()
}

/// Open streams (for the gauge).
static CLIENTS: AtomicI64 = AtomicI64::new(0);

/// Counts a client for as long as its stream lives.
#[derive(Debug)]
struct ClientGuard;

impl ClientGuard {
    fn new() -> Self {
        let n = CLIENTS.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(names::SSE_CLIENTS).set(n as f64);
        ClientGuard
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let n = CLIENTS.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(names::SSE_CLIENTS).set(n as f64);
    }
}

/// `/api/signals/stream` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// Resume after this event id, for clients that cannot send the `Last-Event-ID` header
    /// (the header wins). An id this stream never sent is treated as none.
    last_event_id: Option<String>,
}

/// What a client's stream carries, before it becomes SSE text.
#[derive(Debug)]
enum Out {
    /// A hub event.
    Event(Arc<HubEvent>),
    /// Some missed events were too old to replay.
    Incomplete,
    /// The client fell this many events behind and is dropped.
    TooSlow(u64),
    /// Nothing was sent for [`KEEP_ALIVE`].
    KeepAlive,
}

impl Out {
    fn into_bytes(self) -> Bytes {
        match self {
            // Rendered once by the hub for every client.
            Out::Event(e) => e.wire(),
            Out::Incomplete => Bytes::from_static(
                b"event: status\ndata: {\"replay\":\"incomplete\",\"detail\":\"some missed events are older than the replay buffer\"}\n\n",
            ),
            Out::TooSlow(n) => Bytes::from(format!(
                "event: error\ndata: {{\"error\":\"client too slow: {n} events behind; reconnect with Last-Event-ID\"}}\n\n"
            )),
            Out::KeepAlive => Bytes::from_static(b": keep-alive\n\n"),
        }
    }
}

/// A comment this long after the last thing sent keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The live stream (Server-Sent Events): `signal` events (every stage's message), `cycle`
/// summaries, `status` changes (readiness, kill switch) and keep-alive comments. A client
/// resumes with `Last-Event-ID`; events it missed are replayed while the server still holds
/// them, else an `incomplete` event says so.
#[utoipa::path(
    get,
    path = "/api/signals/stream",
    tag = "signals",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "The last event id received.")
    ),
    responses(
        (status = 200, description = "An endless event stream.", content_type = "text/event-stream", body = String),
        (status = 503, description = "Every stream slot, or this client address's share, is taken; retry after `Retry-After` seconds.", body = crate::http::ErrorBody)
    )
)]
pub(crate) async fn stream(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let slot = match s.sse.try_open(peer.ip()) {
        Ok(slot) => slot,
        Err(r) => return refused(r, &s.sse),
    };
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.last_event_id)
        .filter(|v| !v.trim().is_empty());
    let hub = s.publisher.hub().clone();
    let sub = match raw.as_deref().map(|r| (r, Cursor::parse(r))) {
        None => hub.subscribe_fresh(),
        Some((_, Some(c))) => hub.subscribe_after(c).await,
        // Not an id this stream sent (another server's, a proxy's, garbage): treated as none,
        // and the client is told its replay is incomplete. A 400 here would make a browser's
        // EventSource stop reconnecting for good.
        Some((r, None)) => {
            tracing::debug!(
                last_event_id = r,
                "unknown Last-Event-ID; streaming from now"
            );
            crate::publish::hub::Subscription {
                complete: false,
                ..hub.subscribe_fresh()
            }
        }
    };
    let stop = s.streams_stop.clone();
    let complete = sub.complete;
    // The first thing on the wire says how soon to reconnect after a cut.
    let opening = Bytes::from(format!(
        "retry: {}\n: connected\n\n",
        RECONNECT_AFTER.as_millis()
    ));
    let body = futures::stream::once(async { opening })
        .chain(events(sub.backlog, sub.live, complete, stop, slot).map(Out::into_bytes))
        .map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // nginx (and ingress-nginx) buffer proxied responses unless told not to: events
            // would arrive in bursts, or only when the buffer fills.
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// A client's stream: what it missed (or that it missed too much), then the hub's live
/// events, with a keep-alive comment after [`KEEP_ALIVE`] of quiet. Polled by the connection
/// that writes it — no task or channel of its own between the hub and the socket: with
/// thousands of clients, each event was a wake of that task, a channel send and a wake of the
/// connection per client (two task switches where one does). The stream, and with it the
/// client's slot, is dropped the moment the connection ends (hyper watches the socket while a
/// response streams) or the server stops.
fn events(
    backlog: Vec<Arc<HubEvent>>,
    live: tokio::sync::broadcast::Receiver<Arc<HubEvent>>,
    complete: bool,
    stop: tokio_util::sync::CancellationToken,
    slot: Slot,
) -> impl Stream<Item = Out> {
    let mut first: std::collections::VecDeque<Out> = backlog.into_iter().map(Out::Event).collect();
    if !complete {
        first.push_front(Out::Incomplete);
    }
    let now = tokio::time::Instant::now();
    let state = Live {
        first,
        live,
        stop,
        _slot: slot,
        sent: now,
        // One timer for the stream's life, moved only when it fires early: an event does not
        // re-arm it (with thousands of clients, that is a timer per client per event).
        quiet: Box::pin(tokio::time::sleep_until(now + KEEP_ALIVE)),
        ended: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        if let Some(out) = st.first.pop_front() {
            return Some((out, st));
        }
        loop {
            tokio::select! {
                _ = st.stop.cancelled() => return None,
                r = st.live.recv() => match r {
                    Ok(e) => {
                        st.sent = tokio::time::Instant::now();
                        return Some((Out::Event(e), st));
                    }
                    Err(RecvError::Lagged(n)) => {
                        metrics::counter!(names::SSE_CLIENTS_DROPPED).increment(1);
                        tracing::warn!(missed = n, "SSE client too slow; dropping it");
                        st.ended = true;
                        return Some((Out::TooSlow(n), st));
                    }
                    Err(RecvError::Closed) => return None,
                },
                () = &mut st.quiet => {
                    let due = st.sent + KEEP_ALIVE;
                    let now = tokio::time::Instant::now();
                    if due > now {
                        st.quiet.as_mut().reset(due);
                        continue;
                    }
                    st.sent = now;
                    st.quiet.as_mut().reset(now + KEEP_ALIVE);
                    return Some((Out::KeepAlive, st));
                }
            }
        }
    })
}

/// The state of one client's stream between two items.
struct Live {
    /// Sent before anything live: `incomplete` if the replay fell short, then the backlog.
    first: std::collections::VecDeque<Out>,
    live: tokio::sync::broadcast::Receiver<Arc<HubEvent>>,
    stop: tokio_util::sync::CancellationToken,
    /// Held for the stream's life: the slot comes back when the stream is dropped.
    _slot: Slot,
    /// When the last item went out, for the keep-alive.
    sent: tokio::time::Instant,
    /// Fires [`KEEP_ALIVE`] after `sent`, or earlier and is moved (see `events`).
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The client was told it fell behind; nothing more follows.
    ended: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::hub::Hub;

    /// A slot of a roomy cap, for streams made directly.
    fn slot() -> Slot {
        StreamSlots::new(100, 0)
            .try_open(std::net::Ipv4Addr::LOCALHOST.into())
            .expect("room")
    }

    #[test]
    fn slots_are_capped_in_all_and_per_client_and_given_back() {
        let a: std::net::IpAddr = std::net::Ipv4Addr::new(10, 0, 0, 1).into();
        let b: std::net::IpAddr = std::net::Ipv4Addr::new(10, 0, 0, 2).into();
        let slots = StreamSlots::new(3, 2);
        let a1 = slots.try_open(a).expect("first");
        let _a2 = slots.try_open(a).expect("second");
        assert_eq!(slots.try_open(a).err(), Some(Refusal::ClientLimit));
        let _b1 = slots.try_open(b).expect("another client");
        assert_eq!(slots.try_open(b).err(), Some(Refusal::Full));
        assert_eq!(slots.open_now(), 3);
        drop(a1);
        assert_eq!(slots.open_now(), 2);
        assert!(slots.try_open(b).is_ok(), "a slot given back is free again");
        // Beside a connection cap a quarter (at least 8) stays free.
        assert_eq!(StreamSlots::cap_for(2048, 4096), 2048);
        assert_eq!(StreamSlots::cap_for(5000, 4096), 3072);
        assert_eq!(StreamSlots::cap_for(100, 20), 12);
        assert_eq!(StreamSlots::cap_for(100, 4), 1);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_gets_an_error_and_is_dropped_while_others_keep_up() {
        let hub = Hub::new(4096, None);
        let slow = hub.subscribe_fresh();
        let fast = hub.subscribe_fresh();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut fast_stream = Box::pin(events(fast.backlog, fast.live, true, stop.clone(), slot()));
        // The fast client reads as events come; the slow one reads nothing meanwhile.
        let mut fast_seen = 0;
        for i in 0..3000 {
            hub.push_local(
                "signal",
                Arc::from(format!(r#"{{"payload":{{"symbol":"S{i}/USD"}}}}"#)),
            );
            if let Some(Out::Event(_)) = fast_stream.next().await {
                fast_seen += 1;
            }
        }
        assert_eq!(fast_seen, 3000, "the fast client got everything");
        let slow_stream = events(slow.backlog, slow.live, true, stop.clone(), slot());
        let out: Vec<Out> = slow_stream.collect().await;
        // It gets what the buffer still holds, then the error, then the end of the stream.
        assert!(
            matches!(out.last(), Some(Out::TooSlow(n)) if *n > 0),
            "{:?}",
            out.last()
        );
        assert!(out.len() < 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_gets_a_keep_alive_comment_every_15_seconds_of_quiet_only() {
        let hub = Hub::new(16, None);
        let sub = hub.subscribe_fresh();
        let stop = tokio_util::sync::CancellationToken::new();
        let start = tokio::time::Instant::now();
        let mut stream = Box::pin(events(sub.backlog, sub.live, true, stop.clone(), slot()));
        // Quiet from the start: the first comment at 15 s.
        assert!(matches!(stream.next().await, Some(Out::KeepAlive)));
        assert_eq!(start.elapsed(), KEEP_ALIVE);
        // An event at 25 s: the next comment 15 s after it, not at 30 s.
        let pusher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                hub.push_local("cycle", Arc::from("{}"));
            })
        };
        assert!(matches!(stream.next().await, Some(Out::Event(_))));
        assert_eq!(start.elapsed(), Duration::from_secs(25));
        pusher.await.expect("pusher");
        assert!(matches!(stream.next().await, Some(Out::KeepAlive)));
        assert_eq!(start.elapsed(), Duration::from_secs(40));
    }

    #[test]
    fn events_go_out_as_the_hub_rendered_them_and_data_of_several_lines_as_several_fields() {
        let hub = Hub::new(16, None);
        let sub = hub.subscribe_fresh();
        let mut live = sub.live;
        hub.push_local("signal", Arc::from(r#"{"payload":{"symbol":"ETH/USD"}}"#));
        // Data written by others may hold any line break; each line is a `data:` field.
        hub.push_local("status", Arc::from("a\r\nb\rc\nd"));
        let one = live.try_recv().expect("first");
        let text = Out::Event(one.clone()).into_bytes();
        assert_eq!(
            std::str::from_utf8(&text).expect("utf-8"),
            format!(
                "id: {}\nevent: signal\ndata: {{\"payload\":{{\"symbol\":\"ETH/USD\"}}}}\n\n",
                one.id
            )
        );
        assert_eq!(one.data(), r#"{"payload":{"symbol":"ETH/USD"}}"#);
        let two = live.try_recv().expect("second");
        let text = Out::Event(two.clone()).into_bytes();
        assert!(
            std::str::from_utf8(&text)
                .expect("utf-8")
                .ends_with("event: status\ndata: a\ndata: b\ndata: c\ndata: d\n\n"),
            "{text:?}"
        );
        assert_eq!(
            two.data(),
            "a\r\nb\rc\nd",
            "the data itself is kept as it came"
        );
    }

    #[tokio::test]
    async fn streams_end_when_the_server_stops() {
        let hub = Hub::new(16, None);
        let sub = hub.subscribe_fresh();
        let stop = tokio_util::sync::CancellationToken::new();
        let stream = events(sub.backlog, sub.live, false, stop.clone(), slot());
        stop.cancel();
        let out: Vec<Out> = stream.collect().await;
        assert!(matches!(out.as_slice(), [Out::Incomplete]), "{out:?}");
    }
}
