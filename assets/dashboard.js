// autonomous-runner dashboard. Everything the server sends is data, shown with textContent
// only — agent text can never become markup or script here (and the page's CSP forbids
// inline and foreign scripts besides). Times are shown in UTC, labelled, like the cycles.
"use strict";

const rows = new Map();          // symbol -> { tr, detail, signal }
let lastEventId = null;
let backoff = 1000;              // ms, doubles up to 30 s after each failed connection
let source = null;
let simulated = false;
let chart = null;
let calib = null;

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

// HH:MM:SS of an RFC 3339 time, in UTC.
function utc(ts) {
  const d = new Date(ts);
  return isNaN(d) ? "" : d.toISOString().slice(11, 19);
}

function price(p) {
  const v = p && p.market_context && p.market_context.current_price;
  if (typeof v !== "number") return "";
  return (v >= 100 ? v.toFixed(2) : v.toPrecision(5)) + (simulated ? " (sim)" : "");
}

function pct(v) {
  return typeof v === "number" ? (v * 100).toFixed(2) + " %" : "";
}

// The summary and the strategy breakdown, shown on demand under the row.
function detailRow(p) {
  const tr = document.createElement("tr");
  tr.className = "detail";
  tr.hidden = true;
  const td = document.createElement("td");
  td.colSpan = 9;
  const summary = document.createElement("p");
  summary.className = "summary";
  summary.textContent = String(p.summary || p.reasoning || "");
  td.appendChild(summary);
  const list = document.createElement("ul");
  list.className = "breakdown";
  for (const v of Array.isArray(p.strategy_breakdown) ? p.strategy_breakdown : []) {
    const li = document.createElement("li");
    li.textContent = String(v.name) + ": " + String(v.signal) + " (" + Number(v.score).toFixed(2) + ")";
    li.className = String(v.signal);
    list.appendChild(li);
  }
  td.appendChild(list);
  tr.appendChild(td);
  return tr;
}

// What the stated confidence has meant so far: the hit rate of this model's calls of this
// action at this confidence. Until the group has enough grades the cell says so instead of
// guessing; the tooltip has the group, the horizon and the sample size.
function calibratedCell(tr, p) {
  const c = p.calibration || {};
  const known = typeof p.calibrated_confidence === "number";
  const td = cell(tr, known ? (p.calibrated_confidence * 100).toFixed(0) + " %" : "—", "num calibrated");
  if (known) {
    td.title = "hit " + (p.calibrated_confidence * 100).toFixed(1) + " % of the time at " + c.horizon +
      " (" + c.group + ", " + c.graded + " graded, " + c.method + ")";
  } else if (c.status === "insufficient") {
    td.title = "not calibrated yet: " + c.graded.toLocaleString("en-US") + " of " + c.needed.toLocaleString("en-US") + " grades at " + c.horizon + " (" + c.group + ")";
  } else {
    td.title = "not calibrated: no history to learn from";
  }
  return td;
}

function renderSignal(envelope) {
  const p = envelope && envelope.payload;
  if (!p || typeof p.symbol !== "string") return;
  const entry = rows.get(p.symbol);
  if (entry && entry.signal.cycle_id > p.cycle_id) return; // an older tick arriving late
  const tr = document.createElement("tr");
  tr.dataset.symbol = p.symbol;
  const sym = cell(tr, p.symbol, "symbol");
  sym.title = "show the chart";
  sym.addEventListener("click", (e) => { e.stopPropagation(); selectSymbol(p.symbol); });
  const act = cell(tr, String(p.action), String(p.action));
  if (p.is_degraded) {
    // Visible without hovering: the badge, the row's colour, and the notice above.
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "fallback";
    act.appendChild(badge);
    tr.classList.add("degraded");
  }
  cell(tr, typeof p.confidence === "number" ? (p.confidence * 100).toFixed(0) + " %" : "", "num");
  calibratedCell(tr, p);
  cell(tr, price(p), "num price");
  cell(tr, typeof p.opportunity_score === "number" ? p.opportunity_score.toFixed(1) : "", "num");
  cell(tr, String(p.opportunity_tier || ""), String(p.opportunity_tier || ""));
  cell(tr, age(p.timestamp), "num age");
  cell(tr, p.expires_at ? utc(p.expires_at) : "", "num");
  if (p.is_degraded) tr.title = "degraded: produced by the rules fallback";
  const detail = detailRow(p);
  tr.addEventListener("click", () => { detail.hidden = !detail.hidden; });
  const body = $("signals").tBodies[0];
  if (entry) {
    detail.hidden = entry.detail.hidden;
    body.replaceChild(tr, entry.tr);
    body.replaceChild(detail, entry.detail);
  } else {
    // Keep rows sorted by symbol.
    const after = [...rows.keys()].filter((s) => s > p.symbol).sort()[0];
    const before = after ? rows.get(after).tr : null;
    body.insertBefore(tr, before);
    body.insertBefore(detail, before);
  }
  tr.classList.add("fresh");
  rows.set(p.symbol, { tr, detail, signal: p });
  $("count").textContent = rows.size + " symbols";
  updateNotice();
  addSymbolOption(p.symbol);
}

