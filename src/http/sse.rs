//! `GET /api/signals/stream`: Server-Sent Events from the [`Hub`](crate::publish::hub::Hub).
//!
//! - A new client first gets the latest signal of every symbol, then live events.
//! - A client that sends `Last-Event-ID` (or `?last_event_id=`) gets exactly the events it
//!   missed, in order, then live ones — none twice.
//! - A comment every 15 s keeps proxies from closing an idle stream.
//! - A client too slow to keep up falls behind the hub's buffer: it gets an `error` event and is
//!   dropped; nobody else waits for it.
//! - Streams end when the server stops.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use crate::publish::hub::{Cursor, HubEvent};
use crate::telemetry::names;

/// Open streams (for the gauge).
static CLIENTS: AtomicI64 = AtomicI64::new(0);

/// Counts a client for as long as its stream lives.
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

#[derive(Debug, Deserialize)]
pub(crate) struct StreamQuery {
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
}

impl Out {
    fn into_sse(self) -> Event {
        match self {
            Out::Event(e) => Event::default().id(e.id.clone()).event(e.kind).data(&*e.data),
            Out::Incomplete => Event::default()
                .event("status")
                .data(r#"{"replay":"incomplete","detail":"some missed events are older than the replay buffer"}"#),
            Out::TooSlow(n) => Event::default()
                .event("error")
                .data(format!(r#"{{"error":"client too slow: {n} events behind; reconnect with Last-Event-ID"}}"#)),
        }
    }
}

pub(crate) async fn stream(
    State(s): State<AppState>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.last_event_id)
        .filter(|v| !v.trim().is_empty());
    let hub = s.publisher.hub().clone();
    let sub = match raw {
        None => hub.subscribe_fresh(),
        Some(r) => match Cursor::parse(&r) {
            Some(c) => hub.subscribe_after(c).await,
            None => {
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"error": format!("Last-Event-ID {r:?} is not an id this stream sent")})),
                )
                    .into_response();
            }
        },
    };
    let stop = s.streams_stop.clone();
    let complete = sub.complete;
    let stream =
        events(sub.backlog, sub.live, complete, stop).map(|o| Ok::<_, Infallible>(o.into_sse()));
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

fn events(
    backlog: Vec<Arc<HubEvent>>,
    mut live: tokio::sync::broadcast::Receiver<Arc<HubEvent>>,
    complete: bool,
    stop: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Out> {
    channel_stream(move |tx| async move {
        let _guard = ClientGuard::new();
        if !complete && tx.send(Out::Incomplete).await.is_err() {
            return;
        }
        for e in backlog {
            if tx.send(Out::Event(e)).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                r = live.recv() => r,
            };
            match next {
                Ok(e) => {
                    if tx.send(Out::Event(e)).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    metrics::counter!(names::SSE_CLIENTS_DROPPED).increment(1);
                    tracing::warn!(missed = n, "SSE client too slow; dropping it");
                    let _ = tx.send(Out::TooSlow(n)).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

/// A stream fed by a task through a small channel (the task stops when the client goes).
fn channel_stream<F, Fut>(f: F) -> impl Stream<Item = Out>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Out>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A few events of slack between the hub and the socket; the hub's buffer is the real one.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::hub::Hub;

    #[tokio::test]
    async fn a_client_that_falls_behind_gets_an_error_and_is_dropped_while_others_keep_up() {
        let hub = Hub::new(4096, None);
        let slow = hub.subscribe_fresh();
        let fast = hub.subscribe_fresh();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut fast_stream = Box::pin(events(fast.backlog, fast.live, true, stop.clone()));
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
        let slow_stream = events(slow.backlog, slow.live, true, stop.clone());
        let out: Vec<Out> = slow_stream.collect().await;
        // It gets what the buffer still holds, then the error, then the end of the stream.
        assert!(
            matches!(out.last(), Some(Out::TooSlow(n)) if *n > 0),
            "{:?}",
            out.last()
        );
        assert!(out.len() < 3000);
    }

    #[tokio::test]
    async fn streams_end_when_the_server_stops() {
        let hub = Hub::new(16, None);
        let sub = hub.subscribe_fresh();
        let stop = tokio_util::sync::CancellationToken::new();
        let stream = events(sub.backlog, sub.live, false, stop.clone());
        stop.cancel();
        let out: Vec<Out> = stream.collect().await;
        assert!(matches!(out.as_slice(), [Out::Incomplete]), "{out:?}");
    }
}
