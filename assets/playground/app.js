// tiller playground: a client of tiller's public HTTP API (nothing else), served from the binary.
// Views: Compare (unsteered vs steered, same seed, streamed), Sweep (a measure against a range of
// coefficients or layers), Heatmap (token projections onto a vector), Vectors (the workshop).
"use strict";

const app = {
  key: sessionStorage.getItem("tiller.key") || "",
  info: null,
  vectors: [],
  saes: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== false && v !== undefined && v !== null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) e.append(c);
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function status(message, isError = false) {
  const s = $("status");
  s.textContent = message;
  s.classList.toggle("error", isError);
}

// ---- HTTP ------------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/// Asks for an API key in a modal dialog; resolves once one is entered.
function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    const form = $("key-form");
    const done = (ev) => {
      ev.preventDefault();
      app.key = $("key-input").value.trim();
      sessionStorage.setItem("tiller.key", app.key);
      form.removeEventListener("submit", done);
      dialog.close();
      resolve();
    };
    form.addEventListener("submit", done);
    dialog.showModal();
    $("key-input").focus();
  });
}

/// Calls the API; on 401 asks for a key and retries. Throws ApiFailure with the server's message.
async function api(path, { method = "GET", json, body, headers = {}, raw = false } = {}, retried = 0) {
  const h = { ...headers };
  if (app.key) h.Authorization = "Bearer " + app.key;
  if (json !== undefined) {
    h["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const resp = await fetch(path, { method, headers: h, body });
  if (resp.status === 401 && retried < 3) {
    await askKey();
    return api(path, { method, json, body, headers, raw }, retried + 1);
  }
  if (!resp.ok) {
    let code = String(resp.status), message = resp.statusText;
    try {
      const e = (await resp.json()).error;
      code = e.code;
      message = e.message;
    } catch (_) { /* not an error envelope */ }
    throw new ApiFailure(resp.status, code, message);
  }
  if (raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.text();
}

/// Server-sent events of a streaming response, as {event, data} objects.
async function* sse(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function guard(fn) {
  return async (ev) => {
    if (ev) ev.preventDefault();
    try {
      await fn(ev);
    } catch (e) {
      status(e instanceof ApiFailure ? `${e.message} (${e.code})` : String(e), true);
    }
  };
}

// ---- Prompts and plans -----------------------------------------------------------------------

/// The `prompt` or `messages` part of a request.
function promptBody(mode, text) {
  return mode === "chat" ? { messages: [{ role: "user", content: text }] } : { prompt: text };
}

function fmtNum(x) {
  return Number.isInteger(x) ? String(x) : String(Math.round(x * 1000) / 1000);
}

/// One intervention's controls: target (vector or SAE feature), layer, coefficient, op, positions.
class InterventionEditor {
  constructor(container, { removable = true, onchange = () => {} } = {}) {
    const n = (InterventionEditor.count = (InterventionEditor.count || 0) + 1);
    const id = (s) => `iv${n}-${s}`;
    this.onchange = onchange;
    this.target = el("select", { id: id("target") });
    this.featureIndex = el("input", { id: id("feature"), type: "number", min: "0", value: "0" });
    this.layer = el("input", { id: id("layer"), type: "range", min: "0", max: String(app.info.n_layers - 1), value: String(Math.floor(app.info.n_layers / 2)) });
    this.layerOut = el("output", { for: id("layer") });
    this.coef = el("input", { id: id("coef"), type: "range", min: "-10", max: "10", step: "0.1", value: "2.5" });
    this.coefNum = el("input", { id: id("coefnum"), type: "number", step: "0.1", value: "2.5", "aria-label": "Coefficient value" });
    this.op = el("select", { id: id("op") });
    this.positions = el("select", { id: id("pos") },
      el("option", { value: "all", text: "all tokens" }),
      el("option", { value: "prompt", text: "prompt only" }),
      el("option", { value: "generated", text: "generated only" }));
    this.featureWrap = el("span", { hidden: true }, el("label", { for: id("feature"), text: "Feature" }), this.featureIndex);
    const row = el("div", { class: "intervention" },
      el("span", {}, el("label", { for: id("target"), text: "Vector" }), this.target),
      this.featureWrap,
      el("span", {}, el("label", { for: id("layer") }, "Layer ", this.layerOut), this.layer),
      el("span", {}, el("label", { for: id("coef"), text: "Coefficient" }), this.coef, this.coefNum),
      el("span", {}, el("label", { for: id("op"), text: "Op" }), this.op),
      el("span", {}, el("label", { for: id("pos"), text: "Positions" }), this.positions));
    if (removable) {
      row.append(el("button", { type: "button", "aria-label": "Remove this intervention", text: "Remove",
        onclick: () => { row.remove(); this.removed = true; this.onchange(); } }));
    }
    this.row = row;
    this.fillTargets();
    this.target.addEventListener("change", () => { this.targetChanged(); this.onchange(); });
    this.layer.addEventListener("input", () => { this.layerOut.value = this.layer.value; this.onchange(); });
    this.coef.addEventListener("input", () => { this.coefNum.value = this.coef.value; this.onchange(); });
    this.coefNum.addEventListener("input", () => { this.coef.value = this.coefNum.value; this.onchange(); });
    for (const c of [this.op, this.positions, this.featureIndex]) c.addEventListener("input", () => this.onchange());
    this.targetChanged();
    container.append(row);
  }

  fillTargets() {
    const keep = this.target.value;
    this.target.replaceChildren();
    const vg = el("optgroup", { label: "Vectors" });
    for (const v of app.vectors) if (v.kind !== "neuron_means") vg.append(el("option", { value: "v:" + v.name, text: v.name }));
    this.target.append(vg);
    if (app.saes.length) {
      const sg = el("optgroup", { label: "SAE features" });
      for (const s of app.saes) sg.append(el("option", { value: "f:" + s.name, text: `${s.name} (layer ${s.layer})` }));
      this.target.append(sg);
    }
    if (keep && [...this.target.options].some((o) => o.value === keep)) this.target.value = keep;
  }

  isFeature() { return this.target.value.startsWith("f:"); }
  name() { return this.target.value.slice(2); }

  targetChanged() {
    const feature = this.isFeature();
    this.featureWrap.hidden = !feature;
    const ops = feature ? ["add", "clamp"] : ["add", "ablate", "clamp"];
    const keep = this.op.value;
    this.op.replaceChildren(...ops.map((o) => el("option", { value: o, text: o })));
    if (ops.includes(keep)) this.op.value = keep;
    if (feature) {
      const s = app.saes.find((x) => x.name === this.name());
      if (s) { this.layer.value = s.layer; this.featureIndex.max = s.d_sae - 1; }
    } else {
      const v = app.vectors.find((x) => x.name === this.name());
      // Start at the vector's middle layer (extracted vectors cover every layer).
      if (v && v.layers.length && !v.layers.includes(Number(this.layer.value))) this.layer.value = v.layers[Math.floor(v.layers.length / 2)];
    }
    this.layer.disabled = feature;
    this.layerOut.value = this.layer.value;
  }

  set(values) {
    if (values.target) { this.target.value = values.target; this.targetChanged(); }
    if (values.layer !== undefined) { this.layer.value = values.layer; this.layerOut.value = values.layer; }
    if (values.coefficient !== undefined) { this.coef.value = values.coefficient; this.coefNum.value = values.coefficient; }
    if (values.op) this.op.value = values.op;
    this.onchange();
  }

  /// The wire spec, with optional overrides (for sweeps).
  spec(over = {}) {
    const coefficient = over.coefficient ?? Number(this.coefNum.value);
    const layer = over.layer ?? Number(this.layer.value);
    const s = { coefficient, op: this.op.value };
    if (this.isFeature()) s.feature = { sae: this.name(), index: Number(this.featureIndex.value) };
    else { s.vector = this.name(); s.layer = layer; }
    if (this.positions.value !== "all") s.positions = this.positions.value;
    return s;
  }

  /// The compact X-Steering item (the grammar in docs/steering.md).
  compact() {
    const s = this.spec();
    const c = fmtNum(s.coefficient);
    const pos = s.positions ? `;positions=${s.positions}` : "";
    if (s.feature) return `${s.feature.sae}#${s.feature.index}:${this.layer.value}:${c}` + (s.op === "clamp" ? ":clamp" : "") + pos;
    return `${s.vector}:${s.layer}:${c}` + (s.op === "add" ? "" : ":" + s.op) + pos;
  }
}

// ---- Charts ----------------------------------------------------------------------------------

/// A line chart of points {x, y, label}; `highlight` marks one x.
function lineChart(target, points, { xLabel, yLabel, highlight } = {}) {
  target.replaceChildren();
  const W = 640, H = 300, L = 62, R = 16, T = 14, B = 44;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y).filter(Number.isFinite);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    target.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y) }));
    target.append(svg("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end" }, fmtNum(y)));
  }
  for (const x of xs) target.append(svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle" }, fmtNum(x)));
  target.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  target.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  target.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, xLabel || ""));
  target.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` }, yLabel || ""));
  const finite = points.filter((p) => Number.isFinite(p.y));
  target.append(svg("polyline", { class: "line", points: finite.map((p) => `${px(p.x)},${py(p.y)}`).join(" ") }));
  for (const p of finite) {
    const c = svg("circle", { class: "point" + (p.x === highlight ? " best" : ""), cx: px(p.x), cy: py(p.y), r: 5, "data-x": p.x, "data-y": p.y });
    c.append(svg("title", {}, p.label || `${fmtNum(p.x)}: ${fmtNum(p.y)}`));
    target.append(c);
  }
  target.setAttribute("aria-label", `${yLabel} against ${xLabel}, ${finite.length} points`);
}

// ---- Compare ---------------------------------------------------------------------------------

const compare = { editors: [] };

function compareEditors() { return compare.editors.filter((e) => !e.removed); }

function compareRequest() {
  const steering = compareEditors().map((e) => e.spec());
  return {
    ...promptBody($("compare-mode").value, $("compare-prompt").value),
    max_tokens: Number($("compare-max").value),
    temperature: Number($("compare-temp").value),
    seed: Number($("compare-seed").value),
    steering,
  };
}

/// Shows the plan's compact X-Steering form and the same request as an OpenAI-style curl.
function updatePlan() {
  const eds = compareEditors();
  const compact = eds.map((e) => e.compact()).join(",");
  $("compare-compact").value = compact;
  const req = compareRequest();
  const chat = $("compare-mode").value === "chat";
  const body = { model: app.info ? app.info.model : "default", max_tokens: req.max_tokens, temperature: req.temperature, seed: req.seed };
  if (chat) body.messages = req.messages; else body.prompt = req.prompt;
  const q = (s) => "'" + s.replace(/'/g, "'\\''") + "'";
  const lines = [`curl ${location.origin}/v1/${chat ? "chat/completions" : "completions"}`, "-H 'Content-Type: application/json'"];
  if (app.key) lines.push("-H \"Authorization: Bearer $TILLER_API_KEY\"");
  if (compact) lines.push(`-H ${q("X-Steering: " + compact)}`);
  lines.push(`-d ${q(JSON.stringify(body))}`);
  $("compare-curl").value = lines.join(" \\\n  ");
}

async function runCompare() {
  const req = { ...compareRequest(), stream: true, compare: true };
  const out = { steered: $("out-steered"), baseline: $("out-baseline") };
  for (const k of ["steered", "baseline"]) { out[k].textContent = ""; $("meta-" + k).textContent = ""; }
  $("compare-run").disabled = true;
  status("Generating…");
  try {
    const resp = await api("/generate", { method: "POST", json: req, raw: true });
    for await (const { event, data } of sse(resp)) {
      const which = data.sequence || "steered";
      if (event === "token") out[which].textContent += data.text;
      else if (event === "done") {
        out[which].textContent += data.text;
        $("meta-" + which).textContent = `${data.usage.completion_tokens} tokens · finish: ${data.finish_reason} · seed ${req.seed}`;
      } else if (event === "error") throw new ApiFailure(500, data.error.code, data.error.message);
    }
    status(req.steering.length ? "Done: same seed, with and without the plan." : "Done (no interventions: both sides are the same).");
  } finally {
    $("compare-run").disabled = false;
  }
}

function setupCompare() {
  const add = (values) => {
    const ed = new InterventionEditor($("compare-interventions"), { onchange: updatePlan });
    compare.editors.push(ed);
    if (values) ed.set(values);
    updatePlan();
    return ed;
  };
  const first = app.vectors.find((v) => v.name === "golden_gate") || app.vectors.find((v) => v.kind !== "neuron_means");
  if (first) add({ target: "v:" + first.name, coefficient: 2.5 });
  $("compare-add").addEventListener("click", () => add());
  for (const id of ["compare-mode", "compare-prompt", "compare-max", "compare-temp", "compare-seed"]) $(id).addEventListener("input", updatePlan);
  $("compare-form").addEventListener("submit", guard(runCompare));
  $("compare-copy").addEventListener("click", guard(async () => {
    const text = $("compare-curl").value;
    try { await navigator.clipboard.writeText(text); } catch (_) { $("compare-curl").select(); document.execCommand("copy"); }
    status("curl command copied.");
  }));
  compare.add = add;
}

// ---- Sweep -----------------------------------------------------------------------------------

const sweep = {};

function sweepValues() {
  const from = Number($("sweep-from").value), to = Number($("sweep-to").value);
  const n = Math.max(2, Math.min(25, Number($("sweep-points").value) | 0));
  const layer = $("sweep-vary").value === "layer";
  const vals = [];
  for (let i = 0; i < n; i++) {
    let v = from + ((to - from) * i) / (n - 1);
    v = layer ? Math.round(v) : Math.round(v * 1000) / 1000;
    if (!vals.includes(v)) vals.push(v);
  }
  return vals;
}

async function runSweep() {
  const vary = $("sweep-vary").value;
  if (vary === "layer" && sweep.editor.isFeature()) {
    throw new Error("An SAE feature acts at its SAE's layer: sweep the coefficient instead.");
  }
  const measure = $("sweep-measure").value;
  const target = $("sweep-target").value;
  if (!target) throw new Error("Give a continuation (for log-probability) or a word (for contains).");
  const prompt = promptBody($("sweep-mode").value, $("sweep-prompt").value);
  const values = sweepValues();
  const list = $("sweep-texts");
  list.replaceChildren();
  $("sweep-chart").replaceChildren();
  const prog = $("sweep-progress");
  prog.max = values.length;
  prog.value = 0;
  $("sweep-run").disabled = true;
  const points = [];
  try {
    for (const v of values) {
      status(`Sweep: ${vary} = ${fmtNum(v)} (${points.length + 1}/${values.length})…`);
      const spec = sweep.editor.spec({ [vary]: v });
      const gen = await api("/generate", { method: "POST", json: { ...prompt, max_tokens: Number($("sweep-max").value), temperature: 0.7, seed: Number($("sweep-seed").value), steering: [spec] } });
      let y;
      if (measure === "logprob") {
        const lp = await api("/inspect/logprobs", { method: "POST", json: { ...prompt, targets: [target], steering: [spec] } });
        const t = lp.targets[0];
        y = (t.steered || t.unsteered).logprob;
      } else {
        y = gen.text.toLowerCase().includes(target.trim().toLowerCase()) ? 1 : 0;
      }
      points.push({ x: v, y, label: `${vary} ${fmtNum(v)}: ${fmtNum(y)}` });
      list.append(el("li", {}, el("span", { class: "param", text: `${vary} ${fmtNum(v)} → ${fmtNum(y)}: ` }), gen.text));
      prog.value = points.length;
      lineChart($("sweep-chart"), points, { xLabel: vary, yLabel: measure === "logprob" ? `log P("${target}")` : `contains "${target.trim()}"` });
    }
    status(`Sweep done: ${points.length} points.`);
  } finally {
    $("sweep-run").disabled = false;
  }
}

function setupSweep() {
  sweep.editor = new InterventionEditor($("sweep-intervention"), { removable: false });
  const gg = app.vectors.find((v) => v.name === "golden_gate");
  if (gg) sweep.editor.set({ target: "v:golden_gate" });
  $("sweep-vary").addEventListener("change", () => {
    const layer = $("sweep-vary").value === "layer";
    $("sweep-from").value = layer ? 0 : 0;
    $("sweep-to").value = layer ? app.info.n_layers - 1 : 4;
    $("sweep-points").value = layer ? Math.min(app.info.n_layers, 10) : 9;
  });
  $("sweep-form").addEventListener("submit", guard(runSweep));
}

// ---- Heatmap ---------------------------------------------------------------------------------

/// Blue (negative) through white to red (positive), for v in [-1, 1].
function diverging(v) {
  const t = Math.max(-1, Math.min(1, v));
  const mix = (a, b) => Math.round(a + (b - a) * Math.abs(t));
  const [r, g, b] = t >= 0 ? [mix(255, 214), mix(255, 39), mix(255, 40)] : [mix(255, 33), mix(255, 102), mix(255, 172)];
  return `rgb(${r}, ${g}, ${b})`;
}

async function runHeatmap() {
  const vector = $("heatmap-vector").value;
  if (!vector) throw new Error("No vector to project onto: store or extract one first.");
  const layer = Number($("heatmap-layer").value);
  const prompt = promptBody($("heatmap-mode").value, $("heatmap-prompt").value);
  status("Reading activations…");
  const acts = await api("/inspect/activations", { method: "POST", json: { ...prompt, layers: [layer], top_k: 1, project_onto: [vector] } });
  let neurons = null;
  if ($("heatmap-neurons").checked) {
    neurons = await api("/inspect/activations", { method: "POST", json: { ...prompt, layers: [layer], site: "mlp_act", top_k: 8 } });
  }
  const values = acts.tokens.map((t) => t.layers[0].projections[0].scalar);
  // The first token is an attention sink with an outsized norm: shown, but left out of the scale.
  const body = values.length > 1 ? values.slice(1) : values;
  const mean = $("heatmap-centre").checked ? body.reduce((a, b) => a + b, 0) / body.length : 0;
  const scale = Math.max(1e-6, ...body.map((v) => Math.abs(v - mean)));
  const box = $("heatmap-tokens");
  box.replaceChildren();
  const detail = $("heatmap-detail");
  detail.textContent = "";
  acts.tokens.forEach((t, i) => {
    const v = values[i];
    const span = el("span", { class: "tok" + (i === 0 && values.length > 1 ? " sink" : ""), tabindex: "0", role: "button",
      "data-value": String(v), title: `${JSON.stringify(t.text)}: projection ${fmtNum(v)}` + (mean ? ` (${fmtNum(v - mean)} from the mean)` : ""),
      text: t.text });
    span.style.background = i === 0 && values.length > 1 ? "#eceff4" : diverging((v - mean) / scale);
    const show = () => {
      let text = `Token ${i} ${JSON.stringify(t.text)}: projection onto ${vector} at layer ${layer} = ${fmtNum(v)}.`;
      if (neurons) {
        const top = neurons.tokens[i].layers[0].top.map((n) => `#${n.index} (${fmtNum(n.value)})`).join(", ");
        text += ` Top neurons: ${top}.`;
      }
      detail.textContent = text;
    };
    span.addEventListener("click", show);
    span.addEventListener("focus", show);
    span.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); show(); } });
    box.append(span);
  });
  const legend = $("heatmap-legend");
  const bar = el("span", { class: "bar" });
  bar.style.background = `linear-gradient(to right, ${diverging(-1)}, ${diverging(0)}, ${diverging(1)})`;
  legend.replaceChildren(el("span", { text: fmtNum(mean - scale) }), bar, el("span", { text: fmtNum(mean + scale) }),
    el("span", { text: `projection onto ${vector} (unit direction) at layer ${layer}; hover or focus a token for its value` }));
  status(`Heatmap: ${acts.tokens.length} tokens.`);
}

