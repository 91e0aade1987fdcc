//! Reading a model's answer: derive what can be derived, repair unambiguous slips, reject
//! only what cannot be trusted.
//!
//! | in the answer | what happens |
//! |---|---|
//! | not a JSON object, a required field missing or of the wrong type | rejected |
//! | `action` / a strategy's `signal` outside BUY, SELL, HOLD (after trimming and upper-casing) | rejected |
//! | a number that is not finite, or outside its range | rejected (never clamped) |
//! | a `symbol` other than the one asked about (after trimming and upper-casing) | rejected |
//! | the strategy counts (`strategies_*`) | ignored: derived from `strategy_breakdown`, so a published signal always agrees with its breakdown; a disagreement is a repair |
//! | whitespace around text, a lower-case action or symbol | repaired |
//! | text longer than its limit | truncated, ending in [`TRUNCATION_MARK`], repaired |
//! | an advice with `valid: false` and a position size above 0 | size set to 0 (the cautious reading), repaired |
//! | more than 20 risk warnings, empty warnings | the first 20 non-empty kept, repaired |
//! | a field the schema does not have | dropped, repaired |
//!
//! Every answer read ends in one [`Outcome`], counted by the caller
//! (`agent_outputs_total{stage,outcome}`), and a repair or rejection carries its reasons.

use serde_json::{Map, Value};

use super::{
    MAX_REASONING_CHARS, MAX_STRATEGIES, MAX_SUMMARY_CHARS, MAX_WARNING_CHARS, MAX_WARNINGS,
    SignalDraft,
};
use crate::model::{Action, Advice, StrategyVerdict, TopStrategy};

/// Ends a text that was cut to its limit, so a reader sees it was cut.
pub const TRUNCATION_MARK: &str = " […]";

/// How an answer was taken (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Used as given.
    Accepted,
    /// Used after repairs.
    Repaired,
    /// Not used.
    Rejected,
}

impl Outcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Repaired => "repaired",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A usable answer and the repairs it needed (empty: accepted as given).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<T> {
    /// The value to use.
    pub value: T,
    /// What was repaired, one phrase each.
    pub repairs: Vec<String>,
}

impl<T> Checked<T> {
    /// `Accepted` or `Repaired`.
    pub fn outcome(&self) -> Outcome {
        if self.repairs.is_empty() {
            Outcome::Accepted
        } else {
            Outcome::Repaired
        }
    }
}

/// Reads one object field by field, collecting repairs; every error names the field.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    known: &'static [&'static str],
    prefix: String,
    repairs: Vec<String>,
}

