// The chat page of `edgellm serve`: conversations kept in localStorage, answers streamed from
// POST /v1/chat/completions (server-sent events), a Stop button that aborts the request (the
// server cancels the generation when the connection closes), and the runtime panel fed by
// GET /v1/edgellm/stats (docs/SERVER.md). Plain browser JavaScript, no build step.
"use strict";

const STORE = "edgellm.conversations";
const CURRENT = "edgellm.current";
const SETTINGS = "edgellm.settings";
const KEY = "edgellm.apiKey";
const DEFAULTS = { temperature: 0.8, top_p: 0.95, max_tokens: null, system: "" };
const POLL_MS = 250; // stats polling while an answer streams
const MEM_SAMPLES = 120;

const $ = (id) => document.getElementById(id);

let conversations = load(STORE, []);
let settings = Object.assign({}, DEFAULTS, load(SETTINGS, {}));
let current = null;
let busy = null; // the answer being streamed: {controller, msg, el, t0, tFirst, tLast, pieces}
let pollTimer = null;
const memHistory = [];

function load(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v === null || v === undefined ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    localStorage.setItem(CURRENT, current ? current.id : "");
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  } catch (e) {
    notice("Could not save the conversations in this browser: " + e.message);
  }
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

// ---------------------------------------------------------------------------------------------
// Formatting

// Bytes in GB/MB/kB (decimal, as runtime/plan.py's human()); with `like`, the number only, in
// the unit `like` would get ("3.58" of "5.00 MB").
function fmtBytes(n, like) {
  if (n === null || n === undefined || !isFinite(n)) return "\u2013";
  const scale = like === undefined ? n : like;
  for (const [unit, f] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (Math.abs(scale) >= f) return (n / f).toFixed(2) + (like === undefined ? " " + unit : "");
  }
  return String(Math.round(n)) + (like === undefined ? " B" : "");
}

function fmtRate(r) {
  return r === null || r === undefined || !isFinite(r) || r <= 0 ? "\u2013" : r.toFixed(1) + " tok/s";
}

function fmtMs(ms) {
  return ms === null || ms === undefined ? "\u2013" : Math.round(ms) + " ms";
}

// ---------------------------------------------------------------------------------------------
// Conversations

function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: "", system: settings.system || "", messages: [], updated: Date.now() };
}

function select(conv) {
  if (busy) {
    notice("Stop the answer first.");
    return;
  }
  notice("");
  current = conv;
  $("system").value = current.system || "";
  save();
  renderList();
  renderMessages();
  const last = [...current.messages].reverse().find((m) => m.role === "assistant" && m.stats);
  showAnswer(last ? last.stats : null);
  document.body.classList.remove("show-sidebar");
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const conv of conversations) {
    const li = document.createElement("li");
    if (conv === current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title || "(empty)";
    open.addEventListener("click", () => select(conv));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete icon";
    del.title = "Delete this conversation";
    del.textContent = "\u00d7";
    del.addEventListener("click", () => {
      if (busy && conv === current) return;
      conversations = conversations.filter((c) => c !== conv);
      if (conv === current) current = newConversation();
      save();
      select(current);
    });
    li.append(open, del);
    ul.appendChild(li);
  }
}

function messageEl(m) {
  const el = document.createElement("div");
  el.className = "msg " + m.role;
  const body = document.createElement("div");
  body.className = "body";
  el.appendChild(body);
  const meta = document.createElement("div");
  meta.className = "meta";
  el.appendChild(meta);
  fillMessage(el, m);
  return el;
}

