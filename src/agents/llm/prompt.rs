//! What a model is asked and how its answer is read: the answer types (the schemas sent to
//! the endpoint are generated from them), the system prompts, the user prompts built from the
//! runner's own data, and the readers that check an answer ([`repair`](crate::agents::repair)).

use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::agents::repair::{self, Checked};
use crate::agents::{SignalDraft, SignalRequest, validate_advice, validate_summary};
use crate::model::{Action, Advice, AdvisedSignal, ScoredSignal, Stage, StrategyVerdict};

// ---------------------------------------------------------------------------------------------
// Answers as the model must give them (the schemas are generated from these types).

/// The signal stage's answer: the model's judgment and nothing the runner already holds.
/// The symbol, the strategy breakdown and its counts, the top strategy's score and
/// parameters, the market context and the ids are filled by the runner: a model asked to
/// copy them miscopies them (scores of 1.2, empty names, the symbol as "USD"), and every
/// copied token costs time.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmSignal {
    /// BUY, SELL or HOLD.
    pub action: Action,
    /// The probability, 0–1, that the call is right.
    pub confidence: f64,
    /// Why, in at most 2000 characters.
    pub reasoning: String,
    /// The strategies the call relies on, most important first.
    pub strategies: Vec<String>,
}

/// The report stage's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmReport {
    /// Two or three sentences for the dashboard.
    pub summary: String,
}

/// The signal schema: [`LlmSignal`]'s, with `strategies` an enum of the runner's strategy
/// names (a model picks, it does not spell).
fn signal_schema() -> Value {
    let mut v = schema_of::<LlmSignal>();
    v["properties"]["strategies"]["items"] =
        json!({"type": "string", "enum": crate::strategy::strategy_names()});
    v
}

fn schema_of<T: schemars::JsonSchema>() -> Value {
    let mut v: Value = schemars::generate::SchemaSettings::draft07()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .into();
    if let Some(o) = v.as_object_mut() {
        // Providers reject or ignore these in `response_format`.
        o.remove("$schema");
        o.remove("title");
    }
    consts_to_enums(&mut v);
    v
}

/// Documented enum variants come out as `oneOf: [{const: …}, …]`; strict structured-output
/// modes accept `enum` but not `oneOf`.
fn consts_to_enums(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let consts: Option<Vec<Value>> = o
                .get("oneOf")
                .and_then(Value::as_array)
                .and_then(|alts| alts.iter().map(|a| a.get("const").cloned()).collect());
            if let Some(values) = consts {
                o.remove("oneOf");
                o.insert("type".into(), json!("string"));
                o.insert("enum".into(), Value::Array(values));
            }
            o.values_mut().for_each(consts_to_enums);
        }
        Value::Array(a) => a.iter_mut().for_each(consts_to_enums),
        _ => {}
    }
}

/// The JSON schema of a stage's answer, generated once from the Rust types.
pub fn stage_schema(stage: Stage) -> &'static Value {
    static SIGNAL: OnceLock<Value> = OnceLock::new();
    static ADVICE: OnceLock<Value> = OnceLock::new();
    static REPORT: OnceLock<Value> = OnceLock::new();
    match stage {
        Stage::Signal | Stage::Score => SIGNAL.get_or_init(signal_schema),
        Stage::Advise => ADVICE.get_or_init(schema_of::<Advice>),
        Stage::Report => REPORT.get_or_init(schema_of::<LlmReport>),
    }
}

pub(super) fn schema_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Signal | Stage::Score => "signal",
        Stage::Advise => "advice",
        Stage::Report => "report",
    }
}

const SIGNAL_SYSTEM: &str = "You are signal-generator, a crypto market analyst. You receive one symbol's market snapshot (price, 1-hour change, volatility, volume) and the verdicts of classic technical strategies computed from its 1-minute candles. Weigh them and decide BUY, SELL or HOLD with a calibrated confidence between 0 and 1 (the probability that the call is right), and name the strategies your call relies on, most important first. Answer only with the JSON object the schema describes; keep the reasoning under 2000 characters.";
const ADVISE_SYSTEM: &str = "You are portfolio-advisor, a risk manager. You receive a scored trading signal. Decide whether it is valid to act on, the largest position as a fraction of the portfolio (0 to 1; 0 when not valid), and the concrete risks. Answer only with the JSON object the schema describes.";
const REPORT_SYSTEM: &str = "You are report-generator. Write a 2–3 sentence plain-text summary of a trading signal for a dashboard: the call, its confidence and opportunity score, the main reason, and the advisor's view if any. Answer only with the JSON object the schema describes.";

