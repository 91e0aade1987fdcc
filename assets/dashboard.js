// autonomous-runner dashboard. Everything the server sends is data, shown with textContent
// only — agent text can never become markup or script here (and the page's CSP forbids
// inline and foreign scripts besides).
"use strict";

const rows = new Map();          // symbol -> { tr, signal }
let lastEventId = null;
let backoff = 1000;              // ms, doubles up to 30 s after each failed connection
let source = null;

const $ = (id) => document.getElementById(id);

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function age(ts) {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  return s < 90 ? s + " s" : Math.round(s / 60) + " min";
}

function renderSignal(envelope) {
  const p = envelope && envelope.payload;
  if (!p || typeof p.symbol !== "string") return;
  let entry = rows.get(p.symbol);
  const tr = document.createElement("tr");
  tr.dataset.symbol = p.symbol;
  cell(tr, p.symbol);
  cell(tr, String(p.action), String(p.action));
  cell(tr, typeof p.confidence === "number" ? (p.confidence * 100).toFixed(0) + " %" : "", "num");
  cell(tr, typeof p.opportunity_score === "number" ? p.opportunity_score.toFixed(1) : "", "num");
  cell(tr, String(p.opportunity_tier || ""), String(p.opportunity_tier || ""));
  cell(tr, String(p.summary || ""), "summary");
  cell(tr, age(p.timestamp), "num age");
  cell(tr, p.expires_at ? new Date(p.expires_at).toLocaleTimeString() : "", "num");
  if (p.is_degraded) tr.title = "degraded: produced by the rules fallback";
  const body = $("signals").tBodies[0];
  if (entry) {
    body.replaceChild(tr, entry.tr);
  } else {
    // Keep rows sorted by symbol.
    const after = [...rows.keys()].filter((s) => s > p.symbol).sort()[0];
    body.insertBefore(tr, after ? rows.get(after).tr : null);
  }
  tr.classList.add("fresh");
  rows.set(p.symbol, { tr, signal: p });
  $("count").textContent = rows.size + " symbols";
}

function renderCycles(cycles) {
  const body = $("cycles").tBodies[0];
  body.textContent = "";
  for (const c of cycles.slice(0, 10)) {
    const tr = document.createElement("tr");
    cell(tr, c.cycle_id);
    cell(tr, c.skipped_reason ? "" : Number(c.duration_seconds).toFixed(2) + " s", "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_ok), "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_failed), "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_skipped), "num");
    const note = c.skipped_reason
      ? "skipped: " + c.skipped_reason
      : (c.failures || []).map((f) => f.symbol + " " + f.reason).join(", ");
    cell(tr, note);
    body.appendChild(tr);
  }
}

let cycles = [];
function addCycle(c) {
  cycles = [c].concat(cycles.filter((x) => x.cycle_id !== c.cycle_id));
  cycles.sort((a, b) => (a.cycle_id < b.cycle_id ? 1 : -1));
  renderCycles(cycles);
}

function pill(el, text, cls) {
  el.textContent = text;
  el.className = "pill " + cls;
}

async function refreshStatus() {
  try {
    const d = await (await fetch("/health/detailed")).json();
    pill($("ready"), d.readiness && d.readiness.status === "ready" ? "ready" : "not ready", d.readiness && d.readiness.status === "ready" ? "ok" : "bad");
    const ks = d.kill_switch;
    pill($("killswitch"), ks ? "kill switch ON: " + (ks.reason || "") : "kill switch off", ks ? "bad" : "ok");
    const box = $("breakers");
    box.textContent = "";
    for (const [name, b] of Object.entries(d.circuit_breakers || {})) {
      const span = document.createElement("span");
      pill(span, name + ": " + b.state, b.state === "closed" ? "ok" : b.state === "open" ? "bad" : "warn");
      box.appendChild(span);
    }
  } catch (e) {
    pill($("ready"), "status unavailable", "warn");
  }
}

function connect() {
  const url = "/api/signals/stream" + (lastEventId ? "?last_event_id=" + encodeURIComponent(lastEventId) : "");
  source = new EventSource(url);
  source.onopen = () => { backoff = 1000; pill($("conn"), "live", "ok"); };
  source.addEventListener("signal", (ev) => {
    if (ev.lastEventId) lastEventId = ev.lastEventId;
    try { renderSignal(JSON.parse(ev.data)); } catch (e) { /* not JSON: ignore */ }
  });
  source.addEventListener("cycle", (ev) => {
    if (ev.lastEventId) lastEventId = ev.lastEventId;
    try { addCycle(JSON.parse(ev.data)); } catch (e) { /* ignore */ }
  });
  source.addEventListener("status", (ev) => {
    if (ev.lastEventId) lastEventId = ev.lastEventId;
    refreshStatus();
  });
  // The server's own `error` event (too slow), and connection failures: reconnect from
  // where we were, backing off.
  source.addEventListener("error", () => {
    source.close();
    pill($("conn"), "reconnecting in " + Math.round(backoff / 1000) + " s", "warn");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 30000);
  });
}

function tick() {
  const now = Date.now();
  for (const { tr, signal } of rows.values()) {
    const a = tr.querySelector("td.age");
    if (a) a.textContent = age(signal.timestamp);
    tr.classList.toggle("stale", signal.expires_at && Date.parse(signal.expires_at) < now);
  }
}

async function start() {
  try { renderCycles(cycles = (await (await fetch("/api/cycles")).json()).cycles || []); } catch (e) { /* later */ }
  refreshStatus();
  connect();
  setInterval(tick, 1000);
  setInterval(refreshStatus, 15000);
}

start();
