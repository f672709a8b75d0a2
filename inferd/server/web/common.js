// Shared by the chat page and the dashboard: the API key (kept in sessionStorage, asked for when the server
// wants one) and fetch() with the key attached.
const KEY_ITEM = "inferd.apiKey";

export class AuthError extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch() an API path with the key; a 401 forgets the key and throws AuthError, other errors throw Error
// with the server's message.
export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), ...authHeaders() };
  if (options.body && !headers["Content-Type"]) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    throw new AuthError("the API key was not accepted");
  }
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp;
}

export async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

// Before the first API call: if the server wants a key and none is stored, ask for it; then check it against
// `probe` (an API path) and ask again while it is refused.
export async function ensureKey(probe) {
  const cfg = await (await fetch("/ui/config")).json();
  if (!cfg.api_key_required) return cfg;
  let message = "";
  for (;;) {
    if (!apiKey()) {
      const key = await askKey(message);
      sessionStorage.setItem(KEY_ITEM, key);
    }
    try {
      await api(probe);
      return cfg;
    } catch (err) {
      if (!(err instanceof AuthError)) throw err;
      message = "That key was not accepted; try again.";
    }
  }
}

function askKey(message) {
  const dialog = document.getElementById("key-dialog");
  const input = dialog.querySelector("input");
  dialog.querySelector(".error").textContent = message;
  input.value = "";
  dialog.showModal();
  input.focus();
  return new Promise((resolve) => {
    dialog.querySelector("form").onsubmit = (ev) => {
      ev.preventDefault();
      if (!input.value) return;
      dialog.close();
      resolve(input.value);
    };
  });
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

// Numbers for people: 1234 → "1,234", 0.000123 → "0.000123", null → "–".
export function fmt(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtUsd(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "$0";
  if (Math.abs(x) >= 0.01) return `$${x.toFixed(2)}`;
  return `$${x.toPrecision(2)}`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  if (n === 0) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
}

// A duration given in ms: "12.3 ms", "850 ms", "4.29 s".
export function fmtMs(x) {
  if (x === null || x === undefined) return "–";
  if (x >= 1000) return `${fmt(x / 1000, 2)} s`;
  return `${fmt(x, x < 10 ? 2 : 0)} ms`;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
