//! InfluxDB candles: 1-minute candles in a measurement, one series per symbol tag, read with
//! InfluxQL over the HTTP query API (`GET {url}/query?db=…&q=…&epoch=s`): InfluxDB 1.x, or
//! 2.x through its 1.x-compatible API (the token as `Authorization: Token …`).
//!
//! Only closed minutes are read (a candle still forming would be analysed as if final), the
//! newest `count` of them, and a series whose newest candle is older than
//! `max_staleness_seconds` is refused as stale: a feeder that stopped must show as failing
//! symbols, not as signals on old prices.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

use super::{Candle, MarketError, MarketSource};
use crate::config::Secret;

/// Largest answer accepted: 300 rows of six numbers are ~30 KB.
const MAX_BODY: usize = 1 << 20;

/// Where the candles are and how to ask for them.
#[derive(Debug, Clone)]
pub struct InfluxSettings {
    /// Base URL.
    pub url: String,
    /// Database (2.x: the bucket mapped to it).
    pub database: String,
    /// Measurement.
    pub measurement: String,
    /// The tag naming the symbol.
    pub symbol_tag: String,
    /// API token (empty: none).
    pub token: Secret,
    /// Newest candle older than this: stale.
    pub max_staleness: Duration,
}

/// The InfluxDB source.
#[derive(Debug, Clone)]
pub struct Influx {
    s: InfluxSettings,
    http: reqwest::Client,
}

/// `'…'` with quotes and backslashes escaped (InfluxQL string literal).
fn literal(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `"…"` with quotes escaped (InfluxQL identifier).
fn ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\\\""))
}

impl Influx {
    /// A client with a per-request timeout.
    pub fn new(s: InfluxSettings, timeout: Duration) -> Result<Self, MarketError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("autonomous-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MarketError::Transport(e.to_string()))?;
        Ok(Self {
            s: InfluxSettings {
                url: s.url.trim_end_matches('/').to_string(),
                ..s
            },
            http,
        })
    }

    /// The query for the newest `count` closed minutes of `symbol` before `until`.
    fn query(&self, symbol: &str, until: DateTime<Utc>, count: usize) -> String {
        format!(
            "SELECT open, high, low, close, volume FROM {} WHERE {} = {} AND time < {}s \
             ORDER BY time DESC LIMIT {count}",
            ident(&self.s.measurement),
            ident(&self.s.symbol_tag),
            literal(symbol),
            until.timestamp(),
        )
    }

    /// Reads a `/query` answer (`epoch=s`) into candles oldest first.
    pub fn parse(body: &[u8]) -> Result<Vec<Candle>, MarketError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| MarketError::Malformed(format!("InfluxDB answer is not JSON: {e}")))?;
        let result = &v["results"][0];
        if let Some(e) = v["error"].as_str().or(result["error"].as_str()) {
            return Err(MarketError::Malformed(format!("InfluxDB: {e}")));
        }
        let Some(series) = result["series"].get(0) else {
            return Ok(vec![]);
        };
        let columns: Vec<&str> = series["columns"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let at = |name: &str| {
            columns.iter().position(|c| *c == name).ok_or_else(|| {
                MarketError::Malformed(format!("InfluxDB answer has no {name} column"))
            })
        };
        let idx = [
            at("time")?,
            at("open")?,
            at("high")?,
            at("low")?,
            at("close")?,
            at("volume")?,
        ];
        let rows = series["values"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let num = |k: usize| row[idx[k]].as_f64();
            let (Some(t), Some(open), Some(high), Some(low), Some(close), Some(volume)) =
                (num(0), num(1), num(2), num(3), num(4), num(5))
            else {
                return Err(MarketError::Malformed(format!(
                    "InfluxDB row {i} lacks a number: {row}"
                )));
            };
            let time = Utc
                .timestamp_opt(t as i64, 0)
                .single()
                .ok_or_else(|| MarketError::Malformed(format!("InfluxDB row {i}: time {t}")))?;
            if !(low > 0.0 && high >= low && close > 0.0 && volume >= 0.0) {
                return Err(MarketError::Malformed(format!(
                    "InfluxDB row {i} has impossible values {row}"
                )));
            }
            out.push(Candle {
                time,
                open,
                high,
                low,
                close,
                volume,
            });
        }
        // Asked newest first (so LIMIT keeps the newest); analysed oldest first.
        out.sort_by_key(|c| c.time);
        Ok(out)
    }
}

#[async_trait]
impl MarketSource for Influx {
    async fn candles(
        &self,
        symbol: &str,
        now: DateTime<Utc>,
        count: usize,
    ) -> Result<Vec<Candle>, MarketError> {
        // The minute now in progress is not closed: only candles that started before it.
        let minute = now.timestamp() - now.timestamp().rem_euclid(60);
        let until = Utc.timestamp_opt(minute, 0).single().unwrap_or(now);
        let mut req = self.http.get(format!("{}/query", self.s.url)).query(&[
            ("db", self.s.database.as_str()),
            ("epoch", "s"),
            ("q", self.query(symbol, until, count).as_str()),
        ]);
        if !self.s.token.is_empty() {
            req = req.header("Authorization", format!("Token {}", self.s.token.expose()));
        }
        let mut resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                MarketError::Timeout
            } else {
                MarketError::Transport(e.without_url().to_string())
            }
        })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(MarketError::Status { status });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            if e.is_timeout() {
                MarketError::Timeout
            } else {
                MarketError::Transport(e.without_url().to_string())
            }
        })? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(MarketError::Malformed(format!(
                    "InfluxDB answer larger than {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let candles = Self::parse(&body)?;
        if let Some(last) = candles.last() {
            let age = (now - last.time).num_seconds().max(0) as u64;
            if age > self.s.max_staleness.as_secs() {
                return Err(MarketError::Stale { age_seconds: age });
            }
        }
        Ok(candles)
    }

    fn name(&self) -> &'static str {
        "influxdb"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_or_refused_with_the_reason() {
        let ok = br#"{"results":[{"statement_id":0,"series":[{"name":"candles","columns":["time","open","high","low","close","volume"],"values":[[120,2,3,1,2.5,10],[60,1,2,1,2,5]]}]}]}"#;
        let c = Influx::parse(ok).expect("parses");
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].time.timestamp(), c[1].close),
            (60, 2.5),
            "oldest first"
        );
        // No series: no candles (the caller says "too few").
        assert!(
            Influx::parse(br#"{"results":[{"statement_id":0}]}"#)
                .expect("empty")
                .is_empty()
        );
        for (bad, says) in [
            (&br#"{"results":[{"statement_id":0,"error":"database not found: x"}]}"#[..], "database not found"),
            (br#"{"error":"authorization failed"}"#, "authorization failed"),
            (br#"{"results":[{"series":[{"columns":["time","close"],"values":[[1,2]]}]}]}"#, "no open column"),
            (br#"{"results":[{"series":[{"columns":["time","open","high","low","close","volume"],"values":[[60,1,2,1,null,5]]}]}]}"#, "lacks a number"),
            (br#"{"results":[{"series":[{"columns":["time","open","high","low","close","volume"],"values":[[60,1,2,3,2,5]]}]}]}"#, "impossible"),
            (b"<html>", "not JSON"),
        ] {
            let e = Influx::parse(bad).expect_err("refused").to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_query_quotes_what_it_interpolates() {
        let i = Influx::new(
            InfluxSettings {
                url: "http://x/".into(),
                database: "db".into(),
                measurement: "can\"dles".into(),
                symbol_tag: "symbol".into(),
                token: Secret::default(),
                max_staleness: Duration::from_secs(180),
            },
            Duration::from_secs(1),
        )
        .expect("client");
        let q = i.query(
            "ETH/USD' OR 1=1",
            Utc.timestamp_opt(600, 0).single().expect("t"),
            5,
        );
        assert_eq!(
            q,
            "SELECT open, high, low, close, volume FROM \"can\\\"dles\" WHERE \"symbol\" = 'ETH/USD\\' OR 1=1' AND time < 600s ORDER BY time DESC LIMIT 5"
        );
    }
}
