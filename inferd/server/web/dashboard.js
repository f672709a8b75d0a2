// The dashboard: polls /stats every second and draws it (per model: load, speed, latency, caches, cost,
// memory). No chart library: the sparkline is one SVG polyline.
import { api, AuthError, el, ensureKey, fmt, fmtBytes, fmtMs, fmtUsd } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;

function card(name, label, value, sub = "", extra = null) {
  const c = el("div", { class: "card", "data-metric": name },
    el("div", { class: "k" }, label), el("div", { class: "v" }, value));
  if (sub) c.append(el("div", { class: "s" }, sub));
  if (extra) c.append(extra);
  return c;
}

function pct(x) {
  return x === null || x === undefined ? "–" : `${fmt(x * 100, 1)}%`;
}

const ms = fmtMs;

function sparkline(values) {
  const w = 240, h = 48;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `output tokens per second over the last minute, peak ${fmt(max, 0)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

function bar(fraction) {
  return el("div", { class: "bar" }, el("div", { style: `width: ${Math.min(100, (fraction || 0) * 100)}%` }));
}

function chatModel(m) {
  const lm = m.last_minute;
  const mem = m.memory;
  return [
    card("running", "Requests running / waiting", `${m.requests_running} / ${m.requests_waiting}`,
      `${lm.requests} finished in the last minute, ${lm.aborted} aborted`),
    card("tokens_per_s", "Output tokens/s", fmt(m.output_tokens_per_s, 1), "last 60 s",
      sparkline(m.output_tokens_per_s_history)),
    card("ttft", "TTFT p50 / p95", `${ms(lm.ttft_ms.p50)} / ${ms(lm.ttft_ms.p95)}`, "last minute"),
    card("tpot", "TPOT p50 / p95", `${ms(lm.tpot_ms.p50)} / ${ms(lm.tpot_ms.p95)}`,
      lm.tpot_ms.p50 ? `≈ ${fmt(1000 / lm.tpot_ms.p50, 1)} tok/s per stream` : "last minute"),
    card("kv_cache", "KV cache usage", pct(m.kv_cache_usage),
      `${fmtBytes(mem.kv_cache_bytes_used)} of ${fmtBytes(mem.kv_cache_bytes_max)}`, bar(m.kv_cache_usage)),
    card("prefix_cache", "Prefix cache hit rate", pct(m.prefix_cache.hit_rate),
      `${fmt(m.prefix_cache.hits, 0)} of ${fmt(m.prefix_cache.queries, 0)} prompt tokens`),
    card("cost_per_hour", "Cost per hour", fmtUsd(lm.cost_usd_per_hour),
      `at the last minute's load (busy ${pct(lm.busy)})`),
    card("cost_per_1m", "Cost per 1M tokens", fmtUsd(lm.cost_usd_per_1m_tokens ?? m.totals.cost_usd_per_1m_tokens),
      lm.cost_usd_per_1m_tokens !== null ? "last minute, prompt + output" : "since start, prompt + output"),
    card("totals", "Tokens since start", fmt(m.totals.prompt_tokens + m.totals.output_tokens, 0),
      `${fmt(m.totals.requests, 0)} requests · ${fmtUsd(m.totals.cost_usd)}`),
    card("memory", "Weights", fmtBytes(mem.weight_bytes), `${m.quantization} · ${m.dtype} · ${m.device}`),
  ];
}

function embeddingModel(m) {
  const c = m.embedding_cache;
  return [
    card("embedding_cache", "Embedding cache hit rate", pct(c.hit_rate), `${fmt(c.hits, 0)} hits, ${fmt(c.misses, 0)} misses`),
    card("memory", "Weights", fmtBytes(m.memory.weight_bytes), `${m.dtype} · ${m.device} · ${m.dim} dims`),
  ];
}

function render(s) {
  const chat = s.models.filter((m) => m.kind === "chat" && m.status === "ready");
  const total = (f) => chat.reduce((a, m) => a + f(m), 0);
  $("server").replaceChildren(
    card("server_tokens_per_s", "Output tokens/s, all models", fmt(total((m) => m.output_tokens_per_s), 1)),
    card("server_running", "Requests running / waiting",
      `${total((m) => m.requests_running)} / ${total((m) => m.requests_waiting)}`),
    card("server_cost_per_hour", "Cost per hour, all models",
      fmtUsd(total((m) => m.last_minute.cost_usd_per_hour)),
      s.price_per_hour ? `machine price ${fmtUsd(s.price_per_hour)}/h` : "set --price-per-hour to see cost"),
    card("server_models", "Models", `${s.models.filter((m) => m.status === "ready").length} / ${s.models.length}`,
      s.draining ? "draining" : "ready / configured"),
  );
  $("models").replaceChildren(...s.models.map((m) => {
    const title = el("h2", {}, m.name, el("span", { class: "tag" }, m.kind),
      m.status !== "ready" ? el("span", { class: "tag" }, m.status) : "");
    if (m.quantization && m.quantization !== "none") title.append(el("span", { class: "tag" }, m.quantization));
    const cards = m.status !== "ready" ? [] : m.kind === "chat" ? chatModel(m) : embeddingModel(m);
    return el("section", { class: "model", "data-model": m.name }, title, el("div", { class: "cards" }, ...cards));
  }));
  $("updated").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
}

async function poll() {
  try {
    const s = await (await api("/stats")).json();
    render(s);
    $("error").textContent = "";
    document.body.dataset.ready = "1";
  } catch (err) {
    $("error").textContent = `cannot read /stats: ${err.message}`;
    if (err instanceof AuthError) await ensureKey("/stats");
  }
  setTimeout(poll, POLL_MS);
}

async function main() {
  try {
    await ensureKey("/stats");
  } catch (err) {
    $("error").textContent = `cannot reach the server: ${err.message}`;
  }
  poll();
}

main();
