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
    ``attribution``: FP32 ``[B, 12, 600]`` (not in ModelMetadata, which lists what every request
    can ask for). All outputs travel as ``raw_output_contents``;
    ``outputs`` in the request selects some of them (default: all).
    request parameters (all optional): ``method`` (an attribution method, e.g. ``"saliency"``),
    ``target`` (class key, SNOMED code, class index, or ``"predicted"``, the default: each ECG's
    most probable class), ``parameters`` (the method's settings as a JSON object text, e.g.
    ``'{"n_steps": 64}'``). ``priority`` and ``timeout`` (set by some clients) are ignored; any
    other name is INVALID_ARGUMENT.
    The method is served by the same serving core as ``ecgx.v1`` (service/core.py): a method the
    version's gate did not pass, or settings its verdict does not cover (``lrp`` with another
    ``composite``), is FAILED_PRECONDITION naming the reason (served, and marked ``ungated`` in
    the response parameters, only in research mode); the same budgets, quotas and cancellation.
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

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from ecgx.core.errors import InvalidArgument
from ecgx.service import oip_codec as codec
from ecgx.service.calls import caller_of
from ecgx.service.core import ServingCore
from ecgx.service.requests import Quotas
from ecgx.service.rpc import cancel_token, failure_status

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
DEFAULT_MAX_BATCH = 64


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
    """``inference.GRPCInferenceService``: translates messages to the serving core's records and back.

    Args:
        repository: the model repository (``models()``, ``versions()``, ``get()``).
        max_batch: the most ECGs one ModelInfer takes, for a core made here.
        admit: the :class:`~ecgx.service.core.ServingCore` to share (``shared_slots``), so OIP
            requests take the same slots and quotas as ``ecgx.v1``; None: a core of its own.
    """

    def __init__(
        self, repository: Any, *, max_batch: int = DEFAULT_MAX_BATCH, admit: ServingCore | None = None
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidArgument(f"max_batch must be a positive integer, got {max_batch!r}")
        self.repository = repository
        self.core = admit or ServingCore(repository, quotas=Quotas(max_batch=max_batch))
        self.max_batch = self.core.max_batch
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
        return oip_pb.ServerReadyResponse(ready=codec.server_ready(self.core, self.shutting_down))

    @_rpc
    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = codec.model_ready(self.core, request.name, request.version or None, self.shutting_down)
        return oip_pb.ModelReadyResponse(ready=ready)

    # ------------------------------------------------------------------ metadata

    @_rpc
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip_pb.ServerMetadataResponse(
            name=codec.SERVER_NAME, version=codec.server_version(), extensions=["parameters"]
        )

    @_rpc
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Inputs, outputs and the serving versions of a model (of the named or default version)."""
        served = self.core.served(request.name, request.version or None)
        versions = [v.version for v in self.repository.versions(served.model) if v.servable]
        meta = codec.model_metadata(served, versions)
        tm = oip_pb.ModelMetadataResponse.TensorMetadata
        return oip_pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tm(**t) for t in meta["inputs"]],
            outputs=[tm(**t) for t in meta["outputs"]],
        )

    # ------------------------------------------------------------------ inference

    @_rpc
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        call = codec.parse_parameters({k: _param_value(p) for k, p in request.parameters.items()})
        x = self._input(request, call)
        wanted = codec.wanted_outputs([o.name for o in request.outputs], call)
        record = codec.core_request(
            request.model_name, request.model_version, x, call, caller_of(context), cancel_token(context)
        )
        result = self.core.explain(record) if call.method else self.core.predict(record)
        response = oip_pb.ModelInferResponse(
            model_name=result.facts.model, model_version=result.facts.version, id=request.id
        )
        for name, a in codec.outputs_of(result, wanted):
            response.outputs.add(name=name, datatype="FP32", shape=list(a.shape))
            response.raw_output_contents.append(a.tobytes())
        if codec.OUTPUT_FHIR in wanted:
            served = self.core.served(result.facts.model, result.facts.version)
            observations = codec.fhir_observations(result, served)
            response.outputs.add(name=codec.OUTPUT_FHIR, datatype="BYTES", shape=[len(observations)])
            response.raw_output_contents.append(codec.bytes_tensor(observations))
        for name, value in codec.response_parameters(result).items():
            _set_param(response.parameters[name], value)
        return response

    @staticmethod
    def _input(request: Any, call: codec.OipCall) -> Any:
        """The ``ecg`` tensor as an array of its declared shape (the core checks it for the model),
        or the ``ecg_document`` tensor's documents."""
        if len(request.inputs) != 1:
            names = [i.name[:80] for i in request.inputs[:10]]
            raise InvalidArgument(
                f"ModelInfer takes exactly one input named {codec.INPUT_NAME!r} (FP32 [batch, 12, 600], "
                f"millivolts), got {names}"
            )
        t = request.inputs[0]
        raw = list(request.raw_input_contents)
        if len(raw) > 1:
            raise InvalidArgument(f"raw_input_contents holds {len(raw)} entries for 1 input; give one")
        values = None
        if t.HasField("contents"):
            c = t.contents
            field = "bytes_contents" if t.name == codec.INPUT_DOCUMENT else "fp32_contents"
            others = [f.name for f, v in c.ListFields() if f.name != field and len(v)]
            if others:
                raise InvalidArgument(
                    f"input {t.name[:80]!r}: put its values in contents.{field}, not {others}"
                )
            values = getattr(c, field)
        raw_bytes = raw[0] if raw else None
        return codec.input_ecgs(t.name, t.datatype, list(t.shape), call, raw=raw_bytes, values=values)


def _set_param(p: Any, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, int):
        p.int64_param = value
    else:
        p.string_param = str(value)


def shared_slots(explanation_servicer: Any) -> ServingCore:
    """What :class:`OipServicer`'s ``admit`` takes to share the ``ecgx.v1`` servicer's serving core
    (its slots, queue, budgets and quotas): ``--max-concurrent`` and the quotas bound both protocols."""
    return explanation_servicer.core


def add_oip(server: grpc.Server, repository: Any, **kwargs: Any) -> OipServicer:
    """Register the Open Inference Protocol on ``server``; returns the servicer."""
    servicer = OipServicer(repository, **kwargs)
    servicer.add_to_server(server)
    return servicer


__all__ = ["SERVICE_NAME", "OipServicer", "add_oip", "shared_slots"]
