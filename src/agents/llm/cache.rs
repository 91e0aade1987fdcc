//! The response cache layer, for replays: a model's reply to one turn kept under a key made
//! of everything the turn sends (backend, model, system and user prompt, the conversation so
//! far, the tools offered, the schema, the JSON mode, `max_tokens`), so replaying the same
//! ticks with the same configuration asks the model nothing and costs nothing.
//!
//! It sits above the retry layer: a cached reply needs no rate-limit slot, no budget and no
//! breaker, and a rerun of a day's replay is as fast as one of the rules agents. A miss goes
//! down the stack like any live turn and, once something came back that the model said (an
//! answer, accepted or not, or a request for tools), is stored. A failure (timeout, 5xx) is
//! not: the next run asks again.
//!
//! `--max-calls` bounds the misses, the turns that reach the model (each counted once, however
//! many attempts its retries took). Past it a turn fails as `budget_exhausted`, which the
//! rules fallback stands in for when it is on; the replay stops after that tick and says so.
//!
//! Bad rows (a file edited by hand, another version's format) are read as misses with a
//! warning naming the key; they are overwritten by the next answer.

use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{LlmAgent, LlmReply, LlmRequest, Read, Step, ToolCall, Usage};
use crate::agents::{AgentError, CallLimits};

/// The layout of a key's material; a change of it makes every old row a miss, never a wrong
/// hit.
const KEY_VERSION: u32 = 1;

/// Why the cache cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("response cache {path}: {source}")]
pub struct CacheError {
    path: String,
    #[source]
    source: sqlx::Error,
}

/// What a cache did over a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Turns answered from the cache.
    pub hits: u64,
    /// Turns sent to the model (misses within `--max-calls`).
    pub calls: u64,
    /// Turns refused because `--max-calls` was reached.
    pub refused: u64,
}

/// Replies by key, in an SQLite file, with the bound on the turns sent to a model.
#[derive(Debug)]
pub struct ResponseCache {
    pool: SqlitePool,
    max_calls: Option<u64>,
    hits: AtomicU64,
    calls: AtomicU64,
    refused: AtomicU64,
}

impl ResponseCache {
    /// Opens (creating it when missing) the cache file at `path`; `max_calls` bounds the
    /// turns sent to a model through it (`None`: no bound).
    pub async fn open(path: &Path, max_calls: Option<u64>) -> Result<Self, CacheError> {
        let err = |source| CacheError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS llm_responses (
                 key        TEXT PRIMARY KEY,  -- sha256 of the turn's material, hex
                 backend    TEXT NOT NULL,
                 model      TEXT NOT NULL,
                 stage      TEXT NOT NULL,
                 reply      TEXT NOT NULL,     -- {json, tool_calls, assistant}
                 created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
             )",
        )
        .execute(&pool)
        .await
        .map_err(err)?;
        Ok(Self {
            pool,
            max_calls,
            hits: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// What the cache did so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// The key of a turn: every part of the request that can change the model's reply.
    pub fn key(backend: &str, req: &LlmRequest<'_>) -> String {
        let material = json!({
            "v": KEY_VERSION,
            "backend": backend,
            "model": req.model,
            "system": req.system,
            "user": req.user,
            "conversation": req.conversation,
            "tools": req.tools,
            "schema_name": req.schema_name,
            "schema": req.schema,
            "structured": format!("{:?}", req.structured),
            "max_tokens": req.max_tokens,
        });
        hex::encode(Sha256::digest(material.to_string().as_bytes()))
    }

    /// The stored reply of `key`; a row that cannot be read is a miss.
    async fn get(&self, key: &str) -> Option<LlmReply> {
        let row: Option<(String,)> = match sqlx::query_as(
            "SELECT reply FROM llm_responses WHERE key = ?",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key, error = %e, "response cache not readable; asking the model");
                return None;
            }
        };
        let text = row?.0;
        match reply_from(&text) {
            Ok(reply) => Some(reply),
            Err(why) => {
                tracing::warn!(
                    key,
                    why,
                    "response cache row not readable; asking the model"
                );
                None
            }
        }
    }

