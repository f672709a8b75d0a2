"""Request bodies of the OpenAI API (plus vLLM's extras). Unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inferd.errors import InvalidRequestError
from inferd.sampling_params import SamplingParams


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text":
                raise InvalidRequestError(f"content part of type {p.type!r} is not supported", param="messages")
            parts.append(p.text or "")
        return "".join(parts)


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str | None = None
    max_tokens: int | None = Field(default=None)
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) → bias in [-100, 100]
    return_tokens_as_token_ids: bool = False  # vLLM: logprobs name tokens "token_id:N"
    # structured outputs (see server/openai_structured.py): OpenAI, vLLM (current and older) and llama.cpp fields
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    json_schema: Any = None
    grammar: Any = None

    def logit_bias_ids(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            try:
                out[int(k)] = v
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
        return out

    def _base(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=self.logit_bias_ids(),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Any = None  # [{"type": "function", "function": {"name", "description", "parameters", "strict"}}]
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True

    def sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._base(self.max_completion_tokens or self.max_tokens, lp, None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        plp = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._base(self.max_tokens, self.logprobs, plp)  # None: the server's default applies


class TokenizeRequest(_Open):
    """vLLM's shape ({prompt | messages, add_special_tokens}) or llama.cpp's ({content, add_special,
    with_pieces})."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM; default true
    add_special: bool | None = None  # llama.cpp; default false
    add_generation_prompt: bool = True
    with_pieces: bool = False  # llama.cpp: tokens as [{"id", "piece"}]

    def special_tokens(self) -> bool:
        """Whether to add BOS and the like: the flag that was sent, else each API's default."""
        for flag in (self.add_special_tokens, self.add_special):
            if flag is not None:
                return flag
        return self.prompt is not None


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