/// The user prompt with the answer's schema written into it, in every structured-output
/// mode: an endpoint that takes no `response_format` (or ignores it) still tells the model
/// what to write.
pub(super) fn with_schema(stage: Stage, user: String) -> String {
    format!(
        "{user}\n\nAnswer with exactly one JSON object, no prose and no code fence, that follows this JSON Schema:\n{}",
        stage_schema(stage)
    )
}

/// System prompt of a stage.
pub fn system_prompt(stage: Stage) -> &'static str {
    match stage {
        Stage::Signal | Stage::Score => SIGNAL_SYSTEM,
        Stage::Advise => ADVISE_SYSTEM,
        Stage::Report => REPORT_SYSTEM,
    }
}

/// The signal prompt: everything the model needs, without tools; `verdicts` are the
/// strategies the runner evaluated on these candles.
pub fn signal_prompt(req: &SignalRequest<'_>, verdicts: &[(StrategyVerdict, Value)]) -> String {
    let verdicts: Vec<Value> = verdicts
        .iter()
        .map(|(v, params)| json!({"strategy": v.name, "signal": v.signal, "hit_rate": round4(v.score), "parameters": params}))
        .collect();
    let recent: Vec<Value> = req
        .candles
        .iter()
        .rev()
        .take(10)
        .map(|c| json!({"time": c.time, "close": c.close, "volume": round4(c.volume)}))
        .collect();
    let ctx = req.context;
    format!(
        "Symbol: {}\nCycle: {}\nMarket snapshot: {}\nStrategy verdicts (hit rate over the last 30 minutes): {}\nLast 10 one-minute candles, newest first: {}",
        req.symbol,
        req.cycle_id,
        json!({
            "current_price": ctx.current_price,
            "price_change_1h": round4(ctx.price_change_1h),
            "volatility_1h": round4(ctx.volatility_1h),
            "volume_ratio": round4(ctx.volume_ratio),
            "candles_analysed": req.candles.len(),
        }),
        Value::Array(verdicts),
        Value::Array(recent),
    )
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

pub(super) fn scored_prompt(s: &ScoredSignal) -> String {
    let sig = &s.signal;
    format!(
        "Symbol: {}\nCycle: {}\nSignal: {}",
        sig.symbol,
        sig.cycle_id,
        json!({
            "action": sig.action,
            "confidence": sig.confidence,
            "reasoning": sig.reasoning,
            "strategies_bullish": sig.strategies_bullish,
            "strategies_bearish": sig.strategies_bearish,
            "strategies_neutral": sig.strategies_neutral,
            "market_context": sig.market_context,
            "opportunity_score": s.opportunity_score,
            "opportunity_tier": s.opportunity_tier,
            "market_regime": s.market_regime,
        })
    )
}

pub(super) fn report_prompt(a: &AdvisedSignal) -> String {
    let mut p = scored_prompt(&a.scored);
    match &a.advice {
        Some(adv) => p.push_str(&format!("\nAdvisor: {}", json!(adv))),
        None => p.push_str("\nAdvisor: not consulted (score below the advisory threshold)."),
    }
    p
}

/// Reads and checks a model's signal answer against the strategies the runner evaluated.
pub fn signal_from_answer(
    v: &Value,
    verdicts: &[(StrategyVerdict, Value)],
) -> Result<Checked<SignalDraft>, String> {
    let c = repair::judgment(v, verdicts)?;
    c.value.validate()?;
    Ok(c)
}

/// Reads and checks a model's advice answer.
pub fn advice_from_answer(v: &Value) -> Result<Checked<Advice>, String> {
    let c = repair::advice(v)?;
    validate_advice(&c.value)?;
    Ok(c)
}

/// Reads and checks a model's report answer.
pub fn summary_from_answer(v: &Value) -> Result<Checked<String>, String> {
    let c = repair::summary(v)?;
    validate_summary(&c.value)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_come_from_the_types_and_are_strict() {
        let s = stage_schema(Stage::Signal);
        let props = s["properties"].as_object().expect("properties");
        // Only the judgment: what the runner holds is not asked for.
        let keys: Vec<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(keys, ["action", "confidence", "reasoning", "strategies"]);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(props["action"]["enum"], json!(["BUY", "SELL", "HOLD"]));
        assert_eq!(
            props["strategies"]["items"]["enum"],
            json!([
                "rsi_reversal",
                "macd_cross",
                "bollinger_bounce",
                "ema_trend",
                "volume_breakout",
                "momentum"
            ]),
            "a model picks the strategies' names from the runner's"
        );
        assert!(!s.to_string().contains("$ref"), "subschemas inlined");
        let required = s["required"].as_array().expect("required");
        assert_eq!(required.len(), props.len(), "every field required");
        assert!(
            stage_schema(Stage::Advise)["properties"]
                .get("max_position_size")
                .is_some()
        );
        assert!(
            stage_schema(Stage::Report)["properties"]
                .get("summary")
                .is_some()
        );
    }
}
