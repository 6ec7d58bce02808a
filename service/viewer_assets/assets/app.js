// The viewer's main page: model and version, an ECG (a sample, or a dropped file), the gate's
// verdict on each method, and an explanation drawn on ECG paper. Predictions and explanations go
// to the Open Inference Protocol's REST endpoint, through the serving core like any other call.

import { call, callBinary, describeError, el, enc, fmt, signIn, token } from "./api.js";
import { drawPaper, leadShares } from "./paper.js";
import { leadShareChart } from "./figures.js";

const $ = (id) => document.getElementById(id);
const PROBABILITY_THRESHOLD = 0.5; // "predicted": as the serving core's "all predicted" target
const state = { model: null, info: null, version: null, ecg: null };

function status(text, kind = "info") {
  const box = $("status");
  box.textContent = text;
  box.className = `status ${kind}`;
}

async function start() {
  signIn($("signin"), () => call("/viewer/api/models"), () => loadModels().catch(fail));
  $("model").addEventListener("change", () => loadModel($("model").value).catch(fail));
  $("version").addEventListener("change", () => showVersion($("version").value));
  $("sample").addEventListener("change", () => loadSample($("sample").value).catch(fail));
  $("explain").addEventListener("click", () => explain().catch(fail));
  setUpDrop();
  await loadSampleList();
  try {
    await loadModels();
  } catch (e) {
    $("signin").hidden = false;
    if (token()) $("signin").querySelector(".error").textContent = describeError(e);
  }
}

function fail(e) {
  status(describeError(e), "error");
}

// ------------------------------------------------------------------ models, versions, methods

async function loadModels() {
  const { models } = await call("/viewer/api/models");
  $("signin").hidden = true;
  $("main").hidden = false;
  const select = $("model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name)));
  if (models.length === 0) {
    status("This server has no models.", "error");
    return;
  }
  await loadModel(models[0].name);
}

async function loadModel(name) {
  const info = await call(`/viewer/api/models/${enc(name)}`);
  state.model = name;
  state.info = info;
  const select = $("version");
  select.replaceChildren(
    ...info.versions.map((v) =>
      el("option", { value: v.version }, `${v.version} ${v.serving ? "(serving)" : "(not serving)"}`),
    ),
  );
  const chosen = info.default_version || (info.versions.at(-1) || {}).version;
  if (chosen) {
    select.value = chosen;
    showVersion(chosen);
  }
}

function showVersion(version) {
  const v = state.info.versions.find((x) => x.version === version);
  state.version = v;
  $("report-link").href = `report.html?model=${enc(state.model)}&version=${enc(version)}`;
  $("version-state").textContent = v.serving
    ? `gate: ${v.gate_verdict || "none"}${v.ungated ? " (research mode: ungated)" : ""}: ${v.gate_headline || ""}`
    : `not serving: ${v.refusal}`;
  $("version-state").className = v.serving ? "verdict pass" : "verdict fail";
  $("methods").replaceChildren(...v.methods.map(methodItem));
  const first = $("methods").querySelector("input:not([disabled])");
  if (first) first.checked = true;
  $("target").replaceChildren(
    el("option", { value: "predicted" }, "the predicted class"),
    ...v.classes.map((c) => el("option", { value: c.key }, `${c.key} ${c.name ? `(${c.name})` : ""}`)),
  );
  updateExplainButton();
}

function methodItem(m) {
  const id = `method-${m.method}`;
  const verdict = m.servable ? (m.ungated ? "ungated" : "pass") : "refused";
  const item = el(
    "li",
    { class: `method ${m.servable ? "servable" : "refused"}`, "data-method": m.method, "data-verdict": m.verdict },
    el(
      "label",
      { for: id },
      el("input", { type: "radio", name: "method", id, value: m.method, disabled: !m.servable }),
      ` ${m.method} `,
    ),
    el("span", { class: `verdict ${verdict}` }, m.servable ? `gate: ${m.verdict}` : `refused (gate: ${m.verdict})`),
  );
  if (m.refusal) item.append(el("p", { class: "reason" }, m.refusal));
  if (m.checks.length) {
    item.append(
      el(
        "table",
        { class: "checks" },
        el("tr", {}, el("th", {}, "check"), el("th", {}, "score"), el("th", {}, "threshold"), el("th", {}, "verdict")),
        ...m.checks.map((c) =>
          el(
            "tr",
            { class: c.verdict, "data-check": c.check },
            el("td", {}, c.check + (c.blocking ? "" : " (not blocking)")),
            el("td", { class: "score" }, fmt(c.score)),
            el("td", { class: "threshold" }, fmt(c.threshold)),
            el("td", {}, c.verdict),
          ),
        ),
      ),
    );
  }
  return item;
}

function updateExplainButton() {
  const ready = state.ecg && state.version && state.version.serving;
  $("explain").disabled = !ready || !$("methods").querySelector("input:checked");
}

// ------------------------------------------------------------------ ECGs

async function loadSampleList() {
  const response = await fetch("samples/index.json", { cache: "no-store" });
  const { samples } = await response.json();
  $("sample").replaceChildren(
    el("option", { value: "" }, "choose a sample…"),
    ...samples.map((s) => el("option", { value: s.file }, s.title)),
  );
}

async function loadSample(file) {
  if (!file) return;
  const doc = await (await fetch(`samples/${file}`, { cache: "no-store" })).json();
  useEcg(doc.samples, doc.leads, doc.title, `${doc.kind}, ${doc.source}`);
}

function useEcg(samples, leads, title, note) {
  const modelLeads = (state.version && state.version.leads.length && state.version.leads) || leads;
  const byName = Object.fromEntries(leads.map((name, i) => [name.toLowerCase(), samples[i]]));
  const missing = modelLeads.filter((name) => !byName[name.toLowerCase()]);
  if (missing.length) throw new Error(`the ECG lacks lead(s) ${missing.join(", ")}`);
  state.ecg = { samples: modelLeads.map((name) => byName[name.toLowerCase()]), leads: modelLeads, title };
  $("ecg-title").textContent = `${title} — ${note}`;
  $("results").hidden = true;
  drawPaper($("paper"), { signals: state.ecg.samples, leads: modelLeads, fs: 500 });
  status(`ECG loaded: ${title}. Choose a method and explain.`);
  updateExplainButton();
}

function setUpDrop() {
  const zone = $("drop");
  const input = $("file");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) readFile(e.dataTransfer.files[0]).catch(fail);
  });
  input.addEventListener("change", () => input.files.length && readFile(input.files[0]).catch(fail));
  $("methods").addEventListener("change", updateExplainButton);
}