type Check<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn new(v: &'a Value, known: &'static [&'static str], prefix: &str) -> Check<Self> {
        let obj = v.as_object().ok_or_else(|| {
            if prefix.is_empty() {
                "the answer is not a JSON object".to_string()
            } else {
                format!("{prefix} is not an object")
            }
        })?;
        let mut r = Reader {
            obj,
            known,
            prefix: prefix.to_string(),
            repairs: vec![],
        };
        let mut unknown: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        unknown.sort_unstable();
        for k in unknown {
            let name = r.name(k);
            r.repairs.push(format!("dropped unknown field {name}"));
        }
        Ok(r)
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&self, key: &str) -> Check<&'a Value> {
        debug_assert!(self.known.contains(&key));
        self.obj
            .get(key)
            .filter(|v| !v.is_null())
            .ok_or_else(|| format!("{} is missing", self.name(key)))
    }

    fn string(&mut self, key: &str) -> Check<String> {
        let v = self.get(key)?;
        let s = v
            .as_str()
            .ok_or_else(|| format!("{} is not a string", self.name(key)))?;
        let t = s.trim();
        if t.len() != s.len() {
            let name = self.name(key);
            self.repairs
                .push(format!("trimmed whitespace around {name}"));
        }
        Ok(t.to_string())
    }

    /// Non-empty text, truncated to `max` characters with a visible mark.
    fn text(&mut self, key: &str, max: usize) -> Check<String> {
        let s = self.string(key)?;
        if s.is_empty() {
            return Err(format!("{} is empty", self.name(key)));
        }
        let (s, cut) = truncate(s, max);
        if let Some(n) = cut {
            let name = self.name(key);
            self.repairs
                .push(format!("truncated {name} from {n} to {max} characters"));
        }
        Ok(s)
    }

    fn action(&mut self, key: &str) -> Check<Action> {
        let raw = self.get(key)?;
        let s = raw
            .as_str()
            .ok_or_else(|| format!("{} is not a string", self.name(key)))?;
        let norm = s.trim().to_ascii_uppercase();
        let a = match norm.as_str() {
            "BUY" => Action::Buy,
            "SELL" => Action::Sell,
            "HOLD" => Action::Hold,
            _ => {
                return Err(format!(
                    "{} {:?} is not BUY, SELL or HOLD",
                    self.name(key),
                    s.chars().take(40).collect::<String>()
                ));
            }
        };
        if norm != s {
            let name = self.name(key);
            self.repairs.push(format!("normalised {name} {s:?}"));
        }
        Ok(a)
    }

    fn unit(&self, key: &str) -> Check<f64> {
        let v = self.get(key)?;
        let x = v
            .as_f64()
            .ok_or_else(|| format!("{} is not a number", self.name(key)))?;
        unit_interval(&self.name(key), x)?;
        Ok(x)
    }

    fn boolean(&self, key: &str) -> Check<bool> {
        self.get(key)?
            .as_bool()
            .ok_or_else(|| format!("{} is not true or false", self.name(key)))
    }

    fn array(&self, key: &str) -> Check<&'a Vec<Value>> {
        self.get(key)?
            .as_array()
            .ok_or_else(|| format!("{} is not an array", self.name(key)))
    }
}

/// A number that is finite and within [0, 1], or why not.
pub fn unit_interval(name: &str, v: f64) -> Result<(), String> {
    if !v.is_finite() {
        return Err(format!("{name} is not a finite number"));
    }
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{name} {v} is outside [0, 1]"));
    }
    Ok(())
}

/// `s` cut to `max` characters (the mark included) when longer; the original length if cut.
pub fn truncate(s: String, max: usize) -> (String, Option<usize>) {
    let n = s.chars().count();
    if n <= max {
        return (s, None);
    }
    let keep = max.saturating_sub(TRUNCATION_MARK.chars().count());
    let mut out: String = s
        .chars()
        .take(keep)
        .collect::<String>()
        .trim_end()
        .to_string();
    out.push_str(TRUNCATION_MARK);
    (out, Some(n))
}

/// Fields of the signal the runner fills itself. A model that still sends them (an older
/// prompt, an agent with its own instructions) is not wrong about its judgment: they are
/// ignored, each noted as a repair, never trusted.
const RUNNER_FILLED: &[&str] = &[
    "symbol",
    "top_strategy",
    "strategy_breakdown",
    "strategies_analyzed",
    "strategies_bullish",
    "strategies_bearish",
    "strategies_neutral",
    "market_context",
];

