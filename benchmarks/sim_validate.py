"""Validate `inferd simulate` against a measured run: the same open-loop workload (Poisson arrivals, chat prompts
sharing a few system prompts, fixed output lengths) sent for real through `inferd serve --replicas 2` on this
machine and fed to the simulator (`inferd.cluster.simulate.simulate`, the same router code), with a service model
calibrated on this machine around the run; the table compares TTFT / TPOT p50 and p99, prefix-cache hit rate and
output throughput (set by the open-loop arrivals below saturation), and gives the simulator's relative error.

    python benchmarks/sim_validate.py --out docs/sim_validate [--rate 2.0] [--duration 80] [--calibrate-procs 2]

Defaults: ~160 requests (~140 after the warm-up), so a p99 rests on the slowest one or two of them, not on the
single slowest of 36 (the earlier 0.6/s over 60 s); the table gives each measured percentile's 90% bootstrap
interval (chance alone; for a p99 it is still optimistic). The simulator gets the calibration's step-time spread
(`ServiceModel.step_jitter`: each calibration request's TPOT over the median at its batch size), and the table
also shows it without (every step exactly the fitted time), so what the spread explains of the tail is visible.

Calibration: a child process per `--calibrate-procs` (all at once), with `--replica-cpus` torch threads and
OMP_NUM_THREADS as Ray gives a replica, run before the measured run and, with `--calibrate-after`, again after it
(for a host whose load drifts; the model then takes the medians of both). About 3.5 min in all on a quiet host
with the defaults, 1.5 min more with `--calibrate-after`: SmolLM2-135M decode steps at 1/2/4/8 running sequences (median TPOT) fitted to
`base + per_seq x running` (least squares, as `service_model.fit_decode`), and the TTFT of fresh prompts scaled to
480 tokens for the per-token prefill cost. `--calibrate-with ray` (default) measures one Ray Serve replica
(`inferd serve --replicas 1 --ray-ingress separate`: the replica's service model as deployed, through the
measured run's path (the ingress deployment, then the replica), Ray's per-request cost included) and
`serve` a single-process `inferd serve --threads N`, both through an HTTP client after WARMUP_S of warm-up;
`offline` measures `LLM.generate` (the `inferd bench offline` path). On the loaded host of docs/benchmarks.md the
last two ran ~2x slower than the same engine in a Ray worker. With `--calibrate-procs 2` both calibrators share
the cores as the two replicas do under load.
Needs the [ray] extra and the smollm2-135m package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import engine_ttft, free_port, stop_server  # noqa: E402

MODEL = "smollm2-135m"
DECODE_POINTS = (1, 2, 4, 8)  # running sequences: the batch sizes a replica sees at these loads
PASSES = 5
OUTSIDE_REQUESTS = 8  # lone short requests timed for the latency outside the engine
METRICS_SETTLE_S = 2.5  # Ray replicas push their metrics once a second
WARMUP_S = 20.0
WORDS = ("bread oven flour yeast crust dough butter sugar salt water morning evening order cake sourdough rye "
         "window street market price fresh warm slice loaf table coffee milk honey basket recipe baker").split()


# ---- workload ---------------------------------------------------------------------------------------------------
def workload(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """System prompts and requests (arrival offset, system prompt index, user text), seeded."""
    rng = random.Random(args.seed)
    systems = [f"System {k}: you are assistant number {k} of a bakery. " +
               " ".join(rng.choice(WORDS) for _ in range(args.system_words)) for k in range(args.system_prompts)]
    weights = [1.0 / (k + 1) for k in range(args.system_prompts)]  # Zipf(1) popularity, as the simulator's workload
    reqs, t = [], 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.duration:
            return systems, reqs
        user = f"Question {len(reqs)}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*args.user_words)))
        reqs.append({"arrival": t, "system": rng.choices(range(args.system_prompts), weights)[0], "user": user})


def messages(systems: list[str], r: dict) -> list[dict]:
    return [{"role": "system", "content": systems[r["system"]]}, {"role": "user", "content": r["user"]}]


# ---- calibration (child process) --------------------------------------------------------------------------------
def calibrate(path: Path, threads: int, wl_path: Path) -> None:
    import torch

    from inferd.bench.dataset import random_requests
    from inferd.llm import LLM
    from inferd.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(MODEL)
    tok = llm.tokenizer
    seed = os.getpid()
    llm.generate([r.prompt for r in random_requests(2, 32, 8, seed, tok, token_ids=True)],
                 SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    tpots: dict[int, list[float]] = {n: [] for n in DECODE_POINTS}
    prefill = []
    for p in range(PASSES):  # interleaved passes, medians (see _calibrate_http)
        for n in DECODE_POINTS:
            outs = llm.generate([r.prompt for r in random_requests(n, 16, 48, seed + 10 * p + n, tok,
                                                                   token_ids=True)],
                                SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
            tpots[n] += [o.metrics.tpot_s for o in outs]
        out = llm.generate([random_requests(1, 480, 1, seed + 100 + p, tok, token_ids=True)[0].prompt],
                           SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
        prefill.append(out.metrics.ttft_s)  # a fresh prompt: nothing from the prefix cache
    res: dict = {"decode": [(n, statistics.median(v)) for n, v in tpots.items()],
                 "prefill_480_s": statistics.median(prefill), "jitter": jitter_factors(tpots)}
    wl = json.loads(wl_path.read_text())  # the workload's token counts, with the server's own chat template
    res["system_tokens"] = [len(tok.encode_chat([{"role": "system", "content": s}], add_generation_prompt=False))
                            for s in wl["systems"]]
    res["prompt_tokens"] = [len(tok.encode_chat(messages(wl["systems"], r))) for r in wl["requests"]]
    path.write_text(json.dumps(res))


def calibrate_serve(path: Path, threads: int, wl_path: Path, out: Path, via_ray: bool = False) -> None:
    """The same figures through a single-process `inferd serve --threads N` (a replica's code path: the app, the
    async engine, SSE), measured by an HTTP client: TPOT at n concurrent streams and the TTFT of fresh 480-token
    prompts; workload token counts from its /tokenize."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(out / f"{path.stem}.log", "w") as log:
        how = (["--replicas", "1", "--replica-cpus", str(threads), "--ray-ingress", "separate"] if via_ray  # the
               else ["--threads", str(threads)])  # measured run's hops: proxy -> ingress -> replica
        proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--model", MODEL, "--port", str(port),
                                 *how], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"calibration server did not come up (see {out / (path.stem + '.log')})")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            res = asyncio.run(_calibrate_http(url, json.loads(wl_path.read_text())))
        finally:
            stop_server(proc, 60)
    path.write_text(json.dumps(res))


