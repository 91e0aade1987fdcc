//! A minimal Server-Sent Events client for tests: collects events in the background.

use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

pub struct SseClient {
    pub events: Arc<Mutex<Vec<SseEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SseClient {
    /// Connects to `url`, optionally resuming from `last_event_id` (sent as the header).
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        let client = reqwest::Client::new();
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let mut resp = req.send().await.expect("connect");
        assert_eq!(resp.status(), 200);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let mut ev = SseEvent {
                        event: "message".into(),
                        ..Default::default()
                    };
                    let mut data = vec![];
                    let mut any = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            ev.id = Some(v.trim_start().to_string());
                            any = true;
                        } else if let Some(v) = line.strip_prefix("event:") {
                            ev.event = v.trim_start().to_string();
                            any = true;
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                            any = true;
                        }
                    }
                    if any {
                        ev.data = data.join("\n");
                        sink.lock().unwrap().push(ev);
                    }
                }
            }
        });
        SseClient { events, task }
    }

    pub fn snapshot(&self) -> Vec<SseEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `pred` holds on the events so far.
    pub async fn wait(
        &self,
        timeout: Duration,
        pred: impl Fn(&[SseEvent]) -> bool,
    ) -> Vec<SseEvent> {
        crate::helpers::eventually("the SSE condition", timeout, || async {
            let evs = self.snapshot();
            if pred(&evs) {
                Ok(evs)
            } else {
                Err(format!(
                    "{} events so far, the last: {:?}",
                    evs.len(),
                    evs.last()
                ))
            }
        })
        .await
    }

    /// Disconnects.
    pub fn close(self) -> Vec<SseEvent> {
        self.task.abort();
        self.snapshot()
    }
}
