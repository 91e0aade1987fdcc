//! autonomous-runner: runs the Signal → Score → Advise → Report agent pipeline for every
//! active symbol on a cron schedule and publishes the results.
//!
//! Layout, top layer first; a module imports only from its own layer or below (the
//! `layering` test checks it; `docs/ARCHITECTURE.md` has the data flow):
//!
//! | layer | module | owns |
//! |---|---|---|
//! | 4 | [`http`] | health, metrics, JSON API, SSE ([`http::sse`]), MCP ([`http::mcp`]), dashboard, admin |
//! | 3 | [`runner`] | the tick loop, gates, cycle lease, overlap/missed-tick policy, shutdown |
//! | 3 | [`replay`] | the schedule over a past window on a virtual clock, graded: the scorecard before going live |
//! | 2 | [`coordinator`] | one cycle: the bounded pool, deadlines, locks, results |
//! | 2 | [`pipeline`] | the scorer, one symbol through every stage |
//! | 2 | [`tools`] | the agents' read-only tools (market data, strategies, past decisions) |
//! | 1 | [`agents`] | the agent trait and its backends |
//! | 1 | [`publish`] | the in-process bus, latest signals, cycle history, the Redis sink |
//! | 1 | [`coordination`] | locks, heartbeat, lease, kill switch (memory and Redis backends) |
//! | 1 | [`market`] | candle sources |
//! | 0 | [`model`] | the shared data types: stages, payloads, envelope, ids |
//! | 0 | [`resilience`] | breaker, per-call latency and the gate, hedging, backpressure, rate limiter, retry |
//! | 0 | [`schedule`] | cron → ticks, the tick's identity [`schedule::CycleId`], the clock |
//! | 0 | [`config`] | typed config, YAML + `${VAR:-default}`, env overrides, validation |
//! | 0 | [`telemetry`] | logging (non-blocking, redacting) and metric names |
//!
//! [`App`] wires them: `App::build(cfg).await?.run_until_stopped(shutdown)`.

// The library has no unsafe code; the one call the binary needs (the allocator's collection,
// `src/main.rs`) is allowed there alone.
#![forbid(unsafe_code)]

pub mod agents;
pub mod config;
pub mod coordination;
pub mod coordinator;
pub mod history;
pub mod http;
pub mod market;
pub mod model;
pub mod pipeline;
pub mod publish;
pub mod replay;
pub mod resilience;
pub mod runner;
pub mod schedule;
pub mod strategy;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tools;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, CoordinationBackend, MarketSource as MarketKind, secs};
use crate::coordination::memory::{MemoryCoordination, MemoryStore};
use crate::coordination::redis::{RedisCoordination, RedisRateLimiter};
use crate::coordination::{Coordination, LockTiming};
use crate::coordinator::Coordinator;
use crate::history::HistoryStore;
use crate::history::calibration::Calibrator;
use crate::history::grading::Grader;
use crate::history::writer::HistoryWriter;
use crate::market::MarketSource;
use crate::pipeline::PipelineContext;
use crate::publish::Publisher;
use crate::publish::hub::Hub;
use crate::publish::redis::RedisSink;
use crate::resilience::rate_limit::AgentRateLimiter;
use crate::resilience::{Breaker, BreakerKind};
use crate::runner::{OnceOutcome, Runner};
use crate::schedule::Clock;
use crate::telemetry::names;

