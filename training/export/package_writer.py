"""Write a model package: ONNX graphs for every method, shared weights, manifest.

A package folder holds

- ``weights.bin``: every parameter (BatchNorm folded), float32, one copy;
- one ONNX file per graph of the table ``graphs.GRAPHS`` (``forward``, ``gradient``,
  the backward graphs of the attribution methods), all reading their
  parameters from ``weights.bin`` as external data under the same names, so
  forward and backward parts share one set of weights;
- ``manifest.json``: format version, classes, leads, input shape and sampling
  rate, layer list, parameter table, graph signatures, files with SHA-256, opset,
  training metrics, where the model came from, the export's own parity check and
  the graphs it left out (``unavailable``);
- for a package exported from a training run, ``training_beats.sha256`` (the
  SHA-256 of every training-split beat, sorted) and ``training_ids.json`` (the
  split's record and patient ids), listed in ``files`` and described by the
  manifest's ``training_data``: the gate refuses validation data that overlaps
  them (``validation/leakage.py``).

Every graph is built and checked on ONNX Runtime on its own, against references
computed in PyTorch on the model rebuilt from the IR (``ir_torch.ir_module``) and,
for the forward pass and the gradient, on the model as given: each graph's
:class:`~ecgx.training.export.graphs.GraphSpec` names its check (``graph_checks.py``)
and its reference, which the manifest records under ``verification.reference``.

A graph that cannot be built for the model, or disagrees with its reference, is
left out and listed under ``unavailable`` with the methods that need it; the rest
of the package is written (with a logged warning). The forward pass and the
gradient are needed by every gradient method and by the gate: if either fails,
nothing is written (ExportError naming the check).

A model the export's IR cannot read (an LSTM, a GRU, a layer no front end maps: the source is
*partial*, ``source.PartialForward``) is written as a partial package: its forward graph is the model
itself as ONNX (the user's file, or torch.onnx's export of the module or program), checked against
the model as given like any forward graph, its float32 initialisers of weight-bearing nodes moved
to ``weights.bin`` (so the gate can randomise them, layer by layer); the manifest says
``"partial": {"reason": ...}`` and lists every other graph under ``unavailable`` with that reason.
The forward-only methods (occlusion, feature ablation, KernelSHAP, LIME, the random control) serve
from it; the incremental perturbation graphs are absent, so those methods run full forward passes.

The bytes are reproducible: the same model exports to the same graph files and
``weights.bin`` (constants are named by content, parameters laid out in layer
order); in the manifest only ``created`` (``SOURCE_DATE_EPOCH`` when set) and
``export_seconds`` differ between two exports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx.external_data_helper import set_external_data
from torch import nn

import ecgx
from ecgx.core.errors import InvalidArgument
from ecgx.core.package_reader import (
    MANIFEST_FILE,
    PACKAGE_FORMAT,
    REQUIRED_GRAPHS,
    TRAINING_BEATS_FILE,
    TRAINING_IDS_FILE,
    WEIGHTS_FILE,
    check_manifest,
    check_parameters,
    is_plain_name,
    sha256_file,
)
from ecgx.core.schema import BEAT_SAMPLES, CLASSES, LEADS, N_LEADS, R_PEAK_SAMPLE, SAMPLING_RATE_HZ
from ecgx.service.methods import METHOD_NAMES, methods_needing, required_graphs
from ecgx.training.export.graph_checks import LRP_CHECK_EPSILONS, References
from ecgx.training.export.graphs import GRAPHS, build_graph, references
from ecgx.training.export.ir import PARAMETERISED, ExportError, ModelIR
from ecgx.training.export.onnx_graphs import OPSET, param_names
from ecgx.training.export.parity import (
    MAX_OUTLIER_FRACTION,
    REL_TOL,
    describe_parity_failure,
    jsonable,
    parity,
    parity_ok,
)
from ecgx.training.export.source import ModelSource, from_module

log = logging.getLogger(__name__)

PACKAGE_VERSION = 1  # the reader (ecgx/core/package_reader.py) lists the versions it accepts
_ALIGN = 64
# Without these two graphs no package is written: every gradient method and the gate need the gradient.
ESSENTIAL_GRAPHS = REQUIRED_GRAPHS
DEFAULT_SAMPLES = 8
SAMPLE_SEED = 20261124
VERIFICATION_NOTES = [
    "guided_backprop, deconvolution, deeplift and lrp are checked against a plain-autograd reference "
    "(training/export/autograd_reference.py: custom autograd functions apply the method's rule on each "
    "ReLU's own edge, LRP's epsilon rule on each layer's, and max pooling passes the gradient to the "
    "window's first maximum). Captum is recorded beside it (checks '<graph>.captum', informative): its "
    "rules act through hooks on a ReLU's input tensor, so where that tensor also feeds another layer (a "
    "pre-activation residual block: the block input goes to a ReLU and to the addition) Captum changes "
    "the other path too; and its DeepLift applies its max-pool rule only to a max pool that does not "
    "read a ReLU's output. Differing from Captum there is expected and does not make a graph "
    "unavailable.",
    "Every graph is judged against a float64 run of the same computation (the rebuilt model, and the "
    "model as given, copied to float64: reference_precision says which), not against PyTorch's float32, "
    "which is itself off by float32 rounding (a ReLU input a few 1e-7 from zero flips sign). "
    "measured_error records, per check, the largest error the engine showed against it on any sample; "
    "a failing sample's record holds PyTorch's float32 run against float64 too (which side was off).",
    "A sample may disagree only for a recorded reason: near_max_pool_tie (the forward pass comes "
    "within float32 rounding of a tie that changes the gradient's path, so ONNX Runtime and PyTorch "
    "may legitimately route the gradient differently; ties between zeros after a ReLU do not count), "
    "near_relu_tie (a ReLU input within the measured float32 spread of zero, near_relu_ties), "
    "ill_conditioned (LRP-epsilon with a unit within a few epsilon of zero, where float32 rounding "
    "decides the multiplier), float32_spread (no tie found, but float32 itself does not pin the "
    "sample down: PyTorch's float32 run, or the float64 run of the input moved by one float32 "
    "rounding, is off against float64 too, and the engine is no further off than twice the worst of "
    "them), float32_arithmetic (on at most 2 samples nothing else explains, the package's own graph "
    "run in float64 equals the float64 reference to 1e-6 of its largest value: the graph is exact, "
    "ONNX Runtime's float32 rounding differs; graph_in_float64 records the figure). Each check lists "
    "its excused samples; excused_samples counts them.",
    "At least half of the samples must agree in every check: a construction error shows on every "
    "sample, rounding on a few.",
]


GraphBuilderFn = Callable[[ModelIR, str, str], onnx.ModelProto]


def export_package(
    model: nn.Module | ModelSource,
    out: Path | str,
    *,
    gradcam_layer: str | None = None,
    sample_inputs: np.ndarray | None = None,
    training_info: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    training_data: tuple[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
    graphs: Sequence[str] | None = None,
    graph_builder: GraphBuilderFn | None = None,
    check_data: Path | str | None = None,
    check_samples: int = DEFAULT_SAMPLES,
    partial: bool = True,
) -> Path:
    """Export ``model`` as a package folder ``out`` and return its path.

    ``model`` is a :class:`~ecgx.training.export.source.ModelSource` (any input form), or a
    PyTorch module (``from_module(model)``: the project's (12, 600) beat). The input
    shape (leads, samples), sampling rate and classes come from the source.

    ``gradcam_layer`` names the IR tensor GradCAM reads (default: the last
    convolutional block's output; a model without one exports without GradCAM).
    ``sample_inputs`` (B, leads, samples) are used for the parity check (default:
    :func:`default_sample_inputs`); ``check_data`` is a folder of ECGs to check with instead
    (:func:`check_data_inputs`: a dataset folder, or ``.npy`` arrays at the model's shape), of which
    ``check_samples`` are used (evenly spaced). ``training_info`` and ``source`` (provenance, merged
    over the source's own description) are recorded in the manifest. ``training_data``
    is the training split's fingerprint (:func:`ecgx.training.train.training_fingerprint`:
    the text of ``training_beats.sha256`` and the ids of ``training_ids.json``); without
    it the package records none.

    ``graphs`` exports only these graphs besides ``forward`` and ``gradient`` (always
    built): the others are listed as unavailable ("left out of this export").
    ``graph_builder(ir, name, gradcam_layer)`` replaces :func:`graphs.build_graph`
    (to wrap or post-process graphs; a graph it builds is checked like any other).

    A graph that cannot be built or fails its check is left out and listed in the
    manifest's ``unavailable`` with the reason and the methods that need it; raises
    :class:`ExportError` (nothing written) when ``forward`` or ``gradient`` fails.

    A model the IR cannot read is written as a partial package (the forward pass only, see the
    module docstring) unless ``partial`` is False: then the IR's refusal is raised.
    """
    from ecgx.core.outputs import PACKAGE, StagedOutput, check_output

    out = Path(out)
    check_output(out, PACKAGE, overwrite=overwrite)  # before the work, not after
    started = time.perf_counter()
    src = model if isinstance(model, ModelSource) else from_module(model, allow_partial=partial)
    classes = _classes(src)
    if check_data is not None:
        if sample_inputs is not None:
            raise ExportError("give sample_inputs or check_data, not both")
        sample_inputs, data_note = check_data_inputs(check_data, src.input_shape, check_samples)
    x, inputs_note = _sample_inputs(sample_inputs, src)
    if check_data is not None:
        inputs_note = data_note
    if src.partial is not None:
        if not partial:
            raise ExportError(f"{src.partial.reason} (partial packages refused: partial=False)")
        info = {"training_info": training_info, "source": source, "training_data": training_data}
        return _export_partial(src, out, classes, x, inputs_note, info, overwrite, started)
    ir = src.ir
    layer, no_layer = _pick_gradcam_layer(ir, gradcam_layer)
    names = _graph_names(graphs)
    gradcam_choice = None
    if any(
        GRAPHS[g].reads_layer for g in names
    ):  # only a package with GradCAM needs its layer to show something
        layer, gradcam_choice = _nondegenerate_gradcam_layer(ir, layer, gradcam_layer is not None, x)
    unavailable: dict[str, str] = {
        g: "left out of this export (export_package(graphs=...) did not ask for it)"
        for g in GRAPHS
        if g not in names
    }
    built = _build_graphs(ir, names, layer, no_layer, graph_builder or build_graph, unavailable)
    # The output rule (ecgx.core.outputs): built beside ``out``, renamed into place once the graphs
    # passed their check; an old package is removed only then, and only a package is replaced.
    with StagedOutput(out, PACKAGE, overwrite=overwrite) as tmp:
        params = _write_weights(tmp, ir, built)
        _write_graphs(tmp, built, params)
        checks = verify_package_graphs(tmp, src, ir, layer, x, list(built))
        for graph, reason in checks.pop("failed").items():
            (tmp / f"{graph}.onnx").unlink()
            del built[graph]
            unavailable[graph] = reason
        for graph, reason in unavailable.items():
            log.warning(
                "%s: graph %s is unavailable (%s): %s",
                out,
                graph,
                _refused_uses(graph),
                reason,
            )
        checks["sample_inputs"] = inputs_note
        extra = _write_training_data(tmp, training_data)
        files = [f"{g}.onnx" for g in built]
        provenance = jsonable({**src.description, **(source or {})})
        manifest = _manifest(
            ir, src, classes, layer, params, [*files, *extra], checks, training_info, provenance, tmp
        )
        manifest["unavailable"] = {
            g: {"reason": unavailable[g], "methods": methods_needing(g)} for g in GRAPHS if g in unavailable
        }
        if gradcam_choice is not None:
            manifest["gradcam_layer_choice"] = gradcam_choice
        if training_data is not None:
            manifest["training_data"] = _training_data_entry(training_data)
        check_manifest(manifest, tmp / MANIFEST_FILE)  # again, with ``unavailable``
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported package %s (%d graphs) in %.1f s", out, len(built), time.perf_counter() - started)
    return out


def _graph_names(graphs: Sequence[str] | None) -> list[str]:
    if graphs is None:
        return list(GRAPHS)
    wanted = [graphs] if isinstance(graphs, str) else list(graphs)
    unknown = [g for g in wanted if g not in GRAPHS]
    if unknown:
        raise ExportError(f"unknown graph(s) {unknown}; the graphs are {list(GRAPHS)}")
    return [g for g in GRAPHS if g in ESSENTIAL_GRAPHS or g in wanted]


def _build_graphs(
    ir: ModelIR,
    names: list[str],
    layer: str | None,
    no_layer: str | None,
    builder: GraphBuilderFn,
    unavailable: dict[str, str],
) -> dict[str, onnx.ModelProto]:
    """Each graph on its own; one that cannot be built is noted in ``unavailable``."""
    built: dict[str, onnx.ModelProto] = {}
    for name in names:
        if GRAPHS[name].reads_layer and layer is None:
            unavailable[name] = f"cannot be built: {no_layer}"
            continue
        try:
            built[name] = builder(ir, name, layer or "")
        except ExportError as e:
            if name in ESSENTIAL_GRAPHS:
                raise ExportError(
                    f"the {name} graph cannot be built, and every package needs it (package not written): {e}"
                ) from None
            unavailable[name] = f"cannot be built: {e}"
    return built


def _classes(src: ModelSource) -> list[dict[str, str]]:
    n = src.n_outputs
    if src.classes is None:
        if n != len(CLASSES):
            raise ExportError(
                f"the model has {n} outputs but no class list was given; the project's classes are "
                f"{len(CLASSES)} ({', '.join(c.key for c in CLASSES)}): give one class per output"
            )
        return [{"key": c.key, "code": c.code, "name": c.name} for c in CLASSES]
    classes = [dict(c) for c in src.classes]
    if len(classes) != n:
        raise ExportError(f"the model has {n} outputs, but {len(classes)} classes were given")
    return classes


def _leads(src: ModelSource) -> list[str]:
    n = src.input_shape[0]
    given = src.description.get("leads")
    if isinstance(given, (list, tuple)) and len(given) == n and all(isinstance(v, str) for v in given):
        return list(given)
    if n == N_LEADS:
        return list(LEADS)
    return [f"lead{i + 1}" for i in range(n)]


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


def _pick_gradcam_layer(ir: ModelIR, requested: str | None) -> tuple[str | None, str | None]:
    """(layer, None), or (None, why) when the model has no layer GradCAM can read."""
    candidates = ir.conv_outputs()
    if requested is not None:
        if requested not in candidates:
            raise ExportError(
                f"gradcam layer {requested!r} is not a convolutional block output; choose from {candidates}"
            )
        return requested, None
    if not candidates:
        return None, "the model has no convolution (or block) followed by a ReLU, which GradCAM reads"
    return candidates[-1], None


def gradcam_maps(ir: ModelIR, layer: str, x: np.ndarray) -> np.ndarray:
    """GradCAM's maps (B, L) at ``layer`` for each check ECG's target class (as the checks pick it):
    the ReLU of the activations weighted by their time-averaged gradients, on the rebuilt model."""
    from ecgx.training.export.ir_torch import ir_module
    from ecgx.training.export.reference import layer_activations_and_gradients

    module = ir_module(ir)
    target = np.arange(len(x)) % ir.n_outputs
    acts, grads = layer_activations_and_gradients(module, module.op_modules[layer], x, target)
    weights = grads.astype(np.float64).mean(axis=-1, keepdims=True)
    return np.maximum((weights * acts).sum(axis=1), 0.0)


def _constant_maps(maps: np.ndarray) -> bool:
    """Every map flat (to float32 rounding of the largest value): nothing for GradCAM to show."""
    scale = float(np.abs(maps).max())
    spread = maps.max(axis=-1) - maps.min(axis=-1)
    return bool((spread <= 1e-6 * scale).all()) if scale > 0 else True


def _nondegenerate_gradcam_layer(
    ir: ModelIR, layer: str | None, requested: bool, x: np.ndarray
) -> tuple[str | None, dict[str, Any] | None]:
    """The default GradCAM layer, or the last one before it whose maps are not constant on the check
    ECGs (Ribeiro's ResNet: the last ReLU, read only through flatten + linear, gives all-zero maps),
    with the record the manifest keeps of the choice. A layer the user named is kept as it is."""
    if layer is None or requested:
        return layer, None
    candidates = [c for c in ir.conv_outputs() if ir.op_producing(c).out_shape[-1] > 1]
    default_maps_constant = layer not in candidates or _constant_maps(gradcam_maps(ir, layer, x))
    if not default_maps_constant:
        return layer, None
    tried = [layer]
    for candidate in reversed(candidates[: candidates.index(layer)] if layer in candidates else candidates):
        tried.append(candidate)
        if not _constant_maps(gradcam_maps(ir, candidate, x)):
            note = (
                f"the default GradCAM layer {layer} gives constant maps on the {len(x)} check ECGs (nothing "
                f"to show); GradCAM reads {candidate}, the last convolutional layer with spatial extent "
                "whose maps vary"
            )
            log.warning("%s", note)
            return candidate, {"default": layer, "chosen": candidate, "reason": note}
    note = (
        f"GradCAM's maps are constant on the {len(x)} check ECGs at every convolutional layer tried "
        f"({', '.join(tried)}); GradCAM reads the default {layer}, and its maps will show nothing on "
        "ECGs like these"
    )
    log.warning("%s", note)
    return layer, {"default": layer, "chosen": layer, "reason": note}


def _write_weights(
    folder: Path, ir: ModelIR, graphs: dict[str, onnx.ModelProto]
) -> dict[str, dict[str, Any]]:
    """One copy of every parameter in weights.bin, in layer order; returns name -> {offset, length, shape}."""
    names = [n for op in ir.ops if op.kind in PARAMETERISED for n in param_names(op) if n]
    found: dict[str, np.ndarray] = {}
    for model in graphs.values():
        for init in model.graph.initializer:
            if init.name in names and init.name not in found:
                found[init.name] = onnx.numpy_helper.to_array(init)
    return _write_parameters(folder, {n: found[n] for n in names if n in found})


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


def default_sample_inputs(
    input_shape: tuple[int, int], sampling_rate_hz: float, n: int = DEFAULT_SAMPLES
) -> np.ndarray:
    """Deterministic synthetic ECGs (n, leads, samples) for the export's check.

    For the project's input (12 leads, 600 samples at 500 Hz) these are the synthetic
    generator's median beats. For any other shape they are built from the same beats:
    each beat is resampled (linear interpolation) from 500 Hz to the model's sampling rate,
    consecutive beats are joined in time until the model's length is filled (a rhythm
    strip; ECG ``i`` starts with beat ``i``), and leads are taken in the generator's order
    (repeated when the model has more than 12). Always the same for the same shape and rate.
    """
    from ecgx.training.data.synth import generate

    leads, samples = input_shape
    beats = generate(n, np.random.default_rng(SAMPLE_SEED)).signals  # (n, 12, 600) at 500 Hz
    if (leads, samples) == (N_LEADS, BEAT_SAMPLES) and float(sampling_rate_hz) == SAMPLING_RATE_HZ:
        return beats
    beat_len = max(2, round(BEAT_SAMPLES * float(sampling_rate_hz) / SAMPLING_RATE_HZ))
    src_t = np.arange(BEAT_SAMPLES) / SAMPLING_RATE_HZ
    new_t = np.arange(beat_len) / float(sampling_rate_hz)
    resampled = np.stack(
        [[np.interp(new_t, src_t, lead) for lead in beat] for beat in beats.astype(np.float64)]
    )  # (n, 12, beat_len)
    out = np.empty((n, leads, samples), np.float32)
    lead_order = np.arange(leads) % N_LEADS
    reps = -(-samples // beat_len)
    for i in range(n):
        strip = np.concatenate([resampled[(i + j) % n] for j in range(reps)], axis=1)
        out[i] = strip[lead_order, :samples]
    return out


def check_data_inputs(folder: Path | str, input_shape: tuple[int, int], n: int) -> tuple[np.ndarray, str]:
    """``n`` check ECGs (n, leads, samples) from ``folder``, evenly spaced over what it holds, and
    the manifest's note naming them.

    ``folder`` is a dataset folder (``ecgx.core.dataset``: median beats of 12 leads x 600 samples,
    for a model that takes them), or a folder of ``.npy`` files at the model's rate, each one ECG
    (leads, samples) or a stack of them (k, leads, samples), read in name order.
    """
    from ecgx.core.dataset import META_FILE, load_dataset

    folder = Path(folder)
    if not isinstance(n, int) or n < 1:
        raise ExportError(f"check_samples must be a whole number of ECGs of at least 1, got {n!r}")
    if not folder.is_dir():
        raise ExportError(f"check data {folder} is not a folder (a dataset folder, or .npy files of ECGs)")
    leads, samples = input_shape
    if (folder / META_FILE).is_file():
        ecgs = load_dataset(folder).signals
        kind = "dataset"
    else:
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise ExportError(
                f"check data {folder} holds neither a dataset ({META_FILE}) nor .npy files of ECGs "
                f"({leads} leads x {samples} samples at the model's rate)"
            )
        ecgs = np.concatenate([_npy_ecgs(f, input_shape) for f in files])
        kind = f"{len(files)} .npy file(s)"
    if ecgs.shape[1:] != (leads, samples):
        raise ExportError(
            f"check data {folder} holds ECGs of {ecgs.shape[1]} leads x {ecgs.shape[2]} samples; the model "
            f"takes {leads} x {samples}"
        )
    picked = np.unique(np.linspace(0, len(ecgs) - 1, min(n, len(ecgs))).round().astype(int))
    x = np.asarray(ecgs[picked], np.float32)
    return (
        x,
        f"{len(x)} of the {len(ecgs)} ECGs of {folder.resolve()} ({kind}), evenly spaced: {picked.tolist()}",
    )


def _npy_ecgs(path: Path, input_shape: tuple[int, int]) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ExportError(f"check data file {path} is not a NumPy array file: {e}") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != tuple(input_shape) or not np.issubdtype(a.dtype, np.floating):
        raise ExportError(
            f"check data file {path} holds a {a.dtype} array of shape {a.shape}; the model takes float "
            f"ECGs of shape ({input_shape[0]}, {input_shape[1]}) or a stack (k, {input_shape[0]}, "
            f"{input_shape[1]})"
        )
    return a


def _sample_inputs(sample_inputs: np.ndarray | None, src: ModelSource) -> tuple[np.ndarray, str]:
    leads, samples = src.input_shape
    if sample_inputs is not None:
        x = np.asarray(sample_inputs, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (leads, samples) or len(x) == 0:
            raise ExportError(f"sample_inputs must have shape (B, {leads}, {samples}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ExportError("sample_inputs hold NaN or infinite values")
        return x, "given"
    x = default_sample_inputs((leads, samples), src.sampling_rate_hz)
    if (leads, samples) == (N_LEADS, BEAT_SAMPLES) and src.sampling_rate_hz == SAMPLING_RATE_HZ:
        return x, f"{len(x)} synthetic beats (ecgx.training.data.synth.generate, seed {SAMPLE_SEED})"
    return x, (
        f"{len(x)} synthetic rhythm strips: the generator's beats (seed {SAMPLE_SEED}) resampled to "
        f"{src.sampling_rate_hz:g} Hz and joined to {samples} samples"
    )


def verify_package_graphs(
    folder: Path, src: ModelSource, ir: ModelIR, layer: str | None, x: np.ndarray, graphs: Sequence[str]
) -> dict[str, Any]:
    """Run each graph in ``folder`` on ONNX Runtime and compare it with its reference.

    Returns the verification record: ``checks`` (name -> figures, ``ok`` for binding
    checks, ``agrees`` for informative ones), ``near_ties``, ``excused_samples``, and
    ``failed`` (graph -> reason) for the graphs that disagree or whose check could not
    run. Raises :class:`ExportError` when ``forward`` or ``gradient`` fails.
    """
    try:
        refs = References(folder, src, ir, layer, x)
    except ExportError:
        raise
    except Exception as e:  # without the IR module no graph can be checked, the gradient included
        raise ExportError(
            f"the model cannot be rebuilt in PyTorch to check its graphs (package not written): "
            f"{type(e).__name__}: {e}"
        ) from None
    checks: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for graph in graphs:
        spec = GRAPHS.get(graph)
        try:
            if spec is None:
                raise _NoCheck(f"the export has no reference check for the {graph} graph")
            results = spec.check(refs, graph)
        except ExportError as e:
            if graph in ESSENTIAL_GRAPHS:
                raise
            # A reference that refuses the model's pattern: the graph cannot be checked, so not published.
            failed[graph] = f"its reference cannot run on this model: {e}"
            continue
        except Exception as e:  # ONNX Runtime, Captum and autograd raise many types
            reason = (
                str(e) if isinstance(e, _NoCheck) else f"its check could not run: {type(e).__name__}: {e}"
            )
            if graph in ESSENTIAL_GRAPHS:
                raise ExportError(f"the {graph} graph {reason} (package not written)") from None
            log.warning("export check of graph %s could not run", graph, exc_info=not isinstance(e, _NoCheck))
            failed[graph] = reason
            continue
        checks.update(results)
        bad = [describe_parity_failure(k, v) for k, v in results.items() if "ok" in v and not v["ok"]]
        if not bad:
            continue
        if graph in ESSENTIAL_GRAPHS:
            raise ExportError(
                f"the {graph} graph disagrees with its reference, and every package needs it (package not "
                "written): " + " | ".join(bad)
            )
        failed[graph] = "disagrees with its reference: " + " | ".join(bad)
    excused: dict[str, set[int]] = {}
    for c in checks.values():
        for reason, samples in (c.get("excused") or {}).items():
            excused.setdefault(reason, set()).update(samples)
    return {
        "samples": len(x),
        "lrp_epsilons": LRP_CHECK_EPSILONS,
        "checks": checks,
        "measured_error": measured_error(checks),
        "near_ties": refs.tie_report,
        "near_relu_ties": refs.relu_tie_report,
        "excused_samples": {k: len(v) for k, v in sorted(excused.items())},
        "failed": failed,
    }


def measured_error(checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per binding check: the largest relative error the engine measured against its reference on
    any sample (excused ones included), and the reference's precision (float64 unless the model as
    given cannot run in float64)."""
    return {
        name: {
            "max_rel_error": c["measured"]["max_rel_error"],
            "outlier_fraction": c["measured"]["outlier_fraction"],
            "reference_precision": c.get("reference_precision", "float32"),
        }
        for name, c in checks.items()
        if "ok" in c and "measured" in c
    }


class _NoCheck(Exception):
    """A graph the export cannot check (so it does not publish it)."""


def _refused_uses(graph: str) -> str:
    """What a missing graph costs, for the warning: the methods, or the lrp setting it serves."""
    if GRAPHS[graph].serves:
        return f"{GRAPHS[graph].serves} will be refused"
    methods = methods_needing(graph)
    if not methods:  # an optional speed-up (incremental perturbation): its users take the plain path
        return "no method needs it; methods that can use it run without it"
    return f"methods {', '.join(methods)} will be refused"


def _created() -> str:
    """UTC creation time: ``SOURCE_DATE_EPOCH`` (reproducible builds) when set, else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            when = int(epoch)
        except ValueError:
            raise ExportError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_LAYER_SETTINGS = (
    "kernel",
    "stride",
    "padding",
    "dilation",
    "groups",
    "ceil_mode",
    "count_include_pad",
)


def _manifest(
    ir: ModelIR,
    src: ModelSource,
    classes: list[dict[str, str]],
    layer: str | None,
    params: dict[str, dict[str, Any]],
    files: list[str],
    checks: dict[str, Any],
    training_info: dict[str, Any] | None,
    provenance: dict[str, Any],
    folder: Path,
) -> dict[str, Any]:
    layers = []
    for op in ir.ops:
        names = param_names(op) if op.kind in PARAMETERISED else (None, None)
        layers.append(
            {
                "name": op.name,
                "kind": op.kind,
                "inputs": list(op.inputs),
                "output": op.output,
                "in_shape": list(op.in_shape),
                "out_shape": list(op.out_shape),
                "parameters": [p for p in names if p],
                "folded_batchnorm": op.params.get("folded"),
                **jsonable({k: op.params[k] for k in _LAYER_SETTINGS if k in op.params}),
                # A convolution's kernel size is its weight's last dimension.
                **({"kernel": int(op.params["weight"].shape[-1])} if op.kind == "conv" else {}),
            }
        )
    # Every file the package uses is listed with its SHA-256 under a plain name, and the graphs
    # section names exactly the graph files written (the reader refuses anything else).
    all_files = [WEIGHTS_FILE, *files]
    if any(not is_plain_name(f) for f in all_files) or len(set(all_files)) != len(all_files):
        raise ExportError(f"package files must have distinct plain names, got {all_files}")
    written = [f.removesuffix(".onnx") for f in files if f.endswith(".onnx")]
    manifest = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        "ecgx_version": ecgx.__version__,
        "created": _created(),
        "opset": OPSET,
        "onnxruntime_version": ort.__version__,
        "classes": classes,
        "leads": _leads(src),
        "input": _input_entry(src),
        "output": {"name": "logits", "shape": [None, len(classes)], "activation": "sigmoid"},
        "graphs": {
            name: {"file": f"{name}.onnx", "inputs": list(spec.inputs), "outputs": list(spec.outputs)}
            for name, spec in GRAPHS.items()
            if name in written
        },
        "gradcam_layer": layer if any(GRAPHS[g].reads_layer for g in written) else None,
        "layers": layers,
        "parameters": params,
        "files": _files_table(folder, all_files),
        "verification": {
            "reference": references(module_given=isinstance(src.original, nn.Module)),
            "rel_tol": REL_TOL,
            "max_outlier_fraction": MAX_OUTLIER_FRACTION,
            **checks,
            "notes": VERIFICATION_NOTES,
        },
        "training": training_info or {},
        "source": provenance,
    }
    # The reader's own checks, so that writer and reader cannot drift apart: structure, and
    # parameters inside weights.bin with finite values (NaN weights would make every map NaN).
    check_manifest(manifest, folder / MANIFEST_FILE)
    check_parameters(params, (folder / WEIGHTS_FILE).read_bytes(), folder)
    return manifest


def _input_entry(src: ModelSource) -> dict[str, Any]:
    leads, samples = src.input_shape
    beat = (leads, samples) == (N_LEADS, BEAT_SAMPLES) and src.sampling_rate_hz == SAMPLING_RATE_HZ
    return {
        "name": "x",
        "shape": [None, leads, samples],
        "dtype": "float32",
        "units": "mV",
        "sampling_rate_hz": float(src.sampling_rate_hz),
        # Only the project's median beat is aligned on its R peak; any other input is a window
        # of signal, which the service cuts from a strip at the model's rate (service/ecg_input.py).
        "r_peak_sample": R_PEAK_SAMPLE if beat else None,
        "kind": "median_beat" if beat else "window",
    }


def _files_table(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in names}


# --------------------------------------------------------------------------- partial packages

# Inputs of an ONNX node that are its weights (the initialisers a partial package moves to
# weights.bin and the gate randomises), by operator. Other initialisers (running statistics,
# initial states, shapes, scalars) stay in the graph: randomising them is no test of the model.
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "LSTM": (1, 2, 3),
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
}


def _partial_layers(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The manifest's layers of a partial package's forward graph (one per node, in graph order, with
    the weights it owns) and those weights by name, in layer order. A bias added right after a
    MatMul is that MatMul's; a weight two nodes read belongs to the first."""
    inits = {
        i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 1
    }
    nodes = list(_nodes_in_order(model.graph))
    producer = {o: n.op_type for n in nodes for o in n.output}
    owned: dict[str, np.ndarray] = {}
    layers = []
    for index, node in enumerate(nodes):
        slots = _WEIGHT_INPUTS.get(node.op_type, ())
        if node.op_type == "Add" and any(producer.get(v) == "MatMul" for v in node.input):
            slots = (0, 1)
        names = [
            node.input[i]
            for i in slots
            if i < len(node.input) and node.input[i] in inits and node.input[i] not in owned
        ]
        for name in names:
            owned[name] = onnx.numpy_helper.to_array(inits[name])
        layers.append(
            {
                "name": node.name or f"{node.op_type}_{index}",
                "kind": f"onnx:{node.op_type}",
                "inputs": list(node.input),
                "output": node.output[0] if node.output else "",
                "parameters": names,
            }
        )
    return layers, owned


def _nodes_in_order(graph: onnx.GraphProto):
    """The graph's nodes in order, each subgraph's (a Loop's body: a forward graph run in chunks of
    its fixed batch) right after the node that holds it: the model's layers, wherever they sit."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes_in_order(attribute.g)
            for sub in attribute.graphs:
                yield from _nodes_in_order(sub)


def _write_parameters(folder: Path, found: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``found`` (name -> array, in the order given) in weights.bin, aligned; name -> {offset, length,
    shape}."""
    table: dict[str, dict[str, Any]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for name, value in found.items():
            pad = (-f.tell()) % _ALIGN
            f.write(b"\0" * pad)
            data = np.ascontiguousarray(value, dtype="<f4").tobytes()
            table[name] = {"offset": f.tell(), "length": len(data), "shape": list(value.shape)}
            f.write(data)
    return table


def _partial_unavailable(src: ModelSource) -> dict[str, str]:
    """Every graph but ``forward``, with why a partial package lacks it."""
    reason = src.partial.reason
    built_from_ir = (
        f"the model cannot be read into the export's IR, from which every graph but the forward pass "
        f"is built: {reason}"
    )
    no_autodiff = (
        "; plain gradients of the model's own ONNX graph would need an ONNX automatic "
        "differentiation the export does not have (a gradient graph from torch.onnx could not be "
        "checked by anything but the same PyTorch autograd it was traced from, and ONNX models given "
        "as files have no PyTorch side at all)"
    )
    speed_up = "; the perturbation methods run full forward passes instead"
    return {
        g: built_from_ir
        + (no_autodiff if g == "gradient" else "")
        + ("" if methods_needing(g) or GRAPHS[g].serves else speed_up)
        for g in GRAPHS
        if g != "forward"
    }


def _check_partial_forward(folder: Path, src: ModelSource, x: np.ndarray) -> dict[str, Any]:
    """The forward graph against the model as given (PyTorch, or the ONNX file on ONNX Runtime), with
    the criterion of every package's forward graph; ExportError (nothing written) when it fails."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / "forward.onnx"), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"x": x})[0]
    want = np.asarray(src.forward(x), np.float64)
    if got.shape != want.shape:
        raise ExportError(
            f"the forward graph returns logits of shape {got.shape}, the model {want.shape} (package not "
            "written)"
        )
    forward = parity(got, want)
    check = {**forward, "ok": parity_ok(forward), "reference_precision": "float32"}
    if not check["ok"]:
        raise ExportError(
            "the forward graph of the partial package disagrees with the model as given (package not "
            "written): " + describe_parity_failure("forward", check)
        )
    return {
        "samples": len(x),
        "checks": {"forward": check},
        "measured_error": measured_error({"forward": {**check, "measured": forward}}),
    }


def _export_partial(
    src: ModelSource,
    out: Path,
    classes: list[dict[str, str]],
    x: np.ndarray,
    inputs_note: str,
    info: dict[str, Any],
    overwrite: bool,
    started: float,
) -> Path:
    """Write the partial package of a model the IR cannot read (see the module docstring)."""
    from ecgx.core.outputs import PACKAGE, StagedOutput

    part = src.partial
    log.warning(
        "%s: PARTIAL PACKAGE, forward-only methods (occlusion, feature_ablation, kernel_shap, lime): %s",
        out,
        part.reason,
    )
    graph = onnx.ModelProto()
    graph.CopyFrom(part.model)
    layers, weights = _partial_layers(graph)
    unavailable = _partial_unavailable(src)
    with StagedOutput(out, PACKAGE, overwrite=overwrite) as tmp:
        params = _write_parameters(tmp, weights)
        _write_graphs(tmp, {"forward": graph}, params)
        checks = _check_partial_forward(tmp, src, x)
        checks["sample_inputs"] = inputs_note
        extra = _write_training_data(tmp, info["training_data"])
        files = [WEIGHTS_FILE, "forward.onnx", *extra]
        opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
        manifest = {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_VERSION,
            "ecgx_version": ecgx.__version__,
            "created": _created(),
            "opset": opset,
            "onnxruntime_version": ort.__version__,
            "partial": {
                "reason": part.reason,
                "blocked_by": part.blocked_by,
                "forward_graph": part.made_by,
                "methods": [m for m in METHOD_NAMES if not _unavailable_for(m, unavailable)],
            },
            "classes": classes,
            "leads": _leads(src),
            "input": _input_entry(src),
            "output": {"name": "logits", "shape": [None, len(classes)], "activation": "sigmoid"},
            "graphs": {"forward": {"file": "forward.onnx", "inputs": ["x"], "outputs": ["logits"]}},
            "gradcam_layer": None,
            "layers": layers,
            "parameters": params,
            "files": _files_table(tmp, files),
            "verification": {
                "reference": {"forward": GRAPHS["forward"].reference},
                "rel_tol": REL_TOL,
                "max_outlier_fraction": MAX_OUTLIER_FRACTION,
                **checks,
            },
            "training": info["training_info"] or {},
            "source": jsonable({**src.description, **(info["source"] or {})}),
            "unavailable": {
                g: {"reason": why, "methods": methods_needing(g)} for g, why in unavailable.items()
            },
        }
        if info["training_data"] is not None:
            manifest["training_data"] = _training_data_entry(info["training_data"])
        check_manifest(manifest, tmp / MANIFEST_FILE)
        check_parameters(params, (tmp / WEIGHTS_FILE).read_bytes(), tmp)
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported partial package %s (forward graph only) in %.1f s", out, time.perf_counter() - started)
    return out


def _unavailable_for(method: str, unavailable: dict[str, str]) -> bool:
    """Whether ``method`` (default settings) needs a graph in ``unavailable``."""
    return any(g in unavailable for g in required_graphs(method))


def export_checkpoint(checkpoint: Path | str, out: Path | str, **kwargs: Any) -> Path:
    """Export a training checkpoint (``ecgx export``), carrying its metrics into the manifest."""
    from ecgx.training.checkpoint import load_checkpoint

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
    from ecgx.training.train import TRAINING_BEATS_FILE as BEATS
    from ecgx.training.train import TRAINING_IDS_FILE as IDS

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
    from ecgx.core.dataset import dataset_fingerprint, load_dataset
    from ecgx.training.config import TrainConfig
    from ecgx.training.train import split_dataset, training_fingerprint

    ds = load_dataset(data["path"], check_values=False)
    if dataset_fingerprint(ds) != data.get("fingerprint"):
        raise InvalidArgument("it changed since training (another fingerprint)")
    cfg = TrainConfig(**{k: v for k, v in train_config.items() if k in TrainConfig.__dataclass_fields__})
    return training_fingerprint(ds, split_dataset(ds, cfg))
