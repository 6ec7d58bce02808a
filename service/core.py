"""The serving core: Predict and Explain as use cases, once, for every transport.

ecgx.v1 (service/server.py), the Open Inference Protocol over gRPC (service/oip.py) and over
REST translate their messages into :mod:`ecgx.service.requests` records, call
:class:`ServingCore`, and translate the results (or the typed errors of
:mod:`ecgx.core.errors`) back. Everything a request's outcome depends on happens here:

- which version serves (the repository), which methods the gate passed, and whether the
  settings asked for are covered by the gate's verdict (:func:`settings_violation`, the one rule);
- the settings' JSON (:func:`parse_settings_json`, one parser with depth and number limits);
- the request's cost in model rows, known before any work, against the per-request budget;
- admission: per-caller rate and concurrency quotas, request slots and the bounded queue
  (:mod:`ecgx.service.admission`);
- target resolution, at most one forward pass per request (logits reused from a backward pass);
- cancellation: the request's :class:`~ecgx.service.requests.CancelToken` reaches the engine's
  chunk loops, so a cancelled or timed-out request stops within one chunk;
- dynamic batching (:mod:`ecgx.service.batcher`): concurrent requests that would make the same
  engine call (same version, methods, effective settings and target mode; deterministic methods
  with scalar settings only) are merged into one call after each was checked, admitted and its
  input decoded on its own, and each gets its own rows back, its own cost, audit line and metrics.

No PyTorch here, and nothing of gRPC or HTTP.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ecgx.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ecgx.service import fhir_output
from ecgx.service.access import EXPLAIN, require_scope
from ecgx.service.admission import Admission
from ecgx.service.batcher import BatchingConfig, BatchStats, DynamicBatcher, Job
from ecgx.service.calls import EngineClock, note_call
from ecgx.service.ecg_input import ModelInput, decode_inputs
from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.service.repository import MethodGate, MethodSettings, ServedVersion, refusal_of_method
from ecgx.service.requests import (
    ALL_PREDICTED,
    CLASS,
    CLASS_KEY,
    INDEX,
    NEEDS_PREDICTION,
    PREDICTED,
    SNOMED_CODE,
    TOP_K,
    AttributionResult,
    ExplainRequest,
    ExplainResult,
    GateInfo,
    MethodCall,
    PredictRequest,
    PredictResult,
    Quotas,
    Target,
    VersionFacts,
)

# Per-version work kept built (bounded: cleared when full, so reloaded versions never pile up).
FACTS_CACHE_SIZE = 64  # served versions whose response facts are kept
GATES_CACHE_SIZE = 1024  # (served version, method) gates
CHECKS_CACHE_SIZE = 4096  # (method, settings, input shape) settings checks that passed
PROBABILITY_THRESHOLD = 0.5  # "all predicted": every class at or above it
# A response must fit one message of every transport (gRPC's limit, set to this in server.py).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Settings JSON: the deepest a value may nest (a per-ECG baseline list is 3 deep: ECG, lead,
# sample) and the largest integer it may hold (beyond it no setting means anything, and floats
# lose precision or overflow).
MAX_SETTINGS_DEPTH = 4
MAX_SETTINGS_INT = 2**53
MAX_SETTINGS_CHARS = 32 * 1024 * 1024


# ---------------------------------------------------------------------------- settings


def parse_settings_json(text: str, where: str) -> dict[str, Any]:
    """A method's settings from JSON object text; InvalidArgument naming ``where`` for anything
    else (bad JSON, not an object, NaN/Infinity, nested deeper than MAX_SETTINGS_DEPTH, integers
    beyond MAX_SETTINGS_INT). Every transport parses settings here."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{where} must be JSON object text, got a {type(text).__name__}")
    if len(text) > MAX_SETTINGS_CHARS:
        raise InvalidArgument(f"{where} is {len(text):,} characters; at most {MAX_SETTINGS_CHARS:,}")
    text = text.strip() or "{}"
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgument(f"{where} nests too deep; at most {MAX_SETTINGS_DEPTH} levels") from None
    except ValueError as e:  # integers of more than 4300 digits (Python's conversion limit), constants
        raise InvalidArgument(f"{where} is not acceptable JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(
            f'{where} must be a JSON object such as {{"n_steps": 64}}, got a {type(value).__name__}'
        )
    _check_json_value(value, where)
    return value


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not a number a setting may take")


