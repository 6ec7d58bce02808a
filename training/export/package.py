"""Write a model package: ONNX graphs for every method, shared weights, manifest.

A package folder holds

- ``weights.bin``: every parameter (BatchNorm folded), float32, one copy;
- one ONNX file per graph (``forward``, ``gradient``, ``guided_backprop``,
  ``deconvolution``, ``deeplift``, ``lrp``, ``gradcam``), all reading their
  parameters from ``weights.bin`` as external data under the same names, so
  forward and backward parts share one set of weights;
- ``manifest.json``: format version, classes, leads, input shape, layer list,
  parameter table, graph signatures, files with SHA-256, opset, training
  metrics, source checkpoint and the export's own parity check;
- for a package exported from a training run, ``training_beats.sha256`` (the
  SHA-256 of every training-split beat, sorted) and ``training_ids.json`` (the
  split's record and patient ids), listed in ``files`` and described by the
  manifest's ``training_data``: the gate refuses validation data that overlaps
  them (``validation/leakage.py``).

The export runs every graph on ONNX Runtime against the PyTorch reference
(Captum) and refuses to publish a package that disagrees.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
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
from service.methods.lrp import DEFAULT_EPSILON as DEFAULT_LRP_EPSILON
from service.package import (
    MANIFEST_FILE,
    PACKAGE_FORMAT,
    TRAINING_BEATS_FILE,
    TRAINING_IDS_FILE,
    WEIGHTS_FILE,
    check_manifest,
    check_parameters,
    is_plain_name,
    sha256_file,
)
from training.data.schema import BEAT_SAMPLES, CLASSES, LEADS, N_LEADS, R_PEAK_SAMPLE, SAMPLING_RATE_HZ
from training.export.ir import ExportError, ModelIR, trace_model
from training.export.onnx_graphs import GRAPH_SIGNATURES, OPSET, build_graphs, param_names
from training.export.reference import (
    captum_attribution,
    ill_conditioned_samples,
    layer_activations_and_gradients,
    near_tie_samples,
)

log = logging.getLogger(__name__)

PACKAGE_VERSION = 1  # the reader (service/package.py) lists the versions it accepts
_ALIGN = 64
# Parity criterion shared with the tests: relative error (to the reference's largest
# magnitude) above REL_TOL is tolerated on at most MAX_OUTLIER_FRACTION of elements
# (ReLU and max-pool near-ties flip masks for a few elements).
REL_TOL = 1e-4
MAX_OUTLIER_FRACTION = 1e-3
# LRP is checked at two epsilons. At the engine's default (1e-6, as Zennit's) the rule is
# ill-conditioned: a unit whose output lies within a few epsilon of zero amplifies the float32
# rounding of that output, so ONNX Runtime and PyTorch may both be right and still differ
# (``ill_conditioned_samples`` finds such samples; they are excused). At 1e-2 the same graph
# is well-conditioned on nearly every sample, which checks its construction element by element.
LRP_CHECK_EPSILONS = {"lrp": 1e-2, "lrp.default_epsilon": DEFAULT_LRP_EPSILON}


def parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Largest relative error (to the reference's largest magnitude) and fraction of
    elements above ``REL_TOL``."""
    scale = float(np.abs(ref).max()) or 1.0
    rel = np.abs(np.asarray(got, np.float64) - ref) / scale
    return {"max_rel_error": float(rel.max()), "outlier_fraction": float((rel > REL_TOL).mean())}


def parity_ok(p: dict[str, float]) -> bool:
    return p["outlier_fraction"] <= MAX_OUTLIER_FRACTION


