// The wmgr dashboard: a client of the daemon's public JSON APIs, authorised by the session cookie
// that POST /ui/login sets. Live counts come from GET /ui/events (Server-Sent Events); there is
// no polling loop. Every value from the daemon reaches the page through textContent or an
// attribute, never as HTML: a command may hold "<script>".
"use strict";

const STATES = ["complete", "buried", "lost", "running", "ready", "dependent", "delayed"];
const PAGE = 10; // jobs per page
// wr's limit=N has no offset: page p asks for the first (p+1)*PAGE jobs. Paging stops at the
// first MAX_LISTED jobs of a category, so that no request lists a whole 100,000-job group.
const MAX_LISTED = 1000;
const CHART_SAMPLE = 200; // completed jobs drawn per chart
const $ = (id) => document.getElementById(id);

let events = null; // the EventSource
let latest = { groups: {}, warnings: [] };
let selected = null; // the rep group shown in detail
let category = null; // {state, exitcode, reason, count} whose jobs are listed
let page = 0;
let refreshTimer = null;
let lastLoadMs = 0; // how long the open group's listing last took

// -- small helpers --------------------------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function button(label, onClick, className) {
  const b = el("button", label, className);
  b.type = "button";
  b.addEventListener("click", (event) => { event.stopPropagation(); onClick(); });
  return b;
}

function stateBadge(state) {
  return el("span", state, "state " + state);
}

function seconds(s) {
  if (s === null || s === undefined || s <= 0) return "0s";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + Math.round(s % 60) + "s";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

function when(unix) {
  if (!unix || unix < 0) return "";
  return new Date(unix * 1000).toLocaleString();
}

async function api(method, path, body) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body instanceof URLSearchParams) {
    options.body = body; // a form (the Qserv APIs read forms)
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) {
    showLogin("Your session has ended: log in again.");
    throw new Error("not logged in");
  }
  if (!response.ok) throw new Error((data && (data.error || data.message)) || ("HTTP " + response.status));
  return data;
}

function jobsPath(ids, params) {
  const query = new URLSearchParams(params || {}).toString();
  return "/rest/v1/jobs/" + encodeURIComponent(ids) + (query ? "?" + query : "");
}

// -- logging in and out -----------------------------------------------------------------------

function showLogin(message) {
  if (events) { events.close(); events = null; }
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("live").textContent = "";
  $("live").className = "live";
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  const body = new URLSearchParams({ token: $("token").value.trim() });
  const response = await fetch("/ui/login", {
    method: "POST", credentials: "same-origin", body,
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    let reason = "HTTP " + response.status;
    try { reason = (await response.json()).error; } catch (e) { /* keep the status */ }
    $("login-error").textContent = reason;
    return;
  }
  $("token").value = "";
  start();
}

async function logout() {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin" });
  showLogin("Logged out.");
}

// -- live counts ------------------------------------------------------------------------------

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  if (events) events.close();
  events = new EventSource("/ui/events");
  events.addEventListener("counts", (event) => {
    latest = JSON.parse(event.data);
    $("live").textContent = "live";
    $("live").className = "live on";
    renderGroups(latest.groups);
    renderWarnings(latest.warnings);
    if (selected && latest.groups[selected]) scheduleRefresh();
  });
  events.onerror = async () => {
    $("live").textContent = "reconnecting…";
    $("live").className = "live";
    if (events && events.readyState === EventSource.CLOSED) {
      // The stream was refused: find out whether the session is over.
      try { await api("GET", "/ui/counts"); start(); } catch (e) { /* showLogin was called */ }
    }
  };
}

function renderLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  for (const state of STATES) {
    const item = el("span");
    item.append(el("span", null, "swatch " + state), state);
    legend.append(item);
  }
}

function groupRow(name) {
  const row = el("div", null, "group");
  row.dataset.group = name;
  const bar = el("div", null, "bar");
  for (const state of STATES) {
    const seg = el("div", null, "seg " + state);
    seg.dataset.state = state;
    bar.append(seg);
  }
  row.append(el("div", name, "name"), bar, el("div", null, "counts"));
  row.addEventListener("click", () => showGroup(name));
  return row;
}

