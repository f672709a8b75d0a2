"""Dynamic batching worker: one bounded queue and one worker thread per model (Triton's dynamic batcher).

    worker = BatchingWorker("fraud", run_batch, BatchConfig(max_batch_size=64, max_queue_delay_s=0.001))
    result, compute_s = await worker.submit(items)   # items: this request's rows / sequences / files

The worker takes the oldest job, then keeps taking jobs until the batch holds `max_batch_size` items or
`max_queue_delay_s` has passed since it started the batch, calls `run_batch(all items)` once (off the event
loop) and hands each job its own slice of the results with its share of the batch's compute time (by item
count). A full queue refuses new work at once with OverloadedError (503 + Retry-After), never a hang. An error
in `run_batch` goes to every job of that batch; the worker keeps serving.

Async submitters on one event loop are handed to the worker thread together: the jobs submitted during one
pass of the loop go into the thread's queue as one entry when that pass ends, so the worker wakes (and takes
the GIL) once per pass, not once per request.

The delay is a maximum: after a batch that had no company (one job, nothing else queued) the next batch takes
what is queued and runs without waiting, so a lone client is not held back by `max_queue_delay_s` on every
request; as soon as a batch finds two or more jobs, batches wait again.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from inferd.errors import OverloadedError


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 64  # items (rows, sequences, files) in one call of run_batch
    max_queue_delay_s: float = 0.001  # how long a started batch waits for more jobs (Triton's max_queue_delay)
    max_queue: int = 1024  # waiting jobs before 503

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max queue delay must be ≥ 0, got {self.max_queue_delay_s}")
        if self.max_queue < 1:
            raise ValueError(f"max queue must be at least 1, got {self.max_queue}")


@dataclass
class _Job:
    """A concurrent Future for blocking callers, or an asyncio future and its loop for `submit`."""

    items: Sequence[Any]
    future: Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    afuture: asyncio.Future | None = None
    size: int = field(init=False)  # len(items), taken in the submitting thread: a bad `items` fails its caller

    def __post_init__(self) -> None:
        self.size = len(self.items)

    def start(self) -> bool:
        """False when the caller has given up on it (cancelled): not worth computing."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return not self.afuture.cancelled()  # type: ignore[union-attr]  # a racy read; at worst wasted work


