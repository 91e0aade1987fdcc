//! The `autonomous-runner` binary: parse the command line, load configuration, initialise
//! logging, then hand over to [`autonomous_runner::App`].

use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use autonomous_runner::App;
use autonomous_runner::config::{Config, ConfigError, ProcessEnv};
use autonomous_runner::runner::OnceOutcome;
use clap::{Parser, Subcommand};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: glibc's malloc keeps what a connection flood
/// made it take (an arena per thread, trimmed only at the top of the heap) — 25 MiB became
/// 61 MiB for good after 30 floods of 2,000 connections — where mimalloc gives freed pages
/// back to the OS (benchmark e, floods, in docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often at most a worker thread going idle asks the allocator to take back what other
/// threads freed into its pages.
const COLLECT_EVERY: Duration = Duration::from_secs(10);

/// Called by each worker thread of the runtime as it goes idle: at most every
/// [`COLLECT_EVERY`], has mimalloc collect the thread's own heap. A connection's task is
/// allocated by the worker that accepted it and freed by whichever worker ran it last; such a
/// free only queues the block on its page, and the page goes back to the OS once its owner
/// collects it — which mimalloc does when that thread next allocates objects of the same size,
/// i.e. never, for the ~1 KiB tasks of a flood of connections that has ended. Without this, a
/// runner that held 2,000 idle connections kept 2.2–3.2 MiB of them for good; with it, it is
/// within 0.1–1.3 MiB of its unflooded twin a minute later, 0.1–0.4 in four runs of five
/// (benchmark g′ in docs/BENCHMARKS.md). Collecting
/// walks only the calling thread's pages; once per 10 s of a thread that parks, it did not
/// show in the replicas' CPU under 10,000 dashboard streams (benchmark d′).
fn collect_freed_memory() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    LAST.with(|last| {
        if last
            .get()
            .is_some_and(|at| now.duration_since(at) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: `mi_collect` has no preconditions: it walks the calling thread's own heap and
        // returns pages that hold no live block; no pointer crosses the call.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(true)
        };
    });
}

/// Exit code for bad configuration.
const EXIT_CONFIG: u8 = 2;
/// Exit code when a `once` run could not run its cycle.
const EXIT_NOT_RUN: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "autonomous-runner",
    version,
    about = "Runs the Signal → Score → Advise → Report pipeline for every symbol on a cron schedule."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Service mode: scheduler + HTTP server until SIGTERM/SIGINT.
    Run(ConfigArg),
    /// One cycle now, then exit (Kubernetes CronJob mode).
    Once(ConfigArg),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig(ConfigArg),
    /// Run every tick of the schedule in [--from, --to) on a virtual clock through the live
    /// pipeline and grading, into a history of its own, and print the scorecard.
    Replay(ReplayArgs),
    /// Ask a running instance to shut down gracefully (`POST /shutdown`; for a Kubernetes
    /// preStop hook, which runs inside the pod and so reaches it over loopback). Sends
    /// `ADMIN_TOKEN` as a bearer token when set.
    Shutdown {
        /// Base URL of the instance.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// YAML configuration file; without it the embedded defaults are used.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP port (overrides `http.port` and `PORT`; 0 picks a free one).
    #[arg(long, short = 'p', value_name = "PORT")]
    port: Option<u16>,
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// First tick at or after this (RFC 3339, e.g. 2026-11-28T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    from: chrono::DateTime<chrono::Utc>,
    /// Ticks before this (RFC 3339).
    #[arg(long, value_name = "TIME")]
    to: chrono::DateTime<chrono::Utc>,
    /// YAML configuration file; without it the embedded defaults are used.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Only these symbols (comma-separated), instead of the configuration's.
    #[arg(long, value_delimiter = ',', value_name = "SYMBOLS")]
    symbols: Option<Vec<String>>,
    /// Candles from a file instead of `market_data.source`: a CSV
    /// (`time,symbol,open,high,low,close,volume`), a freqtrade `PAIR-1m.json`, or a directory
    /// of them. Without `--symbols`, the file's symbols are replayed.
    #[arg(long, value_name = "PATH")]
    candles: Option<PathBuf>,
    /// Where the replay's history (history.sqlite) is written; must not hold one yet.
    #[arg(long, value_name = "DIR", default_value = "replay")]
    out: PathBuf,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Replay two configurations over the same ticks and market data (the first one's) and
    /// print their scorecards side by side with the difference; their histories go to
    /// `OUT/a` and `OUT/b`.
    #[arg(long, num_args = 2, value_names = ["A.yaml", "B.yaml"], conflicts_with = "config")]
    compare: Option<Vec<PathBuf>>,
    /// LLM stages: at most this many turns sent to a model (the cache's answers are free);
    /// when they are spent the replay stops after that tick and says so.
    #[arg(long, value_name = "N")]
    max_calls: Option<u64>,
    /// LLM stages: the response cache file (default: `$XDG_CACHE_HOME` or `~/.cache`, then
    /// `autonomous-runner/llm-responses.sqlite`).
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
}

/// Where the response cache lives unless `--cache` says: the user's cache directory, so every
/// replay of any `--out` shares it.
fn default_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("autonomous-runner").join("llm-responses.sqlite")
}