function renderGroups(groups) {
  const list = $("group-list");
  const names = Object.keys(groups).sort();
  $("no-groups").hidden = names.length > 0;
  const rows = new Map([...list.children].map((row) => [row.dataset.group, row]));
  for (const [name, row] of rows) if (!(name in groups)) row.remove();
  let previous = null;
  for (const name of names) {
    let row = rows.get(name);
    if (!row) row = groupRow(name);
    if (previous ? previous.nextSibling !== row : list.firstChild !== row) {
      if (previous) previous.after(row); else list.prepend(row);
    }
    previous = row;
    const counts = groups[name];
    const total = STATES.reduce((sum, s) => sum + (counts[s] || 0), 0);
    for (const seg of row.querySelectorAll(".seg")) {
      const n = counts[seg.dataset.state] || 0;
      seg.style.width = (total ? (100 * n) / total : 0) + "%";
      seg.title = seg.dataset.state + ": " + n;
    }
    const parts = STATES.filter((s) => counts[s]).map((s) => s + " " + counts[s]);
    row.querySelector(".counts").textContent = total + " jobs: " + parts.join(", ");
    row.classList.toggle("selected", name === selected);
  }
}

function renderWarnings(warnings) {
  $("warnings").hidden = !warnings.length;
  const list = $("warning-list");
  list.replaceChildren(...warnings.map((w) =>
    el("li", w.Msg + " (" + w.Count + "×, last " + when(w.LastDate) + ")")));
}

async function dismissWarnings() {
  await api("GET", "/rest/v1/warnings/"); // reading them removes them
}

// -- one rep group ----------------------------------------------------------------------------

function scheduleRefresh() {
  // Counts change in bursts: refresh the open group at most once a second, and for a group so
  // big that listing it takes a while, at most a tenth of the time.
  if (refreshTimer) return;
  const wait = Math.max(1000, 10 * lastLoadMs);
  refreshTimer = setTimeout(() => { refreshTimer = null; if (selected) loadGroup(false); }, wait);
}

function showGroup(name) {
  selected = name;
  category = null;
  $("job-detail").hidden = true;
  $("group-detail").hidden = false;
  $("detail-name").textContent = name;
  $("action-message").textContent = "";
  renderGroups(latest.groups);
  renderGroupActions(name);
  loadGroup(true);
}

function renderGroupActions(name) {
  const actions = $("group-actions");
  actions.replaceChildren(
    button("Retry all buried", () => act("POST", "/rest/v1/jobs/" + encodeURIComponent(name) + "/retry", "retried")),
    button("Kill all running", () => act("DELETE", jobsPath(name, { state: "running" }), "killed"), "danger"),
    button("Confirm all lost dead", () => act("DELETE", jobsPath(name, { state: "lost" }), "confirmed lost")),
    button("Remove all not running", () => {
      if (window.confirm("Remove every job of " + name + " that is not running or complete?")) {
        act("DELETE", jobsPath(name, { state: "deletable" }), "removed");
      }
    }, "danger"),
  );
}

async function act(method, path, verb) {
  try {
    const affected = await api(method, path);
    $("action-message").textContent = (affected ? affected.length : 0) + " job(s) " + verb + ".";
  } catch (e) {
    $("action-message").textContent = "Failed: " + e.message;
  }
  if (selected) loadGroup(false);
  if (!$("job-detail").hidden) showJob($("job-key").textContent);
}

async function loadGroup(withChart) {
  const name = selected;
  const started = performance.now();
  let examples;
  try { examples = await api("GET", jobsPath(name, { limit: 1 })); } catch (e) { return; }
  lastLoadMs = performance.now() - started;
  if (name !== selected) return;
  const tbody = $("categories").querySelector("tbody");
  tbody.replaceChildren();
  for (const job of examples) {
    const count = 1 + (job.Similar || 0);
    const cat = { state: job.State, exitcode: job.Exitcode, reason: job.FailReason, count };
    const row = el("tr");
    const stateCell = el("td");
    stateCell.append(stateBadge(job.State));
    row.append(stateCell, el("td", job.Exited ? job.Exitcode : ""), el("td", job.FailReason),
      el("td", count, "num"));
    const cell = el("td");
    cell.append(button("show jobs", () => { category = cat; page = 0; loadJobs(); }, "small"));
    row.append(cell);
    tbody.append(row);
    if (category && category.state === cat.state && category.exitcode === cat.exitcode &&
        category.reason === cat.reason) {
      category.count = count;
    }
  }
  if (category) loadJobs(); else $("job-page").hidden = true;
  if (withChart) loadChart(name);
}

