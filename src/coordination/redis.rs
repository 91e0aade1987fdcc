//! The Redis coordination backend (the keys of the README's Redis table), for any number of
//! replicas.
//!
//! Every operation touches a single key, so the same code runs on Redis Cluster. Every call
//! goes through the Redis circuit breaker: while Redis is down calls fail fast with
//! [`CoordError::CircuitOpen`] instead of each waiting for a timeout.
//!
//! | key | written by |
//! |---|---|
//! | `signal:lock:{symbol}` (`locks.redis_key_prefix`) | `acquire_lock` (SET NX EX; stale takeover and release are owner-checked Lua) |
//! | `runner:heartbeat:{id}` | `heartbeat` (SET EX; `{timestamp, pid, token}`) |
//! | `runner:instances` | `heartbeat` (ZSET of id → last beat, to count live replicas with one key) |
//! | `runner:cycle:{cycle_id}` | `try_cycle_lease` (SET NX EX) |
//! | `signal:claim:{cycle_id}:{symbol}` | `claim_symbol` (SET NX EX) |
//! | `autonomous:kill_switch` | operators, `set_kill_switch` |
//!
//! **Ownership is per process.** Each process draws a random token at start and writes it
//! beside its `instance_id` in its locks and its heartbeat. A lock is its owner's while the
//! heartbeat of its `instance_id` carries the lock's token: so two processes sharing one
//! `instance_id` cannot vouch for each other's locks, a graceful stop deletes only its own
//! heartbeat, and a lock this process left behind (Redis died before the release) is
//! recognised and re-taken at once. A process refuses to start while another live process
//! heartbeats under its `instance_id`.
//!
//! **Half-open probes get a second try on a fresh connection.** The connection manager only
//! notices a dead socket when a request fails on it; without a retry the first probe after an
//! outage always failed and kept the breaker open another `recovery_timeout_seconds`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::{CoordError, Coordination, KillSwitch, LockOutcome, LockTiming, StaleReason};
use crate::resilience::Breaker;
use crate::schedule::CycleId;
use crate::telemetry::names;

pub use super::redis_rate_limit::RedisRateLimiter;

/// Lock record, as the seed writes it, plus the owning process's token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockRecord {
    instance_id: String,
    /// Unix seconds (fractional).
    acquired_at: f64,
    #[serde(default)]
    pid: Option<u32>,
    /// The owning process (absent in records written by others, e.g. the seed's runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// Heartbeat record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeartbeatRecord {
    timestamp: f64,
    #[serde(default)]
    pid: Option<u64>,
    #[serde(default)]
    token: Option<String>,
}

/// Deletes the heartbeat only if it is this process's (a twin's stays).
const DELETE_OWN_HEARTBEAT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local ok, rec = pcall(cjson.decode, v)
  if ok and type(rec) == 'table' and rec['token'] == ARGV[1] then
    return redis.call('DEL', KEYS[1])
  end
end
return 0";

/// Claims an instance id: writes the heartbeat if the key is absent or still holds exactly
/// ARGV[1], the record judged dead (`''` on the first try, which no record equals). One
/// script, so of two processes starting together exactly one wins.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0";