function renderCycles(cycles) {
  const body = $("cycles").tBodies[0];
  body.textContent = "";
  for (const c of cycles.slice(0, 10)) {
    const tr = document.createElement("tr");
    cell(tr, String(c.cycle_id).replace("T", " ").replace("Z", ""));
    cell(tr, c.skipped_reason ? "" : Number(c.duration_seconds).toFixed(2) + " s", "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_ok), "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_failed), "num");
    cell(tr, c.skipped_reason ? "" : String(c.symbols_skipped), "num");
    // Each failure with what happened (the first cause among its attempts), and the symbols
    // left out up front because the tick's work could not all fit.
    const causes = (c.failures || []).map(
      (f) => f.symbol + " " + f.reason + (f.error ? ": " + f.error : ""),
    );
    const shed = (c.skipped || []).filter((s) => s.reason === "capacity").map((s) => s.symbol);
    if (shed.length) causes.push("left out for capacity: " + shed.join(", "));
    const note = c.skipped_reason ? "skipped: " + c.skipped_reason : causes.join("; ");
    cell(tr, note);
    body.appendChild(tr);
  }
}

let nextTick = null;
let degradedWhy = null;
let latestLoaded = false;

// The one line above the tables: nothing while all is well; until the first signal, when the
// first tick is (only once the page knows there are none: no flash on load) or what the
// ticks that ran did instead; and, at a glance, that signals are degraded and why.
function updateNotice() {
  const n = $("notice");
  const fallback = [...rows.values()].filter((r) => r.signal.is_degraded).length;
  let text = null, cls = "notice";
  if (rows.size === 0 && latestLoaded) {
    const last = cycles[0];
    if (!last) {
      text = nextTick ? "No signals yet: the first tick is at " + utc(nextTick) + " UTC." : "No signals yet.";
    } else if (last.skipped_reason) {
      text = "No signals yet: the tick at " + utc(last.cycle_id) + " UTC was skipped (" + last.skipped_reason + ").";
      cls = "notice bad";
    } else {
      const f = (last.failures || [])[0];
      text = "No signals yet: the tick at " + utc(last.cycle_id) + " UTC ran and " + last.symbols_failed +
        " symbols failed" + (f ? " — " + f.symbol + " " + f.reason + (f.error ? ": " + f.error : "") : "") + ".";
      cls = "notice bad";
    }
  } else if (degradedWhy || fallback > 0) {
    text = "DEGRADED: " + (fallback ? fallback + " of " + rows.size + " signals came from the rules fallback" : "") +
      (fallback && degradedWhy ? " — " : "") + (degradedWhy || "");
    cls = "notice bad";
  }
  n.hidden = text === null;
  n.className = cls;
  if (text !== null) n.textContent = text;
}

let cycles = [];
function addCycle(c) {
  cycles = [c].concat(cycles.filter((x) => x.cycle_id !== c.cycle_id));
  cycles.sort((a, b) => (a.cycle_id < b.cycle_id ? 1 : -1));
  renderCycles(cycles);
  updateNotice();
}

function pill(el, text, cls) {
  el.textContent = text;
  el.className = "pill " + cls;
}

