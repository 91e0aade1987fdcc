//! The embedded defaults: the seed's values where the seed has one, and why where it does not.

use super::*;

impl Default for Config {
    fn default() -> Self {
        Self {
            schedule: "*/1 * * * *".into(),
            timezone: "UTC".into(),
            instance_id: default_instance_id(),
            symbols: DEFAULT_SYMBOLS.iter().map(|s| s.to_string()).collect(),
            parallel: Parallel::default(),
            timeouts: Timeouts::default(),
            locks: Locks::default(),
            heartbeat: Heartbeat::default(),
            retry: Retry::default(),
            circuit_breaker: CircuitBreakers::default(),
            adaptive: Adaptive::default(),
            graceful_shutdown: GracefulShutdown::default(),
            coordination: Coordination::default(),
            agents: Agents::default(),
            market_data: MarketData::default(),
            pipeline: Pipeline::default(),
            strategies: Strategies::default(),
            publish: Publish::default(),
            http: Http::default(),
            postgres: Postgres::default(),
            history: History::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// `HOSTNAME` (the pod name in Kubernetes) or `runner-1`, as in the seed's
/// `${HOSTNAME:-runner-1}`.
fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "runner-1".to_string())
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            // A slot per default symbol: a tick's symbols all start at once, so a report is
            // one chain of calls old, not two (the seed's 10 ran 20 symbols in two waves).
            max_concurrent: 20,
            min_concurrent: 3,
            batch_delay_ms: 0,
        }
    }
}
impl Default for Timeouts {
    fn default() -> Self {
        Self {
            symbol_timeout_seconds: 10.0,
            symbol_timeout_max_seconds: 15.0,
            total_timeout_seconds: 50.0,
        }
    }
}
impl Default for Locks {
    fn default() -> Self {
        Self {
            ttl_seconds: 90,
            stale_threshold_seconds: 120,
            redis_key_prefix: "signal:lock:".into(),
        }
    }
}
impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            ttl_seconds: 30,
            interval_seconds: 10,
        }
    }
}
impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            delay_seconds: 5.0,
            max_delay_seconds: 30.0,
            jitter: true,
        }
    }
}
impl Default for CircuitBreakers {
    fn default() -> Self {
        Self {
            llm_service: BreakerConfig {
                failure_threshold: 5,
                recovery_timeout_seconds: 60.0,
                half_open_max_calls: 3,
                success_threshold: 2,
                mode: BreakerMode::Normal,
            },
            redis: BreakerConfig {
                failure_threshold: 3,
                recovery_timeout_seconds: 30.0,
                half_open_max_calls: 2,
                success_threshold: 1,
                mode: BreakerMode::Normal,
            },
        }
    }
}
impl Default for Adaptive {
    fn default() -> Self {
        Self {
            // Per-call samples: 20 symbols make ~50 calls a minute. The seed's 10 (set for a
            // window of symbols) would make p95 the maximum of the last few seconds.
            latency_window_size: 200,
            p95_threshold_ms: 8000,
            p99_threshold_ms: 9000,
            backpressure_max_overruns: 3,
            cooldown_cycles: 2,
            max_consecutive_latency_skips: 1,
            latency_max_age_seconds: 300,
        }
    }
}
impl Default for GracefulShutdown {
    fn default() -> Self {
        Self {
            timeout_seconds: 30.0,
            drain_existing: true,
        }
    }
}
impl Default for Coordination {
    fn default() -> Self {
        Self {
            backend: CoordinationBackend::Memory,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            key_prefix: String::new(),
            work_sharing: false,
            claim_spread_ms: 1_000,
        }
    }
}
impl Default for Agents {
    fn default() -> Self {
        Self {
            backend: AgentBackend::Rules,
            requests_per_minute: 100,
            burst: None,
            base_url: "https://openrouter.ai/api/v1".into(),
            model: "openai/gpt-4o-mini".into(),
            api_key: Secret::default(),
            stages: Stages::default(),
            fallback: Fallback::None,
            budget: Budget::default(),
            max_tokens: 1024,
            tools: ToolsMode::Prompt,
            max_tool_rounds: 3,
            structured_output: StructuredOutput::Auto,
            hedge: Hedge::default(),
            opencode: OpenCodeConfig::default(),
        }
    }
}
impl Default for MarketData {
    fn default() -> Self {
        Self {
            source: MarketSource::Simulated,
            coinbase_url: "https://api.exchange.coinbase.com".into(),
            candles: 120,
            request_timeout_seconds: 5.0,
            influxdb: InfluxConfig::default(),
        }
    }
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8086".into(),
            database: "tradestream".into(),
            measurement: "candles".into(),
            symbol_tag: "symbol".into(),
            token: Secret::default(),
            max_staleness_seconds: 180,
        }
    }
}
impl Default for Pipeline {
    fn default() -> Self {
        Self {
            advise_min_score: 70.0,
            report_mode: ReportMode::Agent,
            expiry_grace_seconds: 30,
        }
    }
}
impl Default for Publish {
    fn default() -> Self {
        Self {
            stream_max_len: 10_000,
            outbox_max: 10_000,
            history_cycles: 100,
            replay_buffer: 1024,
            spool_path: None,
        }
    }
}
impl Default for Http {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0".into(),
            port: 8080,
            admin_token: Secret::default(),
            admin_loopback: true,
            // 1,000 dashboard clients (the SSE benchmark) plus probes and API calls.
            max_connections: 4096,
            max_sse_streams: 2048,
            // An office behind one NAT address, many tabs each: far above one browser's
            // needs, far below the cap.
            max_sse_streams_per_client: 256,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for History {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "./data/history.sqlite".into(),
            url: Secret::default(),
            retention_days: 30,
            queue_max: 100_000,
            batch_size: 500,
            grading: Grading::default(),
            calibration: Calibration::default(),
        }
    }
}
impl Default for Calibration {
    fn default() -> Self {
        Self {
            horizon_minutes: None,
            min_grades: 1_000,
            prior_grades: 100.0,
            refit_seconds: 60,
        }
    }
}
impl Default for Grading {
    fn default() -> Self {
        Self {
            horizons_minutes: vec![5, 15, 60],
            threshold_pct: 0.1,
            interval_seconds: 30,
        }
    }
}
