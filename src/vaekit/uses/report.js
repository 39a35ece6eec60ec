// The vaekit report page: builds every section from the JSON data in #data, and runs the latent explorer. MLP
// decoders run here, layer by layer, from the exported float32 weights; other decoders show the nearest of a grid of
// images decoded when the report was written. window.vaekitReport exposes the state, for tests and the curious.
"use strict";

const SIZE = 420;  // the map's side in CSS pixels
const SHOWN = 112; // the side panels' images are scaled up to about this many CSS pixels
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const floats = (b64) => new Float32Array(bytes(b64).buffer);

function element(tag, attributes = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, attributes);
  for (const child of children) e.append(child);
  return e;
}

// erf to within 1.5e-7 (Abramowitz and Stegun 7.1.26), for the exact GELU.
function erf(x) {
  const t = 1 / (1 + 0.3275911 * Math.abs(x));
  const y = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-x * x);
  return x >= 0 ? y : -y;
}

const ACTIVATIONS = {
  relu: (v) => Math.max(v, 0),
  tanh: Math.tanh,
  elu: (v) => (v > 0 ? v : Math.expm1(v)),
  gelu: (v) => 0.5 * v * (1 + erf(v / Math.SQRT2)),
  silu: (v) => v / (1 + Math.exp(-v)),
  leaky_relu: (v, slope) => (v > 0 ? v : slope * v),
  softplus: (v) => (v > 20 ? v : Math.log1p(Math.exp(v))),
};

// The decoder's mean output at latent z: dense layers with their activations, then the likelihood's mean.
function makeDecoder(spec) {
  const layers = spec.layers.map((l) => ({ ...l, w: floats(l.w), b: floats(l.b) }));
  return (z) => {
    let h = Float64Array.from(z);
    for (const l of layers) {
      const out = new Float64Array(l.rows);
      const act = l.act ? ACTIVATIONS[l.act] : null;
      for (let r = 0; r < l.rows; r++) {
        let s = l.b[r];
        const row = r * l.cols;
        for (let c = 0; c < l.cols; c++) s += l.w[row + c] * h[c];
        out[r] = act ? act(s, l.slope) : s;
      }
      h = out;
    }
    return spec.output === "sigmoid" ? h.map((v) => 1 / (1 + Math.exp(-v))) : h;
  };
}

// Draw an image (values in [0, 1] or bytes 0..255, channels first) into a canvas, scaled up by whole pixels.
function drawImage(canvas, values, shape, isBytes) {
  const [c, h, w] = shape;
  const scale = Math.max(1, Math.floor(SHOWN / Math.max(h, w)));
  canvas.width = w; canvas.height = h;
  canvas.style.width = `${w * scale}px`; canvas.style.height = `${h * scale}px`;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) {
      const v = values[(c === 3 ? k : 0) * h * w + i];
      image.data[4 * i + k] = isBytes ? v : Math.round(Math.min(Math.max(v, 0), 1) * 255);
    }
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function table(data) {
  const rows = Object.entries(data).map(([k, v]) => {
    const text = typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(6)) : Array.isArray(v) ? v.map((x) => (typeof x === "number" ? +x.toPrecision(4) : x)).join(", ") : String(v);
    return element("tr", {}, element("td", { textContent: k }), element("td", { textContent: text }));
  });
  return element("table", {}, ...rows);
}

const state = { selected: null, selectedKey: null, panels: [], parity: [], ready: null };
window.vaekitReport = state;

// Select example i in every map of the same test examples as the map it was chosen in.
function select(i, key) {
  state.selected = i;
  state.selectedKey = key;
  for (const panel of state.panels) panel.show(panel.key === key ? i : null);
}

