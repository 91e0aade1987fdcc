//! The hedge layer: a request that runs past its stage's observed p95 may get one identical
//! backup request (within `agents.hedge.max_extra_fraction` of all calls). The first answer
//! that reads well wins; the other request is dropped (cancelled). Every reservation is
//! settled to what its request used — a request dropped in flight to what its twin used.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;
use tokio::time::Instant;

use super::{LlmAgent, LlmReply, LlmRequest, Read, Reservation, Step};
use crate::agents::{AgentError, CallLimits};
use crate::resilience::Slot;
use crate::telemetry::names;

/// Which of two identical requests a result came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Primary,
    Backup,
}

impl Leg {
    fn index(self) -> usize {
        usize::from(self == Leg::Backup)
    }
}

/// What a failed request spent: one given up on was still being worked on, so the endpoint
/// spent what was reserved for it, as far as anyone can tell; any other failure, nothing.
fn spent_by(e: &AgentError, estimate: u64) -> u64 {
    if e.is_timeout() { estimate } else { 0 }
}

fn used(reply: &LlmReply) -> u64 {
    reply.usage.input + reply.usage.output
}

impl LlmAgent {
    /// The admitted request, sent; with a backup when it runs past the stage's p95 and the
    /// hedge budget, the budget and the endpoint's limit allow one.
    pub(super) async fn hedged<T>(
        &self,
        req: &LlmRequest<'_>,
        limits: CallLimits,
        read: Read<'_, T>,
        estimate: u64,
        reservation: Reservation,
        slot: Option<Slot>,
    ) -> Result<Step<T>, AgentError> {
        // The per-call deadline starts once the request can go: rate-limit waits are not the
        // model's latency.
        let deadline = limits.request_deadline();
        let started = Instant::now();
        let hedge_at = self
            .shared
            .hedge
            .as_ref()
            .and_then(|_| self.shared.latencies.stage_p95(req.stage.as_str()))
            .map(|p95| started + p95)
            .filter(|at| *at < deadline);
        let primary = self.timed_call(req, limits, deadline, slot);
        tokio::pin!(primary);
        let backup = match hedge_at {
            None => None,
            Some(at) => tokio::select! {
                // A primary that answers at the hedge instant needs no backup.
                biased;
                r = primary.as_mut() => return self.settled_one(req, r, read, estimate, reservation),
                _ = tokio::time::sleep_until(at) => self.admit_backup(estimate).await,
            },
        };
        let Some((backup_reservation, backup_slot)) = backup else {
            let r = primary.await;
            return self.settled_one(req, r, read, estimate, reservation);
        };
        tracing::info!(
            stage = req.stage.as_str(),
            symbol = req.symbol,
            after_ms = Instant::now().duration_since(started).as_millis() as u64,
            "agent call past the stage's p95; sending a backup request"
        );
        let backup = self.timed_call(req, limits, deadline, backup_slot);
        let (winner, used_by) = self.race(req, read, estimate, primary, backup).await;
        // A request dropped in flight is charged what its twin used: the provider bills it
        // all the same, and the identical request is the best estimate there is.
        let twin = used_by.iter().flatten().copied().max().unwrap_or(0);
        for (leg, r) in [
            (Leg::Primary, reservation),
            (Leg::Backup, backup_reservation),
        ] {
            let spent = used_by[leg.index()].unwrap_or(twin);
            self.shared.budget.settle(r, spent, Utc::now());
        }
        winner
    }

    /// One request's result, read, with its reservation settled.
    fn settled_one<T>(
        &self,
        req: &LlmRequest<'_>,
        r: Result<LlmReply, AgentError>,
        read: Read<'_, T>,
        estimate: u64,
        reservation: Reservation,
    ) -> Result<Step<T>, AgentError> {
        let (out, spent) = match r {
            Ok(reply) => (self.read_reply(req, &reply, read), used(&reply)),
            Err(e) => {
                self.on_request_error(req, &e);
                let spent = spent_by(&e, estimate);
                (Err(e), spent)
            }
        };
        self.shared.budget.settle(reservation, spent, Utc::now());
        out
    }

