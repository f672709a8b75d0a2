"""Bounded fuzz of the HTTP API: random JSON bodies, fields of every type, never a 500 and always an
OpenAI-style error body for a 4xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import run_server

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**9), 10**9), st.integers(0, 8),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))
MESSAGES = st.one_of(VALUES, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot", ""]),
                                                             "content": st.one_of(st.text(max_size=20), VALUES)}),
                                      max_size=3))
COMMON = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed", "logprobs", "top_logprobs",
          "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens", "echo",
          "ignore_eos", "stop_token_ids", "stream_options", "max_completion_tokens", "user", "priority"]


def bodies(main_field: str, main: st.SearchStrategy) -> st.SearchStrategy:
    extras = st.dictionaries(st.sampled_from(COMMON), VALUES, max_size=6)
    return st.builds(lambda m, e, small: {**e, main_field: m, **({"max_tokens": small} if small else {})},
                     main, extras, st.one_of(st.none(), st.integers(1, 4)))


@pytest.fixture(scope="module")
def url(tiny_hf):
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--max-model-len", "96") as s:
        yield s.url


def post(url: str, body: object) -> httpx.Response:
    # json.dumps writes NaN/Infinity literals (httpx refuses to): the server must turn them into a 400
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=bodies("messages", MESSAGES))
def test_fuzz_chat(url, body):
    check(post(url + "/v1/chat/completions", body))


@FUZZ
@given(body=bodies("prompt", st.one_of(VALUES, st.text(max_size=30), st.lists(st.integers(-5, 400), max_size=8))))
def test_fuzz_completions(url, body):
    check(post(url + "/v1/completions", body))


@FUZZ
@given(path=st.sampled_from(["/tokenize", "/detokenize", "/v1/embeddings", "/v1/score", "/v1/classify"]),
       body=st.dictionaries(st.sampled_from(["prompt", "messages", "tokens", "input", "query", "documents",
                                             "text_1", "text_2", "model"]), VALUES, max_size=4))
def test_fuzz_other_endpoints(url, path, body):
    check(post(url + path, body))
