// The Sandpit console. Served as a file (the CSP allows no inline script).
// The API key lives in this tab's session storage; it goes out only as an
// `Authorization: Bearer` header on fetches and as the first message of a
// websocket, never in a URL. Text from the server is shown with
// textContent, never parsed as HTML.
"use strict";

const KEY = "sandpit.console.key";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

let key = sessionStorage.getItem(KEY);
let rows = [];
let selected = null;
let refreshTimer = null;
let logSocket = null;
let term = null;
let fit = null;
let termSocket = null;

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + key };
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized("unknown API key");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// ------------------------------------------------------------------ login

function showLogin(message) {
  stopRefresh();
  closeDetail();
  $("app").hidden = true;
  $("whoami").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("key").focus();
}

async function signIn(candidate) {
  key = candidate;
  try {
    const me = await api("/api/whoami");
    sessionStorage.setItem(KEY, key);
    $("principal").textContent = me.principal;
    $("whoami").hidden = false;
    $("login").hidden = true;
    $("app").hidden = false;
    $("key").value = "";
    await refresh();
    startRefresh();
  } catch (e) {
    key = null;
    sessionStorage.removeItem(KEY);
    showLogin(e instanceof Unauthorized ? "This key is not accepted." : "Sign-in failed: " + e.message);
  }
}

function signOut() {
  key = null;
  sessionStorage.removeItem(KEY);
  showLogin("");
}

// ------------------------------------------------------------------ table

function quantityCpu(m) {
  return m == null ? "" : m % 1000 === 0 ? String(m / 1000) : m + "m";
}

function quantityMemory(b) {
  if (b == null) return "";
  for (const [unit, size] of [["Gi", 1 << 30], ["Mi", 1 << 20], ["Ki", 1 << 10]]) {
    if (b >= size && b % size === 0) return b / size + unit;
  }
  return String(b);
}

function resources(req, lim, format) {
  const r = format(req), l = format(lim);
  if (!r && !l) return "";
  return (r || "-") + " / " + (l || "-");
}

function age(ms) {
  if (ms == null) return "";
  let s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function matchesText(row, text) {
  if (!text) return true;
  const hay = [row.id, row.image, row.display_name, row.state, ...row.tags].join(" ").toLowerCase();
  return text.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function render() {
  const text = $("filter-text").value.trim();
  const body = $("sandboxes").tBodies[0];
  const shown = rows.filter((r) => matchesText(r, text));
  body.replaceChildren();
  for (const r of shown) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    tr.dataset.state = r.state;
    if (selected && selected.id === r.id) tr.classList.add("selected");
    cell(tr, r.id, "id");
    cell(tr, r.state, "state state-" + r.state).title = r.reason || "";
    cell(tr, r.image, "image");
    const tags = cell(tr, "", "tags");
    for (const t of r.tags) {
      const span = document.createElement("span");
      span.className = "tag";
      span.textContent = t;
      tags.appendChild(span);
    }
    cell(tr, resources(r.requests.cpu_millis, r.limits.cpu_millis, quantityCpu), "cpu");
    cell(tr, resources(r.requests.memory_bytes, r.limits.memory_bytes, quantityMemory), "memory");
    cell(tr, r.created_ms == null ? "" : new Date(r.created_ms).toLocaleString(), "created");
    cell(tr, age(r.created_ms), "age");
    tr.addEventListener("click", () => openDetail(r.id));
    body.appendChild(tr);
  }
  $("count").textContent = shown.length + " of " + rows.length + " sandbox" + (rows.length === 1 ? "" : "es");
  document.body.dataset.listed = String(Date.now());
  if (selected) {
    const now = rows.find((r) => r.id === selected.id);
    if (now) showMeta(now);
  }
}

async function refresh() {
  const params = new URLSearchParams();
  params.set("state", $("filter-state").value);
  const tag = $("filter-tag").value.trim();
  if (tag) params.set("tag", tag);
  try {
    const body = await api("/api/sandboxes?" + params.toString());
    rows = body.sandboxes;
    $("list-error").textContent = body.truncated ? "showing the newest 1000" : "";
    render();
  } catch (e) {
    if (e instanceof Unauthorized) return signOut();
    $("list-error").textContent = e.message;
  }
}

function startRefresh() {
  stopRefresh();
  refreshTimer = setInterval(refresh, REFRESH_MS);
}

function stopRefresh() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
}

// ------------------------------------------------------------------ detail

