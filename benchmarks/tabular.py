"""Fraud scoring over the Open Inference Protocol: p50/p99 latency and requests/s for single-transaction
requests at 1, 16 and 64 concurrent clients on loopback, for

  - inferd with dynamic batching on (--max-batch-size 64, --max-queue-delay-ms DELAY; one server per --delay-ms
    value: 1 ms waits for company, 0 runs what has queued at once, Triton's default),
  - inferd with batching off (--max-batch-size 1),
  - a plain FastAPI endpoint that parses the same request and calls the model once per request (the baseline),

all in the same run, on the same XGBoost model (examples/fraud/fraud.py's data, 100 trees of depth 4). The three
servers run side by side and take turns in `--rounds` rounds per concurrency level, so a shared host's changing
load hits all of them; each line also gives the server process's CPU time per request.

    python benchmarks/tabular.py [--requests 3000] [--rounds 4] [--delay-ms 1 [0 ...]] [--other-tree DIR] [--json out.json]

The load generator is aiohttp in this process; the servers are separate processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from proc_cpu import cpu_seconds  # noqa: E402

BASELINE = '''
import json, sys
import numpy as np, xgboost as xgb
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
import uvicorn

booster = xgb.Booster(model_file=sys.argv[1])
booster.set_param({"nthread": 1})
app = FastAPI()

@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = json.loads(await request.body())
    t = body["inputs"][0]
    x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    p = booster.inplace_predict(x, validate_features=False).astype(np.float32)
    prob = np.stack([1 - p, p], axis=1)
    return JSONResponse({"model_name": name, "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": list(prob.shape), "data": prob.reshape(-1).tolist()}]})

@app.get("/v2/health/ready")
async def ready():
    return {}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def _fraud_module():
    spec = importlib.util.spec_from_file_location("fraud", ROOT / "examples" / "fraud" / "fraud.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def train(d: Path) -> tuple[Path, np.ndarray]:
    import xgboost as xgb

    x, y = _fraud_module().make_transactions(20000, seed=0)
    m = xgb.XGBClassifier(n_estimators=100, max_depth=4, tree_method="hist", n_jobs=1, random_state=0).fit(x, y)
    m.save_model(d / "fraud.json")
    return d / "fraud.json", x


def start(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`env` may set PYTHONPATH to another source tree; the server then also runs there (`-m` puts the working
    directory first on sys.path)."""
    import httpx

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=(env or {}).get("PYTHONPATH"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready: {log.read_text()}")


async def load(url: str, rows: np.ndarray, n: int, concurrency: int, warmup: int = 50) -> tuple[list[float], float]:
    """`n` single-row requests from `concurrency` closed-loop clients: (latencies s, wall s)."""
    import aiohttp

    bodies = [json.dumps({"inputs": [{"name": "input", "shape": [1, rows.shape[1]], "datatype": "FP32",
                                      "data": rows[i % len(rows)].tolist()}]}).encode() for i in range(n)]
    lat: list[float] = []
    nxt = 0

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal nxt
        while nxt < n:
            i, nxt = nxt, nxt + 1
            t0 = time.perf_counter()
            async with s.post(url, data=bodies[i], headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, await r.text()
            lat.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(min(warmup, n)):  # warm up connections and the model
            async with s.post(url, data=bodies[0], headers={"Content-Type": "application/json"}) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return lat, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per (server, concurrency)")
    ap.add_argument("--rounds", type=int, default=4, help="the requests are sent in this many rounds, the servers "
                                                          "taking turns, so drift in a shared host's load hits all")
    ap.add_argument("--delay-ms", type=float, nargs="+", default=[1.0],
                    help="--max-queue-delay-ms of the batching server (one server per value)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--other-tree", default=None, help="also serve with batching on (the first --delay-ms) from "
                    "this inferd source tree, e.g. a `git worktree` of an older commit: a same-run A/B of the code")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from inferd.hardware import machine_info
    from tests.server_utils import free_port

    tmp = Path(tempfile.mkdtemp(prefix="inferd-tabular-"))
    model, rows = train(tmp)
    py = sys.executable
    serve = [py, "-m", "inferd.cli", "serve", "--model", str(model)]
    servers = {f"inferd, batching on, delay {d:g} ms": serve + ["--max-batch-size", "64", "--max-queue-delay-ms", str(d)]
               for d in args.delay_ms}
    envs: dict[str, dict[str, str]] = {}
    if args.other_tree:
        name = f"other tree, batching on, delay {args.delay_ms[0]:g} ms"
        servers[name] = serve + ["--max-batch-size", "64", "--max-queue-delay-ms", str(args.delay_ms[0])]
        envs[name] = {"PYTHONPATH": str(Path(args.other_tree).resolve())}
        print(f"other tree: {args.other_tree}")
    servers["inferd, batching off"] = serve + ["--max-batch-size", "1"]
    servers["plain FastAPI, model per request"] = [py, "-c", BASELINE, str(model)]
    print(f"machine: {machine_info()}; load average {os.getloadavg()[0]:.1f} (shared CPU)")
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in servers}
    per_round = max(1, args.requests // args.rounds)
    try:
        for name, cmd in servers.items():  # all up at once; idle while another is measured
            port = free_port()
            full = cmd + (["--port", str(port)] if cmd[1] == "-m" else [str(port)])
            procs[name] = (start(full, port, tmp / f"{len(procs)}.log", envs.get(name)),
                           f"http://127.0.0.1:{port}/v2/models/fraud.json/infer")
        for c in args.concurrency:
            acc = {name: ([], 0.0, 0.0) for name in servers}  # latencies, wall s, server CPU s
            for rnd in range(args.rounds):
                for name, (proc, url) in procs.items():
                    lat, wall, cpu = acc[name]
                    cpu0 = cpu_seconds(proc.pid)
                    more, w = asyncio.run(load(url, rows, per_round, c, warmup=50 if rnd == 0 else 0))
                    acc[name] = (lat + more, wall + w, cpu + cpu_seconds(proc.pid) - cpu0)
            for name, (lat, wall, cpu) in acc.items():
                ms = np.array(lat) * 1000
                # server CPU per request (the first round's 50 warm-up requests included): what bounds req/s on a
                # host whose cores are shared with the load generator and other processes
                r = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "rps": len(lat) / wall, "server_cpu_ms_per_req": 1e3 * cpu / (len(lat) + 50)}
                results[name][c] = r
                print(f"{name:36s} c={c:3d}  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                      f"{r['rps']:8.0f} req/s  server CPU {r['server_cpu_ms_per_req']:.3f} ms/req", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()
    base = results["plain FastAPI, model per request"]
    for name, r in results.items():
        if name != "plain FastAPI, model per request":
            print(f"ratio {name} / plain FastAPI req/s: " +
                  ", ".join(f"c={c}: {r[c]['rps'] / base[c]['rps']:.2f}x" for c in args.concurrency))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
