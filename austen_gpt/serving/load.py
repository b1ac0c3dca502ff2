"""Load on a running server, as bench.py --serving applies it: streams at a given concurrency, each client
sending its next request as soon as its last one ends (so requests also arrive while a batch runs), and what
they got: tokens per second over the whole load, and each request's time to its first token; and what a
request that arrives while a batch runs waits (there is no continuous batching)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

PROMPTS = ["It was a fine morning", "Emma", "Mr. Knightley", "She had never", "The ball at", "Her sister"]


def request(model: str, number: int, tokens: int) -> dict:
    """A streamed completion of `tokens` new tokens (run to its length), its prompt and seed by `number`."""
    return {
        "model": model,
        "prompt": PROMPTS[number % len(PROMPTS)],
        "max_tokens": tokens,
        "paragraphs": None,
        "seed": number,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed completion."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(choice.get("text") for choice in chunk["choices"]):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def load(url: str, model: str, streams: int, requests: int, tokens: int, key: str | None = None) -> dict:
    """`requests` streamed completions of `tokens` new tokens each, `streams` at a time; their throughput and
    time to first token (p50, p95)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queue = list(range(requests))
    results: list[tuple[float, int]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await one_stream(client, url, request(model, queue.pop(), tokens)))

    start = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(streams)))
    seconds = time.perf_counter() - start
    firsts = sorted(first for first, _ in results)
    return {
        "streams": streams,
        "requests": requests,
        "tokens": sum(n for _, n in results),
        "seconds": seconds,
        "tokens_per_s": sum(n for _, n in results) / seconds,
        "ttft_p50_s": statistics.median(firsts),
        "ttft_p95_s": firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))],
    }


async def late_arrival(url: str, model: str, tokens: int, key: str | None = None) -> dict:
    """A request of `tokens` tokens starts a batch; a one-token request sent once its first token is out waits
    for that batch: its time to first token, against the first one's whole time."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        started = time.perf_counter()
        first = asyncio.create_task(one_stream(client, url, request(model, 0, tokens)))
        while time.perf_counter() - started < 600:  # until the batch has started writing
            metrics = (await client.get(f"{url}/metrics")).text
            if any(line.startswith("austen_active_rows 1") for line in metrics.splitlines()):
                break
            await asyncio.sleep(0.005)
        late_ttft, _ = await one_stream(client, url, request(model, 1, 1))
        await first
    return {"batch_tokens": tokens, "batch_seconds": time.perf_counter() - started, "late_ttft_s": late_ttft}
