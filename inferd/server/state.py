"""What every route module shares: the server's state (configured models and their load status, limits,
metrics) and the small helpers for streaming and client disconnects. Route modules import this module;
it imports none of them, so imports run one way: cli → app → serving_* → state."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request

from inferd.engine.async_engine import AsyncLLM
from inferd.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, ModelNotReadyError
from inferd.server.metrics import Metrics

if TYPE_CHECKING:
    from inferd.server.serving_embeddings import EmbeddingService

Kind = Literal["generate", "embed", "tensor", "audio"]
Status = Literal["loading", "ready", "failed"]


def default_model_name(spec: str) -> str:
    """The name a model is served under without --served-model-name: a catalogue name as given, else the
    file or directory name (what the loaders call it)."""
    from inferd.loader import hub

    return spec if spec in hub.CATALOGUE else Path(spec).expanduser().name


@dataclass
class ModelSlot:
    """One configured --model. It is known (and routable) from the start; `status` goes loading → ready,
    or loading → failed with `error` saying why."""

    spec: str
    names: list[str]  # served names; the first is the one responses and metrics use
    kind: Kind
    status: Status = "loading"
    error: str | None = None
    llm: AsyncLLM | None = None
    embedder: EmbeddingService | None = None
    service: Any = None  # tensor (inferd.tabular.service.TensorService) and audio (inferd.audio.service) models

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class ServerState:
    slots: list[ModelSlot] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    accept_any_model_name: bool = False  # unknown names go to the only model of the asked kind
    max_tokens_limit: int | None = None  # per-request cap on max_tokens (400 above it)
    load_wait_s: float = 5.0  # how long a request for a loading model waits before 503 + Retry-After
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    # ---- readiness -------------------------------------------------------------------------------
    @property
    def all_ready(self) -> bool:
        return bool(self.slots) and all(s.status == "ready" for s in self.slots)

    @property
    def loading(self) -> bool:
        return any(s.status == "loading" for s in self.slots)

    def health(self) -> tuple[int, dict[str, Any]]:
        """(status code, body) of /health: 200 only when every configured model can serve."""
        if self.all_ready:
            return 200, {"status": "ok"}
        body: dict[str, Any] = {"status": "loading" if self.loading else "error",
                                "models": {s.name: s.status for s in self.slots}}
        errors = {s.name: s.error for s in self.slots if s.status == "failed"}
        if errors:
            body["errors"] = errors
        return 503, body

    # ---- model lookup ----------------------------------------------------------------------------
    def engines(self) -> list[AsyncLLM]:
        return [s.llm for s in self.slots if s.llm is not None]

    def names(self) -> list[str]:
        return [n for s in self.slots for n in s.names]

    def find(self, name: str | None, kind: Kind) -> ModelSlot:
        """The slot a request's `model` names (no name: the first model of that kind). 404 only for a name
        no configured model has; a model still loading is found, never 'not found'."""
        of_kind = [s for s in self.slots if s.kind == kind]
        what = {"generate": "generative", "embed": "embedding", "tensor": "tensor", "audio": "speech"}[kind]
        if not name:
            if not of_kind:
                hint = {"generate": "", "embed": " (start the server with an encoder --model)",
                        "tensor": " (start the server with a --model .onnx, .json, .ubj or .skops file)",
                        "audio": " (start the server with --model whisper-tiny.en)"}[kind]
                raise ModelNotFoundError(f"no {what} model is configured{hint}")
            return of_kind[0]
        for s in self.slots:
            if name in s.names:
                if s.kind != kind:
                    raise InvalidRequestError(f"the model {name!r} is not a {what} model", param="model")
                return s
        if self.accept_any_model_name and len(of_kind) == 1:
            return of_kind[0]
        raise ModelNotFoundError(f"the model {name!r} does not exist; available: {', '.join(self.names())}")

    async def ready_slot(self, name: str | None, kind: Kind) -> ModelSlot:
        """find(), then wait up to load_wait_s for a loading model; 503 + Retry-After if it is still
        loading, a load error (500, naming the cause) if it failed."""
        slot = self.find(name, kind)
        deadline = time.monotonic() + self.load_wait_s
        while slot.status == "loading" and time.monotonic() < deadline:  # the loader thread flips status
            await asyncio.sleep(0.05)
        if slot.status == "loading":
            self.metrics.rejected.labels("model_loading").inc()
            raise ModelNotReadyError(f"the model {slot.name!r} is still loading; retry later")
        if slot.status == "failed":
            raise ModelLoadError(f"the model {slot.name!r} failed to load: {slot.error}")
        return slot

    async def llm(self, name: str | None) -> tuple[AsyncLLM, str]:
        """The engine for a generation request and the model name its response carries (the name asked
        for when it is one of the model's names, else the model's first served name)."""
        slot = await self.ready_slot(name, "generate")
        assert slot.llm is not None, "a ready generative slot has an engine"
        return slot.llm, name if name in slot.names else slot.name

    async def embedder(self, name: str | None) -> tuple[EmbeddingService, str]:
        slot = await self.ready_slot(name, "embed")
        assert slot.embedder is not None, "a ready embedding slot has a service"
        return slot.embedder, name if name in slot.names else slot.name

    async def service(self, name: str | None, kind: Kind) -> tuple[Any, str]:
        """The service of a ready tensor or audio model and the name its response carries."""
        slot = await self.ready_slot(name, kind)
        assert slot.service is not None, "a ready slot of this kind has a service"
        return slot.service, name if name in slot.names else slot.name

    def check_max_tokens(self, max_tokens: int | None) -> None:
        if self.max_tokens_limit is not None and max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens is {max_tokens}, more than this server's limit of "
                                      f"{self.max_tokens_limit} (--max-tokens-limit)", param="max_tokens")

    def default_max_tokens(self, llm: AsyncLLM, n_prompt: int) -> int | None:
        """max_tokens for a chat request that sends none: up to the context length, capped by
        --max-tokens-limit (the cap is clamped to the room the prompt leaves, so it never causes a 400)."""
        if self.max_tokens_limit is None:
            return None
        room = llm.engine.max_model_len - n_prompt
        return min(self.max_tokens_limit, room) if room >= 1 else self.max_tokens_limit


async def run_until_disconnect(request: Request, work: Awaitable[Any], state: ServerState) -> Any:
    """Await `work`; if the client goes away first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            state.metrics.rejected.labels("client_disconnect").inc()
            raise asyncio.CancelledError()


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
