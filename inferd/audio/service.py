"""A Whisper model behind the shared batching worker: one file at a time per model (CTranslate2 already uses
every core for one file), a bounded queue in front (503 + Retry-After when full)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from inferd.audio.transcriber import TranscribeOptions, Transcriber, Transcript, decode_audio
from inferd.workers.batching import BatchConfig, BatchingWorker


@dataclass
class TranscriptionService:
    """`make` builds the Transcriber on the worker thread (see BatchingWorker's `init`); loading errors raise
    from the constructor."""

    make: Callable[[], Transcriber]
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(1, 0.0, 64))
    transcriber: Transcriber | None = None
    worker: BatchingWorker | None = None

    def __post_init__(self) -> None:
        def init() -> None:
            self.transcriber = self.make()

        def run(jobs: list) -> list[Transcript]:
            assert self.transcriber is not None
            # encoded bytes are decoded here, on the model's thread: PyAV on a pool thread of the server ran
            # several times slower (0.5 s vs 0.1 s for a minute of speech)
            return [self.transcriber.transcribe(decode_audio(a) if isinstance(a, bytes) else a, o)
                    for a, o in jobs]

        self.worker = BatchingWorker("whisper", run, self.batch, init=init)

    @property
    def name(self) -> str:
        assert self.transcriber is not None
        return self.transcriber.name

    async def transcribe(self, audio: np.ndarray | bytes, opts: TranscribeOptions) -> Transcript:
        """Samples (16 kHz float32) or an encoded file's bytes (400 if they are not audio)."""
        assert self.worker is not None
        (result,), compute_s = await self.worker.submit([(audio, opts)])
        result.compute_s = compute_s
        return result
