// saeflow's single-page app: hash routes #flow/ID, #feature/ID, #layers, #steer/ID, #prompt.
// Every view reads the JSON API under /api (see /docs); plotly.js draws the graphs and plots.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const CLASS_COLORS = {translated: "#4c72b0", processed: "#dd8452", newborn: "#55a868", unexplained: "#c44e52"};
const LANE_COLORS = {MLP: "#e1a100", attention: "#2a9d5b", residual: "#8c8c8c"};
const LINK_COLORS = {res: "#4c72b0", seed: "#4c72b0", mlp: "#e1a100", attn: "#2a9d5b", pearson: "#777"};
const PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"];
window.saeflow = {timings: {}};
let INFO = null;

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error(errorText(body && body.detail, r.statusText));
  return body;
}
// An error's detail as one line: a string as it is, a 422's field errors as "field: message; ...".
function errorText(d, fallback) {
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ");
  return JSON.stringify(d ?? fallback);
}
const postJSON = (path, obj) => api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(obj)});
function status(el, text, isError) { el.textContent = text; el.classList.toggle("error", !!isError); }
const featureLink = (id, label) => `<a href="#feature/${esc(id)}">${esc(id)}</a>${label ? " " + esc(label) : ""}`;

// --- routing ---------------------------------------------------------------------------------
function route() {
  const [view, ...rest] = (location.hash.slice(1) || "flow").split("/");
  const arg = rest.join("/");
  document.querySelectorAll(".view").forEach((s) => (s.hidden = s.id !== "view-" + view));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  if (view === "flow") showFlow(arg);
  else if (view === "feature") showFeature(arg);
  else if (view === "layers") showLayers();
  else if (view === "steer") showSteer(arg);
}
window.addEventListener("hashchange", route);

