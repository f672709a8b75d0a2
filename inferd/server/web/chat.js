// The chat page: model picker, settings, streaming chat with Stop, conversations in localStorage,
// copy-as-curl, per-answer usage and speed; "compare texts" (/v1/score) for embedding models.
import { api, AuthError, el, ensureKey, fmt, fmtMs, fmtUsd, apiKey } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const STORE = "inferd.conversations";
const SETTINGS = "inferd.chatSettings";
const FIELDS = ["system", "temperature", "top-p", "max-tokens", "seed", "extra", "json-schema"];

let conversations = load(STORE, []);
let current = null; // the conversation on screen
let controller = null; // AbortController of the request in flight
let lastRequest = load("inferd.lastRequest", null); // { path, body } of the last request sent, for copy-as-curl
let models = []; // [{ id, kind, status }]

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
}

function showError(message) {
  $("error").textContent = message || "";
}

// ---- models -------------------------------------------------------------------------------------
async function loadModels() {
  const [list, stats] = await Promise.all([api("/v1/models").then((r) => r.json()),
    api("/stats").then((r) => r.json())]);
  const kinds = Object.fromEntries(stats.models.map((m) => [m.name, m.kind]));
  models = list.data.map((m) => ({ id: m.id, kind: kinds[m.root] || "chat", status: m.status }));
  const select = $("model");
  select.replaceChildren();
  for (const [kind, label] of [["chat", "Chat"], ["embedding", "Embeddings: compare texts"]]) {
    const of = models.filter((m) => m.kind === kind);
    if (!of.length) continue;
    const group = el("optgroup", { label });
    for (const m of of) {
      group.append(el("option", { value: m.id }, m.status === "ready" ? m.id : `${m.id} (${m.status})`));
    }
    select.append(group);
  }
  const saved = localStorage.getItem("inferd.model");
  if (models.some((m) => m.id === saved)) select.value = saved;
  onModelChange();
  if (models.some((m) => m.status === "loading")) {  // the port opens before the models load: look again soon
    setTimeout(() => loadModels().catch((err) => showError(err.message)), 2000);
  }
}

function selectedModel() {
  return models.find((m) => m.id === $("model").value);
}

function onModelChange() {
  const m = selectedModel();
  if (!m) return;
  localStorage.setItem("inferd.model", m.id);
  const embedding = m.kind === "embedding";
  for (const id of ["messages", "composer", "settings"]) $(id).classList.toggle("hidden", embedding);
  $("compare").classList.toggle("hidden", !embedding);
}

// ---- settings -----------------------------------------------------------------------------------
function restoreSettings() {
  const s = load(SETTINGS, {});
  for (const id of FIELDS) if (s[id] !== undefined) $(id).value = s[id];
  $("json-mode").checked = Boolean(s["json-mode"]);
  $("json-schema-box").classList.toggle("hidden", !$("json-mode").checked);
}

function saveSettings() {
  const s = Object.fromEntries(FIELDS.map((id) => [id, $(id).value]));
  s["json-mode"] = $("json-mode").checked;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
  $("json-schema-box").classList.toggle("hidden", !$("json-mode").checked);
}

function requestBody(history) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of history) if (m.content) messages.push({ role: m.role, content: m.content });
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const num = (id, parse) => ($(id).value === "" ? undefined : parse($(id).value));
  body.temperature = num("temperature", parseFloat);
  body.top_p = num("top-p", parseFloat);
  body.max_tokens = num("max-tokens", (v) => parseInt(v, 10));
  body.seed = num("seed", (v) => parseInt(v, 10));
  if ($("json-mode").checked) {
    let schema;
    try {
      schema = JSON.parse($("json-schema").value);
    } catch (err) {
      throw new Error(`the JSON schema is not valid JSON: ${err.message}`);
    }
    body.response_format = { type: "json_schema", json_schema: { name: "response", schema, strict: true } };
  }
  if ($("extra").value.trim()) {
    let extra;
    try {
      extra = JSON.parse($("extra").value);
    } catch (err) {
      throw new Error(`the extra request fields are not valid JSON: ${err.message}`);
    }
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
      throw new Error("the extra request fields must be a JSON object");
    }
    Object.assign(body, extra);
  }
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

