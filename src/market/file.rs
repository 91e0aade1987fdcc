//! Candles from a file, for replays over data a user already has.
//!
//! Two formats, told apart by the file's name:
//! - **CSV** (`*.csv`): a header `time,symbol,open,high,low,close,volume` (the columns in any
//!   order, names as given), one 1-minute candle per line; `time` is the minute's start as
//!   RFC 3339 UTC (`2026-11-29T10:00:00Z`) or Unix seconds.
//! - **freqtrade's downloaded data** (`*.json`): `[[ms, open, high, low, close, volume], …]`
//!   per pair, the pair named by the file (`BTC_USDT-1m.json` is `BTC/USDT`); a directory of
//!   such files loads every pair in it.
//!
//! Every row is checked; a bad one is an error naming the file, the line (or array index) and
//! the field, never skipped in silence; so are two candles for one minute of a symbol. What
//! is served is only what a live source would have had at `now`: the candles that *ended* at
//! or before it.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use super::{Candle, MarketError, MarketSource};

/// Candles loaded from files, by symbol, oldest first.
#[derive(Debug, Default)]
pub struct FileCandles {
    by_symbol: BTreeMap<String, Vec<Candle>>,
}

/// Why a candle file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FileError {
    /// The file.
    pub path: String,
    /// What is wrong, with the line or index.
    pub message: String,
}

impl FileCandles {
    /// Loads `path`: a `.csv` file, a freqtrade `.json` file, or a directory of `.json` files.
    pub fn load(path: &Path) -> Result<FileCandles, FileError> {
        let mut out = FileCandles::default();
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| err(path, e.to_string()))?;
            let mut files: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(err(path, "no freqtrade .json candle files in it".into()));
            }
            for f in files {
                out.add_freqtrade(&f)?;
            }
        } else if path.extension().is_some_and(|x| x == "json") {
            out.add_freqtrade(path)?;
        } else {
            out.add_csv(path)?;
        }
        for (symbol, candles) in out.by_symbol.iter_mut() {
            candles.sort_by_key(|c| c.time);
            // Two candles for one minute: which is right cannot be told, so neither is used.
            if let Some(w) = candles.windows(2).find(|w| w[0].time == w[1].time) {
                return Err(err(
                    path,
                    format!("{symbol} has two candles for {}", w[0].time.to_rfc3339()),
                ));
            }
        }
        Ok(out)
    }

    /// The symbols the files hold.
    pub fn symbols(&self) -> Vec<String> {
        self.by_symbol.keys().cloned().collect()
    }

    fn add_csv(&mut self, path: &Path) -> Result<(), FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines
            .next()
            .ok_or_else(|| err(path, "empty: a header line is needed".into()))?;
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        let col = |name: &str| {
            names.iter().position(|n| *n == name).ok_or_else(|| {
                err(
                    path,
                    format!(
                        "the header has no `{name}` column (it needs time,symbol,open,high,low,close,volume)"
                    ),
                )
            })
        };
        let [t, s, o, h, l, c, v] = [
            col("time")?,
            col("symbol")?,
            col("open")?,
            col("high")?,
            col("low")?,
            col("close")?,
            col("volume")?,
        ];
        for (i, line) in lines {
            let at = |m: String| err(path, format!("line {}: {m}", i + 1));
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |k: usize, name: &str| {
                fields
                    .get(k)
                    .copied()
                    .ok_or_else(|| at(format!("no `{name}` field")))
            };
            let num = |k: usize, name: &str| -> Result<f64, FileError> {
                let raw = field(k, name)?;
                raw.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| at(format!("`{name}` {raw:?} is not a non-negative number")))
            };
            let time = parse_time(field(t, "time")?).map_err(at)?;
            let symbol = field(s, "symbol")?;
            if !crate::config::is_valid_symbol(symbol) {
                return Err(at(format!("symbol {symbol:?} is not BASE/QUOTE")));
            }
            let candle = Candle {
                time,
                open: num(o, "open")?,
                high: num(h, "high")?,
                low: num(l, "low")?,
                close: num(c, "close")?,
                volume: num(v, "volume")?,
            };
            check(&candle).map_err(at)?;
            self.by_symbol
                .entry(symbol.to_string())
                .or_default()
                .push(candle);
        }
        Ok(())
    }

    fn add_freqtrade(&mut self, path: &Path) -> Result<(), FileError> {
        let symbol = pair_of(path).ok_or_else(|| {
            err(
                path,
                "the name does not say the pair (freqtrade names files BASE_QUOTE-1m.json)".into(),
            )
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
        let rows: Vec<Vec<f64>> = serde_json::from_str(&text).map_err(|e| {
            err(
                path,
                format!("not [[ms, open, high, low, close, volume], …]: {e}"),
            )
        })?;
        let list = self.by_symbol.entry(symbol).or_default();
        for (i, r) in rows.iter().enumerate() {
            let at = |m: String| err(path, format!("[{i}]: {m}"));
            let &[ms, open, high, low, close, volume] = r.as_slice() else {
                return Err(at(format!("{} values, 6 expected", r.len())));
            };
            let time = Utc
                .timestamp_millis_opt(ms as i64)
                .single()
                .filter(|t| t.timestamp() % 60 == 0)
                .ok_or_else(|| at(format!("time {ms} is not the start of a minute")))?;
            let candle = Candle {
                time,
                open,
                high,
                low,
                close,
                volume,
            };
            check(&candle).map_err(at)?;
            list.push(candle);
        }
        Ok(())
    }
}

fn err(path: &Path, message: String) -> FileError {
    FileError {
        path: path.display().to_string(),
        message,
    }
}

/// `BTC_USDT-1m.json` → `BTC/USDT`.
fn pair_of(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let pair = stem.strip_suffix("-1m").unwrap_or(stem);
    let (base, quote) = pair.split_once('_')?;
    let symbol = format!("{base}/{quote}");
    crate::config::is_valid_symbol(&symbol).then_some(symbol)
}

/// A minute's start: RFC 3339 UTC or Unix seconds.
fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    let t = match raw.parse::<i64>() {
        Ok(secs) => Utc.timestamp_opt(secs, 0).single(),
        Err(_) => DateTime::parse_from_rfc3339(raw)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
    }
    .ok_or_else(|| format!("time {raw:?} is neither RFC 3339 nor Unix seconds"))?;
    if t.timestamp() % 60 != 0 {
        return Err(format!("time {raw:?} is not the start of a minute"));
    }
    Ok(t)
}