// --- search ----------------------------------------------------------------------------------
let searchTimer = null;
$("#search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 250);
});
$("#search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(true); });
async function runSearch(go) {
  const q = $("#search").value.trim();
  const box = $("#search-results");
  if (!q) { box.hidden = true; return; }
  try {
    const res = await api("/api/search?limit=20&q=" + encodeURIComponent(q));
    if (go && res.hits.length) { box.hidden = true; location.hash = "flow/" + res.hits[0].id; return; }
    box.innerHTML = res.hits.length ? res.hits.map((h) =>
      `<a href="#flow/${esc(h.id)}">${esc(h.id)} <span class="muted">${esc(h.label || "")}</span></a>`).join("")
      : `<span class="muted">nothing found for "${esc(q)}"</span>`;
    box.hidden = false;
  } catch (e) { box.innerHTML = esc(e.message); box.hidden = false; }
}
document.addEventListener("click", (e) => { if (!e.target.closest("#search-form")) $("#search-results").hidden = true; });

// --- graphs ----------------------------------------------------------------------------------
function nodeColor(n, by) {
  if (by === "community") return n.community == null ? "#cccccc" : PALETTE[n.community % PALETTE.length];
  if (n.class) return CLASS_COLORS[n.class] || "#999";
  return LANE_COLORS[n.lane] || "#999";
}

function drawGraph(div, g, colorBy, onClick) {
  const t0 = performance.now();
  const pos = Object.fromEntries(g.nodes.map((n) => [n.id, n]));
  const buckets = {};
  for (const l of g.links) {
    const s = pos[l.source], t = pos[l.target];
    if (!s || !t) continue;
    const w = l.chain ? "chain" : (l.similarity >= 0.6 ? 3 : l.similarity >= 0.3 ? 2 : 1);
    const key = (l.chain ? "chain" : l.kind) + "|" + w;
    (buckets[key] = buckets[key] || {x: [], y: [], kind: l.kind, w});
    buckets[key].x.push(s.x, t.x, null);
    buckets[key].y.push(s.y, t.y, null);
  }
  const many = g.nodes.length > 1500;
  const traces = Object.entries(buckets).map(([key, b]) => ({
    type: many ? "scattergl" : "scatter", mode: "lines", x: b.x, y: b.y, hoverinfo: "skip", showlegend: false,
    line: {width: b.w === "chain" ? 4 : b.w, color: b.w === "chain" ? "#1f2a44" : (LINK_COLORS[b.kind] || "#999")},
    opacity: b.w === "chain" ? 0.9 : 0.55, name: key,
  }));
  traces.push({
    type: many ? "scattergl" : "scatter", mode: "markers", name: "features", showlegend: false,
    x: g.nodes.map((n) => n.x), y: g.nodes.map((n) => n.y), customdata: g.nodes.map((n) => n.id),
    text: g.nodes.map((n) => `<b>${esc(n.id)}</b><br>${esc(n.explanation || n.label || "(no label)")}` +
      `<br>${n.class ? "class " + n.class + "<br>" : ""}score ${(+n.score || 0).toFixed(3)}` +
      (n.community != null ? `<br>community ${n.community}` : "")),
    hoverinfo: "text",
    marker: {size: g.nodes.map((n) => (n.role === "seed" ? 16 : 10)), color: g.nodes.map((n) => nodeColor(n, colorBy)),
             line: {width: g.nodes.map((n) => (n.role === "seed" ? 2.5 : 0.5)), color: "#111"}},
  });
  const bandTicks = (g.lanes || []).map((name, i) => ({v: -i * (g.band || 1), name}));
  const layout = {
    margin: {l: 80, r: 20, t: 10, b: 40}, hovermode: "closest", dragmode: "pan",
    xaxis: {title: {text: "layer"}, dtick: 1, zeroline: false},
    yaxis: {tickvals: bandTicks.map((b) => b.v), ticktext: bandTicks.map((b) => b.name), zeroline: false, showgrid: false},
  };
  return Plotly.react(div, traces, layout, {responsive: true, displaylogo: false, scrollZoom: true}).then(() => {
    div.dataset.nodeCount = String(g.nodes.length);
    div.dataset.linkCount = String(g.links.length);
    div.removeAllListeners && div.removeAllListeners("plotly_click");
    div.on("plotly_click", (ev) => {
      const p = ev.points.find((q) => q.customdata);
      if (p && onClick) onClick(p.customdata);
    });
    return performance.now() - t0;
  });
}

// --- flow view -------------------------------------------------------------------------------
let flowGraph = null, flowTimer = null;
// t_mod: the flow's per-layer thresholds (omitted from requests) until the slider is moved
const tMod = () => ($("#t-mod-auto").checked ? null : +$("#t-mod").value);
$("#t-mod-auto").addEventListener("change", () => { clearTimeout(flowTimer); flowTimer = setTimeout(loadFlow, 120); });
for (const id of ["t-res", "t-mod"]) {
  $("#" + id).addEventListener("input", () => {
    $("#" + id + "-val").textContent = (+$("#" + id).value).toFixed(2);
    if (id === "t-mod") $("#t-mod-auto").checked = false;
    clearTimeout(flowTimer);
    flowTimer = setTimeout(loadFlow, 120);
  });
}
$("#mod-k").addEventListener("change", loadFlow);
$("#color-by").addEventListener("change", () => flowGraph && drawGraph($("#graph"), flowGraph, $("#color-by").value, openFeature));
$("#flow-feature").addEventListener("change", () => { location.hash = "flow/" + $("#flow-feature").value.trim(); });
$("#export-png").addEventListener("click", () => Plotly.downloadImage($("#graph"), {format: "png", filename: "saeflow-graph", width: 1600, height: 900}));
$("#export-svg").addEventListener("click", () => Plotly.downloadImage($("#graph"), {format: "svg", filename: "saeflow-graph"}));
$("#export-json").addEventListener("click", () => flowGraph && download("saeflow-graph.json", flowGraph));
const openFeature = (id) => { location.hash = "feature/" + id; };

function download(name, obj) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(obj, null, 2)], {type: "application/json"}));
  a.download = name;
  a.click();
}

async function showFlow(arg) {
  // #flow/ID[,ID...][?t_res=..&t_mod=..&mod_k=..]
  const [ids, query] = (arg || "").split("?");
  const params = new URLSearchParams(query || "");
  for (const [k, el] of [["t_res", "#t-res"], ["t_mod", "#t-mod"], ["mod_k", "#mod-k"]]) {
    if (params.has(k)) { $(el).value = params.get(k); if ($(el + "-val")) $(el + "-val").textContent = (+params.get(k)).toFixed(2); if (k === "t_mod") $("#t-mod-auto").checked = false; }
  }
  if (ids) $("#flow-feature").value = decodeURIComponent(ids);
  if (!$("#flow-feature").value && INFO && INFO.first_feature) $("#flow-feature").value = INFO.first_feature;
  await loadFlow();
}

