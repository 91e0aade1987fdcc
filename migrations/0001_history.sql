-- The signal history: every published stage message once, and each signal's grades.
-- One dialect for SQLite and PostgreSQL: times are integers (Unix seconds, or milliseconds
-- where named), booleans are 0/1 integers, JSON is text.

CREATE TABLE IF NOT EXISTS signal_messages (
    message_id        TEXT PRIMARY KEY,       -- deterministic from (stage, signal_id)
    signal_id         TEXT NOT NULL,
    stage             TEXT NOT NULL,          -- signal | score | advise | report
    symbol            TEXT NOT NULL,
    cycle_id          TEXT NOT NULL,          -- RFC 3339
    cycle_at          BIGINT NOT NULL,        -- the tick, Unix seconds
    published_at_ms   BIGINT NOT NULL,
    action            TEXT NOT NULL,          -- BUY | SELL | HOLD
    confidence        DOUBLE PRECISION NOT NULL,
    tier              TEXT,                   -- from the score stage on
    model             TEXT NOT NULL,          -- metadata.model_used
    top_strategy      TEXT,
    price             DOUBLE PRECISION NOT NULL, -- market_context.current_price
    data_as_of        BIGINT NOT NULL,        -- Unix seconds: the price's time
    is_degraded       INTEGER NOT NULL,
    envelope          TEXT NOT NULL           -- the message as published
);
-- /api/signals/history: by symbol and time, and by time alone, newest first (keyset pages).
CREATE INDEX IF NOT EXISTS signal_messages_symbol_time ON signal_messages (symbol, cycle_at, message_id);
CREATE INDEX IF NOT EXISTS signal_messages_time ON signal_messages (cycle_at, message_id);
-- The grader: stage-1 messages in price-time order.
CREATE INDEX IF NOT EXISTS signal_messages_due ON signal_messages (stage, data_as_of);

CREATE TABLE IF NOT EXISTS signal_grades (
    signal_id         TEXT NOT NULL,
    horizon_seconds   INTEGER NOT NULL,
    symbol            TEXT NOT NULL,
    action            TEXT NOT NULL,
    confidence        DOUBLE PRECISION NOT NULL,
    confidence_bucket INTEGER NOT NULL,       -- floor(confidence × 10), 0–9
    tier              TEXT NOT NULL,
    backend           TEXT NOT NULL,          -- rules | llm
    model             TEXT NOT NULL,
    strategy          TEXT NOT NULL,          -- the signal's top strategy
    cycle_at          BIGINT NOT NULL,
    price_then        DOUBLE PRECISION NOT NULL,
    price_after       DOUBLE PRECISION,       -- NULL: no price at the horizon
    return_fraction   DOUBLE PRECISION,       -- (after − then) / then
    hit               INTEGER,                -- 1 / 0; NULL when the price is missing
    status            TEXT NOT NULL,          -- graded | missing_price
    graded_at         BIGINT NOT NULL,
    -- Each (signal, horizon) is graded once across every replica: the key decides.
    PRIMARY KEY (signal_id, horizon_seconds)
);
-- /api/performance and the hit-rate gauge: one horizon's graded rows in a time window.
CREATE INDEX IF NOT EXISTS signal_grades_horizon_time ON signal_grades (horizon_seconds, status, cycle_at);
-- Retention: deleting old grades by time.
CREATE INDEX IF NOT EXISTS signal_grades_time ON signal_grades (cycle_at);