/// Refreshes the heartbeat only while it is this process's (token ARGV[1]) or absent (it
/// expired, e.g. during a long Redis outage): 1 when written, 0 when another process holds
/// the id.
const BEAT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local ok, rec = pcall(cjson.decode, v)
  if not (ok and type(rec) == 'table' and rec['token'] == ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1";

/// Deletes the key only if it still holds exactly the value we wrote.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Extends the key's expiry only if it still holds exactly the value we wrote.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Replaces a stale lock only if it still holds the exact value judged stale, so two
/// replicas recovering the same lock cannot both win.
const TAKEOVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0";

/// Connection settings that make failures surface quickly: the breaker, not a long client
/// timeout, decides how long to back off.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Opens a lazily-connecting, auto-reconnecting connection to `url` (redis://, rediss://,
/// unix://; password and db in the URL). Errors name the problem, never the URL (it may hold
/// a password).
pub fn connect(url: &str) -> Result<ConnectionManager, CoordError> {
    let client = redis::Client::open(url)
        .map_err(|e| CoordError::Unavailable(format!("invalid Redis URL: {}", e.kind_str())))?;
    manager(client)
}

/// A lazily-connecting, auto-reconnecting connection made from `client` (the process's one
/// Redis client).
pub fn manager(client: redis::Client) -> Result<ConnectionManager, CoordError> {
    ConnectionManager::new_lazy_with_config(client, manager_config()).map_err(|e| {
        CoordError::Unavailable(format!(
            "cannot create the Redis connection: {}",
            e.kind_str()
        ))
    })
}

trait KindStr {
    fn kind_str(&self) -> String;
}

impl KindStr for redis::RedisError {
    /// The error without any detail that could echo a URL or credentials.
    fn kind_str(&self) -> String {
        format!("{:?}", self.kind())
    }
}

/// Redis-backed coordination for one instance.
pub struct RedisCoordination {
    conn: ConnectionManager,
    breaker: Breaker,
    prefix: String,
    instance_id: String,
    timing: LockTiming,
    /// This process, among any that share its `instance_id` (see the module doc).
    token: String,
    /// Locks we hold: symbol → the exact value we wrote (owner checks compare it).
    held: Mutex<HashMap<String, String>>,
    /// Locks whose release did not reach Redis (an outage): symbol → the value we wrote.
    /// Released by [`Coordination::release_leftovers`] as soon as Redis answers, so other
    /// replicas need not wait out the TTL (our live heartbeat vouches for them meanwhile).
    leftovers: Mutex<HashMap<String, String>>,
    /// `locks.redis_key_prefix`: what comes between the key prefix and the symbol.
    lock_prefix: String,
}

impl std::fmt::Debug for RedisCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCoordination")
            .field("instance_id", &self.instance_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisCoordination {
    /// Instance `instance_id` on `conn`, keys under `prefix`.
    pub fn new(
        conn: ConnectionManager,
        breaker: Breaker,
        prefix: &str,
        instance_id: &str,
        timing: LockTiming,
    ) -> Self {
        Self {
            conn,
            breaker,
            prefix: prefix.to_string(),
            instance_id: instance_id.to_string(),
            timing,
            token: process_token(),
            held: Mutex::new(HashMap::new()),
            leftovers: Mutex::new(HashMap::new()),
            lock_prefix: "signal:lock:".into(),
        }
    }

    /// Lock keys `{prefix}{lock_prefix}{symbol}` instead of `{prefix}signal:lock:{symbol}`
    /// (`locks.redis_key_prefix`).
    pub fn with_lock_prefix(mut self, lock_prefix: &str) -> Self {
        self.lock_prefix = lock_prefix.to_string();
        self
    }

    /// Claims this process's `instance_id`, refusing to start next to a live process that
    /// holds it. The heartbeat key is the claim: written only if absent ([`CLAIM`]). If it
    /// exists, it is read again after `wait` (a heartbeat interval and a bit): a live process
    /// has refreshed it by then, a dead one (killed, not stopped) has not, and the record
    /// judged dead is replaced only if it is still exactly that record — so of two processes
    /// starting together, or two replacing the same dead one, exactly one wins.
    pub async fn ensure_unique_identity(&self, wait: Duration) -> Result<(), CoordError> {
        let key = self.heartbeat_key(&self.instance_id);
        if self.claim(&key, "").await? {
            return Ok(());
        }
        let first: Option<String> = self
            .call("heartbeat read", redis::cmd("GET").arg(&key))
            .await?;
        tracing::info!(
            instance_id = %self.instance_id,
            wait_s = wait.as_secs_f64(),
            "a heartbeat under this instance_id exists; checking that its process is gone"
        );
        tokio::time::sleep(wait).await;
        if self.claim(&key, first.as_deref().unwrap_or("")).await? {
            return Ok(());
        }
        let holder: Option<String> = self
            .call("heartbeat read", redis::cmd("GET").arg(&key))
            .await?;
        Err(CoordError::DuplicateInstance {
            instance_id: self.instance_id.clone(),
            pid: holder.as_deref().map_or(0, heartbeat_pid),
        })
    }

    /// Runs [`CLAIM`]: whether our heartbeat was written over nothing or over `dead`.
    async fn claim(&self, key: &str, dead: &str) -> Result<bool, CoordError> {
        let ttl = self.timing.heartbeat_ttl.as_secs().max(1).to_string();
        let won: i64 = self
            .script(
                "instance claim",
                CLAIM,
                key,
                &[dead, &self.heartbeat_body(), &ttl],
            )
            .await?;
        Ok(won == 1)
    }

    /// This process's heartbeat record, stamped now.
    fn heartbeat_body(&self) -> String {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        serde_json::json!({"timestamp": now, "pid": std::process::id(), "token": self.token})
            .to_string()
    }

    /// Whether the process that wrote `rec` is alive: the heartbeat of its `instance_id`
    /// exists and, when the lock names its process, carries the same token.
    async fn owner_alive(&self, rec: &LockRecord) -> Result<bool, CoordError> {
        let hb: Option<String> = self
            .call(
                "heartbeat read",
                redis::cmd("GET").arg(self.heartbeat_key(&rec.instance_id)),
            )
            .await?;
        let Some(hb) = hb else {
            return Ok(false);
        };
        Ok(match &rec.token {
            // A lock from a runner that does not write tokens: its id's heartbeat vouches.
            None => true,
            Some(t) => serde_json::from_str::<HeartbeatRecord>(&hb)
                .ok()
                .and_then(|h| h.token)
                .is_some_and(|ht| &ht == t),
        })
    }

    /// The breaker guarding Redis.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// A clone of the connection (shared with the publisher and the rate limiter).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn lock_key(&self, symbol: &str) -> String {
        self.key(&format!("{}{symbol}", self.lock_prefix))
    }

    fn heartbeat_key(&self, id: &str) -> String {
        self.key(&format!("runner:heartbeat:{id}"))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leftovers(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `symbol`'s lock as ours (`value` written), no longer a leftover.
    fn hold(&self, symbol: &str, value: String) {
        self.leftovers().remove(symbol);
        self.held().insert(symbol.to_string(), value);
    }

    /// Runs one Redis call through the breaker.
    async fn call<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, CoordError> {
        let r = guarded(&self.breaker, what, || {
            let mut conn = self.conn.clone();
            async move { cmd.query_async::<T>(&mut conn).await }
        })
        .await;
        match r {
            Err(e @ CoordError::WrongType { .. }) => {
                let mut args = cmd.args_iter().filter_map(|a| match a {
                    redis::Arg::Simple(b) => Some(b),
                    _ => None,
                });
                let name = args.next().unwrap_or_default();
                let key = String::from_utf8_lossy(args.next().unwrap_or_default()).into_owned();
                Err(wrong_type(&self.conn, e, &key, expected_type(name)).await)
            }
            r => r,
        }
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        script: &str,
        key: &str,
        args: &[&str],
    ) -> Result<T, CoordError> {
        let s = redis::Script::new(script);
        let mut inv = s.key(key);
        for a in args {
            inv.arg(*a);
        }
        let r = guarded(&self.breaker, what, || {
            let mut conn = self.conn.clone();
            let inv = &inv;
            async move { inv.invoke_async::<T>(&mut conn).await }
        })
        .await;
        match r {
            // Every script of this module keeps a string at its key.
            Err(e) => Err(wrong_type(&self.conn, e, key, "string").await),
            ok => ok,
        }
    }

    /// `SET key value NX EX ttl`: whether it was set.
    async fn set_nx(
        &self,
        what: &'static str,
        key: &str,
        value: &str,
        ttl: u64,
    ) -> Result<bool, CoordError> {
        let r: Option<String> = self
            .call(
                what,
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl.max(1)),
            )
            .await?;
        Ok(r.is_some())
    }

    fn record_value(&self) -> String {
        let rec = LockRecord {
            instance_id: self.instance_id.clone(),
            acquired_at: Utc::now().timestamp_millis() as f64 / 1000.0,
            pid: Some(std::process::id()),
            token: Some(self.token.clone()),
        };
        serde_json::to_string(&rec).unwrap_or_default()
    }
}

/// Runs one Redis request through the breaker: rejected at once while it is open (counted),
/// and its failure counts against it. Errors name the operation, never the URL.
///
/// A half-open probe that fails on a dead connection is sent once more: the connection
/// manager reconnects when a request fails, so the second try runs on a fresh connection
/// and a healthy Redis closes the breaker on the first probe.
pub(super) async fn guarded<T, F, Fut>(
    breaker: &Breaker,
    what: &'static str,
    request: F,
) -> Result<T, CoordError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let permit = breaker.try_acquire().map_err(|_| {
        metrics::counter!(names::CIRCUIT_BREAKER_REJECTED, "breaker" => "redis").increment(1);
        CoordError::CircuitOpen
    })?;
    let mut result = request().await;
    if let Err(e) = &result
        && permit.is_probe()
        && is_connection_error(e)
    {
        result = request().await;
    }
    match result {
        Ok(v) => {
            permit.success();
            Ok(v)
        }
        // Redis answered: a key of the wrong type is a bad record, not an outage, and must
        // not open the breaker (the caller names the key, see `wrong_type`).
        Err(e) if e.code() == Some("WRONGTYPE") => {
            permit.success();
            Err(CoordError::WrongType {
                key: String::new(),
                found: String::new(),
                expected: "",
            })
        }
        Err(e) => {
            permit.failure();
            Err(CoordError::Unavailable(format!("{what}: {}", e.kind_str())))
        }
    }
}

/// The type a runner command keeps at its key, by the command's name.
fn expected_type(command: &[u8]) -> &'static str {
    match command.to_ascii_uppercase().as_slice() {
        b"ZADD" | b"ZREM" | b"ZCOUNT" | b"ZREMRANGEBYSCORE" | b"ZCARD" | b"ZRANGE" => "zset",
        b"XADD" | b"XRANGE" | b"XREVRANGE" | b"XLEN" => "stream",
        _ => "string",
    }
}

