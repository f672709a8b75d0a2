"""Black-box tests of `inferd serve` with a tiny model: the official openai client, raw HTTP, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server_utils import run_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_hf):
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--api-key", KEY, "--max-body-mb", "0.05", "--price-per-hour", "3.6") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_hf) -> str:
    return tiny_hf.name


def post(server, path: str, body=None, content: bytes | None = None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_health_version(server, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
    assert "version" in httpx.get(server.url + "/version").json()


def test_chat_completion_and_usage(server, client, model):
    msgs = [{"role": "user", "content": "The capital of France"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    n_prompt = post(server, "/tokenize", {"messages": msgs}).json()["count"]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == n_prompt + 8
    extra = r.usage.model_extra["inferd"]
    assert extra["compute_s"] > 0 and extra["cost_usd"] == pytest.approx(extra["compute_s"] * 3.6 / 3600, rel=1e-3)
    assert extra["ttft_ms"] > 0 and extra["queue_ms"] >= 0


def test_stream_equals_non_stream(client, model):
    msgs = [{"role": "user", "content": "Café 東京"}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_format(server, model):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "prompt": "The", "max_tokens": 4, "temperature": 0, "stream": True},
                      timeout=30) as r:
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"


def test_completions_prompts_and_seed(client, model):
    r = client.completions.create(model=model, prompt=["The capital", "Paris is"], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(model=model, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4
    a = client.completions.create(model=model, prompt="Paris", max_tokens=12, temperature=1.0, seed=42)
    b = client.completions.create(model=model, prompt="Paris", max_tokens=12, temperature=1.0, seed=42)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model=model, prompt="Paris", max_tokens=6, temperature=1.0, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]


def test_echo_logprobs_for_lm_eval(client, model):
    r = client.completions.create(model=model, prompt="The capital of France", max_tokens=1, temperature=0,
                                  echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The capital of France")
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens + 1
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == pytest.approx(max(t.logprob for t in content[0].top_logprobs))


def test_32_parallel_requests(server, model):
    async def go():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
            tasks = [c.completions.create(model=model, prompt=f"Request number {i}", max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True}) for i in range(32)]
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert len(results) == 32 and all(r.usage.completion_tokens == 10 for r in results)


BAD = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**6}, "maximum context length is 512"),
    ({"temperature": 3.5}, "temperature"),
    ({"n": 1000}, "n must be"),
    ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize("patch,needle", BAD)
def test_bad_chat_input_is_400(server, model, patch, needle):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **patch}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"] + str(err["param"])


def test_bad_bodies(server, model):
    r = post(server, "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", content=b'{"prompt": "\xff\xfe", "max_tokens": 2}')
    assert r.status_code == 400
    r = post(server, "/v1/completions", {"model": model, "prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(server, "/v1/completions", {"model": model, "prompt": "x" * 100_000})
    assert r.status_code == 413
    r = post(server, "/v1/completions", {"model": model, "prompt": "x", "unknown_field": 1, "max_tokens": 1})
    assert r.status_code == 200


def test_auth(server, model):
    r = post(server, "/v1/completions", {"model": model, "prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = post(server, "/v1/completions", {"model": model, "prompt": "x"}, key="wrong")
    assert r.status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 200  # open


def test_tokenize_detokenize(server):
    ids = post(server, "/tokenize", {"prompt": "Café 東京"}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "Café 東京"
    assert post(server, "/detokenize", {"tokens": [10**7]}).status_code == 400
    assert post(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 401  # --api-key covers it


def test_tokenize_llama_cpp_shapes(server):
    # llama.cpp: {"content"} → {"tokens"} (the tiny tokenizer adds no BOS, so the add_special defaults are
    # checked on the request model below)
    plain = post(server, "/tokenize", {"content": "Café 東京"}).json()["tokens"]
    assert plain == post(server, "/tokenize", {"prompt": "Café 東京", "add_special_tokens": False}).json()["tokens"]
    pieces = post(server, "/tokenize", {"content": "Café 東京", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain
    # a piece is its text, or its bytes when it is not whole UTF-8; together they spell the input
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == "Café 東京"
    assert post(server, "/detokenize", {"tokens": plain}).json()["content"] == "Café 東京"


def test_tokenize_add_special_defaults():
    from inferd.server.protocol import TokenizeRequest

    assert TokenizeRequest(prompt="x").special_tokens() is True  # vLLM's default
    assert TokenizeRequest(content="x").special_tokens() is False  # llama.cpp's default
    assert TokenizeRequest(content="x", add_special=True).special_tokens() is True
    assert TokenizeRequest(prompt="x", add_special_tokens=False).special_tokens() is False


def test_openai_routes_without_v1(server, model):
    r = httpx.get(server.url + "/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [model]
    body = {"model": model, "prompt": "The", "max_tokens": 3, "temperature": 0}
    assert post(server, "/completions", body).json()["choices"][0]["text"] == \
        post(server, "/v1/completions", body).json()["choices"][0]["text"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    r = post(server, "/chat/completions", chat)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert post(server, "/completions", body, key=None).status_code == 401
    assert post(server, "/embeddings", {"input": "x"}).status_code == 404  # no encoder served here


def token_ids(server, body: dict) -> list[int]:
    """The generated token ids of a completion (vLLM's return_tokens_as_token_ids)."""
    r = post(server, "/v1/completions", {**body, "logprobs": 0, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_logit_bias_bans_and_forces_tokens(server, model):
    body = {"model": model, "prompt": "The capital of France", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    greedy = token_ids(server, body)
    assert len(greedy) == 12
    banned = {str(t): -100 for t in greedy}
    other = token_ids(server, {**body, "logit_bias": banned})
    assert len(other) == 12 and not set(other) & set(greedy)
    sampled = token_ids(server, {**body, "temperature": 1.0, "seed": 3, "logit_bias": banned})
    assert not set(sampled) & set(greedy)
    # chat: +100 makes one token win every step
    forced = greedy[0]
    r = post(server, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                              "logprobs": True, "return_tokens_as_token_ids": True,
                                              "logit_bias": {str(forced): 100}})
    assert r.status_code == 200, r.text
    assert [c["token"] for c in r.json()["choices"][0]["logprobs"]["content"]] == [f"token_id:{forced}"] * 5


@pytest.mark.parametrize("bias,needle", [({"5": 101}, "between -100 and 100"), ({"5": -100.5}, "between"),
                                         ({"abc": 1}, "token ids"), ({"-1": 1}, "token ids"),
                                         ({"100000": 1}, "out of range")])
def test_bad_logit_bias_is_400(server, model, bias, needle):
    for path, extra in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = post(server, path, {"model": model, "max_tokens": 2, "logit_bias": bias, **extra})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"] and r.json()["error"]["param"] == "logit_bias"


def test_disconnect_frees_blocks(server, model):
    aborted0 = metric(server, "vllm:request_success_total", 'finished_reason="abort"')
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "prompt": "Long story", "max_tokens": 400, "stream": True,
                            "ignore_eos": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.time() + 10
    while time.time() < deadline:
        if metric(server, "vllm:request_success_total", 'finished_reason="abort"') > aborted0:
            break
        time.sleep(0.1)
    assert metric(server, "vllm:request_success_total", 'finished_reason="abort"') == aborted0 + 1
    # nothing else runs now, so every KV block must be back in the pool (cached prefix blocks count as free)
    while time.time() < deadline and (metric(server, "vllm:num_requests_running") != 0
                                      or metric(server, "vllm:kv_cache_usage_perc") != 0.0):
        time.sleep(0.05)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0


def test_non_stream_disconnect_aborts(server, model):
    aborted0 = metric(server, "vllm:request_success_total", 'finished_reason="abort"')
    # the client gives up and closes the connection long before the work could end (4 × 480 tokens: ~1 s even for
    # the tiny model on a fast CPU, against a 0.1 s timeout and a 50 ms disconnect poll)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.1,
                   json={"model": model, "prompt": "x", "max_tokens": 480, "n": 4, "ignore_eos": True})
    deadline = time.time() + 10
    while time.time() < deadline and metric(server, "vllm:request_success_total",
                                             'finished_reason="abort"') < aborted0 + 4:
        time.sleep(0.1)
    assert metric(server, "vllm:request_success_total", 'finished_reason="abort"') == aborted0 + 4  # one per choice


def test_metrics_names(server):
    # every series exists from load; one request (the test must not rely on other tests' traffic) gives cost > 0
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "inferd_request_cost_usd_total", "inferd_compute_seconds_total",
                 "inferd_requests_rejected_total"]:
        assert re.search(rf"^{re.escape(name)}", text, re.M), name
    assert metric(server, "inferd_request_cost_usd_total") > 0


def test_queue_full_503_and_sigterm_drain(tiny_hf):
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--max-num-seqs", "1", "--max-queue", "1", "--shutdown-timeout", "30") as s:
        body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            results[i] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)

        def wait_for(name: str, value: float) -> None:
            deadline = time.time() + 10
            while metric(s, name) != value and time.time() < deadline:
                time.sleep(0.01)
            assert metric(s, name) == value

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        threads[0].start()
        wait_for("vllm:num_requests_running", 1)
        threads[1].start()
        wait_for("vllm:num_requests_waiting", 1)  # the queue (1) is now full
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"]["type"] == "overloaded"
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(s.url + "/ready").status_code == 503
        for t in threads:
            t.join(60)
        assert s.proc.wait(60) == 0
        assert results[0].status_code == 200 and results[1].status_code == 200
        assert results[0].json()["usage"]["completion_tokens"] == 500
