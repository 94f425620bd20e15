// ctfm semantic search: three orthogonal views per scan, click to search, hits with thumbnails,
// the selected hit shown with its similarity heatmap. Plain canvases; nothing from the network.
"use strict";

const AXES = ["axial", "coronal", "sagittal"];
// For each view: the display-grid axis it cuts (idx), and the axes along its columns and rows.
// Display grids are RAS; every view is drawn in radiological convention (see volumes.py).
const VIEW = {
  axial: { idx: 2, col: 0, row: 1, edges: ["R", "L", "A", "P"] },
  coronal: { idx: 1, col: 0, row: 2, edges: ["R", "L", "S", "I"] },
  sagittal: { idx: 0, col: 1, row: 2, edges: ["A", "P", "S", "I"] },
};
const CANVAS_PX = 512;

const app = {
  info: null, scans: [], window: "soft", showHeatmap: true, opacity: 0.7,
  query: null, match: null, hits: [], activeHit: -1, searchToken: 0,
};
window.ctfmTimings = {};  // read by the browser benchmark and the end-to-end tests

function $(sel, root = document) { return root.querySelector(sel); }
function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v, d = 1) { return Number(v).toFixed(d); }
function mulAffine(a, v) { return [0, 1, 2].map(r => a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + a[r][3]); }

