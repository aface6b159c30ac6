// The explore page: a small hash-routed view over the JSON API (/api/...), the same routes scripts use.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { info: null, report: null, sort: { key: "top1", asc: true }, dupOffset: 0 };

function esc(text) {
  return String(text).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function thumb(path, size = 256) { return `/api/image?path=${encodeURIComponent(path)}&size=${size}`; }
function pct(x) { return x == null ? "" : (100 * x).toFixed(1) + "%"; }

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------ search
function filterParams() {
  const p = new URLSearchParams({ k: $("#k").value });
  if ($("#filter-split").value) p.set("filter_split", $("#filter-split").value);
  if ($("#filter-label").value) p.set("filter_label", $("#filter-label").value);
  return p;
}

function card(hit, index) {
  const el = document.createElement("article");
  el.className = "card result";
  el.tabIndex = 0;
  el.dataset.path = hit.path;
  el.dataset.index = index;
  el.innerHTML = `<img loading="lazy" alt="${esc(hit.label)}" src="${thumb(hit.path)}">
    <div class="meta"><span class="score">${hit.score.toFixed(3)}</span><b>${esc(hit.label)}</b> · ${esc(hit.split)}<br>
    <span class="muted path">${esc(hit.path)}</span></div>
    <button type="button" class="more-like-this">more like this</button>`;
  el.querySelector("button").addEventListener("click", () => { location.hash = "#/similar?" + new URLSearchParams({ path: hit.path }); });
  return el;
}

function showResults(body, what) {
  const grid = $("#results");
  grid.replaceChildren(...body.results.map(card));
  setStatus(`${body.results.length} results for ${what} in ${body.ms} ms`);
}

async function searchText(text) {
  $("#query").value = text;
  setStatus("searching…");
  try {
    const p = filterParams(); p.set("text", text);
    showResults(await api("/api/search?" + p), `“${text}”`);
  } catch (e) { setStatus(e.message, true); }
}

async function searchSimilar(path) {
  setStatus("searching…");
  try {
    const p = filterParams(); p.set("path", path);
    showResults(await api("/api/search?" + p), `images like ${path}`);
  } catch (e) { setStatus(e.message, true); }
}

async function searchImage(file) {
  showView("search");
  setStatus(`searching with ${file.name}…`);
  const form = new FormData();
  form.append("image", file);
  try {
    showResults(await api("/api/search?" + filterParams(), { method: "POST", body: form }), file.name);
  } catch (e) { setStatus(e.message, true); }
}

// ------------------------------------------------------------------ reports
async function showReport(kind, label) {
  try {
    if (!state.report || state.report.kind !== kind) state.report = await api(`/api/reports/${kind}`);
  } catch (e) { $("#report-title").textContent = e.message; return; }
  const s = state.report.summary;
  $("#report-title").textContent = kind === "validation" ? "Few-shot k-NN validation" : "Zero-shot classification";
  $("#report-summary").textContent = `top-1 ${pct(s.top1)}, top-5 ${pct(s.top5)}; ${s.classes} classes, ${s.queries} queries`
    + (s.excluded ? `; ${s.excluded.dropped} queries with a near-copy in train excluded` : "");
  renderTable();
  const detail = $("#class-detail");
  if (!label) { detail.replaceChildren(); return; }
  detail.innerHTML = `<p class="muted">loading ${esc(label)}…</p>`;
  try { renderClass(await api(`/api/reports/${kind}/classes/${encodeURIComponent(label)}`)); }
  catch (e) { detail.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

function renderTable() {
  const { key, asc } = state.sort;
  const rows = [...state.report.classes].sort((a, b) => {
    const x = a[key], y = b[key];
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return asc ? c : -c;
  });
  document.querySelectorAll("#per-class th").forEach(th => {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && asc);
  });
  $("#per-class tbody").replaceChildren(...rows.map(r => {
    const tr = document.createElement("tr");
    tr.className = "class-row"; tr.tabIndex = 0; tr.dataset.label = r.label;
    tr.innerHTML = `<td>${esc(r.label)}</td><td>${esc(r.name)}</td><td class="num">${r.n_query}</td>
      <td class="num">${pct(r.top1)}</td><td class="num">${pct(r.top5)}</td>
      <td>${esc(r.confused_with || "")}${r.confused_with ? ` (${pct(r.confused_share)})` : ""}</td>`;
    const open = () => { location.hash = `#/report/${state.report.kind}/${encodeURIComponent(r.label)}`; };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", e => { if (e.key === "Enter") open(); });
    return tr;
  }));
}

function renderClass(detail) {
  const box = $("#class-detail");
  const head = `<h3>${esc(detail.label)}: ${detail.wrong} of ${detail.queries} queries misclassified</h3>`;
  const items = detail.shown.map(m => {
    const neighbours = (m.neighbours || []).map(n => `<figure class="${n.label === m.label ? "" : "voted-wrong"}">
        <img loading="lazy" src="${thumb(n.path, 128)}" alt="${esc(n.label)}"><figcaption>${esc(n.label)}<br>d ${n.distance.toFixed(3)}</figcaption></figure>`).join("");
    const top5 = (m.top5 || []).map((c, i) => esc(c) + (m.top5_probabilities ? ` ${(m.top5_probabilities[i]).toFixed(3)}` : "")).join(", ");
    return `<div class="miss"><figure class="query"><img loading="lazy" src="${thumb(m.path, 192)}" alt="${esc(m.label)}">
      <figcaption>${esc(m.path)}<br>predicted <b class="prediction">${esc(m.prediction)}</b></figcaption></figure>
      <div><div class="muted">top-5: ${top5}</div>${neighbours ? `<div class="muted">nearest training images (red: another class):</div><div class="neighbours">${neighbours}</div>` : ""}</div></div>`;
  }).join("");
  box.innerHTML = `<div id="misclassified">${head}${items || "<p>none</p>"}</div>`;
}

// ------------------------------------------------------------------ duplicates
async function showDuplicates() {
  const p = new URLSearchParams({ offset: state.dupOffset, limit: 25, cross: $("#dup-cross").checked ? 1 : 0 });
  try {
    const body = await api("/api/duplicates?" + p);
    const s = state.info.reports.duplicates || {};
    $("#dup-summary").textContent = `${s.pairs} pairs at cosine ≥ ${s.threshold}, ${s.rows_involved} rows involved; showing ${body.offset + 1}–${body.offset + body.pairs.length} of ${body.total}`;
    $("#pairs").innerHTML = body.pairs.map(d => `<div class="pair">
        <img loading="lazy" src="${thumb(d.path_a, 128)}" alt=""><img loading="lazy" src="${thumb(d.path_b, 128)}" alt="">
        <div><b>${d.score.toFixed(4)}</b><br>${esc(d.split_a)} ${esc(d.path_a)}<br>${esc(d.split_b)} ${esc(d.path_b)}</div></div>`).join("");
  } catch (e) { $("#dup-summary").textContent = e.message; }
}

// ------------------------------------------------------------------ routing, keys, drop
function showView(name) {
  for (const v of ["search", "report", "duplicates"]) $(`#view-${v}`).hidden = v !== name;
}

function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", location.hash.startsWith(a.getAttribute("href")) && a.getAttribute("href") !== "#/" || (a.id === "nav-search" && parts.length === 0)));
  if (parts[0] === "report") { showView("report"); showReport(parts[1], parts[2]); }
  else if (parts[0] === "duplicates") { showView("duplicates"); showDuplicates(); }
  else if (parts[0] === "similar") { showView("search"); searchSimilar(params.get("path")); }
  else { showView("search"); if (params.get("text")) searchText(params.get("text")); }
}

function moveFocus(step) {
  const cards = [...document.querySelectorAll("#results .card")];
  if (!cards.length) return;
  const i = cards.indexOf(document.activeElement.closest(".card"));
  cards[Math.max(0, Math.min(cards.length - 1, i < 0 ? 0 : i + step))].focus();
}

document.addEventListener("keydown", e => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (e.key === "/" && !typing) { e.preventDefault(); showView("search"); $("#query").focus(); return; }
  if (typing) return;
  const across = Math.max(1, Math.round($("#results").clientWidth / 180));
  const steps = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: across, ArrowUp: -across };
  if (e.key in steps) { e.preventDefault(); moveFocus(steps[e.key]); }
  const focused = document.activeElement.closest && document.activeElement.closest(".card");
  if (focused && (e.key === "Enter" || e.key === "m")) { focused.querySelector(".more-like-this").click(); }
});

