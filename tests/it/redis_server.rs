//! A real `redis-server` on a free port, in its own directory, that a test can stop and
//! restart (append-only file on, so data survives a restart like a production Redis).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

use autonomous_runner::testing::{eventually, free_port};

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        s.spawn().await;
        s
    }

    /// The server's process id while it runs (for a benchmark's CPU accounting).
    #[allow(dead_code)] // the fan-out benchmark's, which shares this file
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.dir().to_str().expect("utf8"),
                "--logfile",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        // Ready when it answers PING (an append-only file may take a moment to load).
        let client = redis::Client::open(self.url()).expect("url");
        eventually(
            format!("redis-server on port {} to answer PING", self.port),
            Duration::from_secs(30),
            || async {
                let mut c = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }

    /// Kills the server (connections drop at once).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }

    /// Every entry of a stream, as (id, parsed envelope).
    pub async fn stream(&self, key: &str) -> Vec<(String, serde_json::Value)> {
        let mut c = self.conn().await;
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .expect("XRANGE");
        let mut out = vec![];
        if let redis::Value::Array(entries) = v {
            for e in entries {
                if let redis::Value::Array(parts) = e {
                    let id: String = redis::from_redis_value(parts[0].clone()).expect("id");
                    let fields: Vec<String> =
                        redis::from_redis_value(parts[1].clone()).expect("fields");
                    assert_eq!(fields.len(), 2, "one field per entry");
                    assert_eq!(fields[0], "message");
                    out.push((id, serde_json::from_str(&fields[1]).expect("envelope JSON")));
                }
            }
        }
        out
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut k: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("KEYS");
        k.sort();
        k
    }

    /// Waits until at least `n` keys match `pattern` (locks being taken, say); panics after
    /// `timeout`.
    pub async fn wait_keys(&self, pattern: &str, n: usize, timeout: std::time::Duration) {
        eventually(format!("{n} keys matching {pattern}"), timeout, || async {
            match self.keys(pattern).await {
                k if k.len() >= n => Ok(()),
                k => Err(format!("{k:?}")),
            }
        })
        .await
    }

    /// Waits (up to `timeout`) until no key matches `pattern`.
    pub async fn wait_no_keys(&self, pattern: &str, timeout: std::time::Duration) {
        eventually(format!("no keys matching {pattern}"), timeout, || async {
            match self.keys(pattern).await {
                k if k.is_empty() => Ok(()),
                k => Err(format!("{k:?}")),
            }
        })
        .await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
