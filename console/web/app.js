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
    const err = new Error(msg);
    err.status = resp.status;
    err.code = body && body.error ? body.error.code : null;
    err.detail = body && body.error ? body.error.message : msg;
    throw err;
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

// ---- Catalog: offers, affiliates, postbacks, sources, operators ----
// Each kind's form: the usual fields of its document; anything else stays in "Other
// fields (JSON)". A secret field is write-only: left empty, the value set before is kept
// ({"set": true}); the API never sends one back.
const KINDS = {
  offer: {
    title: "Offers",
    fields: [
      { name: "url", label: "Redirect URL template", size: 70, hint: "macros: {click_id}, {aff_id}, {sub1}…" },
      { name: "status", type: "select", options: ["active", "paused"] },
      { name: "currency", size: 4 },
      { name: "window", label: "Attribution window", size: 8, hint: "e.g. 30d" },
      { name: "payouts", type: "map", label: "Payouts", hint: "event=amount, …  e.g. ftd=50.00, registration=2.00" },
    ],
    summary: (d) => `${d.status || "active"} · ${d.url || ""}`,
  },
  affiliate: {
    title: "Affiliates",
    fields: [
      { name: "name", size: 40 },
      { name: "status", type: "select", options: ["active", "paused", "blocked"] },
    ],
    summary: (d) => `${d.name || ""} · ${d.status || "active"}`,
  },
  postback: {
    title: "Postbacks",
    fields: [
      { name: "url", label: "URL template", size: 70, hint: "macros: {click_id}, {payout}, {currency}, {event}, {status}, {txn_id}, {sub1}…" },
      { name: "aff_id", label: "Affiliate", size: 12, hint: "empty: a global postback" },
      { name: "offer_id", label: "Offer", size: 12, hint: "empty: any" },
      { name: "events", type: "list", hint: "comma-separated; empty: every event" },
      { name: "statuses", type: "list", hint: "new conversions with these statuses; empty: any" },
      { name: "send_updates", type: "checkbox", label: "Send status updates" },
      { name: "method", type: "select", options: ["", "GET", "POST", "PUT"] },
      { name: "body", size: 70, hint: "body template (POST, PUT)" },
      { name: "enabled", type: "checkbox", initial: true },
      { name: "secret", type: "secret", label: "Signing secret", hint: "whsec_…; Standard Webhooks signature" },
    ],
    summary: (d) => `${d.enabled === false ? "disabled" : "enabled"} · ${d.aff_id ? "affiliate " + d.aff_id : "global"} · ${d.url || ""}`,
  },
  source: {
    title: "Sources",
    fields: [
      { name: "auth", type: "select", options: ["none", "token", "hmac"] },
      { name: "token", type: "secret" },
      { name: "hmac_secret", type: "secret", label: "HMAC secret" },
      { name: "aliases", type: "map", hint: "their name=ours, …  e.g. cid=click_id, goal=event" },
      { name: "allow_ips", type: "list", label: "Allowed IPs", hint: "addresses or CIDRs; empty: any" },
      { name: "rate_limit_per_second", type: "number", label: "Rate limit per second" },
    ],
    summary: (d) => `auth ${d.auth || ""}${d.aliases ? " · aliases " + Object.keys(d.aliases).length : ""}`,
  },
  operator: {
    title: "Operators",
    fields: [
      { name: "name", size: 30 },
      { name: "role", type: "select", options: ["viewer", "operator", "admin"] },
      { name: "token", type: "secret", hint: "at least 16 characters; kept as its SHA-256 digest" },
    ],
    summary: (d) => `${d.name || ""} · ${d.role || ""}`,
  },
};

// What the editor holds: the kind, the entity (null: a new one) and its revision.
let editing = { kind: "offer", entity: null };
const catalogTurn = latestOnly();
const entityPath = (kind, id) => `/api/v1/catalog/${kind}/${encodeURIComponent(id)}`;

