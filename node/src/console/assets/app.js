// Caroni console: one page, hash routes, JSON from /api, live updates from
// /events (Server-Sent Events). No build step, no dependencies.
"use strict";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const banner = document.getElementById("banner");
let node = null; // {info, peers, stats}
let view = null; // {route, refresh(kind, data), editing}
let pending = null;

function esc(v) {
  return String(v === undefined || v === null ? "" : v)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}
function badge(state) { return `<span class="badge ${esc(state)}" data-state="${esc(state)}">${esc(state || "—")}</span>`; }
function short(id) { id = String(id || ""); return id.length > 14 ? "…" + id.slice(-8) : id; }
function when(t) { return t ? esc(t.replace("T", " ").replace(/\.\d+Z$/, "Z")) : "—"; }
function ms(t) { return t ? Date.parse(t) : NaN; }

// The session id lives in this origin's localStorage (scheme, host and
// port): no other page can read it and the browser never sends it by
// itself. It travels as a header on every request.
const SESSION_KEY = "caroni-session";
function session() { try { return localStorage.getItem(SESSION_KEY) || ""; } catch (_) { return ""; } }
function setSession(id) { try { if (id) localStorage.setItem(SESSION_KEY, id); else localStorage.removeItem(SESSION_KEY); } catch (_) { /* private mode */ } }
function authHeaders(h) {
  const s = session();
  if (s) h["x-caroni-session"] = s;
  return h;
}

class LoginNeeded extends Error {}

// File values: the text of a reference {class: File, sha256, size,
// basename}, or a list of them. Shown by name, size and hash, with a link.
function fileRefs(v) {
  if (typeof v !== "string") return null;
  const t = v.trim();
  if (!t.startsWith("{") && !t.startsWith("[{")) return null;
  let d;
  try { d = JSON.parse(t); } catch (_) { return null; }
  const one = x => x && typeof x === "object" && !Array.isArray(x) && Object.keys(x).length === 4 && x.class === "File"
    && typeof x.sha256 === "string" && /^[0-9a-f]{64}$/.test(x.sha256) && Number.isInteger(x.size) && typeof x.basename === "string";
  if (Array.isArray(d)) return d.length && d.every(one) ? d : null;
  return one(d) ? [d] : null;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i ? v.toFixed(1) + " " + units[i] : n + " B";
}
function showValue(v) {
  const refs = fileRefs(v);
  if (!refs) return esc(v);
  return refs.map(f => `<span class="file" title="sha256 ${esc(f.sha256)}">${esc(f.basename)} (${esc(bytes(f.size))}, sha256 ${esc(f.sha256.slice(0, 12))}…)</span>
    <a href="#" class="download" data-sha="${esc(f.sha256)}" data-name="${esc(f.basename)}">download</a>`).join("<br>");
}
function plainValue(v) {
  const refs = fileRefs(v);
  return refs ? refs.map(f => `${f.basename} (${bytes(f.size)})`).join(", ") : v;
}
// A download goes through a signed link that the browser saves itself:
// a plain link carries no session, and the file never sits in the page.
document.addEventListener("click", async ev => {
  const a = ev.target.closest ? ev.target.closest("a.download") : null;
  if (!a) return;
  ev.preventDefault();
  try {
    const r = await api(`/api/files/${encodeURIComponent(a.dataset.sha)}/link?name=${encodeURIComponent(a.dataset.name)}`, { method: "POST", body: {} });
    const link = document.createElement("a");
    link.href = r.url;
    link.download = a.dataset.name;
    document.body.appendChild(link);
    link.click();
    link.remove();
  } catch (e) { if (!(e instanceof LoginNeeded)) alert(e.message); }
});
// Sends a chosen file to the node's blob store; resolves to its reference.
async function uploadFile(file) {
  const headers = authHeaders({ "accept": "application/json", "x-caroni-console": "1", "content-type": "application/octet-stream" });
  const resp = await fetch("/api/files?name=" + encodeURIComponent(file.name), { method: "POST", headers, credentials: "omit", body: file });
  if (resp.status === 401) { setSession(""); showLogin(); throw new LoginNeeded("log in first"); }
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error((data && data.error) || resp.statusText);
  return data;
}

async function api(path, opts) {
  opts = opts || {};
  const headers = authHeaders({ "accept": "application/json" });
  if (opts.body !== undefined) headers["content-type"] = "application/json";
  if (opts.method && opts.method !== "GET") headers["x-caroni-console"] = "1";
  const resp = await fetch(path, { method: opts.method || "GET", headers, credentials: "omit",
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body) });
  if (resp.status === 401 && path !== "/login") { setSession(""); showLogin(); throw new LoginNeeded("log in first"); }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!resp.ok) {
    const msg = (data && data.error) || text || resp.statusText;
    const e = new Error(msg); e.status = resp.status; throw e;
  }
  return data;
}

let stream = null; // the live connection's AbortController

function showLogin(error) {
  if (stream) { stream.abort(); stream = null; }
  window.removeEventListener("hashchange", show);
  document.body.classList.add("login");
  nav.innerHTML = "";
  document.getElementById("logout").hidden = true;
  live.hidden = true;
  main.innerHTML = `<h1>Caroni console</h1>
    <p>This node's console needs its API token (the node's <code>--api-token</code>).</p>
    ${error ? `<p class="error" id="login-error">${esc(error)}</p>` : ""}
    <form id="login-form" class="stack">
      <label>Token <input type="password" name="token" id="token" autocomplete="current-password" autofocus required maxlength="4096"></label>
      <button type="submit" id="login">Log in</button>
    </form>`;
  document.getElementById("login-form").onsubmit = async ev => {
    ev.preventDefault();
    const token = document.getElementById("token").value;
    try {
      const d = await api("/login", { method: "POST", body: { token } });
      setSession(d.session);
      document.body.classList.remove("login");
      live.hidden = false;
      await start();
    } catch (e) { showLogin(e.message); }
  };
}

async function logout() {
  try { await api("/logout", { method: "POST", body: {} }); } catch (_) { /* ended anyway */ }
  setSession("");
  showLogin();
}

function route() {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, query] = h.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { path, parts, params };
}

function isManager() { return node && node.info.roles.includes("manager"); }
function isAgent() { return node && node.info.roles.includes("agent"); }

function renderNav() {
  const r = route();
  const links = [];
  if (isManager()) links.push(["#/workflows", "Workflows"], ["#/templates", "Templates"], ["#/run", "Start a workflow"]);
  if (isAgent()) links.push(["#/jobs", "Jobs"], ["#/jobtypes", "Job types"]);
  if (isManager() || isAgent()) links.push(["#/ledger", "Ledger"]);
  links.push(["#/node", "Node"]);
  nav.innerHTML = links.map(([h, t]) => {
    const active = ("#" + r.path).startsWith(h) ? "active" : "";
    return `<a href="${h}" class="${active}">${esc(t)}</a>`;
  }).join("");
}

function fail(e) {
  if (e instanceof LoginNeeded) return;
  main.innerHTML = `<h1>Something went wrong</h1><p class="error" id="page-error">${esc(e.message)}</p><p><a href="#/">Back</a></p>`;
}