async def _calibrate_http(url: str, wl: dict) -> dict:
    rng = random.Random(os.getpid())

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(n))

    async with httpx.AsyncClient(timeout=600) as client:
        async def stream(content: str, max_tokens: int) -> dict:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            return await one(client, url, body, time.perf_counter(), 0.0)

        warm_until = time.monotonic() + WARMUP_S  # a fresh server decodes slower at first (first-touch of the KV
        while time.monotonic() < warm_until:  # pool, kernel caches); the replicas have been up longer than that
            await asyncio.gather(*(stream(f"warm-up {i}", 32) for i in range(4)))
        # interleaved passes, medians: the host's load swings 2x within seconds, a single pass per point is noise
        tpots: dict[int, list[float]] = {n: [] for n in DECODE_POINTS}
        prefill: list[float] = []
        short: list[tuple[int, float]] = []  # (prompt tokens, TTFT) of a fresh short prompt alone (the 1-stream pass)
        long_: list[tuple[int, float]] = []  # ... and of a fresh long one: the line through both gives the fixed
        for _ in range(PASSES):  # per-request latency (HTTP, routing hops) apart from the per-token prefill cost
            rows1: list[dict] = []
            for n in DECODE_POINTS:
                rows = await asyncio.gather(*(stream(words(12), 48) for _ in range(n)))
                tpots[n] += [r["tpot_s"] for r in rows]
                if n == 1:
                    rows1 = rows
            r = await stream(words(160), 1)  # a fresh prompt: nothing from the prefix cache
            prefill.append(r["ttft_s"] * 480 / r["prompt_tokens"])  # scaled to 480 tokens
            long_.append((r["prompt_tokens"], r["ttft_s"]))
            short.append((rows1[0]["prompt_tokens"], rows1[0]["ttft_s"]))
        # the fixed latency outside the engine (HTTP, routing hops): lone short requests' client TTFT minus the
        # engine's own (arrival at the engine to the first token, its /metrics histogram; through Ray the replicas
        # push it once a second, hence the pauses)
        await asyncio.sleep(METRICS_SETTLE_S)
        before = await asyncio.to_thread(engine_ttft, url)
        lone = [(await stream(words(12), 1))["ttft_s"] for _ in range(OUTSIDE_REQUESTS)]
        await asyncio.sleep(METRICS_SETTLE_S)
        after = await asyncio.to_thread(engine_ttft, url)
        seen = after[1] - before[1]
        outside = (statistics.fmean(lone) - (after[0] - before[0]) / seen) if seen == len(lone) else None
        decode = [(n, statistics.median(v)) for n, v in tpots.items()]
        passes = {n: [round(x * 1e3, 1) for x in v] for n, v in tpots.items()}
        count = []
        for m in [[{"role": "system", "content": x}] for x in wl["systems"]] + \
                 [messages(wl["systems"], r) for r in wl["requests"]]:
            gen = len(m) > 1
            count.append((await client.post(url + "/tokenize", json={"messages": m, "add_generation_prompt": gen}))
                         .json()["count"])
    k = len(wl["systems"])
    return {"decode": decode, "tpot_ms_per_pass": passes, "prefill_480_s": statistics.median(prefill),
            "jitter": jitter_factors(tpots),
            "ttft_short": [statistics.median(x[0] for x in short), statistics.median(x[1] for x in short)],
            "ttft_long": [statistics.median(x[0] for x in long_), statistics.median(x[1] for x in long_)],
            "outside_engine_s": outside,
            "system_tokens": count[:k],
            "prompt_tokens": count[k:]}


