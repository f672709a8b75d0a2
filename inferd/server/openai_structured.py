"""Structured-output fields of the OpenAI, vLLM and llama.cpp APIs → one StructuredOutputsParams.

Accepted (one source per request):
- OpenAI `response_format`: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
  "strict"}}; llama.cpp's {"type": "json_object", "schema": {...}} too.
- vLLM `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object"}; the older
  `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` fields.
- llama.cpp `json_schema` (a schema) and `grammar` (GBNF; Lark is accepted as well).
A schema keyword the engine cannot enforce is a 400 naming it, unless the request says `strict: false`.
"""

from __future__ import annotations

from typing import Any

from inferd.errors import InvalidRequestError
from inferd.structured.params import StructuredOutputsParams


def _from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if not isinstance(rf, dict):
        raise InvalidRequestError("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = rf.get("schema")  # llama.cpp's extension
        if schema is not None:
            return StructuredOutputsParams(json=schema, param="response_format")
        return StructuredOutputsParams(json_object=True, param="response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict | str):
            raise InvalidRequestError("response_format.json_schema needs a 'schema' object",
                                      param="response_format.json_schema")
        return StructuredOutputsParams(json=js["schema"], strict=js.get("strict") is not False,
                                       param="response_format.json_schema")
    raise InvalidRequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                              param="response_format")


def _from_structured_outputs(so: Any) -> StructuredOutputsParams:
    if not isinstance(so, dict):
        raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
    known = {"json", "regex", "choice", "grammar", "json_object", "strict"}
    unknown = sorted(set(k for k, v in so.items() if v is not None) - known)
    if unknown:
        raise InvalidRequestError(f"structured_outputs field {unknown[0]!r} is not supported "
                                  f"(supported: {', '.join(sorted(known))})", param="structured_outputs")
    args = {k: v for k, v in so.items() if v is not None}
    return StructuredOutputsParams(**args, param="structured_outputs")


def structured_from_request(body: Any) -> StructuredOutputsParams | None:
    """The one structured-output constraint a chat or completion request asks for (None: free text)."""
    found: list[StructuredOutputsParams] = []
    sources: list[str] = []

    def add(name: str, spec: StructuredOutputsParams | None) -> None:
        if spec is not None:
            found.append(spec)
            sources.append(name)

    if body.response_format is not None:
        add("response_format", _from_response_format(body.response_format))
    if body.structured_outputs is not None:
        add("structured_outputs", _from_structured_outputs(body.structured_outputs))
    for field, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar"), ("json_schema", "json"), ("grammar", "grammar")):
        value = getattr(body, field)
        if value is not None:
            add(field, StructuredOutputsParams(**{kind: value}, param=field))
    if len(found) > 1:
        raise InvalidRequestError(f"give one structured-output constraint; got {', '.join(sources)}",
                                  param=sources[1])
    return found[0] if found else None


async def constrain(llm: Any, params: Any, spec: StructuredOutputsParams | None) -> None:
    """Compile `spec` off the engine thread (cached), then attach it to the request's params. A compile error
    is a 400 here, before anything runs."""
    if spec is None:
        return
    await llm.engine.grammar_compiler().compile_async(spec)
    params.structured_outputs = spec