function fillMessage(el, m) {
  const body = el.querySelector(".body");
  if (m.role === "assistant") body.innerHTML = renderMarkdown(m.content); // escapes first
  else body.textContent = m.content;
  const meta = el.querySelector(".meta");
  const parts = [];
  if (m.stats) {
    const s = m.stats;
    parts.push("first token " + fmtMs(s.ttft_ms), "prefill " + fmtRate(s.prefill_tps),
      "decode " + fmtRate(s.decode_tps));
    if (s.completion_tokens) parts.push(s.completion_tokens + " tokens");
  }
  if (m.stopped) parts.push("stopped");
  else if (m.stats && m.stats.finish_reason) parts.push(m.stats.finish_reason);
  meta.textContent = parts.join(" \u00b7 ");
  meta.hidden = !parts.length;
  el.classList.toggle("stopped", !!m.stopped);
  let err = el.querySelector(".error");
  if (m.error) {
    if (!err) {
      err = document.createElement("div");
      err.className = "error";
      el.appendChild(err);
    }
    err.textContent = m.error;
  } else if (err) {
    err.remove();
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...current.messages.map(messageEl));
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// The API

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function apiError(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) {
    /* not JSON: keep the status line */
  }
  if (resp.status === 401) {
    openSettings(true);
    $("api-key").focus();
    message += " \u2014 enter the server's API key under Settings.";
  }
  return new Error(message);
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

function requestBody() {
  const messages = [];
  if (current.system && current.system.trim()) messages.push({ role: "system", content: current.system });
  for (const m of current.messages) {
    if (m === busy.msg) continue;
    if (m.role === "assistant" && !m.content) continue; // an answer that failed before any text
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const num = (v) => (v === null || v === "" || v === undefined || isNaN(Number(v)) ? null : Number(v));
  if (num(settings.temperature) !== null) body.temperature = num(settings.temperature);
  if (num(settings.top_p) !== null) body.top_p = num(settings.top_p);
  if (num(settings.max_tokens) !== null) body.max_tokens = Math.round(num(settings.max_tokens));
  return body;
}

// Reads the server-sent events of a streamed chat completion; onEvent gets each parsed object.
// True when the stream ended with [DONE], false when the connection closed before it.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return true;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (busy || !text.trim()) return;
  notice("");
  if (!conversations.includes(current)) conversations.unshift(current);
  if (!current.title) current.title = text.trim().slice(0, 60);
  current.updated = Date.now();
  current.messages.push({ role: "user", content: text });
  const msg = { role: "assistant", content: "" };
  current.messages.push(msg);
  save();
  renderList();
  const box = $("messages");
  box.appendChild(messageEl(current.messages[current.messages.length - 2]));
  const el = messageEl(msg);
  el.classList.add("streaming");
  box.appendChild(el);
  box.scrollTop = box.scrollHeight;

  busy = { controller: new AbortController(), msg, el, t0: performance.now(), tFirst: null,
    tLast: null, pieces: 0, usage: null, finish: null, drawing: false };
  setBusy(true);
  showAnswer({ live: true });
  startPolling();
  const b = busy;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: b.controller.signal,
    });
    if (!resp.ok) throw await apiError(resp);
    const complete = await readEvents(resp, (obj) => {
      if (obj.error) throw new Error(obj.error.message || "the server reported an error");
      if (obj.usage) b.usage = obj.usage;
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      const piece = choice.delta && choice.delta.content;
      if (piece) onPiece(b, piece);
      if (choice.finish_reason) b.finish = choice.finish_reason;
    });
    if (!complete) throw new Error("the connection closed before the answer ended");
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = e.message || String(e);
  }
  stopPolling();
  msg.stats = clientStats(b);
  busy = null;
  setBusy(false);
  await serverStats(msg.stats, !!msg.stopped);
  el.classList.remove("streaming");
  fillMessage(el, msg);
  showAnswer(msg.stats);
  current.updated = Date.now();
  save();
}

function onPiece(b, piece) {
  const now = performance.now();
  if (b.tFirst === null) b.tFirst = now;
  b.tLast = now;
  b.pieces += 1;
  b.msg.content += piece;
  if (!b.drawing) { // one redraw per frame however fast the pieces come
    b.drawing = true;
    requestAnimationFrame(() => {
      b.drawing = false;
      const box = $("messages");
      const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      b.el.querySelector(".body").innerHTML = renderMarkdown(b.msg.content);
      if (atEnd) box.scrollTop = box.scrollHeight;
      if (busy === b) showAnswer(clientStats(b)); // once it has ended, send() shows the final figures
    });
  }
}

// What the page itself measured: time to first token (from sending, so it includes waiting in
// the server's queue) and the decode rate from the pieces' arrival times.
function clientStats(b) {
  const n = b.usage ? b.usage.completion_tokens : b.pieces;
  const span = b.tFirst !== null && b.tLast > b.tFirst ? (b.tLast - b.tFirst) / 1000 : 0;
  return {
    ttft_ms: b.tFirst !== null ? b.tFirst - b.t0 : null,
    decode_tps: span && n > 1 ? (n - 1) / span : null,
    prefill_tps: b.prefill || null,
    completion_tokens: n,
    prompt_tokens: b.usage ? b.usage.prompt_tokens : null,
    cached_tokens: b.usage && b.usage.prompt_tokens_details ? b.usage.prompt_tokens_details.cached_tokens : null,
    finish_reason: b.finish,
    source: "page",
  };
}

// The server's own prefill and decode rates for this answer, when its latest generation is this
// one (same token count; another client's request could have run since).
async function serverStats(stats, stopped) {
  let st;
  try {
    st = await getJSON("v1/edgellm/stats");
  } catch (e) {
    return;
  }
  updatePanel(st);
  const g = st.last;
  if (!g) return;
  const ours = stopped ? g.state === "stopped" : g.state === "done" && g.completion_tokens === stats.completion_tokens;
  if (!ours) return;
  stats.prefill_tps = g.prefill_tokens_per_s;
  if (g.decode_tokens_per_s) stats.decode_tps = g.decode_tokens_per_s;
  if (stopped) stats.completion_tokens = g.completion_tokens;
  stats.source = "server";
}

// ---------------------------------------------------------------------------------------------
// The runtime panel

