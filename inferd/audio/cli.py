"""`inferd transcribe FILE`: speech to text on the command line (json, text, srt, vtt or verbose_json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inferd.errors import InferdError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="transcribe an audio file with a Whisper model (the audio extra)")
    p.add_argument("file", help="audio file: WAV, FLAC, MP3, OGG, ... (anything PyAV decodes)")
    p.add_argument("--model", "-m", default="whisper-tiny.en", help="known name or a CTranslate2 Whisper directory")
    p.add_argument("--format", "-f", default="text", choices=["json", "text", "srt", "vtt", "verbose_json"],
                   help="output format (OpenAI's response_format)")
    p.add_argument("--language", default=None, help="ISO 639-1 code of the speech (default: detect; en for .en)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                   help="translate: to English (multilingual models)")
    p.add_argument("--prompt", default=None, help="text to condition on (names, spellings)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--word-timestamps", action="store_true", help="word times in verbose_json")
    p.add_argument("--no-vad", action="store_true", help="turn off the voice-activity filter (on by default)")
    p.add_argument("--compute-type", default="int8", help="CTranslate2 compute type (int8, float32, ...)")
    p.add_argument("--output", "-o", default=None, help="write to this file instead of standard output")
    p.set_defaults(func=cmd_transcribe)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from inferd.audio.transcriber import TranscribeOptions, Transcriber, decode_audio, render

    path = Path(args.file)
    if not path.is_file():
        raise InferdError(f"no such file: {args.file}")
    audio = decode_audio(path.read_bytes())
    t = Transcriber(args.model, compute_type=args.compute_type)
    result = t.transcribe(audio, TranscribeOptions(task=args.task, language=args.language, prompt=args.prompt,
                                                   temperature=args.temperature, vad_filter=not args.no_vad,
                                                   word_timestamps=args.word_timestamps))
    body = render(result, args.format, words=args.word_timestamps)
    text = json.dumps(body, ensure_ascii=False, indent=2) + "\n" if isinstance(body, dict) else body
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    print(f"{result.duration:.1f} s of audio in {result.compute_s:.2f} s "
          f"(real-time factor {result.compute_s / max(result.duration, 1e-9):.3f})", file=sys.stderr)
    return 0
