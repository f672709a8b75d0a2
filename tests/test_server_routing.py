"""Black-box tests of `inferd serve` readiness and model routing: /health while models load, requests for a
loading or failed model, served names and any-name routing, the max_tokens limit and default."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from inferd.server.cli import LOAD_DELAY_ENV
from tests.server_utils import run_server

TINY = ("--dtype", "float32", "--kv-cache-memory", "0.05")


def completion(url: str, model: str | None, **kw) -> httpx.Response:
    body = {"prompt": "The capital", "max_tokens": 2, "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def chat(url: str, model: str | None, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def wait_health(url: str, status: int, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url + "/health")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
    """An HF directory the loader refuses (an architecture inferd does not implement)."""
    d = tmp_path_factory.mktemp("broken") / "broken-gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return d


def test_health_is_503_while_loading_and_requests_get_503_not_404(tiny_hf):
    # the debug knob holds loading for a few seconds, so "up but not ready" is observed, not raced
    with run_server("--model", str(tiny_hf), *TINY, "--load-wait", "0.2", wait="",
                    env={LOAD_DELAY_ENV: "6"}) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        assert r.json()["models"] == {tiny_hf.name: "loading"}
        assert httpx.get(s.url + "/ready").status_code == 503
        for model in (tiny_hf.name, None):  # named, or the default model
            r = completion(s.url, model)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "model_not_ready"
            assert "loading" in r.json()["error"]["message"]
        assert completion(s.url, "no-such-model").status_code == 404  # unknown names stay 404
        listed = httpx.get(s.url + "/v1/models").json()["data"]
        assert [(m["id"], m["status"]) for m in listed] == [(tiny_hf.name, "loading")]
        assert wait_health(s.url, 200).status_code == 200
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        assert httpx.get(s.url + "/ready").status_code == 200
        assert completion(s.url, tiny_hf.name).status_code == 200


def test_request_for_loading_model_waits_for_it(tiny_hf):
    with run_server("--model", str(tiny_hf), *TINY, "--load-wait", "60", wait="",
                    env={LOAD_DELAY_ENV: "3"}) as s:
        assert httpx.get(s.url + "/health").status_code == 503
        r = completion(s.url, tiny_hf.name)  # sent while loading: held until the model is ready
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_failed_model_is_named_and_the_others_serve(tiny_hf, broken_model):
    with run_server("--model", str(tiny_hf), "--served-model-name", "tiny", "--model", str(broken_model), *TINY,
                    wait="") as s:
        deadline = time.monotonic() + 60
        while httpx.get(s.url + "/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert "unsupported architecture" in r.json()["errors"][broken_model.name]
        assert httpx.get(s.url + "/ready").status_code == 503
        r = completion(s.url, broken_model.name)
        assert r.status_code == 500 and r.json()["error"]["type"] == "model_load_error"
        assert "failed to load" in r.json()["error"]["message"]
        assert "unsupported architecture" in r.json()["error"]["message"]
        assert completion(s.url, "tiny").status_code == 200
        assert completion(s.url, tiny_hf.name).status_code == 404  # served as "tiny" only
        statuses = {m["id"]: m["status"] for m in httpx.get(s.url + "/v1/models").json()["data"]}
        assert statuses == {"tiny": "ready", broken_model.name: "failed"}


def test_server_exits_when_no_model_loads():
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "serve", "--port", "0", "--model",
                        "/nonexistent/model.gguf"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "model file not found: /nonexistent/model.gguf" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def named(tiny_hf):
    with run_server("--model", str(tiny_hf), *TINY, "--served-model-name", "tiny", "gpt-4o-mini",
                    "--accept-any-model-name", "--max-tokens-limit", "20", "--max-model-len", "48") as s:
        yield s


def test_served_model_names(named):
    assert [m["id"] for m in httpx.get(named.url + "/v1/models").json()["data"]] == ["tiny", "gpt-4o-mini"]
    for name in ("tiny", "gpt-4o-mini"):
        r = completion(named.url, name)
        assert r.status_code == 200 and r.json()["model"] == name
    r = chat(named.url, "tiny", max_tokens=2)
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_accept_any_model_name_routes_to_the_only_chat_model(named):
    want = completion(named.url, "tiny").json()["choices"][0]["text"]
    r = completion(named.url, "gpt-3.5-turbo")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert r.json()["model"] == "tiny"  # the model that answered
    r = httpx.post(named.url + "/chat/completions", json={"model": "llama", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_max_tokens_limit(named):
    assert completion(named.url, "tiny", max_tokens=20).status_code == 200
    for r in (completion(named.url, "tiny", max_tokens=21), chat(named.url, "tiny", max_tokens=21),
              chat(named.url, "tiny", max_completion_tokens=21)):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and "limit of 20" in err["message"]


def test_default_max_tokens(named):
    # chat without max_tokens: up to the limit (20) ...
    r = chat(named.url, "tiny", ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    # ... clamped to the room the prompt leaves in the context (48 tokens), never a 400
    msgs = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 2}]
    n_prompt = httpx.post(named.url + "/tokenize", json={"messages": msgs}).json()["count"]
    room = 48 - n_prompt
    assert 1 <= room < 20, n_prompt  # the prompt is chosen so the clamp matters
    r = chat(named.url, "tiny", ignore_eos=True, messages=msgs)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == room
    # completions without max_tokens: OpenAI's 16 (under the limit)
    r = completion(named.url, "tiny", max_tokens=None, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
