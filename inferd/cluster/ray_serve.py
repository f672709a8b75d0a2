"""`inferd serve --replicas N`: the single-process inferd app, one engine per Ray Serve replica, behind an
OpenAI-compatible ingress that routes with `inferd.cluster.router` (the policy `inferd simulate` simulates).

    client ─► InferdIngress (FastAPI) ─► deployment handle ─► InferdReplica × N
              prefix hashes of the body      InferdRequestRouter      the `inferd serve` app
              /metrics merged over replicas  picks the replica        (asgi_bridge)

The ingress replica answers HTTP on --host:--port itself (Ray Serve's direct ingress, `direct_ingress_env`, the
default for a local Ray); with `--ray-http proxy` (the default when joining a cluster) Serve's HTTP proxy is in
front of it, one more handle hop.

Each replica runs the same FastAPI app as single-process `inferd serve` (routes, validation, error bodies, SSE),
driven in-process by `asgi_bridge.call_asgi`; the ingress relays its status, headers and body chunks as they come
(no batching of stream chunks). The replica is chosen inside the handle by `InferdRequestRouter`, a Ray Serve
request router that calls `Router.choose` with Ray's per-replica ongoing-request counts; `max_ongoing_requests` caps
a replica and `max_queued_requests` (--max-queue) turns overload into 503 + Retry-After at the ingress.

One replica (a fixed `--replicas 1`) needs no routing, so the ingress hop goes: the engine replica *is* the ingress
deployment (`InferdEngineIngress`, `@serve.ingress` with the inferd app built at replica start). With direct ingress
its own HTTP server answers the client (no Ray hop on the request path); behind the proxy it is one handle hop per
request and per stream message instead of two (benchmarks/ray_overhead.py measures the layouts). Prefix routing
over several replicas needs the request body, which Serve's proxy does not hand its request router (the replica
pulls the body from the proxy after it was chosen), so there the ingress stays.

Failures: a call that fails before the ingress has sent the client anything (the replica died, or was unreachable)
is retried on another replica; a stream that already started ends with an error event and [DONE]. Ray Serve
restarts dead replicas. Replicas push their Prometheus text to a small `MetricsHub` actor once a second; the
ingress's /metrics sums them.

This module imports Ray: import it only when scale-out is asked for (`inferd.cluster.ray_args.uses_ray`), and,
for a local Ray, after `ray_args.local_ray_env()` (it must see the environment before Ray is imported).
"""

# no `from __future__ import annotations`: FastAPI reads the ingress methods' annotations at runtime, and Serve's
# ingress wrapper resolves them outside this module
import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import BackPressureError
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - the CLI checks first and prints the install hint
    raise ImportError("inferd serve --replicas needs Ray Serve: pip install 'inferd[ray]' "
                      "(or pip install 'ray[serve]')") from exc

from inferd import __version__
from inferd.cluster.asgi_bridge import call_asgi
from inferd.cluster.metrics_merge import merge_prometheus
from inferd.cluster.router import Router, RouterConfig, text_prefix_hashes
from inferd.errors import InferdError, OverloadedError

log = logging.getLogger("inferd.ray")

APP_NAME = "inferd"
HUB_NAME, HUB_NAMESPACE = "inferd-metrics-hub", "inferd"
METRICS_MAX_AGE_S = 10.0  # a replica that has not reported for this long is left out of /metrics and /health
RETRIES = 3  # attempts for a request that fails before any byte reached the client
REPLICA_HEADER = "x-inferd-replica"


# ---- routing ------------------------------------------------------------------------------------------------
class InferdRequestRouter(RequestRouter):
    """Ray Serve request router that asks `inferd.cluster.router.Router` (the simulator's policy code). Ranks:
    the chosen replica first, the others after (Serve moves on when the first is at max_ongoing_requests)."""

    def initialize_state(self, policy: str = "prefix", imbalance_abs: int = 8, imbalance_rel: float = 1.5,
                         **_: Any) -> None:
        self._router = Router(RouterConfig(policy=policy, imbalance_abs=imbalance_abs, imbalance_rel=imbalance_rel))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes: list[int] = []
        if pending_request is not None and pending_request.args and isinstance(pending_request.args[0], dict):
            hashes = pending_request.args[0].get("prefix_hashes") or []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {k: cache.get(r.replica_id) or 0 for k, r in by_id.items()}
        first = by_id[self._router.choose(hashes, loads)]
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._router.forget_replica(replica_id.unique_id)


def prefix_hashes_of(body: bytes) -> list[int]:
    """What the router keys on: the chat messages (role and text, in order) or the prompt, hashed in chunks."""
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        return []
    if not isinstance(obj, dict):
        return []
    text = ""
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(f"<{m.get('role')}>{c if isinstance(c, str) else ''}")
        text = "\n".join(parts)
    elif isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
    elif isinstance(obj.get("prompt"), list) and obj["prompt"] and isinstance(obj["prompt"][0], str):
        text = obj["prompt"][0]
    return text_prefix_hashes(text)