/// Fills in a [`CoordError::WrongType`] from [`guarded`] with the key and what Redis says
/// is there; other errors pass through.
pub(super) async fn wrong_type(
    conn: &ConnectionManager,
    err: CoordError,
    key: &str,
    expected: &'static str,
) -> CoordError {
    if !matches!(err, CoordError::WrongType { .. }) {
        return err;
    }
    let mut conn = conn.clone();
    let found = redis::cmd("TYPE")
        .arg(key)
        .query_async::<String>(&mut conn)
        .await
        .unwrap_or_else(|_| "value of another type".into());
    CoordError::WrongType {
        key: key.to_string(),
        found,
        expected,
    }
}

/// Errors of the connection rather than of the command: worth a try on a new connection.
pub fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Removes a lock from the held ones when dropped, if it still holds the value released.
struct Forget<'a> {
    coord: &'a RedisCoordination,
    symbol: &'a str,
    value: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut held = self.coord.held();
        if held.get(self.symbol).map(String::as_str) == Some(self.value) {
            held.remove(self.symbol);
        }
    }
}

/// The pid a heartbeat record names (0 when it names none or is not one of ours).
fn heartbeat_pid(raw: &str) -> u64 {
    serde_json::from_str::<HeartbeatRecord>(raw)
        .ok()
        .and_then(|h| h.pid)
        .unwrap_or(0)
}