function sameCategory(job) {
  return job.State === category.state && job.Exitcode === category.exitcode && job.FailReason === category.reason;
}

async function loadJobs() {
  const name = selected;
  const wanted = category;
  // wr's limit=N keeps the first N jobs of each (state, exit code, fail reason): page p is the
  // last PAGE of the first (p+1)*PAGE.
  const state = wanted.state === "reserved" ? "running" : wanted.state;
  let jobs;
  try { jobs = await api("GET", jobsPath(name, { state, limit: (page + 1) * PAGE })); } catch (e) { return; }
  if (name !== selected || wanted !== category) return;
  const mine = jobs.filter(sameCategory).slice(page * PAGE, (page + 1) * PAGE);
  const listed = Math.min(category.count, MAX_LISTED);
  const pages = Math.max(1, Math.ceil(listed / PAGE));
  if (page >= pages) { page = pages - 1; }
  $("job-page").hidden = false;
  $("job-page-title").textContent = category.state + " jobs" +
    (category.reason ? " (" + category.reason + ")" : "");
  $("page-info").textContent = "page " + (page + 1) + " of " + pages + " (" +
    (listed < category.count ? "the first " + listed + " of " : "") + category.count + " jobs)";
  $("prev-page").disabled = page === 0;
  $("next-page").disabled = page + 1 >= pages;
  const tbody = $("jobs").querySelector("tbody");
  tbody.replaceChildren(...mine.map(jobRow));
}

function jobButtons(job) {
  const buttons = [];
  const key = job.Key;
  if (job.State === "running" || job.State === "reserved") {
    buttons.push(button("kill", () => act("DELETE", jobsPath(key, { state: "running" }), "killed"), "small danger"));
  }
  if (job.State === "lost") {
    buttons.push(button("confirm dead", () => act("DELETE", jobsPath(key, { state: "lost" }), "confirmed lost"), "small"));
  }
  if (job.State === "buried") {
    buttons.push(button("retry", () => act("POST", "/rest/v1/jobs/" + key + "/retry", "retried"), "small"));
  }
  if (!["running", "reserved", "lost", "complete"].includes(job.State)) {
    buttons.push(button("remove", () => act("DELETE", jobsPath(key, { state: "deletable" }), "removed"), "small danger"));
  }
  return buttons;
}

function jobRow(job) {
  const row = el("tr", null, "job");
  row.dataset.key = job.Key;
  const stateCell = el("td");
  stateCell.append(stateBadge(job.State));
  const cmd = el("td", job.Cmd, "cmd");
  cmd.title = job.Cmd;
  const actions = el("td");
  actions.append(...jobButtons(job));
  row.append(el("td", job.Key.slice(0, 8), "key"), stateCell, cmd, el("td", job.Exited ? job.Exitcode : ""),
    el("td", job.PeakRAM + " MB", "num"), el("td", seconds(job.Walltime), "num"), actions);
  row.addEventListener("click", () => showJob(job.Key));
  return row;
}

// -- one job ----------------------------------------------------------------------------------

async function showJob(key) {
  let jobs;
  try { jobs = await api("GET", jobsPath(key, { std: "true", env: "true" })); } catch (e) { return; }
  const job = jobs.find((j) => j.Key === key);
  const section = $("job-detail");
  if (!job) { section.hidden = true; return; }
  section.hidden = false;
  $("job-key").textContent = key;
  $("job-actions").replaceChildren(...jobButtons(job));
  const fields = [
    ["command", job.Cmd], ["state", job.State], ["rep group", job.RepGroup],
    ["exit code", job.Exited ? job.Exitcode : "(not exited)"], ["fail reason", job.FailReason],
    ["host", job.Host + (job.HostIP ? " (" + job.HostIP + ")" : "")], ["pid", job.Pid || ""],
    ["started", when(job.Started)], ["ended", when(job.Ended)],
    ["wall time", seconds(job.Walltime)], ["CPU time", seconds(job.CPUtime)],
    ["peak RAM", job.PeakRAM + " MB"], ["expected", job.ExpectedRAM + " MB, " + seconds(job.ExpectedTime)],
    ["cores", job.Cores], ["attempts", job.Attempts], ["cwd", (job.CwdBase || "") + (job.Cwd || "")],
    ["dependencies", (job.Dependencies || []).join(", ")], ["env", (job.Env || []).join("\n")],
  ];
  const dl = $("job-fields");
  dl.replaceChildren();
  for (const [name, value] of fields) {
    if (value === "" || value === null || value === undefined) continue;
    dl.append(el("dt", name), el("dd", value));
  }
  $("job-stdout").textContent = job.StdOut || "";
  $("job-stderr").textContent = job.StdErr || "";
}

