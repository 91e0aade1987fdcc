//! [`HistoryStore`] on SQLite or PostgreSQL through sqlx's `Any` driver: the same statements
//! (`$n` parameters, `ON CONFLICT … DO NOTHING`) and the same contract suite on both. The
//! types differ where an analyst reads the tables: SQLite keeps integer times, 0/1 booleans
//! and JSON text (migrations 0001–0004); PostgreSQL converts them to `timestamptz`,
//! `boolean`, `jsonb` and `uuid` (its own migration, `migrations_postgres/0005`). The code
//! keeps one representation — Unix seconds, 0/1, text — and [`Dialect`] writes the casts
//! between it and PostgreSQL's columns into each statement.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::{AnyPool, Row};

use super::*;

/// The schema both backends share, embedded in the binary and applied at start.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How a backend's columns are written and read around the one representation the code
/// keeps (Unix seconds, 0/1, text ids and JSON): identity on SQLite, casts on PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn of(backend: &str) -> Dialect {
        if backend == "postgres" {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        }
    }

    /// A parameter of Unix seconds as a time column's value.
    fn time_in(self, p: &str) -> String {
        match self {
            Dialect::Sqlite => p.to_string(),
            Dialect::Postgres => format!("to_timestamp({p})"),
        }
    }

    /// A time column as Unix seconds.
    fn time_out(self, col: &str) -> String {
        match self {
            Dialect::Sqlite => col.to_string(),
            Dialect::Postgres => format!("CAST(EXTRACT(EPOCH FROM {col}) AS BIGINT)"),
        }
    }

    /// A parameter of Unix milliseconds as the publication time's value.
    fn millis_in(self, p: &str) -> String {
        match self {
            Dialect::Sqlite => p.to_string(),
            Dialect::Postgres => format!("to_timestamp({p} / 1000.0)"),
        }
    }

    /// A text parameter as an id column's value.
    fn id_in(self, p: &str) -> String {
        match self {
            Dialect::Sqlite => p.to_string(),
            Dialect::Postgres => format!("CAST({p} AS uuid)"),
        }
    }

    /// A 0/1 parameter as a flag column's value.
    fn flag_in(self, p: &str) -> String {
        match self {
            Dialect::Sqlite => p.to_string(),
            Dialect::Postgres => format!("CAST({p} AS BOOLEAN)"),
        }
    }

    /// A text parameter as the envelope column's value.
    fn json_in(self, p: &str) -> String {
        match self {
            Dialect::Sqlite => p.to_string(),
            Dialect::Postgres => format!("CAST({p} AS jsonb)"),
        }
    }

    /// The publication time's column.
    fn published_column(self) -> &'static str {
        match self {
            Dialect::Sqlite => "published_at_ms",
            Dialect::Postgres => "published_at",
        }
    }
}

/// A flag column as 0/1 (NULL stays NULL), the same text on both backends.
fn flag_out(col: &str) -> String {
    format!("CAST({col} AS INTEGER)")
}

/// An id or JSON column as text, the same on both backends.
fn text_out(col: &str) -> String {
    format!("CAST({col} AS TEXT)")
}

/// A history store on a connection pool.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: &'static str,
    dialect: Dialect,
}

/// A statement with its arguments, as the sums upserts build them.
type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// How an SQLite history is used, which decides its tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteUse {
    /// The service's history: four connections (the API reads while the writer writes),
    /// `synchronous = NORMAL` (a committed batch survives a crash of the process and, with
    /// WAL, of the machine up to the last checkpoint), SQLite's default 2 MB page cache.
    Service,
    /// A replay's history: one writer that reads its own writes. One connection (each keeps
    /// its own page cache, and a write through one throws away what the others cached: with
    /// four, a replay read its writes back from the file again and again), a 64 MB cache, and
    /// `synchronous = OFF` — the file is the replay's output, and a machine that loses power
    /// mid-replay means running the replay again, not losing live history.
    Replay,
}

impl SqlStore {
    /// Opens (creating the file and its directory) the SQLite database at `path` and runs the
    /// migrations: four connections, so the API reads while the writer writes.
    pub async fn sqlite(path: &Path) -> Result<SqlStore, HistoryError> {
        Self::sqlite_with(path, SqliteUse::Service).await
    }