/// The multi-threaded runtime, or the exit code that says it could not start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(collect_freed_memory)
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// One configuration of a replay: loaded, with `--symbols` and the file's symbols applied.
fn replay_config(
    a: &ReplayArgs,
    config: Option<PathBuf>,
    file_symbols: Option<Vec<String>>,
) -> Result<Config, ExitCode> {
    let mut cfg = load(&ConfigArg { config, port: None })?;
    if let Some(symbols) = &a.symbols {
        if let Some(bad) = symbols
            .iter()
            .find(|s| !autonomous_runner::config::is_valid_symbol(s))
        {
            eprintln!("--symbols: {bad:?} is not BASE/QUOTE");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
        cfg.symbols = symbols.clone();
    } else if let Some(symbols) = file_symbols {
        cfg.symbols = symbols;
    }
    Ok(cfg)
}

/// `replay`: exit 0 with the report on stdout; 2 for bad arguments or configuration.
fn replay(a: &ReplayArgs) -> ExitCode {
    match replay_inner(a) {
        Ok(code) | Err(code) => code,
    }
}

fn replay_inner(a: &ReplayArgs) -> Result<ExitCode, ExitCode> {
    use autonomous_runner::replay::{self as rp, ReplayError, ReplayOptions};
    use std::io::IsTerminal;
    let configs: Vec<Option<PathBuf>> = match &a.compare {
        Some(files) => files.iter().cloned().map(Some).collect(),
        None => vec![a.config.clone()],
    };
    let file = match &a.candles {
        Some(path) => match autonomous_runner::market::file::FileCandles::load(path) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                eprintln!("--candles {e}");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
        None => None,
    };
    let file_symbols = file.as_ref().map(|f| f.symbols());
    let cfgs = configs
        .iter()
        .map(|c| replay_config(a, c.clone(), file_symbols.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    // One market for every configuration: a comparison is over the same candles.
    let market: Arc<dyn autonomous_runner::market::MarketSource> = match file {
        Some(f) => f,
        None => autonomous_runner::market_source(&cfgs[0]).map_err(|e| {
            eprintln!("{e:#}");
            ExitCode::from(EXIT_CONFIG)
        })?,
    };
    let rt = runtime()?;
    let terminal = std::io::stderr().is_terminal();
    let mut reports = vec![];
    for (i, cfg) in cfgs.iter().enumerate() {
        let out = match &a.compare {
            Some(_) => a.out.join(["a", "b"][i]),
            None => a.out.clone(),
        };
        let opts = ReplayOptions {
            from: a.from,
            to: a.to,
            history: rp::history_in(&out),
            cache: Some(a.cache.clone().unwrap_or_else(default_cache)),
            max_calls: a.max_calls,
        };
        let label = match &a.compare {
            Some(files) => format!("replay {}", files[i].display()),
            None => "replay".to_string(),
        };
        let result = rt.block_on(rp::run(cfg, market.clone(), &opts, |done, total| {
            // A progress line on a terminal only: a pipe or a log gets the report alone.
            if terminal && (done % 10 == 0 || done == total) {
                eprint!("\r{label}: {done}/{total} ticks");
                if done == total {
                    eprintln!();
                }
            }
        }));
        match result {
            Ok(report) => reports.push(report),
            Err(e @ ReplayError::Invalid(_)) => {
                eprintln!("{e}");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
            Err(e) => {
                eprintln!("{e}");
                return Err(ExitCode::FAILURE);
            }
        }
    }
    let text = match (&a.compare, a.json) {
        (Some(files), json) => {
            let mut it = reports.into_iter();
            let (Some(ra), Some(rb)) = (it.next(), it.next()) else {
                return Err(ExitCode::FAILURE);
            };
            let c = rp::Comparison::of(
                (files[0].display().to_string(), ra),
                (files[1].display().to_string(), rb),
            );
            if json {
                serde_json::to_string_pretty(&c).map(|t| t + "\n")
            } else {
                Ok(c.table())
            }
        }
        (None, true) => serde_json::to_string_pretty(&reports[0]).map(|t| t + "\n"),
        (None, false) => Ok(rp::table(&reports[0])),
    };
    match text {
        Ok(t) => {
            print!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("cannot write the report: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Prints a configuration error (each issue on a line of its own); the exit code for it.
fn config_failed(e: &ConfigError) -> ExitCode {
    match e {
        ConfigError::Invalid(issues) => {
            for i in issues {
                eprintln!("{i}");
            }
        }
        other => eprintln!("{other}"),
    }
    ExitCode::from(EXIT_CONFIG)
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    let mut cfg =
        Config::load(arg.config.as_deref(), &ProcessEnv).map_err(|e| config_failed(&e))?;
    if let Some(port) = arg.port {
        cfg.http.port = port;
    }
    Ok(cfg)
}

/// Cancels the token on the first SIGTERM, SIGINT or SIGQUIT (a graceful shutdown, each the
/// same). SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored: their default action would kill
/// the process on the spot — no graceful shutdown, the heartbeat and the instance claim left
/// behind (a restart with the same instance id refused for a while), locks left to expire —
/// and nothing here is meant to be reloaded or dumped by a signal. The handlers are installed
/// before this returns, so no signal arriving during start-up takes the default action.
fn on_signals(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let kinds = [
            ("SIGTERM", SignalKind::terminate(), true),
            ("SIGINT", SignalKind::interrupt(), true),
            ("SIGQUIT", SignalKind::quit(), true),
            ("SIGHUP", SignalKind::hangup(), false),
            ("SIGUSR1", SignalKind::user_defined1(), false),
            ("SIGUSR2", SignalKind::user_defined2(), false),
        ];
        for (name, kind, stops) in kinds {
            let mut stream = match signal(kind) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(signal = name, error = %e, "cannot install a signal handler");
                    continue;
                }
            };
            let token = token.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if stops {
                        tracing::info!(signal = name, "{name} received: shutting down gracefully");
                        token.cancel();
                        return;
                    }
                    tracing::warn!(
                        signal = name,
                        "{name} received and ignored: nothing is reloaded by a signal (restart to apply a new configuration)"
                    );
                }
            });
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
}

/// `POST {url}/shutdown`; exit 0 when accepted.
fn request_shutdown(url: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let mut req = reqwest::Client::new()
            .post(format!("{}/shutdown", url.trim_end_matches('/')))
            .timeout(std::time::Duration::from_secs(5));
        if let Ok(token) = std::env::var("ADMIN_TOKEN")
            && !token.is_empty()
        {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                eprintln!("shutdown requested");
                ExitCode::SUCCESS
            }
            Ok(r) => {
                eprintln!("shutdown refused: HTTP {}", r.status().as_u16());
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("cannot reach the runner: {}", e.without_url());
                ExitCode::FAILURE
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A replay prints its report; its per-tick logs would bury it, so it logs warnings only
    // unless LOG_LEVEL says otherwise.
    let default_level = matches!(cli.command, Command::Replay(_)).then_some("warn");
    let log = autonomous_runner::telemetry::init_tracing(
        std::env::var("LOG_LEVEL").ok().as_deref().or(default_level),
        std::env::var("LOG_FORMAT").ok().as_deref(),
    );
    let _log_guard = match log {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let arg = match &cli.command {
        Command::Run(a) | Command::Once(a) | Command::CheckConfig(a) => a,
        Command::Shutdown { url } => return request_shutdown(url),
        Command::Replay(a) => return replay(a),
    };
    let cfg = match load(arg) {
        Ok(c) => c,
        Err(code) => return code,
    };
    autonomous_runner::telemetry::redact_secrets(cfg.secrets());
    if let Command::CheckConfig(_) = cli.command {
        print!("{}", cfg.to_redacted_yaml());
        eprintln!("configuration OK");
        return ExitCode::SUCCESS;
    }
    // What only the filesystem can say, found now rather than at the moment it is needed.
    if let Err(e) = cfg.check_writable_paths() {
        return config_failed(&e);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        on_signals(shutdown.clone());
        let app = match App::build(cfg).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match cli.command {
            Command::Run(_) => match app.run_until_stopped(shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "runner failed");
                    ExitCode::FAILURE
                }
            },
            Command::Once(_) => match app.run_once(shutdown).await {
                Ok(OnceOutcome::Ran(s)) => {
                    tracing::info!(cycle_id = %s.cycle_id, ok = s.symbols_ok, failed = s.symbols_failed, "once: cycle ran");
                    ExitCode::SUCCESS
                }
                Ok(OnceOutcome::Skipped(r)) if r.is_benign() => {
                    tracing::info!(reason = r.as_str(), "once: nothing to do");
                    ExitCode::SUCCESS
                }
                Ok(OnceOutcome::Skipped(r)) => {
                    tracing::error!(reason = r.as_str(), "once: the cycle could not run");
                    ExitCode::from(EXIT_NOT_RUN)
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "once failed");
                    ExitCode::FAILURE
                }
            },
            Command::CheckConfig(_) | Command::Shutdown { .. } | Command::Replay(_) => {
                ExitCode::SUCCESS
            }
        }
    })
}
