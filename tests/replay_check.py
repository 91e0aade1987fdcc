"""An independent check of a replay's grades: computed again with pandas from the candle
file alone, and compared with what the replay stored.

Usage: replay_check.py CANDLES.csv HISTORY.sqlite THRESHOLD_FRACTION

The replay's rules, restated here from its documentation, not from its code: a signal at
tick T saw the close of the minute that started at T - 1 min (the last candle that had ended);
its price after horizon H is the close of the minute that started at T + H - 1 min; the
forward return is (after - then) / then; BUY hits above +threshold, SELL below -threshold,
HOLD within. Prints one JSON object: how many grades were checked and every disagreement
(at most 20 listed), so the Rust test that runs this asserts on it.
"""

import json
import sqlite3
import sys

import pandas as pd


def main() -> int:
    candles_path, history_path, threshold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    # round_trip: pandas' default float parser may differ from the nearest double in the
    # last bit, and the comparison below is exact.
    candles = pd.read_csv(candles_path, float_precision="round_trip")
    # `time` is Unix seconds or RFC 3339 (both documented); either becomes a UTC timestamp.
    if pd.api.types.is_numeric_dtype(candles["time"]):
        candles["time"] = pd.to_datetime(candles["time"], unit="s", utc=True)
    else:
        candles["time"] = pd.to_datetime(candles["time"], utc=True)
    close = candles.set_index(["symbol", "time"])["close"].sort_index()

    with sqlite3.connect(history_path) as db:
        signals = pd.read_sql_query(
            "SELECT signal_id, symbol, cycle_at, action FROM signal_messages WHERE stage = 'signal'",
            db,
        )
        grades = pd.read_sql_query(
            "SELECT signal_id, horizon_seconds, price_then, price_after, return_fraction, hit"
            " FROM signal_grades",
            db,
        )
    g = grades.merge(signals, on="signal_id", how="left", validate="many_to_one")
    tick = pd.to_datetime(g["cycle_at"], unit="s", utc=True)
    minute = pd.Timedelta(minutes=1)
    then_at = tick - minute
    after_at = tick + pd.to_timedelta(g["horizon_seconds"], unit="s") - minute
    g["want_then"] = close.reindex(pd.MultiIndex.from_arrays([g["symbol"], then_at])).to_numpy()
    g["want_after"] = close.reindex(pd.MultiIndex.from_arrays([g["symbol"], after_at])).to_numpy()
    g["want_return"] = (g["want_after"] - g["want_then"]) / g["want_then"]
    r = g["want_return"]
    g["want_hit"] = (
        ((g["action"] == "BUY") & (r > threshold))
        | ((g["action"] == "SELL") & (r < -threshold))
        | ((g["action"] == "HOLD") & (r.abs() <= threshold))
    ).astype(int)

    bad = g[
        g["action"].isna()
        | (g["want_then"] != g["price_then"])
        | (g["want_after"] != g["price_after"])
        | ((g["want_return"] - g["return_fraction"]).abs() > 1e-12)
        | (g["want_hit"] != g["hit"])
    ]
    cols = ["signal_id", "horizon_seconds", "action", "price_then", "want_then",
            "price_after", "want_after", "return_fraction", "want_return", "hit", "want_hit"]
    print(json.dumps({
        "checked": int(len(g)),
        "signals": int(len(signals)),
        "hits": int(g["want_hit"].sum()),
        "mismatches": int(len(bad)),
        "first_mismatches": json.loads(bad[cols].head(20).to_json(orient="records", double_precision=15)),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