def _check_json_value(value: Any, where: str) -> None:
    """Depth and integer size of a parsed JSON value, iteratively (no recursion to exhaust)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= MAX_SETTINGS_DEPTH:
                raise InvalidArgument(f"{where} nests too deep; at most {MAX_SETTINGS_DEPTH} levels")
            stack.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SETTINGS_INT:
            raise InvalidArgument(f"{where} holds an integer of {len(str(abs(v)))} digits; at most 2**53")
        elif isinstance(v, float) and not math.isfinite(v):  # 1e999 parses as infinity
            raise InvalidArgument(f"{where} holds a number too large for a float")


def settings_violation(method: str, requested: Mapping[str, Any], settings: MethodSettings) -> str | None:
    """Why ``requested`` settings of ``method`` are not covered by the gate's verdict, or None.

    The rule (issue 19), the only place it is written: a setting p asked for with value v is
    covered iff v equals what the gate checked, or the policy lets p differ: "any", "at_least"
    (v >= checked) or "at_most" (v <= checked). A setting the gate did not record (and the policy
    does not free) is not covered.
    """
    problems = []
    for name, value in requested.items():
        direction = settings.may_differ.get(name)
        if direction == "any":
            continue
        known = name in settings.checked
        checked = settings.checked.get(name)
        if known and _same(value, checked):
            continue
        if known and direction in ("at_least", "at_most") and _within(value, checked, direction):
            continue
        allowed = f" ({direction.replace('_', ' ')} that)" if direction else ""
        problems.append(
            f"{name}={_show(value)} (the gate checked {name}={_show(checked)}{allowed})"
            if known
            else f"{name}={_show(value)} (the gate did not record {name})"
        )
    if not problems:
        return None
    return f"{method} with {'; '.join(problems)} is not covered by the validation gate's verdict"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # JSON true is not the number 1
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    try:
        return bool(a == b)
    except (ValueError, TypeError):  # arrays compared element-wise
        return False


def _within(value: Any, checked: Any, direction: str) -> bool:
    """``value`` at least / at most ``checked``, both finite numbers (never true otherwise)."""
    numbers = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (value, checked)
    )
    return numbers and (value >= checked if direction == "at_least" else value <= checked)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- results helpers


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def lead_shares(attribution: np.ndarray) -> np.ndarray:
    """Share of total |attribution| per lead (sums to 1; zeros for an all-zero map)."""
    # float64 accumulation without a float64 copy of the whole map (the same sums, one pass less)
    per_lead = np.abs(attribution).sum(axis=-1, dtype=np.float64)
    total = per_lead.sum()
    return per_lead / total if total > 0 else np.zeros_like(per_lead)


def gate_info(gate: MethodGate) -> GateInfo:
    return GateInfo(gate.method, gate.servable, gate.verdict, gate.ungated, tuple(gate.checks))


def _facts(served: ServedVersion) -> VersionFacts:
    engine = served.engine
    return VersionFacts(
        model=served.model,
        version=served.version,
        package_sha256=served.package_sha256 or "",
        gate_report_sha256=served.report_sha256 or "",
        policy_sha256=served.policy_sha256 or "",
        class_keys=tuple(engine.package.class_keys),
        onnxruntime_version=ort.__version__,
        providers=tuple(engine.providers),
    )


# ---------------------------------------------------------------------------- targets


def class_of(package: Any, kind: str, value: Any, where: str) -> int:
    """The class index a target of ``kind`` (class_key, snomed_code, index or class) names."""
    classes = package.manifest["classes"]
    n = len(classes)
    if kind == CLASS and isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and int(text) < n:  # SNOMED codes are 6+ digits
            kind, value = INDEX, int(text)
        else:
            value = text
            kind = SNOMED_CODE if text.isascii() and text.isdigit() else CLASS_KEY
    elif kind == CLASS:
        kind = INDEX
    if kind == INDEX:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgument(f"{where}: a class index must be a whole number, got {value!r}")
        if not 0 <= int(value) < n:
            raise NotFound(f"{where}: class index {value} is out of range 0..{n - 1}")
        return int(value)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{where}: {kind} is empty")
    if kind == SNOMED_CODE and not (value.isascii() and value.isdigit()):
        raise InvalidArgument(
            f"{where}: snomed_code must be a SNOMED CT code made of the ASCII digits 0-9, got {value[:40]!r}"
        )
    field = "key" if kind == CLASS_KEY else "code"
    for i, c in enumerate(classes):
        if str(c.get(field, "")) == value:
            return i
    known = ", ".join(package.class_keys)
    raise NotFound(f"{where}: unknown class {value[:40]!r} ({field}); known: {known}")


def _per_ecg_targets(targets: Sequence[Target], n: int, package: Any) -> list[tuple[Target, str]]:
    """One target (and where it came from, for messages) per ECG, checked as far as it can be
    before the prediction (a named class must exist; top_k must be in range)."""
    n_classes = package.n_classes
    if len(targets) not in (0, 1, n):
        raise InvalidArgument(
            f"got {len(targets)} targets for {n} ECGs; give none, one for all, or one per ECG"
        )
    out = []
    for i in range(n):
        t = targets[0] if len(targets) == 1 else targets[i] if targets else Target(PREDICTED)
        where = f"targets[{i if len(targets) > 1 else 0}]"
        if t.kind == TOP_K and (
            isinstance(t.value, bool)
            or not isinstance(t.value, (int, np.integer))
            or not 1 <= t.value <= n_classes
        ):
            raise InvalidArgument(f"{where}: top_k must be between 1 and {n_classes}, got {t.value!r}")
        if t.kind not in NEEDS_PREDICTION:
            class_of(package, t.kind, t.value, where)
        out.append((t, where))
    return out


def _most_targets(t: Target, n_classes: int) -> int:
    """The most classes a target can name (its share of the cost, known before any work)."""
    return int(t.value) if t.kind == TOP_K else n_classes if t.kind == ALL_PREDICTED else 1


def _resolve(t: Target, probs: np.ndarray | None, package: Any, where: str) -> list[int]:
    if t.kind == PREDICTED:
        return [int(np.argmax(probs))]
    if t.kind == TOP_K:
        return [int(c) for c in np.argsort(-probs, kind="stable")[: int(t.value)]]
    if t.kind == ALL_PREDICTED:
        positive = np.flatnonzero(probs >= PROBABILITY_THRESHOLD)
        return [int(c) for c in positive] or [int(np.argmax(probs))]
    return [class_of(package, t.kind, t.value, where)]


def _merge_cap(served: ServedVersion) -> int | None:
    """The most model rows (request costs summed) one merged call may hold: the engine's per-call
    cap (``max_request_rows``), which the merged call must pass like any other."""
    return served.engine.max_request_rows


def _parts(jobs: Sequence[Job]) -> list[slice]:
    """The rows of each job in their concatenation."""
    bounds = list(itertools.accumulate((j.rows for j in jobs), initial=0))
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _count(ecgs: np.ndarray | Sequence[Any]) -> int:
    """ECGs in a request (an array's first axis; a 0-d array holds none)."""
    if isinstance(ecgs, np.ndarray):
        return int(ecgs.shape[0]) if ecgs.ndim else 0
    return len(ecgs)


# ---------------------------------------------------------------------------- gate enforcement


def _servable_gate(served: ServedVersion, gate: MethodGate) -> MethodGate:
    """The method's gate; FailedPrecondition naming the failed checks when it may not serve."""
    if not gate.servable:
        raise FailedPrecondition(refusal_of_method(served, gate))
    return gate


def _covered_gate(served: ServedVersion, call: MethodCall, gate: MethodGate) -> MethodGate:
    """``gate``, or FailedPrecondition when the settings asked for are not covered by its verdict
    (in research mode: served, marked ungated)."""
    if gate.ungated:
        return gate
    why = settings_violation(call.name, call.settings, gate.settings or MethodSettings({}, {}))
    if why is None:
        return gate
    if not served.allow_ungated:
        raise FailedPrecondition(
            f"{why} for {served.model} version {served.version}; ask for the checked settings, or use "
            "a research-mode server (--allow-ungated)"
        )
    return MethodGate(gate.method, True, gate.verdict, gate.checks, ungated=True, settings=gate.settings)


# ---------------------------------------------------------------------------- the core


Results = dict[tuple[int, str, int], tuple[np.ndarray, float]]  # (ECG, method, slot) -> (map, seconds)


@dataclass(frozen=True)
class _Plan:
    """An Explain request checked and costed, before any work."""

    served: ServedVersion
    names: list[str]
    gates: dict[str, MethodGate]
    targets: list[tuple[Target, str]]  # one per ECG, and where it came from (for messages)
    effective: dict[str, dict[str, Any]]  # settings per method, as they will run
    cost: int


@dataclass(frozen=True)
class _Explained:
    """One request's rows of an attribution run (its own, or its share of a merged one)."""

    logits: np.ndarray
    targets: list[list[int]]
    results: Results
    engine_s: float  # its share of the engine time (by ECG count, in a merged run)


def _attribution_results(
    plan: _Plan, targets: list[list[int]], results: Results
) -> tuple[AttributionResult, ...]:
    """One record per ECG, method and target, in that order."""
    keys = plan.served.engine.package.class_keys
    return tuple(
        AttributionResult(
            ecg_index=i,
            method=m,
            target_index=c,
            target_key=keys[c],
            attribution=results[(i, m, j)][0],
            lead_relevance_share=lead_shares(results[(i, m, j)][0]),
            effective_parameters=plan.effective[m],
            gate=gate_info(plan.gates[m]),
            compute_seconds=results[(i, m, j)][1],
        )
        for i, t in enumerate(targets)
        for m in plan.names
        for j, c in enumerate(t)
    )


class ServingCore:
    """Predict and Explain over a model repository, for every transport.

    Args:
        repository: ``ecgx.service.repository.ModelRepository`` (``get``, ``versions``, ...).
        quotas: batch size, slots, queue, per-request budget, per-caller quotas.
        metrics: ``ecgx.service.metrics.ServiceMetrics`` or None: prediction counts and the
            stability samples of served attributions.
    """

    def __init__(
        self,
        repository: Any,
        *,
        quotas: Quotas | None = None,
        metrics: Any = None,
        batching: BatchingConfig | None = None,
    ):
        self.repository = repository
        self.quotas = quotas or Quotas()
        if self.quotas.max_request_cost is not None and self.quotas.max_request_cost < 1:
            raise InvalidArgument(f"max_request_cost must be at least 1, got {self.quotas.max_request_cost}")
        self.admission = Admission(self.quotas)
        self.max_batch = int(self.quotas.max_batch)
        self.max_response_bytes = MAX_RESPONSE_BYTES
        self.metrics = metrics
        # ``batching`` wins; else what the serve config put in its quotas (BatchingQuotas); else on.
        config = batching or getattr(self.quotas, "batching", None) or BatchingConfig()
        self.batcher = DynamicBatcher(config, observe=self._batched if metrics is not None else None)
        self._facts: dict[int, tuple[ServedVersion, VersionFacts]] = {}
        self._gates: dict[tuple[int, str], tuple[ServedVersion, MethodGate]] = {}
        self._checked: dict[tuple[Any, ...], int] = {}  # passed settings checks -> rows per ECG

    def _facts_of(self, served: ServedVersion) -> VersionFacts:
        """The version's facts, built once per served version (they are per version, never per
        request). Keyed by identity: a reloaded version is a new object and gets its own."""
        hit = self._facts.get(id(served))
        if hit is not None and hit[0] is served:
            return hit[1]
        if len(self._facts) >= FACTS_CACHE_SIZE:  # old versions' entries do not pile up
            self._facts.clear()
        facts = _facts(served)
        self._facts[id(served)] = (served, facts)
        return facts

    def _gate_of(self, served: ServedVersion, method: str) -> MethodGate:
        """``served.method_gate(method)``, built once per served version and method: a served
        version is an immutable snapshot (report, package, research mode), so its gates are too.
        Every request still checks the gate it gets (servable, settings covered)."""
        hit = self._gates.get((id(served), method))
        if hit is not None and hit[0] is served:
            return hit[1]
        if len(self._gates) >= GATES_CACHE_SIZE:
            self._gates.clear()
        gate = served.method_gate(method)
        self._gates[(id(served), method)] = (served, gate)
        return gate

    def _batched(self, stats: BatchStats) -> None:
        self.metrics.batched(stats)

    # ------------------------------------------------------------------ lookups

    def served(self, model: str, version: str | None = None) -> ServedVersion:
        """The serving version (None or "": the default); NotFound / FailedPrecondition otherwise."""
        if not model:
            raise InvalidArgument("model is empty; ListModels lists the models")
        return self.repository.get(model, version or None)

    def cancel_all(self, reason: str = "the server is shutting down") -> int:
        """Cancel every running and queued request (shutdown); how many there were."""
        return self.admission.cancel_all(reason)

    # ------------------------------------------------------------------ predict

    def predict(self, request: PredictRequest) -> PredictResult:
        """Probabilities and logits of the request's ECGs (one forward pass)."""
        started = time.perf_counter()
        served = self.served(request.model, request.version)
        note_call(served, batch_size=_count(request.ecgs))
        self._check_batch(served, request.ecgs)
        cost = _count(request.ecgs)
        self._check_budget(cost, "Predict")
        with self.admission.admit(request.caller, request.cancel):
            x, ids, waveforms = self._inputs(served, request.ecgs)
            logits, engine_s = self._predict_rows(served, x, request.cancel)
        note_call(served, engine_s=engine_s)
        probs = sigmoid(logits)
        if self.metrics is not None:
            self.metrics.predicted(served, probs)
        return PredictResult(
            facts=self._facts_of(served),
            probabilities=probs,
            logits=np.asarray(logits, dtype=np.float32),
            beats=x,
            ecg_ids=ids,
            ecg_waveforms=waveforms,
            research_mode=bool(served.ungated),
            compute_seconds=time.perf_counter() - started,
            cost=cost,
        )

    # ------------------------------------------------------------------ explain

    def explain(self, request: ExplainRequest) -> ExplainResult:
        """Attributions of every method for every target of every ECG, under the gate."""
        started = time.perf_counter()
        plan = self._plan(request)
        served = plan.served
        with self.admission.admit(request.caller, request.cancel):
            x, ids, waveforms = self._inputs(served, request.ecgs)
            done = self._explain_rows(plan, x, request.cancel)
        logits, targets, results = done.logits, done.targets, done.results
        keys = served.engine.package.class_keys
        note_call(served, targets=sorted({keys[c] for t in targets for c in t}), engine_s=done.engine_s)
        probs = sigmoid(logits)
        if self.metrics is not None:
            self.metrics.predicted(served, probs)
        return ExplainResult(
            facts=self._facts_of(served),
            probabilities=probs,
            logits=np.asarray(logits, dtype=np.float32),
            beats=x,
            ecg_ids=ids,
            ecg_waveforms=waveforms,
            research_mode=bool(served.ungated) or any(g.ungated for g in plan.gates.values()),
            compute_seconds=time.perf_counter() - started,
            cost=plan.cost,
            targets=tuple(tuple(t) for t in targets),
            attributions=_attribution_results(plan, targets, results),
        )

    def _plan(self, request: ExplainRequest) -> _Plan:
        """Every check an Explain gets before any work: methods and settings, the version and its
        gate, the batch, targets, values, the gate's coverage, the budget and the response size."""
        names = self._check_methods(request.methods)
        note_call(None, methods=names, batch_size=_count(request.ecgs))
        require_scope(request.caller, EXPLAIN, "explain")
        served = self.served(request.model, request.version)
        note_call(served)
        gates = {m.name: _servable_gate(served, self._gate_of(served, m.name)) for m in request.methods}
        self._check_batch(served, request.ecgs)
        targets = _per_ecg_targets(request.targets, _count(request.ecgs), served.engine.package)
        effective = {m.name: self._effective(m, gates[m.name]) for m in request.methods}
        cost = self._cost(served, targets, effective)  # bad values: InvalidArgument, before coverage
        gates = {m.name: _covered_gate(served, m, gates[m.name]) for m in request.methods}
        self._check_budget(cost, "Explain")
        self._check_response_size(served, targets, len(names), fhir=request.fhir)
        return _Plan(served, names, gates, targets, effective, cost)

    def _attribute(
        self,
        served: ServedVersion,
        engine: Any,
        x: np.ndarray,
        plan: list[tuple[Target, str]],
        effective: dict[str, dict[str, Any]],
        clock: EngineClock,
        parts: Sequence[slice],
    ) -> tuple[np.ndarray, list[list[int]], Results]:
        """Run every method on every target slot. The forward graph runs at most once: first, when
        targets depend on the prediction; else the logits come from an attribution's backward pass
        over all ECGs when one gives them, and from the forward graph at the end otherwise.
        ``parts``: the rows of each request merged into ``x`` (one slice when it is one request)."""
        package = engine.package
        logits = None
        if any(t.kind in NEEDS_PREDICTION for t, _ in plan):
            with clock:
                logits = engine.logits(x)
        probs = None if logits is None else sigmoid(logits)
        targets = [
            _resolve(t, None if probs is None else probs[i], package, w) for i, (t, w) in enumerate(plan)
        ]
        slots = max(len(t) for t in targets)  # slot j holds the j-th target of every ECG that has one
        results: dict[tuple[int, str, int], tuple[np.ndarray, float]] = {}
        for m, params in effective.items():
            for j in range(slots):
                rows = [i for i, t in enumerate(targets) if len(t) > j]
                cls = np.array([targets[i][j] for i in rows], dtype=np.int64)
                every = len(rows) == len(x)
                xs = x if every else x[rows]
                t0 = time.perf_counter()
                with clock:
                    maps, got = engine.attribute_with_logits(m, xs, cls, **params)
                share = (time.perf_counter() - t0) / len(rows)
                if self.metrics is not None:  # hands samples to the stability worker; never waits
                    self._offer(served, m, params, parts, rows, xs, cls, maps)
                if logits is None and every and got is not None:
                    logits = got
                for k, i in enumerate(rows):
                    results[(i, m, j)] = (maps[k], share)
        if logits is None:
            with clock:
                logits = engine.logits(x)
        return logits, targets, results

    def _offer(
        self,
        served: ServedVersion,
        method: str,
        params: dict[str, Any],
        parts: Sequence[slice],
        rows: list[int],
        xs: np.ndarray,
        cls: np.ndarray,
        maps: np.ndarray,
    ) -> None:
        """One stability offer per request (a merged run offers each request's rows on their own,
        so the sampled share of requests does not depend on batching)."""
        if len(parts) == 1:
            self.metrics.explained(served, method, params, xs, cls, maps)
            return
        for part in parts:
            mine = [k for k, i in enumerate(rows) if part.start <= i < part.stop]
            if mine:
                self.metrics.explained(served, method, params, xs[mine], cls[mine], maps[mine])

    # ------------------------------------------------------------------ dynamic batching

    def _batch_key(self, plan: _Plan) -> tuple[Any, ...] | None:
        """What a request's engine work must share with another's to be merged into one call; None
        when it may not be merged: a stochastic method (its noise is drawn over the whole batch, so
        merging would change the answer for the same seed), or a setting that is not a scalar (a
        per-ECG baseline list describes this request's rows only)."""
        for m, params in plan.effective.items():
            if get_method(m).stochastic or not all(_scalar(v) for v in params.values()):
                return None
        settings = json.dumps([[m, plan.effective[m]] for m in plan.names], sort_keys=True)
        # Targets that need the prediction run the forward graph first, over every merged row:
        # kept apart from those whose logits come free with the backward pass.
        predicted = any(t.kind in NEEDS_PREDICTION for t, _ in plan.targets)
        return ("explain", id(plan.served), settings, predicted)

    def _merge(self, served: ServedVersion, rows: int) -> bool:
        """Whether a request of ``rows`` ECGs goes through the batcher (a request as large as a
        batch gains nothing by waiting for others)."""
        policy = self.batcher.config.for_model(served.model)
        return policy.enabled and rows < policy.preferred_batch_size

    def _predict_rows(self, served: ServedVersion, x: np.ndarray, cancel: Any) -> tuple[np.ndarray, float]:
        """The logits of ``x`` and the engine time they cost, merged with concurrent Predicts."""
        if not self._merge(served, len(x)):
            return self._logits_batch(served, [Job(len(x), len(x), cancel, x)], cancel)[0]
        return self.batcher.submit(
            ("predict", id(served)),
            Job(len(x), len(x), cancel, x),
            lambda jobs, token: self._logits_batch(served, jobs, token),
            model=served.model,
            owner=served,
            max_cost=_merge_cap(served),
        )

    @staticmethod
    def _logits_batch(served: ServedVersion, jobs: list[Job], cancel: Any) -> list[tuple[np.ndarray, float]]:
        x = jobs[0].payload if len(jobs) == 1 else np.concatenate([j.payload for j in jobs])
        engine = served.engine.with_cancel(cancel)
        with EngineClock() as clock:
            logits = engine.logits(x)
        return [(logits[p], clock.seconds * (p.stop - p.start) / len(x)) for p in _parts(jobs)]

    def _explain_rows(self, plan: _Plan, x: np.ndarray, cancel: Any) -> _Explained:
        """Every attribution of one request, merged with concurrent requests of the same key."""
        served = plan.served
        key = self._batch_key(plan) if self._merge(served, len(x)) else None
        job = Job(len(x), plan.cost, cancel, (plan, x))
        if key is None:
            return self._explain_batch(served, [job], cancel)[0]
        label = plan.names[0] if len(plan.names) == 1 else "multiple"
        return self.batcher.submit(
            key,
            job,
            lambda jobs, token: self._explain_batch(served, jobs, token),
            model=served.model,
            label=label,
            owner=served,
            max_cost=_merge_cap(served),
        )

    def _explain_batch(self, served: ServedVersion, jobs: list[Job], cancel: Any) -> list[_Explained]:
        """One engine run over the rows of ``jobs`` (same key), split back per job."""
        plans = [j.payload[0] for j in jobs]
        x = jobs[0].payload[1] if len(jobs) == 1 else np.concatenate([j.payload[1] for j in jobs])
        parts = _parts(jobs)
        targets_in = [t for p in plans for t in p.targets]
        engine = served.engine.with_cancel(cancel)
        clock = EngineClock()
        logits, targets, results = self._attribute(
            served, engine, x, targets_in, plans[0].effective, clock, parts
        )
        if len(jobs) == 1:
            return [_Explained(logits, targets, results, clock.seconds)]
        own: list[Results] = [{} for _ in jobs]
        starts = [p.start for p in parts]
        for (i, m, j), value in results.items():
            k = bisect.bisect_right(starts, i) - 1
            own[k][(i - parts[k].start, m, j)] = value
        return [
            _Explained(logits[p], targets[p], own[k], clock.seconds * (p.stop - p.start) / len(x))
            for k, p in enumerate(parts)
        ]

    # ------------------------------------------------------------------ checks before any work

    @staticmethod
    def _check_methods(methods: Sequence[MethodCall]) -> list[str]:
        names = [m.name for m in methods]
        if not names:
            raise InvalidArgument(f"give at least one method; known: {', '.join(METHOD_NAMES)}")
        twice = sorted({m for m in names if names.count(m) > 1})
        if twice:
            raise InvalidArgument(f"method(s) {twice} named more than once")
        for m in methods:
            get_method(m.name).check_params(dict(m.settings))  # NotFound / InvalidArgument
        return names

    @staticmethod
    def _effective(call: MethodCall, gate: MethodGate) -> dict[str, Any]:
        """Every setting as it will run: a setting not asked for is the one the gate checked (else
        the method's default), and a stochastic method without a seed gets one drawn here and
        reported, so the answer can be reproduced."""
        impl = get_method(call.name)
        defaults = impl.parameters()
        checked = {k: v for k, v in (gate.settings.checked if gate.settings else {}).items() if k in defaults}
        effective = {**defaults, **checked, **call.settings}
        if impl.stochastic and effective.get("seed") is None:
            effective["seed"] = secrets.randbelow(2**31)
        return effective

    def _check_batch(self, served: ServedVersion, ecgs: np.ndarray | Sequence[Any]) -> None:
        """The batch's size, and an array's shape (payloads are decoded later, inside a slot)."""
        if isinstance(ecgs, np.ndarray):
            leads, samples = served.engine.package.input_shape
            if ecgs.ndim != 3 or ecgs.shape[1:] != (leads, samples):
                raise InvalidArgument(
                    f"the ECGs must have shape [batch, {leads}, {samples}] (median beats at 500 Hz, "
                    f"lead-major), got {list(ecgs.shape)}"
                )
        n = _count(ecgs)
        if n == 0:
            raise InvalidArgument("the request holds no ECG (batch size 0)")
        if n > self.max_batch:
            note_call(refusal="max_batch")
            raise ResourceExhausted(
                f"the request holds {n} ECGs; this server takes at most {self.max_batch} per request "
                "(--max-batch): send them in several requests"
            )

    def _cost(
        self, served: ServedVersion, plan: list[tuple[Target, str]], effective: dict[str, dict[str, Any]]
    ) -> int:
        """Model rows the request needs at most: the forward pass, plus for every ECG, target and
        method the method's rows per ECG (its ``check``, which also refuses bad settings)."""
        package = served.engine.package
        shape = (len(plan), *package.input_shape)
        per_ecg = sum(self._rows_per_ecg(m, params, shape) for m, params in effective.items())
        targets = sum(_most_targets(t, package.n_classes) for t, _ in plan)
        return len(plan) + targets * per_ecg

    def _rows_per_ecg(self, method: str, params: dict[str, Any], shape: tuple[int, ...]) -> int:
        """The method's ``check`` (bad settings refused, model rows per ECG) for inputs of
        ``shape``. It reads only the settings and the shape, so a passed check is remembered per
        (method, settings, shape): a repeat request gets the same answer without re-running it.
        A failed check is never remembered (every request that fails it runs it and gets the error)."""
        try:
            key = (method, tuple(sorted((k, type(v), v) for k, v in params.items())), shape)
            hit = self._checked.get(key)
        except TypeError:  # a setting that is not hashable (a list): checked every time
            key, hit = None, None
        if hit is not None:
            return hit
        x = np.broadcast_to(np.zeros((), np.float32), shape)  # checks read the shape only; no memory
        rows = get_method(method).check(x, **params)
        if key is not None:
            if len(self._checked) >= CHECKS_CACHE_SIZE:
                self._checked.clear()
            self._checked[key] = rows
        return rows

    def _check_budget(self, cost: int, what: str) -> None:
        budget = self.quotas.max_request_cost
        if budget is not None and cost > budget:
            note_call(refusal="cost_budget")
            raise ResourceExhausted(
                f"this {what} request costs {cost:,} model rows (ECGs x targets x methods x each method's "
                f"rows per ECG), over the per-request budget of {budget:,} (max_request_cost, "
                "--max-request-cost): send fewer ECGs, targets or methods, or lower sample/step counts"
            )

    def _check_response_size(
        self, served: ServedVersion, plan: list[tuple[Target, str]], methods: int, fhir: bool = False
    ) -> None:
        """Refuse, before any work, a response that could not be sent."""
        n_classes = served.engine.package.n_classes
        n = sum(_most_targets(t, n_classes) for t, _ in plan) * methods
        values = math.prod(served.engine.package.input_shape)
        size = (n + len(plan)) * (4 * values + 1024)  # maps, beats, per-entry fields
        if fhir:  # the ECG and the map as decimal text, and the Observation's fixed fields
            size += n * (2 * fhir_output.BYTES_PER_VALUE * values + 16 * 1024)
        if size > self.max_response_bytes:
            note_call(refusal="response_size")
            raise ResourceExhausted(
                f"the response would hold {n} attributions ({size / 2**20:.0f} MiB), over the "
                f"{self.max_response_bytes / 2**20:.0f} MiB message limit: ask for fewer ECGs, methods or "
                "targets per request"
            )

    def _inputs(
        self, served: ServedVersion, ecgs: np.ndarray | Sequence[Any]
    ) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
        """The checked (B, leads, samples) float32 mV inputs, the payloads' ids, and what each input
        was made from (``ecg_input.WAVEFORMS``; none for an array)."""
        engine = served.engine
        if isinstance(ecgs, np.ndarray):  # its shape was checked by _check_batch
            return engine.check_inputs(ecgs), ("",) * len(ecgs), ()
        spec = ModelInput.of_manifest(engine.package.manifest)
        beats, waveforms = decode_inputs(ecgs, engine.package.leads, spec, max_batch=self.max_batch)
        ids = tuple(str(getattr(e, "id", "") or "") for e in ecgs)
        return engine.check_inputs(beats), ids, waveforms


__all__ = [
    "MAX_RESPONSE_BYTES",
    "ServingCore",
    "class_of",
    "gate_info",
    "lead_shares",
    "parse_settings_json",
    "settings_violation",
    "sigmoid",
]
