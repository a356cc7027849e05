"""The page template of :func:`scalr_zoo.viz.save_html`: a dependency-free point viewer.

A 2D-canvas renderer (software z-buffer into an ImageData, so it needs no
WebGL and works in any browser, headless ones included) with orbit / pan /
zoom, a per-pixel point-index buffer for picking, and in-page cosine
similarity on the embedded int8 feature vectors. ``__TITLE__`` and
``__DATA__`` (the JSON written by ``save_html``) are substituted.

The page exposes ``window.scalrViewer`` (``ready``, ``count``, ``mode``,
``queryIndex``, ``frames``, ``setMode(name)``, ``selectPoint(index)``,
``pick(x, y)``, ``similarityOf(indices)``, ``screenOf(index)``) for scripting
and tests; point indices there are those of the input array.
"""

VIEWER_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>
html, body { margin: 0; height: 100%; overflow: hidden; background: #101014; color: #ddd;
  font: 13px system-ui, sans-serif; }
canvas { display: block; width: 100vw; height: 100vh; cursor: crosshair; touch-action: none; }
#panel { position: absolute; top: 8px; left: 8px; max-width: 340px; padding: 8px 10px;
  background: rgba(24, 24, 32, 0.82); border-radius: 6px; line-height: 1.5; }
#panel h1 { font-size: 14px; margin: 0 0 4px 0; }
#modes button { margin: 2px 4px 2px 0; padding: 2px 8px; border: 1px solid #666; border-radius: 4px;
  background: #2a2a36; color: #ddd; cursor: pointer; font: inherit; }
#modes button.active { background: #5a5a90; border-color: #aaf; }
#help { color: #999; font-size: 12px; }
#legend div { display: flex; align-items: center; gap: 6px; }
#legend span.swatch { width: 12px; height: 12px; border-radius: 2px; display: inline-block; }
</style>
</head>
<body>
<canvas id="view"></canvas>
<div id="panel">
  <h1>__TITLE__</h1>
  <div id="stats"></div>
  <div id="modes"></div>
  <div id="status"></div>
  <div id="legend"></div>
  <div id="help">drag: orbit &middot; right- or shift-drag: pan &middot; wheel: zoom<br>
  <span id="clickhelp">click a point: similarity to it &middot; Esc: back</span></div>
