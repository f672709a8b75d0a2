"""Run one HTTP request through an ASGI app in-process and hand its response on as messages: how a Ray Serve replica
serves the single-process inferd app (same routes, validation, error bodies and SSE streams) to the ingress.

Messages: first {"status": int, "headers": [[name, value], ...]}, then {"body": bytes} per chunk the app sends.
Closing the generator early (the client went away) cancels the app's task, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


async def call_asgi(app: Callable, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes, extra_headers: list[tuple[str, str]] | None = None) -> AsyncIterator[dict[str, Any]]:
    queue: asyncio.Queue = asyncio.Queue()
    body_sent = False
    hang = asyncio.Event()  # never set: after the body the client just stays connected

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method.upper(),
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, send))
    done_marker = object()
    task.add_done_callback(lambda _: queue.put_nowait(done_marker))
    pending: Any = None
    try:
        while True:
            msg, pending = (pending, None) if pending is not None else (await queue.get(), None)
            if msg is done_marker:
                task.result()  # re-raise what the app raised
                return
            if msg["type"] == "http.response.start":
                hdrs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in msg.get("headers", [])]
                yield {"status": msg["status"], "headers": hdrs + [list(h) for h in extra_headers or []]}
            elif msg["type"] == "http.response.body":
                body, more = msg.get("body", b""), msg.get("more_body", False)
                # chunks the app has already queued go on as one message (fewer hops per token while the consumer
                # is behind); never a wait for more: no batching delay
                while more and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is done_marker or nxt["type"] != "http.response.body":
                        pending = nxt
                        break
                    body += nxt.get("body", b"")
                    more = nxt.get("more_body", False)
                if body:
                    yield {"body": body}
                if not more:
                    return
    finally:
        if not task.done():
            task.cancel()