/// The signal stage's answer: the model's judgment only (action, confidence, reasoning, the
/// strategies it relied on, by name). Everything else comes from what the runner computed,
/// `verdicts` (each strategy's verdict and parameters): the breakdown is all of them, the
/// top strategy the first one the model relied on (else the best-scoring one that agrees
/// with its action, else the best-scoring one).
pub fn judgment(
    v: &Value,
    verdicts: &[(StrategyVerdict, Value)],
) -> Result<Checked<SignalDraft>, String> {
    const KNOWN: &[&str] = &[
        "action",
        "confidence",
        "reasoning",
        "strategies",
        "symbol",
        "top_strategy",
        "strategy_breakdown",
        "strategies_analyzed",
        "strategies_bullish",
        "strategies_bearish",
        "strategies_neutral",
        "market_context",
    ];
    let mut r = Reader::new(v, KNOWN, "")?;
    for key in RUNNER_FILLED {
        if r.obj.contains_key(*key) {
            r.repairs
                .push(format!("ignored {key}: the runner fills it"));
        }
    }
    let action = r.action("action")?;
    let confidence = r.unit("confidence")?;
    let reasoning = r.text("reasoning", MAX_REASONING_CHARS)?;
    let mut relied: Vec<usize> = vec![];
    if let Some(list) = r.obj.get("strategies").filter(|v| !v.is_null()) {
        let items = list
            .as_array()
            .ok_or_else(|| "strategies is not a list of names".to_string())?;
        if items.len() > MAX_STRATEGIES {
            return Err(format!(
                "strategies has {} entries, at most {MAX_STRATEGIES}",
                items.len()
            ));
        }
        for (n, item) in items.iter().enumerate() {
            let Some(name) = item.as_str() else {
                return Err(format!("strategies[{n}] is not a name"));
            };
            let wanted = name.trim();
            match verdicts
                .iter()
                .position(|(v, _)| v.name.eq_ignore_ascii_case(wanted))
            {
                Some(i) if relied.contains(&i) => {
                    r.repairs
                        .push(format!("dropped repeated strategy {wanted:?}"));
                }
                Some(i) => {
                    if verdicts[i].0.name != name {
                        r.repairs.push(format!("normalised strategy name {name:?}"));
                    }
                    relied.push(i);
                }
                None => r.repairs.push(format!(
                    "dropped unknown strategy {:?}",
                    wanted.chars().take(40).collect::<String>()
                )),
            }
        }
    }
    let best = |agreeing: bool| {
        verdicts
            .iter()
            .enumerate()
            .filter(|(_, (v, _))| !agreeing || v.signal == action)
            .max_by(|a, b| a.1.0.score.total_cmp(&b.1.0.score))
            .map(|(i, _)| i)
    };
    let top = relied
        .first()
        .copied()
        .or_else(|| best(true))
        .or_else(|| best(false));
    let top_strategy = match top {
        Some(i) => {
            let (v, params) = &verdicts[i];
            TopStrategy {
                name: v.name.clone(),
                score: v.score,
                signal: v.signal,
                parameters: params.as_object().cloned().unwrap_or_default(),
            }
        }
        None => return Err("no strategy was evaluated".into()),
    };
    Ok(Checked {
        value: SignalDraft {
            action,
            confidence,
            reasoning,
            top_strategy,
            strategy_breakdown: verdicts.iter().map(|(v, _)| v.clone()).collect(),
        },
        repairs: r.repairs,
    })
}

/// The advise stage's answer.
pub fn advice(v: &Value) -> Result<Checked<Advice>, String> {
    let mut r = Reader::new(v, &["valid", "max_position_size", "risk_warnings"], "")?;
    let valid = r.boolean("valid")?;
    let mut size = r.unit("max_position_size")?;
    if !valid && size > 0.0 {
        r.repairs.push(format!(
            "max_position_size {size} with valid = false set to 0"
        ));
        size = 0.0;
    }
    let items = r.array("risk_warnings")?;
    let mut warnings = Vec::new();
    let mut dropped_empty = 0;
    for (i, w) in items.iter().enumerate() {
        let s = w
            .as_str()
            .ok_or_else(|| format!("risk_warnings[{i}] is not a string"))?;
        let t = s.trim();
        if t.is_empty() {
            dropped_empty += 1;
            continue;
        }
        if t.len() != s.len() {
            r.repairs
                .push(format!("trimmed whitespace around risk_warnings[{i}]"));
        }
        let (t, cut) = truncate(t.to_string(), MAX_WARNING_CHARS);
        if let Some(n) = cut {
            r.repairs.push(format!(
                "truncated risk_warnings[{i}] from {n} to {MAX_WARNING_CHARS} characters"
            ));
        }
        warnings.push(t);
    }
    if dropped_empty > 0 {
        r.repairs
            .push(format!("dropped {dropped_empty} empty risk warnings"));
    }
    if warnings.len() > MAX_WARNINGS {
        r.repairs.push(format!(
            "kept the first {MAX_WARNINGS} of {} risk warnings",
            warnings.len()
        ));
        warnings.truncate(MAX_WARNINGS);
    }
    Ok(Checked {
        value: Advice {
            valid,
            max_position_size: size,
            risk_warnings: warnings,
        },
        repairs: r.repairs,
    })
}

