//! A scripted Coinbase-shaped candles server: per product, a delay and a status code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What the server does for one product.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    pub delay: Duration,
    pub status: Option<u16>,
}

#[derive(Clone, Default)]
struct Script {
    per_product: Arc<Mutex<HashMap<String, Behaviour>>>,
    default: Arc<Mutex<Behaviour>>,
}

pub struct MarketServer {
    pub url: String,
    script: Script,
    _task: tokio::task::JoinHandle<()>,
}

impl MarketServer {
    pub async fn start() -> MarketServer {
        let script = Script::default();
        let app = axum::Router::new()
            .route("/products/{product}/candles", get(candles))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MarketServer {
            url: format!("http://{addr}"),
            script,
            _task: task,
        }
    }

    /// Sets the behaviour for `product` (e.g. `SOL-USD`).
    pub fn set(&self, product: &str, b: Behaviour) {
        self.script
            .per_product
            .lock()
            .unwrap()
            .insert(product.to_string(), b);
    }

    /// Sets the behaviour for every product not set individually.
    pub fn set_default(&self, b: Behaviour) {
        *self.script.default.lock().unwrap() = b;
    }
}

async fn candles(State(s): State<Script>, Path(product): Path<String>) -> Response {
    let b = s
        .per_product
        .lock()
        .unwrap()
        .get(&product)
        .copied()
        .unwrap_or(*s.default.lock().unwrap());
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    if let Some(code) = b.status {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            code,
            axum::Json(serde_json::json!({"message": "scripted failure"})),
        )
            .into_response();
    }
    // 120 one-minute candles, newest first, ending at the last closed minute: a gentle wave.
    let now = chrono::Utc::now().timestamp() / 60 * 60 - 60;
    let rows: Vec<[f64; 6]> = (0..120)
        .map(|i| {
            let t = now - 60 * i;
            let x = (t / 60) as f64;
            let close = 100.0 + 3.0 * (x / 9.0).sin() + 0.5 * (x / 2.3).cos();
            let open = 100.0 + 3.0 * ((x - 1.0) / 9.0).sin() + 0.5 * ((x - 1.0) / 2.3).cos();
            [
                t as f64,
                open.min(close) - 0.1,
                open.max(close) + 0.1,
                open,
                close,
                50.0 + 10.0 * (x / 5.0).sin().abs(),
            ]
        })
        .collect();
    axum::Json(rows).into_response()
}
