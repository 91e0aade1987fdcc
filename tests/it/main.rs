//! Integration tests: one binary, modules by area. Each test spawns what it needs (the built
//! runner binary, a scripted market-data server) on free ports; nothing outside the test is
//! assumed to be running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod app;
mod helpers;
mod llm_server;
mod market_server;
mod redis_server;
mod sse_client;

mod bad_day;
mod browser;
mod cli;
mod deploy;
mod failures;
mod golden;
mod hardening;
mod history;
mod influxdb;
mod llm_agents;
mod llm_causes;
mod mcp;
mod observability;
mod once_mode;
mod openapi;
mod opencode;
mod real_latency;
mod real_model;
mod redis_coordination;
mod redis_sink;
mod replay;
mod replicas;
mod scheduling;
mod shutdown;