    /// Keeps `reply` under `key` (a failure to write costs a rerun a request, nothing more).
    async fn put(&self, key: &str, backend: &str, req: &LlmRequest<'_>, reply: &LlmReply) {
        let calls: Vec<Value> = reply
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
            .collect();
        let text = json!({
            "json": reply.json,
            "tool_calls": calls,
            "assistant": reply.assistant,
        })
        .to_string();
        if let Err(e) = sqlx::query(
            "INSERT INTO llm_responses (key, backend, model, stage, reply) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (key) DO UPDATE SET reply = excluded.reply",
        )
        .bind(key)
        .bind(backend)
        .bind(req.model)
        .bind(req.stage.as_str())
        .bind(text)
        .execute(&self.pool)
        .await
        {
            tracing::warn!(key, error = %e, "response cache not written");
        }
    }

    /// Takes one of the `--max-calls` turns; `false` once they are spent.
    fn take_call(&self) -> bool {
        let taken = self
            .calls
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                self.max_calls.is_none_or(|max| n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }
}

/// A stored reply, read strictly: every field where it belongs, or the reason it is not.
fn reply_from(text: &str) -> Result<LlmReply, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let calls = v
        .get("tool_calls")
        .and_then(Value::as_array)
        .ok_or("no tool_calls array")?;
    let tool_calls = calls
        .iter()
        .map(|c| {
            let field = |k: &str| {
                c.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or(format!("a tool call without a string {k}"))
            };
            Ok(ToolCall {
                id: field("id")?,
                name: field("name")?,
                arguments: field("arguments")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(LlmReply {
        json: v.get("json").cloned().ok_or("no json")?,
        // Nothing was spent on a reply from the cache.
        usage: Usage::default(),
        tool_calls,
        assistant: v.get("assistant").cloned().unwrap_or(Value::Null),
    })
}

impl LlmAgent {
    /// One turn, from the cache when it holds the reply, else down the stack (and kept).
    /// Without a cache (the live service) this is the retry layer itself.
    pub(super) async fn remembered<T>(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<Step<T>, AgentError> {
        let Some(cache) = &self.shared.cache else {
            return self.retrying(req, limits, read).await;
        };
        let backend = self.transport.backend();
        let key = ResponseCache::key(backend, req);
        if let Some(reply) = cache.get(&key).await {
            cache.hits.fetch_add(1, Ordering::Relaxed);
            return self.read_reply(req, &reply, read);
        }
        if !cache.take_call() {
            return Err(AgentError::BudgetExhausted("replay --max-calls reached"));
        }
        // The model's answer as it was read (accepted or not): what a rerun must read again.
        let answered: Mutex<Option<Value>> = Mutex::new(None);
        let capture = |v: &Value| {
            *answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.clone());
            read(v)
        };
        let r = self.retrying(req, limits, &capture).await;
        let said = || {
            answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(|v| LlmReply::answer(v, Usage::default()))
        };
        let reply = match &r {
            Ok(Step::Tools(reply)) => Some(reply.clone()),
            Ok(Step::Answer(_)) | Err(AgentError::InvalidOutput(_)) => said(),
            Err(_) => None,
        };
        if let Some(reply) = reply {
            cache.put(&key, backend, req, &reply).await;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_reply_reads_back_and_a_bad_one_says_why() {
        let ok = r#"{"json":{"action":"BUY"},"tool_calls":[{"id":"c1","name":"get_market","arguments":"{}"}],"assistant":{"role":"assistant"}}"#;
        let reply = reply_from(ok).unwrap();
        assert_eq!(reply.json, json!({"action": "BUY"}));
        assert_eq!(reply.tool_calls[0].name, "get_market");
        assert_eq!(reply.usage, Usage::default());
        assert_eq!(
            reply_from(r#"{"json":1,"tool_calls":[{"id":"c1","name":7,"arguments":"{}"}]}"#)
                .err()
                .as_deref(),
            Some("a tool call without a string name")
        );
        assert_eq!(
            reply_from(r#"{"json":1}"#).err().as_deref(),
            Some("no tool_calls array")
        );
        assert!(reply_from("{").unwrap_err().starts_with("not JSON"));
    }

    #[test]
    fn max_calls_bounds_the_turns_sent_and_counts_the_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = rt
            .block_on(ResponseCache::open(&dir.path().join("c.sqlite"), Some(2)))
            .unwrap();
        let taken: Vec<bool> = (0..4).map(|_| cache.take_call()).collect();
        assert_eq!(taken, [true, true, false, false]);
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 0,
                calls: 2,
                refused: 2
            }
        );
    }
}
