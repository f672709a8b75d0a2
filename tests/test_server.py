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
    assert httpx.get(server.url + "/health").status_code == 200
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
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0 or metric(server, "vllm:num_requests_running") == 0


def test_non_stream_disconnect_aborts(server, model):
    aborted0 = metric(server, "vllm:request_success_total", 'finished_reason="abort"')
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3,
                   json={"model": model, "prompt": "x", "max_tokens": 480, "ignore_eos": True})
    deadline = time.time() + 10
    while time.time() < deadline and metric(server, "vllm:request_success_total",
                                             'finished_reason="abort"') == aborted0:
        time.sleep(0.1)
    assert metric(server, "vllm:request_success_total", 'finished_reason="abort"') == aborted0 + 1


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
