"""Open Inference Protocol v2 (KServe / Triton) REST routes for tensor models.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]      model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer {"inputs": [{name, shape, datatype, data}], "outputs": [{name}]}

Errors are the protocol's {"error": "message"} (400 for a malformed request or a shape/datatype mismatch, 404 for
an unknown model). Responses carry the request's compute time and cost in `parameters`. Requests and responses
may carry tensors as raw bytes (the binary tensor data extension, see oip_codec).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from inferd import __version__
from inferd.errors import InferdError, InvalidRequestError, ModelNotFoundError, OverloadedError
from inferd.server.oip_codec import HEADER_LENGTH, encode_response, parse_request, split_body
from inferd.server.state import ModelSlot, ServerState
from inferd.tabular.models import TensorModel
from inferd.tabular.service import TensorService

VERSION = "1"  # one version per served model
log = logging.getLogger(__name__)


def _oip_error(exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, InferdError) else 500
    if status == 500:
        log.error("internal error", exc_info=exc)
    headers = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else None
    msg = str(exc) if isinstance(exc, InferdError) else f"internal error: {type(exc).__name__}"
    return JSONResponse({"error": msg}, status_code=status, headers=headers)


def _oip(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Route wrapper: inferd errors become the protocol's {"error": ...} body."""

    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error gets the protocol's body
            return _oip_error(exc)

    return wrapped


def _slot(state: ServerState, name: str, version: str | None) -> ModelSlot:
    if version is not None and version != VERSION:
        raise ModelNotFoundError(f"model {name!r} has no version {version!r} (served: {VERSION})")
    for s in state.slots:
        if name in s.names:
            if s.kind != "tensor":
                raise InvalidRequestError(f"the model {name!r} is not a tensor model; the v2 protocol serves "
                                          "tensor models (.onnx, XGBoost .json/.ubj, .skops)")
            return s
    raise ModelNotFoundError(f"the model {name!r} does not exist; tensor models: "
                             f"{', '.join(n for s in state.slots if s.kind == 'tensor' for n in s.names) or 'none'}")


class InferEndpoint:
    """POST /v2/models/{name}[/versions/{v}]/infer as a plain ASGI app. A tabular model scores a row in well
    under a millisecond, so the HTTP layer is most of a request's cost: FastAPI's parameter solving alone was a
    fifth of the event loop's time under load; this reads the body and writes the response itself."""

    def __init__(self, state: ServerState):
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        t0 = time.perf_counter()
        # read outside the try: an error from `receive` (the body limit's 413) belongs to the middleware above
        body = await _read_body(receive)
        if body is None:  # the client went away before sending the whole body: nobody to answer
            return
        try:
            status, (body, headers) = 200, await self._infer(scope, body, t0)
        except Exception as exc:  # noqa: BLE001 - every error gets the protocol's body
            resp = _oip_error(exc)
            status, body, headers = resp.status_code, bytes(resp.body), dict(resp.headers)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
                                if k != "content-length"] + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, scope: dict, body: bytes, t0: float) -> tuple[bytes, dict[str, str]]:
        state = self.state
        params = scope["path_params"]
        name = params["name"]
        slot = _slot(state, name, params.get("version"))
        if slot.status != "ready":
            slot = await state.ready_slot(slot.name, "tensor")
        svc: TensorService = slot.service
        header_length = next((v.decode("latin-1") for k, v in scope["headers"] if k == _HEADER_LENGTH_KEY), None)
        head, raw = split_body(body, header_length)
        req = parse_request(svc.model, head, raw)
        outs, compute_s, cached = await svc.infer(req.inputs)
        cost = state.metrics.observe_compute(slot.name, compute_s, time.perf_counter() - t0)
        resp: dict[str, Any] = {"model_name": name, "model_version": VERSION,
                                "parameters": {"compute_s": round(compute_s, 9), "cost_usd": cost, "cached": cached}}
        if req.id is not None:
            resp["id"] = req.id
        dtypes = {s.name: s.datatype for s in svc.model.outputs}
        names = req.outputs or list(dtypes)
        return encode_response(resp, [(n, outs[n], dtypes[n]) for n in names], req.binary)


