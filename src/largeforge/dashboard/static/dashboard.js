// LargeForge dashboard: plain JavaScript over the dashboard's JSON API and event streams.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = {
  num: (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  int: (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", {maximumFractionDigits: 0})),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"),
  dur: (s) => {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },
};

function toast(text) {
  const el = $("#toast");
  el.textContent = text;
  el.style.display = "block";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.style.display = "none"), 4000);
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok && response.status !== 422) throw new Error(data.error || response.statusText);
  return {status: response.status, data};
}

const pill = (status) => `<span class="pill ${esc(status)}">${esc(String(status).replace("_", " "))}</span>`;
const runLink = (row) => `/run?dir=${encodeURIComponent(row.dir)}`;

// -- runs -------------------------------------------------------------------------------------
function runsPage() {
  let rows = JSON.parse($("#initial-runs").textContent);
  let sortKey = "started_ts", ascending = false;
  const selected = new Set();
  const tbody = $("#runs tbody");

  function render() {
    const text = $("#filter").value.trim().toLowerCase();
    const status = $("#status-filter").value;
    const shown = rows.filter((r) => (!status || r.status === status) &&
      (!text || [r.name, r.kind, r.model, r.status].join(" ").toLowerCase().includes(text)));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    tbody.innerHTML = shown.map((r) => `<tr data-dir="${esc(r.dir)}">
      <td><input type="checkbox" class="pick" ${selected.has(r.dir) ? "checked" : ""} aria-label="select ${esc(r.name)}"></td>
      <td><a href="${runLink(r)}">${esc(r.name)}</a></td>
      <td class="kind">${esc(r.kind)}</td><td>${pill(r.status)}</td>
      <td>${esc(r.started || "–")}</td><td class="num">${fmt.dur(r.duration_s)}</td>
      <td class="num steps">${r.step ?? "–"}${r.max_steps ? " / " + r.max_steps : ""}</td>
      <td class="num">${fmt.num(r.best_val_loss)}</td><td class="num">${fmt.int(r.tokens_per_s)}</td>
      <td class="mono">${esc(r.model || "–")}</td></tr>`).join("");
    $("#no-runs").hidden = rows.length > 0;
    $("#compare-selected").disabled = selected.size < 2;
  }
  tbody.addEventListener("change", (e) => {
    if (!e.target.classList.contains("pick")) return;
    const dir = e.target.closest("tr").dataset.dir;
    e.target.checked ? selected.add(dir) : selected.delete(dir);
    $("#compare-selected").disabled = selected.size < 2;
  });
  $$("#runs th.sortable").forEach((th) => th.addEventListener("click", () => {
    ascending = sortKey === th.dataset.key ? !ascending : true;
    sortKey = th.dataset.key;
    $$("#runs th").forEach((h) => h.classList.remove("sorted", "asc"));
    th.classList.add("sorted");
    if (ascending) th.classList.add("asc");
    render();
  }));
  $("#filter").addEventListener("input", render);
  $("#status-filter").addEventListener("change", render);
  $("#compare-selected").addEventListener("click", () => {
    location.href = "/compare?" + [...selected].map((d) => "dir=" + encodeURIComponent(d)).join("&");
  });
  const events = new EventSource("/api/runs/events");
  events.addEventListener("runs", (e) => {
    const data = JSON.parse(e.data);
    rows = data.runs;
    $("#notice").hidden = !data.notice;
    $("#notice").textContent = data.notice || "";
    render();
  });
  render();
}

// -- charts -----------------------------------------------------------------------------------
const LAYOUT = {margin: {l: 48, r: 12, t: 8, b: 34}, showlegend: true, legend: {orientation: "h", y: -0.2},
  font: {size: 11}, xaxis: {title: {text: "step"}, gridcolor: "#eef0f4"}, yaxis: {gridcolor: "#eef0f4"},
  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)"};
