"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's multipart API) for Whisper models.

The upload is checked (25 MB, 413 above), then queued on the model's batching worker, which decodes it to
16 kHz mono (400 if it is not audio) and transcribes it. json and verbose_json bodies carry `usage` with the audio seconds,
the compute seconds and the cost; text, srt and vtt carry the same in X-Inferd-* headers.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from inferd.errors import InvalidRequestError
from inferd.server.state import ServerState

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's limit
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


class AudioTooLargeError(InvalidRequestError):
    status_code = 413


def add_routes(app: FastAPI, state: ServerState) -> None:
    async def run(task: str, file: UploadFile, model: str | None, language: str | None, prompt: str | None,
                  temperature: float, response_format: str, granularities: list[str] | None) -> Response:
        from inferd.audio.transcriber import TranscribeOptions, render

        t0 = time.perf_counter()
        if response_format not in FORMATS:
            raise InvalidRequestError(f"response_format must be one of {', '.join(FORMATS)}",
                                      param="response_format")
        grans = set(granularities or ["segment"])
        if not grans <= {"segment", "word"}:
            raise InvalidRequestError("timestamp_granularities[] may hold 'segment' and 'word'",
                                      param="timestamp_granularities")
        if grans != {"segment"} and response_format != "verbose_json":
            raise InvalidRequestError("timestamp_granularities[] needs response_format=verbose_json",
                                      param="timestamp_granularities")
        if not 0.0 <= temperature <= 1.0:
            raise InvalidRequestError("temperature must be between 0 and 1", param="temperature")
        svc, name = await state.service(model, "audio")
        data = await file.read(MAX_AUDIO_BYTES + 1)
        if len(data) > MAX_AUDIO_BYTES:
            state.metrics.rejected.labels("body_too_large").inc()
            raise AudioTooLargeError(f"the audio file is larger than the limit of {MAX_AUDIO_BYTES} bytes (25 MB)",
                                     param="file")
        if not data:
            raise InvalidRequestError("the audio file is empty", param="file")
        opts = TranscribeOptions(task=task, language=language or None, prompt=prompt, temperature=temperature,
                                 word_timestamps="word" in grans)
        result = await svc.transcribe(data, opts)  # decoded on the model's worker thread
        cost = state.metrics.observe_compute(name, result.compute_s, time.perf_counter() - t0)
        state.metrics.audio_seconds.labels(name).inc(result.duration)
        body = render(result, response_format, words="word" in grans, segments="segment" in grans)
        usage = {"type": "duration", "seconds": round(result.duration, 3),
                 "inferd": {"compute_s": round(result.compute_s, 6), "cost_usd": cost,
                            "real_time_factor": round(result.compute_s / max(result.duration, 1e-9), 6)}}
        if isinstance(body, dict):
            return JSONResponse({**body, "usage": usage})
        headers = {"X-Inferd-Audio-Seconds": str(usage["seconds"]),
                   "X-Inferd-Compute-Seconds": str(round(result.compute_s, 6)), "X-Inferd-Cost-USD": str(cost)}
        return PlainTextResponse(body, media_type=MEDIA[response_format], headers=headers)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: UploadFile = File(...), model: str | None = Form(None),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             temperature: float = Form(0.0), response_format: str = Form("json"),
                             timestamp_granularities: list[str] | None = Form(None,
                                                                              alias="timestamp_granularities[]"),
                             ) -> Any:
        return await run("transcribe", file, model, language, prompt, temperature, response_format,
                         timestamp_granularities)

    @app.post("/v1/audio/translations")
    async def translations(file: UploadFile = File(...), model: str | None = Form(None),
                           prompt: str | None = Form(None), temperature: float = Form(0.0),
                           response_format: str = Form("json")) -> Any:
        return await run("translate", file, model, None, prompt, temperature, response_format, None)


def body_limit(path: str, default: int) -> int:
    """The request body limit for a path: audio uploads may be up to 25 MB (plus the multipart framing)."""
    return max(default, MAX_AUDIO_BYTES + (1 << 20)) if path.startswith("/v1/audio/") else default