// ---- conversations ------------------------------------------------------------------------------
function newConversation() {
  current = { id: `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`, title: "New chat",
    messages: [], updated: Date.now() };
  renderAll();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const li = el("li", { class: current && c.id === current.id ? "active" : "" },
      el("button", { class: "open", type: "button", title: c.title, onclick: () => { current = c; renderAll(); } },
        c.title),
      el("button", { class: "del", type: "button", "aria-label": `delete ${c.title}`, onclick: () => remove(c) },
        "✕"));
    list.append(li);
  }
}

function remove(c) {
  conversations = conversations.filter((x) => x.id !== c.id);
  save();
  if (current && current.id === c.id) newConversation();
  else renderConversations();
}

function renderAll() {
  renderConversations();
  const box = $("messages");
  box.replaceChildren();
  if (!current.messages.length) {
    box.append(el("p", { class: "empty" }, "Send a message to start. Enter sends, Shift+Enter adds a line."));
  }
  for (const m of current.messages) box.append(messageNode(m));
  box.scrollTop = box.scrollHeight;
}

function messageNode(m) {
  const node = el("div", { class: `msg ${m.role}` }, el("div", { class: "content" }, m.content));
  if (m.role === "assistant") {
    const stats = el("div", { class: "stats" });
    fillStats(stats, m);
    node.append(stats);
  }
  return node;
}

function stat(name, label, value) {
  const b = el("b", {}, value);
  return el("span", { "data-stat": name }, `${label} `, b);
}

function fillStats(box, m) {
  box.replaceChildren();
  const s = m.stats || {};
  if (m.error) box.append(el("span", { class: "error" }, m.error));
  if (m.streaming) {
    box.append(stat("live", "streaming", `${s.chunks || 0} chunks · ~${fmt(s.live_tps)} tok/s`));
    return;
  }
  if (s.stopped) box.append(el("span", { "data-stat": "stopped" }, "stopped"));
  if (s.prompt_tokens === undefined) {
    if (s.client_ttft_ms !== undefined) box.append(stat("ttft", "TTFT", fmtMs(s.client_ttft_ms)));
    return;
  }
  const prefillMs = s.ttft_ms - (s.queue_ms || 0);
  const computed = s.prompt_tokens - (s.cached_tokens || 0);
  const cached = s.cached_tokens ? ` (${s.cached_tokens} cached)` : "";
  box.append(
    stat("prompt_tokens", "prompt", `${s.prompt_tokens} tok${cached}`),
    stat("completion_tokens", "output", `${s.completion_tokens} tok`),
    stat("ttft", "TTFT", fmtMs(s.ttft_ms)),
    stat("prompt_tps", "prompt", `${fmt(prefillMs > 0 ? computed / (prefillMs / 1000) : null, 0)} tok/s`),
    stat("generation_tps", "generation", `${fmt(s.tpot_ms ? 1000 / s.tpot_ms : null, 1)} tok/s`),
    stat("cost", "cost", fmtUsd(s.cost_usd)),
  );
  if (s.finish_reason === "length") box.append(el("span", { "data-stat": "finish" }, "hit max tokens"));
}

// ---- sending ------------------------------------------------------------------------------------
async function send() {
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  showError("");
  let body;
  try {
    body = requestBody([...current.messages, { role: "user", content: text }]);
  } catch (err) {
    showError(err.message);
    return;
  }
  if (!conversations.includes(current)) conversations.push(current);
  if (current.title === "New chat") current.title = text.trim().slice(0, 48);
  current.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "", streaming: true, stats: { chunks: 0 } };
  current.messages.push(answer);
  current.updated = Date.now();
  $("prompt").value = "";
  renderAll();
  const node = $("messages").lastElementChild;
  const contentBox = node.querySelector(".content");
  const statsBox = node.querySelector(".stats");
  remember({ path: "/v1/chat/completions", body });
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null;
  try {
    const resp = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
      signal: controller.signal });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const obj = JSON.parse(line.slice(6));
          if (obj.error) throw new Error(obj.error.message);
          const choice = obj.choices && obj.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            const now = performance.now();
            if (first === null) {
              first = now;
              answer.stats.client_ttft_ms = now - t0;
            }
            answer.content += choice.delta.content;
            answer.stats.chunks += 1;
            answer.stats.live_tps = now > first ? (answer.stats.chunks - 1) / ((now - first) / 1000) : null;
            contentBox.textContent = answer.content;
            fillStats(statsBox, answer);
            $("messages").scrollTop = $("messages").scrollHeight;
          }
          if (choice && choice.finish_reason) answer.stats.finish_reason = choice.finish_reason;
          if (obj.usage) Object.assign(answer.stats, usageStats(obj.usage));
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      answer.stats.stopped = true;
    } else {
      answer.error = err.message;
      showError(err.message);
      if (err instanceof AuthError) ensureKey("/v1/models").catch((e) => showError(e.message));
    }
  } finally {
    controller = null;
    delete answer.streaming;
    delete answer.stats.live_tps;
    setBusy(false);
    fillStats(statsBox, answer);
    current.updated = Date.now();
    save();
    renderConversations();
  }
}

