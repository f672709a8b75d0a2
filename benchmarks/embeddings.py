"""Embedding throughput: inferd's Embedder (default settings) vs sentence-transformers, side by side in one run,
on 1,000 seeded texts of 10–200 words at batch sizes 1 / 32 / 128; the cosine of our vectors to
sentence-transformers' fp32 ones; and p50/p99 latency of single requests from 16 concurrent clients through
`inferd serve`.

    python benchmarks/embeddings.py --peer-python /path/to/env-with-sentence-transformers/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her an this are which be or have not had "
         "inference model server token latency throughput cost memory cache batch request search ranking user "
         "order package delivery refund account password login error crash update version feature support "
         "quick brown fox jumps over lazy dog river mountain city street market price stock weather").split()

PEER = r"""
import json, sys, time, numpy as np, torch
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1])); path = sys.argv[2]
m = SentenceTransformer(sys.argv[3], device="cpu")
res = {}
m.encode(texts[:64], batch_size=32)
for bs in (1, 32, 128):
    n = 200 if bs == 1 else len(texts)
    t = time.perf_counter(); m.encode(texts[:n], batch_size=bs); res[bs] = n / (time.perf_counter() - t)
np.save(path, m.encode(texts, batch_size=32, normalize_embeddings=False))
print(json.dumps(res))
"""


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200))) for _ in range(n)]


def bench_inferd(texts: list[str], quantization: str = "auto") -> tuple[dict[int, float], np.ndarray]:
    from inferd import Embedder

    e = Embedder("all-minilm-l6-v2", cache_size=0, quantization=quantization)
    e.embed(texts[:64])
    res = {}
    for bs in (1, 32, 128):
        n = 200 if bs == 1 else len(texts)
        t = time.perf_counter()
        for i in range(0, n, bs):
            e.embed(texts[i : i + bs])
        res[bs] = n / (time.perf_counter() - t)
    return res, e.embed(texts)


async def server_latency(texts: list[str], clients: int = 16, n: int = 400) -> dict[str, float]:
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.server_utils import run_server

    lat: list[float] = []
    with run_server("--model", "all-minilm-l6-v2") as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            await c.post("/v1/embeddings", json={"input": texts[:8], "model": "all-minilm-l6-v2"})
            queue = list(range(n))

            async def client() -> None:
                while queue:
                    i = queue.pop()
                    t = time.perf_counter()
                    r = await c.post("/v1/embeddings", json={"input": texts[i % len(texts)] + f" #{i}",
                                                              "model": "all-minilm-l6-v2"})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            wall = time.perf_counter() - t0
        s.proc.send_signal(signal.SIGTERM)
    arr = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "requests_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--num-texts", type=int, default=1000)
    ap.add_argument("--quantization", nargs="+", default=["auto"], choices=["auto", "none", "int8"],
                    help="inferd settings to measure, each in its own column (the first is compared to the peer)")
    ap.add_argument("--no-server", action="store_true", help="skip the HTTP latency part")
    args = ap.parse_args()
    from inferd.hardware import machine_info
    from inferd.loader.hub import resolve

    print(f"# {time.strftime('%Y-%m-%d')}  {machine_info()}")
    texts = make_texts(args.num_texts)
    runs = {q: bench_inferd(texts, q) for q in args.quantization}
    peer = None
    ref = None
    if args.peer_python:
        with tempfile.TemporaryDirectory() as d:
            tp = Path(d) / "t.json"
            tp.write_text(json.dumps(texts))
            out = subprocess.run([args.peer_python, "-c", PEER, str(tp), str(Path(d) / "v.npy"),
                                  str(resolve("all-minilm-l6-v2"))], capture_output=True, text=True, check=True)
            peer = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
            ref = np.load(Path(d) / "v.npy")
    for q, (_, vecs) in runs.items():
        if ref is not None:
            cos = (vecs * ref).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
            print(f"-q {q}: cosine to sentence-transformers fp32: min {cos.min():.6f}, mean {cos.mean():.6f}")
    cols = " | ".join(f"inferd -q {q} texts/s" for q in runs)
    print(f"| batch | {cols} | sentence-transformers texts/s | ratio (-q {args.quantization[0]}) |")
    print("|---|" + "---|" * (len(runs) + 2))
    for bs in (1, 32, 128):
        p = peer[bs] if peer else None
        ours = [r[bs] for r, _ in runs.values()]
        vals = " | ".join(f"{v:.1f}" for v in ours)
        print(f"| {bs} | {vals} | {p and f'{p:.1f}' or '-'} | {p and f'{ours[0] / p:.2f}x' or '-'} |")
    if args.no_server:
        return
    lat = asyncio.run(server_latency(texts))
    print(f"server, 16 concurrent clients, single-text requests: p50 {lat['p50_ms']:.1f} ms, p99 "
          f"{lat['p99_ms']:.1f} ms, {lat['requests_per_s']:.1f} req/s")


if __name__ == "__main__":
    main()