function showMeta(r) {
  selected = r;
  $("detail-id").textContent = r.id;
  const st = $("detail-state");
  st.textContent = r.state;
  st.className = "state state-" + r.state;
  const parts = [r.image];
  if (r.display_name) parts.push(r.display_name);
  if (r.reason) parts.push(r.reason);
  if (r.exit_code != null) parts.push("exit " + r.exit_code);
  $("detail-meta").textContent = parts.join(" \u00b7 ");
}

function openDetail(id) {
  const r = rows.find((x) => x.id === id);
  if (!r) return;
  if (selected && selected.id === id && !$("detail").hidden) return;
  closeDetail();
  showMeta(r);
  $("detail").hidden = false;
  render();
  followLogs(id);
}

function closeDetail() {
  if (logSocket) logSocket.close();
  logSocket = null;
  closeTerminal();
  selected = null;
  $("detail").hidden = true;
  $("logs").textContent = "";
}

function socketUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

// Opens a websocket and sends the key first; `onData` gets output bytes,
// `onEvent` the server's JSON events.
function openSocket(path, hello, onData, onEvent) {
  const ws = new WebSocket(socketUrl(path));
  ws.binaryType = "arraybuffer";
  ws.addEventListener("open", () => ws.send(JSON.stringify({ key, ...hello })));
  ws.addEventListener("message", (m) => {
    if (typeof m.data === "string") onEvent(JSON.parse(m.data));
    else onData(new Uint8Array(m.data));
  });
  return ws;
}

function followLogs(id) {
  const pre = $("logs");
  const status = $("logs-status");
  const decoder = new TextDecoder();
  status.textContent = "connecting";
  const ws = openSocket("/api/ws/logs", { sandbox_id: id }, (bytes) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(decoder.decode(bytes, { stream: true }));
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }, (ev) => {
    if (ev.type === "ready") status.textContent = "following";
    else if (ev.type === "end") status.textContent = "ended";
    else if (ev.type === "error") status.textContent = "error: " + ev.message;
  });
  ws.addEventListener("close", () => {
    if (status.textContent === "following" || status.textContent === "connecting") status.textContent = "disconnected";
  });
  logSocket = ws;
}

// ------------------------------------------------------------------ terminal

function ensureTerminal() {
  if (term) return term;
  term = new Terminal({ cursorBlink: true, convertEol: false, fontSize: 14, scrollback: 2000 });
  fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("terminal"));
  fit.fit();
  const encoder = new TextEncoder();
  term.onData((d) => {
    if (termSocket && termSocket.readyState === WebSocket.OPEN) termSocket.send(encoder.encode(d));
  });
  term.onResize(({ cols, rows }) => {
    if (termSocket && termSocket.readyState === WebSocket.OPEN) termSocket.send(JSON.stringify({ resize: [cols, rows] }));
  });
  window.addEventListener("resize", () => fit.fit());
  return term;
}

function openTerminal(command) {
  if (!selected) return;
  closeTerminal();
  const t = ensureTerminal();
  t.reset();
  fit.fit();
  const status = $("term-status");
  status.textContent = "connecting";
  const argv = command.trim().split(/\s+/).filter(Boolean);
  termSocket = openSocket("/api/ws/terminal", { sandbox_id: selected.id, command: argv, cols: t.cols, rows: t.rows },
    (bytes) => t.write(bytes),
    (ev) => {
      if (ev.type === "ready") { status.textContent = "connected"; t.focus(); }
      else if (ev.type === "exit") status.textContent = "exited with " + ev.code;
      else if (ev.type === "error") status.textContent = "error: " + ev.message;
    });
  const mine = termSocket;
  mine.addEventListener("close", () => {
    if (status.textContent === "connected" || status.textContent === "connecting") status.textContent = "disconnected";
    if (termSocket === mine) termSocket = null;
  });
}

function closeTerminal() {
  if (termSocket) termSocket.close();
  termSocket = null;
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("key").value.trim());
  });
  $("logout").addEventListener("click", signOut);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("filter-state").addEventListener("change", refresh);
  $("filter-tag").addEventListener("input", refresh);
  $("filter-text").addEventListener("input", render);
  $("close-detail").addEventListener("click", () => { closeDetail(); render(); });
  $("stop").addEventListener("click", async () => {
    if (!selected) return;
    const id = selected.id;
    $("detail-state").textContent = "stopping";
    try {
      await api("/api/sandboxes/" + encodeURIComponent(id) + "/stop", { method: "POST" });
    } catch (e) {
      $("detail-meta").textContent = "stop failed: " + e.message;
    }
    refresh();
  });
  $("term-form").addEventListener("submit", (e) => {
    e.preventDefault();
    openTerminal($("term-command").value || "sh");
  });
  $("term-stop").addEventListener("click", closeTerminal);
  if (key) signIn(key);
  else showLogin("");
});
