"""The gRPC explanation service (``ecgx.v1.ExplanationService``) over a model repository.

ListModels, GetModel, Predict, Explain and GetGateReport (proto/ecgx/v1/ecgx.proto). Every
error a handler raises is typed (:mod:`ecgx.service.errors`) and maps one to one onto a gRPC status
code; anything else is a bug, answered INTERNAL with a generic message and logged (without the
request: no waveform, no ECG id, ever reaches the log).

Per request the forward graph runs once (probabilities and the "predicted" targets); every
attribution call then gets explicit class indices, so the engine does not run it again.
Client deadlines and cancellations are checked between engine calls (one per method and
target slot): the work stops there with CANCELLED or DEADLINE_EXCEEDED.

Limits: at most ``max_batch`` ECGs per request; ``max_concurrent`` Predict/Explain requests
run at a time and up to ``max_queued`` more wait for a slot (at most ``QUEUE_WAIT_S`` or the
client's deadline); past that, RESOURCE_EXHAUSTED at once. The engine's cost caps per method
are RESOURCE_EXHAUSTED too, and a message may hold at most ``MAX_MESSAGE_BYTES``.

No PyTorch here (tested with torch made unimportable).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, NamedTuple

import grpc
import numpy as np
import onnxruntime as ort

from ecgx.service import errors
from ecgx.service.calls import CallInterceptor, CallObserver, EngineClock, note_call
from ecgx.service.ecg_input import ModelInput, decode_ecgs
from ecgx.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ecgx.service.health import Extras, register_extras
from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.service.repository import refusal_of_method
from ecgx.service.rpc import check_active, failure_status, status_of
from ecgx.service.security import ServerSecurity

try:
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a checkout that was never installed
    raise ImportError(
        f"the gRPC stubs are missing ({e}): they are generated when the package is installed "
        "(pip install -e .) or by `python -m ecgx.service.grpc_codegen`"
    ) from None

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_CONCURRENT = 8
DEFAULT_GRACE_S = 10.0
QUEUE_WAIT_S = 30.0  # the longest a request waits for a slot (or less: the client's deadline)
# 64 ECGs of 120 s rhythm strips at 500 Hz in float32 are ~18 MB; beats and attributions of a
# full response (64 ECGs x a few methods x targets) are ~29 kB each.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_TOP_K = 32  # bounded anyway by the number of classes
PROBABILITY_THRESHOLD = 0.5  # "all predicted": every class at or above it


def _handler(limited: bool = False) -> Callable:
    """Wrap an RPC handler: typed errors -> their status code, anything else -> INTERNAL (logged);
    ``limited`` handlers hold one of the ``max_concurrent`` request slots while they run."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self: ExplanationServicer, request: Any, context: grpc.ServicerContext) -> Any:
            code, message = None, None
            acquired = False
            try:
                if limited:
                    acquired = self._enter(context)
                return fn(self, request, context)
            except Exception as e:
                code, message = failure_status(e, fn.__name__)
            finally:
                if acquired:
                    self._slots.release()
            context.abort(code, message)  # raises; outside the try so it is not caught above

        return run

    return wrap


def _tensor(array: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), data=a.tobytes())


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def method_gate_message(gate: Any) -> pb.MethodGate:
    return pb.MethodGate(
        method=gate.method,
        servable=gate.servable,
        verdict=gate.verdict,
        ungated=gate.ungated,
        checks=[
            pb.CheckScore(
                check=c.check,
                score=_finite(c.score),
                threshold=_finite(c.threshold),
                verdict=c.verdict,
                blocking=c.blocking,
                summary=c.summary,
            )
            for c in gate.checks
        ],
    )


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


# Target kinds that need the model's probabilities before any attribution runs.
_NEEDS_PROBABILITIES = ("predicted", "top_k", "all_predicted")


