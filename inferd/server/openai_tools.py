"""OpenAI tool calling on chat completions: `tools`, `tool_choice`, `parallel_tool_calls`.

The call format follows the model's chat template:
- "hermes": templates that know `<tool_call>` (Qwen 2/2.5/3, Hermes): `<tool_call>\\n{"name", "arguments"}\\n</tool_call>`;
- "llama3": Llama 3.x templates (`<|python_tag|>`): a JSON object {"name", "parameters"};
- "json": any other template (SmolLM2's has no tool support): the tools are described in the system message and
  a call is a JSON object {"name", "arguments"}, one per line.
The first two templates render `tools`, assistant `tool_calls` and `tool` messages themselves; for "json" we turn
them into plain text. With tool_choice "required" or a named function the call is grammar-constrained (a Lark
grammar embedding each function's parameter schema), so it always parses. One parser turns the model's text into
`message.tool_calls` and, fed piece by piece, into streamed `delta.tool_calls` (id and name first, then argument
fragments whose concatenation is exactly the final arguments string), so stream and non-stream agree.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from inferd.errors import InvalidRequestError
from inferd.structured.params import StructuredOutputsParams

GENERIC_SYSTEM = ("You can call these functions:\n{tools}\nTo call a function, reply with only a JSON object "
                  '{{"name": <function name>, "arguments": <arguments object>}}, one per line. Otherwise reply '
                  "normally.")


@dataclass(frozen=True)
class ToolFormat:
    name: str  # hermes | llama3 | json
    start: str  # text before each call
    end: str  # text after each call
    args_key: str  # "arguments" or "parameters"
    template_renders_tools: bool


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", True),
    "llama3": ToolFormat("llama3", "", "", "parameters", True),
    "json": ToolFormat("json", "", "", "arguments", False),
}


def detect_format(chat_template: str | None) -> ToolFormat:
    t = chat_template or ""
    if "<tool_call>" in t and "tools" in t:
        return FORMATS["hermes"]
    if "<|python_tag|>" in t or ("tools" in t and "ipython" in t):
        return FORMATS["llama3"]
    return FORMATS["json"]


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]  # the request's tools, validated
    choice: str  # auto | required | named | none
    named: str | None
    parallel: bool
    fmt: ToolFormat

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    def grammar(self) -> StructuredOutputsParams | None:
        """For required/named: a Lark grammar that only admits well-formed calls of the allowed functions."""
        if not self.constrained:
            return None
        bodies = []
        for t in self.tools:
            fn = t["function"]
            if self.named is not None and fn["name"] != self.named:
                continue
            params = dict(fn.get("parameters") or {"type": "object"})
            params.setdefault("additionalProperties", False)  # as OpenAI's strict mode: only the declared ones
            schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, self.fmt.args_key: params},
                      "required": ["name", self.fmt.args_key], "additionalProperties": False,
                      "x-guidance": {"whitespace_flexible": False, "lenient": fn.get("strict") is False}}
            bodies.append(f"%json {json.dumps(schema)}")
        call = f"{json.dumps(self.fmt.start)} body {json.dumps(self.fmt.end)}" if self.fmt.start else "body"
        more = ' ("\\n" call)*' if self.parallel else ""
        lark = f"start: call{more}\ncall: {call}\nbody: " + " | ".join(bodies) + "\n"
        return StructuredOutputsParams(grammar=lark, param="tools")


def _bad(msg: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(msg, param=param)


def tool_request(body: Any, chat_template: str | None) -> ToolRequest | None:
    """Validate `tools` / `tool_choice`; None when the request has no tools."""
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise _bad(f"tools[{i}].function.name must be a unique non-empty string", f"tools[{i}].function.name")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema of type object",
                       f"tools[{i}].function.parameters")
    named = None
    if choice is None:
        mode = "auto"
    elif isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _bad(f"tool_choice must be auto, none, required or a named function; got {choice!r}", "tool_choice")
        mode = choice
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = choice["function"].get("name")
        if named not in seen:
            raise _bad(f"tool_choice names the function {named!r}, which is not in tools "
                       f"({', '.join(sorted(seen))})", "tool_choice")
        mode = "named"
    else:
        raise _bad("tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                   "tool_choice")
    if chat_template is None:
        raise _bad("this model has no chat template, so it cannot be given tools", "tools")
    return ToolRequest(list(tools), mode, named, bool(body.parallel_tool_calls), detect_format(chat_template))


def _args_obj(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def chat_messages(messages: list[Any], tr: ToolRequest | None, chat_template: str | None) -> list[dict[str, Any]]:
    """Request messages → the dicts the chat template renders (tool calls and results included)."""
    fmt = tr.fmt if tr is not None else detect_format(chat_template)
    out: list[dict[str, Any]] = []
    for m in messages:
        extra = m.model_extra or {}
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        calls = extra.get("tool_calls") or []
        if calls and m.role == "assistant":
            fns = [c.get("function", {}) for c in calls if isinstance(c, dict)]
            if fmt.template_renders_tools:
                d["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                    "function": {"name": f.get("name"), "arguments": _args_obj(f.get("arguments"))}}
                                   for c, f in zip(calls, fns)]
            else:
                lines = [json.dumps({"name": f.get("name"), fmt.args_key: _args_obj(f.get("arguments"))})
                         for f in fns]
                d["content"] = "\n".join(filter(None, [d["content"], *lines]))
        if m.role == "tool":
            if fmt.template_renders_tools:
                d["tool_call_id"] = extra.get("tool_call_id")
                if m.name:
                    d["name"] = m.name
            else:
                d = {"role": "user", "content": f"Result of the function call {extra.get('tool_call_id') or ''}: "
                                                f"{d['content']}"}
        out.append(d)
    if tr is not None and tr.active and not fmt.template_renders_tools:
        text = GENERIC_SYSTEM.format(tools="\n".join(json.dumps(t["function"]) for t in tr.tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_kwargs(tr: ToolRequest | None) -> dict[str, Any]:
    if tr is None or not tr.active or not tr.fmt.template_renders_tools:
        return {}
    return {"tools": tr.tools}


# ---- parsing the model's text into tool calls ----------------------------------------------------------
@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Incremental: feed() text pieces, get events; finish() at the end. Events: ("content", text) or
    ("call", index, {"id", "name"}) when a call starts, ("args", index, fragment) as its arguments arrive."""

    fmt: ToolFormat
    names: list[str]
    buf: str = ""  # text not yet consumed
    mode: str = "undecided"  # undecided | content | header | args | after
    calls: list[_Call] = field(default_factory=list)
    content: str = ""
    _depth: int = 0
    _in_str: bool = False
    _esc: bool = False

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        events: list[tuple] = []
        while True:
            if self.mode == "content":
                if self.buf:
                    self.content += self.buf
                    events.append(("content", self.buf))
                    self.buf = ""
                return events
            if self.mode in ("undecided", "header"):
                res = self._header()
                if res is None:  # need more text
                    return events
                if res is False:
                    if self.mode == "undecided":
                        self.mode = "content"
                        continue
                    self.mode, self.buf = "after", ""  # trailing text after the calls is not content
                    return events
                name, rest = res
                self.calls.append(_Call(f"call_{uuid.uuid4().hex[:24]}", name))
                events.append(("call", len(self.calls) - 1, {"id": self.calls[-1].id, "name": name}))
                self.buf, self.mode = rest, "args"
                self._depth, self._in_str, self._esc = 0, False, False
                continue
            if self.mode == "args":
                frag, done = self._scan_args()
                if frag:
                    self.calls[-1].arguments += frag
                    events.append(("args", len(self.calls) - 1, frag))
                if not done:
                    return events
                self.mode = "close"
                continue
            if self.mode == "close":  # the outer "}" and the format's end marker, then maybe another call
                j = _match_loose(self.buf, "}" + self.fmt.end)
                if j is None:
                    return events
                if j is False:
                    self.mode, self.buf = "after", ""
                    return events
                self.buf = self.buf[j:]
                self.mode = "header"
                continue
            self.buf = ""  # after: ignore the rest
            return events

    def finish(self) -> list[tuple]:
        events: list[tuple] = []
        if self.mode == "undecided" and self.buf:
            self.mode = "content"
            events = self.feed("")
        return events

    # header: [start marker] ws [ "[" | "," ] ws "{" ws "\"name\"" ws ":" ws "\"NAME\"" ws "," ws "\"args_key\"" ws ":" ws
    def _header(self) -> tuple[str, str] | bool | None:
        s, i = self.buf, 0

        def ws(i: int) -> int:
            while i < len(s) and s[i] in " \t\r\n":
                i += 1
            return i

        def lit(i: int, text: str) -> int | bool | None:
            chunk = s[i : i + len(text)]
            if chunk == text:
                return i + len(text)
            return None if text.startswith(chunk) else False

        i = ws(i)
        if self.mode == "header" and i >= len(s):
            return None
        steps: list[str] = []
        if self.fmt.start:
            steps.append(self.fmt.start.strip())
        for piece in [*steps, "{", '"name"', ":", '"']:
            i = ws(i)
            if piece == "{" and i < len(s) and s[i] in "[,":  # JSON array of calls
                i = ws(i + 1)
            r = lit(i, piece)
            if r is None or r is False:
                return r
            i = r
        end = s.find('"', i)
        if end < 0:
            return None
        name = s[i:end]
        if name not in self.names:
            return False
        i = end + 1
        for piece in (",", f'"{self.fmt.args_key}"', ":"):
            i = ws(i)
            r = lit(i, piece)
            if r is None or r is False:
                return r
            i = r
        i = ws(i)
        if i >= len(s):
            return None
        return name, s[i:]

    def _scan_args(self) -> tuple[str, bool]:
        s = self.buf
        for k, ch in enumerate(s):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.buf = s[k + 1 :]
                    return s[: k + 1], True
        self.buf = ""
        return s, False


