"""StructuredOutputsParams: what a request's output must match (vLLM's names). Exactly one kind is set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inferd.errors import InvalidRequestError

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None  # a JSON schema (object or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or llama.cpp GBNF, told apart by syntax
    json_object: bool = False  # any JSON object
    strict: bool = True  # False: schema keywords the engine cannot enforce are ignored instead of refused
    param: str = "structured_outputs"  # the request field it came from, for error messages

    def __post_init__(self) -> None:
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(f"{self.param} needs exactly one of {', '.join(KINDS)}; got "
                                      f"{', '.join(set_) or 'none'}", param=self.param)
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings", param=self.param)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise InvalidRequestError(f"{name} must be a non-empty string", param=self.param)
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}", param=self.param) from None
        if self.json is not None and not isinstance(self.json, dict):
            raise InvalidRequestError("a JSON schema must be a JSON object", param=self.param)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical spec text): the compile cache's key."""
        kind = self.kind
        if kind == "json":
            return (f"json{'' if self.strict else ':lenient'}", json.dumps(self.json, sort_keys=True))
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, str(getattr(self, kind))
