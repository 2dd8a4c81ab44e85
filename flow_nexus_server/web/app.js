// The dashboard: one server-sent-event feed (a snapshot, then deltas at most twice a second),
// rendered into plain HTML; charts drawn on canvas. No request but the feed after the page loads.
"use strict";

const data = { state: null, points: new Map(), lastPoint: 0, events: [], lastEvent: 0, skew: 0 };
const open = new Set(); // sessions whose details the person opened (kept across re-renders)
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const $ = (id) => document.getElementById(id);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function num(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString();
  const text = Number(v).toPrecision(digits);
  return text.includes(".") && !text.includes("e") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
}
function bytes(v) { return v == null ? "–" : (v / 1048576).toFixed(0) + " MiB"; }
function secs(v) {
  if (v == null) return "–";
  v = Math.max(0, v);
  return v < 90 ? v.toFixed(v < 10 ? 1 : 0) + " s" : v < 5400 ? (v / 60).toFixed(1) + " min" : (v / 3600).toFixed(1) + " h";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function serverNow() { return Date.now() / 1000 - data.skew; }

// ---------------------------------------------------------------- feed
function take(message) {
  if (message.now) data.skew = Date.now() / 1000 - message.now;
  if (message.state) data.state = message.state;
  for (const [id, session, node, name, epoch, value] of message.points || []) {
    if (id <= data.lastPoint) continue;
    data.lastPoint = id;
    const key = name === "local_loss" ? "local_loss/" + node : name;
    if (!data.points.has(session)) data.points.set(session, new Map());
    const series = data.points.get(session);
    if (!series.has(key)) series.set(key, []);
    series.get(key).push([epoch, value]);
  }
  for (const e of message.events || []) {
    if (e.id <= data.lastEvent) continue;
    data.lastEvent = e.id;
    data.events.push(e);
  }
  if (data.events.length > 300) data.events.splice(0, data.events.length - 300);
  render();
}

function connect() {
  const feed = new EventSource("/dashboard/feed");
  feed.addEventListener("snapshot", (ev) => {
    data.points = new Map(); data.lastPoint = 0; data.events = []; data.lastEvent = 0;
    take(JSON.parse(ev.data));
    setStatus("live", "live");
  });
  feed.addEventListener("delta", (ev) => take(JSON.parse(ev.data)));
  feed.onerror = () => {
    // EventSource retries by itself; a closed feed (expired session: 401) does not come back.
    if (feed.readyState === EventSource.CLOSED) setStatus("down", "disconnected: open a new login link");
    else setStatus("down", "reconnecting");
  };
}
function setStatus(cls, text) { const b = $("feed-status"); b.className = "badge " + cls; b.textContent = text; }

// ---------------------------------------------------------------- rendering
function render() {
  const s = data.state;
  if (!s) return;
  renderClusters(s.clusters);
  renderSessions(s.sessions);
  renderEvents();
  renderCheckpoints(s.checkpoints);
}

function renderClusters(clusters) {
  if (!clusters.length) { $("clusters").innerHTML = '<p class="empty">No cluster yet.</p>'; return; }
  const now = serverNow();
  $("clusters").innerHTML = clusters.map((c) => `
    <div class="card" data-cluster-id="${esc(c.cluster_id)}">
      <h3>${esc(c.name)} <span class="muted">${esc(c.cluster_id)}</span>
        <span class="st-${esc(c.status)}">${esc(c.status)}</span>
        <span class="muted">${esc(c.topology)} · ${esc(c.consensus)} · ${esc(c.launcher)}</span></h3>
      ${c.nodes.length ? `<table><thead><tr><th>node</th><th>role</th><th>rank</th><th>host</th><th>pid</th>
        <th>RSS</th><th>heartbeat age</th><th>state</th><th>job</th></tr></thead><tbody>
        ${c.nodes.map((n) => `<tr data-node-id="${esc(n.node_id)}" data-status="${esc(n.status)}">
          <td>${esc(n.node_id)}</td><td>${esc(n.role)}</td><td class="num">${n.rank ?? "–"}</td>
          <td>${esc(n.host ?? "–")}</td><td class="num">${n.pid ?? "–"}</td><td class="num">${bytes(n.rss_bytes)}</td>
          <td class="num age" data-seen="${n.seen ?? ""}">${n.seen ? secs(now - n.seen) : "–"}</td>
          <td class="st-${esc(n.status)}" title="${esc(n.error ?? "")}">${esc(n.status)}</td>
          <td>${esc(n.job_state ?? "–")}</td></tr>`).join("")}
        </tbody></table>` : '<p class="empty">No node.</p>'}
    </div>`).join("");
}

function renderSessions(sessions) {
  if (!sessions.length) { $("sessions").innerHTML = '<p class="empty">No training session yet.</p>'; return; }
  $("sessions").innerHTML = sessions.map((t) => {
    const live = t.live || {};
    const m = live.metrics || t.final_metrics || {};
    const series = data.points.get(t.session_id) || new Map();
    const count = [...series.values()].reduce((a, pts) => a + pts.length, 0);
    const running = t.status === "running";
    const unit = t.config.federated ? "round" : "epoch";
    const isOpen = running || open.has(t.session_id);
    return `<details class="card" data-session-id="${esc(t.session_id)}" data-status="${esc(t.status)}"
        data-points="${count}" ${isOpen ? "open" : ""}>
      <summary><b>${esc(t.session_id)}</b> <span class="st-${esc(t.status)}">${esc(t.status)}</span>
        <span class="muted">on ${esc(t.cluster_id)} · ${esc(t.config.mode ?? "")} · ${esc(t.config.architecture ?? "")}
        · ${esc(t.config.dataset ?? "")} · started ${clock(t.created_at)}</span></summary>
      <div class="figures">
        <span>${unit} <b>${live.epoch ?? m.epochs_done ?? "–"}</b> / ${live.total_epochs ?? t.config.rounds ?? t.config.epochs ?? "–"}</span>
        ${running ? `<span><span class="bar"><i data-pct="${live.progress_pct ?? 0}"></i></span> ${num(live.progress_pct ?? 0, 3)} %</span>` : ""}
        <span>loss <b>${num(m.loss)}</b></span>
        <span>accuracy <b>${num(m.val_accuracy ?? m.accuracy)}</b></span>
        ${m.val_perplexity != null ? `<span>perplexity <b>${num(m.val_perplexity)}</b></span>` : ""}
        <span>throughput <b>${num(m.samples_per_s, 3)}</b> samples/s</span>
        <span>elapsed <b>${secs(live.elapsed_s ?? m.elapsed_s)}</b></span>
        ${running ? `<span>ETA <b>${secs(live.eta_s)}</b></span>` : ""}
      </div>
      ${t.error ? `<p class="error">${esc(t.error)}</p>` : ""}
      <div class="charts">${chartsOf(series).map((c, i) =>
        `<canvas width="330" height="190" data-chart="${i}"></canvas>`).join("")}</div>
    </details>`;
  }).join("");
  // Set through the DOM: the page's CSP allows no inline style attribute.
  for (const bar of document.querySelectorAll("#sessions .bar > i")) bar.style.width = bar.dataset.pct + "%";
  for (const el of document.querySelectorAll("#sessions details")) {
    const series = data.points.get(el.dataset.sessionId) || new Map();
    const charts = chartsOf(series);
    el.querySelectorAll("canvas").forEach((cv, i) => draw(cv, charts[i]));
    el.addEventListener("toggle", () => el.open ? open.add(el.dataset.sessionId) : open.delete(el.dataset.sessionId));
  }
}

function chartsOf(series) {
  const pick = (names) => names.filter((n) => series.has(n)).map((n) => ({ label: n, pts: series.get(n) }));
  const workers = [...series.keys()].filter((k) => k.startsWith("local_loss/"))
    .map((k) => ({ label: k.slice(11), pts: series.get(k) }));
  return [
    { title: "loss", lines: pick(["loss", "val_loss"]) },
    { title: "accuracy", lines: pick(["accuracy", "val_accuracy", "val_f1_macro"]) },
    { title: "perplexity", lines: pick(["val_perplexity", "unigram_perplexity"]) },
    { title: "loss per worker", lines: workers },
    { title: "throughput (samples/s)", lines: pick(["samples_per_s"]) },
  ].filter((c) => c.lines.length);
}

function draw(canvas, chart) {
  const g = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 46, R = 8, T = 22, B = 34;
  g.clearRect(0, 0, W, H);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#1d2330";
  g.fillText(chart.title, L, 14);
  const all = chart.lines.flatMap((l) => l.pts).filter((p) => p[1] !== null);
  if (!all.length) return;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  g.strokeStyle = "#dde1ea"; g.fillStyle = "#6b7385";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    g.beginPath(); g.moveTo(L, Y(y)); g.lineTo(W - R, Y(y)); g.stroke();
    g.fillText(num(y, 3), 2, Y(y) + 4);
  }
  g.fillText(String(x0), L, H - B + 14);
  g.fillText(String(x1), W - R - g.measureText(String(x1)).width, H - B + 14);
  chart.lines.forEach((line, i) => {
    g.strokeStyle = g.fillStyle = COLORS[i % COLORS.length];
    g.beginPath();
    line.pts.filter((p) => p[1] !== null).forEach(([x, y], j) => j ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y)));
    g.stroke();
    for (const [x, y] of line.pts) if (y !== null) g.fillRect(X(x) - 1.5, Y(y) - 1.5, 3, 3);
    g.fillText(line.label, L + (i % 3) * 95, H - 6 - Math.floor(i / 3) * 0);
  });
}