def _match_loose(s: str, expected: str) -> int | bool | None:
    """Match `expected` at the start of s, whitespace-insensitively; index after it, None (need more), False."""
    i = 0
    for ch in expected:
        if ch in " \n":
            continue
        while i < len(s) and s[i] in " \t\r\n":
            i += 1
        if i >= len(s):
            return None
        if s[i] != ch:
            return False
        i += 1
    return i


def parse_tool_calls(fmt: ToolFormat, names: list[str], text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Whole text → (content, tool_calls) as in a chat.completion message."""
    p = ToolCallParser(fmt, names)
    p.feed(text)
    p.finish()
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in p.calls]
    return (p.content or None) if calls else text, calls


def chat_prompt(tokenizer: Any, body: Any) -> tuple[list[int], ToolRequest | None]:
    """The chat request's prompt ids (tools rendered as the template wants) and its tool request, if any."""
    tr = tool_request(body, tokenizer.chat_template)
    msgs = chat_messages(body.messages, tr, tokenizer.chat_template)
    kwargs = template_kwargs(tr)
    if not kwargs:
        return tokenizer.encode_chat(msgs, body.add_generation_prompt), tr
    try:
        text = tokenizer.apply_chat_template(msgs, body.add_generation_prompt, **kwargs)
    except InvalidRequestError:
        raise
    except Exception as exc:  # a template that cannot render these tools or messages
        raise InvalidRequestError(f"the model's chat template cannot render this request's tools or messages: "
                                  f"{type(exc).__name__}: {exc}", param="tools") from None
    return tokenizer.encode(text, add_special_tokens=False), tr


def stream_deltas(events: list[tuple]) -> list[dict[str, Any]]:
    """Parser events → chat.completion.chunk deltas, as the OpenAI client accumulates them."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev[0] == "content":
            out.append({"content": ev[1]})
        elif ev[0] == "call":
            out.append({"tool_calls": [{"index": ev[1], "id": ev[2]["id"], "type": "function",
                                        "function": {"name": ev[2]["name"], "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
    return out
