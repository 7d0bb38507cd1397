"""A closed-loop load of streamed completions against an OpenAI-compatible server.

``run(...)`` keeps ``concurrency`` requests in flight until ``requests`` have been sent
(or, with ``until``, until that callable returns True), each a streamed completion of a
token-id prompt with ``ignore_eos`` (vLLM's extension), so every answer has exactly
``out_len`` tokens. Per request it records the time to the first token and the gaps
between streamed chunks; the result has output tokens/s over the wall time and TTFT/ITL
percentiles. Only a chunk's arrival is timed: the body is not parsed, so the client stays
light next to the server (vLLM streams one chunk a token and step).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def prompts(n: int, length: int, first_id: int, vocab: int, bos: int, seed: int) -> list[list[int]]:
    """``n`` distinct prompts of ``length`` tokens: BOS, then random ids in [first_id, vocab)."""
    rng = random.Random(seed)
    return [[bos] + [rng.randrange(first_id, vocab) for _ in range(length - 1)] for _ in range(n)]


async def _one(session, url: str, key: str, body: dict, stats: dict) -> None:
    t0 = time.perf_counter()
    chunks: list[float] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
        if r.status != 200:
            stats["errors"].append(f"{r.status}: {(await r.text())[:300]}")
            return
        async for line in r.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                chunks.append(time.perf_counter())
    if not chunks:
        stats["errors"].append("no tokens streamed")
        return
    stats["chunks"] += len(chunks)
    stats["ttft"].append(chunks[0] - t0)
    stats["itl"].extend(b - a for a, b in itertools.pairwise(chunks))
    stats["done"] += 1
    stats["last"] = time.perf_counter()


async def run(
    url: str,
    key: str,
    models: list[str],
    prompt_ids: list[list[int]],
    out_len: int,
    concurrency: int = 64,
    requests: int | None = None,
    until: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run the load; ``prompt_ids`` are used in turn, ``models`` round-robin."""
    import aiohttp

    stats: dict[str, Any] = {
        "ttft": [],
        "itl": [],
        "errors": [],
        "done": 0,
        "chunks": 0,
        "last": 0.0,
    }
    total = requests if requests is not None else 10**9
    sent = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal sent
            while sent < total and not (until and until()):
                i = sent
                sent += 1
                body = {
                    "model": models[i % len(models)],
                    "prompt": prompt_ids[i % len(prompt_ids)],
                    "max_tokens": out_len,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                await _one(session, url, key, body, stats)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = (stats["last"] or time.perf_counter()) - t0
    return {
        "models": len(models),
        "requests": stats["done"],
        "errors": stats["errors"][:5],
        "error_count": len(stats["errors"]),
        "wall_s": round(wall, 3),
        "chunks_per_request": round(stats["chunks"] / stats["done"], 1) if stats["done"] else None,
        "output_tokens_per_s": round(stats["done"] * out_len / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": _ms(pct(stats["ttft"], 0.5)),
        "ttft_p99_ms": _ms(pct(stats["ttft"], 0.99)),
        "itl_p50_ms": _ms(pct(stats["itl"], 0.5)),
        "itl_p99_ms": _ms(pct(stats["itl"], 0.99)),
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 2)
