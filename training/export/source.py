"""What the export needs from a model, whatever form it arrived in.

A :class:`ModelSource` pairs the model's IR (what the ONNX graphs are built from)
with a way to run the model *as given* (what the IR's forward pass is checked
against) and the facts a package records: sampling rate, classes and where the
model came from. ``from_module`` makes one from a PyTorch module; the other
front ends (``input_forms.load_source``) make one from a factory plus weights, a
``torch.export`` program or a forward-only ONNX file.

A model the IR cannot read (a layer no front end maps: LSTM, GRU, indexing the last time step, an
unknown activation) still has a forward pass: :func:`partial_from_module`,
:func:`partial_from_program` and :func:`partial_from_onnx` make a source without an IR whose
:class:`PartialForward` holds the model itself as ONNX (the user's file, or torch.onnx's export of
the module or program) and the front end's refusal. The package writer then writes a *partial*
package: that forward graph, checked against the model as given, and every other graph
unavailable with that reason (issue #25).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ecgx.core.schema import BEAT_SAMPLES, N_LEADS, SAMPLING_RATE_HZ
from ecgx.training.export.fixed_batch import any_batch, fixed_batch
from ecgx.training.export.ir import ExportError, ModelIR
from ecgx.training.export.torch_frontend import trace_model


@dataclass
class ModelSource:
    """A model ready for export.

    ``forward`` runs the model as given on float32 ``(B, leads, samples)`` and returns
    ``(B, outputs)`` logits; ``original`` is that model when it is a PyTorch module
    (its autograd gradient is then checked as well). ``classes`` lists ``{key, code,
    name}`` per output; None means the project's nine classes (the model must then
    have nine outputs).
    """

    ir: ModelIR | None
    forward: Callable[[np.ndarray], np.ndarray]
    original: nn.Module | None = None
    sampling_rate_hz: float = float(SAMPLING_RATE_HZ)
    classes: list[dict[str, str]] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    # Set (and ``ir`` None) for a model the IR cannot read: its forward pass only.
    partial: PartialForward | None = None

    def __post_init__(self) -> None:
        if (self.ir is None) == (self.partial is None):
            raise ExportError("a model source has either an IR or a partial forward graph, not both")

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.ir.input_shape if self.ir is not None else self.partial.input_shape

    @property
    def n_outputs(self) -> int:
        return self.ir.n_outputs if self.ir is not None else self.partial.n_outputs


# The graph signature every package's forward graph has (graphs.GRAPHS["forward"]).
FORWARD_INPUT, FORWARD_OUTPUT = "x", "logits"
_BATCH_DEPENDENT = (
    "the logits of one ECG change with the other ECGs of its batch (batch statistics), so a served "
    "answer would depend on who else was asked"
)
# Recurrent layers: the IR and its gradient graphs have none (the refusal says so first).
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
_RECURRENT_ONNX = ("LSTM", "GRU", "RNN")


# Metadata key of a forward graph wrapped to run in chunks of the batch it was exported for.
FIXED_BATCH_KEY = "ecgx.fixed_batch"


@dataclass(frozen=True)
class PartialForward:
    """The forward pass of a model the IR cannot read.

    ``reason`` is why the IR could not be built (the front end's refusal, a recurrent layer named
    first); ``blocked_by`` the layer that stopped it as the refusal names it (``"lstm (LSTM)"``);
    ``model`` the forward graph (input ``x`` (batch, leads, samples) with a dynamic batch, output
    ``logits`` (batch, classes)); ``made_by`` how it was made, for the manifest.
    """

    reason: str
    blocked_by: str
    model: onnx.ModelProto
    made_by: str
    input_shape: tuple[int, int]
    n_outputs: int


def module_forward(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """``forward`` for a PyTorch module (eval mode, no gradient)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(torch.as_tensor(np.asarray(x, np.float32))).numpy()

    return run


