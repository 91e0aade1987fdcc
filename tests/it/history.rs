//! The history store's contract on SQLite and on a real PostgreSQL, grading against a scripted
//! market, grading by several replicas at once, and the writer across a database outage.

use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::history::calibration::Calibrator;
use autonomous_runner::history::grading::{Grader, GroupScore, scorecard, scorecard_of, wilson95};
use autonomous_runner::history::sql::SqlStore;
use autonomous_runner::history::writer::HistoryWriter;
use autonomous_runner::history::{GroupBy, HistoryQuery, HistoryStore};
use autonomous_runner::market::{Candle, MarketError, MarketSource};
use autonomous_runner::model::{Action, CalibrationStatus, Payload, Stage, StageMessage, examples};
use autonomous_runner::schedule::CycleId;
use chrono::{DateTime, TimeZone, Utc};

use autonomous_runner::history::testing::PostgresServer;

/// 2026-11-28 10:00 UTC plus `minutes`.
fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0)
        .single()
        .unwrap()
        + chrono::Duration::minutes(minutes)
}

/// A stage message of `symbol` for the tick at minute `m`, priced at `price` a minute earlier.
fn message(
    symbol: &str,
    m: i64,
    stage: Stage,
    action: &str,
    confidence: f64,
    price: f64,
) -> StageMessage {
    let cycle = CycleId::new(at(m));
    let action = Action::parse(action).expect("BUY, SELL or HOLD");
    let signal = examples::signal(symbol, cycle, action, confidence, price);
    StageMessage::new(examples::payload(stage, signal), 5, "rules")
}

fn records(msgs: &[StageMessage]) -> Vec<autonomous_runner::history::Record> {
    msgs.iter()
        .map(|m| autonomous_runner::history::Record::from_message(m).expect("a signal payload"))
        .collect()
}

async fn sqlite() -> (tempfile::TempDir, Arc<dyn HistoryStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::sqlite(&dir.path().join("nested/dir/h.sqlite"))
        .await
        .expect("sqlite opens");
    (dir, Arc::new(store))
}

async fn postgres(pg: &PostgresServer) -> Arc<dyn HistoryStore> {
    Arc::new(SqlStore::postgres(&pg.url()).await.expect("postgres opens"))
}

