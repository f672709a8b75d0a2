"""Speech to text: Whisper tiny.en served beside a chat model, on speech made at test time with espeak-ng, through
the official openai client, raw multipart requests and `inferd transcribe`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave

import httpx
import numpy as np
import openai
import pytest

from tests.server_utils import run_server

pytest.importorskip("faster_whisper", reason="the audio extra (faster-whisper) is not installed")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it: apt-get install espeak-ng)",
                allow_module_level=True)

SENTENCES = [
    "The weather is nice today and the sun is shining.",
    "Please send the report to the finance team before lunch.",
    "My favourite colour is green and I like to read books.",
    "The train to the city leaves from the north station.",
    "We need to buy milk, bread and coffee at the store.",
]


def _model_installed() -> bool:
    from inferd.loader import hub

    return hub.is_installed("whisper-tiny.en")


pytestmark = pytest.mark.skipif(not _model_installed(), reason="whisper-tiny.en is not installed "
                                                                 "(inferd pull whisper-tiny.en)")


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower().replace("favorite", "favourite").replace("color", "colour")).split()


def wer(ref: str, hyp: str) -> float:
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))  # edit distance over words, one row at a time
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / len(r)


def _speak(text: str, path) -> None:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("speech")
    paths = []
    for i, s in enumerate(SENTENCES):
        _speak(s, d / f"s{i}.wav")
        paths.append(d / f"s{i}.wav")
    _join(paths, d / "all.wav")  # all five, a second of silence between them
    _join(paths[3:], d / "two.wav")  # two, for the subtitle formats
    return {"one": paths, "all": d / "all.wav", "two": d / "two.wav", "dir": d}


def _join(paths, out) -> None:
    frames, rate = [], 22050
    for p in paths:
        with wave.open(str(p)) as w:
            rate = w.getframerate()
            frames.append(w.readframes(w.getnframes()) + b"\0\0" * rate)
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(frames))


@pytest.fixture(scope="module")
def server(tiny_hf):
    with run_server("--model", str(tiny_hf), "--model", "whisper-tiny.en", "--dtype", "float32",
                    "--kv-cache-memory", "0.05") as s:
        yield s


def _post(server, path: str, data: bytes, name: str = "a.wav", **form) -> httpx.Response:
    return httpx.post(server.url + path, files={"file": (name, data)}, data=form, timeout=120)


def test_word_error_rate_and_segments_through_openai_client(server, clips):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    with open(clips["all"], "rb") as f:  # the five sentences, a second apart
        r = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, response_format="verbose_json",
                                               language="en")
    assert wer(" ".join(SENTENCES), r.text) <= 0.15, r.text
    body = r.model_dump()
    segs = body["segments"]
    assert body["task"] == "transcribe" and body["language"] == "en" and len(segs) >= 3
    assert all(s["start"] < s["end"] for s in segs)
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(segs, segs[1:]))
    assert segs[-1]["end"] <= body["duration"] + 0.5
    u = body["usage"]
    assert u["type"] == "duration" and abs(u["seconds"] - body["duration"]) < 1e-3 and u["inferd"]["compute_s"] > 0
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'inferd_audio_seconds_total\{model_name="whisper-tiny.en"\} [1-9]', metrics)


def test_word_timestamps(server, clips):
    r = _post(server, "/v1/audio/transcriptions", clips["one"][0].read_bytes(), response_format="verbose_json",
              **{"timestamp_granularities[]": "word"})
    assert r.status_code == 200, r.text
    words = r.json()["words"]
    assert len(words) >= 8 and all(w["start"] <= w["end"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def test_srt_and_vtt_are_valid(server, clips):
    data = clips["two"].read_bytes()
    srt = _post(server, "/v1/audio/transcriptions", data, response_format="srt")
    vtt = _post(server, "/v1/audio/transcriptions", data, response_format="vtt")
    assert srt.status_code == vtt.status_code == 200
    stamp = r"(\d{2}):(\d{2}):(\d{2})[,.](\d{3})"
    blocks = srt.text.strip().split("\n\n")
    assert len(blocks) >= 2
    for i, b in enumerate(blocks, 1):
        lines = b.split("\n")
        assert lines[0] == str(i) and re.fullmatch(f"{stamp} --> {stamp}", lines[1]) and lines[2].strip(), b
    assert vtt.text.startswith("WEBVTT\n\n") and vtt.headers["content-type"].startswith("text/vtt")
    cues = vtt.text.split("\n\n")[1:-1]
    assert len(cues) == len(blocks)
    assert all(re.fullmatch(f"{stamp} --> {stamp}", c.split("\n")[0]) and "." in c.split("\n")[0] for c in cues)
    text = _post(server, "/v1/audio/transcriptions", clips["one"][4].read_bytes(), response_format="text")
    assert text.headers["content-type"].startswith("text/plain") and "coffee" in text.text.lower()
    assert float(text.headers["x-inferd-compute-seconds"]) > 0


def test_translations_endpoint(server, clips):
    r = _post(server, "/v1/audio/translations", clips["one"][3].read_bytes())
    assert r.status_code == 200 and "train" in r.json()["text"].lower()


def test_bad_uploads(server):
    r = _post(server, "/v1/audio/transcriptions", b"this is not audio at all" * 100, name="a.wav")
    assert r.status_code == 400 and "could not be decoded as audio" in r.json()["error"]["message"]
    r = _post(server, "/v1/audio/transcriptions", b"\0" * (25 * 1024 * 1024 + 10), name="big.wav")
    assert r.status_code == 413
    r = _post(server, "/v1/audio/transcriptions", b"RIFF", response_format="xml")
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/transcriptions", data={"model": "whisper-tiny.en"})
    assert r.status_code == 400


def _wav_bytes(samples: np.ndarray, rate: int, width: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def test_thirty_minutes_of_silence_and_quiet_noise_give_no_text(server):
    silent = _wav_bytes(np.full(30 * 60 * 8000, 128, np.uint8), 8000, 1)  # 8-bit PCM silence: 14.4 MB
    r = _post(server, "/v1/audio/transcriptions", silent, response_format="verbose_json")
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "" and r.json()["segments"] == [] and abs(r.json()["duration"] - 1800) < 1
    noise = (np.random.default_rng(0).normal(size=20 * 16000) * 60).astype("<i2")  # faint hiss: the VAD's job
    r = _post(server, "/v1/audio/transcriptions", _wav_bytes(noise, 16000, 2))
    assert r.status_code == 200 and r.json()["text"] == ""


def test_transcribe_cli(clips, capsys):
    from inferd.cli import main

    assert main(["transcribe", str(clips["one"][2]), "--format", "srt"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("1\n00:00:") and "green" in out.out.lower(), out
    assert "real-time factor" in out.err
    bad = clips["dir"] / "notes.wav"
    bad.write_text("not audio")
    assert main(["transcribe", str(bad)]) == 1
    assert capsys.readouterr().err.startswith("error: the file could not be decoded as audio")
