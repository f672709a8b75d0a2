"""Open Inference Protocol v2 (KServe / Triton) REST routes for tensor models.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]      model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer {"inputs": [{name, shape, datatype, data}], "outputs": [{name}]}

Errors are the protocol's {"error": "message"} (400 for a malformed request or a shape/datatype mismatch, 404 for
an unknown model). Responses carry the request's compute time and cost in `parameters`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from inferd import __version__
from inferd.errors import InferdError, InvalidRequestError, ModelNotFoundError, OverloadedError
from inferd.server.state import ModelSlot, ServerState
from inferd.tabular.models import DATATYPES, TensorModel
from inferd.tabular.service import TensorService

VERSION = "1"  # one version per served model


def _oip_error(exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, InferdError) else 500
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


def parse_inputs(model: TensorModel, body: Any) -> dict[str, np.ndarray]:
    """The request's `inputs` checked against the model's: names, datatypes and shapes; 400 with the reason."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InvalidRequestError("the request needs a non-empty 'inputs' list")
    want = {s.name: s for s in model.inputs}
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(body["inputs"]):
        if not isinstance(t, dict) or not {"name", "shape", "datatype", "data"} <= t.keys():
            raise InvalidRequestError(f"input {i} needs name, shape, datatype and data")
        name, shape, dt = t["name"], t["shape"], t["datatype"]
        spec = want.get(name)
        if spec is None:
            raise InvalidRequestError(f"unexpected input {name!r}; model {model.name!r} takes "
                                      f"{', '.join(want)}")
        if dt != spec.datatype:
            raise InvalidRequestError(f"input {name!r} has datatype {dt}, model {model.name!r} expects "
                                      f"{spec.datatype}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidRequestError(f"input {name!r}: shape must be a list of non-negative integers")
        if len(shape) != len(spec.shape) or any(w != -1 and w != d for w, d in zip(spec.shape, shape)):
            raise InvalidRequestError(f"input {name!r} has shape {shape}, model {model.name!r} expects "
                                      f"{list(spec.shape)} (-1: any size)")
        try:
            arr = np.asarray(t["data"], dtype=DATATYPES[dt])
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequestError(f"input {name!r}: data is not {dt}: {exc}") from None
        if arr.size != int(np.prod(shape)):
            raise InvalidRequestError(f"input {name!r}: shape {shape} needs {int(np.prod(shape))} values, "
                                      f"data has {arr.size}")
        out[name] = arr.reshape(shape)
    missing = [n for n in want if n not in out]
    if missing:
        raise InvalidRequestError(f"missing input(s) {', '.join(missing)} for model {model.name!r}")
    if model.batchable and len({a.shape[0] for a in out.values()}) > 1:
        raise InvalidRequestError("every input must have the same number of rows (first dimension)")
    return out


def _output(name: str, arr: np.ndarray, datatype: str) -> dict[str, Any]:
    data = [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1).tolist()]
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "inferd", "version": __version__, "extensions": []}

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

    @_oip
    async def infer(name: str, request: Request, version: str | None = None) -> Any:
        t0 = time.perf_counter()
        slot = _slot(state, name, version)
        slot = await state.ready_slot(slot.name, "tensor")
        svc: TensorService = slot.service
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise InvalidRequestError("request body is not valid JSON") from None
        inputs = parse_inputs(svc.model, body)
        wanted = [o.get("name") for o in body.get("outputs") or [] if isinstance(o, dict)]
        specs = {s.name: s for s in svc.model.outputs}
        bad = [w for w in wanted if w not in specs]
        if bad:
            raise InvalidRequestError(f"unknown output {bad[0]!r}; model {name!r} gives {', '.join(specs)}")
        outs, compute_s, cached = await svc.infer(inputs)
        cost = state.metrics.observe_compute(slot.name, compute_s, time.perf_counter() - t0)
        resp: dict[str, Any] = {
            "model_name": name, "model_version": VERSION,
            "outputs": [_output(n, outs[n], specs[n].datatype) for n in (wanted or specs)],
            "parameters": {"compute_s": round(compute_s, 9), "cost_usd": cost, "cached": cached},
        }
        if isinstance(body.get("id"), str):
            resp["id"] = body["id"]
        return JSONResponse(resp)

    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.get(base)(metadata)
        app.get(base + "/ready")(model_ready)
        app.post(base + "/infer")(infer)


def load_tensor_service(spec: str, name: str, max_batch: int, delay_s: float, max_queue: int,
                        cache_size: int) -> TensorService:
    from inferd.tabular.models import load_tensor_model
    from inferd.workers.batching import BatchConfig

    return TensorService(load_tensor_model(spec, name), BatchConfig(max_batch, delay_s, max_queue), cache_size)