async function show() {
  const r = route();
  renderNav();
  view = { route: r, match: null, load: null, editing: false };
  const [first, second] = r.parts;
  try {
    if (!first) { location.hash = isManager() ? "#/workflows" : (isAgent() ? "#/jobs" : "#/node"); return; }
    if (first === "workflows") await workflowsPage(r.params);
    else if (first === "workflow" && second) await workflowPage(second);
    else if (first === "templates") await templatesPage();
    else if (first === "template" && second) await templatePage(second);
    else if (first === "run") await runPage(r.params.get("template"));
    else if (first === "jobs") await jobsPage(r.params);
    else if (first === "job" && second) await jobPage(second);
    else if (first === "jobtypes") await jobTypesPage();
    else if (first === "jobtype" && second) await jobTypePage(second);
    else if (first === "node") await nodePage();
    else if (first === "ledger") await ledgerPage();
    else main.innerHTML = `<h1>No such page</h1><p class="error" id="page-error">This console has no page at ${esc(location.hash)}.</p>`;
  } catch (e) { fail(e); }
}

// ---------- manager pages ----------

const WF_STATES = ["", "created", "initializing", "running", "stalled", "completed", "failed", "cancelled"];

async function workflowsPage(params) {
  const state = params.get("state") || "", template = params.get("template") || "";
  const idq = params.get("id") || "", after = params.get("after") || "";
  const load = async () => {
    const q = new URLSearchParams({ state, template, id: idq, after });
    const d = await api("/api/workflows?" + q);
    const opts = (list, cur) => list.map(v => `<option value="${esc(v)}" ${v === cur ? "selected" : ""}>${esc(v || "any")}</option>`).join("");
    const took = w => {
      const end = w.finished_at ? ms(w.finished_at) : Date.now(), t = end - ms(w.created_at);
      return isNaN(t) ? "" : t < 1000 ? `${Math.round(t)} ms` : t < 120000 ? `${(t / 1000).toFixed(1)} s` : `${Math.round(t / 60000)} min`;
    };
    const progress = w => {
      const done = w.steps.filter(s => ["completed", "skipped"].includes(s.state)).length;
      return `<progress max="${w.steps.length}" value="${done}"></progress> ${done}/${w.steps.length}`;
    };
    const rows = d.items.map(w => `<tr class="wf-row" data-id="${esc(w.id)}">
        <td class="mono"><a href="#/workflow/${esc(w.id)}">${esc(w.id)}</a></td>
        <td>${esc(w.template)}</td><td>${badge(w.state)}</td><td class="progress">${progress(w)}</td>
        <td>${when(w.created_at)}</td><td class="duration">${took(w)}</td><td>${esc(w.message)}</td></tr>`).join("");
    const nav = (a, t) => `<a class="button secondary" href="#/workflows?${new URLSearchParams({ state, template, id: idq, after: a })}">${t}</a>`;
    main.innerHTML = `<h1>Workflows</h1>
      <div class="toolbar">
        <label>State <select id="f-state">${opts(WF_STATES, state)}</select></label>
        <label>Template <select id="f-template">${opts([""].concat(d.templates), template)}</select></label>
        <label>Id <input id="f-id" class="mono" size="14" placeholder="prefix" value="${esc(idq)}"></label>
        <a class="button" href="#/run">Start a workflow</a>
      </div>
      <table id="workflows"><thead><tr><th>id</th><th>template</th><th>state</th><th>progress</th><th>created</th><th>duration</th><th>message</th></tr></thead>
      <tbody>${rows || `<tr><td colspan="7" class="muted">No workflows.</td></tr>`}</tbody></table>
      <div class="pager">${after ? nav("", "« newest") : ""}${d.next ? nav(d.next, "older ›") : ""}</div>`;
    const go = () => {
      location.hash = "#/workflows?" + new URLSearchParams({
        state: document.getElementById("f-state").value,
        template: document.getElementById("f-template").value,
        id: document.getElementById("f-id").value.trim() });
    };
    document.getElementById("f-state").onchange = go;
    document.getElementById("f-template").onchange = go;
    document.getElementById("f-id").onchange = go;
  };
  await load();
  view.match = (kind) => kind === "workflow" || kind === "resync";
  view.load = load;
}

// A dynamic step's elements by state, in a few words.
function elementsText(s) {
  const e = s.elements;
  if (!e) return s.subworkflow ? "sub-workflow" : "";
  const kind = s.subworkflow ? "sub-workflow" : "job";
  if (!e.scatter) return e.skipped ? "skipped (condition false)" : `one ${kind}`;
  const parts = [`${e.completed}/${e.total} done`];
  if (e.live) parts.push(`${e.live} running`);
  if (e.waiting) parts.push(`${e.waiting} waiting`);
  if (e.skipped) parts.push(`${e.skipped} skipped`);
  if (e.failed) parts.push(`${e.failed} failed`);
  return `scatter · ` + parts.join(", ");
}

// The counts and first child workflows of a dynamic step, for its row.
function elementsCell(s) {
  const e = s.elements;
  const text = elementsText(s);
  if (!text) return "";
  const children = s.children || [];
  if (s.subworkflow && e && !e.scatter && children.length) {
    // A sub-workflow's steps, shown under its step.
    return `<span class="elements">${esc(text)}</span><details class="children" open><summary>sub-workflow steps</summary><div class="sub" data-child="${esc(children[0].workflow_id)}">loading…</div></details>`;
  }
  const kids = children.map(c => `<li><a href="#/workflow/${encodeURIComponent(c.workflow_id)}">${e && e.scatter ? "element " + esc(c.index) : "workflow"}</a> ${badge(c.state)}</li>`).join("");
  const more = e && e.total > children.length && kids ? `<li class="muted">first ${children.length} of ${esc(e.total)}</li>` : "";
  return `<span class="elements">${esc(text)}</span>` + (kids ? `<details class="children"><summary>${s.subworkflow ? "sub-workflows" : "elements"}</summary><ul>${kids}${more}</ul></details>` : "");
}