    /// Races the two requests; a failed or unreadable result waits for the other. Returns the
    /// outcome and what each leg used (`None`: dropped in flight).
    async fn race<T>(
        &self,
        req: &LlmRequest<'_>,
        read: Read<'_, T>,
        estimate: u64,
        mut primary: std::pin::Pin<&mut impl Future<Output = Result<LlmReply, AgentError>>>,
        backup: impl Future<Output = Result<LlmReply, AgentError>>,
    ) -> (Result<Step<T>, AgentError>, [Option<u64>; 2]) {
        // The backup future only sends when first polled: a primary that is ready on the
        // first poll wins before the backup ever went out.
        let backup_sent = AtomicBool::new(false);
        let backup = async {
            backup_sent.store(true, Ordering::Relaxed);
            backup.await
        };
        tokio::pin!(backup);
        let (mut primary_done, mut backup_done) = (false, false);
        let mut used_by: [Option<u64>; 2] = [None, None];
        let mut last_err: Option<AgentError> = None;
        let mut winner: Option<(Leg, Step<T>)> = None;
        while winner.is_none() && !(primary_done && backup_done) {
            let (leg, r) = tokio::select! {
                r = primary.as_mut(), if !primary_done => { primary_done = true; (Leg::Primary, r) }
                r = backup.as_mut(), if !backup_done => { backup_done = true; (Leg::Backup, r) }
            };
            match r {
                Ok(reply) => {
                    used_by[leg.index()] = Some(used(&reply));
                    match self.read_reply(req, &reply, read) {
                        Ok(c) => winner = Some((leg, c)),
                        Err(e) => last_err = Some(e),
                    }
                }
                Err(e) => {
                    self.on_request_error(req, &e);
                    used_by[leg.index()] = Some(spent_by(&e, estimate));
                    last_err = Some(e);
                }
            }
        }
        let won = winner.as_ref().map(|(leg, _)| *leg);
        if backup_sent.load(Ordering::Relaxed) {
            let outcome = if won == Some(Leg::Backup) {
                "won"
            } else {
                "lost"
            };
            metrics::counter!(names::AGENT_HEDGES, "stage" => req.stage.as_str(), "outcome" => outcome)
                .increment(1);
        } else {
            // The primary answered before the backup was ever sent: it was no extra call.
            if let Some(h) = &self.shared.hedge {
                h.refund();
            }
            used_by[Leg::Backup.index()] = Some(0);
        }
        let out = match winner {
            Some((_, c)) => Ok(c),
            None => Err(last_err.unwrap_or(AgentError::Timeout(None))),
        };
        (out, used_by)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use serde_json::json;

    use super::super::*;
    use super::*;
    use crate::agents::repair::Checked;
    use crate::resilience::{Backoff, Breaker, CallLatencies, HedgeBudget};

    /// An in-process transport with scripted answer times, for the hedging mechanism on the
    /// paused clock (the HTTP path is tested against the test LLM server).
    struct Scripted {
        delays: Mutex<std::collections::VecDeque<Duration>>,
        default: Duration,
        calls: AtomicU64,
    }

    #[async_trait]
    impl Transport for Scripted {
        fn backend(&self) -> &'static str {
            "scripted"
        }
        async fn call(&self, _: &LlmRequest<'_>, _: Instant) -> Result<LlmReply, AgentError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let d = self
                .delays
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(self.default);
            tokio::time::sleep(d).await;
            Ok(LlmReply::answer(
                json!({"summary": "Fine."}),
                Usage {
                    input: 10,
                    output: 5,
                },
            ))
        }
        async fn health(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn hedging_agent(
        t: Arc<Scripted>,
        hedge: Option<Arc<HedgeBudget>>,
    ) -> (LlmAgent, Arc<LlmShared>) {
        let shared = Arc::new(LlmShared {
            limiter: Arc::new(crate::resilience::RateLimiter::new(10_000, 1_000)),
            budget: Arc::new(TokenBudget::new(None, None)),
            health: Arc::new(LlmHealth::default()),
            max_attempts: 1,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
                jitter: false,
            },
            fallback_rules: false,
            latencies: CallLatencies::new(200, Duration::from_secs(3600)),
            hedge,
            max_tokens: 100,
            tools: None,
            max_tool_rounds: 3,
            cache: None,
        });
        let breaker = Breaker::new(
            crate::resilience::BreakerKind::LlmOpenrouter,
            crate::resilience::BreakerSettings {
                failure_threshold: 100,
                recovery_timeout: Duration::from_secs(1),
                half_open_max_calls: 1,
                success_threshold: 1,
                mode: crate::resilience::BreakerMode::Normal,
            },
        );
        let agent = LlmAgent::new(t, "m".into(), None, breaker, shared.clone());
        (agent, shared)
    }

    async fn report_once(agent: &LlmAgent) -> Result<Checked<String>, AgentError> {
        let limits = CallLimits {
            until: Instant::now() + Duration::from_secs(600),
            per_call: Duration::from_secs(60),
        };
        let req = LlmRequest {
            stage: Stage::Report,
            symbol: "ETH/USD",
            cycle_id: crate::schedule::CycleId::new(Utc::now()),
            system: "s",
            user: "u".into(),
            schema_name: "report",
            schema: stage_schema(Stage::Report),
            model: "m",
            max_tokens: 100,
            tools: &[],
            conversation: vec![],
            structured: StructuredOutput::Auto,
        };
        match agent.attempt(&req, limits, &summary_from_answer).await? {
            Step::Answer(c) => Ok(c),
            Step::Tools(_) => Err(AgentError::InvalidOutput("tool call".into())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_straggler_gets_one_backup_past_the_stages_p95_and_the_first_answer_wins() {
        let t = Arc::new(Scripted {
            delays: Mutex::new(Default::default()),
            default: Duration::from_secs(1),
            calls: AtomicU64::new(0),
        });
        let (agent, shared) = hedging_agent(t.clone(), Some(Arc::new(HedgeBudget::new(0.1, 20.0))));
        // 20 calls of 1 s: the stage's p95 is 1 s, and 2 hedges are earned.
        for _ in 0..20 {
            report_once(&agent).await.expect("answer");
        }
        assert_eq!(
            shared.latencies.stage_p95("report"),
            Some(Duration::from_secs(1))
        );
        // The next call stalls 30 s; at 1 s a backup goes out and answers 1 s later.
        t.delays
            .lock()
            .unwrap()
            .extend([Duration::from_secs(30), Duration::from_secs(1)]);
        let t0 = Instant::now();
        let c = report_once(&agent).await.expect("the backup's answer");
        assert_eq!(c.value, "Fine.");
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(2));
        assert_eq!(t.calls.load(Ordering::Relaxed), 22);
        assert_eq!(shared.hedge.as_ref().unwrap().counts(), (21, 1));
        // Both requests are charged: the cancelled one at what its twin used.
        assert_eq!(shared.budget.used(Utc::now()).0, 21 * 15 + 15);
        assert_eq!(shared.budget.reserved(), 0);
        // A call that answers before its p95 sends nothing extra.
        let before = t.calls.load(Ordering::Relaxed);
        t.delays
            .lock()
            .unwrap()
            .push_back(Duration::from_millis(900));
        report_once(&agent).await.expect("answer");
        assert_eq!(t.calls.load(Ordering::Relaxed), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_stay_within_their_fraction_and_off_means_off() {
        let t = Arc::new(Scripted {
            delays: Mutex::new(vec![Duration::from_secs(1); 20].into()),
            // After the first 20, every call straggles (3 s against a p95 of 1 s at first).
            default: Duration::from_secs(3),
            calls: AtomicU64::new(0),
        });
        let (agent, shared) = hedging_agent(t.clone(), Some(Arc::new(HedgeBudget::new(0.1, 20.0))));
        for _ in 0..200 {
            report_once(&agent).await.expect("answer");
        }
        let (calls, hedges) = shared.hedge.as_ref().unwrap().counts();
        assert_eq!(calls, 200);
        assert!(
            hedges >= 1 && hedges <= calls / 10,
            "{hedges} hedges for {calls} calls"
        );
        assert_eq!(t.calls.load(Ordering::Relaxed), calls + hedges);

        let t = Arc::new(Scripted {
            delays: Mutex::new(vec![Duration::from_secs(1); 20].into()),
            default: Duration::from_secs(30),
            calls: AtomicU64::new(0),
        });
        let (agent, _) = hedging_agent(t.clone(), None);
        for _ in 0..25 {
            report_once(&agent).await.expect("answer");
        }
        assert_eq!(
            t.calls.load(Ordering::Relaxed),
            25,
            "hedging off: no backup ever"
        );
    }
}
