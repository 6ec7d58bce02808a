// Small SVG charts: the lead-share bars, scores against thresholds, a matrix heatmap.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// One horizontal bar per lead: its share of total |attribution| (the largest one marked).
export function leadShareChart(leads, shares) {
  const rowH = 22;
  const labelW = 44;
  const barW = 320;
  const root = svg("svg", { width: labelW + barW + 70, height: rowH * leads.length + 8, class: "lead-shares", role: "img" });
  root.append(svg("title", {}, "Share of |attribution| per lead"));
  const top = Math.max(...shares);
  leads.forEach((lead, i) => {
    const y = 4 + i * rowH;
    const g = svg("g", { "data-lead": lead, "data-share": shares[i].toFixed(6), class: shares[i] === top ? "bar top" : "bar" });
    g.append(svg("text", { x: labelW - 6, y: y + 15, "text-anchor": "end" }, lead));
    g.append(svg("rect", { x: labelW, y: y + 3, width: Math.max(1, barW * shares[i]), height: rowH - 6 }));
    g.append(svg("text", { x: labelW + barW * shares[i] + 6, y: y + 15 }, `${(100 * shares[i]).toFixed(1)} %`));
    root.append(g);
  });
  return root;
}

// Each check's score (dot) against its threshold (tick), per method; fail in red.
export function scoreChart(rows) {
  // rows: [{label, score, threshold, verdict}]
  const rowH = 24;
  const labelW = 260;
  const plotW = 300;
  const values = rows.flatMap((r) => [r.score, r.threshold]).filter((v) => v !== null && v !== undefined);
  const lo = Math.min(0, ...values);
  const hi = Math.max(1, ...values);
  const x = (v) => labelW + ((v - lo) / (hi - lo || 1)) * plotW;
  const root = svg("svg", { width: labelW + plotW + 20, height: rowH * rows.length + 30, class: "scores", role: "img" });
  root.append(svg("title", {}, "Scores against thresholds"));
  rows.forEach((r, i) => {
    const y = 10 + i * rowH + rowH / 2;
    const g = svg("g", { class: `score ${r.verdict}` });
    g.append(svg("text", { x: labelW - 8, y: y + 4, "text-anchor": "end" }, r.label));
    g.append(svg("line", { x1: labelW, x2: labelW + plotW, y1: y, y2: y, class: "axis" }));
    if (r.threshold !== null && r.threshold !== undefined) {
      g.append(svg("line", { x1: x(r.threshold), x2: x(r.threshold), y1: y - 8, y2: y + 8, class: "threshold" }));
    }
    if (r.score !== null && r.score !== undefined) g.append(svg("circle", { cx: x(r.score), cy: y, r: 5 }));
    root.append(g);
  });
  const yAxis = 10 + rows.length * rowH + 12;
  root.append(svg("text", { x: labelW, y: yAxis, "text-anchor": "start" }, lo.toPrecision(2)));
  root.append(svg("text", { x: labelW + plotW, y: yAxis, "text-anchor": "end" }, hi.toPrecision(2)));
  return root;
}

// A square matrix of values in [-1, 1] (e.g. the inter-method rank correlations).
export function heatmap(names, matrix) {
  const cell = 44;
  const labelW = 130;
  const root = svg("svg", { width: labelW + cell * names.length + 10, height: labelW + cell * names.length, class: "heatmap", role: "img" });
  names.forEach((name, j) => {
    root.append(svg("text", { x: labelW + j * cell + cell / 2, y: labelW - 6, transform: `rotate(-45 ${labelW + j * cell + cell / 2} ${labelW - 6})` }, name));
  });
  names.forEach((name, i) => {
    root.append(svg("text", { x: labelW - 6, y: labelW + i * cell + cell / 2 + 4, "text-anchor": "end" }, name));
    names.forEach((_, j) => {
      const v = matrix[i][j];
      const shade = v === null ? "#ddd" : v >= 0 ? `rgba(20, 90, 255, ${Math.abs(v)})` : `rgba(220, 40, 40, ${Math.abs(v)})`;
      root.append(svg("rect", { x: labelW + j * cell, y: labelW + i * cell, width: cell - 2, height: cell - 2, fill: shade }));
      root.append(svg("text", { x: labelW + j * cell + cell / 2, y: labelW + i * cell + cell / 2 + 4, "text-anchor": "middle" }, v === null ? "–" : v.toFixed(2)));
    });
  });
  return root;
}

const PALETTE = ["#145aff", "#d2442c", "#1d8a3a", "#8a3ab9", "#c98a00", "#2b2b2b", "#0a9396", "#bb3e03"];

// Lines over shared x positions: series [{label, values (null breaks the line), dash?}],
// xLabels (one per position), limits [{value, label}] drawn as dotted horizontal lines.
export function lineChart(series, xLabels, { limits = [], yLabel = "" } = {}) {
  const w = 460;
  const h = 220;
  const left = 50;
  const top = 12;
  const values = series.flatMap((s) => s.values).concat(limits.map((l) => l.value)).filter((v) => v !== null);
  const lo = Math.min(...values, 0);
  const hi = Math.max(...values, 1);
  const x = (i) => left + (xLabels.length > 1 ? (i / (xLabels.length - 1)) * (w - left - 10) : 0);
  const y = (v) => top + (1 - (v - lo) / (hi - lo || 1)) * (h - top - 40);
  const root = svg("svg", { width: w + 170, height: h, class: "lines", role: "img" });
  root.append(svg("line", { x1: left, x2: w - 10, y1: y(lo), y2: y(lo), stroke: "#999" }));
  root.append(svg("line", { x1: left, x2: left, y1: top, y2: y(lo), stroke: "#999" }));
  root.append(svg("text", { x: left - 4, y: y(hi) + 4, "text-anchor": "end" }, hi.toPrecision(2)));
  root.append(svg("text", { x: left - 4, y: y(lo) + 4, "text-anchor": "end" }, lo.toPrecision(2)));
  if (yLabel) root.append(svg("text", { x: 4, y: top + 2 }, yLabel));
  xLabels.forEach((label, i) => {
    if (xLabels.length <= 8 || i % Math.ceil(xLabels.length / 8) === 0) {
      root.append(svg("text", { x: x(i), y: y(lo) + 16, "text-anchor": "middle" }, label));
    }
  });
  for (const limit of limits) {
    root.append(svg("line", { x1: left, x2: w - 10, y1: y(limit.value), y2: y(limit.value), stroke: "#000", "stroke-dasharray": "2 3" }));
    root.append(svg("text", { x: w - 8, y: y(limit.value) + 4 }, limit.label));
  }
  series.forEach((s, k) => {
    const colour = PALETTE[k % PALETTE.length];
    let d = "";
    s.values.forEach((v, i) => {
      if (v === null) return;
      d += `${d && s.values[i - 1] !== null ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
    });
    root.append(svg("path", { d, fill: "none", stroke: colour, "stroke-width": 2, "stroke-dasharray": s.dash || "" }));
    root.append(svg("text", { x: w + 60, y: top + 14 + k * 16, fill: colour }, s.label));
  });
  return root;
}