let flowSeq = 0;
async function loadFlow() {
  const f = $("#flow-feature").value.trim();
  const st = $("#flow-status");
  if (!f) { status(st, "search for a feature, or type its id (LAYER/POSITION/INDEX)"); return; }
  const seq = ++flowSeq;
  const q = new URLSearchParams({feature: f, t_res: $("#t-res").value, mod_k: $("#mod-k").value});
  if (tMod() !== null) q.set("t_mod", String(tMod()));
  const t0 = performance.now();
  status(st, "tracing ...");
  try {
    const g = await api("/api/trace?" + q);
    if (seq !== flowSeq) return;  // a newer request is on its way
    const t1 = performance.now();
    flowGraph = g;
    await drawGraph($("#graph"), g, $("#color-by").value, openFeature);
    const t2 = performance.now();
    window.saeflow.timings.flow = {fetch_ms: t1 - t0, draw_ms: t2 - t1, nodes: g.nodes.length};
    status(st, `${g.nodes.length} nodes, ${g.links.length} links` + (g.pruned ? ` (pruned from ${g.n_total})` : "") +
      ` · t_res ${(+g.t_res).toFixed(2)}, t_mod ${g.t_mod === null ? "per layer (" + (INFO && INFO.flow_null || "null") + " null)" : (+g.t_mod).toFixed(2)}`);
    $("#graph").dataset.tRes = String(g.t_res);
  } catch (e) { status(st, e.message, true); }
}

// --- feature page ----------------------------------------------------------------------------
function context(ex, maxAct) {
  const acts = ex.acts || [];
  return `<div class="ctx">${(ex.activation ?? 0).toFixed(2)} · ` + ex.tokens.map((t, i) => {
    if (t == null) return "";
    const a = Math.max(0, acts[i] || 0) / (maxAct || 1);
    return `<span class="tok${i === ex.center ? " center" : ""}" style="background: rgba(255,120,0,${a.toFixed(2)})" title="${(acts[i] || 0).toFixed(3)}">${esc(t)}</span>`;
  }).join("") + "</div>";
}
function linkTable(rows, cols) {
  if (!rows || !rows.length) return `<p class="muted">none</p>`;
  return `<table><tr><th>feature</th>${cols.map((c) => `<th>${c}</th>`).join("")}<th>label</th></tr>` +
    rows.map((r) => `<tr><td>${featureLink(r.id)}</td>${cols.map((c) => `<td>${r[c] == null ? "" : (+r[c]).toFixed(3)}</td>`).join("")}<td>${esc(r.label || "")}</td></tr>`).join("") + "</table>";
}

