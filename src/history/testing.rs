//! A real PostgreSQL server of a test's (or a benchmark's) own: Debian's `postgresql`
//! binaries, `initdb` into a temp dir, started on a free port with its socket in that dir,
//! stoppable and restartable. The server that may be running on the machine is never used.
//! Tests and the `test-support` feature only.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A PostgreSQL server in a temp dir.
pub struct PostgresServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
}

use crate::testing::free_port;

/// The newest installed PostgreSQL's `bin` directory.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL must be installed (scripts/test installs Debian's postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// `initdb` and `postgres` refuse to run as root; as root they run as `postgres`.
fn command(bin: &std::path::Path, prog: &str) -> Command {
    let path = bin.join(prog);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PostgresServer {
    /// `initdb` and start; waits until it answers queries.
    pub async fn start() -> PostgresServer {
        let dir = tempfile::tempdir().expect("tempdir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown the data dir to postgres");
        }
        let bin = bin_dir();
        let data = dir.path().join("data");
        let out = command(&bin, "initdb")
            .args(["-D", data.to_str().expect("utf8")])
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = PostgresServer {
            port: free_port(),
            dir,
            bin,
            child: None,
        };
        s.spawn().await;
        s
    }

    /// `postgres://postgres@127.0.0.1:port/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let child = command(&self.bin, "postgres")
            .args(["-D", data.to_str().expect("utf8")])
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        let url = self.url();
        // Accepting connections is not yet accepting queries; ask until it answers.
        crate::testing::eventually(
            format!("postgres on port {} to answer a query", self.port),
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await
                        .map_err(|e| e.to_string())?;
                    let r = sqlx::query("SELECT 1").execute(&pool).await;
                    pool.close().await;
                    r.map(|_| ()).map_err(|e| e.to_string())
                }
            },
        )
        .await;
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            // SIGINT is PostgreSQL's fast shutdown; the child may be runuser, so signal the
            // postmaster through its pid file.
            let pidfile = self.dir.path().join("data/postmaster.pid");
            let pm = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.lines().next().map(str::to_string))
                .unwrap_or(pid);
            let _ = Command::new("kill").args(["-INT", &pm]).status();
            // runuser (or postgres itself) exits after the postmaster has removed its pid file.
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