// -- the chart: peak RAM against wall time of completed jobs -----------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

async function loadChart(name) {
  let done = [];
  let buried = [];
  try {
    done = await api("GET", jobsPath(name, { state: "complete", limit: CHART_SAMPLE }));
    buried = await api("GET", jobsPath(name, { state: "buried", limit: CHART_SAMPLE }));
  } catch (e) { /* drawn empty */ }
  if (name !== selected) return;
  const jobs = done.concat(buried).filter((j) => j.Exited);
  const width = 340, height = 200, left = 44, bottom = 28, top = 10, right = 10;
  const maxRam = Math.max(1, ...jobs.map((j) => j.PeakRAM));
  const maxTime = Math.max(1, ...jobs.map((j) => j.Walltime));
  const x = (t) => left + ((width - left - right) * t) / maxTime;
  const y = (r) => height - bottom - ((height - bottom - top) * r) / maxRam;
  const chart = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img" });
  chart.append(svg("title", {}, "peak RAM (MB) against wall time (s) of " + jobs.length + " jobs of " + name));
  chart.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }));
  chart.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }));
  chart.append(svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, maxRam));
  chart.append(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, 0));
  chart.append(svg("text", { x: width - right, y: height - 8, "text-anchor": "end" }, seconds(maxTime)));
  chart.append(svg("text", { x: left, y: height - 8 }, "0s"));
  chart.append(svg("text", { x: 4, y: top + 24 }, "MB"));
  chart.append(svg("text", { x: (width + left) / 2, y: height - 8, "text-anchor": "middle" }, "wall time"));
  for (const job of jobs) {
    const dot = svg("circle", { cx: x(job.Walltime), cy: y(job.PeakRAM), r: 3,
      class: "dot" + (job.State === "buried" ? " buried" : "") });
    dot.append(svg("title", {}, job.Cmd + ": " + job.PeakRAM + " MB, " + seconds(job.Walltime)));
    chart.append(dot);
  }
  $("chart").replaceChildren(chart);
  const mean = (values) => values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);
  $("chart-note").textContent = jobs.length
    ? jobs.length + " jobs (green complete, red buried; up to " + CHART_SAMPLE + " of each): mean " +
      Math.round(mean(jobs.map((j) => j.PeakRAM))) + " MB, max " + maxRam + " MB; mean " +
      seconds(mean(jobs.map((j) => j.Walltime))) + ", max " + seconds(maxTime)
    : "No job of this group has finished yet.";
}

// -- tabs: one view per API; another script adds its view to window.wmgr.views ---------------

function showView(id) {
  for (const tab of document.querySelectorAll("#tabs .tab")) {
    tab.classList.toggle("active", tab.dataset.view === id);
  }
  for (const view of document.querySelectorAll("main .view")) view.hidden = view.id !== id;
  const load = window.wmgr.views[id];
  if (load) load();
}

window.wmgr = { api, el, button, seconds, views: {} };

// -- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  renderLegend();
  const tabs = document.querySelectorAll("#tabs .tab");
  $("tabs").hidden = tabs.length < 2;
  for (const tab of tabs) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("dismiss-warnings").addEventListener("click", dismissWarnings);
  $("close-group").addEventListener("click", () => {
    selected = null; category = null;
    $("group-detail").hidden = true;
    renderGroups(latest.groups);
  });
  $("close-job").addEventListener("click", () => { $("job-detail").hidden = true; });
  $("prev-page").addEventListener("click", () => { if (page > 0) { page -= 1; loadJobs(); } });
  $("next-page").addEventListener("click", () => { page += 1; loadJobs(); });
  const response = await fetch("/ui/counts", { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.ok) start(); else showLogin("");
});
