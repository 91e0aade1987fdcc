"""An independent MCP client for the integration tests: the official Python SDK (`mcp` from
PyPI) against the runner's /mcp. It initializes a session, lists the tools, calls each one,
then sends hostile arguments, and prints what it saw as one JSON object for the Rust test to
check (the test knows what the market source and the history hold).

Usage: python mcp_client.py http://127.0.0.1:PORT/mcp
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


def body(result):
    """A tool result's structured content, or its text parsed as JSON."""
    if getattr(result, "structured_content", None) is not None:
        return result.structured_content
    if getattr(result, "structuredContent", None) is not None:
        return result.structuredContent
    for c in result.content:
        if getattr(c, "text", None):
            return json.loads(c.text)
    return None


def is_error(result):
    v = getattr(result, "is_error", None)
    if v is None:
        v = getattr(result, "isError", False)
    return bool(v)


def schema_of(tool):
    for name in ("input_schema", "inputSchema"):
        v = getattr(tool, name, None)
        if v is not None:
            return v
    return {}


CALLS = {
    "get_candles": {"symbol": "ETH/USD", "timeframe": "1m", "limit": 5},
    "get_current_price": {"symbol": "ETH/USD"},
    "get_volatility": {"symbol": "ETH/USD", "timeframe": "5m"},
    "get_top_strategies": {"symbol": "ETH/USD", "limit": 2},
    "get_strategy_signal": {"symbol": "ETH/USD", "strategy_id": "momentum"},
    "get_strategy_consensus": {"symbol": "BTC/USD"},
    "get_recent_decisions": {"symbol": "ETH/USD", "limit": 3},
}

REFUSALS = {
    "get_signal_performance": ("get_signal_performance", {"symbol": "ETH/USD", "horizon": "15m"}),
    "unknown_symbol": ("get_current_price", {"symbol": "DOGE/EUR"}),
    "huge_limit": ("get_candles", {"symbol": "ETH/USD", "limit": 10**9}),
    "wrong_type": ("get_candles", {"symbol": ["ETH/USD"]}),
    "unknown_field": ("get_current_price", {"symbol": "ETH/USD", "rm": "-rf"}),
    "unknown_tool": ("place_order", {"symbol": "ETH/USD"}),
}


async def main(url):
    report = {"tools": {}, "calls": {}, "refusals": {}}
    async with streamable_http_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            listed = await session.list_tools()
            for t in listed.tools:
                report["tools"][t.name] = schema_of(t)
            for name, args in CALLS.items():
                r = await session.call_tool(name, args)
                report["calls"][name] = {"is_error": is_error(r), "result": body(r)}
            for what, (name, args) in REFUSALS.items():
                r = await session.call_tool(name, args)
                b = body(r) or {}
                report["refusals"][what] = {
                    "is_error": is_error(r),
                    "code": (b.get("error") or {}).get("code"),
                    "message": (b.get("error") or {}).get("message"),
                }
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
