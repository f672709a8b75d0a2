"""POST /v1/chat/completions and /v1/completions (also without /v1): engine outputs → OpenAI responses
(JSON or SSE)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from inferd.engine.async_engine import AsyncLLM
from inferd.engine.outputs import CompletionOutput, RequestOutput
from inferd.errors import InvalidRequestError
from inferd.sampling_params import SamplingParams
from inferd.server.openai_structured import constrain, structured_from_request
from inferd.server.openai_tools import (
    ToolCallParser,
    ToolRequest,
    chat_prompt,
    parse_tool_calls,
    stream_deltas,
)
from inferd.server.protocol import ChatCompletionRequest, CompletionRequest
from inferd.server.state import ServerState, run_until_disconnect, sse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default


def _usage(state: ServerState, prompt_tokens: int, completion_tokens: int, ros: list[RequestOutput]) -> dict:
    compute = sum(r.metrics.compute_s for r in ros)
    m = ros[0].metrics if ros else None

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 3)

    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(r.metrics.num_cached_tokens for r in ros)},
        "inferd": {
            "queue_ms": ms(m.queue_s) if m else None,
            "ttft_ms": ms(m.ttft_s) if m else None,
            "tpot_ms": ms(m.tpot_s) if m else None,
            "compute_s": round(compute, 6),
            "cost_usd": state.metrics.cost_usd(compute),
            **_spec_usage(ros),
        },
    }


def _spec_usage(ros: list[RequestOutput]) -> dict:
    """Speculative decoding's share of the request, when it speculated at all."""
    drafts = sum(r.metrics.spec_draft_tokens for r in ros)
    if not drafts:
        return {}
    accepted = sum(r.metrics.spec_accepted_tokens for r in ros)
    return {"spec_draft_tokens": drafts, "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": round(accepted / drafts, 4)}


def _token_str(llm: AsyncLLM, tid: int, as_ids: bool) -> str:
    return f"token_id:{tid}" if as_ids else llm.tokenizer.decode([tid], skip_special_tokens=False)


def _chat_logprobs(llm: AsyncLLM, ids: list[int], lps: list[dict[int, float]] | None, k: int,
                   as_ids: bool = False) -> dict | None:
    if lps is None:
        return None
    content = []
    for t, lp in zip(ids, lps):
        def entry(tid: int, v: float) -> dict[str, Any]:
            s = _token_str(llm, tid, as_ids)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        e = entry(t, lp[t])
        e["top_logprobs"] = [entry(a, v) for a, v in sorted(lp.items(), key=lambda kv: -kv[1])[:k]]
        content.append(e)
    return {"content": content}


