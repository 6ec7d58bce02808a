"""Write a model package: ONNX graphs for every method, shared weights, manifest.

A package folder holds

- ``weights.bin``: every parameter (BatchNorm folded), float32, one copy;
- one ONNX file per graph (``forward``, ``gradient``, ``guided_backprop``,
  ``deconvolution``, ``deeplift``, ``lrp``, ``gradcam``), all reading their
  parameters from ``weights.bin`` as external data under the same names, so
  forward and backward parts share one set of weights;
- ``manifest.json``: format version, classes, leads, input shape, layer list,
  parameter table, graph signatures, files with SHA-256, opset, training
  metrics, source checkpoint and the export's own parity check.

The export runs every graph on ONNX Runtime against the PyTorch reference
(Captum) and refuses to publish a package that disagrees.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from onnx.external_data_helper import set_external_data
from torch import nn

import ecgx
from service.package import MANIFEST_FILE, PACKAGE_FORMAT, WEIGHTS_FILE, sha256_file
from training.data.schema import BEAT_SAMPLES, CLASSES, LEADS, N_LEADS, R_PEAK_SAMPLE, SAMPLING_RATE_HZ
from training.export.ir import ExportError, ModelIR, trace_model
from training.export.onnx_graphs import GRAPH_SIGNATURES, OPSET, build_graphs, param_names
from training.export.reference import captum_attribution, layer_activations_and_gradients, near_tie_samples

log = logging.getLogger(__name__)

PACKAGE_VERSION = 1  # the reader (service/package.py) lists the versions it accepts
_ALIGN = 64
# Parity criterion shared with the tests: relative error (to the reference's largest
# magnitude) above REL_TOL is tolerated on at most MAX_OUTLIER_FRACTION of elements
# (ReLU and max-pool near-ties flip masks for a few elements).
REL_TOL = 1e-4
MAX_OUTLIER_FRACTION = 1e-3
LRP_CHECK_EPSILON = 1e-6


def parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Largest relative error (to the reference's largest magnitude) and fraction of
    elements above ``REL_TOL``."""
    scale = float(np.abs(ref).max()) or 1.0
    rel = np.abs(np.asarray(got, np.float64) - ref) / scale
    return {"max_rel_error": float(rel.max()), "outlier_fraction": float((rel > REL_TOL).mean())}


def parity_ok(p: dict[str, float]) -> bool:
    return p["outlier_fraction"] <= MAX_OUTLIER_FRACTION


def per_sample_parity(got: np.ndarray, ref: np.ndarray, near_tie: np.ndarray) -> dict[str, Any]:
    """Parity of each sample's map; a sample may disagree only if it sits near a max-pool tie.

    ``ok`` needs every disagreeing sample to be near a tie and at least half of the
    samples to agree: a construction error shows on every sample, a tie on a few.
    """
    results = [parity(g, r) for g, r in zip(got, ref, strict=True)]
    agree = np.array([parity_ok(r) for r in results])
    unexplained = ~agree & ~near_tie
    summary = {
        "max_rel_error": max(
            (r["max_rel_error"] for r, a in zip(results, agree, strict=True) if a), default=None
        ),
        "outlier_fraction": max(
            (r["outlier_fraction"] for r, a in zip(results, agree, strict=True) if a), default=None
        ),
        "samples": len(results),
        "samples_off_near_tie": int((~agree & near_tie).sum()),
        "ok": bool(agree.sum() >= len(results) / 2 and not unexplained.any()),
    }
    if unexplained.any():
        summary["samples_off_unexplained"] = np.flatnonzero(unexplained).tolist()
    return summary