async function loadCatalogList(kind) {
  const current = catalogTurn();
  editing = { kind, entity: null };
  $("#catalog-list-view").hidden = false;
  $("#catalog-entity").hidden = true;
  $("#catalog-kind-title").textContent = KINDS[kind].title;
  try {
    const r = await api(`/api/v1/catalog/${kind}`);
    if (!current()) return;
    const tbody = $("#catalog-list tbody");
    tbody.textContent = "";
    for (const e of r.items) {
      const tr = tbody.insertRow();
      tr.dataset.id = e.id;
      const td = document.createElement("td");
      const a = document.createElement("a");
      a.href = `#catalog/${kind}/${encodeURIComponent(e.id)}`;
      a.textContent = e.id;
      td.appendChild(a);
      tr.appendChild(td);
      cell(tr, KINDS[kind].summary(e.document || {}));
      cell(tr, e.revision); cell(tr, e.changed_by); cell(tr, fmtTime(e.changed_at_ms)); cell(tr, e.reason);
    }
    showError("");
  } catch (e) { showError(e.message); }
}

function fieldInput(f, value) {
  let input;
  if (f.type === "select") {
    input = document.createElement("select");
    for (const o of f.options) {
      const opt = document.createElement("option");
      opt.value = o; opt.textContent = o || "(default)";
      input.appendChild(opt);
    }
    input.value = value === undefined ? f.options[0] : String(value);
  } else if (f.type === "checkbox") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = value === undefined ? Boolean(f.initial) : Boolean(value);
  } else {
    input = document.createElement("input");
    input.size = f.size || 30;
    if (f.type === "secret") {
      input.type = "password";
      input.autocomplete = "new-password";
      input.placeholder = value && value.set ? "set — leave empty to keep it" : "not set";
    } else if (f.type === "number") {
      input.type = "number";
      input.value = value === undefined ? "" : String(value);
    } else if (f.type === "list") {
      input.value = Array.isArray(value) ? value.join(", ") : "";
    } else if (f.type === "map") {
      input.value = value && typeof value === "object" ? Object.entries(value).map(([k, v]) => `${k}=${v}`).join(", ") : "";
    } else {
      input.value = value === undefined || value === null ? "" : String(value);
    }
  }
  input.name = f.name;
  input.id = "field-" + f.name;
  return input;
}

function showEntityForm(kind, entity) {
  editing = { kind, entity };
  $("#catalog-list-view").hidden = true;
  $("#catalog-entity").hidden = false;
  const doc = entity ? entity.document || {} : {};
  $("#entity-title").textContent = entity ? `${kind} ${entity.id} (revision ${entity.revision})` : `New ${kind}`;
  const id = $("#entity-id");
  id.value = entity ? entity.id : "";
  id.readOnly = Boolean(entity);
  const box = $("#entity-fields");
  box.textContent = "";
  const known = new Set();
  for (const f of KINDS[kind].fields) {
    known.add(f.name);
    const label = document.createElement("label");
    const text = f.label || f.name.replace(/_/g, " ");
    label.appendChild(document.createTextNode(text[0].toUpperCase() + text.slice(1)));
    label.appendChild(fieldInput(f, doc[f.name]));
    if (f.hint) {
      const hint = document.createElement("small");
      hint.className = "hint"; hint.textContent = f.hint;
      label.appendChild(hint);
    }
    box.appendChild(label);
  }
  const extra = Object.fromEntries(Object.entries(doc).filter(([k]) => !known.has(k)));
  $("#entity-extra").value = Object.keys(extra).length ? JSON.stringify(extra, null, 1) : "";
  $("#entity-reason").value = "";
  $("#entity-delete").hidden = !entity;
  setEntityMessage("", "");
  $("#postback-tools").hidden = !(kind === "postback" && entity);
  $("#postback-test-result").textContent = "";
  $("#source-tools").hidden = !(kind === "source" && entity && entity.call);
  if (kind === "source" && entity && entity.call) {
    $("#source-url").textContent = entity.call.postback_url;
    $("#source-auth").textContent = entity.call.auth;
  }
  $("#entity-history tbody").textContent = "";
  if (entity) { loadHistory(kind, entity.id); if (kind === "postback") loadBackfills(entity.id); }
}

function setEntityMessage(text, cls) {
  const m = $("#entity-message");
  m.textContent = text;
  m.className = cls;
}