const CONFIG = {displayModeBar: false, responsive: true};
const BASE_KEYS = new Set(["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "val_loss", "val_ppl"]);

function chart(id, traces, extra = {}) {
  Plotly.newPlot(id, traces, {...LAYOUT, ...extra}, CONFIG);
}

// -- one run ----------------------------------------------------------------------------------
function runPage() {
  const root = $("#run-root");
  const dir = root.dataset.dir;
  const line = (name, color, dash) => ({x: [], y: [], name, mode: "lines", line: {color, width: 2, dash}});
  let extraTraces = {};
  function initCharts() {
    chart("chart-loss", [line("train", "#6366f1"), {...line("val", "#f59e0b"), mode: "lines+markers"}]);
    chart("chart-lr", [line("lr", "#0ea5e9")], {showlegend: false});
    chart("chart-speed", [line("tokens/s", "#10b981")], {showlegend: false});
    chart("chart-mfu", [line("MFU", "#a855f7")], {showlegend: false, yaxis: {tickformat: ".1%", gridcolor: "#eef0f4"}});
    chart("chart-grad", [line("grad norm", "#ef4444")], {showlegend: false});
    chart("chart-extra", []);
    extraTraces = {};
    $("#extra-panel").hidden = true;
  }
  initCharts();
  let maxSteps = Number($("#max-steps").textContent) || null;

  function add(records) {
    const series = {loss: [[], []], val: [[], []], lr: [[], []], speed: [[], []], mfu: [[], []], grad: [[], []]};
    const push = (k, x, y) => { if (y !== null && y !== undefined) { series[k][0].push(x); series[k][1].push(y); } };
    let last = null, lastVal = null;
    for (const r of records) {
      if ("val_loss" in r) { push("val", r.step, r.val_loss); lastVal = r; continue; }
      push("loss", r.step, r.loss); push("lr", r.step, r.lr); push("speed", r.step, r.tokens_per_s);
      push("mfu", r.step, r.mfu); push("grad", r.step, r.grad_norm);
      for (const [k, v] of Object.entries(r)) {
        if (BASE_KEYS.has(k) || typeof v !== "number") continue;
        if (!(k in extraTraces)) {
          extraTraces[k] = Object.keys(extraTraces).length;
          $("#extra-panel").hidden = false;
          Plotly.addTraces("chart-extra", {x: [], y: [], name: k, mode: "lines"});
        }
        Plotly.extendTraces("chart-extra", {x: [[r.step]], y: [[v]]}, [extraTraces[k]]);
      }
      last = r;
    }
    const extend = (id, pairs, idx) => { if (pairs.some((p) => p[0].length)) Plotly.extendTraces(id, {x: pairs.map((p) => p[0]), y: pairs.map((p) => p[1])}, idx); };
    extend("chart-loss", [series.loss, series.val], [0, 1]);
    extend("chart-lr", [series.lr], [0]); extend("chart-speed", [series.speed], [0]);
    extend("chart-mfu", [series.mfu], [0]); extend("chart-grad", [series.grad], [0]);
    if (last) {
      $("#step").textContent = last.step; $("#loss").textContent = fmt.num(last.loss);
      $("#speed").textContent = fmt.int(last.tokens_per_s); $("#mfu").textContent = fmt.pct(last.mfu);
      setProgress(last.step);
    }
    if (lastVal) $("#val-loss").textContent = fmt.num(lastVal.val_loss);
  }
  function setProgress(step) {
    if (maxSteps) $("#progress").style.width = Math.min(100, (100 * step) / maxSteps) + "%";
  }
  let shownStatus = null;
  async function refreshDetails() {
    // What a run writes once (recipe, hardware) and at each checkpoint: read again whenever
    // the status changes, so a page opened before the run started fills in.
    try {
      const {data} = await api("/api/run?dir=" + encodeURIComponent(dir));
      $("#recipe").textContent = data.recipe_text || "";
      $("#started").textContent = data.row.started || "?";
      $("#model-source").textContent = data.row.model || "";
      const facts = {...((data.state && data.state.hardware) || {})};
      if (data.state && data.state.parameters) facts.parameters = fmt.int(data.state.parameters);
      $("#hardware").innerHTML = Object.entries(facts).map(([k, v]) =>
        `<dt>${esc(k.replace(/_/g, " "))}</dt><dd>${esc(v)}</dd>`).join("") || '<dt>–</dt><dd class="small">Recorded when training starts.</dd>';
      $("#checkpoints tbody").innerHTML = data.checkpoints.map((c) => `<tr><td class="mono">${esc(c.name)}${c.latest ? ' <span class="pill">latest</span>' : ""}</td>
        <td class="num">${esc(c.size)}</td><td><a href="/try?run=${encodeURIComponent(dir)}&model=${encodeURIComponent(c.path)}">try</a></td></tr>`).join("") ||
        '<tr><td colspan="3" class="small">No checkpoints yet.</td></tr>';
      $("#actions tbody").innerHTML = data.actions.map((a) => `<tr><td>${esc(a.time)}</td><td>${esc(a.action)}</td><td class="mono">${esc(a.detail)}</td></tr>`).join("") ||
        '<tr><td colspan="3" class="small">Nothing done from the dashboard yet.</td></tr>';
    } catch (err) { /* the next status change tries again */ }
  }
  function setStatus(s) {
    if (s.status !== shownStatus) { shownStatus = s.status; refreshDetails(); }
    const el = $("#status");
    el.className = "pill " + s.status;
    el.textContent = s.status.replace("_", " ");
    if (s.max_steps) { maxSteps = s.max_steps; $("#max-steps").textContent = s.max_steps; }
    if (s.step !== null && s.step !== undefined) { $("#step").textContent = s.step; setProgress(s.step); }
    const running = s.status === "running" || s.status === "starting";
    $("#stop").disabled = !running;
    $("#resume").disabled = running || s.status === "completed";
  }
  let events;
  function listen() {
    events = new EventSource("/api/run/metrics?dir=" + encodeURIComponent(dir));
    events.addEventListener("records", (e) => add(JSON.parse(e.data)));
    events.addEventListener("status", (e) => setStatus(JSON.parse(e.data)));
    events.addEventListener("end", () => events.close());
  }
  listen();
  const act = (button, path, then) => $(button).addEventListener("click", async () => {
    $(button).disabled = true;
    try {
      const {data} = await api(path, {dir});
      toast(data.message || "started: " + (data.job ? data.job.command : ""));
      if (then) then(data);
    } catch (err) { toast(err.message); $(button).disabled = false; }
  });
  act("#stop", "/api/run/stop");
  act("#resume", "/api/run/resume", () => {
    // A resumed run cuts its log back to the checkpoint: redraw from the file on fresh charts.
    events.close();
    initCharts();
    listen();
  });
  act("#cleanup", "/api/run/cleanup", () => { refreshDetails(); $("#cleanup").disabled = false; });
}

// -- compare ----------------------------------------------------------------------------------
async function comparePage() {
  const root = $("#compare-root");
  if (!root) return;
  const dirs = JSON.parse(root.dataset.dirs);
  const {data} = await api("/api/compare?" + dirs.map((d) => "dir=" + encodeURIComponent(d)).join("&"));
  const names = Object.fromEntries(data.runs.map((r) => [r.dir, r.name]));
  function draw() {
    const axis = $("#x-axis").value;
    const traces = (val) => dirs.map((d) => {
      // Evaluation records carry no token count: they take that of the step they follow.
      let tokens = 0;
      const x = [], y = [];
      for (const r of data.series[d] || []) {
        const isVal = "val_loss" in r;
        if (!isVal && r.tokens !== undefined && r.tokens !== null) tokens = r.tokens;
        if (isVal !== val || (!isVal && !("loss" in r))) continue;
        x.push(axis === "step" ? r.step : tokens);
        y.push(isVal ? r.val_loss : r.loss);
      }
      return {x, y, name: names[d], mode: val ? "lines+markers" : "lines"};
    });
    const layout = {xaxis: {title: {text: axis}, gridcolor: "#eef0f4"}};
    chart("cmp-loss", traces(false), layout);
    chart("cmp-val", traces(true), layout);
  }
  $("#x-axis").addEventListener("change", draw);
  draw();
}

// -- launch -----------------------------------------------------------------------------------
function launchPage() {
  const form = $("#launch-form");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    $$(".field-error", form).forEach((el) => (el.textContent = ""));
    $$(".field", form).forEach((el) => el.classList.remove("invalid"));
    const values = Object.fromEntries(new FormData(form).entries());
    $("#launch").disabled = true;
    $("#launch-state").textContent = "checking (--verify-only)…";
    try {
      const {status, data} = await api("/api/launch", {command: form.getAttribute("data-command"), values});
      if (status === 422) {
        for (const [name, message] of Object.entries(data.errors)) {
          const el = $(`.field-error[data-for="${name}"]`, form) || $("#form-error");
          el.textContent = message;
          const field = $(`.field[data-field="${name}"]`, form);
          if (field) field.classList.add("invalid");
        }
        $("#launch-state").textContent = "nothing was started";
        return;
      }
      $("#launch-state").textContent = "started";
      location.href = "/run?dir=" + encodeURIComponent(data.run_dir);
    } catch (err) {
      $("#form-error").textContent = err.message;
      $("#launch-state").textContent = "";
    } finally {
      $("#launch").disabled = false;
    }
  });
}