async function refreshStatus() {
  try {
    const d = await (await fetch("/health/detailed")).json();
    const isReady = d.readiness && d.readiness.status === "ready";
    const isDegraded = d.readiness && d.readiness.degraded;
    pill($("ready"), isReady ? (isDegraded ? "ready, DEGRADED" : "ready") : "not ready", isReady ? (isDegraded ? "warn" : "ok") : "bad");
    const ks = d.kill_switch;
    pill($("killswitch"), ks ? "kill switch ON: " + (ks.reason || "") : "kill switch off", ks ? "bad" : "ok");
    const m = d.market_data || {};
    simulated = !!m.simulated;
    pill($("market"), m.simulated ? "market data: SIMULATED prices" : "market data: " + String(m.source || "?"), m.simulated ? "warn" : "ok");
    const box = $("breakers");
    box.textContent = "";
    for (const [name, b] of Object.entries(d.circuit_breakers || {})) {
      const span = document.createElement("span");
      pill(span, name + ": " + b.state, b.state === "closed" ? "ok" : b.state === "open" ? "bad" : "warn");
      box.appendChild(span);
    }
    nextTick = d.next_tick || null;
    const r = d.readiness || {};
    const reasons = Object.values(r.degraded_reasons || {});
    degradedWhy = r.degraded ? reasons.join("; ") || "serving fallback answers" : null;
    updateNotice();
  } catch (e) {
    pill($("ready"), "status unavailable", "warn");
  }
}

// ---- the symbol view: price with the signals as markers and their outcomes ----

function addSymbolOption(symbol) {
  const pick = $("symbol-pick");
  if ([...pick.options].some((o) => o.value === symbol)) return;
  const o = document.createElement("option");
  o.value = symbol;
  o.textContent = symbol;
  const after = [...pick.options].find((x) => x.value > symbol);
  pick.insertBefore(o, after || null);
  if (pick.options.length === 1) selectSymbol(symbol);
}

function selectSymbol(symbol) {
  $("symbol-pick").value = symbol;
  loadChart();
}

// Marker of one signal: filled when it hit at the first graded horizon, hollow when it
// missed, grey until graded.
function outcome(row) {
  const g = row.grades || {};
  for (const h of ["5m", "15m", "1h"]) {
    if (g[h] && typeof g[h].hit === "boolean") return g[h].hit ? "hit" : "miss";
  }
  return "pending";
}

// Digits a price axis needs for labels `step` apart to differ: whole labels, never a
// truncated 6,600 for 96,600 nor 0.362 six times.
function axisDecimals(step) {
  if (!(step > 0)) return 2;
  // The fewest decimals that write the step exactly (0.0025 needs 4, 500 needs 0).
  for (let d = 0; d < 8; d++) {
    const scaled = step * Math.pow(10, d);
    if (Math.abs(scaled - Math.round(scaled)) < 1e-6 * Math.max(1, scaled)) return d;
  }
  return 8;
}