// The document the form says, or an error naming the field that is wrong.
function formDocument() {
  const { kind, entity } = editing;
  let doc = {};
  const extraText = $("#entity-extra").value.trim();
  if (extraText) {
    try { doc = JSON.parse(extraText); } catch (e) { throw fieldError("extra", "not JSON: " + e.message); }
    if (!doc || typeof doc !== "object" || Array.isArray(doc)) throw fieldError("extra", "must be a JSON object");
  }
  const before = entity ? entity.document || {} : {};
  for (const f of KINDS[kind].fields) {
    const input = $("#field-" + f.name);
    const v = f.type === "checkbox" ? input.checked : input.value.trim();
    if (f.type === "checkbox") { doc[f.name] = v; continue; }
    if (f.type === "secret") {
      if (v) doc[f.name] = v;
      else if (before[f.name] && before[f.name].set) doc[f.name] = { set: true };
      continue;
    }
    if (v === "") continue;
    if (f.type === "list") doc[f.name] = v.split(",").map((x) => x.trim()).filter(Boolean);
    else if (f.type === "number") doc[f.name] = Number(v);
    else if (f.type === "map") {
      const m = {};
      for (const pair of v.split(",").map((x) => x.trim()).filter(Boolean)) {
        const cut = pair.indexOf("=");
        if (cut < 1) throw fieldError(f.name, `"${pair}" is not name=value`);
        m[pair.slice(0, cut).trim()] = pair.slice(cut + 1).trim();
      }
      doc[f.name] = m;
    } else doc[f.name] = v;
  }
  return doc;
}

function fieldError(field, message) {
  const e = new Error(message);
  e.field = field;
  return e;
}

