"""Prometheus metrics of the serving process, on their own port (docs/monitoring.md lists them).

:class:`ServiceMetrics` owns one :class:`~prometheus_client.CollectorRegistry` per server (never
prometheus_client's global default): it observes every RPC (a
:class:`ecgx.service.calls.CallObserver`), the repository's loads, reloads and refusals (a repository
listener), the predicted probabilities and, through :class:`ecgx.service.stability.StabilitySampler`,
the online stability of the attributions served. What the gate said about each version (verdicts,
check scores and thresholds, the stability baseline) and which versions serve are read from the
repository's snapshot at scrape time, so a removed version leaves no stale series behind.

Every label value is bounded: model and version names the repository has, method names of
``ecgx.service.methods.METHOD_NAMES``, gRPC status code names, class keys of a served package, fixed
reason categories. Nothing per request or per caller is a label.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ecgx.core.errors import InvalidArgument, NotFound
from ecgx.service.calls import CallRecord
from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.service.repository import (
    EVENT_LOADED,
    EVENT_REFUSED,
    EVENT_RELOAD_FAILED,
    EVENT_RELOADED,
    CheckResult,
    ModelRepository,
    RepositoryEvent,
    ServedVersion,
    refusal_category,
)
from ecgx.service.stability import (
    DEFAULT_QUEUE,
    DEFAULT_SHARE,
    DROP_REASONS,
    StabilityResult,
    StabilitySampler,
    WorkerSettings,
    agreement_partner,
    gate_agreement,
    gate_noise_floor,
)

log = logging.getLogger(__name__)

PREFIX = "ecgx_"
DEFAULT_METRICS_PORT = 9464  # OpenTelemetry's Prometheus exporter port; 9090 is Prometheus's own
# 1 ms (a ListModels) to 60 s (a large LIME or occlusion request on CPU).
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A dynamic batch's wait: 0.1 ms (a lone request on an idle engine) to 1 s (the longest delay a
# serve config may set, plus a batch ahead of it).
QUEUE_DELAY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# Spearman |a| similarities: fine near 1, where stable methods sit; 0 and 0.25 catch collapses.
SIMILARITY_BUCKETS = (0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1)
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1)
SAMPLE_DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNKNOWN = "unknown"  # a model, version or method name the repository does not have
MULTIPLE = "multiple"  # the method label of a request's latency when it asked for several
_CODES = frozenset(c.name for c in grpc.StatusCode)
_REASON = re.compile(r"[^a-z0-9_]")  # refusal categories are fixed words; anything else is folded
_METHODS = frozenset(METHOD_NAMES)


# ------------------------------------------------------------------------------------ labels


class Labels:
    """Label values that can only take values the repository and the method table have."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def model(self, name: str) -> str:
        if not name:
            return ""
        return name if name in self.repository.models() else UNKNOWN

    def version(self, model: str, version: str) -> str:
        if not version:
            return ""
        try:
            known = any(v.version == version for v in self.repository.versions(model))
        except Exception:  # NotFound: an unknown model has no known version
            known = False
        return version if known else UNKNOWN

    @staticmethod
    def method(name: str) -> str:
        return name if name in _METHODS else UNKNOWN if name else ""

    @staticmethod
    def code(name: str) -> str:
        return name if name in _CODES else "UNKNOWN"


# ------------------------------------------------------------------------ version histograms