function usageStats(u) {
  const x = u.inferd || {};
  return { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens,
    cached_tokens: (u.prompt_tokens_details || {}).cached_tokens || 0,
    ttft_ms: x.ttft_ms, queue_ms: x.queue_ms, tpot_ms: x.tpot_ms, cost_usd: x.cost_usd };
}

function remember(req) {
  lastRequest = req;
  localStorage.setItem("inferd.lastRequest", JSON.stringify(req));
  $("copy-curl").disabled = false;
}

function setBusy(busy) {
  $("send").classList.toggle("hidden", busy);
  $("stop").classList.toggle("hidden", !busy);
  if (!busy) $("prompt").focus();
}

function stop() {
  if (controller) controller.abort();
}

// ---- copy as curl ---------------------------------------------------------------------------------
function curlCommand(req) {
  const quoted = JSON.stringify(req.body, null, 2).replaceAll("'", "'\\''");
  const lines = [`curl ${location.origin}${req.path}`, `  -H "Content-Type: application/json"`];
  if (apiKey()) lines.push(`  -H "Authorization: Bearer $INFERD_API_KEY"`);
  lines.push(`  -d '${quoted}'`);
  return lines.join(" \\\n");
}

async function copyCurl() {
  if (!lastRequest) return;
  const text = curlCommand(lastRequest);
  $("curl-text").value = text;
  let status = "Copied to the clipboard.";
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    status = "Select the command and copy it (this page cannot reach the clipboard).";
  }
  if (apiKey()) status += " Set INFERD_API_KEY to your key first.";
  $("curl-status").textContent = status;
  $("curl-dialog").showModal();
  $("curl-text").select();
}

// ---- compare texts (embedding models) -------------------------------------------------------------
async function compare() {
  showError("");
  const documents = $("documents").value.split("\n").map((s) => s.trim()).filter(Boolean);
  // texts longer than the model's window are cut to it (vLLM's -1: the model's maximum), not refused
  const body = { model: $("model").value, query: $("query").value, documents, truncate_prompt_tokens: -1 };
  remember({ path: "/v1/score", body });
  try {
    const out = await (await api("/v1/score", { method: "POST", body: JSON.stringify(body) })).json();
    $("scores").replaceChildren(...out.results.map((r) =>
      el("li", {}, el("b", {}, r.relevance_score.toFixed(3)), ` ${r.document}`)));
  } catch (err) {
    showError(err.message);
  }
}

// ---- start ----------------------------------------------------------------------------------------
function wire() {
  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("model").addEventListener("change", onModelChange);
  $("copy-curl").addEventListener("click", copyCurl);
  $("curl-close").addEventListener("click", () => $("curl-dialog").close());
  $("compare-run").addEventListener("click", compare);
  for (const id of [...FIELDS, "json-mode"]) $(id).addEventListener("change", saveSettings);
}

async function main() {
  wire();
  restoreSettings();
  $("copy-curl").disabled = !lastRequest;
  const latest = [...conversations].sort((a, b) => b.updated - a.updated)[0];
  if (latest) {
    current = latest;
    renderAll();
  } else {
    newConversation();
  }
  try {
    await ensureKey("/v1/models");
    await loadModels();
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
  }
  document.body.dataset.ready = "1";
}

main();
