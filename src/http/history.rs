//! `GET /api/signals/history` (stored messages, keyset pages) and `GET /api/performance`
//! (the scorecard). Both answer 503 naming the reason when the history is off or its database
//! does not answer, and 400 naming the parameter for a bad request.

use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AppState, bad_request, count_param};
use crate::history::grading::{horizon_label, parse_horizon, scorecard_of};
use crate::history::{GroupBy, HistoryQuery, HistoryStore};
use crate::model::Stage;

/// Rows per page at most: ~2 KB each keeps a page near 2 MB.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

/// `/api/signals/history` parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryParams {
    symbol: Option<String>,
    stage: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `/api/performance` parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PerformanceParams {
    horizon: Option<String>,
    group_by: Option<String>,
    since: Option<String>,
}

fn unavailable(why: String) -> Response {
    ApiError::Unavailable(why).into_response()
}

/// Why a history request is refused: kept small (clippy's `result_large_err`), made into a
/// response at the end.
enum ApiError {
    /// 400 naming the parameter.
    Bad(&'static str, String),
    /// 503 with the reason.
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Bad(param, why) => bad_request(param, why),
            ApiError::Unavailable(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "error": why })),
            )
                .into_response(),
        }
    }
}

fn store(s: &AppState) -> Result<std::sync::Arc<dyn HistoryStore>, ApiError> {
    s.publisher
        .history()
        .map(|w| w.store().clone())
        .ok_or_else(|| ApiError::Unavailable("the history is off (history.enabled: false)".into()))
}

fn time_param(name: &'static str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| t.timestamp())
            .map_err(|_| ApiError::Bad(name, format!("{t:?} is not an RFC 3339 time")))
    })
    .transpose()
}

/// `cursor` is the previous page's last row: `<cycle_at>_<message_id>`.
fn cursor_param(v: Option<&str>) -> Result<Option<(i64, String)>, ApiError> {
    v.map(|c| {
        c.split_once('_')
            .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_string())))
            .filter(|(_, id)| !id.is_empty() && id.len() <= 64)
            .ok_or_else(|| ApiError::Bad("cursor", "not a cursor from a previous page".into()))
    })
    .transpose()
}

pub(super) async fn history(
    State(s): State<AppState>,
    params: Result<axum::extract::Query<HistoryParams>, QueryRejection>,
) -> Response {
    let p = match params {
        Ok(axum::extract::Query(p)) => p,
        Err(e) => return bad_request("query", e.body_text()),
    };
    let store = match store(&s) {
        Ok(st) => st,
        Err(r) => return r.into_response(),
    };
    let limit = match count_param(p.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT) {
        Ok(n) => n,
        Err(why) => return bad_request("limit", why),
    };
    let stage = match p.stage.as_deref() {
        None => None,
        Some(name) => match Stage::ALL.into_iter().find(|st| st.as_str() == name) {
            Some(st) => Some(st),
            None => {
                return bad_request("stage", "must be signal, score, advise or report".into());
            }
        },
    };
    if let Some(sym) = &p.symbol
        && !crate::config::is_valid_symbol(sym)
    {
        return bad_request("symbol", "not a symbol of the form BASE/QUOTE".into());
    }
    let (since, until, after) = match (
        time_param("since", p.since.as_deref()),
        time_param("until", p.until.as_deref()),
        cursor_param(p.cursor.as_deref()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r.into_response(),
    };
    let q = HistoryQuery {
        symbol: p.symbol,
        stage,
        since,
        until,
        after,
        limit: limit + 1,
    };
    match store.page(&q).await {
        Ok(mut rows) => {
            let next_cursor = if rows.len() > limit {
                rows.truncate(limit);
                rows.last().map(|r| format!("{}_{}", r.key.0, r.key.1))
            } else {
                None
            };
            // Each signal-stage row carries its grades (one query for the page).
            let ids: Vec<String> = rows
                .iter()
                .filter(|r| r.stage == Stage::Signal)
                .map(|r| r.signal_id.clone())
                .collect();
            match store.grades_of(&ids).await {
                Ok(grades) => {
                    for r in rows.iter_mut().filter(|r| r.stage == Stage::Signal) {
                        let id = r.signal_id.as_str();
                        r.grades = Some(
                            grades
                                .iter()
                                .filter(|(sid, _, _)| sid == id)
                                .map(|(_, h, g)| (horizon_label(*h), g.clone()))
                                .collect(),
                        );
                    }
                }
                Err(e) => return unavailable(e.to_string()),
            }
            axum::Json(json!({ "signals": rows, "next_cursor": next_cursor })).into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

pub(super) async fn performance(
    State(s): State<AppState>,
    params: Result<axum::extract::Query<PerformanceParams>, QueryRejection>,
) -> Response {
    let p = match params {
        Ok(axum::extract::Query(p)) => p,
        Err(e) => return bad_request("query", e.body_text()),
    };
    let store = match store(&s) {
        Ok(st) => st,
        Err(r) => return r.into_response(),
    };
    let horizon = match p.horizon.as_deref() {
        None => 15 * 60,
        Some(h) => match parse_horizon(h) {
            Some(h) => h,
            None => {
                return bad_request(
                    "horizon",
                    "must be minutes or hours, e.g. 5m, 15m, 1h".into(),
                );
            }
        },
    };
    let group_by = match p.group_by.as_deref() {
        None => GroupBy::Symbol,
        Some(g) => match GroupBy::parse(g) {
            Some(g) => g,
            None => {
                let all: Vec<&str> = GroupBy::ALL.iter().map(|g| g.as_str()).collect();
                return bad_request("group_by", format!("must be one of {}", all.join(", ")));
            }
        },
    };
    // Seven days by default: the scorecard of the recent past, read in one index range.
    let since = match time_param("since", p.since.as_deref()) {
        Ok(t) => t.unwrap_or_else(|| chrono::Utc::now().timestamp() - 7 * 86_400),
        Err(r) => return r.into_response(),
    };
    let groups = match scorecard_of(store.as_ref(), horizon, group_by, since).await {
        Ok(g) => g,
        Err(e) => return unavailable(e.to_string()),
    };
    let missing = store.missing_prices(horizon, since).await.unwrap_or(0);
    let graded: u64 = groups.iter().map(|g| g.graded).sum();
    let since_text = chrono::DateTime::from_timestamp(since, 0).map(|t| t.to_rfc3339());
    axum::Json(json!({
        "horizon": horizon_label(horizon),
        "group_by": group_by.as_str(),
        "since": since_text,
        "graded": graded,
        "missing_price": missing,
        "groups": groups,
        "market_data": market_note(&s),
    }))
    .into_response()
}

/// What the prices were graded against, so nobody mistakes a simulation for a market.
pub(super) fn market_note(s: &AppState) -> Value {
    json!({ "source": s.market_source, "simulated": s.market_source == "simulated" })
}
