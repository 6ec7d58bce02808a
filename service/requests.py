"""The serving core's records: what a transport hands the core, and what it gets back.

Plain dataclasses and NumPy arrays, nothing of gRPC or HTTP: ecgx.v1, the Open Inference
Protocol over gRPC and over REST all translate their messages into these and back
(:mod:`ecgx.service.core` runs them). No PyTorch here (the serving path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecgx.core.errors import Cancelled, DeadlineExceeded, InvalidArgument

# Target kinds (``Target.kind``).
CLASS_KEY = "class_key"  # value: a class key, "AF"
SNOMED_CODE = "snomed_code"  # value: a SNOMED CT code made of ASCII digits, "164889003"
INDEX = "index"  # value: a class index
CLASS = "class"  # value: any of the three above (the OIP's ``target``: key, code or index)
PREDICTED = "predicted"  # each ECG's most probable class
TOP_K = "top_k"  # value: k, the k most probable classes
ALL_PREDICTED = "all_predicted"  # every class at or above the threshold (the most probable if none)
TARGET_KINDS = (CLASS_KEY, SNOMED_CODE, INDEX, CLASS, PREDICTED, TOP_K, ALL_PREDICTED)
# Kinds whose classes depend on the model's prediction (the forward graph runs first).
NEEDS_PREDICTION = frozenset({PREDICTED, TOP_K, ALL_PREDICTED})


@dataclass(frozen=True)
class Target:
    """Which class(es) to explain for one ECG (or for every ECG, when a request gives one)."""

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:  # a transport bug, not client input: adapters map kinds
            raise InvalidArgument(f"unknown target kind {self.kind!r}; known: {', '.join(TARGET_KINDS)}")


@dataclass(frozen=True)
class MethodCall:
    """One attribution method and the settings the client asked for (parsed JSON values, not yet
    checked; the defaults are not filled in)."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Caller:
    """Who calls, as the transport authenticated them (the fields of ``ecgx.service.calls.Identity``).

    ``via`` "none" means nobody was identified (an insecure server): scopes are not checked and
    per-caller quotas do not apply. ``peer`` is for messages only, never a quota key.
    """

    name: str = ""
    via: str = "none"  # "token" | "certificate" | "none"
    scopes: frozenset[str] = frozenset()
    peer: str = ""

    @classmethod
    def of(cls, identity: Any, peer: str = "") -> Caller:
        """From an ``Identity`` (or None: nobody identified)."""
        if identity is None:
            return cls(peer=peer)
        return cls(identity.name, identity.via, frozenset(identity.scopes), peer)

    @property
    def identified(self) -> bool:
        return self.via != "none"


DEADLINE_SLACK_S = 0.25


class CancelToken:
    """Tells the engine's chunk loops to stop: the client went away (``is_active`` turns false)
    or its deadline passed, or the server cancels the work (shutdown).

    ``check()`` raises :class:`Cancelled` or :class:`DeadlineExceeded`; it is called before every
    chunk of model rows, so a cancelled request stops within one chunk's time. Thread-safe.
    """

    def __init__(
        self,
        *,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
        time_remaining: Callable[[], float | None] | None = None,
    ):
        self.deadline = deadline  # time.monotonic() value, or None
        self._is_active = is_active
        self._time_remaining = time_remaining
        self._cancelled = threading.Event()
        self._reason = ""

    def cancel(self, reason: str = "the server cancelled the request") -> None:
        """Stop the work at its next check (shutdown cancels every running request this way)."""
        self._reason = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        times = []
        if self.deadline is not None:
            times.append(self.deadline - time.monotonic())
        if self._time_remaining is not None:
            left = self._time_remaining()
            if left is not None:
                times.append(left)
        return min(times) if times else None

    def check(self) -> None:
        """Raise Cancelled or DeadlineExceeded when the work must stop; else return at once."""
        if self._cancelled.is_set():
            raise Cancelled(f"{self._reason}; the work was stopped")
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the client's deadline passed; the work was stopped")
        if self._is_active is not None and not self._is_active():
            # A client whose deadline passes resets the stream at its own clock, a little before the
            # server's copy of the deadline: gone within DEADLINE_SLACK_S of it is a deadline.
            if left is not None and left <= DEADLINE_SLACK_S:
                raise DeadlineExceeded("the client's deadline passed; the work was stopped")
            raise Cancelled("the client cancelled the request; the work was stopped")