/// The assembled service.
pub struct App {
    cfg: Arc<Config>,
    runner: Runner,
    coord: Arc<dyn Coordination>,
    publisher: Arc<Publisher>,
    sink: Option<Arc<RedisSink>>,
    /// With Redis: a client for out-of-band health checks, and the breaker they speed up.
    redis_watch: Option<(redis::Client, Breaker)>,
    transports: Vec<Arc<dyn agents::llm::Transport>>,
    listener: TcpListener,
    http_state: http::AppState,
    /// With the history on: the grader, ready to run.
    grader: Option<history::grading::Grader>,
    clock: Clock,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("instance_id", &self.cfg.instance_id)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds every part from validated configuration and binds the HTTP listener: one
    /// builder per concern, each short (Redis, coordination, agents, the cycle, HTTP).
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        Self::build_with_clock(cfg, Clock::System).await
    }

    /// [`build`](Self::build) with the scheduler on `clock`: the in-process test harness
    /// anchors wall time so its cycle ids are known in advance.
    pub async fn build_with_clock(cfg: Config, clock: Clock) -> anyhow::Result<App> {
        let cfg = Arc::new(cfg);
        let metrics = telemetry::metrics_handle();
        let timing = lock_timing(&cfg);
        let redis = RedisParts::for_config(&cfg)?;
        let hub = dashboard_hub(&cfg, redis.as_ref());
        // One path for status events: every breaker transition (LLM and Redis alike) sets
        // its gauge and goes to the SSE stream through the hub.
        let on_breaker = status_hook(hub.clone());
        let redis_breaker = redis.as_ref().map(|_| {
            let hook = on_breaker.clone();
            Breaker::new(BreakerKind::Redis, cfg.circuit_breaker.redis.settings())
                .with_transition_hook(move |name, state| hook(name, state))
        });
        let (coord, sink, limiter) =
            build_coordination(&cfg, timing, redis.as_ref(), redis_breaker.as_ref()).await?;
        let runner_state = Arc::new(std::sync::OnceLock::new());
        let history = build_history(&cfg, runner_state.clone()).await?;
        let publisher = Arc::new(
            Publisher::new(
                hub,
                cfg.publish.history_cycles,
                sink.clone().map(|s| s as Arc<dyn publish::Sink>),
            )
            .with_history(history.clone()),
        );
        let latencies = resilience::CallLatencies::new(
            cfg.adaptive.latency_window_size,
            Duration::from_secs(cfg.adaptive.latency_max_age_seconds),
        );
        let market = build_market(&cfg)?;
        // The agents' tools: served at /mcp, and run in process for `agents.tools: mcp`.
        let tools = Arc::new(
            tools::Toolbox::new(
                market.clone(),
                history.as_ref().map(|w| w.store().clone()),
                Arc::new(strategy::StrategySet::new(cfg.strategies.clone())),
                &cfg.symbols,
                clock.clone(),
            )
            .with_horizons(&cfg.history.grading.horizons_minutes),
        );
        let setup = agents::setup::build(
            &cfg,
            limiter.clone(),
            on_breaker,
            latencies.clone(),
            tools.clone() as Arc<dyn agents::llm::ToolRunner>,
            None,
        )
        .context("building the agents")?;
        let breakers = all_breakers(&setup, redis_breaker.clone());
        let names: Vec<String> = breakers.iter().map(|b| b.name().to_string()).collect();
        let a = &setup.agents;
        let llm_stages: Vec<(&str, &str)> = [
            (model::Stage::Signal, &a.signal),
            (model::Stage::Advise, &a.advise),
            (model::Stage::Report, &a.report),
        ]
        .into_iter()
        .filter(|(_, agent)| agent.backend() != "rules")
        .map(|(stage, agent)| (stage.as_str(), agent.backend()))
        .collect();
        telemetry::init_series(&cfg.symbols, &names, &llm_stages);
        let gateway = build_gateway(&cfg, &setup, &limiter)?;
        // Calibration learns from the history's grades; without a history there is nothing
        // to learn from, and the signals say so.
        let calibrator = history.as_ref().map(|_| {
            let horizon = cfg.history.calibration_horizon();
            Arc::new(Calibrator::new(
                horizon,
                cfg.history.calibration.min_grades,
                cfg.history.calibration.prior_grades,
            ))
        });
        let pipeline = build_pipeline(
            &cfg,
            clock.clone(),
            market.clone(),
            &publisher,
            &setup,
            calibrator.clone(),
        );
        let runner = build_runner(&cfg, clock.clone(), pipeline, &coord, &setup, latencies)
            .context("building the scheduler")?;
        let _ = runner_state.set(runner.state());
        let listener = bind(&cfg).await?;
        let http_state = http::AppState {
            instance_id: cfg.instance_id.clone(),
            runner: runner.state(),
            publisher: publisher.clone(),
            breakers,
            llm_health: setup.health.clone(),
            budget: setup.budget.clone(),
            fallback_rules: cfg.agents.fallback == config::Fallback::Rules,
            probes: setup.probes.clone(),
            endpoint_limits: setup.concurrency.clone(),
            coord: coord.clone(),
            metrics,
            started: Instant::now(),
            admin: http::AdminAccess {
                token: cfg.http.admin_token.clone(),
                loopback: cfg.http.admin_loopback,
                allowed_hosts: cfg.http.allowed_hosts.clone(),
            },
            sse: {
                let connections = http::connection_cap(cfg.http.max_connections);
                let streams =
                    http::sse::StreamSlots::cap_for(cfg.http.max_sse_streams, connections);
                if streams < cfg.http.max_sse_streams {
                    tracing::info!(
                        configured = cfg.http.max_sse_streams,
                        streams,
                        connections,
                        "http.max_sse_streams lowered to keep a quarter of the connections for probes and the API"
                    );
                }
                http::sse::StreamSlots::new(streams, cfg.http.max_sse_streams_per_client)
            },
            shutdown_request: CancellationToken::new(),
            streams_stop: CancellationToken::new(),
            market_source: market.name(),
            market: market.clone(),
            symbols: cfg.symbols.clone().into(),
            graded_horizons: if cfg.history.enabled {
                let mut h: Vec<i64> = cfg
                    .history
                    .grading
                    .horizons_minutes
                    .iter()
                    .map(|m| i64::from(*m) * 60)
                    .collect();
                h.sort_unstable();
                h.dedup();
                h
            } else {
                vec![]
            },
            clock: clock.clone(),
            tools: Some(tools),
            gateway,
        };
        Ok(App {
            runner,
            coord,
            publisher,
            sink,
            redis_watch: redis.zip(redis_breaker).map(|(r, b)| (r.client, b)),
            transports: setup.probes.clone(),
            listener,
            http_state,
            grader: history.as_ref().map(|w| {
                let g = &cfg.history.grading;
                Grader::new(
                    w.store().clone(),
                    market,
                    &g.horizons_minutes,
                    g.threshold_pct,
                )
            }),
            clock,
            cfg,
        })
    }

    /// The HTTP server's address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts the HTTP server, the heartbeat and the outbox deliverer.
    async fn start(self, shutdown: &CancellationToken) -> (Runner, Services) {
        let App {
            cfg,
            runner,
            coord,
            publisher,
            sink,
            redis_watch,
            transports,
            listener,
            http_state,
            grader,
            clock,
        } = self;
        log_listening(&listener);
        let background = CancellationToken::new();
        let http_stop = http_state.streams_stop.clone();
        // Every background task is tracked and joined at shutdown; those that do not stop in
        // time are named in a warning.
        let tracker = tokio_util::task::TaskTracker::new();
        let mut named: Vec<(&'static str, tokio::task::JoinHandle<()>)> = vec![];
        // `POST /shutdown` stops the process like SIGTERM.
        named.push((
            "admin shutdown bridge",
            tracker.spawn(admin_shutdown_bridge(
                http_state.shutdown_request.clone(),
                shutdown.clone(),
                background.clone(),
            )),
        ));
        let upkeep_handle = http_state.metrics.clone();
        // The status before the server serves anyone: a change a client could cause or see
        // after connecting is always a change from this.
        let status = http::status_now(&http_state).await;
        named.push((
            "status watcher",
            tracker.spawn(http::watch_status(
                http_state.clone(),
                status,
                Duration::from_secs(5),
                background.clone(),
            )),
        ));
        let server = tokio::spawn(http::serve(
            listener,
            http_state,
            http_stop.clone(),
            cfg.http.max_connections,
        ));
        let conflict = Arc::new(std::sync::OnceLock::new());
        let heartbeat = spawn_heartbeat(
            coord.clone(),
            runner.state(),
            &cfg,
            Stops {
                background: background.clone(),
                shutdown: shutdown.clone(),
                conflict: conflict.clone(),
            },
        );
        named.push((
            "leftover lock release",
            tracker.spawn(release_leftovers(coord.clone(), background.clone())),
        ));
        named.push((
            "metrics upkeep",
            tracker.spawn(metrics_upkeep(upkeep_handle, background.clone())),
        ));
        let deliverer = sink
            .as_ref()
            .map(|s| tokio::spawn(s.clone().run(background.clone())));
        if let Some((client, breaker)) = redis_watch {
            named.push((
                "Redis recovery watcher",
                tracker.spawn(watch_redis_recovery(client, breaker, background.clone())),
            ));
        }
        if let Some(g) = grader {
            let task = grade_forever(g, &cfg, clock, background.clone());
            named.push(("grader", tracker.spawn(task)));
        }
        // The history writer stops last of all (after the drain has published everything) and
        // then writes what is queued, within two seconds.
        let history_stop = CancellationToken::new();
        let history_writer = publisher
            .history()
            .cloned()
            .map(|w| tokio::spawn(w.run(history_stop.clone(), Duration::from_secs(2))));
        // With Redis, SSE serves every replica's signals: follow the dashboard stream.
        let follower = tokio::spawn(publisher.hub().clone().follow_redis(background.clone()));
        tracing::info!(
            instance_id = %cfg.instance_id,
            symbols = cfg.symbols.len(),
            schedule = %cfg.schedule,
            coordination = coord.backend(),
            "runner started"
        );
        (
            runner,
            Services {
                cfg,
                coord,
                publisher,
                background,
                http_stop,
                server,
                heartbeat,
                deliverer,
                follower,
                transports,
                tracker,
                named,
                history_stop,
                history_writer,
                conflict,
            },
        )
    }

    /// Service mode: tick until `shutdown` fires, then drain, release, flush and return.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (runner, services) = self.start(&shutdown).await;
        // Readiness turns 503 the moment shutdown is requested, before the drain finishes.
        let state = runner.state();
        let shutdown_flag = shutdown.clone();
        let requested = Arc::new(std::sync::OnceLock::new());
        let requested_at = requested.clone();
        let mark = tokio::spawn(async move {
            shutdown_flag.cancelled().await;
            let _ = requested_at.set(Instant::now());
            state.set_shutting_down();
            tracing::info!("shutdown requested: no new ticks");
        });
        // `run` returns after draining the in-flight cycle (at most the grace period).
        runner.run(shutdown.clone()).await;
        mark.abort();
        let since = requested.get().copied().unwrap_or_else(Instant::now);
        let conflict = services.conflict.clone();
        services.finish(since).await;
        tracing::info!(
            took_s = since.elapsed().as_secs_f64(),
            "graceful shutdown complete"
        );
        match conflict.get() {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None => Ok(()),
        }
    }

    /// `once` mode: one cycle now, serving health probes while it runs.
    pub async fn run_once(self, shutdown: CancellationToken) -> anyhow::Result<OnceOutcome> {
        let push = (!self.cfg.metrics.pushgateway_url.is_empty()).then(|| {
            (
                self.cfg.metrics.pushgateway_url.clone(),
                self.cfg.instance_id.clone(),
                self.http_state.metrics.clone(),
            )
        });
        let (mut runner, services) = self.start(&shutdown).await;
        let outcome = runner.run_once(shutdown).await;
        services.finish(Instant::now()).await;
        if let Some((url, instance, metrics)) = push {
            telemetry::push_metrics(&url, &instance, metrics.render()).await;
        }
        Ok(outcome)
    }
}