</div>
<script type="application/json" id="scalr-data">__DATA__</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("scalr-data").textContent);
  const n = data.count;

  function decode(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }

  // ---- data
  const pos = new Float32Array(3 * n);
  {
    const raw = new DataView(decode(data.positions).buffer);
    for (let i = 0; i < 3 * n; i++) {
      const axis = i % 3;
      pos[i] = data.origin[axis] + data.scale[axis] * raw.getUint16(2 * i, true);
    }
  }
  const sourceIndex = new Uint32Array(n);
  {
    const raw = new DataView(decode(data.indices).buffer);
    for (let i = 0; i < n; i++) sourceIndex[i] = raw.getUint32(4 * i, true);
  }
  const colorings = {};
  for (const name of Object.keys(data.colorings)) colorings[name] = decode(data.colorings[name]);
  const dims = data.featureDims || 0;
  const features = data.features ? new Int8Array(decode(data.features).buffer) : null;
  const norms = new Float32Array(n);
  if (features) {
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let k = i * dims, end = k + dims; k < end; k++) s += features[k] * features[k];
      norms[i] = Math.sqrt(s);
    }
  }
  const similarity = new Float32Array(n);
  const similarityColors = new Uint8Array(3 * n);

  // ---- state
  const modeNames = Object.keys(colorings);
  let mode = modeNames[0];
  let query = -1;
  const packed = new Uint32Array(n);
  const background = 0xff140f10; // ABGR of #10 0f 14

  function setColors(rgb) {
    for (let i = 0; i < n; i++) {
      packed[i] = 0xff000000 | (rgb[3 * i + 2] << 16) | (rgb[3 * i + 1] << 8) | rgb[3 * i];
    }
  }

  // ---- camera: orbit around a target, z up
  function median(axis) {
    const values = new Float32Array(n);
    for (let i = 0; i < n; i++) values[i] = pos[3 * i + axis];
    values.sort();
    return values[n >> 1];
  }
  const home = { target: [median(0), median(1), median(2)], yaw: -2.3, pitch: 0.85, dist: 1 };
  {
    const radius = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      radius[i] = Math.hypot(pos[3 * i] - home.target[0], pos[3 * i + 1] - home.target[1], pos[3 * i + 2] - home.target[2]);
    }
    radius.sort();
    home.dist = Math.max(1e-3, 1.6 * radius[Math.floor(0.8 * (n - 1))]);
  }
  const cam = { target: home.target.slice(), yaw: home.yaw, pitch: home.pitch, dist: home.dist };
  const fov = 55 * Math.PI / 180;

  function basis() {
    const cp = Math.cos(cam.pitch), sp = Math.sin(cam.pitch), cy = Math.cos(cam.yaw), sy = Math.sin(cam.yaw);
    const eye = [cam.target[0] + cam.dist * cp * cy, cam.target[1] + cam.dist * cp * sy, cam.target[2] + cam.dist * sp];
    const fwd = [-cp * cy, -cp * sy, -sp];
    const right = [sy, -cy, 0];  // normalize(cross(fwd, z))
    const up = [right[1] * fwd[2] - right[2] * fwd[1], right[2] * fwd[0] - right[0] * fwd[2], right[0] * fwd[1] - right[1] * fwd[0]];
    return { eye, fwd, right, up };
  }

  // ---- rendering
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  let image = null, pixels = null, depth = null, owner = null, W = 0, H = 0, dpr = 1;
  let frames = 0, pending = false;

  function resize() {
    dpr = window.devicePixelRatio || 1;
    W = Math.max(1, Math.round(canvas.clientWidth * dpr));
    H = Math.max(1, Math.round(canvas.clientHeight * dpr));
    canvas.width = W;
    canvas.height = H;
    image = ctx.createImageData(W, H);
    pixels = new Uint32Array(image.data.buffer);
    depth = new Float32Array(W * H);
    owner = new Int32Array(W * H);
  }

  function project(i, b, f) {
    const dx = pos[3 * i] - b.eye[0], dy = pos[3 * i + 1] - b.eye[1], dz = pos[3 * i + 2] - b.eye[2];
    const zc = dx * b.fwd[0] + dy * b.fwd[1] + dz * b.fwd[2];
    if (zc < 1e-3 * cam.dist) return null;
    const xc = dx * b.right[0] + dy * b.right[1] + dz * b.right[2];
    const yc = dx * b.up[0] + dy * b.up[1] + dz * b.up[2];
    return [W / 2 + f * xc / zc, H / 2 - f * yc / zc, zc];
  }

  function draw() {
    pending = false;
    pixels.fill(background);
    depth.fill(Infinity);
    owner.fill(-1);
    const b = basis();
    const f = 0.5 * H / Math.tan(fov / 2);
    const size = Math.max(1, Math.round(data.pointSize * dpr));
    const half = size >> 1;
    const ex = b.eye[0], ey = b.eye[1], ez = b.eye[2];
    const near = 1e-3 * cam.dist;
    for (let i = 0; i < n; i++) {
      const dx = pos[3 * i] - ex, dy = pos[3 * i + 1] - ey, dz = pos[3 * i + 2] - ez;
      const zc = dx * b.fwd[0] + dy * b.fwd[1] + dz * b.fwd[2];
      if (zc < near) continue;
      const xc = dx * b.right[0] + dy * b.right[1] + dz * b.right[2];
      const yc = dx * b.up[0] + dy * b.up[1] + dz * b.up[2];
      const sx = Math.round(W / 2 + f * xc / zc) - half, sy = Math.round(H / 2 - f * yc / zc) - half;
      if (sx >= W || sy >= H || sx + size <= 0 || sy + size <= 0) continue;
      const color = packed[i];
      for (let y = Math.max(0, sy), y1 = Math.min(H, sy + size); y < y1; y++) {
        for (let x = Math.max(0, sx), x1 = Math.min(W, sx + size), k = y * W + x; x < x1; x++, k++) {
          if (zc < depth[k]) { depth[k] = zc; pixels[k] = color; owner[k] = i; }
        }
      }
    }
    ctx.putImageData(image, 0, 0);
    if (query >= 0) {
      const p = project(query, b, f);
      if (p) {
        ctx.lineWidth = 2 * dpr;
        ctx.strokeStyle = "#ffffff";
        ctx.beginPath();
        ctx.arc(p[0], p[1], 7 * dpr, 0, 2 * Math.PI);
        ctx.stroke();
      }
    }
    frames++;
  }

  function redraw() {
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }

  // ---- colourings and similarity
  function colormap(t, out, o) {
    const anchors = data.colormap, last = anchors.length - 1;
    const x = Math.min(Math.max(t, 0), 1) * last;
    const k = Math.min(Math.floor(x), last - 1), w = x - k;
    for (let c = 0; c < 3; c++) out[o + c] = Math.round(anchors[k][c] * (1 - w) + anchors[k + 1][c] * w);
  }

  function computeSimilarity(q) {
    const qo = q * dims, qn = norms[q] || 1;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let k = 0, o = i * dims; k < dims; k++) s += features[o + k] * features[qo + k];
      similarity[i] = s / ((norms[i] || 1) * qn);
    }
    const sorted = Float32Array.from(similarity).sort();
    const low = sorted[Math.floor(0.02 * (n - 1))], high = sorted[n - 1];
    const span = Math.max(high - low, 1e-12);
    for (let i = 0; i < n; i++) colormap((similarity[i] - low) / span, similarityColors, 3 * i);
  }

  function setMode(name) {
    if (!(name in colorings)) throw new Error("unknown colouring " + name);
    mode = name;
    query = -1;
    setColors(colorings[name]);
    updatePanel();
    redraw();
  }

  function select(i) {
    if (!features || i < 0) return;
    query = i;
    mode = "similarity";
    computeSimilarity(i);
    setColors(similarityColors);
    updatePanel();
    redraw();
  }

  function pickLocal(xCss, yCss) {
    const px = Math.round(xCss * dpr), py = Math.round(yCss * dpr), r = Math.round(5 * dpr);
    let best = -1, bestD = Infinity, bestZ = Infinity;
    for (let y = Math.max(0, py - r); y <= Math.min(H - 1, py + r); y++) {
      for (let x = Math.max(0, px - r); x <= Math.min(W - 1, px + r); x++) {
        const k = y * W + x, i = owner[k];
        if (i < 0) continue;
        const d = (x - px) * (x - px) + (y - py) * (y - py);
        if (d < bestD || (d === bestD && depth[k] < bestZ)) { bestD = d; bestZ = depth[k]; best = i; }
      }
    }
    return best;
  }

  let localIndex = null;
  function localOf(index) {
    if (!localIndex) {
      localIndex = new Map();
      for (let i = 0; i < n; i++) localIndex.set(sourceIndex[i], i);
    }
    const i = localIndex.get(index);
    return i === undefined ? -1 : i;
  }

  // ---- panel
  function updatePanel() {
    document.getElementById("stats").textContent =
      n === data.total ? n.toLocaleString() + " points" : n.toLocaleString() + " of " + data.total.toLocaleString() + " points shown";
    const modes = document.getElementById("modes");
    modes.textContent = "";
    for (const name of modeNames) {
      const button = document.createElement("button");
      button.textContent = name;
      if (name === mode) button.className = "active";
      button.addEventListener("click", () => setMode(name));
      modes.appendChild(button);
    }
    document.getElementById("status").textContent = query >= 0
      ? "similarity to point " + sourceIndex[query] + " (yellow: most similar)" : "colour: " + mode;
    if (!features) document.getElementById("clickhelp").textContent = "no features embedded";
  }
  {
    const legend = document.getElementById("legend");
    for (const [name, rgb] of Object.entries(data.legend)) {
      const row = document.createElement("div");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = "rgb(" + rgb.join(",") + ")";
      row.appendChild(swatch);
      row.appendChild(document.createTextNode(name));
      legend.appendChild(row);
    }
  }

  // ---- interaction
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    drag = { x: e.clientX, y: e.clientY, moved: 0, pan: e.button === 2 || e.shiftKey, button: e.button };
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    drag.x = e.clientX; drag.y = e.clientY; drag.moved += Math.abs(dx) + Math.abs(dy);
    if (drag.moved < 4) return;
    if (drag.pan) {
      const b = basis(), k = cam.dist * 2 * Math.tan(fov / 2) / (canvas.clientHeight || 1);
      for (let c = 0; c < 3; c++) cam.target[c] += (-dx * b.right[c] + dy * b.up[c]) * k;
    } else {
      cam.yaw -= dx * 0.006;
      cam.pitch = Math.min(1.55, Math.max(-1.55, cam.pitch + dy * 0.006));
    }
    redraw();
  });
  canvas.addEventListener("pointerup", (e) => {
    if (drag && drag.moved < 4 && drag.button === 0) select(pickLocal(e.clientX, e.clientY));
    drag = null;
  });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    cam.dist *= Math.exp(Math.max(-100, Math.min(100, e.deltaY)) * 0.002);
    redraw();
  }, { passive: false });
  window.addEventListener("keydown", (e) => {
    if (e.key === "Escape") setMode(modeNames[0]);
    if (e.key === "h" || e.key === "Home") {
      cam.target = home.target.slice(); cam.yaw = home.yaw; cam.pitch = home.pitch; cam.dist = home.dist;
      redraw();
    }
  });
  window.addEventListener("resize", () => { resize(); redraw(); });

  // ---- start
  resize();
  setColors(colorings[mode]);
  updatePanel();
  draw();

  window.scalrViewer = {
    ready: true,
    count: n,
    hasFeatures: !!features,
    get mode() { return mode; },
    get queryIndex() { return query >= 0 ? sourceIndex[query] : -1; },
    get frames() { return frames; },
    setMode: setMode,
    selectPoint(index) { select(localOf(index)); },
    pick(x, y) { const i = pickLocal(x, y); return i >= 0 ? sourceIndex[i] : -1; },
    similarityOf(indices) { return indices.map((index) => similarity[localOf(index)]); },
    screenOf(index) {
      const i = localOf(index);
      const p = i >= 0 ? project(i, basis(), 0.5 * H / Math.tan(fov / 2)) : null;
      return p ? [p[0] / dpr, p[1] / dpr] : null;
    },
  };
})();
</script>
</body>
</html>
"""
