// ECG paper: 25 mm/s, 10 mm/mV, the 3 x 4 layout with a rhythm row, and the attribution overlay.
//
// The project's models take a 1.2 s median beat per lead, not 10 s of rhythm: each 2.5 s cell of
// the 3 x 4 layout shows the lead's median beat (1.2 s) and the rest of the cell stays empty; the
// rhythm row shows lead II's median beat once, labelled as such. Nothing is repeated or invented.

export const MM_PER_S = 25;
export const MM_PER_MV = 10;
export const PX_PER_MM = 4;
export const OVERLAY_RGB = [20, 90, 255];
const CELL_S = 2.5;
const ROW_MM = 35;
const LEFT_MM = 10; // the 1 mV calibration pulse of each row
const TOP_MM = 6;
const GRID_MINOR = "#f6c9c9";
const GRID_MAJOR = "#e48f8f";
export const LAYOUT = [
  ["I", "aVR", "V1", "V4"],
  ["II", "aVL", "V2", "V5"],
  ["III", "aVF", "V3", "V6"],
];
export const RHYTHM_LEAD = "II";

// Draw on `canvas`; signals and attribution are arrays of 12 arrays (leads in `leads` order).
// Returns the layout (also kept as canvas.dataset.layout): each cell's lead, its pixel box, the
// beat's first pixel and pixels per sample.
export function drawPaper(canvas, { signals, leads, fs, attribution = null }) {
  const mm = PX_PER_MM;
  const width = Math.round((LEFT_MM + 4 * CELL_S * MM_PER_S + 4) * mm);
  const height = Math.round((TOP_MM + 4 * ROW_MM + 4) * mm);
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  grid(ctx, width, height);

  const index = Object.fromEntries(leads.map((name, i) => [name, i]));
  const pxPerSample = (MM_PER_S * mm) / fs;
  const cells = [];
  const rows = [...LAYOUT.map((row) => row.map((lead, c) => [lead, c])), [[RHYTHM_LEAD, 0]]];
  rows.forEach((row, r) => {
    const y0 = (TOP_MM + r * ROW_MM) * mm;
    calibration(ctx, y0 + (ROW_MM * mm) / 2 + 5 * mm);
    for (const [lead, c] of row) {
      const x0 = (LEFT_MM + c * CELL_S * MM_PER_S) * mm;
      const w = r === 3 ? 4 * CELL_S * MM_PER_S * mm : CELL_S * MM_PER_S * mm;
      cells.push({ lead, row: r, x: x0, y: y0, w, h: ROW_MM * mm, beatX: x0 + 2 * mm, pxPerSample, rhythm: r === 3 });
    }
  });
  const scale = attribution ? maxAbs(attribution) : 0;
  for (const cell of cells) {
    const i = index[cell.lead];
    if (i === undefined) continue;
    if (attribution && scale > 0) overlay(ctx, cell, attribution[i], scale);
    trace(ctx, cell, signals[i]);
    label(ctx, cell);
  }
  ctx.fillStyle = "#333";
  ctx.font = `${3 * mm}px sans-serif`;
  ctx.fillText("25 mm/s   10 mm/mV   median beats, 1.2 s per lead (not 2.5 s strips)", LEFT_MM * mm, 4 * mm);
  canvas.dataset.layout = JSON.stringify(cells);
  return cells;
}

function grid(ctx, width, height) {
  const mm = PX_PER_MM;
  for (let x = 0, n = 0; x <= width; x += mm, n++) line(ctx, x, 0, x, height, n % 5 === 0);
  for (let y = 0, n = 0; y <= height; y += mm, n++) line(ctx, 0, y, width, y, n % 5 === 0);
}

function line(ctx, x0, y0, x1, y1, major) {
  ctx.strokeStyle = major ? GRID_MAJOR : GRID_MINOR;
  ctx.lineWidth = major ? 1 : 0.5;
  ctx.beginPath();
  ctx.moveTo(x0 + 0.5, y0 + 0.5);
  ctx.lineTo(x1 + 0.5, y1 + 0.5);
  ctx.stroke();
}

function calibration(ctx, baseline) {
  // 1 mV for 0.2 s: 10 mm high, 5 mm wide.
  const mm = PX_PER_MM;
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  ctx.moveTo(1 * mm, baseline);
  ctx.lineTo(3 * mm, baseline);
  ctx.lineTo(3 * mm, baseline - MM_PER_MV * mm);
  ctx.lineTo(8 * mm, baseline - MM_PER_MV * mm);
  ctx.lineTo(8 * mm, baseline);
  ctx.lineTo(9.5 * mm, baseline);
  ctx.stroke();
}

function baselineOf(cell) {
  return cell.y + cell.h / 2 + 5 * PX_PER_MM;
}

function trace(ctx, cell, samples) {
  const base = baselineOf(cell);
  const perMv = MM_PER_MV * PX_PER_MM;
  ctx.save();
  ctx.beginPath();
  ctx.rect(cell.x, cell.y, cell.w, cell.h);
  ctx.clip();
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1.3;
  ctx.beginPath();
  samples.forEach((v, k) => {
    const x = cell.beatX + k * cell.pxPerSample;
    const y = base - v * perMv;
    if (k === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.restore();
}

// |attribution| as translucent columns over the cell, scaled to the largest over all leads: one
// column per pixel, as strong as the largest sample that falls in it.
function overlay(ctx, cell, values, scale) {
  const [r, g, b] = OVERLAY_RGB;
  const columns = new Map();
  values.forEach((v, k) => {
    const px = Math.floor(cell.beatX + k * cell.pxPerSample);
    columns.set(px, Math.max(columns.get(px) || 0, Math.abs(v) / scale));
  });
  for (const [px, strength] of columns) {
    if (strength <= 0.02) continue;
    ctx.fillStyle = `rgba(${r}, ${g}, ${b}, ${(0.75 * strength).toFixed(3)})`;
    ctx.fillRect(px, cell.y + 1, 1, cell.h - 2);
  }
}

function label(ctx, cell) {
  const mm = PX_PER_MM;
  ctx.fillStyle = "#000";
  ctx.font = `bold ${3.5 * mm}px sans-serif`;
  ctx.fillText(cell.lead, cell.x + 1 * mm, cell.y + 5 * mm);
  if (cell.rhythm) {
    ctx.font = `${3 * mm}px sans-serif`;
    ctx.fillStyle = "#444";
    ctx.fillText(
      "rhythm row: lead II's median beat only; the model's input holds no rhythm strip",
      cell.beatX + 36 * mm,
      cell.y + 5 * mm,
    );
  }
}

function maxAbs(rows) {
  let m = 0;
  for (const row of rows) for (const v of row) m = Math.max(m, Math.abs(v));
  return m;
}

// The share of total |attribution| per lead (the serving core's lead_shares, service/core.py).
export function leadShares(attribution) {
  const per = attribution.map((row) => row.reduce((s, v) => s + Math.abs(v), 0));
  const total = per.reduce((s, v) => s + v, 0);
  return per.map((v) => (total > 0 ? v / total : 0));
}