// Layered drawing of the workflow graph: inputs, steps by depth, outputs.
function dagSvg(w) {
  const steps = new Map(w.steps.map(s => [s.id, s]));
  const nodes = new Map(); // id -> {kind, label, sub, state}
  const edges = [];
  const ref = (endpoint, isSource) => {
    const i = endpoint.indexOf("/");
    if (i > 0 && steps.has(endpoint.slice(0, i))) return { node: "step:" + endpoint.slice(0, i), port: endpoint.slice(i + 1) };
    const id = (isSource ? "in:" : "out:") + endpoint;
    if (!nodes.has(id)) nodes.set(id, { kind: isSource ? "input" : "output", label: endpoint, sub: isSource ? "input" : "output" });
    return { node: id, port: "" };
  };
  for (const s of w.steps) nodes.set("step:" + s.id, { kind: "step", label: s.id + (s.subworkflow ? " ⊞" : "") + (s.elements && s.elements.scatter ? " ×" + s.elements.total : ""), sub: elementsText(s) || s.job_type, state: s.state, step: s });
  for (const d of w.dataflows) {
    const a = ref(d.source, true), b = ref(d.destination, false);
    const label = [a.port, b.port].filter(Boolean).join(" → ");
    edges.push({ from: a.node, to: b.node, label, value: d.value });
  }
  const level = new Map();
  const depth = (id, seen) => {
    if (level.has(id)) return level.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const ins = edges.filter(e => e.to === id);
    let l = nodes.get(id).kind === "input" ? 0 : 1;
    for (const e of ins) l = Math.max(l, depth(e.from, seen) + 1);
    level.set(id, l);
    return l;
  };
  for (const id of nodes.keys()) depth(id, new Set());
  const maxStep = Math.max(1, ...[...nodes].filter(([, n]) => n.kind !== "output").map(([id]) => level.get(id)));
  for (const [id, n] of nodes) if (n.kind === "output") level.set(id, maxStep + 1);
  const cols = new Map();
  for (const [id] of nodes) { const l = level.get(id); if (!cols.has(l)) cols.set(l, []); cols.get(l).push(id); }
  const W = 200, H = 52, GX = 120, GY = 34;
  const pos = new Map();
  const ncols = Math.max(...cols.keys()) + 1;
  let maxRows = 1;
  for (const [l, ids] of cols) { maxRows = Math.max(maxRows, ids.length); ids.forEach((id, i) => pos.set(id, { x: 20 + l * (W + GX), y: 20 + i * (H + GY) })); }
  const width = 40 + ncols * (W + GX) - GX, height = 40 + maxRows * (H + GY) - GY;
  const colour = s => getComputedStyle(document.documentElement).getPropertyValue("--" + s).trim() || "#9aa3b2";
  let svg = `<svg id="dag" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#7b8494"/></marker></defs>`;
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    const title = e.value === null || e.value === undefined ? "not yet delivered" : plainValue(e.value);
    svg += `<g class="edge" data-from="${esc(e.from)}" data-to="${esc(e.to)}"><title>${esc(title)}</title>
      <path d="M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}" marker-end="url(#arrow)"/>
      <text x="${mx}" y="${(y1 + y2) / 2 - 4}" text-anchor="middle">${esc(e.label)}</text></g>`;
  }
  for (const [id, n] of nodes) {
    const p = pos.get(id);
    const fill = n.kind === "step" ? colour(n.state) : "#eef1f6";
    const text = n.kind === "step" ? "#fff" : "#1d2330";
    const data = n.kind === "step" ? `data-step="${esc(n.step.id)}" data-state="${esc(n.state)}"` : `data-${n.kind}="${esc(n.label)}"`;
    svg += `<g class="node ${n.kind}" ${data} transform="translate(${p.x},${p.y})">
      <rect width="${W}" height="${H}" fill="${fill}"/>
      <text x="10" y="20" fill="${text}" font-weight="600">${esc(n.label)}</text>
      <text x="10" y="38" fill="${text}">${esc(String(n.sub).slice(0, 30))}${n.kind === "step" && !n.step.elements ? " · " + esc(n.state) : ""}</text>${n.kind === "step" && n.step.agent ? `<title>agent ${esc(n.step.agent)}</title>` : ""}</g>`;
  }
  return svg + "</svg>";
}

// What to say when a workflow has no attempt of its own.
function noAttempts(w) {
  return w.steps.some(s => s.elements)
    ? `<p class="muted">No jobs of its own yet: the jobs of its dynamic steps run in their elements' workflows (Steps → elements).</p>`
    : `<p class="muted">No attempts yet.</p>`;
}

// The steps of each sub-workflow shown open under its step.
async function fillSubworkflows(root) {
  for (const el of root.querySelectorAll(".sub[data-child]")) {
    try {
      const c = await api("/api/workflows/" + encodeURIComponent(el.dataset.child));
      el.innerHTML = `<table class="substeps">${c.steps.map(s => `<tr data-step="${esc(s.id)}"><td>${esc(s.id)}</td><td>${badge(s.state)}</td><td class="muted">${esc(elementsText(s) || s.job_type)}</td></tr>`).join("")}</table>
        <a href="#/workflow/${encodeURIComponent(c.id)}">open its workflow</a>`;
    } catch (e) { el.textContent = String(e.message || e); }
  }
}

// One bar per attempt, on a common time axis.
function timelineSvg(w) {
  const rows = [];
  for (const s of w.steps) s.attempt_history.forEach((a, i) => rows.push({ s, a, i }));
  if (!rows.length) return noAttempts(w);
  const now = Date.now();
  // Each attempt from when it was placed; its run (agent's clock) solid,
  // the wait for inputs and a slot before it faint.
  const placed = a => [a.placed_at, a.queued_at, a.started_at].map(ms).find(x => !isNaN(x));
  const t0 = Math.min(ms(w.created_at), ...rows.map(r => placed(r.a)).filter(x => x !== undefined && !isNaN(x)));
  const t1 = Math.max(t0 + 1, ...rows.map(r => isNaN(ms(r.a.ended_at)) ? (w.finished_at ? ms(w.finished_at) : now) : ms(r.a.ended_at)));
  const L = 230, R = 40, width = 900, rowH = 24, height = 30 + rows.length * rowH;
  const x = t => L + (t - t0) / (t1 - t0) * (width - L - R);
  const colour = s => getComputedStyle(document.documentElement).getPropertyValue("--" + s).trim() || "#9aa3b2";
  let svg = `<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}">`;
  svg += `<text x="${L}" y="14" fill="#6b7280">0 ms</text><text x="${width - R}" y="14" text-anchor="end" fill="#6b7280">${Math.round(t1 - t0)} ms</text>`;
  rows.forEach((r, k) => {
    const y = 24 + k * rowH;
    const end = isNaN(ms(r.a.ended_at)) ? (w.finished_at ? ms(w.finished_at) : now) : ms(r.a.ended_at);
    const from = placed(r.a), run = ms(r.a.started_at);
    const xp = from === undefined || isNaN(from) ? L : x(from);
    const xs = isNaN(run) ? x(end) : x(run), xe = Math.max(xs + 3, x(end));
    const wait = isNaN(run) ? "did not run" : `waited ${Math.round(run - from)} ms, ran ${Math.round(end - run)} ms`;
    svg += `<g class="bar" data-step="${esc(r.s.id)}" data-attempt="${r.i + 1}" data-state="${esc(r.a.state)}" data-start="${Math.round(xs)}">
      <title>${esc(r.s.id)} attempt ${r.i + 1}: ${esc(r.a.state)} on ${esc(r.a.agent)} (${wait})</title>
      <text x="6" y="${y + 14}">${esc(r.s.id)} #${r.i + 1} ${esc(short(r.a.agent))}</text>
      ${xs > xp ? `<rect class="wait" x="${xp}" y="${y + 5}" width="${xs - xp}" height="${rowH - 18}" fill="${colour(r.a.state)}" opacity="0.3" rx="2"/>` : ""}
      ${isNaN(run) ? "" : `<rect x="${xs}" y="${y}" width="${xe - xs}" height="${rowH - 8}" fill="${colour(r.a.state)}" rx="3"/>`}</g>`;
  });
  return svg + "</svg>";
}