// -- try & ship -------------------------------------------------------------------------------
function jobView(job) {
  let body = "";
  if (job.kind === "eval" && job.result && job.result.metrics) {
    body = `<table class="eval-table"><tbody>${Object.entries(job.result.metrics).map(([k, v]) =>
      `<tr><td>${esc(k)}</td><td class="num">${typeof v === "number" ? v.toFixed(4) : esc(v)}</td></tr>`).join("")}</tbody></table>`;
  }
  if (job.kind === "export" && job.result && job.result.detail) {
    body = `<div class="proof ${job.result.ok ? "" : "bad"}"><b>${job.result.ok ? "checked" : "check failed"}</b> in ${esc(job.result.runtime)}: ${esc(job.result.detail)}</div>
      <div class="small mono">${esc(job.target)}</div>`;
  }
  if (job.kind === "serve") {
    body = `<div class="mono">${esc(job.target)}/v1</div>` + (job.status === "running" ? `<button class="danger stop-server" data-job="${esc(job.id)}">Stop server</button>` : "");
  }
  const failed = job.status === "failed" ? `<pre>${esc(job.log_tail.slice(-1200))}</pre>` : "";
  return `<div class="job" data-job="${esc(job.id)}" data-status="${esc(job.status)}">${pill(job.status)} <span class="cmd">${esc(job.command)}</span>${body}${failed}</div>`;
}