function setupHeatmap() {
  const range = $("heatmap-layer");
  range.max = app.info.n_layers - 1;
  range.value = Math.floor(app.info.n_layers / 2);
  $("heatmap-layer-out").value = range.value;
  range.addEventListener("input", () => { $("heatmap-layer-out").value = range.value; });
  // A vector acts where it has directions: move the layer there when it has none here.
  $("heatmap-vector").addEventListener("change", () => {
    const v = app.vectors.find((x) => x.name === $("heatmap-vector").value);
    if (v && v.layers.length && !v.layers.includes(Number(range.value))) {
      range.value = v.layers[Math.floor(v.layers.length / 2)];
      $("heatmap-layer-out").value = range.value;
    }
  });
  $("heatmap-vector").dispatchEvent(new Event("change"));
  $("heatmap-form").addEventListener("submit", guard(runHeatmap));
}

function fillVectorSelects() {
  const sel = $("heatmap-vector");
  const keep = sel.value;
  sel.replaceChildren(...app.vectors.filter((v) => v.kind !== "neuron_means").map((v) => el("option", { value: v.name, text: v.name })));
  if (keep && app.vectors.some((v) => v.name === keep)) sel.value = keep;
  else if (app.vectors.some((v) => v.name === "golden_gate")) sel.value = "golden_gate";
  if (sel.value !== keep) sel.dispatchEvent(new Event("change"));
  for (const ed of [...compare.editors, sweep.editor].filter(Boolean)) ed.fillTargets();
}

