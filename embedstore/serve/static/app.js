// embedstore's search page: everything it shows comes from the /api routes of the same server.
// The state (query, level, model, k, filters) lives in the URL, so a result can be shared; a
// token, when the server needs one, comes after '#token=' and stays in this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const FILTERS = ["modality", "body_part", "from", "to"];
const QUERY_KINDS = ["key", "series_uid", "study_uid"];
const MORE_LIKE_THIS = { slice: "key", series: "series_uid", study: "study_uid" };  // what a tile's query is
let models = [];  // GET /api/models: each with the feature searches use when the URL names none

if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem("embedstore-token", decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname + location.search);
}
const token = sessionStorage.getItem("embedstore-token");
const authHeaders = token ? { Authorization: `Bearer ${token}` } : {};

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders, ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function state() {
  return new URLSearchParams(location.search);
}

function chosenModel() {
  return models.find((m) => m.model_id === state().get("model")) || models[0];
}

// The URL's feature, else the model's default: CLS unless its stored vectors are degenerate.
function feature() {
  return state().get("feature") || (chosenModel() ? chosenModel().default_feature : "cls");
}

function setState(changes, push = true) {
  const params = state();
  for (const [name, value] of Object.entries(changes)) {
    if (value === null || value === undefined || value === "") params.delete(name);
    else params.set(name, value);
  }
  const url = `${location.pathname}?${params}`;
  push ? history.pushState(null, "", url) : history.replaceState(null, "", url);
}

function quoted(value) {
  return `'${value.replaceAll("'", "''")}'`;
}

function whereClause(params) {
  const parts = [];
  if (params.get("modality")) parts.push(`modality = ${quoted(params.get("modality"))}`);
  if (params.get("body_part")) parts.push(`body_part = ${quoted(params.get("body_part"))}`);
  if (params.get("from")) parts.push(`study_date >= ${quoted(params.get("from"))}`);
  if (params.get("to")) parts.push(`study_date <= ${quoted(params.get("to"))}`);
  return parts.length ? parts.join(" AND ") : null;
}

function loadThumbnail(img, url) {
  if (!url) return;
  fetch(url, { headers: authHeaders })
    .then((response) => (response.ok ? response.blob() : Promise.reject(response.status)))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = "not readable"; img.classList.add("missing"); });
}

function tile(result) {
  const node = $("tile").content.firstElementChild.cloneNode(true);
  node.dataset.score = result.score;
  node.dataset.key = result.key;
  loadThumbnail(node.querySelector(".thumb"), result.thumbnail);
  for (const url of result.strip.length > 1 ? result.strip : []) {
    const img = document.createElement("img");
    img.alt = "";
    node.querySelector(".strip").append(img);
    loadThumbnail(img, url);
  }
  node.querySelector(".score").textContent = result.score.toFixed(4);
  node.querySelector(".modality").textContent = result.modality || "";
  node.querySelector(".body_part").textContent = result.body_part || "";
  node.querySelector(".date").textContent = result.study_date || "";
  node.querySelector(".description").textContent = result.series_description || "";
  const slices = `${result.n_slices} slice${result.n_slices === 1 ? "" : "s"}`;
  node.querySelector(".count").textContent =
    result.level === "slice" ? `slice ${result.slice_index}` :
    result.level === "series" ? slices : `${result.n_series} series, ${slices}`;
  node.querySelector(".more").addEventListener("click", () => {
    const kind = MORE_LIKE_THIS[result.level];
    setState({ by: kind, q: result[kind] });
    $("key").value = result[kind];
    search();
  });
  return node;
}

async function search() {
  const params = state();
  const q = params.get("q");
  if (!q) { status("Drop an image or paste a key to search."); return; }
  const level = params.get("level") || "slice";
  const body = { k: Number(params.get("k") || 20), level, model: params.get("model") || null,
                 feature: feature(), where: whereClause(params) };
  const kinds = params.get("by") ? [params.get("by")] : QUERY_KINDS;  // a pasted id: try each kind in turn
  status("Searching…");
  const started = performance.now();
  for (const kind of kinds) {
    try {
      const answer = await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                                body: JSON.stringify({ ...body, [kind]: q }) });
      if (!params.get("by")) setState({ by: kind }, false);
      render(answer, performance.now() - started);
      return;
    } catch (error) {
      if (error.status === 404 && kinds.length > 1 && kind !== kinds[kinds.length - 1]) continue;
      $("results").replaceChildren();
      status(error.message, true);
      return;
    }
  }
}

function render(answer, milliseconds) {
  const names = { slice: "slices", series: "series", study: "studies" };
  $("results").replaceChildren(...answer.results.map(tile));
  status(`${answer.results.length} ${names[answer.level]} (${answer.feature}, ${answer.model_id})` +
         (answer.where ? ` where ${answer.where}` : "") + ` in ${Math.round(milliseconds)} ms`);
}

async function upload(file) {
  status(`Embedding ${file.name}…`);
  try {
    const model = state().get("model");
    const answer = await api(`/api/uploads?filename=${encodeURIComponent(file.name)}` +
                             (model ? `&model=${encodeURIComponent(model)}` : ""),
                             { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
    setState({ by: "upload_id", q: answer.upload_id });
    $("key").value = "";
    await search();
  } catch (error) {
    status(error.message, true);
  }
}

function fillSelect(select, values, selected) {
  for (const value of values) select.append(new Option(value, value, false, value === selected));
}

function showState() {
  const params = state();
  const level = params.get("level") || "slice";
  for (const radio of document.querySelectorAll("input[name=level]")) radio.checked = radio.value === level;
  if (params.get("k")) $("k").value = params.get("k");
  if (params.get("model")) $("model").value = params.get("model");
  $("feature").value = feature();
  const note = params.get("feature") || !chosenModel() ? null : chosenModel().default_feature_note;
  $("feature-note").textContent = note || "";
  $("feature-note").hidden = !note;
  $("key").value = params.get("by") === "upload_id" ? "" : params.get("q") || "";
  for (const name of FILTERS) $(name).value = params.get(name) || "";
}

async function start() {
  try {
    const [answer, facets] = await Promise.all([api("/api/models"), api("/api/facets")]);
    models = answer.models;
    fillSelect($("model"), models.map((m) => m.model_id), state().get("model"));
    fillSelect($("modality"), facets.modality, state().get("modality"));
    fillSelect($("body_part"), facets.body_part, state().get("body_part"));
  } catch (error) {
    status(error.message, true);
    return;
  }
  showState();
  $("model").addEventListener("change", () => { setState({ model: $("model").value }); showState(); search(); });
  $("k").addEventListener("change", () => { setState({ k: $("k").value }); search(); });
  $("feature").addEventListener("change", () => { setState({ feature: $("feature").value }); showState(); search(); });
  for (const radio of document.querySelectorAll("input[name=level]")) {
    radio.addEventListener("change", () => { setState({ level: radio.value }); search(); });
  }
  for (const name of FILTERS) {
    $(name).addEventListener("change", () => { setState({ [name]: $(name).value }); search(); });
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setState({ q: $("key").value.trim(), by: null });
    search();
  });
  $("file").addEventListener("change", () => { if ($("file").files[0]) upload($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) upload(event.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", () => { showState(); search(); });
  search();
}

start();