function showMessage(text) {
  const m = $("#message");
  m.textContent = text || "";
  m.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`));
    img.src = url;
  });
}

// ---- a three-view viewer -----------------------------------------------------------------
class Viewer {
  constructor(root, onPick) {
    this.root = root;
    this.onPick = onPick;
    this.scan = null;        // scan entry with .display geometry
    this.cursor = [0, 0, 0]; // display voxel
    this.overlay = null;     // {query_scan, point_mm} or null
    this.views = {};
    const holder = $(".views", root);
    for (const axis of AXES) {
      const box = el("div", { class: "view", "data-axis": axis });
      const canvas = el("canvas", { width: CANVAS_PX, height: CANVAS_PX, "aria-label": `${axis} view` });
      const label = el("div", { class: "label" }, axis);
      const slider = el("input", { type: "range", min: 0, max: 0, value: 0, "aria-label": `${axis} slice` });
      box.append(canvas, label, slider);
      for (const [i, pos] of ["left", "right", "top", "bottom"].entries()) {
        const o = el("div", { class: "orient" }, VIEW[axis].edges[i]);
        Object.assign(o.style, pos === "left" ? { left: "4px", top: "48%" } : pos === "right" ? { right: "4px", top: "48%" } : pos === "top" ? { left: "49%", top: "2px" } : { left: "49%", bottom: "26px" });
        box.append(o);
      }
      holder.append(box);
      const view = { axis, canvas, label, slider, ctx: canvas.getContext("2d"), base: null, over: null, token: 0 };
      this.views[axis] = view;
      canvas.addEventListener("click", ev => this.click(view, ev));
      canvas.addEventListener("wheel", ev => { ev.preventDefault(); this.step(axis, ev.deltaY > 0 ? 1 : -1); }, { passive: false });
      canvas.addEventListener("mouseenter", () => { app.hovered = { viewer: this, axis }; });
      canvas.addEventListener("mouseleave", () => { if (app.hovered && app.hovered.viewer === this && app.hovered.axis === axis) app.hovered = null; });
      slider.addEventListener("input", () => { this.setIndex(axis, Number(slider.value)); });
    }
  }

  layout(axis) {
    const g = this.scan.display, v = VIEW[axis];
    const ncol = g.shape[v.col], nrow = g.shape[v.row];
    const colMm = g.spacing_mm[v.col], rowMm = g.spacing_mm[v.row];
    const scale = CANVAS_PX / Math.max(ncol * colMm, nrow * rowMm);
    const w = ncol * colMm * scale, h = nrow * rowMm * scale;
    return { ncol, nrow, px: colMm * scale, py: rowMm * scale, ox: (CANVAS_PX - w) / 2, oy: (CANVAS_PX - h) / 2, w, h };
  }

  async setScan(entry, cursor) {
    this.scan = entry;
    const shape = entry.display.shape;
    this.cursor = (cursor || shape.map(n => (n - 1) / 2)).map((v, i) => Math.max(0, Math.min(shape[i] - 1, Math.round(v))));
    $(".scan-title", this.root).textContent = entry.name;
    $(".scan-title", this.root).classList.remove("muted");
    for (const axis of AXES) {
      const view = this.views[axis];
      view.base = null; view.over = null;
      view.slider.max = entry.display.shape[VIEW[axis].idx] - 1;
    }
    await this.refresh();
  }

  setCursor(voxel) {
    const shape = this.scan.display.shape;
    this.cursor = voxel.map((v, i) => Math.max(0, Math.min(shape[i] - 1, Math.round(v))));
    return this.refresh();
  }

  setIndex(axis, index) {
    const c = this.cursor.slice();
    c[VIEW[axis].idx] = index;
    return this.setCursor(c);
  }

  step(axis, delta) { if (this.scan) this.setIndex(axis, this.cursor[VIEW[axis].idx] + delta); }

  worldPoint() { return mulAffine(this.scan.display.affine, this.cursor); }

  refresh() {
    if (!this.scan) return Promise.resolve();
    const p = this.worldPoint();
    $(".point", this.root).textContent = `(${p.map(v => fmt(v)).join(", ")}) mm RAS`;
    return Promise.all(AXES.map(axis => this.load(axis)));
  }

  async load(axis) {
    const view = this.views[axis], index = this.cursor[VIEW[axis].idx];
    const token = ++view.token;
    view.slider.value = index;
    view.label.textContent = `${axis} ${index + 1}/${this.scan.display.shape[VIEW[axis].idx]}`;
    this.draw(view);  // crosshair moves at once; images follow
    const id = encodeURIComponent(this.scan.id);
    const wanted = [loadImage(`/api/scans/${id}/slice?axis=${axis}&index=${index}&window=${app.window}`)];
    if (this.overlay && app.showHeatmap) {
      const [x, y, z] = this.overlay.point_mm;
      wanted.push(loadImage(`/api/scans/${id}/heatmap?query_scan=${encodeURIComponent(this.overlay.query_scan)}&x=${x}&y=${y}&z=${z}&axis=${axis}&index=${index}&query=${this.overlay.query}`));
    }
    try {
      const [base, over] = await Promise.all(wanted);
      if (token !== view.token) return;
      view.base = base; view.over = over || null;
      this.draw(view);
    } catch (err) {
      if (token === view.token) showMessage(err.message);
    }
  }

  draw(view) {
    const { ctx } = view;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, CANVAS_PX, CANVAS_PX);
    if (!this.scan) return;
    const L = this.layout(view.axis), v = VIEW[view.axis];
    if (view.base) {
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(view.base, L.ox, L.oy, L.w, L.h);
      if (view.over) {
        ctx.globalAlpha = app.opacity;
        ctx.drawImage(view.over, L.ox, L.oy, L.w, L.h);
        ctx.globalAlpha = 1;
      }
      view.canvas.dataset.drawn = `${this.scan.id}:${this.cursor[v.idx]}`;
      view.canvas.dataset.overlay = view.over ? "heatmap" : "none";
      if (!window.ctfmTimings.firstSlice && window.ctfmTimings.scanChosen) window.ctfmTimings.firstSlice = performance.now();
    }
    const x = L.ox + (L.ncol - 1 - this.cursor[v.col] + 0.5) * L.px;
    const y = L.oy + (L.nrow - 1 - this.cursor[v.row] + 0.5) * L.py;
    ctx.strokeStyle = "rgba(80, 255, 120, 0.85)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(L.ox, y); ctx.lineTo(x - 8, y); ctx.moveTo(x + 8, y); ctx.lineTo(L.ox + L.w, y);
    ctx.moveTo(x, L.oy); ctx.lineTo(x, y - 8); ctx.moveTo(x, y + 8); ctx.lineTo(x, L.oy + L.h);
    ctx.stroke();
  }

  click(view, ev) {
    if (!this.scan) return;
    const rect = view.canvas.getBoundingClientRect();
    const px = (ev.clientX - rect.left) * CANVAS_PX / rect.width, py = (ev.clientY - rect.top) * CANVAS_PX / rect.height;
    const L = this.layout(view.axis), v = VIEW[view.axis];
    const c = Math.floor((px - L.ox) / L.px), r = Math.floor((py - L.oy) / L.py);
    if (c < 0 || r < 0 || c >= L.ncol || r >= L.nrow) return;
    const voxel = this.cursor.slice();
    voxel[v.col] = L.ncol - 1 - c;
    voxel[v.row] = L.nrow - 1 - r;
    this.setCursor(voxel);
    if (this.onPick) this.onPick(this);
  }

  redrawAll() { for (const axis of AXES) this.load(axis); }
}

// ---- store, scans, upload ----------------------------------------------------------------
function renderProvenance() {
  const i = app.info, run = i.run;
  $("#provenance").textContent = `store ${i.store}: ${i.scans} scans, ${i.patches} windows · model ${run.model} · weights ${String(run.weights_sha256).slice(0, 18)}… · preset ${run.preset} (${String(run.preset_hash).slice(0, 10)}…) · pool ${run.pool}, overlap ${run.overlap} · run ${run.digest} · ctfm ${i.ctfm_version}`;
  const banner = $("#random-weights");
  banner.hidden = !i.weights.random;
  banner.textContent = i.weights.random ? `Random weights: ${i.weights.message}.` : "";
  $("#upload-limit").textContent = fmt(i.max_upload_mb, 0);
  const mode = $("#query-mode");
  mode.value = i.search.query;
  mode.querySelector('option[value="centred"]').disabled = !i.search.can_embed;
  if (!i.search.can_embed) {
    $("#upload-button").disabled = true;
    $("#upload-status").textContent = "Started without the store's weights: uploads and centred query windows need them (ctfm serve STORE --weights ...).";
  }
}

function renderScans() {
  const list = $("#scan-list"), filter = $("#scan-filter").value.toLowerCase();
  list.replaceChildren();
  for (const s of app.scans) {
    if (filter && !(s.name.toLowerCase().includes(filter) || s.id.includes(filter))) continue;
    const li = el("li", { "data-scan-id": s.id, title: `id ${s.id}\nweights ${s.provenance.weights_sha256}\npreset ${s.provenance.preset}` });
    li.append(el("div", {}, s.name), el("div", { class: "meta" }, `${s.shape.join("×")} · ${s.spacing_mm.map(v => fmt(v, 2)).join("×")} mm · ${s.id.slice(0, 10)}`));
    if (app.query && app.query.scan && app.query.scan.id === s.id) li.classList.add("active");
    li.addEventListener("click", () => chooseScan(s.id));
    list.append(li);
  }
  $("#scan-count").textContent = `(${app.scans.length})`;
  const target = $("#target"), chosen = target.value;
  target.replaceChildren(el("option", { value: "" }, "every scan of the store"));
  for (const s of app.scans) target.append(el("option", { value: s.id }, s.name));
  target.value = chosen;
}

async function loadScans() {
  app.scans = (await api("/api/scans")).scans;
  renderScans();
}

async function chooseScan(id) {
  showMessage("");
  window.ctfmTimings = { scanChosen: performance.now() };
  try {
    const entry = await api(`/api/scans/${encodeURIComponent(id)}`);
    await app.query.setScan(entry);
    renderScans();
  } catch (err) { showMessage(err.message); }
}

async function upload(ev) {
  ev.preventDefault();
  const file = $("#upload-file").files[0];
  if (!file) { showMessage("choose a NIfTI file or a zipped DICOM series first"); return; }
  const status = $("#upload-status"), button = $("#upload-button");
  const form = new FormData();
  form.append("file", file);
  status.textContent = `uploading and embedding ${file.name}…`;
  button.disabled = true;
  try {
    const entry = await api("/api/scans", { method: "POST", body: form });
    status.textContent = `added ${entry.name} (${entry.id.slice(0, 10)}, ${entry.n_patches} windows)`;
    app.info = await api("/api/info");
    renderProvenance();
    await loadScans();
    chooseScan(entry.id);
  } catch (err) {
    status.textContent = "upload refused";
    showMessage(err.message);
  } finally { button.disabled = false; }
}

// ---- search and hits ---------------------------------------------------------------------
async function search(viewer) {
  const token = ++app.searchToken;
  const t0 = performance.now();
  window.ctfmTimings.clicked = t0;
  const body = { scan_id: viewer.scan.id, point_mm: viewer.worldPoint(), k: Number($("#k").value) || 10 };
  if ($("#target").value) body.target = $("#target").value;
  body.query = $("#query-mode").value;
  const list = $("#hit-list");
  $("#search-time").textContent = "searching…";
  try {
    const result = await api("/api/search", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    if (token !== app.searchToken) return;
    app.hits = result.hits.map(h => ({ ...h, query_scan: body.scan_id, query_point: body.point_mm, query_mode: body.query }));
    app.activeHit = -1;
    renderHits();
    window.ctfmTimings.hitsShown = performance.now();
    $("#search-time").textContent = `${result.hits.length} in ${fmt(window.ctfmTimings.hitsShown - t0, 0)} ms (server ${fmt(result.ms, 0)} ms)`;
    await Promise.all([...list.querySelectorAll("canvas")].map(c => c._ready));
    if (token === app.searchToken) window.ctfmTimings.thumbnailsShown = performance.now();
  } catch (err) {
    $("#search-time").textContent = "";
    showMessage(err.message);
  }
}

function renderHits() {
  const list = $("#hit-list");
  list.replaceChildren();
  const names = Object.fromEntries(app.scans.map(s => [s.id, s.name]));
  const top = app.hits.length ? Math.max(...app.hits.map(h => h.score)) : 1;
  app.hits.forEach((hit, n) => {
    const li = el("li", { class: "hit", "data-scan-id": hit.scan_id, "data-score": hit.score });
    const thumb = el("canvas", { width: 144, height: 144 });
    const text = el("div");
    text.append(el("div", {}, `${n + 1}. ${names[hit.scan_id] || hit.scan_id}`),
      el("div", { class: "score" }, `score ${fmt(hit.score, 3)}`),
      el("div", { class: "meta" }, `(${hit.point_mm.map(v => fmt(v)).join(", ")}) mm`));
    const bar = el("div", { class: "bar" });
    bar.style.width = `${Math.max(4, 100 * Math.max(0, hit.score) / Math.max(top, 1e-9))}%`;
    text.append(bar);
    li.append(thumb, text);
    li.addEventListener("click", () => selectHit(n));
    list.append(li);
    thumb._ready = drawThumbnail(thumb, hit).catch(() => {});
  });
}

async function drawThumbnail(canvas, hit) {
  const entry = await api(`/api/scans/${encodeURIComponent(hit.scan_id)}`);
  const g = entry.display, voxel = mulAffine(g.inverse_affine, hit.point_mm).map(Math.round);
  const k = Math.max(0, Math.min(g.shape[2] - 1, voxel[2]));
  const img = await loadImage(`/api/scans/${encodeURIComponent(hit.scan_id)}/slice?axis=axial&index=${k}&window=${app.window}&size=144`);
  const ctx = canvas.getContext("2d");
  const s = 144 / Math.max(img.width, img.height), w = img.width * s, h = img.height * s, ox = (144 - w) / 2, oy = (144 - h) / 2;
  ctx.drawImage(img, ox, oy, w, h);
  const x = ox + (g.shape[0] - 1 - voxel[0] + 0.5) / g.shape[0] * w, y = oy + (g.shape[1] - 1 - voxel[1] + 0.5) / g.shape[1] * h;
  ctx.strokeStyle = "#50ff78";
  ctx.beginPath(); ctx.arc(x, y, 7, 0, 2 * Math.PI); ctx.stroke();
  canvas.dataset.drawn = "1";
}

async function selectHit(n) {
  const hit = app.hits[n];
  app.activeHit = n;
  [...document.querySelectorAll("#hit-list .hit")].forEach((li, i) => li.classList.toggle("active", i === n));
  try {
    const entry = await api(`/api/scans/${encodeURIComponent(hit.scan_id)}`);
    app.match.overlay = { query_scan: hit.query_scan, point_mm: hit.query_point, query: hit.query_mode };
    await app.match.setScan(entry, mulAffine(entry.display.inverse_affine, hit.point_mm));
    app.match.root.dataset.hit = `${hit.scan_id}`;
    $("#search-from-match").disabled = false;
    window.ctfmTimings.hitShown = performance.now();
  } catch (err) { showMessage(err.message); }
}

// ---- start -------------------------------------------------------------------------------
async function start() {
  app.query = new Viewer($("#query-viewer"), search);
  app.match = new Viewer($("#match-viewer"), null);
  for (const b of document.querySelectorAll("button.window")) {
    b.classList.toggle("active", b.dataset.window === app.window);
    b.addEventListener("click", () => {
      app.window = b.dataset.window;
      for (const o of document.querySelectorAll("button.window")) o.classList.toggle("active", o === b);
      app.query.redrawAll(); app.match.redrawAll();
    });
  }
  $("#show-heatmap").addEventListener("change", ev => { app.showHeatmap = ev.target.checked; app.match.redrawAll(); });
  $("#heatmap-opacity").addEventListener("input", ev => { app.opacity = Number(ev.target.value) / 100; AXES.forEach(a => app.match.draw(app.match.views[a])); });
  $("#scan-filter").addEventListener("input", renderScans);
  $("#search-from-match").addEventListener("click", async () => {
    if (!app.match.scan) return;
    await app.query.setScan(app.match.scan, app.match.cursor.slice());
    renderScans();
    search(app.query);
  });
  // Arrow keys and Page Up/Down scroll the view under the mouse (1 or 10 slices).
  document.addEventListener("keydown", ev => {
    const focus = document.activeElement;
    const typing = focus && (["SELECT", "TEXTAREA"].includes(focus.tagName) || (focus.tagName === "INPUT" && ["text", "search", "number", "range"].includes(focus.type)));
    if (!app.hovered || typing) return;
    const steps = { ArrowUp: -1, ArrowDown: 1, PageUp: -10, PageDown: 10 };
    if (!(ev.key in steps)) return;
    ev.preventDefault();
    app.hovered.viewer.step(app.hovered.axis, steps[ev.key]);
  });
  $("#upload-form").addEventListener("submit", upload);
  try {
    app.info = await api("/api/info");
    renderProvenance();
    await loadScans();
    document.body.dataset.ready = "1";
  } catch (err) { showMessage(err.message); }
}

start();