// ---- Vector workshop -------------------------------------------------------------------------

function layerSummary(layers) {
  if (!layers.length) return "none";
  const contiguous = layers.every((l, i) => i === 0 || l === layers[i - 1] + 1);
  return contiguous && layers.length > 2 ? `${layers[0]}–${layers[layers.length - 1]} (${layers.length})` : layers.join(", ");
}

async function refreshVectors() {
  app.vectors = (await api("/vectors")).vectors;
  const body = $("vector-table").querySelector("tbody");
  body.replaceChildren();
  for (const v of app.vectors) {
    const actions = el("td", { class: "actions" },
      el("button", { type: "button", text: "Download", "aria-label": `Download ${v.name}`, onclick: guard(() => downloadVector(v.name)) }),
      el("button", { type: "button", text: "Delete", "aria-label": `Delete ${v.name}`, disabled: v.origin === "builtin",
        title: v.origin === "builtin" ? "built-in vectors are read-only" : "", onclick: guard(() => deleteVector(v.name)) }));
    body.append(el("tr", { "data-name": v.name },
      el("th", { scope: "row", text: v.name }), el("td", { text: v.origin }), el("td", { text: v.kind }),
      el("td", { text: layerSummary(v.layers) }), el("td", { text: String(v.version) }), el("td", { text: v.description || "" }), actions));
  }
  fillVectorSelects();
}

