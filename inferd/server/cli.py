"""`inferd serve`: load models, start the HTTP server, drain gracefully on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from inferd.cli_args import add_engine_args, engine_config, set_threads
from inferd.cluster.ray_args import add_ray_args, uses_ray
from inferd.errors import InferdError
from inferd.server import extra_models, http_protocol
from inferd.server.state import ModelSlot, ServerState, default_model_name
from inferd.server.workers import WorkerHooks, add_worker_args, check_worker_args, serve_workers

log = logging.getLogger("inferd.serve")

# Debug knob, used by the readiness tests: seconds to wait before loading the models, so the window in which
# the server is up but not ready is long and deterministic. Never set it in production.
LOAD_DELAY_ENV = "INFERD_DEBUG_LOAD_DELAY_S"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p, default_model=None, repeatable_model=True)
    p.add_argument("--served-model-name", nargs="+", action="append", default=None, metavar="NAME",
                   help="names to serve a model under (vLLM's flag; the first is used in responses and metrics). "
                        "Give it once per --model, in the same order; models without one keep their own name")
    p.add_argument("--accept-any-model-name", action="store_true",
                   help="route a request naming an unknown model to the only chat (or embedding) model, as "
                        "llama-server does, instead of 404")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (400 above it); also the chat default when a "
                        "request sends none (default: no limit, up to the context length)")
    p.add_argument("--load-wait", type=float, default=5.0,
                   help="seconds a request for a model that is still loading waits before 503 + Retry-After")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /ready, /metrics, /version, "
                        "/docs, /openapi.json and the web page (/, /dashboard, /ui/...)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="request body limit (413 above it)")
    p.add_argument("--price-per-hour", type=float, default=0.0, help="machine price, USD/hour, for cost reporting")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    p.add_argument("--no-webui", action="store_true",
                   help="do not serve the web page (chat at /, dashboard at /dashboard); /stats stays")
    p.add_argument("--embedding-cache-size", type=int, default=10000,
                   help="entries in the exact-match embedding cache (0: off)")
    extra_models.add_serve_args(p)
    add_worker_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_serve)


def plan_slots(args: argparse.Namespace) -> list[ModelSlot]:
    """One slot per --model, with its served names and kind, known before anything loads."""
    from inferd.loader import hub

    specs = args.model or [hub.DEFAULT_CHAT_MODEL, hub.DEFAULT_EMBED_MODEL]
    names = args.served_model_name or []
    if len(names) > len(specs):
        raise InferdError(f"--served-model-name is given {len(names)} times for {len(specs)} --model(s); give it "
                          "at most once per model, in the same order")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise InferdError(f"--max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    slots = [ModelSlot(spec, list(dict.fromkeys(names[i])) if i < len(names) else [default_model_name(spec)],
                       extra_models.kind_of(spec) or ("embed" if _is_encoder(spec) else "generate"))
             for i, spec in enumerate(specs)]
    seen: set[str] = set()
    for slot in slots:
        for n in slot.names:
            if n in seen:
                raise InferdError(f"two models are served as {n!r}: give them different --served-model-name")
            seen.add(n)
    return slots


def since_launch() -> float | None:
    """Seconds since this process started (Linux: /proc), for the start-up phase log lines; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _phase(what: str) -> None:
    at = since_launch()
    log.info("start-up: %s at %s s after launch (CPU %.2f s)", what, "?" if at is None else f"{at:.2f}",
             time.process_time())