function priceLabel(v, decimals) {
  return v.toLocaleString("en-US", { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
}

// HH:MM in UTC; where the day changes (and on the first label) the date goes on a second
// line, so neighbouring labels never run into each other.
function timeLabels(splits) {
  let day = null;
  return splits.map((ts) => {
    const iso = new Date(ts * 1000).toISOString();
    const d = iso.slice(0, 10), hm = iso.slice(11, 16);
    const label = d === day ? hm : hm + "\n" + d;
    day = d;
    return label;
  });
}

const COLORS = { up: "#2ea043", down: "#da3633", BUY: "#3fb950", SELL: "#f85149", pending: "#c9d1d9", bg: "#0f1419" };

// One triangle marker: ▲ below a BUY's price, ▼ above a SELL's; filled on a hit, hollow on a
// miss, grey while not graded. The same shapes the legend shows.
function triangle(ctx, x, y, up, size, kind, color) {
  ctx.beginPath();
  if (up) {
    ctx.moveTo(x, y); ctx.lineTo(x - size, y + 1.7 * size); ctx.lineTo(x + size, y + 1.7 * size);
  } else {
    ctx.moveTo(x, y); ctx.lineTo(x - size, y - 1.7 * size); ctx.lineTo(x + size, y - 1.7 * size);
  }
  ctx.closePath();
  ctx.lineWidth = 2;
  ctx.strokeStyle = kind === "pending" ? COLORS.pending : color;
  ctx.fillStyle = kind === "hit" ? color : kind === "miss" ? COLORS.bg : COLORS.pending;
  ctx.fill();
  ctx.stroke();
}

async function loadChart() {
  const symbol = $("symbol-pick").value;
  if (!symbol || typeof uPlot === "undefined") return;
  let candles, signals;
  try {
    const [rc, rs] = await Promise.all([
      fetch("/api/candles?minutes=240&symbol=" + encodeURIComponent(symbol)),
      fetch("/api/signals/history?stage=signal&limit=500&symbol=" + encodeURIComponent(symbol)),
    ]);
    if (!rc.ok) { $("chart-note").textContent = "candles unavailable: " + String((await rc.json()).error || rc.status); return; }
    candles = (await rc.json()).candles || [];
    signals = rs.ok ? (await rs.json()).signals || [] : [];
  } catch (e) { return; }
  const xs = [], open = [], high = [], low = [], close = [];
  for (const c of candles) {
    xs.push(Date.parse(c.time) / 1000);
    open.push(c.open); high.push(c.high); low.push(c.low); close.push(c.close);
  }
  // Each signal on the candle it saw: the minute that had ended at its tick.
  const first = xs.length ? xs[0] : Infinity;
  const marks = [];
  for (const row of signals) {
    const p = row.message && row.message.payload;
    if (!p || !p.market_context || (p.action !== "BUY" && p.action !== "SELL")) continue;
    const x = Date.parse(p.data_as_of) / 1000 - 60;
    if (x < first) continue;
    marks.push({ x, y: p.market_context.current_price, action: p.action, kind: outcome(row) });
  }
  const hits = marks.filter((m) => m.kind === "hit").length, misses = marks.filter((m) => m.kind === "miss").length;
  $("chart-note").textContent = xs.length + " one-minute candles, " + marks.length + " BUY/SELL signals (" +
    hits + " hit, " + misses + " missed, " + (marks.length - hits - misses) + " not graded yet)" + (simulated ? " — simulated prices" : "");
  const lo = Math.min(...low, ...marks.map((m) => m.y)), hi = Math.max(...high, ...marks.map((m) => m.y));
  const pad = (hi - lo) * 0.08 || hi * 0.001 || 1;
  let decimals = 2;
  const opts = {
    width: Math.min(960, document.body.clientWidth - 40), height: 300,
    legend: { show: false },
    cursor: { points: { show: false } },
    scales: { x: { time: true }, y: { range: [lo - pad, hi + pad] } },
    series: [{}, { label: symbol, stroke: "transparent", points: { show: false } }],
    axes: [
      { stroke: "#8a939c", grid: { stroke: "#253039" }, values: (u, splits) => timeLabels(splits) },
      {
        stroke: "#8a939c", grid: { stroke: "#253039" },
        values: (u, splits) => {
          decimals = axisDecimals(splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 0);
          return splits.map((v) => priceLabel(v, decimals));
        },
        // Wide enough for the longest label: a cut label reads as another number.
        size: (u, values) => 18 + 7.5 * Math.max(4, ...(values || []).map((v) => String(v).length)),
      },
    ],
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        const w = Math.max(1, Math.min(8, (u.bbox.width / Math.max(1, xs.length)) * 0.7));
        for (let i = 0; i < xs.length; i++) {
          const x = u.valToPos(xs[i] + 30, "x", true);
          const color = close[i] >= open[i] ? COLORS.up : COLORS.down;
          ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1;
          ctx.beginPath();
          ctx.moveTo(x, u.valToPos(high[i], "y", true));
          ctx.lineTo(x, u.valToPos(low[i], "y", true));
          ctx.stroke();
          const y1 = u.valToPos(Math.max(open[i], close[i]), "y", true);
          const y2 = u.valToPos(Math.min(open[i], close[i]), "y", true);
          ctx.fillRect(x - w / 2, y1, w, Math.max(1, y2 - y1));
        }
        for (const m of marks) {
          const x = u.valToPos(m.x + 30, "x", true), y = u.valToPos(m.y, "y", true);
          const buy = m.action === "BUY";
          triangle(ctx, x, buy ? y + 6 : y - 6, buy, 5, m.kind, buy ? COLORS.BUY : COLORS.SELL);
        }
        ctx.restore();
      }],
    },
  };
  const el = $("chart");
  el.textContent = "";
  chart = new uPlot(opts, [xs, close], el);
  el.dataset.candles = String(xs.length);
  el.dataset.markers = String(marks.length);
  el.dataset.hits = String(hits);
  el.dataset.misses = String(misses);
}

// ---- the scorecard and the calibration chart ----