def from_module(
    model: nn.Module,
    input_shape: tuple[int, int] | None = None,
    *,
    sampling_rate_hz: float | None = None,
    classes: list[dict[str, str]] | None = None,
    description: dict[str, Any] | None = None,
    allow_partial: bool = True,
) -> ModelSource:
    """A source for a PyTorch module; ``input_shape`` is (leads, samples), default the project's beat.

    A module the IR cannot read gives a partial source (its forward pass only, see
    :func:`trace_or_partial`) unless ``allow_partial`` is False: then the IR's refusal is raised."""
    if sampling_rate_hz is not None and not (np.isfinite(sampling_rate_hz) and sampling_rate_hz > 0):
        raise ExportError(f"the sampling rate must be a positive number of Hz, got {sampling_rate_hz}")
    shape = tuple(input_shape or (N_LEADS, BEAT_SAMPLES))
    ir, partial = trace_or_partial(model, shape, allow_partial)
    return ModelSource(
        ir=ir,
        forward=module_forward(model),
        original=model.eval(),
        sampling_rate_hz=float(sampling_rate_hz or SAMPLING_RATE_HZ),
        classes=classes,
        description=dict(description or {}),
        partial=partial,
    )


# --------------------------------------------------------------------------- partial sources


def trace_or_partial(
    model: nn.Module, shape: tuple[int, int], allow_partial: bool = True
) -> tuple[ModelIR | None, PartialForward | None]:
    """The module's IR, or (when the IR cannot read it and ``allow_partial``) its forward pass only."""
    try:
        return trace_model(model, shape), None
    except ExportError as e:
        if not allow_partial:
            raise refused(e, recurrent_in_module(model)) from None
        return None, partial_from_module(model, shape, e)


def refused(error: ExportError, recurrent: str | None) -> ExportError:
    """The IR's refusal when partial packages are refused, a recurrent layer named first."""
    if recurrent is None:
        return error
    return ExportError(f"{_partial_reason(str(error), recurrent)[0]} (partial packages refused)")


def recurrent_in_module(model: nn.Module) -> str | None:
    """The first recurrent layer of ``model`` as ``"name (LSTM)"``, or None."""
    found = (f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, _RECURRENT))
    return next(found, None)


def recurrent_in_onnx(model: onnx.ModelProto) -> str | None:
    """The first recurrent node of ``model`` as ``"name (LSTM)"``, or None."""
    found = (f"{n.name or n.op_type} ({n.op_type})" for n in model.graph.node if n.op_type in _RECURRENT_ONNX)
    return next(found, None)


def partial_from_module(model: nn.Module, shape: tuple[int, int], error: ExportError) -> PartialForward:
    """The forward pass of a module the IR refused with ``error``: torch.onnx's export of it.

    Raises ``error`` itself when the module cannot serve even a forward pass (it does not run on
    the shape, returns no (batch, classes) tensor, or gives two answers for one input), and an
    ExportError saying both why when the ONNX export fails."""
    model = model.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            first, second = model(x), model(x)
        except Exception:
            raise error from None
    if not (isinstance(first, torch.Tensor) and first.ndim == 2 and len(first) == 2):
        raise error from None
    if not torch.equal(first, second):
        raise error from None
    with torch.no_grad():
        alone = torch.cat([model(x[:1]), model(x[1:])])
    if not _rows_independent(first.numpy(), alone.numpy()):
        raise ExportError(f"{error}; nor can a forward-only package be written: {_BATCH_DEPENDENT}") from None
    reason, blocked = _partial_reason(str(error), recurrent_in_module(model))
    exported = _torch_onnx(model, shape, error)
    graph, n = forward_graph(exported, shape, FORWARD_INPUT, FORWARD_OUTPUT, error)
    made_by = _made_by("torch.onnx.export of the module (TorchScript exporter)", graph)
    return PartialForward(reason, blocked, graph, made_by, shape, n)


