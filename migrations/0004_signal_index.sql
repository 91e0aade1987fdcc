-- The grader reads each due signal's score-stage tier by signal id: without this index that
-- join scans every score row per due signal (a replay of a day went quadratic on it).
CREATE INDEX IF NOT EXISTS signal_messages_signal ON signal_messages (signal_id, stage);
