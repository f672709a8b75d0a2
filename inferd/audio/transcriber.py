"""Speech to text with Whisper in CTranslate2 format, through faster-whisper (the `audio` extra).

    t = Transcriber("whisper-tiny.en")
    result = t.transcribe(decode_audio(open("talk.wav", "rb")), TranscribeOptions(language="en"))
    result.text, result.segments[0].start, ...

Audio is decoded with PyAV (what faster-whisper uses) to 16 kHz mono float32. Silero VAD (faster-whisper's
`vad_filter`) is on by default so silence and noise produce no text rather than hallucinations; audio that is
digital silence throughout is answered without running the model at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from inferd.errors import InvalidRequestError, ModelLoadError
from inferd.loader import hub

SAMPLE_RATE = 16000
SILENCE_PEAK = 1e-4  # |sample| below this everywhere: nothing to transcribe


def _faster_whisper():
    try:
        import faster_whisper
    except ImportError as exc:
        raise ModelLoadError(f"speech models need faster-whisper: pip install 'inferd[audio]' ({exc})") from exc
    return faster_whisper


def is_whisper_spec(spec: str) -> bool:
    """A catalogued speech model, or a CTranslate2 Whisper directory (model.bin + a config.json with
    alignment_heads)."""
    if spec in hub.CATALOGUE:
        return hub.CATALOGUE[spec].kind == "audio"
    d = Path(spec).expanduser()
    if not (d / "model.bin").is_file() or not (d / "config.json").is_file():
        return False
    try:
        return "alignment_heads" in json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False


def decode_audio(data: bytes | BinaryIO | str) -> np.ndarray:
    """Any container PyAV reads (WAV, FLAC, MP3, OGG, ...) → (n,) float32 at 16 kHz; 400 if it is not audio."""
    import io

    fw = _faster_whisper()
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        audio = fw.decode_audio(src, sampling_rate=SAMPLE_RATE)
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds (InvalidDataError, ValueError, ...)
        raise InvalidRequestError(f"the file could not be decoded as audio: {exc}", param="file") from None
    if audio.size == 0:
        raise InvalidRequestError("the file holds no audio samples", param="file")
    return audio


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # ISO 639-1; None: detected (multilingual models)
    prompt: str | None = None
    temperature: float = 0.0
    vad_filter: bool = True
    word_timestamps: bool = False
    beam_size: int = 5


@dataclass
class Word:
    start: float
    end: float
    word: str


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    duration: float  # seconds of audio
    segments: list[Segment]
    task: str = "transcribe"
    compute_s: float = 0.0


class Transcriber:
    def __init__(self, model: str = "whisper-tiny.en", *, compute_type: str = "int8", cpu_threads: int = 0):
        fw = _faster_whisper()
        path = hub.resolve(model)
        if not is_whisper_spec(str(path)) and not is_whisper_spec(model):
            raise ModelLoadError(f"{path}: not a CTranslate2 Whisper model directory (model.bin + config.json)")
        self.name = model if model in hub.CATALOGUE else path.name
        try:
            self.model = fw.WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=cpu_threads)
        except ValueError as exc:  # e.g. a compute type this CPU lacks
            raise ModelLoadError(f"{path}: {exc}") from exc
        self.multilingual = bool(self.model.model.is_multilingual)

    def transcribe(self, audio: np.ndarray, opts: TranscribeOptions = TranscribeOptions()) -> Transcript:
        t0 = time.perf_counter()
        duration = len(audio) / SAMPLE_RATE
        language = opts.language or ("en" if not self.multilingual else None)
        if not self.multilingual and language not in (None, "en"):
            raise InvalidRequestError(f"model {self.name} is English-only; language {language!r} is not supported",
                                      param="language")
        if float(np.max(np.abs(audio))) < SILENCE_PEAK:  # digital silence: no speech, skip the model
            return Transcript("", language or "en", duration, [], opts.task, time.perf_counter() - t0)
        # an English-only model has no translate task; its transcription is already English
        task = opts.task if self.multilingual else "transcribe"
        segs, info = self.model.transcribe(
            audio, language=language, task=task, initial_prompt=opts.prompt or None, temperature=opts.temperature,
            vad_filter=opts.vad_filter, word_timestamps=opts.word_timestamps, beam_size=opts.beam_size)
        out = [Segment(i, round(s.start, 3), round(s.end, 3), s.text, list(s.tokens), s.temperature or 0.0,
                       s.avg_logprob, s.compression_ratio, s.no_speech_prob,
                       [Word(round(w.start, 3), round(w.end, 3), w.word) for w in (s.words or [])])
               for i, s in enumerate(segs)]  # the generator decodes as it is consumed
        text = "".join(s.text for s in out).strip()
        return Transcript(text, info.language, duration, out, opts.task, time.perf_counter() - t0)


def transcript_json(t: Transcript, verbose: bool, words: bool, segments: bool = True) -> dict[str, Any]:
    """OpenAI's json / verbose_json bodies."""
    if not verbose:
        return {"text": t.text}
    body: dict[str, Any] = {"task": t.task, "language": t.language, "duration": round(t.duration, 3),
                            "text": t.text}
    if segments:
        body["segments"] = [{"id": s.id, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                             "tokens": s.tokens, "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                             "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                            for s in t.segments]
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end}
                         for s in t.segments for w in s.words]
    return body


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    return "".join(f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(t.segments, 1))


def to_vtt(t: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in t.segments)


def render(t: Transcript, fmt: str, words: bool = False, segments: bool = True) -> str | dict[str, Any]:
    """The body for an OpenAI response_format: json | verbose_json (dicts), text | srt | vtt (strings)."""
    if fmt == "text":
        return t.text + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    return transcript_json(t, fmt == "verbose_json", words, segments)
