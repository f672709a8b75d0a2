"""The shared dynamic batching worker, with a fake model: batches form within the delay, respect the size cap,
each job gets its own slice, a full queue is refused at once, errors reach every job of their batch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inferd.errors import OverloadedError
from inferd.workers.batching import BatchConfig, BatchingWorker


class FakeModel:
    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.calls: list[list[int]] = []
        self.delay, self.gate = delay, gate
        self.started = threading.Event()  # a batch has reached the model (and waits on the gate, if any)

    def __call__(self, items: list[int]) -> list[int]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(list(items))
        time.sleep(self.delay)
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        return [x * 10 for x in items]


def test_concurrent_jobs_share_a_batch_and_get_their_own_results():
    model = FakeModel()
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=16, max_queue_delay_s=0.05))

    async def go():
        return await asyncio.gather(*(w.submit([i, i + 100]) for i in range(6)))

    out = asyncio.run(go())
    assert [r for r, _ in out] == [[i * 10, (i + 100) * 10] for i in range(6)]
    assert len(model.calls) == 1 and sorted(model.calls[0]) == sorted(x for i in range(6) for x in (i, i + 100))
    assert all(c > 0 for _, c in out) and w.stats.batches == 1 and w.stats.items == 12
    w.stop()


def test_max_batch_size_is_respected_and_big_jobs_run_whole():
    gate = threading.Event()
    model = FakeModel(gate=gate)
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=4, max_queue_delay_s=0.02))
    futs = [w.submit_future([i]) for i in range(10)] + [w.submit_future(list(range(50, 57)))]
    gate.set()
    assert [f.result(5)[0] for f in futs[:10]] == [[i * 10] for i in range(10)]
    assert futs[10].result(5)[0] == [x * 10 for x in range(50, 57)]
    assert all(len(c) <= 4 for c in model.calls[:-1]) and model.calls[-1] == list(range(50, 57))
    w.stop()


def test_batching_off_runs_one_job_per_call():
    model = FakeModel(delay=0.01)
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=1, max_queue_delay_s=0.0))
    futs = [w.submit_future([i]) for i in range(5)]
    assert [f.result(5)[0] for f in futs] == [[i * 10] for i in range(5)]
    assert model.calls == [[i] for i in range(5)]
    w.stop()


def test_full_queue_is_refused_at_once():
    gate = threading.Event()
    w = BatchingWorker("m", FakeModel(gate=gate), BatchConfig(max_batch_size=1, max_queue_delay_s=0, max_queue=2))
    first = w.submit_future([1])
    assert w.run_batch.started.wait(5)  # the worker holds the first job (blocked on the gate); two more fill the queue
    queued = [w.submit_future([2]), w.submit_future([3])]
    t0 = time.monotonic()
    with pytest.raises(OverloadedError, match="2 requests waiting"):
        w.submit_future([4])
    assert time.monotonic() - t0 < 2  # refused, not queued until a slot frees (that would block for good)
    gate.set()
    assert first.result(5)[0] == [10] and [f.result(5)[0] for f in queued] == [[20], [30]]
    w.stop()


def test_an_error_reaches_every_job_of_its_batch_and_the_worker_goes_on():
    w = BatchingWorker("m", FakeModel(), BatchConfig(max_batch_size=8, max_queue_delay_s=0.05))

    async def go():
        return await asyncio.gather(w.submit([1]), w.submit([-1]), return_exceptions=True)

    a, b = asyncio.run(go())
    assert isinstance(a, ValueError) and isinstance(b, ValueError)
    assert w.run([2])[0] == [20]
    w.stop()


def test_init_runs_on_the_worker_thread_and_its_error_raises():
    seen = {}
    w = BatchingWorker("m", FakeModel(), init=lambda: seen.setdefault("thread", threading.current_thread().name))
    assert seen["thread"] == "inferd-batch-m"
    w.stop()

    def broken() -> None:
        raise RuntimeError("no such model file")

    with pytest.raises(RuntimeError, match="no such model file"):
        BatchingWorker("m", FakeModel(), init=broken)
    with pytest.raises(ValueError, match="max batch size"):
        BatchConfig(max_batch_size=0)


def test_a_lone_client_is_not_held_back_by_the_delay_but_company_is_batched():
    model = FakeModel()
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=16, max_queue_delay_s=1.0))
    t0 = time.perf_counter()
    assert w.run([1])[0] == [10]  # the first batch waits out the delay: nothing says it will stay alone
    assert time.perf_counter() - t0 >= 1.0
    for i in range(3):  # a client that sends one request at a time, after a batch without company
        t0 = time.perf_counter()
        assert w.run([i])[0] == [i * 10]
        assert time.perf_counter() - t0 < 0.75  # well under the 1 s delay, with room for a busy host
    gate = threading.Event()
    w.run_batch = FakeModel(gate=gate)  # hold the worker so that company queues up behind a batch
    first = w.submit_future([0])
    assert w.run_batch.started.wait(5)
    futs = [w.submit_future([i]) for i in range(1, 4)]
    gate.set()
    assert [f.result(5)[0] for f in [first, *futs]] == [[i * 10] for i in range(4)]
    assert w.run_batch.calls == [[0], [1, 2, 3]]
    assert not w._alone  # the batch found company: the next one waits for more again
    w.stop()


def test_jobs_of_one_loop_pass_reach_the_worker_together():
    """The jobs submitted in one pass of the event loop go to the worker thread as one queue entry (one wake-up
    of the worker, not one per request) and make one batch."""
    gate = threading.Event()
    model = FakeModel(gate=gate)
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=16, max_queue_delay_s=0.0))
    first = w.submit_future([0])
    assert model.started.wait(5)  # the worker holds the first job

    async def go():
        futs = [asyncio.ensure_future(w.submit([i])) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        assert w._queue.qsize() == 1 and w.waiting == 6
        gate.set()
        return await asyncio.gather(*futs)

    assert [r for r, _ in asyncio.run(go())] == [[i * 10] for i in range(1, 7)]
    assert first.result(5)[0] == [0] and model.calls == [[0], list(range(1, 7))] and w.waiting == 0
    w.stop()


def test_async_submits_over_the_queue_bound_are_refused_at_once():
    gate = threading.Event()
    model = FakeModel(gate=gate)
    w = BatchingWorker("m", model, BatchConfig(max_batch_size=1, max_queue_delay_s=0, max_queue=3))
    first = w.submit_future([0])
    assert model.started.wait(5)  # the worker holds the first job; three more may wait

    async def go():
        futs = [asyncio.ensure_future(w.submit([i])) for i in range(1, 5)]
        await asyncio.sleep(0)
        assert w.waiting == 3
        gate.set()
        return await asyncio.gather(*futs, return_exceptions=True)

    out = asyncio.run(go())
    assert [r[0] for r in out[:3]] == [[10], [20], [30]]
    assert isinstance(out[3], OverloadedError) and "3 requests waiting" in str(out[3])
    assert first.result(5)[0] == [0] and w.waiting == 0
    w.stop()


def test_jobs_handed_over_after_stop_are_refused_not_left_waiting():
    w = BatchingWorker("m", FakeModel(), BatchConfig(max_batch_size=4, max_queue_delay_s=0))

    async def go():
        fut = asyncio.ensure_future(w.submit([1]))  # held for the end of this loop pass
        await asyncio.sleep(0)  # the job is admitted and held; the hand-over is scheduled
        w.stop()  # before the pass ends: the worker takes nothing more
        return await asyncio.wait_for(fut, 5)

    with pytest.raises(OverloadedError, match="stopped"):
        asyncio.run(go())
    assert w.waiting == 0