/// A random token for this process (128 bits, hex).
fn process_token() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Parses a kill-switch record. The contract is `{active, reason, activated_by, activated_at}`;
/// `true`/`1` and `false`/`0` are accepted too. Anything else is an error naming the key.
pub fn parse_kill_switch(key: &str, raw: &str) -> Result<KillSwitch, CoordError> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| CoordError::Malformed {
        key: key.to_string(),
        reason: format!("not JSON: {e}"),
    })?;
    match v {
        serde_json::Value::Bool(b) => Ok(KillSwitch {
            active: b,
            reason: String::new(),
            activated_by: String::new(),
            activated_at: None,
        }),
        serde_json::Value::Number(n) => Ok(KillSwitch {
            active: n.as_f64().is_some_and(|x| x != 0.0),
            reason: String::new(),
            activated_by: String::new(),
            activated_at: None,
        }),
        obj @ serde_json::Value::Object(_) => {
            serde_json::from_value(obj).map_err(|e| CoordError::Malformed {
                key: key.to_string(),
                reason: format!("expected {{active, reason, activated_by, activated_at}}: {e}"),
            })
        }
        other => Err(CoordError::Malformed {
            key: key.to_string(),
            reason: format!("expected an object, got {other}"),
        }),
    }
}

#[async_trait]
impl Coordination for RedisCoordination {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    async fn acquire_lock(&self, symbol: &str) -> Result<LockOutcome, CoordError> {
        let key = self.lock_key(symbol);
        let value = self.record_value();
        let ttl = self.timing.ttl.as_secs().max(1);
        if self.set_nx("lock", &key, &value, ttl).await? {
            self.hold(symbol, value);
            return Ok(LockOutcome::Acquired);
        }
        // Held: is it stale?
        let current: Option<String> = self.call("lock read", redis::cmd("GET").arg(&key)).await?;
        let Some(current) = current else {
            // Released in between: try once more.
            if self.set_nx("lock", &key, &value, ttl).await? {
                self.hold(symbol, value);
                return Ok(LockOutcome::Acquired);
            }
            return Ok(LockOutcome::Held);
        };
        let rec: LockRecord = match serde_json::from_str(&current) {
            Ok(r) => r,
            Err(e) => {
                // Someone else's record we cannot read: never take it over on a guess; it
                // expires with its TTL.
                tracing::warn!(key = %key, error = %e, "lock record is not {{instance_id, acquired_at, pid}}; leaving it to expire");
                return Ok(LockOutcome::Held);
            }
        };
        // The outcome if the takeover below wins.
        let outcome = if rec.token.as_deref() == Some(self.token.as_str()) {
            if self.held().contains_key(symbol) {
                // Ours and in use right now.
                return Ok(LockOutcome::Held);
            }
            // Ours, left behind when a release could not reach Redis (an outage), and no
            // longer in use: re-taken rather than blocking the symbol until it expires.
            tracing::info!(
                symbol,
                "re-taking a lock of ours left from before a Redis outage"
            );
            LockOutcome::Acquired
        } else if self.owner_alive(&rec).await? {
            // A live owner's lock is never taken over, however old: it extends its lock while
            // it works, and a takeover would run the symbol twice.
            return Ok(LockOutcome::Held);
        } else {
            let age = Utc::now().timestamp_millis() as f64 / 1000.0 - rec.acquired_at;
            LockOutcome::Recovered(if age > self.timing.stale_after.as_secs_f64() {
                StaleReason::Age
            } else {
                StaleReason::HeartbeatMissing
            })
        };
        let won: i64 = self
            .script(
                "lock takeover",
                TAKEOVER,
                &key,
                &[&current, &value, &ttl.to_string()],
            )
            .await?;
        if won == 1 {
            self.hold(symbol, value);
            Ok(outcome)
        } else {
            Ok(LockOutcome::Held)
        }
    }

    async fn extend_lock(&self, symbol: &str) -> Result<bool, CoordError> {
        let Some(value) = self.held().get(symbol).cloned() else {
            return Ok(false);
        };
        let ttl = self.timing.ttl.as_secs().max(1).to_string();
        let r: i64 = self
            .script(
                "lock extend",
                EXTEND,
                &self.lock_key(symbol),
                &[&value, &ttl],
            )
            .await?;
        if r != 1 {
            self.held().remove(symbol);
        }
        Ok(r == 1)
    }

    async fn release_lock(&self, symbol: &str) -> Result<bool, CoordError> {
        // Still held while the release is on its way: an acquire of the same symbol by this
        // process meanwhile sees it in use, not as a leftover to re-take (which made the
        // release find someone else's value). If the release cannot reach Redis, the lock
        // left there becomes a leftover, released again as soon as Redis answers.
        let Some(value) = self.held().get(symbol).cloned() else {
            return Ok(false);
        };
        // Forgotten as held once the release is over, however it ends (cancelled included).
        let _forget = Forget {
            coord: self,
            symbol,
            value: &value,
        };
        let r = self
            .script::<i64>("lock release", RELEASE, &self.lock_key(symbol), &[&value])
            .await;
        match r {
            Ok(r) => Ok(r == 1),
            Err(e) => {
                self.leftovers().insert(symbol.to_string(), value.clone());
                Err(e)
            }
        }
    }