def partial_from_program(
    path: Path, input_length: int | None, error: ExportError
) -> tuple[PartialForward, nn.Module]:
    """The forward pass of a ``torch.export`` program the IR refused with ``error`` (torch.onnx's
    dynamo export of the program), and the program as a module (the forward graph's reference)."""
    from ecgx.training.export.program_import import (
        ProgramModule,
        _dynamic_batch,
        _input_shape,
        load_program,
    )

    ep, _ = load_program(path)
    gm = ep.module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise error
    batch, leads, length = _input_shape(path, placeholders[0], input_length)
    # A program exported for a fixed batch gives a forward graph fixed at it too: forward_graph runs
    # it in chunks of that batch (fixed_batch.any_batch), and the reference module likewise.
    fixed = None if _dynamic_batch(placeholders[0]) else int(batch)
    recurrent = next(
        (
            f"{n.name} ({str(n.target).split('.')[1].upper()})"
            for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).split(".")[1:2] in (["lstm"], ["gru"], ["rnn_tanh"])
        ),
        None,
    )
    reason, blocked = _partial_reason(str(error), recurrent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, dynamo=True, verbose=False, optimize=True)
    except Exception as e:  # onnxscript missing, an operator without an ONNX translation, ...
        raise ExportError(
            f"{error}; nor can a forward-only package be written: torch.onnx cannot export the program "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    exported = program.model_proto
    graph, n = forward_graph(
        exported, (leads, length), exported.graph.input[0].name, exported.graph.output[0].name, error
    )
    made_by = _made_by("torch.onnx.export of the program (dynamo exporter)", graph)
    part = PartialForward(reason, blocked, graph, made_by, (leads, length), n)
    return part, ProgramModule(gm, fixed_batch=fixed)


def partial_from_onnx(
    path: Path, model: onnx.ModelProto, shape: tuple[int, int], error: ExportError
) -> PartialForward:
    """The forward pass of an ONNX model the IR refused with ``error``: the model itself, its input
    renamed ``x`` and its output ``logits``, at ``shape`` (leads, samples) with a dynamic batch."""
    initialised = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initialised]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise error
    reason, blocked = _partial_reason(str(error), recurrent_in_onnx(model))
    graph, n = forward_graph(model, shape, inputs[0], model.graph.output[0].name, error)
    return PartialForward(
        reason, blocked, graph, _made_by(f"the ONNX model as given ({path.name})", graph), shape, n
    )


def _partial_reason(refusal: str, recurrent: str | None) -> tuple[str, str]:
    """(reason, blocked_by): the IR's refusal, a recurrent layer named first as the real cause."""
    if recurrent is not None:
        kind = recurrent.rsplit("(", 1)[-1].rstrip(")")
        return (
            f"layer {recurrent} is a recurrent layer: {kind} is not supported by the gradient graphs "
            f"(the export's IR has no recurrent layers): only forward-only methods (the IR's refusal: "
            f"{refusal})",
            recurrent,
        )
    layer = refusal.split("layer ", 1)[1].split(" is not supported", 1)[0] if "layer " in refusal else ""
    return f"the export's IR cannot read the model: {refusal}", layer or "the model"


def _torch_onnx(model: nn.Module, shape: tuple[int, int], error: ExportError) -> onnx.ModelProto:
    """The module as ONNX (TorchScript exporter, a dynamic batch axis, eval mode)."""
    from ecgx.training.export.ops.onnx_helpers import OPSET

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                copy.deepcopy(model).eval(),
                (torch.zeros(2, *shape),),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[FORWARD_INPUT],
                output_names=[FORWARD_OUTPUT],
                dynamic_axes={FORWARD_INPUT: {0: "batch"}, FORWARD_OUTPUT: {0: "batch"}},
            )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(
            f"{error}; nor can a forward-only package be written: torch.onnx cannot export the module "
            f"({type(e).__name__}: {first})"
        ) from None
    return onnx.load_model_from_string(buffer.getvalue())


