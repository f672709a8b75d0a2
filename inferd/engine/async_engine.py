"""AsyncLLM: the engine on a background thread, fed by asyncio callers.

Callers submit requests and aborts through a command queue (never touching engine state directly); the
engine thread drains it between steps, runs steps while there is work, and hands each RequestOutput to the
caller's asyncio.Queue with call_soon_threadsafe. A failed step fails only its requests; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from inferd.engine.llm_engine import LLMEngine
from inferd.engine.outputs import RequestOutput
from inferd.errors import InvalidRequestError, OverloadedError
from inferd.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queue: int = 256,
                 on_step: Callable[[LLMEngine, float], None] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_output = on_output
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = False
        self.accepting = True
        self.num_pending = 0
        self._thread = threading.Thread(target=self._loop, name="inferd-engine", daemon=True)
        self._thread.start()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- caller side (event loop) --------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs with deltas until the request finishes. Raises InvalidRequestError or
        OverloadedError before the first output. Closing the iteration early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority)
        async for ro in self.outputs(request_id, stream):
            yield ro

    async def outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                ro: RequestOutput = await stream.queue.get()
                yield ro
                if ro.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0) -> _Stream:
        if not self.accepting:
            raise OverloadedError("the server is shutting down")
        if self.engine.scheduler.num_waiting + self.num_pending >= self.max_queue:
            raise OverloadedError(f"the waiting queue is full ({self.max_queue} requests); retry later")
        if request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        self._streams[request_id] = stream
        self.num_pending += 1
        self._commands.append(("add", (request_id, prompt, params, priority, time.monotonic())))
        self._wake.set()
        try:
            await stream.added
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    def num_unfinished(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, wait until in-flight requests finish (or the timeout); True when all finished."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    # ---- engine thread -------------------------------------------------------------------------
    def _deliver(self, ro: RequestOutput) -> None:
        stream = self._streams.get(ro.request_id)
        if ro.finished:
            self._streams.pop(ro.request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, ro)
        if self.on_output is not None:
            try:
                self.on_output(ro)
            except Exception:  # metrics must never break serving
                log.exception("on_output hook failed")

    def _run_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                rid, prompt, params, priority, arrival = arg
                stream = self._streams.get(rid)
                self.num_pending -= 1
                if stream is None:
                    continue
                try:
                    self.engine.add_request(rid, prompt, params, priority, arrival)
                except Exception as exc:
                    self._streams.pop(rid, None)
                    stream.loop.call_soon_threadsafe(_set_exception, stream.added, exc)
                else:
                    stream.loop.call_soon_threadsafe(_set_result, stream.added, None)
            elif kind == "abort":
                ro = self.engine.abort_request(arg)
                if ro is not None:
                    self._deliver(ro)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self.engine.groups):
            ro = self.engine.abort_request(rid)
            if ro is not None:
                for co in ro.outputs:
                    co.finish_reason, co.error = "error", f"{type(exc).__name__}: {exc}"
                self._deliver(ro)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        busy = False
        while not self._stop:
            try:
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    if busy:  # just went idle: memory only big steps need leaves the RSS until the next one
                        busy = False
                        self.engine.release_idle_memory()
                    if self.on_step is not None:  # gauges reflect aborts even when no step follows
                        self.on_step(self.engine, 0.0)
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                busy = True
                outputs = self.engine.step()
                if self.on_step is not None:
                    self.on_step(self.engine, time.perf_counter() - t0)
                for ro in outputs:
                    self._deliver(ro)
            except Exception as exc:
                log.exception("engine loop error; failing in-flight requests")
                self._fail_all(exc)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
