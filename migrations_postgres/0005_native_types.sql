-- PostgreSQL only: the history in the types an analyst expects. Migrations 0001–0004 are
-- shared with SQLite and keep one integer dialect there (Unix seconds, 0/1, JSON text);
-- here the same tables take PostgreSQL's own types, with the rows already stored converted
-- in place: times become timestamptz, 0/1 become boolean, the envelope jsonb, the ids uuid.
-- The rollup tables (signal_grade_sums, signal_calibrated_sums, signal_grade_returns) are the
-- scorecard's internal running sums, keyed by UTC day number; they keep their types.

ALTER TABLE signal_messages
    ALTER COLUMN message_id TYPE uuid USING message_id::uuid,
    ALTER COLUMN signal_id TYPE uuid USING signal_id::uuid,
    ALTER COLUMN cycle_at TYPE timestamptz USING to_timestamp(cycle_at),
    ALTER COLUMN published_at_ms TYPE timestamptz USING to_timestamp(published_at_ms / 1000.0),
    ALTER COLUMN data_as_of TYPE timestamptz USING to_timestamp(data_as_of),
    ALTER COLUMN is_degraded TYPE boolean USING is_degraded <> 0,
    ALTER COLUMN envelope TYPE jsonb USING envelope::jsonb,
    ADD CONSTRAINT signal_messages_stage_check CHECK (stage IN ('signal', 'score', 'advise', 'report')),
    ADD CONSTRAINT signal_messages_action_check CHECK (action IN ('BUY', 'SELL', 'HOLD')),
    ADD CONSTRAINT signal_messages_tier_check CHECK (tier IN ('HOT', 'GOOD', 'NEUTRAL', 'LOW'));
ALTER TABLE signal_messages RENAME COLUMN published_at_ms TO published_at;

-- One message per stage of a signal (the message id is derived from both): the key the
-- grades' foreign key points at. It replaces migration 0004's plain index on the same columns.
ALTER TABLE signal_messages ADD CONSTRAINT signal_messages_signal_stage UNIQUE (signal_id, stage);
DROP INDEX IF EXISTS signal_messages_signal;

ALTER TABLE signal_grades
    ALTER COLUMN signal_id TYPE uuid USING signal_id::uuid,
    ALTER COLUMN cycle_at TYPE timestamptz USING to_timestamp(cycle_at),
    ALTER COLUMN graded_at TYPE timestamptz USING to_timestamp(graded_at),
    ALTER COLUMN hit TYPE boolean USING hit <> 0,
    ALTER COLUMN hold_hit TYPE boolean USING hold_hit <> 0,
    ALTER COLUMN momentum_hit TYPE boolean USING momentum_hit <> 0,
    ADD COLUMN stage text NOT NULL DEFAULT 'signal',
    ADD CONSTRAINT signal_grades_stage_check CHECK (stage = 'signal'),
    ADD CONSTRAINT signal_grades_action_check CHECK (action IN ('BUY', 'SELL', 'HOLD')),
    ADD CONSTRAINT signal_grades_status_check CHECK (status IN ('graded', 'missing_price')),
    ADD CONSTRAINT signal_grades_backend_check CHECK (backend IN ('rules', 'llm')),
    ADD CONSTRAINT signal_grades_hit_check CHECK ((status = 'graded') = (hit IS NOT NULL));

-- A grade belongs to its signal's stage-1 message. Retention deletes grades with their
-- messages (the same cutoff); the cascade keeps that true for a hand-run DELETE too. Grades
-- whose message an older retention run already removed are kept (NOT VALID skips the check
-- of existing rows); every new grade is checked.
ALTER TABLE signal_grades ADD CONSTRAINT signal_grades_signal_fk
    FOREIGN KEY (signal_id, stage) REFERENCES signal_messages (signal_id, stage)
    ON DELETE CASCADE NOT VALID;