def per_sample_parity(
    got: np.ndarray, ref: np.ndarray, excused: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Parity of each sample's map; a sample may disagree only for a reason in ``excused``.

    ``excused`` maps a reason (``"near_max_pool_tie"``, ``"ill_conditioned"``) to one bool
    per sample: samples whose map float32 arithmetic does not pin down, so two correct
    implementations may differ there. ``ok`` needs every disagreeing sample to be excused
    and at least half of the samples to agree: a construction error shows on every
    sample, rounding on a few. ``failing`` holds the figures of each unexcused sample.
    """
    results = [parity(g, r) for g, r in zip(got, ref, strict=True)]
    agree = np.array([parity_ok(r) for r in results])
    reasons = {k: np.asarray(v, bool) for k, v in (excused or {}).items()}
    any_excuse = np.zeros(len(results), bool)
    for flags in reasons.values():
        any_excuse |= flags
    unexplained = ~agree & ~any_excuse
    agreeing = [r for r, a in zip(results, agree, strict=True) if a]
    return {
        "samples": len(results),
        "agreeing": int(agree.sum()),
        "max_rel_error": max((r["max_rel_error"] for r in agreeing), default=None),
        "outlier_fraction": max((r["outlier_fraction"] for r in agreeing), default=None),
        "excused": {k: np.flatnonzero(~agree & v).tolist() for k, v in reasons.items()},
        "failing": [{"sample": int(i), **results[i]} for i in np.flatnonzero(unexplained)],
        "ok": bool(agree.sum() >= len(results) / 2 and not unexplained.any()),
    }


def describe_parity_failure(name: str, check: dict[str, Any]) -> str:
    """One line per failed check, with the failing samples' own figures."""
    if "failing" not in check:  # a whole-batch comparison (forward logits, summation)
        return (
            f"{name}: {check['outlier_fraction']:.2%} of values off by more than {REL_TOL:g} "
            f"of the largest magnitude (max {check['max_rel_error']:.2e})"
        )
    parts = [
        f"sample {f['sample']}: {f['outlier_fraction']:.2%} of elements off by more than {REL_TOL:g} of the "
        f"largest magnitude (max {f['max_rel_error']:.2e}; limit {MAX_OUTLIER_FRACTION:.1%} of elements)"
        for f in check["failing"]
    ]
    if check["agreeing"] < check["samples"] / 2:
        parts.append(f"only {check['agreeing']} of {check['samples']} samples agree")
    return f"{name}: " + "; ".join(parts)


def export_package(
    model: nn.Module,
    out: Path | str,
    *,
    gradcam_layer: str | None = None,
    sample_inputs: np.ndarray | None = None,
    training_info: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    training_data: tuple[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` as a package folder ``out`` and return its path.

    ``gradcam_layer`` names the IR tensor GradCAM reads (default: the last
    convolutional block's output). ``sample_inputs`` (B, 12, 600) are used for
    the parity check (default: synthetic beats from the project's generator).
    ``training_data`` is the training split's fingerprint
    (:func:`training.train.training_fingerprint`: the text of ``training_beats.sha256``
    and the ids of ``training_ids.json``); without it the package records none.
    """
    from ecgx.outputs import PACKAGE, StagedOutput, check_output

    out = Path(out)
    check_output(out, PACKAGE, overwrite=overwrite)  # before the work, not after
    started = time.perf_counter()
    model = model.eval()
    ir = trace_model(model)
    layer = _pick_gradcam_layer(ir, gradcam_layer)
    graphs = build_graphs(ir, (N_LEADS, BEAT_SAMPLES), layer)
    # The output rule (ecgx.outputs): built beside ``out``, renamed into place once the graphs
    # passed their check; an old package is removed only then, and only a package is replaced.
    with StagedOutput(out, PACKAGE, overwrite=overwrite) as tmp:
        params = _write_weights(tmp, graphs)
        files = _write_graphs(tmp, graphs, params)
        x = _sample_inputs(sample_inputs)
        checks = verify_package_graphs(tmp, model, ir, layer, x)
        extra = _write_training_data(tmp, training_data)
        manifest = _manifest(ir, layer, params, [*files, *extra], checks, training_info, source, tmp)
        if training_data is not None:
            manifest["training_data"] = _training_data_entry(training_data)
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported package %s (%d graphs) in %.1f s", out, len(graphs), time.perf_counter() - started)
    return out


def _write_training_data(folder: Path, training_data: tuple[str, dict[str, Any]] | None) -> list[str]:
    if training_data is None:
        return []
    beats, ids = training_data
    (folder / TRAINING_BEATS_FILE).write_text(beats)
    (folder / TRAINING_IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n")
    return [TRAINING_BEATS_FILE, TRAINING_IDS_FILE]


def _training_data_entry(training_data: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    beats, ids = training_data
    return {
        "beats_file": TRAINING_BEATS_FILE,
        "ids_file": TRAINING_IDS_FILE,
        "unique_beats": beats.count("\n"),
        "split_by": ids.get("split_by"),
        "record_ids": None if ids.get("record_ids") is None else len(ids["record_ids"]),
        "patient_ids": None if ids.get("patient_ids") is None else len(ids["patient_ids"]),
    }


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

    Each sample's map must agree (see ``per_sample_parity``). A sample whose forward
    pass sits within float rounding of a max-pool tie (``near_tie_samples``) may
    legitimately take another gradient path, and a sample with an LRP unit too close to
    zero for float32 (``ill_conditioned_samples``) another LRP multiplier: they may differ.
    """
    rng = np.random.default_rng(0)
    target = np.arange(len(x)) % len(CLASSES)
    seed = np.eye(len(CLASSES), dtype=np.float32)[target]
    baseline = (rng.normal(0, 0.05, x.shape)).astype(np.float32)
    ties = {"near_max_pool_tie": near_tie_samples(model, x)}
    with torch.no_grad():
        logits_ref = model(torch.from_numpy(x)).numpy()
    forward = parity(_session(folder, "forward").run(None, {"x": x})[0], logits_ref)
    checks: dict[str, dict[str, Any]] = {"forward": {**forward, "ok": parity_ok(forward)}}
    for graph in ("gradient", "guided_backprop", "deconvolution"):
        got = _session(folder, graph).run(None, {"x": x, "seed": seed})[1]
        checks[graph] = per_sample_parity(got, captum_attribution(model, graph, x, target), ties)
    checks.update(_verify_deeplift(folder, model, x, baseline, seed, target, ties))
    checks.update(_verify_lrp(folder, model, x, seed, target, ties))
    _, acts, grads = _session(folder, "gradcam").run(None, {"x": x, "seed": seed})
    module = dict(model.named_modules())[ir.op_producing(layer).name]
    acts_ref, grads_ref = layer_activations_and_gradients(model, module, x, target)
    checks["gradcam.activations"] = per_sample_parity(acts, acts_ref)
    checks["gradcam.gradients"] = per_sample_parity(grads, grads_ref, ties)
    failed = [describe_parity_failure(k, v) for k, v in checks.items() if not v["ok"]]
    if failed:
        raise ExportError(
            "exported graphs disagree with the PyTorch reference (Captum), package not written: "
            + " | ".join(failed)
        )
    return {"samples": len(x), "lrp_epsilons": LRP_CHECK_EPSILONS, "checks": checks}


def _verify_lrp(folder, model, x, seed, target, ties) -> dict[str, dict[str, Any]]:
    sess = _session(folder, "lrp")
    checks = {}
    for name, eps in LRP_CHECK_EPSILONS.items():
        got = sess.run(None, {"x": x, "seed": seed, "epsilon": np.array(eps, np.float32)})[1]
        ref = captum_attribution(model, "lrp", x, target, epsilon=eps)
        excused = {**ties, "ill_conditioned": ill_conditioned_samples(model, x, eps, REL_TOL)}
        checks[name] = {"epsilon": eps, **per_sample_parity(got, ref, excused)}
    return checks


def _verify_deeplift(folder, model, x, baseline, seed, target, ties) -> dict[str, dict[str, Any]]:
    sess = _session(folder, "deeplift")
    feeds = {"x": x, "baseline": baseline, "seed": seed}
    plain = sess.run(None, {**feeds, "maxpool_rescale": np.array(False)})[1]
    reference = captum_attribution(model, "deeplift", x, target, baseline=baseline)
    near_tie = ties["near_max_pool_tie"] | near_tie_samples(model, baseline)
    checks = {"deeplift": per_sample_parity(plain, reference, {"near_max_pool_tie": near_tie})}
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
    # Every file the package uses is listed with its SHA-256 under a plain name, and the graphs
    # section names exactly the graph files written (the reader refuses anything else).
    all_files = [WEIGHTS_FILE, *files]
    if any(not is_plain_name(f) for f in all_files) or len(set(all_files)) != len(all_files):
        raise ExportError(f"package files must have distinct plain names, got {all_files}")
    graph_files = {name: f"{name}.onnx" for name in GRAPH_SIGNATURES}
    if sorted(graph_files.values()) != sorted(f for f in files if f.endswith(".onnx")):
        raise ExportError(f"graphs written {sorted(files)} differ from the graph table {sorted(graph_files)}")
    manifest = {
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
            name: {"file": graph_files[name], "inputs": list(sig[0]), "outputs": list(sig[1])}
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
    # The reader's own checks, so that writer and reader cannot drift apart: structure, and
    # parameters inside weights.bin with finite values (NaN weights would make every map NaN).
    check_manifest(manifest, folder / MANIFEST_FILE)
    check_parameters(params, (folder / WEIGHTS_FILE).read_bytes(), folder)
    return manifest


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
    kwargs.setdefault("training_data", checkpoint_training_data(checkpoint, payload))
    return export_package(model, out, training_info=training_info, source=source, **kwargs)


def checkpoint_training_data(checkpoint: Path, payload: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The training split's fingerprint of a checkpoint: the files ``ecgx train`` wrote beside it,
    or, for a run trained before they existed, recomputed from the training dataset when it is
    still where the run says and unchanged (same fingerprint). None (logged) when neither is there:
    the package then records no training data and the gate can only warn."""
    from training.train import TRAINING_BEATS_FILE as BEATS
    from training.train import TRAINING_IDS_FILE as IDS

    folder = checkpoint.parent
    if (folder / BEATS).is_file() and (folder / IDS).is_file():
        return (folder / BEATS).read_text(), json.loads((folder / IDS).read_text())
    data = (payload.get("metrics") or {}).get("data") or {}
    try:
        return _recompute_training_data(data, payload.get("train_config") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning(
            "%s: no record of its training data (%s and %s are missing, and the dataset %s cannot be "
            "read again: %s); the package records none, so the gate cannot check validation data for "
            "overlap with it",
            checkpoint,
            BEATS,
            IDS,
            data.get("path"),
            e,
        )
        return None


def _recompute_training_data(
    data: dict[str, Any], train_config: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    from training.config import TrainConfig
    from training.data.dataset import dataset_fingerprint, load_dataset
    from training.train import split_dataset, training_fingerprint

    ds = load_dataset(data["path"], check_values=False)
    if dataset_fingerprint(ds) != data.get("fingerprint"):
        raise ValueError("it changed since training (another fingerprint)")
    cfg = TrainConfig(**{k: v for k, v in train_config.items() if k in TrainConfig.__dataclass_fields__})
    return training_fingerprint(ds, split_dataset(ds, cfg))
