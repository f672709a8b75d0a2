"""What Ray Serve costs: `inferd serve` direct vs `inferd serve --replicas 1` (the same engine behind the Ray Serve
proxy, ingress and replica), both up at once and measured in alternating rounds through the same load generator
(`inferd bench serve`), so host drift hits both sides alike; the table gives per-round ratios and their median.

    python benchmarks/ray_overhead.py --out docs/ray_overhead [--concurrency 1,16] [--num-prompts 16] [--rounds 3]
        [--layouts auto,separate]

Layouts (`--ray-ingress`): `auto` is what `--replicas 1` runs (the engine replica is Serve's ingress: proxy ->
replica, one handle hop), `separate` puts the ingress deployment in front (proxy -> ingress -> replica, the layout
of prefix routing over several replicas). Each is its own local Ray, up alongside direct. CPU seconds burnt per
request by each process of each server (from /proc, benchmarks/proc_cpu.py) go to runs.json and a second table. "TTFT outside the engine"
is the client's mean TTFT minus the engine's own (its /metrics histogram, arrival at the engine to the first
token): HTTP, tokenization and, through Ray, the hops. Levels alternate between the systems within each round.

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
import proc_cpu  # noqa: E402
from serving import bench, engine_ttft, free_port, stop_server, wait_ready  # noqa: E402


@contextlib.contextmanager
def server(label: str, extra: list[str], out: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = open(out / f"{label}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--model", "smollm2-135m", "--port",
                             str(port), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.time()
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=900)
        print(f"{label}: ready after {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}/v1", proc.pid
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
    ap.add_argument("--layouts", default="auto,separate",
                    help="Ray layouts to measure: --ray-ingress values, each optionally with :direct or :proxy "
                         "(--ray-http; default auto, which is direct for the local Ray)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # what Ray gives the replica's worker process
    runs: list[dict] = []
    layouts = [x for x in args.layouts.split(",") if x]
    pending: dict[str, tuple[float, float, dict]] = {}  # system -> engine TTFT (sum, count) before its last bench

    def close(label: str, url: str) -> tuple[float, float]:
        """Read the server's engine-side TTFT histogram; the change since the system's previous bench gives that
        bench's mean engine TTFT (Ray replicas push metrics each second: other systems ran in between)."""
        s_, n_ = engine_ttft(url)
        if label in pending:
            s0, n0, row = pending.pop(label)
            if n_ > n0:
                row["engine_ttft_mean_ms"] = 1000 * (s_ - s0) / (n_ - n0)
        return s_, n_

    with contextlib.ExitStack() as stack:
        systems = [("direct", *stack.enter_context(server("direct", threads, out, env)))]
        for lay in layouts:
            ingress, _, http = lay.partition(":")  # "auto:proxy": the layout with Serve's HTTP proxy in front
            extra = [*threads, "--replicas", "1", "--replica-cpus", str(args.threads), "--ray-ingress", ingress,
                     *(["--ray-http", http] if http else [])]
            systems.append((f"ray-{lay}", *stack.enter_context(server(f"ray-{lay}", extra, out, env))))
        for r in range(args.rounds):
            for c in args.concurrency.split(","):
                for label, url, pid in systems:  # alternating per level: host drift hits every system alike
                    ttft0 = close(label, url)
                    before = proc_cpu.snapshot(pid)
                    lv = bench(url, "smollm2-135m", c, args.num_prompts, out / f"{label}-{r}-{c}", label,
                               0.10, warmup=0)["levels"][0]  # no unmeasured requests: the engine's TTFT
                    # histogram must see the same requests as the client (every system starts its level alike)
                    used = proc_cpu.delta(before, proc_cpu.snapshot(pid))
                    n_req = max(lv["summary"]["num_requests"], 1)
                    row = {"round": r, "system": label, "concurrency": lv["concurrency"],
                           "out_tok_s": lv["summary"]["output_throughput"],
                           "ttft_p50_ms": lv["summary"]["ttft_ms"]["p50"],
                           "ttft_mean_ms": lv["summary"]["ttft_ms"]["mean"], "errors": lv["summary"]["errors"],
                           "cpu_ms_per_request": {k: 1000 * v / n_req for k, v in used.items() if v > 0}}
                    runs.append(row)
                    pending[label] = (*ttft0, row)
        time.sleep(2.5)  # the replicas' last metrics push
        for label, url, _ in systems:
            close(label, url)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    rows = ["| conc | system | out tok/s (per round) | throughput ratio to direct (median) | TTFT p50 ms | "
            "TTFT ratio to direct (median) | TTFT outside the engine, mean ms |", "|---|---|---|---|---|---|---|"]

    def cells(xs: list[dict], key: str) -> str:
        return " / ".join(f"{x[key]:.0f}" if x.get(key) is not None else "-" for x in xs)

    def outside(xs: list[dict]) -> str:  # client TTFT minus the engine's (arrival to first token): the hops
        vals = [x["ttft_mean_ms"] - x["engine_ttft_mean_ms"] for x in xs if "engine_ttft_mean_ms" in x]
        return f"{statistics.median(vals):.1f}" if vals else "-"

    levels = sorted({x["concurrency"] for x in runs})
    for c in levels:
        d = [x for x in runs if x["system"] == "direct" and x["concurrency"] == c]
        rows.append(f"| {c} | direct | {cells(d, 'out_tok_s')} | 1 | {cells(d, 'ttft_p50_ms')} | 1 | {outside(d)} |")
        for lay in layouts:
            y = [x for x in runs if x["system"] == f"ray-{lay}" and x["concurrency"] == c]
            tput = statistics.median(b["out_tok_s"] / a["out_tok_s"] for a, b in zip(d, y))
            ttft = statistics.median(b["ttft_p50_ms"] / a["ttft_p50_ms"] for a, b in zip(d, y))
            rows.append(f"| {c} | ray-{lay} | {cells(y, 'out_tok_s')} | {tput:.2f} | {cells(y, 'ttft_p50_ms')} | "
                        f"{ttft:.2f} | {outside(y)} |")
    rows += ["", "CPU ms per request (median over rounds), by process:", "",
             "| conc | system | process | CPU ms / request |", "|---|---|---|---|"]
    for c in levels:
        for label in ["direct", *(f"ray-{lay}" for lay in layouts)]:
            per = [x["cpu_ms_per_request"] for x in runs if x["system"] == label and x["concurrency"] == c]
            names = sorted({k for q in per for k in q}, key=lambda k: -statistics.median(q.get(k, 0.0) for q in per))
            for k in names:
                v = statistics.median(q.get(k, 0.0) for q in per)
                if v >= 0.5:
                    rows.append(f"| {c} | {label} | {k} | {v:.1f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
