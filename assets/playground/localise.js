// tiller playground: the views that localise a behaviour before steering it, Patching
// (activation patching over layers x positions, POST /inspect/patch) and Logit lens (the
// prediction read at every layer, POST /inspect/logit_lens). Uses app.js's helpers.
"use strict";

/// A colour for a recovery: white at 0, blue towards 1, red below 0, grey for none.
function recoveryColour(r) {
  if (r == null) return "#e6e9ef";
  const t = Math.max(-1, Math.min(1, r));
  const k = Math.round(255 - Math.abs(t) * 200);
  return t >= 0 ? `rgb(${k},${k},255)` : `rgb(255,${k},${k})`;
}

function tokenLabel(t) {
  return JSON.stringify(t.text);
}

async function runPatch() {
  const target = $("patch-target").value;
  const versus = $("patch-versus").value;
  const metric = versus ? { logit_diff: [target, versus] } : { logprob: target };
  const body = {
    clean: $("patch-clean").value, corrupted: $("patch-corrupted").value, metric,
    site: $("patch-site").value, direction: $("patch-direction").value, stream: true,
  };
  const bar = $("patch-progress");
  bar.value = 0;
  $("patch-run").disabled = true;
  status("Patching…");
  try {
    const resp = await api("/inspect/patch", { method: "POST", json: body, raw: true });
    for await (const ev of sse(resp)) {
      if (ev.event === "progress") bar.value = ev.data.done / Math.max(1, ev.data.total);
      else if (ev.event === "error") throw new ApiFailure(0, ev.data.error.code, ev.data.error.message);
      else if (ev.event === "result") showPatch(ev.data);
    }
  } finally {
    $("patch-run").disabled = false;
  }
}

function showPatch(r) {
  const chart = $("patch-chart");
  chart.replaceChildren();
  // The patched run's tokens label the columns.
  const layers = r.layers, positions = r.positions;
  const toks = r.direction === "noising" ? r.clean_tokens : r.corrupted_tokens;
  const left = 40, top = 8, bottom = 70;
  const cw = Math.max(8, Math.min(40, 580 / positions.length));
  const ch = Math.max(6, Math.min(16, 240 / layers.length));
  const width = left + cw * positions.length + 10;
  const height = top + ch * layers.length + bottom;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const detail = $("patch-detail");
  const describe = (li, pi) => {
    const rec = r.recovery[li][pi], val = r.values[li][pi];
    return `layer ${layers[li]}, position ${positions[pi]} ${tokenLabel(toks[positions[pi]])}: recovery ` +
      (rec == null ? "none" : fmtNum(rec)) + `, metric ${val == null ? "none" : fmtNum(val)}`;
  };
  layers.forEach((l, li) => {
    if (li % 5 === 0 || li === layers.length - 1) {
      chart.append(svg("text", { x: left - 4, y: top + ch * li + ch * 0.8, "text-anchor": "end" }, String(l)));
    }
    positions.forEach((p, pi) => {
      const rec = r.recovery[li][pi];
      const cell = svg("rect", {
        class: "cell", x: left + cw * pi, y: top + ch * li, width: cw - 1, height: ch - 1,
        fill: recoveryColour(rec), tabindex: 0, "data-layer": l, "data-position": p,
        "data-value": rec == null ? "" : rec,
      });
      const text = describe(li, pi);
      cell.append(svg("title", {}, text));
      const show = () => { detail.textContent = text; };
      cell.addEventListener("mouseenter", show);
      cell.addEventListener("focus", show);
      chart.append(cell);
    });
  });
  positions.forEach((p, pi) => {
    const x = left + cw * pi + cw / 2, y = top + ch * layers.length + 6;
    chart.append(svg("text", { x, y, transform: `rotate(60 ${x} ${y})` }, toks[p].text.slice(0, 10)));
  });
  $("patch-summary").textContent = `Clean metric ${fmtNum(r.clean)}, corrupted ${fmtNum(r.corrupted)}; ` +
    `${r.cells} patched runs in ${fmtNum(r.seconds)} s. Rows: layers (top: ${layers[0]}); columns: positions; ` +
    (r.direction === "noising"
      ? "blue: the clean prediction survives the corrupted activation there (recovery 1), white: it is lost."
      : "blue: the clean activation there restores the clean prediction.");
  status("Patching done.");
}

async function runLens() {
  const last = Math.max(1, Number($("lens-positions").value) || 1);
  const positions = Array.from({ length: last }, (_, i) => i - last);
  const target = $("lens-target").value;
  const body = { prompt: $("lens-prompt").value, positions, top_k: 1 };
  if (target) body.targets = [target];
  $("lens-run").disabled = true;
  try {
    showLens(await api("/inspect/logit_lens", { method: "POST", json: body }), target);
  } finally {
    $("lens-run").disabled = false;
  }
}

function showLens(r, target) {
  const table = $("lens-table");
  const head = el("tr", {}, el("th", { scope: "col", text: "layer" }));
  for (const p of r.positions) head.append(el("th", { scope: "col", text: `${p.position} ${tokenLabel(p)}` }));
  table.tHead.replaceChildren(head);
  const rows = [];
  r.layers.forEach((l, li) => {
    const tr = el("tr", {}, el("th", { scope: "row", text: String(l) }));
    r.positions.forEach((_, pi) => {
      const cell = r.cells[li][pi];
      const top = cell.top[0];
      const standing = cell.targets[0];
      const td = el("td", {
        text: top ? `${JSON.stringify(top.token)} ${fmtNum(Math.exp(top.logprob))}` : "",
        title: standing ? `${JSON.stringify(target)}: rank ${standing.rank}, p ${fmtNum(standing.prob)}` : "",
      });
      if (standing && standing.rank === 1) td.classList.add("hit");
      tr.append(td);
    });
    rows.push(tr);
  });
  table.tBodies[0].replaceChildren(...rows);
  status("Logit lens done.");
}

function setupPatch() {
  $("patch-form").addEventListener("submit", guard(runPatch));
}

function setupLens() {
  $("lens-form").addEventListener("submit", guard(runLens));
}
