"""Throughput of `inferd serve --workers N` against one process, same run, alternating (for ratios on a shared
host): each round starts the server with every --workers value in turn (SmolLM2 alone by default), waits until
every worker is ready, and runs `inferd bench serve` (streaming chat, 33 random prompt tokens + the chat template,
128 output tokens) at each concurrency.

    python benchmarks/workers.py [--workers 1 2] [--concurrency 1,16] [--num-prompts 32] [--rounds 2]

Threads: each worker gets max(1, cores // N) unless --serve-args gives --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, stop_server, wait_ready  # noqa: E402


def start(workers: int, model: str, extra: list[str]) -> tuple[subprocess.Popen, int, tempfile._TemporaryFileWrapper]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "--log-level", "INFO", "serve", "--model", model,
                             "--port", str(port), "--workers", str(workers), *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/ready", proc)
    if workers > 1:
        deadline = time.time() + 300
        while f"all {workers} workers ready" not in Path(log.name).read_text():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("workers not ready")
            time.sleep(0.2)
    return proc, port, log


def bench(port: int, model: str, conc: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "serve", "--base-url",
                        f"http://127.0.0.1:{port}/v1", "--model", model, "--tokenizer", "smollm2-135m",
                        "--concurrency", str(conc), "--num-prompts", str(max(n, conc)), "--input-len", "33",
                        "--output-len", "128", "--out", tmp, "--no-plots", "--warmup", "2"],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(tmp) / "results.json").read_text())["levels"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve-args", default="", help="extra `inferd serve` flags")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}"
          f"; load {os.getloadavg()[0]:.1f}; {' '.join(sys.argv)}", flush=True)
    rows = []
    for rnd in range(args.rounds):
        for w in args.workers:
            proc, port, log = start(w, args.model, args.serve_args.split())
            try:
                for c in (int(x) for x in args.concurrency.split(",")):
                    s = bench(port, args.model, c, args.num_prompts)
                    row = {"round": rnd + 1, "workers": w, "concurrency": c,
                           "out_tok_s": round(s["output_throughput"], 1), "ttft_p50_ms": round(s["ttft_ms"]["p50"], 1),
                           "tpot_p50_ms": round(s["tpot_ms"]["p50"], 1), "errors": s["errors"],
                           "load": round(os.getloadavg()[0], 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stop_server(proc)
                log.close()
    print("\n| round | --workers | streams | output tok/s | TTFT p50 ms | TPOT p50 ms | errors | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['workers']} | {r['concurrency']} | {r['out_tok_s']} | {r['ttft_p50_ms']} | "
              f"{r['tpot_p50_ms']} | {r['errors']} | {r['load']} |")


if __name__ == "__main__":
    main()