def forward_graph(
    model: onnx.ModelProto, shape: tuple[int, int], input_name: str, output_name: str, error: ExportError
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with the forward graph's signature: input ``x`` (batch, leads, samples), a
    dynamic batch, output ``logits`` (batch, classes); and the number of classes, read from a run on
    ONNX Runtime with a batch of 3. A model declared with a fixed batch that does not run on another
    (a recurrent layer's initial state) is run in chunks of that batch (``fixed_batch.any_batch``).
    ExportError (``error`` and why) when it does not run so."""
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    g = graph.graph
    for old, new in ((input_name, FORWARD_INPUT), (output_name, FORWARD_OUTPUT)):
        if old != new:
            _rename(g, new, _fresh(g, new))  # a value already named ``x`` elsewhere
            _rename(g, old, new)
    del g.value_info[:]  # shapes recorded for another batch or length; ONNX Runtime infers them
    # Initialisers listed as graph inputs too (older exporters) would be inputs the engine must feed.
    initialised = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in initialised]
    del g.input[:]
    g.input.extend(inputs)
    inp = next(i for i in g.input if i.name == FORWARD_INPUT)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 3:
        raise error
    fixed = fixed_batch(graph, FORWARD_INPUT)
    dims[0].Clear()
    dims[0].dim_param = "batch"
    dims[1].dim_value, dims[2].dim_value = shape
    try:
        logits, alone = _run_batch_of_3(graph, shape)
    except Exception as e:
        if fixed is None:
            raise _not_runnable(error, shape, e) from None
        try:
            graph = any_batch(graph, FORWARD_INPUT, FORWARD_OUTPUT, fixed)
            onnx.helper.set_model_props(graph, {FIXED_BATCH_KEY: str(fixed)})
            g = graph.graph
            logits, alone = _run_batch_of_3(graph, shape)
        except Exception as e:
            raise _not_runnable(error, shape, e) from None
    if logits.ndim != 2 or len(logits) != 3:
        raise ExportError(
            f"{error}; nor can a forward-only package be written: its output has shape {logits.shape} "
            "for 3 ECGs, not (batch, classes)"
        )
    if not _rows_independent(logits, alone):
        raise ExportError(f"{error}; nor can a forward-only package be written: {_BATCH_DEPENDENT}")
    out = g.output[0].type.tensor_type.shape.dim
    del out[:]
    out.add().dim_param = "batch"
    out.add().dim_value = int(logits.shape[1])
    return graph, int(logits.shape[1])


def _run_batch_of_3(graph: onnx.ModelProto, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The logits of 3 ECGs of ``shape`` run together, and each run alone, on ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    x = (0.1 * np.random.default_rng(0).standard_normal((3, *shape))).astype(np.float32)
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run([FORWARD_OUTPUT], {FORWARD_INPUT: x})[0]
    alone = np.concatenate(
        [session.run([FORWARD_OUTPUT], {FORWARD_INPUT: x[i : i + 1]})[0] for i in range(3)]
    )
    return logits, alone


def _not_runnable(error: ExportError, shape: tuple[int, int], e: Exception) -> ExportError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return ExportError(
        f"{error}; nor can a forward-only package be written: its ONNX graph does not run on ONNX "
        f"Runtime with a batch of 3 ECGs of {shape[0]} leads x {shape[1]} samples ({type(e).__name__}: "
        f"{first}); export it with a dynamic batch axis"
    )


def _made_by(how: str, graph: onnx.ModelProto) -> str:
    """``how`` the forward graph was made, and that it runs in chunks when its batch is fixed."""
    fixed = {p.key: p.value for p in graph.metadata_props}.get(FIXED_BATCH_KEY)
    if fixed is None:
        return how
    return f"{how}, exported for a fixed batch of {fixed}: run in chunks of {fixed} ECGs (an ONNX Loop)"


def _rows_independent(batched: np.ndarray, alone: np.ndarray) -> bool:
    """Each ECG's logits in a batch equal its logits alone, to float32 rounding."""
    scale = float(np.abs(alone).max()) or 1.0
    return batched.shape == alone.shape and float(np.abs(batched - alone).max()) <= 1e-5 * scale


def _fresh(g: onnx.GraphProto, base: str) -> str:
    names = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.initializer}
    k = 1
    while f"{base}__{k}" in names:
        k += 1
    return f"{base}__{k}"


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value ``old`` everywhere in the main graph (node inputs and outputs, graph inputs,
    outputs and initialisers)."""
    for node in g.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*g.input, *g.output, *g.initializer):
        if value.name == old:
            value.name = new