async function loadScorecard() {
  const h = $("horizon").value, g = $("group-by").value;
  let d;
  try {
    const r = await fetch("/api/performance?horizon=" + encodeURIComponent(h) + "&group_by=" + encodeURIComponent(g));
    if (!r.ok) { $("score-note").textContent = "history unavailable"; return; }
    d = await r.json();
  } catch (e) { return; }
  const body = $("scorecard").tBodies[0];
  body.textContent = "";
  for (const s of d.groups || []) {
    const tr = document.createElement("tr");
    cell(tr, String(s.key));
    cell(tr, String(s.graded), "num");
    cell(tr, pct(s.hit_rate), "num");
    cell(tr, pct(s.hit_rate_ci95[0]) + " – " + pct(s.hit_rate_ci95[1]), "num");
    cell(tr, pct(s.mean_return), "num");
    cell(tr, pct(s.median_return), "num");
    cell(tr, Number(s.brier).toFixed(3), "num");
    // Skill against knowing only the base rate: above 0 is better.
    cell(tr, typeof s.brier_skill === "number" ? s.brier_skill.toFixed(2) : "—", "num");
    const c = s.calibrated;
    const cb = cell(tr, c ? Number(c.brier).toFixed(3) : "—", "num");
    if (c) cb.title = c.graded + " graded with a calibrated confidence; skill " +
      (typeof c.brier_skill === "number" ? c.brier_skill.toFixed(2) : "—");
    const b = s.baselines;
    const bs = cell(tr, b ? (b.skill >= 0 ? "+" : "") + pct(b.skill) + " (" + pct(b.skill_ci95[0]) + " – " + pct(b.skill_ci95[1]) + ")" : "—", "num");
    if (b) bs.title = "against " + b.best.replace("_", " ") + ": always HOLD hit " + pct(b.always_hold) +
      ", momentum " + pct(b.momentum) + ", these signals " + pct(b.hit_rate) + " of " + b.graded;
    body.appendChild(tr);
  }
  $("score-note").textContent = d.graded + " graded since " + String(d.since || "").slice(0, 16).replace("T", " ") + " UTC" +
    (d.missing_price ? ", " + d.missing_price + " without a price" : "") +
    (d.market_data && d.market_data.simulated ? " — against simulated prices" : "");
  $("scorecard").dataset.groups = String((d.groups || []).length);
  drawCalibration(d.groups || []);
}

function drawCalibration(groups) {
  // All groups together: per confidence bucket, the observed hit rate.
  const buckets = new Map();
  for (const g of groups) {
    for (const b of g.calibration || []) {
      const e = buckets.get(b.bucket) || { n: 0, hits: 0, conf: 0 };
      e.n += b.count; e.hits += b.hit_rate * b.count; e.conf += b.mean_confidence * b.count;
      buckets.set(b.bucket, e);
    }
  }
  const keys = [...buckets.keys()].sort();
  const xs = keys.map((k) => buckets.get(k).conf / buckets.get(k).n);
  const ys = keys.map((k) => buckets.get(k).hits / buckets.get(k).n);
  const el = $("calibration");
  el.textContent = "";
  el.dataset.buckets = String(keys.length);
  if (typeof uPlot === "undefined" || xs.length === 0) {
    el.textContent = "Nothing graded yet.";
    return;
  }
  calib = new uPlot({
    width: 360, height: 240, mode: 1,
    scales: { x: { time: false, range: [0, 1] }, y: { range: [0, 1] } },
    series: [
      {},
      { label: "observed hit rate", stroke: "#4b6584", width: 1.5, points: { show: true, size: 7 } },
      { label: "perfect", stroke: "#aaa", dash: [4, 4], points: { show: false } },
    ],
    axes: [{ label: "stated confidence" }, { label: "hit rate" }],
  }, [xs, ys, xs], el);
}

// ---- the live stream ----

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
    // A tick ended: new signals to chart, maybe new grades to count.
    loadChart();
    loadScorecard();
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

// What exists already is shown first (a page opened between ticks is never empty), then the
// stream keeps it current.
async function loadLatest() {
  let cursor = null;
  for (let page = 0; page < 20; page++) {
    const r = await fetch("/api/signals/latest?limit=500" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    if (!r.ok) return;
    const d = await r.json();
    for (const s of d.signals || []) renderSignal({ payload: s });
    cursor = d.next_cursor;
    if (!cursor) return;
  }
}

async function start() {
  // The status first (prices are marked simulated from the first row on), but the notice
  // may say there is nothing only once what exists is loaded: no "No signals yet" flashing
  // over a page that has signals.
  await refreshStatus();
  try { await loadLatest(); } catch (e) { /* the stream fills it */ }
  try { renderCycles(cycles = (await (await fetch("/api/cycles")).json()).cycles || []); } catch (e) { /* later */ }
  latestLoaded = true;
  updateNotice();
  $("symbol-pick").addEventListener("change", loadChart);
  $("horizon").addEventListener("change", loadScorecard);
  $("group-by").addEventListener("change", loadScorecard);
  loadScorecard();
  connect();
  setInterval(tick, 1000);
  setInterval(refreshStatus, 15000);
}

start();