// One run's latent explorer: the map, the decoded image at the cursor, and the hovered example.
function explorer(page, index) {
  const e = page.explorer;
  const coords = floats(e.coords);
  const imageShape = e.image ? e.shape : null;
  const dims = e.shape.reduce((a, b) => a * b, 1);
  const inputs = e.inputs ? bytes(e.inputs) : null;
  const recons = e.recons ? bytes(e.recons) : null;
  const decode = e.decoder ? makeDecoder(e.decoder) : null;
  const grid = e.grid ? { ...e.grid, pixels: bytes(e.grid.images) } : null;

  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (let i = 0; i < e.n; i++) {
    x0 = Math.min(x0, coords[2 * i]); x1 = Math.max(x1, coords[2 * i]);
    y0 = Math.min(y0, coords[2 * i + 1]); y1 = Math.max(y1, coords[2 * i + 1]);
  }
  const pad = 0.05 * Math.max(x1 - x0, y1 - y0, 1e-6);
  [x0, x1, y0, y1] = [x0 - pad, x1 + pad, y0 - pad, y1 + pad];
  const toPixel = (px, py) => [((px - x0) / (x1 - x0)) * SIZE, ((y1 - py) / (y1 - y0)) * SIZE];
  const toPlane = (cx, cy) => [x0 + (cx / SIZE) * (x1 - x0), y1 - (cy / SIZE) * (y1 - y0)];
  const latentAt = ([px, py]) => e.origin.map((o, d) => o + px * e.axes[0][d] + py * e.axes[1][d]);

  const map = element("canvas", { className: "map", width: SIZE, height: SIZE });
  const cursor = element("canvas");
  const input = element("canvas");
  const recon = element("canvas");
  const info = element("div", { className: "info", textContent: "hover a point" });
  const how = decode ? "drag on the map: the page's decoder" : e.grid ? "drag on the map: the nearest of a precomputed grid" : "this decoder does not run in the page";
  const cursorInfo = element("div", { className: "info", textContent: how });
  const panel = { index, key: e.key, toPixel: (i) => { const r = map.getBoundingClientRect(); const [cx, cy] = toPixel(coords[2 * i], coords[2 * i + 1]); return [r.left + cx, r.top + cy]; }, lastLatent: null, lastDecoded: null, cursor: null };

  function draw() {
    const ctx = map.getContext("2d");
    ctx.clearRect(0, 0, SIZE, SIZE);
    for (let i = 0; i < e.n; i++) {
      const [cx, cy] = toPixel(coords[2 * i], coords[2 * i + 1]);
      ctx.fillStyle = e.labels ? COLOURS[((e.labels[i] % 10) + 10) % 10] : "#1f77b4";
      ctx.fillRect(cx - 1.5, cy - 1.5, 3, 3);
    }
    if (state.selected !== null && state.selectedKey === e.key && state.selected < e.n) {
      const [cx, cy] = toPixel(coords[2 * state.selected], coords[2 * state.selected + 1]);
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(cx, cy, 7, 0, 2 * Math.PI); ctx.stroke();
    }
    if (panel.cursor) {
      const [cx, cy] = panel.cursor;
      ctx.strokeStyle = "#d00"; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(cx - 8, cy); ctx.lineTo(cx + 8, cy); ctx.moveTo(cx, cy - 8); ctx.lineTo(cx, cy + 8); ctx.stroke();
    }
  }

  panel.show = (i) => {
    draw();
    if (i === null || i >= e.n) return;
    const label = e.labels ? `, label ${e.labels[i]}` : "";
    const loss = e.loss[i] === null ? "n/a" : `${e.loss[i].toFixed(2)} nats`;
    info.textContent = `example ${i}${label}: loss (-ELBO) ${loss}`;
    info.dataset.example = i;
    if (imageShape) {
      drawImage(input, inputs.subarray(i * dims, (i + 1) * dims), imageShape, true);
      if (recons) drawImage(recon, recons.subarray(i * dims, (i + 1) * dims), imageShape, true);
      else drawImage(recon, decode(latentAt([coords[2 * i], coords[2 * i + 1]])), imageShape, false);
    }
  };

  panel.decodeAt = (cx, cy) => {
    const plane = toPlane(cx, cy);
    panel.cursor = [cx, cy];
    if (decode) {
      panel.lastLatent = latentAt(plane);
      panel.lastDecoded = Array.from(decode(panel.lastLatent));
    } else {
      const cell = (v, k) => Math.round(((v - grid.low[k]) / (grid.high[k] - grid.low[k] || 1)) * (grid.size - 1));
      const gx = Math.min(Math.max(cell(plane[0], 0), 0), grid.size - 1);
      const gy = Math.min(Math.max(cell(plane[1], 1), 0), grid.size - 1);
      const at = (gy * grid.size + gx) * dims;
      const step = (k) => (grid.high[k] - grid.low[k]) / (grid.size - 1);
      panel.lastLatent = latentAt([grid.low[0] + gx * step(0), grid.low[1] + gy * step(1)]);
      panel.lastDecoded = Array.from(grid.pixels.subarray(at, at + dims), (v) => v / 255);
    }
    if (imageShape) drawImage(cursor, panel.lastDecoded, imageShape, false);
    cursorInfo.textContent = `latent (${panel.lastLatent.map((v) => v.toFixed(2)).join(", ")})`;
    draw();
  };

  let dragging = false;
  const local = (event) => { const r = map.getBoundingClientRect(); return [event.clientX - r.left, event.clientY - r.top]; };
  const canDecode = Boolean(decode || grid);  // a decoder the page cannot run comes with a grid for images only
  map.addEventListener("pointerdown", (event) => {
    if (!canDecode) return;
    dragging = true; map.setPointerCapture(event.pointerId); panel.decodeAt(...local(event));
  });
  map.addEventListener("pointerup", () => { dragging = false; });
  map.addEventListener("pointermove", (event) => {
    const [cx, cy] = local(event);
    if (dragging) return panel.decodeAt(cx, cy);
    let best = -1, bestDistance = 64;  // within 8 pixels
    for (let i = 0; i < e.n; i++) {
      const [px, py] = toPixel(coords[2 * i], coords[2 * i + 1]);
      const distance = (px - cx) ** 2 + (py - cy) ** 2;
      if (distance < bestDistance) { best = i; bestDistance = distance; }
    }
    if (best >= 0 && (best !== state.selected || state.selectedKey !== e.key)) select(best, e.key);
  });

  // The parity check: this page's decoder against PyTorch's outputs, stored when the report was written.
  const parity = element("div", { className: "parity" });
  if (decode) {
    const expected = floats(e.parity.outputs);
    let worst = 0;
    e.parity.latents.forEach((z, k) => {
      decode(z).forEach((v, j) => { worst = Math.max(worst, Math.abs(v - expected[k * dims + j])); });
    });
    state.parity[index] = worst;
    parity.textContent = `decoder parity: this page against PyTorch at ${e.parity.latents.length} latents, largest absolute difference ${worst.toExponential(1)}`;
    if (!(worst < 1e-4)) parity.className = "parity bad";
  } else {
    state.parity[index] = null;
    const fallback = grid ? `dragging shows the nearest of ${grid.size ** 2} images decoded over the plane` : "there is no picture to decode to";
    parity.textContent = `this decoder does not run in the page: ${fallback}`;
  }

  const aligned = e.aligned ? ` (aligned on ${e.aligned} shared test examples with the first run's map)` : "";
  const plane = e.axes[0].length > 2 ? `the plane of the posterior means' first two principal components of ${e.axes[0].length} dimensions` : "posterior means";
  state.panels.push(panel);
  draw();
  if (imageShape) for (const canvas of [cursor, input, recon]) drawImage(canvas, new Uint8Array(dims), imageShape, true);
  const side = element("div", { className: "side" },
    element("h3", { textContent: "at the cursor" }), cursor, cursorInfo,
    element("h3", { textContent: "hovered example and its reconstruction" }), input, recon, info);
  return element("div", {},
    element("div", { className: "info", textContent: `${e.n} test examples: ${plane}${aligned}` }),
    element("div", { className: "explorer" }, map, side), parity);
}

function section(page, index) {
  const run = element("section", { className: "run" },
    element("h2", { textContent: page.name }), element("div", { className: "path", textContent: page.path }));
  run.append(element("h3", { textContent: "latent explorer" }), explorer(page, index));
  if (page.curves) {
    const curves = element("div");
    curves.innerHTML = page.curves;  // an SVG made by vaekit from numbers only
    run.append(element("h3", { textContent: "loss per epoch (nats)" }), curves);
  }
  for (const [title, data] of Object.entries(page.tables)) run.append(element("h3", { textContent: title }), table(data));
  for (const [title, uri] of Object.entries(page.images)) {
    run.append(element("figure", {}, element("img", { src: uri, alt: title }), element("figcaption", { textContent: title })));
  }
  run.append(element("details", {}, element("summary", { textContent: "settings (config.toml)" }), element("pre", { textContent: page.settings })));
  return run;
}

const pages = JSON.parse(document.getElementById("data").textContent);
document.getElementById("report").append(element("div", { className: "runs" }, ...pages.map(section)));
state.ready = performance.now();