def jitter_factors(tpots: dict[int, list[float]]) -> list[float]:
    """The host's step-time variability as the simulator takes it (ServiceModel.step_jitter): every calibration
    request's TPOT over the median TPOT of its batch size (a ~48-step window each), pooled over the batch sizes."""
    return [round(x / statistics.median(v), 4) for v in tpots.values() if v for x in v]


def service_model(cals: list[dict], jitter: bool = True):
    """ServiceModel from the calibrators' figures (medians over the processes)."""
    from inferd.cluster.service_model import ServiceModel

    pts = [(n, statistics.median(c["decode"][i][1] for c in cals)) for i, (n, _) in enumerate(cals[0]["decode"])]
    xs, ys = [float(n) for n, _ in pts], [s for _, s in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    base = my - slope * mx
    prefill = statistics.median(c["prefill_480_s"] for c in cals)
    # TTFT of a fresh prompt alone = overhead + steps x base + tokens x per_tok (steps of the 256-token budget):
    # two prompt lengths give the fixed overhead and the per-token cost
    per_tok = 0.0
    if "ttft_short" in cals[0]:  # the HTTP calibrators (`offline` has no request path)
        (n_s, t_s), (n_l, t_l) = ([statistics.median(c[k][i] for c in cals) for i in (0, 1)]
                                  for k in ("ttft_short", "ttft_long"))
        steps = lambda n: -(-int(n) // 256)  # noqa: E731
        per_tok = (t_l - t_s - (steps(n_l) - steps(n_s)) * base) / max(n_l - n_s, 1)
    if per_tok <= 0:  # noisy host: fall back to the proportional fit, no separate overhead
        per_tok, overhead = max(1e-6, (prefill - 2 * base) / 480), 0.0
    else:
        overhead = max(0.0, t_s - steps(n_s) * base - n_s * per_tok)
    outside = [c["outside_engine_s"] for c in cals if c.get("outside_engine_s") is not None]
    if outside:  # measured directly (client TTFT minus the engine's): better than the two-point line's intercept
        overhead = max(0.0, statistics.median(outside))
    factors = tuple(sorted(f for c in cals for f in c.get("jitter", []))) if jitter else ()
    return ServiceModel(base_s=base, per_seq_s=max(0.0, slope), per_prefill_token_s=per_tok,
                        cache_tokens=1 << 20, request_overhead_s=overhead, step_jitter=factors), pts, prefill


# ---- the measured run ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_server(args: argparse.Namespace, out: Path) -> Iterator[str]:
    port = free_port()
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--model", MODEL, "--port", str(port),
                             "--replicas", "2", "--replica-cpus", str(args.replica_cpus), "--routing", args.routing],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"inferd serve exited with {proc.returncode} (see {out / 'serve.log'})")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(url + "/health", timeout=2).json().get("replicas") == 2:
                    break
            if time.time() > deadline:
                raise RuntimeError("the 2 replicas were not up after 600 s")
            time.sleep(0.5)
        yield url
    finally:
        stop_server(proc)
        log.close()