class VersionHistograms:
    """Histograms whose first two labels are a model and a version, observed many values at a
    time (numpy) and exported only while that version is in the repository.

    prometheus_client's Histogram would keep a removed version's series for the life of the
    process and costs a lock per value; a Predict of 64 ECGs and 9 classes observes 576 values.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        if tuple(labelnames[:2]) != ("model", "version"):
            raise InvalidArgument(f"{name}: the first labels must be model and version, got {labelnames}")
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = np.asarray(buckets, np.float64)
        self._le = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._series: dict[tuple[str, ...], list[Any]] = {}  # labels -> [bucket counts, sum]
        self._lock = threading.Lock()

    def observe(self, labels: Sequence[str], values: np.ndarray) -> int:
        """Count the finite ``values`` under ``labels``; returns how many were not finite."""
        v = np.asarray(values, np.float64).ravel()
        finite = v[np.isfinite(v)]
        # Bucket i counts v <= bounds[i] (Prometheus' "le"); past the last bound: +Inf.
        counts = np.bincount(np.searchsorted(self.bounds, finite, side="left"), minlength=len(self._le))
        with self._lock:
            entry = self._series.setdefault(tuple(labels), [np.zeros(len(self._le), np.int64), 0.0])
            entry[0] += counts
            entry[1] += float(finite.sum())
        return int(v.size - finite.size)

    def count(self, labels: Sequence[str]) -> int:
        """Values counted under ``labels`` so far."""
        with self._lock:
            entry = self._series.get(tuple(labels))
            return 0 if entry is None else int(entry[0].sum())

    def family(self, present: Callable[[str, str], bool] | None = None) -> HistogramMetricFamily:
        """The exposition; series of versions not ``present`` are forgotten."""
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if present is None:
            return fam
        with self._lock:
            for labels in [k for k in self._series if not present(k[0], k[1])]:
                del self._series[labels]
            series = [(k, e[0].copy(), e[1]) for k, e in sorted(self._series.items())]
        for labels, counts, total in series:
            cumulative = np.cumsum(counts)
            fam.add_metric(list(labels), list(zip(self._le, cumulative.astype(float), strict=True)), total)
        return fam


# ---------------------------------------------------------------------------- scrape-time state


class RepositoryCollector(Collector):
    """What the repository holds now: which versions serve or are refused, the gate's verdict,
    scores and thresholds per method and check, and the stability baseline; plus the version
    histograms (their series pruned to versions still there)."""

    def __init__(self, repository: ModelRepository, histograms: Sequence[VersionHistograms]):
        self.repository = repository
        self.histograms = tuple(histograms)

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()
        for h in self.histograms:
            yield h.family()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        present: set[tuple[str, str]] = set()
        for model in self.repository.models():
            try:
                versions = self.repository.versions(model)
                default = self.repository.default_version(model)
            except NotFound:  # removed by a reload between models() and versions()
                continue
            for v in versions:
                present.add((model, v.version))
                self._version(families, v, v is default)
        yield from families.values()
        for h in self.histograms:
            yield h.family(lambda m, v: (m, v) in present)

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        mv, mvm = ["model", "version"], ["model", "version", "method"]
        specs = {
            "info": (
                "model_version_info",
                "1 for each version that serves",
                [*mv, "default", "research_mode"],
            ),
            "refused": ("model_version_refused", "1 for each version that does not serve", [*mv, "reason"]),
            "passed": ("gate_method_passed", "The gate's verdict on a method: 1 pass, 0 fail", mvm),
            "score": ("gate_check_score", "A gate check's score for a method", [*mvm, "check"]),
            "threshold": ("gate_check_threshold", "A gate check's threshold", [*mvm, "check"]),
            "check_passed": (
                "gate_check_passed",
                "A gate check's verdict for a method: 1 pass, 0 fail",
                [*mvm, "check", "blocking"],
            ),
            "baseline": (
                "attribution_stability_gate_baseline",
                "The gate's noise floor: mean Spearman |a| of a method's map with its map on the ECG "
                "plus high-frequency noise, per sample, at release",
                mvm,
            ),
            "agreement_baseline": (
                "attribution_agreement_gate_baseline",
                "The gate's inter-method correlation: mean Pearson |a| of a method's map with its "
                "agreement partner's, per ECG, at release",
                [*mvm, "partner"],
            ),
        }
        return {k: GaugeMetricFamily(PREFIX + n, doc, labels=lab) for k, (n, doc, lab) in specs.items()}

    @staticmethod
    def _version(families: Mapping[str, GaugeMetricFamily], v: ServedVersion, default: bool) -> None:
        if v.servable:
            families["info"].add_metric([v.model, v.version, _bool(default), _bool(v.ungated)], 1)
        else:
            families["refused"].add_metric([v.model, v.version, refusal_category(v.refusal)], 1)
        methods = (v.report or {}).get("methods")
        if not isinstance(methods, Mapping):
            return
        for method in METHOD_NAMES:  # the report's reference rows (ref:...) are never served
            if method not in methods or get_method(method).kind == "control":
                continue  # the random control fails by design: a gauge of it would only alarm
            gate = v.method_gate(method)
            labels = [v.model, v.version, method]
            if gate.verdict in ("pass", "fail"):
                families["passed"].add_metric(labels, float(gate.verdict == "pass"))
            for c in gate.checks:
                _check(families, [*labels, c.check], c)
            baseline = gate_noise_floor(v.report, method)
            if baseline is not None:
                families["baseline"].add_metric(labels, baseline)
            partner = agreement_partner(v, method) if gate.servable and not gate.ungated else None
            agreement = gate_agreement(v.report, method, partner) if partner is not None else None
            if agreement is not None:
                families["agreement_baseline"].add_metric([*labels, partner], agreement)


def _check(families: Mapping[str, GaugeMetricFamily], labels: list[str], c: CheckResult) -> None:
    if c.score is not None:
        families["score"].add_metric(labels, c.score)
    if c.threshold is not None:
        families["threshold"].add_metric(labels, c.threshold)
    if c.verdict in ("pass", "fail"):
        families["check_passed"].add_metric([*labels, _bool(c.blocking)], float(c.verdict == "pass"))


def _bool(value: bool) -> str:
    return "true" if value else "false"


# ---------------------------------------------------------------------------------- the metrics


class ServiceMetrics:
    """Every metric of one server, in :attr:`registry`.

    Args:
        repository: the server's model repository (label values, gate state, events).
        stability_share: the share of Explain calls whose attribution stability is measured.
        stability_queue: stability samples that may wait; more are dropped and counted.
        seed: seeds the sampling (None: a fresh seed).
        worker: the stability worker's threads, priority and CPU budget (None: the defaults).

    Use: pass it to ``build_server(..., metrics=...)`` (it observes every RPC), call
    :meth:`start` when serving begins and :meth:`stop` at the end, and expose
    :attr:`registry` with :func:`start_metrics_endpoint`.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        stability_share: float = DEFAULT_SHARE,
        stability_queue: int = DEFAULT_QUEUE,
        seed: int | None = None,
        worker: WorkerSettings | None = None,
    ):
        self.repository = repository
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = Labels(repository)
        # Label children of the per-call metrics, resolved once per label set (prometheus_client's
        # ``labels()`` validates and locks on every call); the label values are bounded by
        # ``Labels``, so this is too.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._requests()
        self._repository()
        self._stability()
        self.sampler = StabilitySampler(
            repository,
            self,
            share=stability_share,
            queue_size=stability_queue,
            seed=seed,
            worker=worker or WorkerSettings(),
        )
        self.share_gauge.set(self.sampler.share)
        self.registry.register(
            RepositoryCollector(repository, [self.probability, self.stability, self.agreement])
        )
        repository.add_listener(self.repository_event)
        self._listening = True

    def _requests(self) -> None:
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests_total",
            "RPCs finished, by outcome; an Explain counts once per method it asked for",
            ["rpc", "model", "version", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from an RPC's arrival to its answer (method: the one asked for, 'multiple', or '')",
            ["rpc", "model", "method"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "RPCs being served now", ["rpc"], registry=r)
        self.refused = Counter(
            PREFIX + "refusals_total",
            "RPCs refused, by the check or limit that refused them (also counted in requests_total by code)",
            ["rpc", "reason"],
            registry=r,
        )
        self.batch = Histogram(
            PREFIX + "request_batch_ecgs",
            "ECGs per Predict or Explain request",
            ["rpc"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine = Histogram(
            PREFIX + "engine_duration_seconds",
            "Time an RPC spent in ONNX Runtime (compare with request_duration_seconds)",
            ["rpc", "model"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.batch_formed = Histogram(
            PREFIX + "dynamic_batch_ecgs",
            "ECGs per engine call the dynamic batcher formed from concurrent requests (method: the "
            "one asked for, 'multiple', or '' for Predict)",
            ["model", "method"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_delay = Histogram(
            PREFIX + "dynamic_batch_queue_delay_seconds",
            "Time a request waited in the dynamic batcher before its batch started",
            ["model", "method"],
            buckets=QUEUE_DELAY_BUCKETS_S,
            registry=r,
        )

    def _repository(self) -> None:
        r = self.registry
        self.loads = Counter(
            PREFIX + "model_loads_total", "Model versions that started serving", ["model"], registry=r
        )
        self.reloads = Counter(
            PREFIX + "model_reloads_total",
            "Repository rescans, by outcome (ok, failed)",
            ["outcome"],
            registry=r,
        )
        self.refusals = Counter(
            PREFIX + "model_refusals_total",
            "Model versions refused (new, or with a new reason), by reason category",
            ["model", "reason"],
            registry=r,
        )

    def _stability(self) -> None:
        r = self.registry
        mvm = ["model", "version", "method"]
        self.stability = VersionHistograms(
            PREFIX + "attribution_stability",
            "Spearman |a| of a served map with the map of the same ECG plus high-frequency noise, per ECG",
            mvm,
            SIMILARITY_BUCKETS,
        )
        self.agreement = VersionHistograms(
            PREFIX + "attribution_agreement",
            "Pearson |a| of a served map with the map of the cheapest other gated method, per ECG",
            [*mvm, "partner"],
            SIMILARITY_BUCKETS,
        )
        self.probability = VersionHistograms(
            PREFIX + "predicted_probability",
            "Predicted probability per ECG and class (Predict and Explain)",
            ["model", "version", "class"],
            PROBABILITY_BUCKETS,
        )
        self.undefined = Counter(
            PREFIX + "attribution_similarity_undefined_total",
            "Sampled ECGs whose similarity is undefined (a constant map has no ranking), by measure",
            [*mvm, "measure"],
            registry=r,
        )
        self.samples = Counter(
            PREFIX + "stability_samples_total",
            "Explain calls whose stability was measured",
            ["method"],
            registry=r,
        )
        self.drops = Counter(
            PREFIX + "stability_samples_dropped_total",
            "Sampled Explain calls not measured, by reason",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.drops.labels(reason)  # every reason from the start, so rate() sees the first drop
        self.sample_duration = Histogram(
            PREFIX + "stability_sample_duration_seconds",
            "The stability worker's time per sampled Explain call",
            ["method"],
            buckets=SAMPLE_DURATION_BUCKETS_S,
            registry=r,
        )
        self.worker_cpu = Counter(
            PREFIX + "stability_worker_cpu_seconds_total",
            "CPU time of the stability worker thread (its rate is the cores it uses)",
            registry=r,
        )
        self.share_gauge = Gauge(
            PREFIX + "stability_sample_share", "The share of Explain calls sampled for stability", registry=r
        )
        queue_length = Gauge(PREFIX + "stability_queue_length", "Stability samples waiting", registry=r)
        queue_length.set_function(lambda: self.sampler.queued())

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the stability worker (and listen to the repository again after :meth:`stop`)."""
        if not self._listening:
            self.repository.add_listener(self.repository_event, replay=False)
            self._listening = True
        self.sampler.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the stability worker (queued samples are discarded and counted) and stop listening
        to the repository."""
        self.sampler.stop(timeout)
        self.repository.remove_listener(self.repository_event)
        self._listening = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued stability sample is processed; False on timeout."""
        return self.sampler.wait_idle(timeout)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as the endpoint serves it."""
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- calls (CallObserver)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def call_started(self, record: CallRecord) -> None:
        self._child(self.in_flight, record.rpc).inc()

    def call_finished(self, record: CallRecord) -> None:
        rpc = record.rpc
        self._child(self.in_flight, rpc).dec()
        model = self.labels.model(record.model)
        version = self.labels.version(record.model, record.version) if model not in ("", UNKNOWN) else ""
        methods = [self.labels.method(m) for m in record.methods]
        code = self.labels.code(record.code)
        for method in methods or [""]:
            self._child(self.requests, rpc, model, version, method, code).inc()
        if record.refusal:
            self.refused.labels(rpc, _REASON.sub("_", record.refusal)[:40]).inc()
        which = methods[0] if len(methods) == 1 else MULTIPLE if methods else ""
        self._child(self.duration, rpc, model, which).observe(record.latency_s)
        if record.batch_size > 0:
            self._child(self.batch, rpc).observe(record.batch_size)
        if record.engine_s > 0:
            self._child(self.engine, rpc, model).observe(record.engine_s)

    # ---------------------------------------------------------------- handlers

    def predicted(self, served: ServedVersion, probabilities: np.ndarray) -> None:
        """Count the (B, classes) predicted probabilities of ``served`` (Predict and Explain)."""
        if served.engine is None:
            return
        p = np.asarray(probabilities)
        for k, key in enumerate(served.engine.package.class_keys[: p.shape[-1]]):
            self.probability.observe((served.model, served.version, key), p[..., k])

    def explained(
        self,
        served: ServedVersion,
        method: str,
        parameters: Mapping[str, Any],
        x: np.ndarray,
        classes: np.ndarray,
        maps: np.ndarray,
    ) -> None:
        """Offer one Explain computation to the stability sampler; returns at once."""
        self.sampler.offer(served, method, parameters, x, classes, maps)

    def batched(self, stats: Any) -> None:
        """One batch the dynamic batcher started (``ecgx.service.batcher.BatchStats``)."""
        model = self.labels.model(stats.model)
        method = self.labels.method(stats.label) if stats.label != MULTIPLE else MULTIPLE
        self.batch_formed.labels(model, method).observe(stats.ecgs)
        delays = self.queue_delay.labels(model, method)
        for seconds in stats.queue_delays_s:
            delays.observe(seconds)

    # ---------------------------------------------------------------- sampler (StabilitySink)

    def sampled(self, result: StabilityResult) -> None:
        labels = (result.model, result.version, result.method)
        undefined = self.stability.observe(labels, result.stability)
        if undefined:
            self.undefined.labels(*labels, "stability").inc(undefined)
        if result.partner is not None and result.agreement is not None:
            undefined = self.agreement.observe((*labels, result.partner), result.agreement)
            if undefined:
                self.undefined.labels(*labels, "agreement").inc(undefined)
        self.samples.labels(result.method).inc()
        self.sample_duration.labels(result.method).observe(result.seconds)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops.labels(reason).inc(count)

    def worked(self, cpu_seconds: float) -> None:
        self.worker_cpu.inc(max(0.0, cpu_seconds))

    # ---------------------------------------------------------------- repository (listener)

    def repository_event(self, event: RepositoryEvent) -> None:
        if event.kind == EVENT_LOADED:
            self.loads.labels(event.model).inc()
        elif event.kind == EVENT_REFUSED:
            self.refusals.labels(event.model, event.category).inc()
        elif event.kind == EVENT_RELOADED:
            self.reloads.labels("ok").inc()
        elif event.kind == EVENT_RELOAD_FAILED:
            self.reloads.labels("failed").inc()


# ------------------------------------------------------------------------------------ endpoint


@dataclass
class MetricsEndpoint:
    """The HTTP server of one registry (``GET /metrics``), on its own host and port."""

    host: str
    port: int  # the bound port (a free one when 0 was asked for)
    server: Any  # wsgiref server
    thread: threading.Thread
    tls: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_metrics_endpoint(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = DEFAULT_METRICS_PORT,
    tls: tuple[str, str] | None = None,
) -> MetricsEndpoint:
    """Serve ``registry`` over HTTP on ``host``:``port`` in a daemon thread (0: a free port);
    over HTTPS with ``tls`` = (certificate file, key file).

    The metrics carry no request data, but they do show which models serve and how they fare:
    bind to an address only the monitoring network reaches, or serve them over TLS."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument(f"metrics port must be 0..65535, got {port!r}")
    if tls is not None:
        _check_tls_files(*tls)
    certfile, keyfile = tls if tls is not None else (None, None)
    try:
        server, thread = start_http_server(
            port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile
        )
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    return MetricsEndpoint(host, int(server.server_port), server, thread, tls is not None)


def _check_tls_files(cert: str, key: str) -> None:
    """The metrics certificate and key, checked like the serving port's (one line per mistake)."""
    from ecgx.service.security import load_tls, read_pem_file

    load_tls(
        read_pem_file(Path(cert), f"--metrics-tls-cert {cert}"),
        read_pem_file(Path(key), f"--metrics-tls-key {key}"),
    )


__all__ = [
    "DEFAULT_METRICS_PORT",
    "MetricsEndpoint",
    "RepositoryCollector",
    "ServiceMetrics",
    "VersionHistograms",
    "start_metrics_endpoint",
]
