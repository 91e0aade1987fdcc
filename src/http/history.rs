//! `GET /api/signals/history` (stored messages, keyset pages) and `GET /api/performance`
//! (the scorecard). Both answer 503 naming the reason when the history is off or its database
//! does not answer, and 400 naming the parameter for a bad request.

use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{AppState, ErrorBody, bad_request, count_param};
use crate::history::grading::{horizon_label, parse_horizon, scorecard_of};
use crate::history::{GroupBy, HistoryQuery, HistoryStore};
use crate::model::Stage;

/// Rows per page at most: ~2 KB each keeps a page near 2 MB.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

/// `/api/signals/history` parameters. Read as text and checked by hand, so a wrong value
/// gets a 400 naming the parameter.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryParams {
    /// Only this symbol (`BASE/QUOTE`).
    #[param(pattern = r"^[A-Z0-9]{1,15}/[A-Z0-9]{1,15}$")]
    symbol: Option<String>,
    /// Only this stage.
    #[param(value_type = Option<Stage>)]
    stage: Option<String>,
    /// Ticks at or after this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    since: Option<String>,
    /// Ticks before this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    until: Option<String>,
    /// Rows per page.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000, default = 100)]
    limit: Option<String>,
    /// The previous page's `next_cursor`.
    #[param(pattern = r"^-?[0-9]{1,18}_[A-Za-z0-9-]{1,64}$")]
    cursor: Option<String>,
}

/// A page of `/api/signals/history`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct HistoryPage {
    /// Newest tick first.
    signals: Vec<crate::history::HistoryRow>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// `/api/performance` parameters.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PerformanceParams {
    /// The grading horizon: one of the graded ones (`history.grading.horizons_minutes`);
    /// default `15m` when graded, else the shortest.
    horizon: Option<String>,
    /// What the groups are.
    #[param(value_type = Option<GroupBy>, inline)]
    group_by: Option<String>,
    /// Signals of ticks at or after this time (default: the last seven days).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    since: Option<String>,
}

/// `/api/performance`: the scorecard.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Performance {
    /// The horizon graded (`15m`).
    horizon: String,
    /// What the groups are.
    group_by: &'static str,
    /// The start of the range (RFC 3339).
    since: Option<String>,
    /// Graded signals in all groups.
    graded: u64,
    /// Signals whose price at the horizon is missing (not graded).
    missing_price: u64,
    /// The groups, by key.
    groups: Vec<crate::history::grading::GroupScore>,
    /// What the prices were graded against.
    market_data: MarketNote,
}

/// Where prices come from, so nobody mistakes a simulation for a market.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct MarketNote {
    /// `market_data.source` (`simulated`, `binance`, …).
    source: &'static str,
    /// Whether the prices are simulated.
    simulated: bool,
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
                axum::Json(ErrorBody::new(why)),
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
/// The same rule as the document's pattern, `^-?[0-9]{1,18}_[A-Za-z0-9-]{1,64}$`: what a
/// page's `next_cursor` looks like (a time in seconds and a message id) and nothing else.
fn cursor_param(v: Option<&str>) -> Result<Option<(i64, String)>, ApiError> {
    let parse = |c: &str| {
        let (at, id) = c.split_once('_')?;
        let digits = at.strip_prefix('-').unwrap_or(at);
        let at_ok = (1..=18).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
        let id_ok = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !(at_ok && id_ok) {
            return None;
        }
        Some((at.parse::<i64>().ok()?, id.to_string()))
    };
    v.map(|c| {
        parse(c).ok_or_else(|| ApiError::Bad("cursor", "not a cursor from a previous page".into()))
    })
    .transpose()
}

/// Stored messages of every stage, newest tick first, in keyset pages; signal-stage rows
/// carry their grades by horizon.
#[utoipa::path(
    get,
    path = "/api/signals/history",
    tag = "signals",
    params(HistoryParams),
    responses(
        (status = 200, description = "A page of stored messages.", body = HistoryPage),
        (status = 400, description = "A parameter is wrong; `parameter` names it.", body = ErrorBody),
        (status = 503, description = "The history is off, or its database does not answer.", body = ErrorBody)
    )
)]
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
            axum::Json(HistoryPage {
                signals: rows,
                next_cursor,
            })
            .into_response()
        }
        Err(e) => unavailable(e.to_string()),
    }
}

/// The scorecard: hit rate with its interval, returns, Brier score and skill, calibration
/// and naive baselines, per group, at one horizon.
#[utoipa::path(
    get,
    path = "/api/performance",
    tag = "signals",
    params(PerformanceParams),
    responses(
        (status = 200, description = "The scorecard.", body = Performance),
        (status = 400, description = "A parameter is wrong; `parameter` names it.", body = ErrorBody),
        (status = 503, description = "The history is off, or its database does not answer.", body = ErrorBody)
    )
)]
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
    // Only a graded horizon: another could never have data, and saying so beats an empty
    // scorecard (the MCP tool answers `INVALID_HORIZON` the same way).
    let graded = &s.graded_horizons;
    let horizon = match p.horizon.as_deref() {
        None => crate::tools::default_horizon(graded),
        Some(h) => match parse_horizon(h) {
            Some(h) if graded.is_empty() || graded.contains(&h) => h,
            _ => {
                let labels: Vec<String> = graded.iter().map(|h| horizon_label(*h)).collect();
                return bad_request(
                    "horizon",
                    format!("must be a graded horizon: {}", labels.join(", ")),
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
    axum::Json(Performance {
        horizon: horizon_label(horizon),
        group_by: group_by.as_str(),
        since: since_text,
        graded,
        missing_price: missing,
        groups,
        market_data: market_note(&s),
    })
    .into_response()
}

/// What the prices were graded against, so nobody mistakes a simulation for a market.
pub(super) fn market_note(s: &AppState) -> MarketNote {
    MarketNote {
        source: s.market_source,
        simulated: s.market_source == "simulated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The document's `group_by` values are the ones the handler takes.
    #[test]
    fn the_documented_group_by_values_are_the_parsed_ones() {
        let schema =
            serde_json::to_value(<GroupBy as utoipa::PartialSchema>::schema()).expect("json");
        let documented: Vec<&str> = schema["enum"]
            .as_array()
            .expect("an enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let parsed: Vec<&str> = GroupBy::ALL.iter().map(|g| g.as_str()).collect();
        assert_eq!(documented, parsed);
        for g in documented {
            assert!(GroupBy::parse(g).is_some(), "{g}");
        }
    }

    /// A cursor is exactly what the document's pattern admits.
    #[test]
    fn cursors_follow_the_documented_pattern() {
        for ok in ["1733530000_5b2c-9f", "-5_a", "123456789012345678_abc"] {
            assert!(matches!(cursor_param(Some(ok)), Ok(Some(_))), "{ok}");
        }
        for bad in [
            "",
            "_abc",
            "12_",
            "+5_abc",
            "1234567890123456789_a",
            "12_ab c",
            "12_é",
            "x_abc",
        ] {
            assert!(cursor_param(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
