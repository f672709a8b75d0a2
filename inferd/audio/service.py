"""A Whisper model behind the shared batching worker: one file at a time per model (CTranslate2 already uses
every core for one file), a bounded queue in front (503 + Retry-After when full)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inferd.audio.transcriber import TranscribeOptions, Transcriber, Transcript
from inferd.workers.batching import BatchConfig, BatchingWorker


@dataclass
class TranscriptionService:
    transcriber: Transcriber
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(1, 0.0, 64))
    worker: BatchingWorker | None = None

    def __post_init__(self) -> None:
        t = self.transcriber
        self.worker = BatchingWorker(t.name, lambda jobs: [t.transcribe(a, o) for a, o in jobs], self.batch)

    @property
    def name(self) -> str:
        return self.transcriber.name

    async def transcribe(self, audio: np.ndarray, opts: TranscribeOptions) -> Transcript:
        assert self.worker is not None
        (result,), compute_s = await self.worker.submit([(audio, opts)])
        result.compute_s = compute_s
        return result