def _deliver(done: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """On the event loop: finish a batch's async jobs in one callback (one loop wake-up per batch)."""
    for fut, result, exc in done:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    compute_s: float = 0.0


class BatchingWorker:
    """`run_batch(items) -> results` with len(results) == len(items) (a list, array or tensor: anything that
    slices along its first axis). Jobs larger than max_batch_size run alone, whole."""

    def __init__(self, name: str, run_batch: Callable[[list[Any]], Any], config: BatchConfig | None = None,
                 concat: Callable[[list[Sequence[Any]]], Any] | None = None, init: Callable[[], None] | None = None):
        """`init`, when given, runs first on the worker thread and the constructor waits for it (and raises its
        error): a model whose runtime ties its thread pool to the thread that built it (CTranslate2 does; it
        slows down several-fold once that thread has exited) is built where it will run."""
        self.name = name
        self.run_batch = run_batch
        self.config = config or BatchConfig()
        self.concat = concat or (lambda parts: [x for p in parts for x in p])
        self.stats = BatchStats()
        self._stopping = False  # the worker has taken stop()'s sentinel
        self._closed = False  # stop() has been called: nothing more goes into the queue
        self._alone = False  # the last batch was one job with nothing queued behind it
        # entries are lists of jobs (an event loop's pass, see _hand_over) or None (stop); the bound is on jobs
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._waiting = 0  # jobs submitted and not yet taken by the worker
        self._held: dict[asyncio.AbstractEventLoop, list[_Job]] = {}  # jobs of a loop's current pass
        self._init, self._init_error = init, None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"inferd-batch-{name}")
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    # ---- submit (any thread; async helper for the server) ---------------------------------------------
    def submit_future(self, items: Sequence[Any]) -> Future:
        job = _Job(items, future=Future())
        self._put(job)
        return job.future  # type: ignore[return-value]

    def _admit(self) -> None:
        """Count one more waiting job, or refuse it (OverloadedError → 503) at once."""
        if not self._thread.is_alive():
            raise OverloadedError(f"the worker of model {self.name!r} has stopped")
        with self._count_lock:
            if self._waiting >= self.config.max_queue:
                raise OverloadedError(f"model {self.name!r} has {self.config.max_queue} requests waiting; retry "
                                      "later")
            self._waiting += 1

    def _put(self, job: _Job) -> None:
        self._admit()
        self._enqueue([job])

    def _enqueue(self, jobs: list[_Job]) -> None:
        """Into the worker's queue, or refused when stop() has been called (the worker would never take them)."""
        with self._count_lock:
            if not self._closed:
                self._queue.put(jobs)
                return
            self._waiting -= len(jobs)
        exc = OverloadedError(f"the worker of model {self.name!r} has stopped")
        for job in jobs:
            if job.future is not None:
                job.future.set_exception(exc)
            elif not job.afuture.cancelled():  # type: ignore[union-attr]  # on its loop: _hand_over runs there
                job.afuture.set_exception(exc)  # type: ignore[union-attr]

    async def submit(self, items: Sequence[Any]) -> tuple[Any, float]:
        """(this job's results, its compute seconds)."""
        loop = asyncio.get_running_loop()
        job = _Job(items, loop=loop, afuture=loop.create_future())
        self._admit()
        held = self._held.get(loop)
        if held is None:  # the pass's first job: hand the pass's jobs over once the loop has run the rest of it
            held = self._held[loop] = []
            loop.call_soon(self._hand_over, loop)
        held.append(job)
        return await job.afuture  # type: ignore[misc]

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._enqueue(self._held.pop(loop))

    def run(self, items: Sequence[Any]) -> tuple[Any, float]:
        """Blocking submit, for callers outside an event loop."""
        return self.submit_future(items).result()

    @property
    def waiting(self) -> int:
        return self._waiting

    def stop(self) -> None:
        with self._count_lock:  # after this, _enqueue refuses: every job queued before it is taken and answered
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=5)

    # ---- worker thread ---------------------------------------------------------------------------------
    def _take(self, block: bool, timeout: float | None = None) -> list[_Job] | None:
        """The next queue entry (None: stop), counted off the waiting jobs; queue.Empty when there is none."""
        entry = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
        if entry is None:
            return None
        with self._count_lock:
            self._waiting -= len(entry)
        return entry

    def _gather(self, first: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """Jobs for one batch, and jobs taken that did not fit (they start the next batch)."""
        jobs: list[_Job] = []
        n, cap = 0, self.config.max_batch_size
        deadline = time.monotonic() + (0.0 if self._alone else self.config.max_queue_delay_s)
        entry = first
        while True:
            for i, job in enumerate(entry):
                if jobs and n + job.size > cap:
                    self._alone = False
                    return jobs, entry[i:]
                jobs.append(job)
                n += job.size
            if n >= cap:
                break
            left = deadline - time.monotonic()
            try:
                taken = self._take(left > 0, left if left > 0 else None)
            except queue.Empty:
                break
            if taken is None:  # stop() was called: finish this batch, then exit
                self._stopping = True
                break
            entry = taken
        self._alone = len(jobs) == 1
        return jobs, []

    def _loop(self) -> None:
        try:
            if self._init is not None:
                self._init()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            self._init_error = exc
            return
        finally:
            self._ready.set()
        carry: list[_Job] = []
        while True:
            if self._stopping and not carry:
                return
            first = carry or self._take(True)
            if first is None:
                return
            jobs, carry = self._gather(first)
            jobs = [j for j in jobs if j.start()]
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                results = self.run_batch(self.concat([j.items for j in jobs]))
            except BaseException as exc:  # noqa: BLE001 - every job of the batch gets the error
                self._finish(jobs, [None] * len(jobs), exc)
                continue
            dt = time.perf_counter() - t0
            total = sum(j.size for j in jobs) or 1
            self.stats.batches += 1
            self.stats.items += total
            self.stats.compute_s += dt
            out, i = [], 0
            for j in jobs:
                k = j.size
                out.append((results[i : i + k], dt * k / total))
                i += k
            self._finish(jobs, out, None)

    @staticmethod
    def _finish(jobs: list[_Job], results: list[Any], exc: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for j, r in zip(jobs, results):
            if j.future is not None:
                if exc is not None:
                    j.future.set_exception(exc)
                else:
                    j.future.set_result(r)
            else:
                by_loop.setdefault(j.loop, []).append((j.afuture, r, exc))  # type: ignore[arg-type]
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, done)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass
