-- Calibrated confidence and the naive baselines, beside what a signal stated.
-- Rows written before this migration have NULLs here and zeros in the new sums: they are
-- counted where their facts are known (a stated confidence, a hit) and left out of what
-- needs the new ones (a calibrated value, the last hour's return).

-- What the signal carried: its calibrated confidence (NULL: not calibrated) and the last
-- hour's return (the momentum baseline's call).
ALTER TABLE signal_messages ADD COLUMN calibrated_confidence DOUBLE PRECISION;
ALTER TABLE signal_messages ADD COLUMN price_change_1h DOUBLE PRECISION;

-- Per grade: the calibrated confidence, and whether each baseline's call hit at the same
-- horizon and price (NULL: not known for this row).
ALTER TABLE signal_grades ADD COLUMN calibrated_confidence DOUBLE PRECISION;
ALTER TABLE signal_grades ADD COLUMN hold_hit INTEGER;
ALTER TABLE signal_grades ADD COLUMN momentum_hit INTEGER;

-- The running sums of both, per (group, stated-confidence bucket):
--   calibrated_n / _hits / _sum / _squared_error   grades with a calibrated confidence
--   baseline_n, baseline_hits                       grades with both baselines, and the
--                                                   signal's own hits among them
--   hold_hits, hold_differ                          always-HOLD's hits, and the grades where
--   momentum_hits, momentum_differ                  it and the signal disagree (the paired
--                                                   interval of the skill needs them)
ALTER TABLE signal_grade_sums ADD COLUMN calibrated_n BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN calibrated_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN calibrated_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN calibrated_squared_error DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN baseline_n BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN baseline_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN hold_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN hold_differ BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN momentum_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signal_grade_sums ADD COLUMN momentum_differ BIGINT NOT NULL DEFAULT 0;

-- The calibrated confidence's own reliability table: the same sums keyed by the bucket of
-- the calibrated value (the stated value's buckets say nothing of it).
CREATE TABLE IF NOT EXISTS signal_calibrated_sums (
    horizon_seconds   INTEGER NOT NULL,
    day               BIGINT NOT NULL,
    group_by          TEXT NOT NULL,
    group_key         TEXT NOT NULL,
    calibrated_bucket INTEGER NOT NULL,
    n                 BIGINT NOT NULL,
    hits              BIGINT NOT NULL,
    calibrated        DOUBLE PRECISION NOT NULL,  -- Σ calibrated confidence
    PRIMARY KEY (horizon_seconds, group_by, day, group_key, calibrated_bucket)
);
