// The console's page: plain JavaScript, no build step. Every value from the API is put in
// the page as text (never as HTML), since clicks and postbacks carry what strangers sent.
"use strict";

const $ = (sel) => document.querySelector(sel);
let token = localStorage.getItem("s2s-console-token") || "";

function fmtTime(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "";
}

function showError(msg) {
  const e = $("#error");
  e.textContent = msg || "";
  e.hidden = !msg;
}

async function api(path, options = {}) {
  const resp = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = resp.status === 204 ? null : await resp.json().catch(() => null);
  if (!resp.ok) {
    const msg = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return body;
}

// A view shows only the answer to its latest request. The browser fetches over several
// connections, so an older answer can arrive after a newer one; drawn last, it would show
// a state the page has already moved past. `const current = turn();` before the request,
// `if (!current()) return;` after it.
function latestOnly() {
  let seq = 0;
  return () => {
    const mine = ++seq;
    return () => mine === seq;
  };
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  row.appendChild(td);
  return td;
}

function clickLink(row, clickId) {
  const td = document.createElement("td");
  const a = document.createElement("a");
  a.href = "#click/" + encodeURIComponent(clickId);
  a.textContent = clickId;
  td.appendChild(a);
  row.appendChild(td);
}

function refireButton(row, delivery, onDone) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.className = "refire";
  b.dataset.deliveryId = delivery.delivery_id;
  b.textContent = "Re-fire";
  b.disabled = delivery.state === "delivered";
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await api(`/api/v1/deliveries/${encodeURIComponent(delivery.delivery_id)}/refire`, {
        method: "POST",
        body: JSON.stringify({ reason: "re-fired from the console" }),
      });
      b.textContent = "Re-fire requested";
      if (onDone) onDone();
    } catch (e) {
      b.disabled = false;
      showError(e.message);
    }
  });
  td.appendChild(b);
  row.appendChild(td);
}

// ---- Live feed (server-sent events read with fetch, so the token goes in a header) ----
let feedAbort = null;
async function startFeed() {
  if (feedAbort) feedAbort.abort();
  feedAbort = new AbortController();
  const state = $("#feed-state");
  try {
    const resp = await fetch("/api/v1/feed", { headers: { Authorization: "Bearer " + token }, signal: feedAbort.signal });
    if (!resp.ok) { state.textContent = `refused (HTTP ${resp.status})`; return; }
    state.textContent = "live";
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of chunk.split("\n")) {
          if (line.startsWith("data:")) addFeedLine(JSON.parse(line.slice(5)));
        }
      }
    }
    state.textContent = "disconnected";
  } catch (e) {
    if (e.name !== "AbortError") state.textContent = "disconnected";
  }
}

function addFeedLine(ev) {
  const li = document.createElement("li");
  li.className = "feed-" + ev.kind;
  const t = document.createElement("time");
  t.textContent = fmtTime(ev.ts_ms) + " ";
  li.appendChild(t);
  if (ev.click_id) {
    const a = document.createElement("a");
    a.href = "#click/" + encodeURIComponent(ev.click_id);
    a.textContent = ev.click_id;
    li.appendChild(a);
    li.appendChild(document.createTextNode(" "));
  }
  li.appendChild(document.createTextNode(ev.summary || ev.kind));
  const feed = $("#feed");
  feed.insertBefore(li, feed.firstChild);
  while (feed.children.length > 200) feed.removeChild(feed.lastChild);
}

// ---- Lists with cursor pagination ----
function pager({ table, more, load, render }) {
  let cursor = null;
  const tbody = $(table + " tbody");
  const turn = latestOnly();
  async function page(reset) {
    const current = turn();
    if (reset) { cursor = null; tbody.textContent = ""; }
    try {
      const p = await load(cursor);
      if (!current()) return;
      for (const item of p.items) render(tbody, item);
      cursor = p.next_cursor;
      $(more).hidden = !cursor;
      showError("");
    } catch (e) { showError(e.message); }
  }
  $(more).addEventListener("click", () => page(false));
  return page;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  return q.toString();
}

