//! The InfluxDB candle source against a real `influxd` (Debian's `influxdb` package, installed
//! by `scripts/test`), started by the test in a temp dir on free ports and seeded over its
//! HTTP write API: fresh candles are analysed, stale and missing ones fail their symbol with
//! the reason, counted in the cycle.

use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};

use crate::app::spawn_app;
use crate::helpers::{config, free_port, of_symbol};

/// An `influxd` of the test's own.
struct InfluxServer {
    url: String,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl InfluxServer {
    async fn start() -> InfluxServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, rpc) = (free_port(), free_port());
        let d = dir.path().display();
        let conf = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n\
             [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
             [http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n\
             [monitor]\n  store-enabled = false\n"
        );
        let path = dir.path().join("influxdb.conf");
        std::fs::write(&path, conf).expect("config written");
        let child = tokio::process::Command::new("influxd")
            .arg("-config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("influxd (scripts/test installs Debian's influxdb)");
        let url = format!("http://127.0.0.1:{http}");
        wait_until_pingable(&url).await;
        let s = InfluxServer {
            url,
            _child: child,
            _dir: dir,
        };
        s.post(
            "/query",
            &[("q", "CREATE DATABASE tradestream")],
            String::new(),
        )
        .await;
        s
    }

    async fn post(&self, path: &str, query: &[(&str, &str)], body: String) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .query(query)
            .body(body)
            .send()
            .await
            .expect("influxd answers");
        assert!(
            r.status().is_success(),
            "{path}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Writes `n` 1-minute candles of `symbol` ending with the minute starting at `last`
    /// (Unix seconds); close = 100 + i.
    async fn seed(&self, symbol: &str, last: i64, n: i64) {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let t = last - (n - 1 - i) * 60;
                let c = 100.0 + i as f64;
                format!(
                    "candles,symbol={symbol} open={c},high={},low={},close={c},volume=10 {t}",
                    c + 1.0,
                    c - 1.0
                )
            })
            .collect();
        self.post(
            "/write",
            &[("db", "tradestream"), ("precision", "s")],
            lines.join("\n"),
        )
        .await;
    }
}

#[tokio::test]
async fn candles_come_from_influxdb_and_stale_or_missing_ones_fail_their_symbol() {
    let influx = InfluxServer::start().await;
    let minute = Utc::now()
        .duration_trunc(TimeDelta::minutes(1))
        .expect("a minute")
        .timestamp();
    // Fresh up to the minute before this one (the last closed one for a tick in this
    // minute), and ten minutes more into the future in case the tick falls in the next.
    influx.seed("ETH/USD", minute + 600, 130).await;
    influx.seed("STALE/USD", minute - 3600, 120).await;
    let yaml = config(
        "*/2 * * * * *",
        &format!(
            "  symbols: [ETH/USD, STALE/USD, MISSING/USD]\n  market_data:\n    source: influxdb\n    influxdb:\n      url: {}\n",
            influx.url
        ),
    );
    let app = spawn_app(yaml).await;
    let cycle = app.wait_cycles(1, std::time::Duration::from_secs(30)).await[0].clone();
    assert_eq!(cycle["symbols_ok"], 1, "{cycle}");
    let stale = of_symbol(&cycle["failures"], "STALE/USD").expect("STALE/USD failed");
    assert_eq!(stale["reason"], "market_data_stale", "{stale}");
    let missing = of_symbol(&cycle["failures"], "MISSING/USD").expect("MISSING/USD failed");
    assert_eq!(missing["reason"], "market_data_insufficient", "{missing}");
    // The signal was made on InfluxDB's prices: the last closed minute before the tick.
    let (_, latest) = app.get("/api/signals/latest").await;
    let sig = of_symbol(&latest["signals"], "ETH/USD").expect("published");
    let tick = chrono::DateTime::parse_from_rfc3339(sig["cycle_id"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let last_closed = tick - tick.rem_euclid(60) - 60;
    let i = 129 - (minute + 600 - last_closed) / 60;
    assert_eq!(
        sig["market_context"]["current_price"].as_f64(),
        Some(100.0 + i as f64),
        "{sig}"
    );
    let (_, detailed) = app.get("/health/detailed").await;
    assert_eq!(detailed["market_data"]["source"], "influxdb");
    assert_eq!(detailed["market_data"]["simulated"], false);
    app.stop().await.expect("clean stop");
}

/// influxd's `/ping` answers 204 when it is up.
async fn wait_until_pingable(url: &str) {
    let ping = format!("{url}/ping");
    crate::helpers::eventually(
        "influxd to answer /ping",
        Duration::from_secs(30),
        || async {
            let r = reqwest::get(&ping)
                .await
                .map_err(|e| crate::helpers::error_chain(&e))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", r.status()))
            }
        },
    )
    .await
}