_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()


async def _read_body(receive: Callable) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    msg = await receive()
    if msg["type"] == "http.disconnect":
        return None
    body = msg.get("body", b"")
    if not msg.get("more_body", False):
        return body
    chunks = [body]
    while msg.get("more_body", False):
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
    return b"".join(chunks)


def infer_path_params(path: str) -> dict[str, str] | None:
    """{name[, version]} when `path` is /v2/models/{name}[/versions/{version}]/infer (Starlette's `{x}` is one
    non-empty path segment), else None."""
    parts = path.split("/")
    n = len(parts)
    if n == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3] and not parts[0]:
        return {"name": parts[3]}
    if (n == 7 and parts[6] == "infer" and parts[4] == "versions" and parts[1] == "v2" and parts[2] == "models"
            and parts[3] and parts[5] and not parts[0]):
        return {"name": parts[3], "version": parts[5]}
    return None


class FastInferPath:
    """The app's outermost ASGI layer. POST /v2/models/{name}[/versions/{v}]/infer goes to `infer` wrapped in the
    app's own middleware (inferd's BodyLimit: API key → 401, body limit → 413), skipping FastAPI's error,
    telemetry, exception and exit-stack layers and the router: on a small tabular model those cost a fifth of the
    server's CPU per request and do nothing for this route (InferEndpoint answers every error itself). Anything
    else, and an app mounted under a root_path, goes to the full stack, where the same route is registered."""

    def __init__(self, full: Callable, infer: Callable):
        self.full, self.infer = full, infer

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            params = infer_path_params(scope["path"])
            if params is not None:
                scope["path_params"] = params
                return await self.infer(scope, receive, send)
        await self.full(scope, receive, send)


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "inferd", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if state.all_ready and not state.draining else 503)

    @_oip
    async def metadata(name: str, version: str | None = None) -> Any:
        slot = _slot(state, name, version)
        if slot.status != "ready":
            return {"name": name, "versions": [VERSION], "platform": "", "inputs": [], "outputs": [],
                    "state": slot.status}
        m: TensorModel = slot.service.model
        return {"name": name, "versions": [VERSION], "platform": m.platform,
                "inputs": [s.to_json() for s in m.inputs], "outputs": [s.to_json() for s in m.outputs]}

    @_oip
    async def model_ready(name: str, version: str | None = None) -> Any:
        slot = _slot(state, name, version)
        return Response(status_code=200 if slot.status == "ready" else 503)

    infer = InferEndpoint(state)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.get(base)(metadata)
        app.get(base + "/ready")(model_ready)
        # first in the routing table: the hot path skips matching every other route
        app.router.routes.insert(0, Route(base + "/infer", infer, methods=["POST"]))
    _install_fast_path(app, infer)


def _install_fast_path(app: FastAPI, infer: InferEndpoint) -> None:
    """Put FastInferPath outside the middleware stack Starlette builds on the first request (so the user middleware
    list is complete by then). The infer endpoint gets the app's user middleware, in the same order."""
    build = app.build_middleware_stack

    def build_with_fast_path() -> Callable:
        guarded: Callable = infer
        for m in reversed(app.user_middleware):
            guarded = m.cls(guarded, *m.args, **m.kwargs)
        return FastInferPath(build(), guarded)

    app.build_middleware_stack = build_with_fast_path  # type: ignore[method-assign]



def load_tensor_service(spec: str, name: str, max_batch: int, delay_s: float, max_queue: int,
                        cache_size: int) -> TensorService:
    from inferd.tabular.models import load_tensor_model
    from inferd.workers.batching import BatchConfig

    return TensorService(load_tensor_model(spec, name), BatchConfig(max_batch, delay_s, max_queue), cache_size)
