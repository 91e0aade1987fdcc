-- The scorecard's running sums, kept as grades are recorded (in the same transaction), so
-- /api/performance reads a few rows per (day, group, confidence bucket) however many signals
-- are stored. One row set per way of grouping; days are UTC days (cycle_at / 86400).

CREATE TABLE IF NOT EXISTS signal_grade_sums (
    horizon_seconds   INTEGER NOT NULL,
    day               BIGINT NOT NULL,
    group_by          TEXT NOT NULL,          -- symbol | action | tier | backend | model | strategy
    group_key         TEXT NOT NULL,
    confidence_bucket INTEGER NOT NULL,
    n                 BIGINT NOT NULL,
    hits              BIGINT NOT NULL,
    confidence        DOUBLE PRECISION NOT NULL,  -- Σ confidence
    returns           DOUBLE PRECISION NOT NULL,  -- Σ return
    squared_error     DOUBLE PRECISION NOT NULL,  -- Σ (confidence − hit)²
    PRIMARY KEY (horizon_seconds, group_by, day, group_key, confidence_bucket)
);

-- Returns by whole basis point, for the median (exact to 0.01 %).
CREATE TABLE IF NOT EXISTS signal_grade_returns (
    horizon_seconds   INTEGER NOT NULL,
    day               BIGINT NOT NULL,
    group_by          TEXT NOT NULL,
    group_key         TEXT NOT NULL,
    return_bp         BIGINT NOT NULL,
    n                 BIGINT NOT NULL,
    PRIMARY KEY (horizon_seconds, group_by, day, group_key, return_bp)
);