# ---- metrics hub --------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class MetricsHub:
    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.time(), text)

    def fresh(self, max_age_s: float) -> dict[str, str]:
        """replica id -> Prometheus text, for the replicas that reported within max_age_s."""
        now = time.time()
        return {k: t for k, (ts, t) in self._texts.items() if now - ts <= max_age_s}


def metrics_hub():
    return MetricsHub.options(name=HUB_NAME, namespace=HUB_NAMESPACE, lifetime="detached",
                              get_if_exists=True).remote()


# ---- replica ------------------------------------------------------------------------------------------------
class InferdReplica:
    """One engine (the `inferd serve` app with its models), loaded before the replica reports ready."""

    def __init__(self, args: dict[str, Any], hub: Any):
        from inferd.cli_args import set_threads
        from inferd.server.app import build_app
        from inferd.server.cli import _load_models, plan_slots
        from inferd.server.metrics import Metrics
        from inferd.server.state import ServerState

        ns = argparse.Namespace(**args)
        if not ns.threads:
            ns.threads = max(1, math.ceil(ns.replica_cpus))
        set_threads(ns)
        state = ServerState(slots=plan_slots(ns), metrics=Metrics(ns.price_per_hour), api_key=ns.api_key,
                            max_body_bytes=int(ns.max_body_mb * (1 << 20)),
                            accept_any_model_name=ns.accept_any_model_name, max_tokens_limit=ns.max_tokens_limit,
                            load_wait_s=ns.load_wait)
        _load_models(ns, state)  # synchronously: the replica is healthy only once its models serve
        if state.slots and all(s.status == "failed" for s in state.slots):
            raise RuntimeError("; ".join(f"failed to load {s.spec}: {s.error}" for s in state.slots))
        self.state, self.http_app = state, build_app(state)  # not `app`: the Serve ingress wrapper owns that name
        self.key = serve.get_replica_context().replica_id.unique_id
        self._hub = hub
        self._stop = threading.Event()
        threading.Thread(target=self._push_metrics, daemon=True, name="inferd-metrics-push").start()

    def _push_metrics(self) -> None:
        import os

        from prometheus_client import generate_latest

        info = (f"# HELP inferd_replica_info A replica reporting (its Serve id and process id)\n"
                f"# TYPE inferd_replica_info gauge\n"
                f'inferd_replica_info{{replica="{self.key}",pid="{os.getpid()}"}} 1\n')
        while not self._stop.is_set():
            try:
                self._hub.put.remote(self.key, generate_latest(self.state.metrics.registry).decode() + info)
            except Exception as exc:  # noqa: BLE001 - metrics must never take the replica down
                log.debug("metrics push failed: %s", exc)
            self._stop.wait(1.0)

    async def handle(self, req: dict[str, Any]):
        async for msg in call_asgi(self.http_app, req["method"], req["path"], req["query"], req["headers"], req["body"],
                                   extra_headers=[(REPLICA_HEADER, self.key)]):
            yield msg

    def check_health(self) -> None:
        if not any(s.status == "ready" for s in self.state.slots):
            raise RuntimeError("no model is ready")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        for llm in state.engines() if state is not None else []:
            llm.shutdown()


# ---- cluster views (both layouts) ----------------------------------------------------------------------------
async def cluster_health(hub: Any) -> tuple[int, dict[str, Any]]:
    ids = sorted(await hub.fresh.remote(METRICS_MAX_AGE_S))
    return (200 if ids else 503), {"status": "ok" if ids else "loading", "replicas": len(ids), "replica_ids": ids}


async def cluster_metrics(hub: Any, counts: dict[str, int]) -> str:
    texts = await hub.fresh.remote(METRICS_MAX_AGE_S)
    ingress = ["# HELP inferd_ingress_events Ingress events: retried (a replica failed before any output), "
               "stream_failed (a started stream ended with an error event), overloaded (503), failed (no "
               "replica after the retries)", "# TYPE inferd_ingress_events counter"]
    ingress += [f'inferd_ingress_events_total{{event="{k}"}} {v}' for k, v in counts.items()]
    return merge_prometheus(list(texts.values())) + "\n".join(ingress) + "\n"


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class InferdEngineIngress(InferdReplica):
    """One replica that is also the HTTP ingress (a fixed single replica): Serve's proxy calls the inferd app in
    this process directly. /health, /ready and /metrics answer as the separate ingress does (from the metrics hub);
    every other path goes to the inferd app, whose responses carry the replica header."""

    def __serve_build_asgi_app__(self) -> Any:
        return _AsgiOf(self._asgi)  # an object with an async __call__: uvicorn takes a bound method for ASGI 2

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # the inferd app starts with the replica (its models are loaded in __init__)
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "")
        if kind == "http" and path in ("/health", "/ready", "/metrics"):
            if path == "/metrics":
                response: Response = PlainTextResponse(await cluster_metrics(self._hub, {}), media_type=METRICS_TYPE)
            else:
                code, body = await cluster_health(self._hub)
                response = JSONResponse(body, status_code=code)
            await response(scope, receive, send)
            return
        header = (REPLICA_HEADER.encode(), self.key.encode())

        async def send_tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.http_app(scope, receive, send_tagged)


