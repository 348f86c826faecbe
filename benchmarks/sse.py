"""The client side of OpenAI's server-sent events, shared by the serving benchmarks."""

from __future__ import annotations

import json


async def sse_chunks(response):
    """The JSON chunks of an ``httpx`` streaming response, in order, up to ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        yield json.loads(line[6:])
