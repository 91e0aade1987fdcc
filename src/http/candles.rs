//! `GET /api/candles?symbol=ETH/USD&minutes=240`: the 1-minute candles the pipeline reads, as
//! of now, for the dashboard's chart (and anyone who wants to see what a signal saw). Only
//! the configured symbols are served (a request cannot make the runner fetch anything else
//! from an upstream source), at most a day of minutes; the answer says where prices come from
//! and whether they are simulated. 400 names a bad parameter (an unknown symbol too), 503 a
//! source that does not answer.

use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{AppState, ErrorBody, bad_request, count_param};

/// A day of minutes: the chart's widest view, and a bound on one request's work.
const MAX_MINUTES: usize = 1440;
const DEFAULT_MINUTES: usize = 240;

/// `/api/candles` parameters.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CandleParams {
    /// A configured symbol (the document lists them).
    #[param(required = true, value_type = String)]
    symbol: Option<String>,
    /// How many minutes back from now.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1440, default = 240)]
    minutes: Option<String>,
}

/// `/api/candles`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Candles {
    /// The symbol asked for.
    symbol: String,
    /// `market_data.source`.
    source: &'static str,
    /// Whether the prices are simulated.
    simulated: bool,
    /// "Now" for this answer (RFC 3339, whole seconds).
    as_of: String,
    /// Oldest first.
    candles: Vec<CandleView>,
}

/// One 1-minute candle.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct CandleView {
    /// The minute's start (RFC 3339, whole seconds).
    time: String,
    /// First price.
    open: f64,
    /// Highest price.
    high: f64,
    /// Lowest price.
    low: f64,
    /// Last price.
    close: f64,
    /// Traded volume.
    volume: f64,
}

/// The 1-minute candles the pipeline reads, as of now.
#[utoipa::path(
    get,
    path = "/api/candles",
    tag = "signals",
    params(CandleParams),
    responses(
        (status = 200, description = "The candles.", body = Candles),
        (status = 400, description = "A parameter is wrong (an unknown symbol too); `parameter` names it.", body = ErrorBody),
        (status = 503, description = "The market source does not answer.", body = ErrorBody)
    )
)]
pub(super) async fn candles(
    State(s): State<AppState>,
    params: Result<axum::extract::Query<CandleParams>, QueryRejection>,
) -> Response {
    let p = match params {
        Ok(axum::extract::Query(p)) => p,
        Err(e) => return bad_request("query", e.body_text()),
    };
    let Some(symbol) = p.symbol.filter(|v| !v.is_empty()) else {
        return bad_request("symbol", "required, e.g. symbol=ETH/USD".into());
    };
    let minutes = match count_param(p.minutes.as_deref(), DEFAULT_MINUTES, MAX_MINUTES) {
        Ok(n) => n,
        Err(why) => return bad_request("minutes", why),
    };
    if !s.symbols.contains(&symbol) {
        // A 400 naming the parameter, as every endpoint answers a symbol it cannot serve.
        return bad_request(
            "symbol",
            format!(
                "{:?} is not a configured symbol",
                symbol.chars().take(40).collect::<String>()
            ),
        );
    }
    let now = s.clock.now();
    match s.market.candles(&symbol, now, minutes).await {
        Ok(candles) => axum::Json(Candles {
            symbol,
            source: s.market_source,
            simulated: s.market_source == "simulated",
            as_of: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            candles: candles
                .iter()
                .map(|c| CandleView {
                    time: c.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    open: c.open,
                    high: c.high,
                    low: c.low,
                    close: c.close,
                    volume: c.volume,
                })
                .collect(),
        })
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(ErrorBody::new(crate::telemetry::redact(&e.to_string()))),
        )
            .into_response(),
    }
}