@dataclass(frozen=True)
class PredictRequest:
    """Probabilities for ECGs.

    ``ecgs``: either a (B, leads, samples) array of median beats in mV (checked by the core:
    shape, finite, amplitude), or a sequence of undecoded ECG payloads with the fields of
    ``ecgx.v1.Ecg`` (leads, sampling_rate_hz, units, samples_per_lead, samples, id), which the
    core decodes for the model's leads (strips become median beats).
    """

    model: str
    ecgs: np.ndarray | Sequence[Any]
    version: str | None = None  # None or "": the model's default version
    caller: Caller = field(default_factory=Caller)
    # One token per request (never shared: shutdown cancels every running request's token).
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass(frozen=True)
class ExplainRequest(PredictRequest):
    """Attributions for ECGs: every method for every target of every ECG.

    ``targets``: none (each ECG's most probable class), one for every ECG, or one per ECG.
    """

    methods: Sequence[MethodCall] = ()
    targets: Sequence[Target] = ()
    fhir: bool = False  # each attribution also as a FHIR Observation (counted in the response size)


@dataclass(frozen=True)
class GateInfo:
    """What the gate said about a method on the version that served it (``repository.MethodGate``)."""

    method: str
    servable: bool
    verdict: str
    ungated: bool
    checks: tuple[Any, ...]  # repository.CheckResult


@dataclass(frozen=True)
class VersionFacts:
    """The served version's identity, as every response reports it."""

    model: str
    version: str
    package_sha256: str
    gate_report_sha256: str
    policy_sha256: str
    class_keys: tuple[str, ...]
    onnxruntime_version: str
    providers: tuple[str, ...]


@dataclass(frozen=True)
class PredictResult:
    facts: VersionFacts
    probabilities: np.ndarray  # (B, classes) float32
    logits: np.ndarray  # (B, classes) float32
    beats: np.ndarray  # (B, leads, samples) float32 mV: what the model saw
    ecg_ids: tuple[str, ...]  # the payloads' ids, echoed ("" for arrays or unset ids)
    research_mode: bool  # the version serves although its gate failed
    compute_seconds: float
    cost: int  # model rows this request was charged
    # What each payload's model input was made from ("median_beat", "window", "rhythm_strip": the
    # decoder's WAVEFORMS); empty for an array of model inputs.
    ecg_waveforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttributionResult:
    ecg_index: int
    method: str
    target_index: int
    target_key: str
    attribution: np.ndarray  # (leads, samples) float32
    lead_relevance_share: np.ndarray  # (leads,) float64, sums to 1 (zeros for an all-zero map)
    effective_parameters: dict[str, Any]  # every setting as it ran: defaults filled in, seed drawn
    gate: GateInfo
    compute_seconds: float  # the engine call's time, divided among the ECGs it computed


@dataclass(frozen=True)
class ExplainResult(PredictResult):
    targets: tuple[tuple[int, ...], ...] = ()  # class indices explained, per ECG
    attributions: tuple[AttributionResult, ...] = ()


@dataclass(frozen=True)
class Quotas:
    """Admission limits of a core (serve config ``[serve]`` and ``ecgx serve`` flags).

    ``max_request_cost``: the most model rows (ECGs x targets x methods x each method's rows per
    ECG, plus the forward pass) one request may cost; None: no budget.
    ``caller_concurrent``: the most requests one identified caller may have running or queued;
    None: ``max(1, max_concurrent // 2)``, so no single caller can take every slot.
    ``caller_rate``: a rate in the ``limits`` notation ("600/minute", "20/second") of Predict and
    Explain requests per identified caller; None: no rate limit.
    """

    max_batch: int = 64
    max_concurrent: int = 8
    max_queued: int | None = None  # None: 4 x max_concurrent
    queue_wait_s: float = 30.0
    max_request_cost: int | None = 200_000
    caller_concurrent: int | None = None
    caller_rate: str | None = "600/minute"