fn check(c: &Candle) -> Result<(), String> {
    let prices = [c.open, c.high, c.low, c.close];
    if prices
        .iter()
        .chain([&c.volume])
        .any(|x| !x.is_finite() || *x < 0.0)
    {
        return Err("prices and volume must be finite and non-negative".into());
    }
    if c.high < c.low || prices.iter().any(|p| *p > c.high || *p < c.low) {
        return Err(format!(
            "high {} and low {} do not bound open {} and close {}",
            c.high, c.low, c.open, c.close
        ));
    }
    Ok(())
}

#[async_trait]
impl MarketSource for FileCandles {
    async fn candles(
        &self,
        symbol: &str,
        now: DateTime<Utc>,
        count: usize,
    ) -> Result<Vec<Candle>, MarketError> {
        let all = self.by_symbol.get(symbol).map_or(&[][..], |v| v.as_slice());
        // Only candles that ended by `now`: a replay sees what a live tick would have.
        let end = all.partition_point(|c| c.time + chrono::Duration::minutes(1) <= now);
        let got = &all[end.saturating_sub(count)..end];
        if got.len() < count.min(crate::model::MIN_CANDLES) {
            return Err(MarketError::TooFew {
                got: got.len(),
                need: count,
            });
        }
        Ok(got.to_vec())
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[tokio::test]
    async fn csv_candles_are_served_only_once_they_have_ended() {
        let dir = tempfile::tempdir().expect("dir");
        let mut text = String::from("time,symbol,open,high,low,close,volume\n");
        for m in 0..50 {
            let t = 1_764_410_400 + m * 60;
            // Both time spellings.
            let time = if m % 2 == 0 {
                t.to_string()
            } else {
                Utc.timestamp_opt(t, 0).single().expect("t").to_rfc3339()
            };
            text.push_str(&format!("{time},ETH/USD,{m},{m}.5,{m},{m},10\n"));
        }
        let f = FileCandles::load(&write(dir.path(), "c.csv", &text)).expect("loads");
        assert_eq!(f.symbols(), ["ETH/USD"]);
        let start = Utc.timestamp_opt(1_764_410_400, 0).single().expect("t");
        // At 10:45:30 the candle of 10:45 has not ended: the newest is 10:44's.
        let now = start + chrono::Duration::seconds(45 * 60 + 30);
        let got = f.candles("ETH/USD", now, 40).await.expect("enough");
        assert_eq!(got.len(), 40);
        assert_eq!(got.last().map(|c| c.close), Some(44.0));
        assert!(
            got.iter()
                .all(|c| c.time + chrono::Duration::minutes(1) <= now)
        );
        assert!(matches!(
            f.candles("ETH/USD", start + chrono::Duration::minutes(10), 40)
                .await,
            Err(MarketError::TooFew { .. })
        ));
    }

    #[test]
    fn bad_rows_are_named_by_file_line_and_field() {
        let dir = tempfile::tempdir().expect("dir");
        let cases = [
            ("time,symbol,open,high,low,close\n", "no `volume` column"),
            (
                "time,symbol,open,high,low,close,volume\n2026-11-29T10:00:30Z,ETH/USD,1,1,1,1,1\n",
                "line 2: time \"2026-11-29T10:00:30Z\" is not the start of a minute",
            ),
            (
                "time,symbol,open,high,low,close,volume\n60,ETH/USD,1,1,1,x,1\n",
                "line 2: `close` \"x\" is not a non-negative number",
            ),
            (
                "time,symbol,open,high,low,close,volume\n60,ETH/USD,1,1,2,1,1\n",
                "line 2: high 1 and low 2",
            ),
            (
                "time,symbol,open,high,low,close,volume\n60,ETHUSD,1,1,1,1,1\n",
                "line 2: symbol \"ETHUSD\" is not BASE/QUOTE",
            ),
            (
                "time,symbol,open,high,low,close,volume\n60,ETH/USD,1,1,1,1,1\n1970-01-01T00:01:00Z,ETH/USD,2,2,2,2,2\n",
                "ETH/USD has two candles for 1970-01-01T00:01:00+00:00",
            ),
        ];
        for (text, want) in cases {
            let e = FileCandles::load(&write(dir.path(), "bad.csv", text)).expect_err(want);
            assert!(e.to_string().contains(want), "{e} lacks {want}");
            assert!(e.to_string().contains("bad.csv"), "{e}");
        }
    }

    #[tokio::test]
    async fn freqtrade_files_load_by_pair_from_a_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let rows: Vec<String> = (0..45)
            .map(|m: i64| format!("[{},1,2,0.5,1.5,3]", (1_764_410_400 + m * 60) * 1000))
            .collect();
        write(
            dir.path(),
            "BTC_USDT-1m.json",
            &format!("[{}]", rows.join(",")),
        );
        write(
            dir.path(),
            "ETH_USDT-1m.json",
            &format!("[{}]", rows.join(",")),
        );
        let f = FileCandles::load(dir.path()).expect("loads");
        assert_eq!(f.symbols(), ["BTC/USDT", "ETH/USDT"]);
        let now = Utc
            .timestamp_opt(1_764_410_400 + 45 * 60, 0)
            .single()
            .expect("t");
        assert_eq!(f.candles("BTC/USDT", now, 45).await.expect("all").len(), 45);
        write(dir.path(), "SOL_USDT-1m.json", "[[1,2,3]]");
        let e = FileCandles::load(dir.path()).expect_err("a short row");
        assert!(
            e.to_string()
                .contains("SOL_USDT-1m.json: [0]: 3 values, 6 expected"),
            "{e}"
        );
    }
}