class _AsgiOf:
    def __init__(self, fn: Any):
        self._fn = fn

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._fn(scope, receive, send)


# ---- ingress ------------------------------------------------------------------------------------------------
ingress_app = FastAPI(title="inferd (Ray Serve)", version=__version__)
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


def _error(exc: InferdError) -> JSONResponse:
    from inferd.server.app import error_response

    return error_response(exc)


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "replica_failed", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


@serve.ingress(ingress_app)
class InferdIngress:
    def __init__(self, replicas: Any, hub: Any):
        self._handle = replicas.options(stream=True, method_name="handle")
        self._hub = hub
        self.counts = {"retried": 0, "stream_failed": 0, "overloaded": 0, "failed": 0}

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        return PlainTextResponse(await cluster_metrics(self._hub, self.counts), media_type=METRICS_TYPE)

    @ingress_app.get("/health")
    async def health(self) -> Response:
        code, body = await cluster_health(self._hub)
        return JSONResponse(body, status_code=code)

    @ingress_app.get("/ready")
    async def ready(self) -> Response:
        return await self.health()

    @ingress_app.get("/version")
    async def version(self) -> dict[str, str]:
        return {"version": __version__}

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        req = {"method": request.method, "path": request.url.path, "query": request.url.query,
               "headers": [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS],
               "body": body, "prefix_hashes": prefix_hashes_of(body) if request.method == "POST" else []}
        last: Exception | None = None
        for attempt in range(RETRIES):
            gen = self._handle.remote(req)
            try:
                start = await gen.__anext__()
                headers = {k: v for k, v in start["headers"] if k.lower() not in _HOP_HEADERS}
                if headers.get("content-type", "").startswith("text/event-stream"):
                    return StreamingResponse(self._relay(gen, self.counts), status_code=start["status"], headers=headers)
                try:
                    chunks = [m["body"] async for m in gen]  # nothing sent yet: a failure here is still retried
                except asyncio.CancelledError:  # the client went away: stop the replica's request too
                    gen.cancel()
                    raise
                return Response(b"".join(chunks), status_code=start["status"], headers=headers)
            except BackPressureError:
                self.counts["overloaded"] += 1
                return _error(OverloadedError("every replica is at its limit and the ingress queue is full "
                                              "(--max-ongoing-requests, --max-queue); retry later"))
            except (RayError, StopAsyncIteration) as exc:
                last = exc
                self.counts["retried"] += 1
                log.warning("request failed on a replica before any output (attempt %d): %s", attempt + 1, exc)
        self.counts["failed"] += 1
        return _error(OverloadedError(f"no replica could serve the request after {RETRIES} attempts: "
                                      f"{type(last).__name__}"))

    @staticmethod
    async def _relay(gen: Any, counts: dict[str, int]):
        ended = False
        try:
            async for msg in gen:
                yield msg["body"]
            ended = True
        except RayError as exc:
            ended = True
            counts["stream_failed"] += 1
            log.warning("a stream's replica failed: %s", exc)
            yield _sse_error(f"the replica serving this stream failed ({type(exc).__name__}); retry the request")
        finally:
            if not ended:  # the client went away mid-stream: the replica's request is cancelled, its engine
                gen.cancel()  # request aborted and its KV blocks freed (not left to run to max_tokens)


# ---- building and running -----------------------------------------------------------------------------------
def replica_options(args: argparse.Namespace) -> dict[str, Any]:
    """The InferdReplica deployment's Serve options from the `inferd serve` flags."""
    from inferd.cluster.ray_args import check_ray_args

    check_ray_args(args)
    n = args.replicas if args.replicas is not None else (args.min_replicas or 1)
    router = RequestRouterConfig(request_router_class=InferdRequestRouter,
                                 request_router_kwargs={"policy": args.routing, "imbalance_abs": args.imbalance_abs,
                                                        "imbalance_rel": args.imbalance_rel})
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queue,
        "request_router_config": router, "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": args.shutdown_timeout}
    if args.min_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                      "initial_replicas": n, "target_ongoing_requests": args.target_ongoing_requests,
                                      "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay,
                                      "look_back_period_s": args.autoscale_look_back,
                                      # Serve wants the look-back window longer than its metrics interval (10 s)
                                      "metrics_interval_s": min(10.0, args.autoscale_look_back / 2)}
    else:
        opts["num_replicas"] = n
    return opts