class ExplanationServicer(pb_grpc.ExplanationServiceServicer):
    """``ecgx.v1.ExplanationService`` over a :class:`ecgx.service.repository.ModelRepository`."""

    def __init__(
        self,
        repository: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_queued: int | None = None,
        metrics: Any = None,
    ):
        max_queued = 4 * max_concurrent if max_queued is None else max_queued
        if max_batch < 1 or max_concurrent < 1 or max_queued < 0:
            raise InvalidArgument("max_batch and max_concurrent must be at least 1, max_queued at least 0")
        self.repository = repository
        self.max_batch = int(max_batch)
        self.max_concurrent = int(max_concurrent)
        self.max_queued = int(max_queued)
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self.metrics = metrics  # ecgx.service.metrics.ServiceMetrics or None: predictions, stability samples
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    def _enter(self, context: grpc.ServicerContext) -> bool:
        """Take a request slot, waiting in a bounded queue; ResourceExhausted when the queue is
        full or no slot frees in time, Cancelled/DeadlineExceeded when the client goes first."""
        if self._slots.acquire(blocking=False):
            return True
        with self._waiting_lock:
            if self._waiting >= self.max_queued:
                raise ResourceExhausted(
                    f"the server is busy: {self.max_concurrent} requests are running and {self._waiting} "
                    "waiting (--max-concurrent); retry with backoff"
                )
            self._waiting += 1
        try:
            give_up = time.monotonic() + QUEUE_WAIT_S
            while time.monotonic() < give_up:
                if self._slots.acquire(timeout=0.25):
                    return True
                check_active(context)
            raise ResourceExhausted(
                f"the server is busy: no request slot freed within {QUEUE_WAIT_S:g} s (--max-concurrent); "
                "retry with backoff"
            )
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    # ------------------------------------------------------------------ models

    @_handler()
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        out = []
        for name in self.repository.models():
            default = self.repository.default_version(name)
            out.append(
                pb.ModelSummary(
                    name=name,
                    default_version=default.version if default is not None else "",
                    versions=[v.version for v in self.repository.versions(name)],
                )
            )
        return pb.ListModelsResponse(models=out)

    @_handler()
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        model = _name("model", request.model)
        versions = self.repository.versions(model)
        note_call(model=model)
        default = self.repository.default_version(model)
        return pb.ModelInfo(
            name=model,
            default_version=default.version if default is not None else "",
            versions=[self._version_info(v) for v in versions],
        )

    def _version_info(self, served: Any) -> pb.VersionInfo:
        info = pb.VersionInfo(
            version=served.version,
            serving=served.servable,
            refusal_reason=served.refusal or "",
            package_sha256=served.package_sha256 or "",
            gate_report_sha256=served.report_sha256 or "",
            policy_sha256=served.policy_sha256 or "",
            ungated=bool(getattr(served, "ungated", False)),
        )
        report = served.report or {}
        info.gate_verdict = str(report.get("verdict") or "")
        info.gate_headline = str(report.get("headline") or "")
        package = served.engine.package if served.engine is not None else getattr(served, "package", None)
        if package is not None:
            manifest = package.manifest
            info.classes.extend(
                pb.ClassInfo(key=c["key"], snomed_code=str(c.get("code", "")), name=str(c.get("name", "")))
                for c in manifest["classes"]
            )
            info.leads.extend(package.leads)
            info.input_shape.extend(package.input_shape)
            rate = manifest.get("input", {}).get("sampling_rate_hz", 500)
            info.sampling_rate_hz = float(rate) if isinstance(rate, (int, float)) else 500.0
        if served.report is not None:
            info.methods.extend(method_gate_message(served.method_gate(m)) for m in METHOD_NAMES)
        return info

    @_handler()
    def GetGateReport(self, request: pb.GetGateReportRequest, context: grpc.ServicerContext) -> pb.GateReport:
        model = _name("model", request.model)
        versions = self.repository.versions(model)
        note_call(model=model)
        if request.version:
            match = [v for v in versions if v.version == request.version]
            if not match:
                known = ", ".join(v.version for v in versions) or "none"
                raise NotFound(f"model {model!r} has no version {request.version!r}; it has {known}")
            served = match[0]
        else:
            served = self.repository.default_version(model)
            if served is None:
                raise FailedPrecondition(f"model {model!r} has no serving version; name one")
        note_call(served)
        if served.report_bytes is None:
            raise NotFound(
                f"{model} version {served.version} has no verified gate report: {served.refusal or 'none'}"
            )
        return pb.GateReport(
            model=model,
            version=served.version,
            report_json=served.report_bytes,
            sha256=served.report_sha256 or "",
            verdict=str((served.report or {}).get("verdict") or ""),
        )

    # ------------------------------------------------------------------ predict, explain

    def _beats(self, served: Any, ecgs: Sequence[Any]) -> np.ndarray:
        """The request's ECGs as checked (B, leads, samples) float32 mV inputs for ``served``'s model."""
        engine = served.engine
        spec = ModelInput.of_manifest(engine.package.manifest)
        beats, _ = decode_ecgs(ecgs, engine.package.leads, spec, max_batch=self.max_batch)
        return engine.check_inputs(beats)

    @_handler(limited=True)
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        served = self.repository.get(_name("model", request.model), request.version or None)
        note_call(served, batch_size=len(request.ecgs))
        x = self._beats(served, request.ecgs)
        with EngineClock() as clock:
            logits = served.engine.logits(x)
        note_call(served, engine_s=clock.seconds)
        if self.metrics is not None:
            self.metrics.predicted(served, sigmoid(logits))
        return pb.PredictResponse(
            model=served.model,
            version=served.version,
            package_sha256=served.package_sha256 or "",
            class_keys=served.engine.package.class_keys,
            probabilities=_tensor(sigmoid(logits)),
            logits=_tensor(logits),
            beats=_tensor(x),
            research_mode=bool(getattr(served, "ungated", False)),
        )

    @_handler(limited=True)
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        started = time.perf_counter()
        methods = self._methods(request)
        note_call(None, methods=methods, batch_size=len(request.ecgs))
        params = self._parameters(request, methods)
        served = self.repository.get(_name("model", request.model), request.version or None)
        note_call(served)
        gates = {}
        for m in methods:
            gate = served.method_gate(m)
            if not gate.servable:
                raise FailedPrecondition(refusal_of_method(served, gate))
            if not gate.ungated and not _gated_rule(m, params[m]):
                if not served.allow_ungated:
                    raise FailedPrecondition(_ungated_rule_refusal(m, params[m], served))
                gate = dataclasses.replace(gate, ungated=True)
            gates[m] = gate
        engine = served.engine
        x = self._beats(served, request.ecgs)
        # The forward graph runs at most once: first, when targets depend on the prediction; else
        # the logits come from an attribution's backward pass over all ECGs when one gives them,
        # and from the forward graph at the end otherwise.
        needs = not request.targets or any(
            t.WhichOneof("kind") in _NEEDS_PROBABILITIES for t in request.targets
        )
        clock = EngineClock()
        with clock:
            logits = engine.logits(x) if needs else None
        targets = self._targets(request.targets, x, engine, logits)
        note_call(served, targets=sorted({engine.package.class_keys[c] for t in targets for c in t}))
        effective = {m: self._effective(m, params[m]) for m in methods}
        self._check_response_size(x, targets, methods)
        # Attribution slots: slot j holds the j-th target of every ECG that has one.
        slots = max(len(t) for t in targets)
        results: dict[tuple[int, str, int], tuple[np.ndarray, float]] = {}
        for m in methods:
            for j in range(slots):
                check_active(context)
                rows = [i for i, t in enumerate(targets) if len(t) > j]
                cls = np.array([targets[i][j] for i in rows], dtype=np.int64)
                every = len(rows) == len(x)
                t0 = time.perf_counter()
                with clock:
                    maps, got = engine.attribute_with_logits(m, x if every else x[rows], cls, **effective[m])
                share = (time.perf_counter() - t0) / len(rows)
                if self.metrics is not None:  # hands a sample to the stability worker; never waits
                    self.metrics.explained(served, m, effective[m], x if every else x[rows], cls, maps)
                if logits is None and every and got is not None:
                    logits = got
                for k, i in enumerate(rows):
                    results[(i, m, j)] = (maps[k], share)
        if logits is None:
            with clock:
                logits = engine.logits(x)
        note_call(served, engine_s=clock.seconds)
        if self.metrics is not None:
            self.metrics.predicted(served, sigmoid(logits))
        keys = engine.package.class_keys
        out = []
        for i, t in enumerate(targets):
            for m in methods:
                for j, c in enumerate(t):
                    a, seconds = results[(i, m, j)]
                    out.append(
                        pb.Attribution(
                            ecg_index=i,
                            method=m,
                            target_class=keys[c],
                            attribution=_tensor(a),
                            lead_relevance_share=lead_shares(a).tolist(),
                            effective_parameters_json=json.dumps(effective[m], sort_keys=True),
                            gate=method_gate_message(gates[m]),
                            compute_seconds=seconds,
                        )
                    )
        return pb.ExplainResponse(
            model=served.model,
            version=served.version,
            package_sha256=served.package_sha256 or "",
            gate_report_sha256=served.report_sha256 or "",
            policy_sha256=served.policy_sha256 or "",
            onnxruntime_version=ort.__version__,
            providers=engine.session("forward").get_providers(),
            class_keys=keys,
            probabilities=_tensor(sigmoid(logits)),
            beats=_tensor(x),
            attributions=out,
            compute_seconds=time.perf_counter() - started,
            research_mode=bool(getattr(served, "ungated", False)) or any(g.ungated for g in gates.values()),
        )

    def _check_response_size(self, x: np.ndarray, targets: list[list[int]], methods: list[str]) -> None:
        """Refuse, before any attribution runs, a response that could not be sent."""
        n = sum(len(t) for t in targets) * len(methods)
        size = (n + len(x)) * x[0].nbytes + 1024 * (n + len(x))  # maps, beats, per-entry fields
        if size > self.max_message_bytes:
            raise ResourceExhausted(
                f"the response would hold {n} attributions ({size / 2**20:.0f} MiB), over the "
                f"{self.max_message_bytes / 2**20:.0f} MiB message limit: ask for fewer ECGs, methods or "
                "targets per request"
            )

    def _methods(self, request: pb.ExplainRequest) -> list[str]:
        methods = list(request.methods)
        if not methods:
            raise InvalidArgument(f"give at least one method; known: {', '.join(METHOD_NAMES)}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise InvalidArgument(f"method(s) {twice} named more than once")
        for m in methods:
            get_method(m)  # NotFound for an unknown name
        return methods

    def _parameters(self, request: pb.ExplainRequest, methods: list[str]) -> dict[str, dict[str, Any]]:
        extra = sorted(set(request.parameters_json) - set(methods))
        if extra:
            raise InvalidArgument(
                f"parameters_json names method(s) {extra} that the request does not ask for"
            )
        out = {}
        for m in methods:
            text = request.parameters_json.get(m, "") or "{}"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"parameters_json[{m!r}] is not valid JSON: {e}") from None
            if not isinstance(value, dict):
                raise InvalidArgument(
                    f'parameters_json[{m!r}] must be a JSON object such as {{"n_steps": 64}}, '
                    f"got a {type(value).__name__}"
                )
            get_method(m).check_params(value)  # InvalidArgument for an unknown parameter
            out[m] = value
        return out

    @staticmethod
    def _effective(method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Every setting of ``method`` as it will run: defaults filled in and, for a stochastic
        method without a seed, a seed drawn here and reported, so the answer can be reproduced."""
        impl = get_method(method)
        effective = {**impl.parameters(), **params}
        if impl.stochastic and effective.get("seed") is None:
            effective["seed"] = secrets.randbelow(2**31)
        return effective

    def _targets(
        self, targets: Sequence[pb.Target], x: np.ndarray, engine: Any, logits: np.ndarray | None
    ) -> list[list[int]]:
        """Class indices to explain for each ECG (one or more: top_k, all_predicted)."""
        n = len(x)
        if len(targets) not in (0, 1, n):
            raise InvalidArgument(
                f"got {len(targets)} targets for {n} ECGs; give none, one for all, or one per ECG"
            )
        probs = None if logits is None else sigmoid(logits)
        n_classes = engine.package.n_classes
        out = []
        for i in range(n):
            t = targets[0] if len(targets) == 1 else targets[i] if targets else pb.Target(predicted=True)
            where = f"targets[{i if len(targets) > 1 else 0}]"
            out.append(self._target(t, None if probs is None else probs[i], n_classes, engine, where))
        return out

    @staticmethod
    def _target(t: pb.Target, probs: np.ndarray | None, n_classes: int, engine: Any, where: str) -> list[int]:
        """Class indices for one target; ``probs`` (this ECG's) is given when the kind needs it."""
        kind = t.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(
                f"{where} sets no kind (class_key, snomed_code, index, predicted, top_k, ...)"
            )
        if kind in ("class_key", "snomed_code"):
            value = getattr(t, kind)
            if not value:
                raise InvalidArgument(f"{where}: {kind} is empty")
            if kind == "class_key" and value.isdigit():
                raise NotFound(
                    f"{where}: unknown class key {value!r}; known: {', '.join(engine.package.class_keys)}"
                )
            if kind == "snomed_code" and not value.isdigit():
                raise NotFound(f"{where}: {value!r} is not a SNOMED CT code (digits)")
            return [_class(engine, value, where)]
        if kind == "index":
            if t.index >= n_classes:
                raise NotFound(f"{where}: class index {t.index} is out of range 0..{n_classes - 1}")
            return [int(t.index)]
        if kind == "predicted":
            if not t.predicted:
                raise InvalidArgument(f"{where}: predicted must be true when set")
            return [int(np.argmax(probs))]
        if kind == "top_k":
            if not 1 <= t.top_k <= n_classes:
                raise InvalidArgument(f"{where}: top_k must be between 1 and {n_classes}, got {t.top_k}")
            return [int(c) for c in np.argsort(-probs, kind="stable")[: t.top_k]]
        if kind == "all_predicted":
            if not t.all_predicted:
                raise InvalidArgument(f"{where}: all_predicted must be true when set")
            positive = np.flatnonzero(probs >= PROBABILITY_THRESHOLD)
            return [int(c) for c in positive] or [int(np.argmax(probs))]
        raise InvalidArgument(f"{where}: unsupported target kind {kind!r}")  # pragma: no cover


def _class(engine: Any, value: str, where: str) -> int:
    try:
        return engine.class_index(value)
    except NotFound as e:
        raise NotFound(f"{where}: {e}") from None


# Settings that choose another rule rather than tune one: the gate's verdict on a method covers
# the rule it checked (the method's default), so another is served only in research mode.
GATED_RULES: dict[str, dict[str, str]] = {"lrp": {"composite": "epsilon"}}


def _gated_rule(method: str, params: dict) -> bool:
    """Whether ``params`` keep the rule the gate checked for ``method``."""
    return all(params.get(k, v) == v for k, v in GATED_RULES.get(method, {}).items())


def _ungated_rule_refusal(method: str, params: dict, served: Any) -> str:
    asked = {k: params[k] for k, v in GATED_RULES[method].items() if params.get(k, v) != v}
    shown = ", ".join(f"{k}={v!r}" for k, v in asked.items())
    checked = ", ".join(f"{k}={GATED_RULES[method][k]!r}" for k in asked)
    return (
        f"{method} with {shown} was not checked by the validation gate of {served.model} version "
        f"{served.version} (the gate checks {method} with {checked}); ask for that, or use a "
        "research-mode server (--allow-ungated)"
    )


def _name(what: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty; ListModels lists the models")
    return value


def lead_shares(attribution: np.ndarray) -> np.ndarray:
    """Share of total |attribution| per lead (sums to 1; zeros for an all-zero map)."""
    per_lead = np.abs(attribution.astype(np.float64)).sum(axis=-1)
    total = per_lead.sum()
    return per_lead / total if total > 0 else np.zeros_like(per_lead)


# ---------------------------------------------------------------------- server


class BuiltServer(NamedTuple):
    """What :func:`build_server` made: start ``server``, then ``extras.start`` (health updates)."""

    server: grpc.Server
    port: int
    servicer: ExplanationServicer
    extras: Extras


def build_server(
    repository: Any,
    *,
    security: ServerSecurity,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queued: int | None = None,
    audit: CallObserver | None = None,
    metrics: Any = None,
) -> BuiltServer:
    """A ready (not yet started) server: ecgx.v1, the Open Inference Protocol (sharing ecgx.v1's
    request slots), grpc.health.v1 and reflection, all on one port.

    ``security`` has no default: TLS and who may call (``ServerSecurity``), or plaintext without
    authentication only when asked for by name (``ServerSecurity.plaintext_unauthenticated()``).
    Every RPC passes :class:`ecgx.service.calls.CallInterceptor`, which tells ``audit`` (an audit log)
    and ``metrics`` (``ecgx.service.metrics.ServiceMetrics``) about it. ``port`` 0 picks a free port.
    """
    servicer = ExplanationServicer(
        repository, max_batch=max_batch, max_concurrent=max_concurrent, max_queued=max_queued, metrics=metrics
    )
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # gRPC shares a port with another server by default (SO_REUSEPORT): a second `ecgx serve`
        # on a busy port would silently take half its traffic. Fail instead.
        ("grpc.so_reuseport", 0),
    ]
    interceptor = CallInterceptor(
        security.authenticator,
        open_rpcs=security.open_rpcs,
        observers=[o for o in (audit, metrics) if o is not None],
    )
    # A thread for every running and queued request and a few more, so cheap calls and refusals
    # get through; gRPC refuses RPCs beyond that with RESOURCE_EXHAUSTED rather than queue them.
    workers = servicer.max_concurrent + servicer.max_queued + 4
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ecgx-grpc")
    server = grpc.server(pool, options=options, maximum_concurrent_rpcs=workers, interceptors=[interceptor])
    pb_grpc.add_ExplanationServiceServicer_to_server(servicer, server)
    extras = register_extras(server, repository, explanation_servicer=servicer, max_batch=max_batch)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if security.credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, security.credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not this machine's")
    return BuiltServer(server, bound, servicer, extras)


def serve(
    repository: Any,
    *,
    security: ServerSecurity,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queued: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    watch_interval_s: float | None = 2.0,
    audit: Any = None,
    metrics: Any = None,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    ready: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let in-flight requests finish within
    ``grace_s`` seconds, and return 0. With ``metrics`` and a ``metrics_port`` (0: a free one),
    Prometheus scrapes ``http://metrics_host:port/metrics``."""
    server, bound, _, extras = build_server(
        repository,
        security=security,
        host=host,
        port=port,
        max_batch=max_batch,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        audit=audit,
        metrics=metrics,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    http = None
    try:
        if metrics is not None and metrics_port is not None:
            from ecgx.service.metrics import start_metrics_endpoint

            http = start_metrics_endpoint(metrics.registry, metrics_host, metrics_port)
        security.start()
        if metrics is not None:
            metrics.start()
        server.start()
        if watch_interval_s and hasattr(repository, "start_watching"):
            repository.start_watching(watch_interval_s)
        extras.start(watch_interval_s or 2.0)
        _log_start(host, bound, security, http)
        if ready is not None:
            ready(bound)
        while not stop.wait(0.5):
            pass
        log.info("stopping: no new requests; in-flight requests have %.0f s to finish", grace_s)
        extras.shutdown()  # health turns NOT_SERVING first, so probes stop routing here
        server.stop(grace_s).wait(grace_s + 5)
        log.info("stopped")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if hasattr(repository, "stop"):
            repository.stop()
        security.stop()
        if metrics is not None:
            metrics.stop()
        if http is not None:
            http.close()
        if audit is not None and hasattr(audit, "close"):
            audit.close()


def _log_start(host: str, port: int, security: ServerSecurity, http: Any) -> None:
    where = f"metrics on {http.url}" if http else "no metrics"
    line = f"serving ecgx.v1.ExplanationService on {host}:{port} with {security.describe()}; {where}"
    if security.insecure:
        # Loud on purpose: this is only right on a trusted network (a laptop, a test).
        log.warning("%s. INSECURE MODE (--insecure): anyone who reaches this port can call it", line)
    else:
        log.info("%s", line)


__all__ = [
    "BuiltServer",
    "ExplanationServicer",
    "build_server",
    "errors",
    "lead_shares",
    "serve",
    "status_of",
]