async function showFeature(id) {
  const el = $("#feature-page");
  el.innerHTML = "loading ...";
  let p;
  try { p = await api("/api/features/" + id); } catch (e) { el.innerHTML = `<p class="status error">${esc(e.message)}</p>`; return; }
  const ix = p.index;
  let html = `<h2 id="feature-title">${esc(p.id)} <span class="muted">${esc(ix ? ix.label : "")}</span></h2>`;
  html += `<p><a href="#flow/${esc(p.id)}">flow graph</a> · <a href="#steer/${esc(p.id)}">steer with it</a>` +
    (ix && ix.neuronpedia ? ` · <a href="${esc(ix.neuronpedia)}" target="_blank" rel="noopener">Neuronpedia</a>` : "") +
    (ix ? ` · <a id="dashboard-json" href="/api/dashboard/${esc(p.id)}" download="${esc(p.id.replaceAll("/", "-"))}.json">dashboard JSON</a>` : "") + `</p>`;
  if (ix && ix.explanation) html += `<p><b>explanation:</b> ${esc(ix.explanation)}</p>`;
  html += `<p>class: <b>${esc(p.class || "-")}</b> · community: <b>${p.community ?? "-"}</b>` +
    (ix ? ` · density ${(+ix.density).toExponential(2)} · mean ${(+ix.mean_act).toFixed(3)} · max ${(+ix.max_act).toFixed(3)}` : "") + `</p>`;
  html += `<div class="cols"><div><h3>Activation histogram</h3><div id="hist" class="plot" style="height:240px"></div></div>`;
  if (ix && !ix.logit_top) {
    html += `<div><h3>Logit lens</h3><p>computed when the page opens, with the model: serve this run with --model</p></div>`;
  } else if (ix) {
    html += `<div><h3>Logit lens</h3><table><tr><th>promoted</th><th>suppressed</th></tr>` +
      ix.logit_top.map((t, i) => `<tr><td>${esc(JSON.stringify(t.token))} ${(+t.logit).toFixed(3)}</td><td>${ix.logit_bottom[i] ? esc(JSON.stringify(ix.logit_bottom[i].token)) + " " + (+ix.logit_bottom[i].logit).toFixed(3) : ""}</td></tr>`).join("") + `</table></div>`;
  }
  html += `</div>`;
  if (ix) {
    const mx = ix.max_act || 1;
    html += `<h3>Top contexts</h3><div id="contexts">${ix.examples.map((e) => context(e, mx)).join("")}</div>`;
    html += `<h3>Samples across activation quantiles</h3>${ix.samples.map((e) => context(e, mx)).join("") || "<p class='muted'>none</p>"}`;
  } else html += `<p class="muted">No feature index in this run (saeflow index).</p>`;
  html += `<div class="cols"><div><h3>Predecessors (data-free)</h3>`;
  for (const [kind, rows] of Object.entries(p.predecessors || {})) html += `<h4>${kind}</h4>` + linkTable(rows, ["similarity"]);
  html += `</div><div><h3>Successors</h3>${linkTable(p.successors, ["similarity"])}</div></div>`;
  const co = p.coactivation || {};
  html += `<div class="cols"><div><h3>Co-activation upstream</h3>${linkTable(co.upstream, ["pearson", "jaccard", "sufficiency", "necessity"])}</div>` +
    `<div><h3>Co-activation downstream</h3>${linkTable(co.downstream, ["pearson", "jaccard", "sufficiency", "necessity"])}</div></div>`;
  el.innerHTML = html;
  if (ix && ix.hist) {
    // log-spaced bins: bar i covers [edges[i], edges[i+1]); show the populated range only
    const edges = ix.hist_edges || [];
    const used = ix.hist.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
    const lo = used.length ? used[0] : 0, hi = used.length ? used[used.length - 1] : ix.hist.length - 1;
    const x = [], y = [];
    for (let i = lo; i <= hi; i++) { x.push(edges.length > i + 1 ? Math.sqrt(edges[i] * edges[i + 1]) : i); y.push(ix.hist[i]); }
    Plotly.newPlot("hist", [{type: "bar", x, y, marker: {color: "#4c72b0"}}],
      {margin: {l: 50, r: 10, t: 10, b: 40}, bargap: 0.05, xaxis: {title: {text: "activation (log scale)"}, type: "log"}, yaxis: {title: {text: "count"}}},
      {displaylogo: false, responsive: true});
  }
}

// --- layers ----------------------------------------------------------------------------------
let gateOffset = 0;
async function showLayers() {
  const d = await api("/api/layers");
  if (d.classes.length) {
    const L = d.classes.map((r) => r.layer);
    Plotly.react("classes-plot", ["translated", "processed", "newborn", "unexplained"].map((c) => ({
      type: "bar", name: c, x: L, y: d.classes.map((r) => r[c]), marker: {color: CLASS_COLORS[c]}})),
      {barmode: "stack", margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "layer"}, dtick: 1}, yaxis: {title: {text: "share"}}},
      {displaylogo: false, responsive: true});
  } else $("#classes-plot").textContent = "no flow in this run";
  $("#classes-caption").textContent = d.classes_caption || "";
  const gl = Object.keys(d.groups || {}).map(Number).sort((a, b) => a - b);
  if (gl.length) {
    const names = Object.keys(d.groups[String(gl[0])]);
    Plotly.react("groups-plot", names.map((g) => ({type: "bar", name: g, x: gl,
      y: gl.map((L) => d.groups[String(L)][g])})),
      {barmode: "stack", margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "layer"}, dtick: 1}, yaxis: {title: {text: "share"}}},
      {displaylogo: false, responsive: true});
  } else $("#groups-plot").textContent = "no statistics in this run (saeflow stats)";
  const sel = $("#pt-position");
  const positions = [...new Set(d.pass_through.map((r) => r.position))];
  sel.innerHTML = positions.map((p) => `<option>${esc(p)}</option>`).join("");
  sel.onchange = () => drawSankey(d.pass_through.filter((r) => r.position === sel.value));
  if (positions.length) drawSankey(d.pass_through.filter((r) => r.position === positions[0]));
  else $("#sankey").textContent = "no statistics in this run (saeflow stats)";
  loadCommunities();
  loadGates();
}

