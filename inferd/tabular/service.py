"""A tensor model behind the shared dynamic batcher, with an optional response cache (Triton's, off by default).

Rows of concurrent requests are stacked into one `predict` call when the model's first axis is free; each
request gets its own rows back. The cache key is a hash of the model name and the request's input tensors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from inferd.tabular.models import TensorModel
from inferd.workers.batching import BatchConfig, BatchingWorker


class Rows(dict):
    """{tensor name: array}; len() is the number of rows; a slice takes rows from every tensor."""

    def __len__(self) -> int:
        return len(next(iter(self.values()))) if dict.__len__(self) else 0

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return Rows({k: v[key] for k, v in self.items()})
        return super().__getitem__(key)


def _stack(parts: list) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return Rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


class ResponseCache:
    """Bounded LRU of outputs keyed by a hash of model + inputs."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.data: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()

    @staticmethod
    def key(model: str, inputs: dict[str, np.ndarray]) -> bytes:
        h = hashlib.blake2b(model.encode(), digest_size=16)
        for name in sorted(inputs):
            a = np.ascontiguousarray(inputs[name])
            h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
        return h.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key: bytes, value: dict[str, np.ndarray]) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.max_entries:
            self.data.popitem(last=False)


@dataclass
class TensorService:
    model: TensorModel
    batch: BatchConfig = field(default_factory=BatchConfig)
    cache_size: int = 0
    worker: BatchingWorker | None = None
    cache: ResponseCache | None = None
    cache_hits: int = 0

    def __post_init__(self) -> None:
        if not self.model.batchable and self.batch.max_batch_size > 1:  # a fixed first axis: one request a call
            self.batch = BatchConfig(1, 0.0, self.batch.max_queue)
        self.worker = BatchingWorker(self.model.name, lambda rows: Rows(self.model.predict(rows)), self.batch,
                                     concat=_stack)
        self.cache = ResponseCache(self.cache_size) if self.cache_size > 0 else None

    @property
    def name(self) -> str:
        return self.model.name

    async def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, bool]:
        """(outputs, compute seconds, served from the cache)."""
        key = None
        if self.cache is not None:
            key = ResponseCache.key(self.model.name, inputs)
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return hit, 0.0, True
        assert self.worker is not None
        out, compute_s = await self.worker.submit(Rows(inputs))
        out = dict(out)
        if key is not None and self.cache is not None:
            self.cache.put(key, out)
        return out, compute_s, False
