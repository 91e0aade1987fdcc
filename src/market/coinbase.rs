//! Coinbase Exchange public candles: `GET {base}/products/{BASE-QUOTE}/candles?granularity=60`,
//! rows `[time, low, high, open, close, volume]`, newest first, at most 300 per request.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use super::{Candle, MarketError, MarketSource};

/// Largest answer accepted (300 rows of six numbers is ~20 KB; anything far larger is not a
/// candles answer and is refused before it is buffered whole).
const MAX_BODY: usize = 1 << 20;

/// The Coinbase source.
#[derive(Debug, Clone)]
pub struct Coinbase {
    base_url: String,
    http: reqwest::Client,
}

impl Coinbase {
    /// A client of `base_url` (e.g. `https://api.exchange.coinbase.com`) with a per-request
    /// timeout.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, MarketError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("autonomous-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MarketError::Transport(e.to_string()))?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// Parses a candles answer into candles oldest first.
    pub fn parse(body: &[u8]) -> Result<Vec<Candle>, MarketError> {
        let rows: Vec<Vec<f64>> = serde_json::from_slice(body).map_err(|e| {
            MarketError::Malformed(format!(
                "expected [[time, low, high, open, close, volume], …]: {e}"
            ))
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let [time, low, high, open, close, volume] = r.as_slice() else {
                return Err(MarketError::Malformed(format!(
                    "row {i} has {} fields, expected 6",
                    r.len()
                )));
            };
            if !(r.iter().all(|v| v.is_finite())
                && *low > 0.0
                && *high >= *low
                && *close > 0.0
                && *volume >= 0.0)
            {
                return Err(MarketError::Malformed(format!(
                    "row {i} has impossible values {r:?}"
                )));
            }
            let time = Utc
                .timestamp_opt(*time as i64, 0)
                .single()
                .ok_or_else(|| MarketError::Malformed(format!("row {i} has a bad time {time}")))?;
            out.push(Candle {
                time,
                open: *open,
                high: *high,
                low: *low,
                close: *close,
                volume: *volume,
            });
        }
        out.sort_by_key(|c| c.time);
        out.dedup_by_key(|c| c.time);
        Ok(out)
    }
}

/// `ETH/USD` → `ETH-USD`.
fn product_id(symbol: &str) -> String {
    symbol.replace('/', "-")
}

#[async_trait]
impl MarketSource for Coinbase {
    async fn candles(
        &self,
        symbol: &str,
        now: DateTime<Utc>,
        count: usize,
    ) -> Result<Vec<Candle>, MarketError> {
        let count = count.clamp(1, 300);
        let start = now - chrono::Duration::minutes(count as i64);
        let url = format!("{}/products/{}/candles", self.base_url, product_id(symbol));
        let mut resp = self
            .http
            .get(&url)
            .query(&[
                ("granularity", "60".to_string()),
                ("start", start.to_rfc3339()),
                ("end", now.to_rfc3339()),
            ])
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(MarketError::Status {
                status: status.as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(MarketError::Malformed(format!(
                    "answer larger than {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let mut candles = Self::parse(&body)?;
        candles.retain(|c| c.time <= now);
        if candles.len() > count {
            candles.drain(..candles.len() - count);
        }
        Ok(candles)
    }

    fn name(&self) -> &'static str {
        "coinbase"
    }
}

/// A request error as a market error: a timeout is its own reason (slow, not down).
fn transport_error(e: reqwest::Error) -> MarketError {
    if e.is_timeout() {
        MarketError::Timeout
    } else {
        MarketError::Transport(e.without_url().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_newest_first_rows() {
        let body = br#"[[1700000120, 9, 11, 10, 10.5, 3], [1700000060, 8, 10, 9, 10, 2], [1700000000, 7, 9, 8, 9, 1]]"#;
        let c = Coinbase::parse(body).expect("ok");
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].close, 9.0);
        assert_eq!(c[2].close, 10.5);
        assert!(c[0].time < c[2].time);
    }

    #[test]
    fn rejects_bad_shapes_with_a_reason() {
        for (body, needle) in [
            (&b"{\"message\":\"NotFound\"}"[..], "expected"),
            (&b"[[1700000000, 1, 2, 3]]"[..], "row 0 has 4 fields"),
            (&b"[[1700000000, -1, 2, 1, 1, 1]]"[..], "impossible"),
            (&b"not json"[..], "expected"),
        ] {
            let e = Coinbase::parse(body).expect_err("rejected");
            assert!(e.to_string().contains(needle), "{e}");
            assert_eq!(e.reason().as_str(), "market_data_malformed");
        }
        assert!(Coinbase::parse(b"[]").expect("empty ok").is_empty());
    }
}