function watchJobs(kind, container, filter) {
  async function refresh() {
    try {
      const {data} = await api("/api/jobs?kind=" + kind);
      const jobs = data.filter(filter).slice(0, 4);
      container.innerHTML = jobs.map(jobView).join("");
      const settling = jobs.some((j) => j.status === "running" && kind !== "serve") ||
        jobs.some((j) => j.status === "done" && kind !== "serve" && (!j.result || !Object.keys(j.result).length));
      setTimeout(refresh, settling ? 1000 : 4000);
    } catch (err) { setTimeout(refresh, 5000); }
  }
  refresh();
}

function tryPage() {
  const modelSelect = $("#model");
  const run = modelSelect.dataset.run || null;
  const model = () => $("#model-other").value.trim() || modelSelect.value;
  const log = $("#chat-log");
  let messages = [];

  async function describe() {
    if (!model()) return;
    try {
      const {data} = await api("/api/model?model=" + encodeURIComponent(model()));
      if (!data.has_chat_template && !$("#template").value) {
        $("#template").value = "none";
        $("#template-note").textContent = "This model has no chat template: the playground continues your text (plain completion). Pick a template to chat anyway.";
      } else { $("#template-note").textContent = ""; }
    } catch (err) { $("#template-note").textContent = err.message; }
  }
  modelSelect.addEventListener("change", describe);
  $("#model-other").addEventListener("change", describe);
  describe();

  function bubble(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    el.textContent = text;
    log.appendChild(el);
    log.scrollTop = log.scrollHeight;
    return el;
  }
  $("#chat-reset").addEventListener("click", () => { messages = []; log.innerHTML = ""; });
  $("#chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("#chat-input").value.trim();
    if (!text) return;
    $("#chat-input").value = "";
    messages.push({role: "user", content: text});
    bubble("user", text);
    const out = bubble("assistant streaming", "");
    const response = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: model(), messages, template: $("#template").value || null,
        temperature: Number($("#temperature").value), top_p: Number($("#top-p").value),
        max_new_tokens: Number($("#max-tokens").value)})});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", reply = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (event === "token") {
          reply += data.text;
          out.textContent = reply;
          out.dataset.pieces = Number(out.dataset.pieces || 0) + 1;
          log.scrollTop = log.scrollHeight;
        }
        if (event === "error") { out.textContent = "error: " + data.error; out.classList.add("error"); }
      }
    }
    out.classList.remove("streaming");
    out.dataset.done = "1";
    messages.push({role: "assistant", content: reply});
  });

  const start = (button, path, body) => $(button).addEventListener("click", async () => {
    try { await api(path, {model: model(), run, ...body()}); toast("started"); }
    catch (err) { toast(err.message); }
  });
  start("#eval-run", "/api/eval", () => ({data: $("#eval-data").value.trim(), max_examples: Number($("#eval-n").value)}));
  start("#export-run", "/api/export", () => ({format: $("#export-format").value}));
  start("#serve-start", "/api/serve", () => ({}));
  const mine = (j) => !run || j.run_dir === run;
  watchJobs("eval", $("#eval-jobs"), mine);
  watchJobs("export", $("#export-jobs"), mine);
  watchJobs("serve", $("#serve-jobs"), mine);
  document.addEventListener("click", stopServer);
}

