"""Take the README's screenshots of the web UI: `inferd serve` on the default models (SmolLM2-135M + MiniLM),
a short chat in the browser (Debian's Chromium driven by Playwright), some traffic, then the dashboard.

    python scripts/webui_screenshots.py [--out docs] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_utils import run_server  # noqa: E402

QUESTION = "In two sentences: why does batching make LLM inference cheaper?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--chromium", default=shutil.which("chromium"))
    ap.add_argument("--price-per-hour", type=float, default=0.5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with run_server("--price-per-hour", str(args.price_per_hour), timeout=300) as s, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        for _ in range(2):  # warm up (the first requests of a fresh process are slower than the rest)
            httpx.post(s.url + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16})
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#system", "You are a concise assistant.")
        page.dispatch_event("#system", "change")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant [data-stat='completion_tokens']", timeout=120000)
        page.screenshot(path=str(out / "webui-chat.png"))

        def one(i: int) -> None:  # background traffic for the dashboard: 8 streams of varied prompts
            httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "system", "content": "You are a concise assistant."},
                             {"role": "user", "content": f"Give me {i + 2} tips for writing clear docs."}],
                "max_tokens": 160})

        dash = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        dash.goto(s.url + "/dashboard")
        dash.wait_for_selector("body[data-ready='1']")
        for text in ("hello", "hello", "good morning"):  # embedding cache: one hit
            httpx.post(s.url + "/v1/embeddings", json={"input": text}, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            dash.wait_for_timeout(6000)  # mid-traffic: streams running, a few seconds of the sparkline
            dash.screenshot(path=str(out / "webui-dashboard.png"), full_page=True)
            for f in futures:
                f.result()
        browser.close()
    print(f"wrote {out / 'webui-chat.png'} and {out / 'webui-dashboard.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