def export_package(
    model: nn.Module,
    out: Path | str,
    *,
    gradcam_layer: str | None = None,
    sample_inputs: np.ndarray | None = None,
    training_info: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` as a package folder ``out`` and return its path.

    ``gradcam_layer`` names the IR tensor GradCAM reads (default: the last
    convolutional block's output). ``sample_inputs`` (B, 12, 600) are used for
    the parity check (default: synthetic beats from the project's generator).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    started = time.perf_counter()
    model = model.eval()
    ir = trace_model(model)
    layer = _pick_gradcam_layer(ir, gradcam_layer)
    graphs = build_graphs(ir, (N_LEADS, BEAT_SAMPLES), layer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        params = _write_weights(tmp, graphs)
        files = _write_graphs(tmp, graphs, params)
        x = _sample_inputs(sample_inputs)
        checks = verify_package_graphs(tmp, model, ir, layer, x)
        manifest = _manifest(ir, layer, params, files, checks, training_info, source, tmp)
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a served package must be readable by the server user
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported package %s (%d graphs) in %.1f s", out, len(graphs), time.perf_counter() - started)
    return out


def _pick_gradcam_layer(ir: ModelIR, requested: str | None) -> str:
    candidates = ir.conv_outputs()
    if not candidates:
        raise ExportError("the model has no convolution followed by a ReLU, which GradCAM needs")
    if requested is None:
        return candidates[-1]
    if requested not in candidates:
        raise ExportError(
            f"gradcam layer {requested!r} is not a convolutional block output; choose from {candidates}"
        )
    return requested


def _write_weights(folder: Path, graphs: dict[str, onnx.ModelProto]) -> dict[str, dict[str, Any]]:
    """One copy of every parameter in weights.bin; returns name -> {offset, length, shape}."""
    arrays: dict[str, np.ndarray] = {}
    for model in graphs.values():
        for init in model.graph.initializer:
            if not init.name.startswith("const/") and init.name not in arrays:
                arrays[init.name] = onnx.numpy_helper.to_array(init)
    table: dict[str, dict[str, Any]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for name, arr in arrays.items():
            pad = (-f.tell()) % _ALIGN
            f.write(b"\0" * pad)
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            table[name] = {"offset": f.tell(), "length": len(data), "shape": list(arr.shape)}
            f.write(data)
    return table


def _write_graphs(folder: Path, graphs: dict[str, onnx.ModelProto], params: dict[str, dict]) -> list[str]:
    files = []
    for name, model in graphs.items():
        for init in model.graph.initializer:
            if init.name in params:
                entry = params[init.name]
                set_external_data(init, WEIGHTS_FILE, offset=entry["offset"], length=entry["length"])
                init.data_location = TensorProto.EXTERNAL
                init.ClearField("raw_data")
        path = folder / f"{name}.onnx"
        onnx.save_model(model, path)
        onnx.checker.check_model(str(path))
        files.append(path.name)
    return files


def _sample_inputs(sample_inputs: np.ndarray | None) -> np.ndarray:
    if sample_inputs is not None:
        x = np.asarray(sample_inputs, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (N_LEADS, BEAT_SAMPLES):
            raise ValueError(f"sample_inputs must have shape (B, {N_LEADS}, {BEAT_SAMPLES}), got {x.shape}")
        return x
    from training.data.synth import generate

    return generate(8, np.random.default_rng(20261124)).signals


def _session(folder: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])


def verify_package_graphs(
    folder: Path, model: nn.Module, ir: ModelIR, layer: str, x: np.ndarray
) -> dict[str, Any]:
    """Run every graph on ONNX Runtime and compare it with PyTorch/Captum; raise on a mismatch.

    Each sample's map must agree (see ``per_sample_parity``); a sample whose forward
    pass sits within float rounding of a max-pool tie (``near_tie_samples``) may
    legitimately take another gradient path and is allowed to differ.
    """
    rng = np.random.default_rng(0)
    target = np.arange(len(x)) % len(CLASSES)
    seed = np.eye(len(CLASSES), dtype=np.float32)[target]
    baseline = (rng.normal(0, 0.05, x.shape)).astype(np.float32)
    ties = near_tie_samples(model, x)
    with torch.no_grad():
        logits_ref = model(torch.from_numpy(x)).numpy()
    forward = parity(_session(folder, "forward").run(None, {"x": x})[0], logits_ref)
    checks: dict[str, dict[str, Any]] = {"forward": {**forward, "ok": parity_ok(forward)}}
    for graph in ("gradient", "guided_backprop", "deconvolution"):
        got = _session(folder, graph).run(None, {"x": x, "seed": seed})[1]
        checks[graph] = per_sample_parity(got, captum_attribution(model, graph, x, target), ties)
    checks.update(_verify_deeplift(folder, model, x, baseline, seed, target, ties))
    eps = np.array(LRP_CHECK_EPSILON, np.float32)
    got = _session(folder, "lrp").run(None, {"x": x, "seed": seed, "epsilon": eps})[1]
    ref = captum_attribution(model, "lrp", x, target, epsilon=LRP_CHECK_EPSILON)
    checks["lrp"] = per_sample_parity(got, ref, ties)
    _, acts, grads = _session(folder, "gradcam").run(None, {"x": x, "seed": seed})
    module = dict(model.named_modules())[ir.op_producing(layer).name]
    acts_ref, grads_ref = layer_activations_and_gradients(model, module, x, target)
    checks["gradcam.activations"] = per_sample_parity(acts, acts_ref, np.zeros(len(x), bool))
    checks["gradcam.gradients"] = per_sample_parity(grads, grads_ref, ties)
    failed = {k: v for k, v in checks.items() if not v["ok"]}
    if failed:
        raise ExportError(
            f"exported graphs disagree with the PyTorch reference, package not written: {failed}"
        )
    return {"samples": len(x), "near_max_pool_tie": np.flatnonzero(ties).tolist(), "checks": checks}


def _verify_deeplift(folder, model, x, baseline, seed, target, ties) -> dict[str, dict[str, Any]]:
    sess = _session(folder, "deeplift")
    feeds = {"x": x, "baseline": baseline, "seed": seed}
    plain = sess.run(None, {**feeds, "maxpool_rescale": np.array(False)})[1]
    reference = captum_attribution(model, "deeplift", x, target, baseline=baseline)
    checks = {"deeplift": per_sample_parity(plain, reference, ties | near_tie_samples(model, baseline))}
    # The rescale max-pool rule has no Captum counterpart; check DeepLIFT's summation-to-delta instead.
    logits, rescaled = sess.run(None, {**feeds, "maxpool_rescale": np.array(True)})
    logits_base = sess.run(None, {**feeds, "x": baseline, "maxpool_rescale": np.array(True)})[0]
    delta = (logits - logits_base)[np.arange(len(x)), target]
    summation = parity(rescaled.sum(axis=(1, 2)), delta)
    checks["deeplift.maxpool_rescale.summation"] = {**summation, "ok": parity_ok(summation)}
    return checks


def _manifest(ir, layer, params, files, checks, training_info, source, folder) -> dict[str, Any]:
    layers = []
    for op in ir.ops:
        w, b = param_names(op) if op.kind in ("conv", "linear") else (None, None)
        layers.append(
            {
                "name": op.name,
                "kind": op.kind,
                "inputs": list(op.inputs),
                "output": op.output,
                "in_shape": list(op.in_shape),
                "out_shape": list(op.out_shape),
                "parameters": [p for p in (w, b) if p],
                "folded_batchnorm": op.params.get("folded"),
                **({k: op.params[k] for k in ("stride", "padding", "dilation", "kernel") if k in op.params}),
            }
        )
    all_files = [WEIGHTS_FILE, *files]
    return {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        "ecgx_version": ecgx.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": OPSET,
        "onnxruntime_version": ort.__version__,
        "classes": [{"key": c.key, "code": c.code, "name": c.name} for c in CLASSES],
        "leads": list(LEADS),
        "input": {
            "name": "x",
            "shape": [None, N_LEADS, BEAT_SAMPLES],
            "dtype": "float32",
            "units": "mV",
            "sampling_rate_hz": SAMPLING_RATE_HZ,
            "r_peak_sample": R_PEAK_SAMPLE,
        },
        "output": {"name": "logits", "shape": [None, len(CLASSES)], "activation": "sigmoid"},
        "graphs": {
            name: {"file": f"{name}.onnx", "inputs": list(sig[0]), "outputs": list(sig[1])}
            for name, sig in GRAPH_SIGNATURES.items()
        },
        "gradcam_layer": layer,
        "layers": layers,
        "parameters": params,
        "files": {
            f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in all_files
        },
        "verification": {
            "reference": "captum",
            "rel_tol": REL_TOL,
            "max_outlier_fraction": MAX_OUTLIER_FRACTION,
            **checks,
        },
        "training": training_info or {},
        "source": source or {},
    }


def export_checkpoint(checkpoint: Path | str, out: Path | str, **kwargs: Any) -> Path:
    """Export a training checkpoint (``ecgx export``), carrying its metrics into the manifest."""
    from training.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    model, payload = load_checkpoint(checkpoint)
    metrics = payload.get("metrics", {})
    training_info = {
        "seed": payload.get("seed"),
        "model_config": payload.get("model_config"),
        "train_config": payload.get("train_config"),
        "test_auroc": {c["key"]: c["test_auroc"] for c in metrics.get("classes", [])},
        "data": metrics.get("data"),
        "split": metrics.get("split"),
    }
    source = {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)}
    return export_package(model, out, training_info=training_info, source=source, **kwargs)