def single_hop(args: argparse.Namespace) -> bool:
    """A fixed single replica: nothing to route, so the engine replica is the ingress (one hop, not two)."""
    return args.ray_ingress == "auto" and args.min_replicas is None and (args.replicas or 1) == 1


def build_application(args: argparse.Namespace) -> Any:
    """The Serve application for these `inferd serve` flags (also the KubeRay entry point, via app_builder)."""
    opts = replica_options(args)
    params = {k: v for k, v in vars(args).items() if k != "func"}
    hub = metrics_hub()
    if single_hop(args):  # the proxy calls the one engine replica directly; Serve's 503 + Retry-After on overload
        opts["backpressure_config"] = {"status_code": 503, "retry_after_s": 1}
        opts.pop("request_router_config")  # one replica: nothing for inferd's router to choose, Serve's default
        return serve.deployment(name="InferdReplica", **opts)(serve.ingress()(InferdEngineIngress)).bind(params, hub)
    replica = serve.deployment(name="InferdReplica", **opts)(InferdReplica).bind(params, hub)
    ingress = serve.deployment(name="InferdIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)(InferdIngress)
    return ingress.bind(replica, hub)


def app_builder(config: dict[str, Any]) -> Any:
    """KubeRay / `serve run` entry point: `import_path: inferd.cluster.ray_serve:app_builder` with
    `args: {argv: "--replicas 4 --model smollm2-135m ..."}` (the `inferd serve` flags)."""
    return build_application(_args_from_config(config))


def _args_from_config(config: dict[str, Any]) -> argparse.Namespace:
    import shlex

    from inferd.cli import build_parser

    argv = config.get("argv", "")
    args = build_parser().parse_args(["serve", *(shlex.split(argv) if isinstance(argv, str) else argv)])
    if args.replicas is None and args.min_replicas is None:
        args.replicas = 1
    return args


def direct_http(args: argparse.Namespace) -> bool:
    """The app's ingress replica serves --host:--port itself (Ray Serve's direct ingress), not Serve's proxy."""
    return args.ray_http == "direct" or (args.ray_http == "auto" and not args.ray_address)


def direct_ingress_env(host: str, port: int) -> dict[str, str]:
    """Environment for Ray Serve's direct ingress on a local Ray (set before ray.init, so Ray's processes inherit
    it): the ingress deployment's replica runs its own HTTP server on exactly --port (the port range is that one
    port, which is why the ingress deployment has one replica). --port must be free now: a clear error instead of
    a replica that cannot bind. See DIRECT_INGRESS_DEFAULTS for the settings a user may override."""
    from inferd.server.ports import check_port_free

    check_port_free(host, port)
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}  # the range's end is exclusive


# With direct ingress, unless the user set them: a restarted replica may take its port back at once (no quarantine)
# and stops without the 30 s drain meant for an external load balancer's deregistration (there is none: the replica
# owns the port).
DIRECT_INGRESS_DEFAULTS = {"RAY_SERVE_PORT_QUARANTINE_S": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def serve_on_ray(args: argparse.Namespace) -> int:
    """Start (or join) Ray, run the app answering HTTP on --host:--port (the ingress replica itself with direct
    ingress, else Serve's HTTP proxy), block until SIGINT/SIGTERM."""
    from inferd.cluster.ray_args import check_ray_args, free_tcp_port

    check_ray_args(args)
    proxy_host, proxy_port = args.host, args.port
    if direct_http(args):  # before ray.init: the local Ray's processes inherit the environment
        os.environ.update(direct_ingress_env(args.host, args.port))
        for key, value in DIRECT_INGRESS_DEFAULTS.items():
            os.environ.setdefault(key, value)
        # Serve keeps its proxy on the head node even so: idle, on a free port of the loopback only
        proxy_host = "127.0.0.1"
        proxy_port = free_tcp_port(proxy_host)
    try:
        if args.ray_address:
            ray.init(address=args.ray_address, namespace=HUB_NAMESPACE, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", namespace=HUB_NAMESPACE,
                     log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ray.init raises plain Exception, ConnectionError, ...
        where = f"join Ray at {args.ray_address}" if args.ray_address else "start a local Ray"
        raise InferdError(f"could not {where}: {str(exc).strip().splitlines()[-1]}") from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": proxy_host, "port": proxy_port})
        print(f"inferd: starting {args.replicas or args.min_replicas} replica(s) on Ray Serve "
              f"(routing {args.routing})...", file=sys.stderr, flush=True)
        serve.run(build_application(args), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"inferd serving on http://{args.host}:{args.port}/v1 through Ray Serve", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except InferdError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray reports deployment failures with several exception types
        raise InferdError(f"Ray Serve failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}") from exc
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