// An attempt's stdout and stderr, read from the agent that ran it, in a
// row under the attempt (kept open across reloads; reloaded with the page
// while the workflow changes).
async function showLogs(id, step, attempt) {
  const row = main.querySelector(`tr.attempt-row[data-step="${CSS.escape(step)}"][data-attempt="${attempt}"]`);
  if (!row) return;
  let logRow = row.nextElementSibling;
  while (logRow && logRow.classList.contains("stderr-row")) logRow = logRow.nextElementSibling;
  if (!logRow || !logRow.classList.contains("log-row")) {
    logRow = document.createElement("tr");
    logRow.className = "log-row";
    logRow.dataset.step = step; logRow.dataset.attempt = attempt;
    let after = row;
    while (after.nextElementSibling && after.nextElementSibling.classList.contains("stderr-row")) after = after.nextElementSibling;
    after.after(logRow);
  }
  try {
    const q = `step=${encodeURIComponent(step)}&attempt=${attempt}`;
    const l = await api(`/api/workflows/${encodeURIComponent(id)}/logs?${q}`);
    const part = (name, text) => `<h3>${name} <span class="muted">(${text.length} characters)</span></h3>
      ${text ? `<pre class="log" data-stream="${name}">${esc(text)}</pre>` : `<p class="muted" data-stream="${name}">empty</p>`}`;
    logRow.innerHTML = `<td colspan="10">${part("stdout", l.stdout)}${part("stderr", l.stderr)}
      ${l.job_id ? `<p class="muted">job ${esc(l.job_id)} on agent ${esc(l.agent)}</p>` : ""}</td>`;
  } catch (e) {
    if (e instanceof LoginNeeded) return;
    logRow.innerHTML = `<td colspan="10"><p class="error">${esc(e.message)}</p></td>`;
  }
}

