"""POST /v1/embeddings (and /embeddings), /v1/score (and /score), /v1/classify, with dynamic batching and the embedding cache.

Requests that arrive within a short window are merged into one length-sorted, token-budgeted pass over the
encoder (run in a worker thread so the event loop keeps serving); each request gets its own vectors back."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from inferd.embedder import Embedder
from inferd.errors import InvalidRequestError
from inferd.server.state import ServerState
from inferd.workers.batching import BatchConfig, BatchingWorker

WINDOW_S = 0.004  # how long the batcher waits for more requests once one arrived (max_queue_delay)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM: truncate over-long inputs instead of rejecting them


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    text_1: str | list[str] | None = None  # vLLM's names
    text_2: str | list[str] | None = None
    query: str | None = None  # search-style: one query, documents ranked by score
    documents: list[str] | None = None
    top_n: int | None = None
    truncate_prompt_tokens: int | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str]
    truncate_prompt_tokens: int | None = None


@dataclass
class EmbeddingService:
    """An encoder behind the shared dynamic batcher (inferd/workers/batching.py): requests that arrive within
    the batch delay run as one length-sorted, token-budgeted pass."""

    embedder: Embedder
    metrics: Any = None
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(max_batch_size=256, max_queue_delay_s=WINDOW_S))
    worker: BatchingWorker | None = None

    def __post_init__(self) -> None:
        if self.worker is None:
            self.worker = BatchingWorker(self.embedder.name, self.embedder.embed_ids, self.batch)

    @property
    def name(self) -> str:
        return self.embedder.name

    async def embed_seqs(self, seqs: list[list[int]]) -> np.ndarray:
        return (await self.embed_seqs_timed(seqs))[0]

    async def embed_seqs_timed(self, seqs: list[list[int]]) -> tuple[np.ndarray, float]:
        """Vectors and this request's share of its batch's compute seconds."""
        assert self.worker is not None
        vecs, compute_s = await self.worker.submit(seqs)
        if self.metrics is not None:
            self.metrics.observe_compute(self.name, compute_s)
        return vecs, compute_s

    def usage(self, ntok: int, compute_s: float) -> dict[str, Any]:
        cost = self.metrics.cost_usd(compute_s) if self.metrics is not None else 0.0
        return {"prompt_tokens": ntok, "total_tokens": ntok,
                "inferd": {"compute_s": round(compute_s, 6), "cost_usd": cost}}

    async def embed_texts(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, int, float]:
        """Vectors for texts (cache first), the number of tokens in the inputs, the compute seconds."""
        for i, t in enumerate(texts):
            if not t:
                raise InvalidRequestError(f"input {i} is an empty string", param="input")
        e = self.embedder
        out, todo = e.lookup(texts, truncate)
        if self.metrics is not None:
            self.metrics.embed_cache_hits.labels(e.name).inc(len(texts) - len(todo))
            self.metrics.embed_cache_misses.labels(e.name).inc(len(todo))
        seqs = e.tokenize(texts, truncate)  # every input: usage counts cached inputs too, errors are the same
        compute_s = 0.0
        if todo:
            vecs, compute_s = await self.embed_seqs_timed([seqs[i] for i in todo])
            e.remember(texts, todo, vecs, truncate, out)
        return out, sum(len(s) for s in seqs), compute_s


def _encode(vec: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.astype(np.float32).tolist()


def add_routes(app: FastAPI, state: ServerState) -> None:
    async def embeddings(body: EmbeddingRequest) -> dict:
        svc, model = await state.embedder(body.model)
        e = svc.embedder
        if body.dimensions is not None and body.dimensions != e.dim:
            raise InvalidRequestError(f"model {e.name} does not support dimensions={body.dimensions} "
                                      f"(its embeddings have {e.dim})", param="dimensions")
        truncate = body.truncate_prompt_tokens is not None
        inp = body.input
        if isinstance(inp, str):
            inp = [inp]
        if not inp:
            raise InvalidRequestError("input must not be empty", param="input")
        if all(isinstance(x, int) for x in inp):
            inp = [inp]  # one token-id list
        if isinstance(inp[0], list):
            seqs = [list(s) for s in inp]  # type: ignore[arg-type]
            for i, s in enumerate(seqs):
                if not s:
                    raise InvalidRequestError(f"input {i} is empty", param="input")
                if any(not 0 <= t < e.config.vocab_size for t in s):
                    raise InvalidRequestError(f"input {i} has a token id out of range", param="input")
                if len(s) > e.pooling.max_seq_length:
                    if not truncate:
                        raise InvalidRequestError(f"input {i} has {len(s)} tokens, more than this model's maximum "
                                                  f"of {e.pooling.max_seq_length}", param="input")
                    seqs[i] = s[: e.pooling.max_seq_length]
            (vecs, compute_s), ntok = await svc.embed_seqs_timed(seqs), sum(len(s) for s in seqs)
        else:
            vecs, ntok, compute_s = await svc.embed_texts(list(inp), truncate)  # type: ignore[arg-type]
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vecs)]
        return {"object": "list", "data": data, "model": model,
                "usage": svc.usage(ntok, compute_s)}

    app.post("/v1/embeddings")(embeddings)
    app.post("/embeddings", include_in_schema=False)(embeddings)

    async def _score(body: ScoreRequest) -> dict:
        svc, model = await state.embedder(body.model)
        truncate = body.truncate_prompt_tokens is not None
        if body.query is not None:
            if not body.documents:
                raise InvalidRequestError("documents must be a non-empty list", param="documents")
            q, docs = [body.query], list(body.documents)
        elif body.text_1 is not None and body.text_2 is not None:
            t1 = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
            docs = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
            if len(t1) != 1 and len(t1) != len(docs):
                raise InvalidRequestError("text_1 must be one text or as many as text_2", param="text_1")
            q = t1
        else:
            raise InvalidRequestError("give query + documents, or text_1 + text_2", param="query")
        vecs, ntok, compute_s = await svc.embed_texts(q + docs, truncate)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        qv, dv = vecs[: len(q)], vecs[len(q):]
        scores = (dv * (qv if len(q) > 1 else qv[0])).sum(axis=1) if len(q) > 1 else dv @ qv[0]
        data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
        out: dict = {"id": f"score-{time.time_ns()}", "object": "list", "model": model,
                     "data": data, "usage": svc.usage(ntok, compute_s)}
        if body.query is not None:
            ranked = sorted(data, key=lambda d: -d["score"])[: body.top_n or len(data)]
            out["results"] = [{"index": d["index"], "document": docs[d["index"]], "relevance_score": d["score"]}
                              for d in ranked]
        return out

    app.post("/v1/score")(_score)
    app.post("/score", include_in_schema=False)(_score)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        svc, model = await state.embedder(body.model)
        e = svc.embedder
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise InvalidRequestError("input must not be empty", param="input")
        for i, t in enumerate(texts):
            if not t:
                raise InvalidRequestError(f"input {i} is an empty string", param="input")
        if not e.config.num_labels:
            raise InvalidRequestError(f"model {e.name} has no classification head", param="model")
        loop = asyncio.get_running_loop()
        truncate = body.truncate_prompt_tokens is not None
        e.tokenize(texts, truncate)  # raises 400 for over-long input before any work
        probs = await loop.run_in_executor(None, e.classify, texts, truncate)
        labels = e.labels
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": {lb: float(x) for lb, x in zip(labels, p)},
                 "num_classes": len(labels)} for i, p in enumerate(probs)]
        return {"id": f"classify-{time.time_ns()}", "object": "list", "model": model, "data": data}


def load_embedder(spec: str, dtype: str, device: str, cache_size: int, metrics: Any = None,
                  max_queue: int = 1024) -> EmbeddingService:
    batch = BatchConfig(max_batch_size=256, max_queue_delay_s=WINDOW_S, max_queue=max_queue)
    return EmbeddingService(Embedder(spec, dtype=dtype, device=device, cache_size=cache_size), metrics, batch)
