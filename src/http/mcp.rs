//! `/mcp`: the agents' tools ([`crate::tools`]) as an MCP server over Streamable HTTP, on the
//! official Rust SDK (`rmcp`).
//!
//! - **Stateless, JSON answers.** Every tool is a read-only lookup, so the server keeps no
//!   session: any replica answers any request (no sticky load balancing), and a restart loses
//!   nothing a client holds.
//! - **Access** is the admin endpoints' rule ([`super::authorize`]): the bearer token when one
//!   is configured, else loopback peers only. Without a token the SDK's `Host` check also stays
//!   on (loopback names only), so a web page cannot reach the tools through DNS rebinding.
//! - **Bounds.** Request bodies over [`MAX_BODY`] are refused by the SDK with 413; the tools
//!   bound every answer themselves.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AdminAccess, authorize};
use crate::tools::Toolbox;

/// Largest request body: a tool call's arguments are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The MCP server's handler: lists and calls the toolbox's tools.
#[derive(Clone)]
struct Handler {
    tools: Arc<Toolbox>,
    listed: Arc<Vec<Tool>>,
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "autonomous-runner",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Read-only market data, strategy verdicts and this service's own past signals \
                 with their grades. Symbols are the service's configured ones (e.g. BTC/USD).",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.listed.to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.map(Value::Object).unwrap_or(Value::Null);
        // Refusals are tool results with `isError` (the model reads them and can correct
        // itself), not protocol errors.
        let result = match self.tools.call(&request.name, &args).await {
            Ok(v) => CallToolResult::structured(v.as_ref().clone()),
            Err(e) => CallToolResult::structured_error(e.to_json()),
        };
        Ok(result.into())
    }
}

/// The `/mcp` service, stopped by `stop` (the server's shutdown).
pub fn service(
    tools: Arc<Toolbox>,
    admin: &AdminAccess,
    stop: CancellationToken,
) -> StreamableHttpService<impl ServerHandler, LocalSessionManager> {
    let listed: Vec<Tool> = tools
        .definitions()
        .iter()
        .map(|d| {
            let mut t = Tool::new(d.name, d.description, d.input_schema.clone());
            t.annotations = Some(
                ToolAnnotations::new()
                    .read_only(true)
                    .destructive(false)
                    .open_world(false),
            );
            t
        })
        .collect();
    let handler = Handler {
        tools,
        listed: Arc::new(listed),
    };
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_cancellation_token(stop)
        .with_max_request_body_bytes(MAX_BODY);
    if !admin.token.is_empty() {
        // With a token, clients elsewhere (another pod) are expected and the token is the
        // gate; the Host check only guards token-less loopback access.
        config = config.disable_allowed_hosts();
    }
    StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// The access rule in front of `/mcp`.
pub async fn guard(
    State(admin): State<AdminAccess>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    match authorize(&admin, peer, req.headers(), "/mcp") {
        Ok(_) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}