def _completion_logprobs(llm: AsyncLLM, ids: list[int], lps: list[dict[int, float] | None], k: int,
                         as_ids: bool = False) -> dict:
    tok = llm.tokenizer
    tokens, token_lps, tops, offsets = [], [], [], []
    off = 0
    for t, lp in zip(ids, lps):
        s = tok.decode([t], skip_special_tokens=False)
        tokens.append(_token_str(llm, t, as_ids))
        offsets.append(off)
        off += len(s)
        token_lps.append(None if lp is None else lp.get(t))
        if lp is None:
            tops.append(None)
        else:
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:k] if k else []
            if t in lp and all(a != t for a, _ in top) and k:
                top = top[: k - 1] + [(t, lp[t])] if len(top) >= k else top + [(t, lp[t])]
            tops.append({_token_str(llm, a, as_ids): v for a, v in top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def _collect(gen: AsyncIterator[RequestOutput]) -> tuple[RequestOutput, dict[int, CompletionOutput]]:
    last = None
    acc: dict[int, CompletionOutput] = {}
    async for ro in gen:
        for co in ro.outputs:
            acc[co.index] = co
        last = ro
    assert last is not None
    return last, acc


def _check(state: ServerState, llm: AsyncLLM, params: SamplingParams) -> None:
    """Server-side limits and model-dependent checks the engine-independent validation cannot do."""
    state.check_max_tokens(params.max_tokens)
    vocab = llm.engine.lm.config.vocab_size
    bad = [t for t in params.logit_bias or {} if t >= vocab]
    if bad:
        raise InvalidRequestError(f"logit_bias token id {bad[0]} is out of range [0, {vocab})", param="logit_bias")


def add_routes(app: FastAPI, state: ServerState) -> None:
    async def chat(body: ChatCompletionRequest, request: Request):
        llm, model = await state.llm(body.model)
        params = body.sampling_params()
        _check(state, llm, params)
        prompt, tools = chat_prompt(llm.tokenizer, body)
        spec = structured_from_request(body)
        if tools is not None and tools.constrained:
            if spec is not None:
                raise InvalidRequestError("tool_choice required or named cannot be combined with a structured "
                                          "output constraint", param="tool_choice")
            spec = tools.grammar()
        elif spec is not None:
            tools = None  # the response format constrains the text: no tool calls to parse
        if tools is not None and not tools.active:
            tools = None
        await constrain(llm, params, spec)
        if params.max_tokens is None:
            params.max_tokens = state.default_max_tokens(llm, len(prompt))
            params.validate()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = llm.outputs(rid, await llm.add_request(rid, prompt, params, body.priority))
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_chat_stream(state, llm, body, rid, model, created, gen, len(prompt), tools),
                                     media_type="text/event-stream")
        last, acc = await run_until_disconnect(request, _collect(gen), state)
        choices = []
        for i in sorted(acc):
            co = acc[i]
            if co.finish_reason == "error":
                raise RuntimeError(co.error)
            message: dict[str, Any] = {"role": "assistant", "content": co.text}
            finish = co.finish_reason
            if tools is not None:
                message["content"], calls = parse_tool_calls(tools.fmt, tools.names, co.text)
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({
                "index": i, "message": message,
                "logprobs": _chat_logprobs(llm, co.token_ids, co.logprobs, body.top_logprobs or 0,
                                           body.return_tokens_as_token_ids),
                "finish_reason": finish, "stop_reason": co.stop_reason,
            })
        n_out = sum(len(c.token_ids) for c in acc.values())
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": _usage(state, len(prompt), n_out, [last])}

    async def completions(body: CompletionRequest, request: Request):
        llm, model = await state.llm(body.model)
        params = body.sampling_params()
        if params.max_tokens is None:
            limit = state.max_tokens_limit
            params.max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, limit or COMPLETIONS_DEFAULT_MAX_TOKENS)
            params.validate()
        _check(state, llm, params)
        prompts = [llm.engine.encode_prompt(p) for p in body.prompts()]
        await constrain(llm, params, structured_from_request(body))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gens = []
        try:
            for j, p in enumerate(prompts):
                gens.append(llm.outputs(f"{rid}-{j}", await llm.add_request(f"{rid}-{j}", p, params, body.priority)))
        except BaseException:
            for j in range(len(gens)):
                llm.abort(f"{rid}-{j}")
            raise
        if body.stream:
            return StreamingResponse(_completion_stream(state, llm, body, rid, model, created, prompts, gens),
                                     media_type="text/event-stream")
        results = await run_until_disconnect(request, asyncio.gather(*(_collect(g) for g in gens)), state)
        choices, n_out = [], 0
        for j, (last, acc) in enumerate(results):
            ptext = llm.tokenizer.decode(prompts[j], skip_special_tokens=False) if body.echo else ""
            for i in sorted(acc):
                co = acc[i]
                if co.finish_reason == "error":
                    raise RuntimeError(co.error)
                n_out += len(co.token_ids)
                lp = None
                if body.logprobs is not None:
                    ids, lps = co.token_ids, list(co.logprobs or [])
                    if body.echo:
                        ids, lps = prompts[j] + ids, list(last.prompt_logprobs or [None] * len(prompts[j])) + lps
                    lp = _completion_logprobs(llm, ids, lps, body.logprobs, body.return_tokens_as_token_ids)
                choices.append({"index": j * params.n + i, "text": ptext + co.text, "logprobs": lp,
                                "finish_reason": co.finish_reason, "stop_reason": co.stop_reason})
        n_prompt = sum(len(p) for p in prompts)
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": _usage(state, n_prompt, n_out, [r[0] for r in results])}

    for prefix in ("/v1", ""):  # llama-server-style clients call the routes without /v1
        app.post(f"{prefix}/chat/completions", include_in_schema=bool(prefix))(chat)
        app.post(f"{prefix}/completions", include_in_schema=bool(prefix))(completions)


