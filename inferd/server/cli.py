"""`inferd serve`: load models, start the HTTP server, drain gracefully on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from collections.abc import Callable

from inferd.errors import InferdError

log = logging.getLogger("inferd.serve")


def register(sub: argparse._SubParsersAction, engine_args: Callable) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    engine_args(p, default_model=None)
    p.set_defaults(model=None)
    p._option_string_actions["--model"].help = (
        "model to serve (repeatable; default: smollm2-135m and all-minilm-l6-v2): a known name, .gguf, or HF dir")
    p._option_string_actions["--model"].action = "append"  # type: ignore[attr-defined]
    for a in p._actions:
        if a.dest == "model":
            a.__class__ = argparse._AppendAction
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="request body limit (413 above it)")
    p.add_argument("--price-per-hour", type=float, default=0.0, help="machine price, USD/hour, for cost reporting")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    p.add_argument("--embedding-cache-size", type=int, default=10000,
                   help="entries in the exact-match embedding cache (0: off)")
    p.set_defaults(func=cmd_serve)


def _load_models(args: argparse.Namespace, state, done: threading.Event) -> None:
    from inferd.config import CacheConfig, EngineConfig, SchedulerConfig
    from inferd.engine.async_engine import AsyncLLM
    from inferd.engine.llm_engine import LLMEngine
    from inferd.loader import hub

    try:
        import importlib.util

        specs = args.model or [hub.DEFAULT_CHAT_MODEL] + (
            [hub.DEFAULT_EMBED_MODEL] if importlib.util.find_spec("inferd.server.serving_embeddings") else [])
        for spec in specs:
            if _is_encoder(spec):
                from inferd.server.serving_embeddings import load_embedder

                emb = load_embedder(spec, args)
                emb.metrics = state.metrics
                state.embedders[emb.name] = emb
                continue
            cfg = EngineConfig(
                model=spec, dtype=args.dtype, device=args.device,
                quantization=args.quantization, group_size=args.group_size, quant_dense_rows=args.quant_dense_rows,
                enforce_eager=args.enforce_eager,
                cache=CacheConfig(block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
                                  enable_prefix_caching=not args.no_prefix_caching),
                scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                          max_num_batched_tokens=args.max_num_batched_tokens,
                                          max_model_len=args.max_model_len))
            engine = LLMEngine(cfg)
            name = engine.model_name
            state.metrics.add_model(name)
            llm = AsyncLLM(engine, max_queue=args.max_queue, on_step=state.metrics.on_step,
                           on_output=lambda ro, n=name: state.metrics.on_output(n, ro))
            state.llms[name] = llm
        state.ready = True
        log.info("models ready: %s", ", ".join([*state.llms, *state.embedders]))
    except Exception as exc:  # noqa: BLE001 - report and stop the server
        state.load_error = exc
        log.error("failed to load models: %s", exc)
    finally:
        done.set()


def _is_encoder(spec: str) -> bool:
    from pathlib import Path

    from inferd.loader import hub

    if spec in hub.CATALOGUE:
        return hub.CATALOGUE[spec].kind == "embed"
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
        return any(a.startswith(("Bert", "Roberta", "XLMRoberta")) for a in archs) or \
            json.loads((p / "config.json").read_text()).get("model_type") == "bert"
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from inferd.server.app import ServerState, build_app
    from inferd.server.metrics import Metrics

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    state = ServerState(metrics=Metrics(args.price_per_hour), api_key=args.api_key,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)))
    state.load_error = None  # type: ignore[attr-defined]
    app = build_app(state)
    loaded = threading.Event()
    server: DrainingServer | None = None

    @app.on_event("startup")
    async def _start() -> None:
        threading.Thread(target=_load_models, args=(args, state, loaded), daemon=True).start()
        asyncio.get_running_loop().create_task(_watch_load())

    async def _watch_load() -> None:
        while not loaded.is_set():
            await asyncio.sleep(0.1)
        if getattr(state, "load_error", None) is not None and server is not None:
            server.should_exit = True

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, state, args.shutdown_timeout)
    print(f"inferd serving on http://{args.host}:{args.port}/v1 (loading models...)", file=sys.stderr, flush=True)
    server.run()
    for llm in state.llms.values():
        llm.shutdown()
    err = getattr(state, "load_error", None)
    if err is not None:
        raise err if isinstance(err, InferdError) else InferdError(str(err))
    return 0


try:
    import uvicorn as _uv

    class DrainingServer(_uv.Server):
        """First SIGTERM/SIGINT: readiness 503, refuse new work, let in-flight requests finish (up to the
        timeout), then exit 0. A second signal exits at once."""

        def __init__(self, config, state, timeout: float):
            super().__init__(config)
            self.state, self.timeout = state, timeout
            self._loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.state.draining or self._loop is None:
                return super().handle_exit(sig, frame)
            self.state.draining = True
            for llm in self.state.llms.values():
                llm.accepting = False
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

        async def _drain(self) -> None:
            log.warning("draining: waiting up to %.0fs for in-flight requests", self.timeout)
            await asyncio.gather(*(llm.drain(self.timeout) for llm in self.state.llms.values()))
            await asyncio.sleep(0.2)  # let the last responses flush
            self.should_exit = True
except ImportError:  # pragma: no cover
    pass