    /// [`SqlStore::sqlite`] tuned for `how` it is used (see [`SqliteUse`]).
    pub async fn sqlite_with(path: &Path, how: SqliteUse) -> Result<SqlStore, HistoryError> {
        let (connections, synchronous, cache_kib) = match how {
            SqliteUse::Service => (4, "NORMAL", 2_000),
            SqliteUse::Replay => (1, "OFF", 65_536),
        };
        let backend = "sqlite";
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| HistoryError::Database {
                backend,
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let url = format!("sqlite://{}?mode=rwc", path.display());
        // One writer at a time is SQLite's rule; WAL lets the API read while the writer
        // writes, and the busy timeout turns a momentary lock into a short wait.
        let pool = Self::pool(&url, connections, move |conn| {
            Box::pin(async move {
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("PRAGMA busy_timeout = 5000")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(&format!("PRAGMA synchronous = {synchronous}"))
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(&format!("PRAGMA cache_size = -{cache_kib}"))
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .await
        .map_err(|e| HistoryError::Database {
            backend,
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        Self::migrated(pool, backend).await
    }

    /// Adds `rows` to one of the running-sums tables (`head` up to `VALUES`, its column
    /// count, `tail` from `ON CONFLICT`) in multi-row statements inside `tx`: each row's key
    /// (horizon, day, grouping, key, bucket) bound first, then what `bind` binds of its values.
    async fn upsert_sums<V>(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        (head, columns, tail): (&str, usize, &str),
        rows: &[(SumKey, V)],
        bind: for<'q> fn(AnyQuery<'q>, &'q V) -> AnyQuery<'q>,
    ) -> Result<(), HistoryError> {
        for chunk in rows.chunks(GRADE_ROWS_PER_STATEMENT) {
            let sql = upsert_sql(head, columns, chunk.len(), tail, Marks::of(self.backend));
            let mut q = sqlx::query(&sql);
            for (k, v) in chunk {
                q = bind(
                    q.bind(k.horizon)
                        .bind(k.day)
                        .bind(k.group_by)
                        .bind(&k.key)
                        .bind(k.bucket),
                    v,
                );
            }
            q.execute(&mut **tx).await.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// A connection of its own for one write transaction (see [`SqlStore::settle`]).
    async fn write_connection(&self) -> Result<PoolConnection<sqlx::Any>, HistoryError> {
        self.pool.acquire().await.map_err(|e| self.err(e))
    }

    /// Returns `conn` to the pool after a write that succeeded; closes it after one that
    /// failed. A write that failed mid-transaction can leave the connection inside a
    /// transaction the driver no longer tracks (SQLite's "database or disk is full" rolls the
    /// transaction back by itself, or not, depending on where it struck): reused, it held the
    /// write lock ("database is locked" for every other connection) and every later batch
    /// "committed" into a transaction that was never committed — rows counted as written
    /// that a restart did not find. A fresh connection knows no such state.
    async fn settle<T>(
        &self,
        conn: PoolConnection<sqlx::Any>,
        result: Result<T, HistoryError>,
    ) -> Result<T, HistoryError> {
        if result.is_err()
            && let Err(e) = conn.close().await
        {
            tracing::debug!(error = %e, "closing a history connection after a failed write");
        }
        result
    }

    /// Closes every connection (SQLite then checkpoints its write-ahead log into the file and
    /// removes it). Statements after this fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Connects to PostgreSQL at `url` and runs the migrations. Errors never carry the URL
    /// (it holds a password).
    pub async fn postgres(url: &str) -> Result<SqlStore, HistoryError> {
        let backend = "postgres";
        // NOTICEs are for a person at psql: the migrations' `CREATE … IF NOT EXISTS` draw
        // "relation … already exists, skipping" at every start, which the driver logged at
        // INFO as if something had happened. Warnings and errors still come.
        let pool = Self::pool(url, 8, |conn| {
            Box::pin(async move {
                sqlx::Executor::execute(conn, "SET client_min_messages TO warning")
                    .await
                    .map(|_| ())
            })
        })
        .await
        .map_err(|e| HistoryError::Database {
            backend,
            message: describe(&e),
        })?;
        Self::migrated(pool, backend).await
    }

    async fn pool<F>(url: &str, max: u32, after_connect: F) -> Result<AnyPool, sqlx::Error>
    where
        F: for<'c> Fn(
                &'c mut sqlx::AnyConnection,
            ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
            + 'static,
    {
        sqlx::any::install_default_drivers();
        AnyPoolOptions::new()
            .max_connections(max)
            // A database that does not answer fails a statement in seconds, so the writer
            // retries instead of hanging behind it.
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| after_connect(conn))
            .connect(url)
            .await
    }

    async fn migrated(pool: AnyPool, backend: &'static str) -> Result<SqlStore, HistoryError> {
        let failed = |e: sqlx::migrate::MigrateError| HistoryError::Migration {
            backend,
            message: e.to_string(),
        };
        if Dialect::of(backend) == Dialect::Postgres {
            // The shared migrations, then PostgreSQL's own (`migrations_postgres/`, whose
            // versions continue the shared numbering and never repeat one). Both share the one
            // `_sqlx_migrations` table, so each must pass over the versions the other applied.
            let mut shared = sqlx::migrate!("./migrations");
            shared.set_ignore_missing(true);
            let mut own = sqlx::migrate!("./migrations_postgres");
            own.set_ignore_missing(true);
            for m in [shared, own] {
                m.run(&pool).await.map_err(failed)?;
            }
        } else {
            MIGRATOR.run(&pool).await.map_err(failed)?;
        }
        let store = SqlStore {
            pool,
            backend,
            dialect: Dialect::of(backend),
        };
        // Grades recorded before the running sums existed (an upgrade) are summed once.
        // So are they when a version adds a grouping (a dimension without sums while there
        // are grades).
        let groupings: i64 = store
            .count("SELECT COUNT(DISTINCT group_by) AS n FROM signal_grade_sums")
            .await?;
        let grades: i64 = store
            .count("SELECT COUNT(*) AS n FROM signal_grades WHERE status = 'graded'")
            .await?;
        if groupings < GroupBy::ALL.len() as i64 && grades > 0 {
            tracing::info!(grades, "summing the stored grades for the scorecard");
            HistoryStore::rebuild_sums(&store).await?;
        }
        Ok(store)
    }

    /// The rows of a running-sums query of one horizon and grouping from `since`'s UTC day
    /// (`$1`, `$2`, `$3`).
    async fn summed(
        &self,
        sql: &str,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<AnyRow>, HistoryError> {
        sqlx::query(sql)
            .bind(horizon_seconds)
            .bind(group_by.as_str())
            .bind(since.div_euclid(86_400))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }

    async fn count(&self, sql: &str) -> Result<i64, HistoryError> {
        let r = sqlx::query(sql)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        int(&r, "n").map_err(|e| self.corrupt(e))
    }

    fn corrupt(&self, e: sqlx::Error) -> HistoryError {
        HistoryError::Corrupt {
            id: format!("{} row", self.backend),
            message: e.to_string(),
        }
    }

    fn err(&self, e: sqlx::Error) -> HistoryError {
        HistoryError::Database {
            backend: self.backend,
            message: describe(&e),
        }
    }
}

/// The driver's error in words without connection details.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => "the URL is not valid".to_string(),
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => format!("connection failed: {}", io.kind()),
        sqlx::Error::PoolTimedOut => "no connection within 5 s (database down?)".to_string(),
        other => other.to_string(),
    }
}

const SUMS_HEAD: &str = "INSERT INTO signal_grade_sums \
    (horizon_seconds, day, group_by, group_key, confidence_bucket, n, hits, confidence, returns, squared_error, \
     calibrated_n, calibrated_hits, calibrated_sum, calibrated_squared_error, baseline_n, \
     baseline_hits, hold_hits, hold_differ, momentum_hits, momentum_differ)";
const SUMS_TAIL: &str = "ON CONFLICT (horizon_seconds, group_by, day, group_key, confidence_bucket) DO UPDATE SET \
    n = signal_grade_sums.n + excluded.n, hits = signal_grade_sums.hits + excluded.hits, \
    confidence = signal_grade_sums.confidence + excluded.confidence, \
    returns = signal_grade_sums.returns + excluded.returns, \
    squared_error = signal_grade_sums.squared_error + excluded.squared_error, \
    calibrated_n = signal_grade_sums.calibrated_n + excluded.calibrated_n, \
    calibrated_hits = signal_grade_sums.calibrated_hits + excluded.calibrated_hits, \
    calibrated_sum = signal_grade_sums.calibrated_sum + excluded.calibrated_sum, \
    calibrated_squared_error = signal_grade_sums.calibrated_squared_error + excluded.calibrated_squared_error, \
    baseline_n = signal_grade_sums.baseline_n + excluded.baseline_n, \
    baseline_hits = signal_grade_sums.baseline_hits + excluded.baseline_hits, \
    hold_hits = signal_grade_sums.hold_hits + excluded.hold_hits, \
    hold_differ = signal_grade_sums.hold_differ + excluded.hold_differ, \
    momentum_hits = signal_grade_sums.momentum_hits + excluded.momentum_hits, \
    momentum_differ = signal_grade_sums.momentum_differ + excluded.momentum_differ";

const CALIBRATED_HEAD: &str = "INSERT INTO signal_calibrated_sums \
    (horizon_seconds, day, group_by, group_key, calibrated_bucket, n, hits, calibrated)";
const CALIBRATED_TAIL: &str = "ON CONFLICT (horizon_seconds, group_by, day, group_key, calibrated_bucket) DO UPDATE SET \
    n = signal_calibrated_sums.n + excluded.n, hits = signal_calibrated_sums.hits + excluded.hits, \
    calibrated = signal_calibrated_sums.calibrated + excluded.calibrated";

const RETURNS_HEAD: &str = "INSERT INTO signal_grade_returns \
    (horizon_seconds, day, group_by, group_key, return_bp, n)";
const RETURNS_TAIL: &str = "ON CONFLICT (horizon_seconds, group_by, day, group_key, return_bp) DO UPDATE SET \
    n = signal_grade_returns.n + excluded.n";

/// One row of the running sums: (horizon, day, grouping, key, bucket — a confidence bucket,
/// or a return in basis points for the returns table).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SumKey {
    horizon: i64,
    day: i64,
    group_by: &'static str,
    key: String,
    bucket: i64,
}

/// What a batch of grades adds to one row of `signal_grade_sums`.
#[derive(Debug, Default)]
struct SumDelta {
    n: i64,
    hits: i64,
    confidence: f64,
    returns: f64,
    squared_error: f64,
    calibrated_n: i64,
    calibrated_hits: i64,
    calibrated_sum: f64,
    calibrated_squared_error: f64,
    baseline_n: i64,
    baseline_hits: i64,
    hold_hits: i64,
    hold_differ: i64,
    momentum_hits: i64,
    momentum_differ: i64,
}

impl SumDelta {
    /// Counts one graded signal: its stated and calibrated confidence against its hit, and
    /// the baselines where both are known.
    fn add(&mut self, confidence: f64, hit: bool, ret: f64, calibrated: Option<f64>, g: &Grade) {
        let h = f64::from(u8::from(hit));
        self.n += 1;
        self.hits += i64::from(hit);
        self.confidence += confidence;
        self.returns += ret;
        self.squared_error += (confidence - h).powi(2);
        if let Some(c) = calibrated {
            self.calibrated_n += 1;
            self.calibrated_hits += i64::from(hit);
            self.calibrated_sum += c;
            self.calibrated_squared_error += (c - h).powi(2);
        }
        if let (Some(hold), Some(momentum)) = (g.hold_hit, g.momentum_hit) {
            self.baseline_n += 1;
            self.baseline_hits += i64::from(hit);
            self.hold_hits += i64::from(hold);
            self.hold_differ += i64::from(hold != hit);
            self.momentum_hits += i64::from(momentum);
            self.momentum_differ += i64::from(momentum != hit);
        }
    }
}

/// `floor(confidence × 10)`, 0–9.
fn confidence_bucket(confidence: f64) -> i64 {
    ((confidence * 10.0).floor() as i64).clamp(0, 9)
}

/// `rules` for the rules agent (and its fallback), `llm` for any model.
fn backend_of(model: &str) -> &'static str {
    if model == "rules" { "rules" } else { "llm" }
}

/// A return in whole basis points (±100 % at most: a move beyond is recorded at the edge).
fn return_bp(r: f64) -> i64 {
    ((r * 10_000.0).round() as i64).clamp(-10_000, 10_000)
}

/// The median of `(value, count)` pairs in value order.
fn median_of_histogram(h: &[(i64, u64)]) -> f64 {
    let total: u64 = h.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return 0.0;
    }
    // The values at 0-based ranks (total−1)/2 and total/2 (the same one for an odd total).
    let at = |rank: u64| {
        let mut seen = 0;
        for (v, n) in h {
            seen += n;
            if seen > rank {
                return *v as f64;
            }
        }
        0.0
    };
    (at((total - 1) / 2) + at(total / 2)) / 2.0
}

/// An integer column, whichever width the backend returns it in.
fn int(r: &AnyRow, name: &str) -> Result<i64, sqlx::Error> {
    r.try_get::<i64, _>(name)
        .or_else(|_| r.try_get::<i32, _>(name).map(i64::from))
}

/// A summed count (never negative).
fn count(r: &AnyRow, name: &str) -> Result<u64, sqlx::Error> {
    int(r, name).map(|n| n.max(0) as u64)
}

/// Columns of one stored message, in bind order.
const COLUMNS: usize = 18;

/// Rows per INSERT statement: one statement carries many rows (far less per-row overhead than
/// a statement each), within both backends' parameter limits (SQLite 32,766, PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 200;

/// How a statement's parameters are written: PostgreSQL wants `$1 … $n`; SQLite takes them
/// too, but binding looks each numbered one up by a linear scan of the statement's parameter
/// names (`sqlite3_bind_parameter_name`), so a statement of 10,000 of them spent most of a
/// replay's time there (26 % of all samples, perf). Plain `?` are not named: no lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marks {
    Numbered,
    Positional,
}

impl Marks {
    fn of(backend: &str) -> Marks {
        if backend == "sqlite" {
            Marks::Positional
        } else {
            Marks::Numbered
        }
    }
}

/// `($1 … $k), ($k+1 …) …` (or `(?, …), …`): the placeholders of `rows` rows of `columns`
/// values each, each written by `wrap` (its column's index from 0, the placeholder) — the
/// dialect's cast into the column's type.
fn values_list(
    columns: usize,
    rows: usize,
    marks: Marks,
    wrap: impl Fn(usize, &str) -> String,
) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let marks: Vec<String> = (1..=columns)
                .map(|c| {
                    let mark = match marks {
                        Marks::Numbered => format!("${}", r * columns + c),
                        Marks::Positional => "?".to_string(),
                    };
                    wrap(c - 1, &mark)
                })
                .collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    values.join(", ")
}

/// `INSERT … VALUES ($1 … $18), ($19 …) … ON CONFLICT DO NOTHING` for `rows` rows.
fn insert_sql(rows: usize, marks: Marks, d: Dialect) -> String {
    format!(
        "INSERT INTO signal_messages \
         (message_id, signal_id, stage, symbol, cycle_id, cycle_at, {}, action, \
          confidence, tier, model, top_strategy, price, data_as_of, is_degraded, envelope, \
          calibrated_confidence, price_change_1h) \
         VALUES {} ON CONFLICT (message_id) DO NOTHING",
        d.published_column(),
        values_list(COLUMNS, rows, marks, |c, m| match c {
            0 | 1 => d.id_in(m),
            5 | 13 => d.time_in(m),
            6 => d.millis_in(m),
            14 => d.flag_in(m),
            15 => d.json_in(m),
            _ => m.to_string(),
        })
    )
}

/// Grades (20 values each) or sums rows (at most 20) per statement: a round's grades and
/// their sums in a few statements instead of one each (a day's replay made ~700,000 before,
/// each a round trip to the database), within both backends' parameter limits.
const GRADE_ROWS_PER_STATEMENT: usize = 500;

/// `INSERT INTO signal_grades … VALUES (…), … ON CONFLICT DO NOTHING RETURNING` the keys that
/// were new: what this call recorded, not another grader.
fn grades_sql(rows: usize, marks: Marks, d: Dialect) -> String {
    format!(
        "INSERT INTO signal_grades (signal_id, horizon_seconds, symbol, action, confidence, \
            confidence_bucket, tier, backend, model, strategy, cycle_at, price_then, \
            price_after, return_fraction, hit, status, graded_at, calibrated_confidence, \
            hold_hit, momentum_hit) \
         VALUES {} ON CONFLICT (signal_id, horizon_seconds) DO NOTHING \
         RETURNING {} AS signal_id, CAST(horizon_seconds AS BIGINT) AS horizon",
        values_list(20, rows, marks, |c, m| match c {
            0 => d.id_in(m),
            10 | 16 => d.time_in(m),
            14 | 18 | 19 => d.flag_in(m),
            _ => m.to_string(),
        }),
        text_out("signal_id")
    )
}

/// One of the sums upserts (`head` up to `VALUES`, `tail` from `ON CONFLICT`) for `rows` rows
/// of `columns` values. The rows' keys are distinct (a map's), as PostgreSQL requires of one
/// statement's upserts.
fn upsert_sql(head: &str, columns: usize, rows: usize, tail: &str, marks: Marks) -> String {
    format!(
        "{head} VALUES {} {tail}",
        values_list(columns, rows, marks, |_, m| m.to_string())
    )
}

fn read_row(r: &AnyRow) -> Result<HistoryRow, HistoryError> {
    let get = |e: sqlx::Error| HistoryError::Corrupt {
        id: "message".into(),
        message: e.to_string(),
    };
    let id: String = r.try_get("message_id").map_err(get)?;
    let envelope: String = r.try_get("envelope").map_err(get)?;
    let message = serde_json::from_str(&envelope).map_err(|e| HistoryError::Corrupt {
        id: id.clone(),
        message: format!("envelope is not JSON: {e}"),
    })?;
    let stage: String = r.try_get("stage").map_err(get)?;
    Ok(HistoryRow {
        stage: Stage::parse(&stage).ok_or_else(|| HistoryError::Corrupt {
            id: id.clone(),
            message: format!("stage {stage:?} is not one of the pipeline's"),
        })?,
        signal_id: r.try_get("signal_id").map_err(get)?,
        symbol: r.try_get("symbol").map_err(get)?,
        cycle_id: r.try_get("cycle_id").map_err(get)?,
        key: (r.try_get("cycle_at").map_err(get)?, id),
        message,
        grades: None,
    })
}

#[async_trait::async_trait]
impl HistoryStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn insert(&self, batch: &[Record]) -> Result<u64, HistoryError> {
        let mut conn = self.write_connection().await?;
        let result: Result<u64, HistoryError> = async {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
            let mut added = 0;
            for chunk in batch.chunks(ROWS_PER_STATEMENT) {
                let sql = insert_sql(chunk.len(), Marks::of(self.backend), self.dialect);
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q
                        .bind(&r.message_id)
                        .bind(&r.signal_id)
                        .bind(r.stage.as_str())
                        .bind(&r.symbol)
                        .bind(&r.cycle_id)
                        .bind(r.cycle_at)
                        .bind(r.published_at_ms)
                        .bind(r.action.as_str())
                        .bind(r.confidence)
                        .bind(r.tier.map(Tier::as_str))
                        .bind(&r.model)
                        .bind(r.top_strategy.clone())
                        .bind(r.price)
                        .bind(r.data_as_of)
                        .bind(i32::from(r.is_degraded))
                        .bind(&r.envelope)
                        .bind(r.calibrated_confidence)
                        .bind(r.price_change_1h);
                }
                let done = q.execute(&mut *tx).await.map_err(|e| self.err(e))?;
                added += done.rows_affected();
            }
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(added)
        }
        .await;
        self.settle(conn, result).await
    }