function drawSankey(rows) {
  // per layer L: live -> (passes to L+1 | disappears); L+1 also gets the appearing features
  // columns by layer: L_k and "gone after L_(k-1)" and "new at L_(k+1)" share column k
  const label = [], idx = {}, nx = [], ny = [];
  const layers = rows.flatMap((r) => [r.layer, r.next_layer]);
  const lo = Math.min(...layers), span = Math.max(1, Math.max(...layers) - lo);
  const col = (L) => 0.02 + 0.96 * (L - lo) / span;
  const node = (n, L, y) => (idx[n] ??= (label.push(n), nx.push(col(L)), ny.push(y), label.length - 1));
  const src = [], dst = [], val = [];
  for (const r of rows) {
    const a = node(`L${r.layer}`, r.layer, 0.2), b = node(`L${r.next_layer}`, r.next_layer, 0.2);
    src.push(a); dst.push(b); val.push(r.pass_through_pct);
    src.push(a); dst.push(node(`gone after L${r.layer}`, r.next_layer, 0.8)); val.push(r.disappearing_pct);
    src.push(node(`new at L${r.next_layer}`, r.layer, 0.6)); dst.push(b); val.push(r.appearing_pct);
  }
  Plotly.react("sankey", [{type: "sankey", arrangement: "snap", node: {label, x: nx, y: ny, pad: 8},
    link: {source: src, target: dst, value: val}}],
    {margin: {l: 10, r: 10, t: 10, b: 10}}, {displaylogo: false, responsive: true});
  $("#pt-table").innerHTML = `<table><tr><th>layers</th><th>pass-through %</th><th>disappearing %</th><th>appearing %</th></tr>` +
    rows.map((r) => `<tr><td>${r.layer} → ${r.next_layer}</td><td>${(+r.pass_through_pct).toFixed(1)}</td><td>${(+r.disappearing_pct).toFixed(1)}</td><td>${(+r.appearing_pct).toFixed(1)}</td></tr>`).join("") + "</table>";
}

$("#comm-min").addEventListener("input", () => {
  $("#comm-min-val").textContent = (+$("#comm-min").value).toFixed(2);
  clearTimeout(flowTimer);
  flowTimer = setTimeout(loadCommunities, 200);
});
async function loadCommunities() {
  const st = $("#comm-status");
  try {
    const g = await api("/api/communities?min_similarity=" + $("#comm-min").value);
    await drawGraph($("#comm-graph"), g, "community", openFeature);
    status(st, `${g.nodes.length} features of the ${g.communities.length} largest communities` + (g.pruned ? ` (pruned from ${g.n_total})` : ""));
  } catch (e) { status(st, e.message, true); }
}

$("#gate-kind").addEventListener("change", () => { gateOffset = 0; loadGates(); });
$("#gate-prev").addEventListener("click", () => { gateOffset = Math.max(0, gateOffset - 25); loadGates(); });
$("#gate-next").addEventListener("click", () => { gateOffset += 25; loadGates(); });
async function loadGates() {
  const q = new URLSearchParams({offset: gateOffset, limit: 25});
  if ($("#gate-kind").value) q.set("kind", $("#gate-kind").value);
  const d = await api("/api/gates?" + q);
  if (gateOffset >= d.total && d.total) { gateOffset = Math.max(0, d.total - 25); return loadGates(); }
  $("#gate-page").textContent = ` ${d.total ? gateOffset + 1 : 0}-${Math.min(gateOffset + 25, d.total)} of ${d.total} `;
  $("#gates").innerHTML = d.items.length ? `<table><tr><th>gate</th><th>downstream</th><th>inputs</th></tr>` + d.items.map((r) =>
    `<tr><td>${esc(r.gate)}</td><td>${featureLink(r.down, r.down_label)}</td><td>${(r.inputs || []).map((i) => featureLink(i.id, i.label) + ` (n=${i.count ?? ""})`).join("<br>")}</td></tr>`).join("") + "</table>"
    : `<p class="muted">no gates</p>`;
}

// --- steering --------------------------------------------------------------------------------
let loadedPlan = null, lastPlan = null;
function showSteer(arg) { if (arg) $("#steer-feature").value = decodeURIComponent(arg); }
$("#plan-load").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  try {
    loadedPlan = await postJSON("/api/plan/check", JSON.parse(await file.text()));
    $("#plan-loaded").textContent = `plan loaded: ${loadedPlan.interventions.length} interventions (clear the feature box to use it)`;
    $("#steer-feature").value = "";
  } catch (err) { loadedPlan = null; status($("#steer-status"), "plan: " + err.message, true); }
});
$("#plan-save").addEventListener("click", () => lastPlan && download("steering-plan.json", lastPlan));

function samples(el, texts) {
  while (el.children.length < texts.length) { const d = document.createElement("div"); d.className = "sample"; el.appendChild(d); }
  texts.forEach((t, i) => { el.children[i].textContent = $("#steer-prompt").value + t; });
}

