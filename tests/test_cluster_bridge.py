"""The pieces of the Ray Serve path that need no Ray: the in-process ASGI bridge and the metrics merge."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import generate_latest

from inferd.cluster.asgi_bridge import call_asgi
from inferd.cluster.metrics_merge import merge_prometheus
from inferd.server.metrics import Metrics


def _app() -> FastAPI:
    app = FastAPI()
    cancelled = []

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"got": body}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        return StreamingResponse(gen(), media_type="text/event-stream")

    app.state.cancelled = cancelled
    return app


def test_call_asgi_relays_status_headers_and_chunks_and_cancels_on_close():
    app = _app()

    async def run():
        msgs = [m async for m in call_asgi(app, "POST", "/echo", "", [("content-type", "application/json")],
                                           b'{"a": 1}', extra_headers=[("x-inferd-replica", "r1")])]
        assert msgs[0]["status"] == 200 and ["x-inferd-replica", "r1"] in msgs[0]["headers"]
        assert b"".join(m["body"] for m in msgs[1:]) == b'{"got":{"a":1}}'
        bad = [m async for m in call_asgi(app, "POST", "/echo", "", [("content-type", "application/json")], b"{")]
        assert bad[0]["status"] == 422
        gen = call_asgi(app, "GET", "/stream", "", [], b"")
        first = [await gen.__anext__() for _ in range(3)]
        assert first[0]["status"] == 200 and first[1]["body"].startswith(b"data: 0\n\n")
        await gen.aclose()  # the client went away: the app's task is cancelled
        await asyncio.sleep(0.05)
        assert app.state.cancelled == [True]

    asyncio.run(run())


def test_call_asgi_never_waits_for_more_chunks_but_sends_queued_ones_together():
    app = FastAPI()
    release = asyncio.Event()

    @app.get("/held")
    async def held() -> StreamingResponse:
        async def gen():
            yield "data: first\n\n"
            await release.wait()  # the app holds the next token until the client has the first one
            for i in range(5):  # then five at once, queued before the bridge runs again
                yield f"data: {i}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def run():
        gen = call_asgi(app, "GET", "/held", "", [], b"")
        assert (await gen.__anext__())["status"] == 200
        # no batching delay: the first chunk comes while the app is still waiting (a bridge that waited for
        # company would time out here)
        assert (await asyncio.wait_for(gen.__anext__(), 5))["body"] == b"data: first\n\n"
        release.set()
        rest = [m["body"] async for m in gen]
        assert b"".join(rest) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
        assert len(rest) == 1  # what was already queued went on as one message

    asyncio.run(run())


def test_merge_prometheus_sums_replicas():
    a, b = Metrics(), Metrics()
    a.add_model("m")
    b.add_model("m")
    a.prefix_hits.labels("m").inc(3)
    b.prefix_hits.labels("m").inc(4)
    a.ttft.labels("m").observe(0.1)
    b.ttft.labels("m").observe(0.3)
    a.kv_usage.labels("m").set(0.2)
    b.kv_usage.labels("m").set(0.4)
    text = merge_prometheus([generate_latest(a.registry).decode(), generate_latest(b.registry).decode()])
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert float(lines["inferd_replicas"]) == 2
    assert float(lines['vllm:prefix_cache_hits_total{model_name="m"}']) == 7
    assert float(lines['vllm:time_to_first_token_seconds_count{model_name="m"}']) == 2
    assert abs(float(lines['vllm:kv_cache_usage_perc{model_name="m"}']) - 0.3) < 1e-9  # averaged, not summed
    assert not any("_created" in k for k in lines)