async function workflowPage(id) {
  const openLogs = new Set();
  const load = async () => {
    const w = await api("/api/workflows/" + encodeURIComponent(id));
    const ended = ["completed", "failed", "cancelled"].includes(w.state);
    const kv = o => Object.keys(o || {}).sort().map(k => `<tr><td class="mono">${esc(k)}</td><td class="mono">${showValue(o[k])}</td></tr>`).join("")
      || `<tr><td colspan="2" class="muted">none</td></tr>`;
    const attempts = [];
    for (const s of w.steps) s.attempt_history.forEach((a, i) => attempts.push(`<tr class="attempt-row" data-step="${esc(s.id)}" data-attempt="${i + 1}" data-state="${esc(a.state)}">
      <td>${esc(s.id)}</td><td>${i + 1}${a.superseded ? ' <span class="muted">(superseded)</span>' : ""}${a.job_id ? ` <button type="button" class="secondary small logs" data-step="${esc(s.id)}" data-attempt="${i + 1}" title="Its stdout and stderr, from the agent that ran it">logs</button>` : ""}</td><td class="mono" title="${esc(a.agent)}">${esc(a.agent)}</td>
      <td class="mono">${esc(a.job_id)}</td><td>${badge(a.state)}</td><td>${a.exit_status === null || a.exit_status === undefined ? "—" : esc(a.exit_status)}</td>
      <td>${esc(a.message)}${a.failure ? ` <span class="muted">(${esc(a.failure)})</span>` : ""}</td><td>${when(a.placed_at)}</td><td>${when(a.started_at)}</td><td>${when(a.ended_at)}</td></tr>
      ${a.stderr_tail ? `<tr class="stderr-row" data-step="${esc(s.id)}" data-attempt="${i + 1}"><td colspan="10"><pre class="stderr">${esc(a.stderr_tail)}</pre></td></tr>` : ""}`));
    const declines = [];
    for (const s of w.steps) for (const d of (s.declines || [])) declines.push(`<tr><td>${esc(s.id)}</td><td class="mono">${esc(d.agent)}</td><td>${esc(d.reason)}</td></tr>`);
    const flows = w.dataflows.map(d => `<tr><td class="mono">${esc(d.source)}</td><td class="mono">${esc(d.destination)}</td>
      <td class="mono">${d.value === null || d.value === undefined ? '<span class="muted">—</span>' : showValue(d.value)}</td></tr>`).join("");
    main.innerHTML = `<h1>Workflow <span class="mono">${esc(w.id)}</span></h1>
      <div class="toolbar"><span id="wf-state">${badge(w.state)}</span>
        <span>template <a href="#/template/${encodeURIComponent(w.template)}">${esc(w.template)}</a></span>
        <span class="muted">created ${when(w.created_at)}${w.finished_at ? ", finished " + when(w.finished_at) : ""}</span>
        ${ended ? "" : `<button class="danger" id="cancel">Cancel</button>`}
        ${["failed", "cancelled"].includes(w.state) && !w.parent_id ? `<button id="retry" title="Resume from its unfinished steps; completed steps keep their outputs">Retry</button>` : ""}
        ${ended && !w.parent_id ? `<button id="rerun" title="A new workflow with the same inputs">Rerun</button>` : ""}</div>
      ${w.message ? `<p class="error" id="wf-message">${esc(w.message)}</p>` : ""}
      ${w.steps.filter(s => s.blocked).map(s => `<p class="banner blocked" data-step="${esc(s.id)}">Step <b>${esc(s.id)}</b>: no agent can take it (since ${when(s.blocked_since)}): ${esc(s.blocked)}</p>`).join("")}
      ${w.parent_id ? `<p id="wf-parent">Runs ${esc(w.parent_step)} (element ${esc(w.parent_index)}) of workflow <a href="#/workflow/${encodeURIComponent(w.parent_id)}" class="mono">${esc(w.parent_id)}</a></p>` : ""}
      <div id="action-error"></div>
      <h2>Graph <button type="button" class="secondary small" id="zoom" title="Fit the page, or show at full size (scroll)">full size</button></h2><div class="graph fit" id="graph">${dagSvg(w)}</div>
      <h2>Outputs</h2><table id="outputs"><tbody>${kv(w.outputs)}</tbody></table>
      <h2>Inputs</h2><table id="inputs"><tbody>${kv(w.inputs)}</tbody></table>
      <h2>Steps</h2><table id="steps"><thead><tr><th>step</th><th>job type</th><th>state</th><th>elements</th><th>attempts</th><th>agent</th><th>job</th></tr></thead><tbody>
      ${w.steps.map(s => `<tr data-step="${esc(s.id)}" data-state="${esc(s.state)}"><td>${esc(s.id)}</td><td>${esc(s.job_type || (s.subworkflow ? "sub-workflow" : ""))}</td><td>${badge(s.state)}</td><td>${elementsCell(s)}</td><td>${esc(s.attempts)}</td><td class="mono">${esc(s.agent)}</td><td class="mono">${esc(s.job_id)}</td></tr>`).join("")}</tbody></table>
      <h2>Timeline</h2><div class="graph">${timelineSvg(w)}</div>
      <h2>Attempts</h2><table id="attempts"><thead><tr><th>step</th><th>#</th><th>agent</th><th>job</th><th>state</th><th>exit</th><th>error</th><th>placed</th><th>started</th><th>ended</th></tr></thead>
      <tbody>${attempts.join("") || `<tr><td colspan="9">${noAttempts(w)}</td></tr>`}</tbody></table>
      ${declines.length ? `<h2>Declines</h2><table id="declines"><thead><tr><th>step</th><th>agent</th><th>declined because</th></tr></thead><tbody>${declines.join("")}</tbody></table>` : ""}
      <h2>Dataflows</h2><table id="dataflows"><thead><tr><th>source</th><th>destination</th><th>value</th></tr></thead><tbody>${flows}</tbody></table>`;
    fillSubworkflows(main);
    for (const b of main.querySelectorAll("button.logs")) b.onclick = () => {
      const key = b.dataset.step + "#" + b.dataset.attempt;
      if (openLogs.has(key)) {
        openLogs.delete(key);
        const r = main.querySelector(`tr.log-row[data-step="${CSS.escape(b.dataset.step)}"][data-attempt="${b.dataset.attempt}"]`);
        if (r) r.remove();
      } else {
        openLogs.add(key);
        showLogs(id, b.dataset.step, b.dataset.attempt);
      }
    };
    for (const key of openLogs) {
      const at = key.lastIndexOf("#");
      showLogs(id, key.slice(0, at), key.slice(at + 1));
    }
    const z = document.getElementById("zoom"), g = document.getElementById("graph");
    if (z && g) z.onclick = () => {
      const fit = g.classList.toggle("fit");
      z.textContent = fit ? "full size" : "fit";
    };
    const c = document.getElementById("cancel");
    if (c) c.onclick = async () => {
      if (!confirm("Cancel this workflow? Running jobs are killed.")) return;
      c.disabled = true;
      try { await api(`/api/workflows/${encodeURIComponent(id)}/cancel`, { method: "POST", body: {} }); await load(); }
      catch (e) { document.getElementById("action-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; c.disabled = false; }
    };
    const r = document.getElementById("retry");
    if (r) r.onclick = async () => {
      r.disabled = true;
      try { await api(`/api/workflows/${encodeURIComponent(id)}/retry`, { method: "POST", body: {} }); await load(); }
      catch (e) { document.getElementById("action-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; r.disabled = false; }
    };
    const rr = document.getElementById("rerun");
    if (rr) rr.onclick = async () => {
      rr.disabled = true;
      try {
        const n = await api(`/api/workflows/${encodeURIComponent(id)}/rerun`, { method: "POST", body: {} });
        location.hash = "#/workflow/" + encodeURIComponent(n.workflow_id);
      } catch (e) { document.getElementById("action-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; rr.disabled = false; }
    };
  };
  await load();
  view.match = (kind, data) => (kind === "workflow" && data.id === id) || kind === "resync";
  view.load = load;
}

function yaml(text) {
  return text.split("\n").map(line => {
    let code = line, comment = "";
    const m = line.match(/^((?:[^#'"]|'[^']*'|"[^"]*")*?)(\s#.*|^#.*)$/);
    if (m) { code = m[1]; comment = m[2]; }
    let out = esc(code)
      .replace(/^(\s*-?\s*)([\w.$-]+)(:)(?=\s|$)/, '$1<span class="k">$2</span>$3')
      .replace(/(&quot;[^&]*?&quot;|&#39;[^&]*?&#39;)/g, '<span class="s">$1</span>')
      .replace(/(:\s+)(-?\d+(?:\.\d+)?|true|false|null)\s*$/, '$1<span class="n">$2</span>');
    return out + (comment ? `<span class="c">${esc(comment)}</span>` : "");
  }).join("\n");
}

async function templatesPage() {
  const load = async () => {
    const ts = await api("/api/templates");
    const rows = ts.map(t => `<tr><td><a href="#/template/${encodeURIComponent(t.name)}">${esc(t.name)}</a></td>
      <td>${esc(t.inputs.join(", "))}</td><td>${esc(t.outputs.join(", "))}</td><td>${esc(t.steps.length)}</td><td>${when(t.updated_at)}</td>
      <td><a href="#/run?template=${encodeURIComponent(t.name)}">start</a></td></tr>`).join("");
    if (view.editing) return;
    main.innerHTML = `<h1>Templates</h1>
      <table id="templates"><thead><tr><th>name</th><th>inputs</th><th>outputs</th><th>steps</th><th>updated</th><th></th></tr></thead>
      <tbody>${rows || `<tr><td colspan="6" class="muted">No templates.</td></tr>`}</tbody></table>
      <h2>Add or replace a template</h2>
      <form class="stack" id="template-form">
        <label><span>Name</span><input id="t-name" required maxlength="128"></label>
        <label><span>CWL (YAML or JSON)</span><textarea id="t-cwl" required></textarea></label>
        <div id="form-error"></div><button type="submit" id="t-save">Save template</button>
      </form>`;
    const f = document.getElementById("template-form");
    f.oninput = () => { view.editing = true; };
    f.onsubmit = async ev => {
      ev.preventDefault();
      try {
        const t = await api("/api/templates", { method: "POST", body: { name: document.getElementById("t-name").value, cwl: document.getElementById("t-cwl").value } });
        view.editing = false;
        location.hash = "#/template/" + encodeURIComponent(t.name);
      } catch (e) { document.getElementById("form-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
    };
  };
  await load();
  view.match = kind => kind === "template";
  view.load = load;
}

async function templatePage(name) {
  const t = await api("/api/templates/" + encodeURIComponent(name));
  main.innerHTML = `<h1>Template ${esc(t.name)}</h1>
    <div class="toolbar"><a class="button" href="#/run?template=${encodeURIComponent(t.name)}">Start a workflow from it</a>
      <button class="danger" id="delete">Delete</button>
      <span class="muted">updated ${when(t.updated_at)}</span></div><div id="action-error"></div>
    <dl class="grid"><dt>inputs</dt><dd>${esc(t.inputs.join(", "))}</dd><dt>outputs</dt><dd>${esc(t.outputs.join(", "))}</dd></dl>
    <h2>Steps</h2><table><thead><tr><th>step</th><th>job type</th><th>inputs</th><th>outputs</th></tr></thead><tbody>
    ${t.steps.map(s => `<tr><td>${esc(s.id)}</td><td>${esc(s.job_type)}</td><td>${esc(s.inputs.join(", "))}</td><td>${esc(s.outputs.join(", "))}</td></tr>`).join("")}</tbody></table>
    <h2>CWL</h2><pre class="yaml" id="cwl">${yaml(t.cwl || "")}</pre>`;
  document.getElementById("delete").onclick = async () => {
    if (!confirm(`Delete template ${t.name}? Running workflows keep their copy.`)) return;
    try { await api("/api/templates/" + encodeURIComponent(name), { method: "DELETE" }); location.hash = "#/templates"; }
    catch (e) { document.getElementById("action-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  };
}

// A typed field for a workflow input: numbers, true/false and enum
// symbols are chosen as such; a File input takes files; the default is
// shown and applies when the field is left empty.
function inputField(id, d) {
  let ty = d && d.type, optional = false;
  if (Array.isArray(ty)) { optional = ty.includes("null"); ty = ty.find(x => x !== "null"); }
  if (typeof ty === "string" && ty.endsWith("?")) { optional = true; ty = ty.slice(0, -1); }
  const name = typeof ty === "string" ? ty : ty && ty.type === "enum" ? "enum" : ty && ty.type === "array" ? "array" : "";
  const def = d && d.default !== null && d.default !== undefined ? d.default : null;
  const hint = `${esc(name || "any")}${optional ? ", optional" : ""}${def !== null ? `, default ${esc(def)}` : ""}`;
  const attrs = `name="in-${esc(id)}" data-input="${esc(id)}" data-type="${esc(name)}" placeholder="${def !== null ? esc(def) : ""}"`;
  let field;
  if (name === "int" || name === "long") field = `<input type="number" step="1" ${attrs}>`;
  else if (name === "float" || name === "double") field = `<input type="number" step="any" ${attrs}>`;
  else if (name === "boolean") field = `<select ${attrs}><option value="">${def !== null ? "default" : "—"}</option><option>true</option><option>false</option></select>`;
  else if (name === "enum") {
    const syms = (ty.symbols || []).map(x => String(x).split(/[#/]/).pop());
    field = `<select ${attrs}><option value="">${def !== null ? "default" : "—"}</option>${syms.map(x => `<option>${esc(x)}</option>`).join("")}</select>`;
  } else if (name === "File" || name === "File[]") field = `<input type="hidden" ${attrs}>`;
  else field = `<input ${attrs}>`;
  const files = name === "File" || name === "File[]" || name === "" || name === "Any" || name === "array";
  return `<label><span>${esc(id)} <small class="muted">(${hint})</small></span>${field}
    ${files ? `<input type="file" ${name === "File" ? "" : "multiple"} data-file-for="${esc(id)}" title="or a file (several for a File[] input)">` : ""}</label>`;
}

async function runPage(chosen) {
  const ts = await api("/api/templates");
  if (!ts.length) { main.innerHTML = `<h1>Start a workflow</h1><p class="muted">No templates yet: <a href="#/templates">add one</a>.</p>`; return; }
  const name = chosen && ts.some(t => t.name === chosen) ? chosen : ts[0].name;
  const t = ts.find(x => x.name === name);
  main.innerHTML = `<h1>Start a workflow</h1>
    <form class="stack" id="run-form">
      <label><span>Template</span><select id="run-template">${ts.map(x => `<option ${x.name === name ? "selected" : ""}>${esc(x.name)}</option>`).join("")}</select></label>
      ${t.inputs.map(i => inputField(i, (t.input_details || []).find(d => d.id === i))).join("")}
      <div id="form-error"></div><button type="submit" id="run-submit">Start</button>
    </form>`;
  document.getElementById("run-template").onchange = ev => { location.hash = "#/run?template=" + encodeURIComponent(ev.target.value); };
  document.getElementById("run-form").onsubmit = async ev => {
    ev.preventDefault();
    const inputs = {};
    // Left empty: the template's default applies.
    document.querySelectorAll("#run-form [data-input]").forEach(el => { if (el.value !== "") inputs[el.dataset.input] = el.value; });
    const submit = document.getElementById("run-submit");
    try {
      submit.disabled = true;
      for (const el of document.querySelectorAll("#run-form [data-file-for]")) {
        if (!el.files || !el.files.length) continue;
        const refs = [];
        for (const f of el.files) refs.push(await uploadFile(f));
        inputs[el.dataset.fileFor] = refs.length === 1 ? refs[0].value : "[" + refs.map(r => r.value).join(",") + "]";
      }
      const r = await api("/api/workflows", { method: "POST", body: { template: name, inputs } });
      location.hash = "#/workflow/" + r.workflow_id;
    } catch (e) { submit.disabled = false; document.getElementById("form-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  };
  view.editing = true;
}

// ---------- agent pages ----------

async function jobsPage(params) {
  const state = (params && params.get("state")) || "", after = (params && params.get("after")) || "";
  const load = async () => {
    const d = await api("/api/jobs?" + new URLSearchParams({ state, after }));
    const rows = d.items.map(j => `<tr class="job-row" data-id="${esc(j.id)}" data-state="${esc(j.state)}">
      <td class="mono"><a href="#/job/${esc(j.id)}">${esc(short(j.id))}</a></td><td>${esc(j.job_type)}</td><td>${badge(j.state)}</td>
      <td class="mono">${esc(j.workflow_id || "—")}</td><td class="mono" title="${esc(j.manager)}">${esc(short(j.manager))}</td>
      <td>${when(j.created_at)}</td><td>${when(j.started_at)}</td><td>${when(j.ended_at)}</td><td>${esc(j.message)}</td></tr>`).join("");
    const states = ["", "pending", "queued", "running", "completed", "failed", "cancelled"];
    const nav = (a, t) => `<a class="button secondary" href="#/jobs?${new URLSearchParams({ state, after: a })}">${t}</a>`;
    main.innerHTML = `<h1>Jobs</h1>
      <div class="toolbar"><label>State <select id="j-state">${states.map(v => `<option value="${v}" ${v === state ? "selected" : ""}>${v || "any"}</option>`).join("")}</select></label></div>
      <table id="jobs"><thead><tr><th>job</th><th>job type</th><th>state</th><th>workflow</th><th>manager</th><th>created</th><th>started</th><th>ended</th><th>error</th></tr></thead>
      <tbody>${rows || `<tr><td colspan="9" class="muted">No jobs yet.</td></tr>`}</tbody></table>
      <div class="pager">${after ? nav("", "« newest") : ""}${d.next ? nav(d.next, "older ›") : ""}</div>`;
    document.getElementById("j-state").onchange = ev => { location.hash = "#/jobs?" + new URLSearchParams({ state: ev.target.value }); };
  };
  await load();
  view.match = kind => kind === "job" || kind === "resync";
  view.load = load;
}

async function jobPage(id) {
  const load = async () => {
    const j = await api("/api/jobs/" + encodeURIComponent(id));
    const kv = o => Object.keys(o || {}).sort().map(k => `<tr><td class="mono">${esc(k)}</td><td class="mono">${showValue(o[k])}</td></tr>`).join("") || `<tr><td class="muted" colspan="2">none</td></tr>`;
    main.innerHTML = `<h1>Job <span class="mono">${esc(j.id)}</span></h1>
      <dl class="grid"><dt>state</dt><dd id="job-state">${badge(j.state)}</dd><dt>job type</dt><dd><a href="#/jobtype/${encodeURIComponent(j.job_type)}">${esc(j.job_type)}</a></dd>
      <dt>workflow</dt><dd class="mono">${esc(j.workflow_id || "—")}</dd><dt>manager</dt><dd class="mono">${esc(j.manager)}</dd>
      <dt>exit status</dt><dd>${j.exit_status === null || j.exit_status === undefined ? "—" : esc(j.exit_status)}</dd><dt>error</dt><dd>${esc(j.message) || "—"}</dd>
      <dt>created</dt><dd>${when(j.created_at)}</dd><dt>started</dt><dd>${when(j.started_at)}</dd><dt>ended</dt><dd>${when(j.ended_at)}</dd></dl>
      <h2>Inputs</h2><table><tbody>${kv(j.inputs)}</tbody></table>
      <h2>Outputs</h2><table><tbody>${kv(j.outputs)}</tbody></table>
      <h2>stderr (tail)</h2><pre class="stderr">${esc(j.stderr_tail) || " "}</pre>`;
  };
  await load();
  view.match = (kind, data) => (kind === "job" && data.id === id) || kind === "resync";
  view.load = load;
}

async function jobTypesPage() {
  const load = async () => {
    const ts = await api("/api/jobtypes");
    if (view.editing) return;
    main.innerHTML = `<h1>Job types</h1>
      <table id="jobtypes"><thead><tr><th>name</th><th>inputs</th><th>outputs</th><th>timeout</th><th>updated</th></tr></thead>
      <tbody>${ts.map(t => `<tr><td><a href="#/jobtype/${encodeURIComponent(t.name)}">${esc(t.name)}</a></td><td>${esc(t.inputs.join(", "))}</td>
        <td>${esc(t.outputs.join(", "))}</td><td>${esc(t.timeout_seconds)} s</td><td>${when(t.updated_at)}</td></tr>`).join("") || `<tr><td colspan="5" class="muted">No job types.</td></tr>`}</tbody></table>
      <h2>Add a job type</h2>${jobTypeForm({ name: "", inputs: [], outputs: [], body: "", timeout_seconds: 300, max_output_bytes: 0 }, true)}`;
    wireJobTypeForm(null);
  };
  await load();
  view.match = kind => kind === "jobtype";
  view.load = load;
}

function jobTypeForm(t, create) {
  return `<form class="stack" id="jobtype-form">
    ${create ? `<label><span>Name</span><input id="jt-name" required maxlength="64"></label>` : ""}
    <label><span>Inputs (comma-separated)</span><input id="jt-inputs" value="${esc(t.inputs.join(", "))}"></label>
    <label><span>Outputs (comma-separated)</span><input id="jt-outputs" value="${esc(t.outputs.join(", "))}"></label>
    <label><span>Timeout (seconds)</span><input id="jt-timeout" type="number" min="0" value="${esc(t.timeout_seconds)}"></label>
    <label><span>Largest stdout (bytes, 0 = default)</span><input id="jt-max-output" type="number" min="0" value="${esc(t.max_output_bytes)}"></label>
    <label><span>Body (bash)</span><textarea id="jt-body" spellcheck="false">${esc(t.body)}</textarea></label>
    <div id="form-error"></div><div id="form-ok"></div>
    <button type="submit" id="save">${create ? "Add job type" : "Save"}</button>
    ${create ? "" : `<button type="button" class="secondary" id="edit-cancel">Cancel</button>`}
  </form>`;
}

function wireJobTypeForm(name, done) {
  const f = document.getElementById("jobtype-form");
  f.oninput = () => { view.editing = true; };
  const list = id => document.getElementById(id).value.split(",").map(s => s.trim()).filter(Boolean);
  f.onsubmit = async ev => {
    ev.preventDefault();
    const n = name || document.getElementById("jt-name").value.trim();
    const body = { inputs: list("jt-inputs"), outputs: list("jt-outputs"), body: document.getElementById("jt-body").value,
      timeout_seconds: Number(document.getElementById("jt-timeout").value || 0),
      max_output_bytes: Number(document.getElementById("jt-max-output").value || 0), create: !name };
    document.getElementById("form-error").innerHTML = "";
    document.getElementById("form-ok").innerHTML = "";
    try {
      await api("/api/jobtypes/" + encodeURIComponent(n), { method: "PUT", body });
      view.editing = false;
      if (done) done(); else location.hash = "#/jobtype/" + encodeURIComponent(n);
    } catch (e) { document.getElementById("form-error").innerHTML = `<p class="error" id="save-error">${esc(e.message)}</p>`; }
  };
  const c = document.getElementById("edit-cancel");
  if (c) c.onclick = () => { view.editing = false; if (done) done(true); };
}

async function jobTypePage(name) {
  let saved = false;
  const load = async () => {
    const t = await api("/api/jobtypes/" + encodeURIComponent(name));
    if (view.editing) return;
    const ex = t.executor === "docker" && t.docker
      ? `docker: image ${esc(t.docker.image)}${t.docker.cpus ? `, ${esc(t.docker.cpus)} CPUs` : ""}${t.docker.memory ? `, memory ${esc(t.docker.memory)}` : ""}${t.docker.network ? `, network ${esc(t.docker.network)}` : ""}`
      : t.executor === "slurm" && t.slurm
        ? `slurm${t.slurm.partition ? `: partition ${esc(t.slurm.partition)}` : ""}${t.slurm.time_limit ? `, time ${esc(t.slurm.time_limit)}` : ""}${t.slurm.cpus ? `, ${esc(t.slurm.cpus)} CPUs` : ""}${t.slurm.memory ? `, memory ${esc(t.slurm.memory)}` : ""}`
        : esc(t.executor || "bash");
    main.innerHTML = `<h1>Job type ${esc(t.name)}</h1>
      <div class="toolbar"><button id="edit">Edit</button><button class="danger" id="delete">Delete</button><span class="muted">updated ${when(t.updated_at)}</span></div>
      ${saved ? `<p class="ok" id="saved">Saved.</p>` : ""}
      <div id="action-error"></div>
      <dl class="grid"><dt>executor</dt><dd id="jt-executor">${ex}</dd><dt>inputs</dt><dd>${esc(t.inputs.join(", "))}</dd><dt>outputs</dt><dd>${esc(t.outputs.join(", "))}</dd>
      <dt>timeout</dt><dd>${esc(t.timeout_seconds)} s</dd><dt>largest stdout</dt><dd>${esc(t.max_output_bytes)} bytes</dd></dl>
      <h2>Body</h2><pre id="jt-body-view">${esc(t.body)}</pre>`;
    document.getElementById("delete").onclick = async () => {
      if (!confirm(`Delete job type ${t.name}? Jobs already accepted keep running.`)) return;
      try { await api("/api/jobtypes/" + encodeURIComponent(name), { method: "DELETE" }); location.hash = "#/jobtypes"; }
      catch (e) { document.getElementById("action-error").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
    };
    document.getElementById("edit").onclick = () => {
      view.editing = true;
      main.innerHTML = `<h1>Edit job type ${esc(t.name)}</h1>${jobTypeForm(t, false)}`;
      wireJobTypeForm(t.name, cancelled => { saved = !cancelled; view.editing = false; load(); });
    };
  };
  await load();
  view.match = (kind, data) => kind === "jobtype" && data.name === name;
  view.load = load;
}

// ---------- node page ----------

async function nodePage() {
  const load = async () => {
    const d = await api("/api/node");
    node = d;
    const i = d.info, s = d.stats;
    main.innerHTML = `<h1>Node</h1>
      <dl class="grid"><dt>node id</dt><dd class="mono" id="node-id">${esc(i.node_id)}</dd><dt>roles</dt><dd>${esc(i.roles.join(", "))}</dd>
      <dt>client API</dt><dd class="mono">${esc(i.api_listen)}</dd><dt>peer endpoint</dt><dd class="mono">${esc(i.peer_endpoint)}</dd>
      <dt>libp2p</dt><dd class="mono">${esc(i.p2p_listen.join(", "))}</dd><dt>version</dt><dd>${esc(i.version)}</dd><dt>data dir</dt><dd class="mono">${esc(i.data_dir)}</dd></dl>
      <h2>Counters</h2><dl class="grid">
      <dt>workflows</dt><dd>${s.workflows_live} live, ${s.workflows_waiting} waiting, ${s.workflows_completed} completed, ${s.workflows_failed} failed</dd>
      <dt>jobs</dt><dd>${s.jobs_completed} completed, ${s.jobs_failed} failed</dd>
      <dt>messages delivered</dt><dd>${s.messages_delivered}</dd><dt>requests published</dt><dd>${s.requests_published}</dd>
      <dt>synced writes</dt><dd>${s.synced_writes}</dd><dt>CPU</dt><dd>${s.cpu_seconds.toFixed(2)} s</dd><dt>memory</dt><dd>${(s.rss_bytes / 1048576).toFixed(1)} MiB</dd></dl>
      <h2>Peers</h2><table id="peers"><thead><tr><th>node id</th><th>gossip</th><th>endpoint</th><th>queued</th><th>delivered</th><th>dropped</th><th>refused</th><th>stream</th><th>last error / refusal</th></tr></thead><tbody>
      ${d.peers.map(p => `<tr data-peer="${esc(p.node_id)}"><td class="mono">${esc(p.node_id)}</td><td class="mono">${p.p2p_connected ? esc(p.p2p_address) : "—"}</td>
        <td class="mono">${esc(p.endpoint)}</td><td>${esc(p.queued)}</td><td>${esc(p.delivered)}</td><td>${esc(p.dropped)}</td><td>${esc(p.refused)}</td>
        <td>${p.stream_open ? "open" : "closed"}</td><td>${esc(p.last_error || p.last_refusal)}</td></tr>`).join("") || `<tr><td colspan="9" class="muted">No peers.</td></tr>`}</tbody></table>`;
  };
  await load();
  view.match = kind => kind === "tick";
  view.load = load;
}

async function ledgerPage() {
  const load = async () => {
    const d = await api("/api/ledger");
    const chain = c => {
      const owed = c.role === "agent" ? "receipts this node issued for jobs it ran (owed to it)" : "receipts this node received for jobs it placed (owed by it)";
      const holds = c.holds ? `<span class="badge completed">the chain holds</span>` : `<span class="badge failed">broken: ${esc(c.broken)}</span>`;
      const bal = c.balances.map(b => `<tr data-peer="${esc(b.peer)}"><td class="mono">${esc(b.peer)}</td>
        <td>${esc(b.countersigned)} (${esc(b.countersigned_credits)} credits)</td><td>${esc(b.disputed)} (${esc(b.disputed_credits)} credits)</td>
        <td>${esc(b.open)} (${esc(b.open_credits)} credits)</td></tr>`).join("") || `<tr><td colspan="4" class="muted">No receipts yet.</td></tr>`;
      const rows = c.recent.map(e => `<tr><td>${esc(e.seq)}</td><td class="mono">${esc(short(e.peer))}</td><td>${esc(e.kind)}</td>
        <td class="mono">${esc(short(e.job_id))}</td><td>${e.receipt ? esc(e.receipt.charge_credits) : ""}</td>
        <td>${e.receipt ? esc(e.receipt.job_type + " " + e.receipt.state + ", ran " + (e.receipt.wall_ms / 1000).toFixed(1) + " s") : esc(e.reason)}</td></tr>`).join("");
      return `<section class="ledger" data-role="${esc(c.role)}"><h2>${esc(c.role)} ledger</h2><p>${esc(owed)}; ${esc(c.entries)} entries ${holds}</p>
        <table class="balances"><thead><tr><th>peer</th><th>countersigned</th><th>disputed</th><th>open</th></tr></thead><tbody>${bal}</tbody></table>
        <table class="entries"><thead><tr><th>seq</th><th>peer</th><th>entry</th><th>job</th><th>charge</th><th>detail</th></tr></thead><tbody>${rows}</tbody></table></section>`;
    };
    main.innerHTML = `<h1>Ledger</h1>${d.chains.map(chain).join("") || `<p class="muted">This node keeps no ledger.</p>`}`;
  };
  await load();
  view.match = kind => kind === "tick";
  view.load = load;
}

// ---------- live updates ----------

// Server-Sent Events read over fetch, so that the session header goes
// with them (EventSource cannot send headers).
function connect() {
  const ctl = new AbortController();
  stream = ctl;
  const on = () => { live.textContent = "live"; live.className = "live on"; banner.hidden = true; };
  const off = () => {
    live.textContent = "reconnecting…"; live.className = "live off";
    banner.hidden = false; banner.id = "banner"; banner.textContent = "The live connection to the node is lost; reconnecting…";
  };
  const dispatch = (kind, raw) => {
    let data = {};
    try { data = JSON.parse(raw); } catch (_) { /* keep {} */ }
    if (!view || !view.match || view.editing || !view.match(kind, data)) return;
    // Coalesce bursts of relevant events: one reload per 50 ms at most.
    if (pending) return;
    const v = view;
    pending = setTimeout(async () => {
      pending = null;
      if (v !== view || v.editing) return;
      try { await v.load(); } catch (e) { /* the next event retries */ }
    }, kind === "tick" ? 0 : 50);
  };
  const retry = () => {
    if (stream !== ctl) return;
    off();
    setTimeout(async () => {
      if (stream !== ctl) return;
      try { await api("/api/node"); } catch (e) { if (e instanceof LoginNeeded) return; }
      if (stream === ctl) connect();
    }, 1000);
  };
  (async () => {
    const resp = await fetch("/events", { headers: authHeaders({ "accept": "text/event-stream" }), credentials: "omit", signal: ctl.signal });
    if (resp.status === 401) { setSession(""); showLogin(); return; }
    if (!resp.ok || !resp.body) throw new Error("event stream refused: " + resp.status);
    on();
    if (view && view.load && !view.editing) view.load().catch(() => {});
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", kind = "message", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "") {
          if (data.length) dispatch(kind, data.join("\n"));
          kind = "message"; data = [];
        } else if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
    }
    throw new Error("event stream ended");
  })().catch(() => retry());
}

async function start() {
  try { node = await api("/api/node"); } catch (e) { if (!(e instanceof LoginNeeded)) fail(e); return; }
  const needsLogin = await api("/login").then(d => d.token_required).catch(() => false);
  document.getElementById("logout").hidden = !needsLogin;
  window.removeEventListener("hashchange", show);
  window.addEventListener("hashchange", show);
  connect();
  await show();
}

document.getElementById("logout").onclick = logout;
start();
