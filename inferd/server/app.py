"""The FastAPI app: routes, auth, body limits, error mapping. HTTP only: no model math here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferd import __version__
from inferd.errors import (
    InferdError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    OverloadedError,
)
from inferd.server import oip, serving_audio, serving_completions, serving_embeddings, webui
from inferd.server.protocol import DetokenizeRequest, TokenizeRequest, error_body
from inferd.server.state import ServerState

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/ready", "/metrics", "/version", "/docs", "/openapi.json", "/v2/health/live",
              "/v2/health/ready"}
RETRY_AFTER_S = {OverloadedError: 1, ModelNotReadyError: 5}


def _error(status: int, message: str, type_: str, param: str | None = None, code: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, InferdError):
        retry = next((v for k, v in RETRY_AFTER_S.items() if isinstance(exc, k)), None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        code = exc.error_type if isinstance(exc, ModelNotFoundError) else None
        return _error(exc.status_code, str(exc), exc.error_type, getattr(exc, "param", None), code, headers)
    log.exception("internal error")
    return _error(500, f"internal error: {type(exc).__name__}", "internal_error")


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit (declared or streamed), 401 for a bad API key."""

    def __init__(self, app: Callable, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.state.api_key and scope["path"] not in OPEN_PATHS and not webui.is_open(scope["path"]):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {self.state.api_key}":
                self.state.metrics.rejected.labels("unauthorized").inc()
                resp = _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              "authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        limit = serving_audio.body_limit(scope["path"], self.state.max_body_bytes)
        declared = headers.get(b"content-length")
        def too_big() -> JSONResponse:  # built only when needed: this runs on every request
            return _error(413, f"request body is larger than the limit of {limit} bytes", "invalid_request_error")

        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.state.metrics.rejected.labels("body_too_large").inc()
            return await too_big()(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            self.state.metrics.rejected.labels("body_too_large").inc()
            await too_big()(scope, receive, send)


class _TooLarge(Exception):
    pass


def build_app(state: ServerState, webui_pages: bool = True) -> FastAPI:
    app = FastAPI(title="inferd", version=__version__,
                  description="OpenAI-compatible inference server (chat, completions, embeddings)")
    app.state.inferd = state
    app.add_middleware(BodyLimit, state=state)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        return _error(400, f"{msg}" + (f" ({'.'.join(loc)})" if loc else ""), "invalid_request_error",
                      ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(InferdError)
    async def _inferd(_: Request, exc: InferdError) -> JSONResponse:
        if isinstance(exc, OverloadedError):
            state.metrics.rejected.labels("queue_full" if not state.draining else "draining").inc()
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        code, body = state.health()
        return JSONResponse(body, status_code=code)

    @app.get("/ready")
    async def ready() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        code, body = state.health()
        return JSONResponse({"status": "ready"} if code == 200 else body, status_code=code)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models() -> dict[str, Any]:
        data = []
        for slot in state.slots:
            for n in slot.names:
                entry = {"id": n, "object": "model", "created": state.created, "owned_by": "inferd",
                         "root": slot.name, "status": slot.status}
                if slot.llm is not None:
                    entry["max_model_len"] = slot.llm.engine.max_model_len
                data.append(entry)
        return {"object": "list", "data": data}

    app.get("/v1/models")(models)
    app.get("/models", include_in_schema=False)(models)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        llm, _ = await state.llm(req.model)
        tok = llm.tokenizer
        text = req.prompt if req.prompt is not None else req.content
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = tok.encode_chat(msgs, req.add_generation_prompt)
        elif text is not None:
            ids = tok.encode(text, add_special_tokens=req.special_tokens())
        else:
            raise InvalidRequestError("give prompt (or llama.cpp's content) or messages", param="prompt")
        tokens: list[Any] = ids
        if req.with_pieces:  # llama.cpp: [{"id", "piece"}], a piece that is not whole UTF-8 as its bytes
            table = tok.byte_table(False)
            tokens = [{"id": t, "piece": _piece(table[t]) if table else tok.decode([t], skip_special_tokens=False)}
                      for t in ids]
        return {"tokens": tokens, "count": len(ids), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        llm, _ = await state.llm(req.model)
        vocab = llm.engine.lm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        text = llm.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return {"prompt": text, "content": text}  # vLLM's name and llama.cpp's

    serving_completions.add_routes(app, state)
    serving_embeddings.add_routes(app, state)
    serving_audio.add_routes(app, state)
    oip.add_routes(app, state)
    webui.add_routes(app, state, pages=webui_pages)
    return app


def _piece(b: bytes) -> str | list[int]:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)
