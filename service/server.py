"""The gRPC explanation service (``ecgx.v1.ExplanationService``) over a model repository.

ListModels, GetModel, Predict, Explain and GetGateReport (proto/ecgx/v1/ecgx.proto). Predict and
Explain are thin translations onto the serving core (:mod:`ecgx.service.core`), which the Open
Inference Protocol shares on the same port: gate enforcement (servable methods, the settings a
verdict covers), the per-request cost budget, per-caller quotas, request slots and the bounded
queue, target resolution and cancellation happen there, once. Every error a handler raises is
typed (:mod:`ecgx.core.errors`) and maps one to one onto a gRPC status code; anything else is
a bug, answered INTERNAL with a generic message and logged (without the request: no waveform, no
ECG id, ever reaches the log).

The client's deadline and cancellation reach the engine's chunk loops through the core's cancel
token: the work stops within one chunk with CANCELLED or DEADLINE_EXCEEDED. At shutdown, what
still runs after the grace period is cancelled the same way.

No PyTorch here (tested with torch made unimportable).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, NamedTuple

import grpc
import numpy as np

from ecgx.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ecgx.service.calls import CallInterceptor, CallObserver, caller_of, note_call, worker_threads
from ecgx.service.core import MAX_RESPONSE_BYTES, ServingCore, lead_shares, parse_settings_json
from ecgx.service.fhir_output import observations_of
from ecgx.service.health import Extras, register_extras
from ecgx.service.methods import METHOD_NAMES
from ecgx.service.requests import (
    ALL_PREDICTED,
    CLASS_KEY,
    INDEX,
    PREDICTED,
    SNOMED_CODE,
    TOP_K,
    ExplainRequest,
    MethodCall,
    PredictRequest,
    Quotas,
    Target,
)
from ecgx.service.rpc import cancel_token, failure_status, status_of
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
SHUTDOWN_AFTER_GRACE_S = 1.0  # the most a cancelled request may take to stop, past the grace period
# 64 ECGs of 120 s rhythm strips at 500 Hz in float32 are ~18 MB; beats and attributions of a
# full response (64 ECGs x a few methods x targets) are ~29 kB each.
MAX_MESSAGE_BYTES = MAX_RESPONSE_BYTES  # the core sizes responses to fit this


def _handler(fn: Callable) -> Callable:
    """Wrap an RPC handler: typed errors -> their status code, anything else -> INTERNAL (logged)."""

    @functools.wraps(fn)
    def run(self: ExplanationServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:
            code, message = failure_status(e, fn.__name__)
        context.abort(code, message)  # raises; outside the try so it is not caught above

    return run


def _tensor(array: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), data=a.tobytes())


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def method_gate_message(gate: Any) -> pb.MethodGate:
    """The gate's verdict as a message; built once per gate (a hashable ``GateInfo`` is the same for
    every request the version serves with it) and copied into each response."""
    try:
        return _gate_message(gate)
    except TypeError:  # an unhashable gate record: built each time
        return _build_gate_message(gate)


@functools.lru_cache(maxsize=1024)
def _gate_message(gate: Any) -> pb.MethodGate:
    return _build_gate_message(gate)


def _build_gate_message(gate: Any) -> pb.MethodGate:
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


class ExplanationServicer(pb_grpc.ExplanationServiceServicer):
    """``ecgx.v1.ExplanationService``: translates messages to the serving core's records and back.

    ``core`` (a :class:`~ecgx.service.core.ServingCore`) is made from ``repository`` and the
    limits when not given; the OIP servicer on the same server shares it (slots, quotas).
    """

    def __init__(
        self,
        repository: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_queued: int | None = None,
        metrics: Any = None,
        quotas: Quotas | None = None,
        core: ServingCore | None = None,
    ):
        limits = dataclasses.replace(
            quotas or Quotas(), max_batch=max_batch, max_concurrent=max_concurrent, max_queued=max_queued
        )
        self.core = core or ServingCore(repository, quotas=limits, metrics=metrics)
        self.repository = repository
        self.max_batch = self.core.max_batch
        self.max_concurrent = self.core.admission.max_concurrent
        self.max_queued = self.core.admission.max_queued
        self.metrics = metrics

    # ------------------------------------------------------------------ models

    @_handler
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

    @_handler
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

    @_handler
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

    @_handler
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        r = self.core.predict(
            PredictRequest(
                model=request.model,
                version=request.version or None,
                ecgs=request.ecgs,
                caller=caller_of(context),
                cancel=cancel_token(context),
            )
        )
        return pb.PredictResponse(
            model=r.facts.model,
            version=r.facts.version,
            package_sha256=r.facts.package_sha256,
            class_keys=r.facts.class_keys,
            probabilities=_tensor(r.probabilities),
            logits=_tensor(r.logits),
            beats=_tensor(r.beats),
            research_mode=r.research_mode,
            ecg_ids=r.ecg_ids,
            ecg_waveforms=r.ecg_waveforms,
        )

    @_handler
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        r = self.core.explain(
            ExplainRequest(
                model=request.model,
                version=request.version or None,
                ecgs=request.ecgs,
                caller=caller_of(context),
                cancel=cancel_token(context),
                methods=_method_calls(request),
                targets=[_target(t, f"targets[{i}]") for i, t in enumerate(request.targets)],
                fhir=request.fhir,
            )
        )
        f = r.facts
        fhir = observations_of(r, self.core.served(f.model, f.version)) if request.fhir else None
        settings_json: dict[str, str] = {}  # once per method, not per attribution
        for a in r.attributions:
            if a.method not in settings_json:
                settings_json[a.method] = json.dumps(a.effective_parameters, sort_keys=True)
        return pb.ExplainResponse(
            model=f.model,
            version=f.version,
            package_sha256=f.package_sha256,
            gate_report_sha256=f.gate_report_sha256,
            policy_sha256=f.policy_sha256,
            onnxruntime_version=f.onnxruntime_version,
            providers=f.providers,
            class_keys=f.class_keys,
            probabilities=_tensor(r.probabilities),
            beats=_tensor(r.beats),
            attributions=[
                pb.Attribution(
                    ecg_index=a.ecg_index,
                    method=a.method,
                    target_class=a.target_key,
                    attribution=_tensor(a.attribution),
                    lead_relevance_share=a.lead_relevance_share.tolist(),
                    effective_parameters_json=settings_json[a.method],
                    gate=method_gate_message(a.gate),
                    compute_seconds=a.compute_seconds,
                    fhir_observation=fhir[k] if fhir else b"",
                )
                for k, a in enumerate(r.attributions)
            ],
            compute_seconds=r.compute_seconds,
            research_mode=r.research_mode,
            ecg_ids=r.ecg_ids,
            ecg_waveforms=r.ecg_waveforms,
        )


def _method_calls(request: pb.ExplainRequest) -> list[MethodCall]:
    """The methods and their settings (``parameters_json``: method -> JSON object text)."""
    methods = list(request.methods)
    extra = sorted(set(request.parameters_json) - set(methods))
    if extra:
        shown = [m[:80] for m in extra[:10]]
        raise InvalidArgument(f"parameters_json names method(s) {shown} that the request does not ask for")
    return [
        MethodCall(m, parse_settings_json(request.parameters_json.get(m, ""), f"parameters_json[{m[:80]!r}]"))
        for m in methods
    ]


# ecgx.v1 Target's oneof fields -> the core's target kinds (the same names).
_TARGET_KINDS = {"class_key": CLASS_KEY, "snomed_code": SNOMED_CODE, "index": INDEX, "top_k": TOP_K}


def _target(t: pb.Target, where: str) -> Target:
    kind = t.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where} sets no kind (class_key, snomed_code, index, predicted, top_k, ...)")
    if kind in _TARGET_KINDS:
        return Target(_TARGET_KINDS[kind], getattr(t, kind))
    if not getattr(t, kind):  # predicted, all_predicted: flags
        raise InvalidArgument(f"{where}: {kind} must be true when set")
    return Target(PREDICTED if kind == "predicted" else ALL_PREDICTED)


def _name(what: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty; ListModels lists the models")
    return value


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
    quotas: Quotas | None = None,
) -> BuiltServer:
    """A ready (not yet started) server: ecgx.v1, the Open Inference Protocol (sharing ecgx.v1's
    request slots), grpc.health.v1 and reflection, all on one port.

    ``security`` has no default: TLS and who may call (``ServerSecurity``), or plaintext without
    authentication only when asked for by name (``ServerSecurity.plaintext_unauthenticated()``).
    Every RPC passes :class:`ecgx.service.calls.CallInterceptor`, which tells ``audit`` (an audit log)
    and ``metrics`` (``ecgx.service.metrics.ServiceMetrics``) about it. ``port`` 0 picks a free port.
    """
    # ``quotas``: the per-request budget and per-caller quotas (the max_* arguments override its own).
    servicer = ExplanationServicer(
        repository,
        max_batch=max_batch,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        metrics=metrics,
        quotas=quotas,
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
    # A thread for every running and queued request, every admitted stream and spare ones, so
    # health Check and refusals always get through. No maximum_concurrent_rpcs: gRPC's refusals
    # are never audited or counted; the interceptor's and the request slots' are.
    workers = worker_threads(servicer.max_concurrent + servicer.max_queued, interceptor.streams.limits)
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ecgx-grpc")
    server = grpc.server(pool, options=options, interceptors=[interceptor])
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
    metrics_tls: tuple[str, str] | None = None,
    ready: Callable[[int], None] | None = None,
    quotas: Quotas | None = None,
    http_port: int | None = None,
    http_tls: Any = None,
    viewer: bool = False,
) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let in-flight requests finish within
    ``grace_s`` seconds, and return 0. With ``metrics`` and a ``metrics_port`` (0: a free one),
    Prometheus scrapes ``http://metrics_host:port/metrics`` (https with ``metrics_tls``, the
    certificate and key files). SIGHUP reopens the audit log (logrotate). With ``http_port`` (0: a
    free one) the Open Inference Protocol over REST serves the same core on ``host`` too
    (docs/http.md), over TLS with ``http_tls`` (an ``ssl.SSLContext``; required with a TLS port);
    with ``viewer`` the web viewer too, at ``/viewer/`` (docs/viewer.md)."""
    server, bound, servicer, extras = build_server(
        repository,
        security=security,
        host=host,
        port=port,
        max_batch=max_batch,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        audit=audit,
        metrics=metrics,
        quotas=quotas,
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    if hasattr(audit, "request_reopen"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: audit.request_reopen())
    http = rest = None
    try:
        if metrics is not None and metrics_port is not None:
            from ecgx.service.metrics import start_metrics_endpoint

            http = start_metrics_endpoint(metrics.registry, metrics_host, metrics_port, metrics_tls)
        security.start()
        if metrics is not None:
            metrics.start()
        server.start()
        if http_port is not None:
            from ecgx.service.oip_http import start_rest

            observers = [audit, metrics]
            rest = start_rest(
                servicer.core, security, observers=observers, host=host, port=http_port, ssl_context=http_tls
            )
            log.info("serving the Open Inference Protocol over REST on %s", rest.url)
            if viewer:
                from ecgx.service.viewer import mount_viewer

                mount_viewer(rest)
                log.info("serving the web viewer on %s/viewer/", rest.url)
        if watch_interval_s and hasattr(repository, "start_watching"):
            repository.start_watching(watch_interval_s)
        extras.start(watch_interval_s or 2.0)
        _log_start(host, bound, security, http)
        if ready is not None:
            ready(bound)
        while not stop.wait(0.5):
            pass
        signalled = time.monotonic()
        log.info("stopping: no new requests; in-flight requests have %.0f s to finish", grace_s)
        extras.shutdown()  # health turns NOT_SERVING first, so probes stop routing here
        # Past the grace period what still runs is cancelled: it stops within one engine chunk.
        # The REST port stops alongside: readiness false, idle connections closed, requests in flight
        # get the grace period (then the core cancels them, below).
        rest_stopping = threading.Thread(target=rest.stop, args=(grace_s,), daemon=True) if rest else None
        if rest_stopping is not None:
            rest_stopping.start()
        stopped = server.stop(grace_s)
        stopped.wait(grace_s)
        # gRPC cancels its calls at the end of the grace period; the tokens are cancelled too, so
        # work that no client watches any more (and queued requests) stops at its next chunk.
        cancelled = servicer.core.cancel_all("the server is shutting down")
        if cancelled:
            log.info("grace period over: cancelled %d running request(s)", cancelled)
        stopped.wait(SHUTDOWN_AFTER_GRACE_S)
        if rest_stopping is not None:
            rest_stopping.join(SHUTDOWN_AFTER_GRACE_S)
        log.info("stopped %.1f s after the signal", time.monotonic() - signalled)
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
        if rest is not None:
            rest.stop(0)  # at once when stopped already; else (start-up failed) closes the port
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
    "lead_shares",
    "serve",
    "status_of",
]
