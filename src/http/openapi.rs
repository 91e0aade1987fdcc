//! The OpenAPI 3.1 document of the HTTP API, served at `/api/openapi.json`.
//!
//! It is generated, not written: every path comes from its handler's `#[utoipa::path]`
//! annotation (collected by `utoipa_axum::routes!` as the route is registered, so a route
//! cannot be served without being documented), and every body schema from the Rust type the
//! handler serializes (`ToSchema`). What only the running service knows is filled in when the
//! router is built ([`specialize`]): the configured symbols `/api/candles` serves, the graded
//! horizons `/api/performance` takes, the dashboard's asset names, and whether the admin
//! endpoints require the bearer token (`ADMIN_TOKEN` set) or also admit loopback peers.
//!
//! `/mcp` (JSON-RPC, described by its own `tools/list`) and the model gateway for OpenCode
//! are not REST resources and are left out.

use std::sync::Arc;

use axum::Extension;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr, schema::Schema};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::model::{AdvisedSignal, ReportedSignal, ScoredSignal, Signal};

/// The name of the bearer-token security scheme in the document.
pub(super) const BEARER: &str = "bearer";

/// The document's fixed part; the paths are added by the router as it registers each route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "autonomous-runner",
        description = "Trading signals generated every minute by the Signal → Score → Advise → Report pipeline, \
            their history and scorecard, health probes and admin controls. Every error answer is a JSON \
            object with an `error` text; a 400 also names the `parameter` that was wrong.",
        license(name = "MIT", identifier = "MIT")
    ),
    components(schemas(ErrorBody, Signal, ScoredSignal, AdvisedSignal, ReportedSignal)),
    modifiers(&BearerScheme),
    tags(
        (name = "signals", description = "The latest signals, their history, the scorecard, candles and the live stream."),
        (name = "health", description = "Kubernetes probes, diagnostics and Prometheus metrics."),
        (name = "admin", description = "The kill switch and shutdown: a bearer token (`ADMIN_TOKEN`), or loopback peers when none is configured."),
        (name = "dashboard", description = "The live dashboard page and its assets.")
    )
)]
pub(super) struct ApiDoc;

/// Declares the bearer-token scheme the admin endpoints name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The value of ADMIN_TOKEN, a static token: there is no OAuth flow.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The body of every error answer (400, 401, 403, 404, 405, 503).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong, in words (never a secret).
    pub error: String,
    /// 400 only: the query parameter or body field that was wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

impl ErrorBody {
    /// An error that names no parameter.
    pub fn new(error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            parameter: None,
        }
    }
}

/// What the running service adds to the generated document.
pub(super) struct Facts<'a> {
    /// The configured symbols (`/api/candles` serves only these).
    pub symbols: &'a [String],
    /// The graded horizons' labels (`5m`, `15m`, `1h`); empty: the history is off.
    pub horizons: Vec<String>,
    /// The dashboard's asset names.
    pub assets: Vec<&'static str>,
    /// Whether `ADMIN_TOKEN` is set (then the admin endpoints require it from everyone).
    pub token_required: bool,
}

/// Fills in what only the running service knows (see the module doc).
pub(super) fn specialize(doc: &mut Document, facts: &Facts<'_>) {
    set_enum(doc, "/api/candles", "symbol", facts.symbols);
    if !facts.horizons.is_empty() {
        set_enum(doc, "/api/performance", "horizon", &facts.horizons);
    }
    let assets: Vec<String> = facts.assets.iter().map(|a| a.to_string()).collect();
    set_enum(doc, "/assets/{name}", "name", &assets);
    // With a token every peer must present it; without one, loopback peers are admitted as
    // they are (`http.admin_loopback`), which the empty requirement says.
    let mut security = vec![SecurityRequirement::new::<_, _, &str>(BEARER, [])];
    if !facts.token_required {
        security.push(SecurityRequirement::default());
    }
    // The operations that declare the bearer scheme in their annotation are the admin ones.
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post, &mut item.delete]
            .into_iter()
            .flatten()
        {
            if op.security.is_some() {
                op.security = Some(security.clone());
            }
        }
    }
}

/// Makes the string parameter `param` of `path` one of `values`.
fn set_enum(doc: &mut Document, path: &str, param: &str, values: &[String]) {
    let Some(item) = doc.paths.paths.get_mut(path) else {
        return;
    };
    let Some(op) = item.get.as_mut() else { return };
    for p in op.parameters.iter_mut().flatten() {
        let RefOr::T(p) = p else { continue };
        if p.name != param {
            continue;
        }
        if let Some(RefOr::T(Schema::Object(o))) = p.schema.as_mut() {
            o.enum_values = Some(values.iter().map(|v| serde_json::json!(v)).collect());
            o.pattern = None;
        }
    }
}

/// The document as served: rendered once when the router is built.
#[derive(Clone)]
pub(super) struct Rendered(pub Arc<str>);

/// Renders the document. Serializing it cannot fail in practice (plain maps and strings);
/// if it ever did, the answer says so as JSON rather than the process stopping.
pub(super) fn render(doc: &Document) -> Rendered {
    Rendered(Arc::from(doc.to_json().unwrap_or_else(|e| {
        format!(r#"{{"error":"the OpenAPI document did not render: {e}"}}"#)
    })))
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "signals",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object))
)]
pub(super) async fn document(Extension(doc): Extension<Rendered>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
}
