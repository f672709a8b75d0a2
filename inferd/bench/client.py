"""Async load generator: closed loop (fixed concurrency) or open loop (Poisson arrivals), streaming."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from inferd.bench.metrics import RequestResult


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (completions endpoint only)
    prompt_tokens: int
    max_tokens: int


@dataclass
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "chat"  # chat | completions
    api_key: str | None = None
    timeout_s: float = 300.0
    ignore_eos: bool = True
    temperature: float = 0.0


async def send_one(client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest,
                   count_tokens: Callable[[str], int] | None = None) -> RequestResult:
    if cfg.endpoint == "chat":
        url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        body: dict = {"messages": [{"role": "user", "content": req.prompt}]}
    else:
        url = f"{cfg.base_url.rstrip('/')}/completions"
        body = {"prompt": req.prompt}
    body |= {"model": cfg.model, "max_tokens": req.max_tokens, "temperature": cfg.temperature, "stream": True,
             "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llama.cpp / inferd extension; others ignore it
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    res = RequestResult(ok=False, prompt_tokens=req.prompt_tokens)
    start = time.perf_counter()
    last = None
    chunks = 0
    text: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=cfg.timeout_s) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:200]
                res.error = f"HTTP {resp.status_code}: {detail}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    return res
                now = time.perf_counter()
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if cfg.endpoint == "chat" else ch.get("text")
                    if piece:
                        if last is None:
                            res.ttft_s = now - start
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        chunks += 1
                        text.append(piece)
                usage = obj.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens", 0)
                    res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
                    extra = usage.get("inferd") or {}
                    if extra.get("cost_usd") is not None:
                        res.server_cost_usd = extra["cost_usd"]
    except (httpx.HTTPError, json.JSONDecodeError, asyncio.TimeoutError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e_s = (last or time.perf_counter()) - start
    if not res.output_tokens:  # no usage from the server: count with the tokenizer, else one token per chunk
        res.output_tokens = count_tokens("".join(text)) if count_tokens else chunks
    res.ok = True
    return res


async def run_load(cfg: ClientConfig, requests: list[BenchRequest], concurrency: int,
                   request_rate: float | None = None, seed: int = 0, warmup: int = 1,
                   progress: Callable[[], None] | None = None,
                   count_tokens: Callable[[str], int] | None = None) -> tuple[list[RequestResult], float]:
    """Returns per-request results (in request order) and the measured duration (warm-up excluded)."""
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=max(concurrency, 1) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout_s) as client:
        for req in requests[: min(warmup, len(requests))]:
            await send_one(client, cfg, BenchRequest(req.prompt, req.prompt_tokens, min(req.max_tokens, 8)),
                           count_tokens)
        sem = asyncio.Semaphore(concurrency)
        results: list[RequestResult | None] = [None] * len(requests)
        rng = random.Random(seed)

        async def worker(i: int, req: BenchRequest) -> None:
            async with sem:
                results[i] = await send_one(client, cfg, req, count_tokens)
            if progress:
                progress()

        start = time.perf_counter()
        tasks = []
        due = 0.0  # open loop: Poisson arrival times, kept on an absolute schedule so a late wake-up never drifts
        for i, req in enumerate(requests):
            if request_rate:
                if i:
                    due += rng.expovariate(request_rate)
                delay = start + due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(worker(i, req)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return [r for r in results if r is not None], duration