// A JSON file of raw samples (the samples' own format, or a bare 12 x 600 array) is read here.
// ECG documents (DICOM, HL7 aECG, MUSE, Sierra, FHIR) are decoded by the server only (the OIP
// input ecg_document): the page draws the ECG the server returns, as the model saw it.
async function readFile(file) {
  if (file.size > 32 * 1024 * 1024) throw new Error(`${file.name} is over 32 MiB`);
  const bytes = new Uint8Array(await file.arrayBuffer());
  const chosen = $("format").value;
  const doc = chosen === "auto" ? rawSamples(bytes) : null;
  if (doc === null) {
    const format = chosen === "auto" ? sniffFormat(file.name, bytes) : chosen;
    if (!format) throw new Error(`${file.name}: not an ECG document this page recognises; choose its format`);
    useDocument(bytes, format, file.name);
    return;
  }
  const samples = Array.isArray(doc) ? doc : doc.samples;
  const leads = Array.isArray(doc) ? null : doc.leads;
  if (!Array.isArray(samples) || samples.length !== 12 || !samples.every((r) => Array.isArray(r) && r.length === 600)) {
    throw new Error(`${file.name}: expected 12 leads of 600 samples (a 1.2 s median beat at 500 Hz, mV)`);
  }
  const names = leads || state.version.leads;
  useEcg(samples, names, file.name, "dropped file, raw samples");
}

// The viewer's own sample format (or a bare array), or null: anything else is a document.
function rawSamples(bytes) {
  try {
    const doc = JSON.parse(new TextDecoder().decode(bytes));
    return Array.isArray(doc) || (doc && Array.isArray(doc.samples)) ? doc : null;
  } catch {
    return null;
  }
}

// The document's format from its first bytes (as ecgx.core.ecg_formats.sniff_format does on the
// server; the server checks the document whatever is chosen here).
function sniffFormat(name, bytes) {
  const ascii = new TextDecoder("latin1").decode(bytes.slice(0, 8192));
  if (ascii.slice(128, 132) === "DICM" || /\.dcm$|\.dicom$/i.test(name)) return "dicom";
  if (/"resourceType"\s*:/.test(ascii)) return "fhir";
  if (/<AnnotatedECG[\s>]/.test(ascii)) return "hl7-aecg";
  if (/<RestingECG[\s>]/.test(ascii)) return "ge-muse";
  if (/<restingecgdata[\s>]/.test(ascii)) return "philips-sierra";
  return null;
}

function useDocument(bytes, format, name) {
  state.ecg = { document: { bytes, format }, title: name, leads: null, samples: null };
  $("ecg-title").textContent = `${name} — ${format} document; the server decodes it, and the ECG as the model sees it is drawn with the explanation`;
  $("results").hidden = true;
  const ctx = $("paper").getContext("2d");
  ctx.clearRect(0, 0, $("paper").width, $("paper").height);
  status(`document loaded: ${name} (${format}). Choose a method and explain.`);
  updateExplainButton();
}

