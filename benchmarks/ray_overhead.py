"""What Ray Serve costs: `inferd serve` direct vs `inferd serve --replicas 1` (the same engine behind the Ray Serve
proxy, ingress and replica), both up at once and measured in alternating rounds through the same load generator
(`inferd bench serve`), so host drift hits both sides alike; the table gives per-round ratios and their median.

    python benchmarks/ray_overhead.py --out docs/ray_overhead [--concurrency 1,16] [--num-prompts 16] [--rounds 3]

Workload as benchmarks/serving.py: streaming chat, 33 random-text tokens + SmolLM2's chat template, 128 output
tokens (ignore_eos), temperature 0. Both servers get the same explicit `--threads` (default: every core) and run
with OMP_NUM_THREADS at that count (Ray sets it in a replica's worker process; the C kernels' OpenMP teams follow
it), and the replica reserves that many CPUs (--replica-cpus): on an oversubscribed host a 2-thread team is up to
10x slower than 1 thread (each parallel region waits for a descheduled thread), so like must meet like. Needs the [ray]
extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import bench, free_port, stop_server, wait_ready  # noqa: E402


@contextlib.contextmanager
def server(label: str, extra: list[str], out: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    log = open(out / f"{label}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--model", "smollm2-135m", "--port",
                             str(port), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.time()
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=900)
        print(f"{label}: ready after {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/ray_overhead")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=16, help="per level and round (at least the concurrency)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both servers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # what Ray gives the replica's worker process
    runs: list[dict] = []
    with server("direct", threads, out, env) as direct, \
            server("ray", [*threads, "--replicas", "1", "--replica-cpus", str(args.threads)], out, env) as ray:
        for r in range(args.rounds):
            for label, url in (("direct", direct), ("ray", ray)):
                levels = bench(url, "smollm2-135m", args.concurrency, args.num_prompts, out / f"{label}-{r}",
                               label, 0.10)["levels"]
                runs += [{"round": r, "system": label, "concurrency": lv["concurrency"],
                          "out_tok_s": lv["summary"]["output_throughput"],
                          "ttft_p50_ms": lv["summary"]["ttft_ms"]["p50"], "errors": lv["summary"]["errors"]}
                         for lv in levels]
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    rows = ["| conc | direct out tok/s (per round) | Ray out tok/s | throughput ratio (median) | direct TTFT p50 ms | "
            "Ray TTFT p50 ms | TTFT ratio (median) |", "|---|---|---|---|---|---|---|"]
    for c in sorted({x["concurrency"] for x in runs}):
        d = [x for x in runs if x["system"] == "direct" and x["concurrency"] == c]
        y = [x for x in runs if x["system"] == "ray" and x["concurrency"] == c]
        tput = statistics.median(b["out_tok_s"] / a["out_tok_s"] for a, b in zip(d, y))
        ttft = statistics.median(b["ttft_p50_ms"] / a["ttft_p50_ms"] for a, b in zip(d, y))
        def cells(xs: list[dict], key: str) -> str:
            return " / ".join(f"{x[key]:.0f}" for x in xs)

        rows.append(f"| {c} | {cells(d, 'out_tok_s')} | {cells(y, 'out_tok_s')} | {tput:.2f} | "
                    f"{cells(d, 'ttft_p50_ms')} | {cells(y, 'ttft_p50_ms')} | {ttft:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