$("#search-form").addEventListener("submit", e => {
  e.preventDefault();
  const text = $("#query").value.trim();
  if (text) location.hash = "#/search?" + new URLSearchParams({ text });
});
$("#upload").addEventListener("change", e => { if (e.target.files[0]) searchImage(e.target.files[0]); });
document.querySelectorAll("#per-class th").forEach(th => {
  const sort = () => { const key = th.dataset.key; state.sort = { key, asc: state.sort.key === key ? !state.sort.asc : true }; renderTable(); };
  th.addEventListener("click", sort);
  th.addEventListener("keydown", e => { if (e.key === "Enter") sort(); });
});
$("#dup-cross").addEventListener("change", () => { state.dupOffset = 0; showDuplicates(); });
$("#dup-prev").addEventListener("click", () => { state.dupOffset = Math.max(0, state.dupOffset - 25); showDuplicates(); });
$("#dup-next").addEventListener("click", () => { state.dupOffset += 25; showDuplicates(); });
// A thumbnail the app refuses (a file gone, or a symlink leading outside the dataset) is marked, not hidden.
document.addEventListener("error", e => {
  if (e.target.tagName === "IMG") { e.target.classList.add("broken"); e.target.alt = "image not served"; }
}, true);
let dragDepth = 0;
document.addEventListener("dragenter", e => { e.preventDefault(); dragDepth++; $("#drop").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("#drop").hidden = true; } });
document.addEventListener("dragover", e => e.preventDefault());
document.addEventListener("drop", e => {
  e.preventDefault(); dragDepth = 0; $("#drop").hidden = true;
  const file = e.dataTransfer.files[0];
  if (file) searchImage(file);
});

async function start() {
  state.info = await api("/api/info");
  const info = state.info;
  $("#dataset").textContent = `${info.rows.toLocaleString()} images · ${info.model} · index ${info.index.kind}`;
  for (const kind of ["validation", "zeroshot", "duplicates"]) $(`#nav-${kind}`).hidden = !(kind in info.reports);
  const fill = (select, values) => select.append(...Object.entries(values).map(([v, n]) => new Option(`${v} (${n})`, v)));
  fill($("#filter-split"), info.splits);
  fill($("#filter-label"), info.labels);
  if (!info.text_search) { $("#query").disabled = true; $("#query").placeholder = "text search is off (no text tower)"; }
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}
start().catch(e => setStatus(e.message, true));