COMMENT ON TABLE signal_messages IS 'Every published stage message once (signal, score, advise, report), as published; written by autonomous-runner.';
COMMENT ON COLUMN signal_messages.message_id IS 'UUID v5 of (stage, signal_id): a re-publish or another replica''s copy is the same row.';
COMMENT ON COLUMN signal_messages.signal_id IS 'UUID v5 of (symbol, tick): the signal every stage of one symbol''s tick belongs to.';
COMMENT ON COLUMN signal_messages.stage IS 'signal, score, advise or report.';
COMMENT ON COLUMN signal_messages.symbol IS 'BASE/QUOTE, e.g. ETH/USD.';
COMMENT ON COLUMN signal_messages.cycle_id IS 'The tick as published (RFC 3339 text, the envelope''s cycle id).';
COMMENT ON COLUMN signal_messages.cycle_at IS 'The tick: the scheduled time of the cycle (what pages and retention go by).';
COMMENT ON COLUMN signal_messages.published_at IS 'When the message was published (the envelope''s timestamp).';
COMMENT ON COLUMN signal_messages.action IS 'The call: BUY, SELL or HOLD.';
COMMENT ON COLUMN signal_messages.confidence IS 'The confidence the agent stated, 0–1.';
COMMENT ON COLUMN signal_messages.tier IS 'The opportunity tier (HOT, GOOD, NEUTRAL, LOW), from the score stage on; NULL on signal-stage rows.';
COMMENT ON COLUMN signal_messages.model IS 'rules, or the LLM model that answered (metadata.model_used).';
COMMENT ON COLUMN signal_messages.top_strategy IS 'The best strategy''s name.';
COMMENT ON COLUMN signal_messages.price IS 'market_context.current_price: the last close the signal saw.';
COMMENT ON COLUMN signal_messages.data_as_of IS 'The time of that price (the newest candle''s close).';
COMMENT ON COLUMN signal_messages.is_degraded IS 'Produced by the rules fallback instead of the configured agent.';
COMMENT ON COLUMN signal_messages.envelope IS 'The message exactly as published (payload, metadata, ids).';
COMMENT ON COLUMN signal_messages.calibrated_confidence IS 'The calibrated probability of a hit the signal carried; NULL when not calibrated.';
COMMENT ON COLUMN signal_messages.price_change_1h IS 'The last hour''s return the signal saw (the momentum baseline''s call).';

COMMENT ON TABLE signal_grades IS 'One grade per (signal, horizon): what the market did after the signal; recorded once across every replica.';
COMMENT ON COLUMN signal_grades.signal_id IS 'The signal graded (its signal-stage message in signal_messages).';
COMMENT ON COLUMN signal_grades.horizon_seconds IS 'How long after the signal''s price it was judged, in seconds (300, 900, 3600 by default).';
COMMENT ON COLUMN signal_grades.symbol IS 'Copied from the signal.';
COMMENT ON COLUMN signal_grades.action IS 'Copied from the signal: BUY, SELL or HOLD.';
COMMENT ON COLUMN signal_grades.confidence IS 'The stated confidence, 0–1.';
COMMENT ON COLUMN signal_grades.confidence_bucket IS 'floor(confidence × 10), 0–9.';
COMMENT ON COLUMN signal_grades.tier IS 'The score stage''s tier; NONE when the signal was not scored.';
COMMENT ON COLUMN signal_grades.backend IS 'rules (the rules agent or its fallback) or llm.';
COMMENT ON COLUMN signal_grades.model IS 'rules, or the LLM model.';
COMMENT ON COLUMN signal_grades.strategy IS 'The signal''s top strategy; NONE when absent.';
COMMENT ON COLUMN signal_grades.cycle_at IS 'The signal''s tick.';
COMMENT ON COLUMN signal_grades.price_then IS 'The signal''s price.';
COMMENT ON COLUMN signal_grades.price_after IS 'The close of the candle ending at data_as_of + horizon; NULL when the source had none.';
COMMENT ON COLUMN signal_grades.return_fraction IS '(price_after − price_then) / price_then; NULL with a missing price.';
COMMENT ON COLUMN signal_grades.hit IS 'BUY above +threshold, SELL below −threshold, HOLD within ±threshold (history.grading.threshold_pct); NULL with a missing price.';
COMMENT ON COLUMN signal_grades.status IS 'graded, or missing_price.';
COMMENT ON COLUMN signal_grades.graded_at IS 'When the grade was recorded.';
COMMENT ON COLUMN signal_grades.calibrated_confidence IS 'The calibrated confidence the signal carried; NULL when not calibrated.';
COMMENT ON COLUMN signal_grades.hold_hit IS 'Whether always-HOLD would have hit at the same prices; NULL when not known.';
COMMENT ON COLUMN signal_grades.momentum_hit IS 'Whether momentum (BUY after a rising hour, SELL after a falling one) would have hit; NULL when not known.';
COMMENT ON COLUMN signal_grades.stage IS 'Always signal: the stage of the message the foreign key points at.';

COMMENT ON TABLE signal_grade_sums IS 'The scorecard''s running sums per (horizon, grouping, UTC day number, group key, confidence bucket); internal, kept in the grades'' transaction.';
COMMENT ON TABLE signal_calibrated_sums IS 'The calibrated confidence''s running sums per calibrated-confidence bucket; internal.';
COMMENT ON TABLE signal_grade_returns IS 'Grade counts per return in whole basis points, for the medians; internal.';
COMMENT ON COLUMN signal_grade_sums.day IS 'UTC day number: Unix seconds / 86400.';