function showAnswer(s) {
  s = s || {};
  $("ttft").textContent = fmtMs(s.ttft_ms);
  $("prefill").textContent = fmtRate(s.prefill_tps);
  $("decode").textContent = fmtRate(s.decode_tps);
  $("tokens").textContent = s.completion_tokens ? String(s.completion_tokens) : "\u2013";
}

function startPolling() {
  stopPolling();
  const tick = async () => {
    try {
      updatePanel(await getJSON("v1/edgellm/stats"));
    } catch (e) {
      /* the next tick tries again; an answer's own errors show on the answer */
    }
    if (pollTimer !== null) pollTimer = setTimeout(tick, POLL_MS);
  };
  pollTimer = setTimeout(tick, 0);
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

function updatePanel(st) {
  $("rss").textContent = fmtBytes(st.memory.rss_bytes);
  $("kv").textContent = fmtBytes(st.memory.kv_cache_bytes);
  // the server's prefill rate, once the prompt of the answer this page is streaming has run
  if (busy && st.last && st.last.state === "running" && st.last.prefill_tokens_per_s) {
    busy.prefill = st.last.prefill_tokens_per_s;
    $("prefill").textContent = fmtRate(busy.prefill);
  }
  const f = st.flash;
  $("flash").hidden = !f;
  $("no-flash").hidden = !!f;
  if (!f) return;
  $("flash-mode").textContent = "(" + f.mode + " mode)";
  const decode = f.steps.slice(Math.max(0, f.decode_from_step - f.first_step));
  const steps = decode.length ? decode : f.steps;
  const perToken = steps.map((s) => (s.tokens ? s.bytes_read / s.tokens : null));
  const hits = steps.map((s) => (s.neurons_active ? s.hits / s.neurons_active : null));
  const lastRead = perToken.length ? perToken[perToken.length - 1] : null;
  $("bytes-last").textContent = fmtBytes(lastRead);
  $("bytes-per-token").textContent = fmtBytes(f.bytes_read_per_token);
  $("hit-rate").textContent = f.hit_rate === null ? "none (" + f.mode + " mode)"
    : (100 * f.hit_rate).toFixed(1) + " %";
  $("hits-figure").hidden = f.hit_rate === null; // dense and naive modes keep no neuron cache
  const budget = f.dram_budget_bytes;
  $("budget").textContent = fmtBytes(f.allocated_bytes, budget) + " / " + fmtBytes(budget);
  const top = Math.max(0, ...perToken.filter((v) => v !== null));
  $("bytes-max").textContent = top ? "(chart top " + fmtBytes(top * 1.25) + ")" : "";
  memHistory.push(f.allocated_bytes);
  if (memHistory.length > MEM_SAMPLES) memHistory.shift();
  drawChart($("chart-bytes"), [{ values: perToken, cls: "s1" }], { min: 0, max: top * 1.25 });
  drawChart($("chart-hits"), [{ values: hits, cls: "s2" }], { min: 0, max: 1 });
  drawChart($("chart-mem"), [{ values: memHistory, cls: "s3" }],
    { min: 0, max: Math.max(budget || 0, ...memHistory) * 1.1, ref: budget });
}

// ---------------------------------------------------------------------------------------------
// Controls

function setBusy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("busy", on);
}

function openSettings(open) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

function bindSettings() {
  const fields = [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]];
  for (const [id, key] of fields) {
    const input = $(id);
    input.value = settings[key] === null || settings[key] === undefined ? "" : settings[key];
    input.addEventListener("change", () => {
      settings[key] = input.value === "" ? null : Number(input.value);
      save();
    });
  }
  $("system").addEventListener("input", () => {
    current.system = $("system").value;
    settings.system = current.system; // new conversations start with the last one used
    save();
  });
  const key = $("api-key");
  key.value = localStorage.getItem(KEY) || "";
  key.addEventListener("change", () => {
    if (key.value) localStorage.setItem(KEY, key.value.trim());
    else localStorage.removeItem(KEY);
    loadModel();
  });
}

async function loadModel() {
  try {
    const models = await getJSON("v1/models");
    const m = models.data[0];
    $("model-name").textContent = m.id + (m.context_length ? " \u00b7 " + m.context_length + " tokens" : "");
    notice("");
    updatePanel(await getJSON("v1/edgellm/stats"));
  } catch (e) {
    notice(e.message);
  }
}

function init() {
  const stored = localStorage.getItem(CURRENT);
  bindSettings();
  select(conversations.find((c) => c.id === stored) || newConversation());

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("input");
    const text = input.value;
    if (!text.trim() || busy) return;
    input.value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => busy && busy.controller.abort());
  $("new-chat").addEventListener("click", () => select(newConversation()));
  $("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
  $("toggle-panel").addEventListener("click", () => {
    const on = document.body.classList.toggle("show-panel");
    $("toggle-panel").setAttribute("aria-expanded", String(on));
  });
  $("menu").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