const conversionFilter = () => Object.fromEntries(new FormData($("#conversions-filter")));
const conversions = pager({
  table: "#conversions",
  more: "#conversions-more",
  load: (cursor) => api("/api/v1/conversions?" + query({ ...conversionFilter(), cursor, limit: 50 })),
  render: (tbody, c) => {
    const tr = tbody.insertRow();
    cell(tr, fmtTime(c.event_ts_ms)); clickLink(tr, c.click_id); cell(tr, c.aff_id); cell(tr, c.offer_id);
    cell(tr, c.event); cell(tr, c.status); cell(tr, c.version); cell(tr, `${c.payout} ${c.currency}`);
    const flag = cell(tr, c.suspicious ? "suspicious" : "");
    if (c.suspicious) flag.className = "flag";
  },
});

// The failures view's time range, read as UTC (the page shows every time in UTC).
function deadRange() {
  const ms = (sel) => { const v = $(sel).value; return v ? Date.parse(v + "Z") : null; };
  return { from: ms("#dead-from"), to: ms("#dead-to") };
}

// What ingest refused, newest first: the screen for "my postbacks don't arrive".
const refusals = pager({
  table: "#refusals",
  more: "#refusals-more",
  load: (cursor) => api("/api/v1/refusals?" + query({ ...Object.fromEntries(new FormData($("#refusals-filter"))), cursor, limit: 50 })),
  render: (tbody, r) => {
    const tr = tbody.insertRow();
    cell(tr, fmtTime(r.ts_ms)); cell(tr, r.source); cell(tr, r.status); cell(tr, r.reason);
    cell(tr, r.field); cell(tr, r.message); cell(tr, r.client_ip);
    const params = Object.entries(r.params || {}).map(([k, v]) => `${k}=${v}`).join("&");
    cell(tr, params ? `${r.path}?${params}` : r.path);
  },
});

const deadLetters = pager({
  table: "#dead-letters",
  more: "#dead-more",
  load: (cursor) => api("/api/v1/dead-letters?" + query({ ...deadRange(), endpoint: $("#dead-endpoint").value, cursor, limit: 50 })),
  render: (tbody, d) => {
    const tr = tbody.insertRow();
    tr.dataset.deliveryId = d.delivery_id;
    cell(tr, fmtTime(d.dead_at_ms)); cell(tr, d.endpoint); clickLink(tr, d.click_id); cell(tr, d.attempts);
    cell(tr, d.last_error || (d.last_status ? "HTTP " + d.last_status : ""));
    refireButton(tr, d);
  },
});

const endpointsTurn = latestOnly();
async function loadEndpoints() {
  const current = endpointsTurn();
  try {
    const eps = await api("/api/v1/endpoints");
    if (!current()) return;
    const tbody = $("#endpoints tbody");
    tbody.textContent = "";
    for (const e of eps) {
      const tr = tbody.insertRow();
      cell(tr, e.endpoint); cell(tr, e.attempts); cell(tr, e.delivered); cell(tr, e.failed_attempts);
      cell(tr, e.dead_lettered); cell(tr, e.last_error); cell(tr, fmtTime(e.last_error_ms));
    }
  } catch (e) { showError(e.message); }
}

// ---- Click story ----
const storyTurn = latestOnly();
async function showStory(clickId) {
  const current = storyTurn();
  $("#click-input").value = clickId;
  const msg = $("#story-message");
  msg.textContent = "Looking up…";
  // A refresh of the story shown keeps it on the page until the new answer replaces it.
  if ($("#story").dataset.clickId !== clickId) $("#story").hidden = true;
  let s;
  try {
    s = await api("/api/v1/clicks/" + encodeURIComponent(clickId));
  } catch (e) {
    if (current()) msg.textContent = e.message;
    return;
  }
  if (!current()) return;
  msg.textContent = "";
  const facts = $("#story-click");
  facts.textContent = "";
  const c = s.click || {};
  for (const [k, v] of [["Click", s.click_id], ["Offer", c.offer_id], ["Affiliate", c.aff_id], ["Time", fmtTime(c.ts_ms)],
                        ["Sub IDs", JSON.stringify(c.subs || {})], ["IP", c.ip], ["User agent", c.user_agent]]) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v === undefined || v === null ? "" : String(v);
    facts.appendChild(dt); facts.appendChild(dd);
  }
  const dtb = $("#story-deliveries tbody");
  dtb.textContent = "";
  for (const d of s.deliveries) {
    const tr = dtb.insertRow();
    tr.dataset.deliveryId = d.delivery_id;
    tr.dataset.state = d.state;
    cell(tr, d.endpoint); cell(tr, d.state); cell(tr, d.attempts); cell(tr, d.last_status);
    cell(tr, d.last_error); cell(tr, fmtTime(d.next_attempt_at_ms));
    refireButton(tr, d, () => setTimeout(() => showStory(clickId), 1500));
  }
  const etb = $("#story-entries tbody");
  etb.textContent = "";
  for (const e of s.entries) {
    const tr = etb.insertRow();
    tr.dataset.kind = e.kind;
    cell(tr, fmtTime(e.ts_ms));
    cell(tr, e.kind.replace("_", " "));
    cell(tr, describe(e));
  }
  $("#story").dataset.clickId = clickId;
  $("#story").hidden = false;
}

