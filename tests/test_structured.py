"""Structured outputs with the real SmolLM2 model through the library API: the JSON schema suite validates
100% at temperature 0 and 1; regex, choice and grammar (Lark and GBNF) outputs match; bad specs are refused
before anything runs. Plus the tool-call parser (no model): fed piece by piece it gives the same calls as on
the whole text."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from inferd.errors import InvalidRequestError
from inferd.sampling_params import SamplingParams
from inferd.server.openai_tools import FORMATS, ToolCallParser, detect_format, parse_tool_calls
from inferd.structured import StructuredOutputsParams
from tests.conftest import needs_smollm2
from tests.structured_schemas import SCHEMAS


@pytest.fixture(scope="module")
def smol():
    from inferd import LLM

    return LLM("smollm2-135m", max_num_seqs=64)


def chat(llm, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


@needs_smollm2
def test_schema_suite_validates_at_temperature_0_and_1(smol):
    assert len(SCHEMAS) >= 20
    prompts, params, cases = [], [], []
    for temp in (0.0, 1.0):
        for name, schema in SCHEMAS.items():
            prompts.append(chat(smol, f"Reply with JSON: {name}"))
            params.append(SamplingParams(max_tokens=120, temperature=temp, seed=7,
                                         structured_outputs=StructuredOutputsParams(json=schema)))
            cases.append((name, temp, schema))
    outs = smol.generate(prompts, params)  # one batch through one engine
    for (name, temp, schema), out in zip(cases, outs):
        co = out.outputs[0]
        assert co.finish_reason == "stop", (name, temp, co.text)
        jsonschema.validate(json.loads(co.text), schema)  # raises with the schema path on a mismatch
    stats = smol.engine.structured.stats
    assert stats.mask_s and all(t >= 0 for t in stats.mask_s)


@needs_smollm2
def test_regex_choice_and_grammars_match(smol):
    specs = [
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
        ({"grammar": 'root ::= "total: " [1-9] [0-9]? " " ("EUR" | "USD")'},  # llama.cpp GBNF
         lambda t: re.fullmatch(r"total: [1-9][0-9]? (EUR|USD)", t)),
        ({"grammar": 'start: "id=" /[A-Z]{2}[0-9]{2}/'}, lambda t: re.fullmatch(r"id=[A-Z]{2}[0-9]{2}", t)),  # Lark
    ]
    for temp in (0.0, 1.0):
        outs = smol.generate([chat(smol, "Answer.")] * len(specs),
                             [SamplingParams(max_tokens=40, temperature=temp, seed=3, structured_outputs=s)
                              for s, _ in specs])
        for (spec, ok), out in zip(specs, outs):
            text = out.outputs[0].text
            assert ok(text), (spec, temp, text)
    # any JSON object: unbounded, so it may run out of tokens, but it is always a JSON object's prefix
    out = smol.generate([chat(smol, "Give me JSON.")], SamplingParams(max_tokens=60, temperature=0,
                                                                        structured_outputs={"json_object": True}))
    co = out[0].outputs[0]
    assert co.text.startswith("{")
    if co.finish_reason == "stop":
        assert isinstance(json.loads(co.text), dict)


@needs_smollm2
def test_unconstrained_rows_in_a_constrained_batch_are_untouched(smol):
    free = SamplingParams(max_tokens=16, temperature=0)
    alone = smol.generate([chat(smol, "Tell me about Paris.")], free)[0].outputs[0].text
    mixed = smol.generate([chat(smol, "Tell me about Paris.")] * 3, [
        SamplingParams(max_tokens=16, temperature=0, structured_outputs={"regex": "[a-z]{5}"}), free,
        SamplingParams(max_tokens=16, temperature=1, seed=1, structured_outputs={"choice": ["A", "B"]})])
    assert mixed[1].outputs[0].text == alone
    assert re.fullmatch("[a-z]{5}", mixed[0].outputs[0].text) and mixed[2].outputs[0].text in ("A", "B")


@needs_smollm2
def test_jump_forward_appends_forced_tokens_and_reports_them(smol):
    schema = {"type": "object", "properties": {"invoice_number": {"type": "string", "pattern": "^[0-9]{3}$"}},
              "required": ["invoice_number"], "additionalProperties": False}
    eng = smol.engine
    eng.add_request("jf", chat(smol, "JSON"), SamplingParams(max_tokens=30, temperature=0,
                                                             structured_outputs={"json": schema}))
    per_step = []
    while eng.has_unfinished_requests():
        for ro in eng.step():
            per_step.append(len(ro.outputs[0].delta_token_ids))
            final = ro.outputs[0]
    assert max(per_step) > 1  # the forced '{"invoice_number":"' arrived in one step with the first sampled token
    assert sum(per_step) == len(final.token_ids)
    assert re.fullmatch(r'\{"invoice_number":"[0-9]{3}"\}', final.text)


@needs_smollm2
def test_bad_specs_are_refused_with_the_reason(smol):
    def refused(spec: dict) -> str:
        with pytest.raises(InvalidRequestError) as e:
            smol.generate([chat(smol, "x")], SamplingParams(max_tokens=4, structured_outputs=spec))
        return str(e.value)

    assert "uniqueItems" in refused({"json": {"type": "array", "uniqueItems": True}})
    assert "Invalid type" in refused({"json": {"type": "objekt"}})
    assert "/nowhere" in refused({"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}})
    assert "regex" in refused({"regex": "[a-"})
    assert "grammar" in refused({"grammar": "root ::= (("})
    assert "exactly one" in refused({"regex": "a", "choice": ["a"]})
    assert not smol.engine.has_unfinished_requests()
    # strict false: the keyword the engine cannot enforce is ignored instead
    out = smol.generate([chat(smol, "x")], SamplingParams(max_tokens=20, temperature=0, structured_outputs={
        "json": {"type": "array", "uniqueItems": True, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
        "strict": False}))
    assert isinstance(json.loads(out[0].outputs[0].text), list)


def test_compile_cache_keys_by_kind_and_spec():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"a": {}, "b": {}}})
    b = StructuredOutputsParams(json='{"properties": {"b": {}, "a": {}}, "type": "object"}')
    assert a.key() == b.key()
    assert StructuredOutputsParams(json={}, strict=False).key() != StructuredOutputsParams(json={}).key()
    assert StructuredOutputsParams(regex="a").key() != StructuredOutputsParams(grammar="a").key()


@pytest.mark.parametrize("fmt,text", [
    ("hermes", '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa}ris","d":{"a":"\\"}"}}}\n</tool_call>\n'
               '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'),
    ("json", '{"name":"get_weather","arguments":{"city":"Paris"}}\n{"name":"lookup","arguments":{"q":[1,{"r":2}]}}'),
    ("llama3", '[{"name": "lookup", "parameters": {"a": 1}}, {"name": "get_weather", "parameters": {"b": "]"}}]'),
])
def test_tool_call_parser_stream_equals_whole(fmt, text):
    names = ["get_weather", "lookup"]
    content, calls = parse_tool_calls(FORMATS[fmt], names, text)
    assert content is None and len(calls) == 2
    for c in calls:
        json.loads(c["function"]["arguments"])
    for step in (1, 3, 7):  # pieces of any size: same names, same argument strings
        p = ToolCallParser(FORMATS[fmt], names)
        events = []
        for i in range(0, len(text), step):
            events += p.feed(text[i : i + step])
        events += p.finish()
        started = [e[2]["name"] for e in events if e[0] == "call"]
        args = ["".join(e[2] for e in events if e[0] == "args" and e[1] == k) for k in range(len(started))]
        assert started == [c["function"]["name"] for c in calls]
        assert args == [c["function"]["arguments"] for c in calls]
        assert not [e for e in events if e[0] == "content"]


def test_tool_call_parser_leaves_plain_text_and_unknown_names_as_content():
    for text in ("The weather is fine.", '{"name": "rm_rf", "arguments": {}}', "  {\"answer\": 4}"):
        content, calls = parse_tool_calls(FORMATS["json"], ["get_weather"], text)
        assert calls == [] and content == text


def test_tool_format_follows_the_chat_template():
    assert detect_format("{% for tool in tools %}<tool_call>{% endfor %}").name == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}{% if tools %}{% endif %}").name == "llama3"
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}").name == "json"