/// The report stage's answer.
pub fn summary(v: &Value) -> Result<Checked<String>, String> {
    let mut r = Reader::new(v, &["summary"], "")?;
    let s = r.text("summary", MAX_SUMMARY_CHARS)?;
    Ok(Checked {
        value: s,
        repairs: r.repairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({
            "action": "BUY", "confidence": 0.7,
            "reasoning": "Trend and momentum agree.",
            "strategies": ["momentum", "ema_trend"]
        })
    }

    /// What the runner computed: three strategies, their verdicts and parameters.
    fn verdicts() -> Vec<(StrategyVerdict, Value)> {
        let v = |name: &str, signal, score| {
            (
                StrategyVerdict {
                    name: name.into(),
                    signal,
                    score,
                },
                json!({"period": 14}),
            )
        };
        vec![
            v("ema_trend", Action::Buy, 0.8),
            v("momentum", Action::Buy, 0.6),
            v("rsi_reversal", Action::Hold, 0.9),
        ]
    }

    fn with(k: &str, v: Value) -> Value {
        let mut a = good();
        a[k] = v;
        a
    }

    fn read(v: &Value) -> Result<Checked<SignalDraft>, String> {
        judgment(v, &verdicts())
    }

    #[test]
    fn the_runner_fills_the_breakdown_and_the_top_strategy_from_what_it_computed() {
        let c = read(&good()).expect("accepted");
        assert_eq!(c.outcome(), Outcome::Accepted, "{:?}", c.repairs);
        assert_eq!(c.value.strategy_breakdown.len(), 3);
        // The first strategy the model relied on, with the runner's score and parameters.
        assert_eq!(c.value.top_strategy.name, "momentum");
        assert_eq!(c.value.top_strategy.score, 0.6);
        assert_eq!(c.value.top_strategy.parameters["period"], 14);
        // None named: the best-scoring strategy that agrees with the action (not the best
        // overall, which says HOLD).
        let mut a = good();
        a.as_object_mut().expect("obj").remove("strategies");
        let c = read(&a).expect("accepted");
        assert_eq!(c.value.top_strategy.name, "ema_trend");
        let c = read(&with("action", json!("SELL"))).expect("accepted");
        assert_eq!(
            c.value.top_strategy.name, "momentum",
            "still the one relied on"
        );
    }

    #[test]
    fn slips_are_repaired_with_reasons() {
        let cases: Vec<(Value, &str)> = vec![
            (
                with("strategies_analyzed", json!(0)),
                "ignored strategies_analyzed: the runner fills it",
            ),
            (
                with("symbol", json!("USD")),
                "ignored symbol: the runner fills it",
            ),
            (
                with(
                    "strategy_breakdown",
                    json!([{"name": "", "signal": "BUY", "score": 2}]),
                ),
                "ignored strategy_breakdown",
            ),
            (
                with("reasoning", json!("  padded  ")),
                "trimmed whitespace around reasoning",
            ),
            (with("action", json!("buy")), "normalised action"),
            (
                with("reasoning", json!("x".repeat(2500))),
                "truncated reasoning from 2500 to 2000",
            ),
            (with("mood", json!("bullish")), "dropped unknown field mood"),
            (
                with("strategies", json!(["Momentum"])),
                "normalised strategy name \"Momentum\"",
            ),
            (
                with("strategies", json!(["momentum", "astrology"])),
                "dropped unknown strategy \"astrology\"",
            ),
            (
                with("strategies", json!(["momentum", "momentum"])),
                "dropped repeated strategy",
            ),
        ];
        for (answer, needle) in cases {
            let c = read(&answer).unwrap_or_else(|e| panic!("{needle}: {e}"));
            assert_eq!(c.outcome(), Outcome::Repaired, "{needle}");
            assert!(
                c.repairs.iter().any(|r| r.contains(needle)),
                "{needle}: {:?}",
                c.repairs
            );
        }
        let long = read(&with("reasoning", json!("y".repeat(2500)))).expect("ok");
        assert_eq!(long.value.reasoning.chars().count(), MAX_REASONING_CHARS);
        assert!(long.value.reasoning.ends_with(TRUNCATION_MARK));
    }

    #[test]
    fn what_cannot_be_trusted_is_rejected_with_the_field_named() {
        let mut no_reasoning = good();
        no_reasoning
            .as_object_mut()
            .expect("obj")
            .remove("reasoning");
        let cases: Vec<(Value, &str)> = vec![
            (
                with("action", json!("STRONG_BUY")),
                "action \"STRONG_BUY\" is not BUY",
            ),
            (
                with("confidence", json!(1.5)),
                "confidence 1.5 is outside [0, 1]",
            ),
            (
                with("confidence", json!(-0.2)),
                "confidence -0.2 is outside",
            ),
            (
                with("confidence", json!("0.7")),
                "confidence is not a number",
            ),
            (no_reasoning, "reasoning is missing"),
            (with("reasoning", json!("   ")), "reasoning is empty"),
            (json!([1, 2]), "not a JSON object"),
            (
                with("strategies", json!("momentum")),
                "strategies is not a list",
            ),
            (
                with("strategies", json!([1])),
                "strategies[0] is not a name",
            ),
            (
                with("strategies", Value::Array(vec![json!("momentum"); 65])),
                "at most 64",
            ),
        ];
        for (answer, needle) in cases {
            let e = read(&answer).expect_err(needle);
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn advice_and_summary() {
        let ok = advice(
            &json!({"valid": true, "max_position_size": 0.05, "risk_warnings": ["Thin book."]}),
        )
        .expect("ok");
        assert_eq!(ok.outcome(), Outcome::Accepted);
        let r = advice(
            &json!({"valid": false, "max_position_size": 0.2, "risk_warnings": [" a ", "", "b"]}),
        )
        .expect("repaired");
        assert_eq!(r.value.max_position_size, 0.0);
        assert_eq!(r.value.risk_warnings, vec!["a", "b"]);
        assert_eq!(r.repairs.len(), 3, "{:?}", r.repairs);
        let many = advice(
            &json!({"valid": true, "max_position_size": 0.1, "risk_warnings": vec!["w"; 25]}),
        )
        .expect("ok");
        assert_eq!(many.value.risk_warnings.len(), 20);
        for bad in [
            json!({"valid": true, "max_position_size": 1.5, "risk_warnings": []}),
            json!({"valid": "yes", "max_position_size": 0.1, "risk_warnings": []}),
            json!({"valid": true, "max_position_size": 0.1, "risk_warnings": [3]}),
        ] {
            assert!(advice(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            summary(&json!({"summary": "Fine."})).expect("ok").outcome(),
            Outcome::Accepted
        );
        let s = summary(&json!({"summary": "z".repeat(1300)})).expect("cut");
        assert_eq!(s.value.chars().count(), MAX_SUMMARY_CHARS);
        assert!(summary(&json!({"summary": " "})).is_err());
        assert_eq!(
            summary(&json!({"summary": "<script>alert(1)</script> stays text"}))
                .expect("ok")
                .value,
            "<script>alert(1)</script> stays text"
        );
    }
}