async function downloadVector(name) {
  const format = $("download-format").value;
  const resp = await api(`/vectors/${encodeURIComponent(name)}?format=${format}`, { raw: true });
  const blob = await resp.blob();
  const a = el("a", { href: URL.createObjectURL(blob), download: `${name}.${format}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  status(`Downloaded ${name}.${format}.`);
}

async function deleteVector(name) {
  if (!confirm(`Delete the vector "${name}"? Requests already running keep their version.`)) return;
  await api(`/vectors/${encodeURIComponent(name)}`, { method: "DELETE" });
  status(`Deleted ${name}.`);
  await refreshVectors();
}

async function uploadVector() {
  const file = $("upload-file").files[0];
  if (!file) throw new Error("Choose a file first.");
  const name = $("upload-name").value.trim() || file.name.replace(/\.[^.]*$/, "").toLowerCase().replace(/[^a-z0-9_.-]/g, "_");
  const type = file.name.endsWith(".json") ? "application/json" : "application/octet-stream";
  await api(`/vectors/${encodeURIComponent(name)}`, { method: "PUT", body: await file.arrayBuffer(), headers: { "Content-Type": type } });
  status(`Stored ${name}.`);
  await refreshVectors();
}

const workshop = {};

async function runExtract() {
  const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
  const req = {
    name: $("extract-name").value.trim(),
    method: $("extract-method").value,
    position: $("extract-position").value,
    chat: $("extract-chat").checked,
    positive: lines("extract-positive"),
    negative: lines("extract-negative"),
    stream: true,
  };
  const prog = $("extract-progress");
  prog.value = 0;
  $("extract-run").disabled = true;
  status("Extracting…");
  try {
    const resp = await api("/vectors/extract", { method: "POST", json: req, raw: true });
    for await (const { event, data } of sse(resp)) {
      if (event === "progress") {
        prog.max = data.total;
        prog.value = data.done;
        status(`Extracting: ${data.done}/${data.total} examples…`);
      } else if (event === "result") {
        showExtraction(data);
      } else if (event === "error") {
        throw new ApiFailure(data.error.code === "internal_error" ? 500 : 422, data.error.code, data.error.message);
      }
    }
  } finally {
    $("extract-run").disabled = false;
  }
  await refreshVectors();
}

function showExtraction(r) {
  $("extract-result").hidden = false;
  const best = r.recommended_layer;
  lineChart($("extract-chart"), r.layers.map((l) => ({ x: l.layer, y: l.separation,
    label: `layer ${l.layer}: separation ${fmtNum(l.separation)}` + (l.heldout_accuracy == null ? "" : `, held-out accuracy ${fmtNum(l.heldout_accuracy)}`) })),
  { xLabel: "layer", yLabel: "separation", highlight: best });
  const acc = r.layers.find((l) => l.layer === best);
  $("extract-summary").textContent = `Stored ${r.vector.name} v${r.vector.version} in ${fmtNum(r.seconds)} s from ${r.examples.positive} + ${r.examples.negative} examples.` +
    (best == null ? " Too few examples to recommend a layer." : ` Recommended layer: ${best}` + (acc && acc.heldout_accuracy != null ? ` (held-out accuracy ${fmtNum(acc.heldout_accuracy)}).` : "."));
  workshop.last = { name: r.vector.name, layer: best ?? Math.floor(app.info.n_layers / 2) };
  status(`Extracted ${r.vector.name}.`);
}

function setupWorkshop() {
  $("upload-form").addEventListener("submit", guard(uploadVector));
  $("extract-form").addEventListener("submit", guard(runExtract));
  $("extract-use").addEventListener("click", () => {
    if (!workshop.last) return;
    compare.add({ target: "v:" + workshop.last.name, layer: workshop.last.layer, coefficient: 4 });
    selectTab($("tab-compare"));
  });
}

// ---- Tabs and start --------------------------------------------------------------------------

function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
  history.replaceState(null, "", "#" + tab.id.slice(4));
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((t, i) => {
    t.addEventListener("click", () => selectTab(t));
    t.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (step) { ev.preventDefault(); selectTab(tabs[(i + step + tabs.length) % tabs.length]); }
      if (ev.key === "Home") { ev.preventDefault(); selectTab(tabs[0]); }
      if (ev.key === "End") { ev.preventDefault(); selectTab(tabs[tabs.length - 1]); }
    });
  });
  const wanted = tabs.find((t) => "#" + t.id.slice(4) === location.hash);
  if (wanted) selectTab(wanted);
}

/// A model without a chat template (a base model) takes raw text: the chat choices go.
function rawPromptsOnly() {
  for (const id of ["compare-mode", "sweep-mode", "heatmap-mode"]) {
    const sel = $(id);
    if (!sel) continue;
    sel.value = "raw";
    const chat = sel.querySelector('option[value="chat"]');
    if (chat) { chat.disabled = true; chat.textContent = "chat (this model has no chat template)"; }
  }
  const asChat = $("extract-chat");
  if (asChat) { asChat.checked = false; asChat.disabled = true; asChat.title = "this model has no chat template"; }
}

async function start() {
  setupTabs();
  app.info = await api("/info");
  $("model-line").textContent = `${app.info.model} · ${app.info.n_layers} layers · d_model ${app.info.d_model} · ${app.info.device} (${app.info.kernels}) · tiller ${app.info.version}`;
  try { app.saes = (await api("/saes")).saes; } catch (_) { app.saes = []; }
  if (!app.info.chat_template) rawPromptsOnly();
  await refreshVectors();
  setupCompare();
  setupSweep();
  setupHeatmap();
  setupPatch();
  setupLens();
  setupWorkshop();
  fillVectorSelects();
  status("Ready.");
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", guard(start));