// Marks the field an error names ("document.url: …" from the API, or the form's own).
function markField(field, message) {
  for (const old of document.querySelectorAll("#entity-form .field-error")) old.remove();
  for (const old of document.querySelectorAll("#entity-form .invalid")) old.classList.remove("invalid");
  if (!field) return;
  const top = field.split(/[.[]/)[0];
  const input = top === "extra" ? $("#entity-extra") : $("#field-" + top) || $("#entity-extra");
  input.classList.add("invalid");
  const note = document.createElement("span");
  note.className = "field-error";
  note.textContent = message;
  input.parentElement.appendChild(note);
}

async function saveEntity(e) {
  e.preventDefault();
  const { kind, entity } = editing;
  const id = $("#entity-id").value.trim();
  markField(null);
  let document_;
  try { document_ = formDocument(); } catch (err) { markField(err.field, err.message); setEntityMessage(err.message, "bad"); return; }
  if (!id) { $("#entity-id").classList.add("invalid"); setEntityMessage("An ID is needed.", "bad"); return; }
  const headers = entity ? { "If-Match": `"${entity.revision}"` } : { "If-None-Match": "*" };
  const reason = $("#entity-reason").value.trim();
  try {
    const saved = await api(entityPath(kind, id), {
      method: "PUT", headers,
      body: JSON.stringify({ document: document_, reason: reason || null }),
    });
    // The address follows the entity shown, without reloading it (no hashchange).
    if (!entity) history.replaceState(null, "", `#catalog/${kind}/${encodeURIComponent(id)}`);
    showEntityForm(kind, saved);
    setEntityMessage(`Saved: revision ${saved.revision}.`, "ok");
  } catch (err) {
    if (err.code === "invalid_document") {
      const m = /^document\.([^:]+): (.*)$/s.exec(err.detail);
      if (m) markField(m[1], m[2]);
    }
    setEntityMessage(err.status === 409 && err.code === "conflict"
      ? `${err.detail} — someone changed it meanwhile: reload to see their version.` : err.message, "bad");
  }
}

async function deleteEntity() {
  const { kind, entity } = editing;
  if (!entity || !confirm(`Delete ${kind} ${entity.id}?`)) return;
  try {
    await api(entityPath(kind, entity.id), { method: "DELETE", headers: { "If-Match": `"${entity.revision}"` } });
    location.hash = `#catalog/${kind}`;
  } catch (err) { setEntityMessage(err.message, "bad"); }
}

async function loadHistory(kind, id) {
  try {
    const h = await api(entityPath(kind, id) + "/history");
    const tbody = $("#entity-history tbody");
    tbody.textContent = "";
    for (const c of h.changes.slice().reverse()) {
      const tr = tbody.insertRow();
      cell(tr, c.revision); cell(tr, fmtTime(c.changed_at_ms)); cell(tr, c.changed_by); cell(tr, c.reason);
      cell(tr, c.document ? JSON.stringify(c.document) : "(deleted)");
    }
  } catch (err) { showError(err.message); }
}

async function loadBackfills(id) {
  try {
    const r = await api(entityPath("postback", id) + "/backfills");
    const tbody = $("#backfills tbody");
    tbody.textContent = "";
    let running = false;
    for (const b of r.items.slice().reverse()) {
      const tr = tbody.insertRow();
      tr.dataset.state = b.state;
      cell(tr, fmtTime(b.requested_at_ms)); cell(tr, b.requested_by); cell(tr, fmtTime(b.since_ms));
      cell(tr, b.state + (b.error ? ": " + b.error : "")); cell(tr, b.read); cell(tr, b.matched); cell(tr, b.sent);
      cell(tr, `${b.partitions_done}/${b.partitions}`);
      running = running || b.state === "running";
    }
    // Progress while one runs, as long as this postback is on the page.
    if (running) setTimeout(() => { if (editing.entity && editing.entity.id === id) loadBackfills(id); }, 1000);
  } catch (err) { showError(err.message); }
}

async function testPostback() {
  const out = $("#postback-test-result");
  out.textContent = "Sending…";
  try {
    const t = await api(entityPath("postback", editing.entity.id) + "/test", { method: "POST" });
    const req = t.request;
    const lines = [`${req.method} ${req.url}`, ...req.headers.map(([n, v]) => `${n}: ${v}`)];
    if (req.body) lines.push("", req.body);
    lines.push("", "→ " + (t.response
      ? `HTTP ${t.response.status} in ${t.duration_ms} ms` : `no answer after ${t.duration_ms} ms: ${t.error}`));
    if (t.response) {
      for (const [n, v] of t.response.headers) lines.push(`${n}: ${v}`);
      if (t.response.body) lines.push("", t.response.body + (t.response.truncated ? " …" : ""));
    }
    out.textContent = lines.join("\n");
    out.dataset.status = t.response ? String(t.response.status) : "none";
  } catch (err) { out.textContent = err.message; }
}

async function startBackfill(e) {
  e.preventDefault();
  try {
    await api(entityPath("postback", editing.entity.id) + "/backfills", {
      method: "POST",
      body: JSON.stringify({ since: $("#backfill-since").value.trim(), reason: "backfill from the console" }),
    });
    loadBackfills(editing.entity.id);
  } catch (err) { setEntityMessage(err.message, "bad"); }
}

async function showCatalog(kind, id) {
  for (const a of document.querySelectorAll("#catalog-kinds a")) a.classList.toggle("active", a.dataset.kind === kind);
  if (id === undefined) { loadCatalogList(kind); return; }
  if (id === "") { showEntityForm(kind, null); return; }
  const current = catalogTurn();
  try {
    const entity = await api(entityPath(kind, id));
    if (!current()) return;
    showEntityForm(kind, entity);
  } catch (err) { showError(err.message); }
}

// ---- Pages ----
function route() {
  const [page, arg, sub] = (location.hash.slice(1) || "live").split("/");
  for (const p of ["live", "click", "failures", "totals", "catalog"]) {
    $("#page-" + p).hidden = p !== page;
    $("#nav-" + p).classList.toggle("active", p === page);
  }
  if (!token) { showError("Enter your operator token above."); return; }
  if (page === "live") conversions(true);
  if (page === "click" && arg) showStory(decodeURIComponent(arg));
  if (page === "failures") { loadEndpoints(); deadLetters(true); refusals(true); }
  if (page === "totals") loadTotals();
  if (page === "catalog") {
    const kind = KINDS[arg] ? arg : "offer";
    // #catalog/<kind>: the list; #catalog/<kind>/<id>: one entity; #catalog/<kind>/new: a new one.
    showCatalog(kind, sub === undefined ? undefined : sub === "new" ? "" : decodeURIComponent(sub));
  }
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
$("#catalog-new").addEventListener("click", () => {
  const kind = KINDS[editing.kind] ? editing.kind : "offer";
  const target = `#catalog/${kind}/new`;
  if (location.hash === target) showEntityForm(kind, null); else location.hash = target;
});
$("#entity-form").addEventListener("submit", saveEntity);
$("#entity-delete").addEventListener("click", deleteEntity);
$("#entity-back").addEventListener("click", (e) => { e.preventDefault(); location.hash = `#catalog/${editing.kind}`; });
$("#postback-test").addEventListener("click", testPostback);
$("#backfill-form").addEventListener("submit", startBackfill);
window.addEventListener("hashchange", route);

$("#token-state").textContent = token ? "set" : "";
if (token) startFeed();
updateFreshness();
route();