function renderEvents() {
  $("events").innerHTML = data.events.slice().reverse().map((e) =>
    `<li data-kind="${esc(e.kind)}"><time>${clock(e.time)}</time><b>${esc(e.kind)}</b> ${esc(e.message)}</li>`).join("")
    || '<li class="empty">No event yet.</li>';
}

function renderCheckpoints(checkpoints) {
  $("checkpoints").innerHTML = checkpoints.length ? `<table><thead><tr><th>checkpoint</th><th>session</th>
    <th>epoch</th><th>node</th><th>saved</th><th>file</th></tr></thead><tbody>${checkpoints.map((k) => `<tr>
    <td>${esc(k.checkpoint_id)}</td><td>${esc(k.session_id)}</td><td class="num">${k.epoch}</td><td>${esc(k.node_id)}</td>
    <td>${clock(k.created_at)}</td><td class="muted clip" title="${esc(k.path)}">${k.deleted ? "deleted" : esc(k.path.split("/").pop())}</td></tr>`).join("")}
    </tbody></table>` : '<p class="empty">No checkpoint yet.</p>';
}

// Heartbeat ages move every second without a message: computed here, no request.
setInterval(() => {
  const now = serverNow();
  for (const td of document.querySelectorAll("td.age[data-seen]")) {
    if (td.dataset.seen) td.textContent = secs(now - Number(td.dataset.seen));
  }
}, 1000);

connect();