/// The background parts of a running app.
struct Services {
    cfg: Arc<Config>,
    coord: Arc<dyn Coordination>,
    publisher: Arc<Publisher>,
    background: CancellationToken,
    http_stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    heartbeat: tokio::task::JoinHandle<()>,
    deliverer: Option<tokio::task::JoinHandle<()>>,
    follower: tokio::task::JoinHandle<()>,
    transports: Vec<Arc<dyn agents::llm::Transport>>,
    /// The other background tasks, with their names for the overrun warning.
    tracker: tokio_util::task::TaskTracker,
    named: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    /// Stops the history writer once everything is published (it then writes its queue).
    history_stop: CancellationToken,
    history_writer: Option<tokio::task::JoinHandle<()>>,
    /// Set when another process claimed our `instance_id` while we ran: why we stopped.
    conflict: Arc<std::sync::OnceLock<String>>,
}

impl Services {
    /// After the last cycle: release anything still held, delete the heartbeat, flush the
    /// outbox (spooling what cannot reach Redis), write the history, stop the HTTP server.
    ///
    /// One budget for all of it: from `since` (the shutdown request) to
    /// `graceful_shutdown.timeout_seconds` + [`SHUTDOWN_SLACK`]. The drain took what it
    /// needed of the grace period; each step here gets what is left, with a share kept back
    /// for the steps after it, so a dead dependency cannot push the exit past the promise.
    async fn finish(self, since: Instant) {
        let Services {
            cfg,
            coord,
            publisher,
            background,
            http_stop,
            server,
            heartbeat,
            deliverer,
            follower,
            transports,
            tracker,
            named,
            history_stop,
            history_writer,
            conflict: _,
        } = self;
        let deadline = since + secs(cfg.graceful_shutdown.timeout_seconds) + SHUTDOWN_SLACK;
        // What the last steps need: spool and history writes, the HTTP server's stop.
        const RESERVE: Duration = Duration::from_millis(1500);
        let left = |keep: Duration| {
            deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(keep)
        };
        background.cancel();
        // They all stop on `background`; a second is plenty, and a task still running after
        // it is a bug worth a line in the log.
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(1), tracker.wait())
            .await
            .is_err()
        {
            for (name, h) in &named {
                if !h.is_finished() {
                    tracing::warn!(
                        task = name,
                        "background task did not stop within 1 s of shutdown"
                    );
                }
            }
        }
        let _ = follower.await;
        let _ = heartbeat.await;
        if let Some(d) = deliverer {
            let _ = d.await;
        }
        let release = async {
            if let Err(e) = coord.release_leftovers().await {
                tracing::warn!(error = %e, "could not release the locks left by an outage; they will expire");
            }
            match coord.held_locks().await {
                Ok(held) => {
                    for s in held {
                        match coord.release_lock(&s).await {
                            Ok(_) => tracing::info!(symbol = %s, "released lock at shutdown"),
                            Err(e) => {
                                tracing::warn!(symbol = %s, error = %e, "could not release lock; it will expire")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not list held locks"),
            }
            match coord.remove_heartbeat().await {
                Ok(()) => tracing::info!("heartbeat deleted"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not delete the heartbeat; it will expire")
                }
            }
        };
        // Locks and the heartbeat expire by themselves: a share of the budget, not all of it.
        if tokio::time::timeout(left(RESERVE * 3).min(Duration::from_secs(3)), release)
            .await
            .is_err()
        {
            tracing::warn!("lock release at shutdown cut short; the rest will expire");
        }
        for t in &transports {
            t.drain(left(RESERVE * 2).min(Duration::from_secs(5))).await;
        }
        // Whatever cannot reach Redis by then goes to the spool.
        publisher.flush(left(RESERVE)).await;
        history_stop.cancel();
        if let Some(w) = history_writer
            && tokio::time::timeout(left(RESERVE / 3), w).await.is_err()
        {
            tracing::warn!("the history writer did not finish within the shutdown budget");
        }
        http_stop.cancel();
        match tokio::time::timeout(left(Duration::ZERO), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
            Err(_) => tracing::warn!("HTTP server did not stop within the shutdown budget"),
        }
    }
}

/// What the steps after the drain may add to `graceful_shutdown.timeout_seconds`: from the
/// shutdown request to exit is at most the grace period plus this.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// The one Redis client of the process and the connection manager made from it. Everything
/// that talks to Redis goes through this client: coordination, the rate limiter and the sink
/// share the manager (behind the Redis breaker); the dashboard-stream follower and the
/// recovery watcher open their own connections from it (a blocking XREAD must not stall the
/// shared connection; a health check must not use the connection it is checking).
struct RedisParts {
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
}

impl RedisParts {
    /// The Redis connection when coordination uses Redis; a `REDIS_URL` beside the memory
    /// backend is worth a warning (the replicas would run every tick each).
    fn for_config(cfg: &Config) -> anyhow::Result<Option<Self>> {
        match cfg.coordination.backend {
            CoordinationBackend::Memory => {
                if std::env::var_os("REDIS_URL").is_some() {
                    tracing::warn!(
                        "REDIS_URL is set but coordination.backend is memory: replicas will not coordinate"
                    );
                }
                Ok(None)
            }
            CoordinationBackend::Redis => Self::connect(cfg).map(Some),
        }
    }

    fn connect(cfg: &Config) -> anyhow::Result<Self> {
        let client = redis::Client::open(cfg.coordination.redis_url.expose())
            .map_err(|e| anyhow::anyhow!("coordination.redis_url: {:?}", e.kind()))?;
        let conn =
            coordination::redis::manager(client.clone()).context("coordination.redis_url")?;
        Ok(Self { client, conn })
    }
}

/// The grader's loop, at `history.grading.interval_seconds`, pruning what is older than
/// `history.retention_days`.
fn grade_forever(
    grader: Grader,
    cfg: &Config,
    clock: Clock,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + use<> {
    grader.run(
        clock,
        Duration::from_secs(cfg.history.grading.interval_seconds),
        Duration::from_secs(u64::from(cfg.history.retention_days) * 86_400),
        stop,
    )
}

/// Cancels `external` (the process's shutdown) when `POST /shutdown` cancels `admin`.
async fn admin_shutdown_bridge(
    admin: CancellationToken,
    external: CancellationToken,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = admin.cancelled() => external.cancel(),
        _ = external.cancelled() => {}
        _ = stop.cancelled() => {}
    }
}

/// Histogram samples wait in the recorder until folded into their buckets; without a scrape
/// they would pile up, so they are folded every five seconds whether or not anyone scrapes.
async fn metrics_upkeep(
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => metrics.run_upkeep(),
        }
    }
}

/// Every breaker: the LLM backends' and Redis's.
fn all_breakers(setup: &agents::setup::AgentSetup, redis: Option<Breaker>) -> Vec<Breaker> {
    setup.breakers.iter().cloned().chain(redis).collect()
}

/// The lock and heartbeat times of `locks.*` and `heartbeat.*`.
fn lock_timing(cfg: &Config) -> LockTiming {
    LockTiming {
        ttl: Duration::from_secs(cfg.locks.ttl_seconds),
        stale_after: Duration::from_secs(cfg.locks.stale_threshold_seconds),
        heartbeat_ttl: Duration::from_secs(cfg.heartbeat.ttl_seconds),
    }
}

/// The SSE hub; with Redis it also reads every replica's dashboard stream.
fn dashboard_hub(cfg: &Config, redis: Option<&RedisParts>) -> Arc<Hub> {
    let stream = format!(
        "{}{}",
        cfg.coordination.key_prefix,
        model::Stage::Report.stream()
    );
    // Local ids continue from the start time, so they never restart at 1 (see the hub).
    let start = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    Hub::starting_at(
        cfg.publish.replay_buffer,
        redis.map(|r| (r.client.clone(), stream)),
        start,
    )
}

/// The LLM gateway at `/llm/v1`, when OpenCode runs: its model requests come back through
/// the runner when its opencode.json points its provider there, under the same rate limit
/// and budget, with an allowance per call.
fn build_gateway(
    cfg: &Config,
    setup: &agents::setup::AgentSetup,
    limiter: &Arc<dyn AgentRateLimiter>,
) -> anyhow::Result<Option<Arc<http::gateway::Gateway>>> {
    let Some(sessions) = &setup.opencode_sessions else {
        return Ok(None);
    };
    let gateway = http::gateway::Gateway::new(
        sessions.clone(),
        limiter.clone(),
        setup.budget.clone(),
        &cfg.agents.base_url,
        cfg.agents.api_key.clone(),
        cfg.agents.max_tokens,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Some(Arc::new(gateway)))
}

/// Breaker transitions: the state gauge, and a `status` event on the SSE stream.
fn status_hook(hub: Arc<Hub>) -> resilience::TransitionHook {
    Arc::new(move |name, state| {
        metrics::gauge!(names::CIRCUIT_BREAKER_STATE, "breaker" => name.to_string())
            .set(state.gauge());
        let status = serde_json::json!({"breaker": name, "state": state.as_str()});
        hub.push_local("status", Arc::from(status.to_string()));
    })
}

/// Coordination, the sink and the agents' rate limiter: in memory, or all on Redis (where
/// replicas that share an LLM key share its rate limit). With Redis, refuses to start next to
/// a live process with the same `instance_id`.
async fn build_coordination(
    cfg: &Config,
    timing: LockTiming,
    redis: Option<&RedisParts>,
    breaker: Option<&Breaker>,
) -> anyhow::Result<(
    Arc<dyn Coordination>,
    Option<Arc<RedisSink>>,
    Arc<dyn AgentRateLimiter>,
)> {
    let (Some(redis), Some(breaker)) = (redis, breaker) else {
        return Ok((
            Arc::new(MemoryCoordination::new(
                MemoryStore::new(),
                &cfg.instance_id,
                timing,
            )),
            None,
            Arc::new(resilience::RateLimiter::new(
                cfg.agents.requests_per_minute,
                cfg.agents.burst(),
            )),
        ));
    };
    metrics::gauge!(names::CIRCUIT_BREAKER_STATE, "breaker" => "redis").set(0.0);
    let prefix = &cfg.coordination.key_prefix;
    let limiter = Arc::new(RedisRateLimiter::new(
        redis.conn.clone(),
        breaker.clone(),
        prefix,
        cfg.agents.requests_per_minute,
        cfg.agents.burst(),
        timing.heartbeat_ttl,
    ));
    let sink = RedisSink::new(
        redis.conn.clone(),
        breaker.clone(),
        prefix,
        cfg.publish.stream_max_len,
        cfg.publish.outbox_max,
    );
    if let Some(path) = cfg.spool_path() {
        sink.with_spool(path);
    }
    let rc = RedisCoordination::new(
        redis.conn.clone(),
        breaker.clone(),
        prefix,
        &cfg.instance_id,
        timing,
    )
    .with_lock_prefix(&cfg.locks.redis_key_prefix);
    // Two live processes with one instance_id would vouch for each other's locks (and a
    // graceful stop of one deleted the other's heartbeat): refuse.
    let wait = Duration::from_secs(cfg.heartbeat.interval_seconds) + Duration::from_secs(1);
    match rc.ensure_unique_identity(wait).await {
        Ok(()) => {}
        Err(e @ coordination::CoordError::DuplicateInstance { .. }) => {
            return Err(anyhow::anyhow!(e));
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot check that instance_id is unique (Redis unreachable); continuing"
        ),
    }
    Ok((Arc::new(rc), Some(sink), limiter))
}

/// What one symbol's run needs: the market, the agents, the publisher, the strategies and
/// the calibration of stated confidence.
fn build_pipeline(
    cfg: &Config,
    clock: Clock,
    market: Arc<dyn MarketSource>,
    publisher: &Arc<Publisher>,
    setup: &agents::setup::AgentSetup,
    calibrator: Option<Arc<Calibrator>>,
) -> Arc<PipelineContext> {
    Arc::new(PipelineContext {
        market,
        agents: setup.agents.clone(),
        publisher: publisher.clone(),
        candles: cfg.market_data.candles,
        clock,
        strategies: Arc::new(strategy::StrategySet::new(cfg.strategies.clone())),
        advise_min_score: cfg.pipeline.advise_min_score,
        expiry_grace: Duration::from_secs(cfg.pipeline.expiry_grace_seconds),
        calibrator,
    })
}

/// The pool and the tick loop around `pipeline`.
fn build_runner(
    cfg: &Config,
    clock: Clock,
    pipeline: Arc<PipelineContext>,
    coord: &Arc<dyn Coordination>,
    setup: &agents::setup::AgentSetup,
    latencies: resilience::CallLatencies,
) -> anyhow::Result<Runner> {
    let publisher = pipeline.publisher.clone();
    let coordinator = Arc::new(
        Coordinator::new(
            coord.clone(),
            pipeline,
            cfg.symbols.clone(),
            Duration::from_secs(cfg.locks.ttl_seconds),
            cfg.coordination.work_sharing,
            Duration::from_secs(cfg.locks.ttl_seconds),
        )
        .with_batch_delay(Duration::from_millis(cfg.parallel.batch_delay_ms))
        .sharing_as(
            &cfg.instance_id,
            Duration::from_millis(cfg.coordination.claim_spread_ms),
        ),
    );
    Ok(Runner::new(
        cfg,
        clock,
        coord.clone(),
        coordinator,
        publisher,
        setup.gate_breaker.clone(),
        latencies,
    )?
    .with_llm_health(setup.health.clone())
    .with_endpoint_limits(setup.concurrency.values().cloned().collect()))
}

/// The market data source `market_data.source` names (for a replay over it too).
pub fn market_source(cfg: &Config) -> anyhow::Result<Arc<dyn MarketSource>> {
    build_market(cfg)
}

/// The market data source (`market_data.source`).
fn build_market(cfg: &Config) -> anyhow::Result<Arc<dyn MarketSource>> {
    Ok(match cfg.market_data.source {
        MarketKind::Simulated => Arc::new(market::simulated::Simulated::new()),
        MarketKind::Coinbase => Arc::new(
            market::coinbase::Coinbase::new(
                &cfg.market_data.coinbase_url,
                secs(cfg.market_data.request_timeout_seconds),
            )
            .context("building the coinbase client")?,
        ),
        MarketKind::Influxdb => {
            let ix = &cfg.market_data.influxdb;
            Arc::new(
                market::influxdb::Influx::new(
                    market::influxdb::InfluxSettings {
                        url: ix.url.clone(),
                        database: ix.database.clone(),
                        measurement: ix.measurement.clone(),
                        symbol_tag: ix.symbol_tag.clone(),
                        token: ix.token.clone(),
                        max_staleness: Duration::from_secs(ix.max_staleness_seconds),
                    },
                    secs(cfg.market_data.request_timeout_seconds),
                )
                .context("building the InfluxDB client")?,
            )
        }
    })
}

/// The history store and its writer (`history.*`): PostgreSQL when a URL is set, else the
/// SQLite file. A database that cannot be opened or migrated stops the start with an error
/// naming it (never the URL, which holds a password).
async fn build_history(
    cfg: &Config,
    runner: Arc<std::sync::OnceLock<runner::SharedState>>,
) -> anyhow::Result<Option<Arc<HistoryWriter>>> {
    let h = &cfg.history;
    if !h.enabled {
        return Ok(None);
    }
    let store: Arc<dyn HistoryStore> = match h.postgres_url(&cfg.postgres) {
        Some(url) => Arc::new(
            history::sql::SqlStore::postgres(url.expose())
                .await
                .context("opening the history database (PostgreSQL at history.url)")?,
        ),
        None => Arc::new(
            history::sql::SqlStore::sqlite(std::path::Path::new(&h.path))
                .await
                .with_context(|| format!("opening the history database (SQLite at {})", h.path))?,
        ),
    };
    tracing::info!(backend = store.backend(), "history store open");
    history::init_series(&h.grading.horizons_minutes);
    // The runner is built after the publisher that feeds this writer; it is known by the time
    // the first cycle runs.
    let busy: history::writer::Busy =
        Arc::new(move || runner.get().is_some_and(|r| r.cycle_running()));
    Ok(Some(HistoryWriter::holding_back_for(
        store,
        h.queue_max,
        h.batch_size,
        busy,
    )))
}

/// Binds the HTTP listener (`http.bind`, `http.port`; 0 picks a free port).
async fn bind(cfg: &Config) -> anyhow::Result<TcpListener> {
    let ip: std::net::IpAddr = cfg.http.bind.parse().context("http.bind")?;
    let addr = SocketAddr::new(ip, cfg.http.port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP server to {addr}"))
}

fn log_listening(l: &TcpListener) {
    match l.local_addr() {
        Ok(addr) => tracing::info!(addr = %addr, "HTTP server listening"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener has no local address"),
    }
}

/// While the Redis breaker is open, checks every second on a fresh connection whether Redis
/// answers again, and lets the breaker probe at once when it does — instead of waiting out
/// the rest of `recovery_timeout_seconds` (30 s) while Redis is already back.
async fn watch_redis_recovery(client: redis::Client, breaker: Breaker, stop: CancellationToken) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if breaker.state() != resilience::BreakerState::Open {
            continue;
        }
        let answered = async {
            let mut c = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .ok()?;
            redis::cmd("PING").query_async::<String>(&mut c).await.ok()
        }
        .await
        .is_some();
        if answered {
            tracing::info!("Redis answers again; probing it now");
            breaker.probe_now();
        }
    }
}

/// What ends the heartbeat loop, and how it ends the process.
struct Stops {
    /// Background tasks stop.
    background: CancellationToken,
    /// The whole process stops gracefully (as on SIGTERM).
    shutdown: CancellationToken,
    /// Why, when another process claimed our `instance_id`.
    conflict: Arc<std::sync::OnceLock<String>>,
}

/// Refreshes the heartbeat every `heartbeat.interval_seconds`. When the beat finds our
/// `instance_id` claimed by another process, this one stops gracefully and exits non-zero:
/// two processes under one id would vouch for each other's locks, and the one that started
/// later (or took the id over while ours had expired) holds the claim.
fn spawn_heartbeat(
    coord: Arc<dyn Coordination>,
    state: runner::SharedState,
    cfg: &Config,
    stops: Stops,
) -> tokio::task::JoinHandle<()> {
    let interval = Duration::from_secs(cfg.heartbeat.interval_seconds);
    tokio::spawn(async move {
        loop {
            match coord.heartbeat().await {
                Ok(()) => state.set_coordination_error(None),
                Err(e @ coordination::CoordError::DuplicateInstance { .. }) => {
                    metrics::counter!(telemetry::names::INSTANCE_CONFLICTS).increment(1);
                    tracing::error!(error = %e, "another process holds this instance_id; stopping");
                    state.set_coordination_error(Some(&e));
                    let _ = stops.conflict.set(e.to_string());
                    stops.shutdown.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    state.set_coordination_error(Some(&e));
                }
            }
            tokio::select! {
                _ = stops.background.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
}

/// Every second, releases the locks whose release failed in a Redis outage, as soon as
/// Redis answers again: while they stand, the other replicas skip those symbols (our live
/// heartbeat vouches for them) until the lock TTL runs out.
async fn release_leftovers(coord: Arc<dyn Coordination>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = coord.release_leftovers().await {
            tracing::debug!(error = %e, "leftover locks not released yet");
        }
    }
}

/// The module graph runs one way: a module imports only from its own layer or those below
/// (see `docs/ARCHITECTURE.md`). Checked over every `crate::` path in the sources, test
/// modules and test support left out (tests may reach anywhere).
#[cfg(test)]
mod layering {
    /// Each top-level module's layer, top to bottom as the data flows.
    const LAYERS: &[(&str, u8)] = &[
        ("lib", 5),
        ("main", 5),
        ("http", 4),
        ("runner", 3),
        ("replay", 3),
        ("coordinator", 2),
        ("pipeline", 2),
        ("tools", 2),
        ("agents", 1),
        ("publish", 1),
        ("history", 1),
        ("coordination", 1),
        ("market", 1),
        ("strategy", 1),
        ("model", 0),
        ("resilience", 0),
        ("schedule", 0),
        ("config", 0),
        ("telemetry", 0),
    ];

    fn layer(module: &str) -> Option<u8> {
        LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
    }

    /// `text` without its comments (doc links such as [`crate::http`] are not imports) and
    /// without the item after each `#[cfg(test)]` (the unit tests, compiled for tests only),
    /// keeping whatever follows that item. Text, not syntax: a `//` inside a string ends that
    /// line early and a brace in a string counts — neither hides an import in this code.
    fn production_code(text: &str) -> String {
        let uncommented: String = text
            .lines()
            .map(|l| match l.find("//") {
                Some(i) => &l[..i],
                None => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = String::new();
        let mut rest = uncommented.as_str();
        while let Some(i) = rest.find("#[cfg(test)]") {
            out.push_str(&rest[..i]);
            rest = &rest[i + "#[cfg(test)]".len()..];
            // The item ends at `;` before any block, or with its block's closing brace.
            let end = match (rest.find(';'), rest.find('{')) {
                (Some(semi), Some(open)) if semi < open => semi + 1,
                (Some(semi), None) => semi + 1,
                (_, Some(open)) => {
                    let mut depth = 0usize;
                    let mut end = rest.len();
                    for (j, c) in rest[open..].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = open + j + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    end
                }
                (None, None) => rest.len(),
            };
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }

    /// The top-level modules `code` (of the module at `path` below the crate) names: every
    /// `crate::x`, and every `super::…::x` that climbs to the crate root.
    fn named_modules(code: &str, path: &[String]) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let mut names = vec![];
        for (i, _) in code.match_indices("crate::") {
            // `$crate::` in a macro, or a name ending in `crate`, is not this crate's root.
            let before = code[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            names.push(ident(&code[i + 7..]));
        }
        for (i, _) in code.match_indices("super::") {
            let before = code[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut rest = &code[i..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                ups += 1;
                rest = r;
            }
            if ups >= path.len() {
                names.push(ident(rest));
            }
        }
        names
    }

    /// `(file, imported module)` for every path to a module above the file's own layer.
    fn upward_imports() -> Vec<(String, String)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![];
        let mut dirs = vec![root.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("src is readable").flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut bad = vec![];
        for f in files {
            let rel = f
                .strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .to_string();
            // Test support is compiled for tests only; it may wire layers together.
            if rel.ends_with("testing.rs") || rel.ends_with("contract.rs") {
                continue;
            }
            let top = rel.split(['/', '.']).next().unwrap_or_default().to_string();
            let own = layer(&top).unwrap_or_else(|| panic!("{rel}: module {top} has no layer"));
            // The module path: `agents/llm.rs` is agents::llm, `agents/mod.rs` agents.
            let path: Vec<String> = rel
                .trim_end_matches(".rs")
                .split('/')
                .filter(|s| *s != "mod" && *s != "lib" && *s != "main")
                .map(str::to_string)
                .collect();
            let text = std::fs::read_to_string(&f).expect("readable");
            for name in named_modules(&production_code(&text), &path) {
                if let Some(l) = layer(&name)
                    && l > own
                {
                    bad.push((rel.clone(), name));
                }
            }
        }
        bad.sort();
        bad.dedup();
        bad
    }

    #[test]
    fn the_reader_sees_what_a_module_really_imports() {
        let code = "//! See [`crate::http`].\nuse crate::model::Stage; // crate::runner in a comment\n#[cfg(test)]\nmod tests { use crate::http; fn f() { let _ = \"{x}\"; } }\nfn after() { crate::runner::go(); super::super::lib_thing(); }\n#[cfg(test)]\nuse crate::coordinator;\nconst X: u8 = $crate::y;";
        let path = vec!["agents".to_string(), "llm".to_string()];
        let names = named_modules(&production_code(code), &path);
        assert_eq!(names, ["model", "runner", "lib_thing"]);
        // One `super::` from agents::llm is agents itself: not a climb to the root.
        assert!(named_modules("super::rules::x", &path).is_empty());
        assert_eq!(
            named_modules("super::http::x", &["agents".to_string()]),
            ["http"]
        );
    }

    #[test]
    fn no_module_imports_from_a_layer_above_it() {
        assert_eq!(upward_imports(), Vec::<(String, String)>::new());
    }
}
