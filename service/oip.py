"""The Open Inference Protocol (KServe v2, ``inference.GRPCInferenceService``) over a model repository.

Triton's and KServe's clients (``tritonclient.grpc``, KServe's ``InferenceGRPCClient``, grpcurl
with reflection) work against it unchanged. The generated code is Triton's
(``tritonclient.grpc.service_pb2``: package ``inference``, a superset of KServe v2); Triton's
extra RPCs (ModelConfig, ModelStatistics, repository and shared-memory control, streaming) are
not served and answer UNIMPLEMENTED.

Served: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelInfer.

ModelInfer
    input ``ecg``: FP32, shape ``[B, 12, 600]`` (``1 <= B <= max_batch``), median beats at 500 Hz
    in **millivolts**, lead order I, II, III, aVR, aVL, aVF, V1..V6 (the package's leads), as
    ``raw_input_contents`` (little-endian float32) or ``contents.fp32_contents``.
    outputs ``probabilities`` and ``logits``: FP32 ``[B, classes]`` (class order: the package's,
    also in the response parameter ``classes``); with the request parameter ``method`` also
    ``attribution``: FP32 ``[B, 12, 600]``. All outputs travel as ``raw_output_contents``;
    ``outputs`` in the request selects some of them (default: all).
    request parameters (all optional): ``method`` (an attribution method, e.g. ``"saliency"``),
    ``target`` (class key, SNOMED code, class index, or ``"predicted"``, the default: each ECG's
    most probable class), ``parameters`` (the method's settings as a JSON object text, e.g.
    ``'{"n_steps": 64}'``). ``priority`` and ``timeout`` (set by some clients) are ignored; any
    other name is INVALID_ARGUMENT.
    The method is served under the same gate as ``ecgx.v1``: a method the version's gate did not
    pass is FAILED_PRECONDITION naming its failed checks and scores (served, and marked
    ``ungated`` in the response parameters, only in research mode).
    response parameters: ``model_version``, ``package_sha256``, ``classes`` (JSON list of class
    keys); with a method also ``method``, ``targets`` (JSON list: the class index explained per
    ECG), ``gate_verdict``, ``gate_report_sha256``, ``policy_sha256`` and ``ungated``.

``model_version`` "" means the model's default version (the newest whose gate passed). Unknown
model, version, method or class: NOT_FOUND; a version that does not serve: FAILED_PRECONDITION;
bad input (shape, datatype, byte count, NaN/Inf, |x| > 50 mV, bad parameter): INVALID_ARGUMENT;
more ECGs than ``max_batch`` or a method setting over a cost cap: RESOURCE_EXHAUSTED. Nothing the
client sent is logged but names.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from ecgx.service.access import EXPLAIN, require_scope
from ecgx.service.calls import current_call, note_call
from ecgx.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ecgx.service.methods import get_method
from ecgx.service.repository import refusal_of_method
from ecgx.service.rpc import check_active, failure_status

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "ecgx"
PLATFORM = "onnxruntime_onnx"  # Triton's name for ONNX Runtime models
INPUT_NAME = "ecg"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LOGITS = "logits"
OUTPUT_ATTRIBUTION = "attribution"
PARAM_METHOD = "method"
PARAM_TARGET = "target"
PARAM_PARAMETERS = "parameters"
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
PREDICTED = "predicted"
DEFAULT_MAX_BATCH = 64


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("ecgx")
    except Exception:  # not installed (a bare checkout)
        return "0"


def _rpc(fn: Callable) -> Callable:
    """Typed service errors -> their gRPC status code; anything else -> INTERNAL, logged."""

    @functools.wraps(fn)
    def run(self: OipServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:
            code, message = failure_status(e, f"OIP {fn.__name__}")
        context.abort(code, message)  # raises

    return run


def _param_value(p: Any) -> Any:
    """The value of an ``InferParameter`` (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`ecgx.service.repository.ModelRepository`.

    Args:
        repository: the model repository (``models()``, ``versions()``, ``get()``).
        max_batch: the most ECGs one ModelInfer takes (RESOURCE_EXHAUSTED past it).
        admit: optional ``admit(context)`` context manager held while a ModelInfer computes, so
            OIP requests share the server's concurrency slots with ``ecgx.v1`` (it raises
            ResourceExhausted when the server is full).
    """

    def __init__(
        self,
        repository: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        admit: Callable[[grpc.ServicerContext], contextlib.AbstractContextManager] | None = None,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.repository = repository
        self.max_batch = max_batch
        self.admit = admit
        self.shutting_down = False

    def add_to_server(self, server: grpc.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)

    def shutdown(self) -> None:
        """ServerReady and ModelReady answer false from now on (call at SIGTERM)."""
        self.shutting_down = True

    # ------------------------------------------------------------------ health

    @_rpc
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip_pb.ServerLiveResponse(live=True)

    @_rpc
    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready when not shutting down and some model has a serving default version."""
        ready = not self.shutting_down and any(
            self.repository.default_version(m) is not None for m in self.repository.models()
        )
        return oip_pb.ServerReadyResponse(ready=ready)

    @_rpc
    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Whether the version ("" = default) serves; false (not an error) for an unknown one (as Triton)."""
        if self.shutting_down:
            return oip_pb.ModelReadyResponse(ready=False)
        try:
            self.repository.get(request.name, request.version or None)
        except (NotFound, FailedPrecondition):
            return oip_pb.ModelReadyResponse(ready=False)
        return oip_pb.ModelReadyResponse(ready=True)

    # ------------------------------------------------------------------ metadata

    @_rpc
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip_pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=["parameters"]
        )

    @_rpc
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Inputs, outputs and the serving versions of a model (of the named or default version)."""
        served = self.repository.get(request.name, request.version or None)
        package = served.engine.package
        leads, samples = package.input_shape
        classes = package.n_classes
        tm = oip_pb.ModelMetadataResponse.TensorMetadata
        return oip_pb.ModelMetadataResponse(
            name=served.model,
            versions=[v.version for v in self.repository.versions(served.model) if v.servable],
            platform=PLATFORM,
            inputs=[tm(name=INPUT_NAME, datatype="FP32", shape=[-1, leads, samples])],
            outputs=[
                tm(name=OUTPUT_PROBABILITIES, datatype="FP32", shape=[-1, classes]),
                tm(name=OUTPUT_LOGITS, datatype="FP32", shape=[-1, classes]),
                tm(name=OUTPUT_ATTRIBUTION, datatype="FP32", shape=[-1, leads, samples]),
            ],
        )

    # ------------------------------------------------------------------ inference

    @_rpc
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        served = self.repository.get(request.model_name, request.model_version or None)
        note_call(served)
        engine = served.engine
        method, target, params = self._parameters(request)
        x = self._input(request, engine)
        note_call(batch_size=len(x))
        gate = None
        if method is not None:
            impl = get_method(method)  # NotFound for an unknown method, before the gate
            note_call(methods=[method])  # a name the service knows, so logs and labels stay bounded
            # ModelInfer needs only "predict"; asking it for an attribution is explaining.
            call = current_call()
            require_scope(call.identity if call else None, EXPLAIN, "explain through ModelInfer")
            gate = served.method_gate(method)
            if not gate.servable:
                raise FailedPrecondition(refusal_of_method(served, gate))
            impl.check_params(params)  # unknown parameter names, before any pass
            # Every setting as it will run: defaults filled in and, for a stochastic method
            # without a seed, a seed drawn here and reported, so the answer can be reproduced.
            params = {**impl.parameters(), **params}
            if impl.stochastic and params.get("seed") is None:
                params["seed"] = secrets.randbelow(2**31)
        targets = None
        if method is not None and target != PREDICTED:
            targets = np.full(len(x), engine.class_index(target), dtype=np.int64)  # NotFound
        wanted = self._outputs(request, method is not None)
        with self.admit(context) if self.admit is not None else contextlib.nullcontext():
            check_active(context)
            outputs: dict[str, np.ndarray] = {}
            logits = None
            if method is not None:
                if targets is None:  # "predicted": each ECG's most probable class
                    logits = engine.logits(x)
                    targets = logits.argmax(axis=1).astype(np.int64)
                    check_active(context)
                t0 = time.perf_counter()
                with_logits = getattr(engine, "attribute_with_logits", None)
                if logits is None and with_logits is not None:
                    attribution, logits = with_logits(method, x, targets, **params)
                else:
                    attribution = engine.attribute(method, x, targets, **params)
                seconds = time.perf_counter() - t0
                outputs[OUTPUT_ATTRIBUTION] = attribution
            if OUTPUT_LOGITS in wanted or OUTPUT_PROBABILITIES in wanted:
                if logits is None:  # no attribution gave them: the forward graph, once
                    logits = engine.logits(x)
                logits = np.asarray(logits, dtype=np.float32)
                outputs[OUTPUT_LOGITS] = logits
                outputs[OUTPUT_PROBABILITIES] = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(
                    np.float32
                )
        response = oip_pb.ModelInferResponse(
            model_name=served.model, model_version=served.version, id=request.id
        )
        for name in wanted:
            a = np.ascontiguousarray(outputs[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=list(a.shape))
            response.raw_output_contents.append(a.tobytes())
        p = response.parameters
        p["model_version"].string_param = served.version
        p["package_sha256"].string_param = served.package_sha256 or ""
        p["classes"].string_param = json.dumps(list(engine.package.class_keys))
        if gate is not None:
            p[PARAM_METHOD].string_param = method
            p["targets"].string_param = json.dumps([int(t) for t in targets])
            p["gate_verdict"].string_param = gate.verdict
            p["gate_report_sha256"].string_param = served.report_sha256 or ""
            p["policy_sha256"].string_param = served.policy_sha256 or ""
            p["ungated"].bool_param = bool(gate.ungated)
            p["effective_parameters"].string_param = json.dumps(params, sort_keys=True)
            p["compute_seconds"].double_param = seconds
            p["onnxruntime_version"].string_param = ort.__version__
            p["providers"].string_param = json.dumps(engine.providers)
        return response

    def _parameters(self, request: Any) -> tuple[str | None, Any, dict[str, Any]]:
        """(method, target, method settings) from the request parameters."""
        values = {}
        for name, p in request.parameters.items():
            if name in IGNORED_PARAMETERS:
                continue
            if name not in (PARAM_METHOD, PARAM_TARGET, PARAM_PARAMETERS):
                raise InvalidArgument(
                    f"unknown request parameter {name!r}; this server takes {PARAM_METHOD!r}, "
                    f"{PARAM_TARGET!r} and {PARAM_PARAMETERS!r}"
                )
            values[name] = _param_value(p)
        method = values.get(PARAM_METHOD)
        if method is not None and (not isinstance(method, str) or not method):
            raise InvalidArgument(f"request parameter {PARAM_METHOD!r} must be a method name (a string)")
        if method is None:
            for name in (PARAM_TARGET, PARAM_PARAMETERS):
                if name in values:
                    raise InvalidArgument(
                        f"request parameter {name!r} needs {PARAM_METHOD!r} (an attribution method) too"
                    )
            return None, None, {}
        target = values.get(PARAM_TARGET, PREDICTED)
        if isinstance(target, (bool, float)) or target is None or target == "":
            raise InvalidArgument(
                f"request parameter {PARAM_TARGET!r} must be a class key, SNOMED code, index or "
                f"{PREDICTED!r}, got {target!r}"
            )
        if isinstance(target, str):
            target = target.strip()
        params: dict[str, Any] = {}
        text = values.get(PARAM_PARAMETERS)
        if text is not None:
            if not isinstance(text, str):
                raise InvalidArgument(f"request parameter {PARAM_PARAMETERS!r} must be a JSON object text")
            try:
                params = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidArgument(
                    f"request parameter {PARAM_PARAMETERS!r} is not valid JSON: {e}"
                ) from None
            if not isinstance(params, dict):
                raise InvalidArgument(
                    f"request parameter {PARAM_PARAMETERS!r} must be a JSON object "
                    f"(method settings by name), got {type(params).__name__}"
                )
        return method, target, params

    def _input(self, request: Any, engine: Any) -> np.ndarray:
        """The checked (B, 12, 600) float32 millivolt input."""
        leads, samples = engine.package.input_shape
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
            names = [i.name for i in request.inputs]
            raise InvalidArgument(
                f"ModelInfer takes exactly one input named {INPUT_NAME!r} (FP32 [batch, {leads}, {samples}], "
                f"millivolts), got {names}"
            )
        t = request.inputs[0]
        if t.datatype != "FP32":
            raise InvalidArgument(f"input {INPUT_NAME!r} must have datatype FP32, got {t.datatype!r}")
        shape = tuple(int(d) for d in t.shape)
        if len(shape) != 3 or shape[1:] != (leads, samples) or shape[0] < 0:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} must have shape [batch, {leads}, {samples}] (median beats at 500 Hz, "
                f"lead-major), got {list(shape)}"
            )
        batch = shape[0]
        if batch == 0:
            raise InvalidArgument(f"input {INPUT_NAME!r} holds no ECG (batch size 0)")
        if batch > self.max_batch:
            raise ResourceExhausted(
                f"input {INPUT_NAME!r} holds {batch} ECGs; this server takes at most {self.max_batch} "
                "per request: send them in several requests"
            )
        count = batch * leads * samples
        raw = list(request.raw_input_contents)
        typed = t.HasField("contents")
        if raw and typed:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} is given both as raw_input_contents and as contents; give one"
            )
        if raw:
            if len(raw) != 1:
                raise InvalidArgument(
                    f"raw_input_contents holds {len(raw)} entries for 1 input; give exactly one"
                )
            if len(raw[0]) != 4 * count:
                raise InvalidArgument(
                    f"input {INPUT_NAME!r}: raw_input_contents holds {len(raw[0])} bytes; shape "
                    f"{list(shape)} in FP32 needs {4 * count} (little-endian float32)"
                )
            x = np.frombuffer(raw[0], dtype="<f4").reshape(shape)
        elif typed:
            c = t.contents
            others = [
                f for f in ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                            "uint64_contents", "fp64_contents", "bytes_contents")
                if len(getattr(c, f))
            ]  # fmt: skip
            if others:
                raise InvalidArgument(
                    f"input {INPUT_NAME!r} is FP32: put its values in contents.fp32_contents, not {others}"
                )
            if len(c.fp32_contents) != count:
                raise InvalidArgument(
                    f"input {INPUT_NAME!r}: contents.fp32_contents holds {len(c.fp32_contents)} values; "
                    f"shape {list(shape)} needs {count}"
                )
            x = np.asarray(c.fp32_contents, dtype=np.float32).reshape(shape)
        else:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} has no data: give raw_input_contents or contents.fp32_contents"
            )
        return engine.check_inputs(x)

    @staticmethod
    def _outputs(request: Any, with_method: bool) -> list[str]:
        available = [OUTPUT_PROBABILITIES, OUTPUT_LOGITS] + ([OUTPUT_ATTRIBUTION] if with_method else [])
        if not request.outputs:
            return available
        wanted = []
        for o in request.outputs:
            if o.name == OUTPUT_ATTRIBUTION and not with_method:
                raise InvalidArgument(
                    f"output {OUTPUT_ATTRIBUTION!r} needs the request parameter {PARAM_METHOD!r} "
                    "(an attribution method, e.g. saliency)"
                )
            if o.name not in available:
                raise NotFound(f"unknown output {o.name!r}; this model has {', '.join(available)}")
            if o.name in wanted:
                raise InvalidArgument(f"output {o.name!r} is requested twice")
            wanted.append(o.name)
        return wanted


def shared_slots(
    explanation_servicer: Any,
) -> Callable[[grpc.ServicerContext], contextlib.AbstractContextManager]:
    """An ``admit`` for :class:`OipServicer` that takes the request slots of the ``ecgx.v1``
    servicer (``ecgx.service.server.ExplanationServicer``: ``_enter(context)`` waits in its bounded
    queue or raises ResourceExhausted; ``_slots`` is released after), so ``--max-concurrent``
    and ``--max-queued`` bound both protocols together."""

    @contextlib.contextmanager
    def admit(context: grpc.ServicerContext) -> Iterator[None]:
        acquired = explanation_servicer._enter(context)
        try:
            yield
        finally:
            if acquired:
                explanation_servicer._slots.release()

    return admit


def add_oip(server: grpc.Server, repository: Any, **kwargs: Any) -> OipServicer:
    """Register the Open Inference Protocol on ``server``; returns the servicer."""
    servicer = OipServicer(repository, **kwargs)
    servicer.add_to_server(server)
    return servicer


__all__ = ["SERVICE_NAME", "OipServicer", "add_oip", "shared_slots"]