def _load_models(args: argparse.Namespace, state: ServerState) -> None:
    """Load every slot in turn (background thread). A model that fails is marked failed with its error; the
    others still load."""
    from inferd.engine.async_engine import AsyncLLM
    from inferd.engine.llm_engine import LLMEngine
    from inferd.server.serving_embeddings import load_embedder

    time.sleep(float(os.environ.get(LOAD_DELAY_ENV) or 0))
    _phase("loading models")
    for slot in state.slots:
        t0 = time.perf_counter()
        try:
            if slot.kind in ("tensor", "audio"):
                extra_models.load(slot, args, state)
            elif slot.kind == "embed":
                slot.embedder = load_embedder(slot.spec, args.dtype, args.device, args.embedding_cache_size,
                                              state.metrics, args.max_queue)
            else:
                engine = LLMEngine(engine_config(args, model=slot.spec))
                state.metrics.add_model(slot.name, engine)
                slot.llm = AsyncLLM(engine, max_queue=args.max_queue,
                                    on_step=lambda eng, _dt, n=slot.name: state.metrics.on_step(n, eng),
                                    on_output=lambda ro, n=slot.name: state.metrics.on_output(n, ro))
            freeze_heap()
            slot.status = "ready"  # last: a request that sees "ready" finds the engine set
            log.info("model ready: %s (loaded in %.2f s)", slot.name, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - reported by /health and to requests for this model
            slot.error = str(exc) or type(exc).__name__
            slot.status = "failed"
            log.error("failed to load %s: %s", slot.spec, slot.error)
    if state.all_ready:
        _phase("every model ready")


def freeze_heap() -> None:
    """Collect once, then move every object alive now (modules, the models' Python objects) out of the cyclic
    GC's sight (gc.freeze), so collections while serving walk only request-time objects. With torch loaded a
    full collection walks ~250k objects (0.1-0.5 s here): under a stream of small requests (tabular scoring)
    those came back every few seconds, 10-17% of the server's CPU, and each was a latency spike."""
    gc.collect()
    gc.freeze()


def _is_encoder(spec: str) -> bool:
    from inferd.loader import hub

    if spec in hub.CATALOGUE:
        return hub.CATALOGUE[spec].kind == "embed"
    cfg_path = Path(spec).expanduser() / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False  # the loader reports the broken file
    archs = cfg.get("architectures") or []
    return any(a.startswith(("Bert", "Roberta", "XLMRoberta")) for a in archs) or cfg.get("model_type") == "bert"


def cmd_serve(args: argparse.Namespace, worker: WorkerHooks | None = None) -> int:
    """`inferd serve`; `worker`: this process is one of `--workers N` (inferd.server.workers)."""
    check_worker_args(args, uses_ray(args))
    if uses_ray(args):
        return _serve_on_ray(args)
    if args.workers > 1 and worker is None:
        plan_slots(args)  # flag errors before anything is forked
        return serve_workers(args, cmd_serve)
    import uvicorn

    from inferd.server.app import build_app
    from inferd.server.metrics import Metrics

    _phase("imports done")
    set_threads(args)
    state = ServerState(slots=plan_slots(args), metrics=Metrics(args.price_per_hour), api_key=args.api_key,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)),
                        accept_any_model_name=args.accept_any_model_name, max_tokens_limit=args.max_tokens_limit,
                        load_wait_s=args.load_wait)
    app = build_app(state, webui_pages=not args.no_webui)
    if worker is not None:
        worker.attach(app, state)
    loader = threading.Thread(target=_load_models, args=(args, state), daemon=True, name="inferd-load")
    server: DrainingServer | None = None

    @app.on_event("startup")
    async def _start() -> None:
        if worker is None:  # a worker has loaded its models before it serves
            loader.start()
            asyncio.get_running_loop().create_task(_watch_load())

    async def _watch_load() -> None:
        while loader.is_alive():
            await asyncio.sleep(0.1)
        if all(s.status == "failed" for s in state.slots) and server is not None:
            server.should_exit = True  # nothing can serve: exit with the load errors
        elif state.all_ready:
            log.info("models ready: %s", ", ".join(state.names()))

    # uvicorn builds each request's access-log arguments even when the level drops the line: off unless shown
    level = logging.getLevelName(args.log_level.upper())  # an int for a known level ("trace" is uvicorn's own)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=5, access_log=not isinstance(level, int) or level <= logging.INFO,
                            http=http_protocol.protocol_class())
    server = DrainingServer(config, state, args.shutdown_timeout)
    server.ignore_sigint = worker is not None  # a terminal's Ctrl-C reaches every worker too: the parent decides
    if worker is None:
        print(f"inferd serving on http://{args.host}:{args.port}/v1 (loading models...)", file=sys.stderr, flush=True)
        server.run()
    else:  # a worker takes connections only once it can serve them (the others serve meanwhile)
        loader.start()  # the same loader thread as one process runs, waited for here
        loader.join()
        if not any(s.status == "ready" for s in state.slots):
            raise InferdError("; ".join(f"failed to load {s.spec}: {s.error}" for s in state.slots))
        server.run(sockets=worker.listen())
    for slot in state.slots:
        if slot.llm is not None:
            slot.llm.shutdown()
    if state.slots and all(s.status == "failed" for s in state.slots):
        raise InferdError("; ".join(f"failed to load {s.spec}: {s.error}" for s in state.slots))
    return 0


def _serve_on_ray(args: argparse.Namespace) -> int:
    from inferd.cluster.ray_args import check_ray_args, local_ray_env

    check_ray_args(args)
    plan_slots(args)  # flag errors before Ray starts
    if not args.ray_address:
        local_ray_env()
    try:
        from inferd.cluster.ray_serve import serve_on_ray
    except ImportError as exc:
        raise InferdError(str(exc)) from exc
    return serve_on_ray(args)


try:
    import uvicorn as _uv

    class DrainingServer(_uv.Server):
        """First SIGTERM/SIGINT: readiness 503, refuse new work, let in-flight requests finish (up to the
        timeout), then exit 0. A second signal exits at once."""

        def __init__(self, config: _uv.Config, state: ServerState, timeout: float):
            super().__init__(config)
            self.state, self.timeout = state, timeout
            self._loop: asyncio.AbstractEventLoop | None = None
            self.ignore_sigint = False

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGINT and self.ignore_sigint:
                return
            if self.state.draining or self._loop is None:
                return super().handle_exit(sig, frame)
            self.state.draining = True
            for llm in self.state.engines():
                llm.accepting = False
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

        async def _drain(self) -> None:
            log.warning("draining: waiting up to %.0fs for in-flight requests", self.timeout)
            await asyncio.gather(*(llm.drain(self.timeout) for llm in self.state.engines()))
            await asyncio.sleep(0.2)  # let the last responses flush
            self.should_exit = True
except ImportError:  # pragma: no cover
    pass
