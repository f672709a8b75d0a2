"""The web page in a real browser (Debian's headless Chromium driven by Playwright) against a real `inferd serve`
with tiny models, and /stats over plain HTTP.

Screenshots of both pages go to a temp folder (INFERD_SCREENSHOTS=DIR to keep them: the README's come from
`python benchmarks/webui_screenshots.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_utils import run_server

KEY = "webui-test-key"
CHROMIUM = os.environ.get("INFERD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
_MISSING = ("playwright is not installed (pip install playwright; the test extra has it)"
            if importlib.util.find_spec("playwright") is None else
            "no chromium executable (apt-get install chromium, or set INFERD_CHROMIUM)" if CHROMIUM is None else None)
needs_browser = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def metric(url: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(cond, timeout: float = 15, what: str = "condition", context=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} {context()}")


# ---- servers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_hf, tiny_bert):
    with run_server("--model", str(tiny_hf), "--model", str(tiny_bert), "--dtype", "float32",
                    "--kv-cache-memory", "0.05", "--price-per-hour", "3.6", "--api-key", KEY) as s:
        yield s


AUTH = {"Authorization": f"Bearer {KEY}"}


def get_stats(url: str) -> dict:
    r = httpx.get(url + "/stats", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def chat(url: str, model: str, **body) -> dict:
    headers = AUTH
    r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "Hello"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- the rolling window, with a fake clock -------------------------------------------------------------
def test_recent_window_percentiles_and_expiry():
    from inferd.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from inferd.server.stats import RecentWindow, percentile

    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 95) == 4.0
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    now = [1000.2]
    w = RecentWindow(window_s=60, clock=lambda: now[0])

    def out(rid: str, n_new: int, finished: bool, ttft: float = 0.1, reason: str = "length") -> RequestOutput:
        co = CompletionOutput(0, "", list(range(7)), delta_token_ids=list(range(n_new)),
                              finish_reason=reason if finished else None)
        return RequestOutput(rid, [1, 2, 3], [co], finished, metrics=RequestMetrics(ttft_s=ttft, tpot_s=0.01,
                                                                                     compute_s=0.5))

    w.on_output("m", out("a", 3, False))
    now[0] = 1001.5
    w.on_output("m", out("a", 4, True))
    w.on_output("m", out("b", 2, True, ttft=0.3, reason="abort"))
    now[0] = 1002.1
    done, per_sec = w.snapshot("m")
    assert len(per_sec) == 60 and per_sec[-2:] == [3, 6] and sum(per_sec) == 9
    assert [(d.output_tokens, d.prompt_tokens, d.aborted) for d in done] == [(7, 3, False), (7, 3, True)]
    now[0] = 1061.6  # "a" and "b" finished 60.1 s ago: out; the tokens of second 1000 too
    w.on_output("m", out("c", 1, True, ttft=0.2))
    done, per_sec = w.snapshot("m")
    assert [d.ttft_s for d in done] == [0.2] and sum(per_sec) == 6  # 1001..1060 shown; 1061 not over yet
    assert w.snapshot("other") == ([], [0] * 60)


# ---- /stats over plain HTTP (no browser needed) -------------------------------------------------------
def test_stats_fields_move_with_traffic(server, tiny_hf, tiny_bert):
    s0 = get_stats(server.url)
    assert s0["object"] == "stats" and s0["window_s"] == 60 and s0["price_per_hour"] == 3.6
    chat0 = next(m for m in s0["models"] if m["name"] == tiny_hf.name)
    emb0 = next(m for m in s0["models"] if m["name"] == tiny_bert.name)
    assert chat0["kind"] == "chat" and emb0["kind"] == "embedding" and chat0["status"] == "ready"
    assert len(chat0["output_tokens_per_s_history"]) == 60
    assert chat0["memory"]["weight_bytes"] > 0 and chat0["memory"]["kv_cache_bytes_max"] > 0
    assert chat0["quantization"] == "none" and chat0["dtype"] == "float32" and chat0["max_model_len"] > 0
    assert emb0["memory"]["weight_bytes"] > 0 and emb0["dim"] > 0

    out = chat(server.url, tiny_hf.name, max_tokens=12, temperature=0, ignore_eos=True)
    for _ in range(2):  # the same text twice: the second is an embedding cache hit
        r = httpx.post(server.url + "/v1/embeddings", headers=AUTH, json={"model": tiny_bert.name, "input": "cache me"})
        assert r.status_code == 200
    s1 = get_stats(server.url)
    chat1 = next(m for m in s1["models"] if m["name"] == tiny_hf.name)
    emb1 = next(m for m in s1["models"] if m["name"] == tiny_bert.name)
    lm0, lm1 = chat0["last_minute"], chat1["last_minute"]
    assert lm1["requests"] == lm0["requests"] + 1
    assert lm1["output_tokens"] == lm0["output_tokens"] + 12
    assert lm1["prompt_tokens"] == lm0["prompt_tokens"] + out["usage"]["prompt_tokens"]
    assert lm1["ttft_ms"]["p50"] > 0 and lm1["ttft_ms"]["p95"] >= lm1["ttft_ms"]["p50"]
    assert lm1["tpot_ms"]["p50"] > 0 and lm1["tpot_ms"]["p95"] >= lm1["tpot_ms"]["p50"]
    assert lm1["cost_usd"] > lm0["cost_usd"] and lm1["cost_usd_per_hour"] == pytest.approx(lm1["cost_usd"] * 60)
    assert lm1["cost_usd_per_1m_tokens"] > 0
    assert chat1["totals"]["output_tokens"] == chat0["totals"]["output_tokens"] + 12
    # /stats agrees with /metrics (both read the same counters)
    assert chat1["totals"]["output_tokens"] == metric(server.url, "vllm:generation_tokens_total")
    hits = emb1["embedding_cache"]["hits"] - emb0["embedding_cache"]["hits"]
    misses = emb1["embedding_cache"]["misses"] - emb0["embedding_cache"]["misses"]
    assert (hits, misses) == (1, 1) and 0 < emb1["embedding_cache"]["hit_rate"] <= 1
    # the tokens land in the per-second history once their second is over
    wait_for(lambda: sum(next(m for m in get_stats(server.url)["models"]
                              if m["name"] == tiny_hf.name)["output_tokens_per_s_history"]) >= 12,
             what="tokens in the sparkline history")


def test_no_webui_keeps_stats():
    from fastapi.testclient import TestClient

    from inferd.cli import build_parser
    from inferd.server.app import build_app
    from inferd.server.state import ServerState

    args = build_parser().parse_args(["serve", "--no-webui"])
    assert args.no_webui is True
    for pages in (True, False):
        client = TestClient(build_app(ServerState(api_key=KEY), webui_pages=pages))
        for path in ("/", "/dashboard", "/ui/chat.js", "/ui/style.css", "/ui/config"):
            r = client.get(path)  # open without the key when served; 404 when switched off
            assert r.status_code == (200 if pages else 404), (path, pages, r.status_code)
        if pages:
            assert client.get("/ui/config").json()["api_key_required"] is True
            assert "text/html" in client.get("/").headers["content-type"]
        assert client.get("/stats").status_code == 401  # an API route: the key is needed
        r = client.get("/stats", headers=AUTH)
        assert r.status_code == 200 and r.json()["object"] == "stats" and r.json()["models"] == []


# ---- the browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    pw = sync_api.sync_playwright().start()
    try:  # a chromium that is there but does not start is an error, not a skip
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    except BaseException:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    keep = os.environ.get("INFERD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("screenshots")


class Page:
    """A fresh browser context (its own localStorage) and page, recording console errors and page errors."""

    def __init__(self, browser, key: str | None = KEY, width: int = 1280, height: int = 800):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if key:  # as if the key had been entered in this tab (test_api_key_flow enters it)
            self.context.add_init_script(f"sessionStorage.setItem('inferd.apiKey', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.set_default_timeout(20000)

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready='1']")


@pytest.fixture
def page(browser) -> Iterator[Page]:
    p = Page(browser)
    yield p
    p.context.close()
    assert p.errors == [], f"console errors: {p.errors}"


def fits_width(pg) -> bool:
    return pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def answers(pg) -> list[str]:
    return pg.locator(".msg.assistant .content").all_inner_texts()


def set_field(pg, selector: str, value: str) -> None:
    pg.fill(selector, value)
    pg.dispatch_event(selector, "change")


@needs_browser
def test_chat_streams_and_shows_usage(server, tiny_hf, page, shots):
    pg = page.page
    page.open(server.url + "/")
    assert pg.input_value("#model") == tiny_hf.name  # the chat model is picked first
    set_field(pg, "#temperature", "0")
    set_field(pg, "#max-tokens", "24")
    set_field(pg, "#system", "You are terse.")
    # Shift+Enter is a new line, Enter sends
    pg.click("#prompt")
    pg.keyboard.type("The capital of France")
    pg.keyboard.press("Shift+Enter")
    pg.keyboard.type("is")
    assert pg.input_value("#prompt") == "The capital of France\nis" and not answers(pg)
    pg.keyboard.press("Enter")
    pg.wait_for_selector(".msg.assistant [data-stat='completion_tokens']")
    # the same request without the browser (temperature 0): the streamed text is the answer
    ref = chat(server.url, tiny_hf.name, temperature=0, max_tokens=24, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "The capital of France\nis"}])
    assert answers(pg) == [ref["choices"][0]["message"]["content"]] and answers(pg)[0]
    stats = {k: pg.inner_text(f".msg.assistant [data-stat='{k}'] b") for k in
             ("prompt_tokens", "completion_tokens", "ttft", "prompt_tps", "generation_tps", "cost")}
    assert stats["prompt_tokens"].startswith(f"{ref['usage']['prompt_tokens']} tok")
    assert stats["completion_tokens"] == f"{ref['usage']['completion_tokens']} tok"
    assert re.fullmatch(r"[\d.,]+ m?s", stats["ttft"]) and re.fullmatch(r"\$[\d.e-]+", stats["cost"])
    assert stats["cost"] != "$0"
    assert stats["prompt_tps"].endswith("tok/s") and stats["generation_tps"].endswith("tok/s")
    assert "–" not in stats["generation_tps"] + stats["prompt_tps"]
    # it was streamed: the answer arrived in several chunks; and the conversation is in localStorage
    convs = json.loads(pg.evaluate("localStorage.getItem('inferd.conversations')"))
    assert len(convs) == 1 and convs[0]["messages"][1]["stats"]["chunks"] > 1
    assert convs[0]["title"].startswith("The capital of France")
    assert fits_width(pg)
    pg.screenshot(path=str(shots / "chat.png"))
    # a reload keeps the conversation
    page.open(server.url + "/")
    assert answers(pg) == [ref["choices"][0]["message"]["content"]]
    assert pg.locator("#conversations li").count() == 1
    # copy as curl: the command is the request the page sent
    pg.click("#copy-curl")
    text = pg.input_value("#curl-text")
    assert text.startswith(f"curl {server.url}/v1/chat/completions")
    body = json.loads(text.split("-d '", 1)[1].rstrip("'"))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 24 and body["temperature"] == 0 and body["messages"][0]["role"] == "system"
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answers(pg)[0]
    pg.click("#curl-close")
    # a phone-sized viewport still fits, and dark mode follows the system
    pg.set_viewport_size({"width": 390, "height": 844})
    assert fits_width(pg)
    light = pg.evaluate("getComputedStyle(document.body).backgroundColor")
    pg.emulate_media(color_scheme="dark")
    assert pg.evaluate("getComputedStyle(document.body).backgroundColor") != light
    pg.screenshot(path=str(shots / "chat-phone-dark.png"))


@needs_browser
def test_stop_aborts_on_the_server(server, tiny_hf, page):
    prompt = "Tell me a long story"
    pg = page.page
    page.open(server.url + "/")
    set_field(pg, "#temperature", "0")
    set_field(pg, "#max-tokens", "460")  # the tiny model has 512 positions
    set_field(pg, "#extra", '{"ignore_eos": true}')  # extra fields go into the request: 460 tokens, no early end
    aborted0 = metric(server.url, "vllm:request_success_total", 'finished_reason="abort"')
    # Stop is clicked from inside the page as soon as the first text shows (a click from here could come after
    # the tiny model has finished on a busy machine)
    pg.evaluate("""() => new MutationObserver((_, obs) => {
        const c = document.querySelector('.msg.assistant .content');
        if (!c || !c.textContent) return;
        obs.disconnect();
        window.stopShown = !document.getElementById('stop').classList.contains('hidden');
        window.sendHidden = document.getElementById('send').classList.contains('hidden');
        document.getElementById('stop').click();
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true})""")
    pg.fill("#prompt", prompt)
    pg.click("#send")
    pg.wait_for_selector(".msg.assistant [data-stat='stopped']")
    assert pg.evaluate("[window.stopShown, window.sendHidden]") == [True, True]
    assert pg.is_visible("#send") and not pg.is_visible("#stop")
    wait_for(lambda: metric(server.url, "vllm:request_success_total", 'finished_reason="abort"') > aborted0,
             what="the server to count the abort",
             context=lambda: [x for x in httpx.get(server.url + "/metrics").text.splitlines() if "success_total" in x])
    assert metric(server.url, "vllm:request_success_total", 'finished_reason="abort"') == aborted0 + 1
    wait_for(lambda: metric(server.url, "vllm:num_requests_running") == 0, what="no request running")
    partial = answers(pg)[0]
    assert 0 < len(partial)
    time.sleep(0.3)
    assert answers(pg)[0] == partial  # nothing arrives after Stop


@needs_browser
def test_json_schema_mode_and_compare_panel(server, tiny_hf, tiny_bert, page):
    pg = page.page
    page.open(server.url + "/")
    sent: list[dict] = []
    pg.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
          else None)
    pg.check("#json-mode")
    pg.dispatch_event("#json-mode", "change")
    set_field(pg, "#max-tokens", "4")
    pg.fill("#prompt", "Answer in JSON")
    pg.click("#send")
    pg.wait_for_selector(".msg.assistant [data-stat='completion_tokens']")
    rf = sent[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["answer"]
    # an invalid schema is caught on the page, before any request
    set_field(pg, "#json-schema", "{not json")
    pg.fill("#prompt", "again")
    pg.click("#send")
    assert "not valid JSON" in pg.inner_text("#error") and len(sent) == 1
    # an embedding model gets the compare-texts panel (POST /v1/score)
    pg.select_option("#model", tiny_bert.name)
    assert pg.is_visible("#compare") and not pg.is_visible("#composer")
    pg.click("#compare-run")
    pg.wait_for_selector("#scores li")
    assert pg.locator("#scores li").count() == 3


@needs_browser
def test_dashboard_moves_with_traffic(server, tiny_hf, tiny_bert, page, shots):
    pg = page.page
    page.open(server.url + "/dashboard")
    section = f"section[data-model='{tiny_hf.name}']"
    pg.wait_for_selector(f"{section} [data-metric='totals']")
    before = pg.inner_text(f"{section} [data-metric='totals'] .v")
    assert pg.is_visible(f"section[data-model='{tiny_bert.name}'] [data-metric='embedding_cache']")
    for _ in range(3):
        chat(server.url, tiny_hf.name, max_tokens=40, temperature=0, ignore_eos=True)
    # within a few polls: totals changed, the last minute's latencies are filled, tokens/s moved
    pg.wait_for_function(f"document.querySelector(\"{section} [data-metric='totals'] .v\").textContent !== "
                         f"{json.dumps(before)}")
    pg.wait_for_function(f"parseFloat(document.querySelector(\"{section} [data-metric='tokens_per_s'] .v\")"
                         ".textContent) > 0")
    ttft = pg.inner_text(f"{section} [data-metric='ttft'] .v")
    assert re.fullmatch(r"[\d.,]+ m?s / [\d.,]+ m?s", ttft), ttft
    assert "$" in pg.inner_text(f"{section} [data-metric='cost_per_hour'] .v")
    assert pg.inner_text(f"{section} [data-metric='memory'] .s").startswith("none · float32")
    points = pg.get_attribute(f"{section} [data-metric='tokens_per_s'] polyline", "points").split()
    assert len(points) == 60
    assert fits_width(pg)
    pg.screenshot(path=str(shots / "dashboard.png"), full_page=True)
    pg.set_viewport_size({"width": 390, "height": 844})
    assert fits_width(pg)


@needs_browser
def test_api_key_flow(server, tiny_hf, browser):
    p = Page(browser, key=None)
    try:
        pg = p.page
        pg.goto(server.url + "/")  # the page itself needs no key ...
        pg.wait_for_selector("#key-dialog[open]")  # ... and asks for one before any API call
        pg.fill("#api-key", "wrong")
        pg.click("#key-dialog button[type=submit]")
        pg.wait_for_function("document.querySelector('#key-dialog .error').textContent.includes('not accepted')")
        assert pg.is_visible("#key-dialog")
        pg.fill("#api-key", KEY)
        pg.click("#key-dialog button[type=submit]")
        pg.wait_for_selector("body[data-ready='1']")
        assert not pg.is_visible("#key-dialog")
        assert pg.evaluate("sessionStorage.getItem('inferd.apiKey')") == KEY
        assert pg.evaluate("localStorage.getItem('inferd.apiKey')") is None
        assert pg.input_value("#model") == tiny_hf.name
        set_field(pg, "#max-tokens", "6")
        pg.fill("#prompt", "Hello")
        pg.click("#send")
        pg.wait_for_selector(".msg.assistant [data-stat='completion_tokens']")
        pg.click("#copy-curl")
        assert 'Authorization: Bearer $INFERD_API_KEY' in pg.input_value("#curl-text")
        assert KEY not in pg.input_value("#curl-text")
        pg.click("#curl-close")
        # the same tab keeps the key for the dashboard
        pg.goto(server.url + "/dashboard")
        pg.wait_for_selector(f"section[data-model='{tiny_hf.name}'] [data-metric='totals']")
        assert not pg.is_visible("#key-dialog")
    finally:
        p.context.close()
    # the only console errors: the browser's report of the wrong key's 401
    assert all("401" in e for e in p.errors), p.errors
