#!/usr/bin/env node
// A Node.js client of ecgx.v1.ExplanationService, its stubs generated from the .proto at run time.
//
//   node explain.js --server 127.0.0.1:50051 --model ecg --ecg beats.f32 \
//       [--version V] [--methods gradcam,saliency] [--target predicted|AF|164889003|3] \
//       [--attributions-out DIR] [--proto ../../proto/ecgx/v1/ecgx.proto]
//
// beats.f32: N median beats (12 x 600 at 500 Hz, mV), raw little-endian float32, C order, leads
// in the version's order (GetModel). Calls ListModels, GetModel, Predict and one Explain per
// method, and prints a JSON summary on stdout. A refused method (FAILED_PRECONDITION: its gate
// did not pass) is reported with its status code and message, not raised.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO = path.join(__dirname, '..', '..', 'proto', 'ecgx', 'v1', 'ecgx.proto');
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

// keepCase: field names as in the .proto (snake_case), like every other language's stubs.
function loadService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).ecgx.v1.ExplanationService;
}

// Tensor / Ecg payloads are packed little-endian float32; a Buffer need not be 4-byte aligned,
// so read it element by element rather than viewing its memory.
function decode(tensor) {
  const data = new Float32Array(tensor.data.length / 4);
  for (let i = 0; i < data.length; i++) data[i] = tensor.data.readFloatLE(4 * i);
  return { shape: tensor.shape.map(Number), data };
}

function rows(data, width) {
  const out = [];
  for (let i = 0; i < data.length; i += width) out.push(Array.from(data.subarray(i, i + width)));
  return out;
}

function target(spec) {
  if (spec === 'predicted') return { predicted: true };
  if (/^\d+$/.test(spec)) return spec.length > 3 ? { snomed_code: spec } : { index: Number(spec) };
  return { class_key: spec };
}

// Promise-returning unary call with a deadline.
function call(client, method, request, seconds = 120) {
  const deadline = new Date(Date.now() + seconds * 1000);
  return new Promise((resolve, reject) =>
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response))),
  );
}

function statusOf(err) {
  return { code: STATUS_NAMES[err.code] ?? String(err.code), code_number: err.code, message: err.details };
}

async function main() {
  const { values: opt } = parseArgs({
    options: {
      server: { type: 'string', default: '127.0.0.1:50051' },
      model: { type: 'string' },
      version: { type: 'string', default: '' },
      ecg: { type: 'string' },
      methods: { type: 'string', default: 'gradcam' },
      target: { type: 'string', default: 'predicted' },
      'attributions-out': { type: 'string' },
      proto: { type: 'string', default: DEFAULT_PROTO },
    },
  });
  if (!opt.model || !opt.ecg) throw new Error('--model and --ecg are required');

  const ExplanationService = loadService(opt.proto);
  const client = new ExplanationService(opt.server, grpc.credentials.createInsecure());
  try {
    const models = (await call(client, 'ListModels', {})).models;
    const info = await call(client, 'GetModel', { model: opt.model });
    const version = info.versions.find((v) => v.version === (opt.version || info.default_version));
    if (!version) throw new Error(`model ${opt.model} has no version ${opt.version || '(default)'}`);

    const [leadCount, samples] = version.input_shape.map(Number);
    const raw = fs.readFileSync(opt.ecg);
    const perEcg = leadCount * samples * 4;
    if (raw.length === 0 || raw.length % perEcg) {
      throw new Error(`${opt.ecg}: not a whole number of ${leadCount} x ${samples} float32 beats`);
    }
    const ecgs = [];
    for (let i = 0; i < raw.length; i += perEcg) {
      ecgs.push({
        leads: version.leads,
        sampling_rate_hz: version.sampling_rate_hz,
        units: 'MILLIVOLT',
        samples_per_lead: samples,
        samples: raw.subarray(i, i + perEcg),
        id: `beat-${i / perEcg}`,
      });
    }
    const request = { model: opt.model, version: opt.version, ecgs };

    const predicted = await call(client, 'Predict', request);
    const probabilities = decode(predicted.probabilities);

    const explanations = {};
    for (const method of opt.methods.split(',').filter(Boolean)) {
      try {
        const explainRequest = { ...request, methods: [method], targets: [target(opt.target)] };
        const r = await call(client, 'Explain', explainRequest);
        const attributions = r.attributions.map((a) => {
          const { shape, data } = decode(a.attribution);
          // Per-lead shares of |attribution|, recomputed here from the decoded tensor.
          const perLead = rows(data.map(Math.abs), shape[1]).map((lead) => lead.reduce((s, x) => s + x, 0));
          const total = perLead.reduce((s, x) => s + x, 0);
          return {
            ecg_index: a.ecg_index,
            target_class: a.target_class,
            shape,
            lead_relevance_share: a.lead_relevance_share,
            client_lead_share: perLead.map((x) => (total > 0 ? x / total : 0)),
            gate: { verdict: a.gate.verdict, servable: a.gate.servable, ungated: a.gate.ungated },
            effective_parameters: JSON.parse(a.effective_parameters_json || '{}'),
            data,
          };
        });
        if (opt['attributions-out']) {
          fs.mkdirSync(opt['attributions-out'], { recursive: true });
          const packed = Buffer.alloc(attributions.reduce((n, a) => n + a.data.length * 4, 0));
          let at = 0;
          for (const a of attributions) for (const x of a.data) at = packed.writeFloatLE(x, at);
          fs.writeFileSync(path.join(opt['attributions-out'], `${method}.f32`), packed);
        }
        explanations[method] = {
          version: r.version,
          package_sha256: r.package_sha256,
          gate_report_sha256: r.gate_report_sha256,
          onnxruntime_version: r.onnxruntime_version,
          providers: r.providers,
          research_mode: r.research_mode,
          attributions: attributions.map(({ data, ...rest }) => rest),
        };
      } catch (err) {
        if (err.code === undefined) throw err;
        explanations[method] = { error: statusOf(err) };
      }
    }

    const summary = {
      server: opt.server,
      models: models.map((m) => ({ name: m.name, default_version: m.default_version, versions: m.versions })),
      model: {
        name: info.name,
        default_version: info.default_version,
        versions: info.versions.map((v) => ({
          version: v.version,
          serving: v.serving,
          gate_verdict: v.gate_verdict,
          refusal_reason: v.refusal_reason,
          servable_methods: v.methods.filter((m) => m.servable).map((m) => m.method),
        })),
      },
      predict: {
        version: predicted.version,
        package_sha256: predicted.package_sha256,
        class_keys: predicted.class_keys,
        shape: probabilities.shape,
        probabilities: rows(probabilities.data, probabilities.shape[1]),
      },
      explain: explanations,
    };
    process.stdout.write(`${JSON.stringify(summary, null, 1)}\n`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const status = err.code !== undefined ? ` (${STATUS_NAMES[err.code] ?? err.code})` : '';
  process.stderr.write(`ecgx node client: ${err.details ?? err.message}${status}\n`);
  process.exitCode = 1;
});
