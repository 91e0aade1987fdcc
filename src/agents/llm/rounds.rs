//! The conversation layer: the turns of one stage call. A model may ask for tools (each round
//! is run and answered, at most `agents.max_tool_rounds` of them) and an answer that is
//! rejected is said back once with its errors. Every turn is a request like any other: it
//! goes down the stack (cache, retry, admission, hedge, send) under the stage's deadline.

use std::sync::Mutex;

use serde_json::{Value, json};

use super::{LlmAgent, LlmReply, LlmRequest, Read, Step};
use crate::agents::repair::{Checked, Outcome};
use crate::agents::{AgentError, CallLimits};
use crate::telemetry::names;

/// The most distinct tool names a signal lists in `tools_used`.
const MAX_TOOLS_USED: usize = 16;
/// The longest tool name carried into a message or a refusal (a model may invent any).
const MAX_TOOL_NAME: usize = 64;

/// The follow-up turn after a rejected answer: what was wrong, and what to do.
fn reprompt_text(reason: &str) -> String {
    format!(
        "Your answer was rejected: {reason}. Answer again with exactly one corrected JSON object that follows the schema, and nothing else."
    )
}

impl LlmAgent {
    /// Runs the stage's turns until the model answers: its checked answer and the tools that
    /// ran for it.
    pub(super) async fn converse<T>(
        &self,
        mut req: LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
    ) -> Result<(Checked<T>, Vec<String>), AgentError> {
        let stage = req.stage.as_str();
        let mut tools_used: Vec<String> = vec![];
        let mut round = 0;
        // One follow-up turn per stage call shows the model what was wrong with an answer
        // that was rejected; the answer it rejected is kept here by the reader.
        let mut reprompted = false;
        let rejected: Mutex<Option<Value>> = Mutex::new(None);
        let tracked = |v: &Value| {
            let r = read(v);
            if r.is_err() {
                *rejected.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.clone());
            }
            r
        };
        loop {
            let step = match self.remembered(&req, limits, &tracked).await {
                Ok(step) => step,
                Err(AgentError::InvalidOutput(reason)) if !reprompted => {
                    // Said back once, with the exact errors, under the same budget, rate
                    // limit and deadline as any request.
                    reprompted = true;
                    tracing::info!(stage, symbol = req.symbol, cycle_id = %req.cycle_id, reason = %reason, "model answer rejected; asking once more with its errors");
                    let previous = rejected.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(v) = previous {
                        req.conversation
                            .push(json!({"role": "assistant", "content": v.to_string()}));
                    }
                    req.conversation
                        .push(json!({"role": "user", "content": reprompt_text(&reason)}));
                    continue;
                }
                Err(e) => {
                    if reprompted {
                        let outcome = if matches!(e, AgentError::InvalidOutput(_)) {
                            "still_invalid"
                        } else {
                            "failed"
                        };
                        self.count_reprompt(stage, outcome);
                    }
                    return Err(e);
                }
            };
            let reply = match step {
                Step::Answer(checked) => {
                    if reprompted {
                        self.count_reprompt(stage, "fixed");
                    }
                    return Ok((checked, tools_used));
                }
                Step::Tools(reply) => reply,
            };
            round += 1;
            if round > self.shared.max_tool_rounds {
                // Counted as the answer it stands in for: a rejected one.
                self.shared
                    .health
                    .count_output(stage, Outcome::Rejected.as_str());
                return Err(AgentError::InvalidOutput(format!(
                    "the model still asked for tools after {} rounds (agents.max_tool_rounds); no answer",
                    self.shared.max_tool_rounds
                )));
            }
            self.run_tools(&mut req, reply, limits, &mut tools_used)
                .await?;
        }
    }

    fn count_reprompt(&self, stage: &'static str, outcome: &'static str) {
        metrics::counter!(names::AGENT_REPROMPTS, "stage" => stage, "outcome" => outcome)
            .increment(1);
        self.shared.health.count_reprompt(outcome);
    }

    /// One tool round: each call the model asked for runs (only those offered to the stage)
    /// and its result, or its coded error, goes back into the conversation.
    async fn run_tools(
        &self,
        req: &mut LlmRequest<'_>,
        reply: LlmReply,
        limits: CallLimits,
        tools_used: &mut Vec<String>,
    ) -> Result<(), AgentError> {
        let Some(runner) = &self.shared.tools else {
            return Err(AgentError::InvalidOutput(
                "answered with a tool call instead of JSON content".into(),
            ));
        };
        req.conversation.push(reply.assistant);
        for call in &reply.tool_calls {
            let offered = self.offered.contains(&call.name);
            let result = match self.tool_arguments(req, offered, &call.name, &call.arguments) {
                // A call the deadline cuts short ends the stage like a slow model would.
                Ok(args) => {
                    match tokio::time::timeout_at(limits.until, runner.run(&call.name, &args)).await
                    {
                        Ok(r) => r,
                        Err(_) => return Err(AgentError::Timeout(None)),
                    }
                }
                Err(refusal) => Err(refusal),
            };
            tracing::debug!(stage = req.stage.as_str(), symbol = req.symbol, tool = %call.name, ok = result.is_ok(), "model tool call");
            // What ran, not what was asked for: a name the stage was not offered is the
            // model's guess, and a guess is not a source of the signal.
            if offered && !tools_used.contains(&call.name) && tools_used.len() < MAX_TOOLS_USED {
                tools_used.push(call.name.chars().take(MAX_TOOL_NAME).collect());
            }
            let content = match result {
                Ok(v) | Err(v) => v.to_string(),
            };
            req.conversation.push(json!({
                "role": "tool",
                "tool_call_id": call.id,
                "content": content,
            }));
        }
        Ok(())
    }

    /// The arguments of a call the stage may make, or the coded refusal the model is shown.
    fn tool_arguments(
        &self,
        req: &LlmRequest<'_>,
        offered: bool,
        name: &str,
        arguments: &str,
    ) -> Result<Value, Value> {
        if !offered {
            // Only what was offered runs: a model that guesses another tool's name is told
            // what it may call, as any other refused call is.
            let may = if self.offered.is_empty() {
                "none".to_string()
            } else {
                self.offered.join(", ")
            };
            return Err(json!({"error": {"code": "UNKNOWN_TOOL", "message": format!(
                "{:?} is not offered to the {} stage; it may call {may}",
                name.chars().take(MAX_TOOL_NAME).collect::<String>(),
                req.stage.as_str(),
            )}}));
        }
        serde_json::from_str::<Value>(arguments).map_err(|e| {
            json!({"error": {"code": "INVALID_ARGUMENTS", "message": format!("arguments are not JSON: {e}")}})
        })
    }
}
