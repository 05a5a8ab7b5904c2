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

// Where an image's pixels lie inside its element (object-fit: contain letterboxes them), in CSS px.
function contentRect(img) {
  const scale = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
  const width = img.naturalWidth * scale, height = img.naturalHeight * scale;
  return { left: img.offsetLeft + (img.clientWidth - width) / 2, top: img.offsetTop + (img.clientHeight - height) / 2,
           width, height };
}

// Put `node` over the fractions [x0, y0, x1, y1] of the frame's image.
function place(node, img, fractions) {
  const rect = contentRect(img);
  node.style.left = `${rect.left + fractions[0] * rect.width}px`;
  node.style.top = `${rect.top + fractions[1] * rect.height}px`;
  node.style.width = `${(fractions[2] - fractions[0]) * rect.width}px`;
  node.style.height = `${(fractions[3] - fractions[1]) * rect.height}px`;
  node.hidden = false;
}

// A result's matched box (slice pixels) drawn over its thumbnail once the thumbnail has loaded.
function showBox(frame, box, rows, cols) {
  const img = frame.querySelector(".thumb");
  const draw = () => place(frame.querySelector(".box"), img, [box[0] / cols, box[1] / rows, box[2] / cols, box[3] / rows]);
  img.complete && img.naturalWidth ? draw() : img.addEventListener("load", draw, { once: true });
}

// Drag on a frame's image to draw a box; `onBox` gets it as fractions of the image, [x0, y0, x1, y1].
function boxDrawing(frame, onBox) {
  const img = frame.querySelector(".thumb"), overlay = frame.querySelector(".draw");
  let start = null;
  const at = (event) => {
    const rect = contentRect(img), bounds = img.getBoundingClientRect();
    const x = (event.clientX - bounds.left - (rect.left - img.offsetLeft)) / rect.width;
    const y = (event.clientY - bounds.top - (rect.top - img.offsetTop)) / rect.height;
    return [Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y))];
  };
  const span = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  frame.classList.add("drawable");
  frame.addEventListener("mousedown", (event) => {
    if (!img.naturalWidth) return;
    event.preventDefault();
    start = at(event);
  });
  frame.addEventListener("mousemove", (event) => { if (start) place(overlay, img, span(start, at(event))); });
  frame.addEventListener("mouseleave", () => { start = null; overlay.hidden = true; });
  frame.addEventListener("mouseup", (event) => {
    if (!start) return;
    const box = span(start, at(event));
    start = null;
    overlay.hidden = true;
    if (box[2] - box[0] > 0.01 && box[3] - box[1] > 0.01) onBox(box);  // a click is not a box
  });
}

// A box drawn on slice `key` (fractions of its image) as pixels of the slice, then a region search.
async function searchRegions(key, fractions) {
  try {
    const item = await api(`/api/items/${encodeURIComponent(key)}`);
    const box = [Math.floor(fractions[0] * item.cols), Math.floor(fractions[1] * item.rows),
                 Math.ceil(fractions[2] * item.cols), Math.ceil(fractions[3] * item.rows)];
    setState({ by: "key", q: key, box: box.join(",") });
    $("key").value = key;
    await search();
  } catch (error) {
    status(error.message, true);
  }
}

function thumbnailOf(key, modelId) {
  return `/thumbnails/${encodeURIComponent(key)}.png?model=${encodeURIComponent(modelId)}`;
}

// The query slice, when the query is one: a box can be drawn on it, and a region query's box is shown.
function showQuery(answer) {
  const params = state(), view = $("query-view");
  if (params.get("by") !== "key" || answer.level !== "slice") { view.hidden = true; return; }
  const fresh = view.querySelector(".frame").cloneNode(true);  // a new node: no listeners of an earlier query
  fresh.querySelector(".box").hidden = fresh.querySelector(".draw").hidden = true;
  view.querySelector(".frame").replaceWith(fresh);
  view.hidden = false;
  const img = fresh.querySelector(".thumb");
  img.removeAttribute("src");
  loadThumbnail(img, thumbnailOf(params.get("q"), answer.model_id));
  boxDrawing(fresh, (fractions) => searchRegions(params.get("q"), fractions));
  if (answer.box) {
    api(`/api/items/${encodeURIComponent(params.get("q"))}`)
      .then((item) => showBox(fresh, answer.box, item.rows, item.cols)).catch(() => {});
  }
}

function tile(result) {
  const node = $("tile").content.firstElementChild.cloneNode(true);
  node.dataset.score = result.score;
  node.dataset.key = result.key;
  loadThumbnail(node.querySelector(".thumb"), result.thumbnail);
  if (result.box) {
    node.dataset.box = result.box.join(",");
    showBox(node.querySelector(".frame"), result.box, result.rows, result.cols);
  }
  if (result.level === "slice" || result.box) {
    boxDrawing(node.querySelector(".frame"), (fractions) => searchRegions(result.key, fractions));
  }
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
    const kind = result.box ? "key" : MORE_LIKE_THIS[result.level];
    setState({ by: kind, q: result[kind], box: null });
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
  if (params.get("box")) body.box = params.get("box").split(",").map(Number);  // a region search, on a key
  const kinds = params.get("box") ? ["key"] : params.get("by") ? [params.get("by")] : QUERY_KINDS;  // a pasted id: each kind in turn
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
  const names = answer.box ? { slice: "regions", series: "series' best regions", study: "studies' best regions" } :
    { slice: "slices", series: "series", study: "studies" };
  $("results").replaceChildren(...answer.results.map(tile));
  showQuery(answer);
  status(`${answer.results.length} ${names[answer.level]}` + (answer.box ? ` like box ${answer.box.join(",")}` : "") +
         ` (${answer.feature}, ${answer.model_id})` +
         (answer.where ? ` where ${answer.where}` : "") + ` in ${Math.round(milliseconds)} ms`);
}

async function upload(file) {
  status(`Embedding ${file.name}…`);
  try {
    const model = state().get("model");
    const answer = await api(`/api/uploads?filename=${encodeURIComponent(file.name)}` +
                             (model ? `&model=${encodeURIComponent(model)}` : ""),
                             { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
    setState({ by: "upload_id", q: answer.upload_id, box: null });
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
    setState({ q: $("key").value.trim(), by: null, box: null });
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
