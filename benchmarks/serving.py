"""Serving benchmark: inferd serve vs a peer server on the same machine, in one run, through the same load
generator (`inferd bench serve`), plus the offline engine at the same concurrency (server overhead).

    python benchmarks/serving.py --out docs/serving [--peer-python /path/to/venv/bin/python] [--serve-args "-q gguf"]

The workload follows ../shared/reference/peers.md: streaming chat, 63 prompt tokens (33 random-text tokens
plus SmolLM2's chat template with its default system prompt, 30 tokens),
128 output tokens (ignore_eos), temperature 0. The peer is llama-cpp-python's OpenAI server on the same GGUF
file (installed in a separate environment; it is never an inferd dependency). It serves one request at a time
and ignores `ignore_eos`, so its requests may stop early at EOS (token counts come from its usage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM (the server drains), then kill if it has not exited after `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def bench(base_url: str, model: str, conc: str, n: int, out: Path, label: str, price: float,
          warmup: int = 2) -> dict:
    levels = []
    for c in conc.split(","):  # at least n prompts per level, and at least one per concurrent slot
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "inferd.cli", "bench", "serve", "--base-url", base_url, "--model", model,
                   "--tokenizer", "smollm2-135m", "--concurrency", c, "--num-prompts", str(max(n, int(c))),
                   "--input-len", "33", "--output-len", "128", "--out", tmp, "--label", label,
                   "--price-per-hour", str(price), "--no-plots", "--warmup", str(warmup)]
            subprocess.run(cmd, check=True)
            levels += json.loads((Path(tmp) / "results.json").read_text())["levels"]
    from inferd.bench.report import plot, write_results

    write_results(out, {"label": label, "base_url": base_url, "model": model}, levels)
    plot(out, levels, label)
    return {"levels": levels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/serving")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--num-prompts", type=int, default=32, help="per level (at least the concurrency)")
    ap.add_argument("--price-per-hour", type=float, default=0.10)
    ap.add_argument("--peer-python", default=None, help="python of an env with llama-cpp-python[server]")
    ap.add_argument("--serve-args", default="", help="extra engine flags for inferd, e.g. \"-q gguf\"")
    args = ap.parse_args()
    extra = args.serve_args.split()
    out = Path(args.out)
    from inferd.loader.hub import resolve

    gguf = str(resolve("smollm2-135m"))

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--model", "smollm2-135m", "--port",
                             str(port), "--price-per-hour", str(args.price_per_hour), *extra])
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc)
        bench(f"http://127.0.0.1:{port}/v1", "smollm2-135m", args.concurrency, args.num_prompts, out / "inferd",
              "inferd", args.price_per_hour)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    print("\n## offline engine (no HTTP), same shapes", flush=True)
    subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "offline", "--model", "smollm2-135m",
                    "--concurrency", args.concurrency, "--input-len", "63", "--output-len", "128", *extra], check=True)

    if args.peer_python:
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
        proc = subprocess.Popen([args.peer_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                                 "--n_ctx", "4096", "--n_threads", str(os.cpu_count()), "--model_alias",
                                 "smollm2-135m", "--chat_format", "chatml",
                                 # by default a new request interrupts the running one: with concurrency > 1
                                 # every stream would end after a token or two
                                 "--interrupt_requests", "False"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
            bench(f"http://127.0.0.1:{port}/v1", "smollm2-135m", args.concurrency, args.num_prompts,
                  out / "llama-cpp-python", "llama-cpp-python", args.price_per_hour)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print("\n## ratio (inferd / llama-cpp-python)")
        subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "compare", str(out / "llama-cpp-python" /
                        "results.json"), str(out / "inferd" / "results.json")], check=True)


if __name__ == "__main__":
    main()


def engine_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's engine-side TTFT histogram (vllm:time_to_first_token_seconds: arrival at the
    engine to the first token), from /metrics (through Ray: summed over the replicas' pushed metrics)."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in total:
            name = "vllm:time_to_first_token_seconds" + suffix
            if line.startswith(name + "{") or line.startswith(name + " "):
                total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"], total["_count"]