async def _chat_stream(state: ServerState, llm: AsyncLLM, body: ChatCompletionRequest, rid: str, model: str,
                       created: int, gen: AsyncIterator[RequestOutput], n_prompt: int,
                       tools: ToolRequest | None = None):
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return sse(obj)

    n = body.n
    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    tokens = [0] * n
    last = None
    parsers = [ToolCallParser(tools.fmt, tools.names) for _ in range(n)] if tools is not None else None
    try:
        async for ro in gen:
            last = ro
            for co in ro.outputs:
                tokens[co.index] = len(co.token_ids)
                if co.finish_reason == "error":
                    yield sse({"error": {"message": co.error, "type": "internal_error", "param": None,
                                         "code": None}})
                    continue
                if not co.delta_text and not co.finished:
                    continue
                lp = _chat_logprobs(llm, co.delta_token_ids, co.delta_logprobs, body.top_logprobs or 0,
                                    body.return_tokens_as_token_ids) if co.delta_logprobs else None
                if parsers is not None:  # tool calls: parsed text goes out as content or delta.tool_calls
                    p = parsers[co.index]
                    deltas = stream_deltas(p.feed(co.delta_text) + (p.finish() if co.finished else []))
                    for d in deltas:
                        yield chunk([{"index": co.index, "delta": d, "logprobs": None, "finish_reason": None}])
                    if co.finished:
                        fin = "tool_calls" if p.calls and co.finish_reason == "stop" else co.finish_reason
                        yield chunk([{"index": co.index, "delta": {}, "logprobs": lp, "finish_reason": fin}])
                    continue
                yield chunk([{"index": co.index, "delta": {"content": co.delta_text} if co.delta_text else {},
                              "logprobs": lp, "finish_reason": co.finish_reason if co.finished else None}])
    finally:
        await gen.aclose()
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(state, n_prompt, sum(tokens), [last] if last else []))
    yield "data: [DONE]\n\n"


async def _completion_stream(state: ServerState, llm: AsyncLLM, body: CompletionRequest, rid: str, model: str,
                             created: int, prompts: list[list[int]], gens: list[AsyncIterator[RequestOutput]]):
    queue: asyncio.Queue = asyncio.Queue()
    n = body.n

    async def pump(j: int) -> None:
        try:
            async for ro in gens[j]:
                await queue.put((j, ro))
        finally:
            await queue.put((j, None))

    tasks = [asyncio.ensure_future(pump(j)) for j in range(len(gens))]
    tokens: dict[tuple[int, int], int] = {}
    lasts: dict[int, RequestOutput] = {}
    if body.echo:
        for j, p in enumerate(prompts):
            for i in range(n):
                text = llm.tokenizer.decode(p, skip_special_tokens=False)
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": j * n + i, "text": text, "logprobs": None, "finish_reason": None}]})
    done = 0
    try:
        while done < len(gens):
            j, ro = await queue.get()
            if ro is None:
                done += 1
                continue
            lasts[j] = ro
            for co in ro.outputs:
                tokens[(j, co.index)] = len(co.token_ids)
                if not co.delta_text and not co.finished:
                    continue
                lp = None
                if body.logprobs is not None and co.delta_logprobs:
                    lp = _completion_logprobs(llm, co.delta_token_ids, co.delta_logprobs, body.logprobs,
                                              body.return_tokens_as_token_ids)
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": j * n + co.index, "text": co.delta_text, "logprobs": lp,
                                        "finish_reason": co.finish_reason if co.finished else None}]})
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            await g.aclose()
    if body.stream_options and body.stream_options.include_usage:
        usage = _usage(state, sum(len(p) for p in prompts), sum(tokens.values()), list(lasts.values()))
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage})
    yield "data: [DONE]\n\n"