$("#steer-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target), st = $("#steer-status");
  const req = {prompt: f.get("prompt"), mode: f.get("mode"), kind: f.get("kind"), strength: +f.get("strength"),
    schedule: f.get("schedule"), alpha: +f.get("alpha"), n: +f.get("n"), max_new_tokens: +f.get("max_new_tokens"),
    temperature: +f.get("temperature"), seed: +f.get("seed"), score: f.get("score") === "on",
    t_res: +$("#t-res").value, t_mod: tMod()};
  if (f.get("layer") !== "") req.layer = +f.get("layer");
  if (f.get("feature").trim()) req.feature = f.get("feature").trim(); else if (loadedPlan) req.plan = loadedPlan;
  $("#out-default").innerHTML = $("#out-steered").innerHTML = $("#steer-scores").innerHTML = "";
  status(st, "generating ...");
  $("#steer-run").disabled = true;
  try {
    const r = await fetch("/api/steer/stream", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(req)});
    if (!r.ok) { const b = await r.json().catch(() => ({})); throw new Error(errorText(b.detail, r.statusText)); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!line.startsWith("data: ")) continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.event === "token") { samples($("#out-" + ev.which), ev.texts); status(st, `generating ${ev.which} ... token ${ev.step + 1}`); }
        else if (ev.event === "error") throw new Error(ev.detail);
        else if (ev.event === "done") finishSteer(ev.result);
      }
    }
  } catch (err) { status(st, err.message, true); }
  $("#steer-run").disabled = false;
});

function finishSteer(res) {
  samples($("#out-default"), res.default);
  samples($("#out-steered"), res.steered);
  lastPlan = res.plan;
  $("#plan-save").disabled = false;
  status($("#steer-status"), `done: ${res.plan.interventions.length} interventions (${res.plan.description || res.plan.mode})`);
  $("#out-steered").dataset.done = "1";
  const s = res.scores;
  if (s) {
    $("#steer-scores").innerHTML = `<h3>Scores (concept: "${esc(s.concept_text)}")</h3><table><tr><th></th><th>concept (MiniLM cosine)</th><th>coherence</th></tr>` +
      ["default", "steered"].map((w) => `<tr><td>${w}</td><td>${s.mean[w].concept}</td><td>${s.mean[w].coherence}</td></tr>`).join("") + "</table>";
  }
}

// --- prompt view -----------------------------------------------------------------------------
let promptToken = null;
$("#prompt-form").addEventListener("submit", (e) => { e.preventDefault(); promptToken = null; readPrompt(); });
async function readPrompt() {
  const st = $("#prompt-status");
  status(st, "reading ...");
  try {
    const body = {text: $("#prompt-text").value, top_k: +$("#prompt-k").value};
    if (promptToken != null) body.token = promptToken;
    const d = await postJSON("/api/activations", body);
    $("#prompt-tokens").innerHTML = d.tokens.map((t, i) => `<span data-i="${i}" class="${i === d.token ? "sel" : ""}">${esc(t)}</span>`).join("");
    $("#prompt-tokens").querySelectorAll("span").forEach((s) => s.addEventListener("click", () => { promptToken = +s.dataset.i; readPrompt(); }));
    $("#prompt-table").innerHTML = `<table><tr><th>SAE</th><th>active</th><th>top features at token ${d.token} (${esc(JSON.stringify(d.tokens[d.token]))})</th></tr>` +
      d.slots.map((s) => `<tr><td>${s.layer}/${esc(s.position)}</td><td>${s.n_active[d.token]}</td><td>${s.top[d.token].map((e) => featureLink(`${s.layer}/${s.position}/${e.feature}`) + ` ${e.activation.toFixed(2)}`).join(", ")}</td></tr>`).join("") + "</table>";
    if (d.graph) await drawGraph($("#prompt-graph"), d.graph, "class", openFeature);
    status(st, `${d.tokens.length} tokens; ${d.graph ? d.graph.nodes.length + " active features, " + d.graph.links.length + " flow links at the selected token" : ""}`);
  } catch (e) { status(st, e.message, true); }
}

// --- start -----------------------------------------------------------------------------------
(async () => {
  try {
    INFO = await api("/api/info");
    $("#run-name").textContent = `run ${INFO.run} · layers ${INFO.layers[0]}..${INFO.layers[INFO.layers.length - 1]}`;
  } catch (e) { $("#run-name").textContent = e.message; }
  route();
})();
