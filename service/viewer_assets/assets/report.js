// The gate report page: a version's signed report for the release reviewer (verdicts, criteria,
// figures drawn from the report's own numbers, and the whole document).

import { call, describeError, el, enc, fmt, signIn, token } from "./api.js";
import { heatmap, lineChart, scoreChart } from "./figures.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const model = params.get("model") || "";
const version = params.get("version") || "";
const path = `/viewer/api/models/${enc(model)}/versions/${enc(version)}/report`;

async function start() {
  $("back").href = "./";
  signIn($("signin"), () => call(path), () => load().catch(fail));
  try {
    await load();
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      $("signin").hidden = false;
      if (token()) $("signin").querySelector(".error").textContent = describeError(e);
    } else fail(e);
  }
}

function fail(e) {
  $("status").textContent = describeError(e);
  $("status").className = "status error";
}

async function load() {
  const doc = await call(path);
  $("signin").hidden = true;
  $("main").hidden = false;
  const r = doc.report;
  $("title").textContent = `Gate report: ${doc.model} version ${doc.version}`;
  $("verdict").textContent = `verdict: ${r.verdict}`;
  $("verdict").className = `verdict ${r.verdict === "pass" ? "pass" : "fail"}`;
  $("headline").textContent = r.headline || "";
  $("facts").replaceChildren(
    ...[
      ["signature", doc.signature],
      ["report sha256", doc.sha256],
      ["policy sha256", doc.policy_sha256],
      ["package sha256", doc.package_sha256],
      ["serving", doc.serving ? "yes" : `no: ${doc.refusal}`],
      ["methods that may serve", (r.serve || []).join(", ") || "none"],
      ["research report", r.research ? "yes (never serves)" : "no"],
    ].map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? "n/a"))),
  );
  verdictMatrix(r);
  criteria(r);
  figures(r);
  $("json").textContent = JSON.stringify(r, null, 2);
}

function checkNames(report) {
  const names = [];
  for (const m of Object.values(report.methods || {})) {
    for (const c of Object.keys(m.checks || {})) if (!names.includes(c)) names.push(c);
  }
  return names;
}

function verdictMatrix(report) {
  const checks = checkNames(report);
  const rows = Object.entries(report.methods || {}).map(([name, m]) =>
    el(
      "tr",
      { "data-method": name },
      el("th", {}, name),
      ...checks.map((c) => {
        const e = (m.checks || {})[c];
        if (!e) return el("td", { class: "none" }, "—");
        return el(
          "td",
          { class: e.verdict, title: e.summary || "" },
          `${e.verdict} ${fmt(e.score)} ${e.comparison || "vs"} ${fmt(e.threshold)}${e.blocking === false ? " (not blocking)" : ""}`,
        );
      }),
      el("td", { class: `method-verdict ${m.verdict}` }, m.verdict),
    ),
  );
  $("matrix").replaceChildren(
    el("tr", {}, el("th", {}, "method"), ...checks.map((c) => el("th", {}, c)), el("th", {}, "verdict")),
    ...rows,
  );
}

function criteria(report) {
  const blocks = [];
  for (const [name, m] of Object.entries(report.methods || {})) {
    for (const [check, e] of Object.entries(m.checks || {})) {
      const list = (e.details && e.details.criteria) || { [check]: e };
      blocks.push(
        el(
          "details",
          {},
          el("summary", {}, `${name} · ${check}: ${e.verdict}`),
          el("p", {}, e.summary || ""),
          el(
            "table",
            { class: "criteria" },
            el("tr", {}, el("th", {}, "criterion"), el("th", {}, "score"), el("th", {}, "comparison"), el("th", {}, "threshold"), el("th", {}, "verdict")),
            ...Object.entries(list).map(([k, c]) =>
              el("tr", { class: c.verdict }, el("td", {}, k), el("td", {}, fmt(c.score)), el("td", {}, c.comparison || ""), el("td", {}, fmt(c.threshold)), el("td", {}, c.verdict)),
            ),
          ),
        ),
      );
    }
  }
  $("criteria").replaceChildren(...blocks);
}

function figures(report) {
  const rows = [];
  for (const [name, m] of Object.entries(report.methods || {})) {
    for (const [check, e] of Object.entries(m.checks || {})) {
      if (typeof e.score === "number" || typeof e.threshold === "number") {
        rows.push({ label: `${name} · ${check}`, score: e.score, threshold: e.threshold, verdict: e.verdict });
      }
    }
  }
  const out = [el("figure", {}, scoreChart(rows), el("figcaption", {}, "Each check's score (dot) against its threshold (tick); red: failed."))];
  out.push(...randomisationFigure(report), ...perturbationFigure(report));
  const inter = report.inter_method;
  if (inter && Array.isArray(inter.methods) && Array.isArray(inter.matrix) && inter.methods.length > 1) {
    out.push(el("figure", {}, heatmap(inter.methods, inter.matrix), el("figcaption", {}, "Agreement between methods (the report's inter-method matrix).")));
  }
  $("figures").replaceChildren(...out);
}

function withCheck(report, check) {
  return Object.entries(report.methods || {}).filter(([, m]) => m.checks && m.checks[check] && m.checks[check].details);
}

// Similarity to the trained model's maps as layers are randomised (cascading), with the limits.
function randomisationFigure(report) {
  const rows = withCheck(report, "randomisation").filter(([, m]) => m.checks.randomisation.details.cascading);
  if (!rows.length) return [];
  const layers = rows[0][1].checks.randomisation.details.layers || [];
  const series = rows.map(([name, m]) => ({ label: name, values: m.checks.randomisation.details.cascading.spearman_abs }));
  const criteria = rows[0][1].checks.randomisation.details.criteria || {};
  const limits = ["final", "top_layer"].filter((k) => criteria[k]).map((k) => ({ value: criteria[k].threshold, label: `${k} ${criteria[k].comparison} ${criteria[k].threshold}` }));
  const labels = layers.length === series[0].values.length ? layers : series[0].values.map((_, i) => String(i + 1));
  return [
    el("figure", { class: "randomisation" }, lineChart(series, labels, { limits, yLabel: "Spearman |a|" }),
      el("figcaption", {}, "Model randomisation: similarity to the trained model's maps as layers are randomised from the output (cascading); a map that depends on the weights falls.")),
  ];
}

// Perturbation curves: the model's output as the most (solid) or least (dashed) relevant parts go.
function perturbationFigure(report) {
  const rows = withCheck(report, "perturbation").filter(([, m]) => m.checks.perturbation.details.morf);
  if (!rows.length) return [];
  const first = rows[0][1].checks.perturbation.details;
  const strategy = first.strategy;
  const fractions = (first.fractions || []).map((f) => `${Math.round(100 * f)}%`);
  const series = rows.flatMap(([name, m]) => [
    { label: `${name} MoRF`, values: m.checks.perturbation.details.morf[strategy] || [] },
    { label: `${name} LeRF`, values: (m.checks.perturbation.details.lerf || {})[strategy] || [], dash: "5 4" },
  ]);
  return [
    el("figure", { class: "perturbation" }, lineChart(series, fractions, { yLabel: "logit" }),
      el("figcaption", {}, `Perturbation (${strategy}): the explained logit as a growing share of the ECG is removed, most relevant first (MoRF, solid) or least relevant first (LeRF, dashed).`)),
  ];
}

start().catch(fail);