async def one(client: httpx.AsyncClient, url: str, body: dict, t0: float, arrival: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    usage: dict = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        replica = r.headers.get("x-inferd-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    n = usage.get("completion_tokens", 0)
    return {"arrival": arrival, "ttft_s": first - sent if first else None,
            "tpot_s": (last - first) / (n - 1) if first and n > 1 else None, "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "completion_tokens": n, "finish_s": (last or sent) - t0, "replica": replica}


async def drive(url: str, systems: list[str], reqs: list[dict], output_len: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        # warm-up: one request per replica's first use, prompts sharing nothing with the workload
        await asyncio.gather(*(client.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"warm-up {i}"}], "max_tokens": 4}) for i in range(4)))
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, url, {
            "messages": messages(systems, r), "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}, t0, r["arrival"]) for r in reqs))


# ---- comparison ---------------------------------------------------------------------------------------------
def stats(rows: list[dict], warmup: float, ci: bool = False) -> dict:
    """Percentiles of the requests that arrived after the warm-up; with `ci`, also each percentile's 90% bootstrap
    interval (2,000 resamples, seeded): how far a p99 of this many requests can move by chance alone."""
    from inferd.cluster.simulate import quantile

    kept = [r for r in rows if r["arrival"] >= warmup]
    ttft = sorted(r["ttft_s"] for r in kept if r["ttft_s"] is not None)
    tpot = sorted(r["tpot_s"] for r in kept if r["tpot_s"] is not None)
    span = max(r["finish_s"] for r in rows) - min(r["arrival"] for r in rows)
    res = {"requests": len(kept), "ttft_p50_ms": quantile(ttft, 0.5) * 1e3, "ttft_p99_ms": quantile(ttft, 0.99) * 1e3,
           "tpot_p50_ms": quantile(tpot, 0.5) * 1e3, "tpot_p99_ms": quantile(tpot, 0.99) * 1e3,
           "hit_rate": sum(r["cached_tokens"] for r in kept) / max(1, sum(r["prompt_tokens"] for r in kept)),
           "out_tok_s": sum(r["completion_tokens"] for r in rows) / span}
    if ci:
        rng = random.Random(0)
        for name, xs in (("ttft", ttft), ("tpot", tpot)):
            if not xs:
                continue
            for q, tag in ((0.5, "p50"), (0.99, "p99")):
                boot = sorted(quantile(sorted(rng.choices(xs, k=len(xs))), q) * 1e3 for _ in range(2000))
                res[f"{name}_{tag}_ms_ci90"] = (boot[100], boot[1899])
    return res


def window_ratios(real: list[dict], sim: list[dict], warmup: float, window_s: float = 10.0) -> list[float]:
    """Per window of arrivals, the median of measured/simulated TPOT over its requests (matched by arrival): how the
    host's speed drifted during the measured run against its calibration. Slow windows that the calibration did not
    see are what a time-independent service model cannot reproduce (they made the p99 tails of the loaded runs)."""
    by_arrival = {round(q["arrival"], 6): q for q in sim}
    out, t, end = [], warmup, max(r["arrival"] for r in real)
    while t <= end:
        rows = [r for r in real if t <= r["arrival"] < t + window_s and r["tpot_s"]
                and (by_arrival.get(round(r["arrival"], 6)) or {}).get("tpot_s")]  # both have a TPOT (> 1 token)
        if rows:
            out.append(statistics.median(r["tpot_s"] / by_arrival[round(r["arrival"], 6)]["tpot_s"] for r in rows))
        t += window_s
    return out


def simulated(svc, systems_tokens: list[int], prompt_tokens: list[int], reqs: list[dict], args) -> list[dict]:
    from inferd.cluster.router import RouterConfig
    from inferd.cluster.simulate import simulate
    from inferd.cluster.workload import SimRequest

    sim = [SimRequest(i, r["arrival"], [(hash((1, r["system"])), systems_tokens[r["system"]]),
                                        (hash((2, i)), prompt_tokens[i])], prompt_tokens[i], args.output_len,
                      hash((3, i))) for i, r in enumerate(reqs)]
    done: list = []
    simulate(2, None, RouterConfig(policy=args.routing, seed=args.seed), svc, args.duration, 0.0,
             requests=sim, on_finish=done.append)
    return [{"arrival": q.arrival, "ttft_s": q.first_token_s - q.arrival,
             "tpot_s": (q.finish_s - q.first_token_s) / (q.output_tokens - 1), "prompt_tokens": q.prompt_tokens,
             "cached_tokens": q.cached_tokens, "completion_tokens": q.output_tokens, "finish_s": q.finish_s}
            for q in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/sim_validate")
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
    ap.add_argument("--duration", type=float, default=80.0, help="seconds of arrivals")
    ap.add_argument("--warmup", type=float, default=10.0, help="arrivals before this are left out of the percentiles")
    ap.add_argument("--system-prompts", type=int, default=3)
    ap.add_argument("--system-words", type=int, default=220, help="words per system prompt (~1.1 tokens each)")
    ap.add_argument("--user-words", type=int, nargs=2, default=[10, 40])
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--routing", default="prefix", choices=["prefix", "least-loaded", "round-robin"])
    ap.add_argument("--replica-cpus", type=int, default=1)
    ap.add_argument("--calibrate-procs", type=int, default=2,
                    help="calibrators run at once; the default 2 shares the host as the measured run's two replicas "
                         "do (one calibrator alone on a 2-core host measures a replica faster than either of the run's: "
                         "its TPOT drift read 1.15-1.56x, against 0.82-1.03x with 2, docs/benchmarks.md)")
    ap.add_argument("--calibrate-after", action="store_true",
                    help="calibrate again after the measured run and use the medians of both (for a host whose load "
                         "drifts; adds ~1.5 min)")
    ap.add_argument("--calibrate-with", choices=["ray", "serve", "offline"], default="ray",
                    help="measure the service model through one Ray Serve replica (`inferd serve --replicas 1`), "
                         "a single-process `inferd serve`, or LLM.generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate-json", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--workload-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calibrate_json:
        if args.calibrate_with in ("serve", "ray"):
            calibrate_serve(Path(args.calibrate_json), args.replica_cpus, Path(args.workload_json),
                            Path(args.calibrate_json).parent, via_ray=args.calibrate_with == "ray")
        else:
            calibrate(Path(args.calibrate_json), args.replica_cpus, Path(args.workload_json))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems, reqs = workload(args)
    (out / "workload.json").write_text(json.dumps({"systems": systems, "requests": reqs}))

    def calibration(tag: str) -> list[dict]:
        print(f"calibrating {tag} ({args.calibrate_procs} process(es), {args.replica_cpus} thread(s) each)...",
              file=sys.stderr)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.replica_cpus)}  # what Ray gives a replica's process
        procs = [subprocess.Popen([sys.executable, __file__, "--replica-cpus", str(args.replica_cpus),
                                   "--calibrate-with", args.calibrate_with, "--calibrate-json", str(out / f"cal-{tag}{i}.json"), "--workload-json",
                                   str(out / "workload.json")], env=env) for i in range(args.calibrate_procs)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("calibration failed")
        return [json.loads((out / f"cal-{tag}{i}.json").read_text()) for i in range(args.calibrate_procs)]

    # before and after the measured run: the host's load drifts, and the two bracket the run
    cals = calibration("before")
    load0 = os.getloadavg()
    print(f"measuring: {len(reqs)} requests over {args.duration:.0f} s through 2 Ray Serve replicas...", file=sys.stderr)
    with ray_server(args, out) as url:
        real = asyncio.run(drive(url, systems, reqs, args.output_len))
    load1 = os.getloadavg()
    if args.calibrate_after:
        cals += calibration("after")
    svc, pts, prefill = service_model(cals)
    fixed, _, _ = service_model(cals, jitter=False)
    spread = svc.step_jitter
    print(f"service model: {svc.base_s * 1e3:.2f} ms + {svc.per_seq_s * 1e3:.3f} ms/seq + "
          f"{svc.per_prefill_token_s * 1e3:.4f} ms/prefill token, {svc.request_overhead_s * 1e3:.1f} ms per request "
          f"before its replica (TPOT points {pts}, 480-token prefill "
          f"{prefill * 1e3:.0f} ms; each calibration: {[c['decode'] for c in cals]}); step jitter: "
          f"{len(spread)} factors, p10/p50/p90/max "
          f"{'/'.join(f'{spread[int(q * (len(spread) - 1))]:.2f}' for q in (0.1, 0.5, 0.9, 1.0)) if spread else '-'}",
          file=sys.stderr)
    sim = simulated(svc, cals[0]["system_tokens"], cals[0]["prompt_tokens"], reqs, args)
    sim0 = simulated(fixed, cals[0]["system_tokens"], cals[0]["prompt_tokens"], reqs, args)
    r, s, s0 = stats(real, args.warmup, ci=True), stats(sim, args.warmup), stats(sim0, args.warmup)
    keys = [("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("tpot_p50_ms", "TPOT p50 ms"),
            ("tpot_p99_ms", "TPOT p99 ms"), ("hit_rate", "prefix hit rate"), ("out_tok_s", "output tok/s")]
    lines = ["| metric | measured (2 Ray replicas) | its 90% bootstrap interval | simulated | error | "
             "simulated, no step jitter | error |", "|---|---|---|---|---|---|---|"]
    for k, name in keys:
        fmt = "{:.2f}" if k == "hit_rate" else "{:.1f}"
        lo_hi = r.get(k + "_ci90")
        ci = f"{lo_hi[0]:.1f}–{lo_hi[1]:.1f}" if lo_hi else "-"
        lines.append(f"| {name} | {fmt.format(r[k])} | {ci} | {fmt.format(s[k])} | {(s[k] / r[k] - 1) * 100:+.0f}% | "
                     f"{fmt.format(s0[k])} | {(s0[k] / r[k] - 1) * 100:+.0f}% |")
    table = "\n".join(lines)
    drift = window_ratios(real, sim, args.warmup)
    replicas = sorted({x["replica"] for x in real})
    summary = {"args": {k: v for k, v in vars(args).items() if not k.endswith("_json")},
               "service_model": svc.__dict__, "tpot_points": pts, "calibrations": cals, "prefill_480_s": prefill,
               "measured": r, "simulated": s, "simulated_no_jitter": s0, "tpot_ratio_by_window": drift, "replicas_seen": replicas, "loadavg_before": load0,
               "loadavg_after": load1, "real": real, "sim": sim}
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{len(reqs)} requests ({r['requests']} after the {args.warmup:.0f} s warm-up) at {args.rate}/s; "
          f"replicas seen {len(replicas)}; load average {load0[0]:.1f} -> {load1[0]:.1f}\n{table}\n"
          f"host drift: measured/simulated TPOT per 10 s window of arrivals (median of its requests): "
          f"{' '.join(f'{x:.2f}' for x in drift)} (a steady host that the calibration describes gives ~1 throughout)")


if __name__ == "__main__":
    main()