    async fn page(&self, q: &HistoryQuery) -> Result<Vec<HistoryRow>, HistoryError> {
        // Keyset pagination on (cycle_at, message_id), newest first: every page is an index
        // range scan, however deep. Only the filters asked for are written (an open bound
        // written as an extreme value would be no time at all on PostgreSQL).
        let d = self.dialect;
        let mut conditions: Vec<String> = vec![];
        let mut n = 0;
        let mut mark = || {
            n += 1;
            format!("${n}")
        };
        if q.since.is_some() {
            conditions.push(format!("m.cycle_at >= {}", d.time_in(&mark())));
        }
        if q.until.is_some() {
            conditions.push(format!("m.cycle_at < {}", d.time_in(&mark())));
        }
        if q.after.is_some() {
            let (at, id) = (d.time_in(&mark()), d.id_in(&mark()));
            conditions.push(format!(
                "(m.cycle_at < {at} OR (m.cycle_at = {at} AND m.message_id < {id}))"
            ));
        }
        if q.symbol.is_some() {
            conditions.push(format!("m.symbol = {}", mark()));
        }
        if q.stage.is_some() {
            conditions.push(format!("m.stage = {}", mark()));
        }
        let limit = mark();
        // The ORDER BY names the table's columns (`m.`): the output columns of the same
        // names are PostgreSQL's casts, which no index is ordered by.
        let sql = format!(
            "SELECT {} AS message_id, {} AS signal_id, m.stage, m.symbol, m.cycle_id, \
                    {} AS cycle_at, {} AS envelope FROM signal_messages m {} \
             ORDER BY m.cycle_at DESC, m.message_id DESC LIMIT {limit}",
            text_out("m.message_id"),
            text_out("m.signal_id"),
            d.time_out("m.cycle_at"),
            text_out("m.envelope"),
            if conditions.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conditions.join(" AND "))
            },
        );
        let mut query = sqlx::query(&sql);
        if let Some(t) = q.since {
            query = query.bind(t);
        }
        if let Some(t) = q.until {
            query = query.bind(t);
        }
        if let Some((at, id)) = &q.after {
            query = query.bind(*at).bind(id.clone());
        }
        if let Some(s) = &q.symbol {
            query = query.bind(s.clone());
        }
        if let Some(st) = q.stage {
            query = query.bind(st.as_str());
        }
        let rows = query
            .bind(q.limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(read_row).collect()
    }

    async fn due(
        &self,
        horizon_seconds: i64,
        priced: std::ops::Range<i64>,
        limit: usize,
    ) -> Result<Vec<DueSignal>, HistoryError> {
        let d = self.dialect;
        let sql = format!(
            "SELECT {} AS signal_id, s.symbol, s.action, s.confidence, s.model, s.top_strategy, \
                    {} AS cycle_at, s.price, {} AS data_as_of, sc.tier AS score_tier, \
                    s.calibrated_confidence, s.price_change_1h \
             FROM signal_messages s \
             LEFT JOIN signal_messages sc ON sc.signal_id = s.signal_id AND sc.stage = 'score' \
             WHERE s.stage = 'signal' AND s.data_as_of < {} AND s.data_as_of >= {} \
               AND NOT EXISTS (SELECT 1 FROM signal_grades g \
                               WHERE g.signal_id = s.signal_id AND g.horizon_seconds = $2) \
             ORDER BY s.data_as_of LIMIT $3",
            text_out("s.signal_id"),
            d.time_out("s.cycle_at"),
            d.time_out("s.data_as_of"),
            d.time_in("$1"),
            d.time_in("$4"),
        );
        let rows = sqlx::query(&sql)
            .bind(priced.end)
            .bind(horizon_seconds)
            .bind(limit as i64)
            .bind(priced.start)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| self.corrupt(e);
                Ok(DueSignal {
                    signal_id: r.try_get("signal_id").map_err(get)?,
                    symbol: r.try_get("symbol").map_err(get)?,
                    action: {
                        let text: String = r.try_get("action").map_err(get)?;
                        Action::parse(&text).ok_or_else(|| HistoryError::Corrupt {
                            id: r.try_get("signal_id").unwrap_or_default(),
                            message: format!("action {text:?} is not BUY, SELL or HOLD"),
                        })?
                    },
                    confidence: r.try_get("confidence").map_err(get)?,
                    tier: r
                        .try_get::<Option<String>, _>("score_tier")
                        .map_err(get)?
                        .unwrap_or_else(|| "NONE".into()),
                    model: r.try_get("model").map_err(get)?,
                    strategy: r
                        .try_get::<Option<String>, _>("top_strategy")
                        .map_err(get)?
                        .unwrap_or_else(|| "NONE".into()),
                    cycle_at: r.try_get("cycle_at").map_err(get)?,
                    price_then: r.try_get("price").map_err(get)?,
                    data_as_of: r.try_get("data_as_of").map_err(get)?,
                    calibrated_confidence: r.try_get("calibrated_confidence").map_err(get)?,
                    price_change_1h: r.try_get("price_change_1h").map_err(get)?,
                })
            })
            .collect()
    }

    async fn grades_of(
        &self,
        signal_ids: &[String],
    ) -> Result<Vec<(String, i64, GradeView)>, HistoryError> {
        if signal_ids.is_empty() {
            return Ok(vec![]);
        }
        let marks: Vec<String> = (1..=signal_ids.len())
            .map(|i| self.dialect.id_in(&format!("${i}")))
            .collect();
        let sql = format!(
            "SELECT {} AS signal_id, horizon_seconds, {} AS hit, return_fraction, price_after \
             FROM signal_grades WHERE signal_id IN ({})",
            text_out("signal_id"),
            flag_out("hit"),
            marks.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in signal_ids {
            q = q.bind(id.clone());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| self.corrupt(e);
                Ok((
                    r.try_get("signal_id").map_err(get)?,
                    r.try_get::<i64, _>("horizon_seconds")
                        .or_else(|_| r.try_get::<i32, _>("horizon_seconds").map(i64::from))
                        .map_err(get)?,
                    GradeView {
                        hit: r
                            .try_get::<Option<i32>, _>("hit")
                            .map_err(get)?
                            .map(|h| h == 1),
                        return_fraction: r.try_get("return_fraction").map_err(get)?,
                        price_after: r.try_get("price_after").map_err(get)?,
                    },
                ))
            })
            .collect()
    }

    async fn record_grade(&self, g: &Grade) -> Result<bool, HistoryError> {
        Ok(self
            .record_grades(std::slice::from_ref(g))
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    async fn record_grades(&self, grades: &[Grade]) -> Result<Vec<bool>, HistoryError> {
        let mut conn = self.write_connection().await?;
        let result: Result<Vec<bool>, HistoryError> = async {
            // The grades and their share of the running sums commit together: a sum never counts
            // a grade that is not there, nor misses one that is. The sums of the batch are added
            // up first, so a batch costs one row per (grouping, key, bucket), not per grade, and
            // the rows go in a few multi-row statements.
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
            let mut recorded = vec![false; grades.len()];
            // Rows are written in key order (and the sums below in theirs): two replicas grading
            // the same signals at once then take their row locks in one order and cannot
            // deadlock on PostgreSQL, whatever order their scans returned ties in. A key twice in
            // one batch is recorded once (the first), as one statement cannot say which row won.
            let key = |g: &Grade| (g.signal.signal_id.clone(), g.horizon_seconds);
            let mut order: Vec<usize> = (0..grades.len()).collect();
            order.sort_by_key(|&i| key(&grades[i]));
            order.dedup_by_key(|i| key(&grades[*i]));
            let mut new: HashSet<(String, i64)> = HashSet::new();
            for chunk in order.chunks(GRADE_ROWS_PER_STATEMENT) {
                let sql = grades_sql(chunk.len(), Marks::of(self.backend), self.dialect);
                let mut q = sqlx::query(&sql);
                for &i in chunk {
                    let g = &grades[i];
                    let s = &g.signal;
                    q = q
                        .bind(&s.signal_id)
                        .bind(g.horizon_seconds)
                        .bind(&s.symbol)
                        .bind(s.action.as_str())
                        .bind(s.confidence)
                        .bind(confidence_bucket(s.confidence))
                        .bind(&s.tier)
                        .bind(backend_of(&s.model))
                        .bind(&s.model)
                        .bind(&s.strategy)
                        .bind(s.cycle_at)
                        .bind(s.price_then)
                        .bind(g.price_after)
                        .bind(g.return_fraction)
                        .bind(g.hit.map(i32::from))
                        .bind(if g.hit.is_some() {
                            "graded"
                        } else {
                            "missing_price"
                        })
                        .bind(g.graded_at)
                        .bind(s.calibrated_confidence)
                        .bind(g.hold_hit.map(i32::from))
                        .bind(g.momentum_hit.map(i32::from));
                }
                for r in q.fetch_all(&mut *tx).await.map_err(|e| self.err(e))? {
                    let id: String = r.try_get("signal_id").map_err(|e| self.err(e))?;
                    new.insert((id, int(&r, "horizon").map_err(|e| self.err(e))?));
                }
            }
            let mut sums: BTreeMap<SumKey, SumDelta> = BTreeMap::new();
            let mut calibrated: BTreeMap<SumKey, (i64, i64, f64)> = BTreeMap::new();
            let mut returns: BTreeMap<SumKey, i64> = BTreeMap::new();
            for i in order {
                let g = &grades[i];
                let s = &g.signal;
                if !new.contains(&key(g)) {
                    continue;
                }
                recorded[i] = true;
                let (Some(hit), Some(ret)) = (g.hit, g.return_fraction) else {
                    continue;
                };
                let bucket = confidence_bucket(s.confidence);
                let backend = backend_of(&s.model);
                let calibration_key = super::calibration::group_key(&s.model, s.action);
                let keys = [
                    (GroupBy::Symbol, s.symbol.as_str()),
                    (GroupBy::Action, s.action.as_str()),
                    (GroupBy::Tier, s.tier.as_str()),
                    (GroupBy::Backend, backend),
                    (GroupBy::Model, s.model.as_str()),
                    (GroupBy::Strategy, s.strategy.as_str()),
                    (GroupBy::Calibration, calibration_key.as_str()),
                ];
                let day = s.cycle_at.div_euclid(86_400);
                for (group_by, key) in keys {
                    let at = |bucket: i64| SumKey {
                        horizon: g.horizon_seconds,
                        day,
                        group_by: group_by.as_str(),
                        key: key.to_string(),
                        bucket,
                    };
                    sums.entry(at(bucket)).or_default().add(
                        s.confidence,
                        hit,
                        ret,
                        s.calibrated_confidence,
                        g,
                    );
                    if let Some(c) = s.calibrated_confidence {
                        let e = calibrated.entry(at(confidence_bucket(c))).or_default();
                        e.0 += 1;
                        e.1 += i64::from(hit);
                        e.2 += c;
                    }
                    *returns.entry(at(return_bp(ret))).or_default() += 1;
                }
            }
            let sums: Vec<_> = sums.into_iter().collect();
            self.upsert_sums(&mut tx, (SUMS_HEAD, 20, SUMS_TAIL), &sums, |q, d| {
                q.bind(d.n)
                    .bind(d.hits)
                    .bind(d.confidence)
                    .bind(d.returns)
                    .bind(d.squared_error)
                    .bind(d.calibrated_n)
                    .bind(d.calibrated_hits)
                    .bind(d.calibrated_sum)
                    .bind(d.calibrated_squared_error)
                    .bind(d.baseline_n)
                    .bind(d.baseline_hits)
                    .bind(d.hold_hits)
                    .bind(d.hold_differ)
                    .bind(d.momentum_hits)
                    .bind(d.momentum_differ)
            })
            .await?;
            let calibrated: Vec<_> = calibrated.into_iter().collect();
            self.upsert_sums(
                &mut tx,
                (CALIBRATED_HEAD, 8, CALIBRATED_TAIL),
                &calibrated,
                |q, (n, hits, sum)| q.bind(*n).bind(*hits).bind(*sum),
            )
            .await?;
            let returns: Vec<_> = returns.into_iter().collect();
            self.upsert_sums(
                &mut tx,
                (RETURNS_HEAD, 6, RETURNS_TAIL),
                &returns,
                |q, n| q.bind(*n),
            )
            .await?;
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(recorded)
        }
        .await;
        self.settle(conn, result).await
    }

    async fn graded(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<GradedRow>, HistoryError> {
        // The column name comes from a closed enum, never from the request.
        let sql = format!(
            "SELECT {} AS grp, confidence, {} AS hit, return_fraction, calibrated_confidence, \
                    {} AS hold_hit, {} AS momentum_hit FROM signal_grades \
             WHERE horizon_seconds = $1 AND status = 'graded' AND cycle_at >= {}",
            group_by.column(),
            flag_out("hit"),
            flag_out("hold_hit"),
            flag_out("momentum_hit"),
            self.dialect.time_in("$2"),
        );
        let rows = sqlx::query(&sql)
            .bind(horizon_seconds)
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| self.corrupt(e);
                Ok(GradedRow {
                    group: r.try_get("grp").map_err(get)?,
                    confidence: r.try_get("confidence").map_err(get)?,
                    hit: r.try_get::<i32, _>("hit").map_err(get)? == 1,
                    return_fraction: r.try_get("return_fraction").map_err(get)?,
                    calibrated: r.try_get("calibrated_confidence").map_err(get)?,
                    hold_hit: r
                        .try_get::<Option<i32>, _>("hold_hit")
                        .map_err(get)?
                        .map(|h| h == 1),
                    momentum_hit: r
                        .try_get::<Option<i32>, _>("momentum_hit")
                        .map_err(get)?
                        .map(|h| h == 1),
                })
            })
            .collect()
    }

    async fn sums(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<BucketSums>, HistoryError> {
        let rows = self
            .summed(
                // SUM of a BIGINT is NUMERIC on PostgreSQL, which the Any driver cannot read.
                "SELECT group_key, confidence_bucket, CAST(SUM(n) AS BIGINT) AS n, \
                    CAST(SUM(hits) AS BIGINT) AS hits, \
                    SUM(confidence) AS conf, SUM(returns) AS ret, SUM(squared_error) AS sq, \
                    CAST(SUM(calibrated_n) AS BIGINT) AS cal_n, \
                    CAST(SUM(calibrated_hits) AS BIGINT) AS cal_hits, \
                    SUM(calibrated_sum) AS cal_sum, SUM(calibrated_squared_error) AS cal_sq, \
                    CAST(SUM(baseline_n) AS BIGINT) AS base_n, \
                    CAST(SUM(baseline_hits) AS BIGINT) AS base_hits, \
                    CAST(SUM(hold_hits) AS BIGINT) AS hold_hits, \
                    CAST(SUM(hold_differ) AS BIGINT) AS hold_differ, \
                    CAST(SUM(momentum_hits) AS BIGINT) AS mom_hits, \
                    CAST(SUM(momentum_differ) AS BIGINT) AS mom_differ \
             FROM signal_grade_sums \
             WHERE horizon_seconds = $1 AND group_by = $2 AND day >= $3 \
             GROUP BY group_key, confidence_bucket ORDER BY group_key, confidence_bucket",
                horizon_seconds,
                group_by,
                since,
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BucketSums {
                    group: r.try_get("group_key").map_err(|e| self.corrupt(e))?,
                    bucket: int(r, "confidence_bucket").map_err(|e| self.corrupt(e))?,
                    n: int(r, "n").map_err(|e| self.corrupt(e))?.max(0) as u64,
                    hits: int(r, "hits").map_err(|e| self.corrupt(e))?.max(0) as u64,
                    confidence: r.try_get("conf").map_err(|e| self.corrupt(e))?,
                    returns: r.try_get("ret").map_err(|e| self.corrupt(e))?,
                    squared_error: r.try_get("sq").map_err(|e| self.corrupt(e))?,
                    calibrated_n: count(r, "cal_n").map_err(|e| self.corrupt(e))?,
                    calibrated_hits: count(r, "cal_hits").map_err(|e| self.corrupt(e))?,
                    calibrated_sum: r.try_get("cal_sum").map_err(|e| self.corrupt(e))?,
                    calibrated_squared_error: r.try_get("cal_sq").map_err(|e| self.corrupt(e))?,
                    baseline_n: count(r, "base_n").map_err(|e| self.corrupt(e))?,
                    baseline_hits: count(r, "base_hits").map_err(|e| self.corrupt(e))?,
                    hold_hits: count(r, "hold_hits").map_err(|e| self.corrupt(e))?,
                    hold_differ: count(r, "hold_differ").map_err(|e| self.corrupt(e))?,
                    momentum_hits: count(r, "mom_hits").map_err(|e| self.corrupt(e))?,
                    momentum_differ: count(r, "mom_differ").map_err(|e| self.corrupt(e))?,
                })
            })
            .collect()
    }

    async fn calibrated_sums(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<Vec<CalibratedSums>, HistoryError> {
        let rows = self
            .summed(
                "SELECT group_key, calibrated_bucket, CAST(SUM(n) AS BIGINT) AS n, \
                    CAST(SUM(hits) AS BIGINT) AS hits, SUM(calibrated) AS cal \
             FROM signal_calibrated_sums \
             WHERE horizon_seconds = $1 AND group_by = $2 AND day >= $3 \
             GROUP BY group_key, calibrated_bucket ORDER BY group_key, calibrated_bucket",
                horizon_seconds,
                group_by,
                since,
            )
            .await?;
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| self.corrupt(e);
                Ok(CalibratedSums {
                    group: r.try_get("group_key").map_err(get)?,
                    bucket: int(r, "calibrated_bucket").map_err(get)?,
                    n: count(r, "n").map_err(get)?,
                    hits: count(r, "hits").map_err(get)?,
                    calibrated: r.try_get("cal").map_err(get)?,
                })
            })
            .collect()
    }

    async fn medians(
        &self,
        horizon_seconds: i64,
        group_by: GroupBy,
        since: i64,
    ) -> Result<BTreeMap<String, f64>, HistoryError> {
        // Each group's returns by basis point, in order: the median is where the running count
        // crosses the middle (the mean of the two middle values for an even count).
        let rows = sqlx::query(
            "SELECT group_key, return_bp, CAST(SUM(n) AS BIGINT) AS n FROM signal_grade_returns \
             WHERE horizon_seconds = $1 AND group_by = $2 AND day >= $3 \
             GROUP BY group_key, return_bp ORDER BY group_key, return_bp",
        )
        .bind(horizon_seconds)
        .bind(group_by.as_str())
        .bind(since.div_euclid(86_400))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let mut hist: BTreeMap<String, Vec<(i64, u64)>> = BTreeMap::new();
        for r in &rows {
            let key: String = r.try_get("group_key").map_err(|e| self.corrupt(e))?;
            let bp = int(r, "return_bp").map_err(|e| self.corrupt(e))?;
            let n = int(r, "n").map_err(|e| self.corrupt(e))?.max(0) as u64;
            hist.entry(key).or_default().push((bp, n));
        }
        Ok(hist
            .into_iter()
            .map(|(k, h)| (k, median_of_histogram(&h) / 10_000.0))
            .collect())
    }

    async fn missing_prices(&self, horizon_seconds: i64, since: i64) -> Result<u64, HistoryError> {
        let sql = format!(
            "SELECT COUNT(*) AS n FROM signal_grades \
             WHERE horizon_seconds = $1 AND status = 'missing_price' AND cycle_at >= {}",
            self.dialect.time_in("$2")
        );
        let r = sqlx::query(&sql)
            .bind(horizon_seconds)
            .bind(since)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let n: i64 = r.try_get("n").map_err(|e| self.err(e))?;
        Ok(n.max(0) as u64)
    }

    async fn prune(&self, before: i64) -> Result<u64, HistoryError> {
        let mut n = 0;
        let at = self.dialect.time_in("$1");
        // The sums go by whole days: a day is dropped once all of it is past retention. The
        // grades go first: each belongs to a message of the same tick.
        for (sql, bound) in [
            (
                format!("DELETE FROM signal_grades WHERE cycle_at < {at}"),
                before,
            ),
            (
                format!("DELETE FROM signal_messages WHERE cycle_at < {at}"),
                before,
            ),
            (
                "DELETE FROM signal_grade_sums WHERE day < $1".to_string(),
                before.div_euclid(86_400),
            ),
            (
                "DELETE FROM signal_grade_returns WHERE day < $1".to_string(),
                before.div_euclid(86_400),
            ),
            (
                "DELETE FROM signal_calibrated_sums WHERE day < $1".to_string(),
                before.div_euclid(86_400),
            ),
        ] {
            n += sqlx::query(&sql)
                .bind(bound)
                .execute(&self.pool)
                .await
                .map_err(|e| self.err(e))?
                .rows_affected();
        }
        Ok(n)
    }

    async fn rebuild_sums(&self) -> Result<(), HistoryError> {
        let mut conn = self.write_connection().await?;
        let result: Result<(), HistoryError> = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(|e| self.err(e))?;
            for sql in [
                "DELETE FROM signal_grade_sums",
                "DELETE FROM signal_grade_returns",
                "DELETE FROM signal_calibrated_sums",
            ] {
                sqlx::query(sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            }
            // Days from the tick as Unix seconds, flags as 0/1: the dialect's casts (identity on
            // SQLite).
            let day = format!("{} / 86400", self.dialect.time_out("cycle_at"));
            let at = self.dialect.time_out("cycle_at");
            let (hit, hold, momentum) = (flag_out("hit"), flag_out("hold_hit"), flag_out("momentum_hit"));
            for g in GroupBy::ALL {
                // `g` comes from a closed enum: its key is a column (or an expression) of the
                // grades table.
                let (name, col) = (g.as_str(), g.column());
                // What the running sums count per grade, summed: a calibrated value only where
                // there is one, the baselines only where both are known.
                let sums = format!(
                    "INSERT INTO signal_grade_sums (horizon_seconds, day, group_by, group_key, \
                        confidence_bucket, n, hits, confidence, returns, squared_error, \
                        calibrated_n, calibrated_hits, calibrated_sum, calibrated_squared_error, \
                        baseline_n, baseline_hits, hold_hits, hold_differ, momentum_hits, \
                        momentum_differ) \
                     SELECT horizon_seconds, {day}, '{name}', {col}, confidence_bucket, \
                        COUNT(*), SUM({hit}), SUM(confidence), SUM(return_fraction), \
                        SUM((confidence - {hit}) * (confidence - {hit})), \
                        SUM(CASE WHEN calibrated_confidence IS NULL THEN 0 ELSE 1 END), \
                        SUM(CASE WHEN calibrated_confidence IS NULL THEN 0 ELSE {hit} END), \
                        COALESCE(SUM(calibrated_confidence), 0), \
                        COALESCE(SUM((calibrated_confidence - {hit}) * (calibrated_confidence - {hit})), 0), \
                        SUM({both} 1 ELSE 0 END), SUM({both} {hit} ELSE 0 END), \
                        SUM({both} {hold} ELSE 0 END), \
                        SUM({both} (CASE WHEN hold_hit <> hit THEN 1 ELSE 0 END) ELSE 0 END), \
                        SUM({both} {momentum} ELSE 0 END), \
                        SUM({both} (CASE WHEN momentum_hit <> hit THEN 1 ELSE 0 END) ELSE 0 END) \
                     FROM signal_grades WHERE status = 'graded' \
                     GROUP BY horizon_seconds, {day}, {col}, confidence_bucket",
                    both = "CASE WHEN hold_hit IS NOT NULL AND momentum_hit IS NOT NULL THEN"
                );
                // The calibrated value's bucket by comparison (FLOOR is not in every SQLite, and
                // PostgreSQL's integer cast rounds).
                let calibrated = format!(
                    "INSERT INTO signal_calibrated_sums (horizon_seconds, day, group_by, group_key, \
                        calibrated_bucket, n, hits, calibrated) \
                     SELECT horizon_seconds, at / 86400, '{name}', grp, cb, COUNT(*), SUM(hit), \
                        SUM(calibrated_confidence) FROM ( \
                       SELECT horizon_seconds, {at} AS at, {col} AS grp, {hit} AS hit, calibrated_confidence, \
                         CASE WHEN calibrated_confidence < 0.1 THEN 0 \
                              WHEN calibrated_confidence < 0.2 THEN 1 \
                              WHEN calibrated_confidence < 0.3 THEN 2 \
                              WHEN calibrated_confidence < 0.4 THEN 3 \
                              WHEN calibrated_confidence < 0.5 THEN 4 \
                              WHEN calibrated_confidence < 0.6 THEN 5 \
                              WHEN calibrated_confidence < 0.7 THEN 6 \
                              WHEN calibrated_confidence < 0.8 THEN 7 \
                              WHEN calibrated_confidence < 0.9 THEN 8 ELSE 9 END AS cb \
                       FROM signal_grades \
                       WHERE status = 'graded' AND calibrated_confidence IS NOT NULL) AS r \
                     GROUP BY horizon_seconds, at / 86400, grp, cb"
                );
                let returns = format!(
                    "INSERT INTO signal_grade_returns (horizon_seconds, day, group_by, group_key, \
                        return_bp, n) \
                     SELECT horizon_seconds, at / 86400, '{name}', grp, bp, COUNT(*) FROM ( \
                       SELECT horizon_seconds, {at} AS at, {col} AS grp, \
                         CASE WHEN return_fraction >= 1 THEN 10000 \
                              WHEN return_fraction <= -1 THEN -10000 \
                              ELSE CAST(ROUND(return_fraction * 10000) AS BIGINT) END AS bp \
                       FROM signal_grades WHERE status = 'graded') AS r \
                     GROUP BY horizon_seconds, at / 86400, grp, bp"
                );
                for sql in [sums, returns, calibrated] {
                    sqlx::query(&sql)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.err(e))?;
                }
            }
            tx.commit().await.map_err(|e| self.err(e))
        }
        .await;
        self.settle(conn, result).await
    }

    async fn ping(&self) -> Result<(), HistoryError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}
