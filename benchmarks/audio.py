"""Speech to text: real-time factor (compute seconds per second of audio) of Whisper tiny.en through
`inferd serve` (POST /v1/audio/transcriptions, client-side wall time) vs the faster-whisper package used
directly (same model directory, same compute type, same options: beam 5, VAD on, language en), in the same run,
alternating so drift in a shared machine's load hits both; then throughput with 4 files sent at once. Besides
wall time it records CPU seconds per request on both sides (the direct process's own, and the whole server
process's around the request): on a shared host wall time mostly measures the other processes.

    python benchmarks/audio.py [--rounds 3] [--json out.json]

The speech is made with espeak-ng (about a minute of English).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from proc_cpu import cpu_seconds  # noqa: E402

TEXT = (
    "Inference is the part of machine learning that users actually pay for. A model that was trained once "
    "answers millions of requests, and every one of them costs compute time and money. Latency decides whether "
    "a product feels fast; throughput decides how many machines you need; cost decides whether the business "
    "works at all. Speech recognition is a good example. A meeting of thirty minutes becomes a transcript in a "
    "few seconds when the model is small and the server keeps the processor busy. The same server can score "
    "card transactions for fraud, rank search results, and answer questions in a chat window. Each of these "
    "workloads has its own shape, but they share the same needs: a queue in front of the model, batches that "
    "fill the hardware, clear errors when something goes wrong, and numbers that tell you what each request "
    "cost."
)


DIRECT = """
import resource, sys, time
from faster_whisper import WhisperModel, decode_audio
model = WhisperModel(sys.argv[1], device="cpu", compute_type=sys.argv[2])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def run():
    c0, t0 = cpu(), time.perf_counter()
    segs, _ = model.transcribe(decode_audio(sys.argv[3]), language="en", beam_size=5, vad_filter=True,
                               temperature=0.0)
    "".join(s.text for s in segs)
    return time.perf_counter() - t0, cpu() - c0
run()
print(*run())
"""


def make_speech(d: Path) -> Path:
    path = d / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), TEXT], check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import httpx
    from faster_whisper import decode_audio

    from inferd.hardware import machine_info
    from inferd.loader import hub
    from tests.server_utils import run_server

    tmp = Path(tempfile.mkdtemp(prefix="inferd-audio-"))
    wav = make_speech(tmp)
    data = wav.read_bytes()
    duration = len(decode_audio(str(wav))) / 16000
    print(f"machine: {machine_info()}; load average {os.getloadavg()[0]:.1f} (shared CPU); "
          f"{duration:.1f} s of speech")
    model_dir = str(hub.resolve("whisper-tiny.en"))

    def direct() -> tuple[float, float]:
        """faster-whisper alone, in a fresh process (no torch, nothing of inferd): one warm-up, one timed run;
        (wall s, CPU s)."""
        out = subprocess.run([sys.executable, "-c", DIRECT, model_dir, args.compute_type, str(wav)],
                             capture_output=True, text=True, check=True)
        wall, cpu = map(float, out.stdout.strip().splitlines()[-1].split())
        return wall, cpu

    direct_s, server_s, server_compute_s, direct_cpu, server_cpu = [], [], [], [], []
    with run_server("--model", "whisper-tiny.en", "--whisper-compute-type", args.compute_type, timeout=300) as s:
        url = s.url + "/v1/audio/transcriptions"

        def served() -> tuple[float, float, float]:
            """(client wall s, the server's own compute_s, the server process's CPU s for the request)."""
            c0, t0 = cpu_seconds(s.proc.pid), time.perf_counter()
            r = httpx.post(url, files={"file": ("speech.wav", data)}, data={"language": "en"}, timeout=300)
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["usage"]["inferd"]["compute_s"], cpu_seconds(s.proc.pid) - c0

        served()  # warm-up (direct() warms up in its own process)
        for _ in range(args.rounds):
            wall, cpu = direct()
            direct_s.append(wall)
            direct_cpu.append(cpu)
            e2e, comp, cpu = served()
            server_s.append(e2e)
            server_compute_s.append(comp)
            server_cpu.append(cpu)
            print(f"  direct {direct_s[-1]:.2f} s (CPU {direct_cpu[-1]:.2f} s)   server {server_s[-1]:.2f} s "
                  f"(compute {comp:.2f} s, server process CPU {cpu:.2f} s)", flush=True)

        async def four() -> float:
            async with httpx.AsyncClient(timeout=600) as c:
                t0 = time.perf_counter()
                rs = await asyncio.gather(*(c.post(url, files={"file": ("speech.wav", data)},
                                                   data={"language": "en"}) for _ in range(4)))
                assert all(r.status_code == 200 for r in rs)
                return time.perf_counter() - t0

        wall4 = asyncio.run(four())
    rtf_d, rtf_s = statistics.median(direct_s) / duration, statistics.median(server_s) / duration
    print(f"real-time factor (median of {args.rounds}): faster-whisper direct {rtf_d:.3f}, inferd server "
          f"{rtf_s:.3f} (end to end incl. upload and decode) → server/direct {rtf_s / rtf_d:.3f}")
    cpu_d, cpu_s = statistics.median(direct_cpu), statistics.median(server_cpu)
    print(f"CPU seconds per request (median; less sensitive to other processes on a shared host than wall time): "
          f"direct {cpu_d:.2f}, server process {cpu_s:.2f} → server/direct {cpu_s / cpu_d:.3f}")
    print(f"4 concurrent files: {4 * duration:.0f} s of audio in {wall4:.2f} s → {4 * duration / wall4:.1f} "
          f"audio seconds per second")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "duration_s": duration,
                                               "direct_s": direct_s, "server_s": server_s,
                                               "server_compute_s": server_compute_s, "four_wall_s": wall4,
                                               "direct_cpu_s": direct_cpu, "server_cpu_s": server_cpu},
                                              indent=2))


if __name__ == "__main__":
    main()
