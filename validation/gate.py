"""The validation gate: every check, for every method, on the exact package that will be served.

``run_gate`` loads the package (verifying its hashes), its seed family and a
validation dataset, computes each method's attributions through the package's
ONNX graphs, runs the five checks of DESIGN.md and decides per method and
overall with the policy. The result is the gate report (a JSON-ready dict), and
the arrays behind it for figures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import ecgx
from ecgx.core.dataset import Dataset, dataset_fingerprint, load_dataset
from ecgx.core.errors import InvalidArgument
from ecgx.core.package_reader import MANIFEST_FILE, ModelPackage, load_package, sha256_file
from ecgx.core.progress import progress_bar
from ecgx.core.similarity import mean_pairwise_pearson, pearson_rows
from ecgx.service.engine import AttributionEngine, select_providers
from ecgx.service.methods import METHOD_NAMES, get_method, unavailable_methods
from ecgx.validation import checks
from ecgx.validation.bootstrap import Interval, bootstrap_difference
from ecgx.validation.changed_model import CHANGED_MODELS, changed_models
from ecgx.validation.leakage import check_leakage, leakage_record
from ecgx.validation.localisation import localisation_scores
from ecgx.validation.perturbation import (
    PerturbationCurves,
    lead_basis,
    perturbation_curves_on,
    target_logit,
)
from ecgx.validation.policy import (
    CHECKS,
    CONTROL_METHOD,
    Policy,
    check_floor,
    load_policy,
    may_differ,
    validated,
)
from ecgx.validation.randomisation import (
    Attributor,
    RandomisationSetup,
    n_steps,
    randomisation_curves,
    randomisation_models,
)
from ecgx.validation.references import (
    FRESH_DRAWS,
    PERTURBATION_FLOOR,
    class_templates,
    is_reference,
    reference_attributors,
)
from ecgx.validation.user_methods import (
    UserCall,
    checked_attributor,
    method_spec,
    run_user_methods,
    user_report,
)

log = logging.getLogger(__name__)

SCHEMA = "ecgx-gate-report"
# 2: user methods under "user_methods" (not "methods"), the changed_model check, per-method
# "settings", perturbation judged against the strongest model-independent row.
SCHEMA_VERSION = 2
# A second, independent draw of the random control: what the control's own scores are measured
# against, so they are measurements and not zero by construction.
CONTROL_REDRAW = f"{CONTROL_METHOD} (independent draw)"
# The stream of the control's seeds, apart from every other draw of the gate.
_CONTROL_STREAM = 0xC0


@dataclass
class GateData:
    """The validation ECGs the gate uses, each with the class it explains."""

    x: np.ndarray  # (B, 12, 600) float32
    target: np.ndarray  # (B,) class index
    masks: np.ndarray | None  # (B, 12, 600) bool, the target class's ground truth; None without
    indices: np.ndarray  # rows of the dataset
    fingerprint: str  # of the whole dataset
    path: str

    @property
    def sha256(self) -> str:
        """Hash of exactly what was evaluated: the selected signals and targets."""
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        h.update(self.target.astype(np.int64).tobytes())
        return h.hexdigest()


@dataclass
class GateRun:
    """A gate report and the arrays behind it (for the experiments report's figures)."""

    report: dict[str, Any]
    data: GateData
    maps: dict[str, np.ndarray]  # method -> attributions on the gated package
    family_maps: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report["verdict"] == checks.PASS


def select_ecgs(ds: Dataset, n: int, seed: int, class_keys: Sequence[str]) -> GateData:
    """Up to ``n`` ECGs in class-balanced order: classes take turns, each offering one of its
    positive ECGs (shuffled with ``seed``) not taken yet; that class is the ECG's target."""
    keys = [c["key"] for c in ds.meta.get("classes", [])]
    if keys and keys != list(class_keys):
        raise InvalidArgument(
            f"dataset {ds.path} has classes {keys}, but the package predicts {list(class_keys)}"
        )
    labels = np.asarray(ds.labels)
    if len(ds) == 0 or not labels.any():
        raise InvalidArgument(
            f"dataset {ds.path} has no labelled ECG; the gate needs labelled validation ECGs"
        )
    rng = np.random.default_rng([seed, 1])
    queues = [list(rng.permutation(np.flatnonzero(labels[:, c]))) for c in range(labels.shape[1])]
    taken: set[int] = set()
    rows, targets = [], []
    while len(rows) < n and any(queues):
        for c, queue in enumerate(queues):
            while queue and int(queue[0]) in taken:
                queue.pop(0)
            if queue and len(rows) < n:
                i = int(queue.pop(0))
                taken.add(i)
                rows.append(i)
                targets.append(c)
    # Keep the class-balanced order, so any prefix (the randomisation check uses one) is
    # balanced too; read the memory map in file order and put the rows back.
    idx, target = np.asarray(rows), np.asarray(targets, np.int64)
    order = np.argsort(idx, kind="stable")
    back = np.argsort(order)
    x = np.ascontiguousarray(np.asarray(ds.signals[idx[order]], dtype=np.float32)[back])
    masks = None
    if ds.has_ground_truth:
        raw = np.asarray(ds.masks[idx[order]])[back]
        masks = ((raw >> target[:, None, None].astype(np.uint16)) & 1).astype(bool)
    return GateData(x, target, masks, idx, dataset_fingerprint(ds), str(ds.path))


def method_attributor(name: str, seed: int) -> Attributor:
    """The served method ``name`` with default settings; stochastic methods get ``seed``, the
    same for every model, so differences come from the model and not from the draws.
    The random control is the exception (:func:`control_attributor`)."""
    if name == CONTROL_METHOD:
        return control_attributor(seed)
    params = {"seed": seed} if get_method(name).stochastic else {}

    def attribute(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        return engine.attribute(name, x, target, **params)

    return attribute


def control_attributor(seed: int) -> Attributor:
    """The random control, drawn afresh on every call: each model (randomised and changed
    copies, family members) and each input gets its own draw, seeded from the policy's seed and
    the call's number (the gate calls it in a fixed order), never from the package. Its scores
    are then measurements: its randomisation similarity compares independent draws, its
    self-consistency draws of other models, and its faithfulness is compared with another draw
    (:data:`CONTROL_REDRAW`), so the report shows the floor as measured."""
    calls = itertools.count()
    lock = threading.Lock()

    def control(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        with lock:
            n = next(calls)
        draw = int(np.random.SeedSequence([seed, _CONTROL_STREAM, n]).generate_state(1)[0])
        return engine.attribute(CONTROL_METHOD, x, target, seed=draw)

    return control


def run_gate(
    package: str | Path,
    data: str | Path,
    *,
    family: Sequence[str | Path] = (),
    policy: Policy | str | Path | None = None,
    methods: Sequence[str] | None = None,
    attributors: Mapping[str, Attributor] | None = None,
    providers: Sequence[str] | None = None,
    workers: int | None = None,
    show_progress: bool = True,
    research: bool = False,
    reuse: bool = True,
    ray: str | None = None,
    ray_cache: str | Path | None = None,
) -> GateRun:
    """Gate ``package`` on the validation dataset ``data``.

    Args:
        family: other packages of the same configuration trained from other seeds
            (self-consistency needs at least one).
        policy: a :class:`Policy`, a TOML file, or None for the defaults.
        methods: method names to check (default: all); the random control always runs.
            A method the package cannot run (a graph the export left out, see the manifest's
            ``unavailable``) is not checked: the report lists it under ``unavailable`` with the
            reason, and never serves it.
        attributors: user-supplied methods by name, ``attribute(engine, x, target)``
            (:mod:`ecgx.validation.user_methods`); each result is checked, and they are gated
            for information only: listed under ``user_methods``, never served, never counted
            towards the verdict, the headline or another method's scores.
        workers: methods computed side by side (default: CPU count), one ONNX Runtime
            thread each.
        research: gate under a policy below the floor (:data:`ecgx.validation.policy.POLICY_FLOOR`),
            which is refused otherwise; the report is marked research and not servable.
        reuse: compute shared work once per run (:class:`_Context`): a randomised model equal
            to an earlier one keeps its engine and maps, each trained map is ranked once, the
            clean logits are computed once per model, the other model's maps once per set of
            ECGs, a map that is the same on several changed models is perturbed once for all of
            them, and the linear and noisy-linear replacements share their straight lines where
            they remove the same segments. False recomputes everything (the path before issue
            21, for the benchmark); the report's numbers are the same either way.
        ray: run the gate's calls on a Ray cluster (``auto``, ``local`` or HOST:PORT;
            :mod:`ecgx.validation.ray_backend`) with ``workers`` actors (default: one per cluster
            CPU); the report's numbers are the same as without. The report records where it ran
            (``execution``). ``ray_cache``: the node-local folder of package copies.

    Refuses (ValueError, before any computation) a policy below the floor without
    ``research``, and validation ECGs that overlap the package's training data
    (:mod:`ecgx.validation.leakage`).
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidArgument(f"workers must be a positive integer, got {workers!r}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pol = validated(policy) if isinstance(policy, Policy) else load_policy(policy)
    below_floor = check_floor(pol, research)
    pkg = load_package(package)
    unavailable = unavailable_methods(pkg)
    attrib = _attributors(methods, attributors, pol.seed, unavailable)
    user = {m: attrib.pop(m) for m in attributors or {}}
    fam = [load_package(p) for p in family]
    _check_family(pkg, fam)
    ds = load_dataset(data)
    if tuple(ds.signals.shape[1:]) != tuple(pkg.input_shape):
        raise InvalidArgument(
            f"dataset {ds.path} holds ECGs of shape {tuple(ds.signals.shape[1:])} (leads, samples), but the "
            f"package takes {tuple(pkg.input_shape)}: validate on data of the model's own input (a model "
            "brought from elsewhere needs validation data at its length and sampling rate)"
        )
    gd = select_ecgs(ds, pol.n_ecgs, pol.seed, pkg.class_keys)
    warnings = check_leakage(pkg, ds, gd.indices)  # refuses training data, before any computation
    warnings += check_coverage(ds, gd, pol, pkg.class_keys)
    warnings += [f"research mode: the policy is below the floor: {v}" for v in below_floor]
    with _backend(ray, [pkg, *fam], workers, ray_cache) as backend:
        workers = backend.workers if backend else workers or os.cpu_count() or 1
        ctx = _Context(
            pkg, pol, gd, attrib, providers, workers, show_progress, fam, user, reuse=reuse, backend=backend
        )
        timings["load"] = time.perf_counter() - started

        if user:  # before any built-in work, in an order the methods cannot predict
            ctx.timed(
                timings,
                "user_methods",
                lambda: ctx.user_maps.update(run_user_methods(user, ctx.user_calls())),
            )
        maps = ctx.timed(timings, "attributions", lambda: ctx.attribute_all(ctx.trained, key=("trained",)))
        family_maps = [
            ctx.timed(
                timings,
                f"family_{i}",
                lambda i=i, p=p: ctx.attribute_all(ctx.engine(package=p), key=("family", i)),
            )
            for i, p in enumerate(fam)
        ]
        entries: dict[str, dict[str, Any]] = {m: {} for m in ctx.all_methods}
        ctx.timed(timings, "randomisation", lambda: ctx.randomisation(maps, entries))
        ctx.timed(timings, "perturbation", lambda: ctx.perturbation(maps, entries))
        ctx.timed(timings, "changed_model", lambda: ctx.changed_model(entries))
        ctx.self_consistency(maps, family_maps, entries)
        matrix = ctx.inter_method(maps, entries)
        ctx.localisation(maps, entries)
        timings["total"] = time.perf_counter() - started
        report = _report(
            ctx,
            fam,
            {m: e for m, e in entries.items() if m not in user},
            matrix,
            timings,
            warnings,
            unavailable,
        )
        report["leakage"] = leakage_record(pkg)
        report["execution"] = {"backend": "ray" if backend else "local", "workers": workers}
        user_report(report, user, {m: _row(entries[m]) for m in user})
        report["research"] = research
        report["servable"] = report["verdict"] == checks.PASS and not research
        if research:
            report["headline"] = (
                f"RESEARCH report, not servable (ecgx validate --research): {report['headline']}"
            )
        return GateRun(report, gd, maps, family_maps)


def _backend(
    ray: str | None, packages: list[ModelPackage], workers: int | None, cache: str | Path | None
) -> contextlib.AbstractContextManager:
    """The Ray backend for ``--ray`` (imported only then), else nothing: the local thread pool."""
    if ray is None:
        return contextlib.nullcontext()
    from ecgx.validation.ray_backend import connect

    return connect(ray, packages, workers, None if cache is None else str(cache))


def _row(method_checks: dict[str, Any]) -> dict[str, Any]:
    verdict, reasons = checks.method_verdict(method_checks)
    return {"verdict": verdict, "reasons": reasons, "checks": method_checks}


def method_settings(name: str, policy: Policy) -> dict[str, Any]:
    """What a built-in method's verdict covers: every public setting as the gate ran it (the
    method's defaults; the seed of a stochastic method aside) and how each may differ when
    served (``serving.may_differ``; a stochastic method's seed always "any")."""
    method = get_method(name)
    checked = {k: v for k, v in method.parameters().items() if not (method.stochastic and k == "seed")}
    return {"checked": json.loads(json.dumps(checked)), "may_differ": may_differ(policy, name)}


def _attributors(
    methods: Sequence[str] | None,
    extra: Mapping[str, Attributor] | None,
    seed: int,
    unavailable: Mapping[str, str] | None = None,
) -> dict[str, Attributor]:
    names = list(METHOD_NAMES if methods is None else methods)
    for name in names:
        if name not in METHOD_NAMES and name not in (extra or {}):
            raise InvalidArgument(f"unknown attribution method {name!r}; known: {', '.join(METHOD_NAMES)}")
    if CONTROL_METHOD not in names:
        names.append(CONTROL_METHOD)
    # Methods the package cannot run are not checked (the report says why); user methods always run.
    names = [n for n in names if n not in (unavailable or {})]
    out = {n: method_attributor(n, seed) for n in names if n in METHOD_NAMES}
    out.update({n: checked_attributor(n, fn, method_spec(fn)) for n, fn in (extra or {}).items()})
    return out


def check_coverage(ds: Dataset, gd: GateData, policy: Policy, class_keys: Sequence[str]) -> list[str]:
    """What the validation ECGs lack for ``policy``, as warnings for the report.

    Data that has fewer labelled ECGs than ``gate.ecgs`` asks for, or no ECG of a class the
    package predicts, is refused (ValueError, before any computation) unless the policy sets
    ``gate.allow_incomplete_data``; then it is gated and the shortfall becomes a warning. A
    class the data has but the policy's ``gate.ecgs`` leaves out (fewer ECGs than classes) is
    the policy's own choice: a warning, never a refusal.
    """
    labels = np.asarray(ds.labels, bool)
    available = int(labels.any(axis=1).sum())
    absent = [k for c, k in enumerate(class_keys) if not labels[:, c].any()]
    shortfalls = []
    if available < policy.n_ecgs:
        shortfalls.append(
            f"the data has {available} labelled ECG(s) but the policy asks for gate.ecgs = {policy.n_ecgs}"
        )
    if absent:
        shortfalls.append(
            f"the data has no ECG of class(es) {', '.join(absent)}, so their explanations go unchecked"
        )
    if shortfalls and not policy.allow_incomplete_data:
        fixes = []
        if available < policy.n_ecgs:
            fixes.append(
                f"give at least {policy.n_ecgs} labelled ECGs (or lower gate.ecgs in a --policy file)"
            )
        if absent:
            fixes.append("give ECGs of every class")
        raise InvalidArgument(
            f"validation data {ds.path} is too small for policy {policy.label}: {'; '.join(shortfalls)}. "
            f"To proceed, {' and '.join(fixes)}, or set gate.allow_incomplete_data = true in a --policy "
            "file to gate it anyway (the report then records what is missing)"
        )
    warnings = [f"incomplete validation data, allowed by gate.allow_incomplete_data: {s}" for s in shortfalls]
    left_out = [k for c, k in enumerate(class_keys) if k not in absent and not (gd.target == c).any()]
    if left_out:
        warnings.append(
            f"gate.ecgs = {policy.n_ecgs} is fewer ECGs than classes: no ECG of class(es) "
            f"{', '.join(left_out)} was gated, although the data has some"
        )
    return warnings


def _check_family(pkg: ModelPackage, fam: list[ModelPackage]) -> None:
    """Family members must be other models: a copy of the gated package (in any folder), or one
    member given twice, would agree with itself perfectly, the random control included."""
    seen = {_weights_id(pkg): pkg}
    paths = {pkg.path.resolve(): pkg}
    for other in fam:
        first = paths.get(other.path.resolve())
        if first is pkg:
            raise InvalidArgument(
                f"--family lists the gated package {pkg.path} itself; give its seed siblings"
            )
        if first is not None:
            also = "" if str(first.path) == str(other.path) else f" (as {first.path} and as {other.path})"
            raise InvalidArgument(
                f"--family lists the package {first.path} twice{also}; give each sibling once"
            )
        if other.class_keys != pkg.class_keys or other.input_shape != pkg.input_shape:
            raise InvalidArgument(
                f"family package {other.path} has other classes or input shape than {pkg.path}"
            )
        weights = _weights_id(other)
        same = seen.get(weights)
        why = (
            "self-consistency against a copy is 1.0 for every method, the random control included; "
            "give packages trained from other seeds"
        )
        if same is pkg:
            raise InvalidArgument(
                f"family member {other.path} has the same weights as the gated package {pkg.path} "
                f"(a copy, not a seed sibling): {why}"
            )
        if same is not None:
            raise InvalidArgument(
                f"family members {same.path} and {other.path} have the same weights (one is a copy of "
                f"the other): {why}"
            )
        seen[weights] = other
        paths[other.path.resolve()] = other


def _weights_id(pkg: ModelPackage) -> str:
    """Hash of the package's parameter values (not of its files, nor the parameters' names), so
    a copy is recognised in any folder, re-exported or with its files laid out differently."""
    tensors = sorted(
        hashlib.sha256(repr(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest()
        for a in pkg.read_parameters().values()
    )
    return hashlib.sha256("".join(tensors).encode()).hexdigest()


@dataclass
class _Context:
    """What every step of one gate run shares."""

    pkg: ModelPackage
    policy: Policy
    data: GateData
    methods: dict[str, Attributor]  # built-in methods, then the reference rows
    providers: Sequence[str] | None
    workers: int
    show_progress: bool
    family: list[ModelPackage] = field(default_factory=list)
    user: dict[str, Attributor] = field(default_factory=dict)  # for information only
    user_maps: dict[Any, dict[str, np.ndarray]] = field(default_factory=dict)  # by model key
    # Work shared between checks is done once (run_gate's ``reuse``); all of it lives in this
    # run's context and goes with it.
    reuse: bool = True
    # Where the calls of :meth:`run_calls` run: None, this process's threads; else a Ray backend
    # (:class:`ecgx.validation.ray_backend.RayBackend`).
    backend: Any = None

    def __post_init__(self) -> None:
        # Every run scores the model-independent reference rows beside the methods.
        templates = class_templates(self.data.x, self.data.target, len(self.pkg.class_keys))
        sibling = self.family[0] if self.family else None
        refs = reference_attributors(self.pkg, self.policy.seed, self.engine, sibling, templates, self.reuse)
        self.methods = {**self.methods, **refs}

    @property
    def all_methods(self) -> list[str]:
        return [*self.methods, *self.user]

    @functools.cached_property
    def trained(self) -> AttributionEngine:
        """The engine on the gated package as it will be served (attributions, perturbation)."""
        return self.engine()

    def engine(self, package: ModelPackage | None = None, overrides=None) -> AttributionEngine:
        threads = 1 if self.workers > 1 or self.backend else None
        # The policy bounds the gate's own work; the per-request caps are for served requests.
        # A backend's engines are the same, and it knows how to build them again on a worker.
        make = AttributionEngine if self.backend is None else self.backend.engine
        return make(
            package or self.pkg,
            providers=self.providers,
            threads=threads,
            parameters=overrides,
            max_request_ecgs=None,
            max_request_rows=None,
        )

    def timed(self, timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        log.info("gate: %s took %.1f s", name, timings[name])
        return out

    def parallel(self, fn: Callable[[str], Any], names: Sequence[str], desc: str | None) -> dict[str, Any]:
        """``fn`` of every name, ``workers`` at a time; a progress bar unless ``desc`` is None."""
        return self.run_calls({n: functools.partial(fn, n) for n in names}, desc)

    def run_calls(self, calls: Mapping[Any, Callable[[], Any]], desc: str | None) -> dict[Any, Any]:
        """Every call's result by key, ``workers`` at a time, on this process's threads or on the
        Ray backend (each call whole: the unit of work whose seeds the local run draws)."""
        enabled = self.show_progress and desc is not None
        with progress_bar(total=len(calls), desc=desc or "", unit="method", enabled=enabled) as bar:
            if self.backend is not None:
                return dict(zip(calls, self.backend.map(list(calls.values()), bar.update), strict=True))

            def one(call: Callable[[], Any]) -> Any:
                out = call()
                bar.update(1)
                return out

            if self.workers <= 1:
                return {k: one(c) for k, c in calls.items()}
            with ThreadPoolExecutor(self.workers) as pool:
                return dict(zip(calls, pool.map(one, calls.values()), strict=True))

    def attribute_all(
        self,
        engine: AttributionEngine,
        x=None,
        target=None,
        *,
        key: tuple,
        desc: str | None = "",
        same_model: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every built-in method and reference row on ``engine``, and the user methods' maps of
        the model ``key`` names (computed before, in their own order: :meth:`user_calls`).
        ``same_model``: the maps of a model with the same weights on the same ECGs; each row
        that gives the same map for the same model and ECGs is taken from there, and only the
        rows drawn afresh on every call (:meth:`fresh`) are computed."""
        x = self.data.x if x is None else x
        target = self.data.target if target is None else target
        desc = f"attributions {engine.package.path.name}" if desc == "" else desc
        names = list(self.methods) if same_model is None else [m for m in self.methods if self.fresh(m)]
        # One call per method, binding only what it needs, so a backend can ship it on its own.
        calls = {m: functools.partial(self.methods[m], engine, x, target) for m in names}
        maps = self.run_calls(calls, desc)
        if same_model is not None:
            maps = {m: maps[m] if m in maps else same_model[m] for m in self.methods}
        return {**maps, **self.user_maps.get(key, {})} if self.user else maps

    @staticmethod
    def fresh(method: str) -> bool:
        """Whether ``method``'s map is drawn afresh on every call (the random control, each call
        its own seed; the unseeded reference row), so no call may stand in for another."""
        return method == CONTROL_METHOD or method in FRESH_DRAWS

    def randomisation_setup(self) -> RandomisationSetup:
        cfg = self.policy.check("randomisation")
        k = min(cfg["ecgs"], len(self.data.x))
        return RandomisationSetup(
            self.pkg,
            lambda overrides: self.engine(overrides=overrides),
            self.data.x[:k],
            self.data.target[:k],
            window=cfg["window"],
            draws=cfg["draws"],
            noise_scale=cfg["noise_scale"],
            seed=self.policy.seed,
            basis=lead_basis(self.pkg.leads),
        )

    def changed_ecgs(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.policy.check("changed_model")["ecgs"], len(self.data.x))
        return self.data.x[:n], self.data.target[:n]

    def user_calls(self) -> list[UserCall]:
        """Every model and input the user methods are run on: the trained model (the gate's ECGs
        and the noise floor's noisy ones), each randomised and changed copy, each family member."""
        x, t = self.data.x, self.data.target
        setup = self.randomisation_setup()
        seed = self.policy.seed
        calls: list[UserCall] = [
            (("trained",), lambda: self.trained, x, t),
            (("noisy",), lambda: self.trained, setup.noisy_x(), setup.target),
        ]
        calls += [
            (key, lambda o=o: self.engine(overrides=o), setup.x, setup.target)
            for key, o in randomisation_models(self.pkg, seed, setup.draws)
        ]
        calls += [
            (("family", i), lambda p=p: self.engine(package=p), x, t) for i, p in enumerate(self.family)
        ]
        cx, ct = self.changed_ecgs()
        draws = self.policy.check("changed_model")["draws"]
        calls += [
            (("changed", *key), lambda o=o: self.engine(overrides=o), cx, ct)
            for key, o in changed_models(self.pkg, seed, draws)
        ]
        return calls

    def randomisation(self, maps: dict[str, np.ndarray], entries: dict) -> None:
        cfg = self.policy.check("randomisation")
        setup = self.randomisation_setup()
        k, t = len(setup.x), setup.target
        steps = n_steps(self.pkg, cfg["draws"])
        with progress_bar(total=steps, desc="randomisation", unit="model", enabled=self.show_progress) as bar:

            def step_maps(
                engine: AttributionEngine, inputs: np.ndarray, key: tuple, same_model=None
            ) -> dict[str, np.ndarray]:
                return self.attribute_all(engine, inputs, t, key=key, desc=None, same_model=same_model)

            curves = randomisation_curves(
                setup,
                step_maps,
                {m: maps[m][:k] for m in self.all_methods},
                self.trained,
                on_step=lambda: bar.update(1),
                reuse=self.reuse,
            )
        for m, c in curves.items():
            entries[m]["randomisation"] = checks.randomisation_entry(c, cfg, self.policy.seed)

    def predicted(self) -> np.ndarray:
        """Which gate ECGs the trained model predicts its target for (logit above 0)."""
        logits = self.trained.logits(self.data.x)
        return logits[np.arange(len(self.data.x)), self.data.target] > 0

    def curves(
        self,
        engine: AttributionEngine,
        x: np.ndarray,
        t: np.ndarray,
        maps: Mapping[str, np.ndarray],
        desc: str | None = None,
    ) -> dict[str, PerturbationCurves]:
        """Perturbation curves of every map in ``maps`` on ``engine`` (the policy's settings); a
        progress bar named ``desc`` unless it is None."""
        across = self.curves_across([engine], x, t, [maps], desc)
        return {m: per_model[0] for m, per_model in across.items()}

    def curves_across(
        self,
        engines: Sequence[AttributionEngine],
        x: np.ndarray,
        t: np.ndarray,
        maps: Sequence[Mapping[str, np.ndarray]],
        desc: str | None = None,
    ) -> dict[str, list[PerturbationCurves]]:
        """Perturbation curves of every row on every model: row -> one per engine, from
        ``maps[i]`` (that model's maps) on ``engines[i]``. With reuse, each model's clean
        logits are computed once for all rows, and a map that is the same on several models
        (a row that ignores the model) is perturbed once and scored by each of them."""
        cfg = self.policy.check("perturbation")
        settings = {k: cfg[k] for k in ("strategies", "window", "steps", "noise_scale")}
        basis = lead_basis(self.pkg.leads)
        starts = [target_logit(e, x, t) if self.reuse else None for e in engines]
        tasks = [(m, group) for m in maps[0] for group in self.same_maps([mm[m] for mm in maps])]

        calls = {
            task: functools.partial(
                perturbation_curves_on,
                [engines[i] for i in group],
                x,
                t,
                maps[group[0]][m],
                seed=self.policy.seed,
                basis=basis,
                starts=[starts[i] for i in group],
                reuse=self.reuse,
                **settings,
            )
            for task, (m, group) in enumerate(tasks)
        }
        done = self.run_calls(calls, desc)
        out: dict[str, list[Any]] = {m: [None] * len(engines) for m in maps[0]}
        for task, (m, group) in enumerate(tasks):
            for i, curves in zip(group, done[task], strict=True):
                out[m][i] = curves
        return out

    def same_maps(self, per_model: Sequence[np.ndarray]) -> list[list[int]]:
        """The models as groups of equal maps (each its own group without reuse)."""
        if not self.reuse:
            return [[i] for i in range(len(per_model))]
        groups: list[list[int]] = []
        for i, a in enumerate(per_model):
            group = next((g for g in groups if np.array_equal(per_model[g[0]], a)), None)
            if group is None:
                groups.append([i])
            else:
                group.append(i)
        return groups

    def with_redraw(self, engine: AttributionEngine, x: np.ndarray, t: np.ndarray, maps: dict) -> dict:
        """``maps`` and a second, independent draw of the random control on ``engine``."""
        return {**maps, CONTROL_REDRAW: self.methods[CONTROL_METHOD](engine, x, t)}

    def perturbation(self, maps: dict[str, np.ndarray], entries: dict) -> None:
        """Faithfulness on the ECGs whose target the model predicts: removing the evidence for a
        class the model does not see there says little about what it uses. The others are
        left out and counted in the details. Every row is judged against the strongest
        model-independent row (:data:`ecgx.validation.references.PERTURBATION_FLOOR` and the
        random control; the control against another draw of itself), paired on the same ECGs."""
        cfg = self.policy.check("perturbation")
        engine = self.trained
        keep = self.predicted()
        basis = lead_basis(self.pkg.leads)
        counts = {"ecgs": int(keep.sum()), "not_predicted": int((~keep).sum()), "leads": basis.describe()}
        if keep.sum() < 2:
            reason = (
                f"the model predicts the target of only {int(keep.sum())} of {len(keep)} gate ECGs; "
                "faithfulness needs at least 2"
            )
            for m in self.all_methods:
                entries[m]["perturbation"] = checks.not_run(reason, cfg["blocking"])
            return
        x, t = self.data.x[keep], self.data.target[keep]
        kept = self.with_redraw(engine, x, t, {m: maps[m][keep] for m in self.all_methods})
        curves = self.curves(engine, x, t, kept, desc="perturbation")
        floor = [r for r in (*PERTURBATION_FLOOR, CONTROL_METHOD) if r in curves]
        for m in self.all_methods:
            # A row is not compared with itself; the control is, with its independent draw.
            rows = [CONTROL_REDRAW if r == m else r for r in floor if r != m or m == CONTROL_METHOD]
            versus = {
                s: {r: self.paired(curves[m].score[s], curves[r].score[s], cfg) for r in rows}
                for s in cfg["strategies"]
            }
            entries[m]["perturbation"] = checks.perturbation_entry(
                curves[m], versus, cfg["margin"], cfg["blocking"], confidence=cfg["confidence"], **counts
            )

    def paired(self, score: np.ndarray, other: np.ndarray, cfg: Mapping[str, Any]) -> Interval:
        return bootstrap_difference(
            score, other, n_boot=cfg["bootstrap"], confidence=cfg["confidence"], seed=self.policy.seed
        )

    def changed_model(self, entries: dict) -> None:
        """Faithfulness on copies with the output layer, then the top block, randomised
        (:mod:`ecgx.validation.changed_model`): each row's own maps and the copy's own logits,
        paired with the random control's (the control with another draw of itself)."""
        cfg = self.policy.check("changed_model")
        strategies = self.policy.check("perturbation")["strategies"]
        x, t = self.changed_ecgs()
        # model -> row -> strategy -> per-draw per-ECG faithfulness
        scores: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
        models = list(changed_models(self.pkg, self.policy.seed, cfg["draws"]))
        # Every copy's maps first (in the copies' order, so the control's draws keep theirs), then
        # every copy's curves together: a map that ignores the model is perturbed once.
        engines, maps = [], []
        with progress_bar(
            total=len(models), desc="changed models", unit="model", enabled=self.show_progress
        ) as bar:
            for key, overrides in models:
                engines.append(self.engine(overrides=overrides))
                own = self.attribute_all(engines[-1], x, t, key=("changed", *key), desc=None)
                maps.append(self.with_redraw(engines[-1], x, t, own))
                bar.update(1)
        curves = self.curves_across(engines, x, t, maps, desc="changed-model curves")
        for i, (key, _) in enumerate(models):
            table = scores.setdefault(key[0], {})
            for m, per_model in curves.items():
                for s in strategies:
                    table.setdefault(m, {}).setdefault(s, []).append(per_model[i].score[s])
        for m in self.all_methods:
            control = CONTROL_REDRAW if m == CONTROL_METHOD else CONTROL_METHOD
            versus = {
                model: {
                    s: self.paired(np.stack(scores[model][m][s]), np.stack(scores[model][control][s]), cfg)
                    for s in strategies
                }
                for model in CHANGED_MODELS
            }
            faithfulness = {
                model: {s: float(np.mean(scores[model][m][s])) for s in strategies}
                for model in CHANGED_MODELS
            }
            entries[m]["changed_model"] = checks.changed_model_entry(
                versus,
                cfg["margin"],
                cfg["blocking"],
                confidence=cfg["confidence"],
                ecgs=len(x),
                draws=cfg["draws"],
                faithfulness=faithfulness,
            )

    def self_consistency(self, maps, family_maps: list[dict[str, np.ndarray]], entries: dict) -> None:
        cfg = self.policy.check("self_consistency")
        for m in self.all_methods:
            if not family_maps:
                reason = "no seed family given (--family PKG2 PKG3 ...)"
                entries[m]["self_consistency"] = checks.not_run(reason, cfg["blocking"])
                continue
            per_ecg = mean_pairwise_pearson([np.abs(maps[m])] + [np.abs(f[m]) for f in family_maps])
            entries[m]["self_consistency"] = checks.self_consistency_entry(
                per_ecg, 1 + len(family_maps), cfg["min_correlation"], cfg["blocking"]
            )

    def inter_method(self, maps: dict[str, np.ndarray], entries: dict) -> dict[str, Any]:
        """Mean per-ECG Pearson correlation of absolute attributions, method x method, between the
        built-in methods; a user method is compared with them, never they with it."""
        cfg = self.policy.check("inter_method")
        # Agreeing with |x| is no agreement with another explanation: reference rows stay out.
        names = [m for m in self.methods if not is_reference(m)]
        for m in self.methods:
            if is_reference(m):
                reason = "reference rows are not compared with the methods"
                entries[m]["inter_method"] = checks.not_run(reason, cfg["blocking"])
        matrix = np.eye(len(names))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                matrix[i, j] = matrix[j, i] = _mean_correlation(maps[names[i]], maps[names[j]])
        rows = {
            m: {n: float(matrix[i, j]) for j, n in enumerate(names) if j != i} for i, m in enumerate(names)
        }
        rows |= {u: {n: _mean_correlation(maps[u], maps[n]) for n in names} for u in self.user}
        for m, row in rows.items():
            row = {n: v for n, v in row.items() if n != CONTROL_METHOD}
            entries[m]["inter_method"] = (
                checks.inter_method_entry(row, cfg["min_correlation"], cfg["blocking"])
                if row
                else checks.not_run("no other method to compare with", cfg["blocking"])
            )
        return {"methods": names, "matrix": [[checks.json_number(v) for v in row] for row in matrix]}

    def localisation(self, maps: dict[str, np.ndarray], entries: dict) -> None:
        cfg = self.policy.check("localisation")
        masks = self.data.masks
        if masks is None or not masks.any():
            reason = "the validation data has no ground-truth masks (only synthetic data has them)"
            for m in self.all_methods:
                entries[m]["localisation"] = checks.not_run(reason, cfg["blocking"])
            return
        has = masks.reshape(len(masks), -1).any(axis=1)
        masks = masks[has]
        # |x| scored the same way: a method at this level only highlights large voltages.
        baseline = localisation_scores(self.data.x[has], masks)
        area = masks.mean(axis=(1, 2))
        for m in self.all_methods:
            scores = localisation_scores(maps[m][has], masks)
            entries[m]["localisation"] = checks.localisation_entry(
                scores, baseline, area, cfg["min_auroc"], cfg["blocking"]
            )


def _mean_correlation(a: np.ndarray, b: np.ndarray) -> float:
    r = pearson_rows(np.abs(a), np.abs(b))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _report(
    ctx: _Context,
    fam: list[ModelPackage],
    entries: dict,
    matrix: dict,
    timings: dict,
    warnings: list[str],
    unavailable: Mapping[str, str] | None = None,
) -> dict:
    unavailable = dict(unavailable or {})
    methods, references = {}, {}
    for m, method_checks in entries.items():
        row = _row(method_checks)
        if not is_reference(m):
            # What the verdict covers: the settings it was checked with (issue 19).
            row["settings"] = method_settings(m, ctx.policy)
        (references if is_reference(m) else methods)[m] = row
    required = ctx.policy.required_methods()
    missing = [m for m in required if m not in methods]
    failing = [m for m in required if m in methods and methods[m]["verdict"] != checks.PASS]
    gate_reasons = [
        f"required {unavailable[m]}" if m in unavailable else f"required method {m} was not checked"
        for m in missing
    ]
    gate_reasons += [f"required method {m} failed" for m in failing]
    gate_reasons += [
        f"the model-independent reference row {m} passed every blocking check, so under this policy "
        "the checks cannot tell an explanation from a map that ignores the model"
        for m, r in references.items()
        if r["verdict"] == checks.PASS
    ]
    passed = [m for m, r in methods.items() if r["verdict"] == checks.PASS and m != CONTROL_METHOD]
    failed = [m for m, r in methods.items() if r["verdict"] != checks.PASS and m != CONTROL_METHOD]
    not_checked = [
        m for m in METHOD_NAMES if m not in methods and m != CONTROL_METHOD and m not in unavailable
    ]
    if len(passed) < ctx.policy.min_passing:
        needed = ctx.policy.min_passing
        gate_reasons.append(f"{len(passed)} method(s) passed; the policy needs at least {needed}")
    control = methods.get(CONTROL_METHOD)
    if control is not None and control["verdict"] == checks.PASS:
        warnings = [
            *warnings,
            "the random control passed every blocking check: on this data and policy the checks do not "
            "tell a method from noise, so no verdict of this report carries evidence",
        ]
    verdict = checks.FAIL if gate_reasons else checks.PASS
    outcome = {"passed": passed, "failed": failed, "not_checked": not_checked}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "verdict": verdict,
        "headline": headline(verdict, gate_reasons, outcome, ctx.policy, required, warnings, unavailable),
        "reasons": gate_reasons,
        "warnings": warnings,
        "required_methods": required,
        # What the service may serve: the passing methods, and nothing when the gate failed.
        "serve": passed if verdict == checks.PASS else [],
        **outcome,
        # Methods this package cannot run (graphs the export left out), with the reason: not
        # checked, never served.
        "unavailable": unavailable,
        "package": package_record(ctx.pkg),
        "family": [package_record(p) for p in fam],
        "data": {
            "path": ctx.data.path,
            "fingerprint": ctx.data.fingerprint,
            "selected_sha256": ctx.data.sha256,
            "ecgs": len(ctx.data.x),
            "ecgs_asked": ctx.policy.n_ecgs,
            "randomisation_ecgs": min(ctx.policy.check("randomisation")["ecgs"], len(ctx.data.x)),
            "changed_model_ecgs": min(ctx.policy.check("changed_model")["ecgs"], len(ctx.data.x)),
            "targets": {k: int((ctx.data.target == i).sum()) for i, k in enumerate(ctx.pkg.class_keys)},
            "ground_truth": ctx.data.masks is not None,
        },
        "policy": {"source": ctx.policy.source, "sha256": ctx.policy.sha256, "content": ctx.policy.content},
        "software": {
            "ecgx": ecgx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "providers": select_providers(ctx.providers),
        },
        "methods": methods,
        # Maps that ignore the model, scored like the methods: the floor every method must beat.
        "references": references,
        "inter_method": matrix,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _names(methods: Sequence[str]) -> str:
    return f" ({', '.join(methods)})" if methods else ""


def headline(
    verdict: str,
    reasons: Sequence[str],
    outcome: Mapping[str, Sequence[str]],
    policy: Policy,
    required: Sequence[str],
    warnings: Sequence[str] = (),
    unavailable: Mapping[str, str] | None = None,
) -> str:
    """The verdict in one sentence: under which policy, what that policy demands, what may be
    served and what will be refused, e.g. ``PASS under policy default (sha256 ...), which
    requires ...: the package may be served with 7 of 16 methods (...); 9 fail ...``.
    ``unavailable``: methods the package cannot run (method -> why), counted apart."""
    passed, failed, unchecked = outcome["passed"], outcome["failed"], outcome["not_checked"]
    missing = [m for m in (unavailable or {}) if m != CONTROL_METHOD]
    total = len(passed) + len(failed) + len(unchecked) + len(missing)
    demands = (
        f"which requires {', '.join(required) if required else 'no particular method'} to pass and at "
        f"least {policy.min_passing} method(s) to pass"
    )
    refused = [f"{len(failed)} fail their blocking checks{_names(failed)}"] if failed else []
    if unchecked:
        refused.append(f"{len(unchecked)} were not checked{_names(unchecked)}")
    if missing:
        refused.append(f"{len(missing)} are unavailable in this package{_names(missing)}")
    if verdict == checks.PASS:
        text = (
            f"PASS under policy {policy.label}, {demands}: the package may be served with "
            f"{len(passed)} of {total} methods{_names(passed)}"
        )
        if refused:
            text += f"; {' and '.join(refused)}; they will be refused"
    else:
        text = (
            f"FAIL under policy {policy.label}, {demands}: {'; '.join(reasons)}. No method of this "
            f"package may be served; {len(passed)} of {total} methods passed their checks{_names(passed)}"
        )
        if refused:
            text += f", {' and '.join(refused)}"
    text += "."
    if warnings:
        text += f" WARNING: {'; '.join(warnings)}."
    return text


def package_record(pkg: ModelPackage) -> dict[str, Any]:
    """Path, model identity and the SHA-256 of every package file, manifest included."""
    files = {name: entry["sha256"] for name, entry in pkg.manifest["files"].items()}
    # The hash of the manifest that was loaded and checked, not of whatever is on disk now.
    files[MANIFEST_FILE] = pkg.manifest_sha256 or sha256_file(pkg.path / MANIFEST_FILE)
    return {"path": str(pkg.path), "source": pkg.manifest.get("source"), "files": files}


def save_report(report: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``report`` as JSON atomically: a reader sees the old report or the new one, never half.

    The output rule (:mod:`ecgx.core.outputs`): an existing file is replaced only with ``overwrite``
    and only if it is a gate report; anything else at ``path`` is never replaced.
    """
    from ecgx.core.outputs import GATE_REPORT, StagedOutput

    text = json.dumps(report, indent=1, allow_nan=False)
    with StagedOutput(path, GATE_REPORT, overwrite=overwrite) as tmp:
        tmp.write_text(text)
        json.loads(tmp.read_text())  # read back before publishing
    return Path(path)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What ``ecgx validate`` prints: one line per method with, per check, the number its verdict
    is decided on (what that number is, once per check below the table), then every method's
    blocking checks (decisive number, mean and interval, threshold, verdict), any warnings, and
    the verdict as a sentence: under which policy, what may be served and what will be refused."""
    short = {checks.PASS: "ok", checks.FAIL: "FAIL"}
    lines = [f"{'method':22s} {'verdict':7s} " + " ".join(f"{n[:16]:>17s}" for n in CHECKS)]
    legend: dict[str, str] = {}
    references = report.get("references", {})
    user = {m: r for m, r in report.get("user_methods", {}).items() if isinstance(r, dict) and "checks" in r}
    for m, r in {**report["methods"], **references, **user}.items():
        cells = []
        for n in CHECKS:
            c = r["checks"].get(n)
            if c is None or c["verdict"] == checks.NOT_RUN:
                cells.append(f"{'-':>17s}")
                continue
            score = "n/a" if c["score"] is None else f"{c['score']:.3f}"
            cells.append(f"{score + ' ' + short[c['verdict']]:>17s}")
            if n not in legend:
                legend[n] = _legend(c)
        label = f"{m} (control)" if m == CONTROL_METHOD else m
        if m in references and m == next(iter(references)):
            lines.append("Reference rows (maps that ignore the model; each must fail):")
        if m in user and m == next(iter(user)):
            lines.append("User-supplied methods (for information only; never served, never counted):")
        lines.append(f"{label:22s} {r['verdict']:7s} " + " ".join(cells))
    lines.append("Each cell is the number the check's verdict is decided on:")
    lines += [f"  {n}: {text}" for n, text in legend.items()]
    for n in CHECKS:
        reason = next(
            (
                c["reason"]
                for r in report["methods"].values()
                if (c := r["checks"].get(n)) and c["verdict"] == checks.NOT_RUN
            ),
            None,
        )
        if n not in legend and reason:
            lines.append(f"  {n}: not run ({reason})")
    lines.append("Blocking checks, per method: the number that decides, with its mean and interval:")
    for m, r in report["methods"].items():
        label = f"{m} (control, expected to fail)" if m == CONTROL_METHOD else m
        for n, c in r["checks"].items():
            if c["blocking"]:
                lines.append(f"  {label} {n}: {c.get('summary') or checks.describe(c)}")
    lines += [
        f"Unavailable, not checked and never served: {why}" for why in report.get("unavailable", {}).values()
    ]
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    lines.append(f"Gate verdict: {report.get('headline') or report['verdict'].upper()}")
    return lines


def _legend(entry: dict[str, Any]) -> str:
    criteria = entry["details"].get("criteria")
    if criteria:
        blocking = "blocking" if entry["blocking"] else "informative, does not block"
        conditions = ", ".join(f"{n} {c['comparison']} {c['threshold']:g}" for n, c in criteria.items())
        return (
            "the number of the criterion that decided (the first that failed, else the one closest to "
            f"its threshold; each judged by its bootstrap interval's unfavourable end); passes when "
            f"{conditions} ({blocking})"
        )
    decided = entry.get("decided_by")
    what = decided["label"] if decided else "score"
    blocking = "blocking" if entry["blocking"] else "informative, does not block"
    return f"{what}; passes when {entry['comparison']} {entry['threshold']:g} ({blocking})"