/// What every backend must do.
async fn contract(store: Arc<dyn HistoryStore>) {
    // Idempotent by message_id: the same messages twice add nothing the second time.
    let msgs: Vec<StageMessage> = (0..3)
        .flat_map(|m| {
            ["ETH/USD", "BTC/USD"].into_iter().flat_map(move |s| {
                [Stage::Signal, Stage::Score].map(|st| message(s, m, st, "BUY", 0.7, 100.0))
            })
        })
        .collect();
    assert_eq!(store.insert(&records(&msgs)).await.unwrap(), 12);
    assert_eq!(
        store.insert(&records(&msgs[..5])).await.unwrap(),
        0,
        "replicas and redeliveries never duplicate"
    );

    // Pages: newest tick first, continued below the previous page's last row.
    let mut seen = vec![];
    let mut q = HistoryQuery {
        limit: 5,
        ..HistoryQuery::default()
    };
    loop {
        let page = store.page(&q).await.unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|r| r.key.clone()));
        q.after = page.last().map(|r| r.key.clone());
    }
    assert_eq!(seen.len(), 12);
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "strictly newest first, none twice"
    );
    let eth = store
        .page(&HistoryQuery {
            symbol: Some("ETH/USD".into()),
            stage: Some(Stage::Score),
            limit: 100,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(eth.len(), 3);
    assert!(
        eth.iter()
            .all(|r| r.symbol == "ETH/USD" && r.stage == Stage::Score)
    );
    assert_eq!(
        eth[0].message["payload"]["opportunity_tier"], "GOOD",
        "the envelope as published"
    );
    let window = store
        .page(&HistoryQuery {
            since: Some(at(1).timestamp()),
            until: Some(at(2).timestamp()),
            limit: 100,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(window.len(), 4, "one tick of two symbols, two stages");

    // Due grades: stage-1 signals priced before the bound, without a grade at that horizon.
    let due = store.due(300, 0..at(2).timestamp(), 100).await.unwrap();
    assert_eq!(
        due.len(),
        4,
        "ticks 0 and 1, two symbols, the signal stage only"
    );
    assert!(
        due.iter()
            .all(|d| d.tier == "GOOD" && d.strategy == "RSI" && d.price_then == 100.0)
    );
    let g = autonomous_runner::history::Grade {
        signal: due[0].clone(),
        horizon_seconds: 300,
        price_after: Some(101.0),
        return_fraction: Some(0.01),
        hit: Some(true),
        hold_hit: Some(false),
        momentum_hit: Some(true),
        graded_at: at(10).timestamp(),
    };
    assert!(store.record_grade(&g).await.unwrap());
    assert!(
        !store.record_grade(&g).await.unwrap(),
        "a (signal, horizon) is graded once"
    );
    let other_horizon = autonomous_runner::history::Grade {
        horizon_seconds: 900,
        ..g.clone()
    };
    assert!(store.record_grade(&other_horizon).await.unwrap());
    let missing = autonomous_runner::history::Grade {
        signal: due[1].clone(),
        price_after: None,
        return_fraction: None,
        hit: None,
        ..g.clone()
    };
    assert!(store.record_grade(&missing).await.unwrap());
    assert_eq!(
        store
            .due(300, 0..at(2).timestamp(), 100)
            .await
            .unwrap()
            .len(),
        2
    );
    let rows = store.graded(300, GroupBy::Symbol, 0).await.unwrap();
    assert_eq!(rows.len(), 1, "a missing price is not a graded row");
    assert_eq!(rows[0].group, due[0].symbol);
    assert_eq!(store.missing_prices(300, 0).await.unwrap(), 1);
    same_scores(
        &scorecard_of(store.as_ref(), 300, GroupBy::Symbol, 0)
            .await
            .unwrap(),
        &scorecard(&rows),
    );
    let by_tier = store.graded(300, GroupBy::Tier, 0).await.unwrap();
    assert_eq!(by_tier[0].group, "GOOD");

    // Retention: everything of ticks before minute 1 goes, grades included.
    let deleted = store.prune(at(1).timestamp()).await.unwrap();
    assert!(deleted >= 4, "{deleted}");
    let left = store
        .page(&HistoryQuery {
            limit: 100,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 8);
    store.ping().await.unwrap();
}

#[tokio::test]
async fn the_contract_holds_on_sqlite() {
    let (_dir, store) = sqlite().await;
    assert_eq!(store.backend(), "sqlite");
    contract(store).await;
}

#[tokio::test]
async fn the_contract_holds_on_postgres() {
    let pg = PostgresServer::start().await;
    let store = postgres(&pg).await;
    assert_eq!(store.backend(), "postgres");
    contract(store).await;
    // Migrations run again at every start without harm.
    contract_reopens(&pg).await;
}

async fn contract_reopens(pg: &PostgresServer) {
    let again = postgres(pg).await;
    assert_eq!(
        again
            .page(&HistoryQuery {
                limit: 100,
                ..HistoryQuery::default()
            })
            .await
            .unwrap()
            .len(),
        8
    );
}

/// Candles with known closes: minute `m` after 10:00 closes at `closes[m]`.
struct Scripted {
    closes: Vec<f64>,
}

#[async_trait::async_trait]
impl MarketSource for Scripted {
    async fn candles(
        &self,
        _symbol: &str,
        now: DateTime<Utc>,
        count: usize,
    ) -> Result<Vec<Candle>, MarketError> {
        // Candle m covers [m, m+1): closed by `now` when m < end.
        let end = (now - at(0))
            .num_minutes()
            .clamp(0, self.closes.len() as i64);
        let out: Vec<Candle> = ((end - count as i64).max(0)..end)
            .map(|m| {
                let c = self.closes[m as usize];
                Candle {
                    time: at(m),
                    open: c,
                    high: c,
                    low: c,
                    close: c,
                    volume: 1.0,
                }
            })
            .collect();
        Ok(out)
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

#[tokio::test]
async fn grades_against_a_scripted_market_are_exact() {
    let (_dir, store) = sqlite().await;
    // Prices: 100 at minute 0, then as scripted; the 5-minute horizon of a signal priced at
    // minute m reads the close of the candle ending at m + 5 (minute m + 4's close).
    let mut closes = vec![100.0; 20];
    closes[4] = 101.0; // +1 %   for signals priced at minute 0
    closes[5] = 99.0; //  −1 %   for minute 1
    closes[6] = 100.05; // +0.05 % for minute 2 (inside the 0.1 % band)
    let market: Arc<dyn MarketSource> = Arc::new(Scripted { closes });
    // Each with the last hour's return it saw (the momentum baseline's call) and, for two,
    // a calibrated confidence.
    let signals = [
        // +1 %: hit; momentum (BUY) hit; HOLD missed.
        seen(
            message("AAA/USD", 0, Stage::Signal, "BUY", 0.9, 100.0),
            0.02,
            Some(0.55),
        ),
        // −1 %: miss; momentum (BUY) missed; HOLD missed.
        seen(
            message("AAA/USD", 1, Stage::Signal, "BUY", 0.6, 100.0),
            0.01,
            Some(0.45),
        ),
        // flat: hit; momentum (SELL) missed; HOLD hit.
        seen(
            message("AAA/USD", 2, Stage::Signal, "HOLD", 0.7, 100.0),
            -0.01,
            None,
        ),
        // −1 %: hit; momentum (HOLD, no move) missed; HOLD missed.
        seen(
            message("BBB/USD", 1, Stage::Signal, "SELL", 0.8, 100.0),
            0.0,
            None,
        ),
        // flat: miss; momentum (HOLD) hit; HOLD hit.
        seen(
            message("BBB/USD", 2, Stage::Signal, "SELL", 0.5, 100.0),
            0.0,
            None,
        ),
        message("CCC/USD", 30, Stage::Signal, "BUY", 0.5, 100.0), // no candle at 35: missing
        message("DDD/USD", 42, Stage::Signal, "BUY", 0.5, 100.0), // due at 47: too recent to call missing
    ];
    store.insert(&records(&signals)).await.unwrap();
    let mut grader = Grader::new(store.clone(), market, &[5], 0.1);
    // At minute 50 the candle ending at 35 is 15 minutes overdue (missing); the one ending at
    // 47 only 3 (asked again later).
    let round = grader.round(at(50)).await.unwrap();
    assert_eq!((round.graded, round.missing, round.deferred), (5, 1, 1));
    let again = grader.round(at(51)).await.unwrap();
    assert_eq!((again.graded, again.missing), (0, 0), "graded once");
    assert_eq!(
        grader.round(at(58)).await.unwrap().missing,
        1,
        "missing once overdue"
    );

    let rows = store.graded(300, GroupBy::Action, 0).await.unwrap();
    let card = scorecard(&rows);
    // What the API serves (summed in the database) is what the rows say.
    same_scores(
        &scorecard_of(store.as_ref(), 300, GroupBy::Action, 0)
            .await
            .unwrap(),
        &card,
    );
    store.rebuild_sums().await.unwrap();
    same_scores(
        &scorecard_of(store.as_ref(), 300, GroupBy::Action, 0)
            .await
            .unwrap(),
        &card,
    );
    let buy = card.iter().find(|g| g.key == "BUY").unwrap();
    assert_eq!((buy.graded, buy.hits), (2, 1));
    assert!((buy.mean_return - 0.0).abs() < 1e-12, "+1 % and −1 %");
    assert!((buy.brier - ((0.9f64 - 1.0).powi(2) + 0.6f64.powi(2)) / 2.0).abs() < 1e-12);
    let (lo, hi) = wilson95(1, 2);
    assert_eq!(buy.hit_rate_ci95, [lo, hi]);
    let sell = card.iter().find(|g| g.key == "SELL").unwrap();
    assert_eq!((sell.graded, sell.hits), (2, 1));
    assert!((sell.median_return - (-0.01 + 0.0005) / 2.0).abs() < 1e-12);
    // The baselines on the same grades. BUY: own 1 of 2, momentum 1, HOLD 0 → momentum is
    // the bar, and the signals only match it (the same calls: no disagreement, a zero-width
    // interval). SELL: own 1, HOLD 1, momentum 1 → a tie goes to always-HOLD; they disagree
    // on both grades: differences +1, −1, sample variance 2, interval ±1.96·√(2/2).
    let b = buy.baselines.as_ref().expect("BUY baselines");
    assert_eq!((b.graded, b.best), (2, "momentum"));
    assert_eq!(
        (b.always_hold, b.momentum, b.skill, b.skill_ci95),
        (0.0, 0.5, 0.0, [0.0, 0.0])
    );
    let b = sell.baselines.as_ref().expect("SELL baselines");
    assert_eq!((b.graded, b.best, b.skill), (2, "always_hold", 0.0));
    // ±1.96 is wider than a difference of hit rates can be: cut to [−1, 1].
    assert_eq!(b.skill_ci95, [-1.0, 1.0], "{b:?}");
    // BUY's calibrated values: 0.55 hit, 0.45 missed: Brier (0.2025 + 0.2025) / 2.
    let c = buy.calibrated.as_ref().expect("BUY calibrated");
    assert_eq!(c.graded, 2);
    assert!((c.brier - 0.2025).abs() < 1e-12, "{c:?}");
    assert!(
        sell.calibrated.is_none(),
        "no SELL carried a calibrated value"
    );
    let hold = card.iter().find(|g| g.key == "HOLD").unwrap();
    assert_eq!((hold.graded, hold.hits), (1, 1));
    assert!((hold.mean_return - 0.0005).abs() < 1e-12);
    assert_eq!(
        store.missing_prices(300, 0).await.unwrap(),
        2,
        "recorded as missing, never guessed"
    );

    // Calibrated per (model, action) from the same grades. BUY: 0.9 hit (bin 9), 0.6 missed
    // (bin 6); base rate 1/2, each bin shrunk by 4 prior grades: bin 6 (0 + 2) / 5 = 0.4,
    // bin 9 (1 + 2) / 5 = 0.6. HOLD has one grade, under the two required: not calibrated.
    let c = Calibrator::new(5, 2, 4.0);
    c.refit(store.as_ref()).await.unwrap();
    for (confidence, want) in [(0.95, 0.6), (0.65, 0.4), (0.75, 0.4), (0.3, 0.4)] {
        let (value, note) = c.calibrate("rules", Action::Buy, confidence);
        assert_eq!(value, Some(want), "BUY at {confidence}: {note:?}");
        assert_eq!(note.status, CalibrationStatus::Calibrated);
        assert_eq!((note.graded, note.needed), (2, 2));
    }
    let (value, note) = c.calibrate("rules", Action::Hold, 0.7);
    assert_eq!(value, None);
    assert_eq!(
        (note.status, note.graded, note.horizon.as_str()),
        (CalibrationStatus::Insufficient, 1, "5m")
    );
}

#[tokio::test]
async fn three_graders_on_one_postgres_grade_each_signal_once() {
    let pg = PostgresServer::start().await;
    let store = postgres(&pg).await;
    let msgs: Vec<StageMessage> = (0..10)
        .flat_map(|m| {
            (0..6).map(move |s| message(&format!("S{s}/USD"), m, Stage::Signal, "BUY", 0.7, 100.0))
        })
        .collect();
    // Three replicas store the same messages: one row each.
    for _ in 0..3 {
        store.insert(&records(&msgs)).await.unwrap();
    }
    let market: Arc<dyn MarketSource> = Arc::new(Scripted {
        closes: vec![100.0; 120],
    });
    let rounds = futures::future::join_all((0..3).map(|_| {
        let (store, market) = (store.clone(), market.clone());
        async move {
            let mut g = Grader::new(store, market, &[5, 15], 0.1);
            g.round(at(60)).await.unwrap()
        }
    }))
    .await;
    let recorded: u64 = rounds.iter().map(|r| r.graded + r.missing).sum();
    assert_eq!(
        recorded,
        60 * 2,
        "each (signal, horizon) recorded by exactly one grader: {rounds:?}"
    );
    for h in [300, 900] {
        assert_eq!(store.graded(h, GroupBy::Symbol, 0).await.unwrap().len(), 60);
        // Concurrent graders' running sums count each grade once.
        let card = scorecard_of(store.as_ref(), h, GroupBy::Symbol, 0)
            .await
            .unwrap();
        assert_eq!(card.iter().map(|g| g.graded).sum::<u64>(), 60);
    }
    // The calibration groups (`model|action`, a key PostgreSQL concatenates itself) are
    // summed once per grade as well, and again the same by a rebuild: 60 flat-market BUYs at
    // 0.7 hit none of the time, which is what their calibrated confidence says.
    for rebuilt in [false, true] {
        if rebuilt {
            store.rebuild_sums().await.unwrap();
        }
        let sums = store.sums(900, GroupBy::Calibration, 0).await.unwrap();
        let groups: Vec<(&str, i64, u64, u64)> = sums
            .iter()
            .map(|b| (b.group.as_str(), b.bucket, b.n, b.hits))
            .collect();
        assert_eq!(groups, vec![("rules|BUY", 7, 60, 0)], "rebuilt: {rebuilt}");
        let c = Calibrator::new(15, 60, 4.0);
        c.refit(store.as_ref()).await.unwrap();
        let (value, note) = c.calibrate("rules", Action::Buy, 0.7);
        assert_eq!((value, note.graded), (Some(0.0), 60), "rebuilt: {rebuilt}");
    }
    let page = store
        .page(&HistoryQuery {
            limit: 1000,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 60, "no duplicate rows");
}

#[tokio::test]
async fn the_writer_keeps_everything_across_a_postgres_outage() {
    let mut pg = PostgresServer::start().await;
    let store = postgres(&pg).await;
    let writer = HistoryWriter::new(store.clone(), 10_000, 50);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(writer.clone().run(stop.clone(), Duration::from_secs(2)));
    let batch = |from: i64| -> Vec<StageMessage> {
        (from..from + 5)
            .flat_map(|m| Stage::ALL.map(|st| message("ETH/USD", m, st, "HOLD", 0.6, 100.0)))
            .collect()
    };
    for m in batch(0) {
        writer.offer(Arc::new(m));
    }
    wait(|| writer.queued() == 0, "the first messages written").await;
    pg.stop();
    // Published while the database is down: queued, never lost.
    for m in batch(5) {
        writer.offer(Arc::new(m));
    }
    wait(|| !writer.healthy(), "the writer noticed the outage").await;
    assert!(writer.queued() > 0);
    pg.restart().await;
    wait(
        || writer.queued() == 0 && writer.healthy(),
        "the backlog written after recovery",
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        stored(&*store).await,
        40,
        "every message of both batches, once"
    );
}

/// How many messages `store` holds (up to 1,000).
async fn stored(store: &dyn HistoryStore) -> usize {
    store
        .page(&HistoryQuery {
            limit: 1000,
            ..HistoryQuery::default()
        })
        .await
        .unwrap()
        .len()
}

/// PostgreSQL answers but refuses the writes — as a server whose disk is full does (SQLSTATE
/// 53100, raised here by a trigger, since a test cannot fill the server's disk safely), or a
/// statement timeout: the batch stays queued and is retried, and once the server accepts
/// writes again every message is there, once.
#[tokio::test]
async fn the_writer_keeps_everything_while_postgres_refuses_writes() {
    let pg = PostgresServer::start().await;
    let store = postgres(&pg).await;
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url())
        .await
        .unwrap();
    for sql in [
        "CREATE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON signal_messages FOR EACH ROW EXECUTE FUNCTION refuse_writes()",
    ] {
        sqlx::query(sql).execute(&admin).await.unwrap();
    }
    let writer = HistoryWriter::new(store.clone(), 10_000, 50);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(writer.clone().run(stop.clone(), Duration::from_secs(2)));
    for m in
        (0..10).flat_map(|m| Stage::ALL.map(|st| message("ETH/USD", m, st, "HOLD", 0.6, 100.0)))
    {
        writer.offer(Arc::new(m));
    }
    wait(|| !writer.healthy(), "the writer noticed the refusal").await;
    assert_eq!(
        writer.queued(),
        40,
        "a refused batch goes back to the queue"
    );
    sqlx::query("DROP TRIGGER refuse ON signal_messages")
        .execute(&admin)
        .await
        .unwrap();
    wait(
        || writer.queued() == 0 && writer.healthy(),
        "the backlog written once the server accepts writes",
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(stored(&*store).await, 40, "every message, once");
}

async fn wait(cond: impl Fn() -> bool, what: &str) {
    crate::helpers::eventually(what, Duration::from_secs(60), || async {
        if cond() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await
}

/// The database's sums and the row-by-row reference agree (to rounding of the sums' order).
fn same_scores(db: &[GroupScore], reference: &[GroupScore]) {
    assert_eq!(db.len(), reference.len(), "{db:?} vs {reference:?}");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    for (a, b) in db.iter().zip(reference) {
        assert_eq!((&a.key, a.graded, a.hits), (&b.key, b.graded, b.hits));
        assert!(
            close(a.mean_return, b.mean_return) && close(a.median_return, b.median_return),
            "{a:?} vs {b:?}"
        );
        assert!(
            close(a.brier, b.brier) && close(a.hit_rate_ci95[0], b.hit_rate_ci95[0]),
            "{a:?} vs {b:?}"
        );
        let opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => close(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        assert!(opt(a.brier_skill, b.brier_skill), "{a:?} vs {b:?}");
        let buckets =
            |x: &[autonomous_runner::history::grading::CalibrationBucket],
             y: &[autonomous_runner::history::grading::CalibrationBucket]| {
                assert_eq!(x.len(), y.len(), "{x:?} vs {y:?}");
                for (x, y) in x.iter().zip(y) {
                    assert_eq!((&x.bucket, x.count), (&y.bucket, y.count));
                    assert!(
                        close(x.mean_confidence, y.mean_confidence)
                            && close(x.hit_rate, y.hit_rate)
                    );
                }
            };
        buckets(&a.calibration, &b.calibration);
        match (&a.calibrated, &b.calibrated) {
            (Some(x), Some(y)) => {
                assert_eq!(x.graded, y.graded);
                assert!(
                    close(x.brier, y.brier) && opt(x.brier_skill, y.brier_skill),
                    "{x:?} vs {y:?}"
                );
                buckets(&x.calibration, &y.calibration);
            }
            (x, y) => assert!(x.is_none() && y.is_none(), "{x:?} vs {y:?}"),
        }
        match (&a.baselines, &b.baselines) {
            (Some(x), Some(y)) => {
                assert_eq!((x.graded, x.best), (y.graded, y.best));
                assert!(
                    close(x.always_hold, y.always_hold)
                        && close(x.momentum, y.momentum)
                        && close(x.skill, y.skill)
                        && close(x.skill_ci95[0], y.skill_ci95[0])
                        && close(x.skill_ci95[1], y.skill_ci95[1]),
                    "{x:?} vs {y:?}"
                );
            }
            (x, y) => assert!(x.is_none() && y.is_none(), "{x:?} vs {y:?}"),
        }
    }
}

/// `msg` (a signal-stage message) as if it had seen a last hour's return of `change_1h` and
/// carried `calibrated`.
fn seen(msg: StageMessage, change_1h: f64, calibrated: Option<f64>) -> StageMessage {
    let mut signal = msg.envelope.payload.signal().clone();
    signal.market_context.price_change_1h = change_1h;
    signal.calibrated_confidence = calibrated;
    StageMessage::new(Payload::Signal(signal), 5, "rules")
}

/// The hot queries are served by the schema's indexes on PostgreSQL, on tables of the size a
/// month of service leaves.
#[tokio::test]
async fn postgres_plans_use_the_indexes() {
    let pg = PostgresServer::start().await;
    let store = postgres(&pg).await; // runs the migrations
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url())
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // A month of 20 symbols' ticks, four stages each, and their grades: the planner decides
    // on statistics, so the table must look like one in service.
    // The ids are UUIDs made from the numbers (md5 of the text), the grades' signals the
    // signal-stage messages' (the foreign key holds).
    for sql in [
        "INSERT INTO signal_messages (message_id, signal_id, stage, symbol, cycle_id, cycle_at, \
           published_at, action, confidence, tier, model, top_strategy, price, data_as_of, is_degraded, envelope) \
         SELECT md5('m' || i)::uuid, md5('s' || (i / 4))::uuid, \
           (ARRAY['signal','score','advise','report'])[i % 4 + 1], 'SYM' || (i / 4 % 20) || '/USD', 'c', \
           to_timestamp((i / 80) * 60), to_timestamp(0), 'BUY', 0.5, NULL, 'rules', NULL, 100, \
           to_timestamp((i / 80) * 60), false, '{}' \
         FROM generate_series(0, 199999) AS i",
        "INSERT INTO signal_grades (signal_id, horizon_seconds, symbol, action, confidence, confidence_bucket, \
           tier, backend, model, strategy, cycle_at, price_then, price_after, return_fraction, hit, status, graded_at) \
         SELECT md5('s' || i)::uuid, h, 'SYM' || (i % 20) || '/USD', 'BUY', 0.5, 5, 'GOOD', 'rules', 'rules', \
           'RSI', to_timestamp((i / 20) * 60), 100, 101, 0.01, i % 3 = 0, 'graded', to_timestamp(0) \
         FROM generate_series(0, 49999) AS i, (VALUES (300), (900), (3600)) AS hs(h)",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    store.rebuild_sums().await.unwrap();
    sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
    for (what, sql, index) in [
        (
            "a symbol's history page",
            "SELECT m.message_id FROM signal_messages m WHERE m.symbol = 'ETH/USD' AND m.cycle_at >= to_timestamp(0) \
             AND (m.cycle_at < to_timestamp(9999999999) OR (m.cycle_at = to_timestamp(9999999999) \
             AND m.message_id < CAST('ffffffff-ffff-ffff-ffff-ffffffffffff' AS uuid))) \
             ORDER BY m.cycle_at DESC, m.message_id DESC LIMIT 101",
            "signal_messages_symbol_time",
        ),
        (
            "the history page",
            "SELECT m.message_id FROM signal_messages m \
             ORDER BY m.cycle_at DESC, m.message_id DESC LIMIT 101",
            "signal_messages_time",
        ),
        (
            "due grades",
            "SELECT s.signal_id FROM signal_messages s WHERE s.stage = 'signal' AND s.data_as_of < to_timestamp(2000000) \
             AND s.data_as_of >= to_timestamp(1990000) \
             AND NOT EXISTS (SELECT 1 FROM signal_grades g WHERE g.signal_id = s.signal_id AND g.horizon_seconds = 300) \
             ORDER BY s.data_as_of LIMIT 500",
            "signal_messages_due",
        ),
        // An analyst's first question, as docs/HISTORY.md writes it: the hit rate per symbol
        // per day over a time range, from the grades.
        (
            "hit rate per symbol per day",
            "SELECT symbol, date_trunc('day', cycle_at) AS day, count(*) AS graded, avg(hit::int) AS hit_rate \
             FROM signal_grades WHERE horizon_seconds = 900 AND status = 'graded' \
             AND cycle_at >= to_timestamp(3600) AND cycle_at < to_timestamp(7200) \
             GROUP BY 1, 2 ORDER BY 1, 2",
            "signal_grades_horizon_time|signal_grades_time",
        ),
        // And one signal's grades with its message, through the foreign key's columns.
        (
            "a signal with its grades",
            "SELECT m.symbol, m.action, g.horizon_seconds, g.hit FROM signal_messages m \
             JOIN signal_grades g ON g.signal_id = m.signal_id AND g.stage = m.stage \
             WHERE m.signal_id = md5('s7')::uuid AND m.stage = 'signal'",
            "signal_messages_signal_stage",
        ),
        // The running sums hold a row per (day, group, bucket): a table that stays small, which
        // the planner rightly reads whole at this size; with sequential scans off, as a year of
        // many symbols would make it, the key serves the query.
        (
            "the scorecard's sums",
            "SELECT group_key, confidence_bucket, CAST(SUM(n) AS BIGINT) FROM signal_grade_sums \
             WHERE horizon_seconds = 300 AND group_by = 'symbol' AND day >= 1 GROUP BY group_key, confidence_bucket",
            "signal_grade_sums_pkey",
        ),
        (
            "the scorecard's medians",
            "SELECT group_key, return_bp, CAST(SUM(n) AS BIGINT) FROM signal_grade_returns \
             WHERE horizon_seconds = 300 AND group_by = 'symbol' AND day >= 1 GROUP BY group_key, return_bp ORDER BY group_key, return_bp",
            "signal_grade_returns_pkey",
        ),
    ] {
        if index.ends_with("_pkey") {
            sqlx::query("SET enable_seqscan = off")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        eprintln!("-- {what}\n{plan}\n");
        // `a|b`: either index serves it (the planner picks by the range's size).
        assert!(
            index.split('|').any(|i| plan.contains(i)),
            "{what} does not use {index}:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{what} scans a table:\n{plan}");
    }
}

/// The service on PostgreSQL, the database stopped for 30 ticks mid-run: cycles never stall,
/// and after recovery the history holds every message that was published.
#[tokio::test]
async fn a_postgres_outage_stalls_no_cycle_and_loses_no_message() {
    let mut pg = PostgresServer::start().await;
    let yaml = crate::helpers::config(
        "* * * * * *",
        &format!(
            "  symbols: [ETH/USD, BTC/USD, SOL/USD]\n  pipeline:\n    advise_min_score: 0\n  history:\n    url: {}\n",
            pg.url()
        ),
    );
    let app = crate::app::spawn_app(&yaml).await;
    let before = app.wait_cycles(3, Duration::from_secs(30)).await.len();
    pg.stop();
    // Thirty ticks run while the database is down, each publishing its symbols.
    let during = app.wait_cycles(before + 30, Duration::from_secs(90)).await;
    assert!(
        during.iter().rev().take(30).all(|c| c["symbols_ok"] == 3),
        "cycles went on: {during:?}"
    );
    let (_, d) = app.get("/health/detailed").await;
    assert_eq!(
        d["history"]["writing"], false,
        "the outage is visible: {}",
        d["history"]
    );
    assert!(d["history"]["queued"].as_u64().unwrap() > 0);
    pg.restart().await;
    app.poll("/health/detailed", Duration::from_secs(60), |d| {
        d["history"]["queued"] == 0 && d["history"]["writing"] == true
    })
    .await;
    let cycles = app.run_cycles().await;
    app.stop().await.expect("clean stop");
    let published: u64 = cycles
        .iter()
        .map(|c| c["symbols_ok"].as_u64().unwrap())
        .sum::<u64>()
        * 4;
    let store = postgres(&pg).await;
    let stored = store
        .page(&HistoryQuery {
            limit: 1000,
            ..HistoryQuery::default()
        })
        .await
        .unwrap()
        .len() as u64;
    // Every stage of every completed symbol. The cycles were read before the stop, and the
    // stop lets the cycle then in flight finish: up to one more tick's 3 symbols × 4 stages
    // (seen: 408 stored of 396 counted — exactly one whole tick more).
    assert!(
        stored >= published,
        "{stored} stored of {published} published"
    );
    assert!(
        stored <= published + 12,
        "{stored} stored of {published} published"
    );
}

/// `/api/signals/history` pages through everything stored, newest first, and refuses bad
/// parameters by name; `/api/performance` answers with its fields and refuses the same way;
/// with the history off both say so with a 503.
#[tokio::test]
async fn the_history_and_performance_apis_page_validate_and_explain_themselves() {
    let yaml = crate::helpers::config(
        "* * * * * *",
        "  symbols: [ETH/USD, BTC/USD]\n  pipeline:\n    advise_min_score: 0\n",
    );
    let app = crate::app::spawn_app(&yaml).await;
    // What the first ticks published (a tick under load may complete fewer symbols), then
    // the history holding at least that (written off the publishing path: waited for).
    let cycles = app.wait_cycles(3, Duration::from_secs(30)).await;
    let published = cycles
        .iter()
        .map(|c| c["symbols_ok"].as_u64().unwrap())
        .sum::<u64>() as usize
        * 4;
    assert!(published >= 8, "{cycles:?}");
    let all = app
        .poll(
            "/api/signals/history?limit=1000",
            Duration::from_secs(30),
            |v| {
                v["signals"].as_array().is_some_and(|a| {
                    let ticks: std::collections::BTreeSet<&str> =
                        a.iter().filter_map(|r| r["cycle_id"].as_str()).collect();
                    a.len() >= published && ticks.len() >= 4
                })
            },
        )
        .await;
    // Ticks keep coming: compare pages over the ticks before the newest one seen, which are
    // whole (the writer keeps publishing order, so a row of a tick means its predecessors'
    // rows are all in).
    let newest = all["signals"][0]["cycle_id"].as_str().unwrap().to_string();
    let (_, all) = app
        .get(&format!("/api/signals/history?limit=1000&until={newest}"))
        .await;
    let total = all["signals"].as_array().unwrap().len();
    assert!(total > 5, "more than one page of 5: {all}");
    // Pages of 5 give the same rows in the same order, each once.
    let mut paged = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/signals/history?limit=5&until={newest}&cursor={c}"),
            None => format!("/api/signals/history?limit=5&until={newest}"),
        };
        let (code, page) = app.get(&path).await;
        assert_eq!(code, 200, "{page}");
        let rows = page["signals"].as_array().unwrap();
        assert!(rows.len() <= 5);
        paged.extend(rows.iter().map(|r| r["message"]["message_id"].clone()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<_> = all["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"]["message_id"].clone())
        .collect();
    assert_eq!(paged, expected);
    let (_, eth) = app
        .get("/api/signals/history?symbol=ETH%2FUSD&stage=signal")
        .await;
    let eth = eth["signals"].as_array().unwrap();
    assert!(eth.len() >= 3);
    assert!(
        eth.iter()
            .all(|r| r["symbol"] == "ETH/USD" && r["stage"] == "signal")
    );
    assert!(
        eth.iter().all(|r| r["grades"].is_object()),
        "signal rows carry their grades"
    );
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("stage=raw", "stage"),
        ("symbol=eth", "symbol"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("cursor=nonsense", "cursor"),
        ("colour=red", "query"),
    ] {
        let (code, body) = app.get(&format!("/api/signals/history?{query}")).await;
        assert_eq!(code, 400, "{query}");
        assert_eq!(body["parameter"], param, "{query}: {body}");
    }
    let (code, perf) = app.get("/api/performance?horizon=5m&group_by=tier").await;
    assert_eq!(code, 200);
    assert_eq!(
        (perf["horizon"].as_str(), perf["group_by"].as_str()),
        (Some("5m"), Some("tier"))
    );
    assert_eq!(perf["market_data"]["simulated"], true);
    assert!(perf["groups"].is_array() && perf["missing_price"].is_u64());
    for (query, param) in [
        ("horizon=5x", "horizon"),
        ("horizon=0m", "horizon"),
        ("group_by=colour", "group_by"),
        ("since=soon", "since"),
    ] {
        let (code, body) = app.get(&format!("/api/performance?{query}")).await;
        assert_eq!(code, 400, "{query}");
        assert_eq!(body["parameter"], param, "{query}: {body}");
    }
    app.stop().await.unwrap();

    let off = crate::app::spawn_app(crate::helpers::config(
        "0 0 1 1 *",
        "  symbols: [ETH/USD]\n  history:\n    enabled: false\n",
    ))
    .await;
    for path in ["/api/signals/history", "/api/performance"] {
        let (code, body) = off.get(path).await;
        assert_eq!(code, 503, "{path}");
        assert!(
            body["error"].as_str().unwrap().contains("history.enabled"),
            "{body}"
        );
    }
}

/// `/api/candles`: the candles the pipeline reads, as of now, oldest first, each a whole
/// minute that has ended, consistent OHLC; only configured symbols; bad parameters named.
#[tokio::test]
async fn the_candles_api_serves_the_configured_symbols_minutes_and_names_bad_requests() {
    let yaml = crate::helpers::config("0 0 1 1 *", "  symbols: [ETH/USD, BTC/USD]\n");
    let app = crate::app::spawn_app(&yaml).await;
    let (status, body) = app.get("/api/candles?symbol=ETH/USD&minutes=90").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["symbol"], "ETH/USD");
    assert_eq!(body["simulated"], true);
    let candles = body["candles"].as_array().unwrap();
    assert_eq!(candles.len(), 90);
    let as_of: chrono::DateTime<chrono::Utc> = body["as_of"].as_str().unwrap().parse().unwrap();
    let mut prev: Option<chrono::DateTime<chrono::Utc>> = None;
    for c in candles {
        let t: chrono::DateTime<chrono::Utc> = c["time"].as_str().unwrap().parse().unwrap();
        assert_eq!(t.timestamp() % 60, 0, "a minute's start: {c}");
        assert!(
            t + chrono::Duration::minutes(1) <= as_of,
            "ended by as_of: {c}"
        );
        if let Some(p) = prev {
            assert_eq!(t - p, chrono::Duration::minutes(1), "oldest first, no gaps");
        }
        prev = Some(t);
        let f = |k: &str| c[k].as_f64().unwrap();
        assert!(
            f("low") <= f("open").min(f("close")) && f("high") >= f("open").max(f("close")),
            "{c}"
        );
    }
    let (status, body) = app.get("/api/candles?symbol=ETH/USD").await;
    assert_eq!(
        (status, body["candles"].as_array().map(Vec::len)),
        (200, Some(240))
    );
    for (query, status, param) in [
        ("", 400, "symbol"),
        ("?symbol=ETH/USD&minutes=0", 400, "minutes"),
        ("?symbol=ETH/USD&minutes=1441", 400, "minutes"),
        ("?symbol=ETH/USD&minutes=ten", 400, "minutes"),
        ("?symbol=ETH/USD&colour=red", 400, "query"),
        ("?symbol=DOGE/USD", 400, "symbol"),
    ] {
        let (got, body) = app.get(&format!("/api/candles{query}")).await;
        assert_eq!(
            (got, body["parameter"].as_str()),
            (status, Some(param)),
            "{query}: {body}"
        );
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    app.stop().await.expect("clean stop");
}

/// A second start on an existing PostgreSQL history logs no NOTICE ("relation … already
/// exists, skipping") as if something had happened: the binary, started twice, with its logs
/// read.
#[tokio::test]
async fn a_restart_on_postgres_logs_no_notices() {
    let pg = PostgresServer::start().await;
    let url = pg.url();
    let yaml = crate::helpers::config("0 0 1 1 *", "  symbols: [ETH/USD]\n");
    for start in ["first", "second"] {
        let mut p = crate::helpers::Proc::spawn("run", &yaml, &[("POSTGRES_URL", &url)]).await;
        p.wait_log(
            |l| l["message"].as_str().is_some_and(|m| m.contains("history")),
            Duration::from_secs(20),
        )
        .await;
        p.signal("TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(20)).await, 0, "{start}");
        let notices = p.logs_matching(|l| {
            l.to_string().contains("already exists")
                || l["target"].as_str().is_some_and(|t| t.contains("notice"))
        });
        assert!(notices.is_empty(), "{start} start: {notices:#?}");
    }
}

/// A PostgreSQL history written by the schema before native types (the shared migrations
/// 0001–0004 alone: integer times, 0/1 flags, JSON text) is converted in place at the first
/// start of this version — the same rows, now in PostgreSQL's types, with their constraints
/// and comments, and the API reads them as before.
#[tokio::test]
async fn a_postgres_history_of_the_integer_schema_is_converted_in_place() {
    let pg = PostgresServer::start().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url())
        .await
        .unwrap();
    // The previous version's schema, as it ran it: the shared migrations only.
    sqlx::migrate!("./migrations").run(&pool).await.unwrap();
    let msgs = [
        message("ETH/USD", 0, Stage::Signal, "BUY", 0.7, 100.0),
        message("ETH/USD", 0, Stage::Score, "BUY", 0.7, 100.0),
    ];
    let recs = records(&msgs);
    for r in &recs {
        sqlx::query(
            "INSERT INTO signal_messages (message_id, signal_id, stage, symbol, cycle_id, cycle_at, \
               published_at_ms, action, confidence, tier, model, top_strategy, price, data_as_of, \
               is_degraded, envelope, calibrated_confidence, price_change_1h) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(&r.message_id)
        .bind(&r.signal_id)
        .bind(r.stage.as_str())
        .bind(&r.symbol)
        .bind(&r.cycle_id)
        .bind(r.cycle_at)
        .bind(r.published_at_ms)
        .bind(r.action.as_str())
        .bind(r.confidence)
        .bind(r.tier.map(|t| t.as_str()))
        .bind(&r.model)
        .bind(r.top_strategy.clone())
        .bind(r.price)
        .bind(r.data_as_of)
        .bind(i32::from(r.is_degraded))
        .bind(&r.envelope)
        .bind(r.calibrated_confidence)
        .bind(r.price_change_1h)
        .execute(&pool)
        .await
        .unwrap();
    }
    let signal = &recs[0];
    sqlx::query(
        "INSERT INTO signal_grades (signal_id, horizon_seconds, symbol, action, confidence, \
           confidence_bucket, tier, backend, model, strategy, cycle_at, price_then, price_after, \
           return_fraction, hit, status, graded_at, hold_hit, momentum_hit) \
         VALUES ($1, 300, 'ETH/USD', 'BUY', 0.7, 7, 'GOOD', 'rules', 'rules', 'RSI', $2, 100, 101, \
           0.01, 1, 'graded', $3, 0, 1)",
    )
    .bind(&signal.signal_id)
    .bind(signal.cycle_at)
    .bind(signal.cycle_at + 400)
    .execute(&pool)
    .await
    .unwrap();

    // This version's first start.
    let store = postgres(&pg).await;

    // The columns are PostgreSQL's types now.
    let types: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name IN ('signal_messages', 'signal_grades') ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let type_of = |t: &str, c: &str| {
        types
            .iter()
            .find(|(tt, cc, _)| tt == t && cc == c)
            .map(|(_, _, ty)| ty.clone())
            .unwrap_or_else(|| panic!("no column {t}.{c}: {types:?}"))
    };
    for (table, column, want) in [
        ("signal_messages", "message_id", "uuid"),
        ("signal_messages", "signal_id", "uuid"),
        ("signal_messages", "cycle_at", "timestamp with time zone"),
        (
            "signal_messages",
            "published_at",
            "timestamp with time zone",
        ),
        ("signal_messages", "data_as_of", "timestamp with time zone"),
        ("signal_messages", "is_degraded", "boolean"),
        ("signal_messages", "envelope", "jsonb"),
        ("signal_grades", "signal_id", "uuid"),
        ("signal_grades", "cycle_at", "timestamp with time zone"),
        ("signal_grades", "graded_at", "timestamp with time zone"),
        ("signal_grades", "hit", "boolean"),
        ("signal_grades", "hold_hit", "boolean"),
        ("signal_grades", "momentum_hit", "boolean"),
    ] {
        assert_eq!(type_of(table, column), want, "{table}.{column}");
    }
    // The rows kept their values.
    let (cycle_at, published_ms, degraded, envelope): (i64, i64, bool, String) = sqlx::query_as(
        "SELECT CAST(EXTRACT(EPOCH FROM cycle_at) AS BIGINT), \
                CAST(EXTRACT(EPOCH FROM published_at) * 1000 AS BIGINT), is_degraded, envelope::text \
         FROM signal_messages WHERE message_id = CAST($1 AS uuid)",
    )
    .bind(&signal.message_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(cycle_at, signal.cycle_at);
    assert_eq!(published_ms, signal.published_at_ms);
    assert_eq!(degraded, signal.is_degraded);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&envelope).unwrap(),
        serde_json::from_str::<serde_json::Value>(&signal.envelope).unwrap()
    );
    let (hit, hold, momentum): (Option<bool>, Option<bool>, Option<bool>) = sqlx::query_as(
        "SELECT hit, hold_hit, momentum_hit FROM signal_grades WHERE signal_id = CAST($1 AS uuid)",
    )
    .bind(&signal.signal_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((hit, hold, momentum), (Some(true), Some(false), Some(true)));

    // The store reads them as before: the page, the grade beside its signal, the scorecard
    // (summed from the converted grades at this start).
    let page = store
        .page(&HistoryQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let row = page.iter().find(|r| r.stage == Stage::Signal).unwrap();
    assert_eq!(
        row.message,
        serde_json::from_str::<serde_json::Value>(&signal.envelope).unwrap()
    );
    assert_eq!(row.key, (signal.cycle_at, signal.message_id.clone()));
    let grades = store
        .grades_of(std::slice::from_ref(&signal.signal_id))
        .await
        .unwrap();
    assert_eq!(grades.len(), 1);
    assert_eq!(grades[0].2.hit, Some(true));
    let card = scorecard_of(store.as_ref(), 300, GroupBy::Symbol, 0)
        .await
        .unwrap();
    assert_eq!(
        (card.len(), card[0].graded, card[0].hits),
        (1, 1, 1),
        "{card:?}"
    );

    // What the schema now refuses: a stage outside the pipeline's, a grade of no signal.
    let bad_stage = sqlx::query("UPDATE signal_messages SET stage = 'raw'")
        .execute(&pool)
        .await;
    assert!(
        bad_stage.is_err_and(|e| e.to_string().contains("signal_messages_stage_check")),
        "a stage outside the four is refused"
    );
    let orphan = sqlx::query(
        "INSERT INTO signal_grades (signal_id, horizon_seconds, symbol, action, confidence, \
           confidence_bucket, tier, backend, model, strategy, cycle_at, price_then, status, graded_at) \
         VALUES (md5('nothing')::uuid, 300, 'ETH/USD', 'BUY', 0.7, 7, 'GOOD', 'rules', 'rules', \
           'RSI', now(), 100, 'missing_price', now())",
    )
    .execute(&pool)
    .await;
    assert!(
        orphan.is_err_and(|e| e.to_string().contains("signal_grades_signal_fk")),
        "a grade of no stored signal is refused"
    );
    // Tables and columns say what they hold.
    let described: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_description d JOIN pg_class c ON c.oid = d.objoid \
         WHERE c.relname IN ('signal_messages', 'signal_grades')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(described >= 40, "{described} comments");

    // A second start finds nothing to migrate and the same rows.
    let again = postgres(&pg).await;
    assert_eq!(
        again
            .page(&HistoryQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        2
    );
}