    async fn release_leftovers(&self) -> Result<usize, CoordError> {
        let pending: Vec<(String, String)> = self
            .leftovers()
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        // While the breaker is open every call would be refused (and counted as refused):
        // wait for it to let calls through again.
        if pending.is_empty() || self.breaker.state() == crate::resilience::BreakerState::Open {
            return Ok(0);
        }
        let mut released = 0;
        for (symbol, value) in pending {
            let r: i64 = self
                .script("lock release", RELEASE, &self.lock_key(&symbol), &[&value])
                .await?;
            // Released, or no longer ours (expired, taken over, or re-taken by us with a new
            // value): either way nothing is left to release.
            let mut left = self.leftovers();
            if left.get(&symbol) == Some(&value) {
                left.remove(&symbol);
            }
            if r == 1 {
                released += 1;
                metrics::counter!(names::LEFTOVER_LOCKS_RELEASED).increment(1);
                tracing::info!(symbol = %symbol, "released a lock left over from a Redis outage");
            }
        }
        Ok(released)
    }

    async fn held_locks(&self) -> Result<Vec<String>, CoordError> {
        let mut v: Vec<String> = self.held().keys().cloned().collect();
        v.sort();
        Ok(v)
    }

    async fn heartbeat(&self) -> Result<(), CoordError> {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        let key = self.heartbeat_key(&self.instance_id);
        let ttl = self.timing.heartbeat_ttl.as_secs().max(1).to_string();
        let written: i64 = self
            .script(
                "heartbeat",
                BEAT,
                &key,
                &[&self.token, &self.heartbeat_body(), &ttl],
            )
            .await?;
        if written != 1 {
            // Another process took our id (ours had expired, or it was started by hand
            // with a copied config): two processes must not share one.
            let holder: Option<String> = self
                .call("heartbeat read", redis::cmd("GET").arg(&key))
                .await?;
            return Err(CoordError::DuplicateInstance {
                instance_id: self.instance_id.clone(),
                pid: holder.as_deref().map_or(0, heartbeat_pid),
            });
        }
        let members = self.key("runner:instances");
        let _: () = self
            .call(
                "heartbeat index",
                redis::cmd("ZADD")
                    .arg(&members)
                    .arg(now)
                    .arg(&self.instance_id),
            )
            .await?;
        // Forget replicas silent for a day so the index stays small.
        let _: () = self
            .call(
                "heartbeat index",
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&members)
                    .arg("-inf")
                    .arg(now - 86_400.0),
            )
            .await?;
        Ok(())
    }

    async fn remove_heartbeat(&self) -> Result<(), CoordError> {
        let _: i64 = self
            .script(
                "heartbeat delete",
                DELETE_OWN_HEARTBEAT,
                &self.heartbeat_key(&self.instance_id),
                &[&self.token],
            )
            .await?;
        let _: () = self
            .call(
                "heartbeat index",
                redis::cmd("ZREM")
                    .arg(self.key("runner:instances"))
                    .arg(&self.instance_id),
            )
            .await?;
        Ok(())
    }

    async fn live_instances(&self) -> Result<usize, CoordError> {
        let now = Utc::now().timestamp_millis() as f64 / 1000.0;
        let since = now - self.timing.heartbeat_ttl.as_secs_f64();
        let n: usize = self
            .call(
                "live instances",
                redis::cmd("ZCOUNT")
                    .arg(self.key("runner:instances"))
                    .arg(since)
                    .arg("+inf"),
            )
            .await?;
        Ok(n)
    }

    async fn try_cycle_lease(&self, cycle: &CycleId, ttl: Duration) -> Result<bool, CoordError> {
        let key = self.key(&format!("runner:cycle:{cycle}"));
        self.set_nx("cycle lease", &key, &self.instance_id, ttl.as_secs())
            .await
    }

    async fn claim_symbol(
        &self,
        cycle: &CycleId,
        symbol: &str,
        ttl: Duration,
    ) -> Result<bool, CoordError> {
        let key = self.key(&format!("signal:claim:{cycle}:{symbol}"));
        self.set_nx("symbol claim", &key, &self.instance_id, ttl.as_secs())
            .await
    }

    async fn kill_switch(&self) -> Result<Option<KillSwitch>, CoordError> {
        let key = self.key("autonomous:kill_switch");
        let raw: Option<String> = self
            .call("kill switch read", redis::cmd("GET").arg(&key))
            .await?;
        match raw {
            None => Ok(None),
            Some(raw) => match parse_kill_switch(&key, &raw) {
                Ok(ks) => Ok(Some(ks).filter(|k| k.active)),
                Err(e) => {
                    // Fail closed: someone wrote to the kill switch, and stopping is the safe
                    // reading of a record we cannot parse.
                    tracing::error!(error = %e, "unreadable kill switch treated as active");
                    Ok(Some(KillSwitch {
                        active: true,
                        reason: e.to_string(),
                        activated_by: "unknown (malformed record)".into(),
                        activated_at: None,
                    }))
                }
            },
        }
    }

    async fn set_kill_switch(&self, ks: &KillSwitch) -> Result<(), CoordError> {
        let key = self.key("autonomous:kill_switch");
        if ks.active {
            let body = serde_json::to_string(ks).map_err(|e| CoordError::Malformed {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let _: () = self
                .call("kill switch write", redis::cmd("SET").arg(&key).arg(body))
                .await?;
        } else {
            let _: () = self
                .call("kill switch clear", redis::cmd("DEL").arg(&key))
                .await?;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), CoordError> {
        let _: String = self.call("ping", &redis::cmd("PING")).await?;
        Ok(())
    }

    fn remembers(&self) -> bool {
        true
    }

    async fn load_memo(&self) -> Result<Option<String>, CoordError> {
        self.call(
            "gate memo read",
            redis::cmd("GET").arg(self.key("runner:gates")),
        )
        .await
    }

    async fn save_memo(&self, memo: &str, ttl: Duration) -> Result<(), CoordError> {
        let _: () = self
            .call(
                "gate memo write",
                redis::cmd("SET")
                    .arg(self.key("runner:gates"))
                    .arg(memo)
                    .arg("EX")
                    .arg(ttl.as_secs().max(1)),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_switch_records() {
        let k = "autonomous:kill_switch";
        let ks = parse_kill_switch(k, r#"{"active":true,"reason":"r","activated_by":"ops","activated_at":"2026-11-28T10:00:00Z"}"#).expect("ok");
        assert!(ks.active && ks.reason == "r");
        assert!(parse_kill_switch(k, "true").expect("ok").active);
        assert!(!parse_kill_switch(k, "0").expect("ok").active);
        let e = parse_kill_switch(k, "yes please").expect_err("bad");
        assert!(e.to_string().contains("autonomous:kill_switch"), "{e}");
        assert!(parse_kill_switch(k, r#"{"active":"maybe"}"#).is_err());
    }
}
