"""Online attribution stability: for a sampled share of Explain calls, off the request path, how
much the served attribution moves under a little input noise, and how well it agrees with a
second gated method.

This is the gate's randomisation **noise floor** measured on live traffic: the gate recorded,
per method, the mean Spearman correlation of absolute values (per sample) between the map of an
ECG and the map of the same ECG plus Gaussian noise at ``noise_scale`` times that ECG's own
high-frequency level (``validation/randomisation.py``). Here the same noise
(:func:`ecgx.core.ecg_noise.high_frequency_noise`, the scale from the version's signed policy)
and the same similarity (:func:`ecgx.core.similarity.spearman_rows`) are applied to the served
map; a stochastic method is recomputed with the served call's own seed, so the input noise is
the only difference, as in the gate. A version whose live stability falls below what it showed
at release is explaining inputs unlike those it was validated on.

The agreement partner of a served method is the **cheapest** other method the same version's
gate passed (fewest model passes per ECG at default settings; ties in ``METHOD_NAMES`` order),
computed on the same ECGs and targets: the cheapest, so the sampler's cost is dominated by the
stability recomputation. The random control is never a partner.

The request path only decides (a seeded ``random.Random``) and enqueues copies (a bounded
``queue.Queue``, never waiting: a full queue drops the sample and says so). One daemon worker
thread does the work, at the lowest CPU priority where the OS allows it, on its own
single-threaded ONNX Runtime sessions per version (``threads=1``), so its model passes neither
share the serving sessions' intra-op thread pools nor outrank requests for the CPU.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ecgx.core.ecg_noise import high_frequency_noise
from ecgx.core.errors import InvalidArgument
from ecgx.core.similarity import pearson_rows, spearman_rows
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.service.repository import ModelRepository, ServedVersion

log = logging.getLogger(__name__)

# 5 % of Explain calls: on the 2-core benchmark (benchmarks/RESULTS.md, "Stability sampling")
# this kept the request path within 5 % of no sampling for a cheap and a typical method.
DEFAULT_SHARE = 0.05
# Each queued sample holds copies of its ECGs and maps (57.6 kB per ECG): 8 samples of a
# 64-ECG request are under 30 MB.
DEFAULT_QUEUE = 8
# The default policy's value; used only for a report that does not record its noise scale.
DEFAULT_NOISE_SCALE = 1.0
# The worker's CPU at most, in cores (see StabilitySampler): bounds its cost whatever the traffic.
DEFAULT_CPU_BUDGET = 0.02
LOWEST_PRIORITY = 19  # nice value of the worker thread

# Why a sample was not processed (the ``reason`` label of the drop counter).
DROP_QUEUE_FULL = "queue_full"  # the worker is behind: the sample is discarded, never waited for
DROP_VERSION_GONE = "version_gone"  # the version stopped serving (removed, refused, replaced)
DROP_ERROR = "error"  # the recomputation failed (logged)
DROP_STOPPED = "stopped"  # the sampler was not running, or stopped with samples queued
DROP_REASONS = (DROP_QUEUE_FULL, DROP_VERSION_GONE, DROP_ERROR, DROP_STOPPED)


@dataclass(frozen=True)
class StabilityJob:
    """One sampled Explain call: the served maps and what they were computed from (copies)."""

    served: ServedVersion
    method: str
    parameters: Mapping[str, Any]  # the call's effective parameters, seed included
    x: np.ndarray  # (n, leads, samples) float32
    classes: np.ndarray  # (n,) int64 targets
    maps: np.ndarray  # (n, leads, samples) the served attributions
    index: int  # the sample's number, for its noise stream


@dataclass(frozen=True)
class StabilityResult:
    """Per-ECG similarities of one sample (NaN where a map is constant: no ranking)."""

    model: str
    version: str
    method: str
    stability: np.ndarray  # (n,) Spearman |a|, served map vs map on the noisy ECG
    partner: str | None  # the agreement partner, None when the version has no other gated method
    agreement: np.ndarray | None  # (n,) Spearman |a|, served map vs the partner's map
    seconds: float  # the worker's time for this sample


class StabilitySink(Protocol):
    """Where the sampler reports (the metrics); called from the worker thread, must not raise."""

    def sampled(self, result: StabilityResult) -> None: ...

    def dropped(self, reason: str, count: int = 1) -> None: ...

    def worked(self, cpu_seconds: float) -> None: ...


def noise_scale(report: Mapping[str, Any] | None) -> float:
    """The randomisation check's ``noise_scale`` in a gate report's signed policy."""
    try:
        value = report["policy"]["content"]["checks"]["randomisation"]["noise_scale"]  # type: ignore[index]
    except (KeyError, TypeError):
        return DEFAULT_NOISE_SCALE
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok and value >= 0 else DEFAULT_NOISE_SCALE


def gate_noise_floor(report: Mapping[str, Any] | None, method: str) -> float | None:
    """The gate-time baseline of the stability: the method's randomisation noise floor (per
    sample), or None when the report has none for it."""
    try:
        value = report["methods"][method]["checks"]["randomisation"]["details"]["noise_floor"]["sample"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def gate_agreement(report: Mapping[str, Any] | None, method: str, partner: str) -> float | None:
    """The gate-time baseline of the agreement: the gate's inter-method correlation of ``method``
    with ``partner`` (mean per-ECG Pearson of absolute maps), or None when the report has none."""
    try:
        names = report["inter_method"]["methods"]  # type: ignore[index]
        value = report["inter_method"]["matrix"][names.index(method)][names.index(partner)]  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@functools.cache  # a pure function of the name; the metrics ask at every scrape
def passes_per_ecg(method: str) -> int:
    """Model passes per ECG of ``method`` at its default settings (its cost)."""
    impl = get_method(method)
    return impl.check(np.zeros((1, 12, 600), np.float32), **impl.parameters())


def agreement_partner(served: ServedVersion, method: str) -> str | None:
    """The cheapest method other than ``method`` that ``served``'s gate passed and that serves
    (ties in ``METHOD_NAMES`` order); None when there is none. Never the random control."""
    candidates = []
    for m in METHOD_NAMES:
        if m == method or get_method(m).kind == "control":
            continue
        gate = served.method_gate(m)
        if gate.servable and not gate.ungated and gate.verdict == "pass":
            candidates.append(m)
    return min(candidates, key=lambda m: (passes_per_ecg(m), METHOD_NAMES.index(m)), default=None)


def partner_parameters(partner: str, served_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The partner's default settings; a stochastic partner gets the served call's seed (or 0)."""
    params = get_method(partner).parameters()
    if get_method(partner).stochastic:
        seed = served_parameters.get("seed")
        params["seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    return params


def measure(job: StabilityJob, engine: AttributionEngine, seed: int) -> StabilityResult:
    """Recompute ``job``'s method on its ECGs plus high-frequency noise, and its partner on the
    ECGs themselves, with ``engine`` (the served version's package)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, job.index])
    noisy = job.x + high_frequency_noise(job.x, rng, noise_scale(job.served.report))
    recomputed = engine.attribute(job.method, noisy, job.classes, **job.parameters)
    stability = spearman_rows(job.maps, recomputed, absolute=True)
    partner = agreement_partner(job.served, job.method)
    agreement = None
    if partner is not None:
        other = engine.attribute(partner, job.x, job.classes, **partner_parameters(partner, job.parameters))
        # The gate's inter-method measure, so the gate's value is this histogram's baseline.
        agreement = pearson_rows(np.abs(job.maps), np.abs(other))
    return StabilityResult(
        job.served.model,
        job.served.version,
        job.method,
        stability,
        partner,
        agreement,
        time.perf_counter() - t0,
    )


def pause_after(cpu_seconds: float, budget: float) -> float:
    """The pause after ``cpu_seconds`` of work that keeps the average at ``budget`` cores."""
    return max(0.0, cpu_seconds) * (1 / budget - 1)


def lower_thread_priority(nice: int) -> bool:
    """Give the calling thread the nice value ``nice`` (Linux: per thread); False where the OS
    does not allow it. Never raises: a sampler at normal priority still works."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return True
    except OSError as e:
        log.info("stability worker keeps its CPU priority: %s", e)
        return False


@dataclass(frozen=True)
class WorkerSettings:
    """Where and how hard the stability worker computes (defaults: measured, see the module).

    Attributes:
        threads: ONNX Runtime intra-op threads of the worker's own sessions; None runs the
            worker on the serving engine's sessions (shared thread pools).
        nice: the worker thread's nice value (0 keeps the process's priority).
        cpu_budget: the most of one core the worker uses on average: after each sample it
            pauses so that its CPU time stays within this share of the time (1: no pause).
    """

    threads: int | None = 1
    nice: int = LOWEST_PRIORITY
    cpu_budget: float = DEFAULT_CPU_BUDGET

    def __post_init__(self) -> None:
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise InvalidArgument(f"stability worker threads must be a positive integer or None, got {t!r}")
        if isinstance(self.nice, bool) or not isinstance(self.nice, int):
            raise InvalidArgument(f"stability worker nice value must be an integer, got {self.nice!r}")
        b = self.cpu_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
            raise InvalidArgument(f"stability CPU budget must be a number in (0, 1], got {b!r}")


class StabilitySampler:
    """Samples Explain calls and measures their stability in one background thread.

    Args:
        repository: where the worker checks that a sample's version still serves.
        sink: told about every result and every dropped sample.
        share: the share of Explain calls sampled, 0 (never) to 1 (every call).
        queue_size: samples waiting at most; beyond it a sample is dropped (``queue_full``).
        seed: seeds the sampling decisions and the noise (None: a fresh seed).
        worker: the worker's threads, priority and CPU budget (None: the defaults).
    """

    def __init__(
        self,
        repository: ModelRepository,
        sink: StabilitySink,
        *,
        share: float = DEFAULT_SHARE,
        queue_size: int = DEFAULT_QUEUE,
        seed: int | None = None,
        worker: WorkerSettings | None = None,
    ):
        self.share = check_share(share)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise InvalidArgument(f"stability queue size must be a positive integer, got {queue_size!r}")
        self.repository, self.sink = repository, sink
        self.queue_size, self.worker = queue_size, worker or WorkerSettings()
        self._wake = threading.Event()  # set by stop(): ends a pause at once
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**63)
        self._decide = random.Random(self.seed)
        self._queue: queue.Queue[StabilityJob | None] = queue.Queue(maxsize=queue_size)
        self._count = 0  # samples taken; each gets its own noise stream
        self._pending = 0  # queued or being processed
        self._idle = threading.Condition()
        self._engines: dict[int, tuple[AttributionEngine, AttributionEngine]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ request path

    def offer(
        self,
        served: ServedVersion,
        method: str,
        parameters: Mapping[str, Any],
        x: np.ndarray,
        classes: np.ndarray,
        maps: np.ndarray,
    ) -> bool:
        """Sample this Explain call or not; never blocks. True when it was queued."""
        if self.share <= 0 or self._decide.random() >= self.share:
            return False
        if self._stopping or not self.running:
            self.sink.dropped(DROP_STOPPED)
            return False
        with self._idle:
            index = self._count
            self._count += 1
            self._pending += 1
        # Copies: the worker reads them after the handler has returned its arrays to gRPC.
        job = StabilityJob(
            served, method, dict(parameters), np.array(x), np.array(classes, np.int64), np.array(maps), index
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._done()
            self.sink.dropped(DROP_QUEUE_FULL)
            return False
        return True

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        """Start the worker thread (once; again after :meth:`stop`)."""
        if self.running:
            return
        self._stopping = False
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="ecgx-stability", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Discard the queued samples (counted as ``stopped``), let the one in progress finish
        within ``timeout`` seconds, and join the worker."""
        if self._thread is None:
            return
        self._stopping = True  # offer() drops from here on
        discarded = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                discarded += 1
                self._done()
        if discarded:
            self.sink.dropped(DROP_STOPPED, discarded)
        self._wake.set()
        self._queue.put(None)  # room for it: the queue was just emptied, and only offer() adds
        self._thread.join(timeout)
        self._thread = None
        self._engines.clear()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no sample is queued or in progress; False when ``timeout`` s passed first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def _run(self) -> None:
        lower_thread_priority(self.worker.nice)
        while True:
            job = self._queue.get()
            if job is None:
                return
            cpu = time.thread_time()  # this thread's CPU: ONNX Runtime runs here with threads=1
            try:
                self._process(job)
            finally:
                self._done()
            used = time.thread_time() - cpu
            self.sink.worked(used)
            # Samples offered during the pause wait in the queue or are dropped (queue_full), so
            # the worker's cost does not grow with the traffic.
            self._wake.wait(pause_after(used, self.worker.cpu_budget))

    def _process(self, job: StabilityJob) -> None:
        if not self._still_serving(job.served):
            self.sink.dropped(DROP_VERSION_GONE)
            return
        try:
            result = measure(job, self._engine(job.served), self.seed)
        except Exception as e:  # one bad sample must not stop the worker
            log.warning(
                "stability sample of %s version %s method %s failed: %s",
                job.served.model,
                job.served.version,
                job.method,
                e,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self.sink.dropped(DROP_ERROR)
            return
        self.sink.sampled(result)

    def _still_serving(self, served: ServedVersion) -> bool:
        """The same version, with the same engine, still serves (not removed, refused or rebuilt)."""
        try:
            versions = self.repository.versions(served.model)
        except Exception:  # NotFound: the model is gone
            return False
        return any(v.version == served.version and v.servable and v.engine is served.engine for v in versions)

    def _engine(self, served: ServedVersion) -> AttributionEngine:
        """The engine the worker computes with: the serving one, or its own single-threaded
        sessions over the same verified package, built once per served engine."""
        if self.worker.threads is None or served.package is None or served.engine is None:
            return served.engine  # type: ignore[return-value]
        key = id(served.engine)
        entry = self._engines.get(key)
        if entry is None or entry[0] is not served.engine:
            self._prune()
            own = AttributionEngine(
                served.package,
                providers=served.engine.providers,
                max_batch=served.engine.max_batch,
                threads=self.worker.threads,
                max_request_ecgs=None,  # the request passed the serving caps already
                max_request_rows=None,
            )
            entry = self._engines[key] = (served.engine, own)
        return entry[1]

    def _prune(self) -> None:
        """Forget the worker's engines of versions that no longer serve."""
        serving = set()
        for model in self.repository.models():
            serving |= {id(v.engine) for v in self.repository.versions(model) if v.engine is not None}
        for key in [k for k in self._engines if k not in serving]:
            del self._engines[key]


def check_share(share: float) -> float:
    """A sampling share in [0, 1]; ValueError otherwise."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise InvalidArgument(f"stability share must be a number from 0 to 1, got {share!r}")
    return float(share)


__all__ = [
    "DEFAULT_QUEUE",
    "DEFAULT_SHARE",
    "DROP_REASONS",
    "StabilityJob",
    "StabilityResult",
    "StabilitySampler",
    "StabilitySink",
    "WorkerSettings",
    "agreement_partner",
    "check_share",
    "gate_noise_floor",
    "noise_scale",
    "pause_after",
]