async function stopServer(e) {
  if (!e.target.classList.contains("stop-server")) return;
  try { await api("/api/serve/stop", {job: e.target.dataset.job}); toast("server stopped"); }
  catch (err) { toast(err.message); }
}

function servingPage() {
  watchJobs("serve", $("#servers"), () => true);
  document.addEventListener("click", stopServer);
  $("#router-check").addEventListener("click", async () => {
    const out = $("#router-state");
    try {
      const {data} = await api("/api/router?url=" + encodeURIComponent($("#router-url").value.trim()));
      const experts = Object.entries(data.experts || {}).map(([name, e]) => `<tr><td>${esc(name)}</td>
        <td><span class="pill ${e.available ? "completed" : "failed"}">${e.available ? "available" : "unavailable"}</span></td>
        <td class="mono">${(e.replicas || []).map((r) => esc(Object.entries(r).map(([k, v]) => k + "=" + v).join(" "))).join("<br>")}</td></tr>`).join("");
      const look = {ok: "completed", degraded: "stopped"}[data.status] || "failed";
      out.innerHTML = `<div>router <span class="pill ${look}">${esc(data.status)}</span>
        · routing ${esc(data.routing)} · fallback ${esc(data.fallback)}</div>
        <table id="router-experts"><thead><tr><th>Expert</th><th>State</th><th>Replicas</th></tr></thead><tbody>${experts}</tbody></table>`;
    } catch (err) { out.textContent = err.message; }
  });
}

const PAGES = {runs: runsPage, run: runPage, compare: comparePage, launch: launchPage, try: tryPage, serving: servingPage};
const start = PAGES[document.body.dataset.page];
if (start) start();