function describe(e) {
  const r = e.record;
  switch (e.kind) {
    case "postback": return `${r.event} ${r.status}${r.txn_id ? " txn " + r.txn_id : ""}${r.amount ? ` amount ${r.amount} ${r.currency || ""}` : ""}`;
    case "conversion": return `conversion ${r.conversion_id} v${r.version}: ${r.status}, payout ${r.payout} ${r.payout_currency}${r.suspicious ? " (suspicious)" : ""}`;
    case "rejection": return `${r.reason}: ${r.detail}`;
    case "attempt": return `to ${r.endpoint}, attempt ${r.attempt}: ${r.outcome}${r.status_code ? " HTTP " + r.status_code : ""}${r.error ? " — " + r.error : ""} (${r.latency_ms} ms)`;
    case "dead_letter": return `dead-lettered for ${r.endpoint} after ${r.attempts} attempts${r.last_error ? ": " + r.last_error : ""}`;
    case "command": return `${r.action} to ${r.endpoint}, asked by ${r.requested_by}${r.reason ? ": " + r.reason : ""}`;
    default: return JSON.stringify(r);
  }
}

// ---- Totals ----
const totalsTurn = latestOnly();
async function loadTotals() {
  const f = new FormData($("#totals-form"));
  const by = ["aff", "offer", "event"].filter((k) => f.get(k));
  const to = Date.now() + 1;
  const from = to - Number(f.get("span"));
  const bucketMs = f.get("granularity") === "day" ? 86400000 : 3600000;
  const current = totalsTurn();
  try {
    const rows = await api("/api/v1/totals?" + query({ granularity: f.get("granularity"), from, to, by: by.join(",") }));
    if (!current()) return;
    const tbody = $("#totals-table tbody");
    tbody.textContent = "";
    const pct = (x) => (x === null || x === undefined ? "" : (100 * x).toFixed(1) + " %");
    for (const r of rows) {
      const tr = tbody.insertRow();
      cell(tr, fmtTime(r.bucket_ms)); cell(tr, r.aff_id); cell(tr, r.offer_id); cell(tr, r.event);
      cell(tr, r.clicks); cell(tr, r.conversions);
      const money = (m) => Object.entries(m || {}).map(([c, v]) => `${v} ${c}`).join(", ");
      cell(tr, money(r.payout));
      cell(tr, Object.entries(r.by_status || {}).filter(([, t]) => t.conversions > 0)
        .map(([s, t]) => `${s} ${t.conversions} (${money(t.payout)})`).join(" · "));
      cell(tr, pct(r.conversion_rate)); cell(tr, pct(r.delivery_success_rate));
    }
    drawChart(rows, from, to, bucketMs);
  } catch (e) { showError(e.message); }
}

