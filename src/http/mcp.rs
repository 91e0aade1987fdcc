//! `/mcp`: the agents' tools ([`crate::tools`]) as an MCP server over Streamable HTTP, on the
//! official Rust SDK (`rmcp`).
//!
//! - **Stateless, JSON answers.** Every tool is a read-only lookup, so the server keeps no
//!   session: any replica answers any request (no sticky load balancing), and a restart loses
//!   nothing a client holds.
//! - **Access** is the admin endpoints' rule ([`super::authorize`]): the bearer token when one
//!   is configured, else loopback peers only. Without a token the SDK's `Host` check also stays
//!   on (loopback names, and those of `http.allowed_hosts`), so a web page cannot reach the
//!   tools through DNS rebinding. The guard is a route layer: paths other than `/mcp` never
//!   see it (they are the router's JSON 404s, with or without a token).
//! - **Bounds.** Request bodies over [`MAX_BODY`] are refused with 413; the tools bound every
//!   answer themselves.
//! - **JSON-RPC errors as the spec has them**, checked here before the SDK sees the body: a
//!   body that is not JSON is −32700 (the SDK answers HTTP 415, which clients report as a
//!   transport failure), and a known method whose params do not fit is −32602 naming what is
//!   wrong (the SDK reads it as an unknown custom request and answers −32601 "method not
//!   found" for a method that exists).

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
        // itself), not protocol errors. Their JSON goes as text, not `structuredContent`:
        // clients hold structured content to the tool's output schema even on an error (the
        // MCP Inspector does), and a refusal is not an answer.
        let result = match self.tools.call(&request.name, &args).await {
            Ok(v) => CallToolResult::structured(v.as_ref().clone()),
            Err(e) => CallToolResult::error(vec![rmcp::model::ContentBlock::text(
                e.to_json().to_string(),
            )]),
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
            t.output_schema = Some(Arc::new(d.output_schema.clone()));
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
    } else if !admin.allowed_hosts.is_empty() {
        // The SDK's loopback names, and the names the operator gave (a service name).
        let hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .chain(admin.allowed_hosts.iter().cloned())
            .collect();
        config = config.with_allowed_hosts(hosts);
    }
    StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// The access rule in front of `/mcp`, then the JSON-RPC checks of a posted body.
pub async fn guard(
    State(admin): State<AdminAccess>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(refusal) = authorize(&admin, peer, req.headers(), "/mcp") {
        return refusal.into_response();
    }
    let json_post = req.method() == axum::http::Method::POST
        && req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"))
            });
    // Anything else (a GET, a wrong content type) is the SDK's to answer as it does.
    if !json_post {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(serde_json::json!({
                "error": format!("the request body is over {MAX_BODY} bytes, or was cut off")
            })),
        )
            .into_response();
    };
    if let Some(refusal) = rpc_refusal(&bytes) {
        return refusal;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// JSON-RPC's own codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_PARAMS: i64 = -32602;

/// The JSON-RPC error for a body the SDK would misreport, or `None` to pass it on.
fn rpc_refusal(body: &[u8]) -> Option<Response> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        // No request could be read, so no id to answer: `null`, and HTTP 400.
        Err(e) => {
            return Some(rpc_error(
                axum::http::StatusCode::BAD_REQUEST,
                Value::Null,
                PARSE_ERROR,
                format!("Parse error: the body is not JSON ({e})"),
            ));
        }
    };
    let method = v.get("method")?.as_str()?;
    let id = v.get("id")?.clone();
    let params = v.get("params").cloned();
    let problem = params_problem(method, params)?;
    // A well-formed request to a method that exists: answered like any JSON-RPC error.
    Some(rpc_error(
        axum::http::StatusCode::OK,
        id,
        INVALID_PARAMS,
        format!("Invalid params for {method}: {problem}"),
    ))
}

/// What is wrong with `params` of a known request method (`None`: nothing, or a method this
/// check does not know, which the SDK answers itself).
fn params_problem(method: &str, params: Option<Value>) -> Option<String> {
    use rmcp::model::{CallToolRequestParams, InitializeRequestParams, PaginatedRequestParams};
    fn check<T: serde::de::DeserializeOwned>(p: Option<Value>, required: bool) -> Option<String> {
        match p {
            None | Some(Value::Null) if !required => None,
            None | Some(Value::Null) => Some("params are required".into()),
            Some(p) => serde_path_to_error::deserialize::<_, T>(p).err().map(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    inner.to_string()
                } else {
                    format!("{path}: {inner}")
                }
            }),
        }
    }
    match method {
        "tools/call" => check::<CallToolRequestParams>(params, true),
        "initialize" => check::<InitializeRequestParams>(params, true),
        "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" => {
            check::<PaginatedRequestParams>(params, false)
        }
        _ => None,
    }
}

fn rpc_error(status: axum::http::StatusCode, id: Value, code: i64, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": code, "message": message},
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(r: Response) -> (u16, Value) {
        let status = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("json"))
    }

    #[tokio::test]
    async fn malformed_json_is_a_parse_error_with_a_null_id() {
        let r = rpc_refusal(b"{\"jsonrpc\": \"2.0\", \"id\": 1,").expect("refused");
        let (status, v) = body_of(r).await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], Value::Null);
    }

    #[tokio::test]
    async fn wrong_param_types_of_a_known_method_are_invalid_params_naming_the_field() {
        for (params, field) in [
            (serde_json::json!({"name": 5}), "name"),
            (
                serde_json::json!({"name": "get_candles", "arguments": "BTC/USD"}),
                "arguments",
            ),
        ] {
            let req = serde_json::json!({"jsonrpc": "2.0", "id": "a7", "method": "tools/call", "params": params});
            let r = rpc_refusal(req.to_string().as_bytes()).expect("refused");
            let (status, v) = body_of(r).await;
            assert_eq!(status, 200);
            assert_eq!(v["id"], "a7");
            assert_eq!(v["error"]["code"], -32602, "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .expect("text")
                    .contains(field),
                "{v}"
            );
        }
        let missing = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call"});
        assert!(rpc_refusal(missing.to_string().as_bytes()).is_some());
    }

    #[test]
    fn well_formed_requests_and_unknown_methods_pass_to_the_sdk() {
        for req in [
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_candles", "arguments": {"symbol": "BTC/USD"}}}),
            serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "no/such"}),
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        ] {
            assert!(rpc_refusal(req.to_string().as_bytes()).is_none(), "{req}");
        }
    }
}