// ------------------------------------------------------------------ explain

async function explain() {
  const method = $("methods").querySelector("input:checked").value;
  const target = $("target").value;
  const v = state.version;
  const path = `/v2/models/${enc(state.model)}/versions/${enc(v.version)}/infer`;
  status(`explaining with ${method}…`);
  $("explain").disabled = true;
  try {
    let answer;
    if (state.ecg.document) {
      answer = await explainDocument(path, state.ecg.document, method, target);
    } else {
      const flat = state.ecg.samples.flat();
      answer = await call(path, {
        method: "POST",
        body: {
          inputs: [{ name: "ecg", datatype: "FP32", shape: [1, state.ecg.leads.length, state.ecg.samples[0].length], data: flat }],
          parameters: { method, target },
        },
      });
    }
    showResult(answer, method);
  } finally {
    updateExplainButton();
  }
}

// A document goes as the ecg_document input (BYTES: a 4-byte little-endian length, then its
// bytes); with fhir the answer carries the FHIR Observation holding the ECG as the model saw it.
async function explainDocument(path, doc, method, target) {
  const element = new Uint8Array(4 + doc.bytes.length);
  new DataView(element.buffer).setUint32(0, doc.bytes.length, true);
  element.set(doc.bytes, 4);
  const head = {
    inputs: [{ name: "ecg_document", datatype: "BYTES", shape: [1], parameters: { binary_data_size: element.length } }],
    parameters: { format: doc.format, method, target, fhir: true },
  };
  const answer = await callBinary(path, head, element);
  const observation = JSON.parse(output(answer, "fhir_observation").data[0]);
  const signal = (observation.component || []).filter((c) => c.code.coding.some((x) => x.code === "ecg-model-input"));
  const leads = signal.map((c) => c.code.text.split(", lead ").at(-1));
  const samples = signal.map((c) => {
    const sd = c.valueSampledData;
    const factor = Number(sd.factor || 1);
    const origin = Number((sd.origin && sd.origin.value) || 0);
    return sd.data.trim().split(/\s+/).map((t) => origin + factor * Number(t));
  });
  state.ecg = { ...state.ecg, leads, samples };
  return answer;
}

function output(answer, name) {
  const o = answer.outputs.find((x) => x.name === name);
  if (!o) throw new Error(`the answer has no ${name}`);
  return o;
}

function showResult(answer, method) {
  const p = answer.parameters;
  const classes = JSON.parse(p.classes);
  // "targets": the class index explained, per ECG (one ECG here).
  const targets = JSON.parse(p.targets || "[]").flat().map((t) => (typeof t === "number" ? classes[t] : t));
  const probabilities = output(answer, "probabilities").data;
  const flat = output(answer, "attribution").data;
  const [, leads, samples] = output(answer, "attribution").shape;
  const attribution = Array.from({ length: leads }, (_, i) => flat.slice(i * samples, (i + 1) * samples));
  const names = Object.fromEntries(state.version.classes.map((c) => [c.key, c.name]));
  $("classes").replaceChildren(
    el("tr", {}, el("th", {}, "class"), el("th", {}, "probability"), el("th", {}, "predicted"), el("th", {}, "explained")),
    ...classes.map((key, i) =>
      el(
        "tr",
        { "data-class": key, class: probabilities[i] >= PROBABILITY_THRESHOLD ? "predicted" : "" },
        el("td", {}, `${key}${names[key] ? ` (${names[key]})` : ""}`),
        el("td", {}, probabilities[i].toFixed(3)),
        el("td", {}, probabilities[i] >= PROBABILITY_THRESHOLD ? "yes" : ""),
        el("td", {}, targets.includes(key) ? "yes" : ""),
      ),
    ),
  );
  drawPaper($("paper"), { signals: state.ecg.samples, leads: state.ecg.leads, fs: 500, attribution });
  const shares = leadShares(attribution);
  $("shares").replaceChildren(leadShareChart(state.ecg.leads, shares));
  $("facts").textContent =
    `${method} on ${answer.model_name} version ${answer.model_version}: gate ${p.gate_verdict}` +
    `${p.ungated ? " (UNGATED, research mode)" : ""}; gate report ${String(p.gate_report_sha256).slice(0, 16)}…; ` +
    `target ${targets.join(", ") || "none"}; ${Number(p.compute_seconds).toFixed(2)} s`;
  $("results").hidden = false;
  status(`explained with ${method}`, "ok");
}

start().catch(fail);