// One bar per bucket of the requested range, placed by time (an empty bucket is a gap),
// conversions as bars and clicks as a thin line of ticks above them.
function drawChart(rows, from, to, bucketMs) {
  const svg = $("#totals-chart");
  svg.textContent = "";
  const ns = "http://www.w3.org/2000/svg";
  const first = Math.floor(from / bucketMs) * bucketMs;
  const n = Math.max(1, Math.ceil((to - first) / bucketMs));
  const conv = new Array(n).fill(0), clicks = new Array(n).fill(0);
  for (const r of rows) {
    const i = Math.floor((r.bucket_ms - first) / bucketMs);
    if (i >= 0 && i < n) { conv[i] += r.conversions; clicks[i] += r.clicks; }
  }
  const max = Math.max(1, ...conv, ...clicks);
  const w = svg.clientWidth || 600, h = 160, top = 14, step = w / n, bw = Math.max(1, step - 2);
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4); label.setAttribute("y", 11); label.setAttribute("class", "axis");
  label.textContent = `max ${max} per ${bucketMs >= 86400000 ? "day" : "hour"} — bars: conversions, ticks: clicks`;
  svg.appendChild(label);
  for (let i = 0; i < n; i++) {
    const title = `${fmtTime(first + i * bucketMs)}: ${conv[i]} conversions, ${clicks[i]} clicks`;
    if (conv[i] > 0) {
      const bh = (h - top) * conv[i] / max;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", i * step + 1); rect.setAttribute("y", h - bh);
      rect.setAttribute("width", bw); rect.setAttribute("height", bh);
      const t = document.createElementNS(ns, "title"); t.textContent = title; rect.appendChild(t);
      svg.appendChild(rect);
    }
    if (clicks[i] > 0) {
      const y = h - (h - top) * clicks[i] / max;
      const tick = document.createElementNS(ns, "line");
      tick.setAttribute("x1", i * step + 1); tick.setAttribute("x2", i * step + 1 + bw);
      tick.setAttribute("y1", y); tick.setAttribute("y2", y); tick.setAttribute("class", "clicks");
      const t = document.createElementNS(ns, "title"); t.textContent = title; tick.appendChild(t);
      svg.appendChild(tick);
    }
  }
}

// ---- Freshness: is what the page shows up to date? ----
async function updateFreshness() {
  const f = $("#freshness");
  if (!token) { f.textContent = ""; return; }
  try {
    const s = await api("/api/v1/status");
    f.dataset.behind = s.records_behind === null ? "" : String(s.records_behind);
    f.textContent = s.partitions.length === 0 ? "read model: no partitions yet"
      : s.records_behind === null ? "read model: catching up"
      : s.records_behind === 0 ? "read model: up to date"
      : `read model: ${s.records_behind} records behind`;
  } catch (e) { f.textContent = "read model: unknown"; }
}
setInterval(updateFreshness, 5000);

// ---- Pages ----
function route() {
  const [page, arg] = (location.hash.slice(1) || "live").split("/");
  for (const p of ["live", "click", "failures", "totals"]) {
    $("#page-" + p).hidden = p !== page;
    $("#nav-" + p).classList.toggle("active", p === page);
  }
  if (!token) { showError("Enter your operator token above."); return; }
  if (page === "live") conversions(true);
  if (page === "click" && arg) showStory(decodeURIComponent(arg));
  if (page === "failures") { loadEndpoints(); deadLetters(true); refusals(true); }
  if (page === "totals") loadTotals();
}

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("#token").value.trim();
  localStorage.setItem("s2s-console-token", token);
  $("#token").value = "";
  $("#token-state").textContent = token ? "set" : "";
  showError("");
  startFeed();
  updateFreshness();
  route();
});
$("#click-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("#click-input").value.trim();
  const target = "#click/" + encodeURIComponent(id);
  // Looking up the click already shown again refreshes it (no hashchange then).
  if (location.hash === target) showStory(id);
  else location.hash = target;
});
$("#conversions-filter").addEventListener("submit", (e) => { e.preventDefault(); conversions(true); });
$("#dead-filter").addEventListener("submit", (e) => { e.preventDefault(); deadLetters(true); });
$("#refusals-filter").addEventListener("submit", (e) => { e.preventDefault(); refusals(true); });
$("#dead-refire-all").addEventListener("click", async () => {
  const endpoint = $("#dead-endpoint").value.trim();
  const msg = $("#dead-message");
  if (!endpoint) { msg.textContent = "Name the endpoint first."; return; }
  try {
    const r = await api("/api/v1/dead-letters/refire", { method: "POST", body: JSON.stringify({ ...deadRange(), endpoint, reason: "re-fired from the console" }) });
    msg.textContent = `${r.sent} deliveries re-fired` + (r.more ? " (more match: re-fire again once these are settled)." : ".");
    deadLetters(true);
  } catch (e) { msg.textContent = e.message; }
});
$("#totals-form").addEventListener("submit", (e) => { e.preventDefault(); loadTotals(); });
window.addEventListener("hashchange", route);

$("#token-state").textContent = token ? "set" : "";
if (token) startFeed();
updateFreshness();
route();
