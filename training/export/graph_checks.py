"""Each package graph's check against its reference, run on ONNX Runtime on the exported file.

A check takes the :class:`References` every check shares (the sample inputs, their targets, the
model rebuilt in PyTorch from the IR, its near ties) and the graph's name, and returns check
records (check name -> figures, ``ok`` for a binding check, ``agrees`` for an informative one),
as the manifest's ``verification.checks`` holds them. Which graph runs which check, and what its
reference is called in the manifest, is the graph's :class:`~ecgx.training.export.graphs.GraphSpec`.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ecgx.service.methods.lrp import DEFAULT_EPSILON as DEFAULT_LRP_EPSILON
from ecgx.training.export.autograd_reference import autograd_attribution
from ecgx.training.export.float64_graph import FLOAT64_TOL, run_float64
from ecgx.training.export.ir import ExportError, ModelIR
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.lrp_reference import GRAPH_COMPOSITES, composite_parity, lrp_reference
from ecgx.training.export.lrp_rules import INPUT_RULES
from ecgx.training.export.parity import (
    FLOAT32_DRAWS,
    FLOAT32_SPREAD_FACTOR,
    REL_TOL,
    jsonable,
    moved_by_float32_rounding,
    parity,
    parity_ok,
    per_sample_parity,
    within_float32_spread,
)
from ecgx.training.export.source import ModelSource

# LRP is checked at two epsilons. At the engine's default (1e-6, as Zennit's) the rule is
# ill-conditioned: a unit whose output lies within a few epsilon of zero amplifies the float32
# rounding of that output, so ONNX Runtime and PyTorch may both be right and still differ
# (``ill_conditioned_samples`` finds such samples; they are excused). At 1e-2 the same graph
# is well-conditioned on nearly every sample, which checks its construction element by element.
LRP_CHECK_EPSILONS = {"lrp": 1e-2, "lrp.default_epsilon": DEFAULT_LRP_EPSILON}

# Reference runs of one check that are independent of each other (an LRP composite's input rules)
# run on this many threads: PyTorch releases the GIL in its kernels, so two use both cores of a
# 2-core machine; and on a loaded machine a worker thread's kernels do not spin-wait for OpenMP
# teams the way the main thread's do (a composite check measured 2.4 s a rule on the main thread
# with one intra-op thread, 35 s with two, under load 11; benchmarks/bench_export.py).
CHECK_WORKERS = 2

log = logging.getLogger(__name__)

# ``reference`` (Captum and the near-tie finders) is imported inside the checks: Captum takes about
# a second to load, which importing this table (graphs.py, the engine's tests) need not pay.


def _session(folder: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])


def run_parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(i) for i in items]`` on :data:`CHECK_WORKERS` threads, in order (exceptions re-raised)."""
    items = list(items)
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(CHECK_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))


class References:
    """What every graph's check shares: the sample inputs, targets, the IR module (float32, and its
    float64 copy the graphs are judged by) and the samples float32 cannot pin down (near ties)."""

    def __init__(self, folder: Path, src: ModelSource, ir: ModelIR, layer: str | None, x: np.ndarray):
        from ecgx.training.export.reference import as_float64, near_ties, relu_near_ties

        self.folder, self.src, self.ir, self.layer, self.x = folder, src, ir, layer, x
        n_out = ir.n_outputs
        self.target = np.arange(len(x)) % n_out
        self.seed = np.eye(n_out, dtype=np.float32)[self.target]
        self.baseline = np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
        self.module = ir_module(ir).eval()
        self.module64 = as_float64(self.module)
        flags, report = near_ties(self.module, x)
        relu_flags, relu_report = relu_near_ties(self.module, x, module64=self.module64)
        self.ties = {"near_max_pool_tie": np.asarray(flags, bool), "near_relu_tie": relu_flags}
        self.tie_report = jsonable(report)
        self.relu_tie_report = jsonable(relu_report)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._results: dict[str, dict[str, dict[str, Any]]] = {}
        # Progress: the graphs written to ``folder`` are the ones the export checks.
        self._total = len(list(folder.glob("*.onnx")))
        self._done: set[str] = set()
        self._started = time.monotonic()

    def session(self, graph: str) -> ort.InferenceSession:
        """The ONNX Runtime session of ``graph``'s file, created once for all the checks."""
        if graph not in self._sessions:
            self._sessions[graph] = _session(self.folder, graph)
        return self._sessions[graph]

    def shared_result(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``key``: a check that several graphs share (the incremental pair)."""
        if key not in self._results:
            self._results[key] = compute()
        return self._results[key]

    def checked(self, graph: str, seconds: float) -> None:
        """Log that ``graph``'s check ended, with the count and an estimate of the time left, so a
        long export never goes silent (``ecgx export -q`` hides INFO)."""
        self._done.add(graph)
        done, total = len(self._done), max(self._total, len(self._done))
        elapsed = time.monotonic() - self._started
        left = elapsed / done * (total - done)
        log.info(
            "export check %d/%d: %s (%.1f s; %.0f s elapsed, about %.0f s left)",
            done,
            total,
            graph,
            seconds,
            elapsed,
            left,
        )


def reported(
    check: Callable[[References, str], dict[str, dict[str, Any]]],
) -> Callable[[References, str], dict[str, dict[str, Any]]]:
    """``check`` that reports its end to ``refs.checked`` (the export's progress)."""

    @functools.wraps(check)
    def run(refs: References, graph: str) -> dict[str, dict[str, Any]]:
        start = time.monotonic()
        result = check(refs, graph)
        refs.checked(graph, time.monotonic() - start)
        return result

    return run


def judge(
    got: np.ndarray,
    ref64: np.ndarray,
    excused: dict[str, np.ndarray],
    ref32: Callable[[], np.ndarray],
    moved64: Callable[[int], np.ndarray] | None = None,
    graph64: Callable[[list[int]], np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """The engine's map against the float64 run of the same computation (``per_sample_parity``),
    with the measured error on every sample. When it fails, float32's own spread is measured:
    PyTorch's float32 run (``ref32()``) and, when given, the float64 runs of the input moved by
    float32 rounding (``moved64(draw)``, ``FLOAT32_DRAWS`` draws), each against float64; per sample
    the largest. A disagreeing sample where float32 is off as well, and the engine no further off
    than float32's spread allows, is excused as ``float32_spread`` (float32 does not pin the sample
    down); one the engine's own graph run in float64 (``graph64(samples)``) shows right is excused as
    ``float32_arithmetic`` (``prove_in_float64``); otherwise the refusal says which side was off
    (``describe_parity_failure``)."""
    check = {"reference_precision": "float64", **per_sample_parity(got, ref64, excused)}
    if check["ok"]:
        return check
    try:
        runs = [ref32()]
        if moved64 is not None:
            runs += [moved64(draw) for draw in range(FLOAT32_DRAWS)]
    except Exception as e:  # informative only: the verdict stands on the float64 run
        check["float32_reference_error"] = f"{type(e).__name__}: {e}"
        return check

    def float32_spread(i: int) -> dict[str, float]:
        figures = [parity(run[i], ref64[i]) for run in runs]
        return {k: max(f[k] for f in figures) for k in figures[0]}

    for failing in check["failing"]:
        failing["float32_reference_vs_float64"] = float32_spread(failing["sample"])
    spread = [f["sample"] for f in check["failing"] if _float32_spread_excuses(f)]
    if spread:
        check["excused"]["float32_spread"] = spread
        check["failing"] = [f for f in check["failing"] if f["sample"] not in spread]
    if graph64 is not None:
        prove_in_float64(check, graph64, lambda samples: ref64[samples])
    # Excused samples that disagree count against "at least half agree": their sides too.
    excused_samples = sorted({i for samples in check["excused"].values() for i in samples})
    check["excused_sides"] = [
        {"sample": i, **parity(got[i], ref64[i]), "float32_reference_vs_float64": float32_spread(i)}
        for i in excused_samples
    ]
    return _count_float32_spread(check)


def _float32_spread_excuses(side: dict[str, Any]) -> bool:
    """The sample's float32 run is itself off against float64, and the engine within its spread."""
    f32 = side["float32_reference_vs_float64"]
    return not parity_ok(f32) and within_float32_spread(side, f32)


def _count_float32_spread(check: dict[str, Any]) -> dict[str, Any]:
    """``check`` (``judge``'s, after a failure) passed when no sample is left unexcused and the
    agreeing samples, with the excused ones within float32's own spread, are at least half: the
    engine's error against float64 at most ``FLOAT32_SPREAD_FACTOR`` times PyTorch float32's there
    (or the median over the excused samples, when that sample's float32 run happened to round
    luckily). A construction error still fails: it leaves a sample unexcused, or most samples
    outside float32's spread."""
    if check["failing"] or not check["excused_sides"]:
        return recount(check)
    sides = check["excused_sides"]
    typical = {
        k: float(np.median([side["float32_reference_vs_float64"][k] for side in sides]))
        for k in ("max_rel_error", "outlier_fraction")
    }

    def within(side: dict[str, Any]) -> bool:
        f32 = side["float32_reference_vs_float64"]
        return within_float32_spread(side, {k: max(f32[k], typical[k]) for k in typical})

    check["within_float32_spread"] = [side["sample"] for side in sides if within(side)]
    return recount(check)


# At most this many disagreeing samples of a check are run through the graph in float64: it is slow
# (numpy), and a construction error shows on most samples, where no proof is needed to refuse.
FLOAT64_GRAPH_SAMPLES = 2


def prove_in_float64(
    check: dict[str, Any],
    graph64: Callable[[list[int]], np.ndarray | None],
    ref64_of: Callable[[list[int]], np.ndarray],
) -> dict[str, Any]:
    """Excuse as ``float32_arithmetic`` each failing sample (when at most ``FLOAT64_GRAPH_SAMPLES``
    fail) on which the engine's own graph, run in float64 (``graph64``), equals the float64
    reference (``ref64_of``) to ``FLOAT64_TOL``: the graph computes the rule exactly, and its
    float32 discrepancy is ONNX Runtime's rounding. Each such sample's error in float64 is recorded
    (``graph_in_float64``), and it counts towards the half that must agree; ``ok`` is recounted."""
    failing = [f["sample"] for f in check["failing"]]
    if not failing or len(failing) > FLOAT64_GRAPH_SAMPLES:
        return check
    got = graph64(failing)
    if got is None:
        return check
    want = ref64_of(failing)
    proven = []
    for entry, g, w in zip(check["failing"], got, want, strict=True):
        entry["graph_in_float64"] = parity(g, w)["max_rel_error"]
        if entry["graph_in_float64"] <= FLOAT64_TOL:
            proven.append(entry["sample"])
    if proven:
        check["excused"]["float32_arithmetic"] = proven
        check["proven_in_float64"] = proven
        check["failing"] = [f for f in check["failing"] if f["sample"] not in proven]
    return recount(check)


def recount(check: dict[str, Any]) -> dict[str, Any]:
    """``ok`` of a per-sample check after excuses: no sample unexplained, and the agreeing ones with
    those within float32's spread or proven in float64 at least half."""
    counted = set(check.get("within_float32_spread", ())) | set(check.get("proven_in_float64", ()))
    check["ok"] = bool(not check["failing"] and check["agreeing"] + len(counted) >= check["samples"] / 2)
    return check


@reported
def check_forward(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """The logits against the model as given (``ModelSource.forward``)."""
    got = refs.session("forward").run(None, {"x": refs.x})[0]
    want = np.asarray(refs.src.forward(refs.x), np.float64)
    if got.shape != want.shape:
        raise ExportError(
            f"the forward graph returns logits of shape {got.shape}, the model {want.shape} "
            "(package not written)"
        )
    forward = parity(got, want)
    if parity_ok(forward) or not isinstance(refs.src.original, nn.Module):
        return {"forward": {**forward, "ok": parity_ok(forward)}}
    return {"forward": _forward_against_float64(got, want, refs.src.original, refs.x, forward)}


def _forward_against_float64(
    got: np.ndarray, want32: np.ndarray, original: nn.Module, x: np.ndarray, float32: dict[str, float]
) -> dict[str, Any]:
    """The logits against a float64 copy of the PyTorch model as given, when PyTorch's float32 run
    and the engine disagree: on a deep network (xresnet1d50) the two float32 runs differ by more
    than ``REL_TOL`` on a few logits, and only float64 says which side is off. The engine passes
    when it agrees with float64, or is no further from it than ``FLOAT32_SPREAD_FACTOR`` times
    PyTorch's float32 run is."""
    try:
        with torch.no_grad():
            want64 = copy.deepcopy(original).double().eval()(torch.tensor(x, dtype=torch.float64)).numpy()
    except Exception as e:  # a model with float32 hard-wired: the float32 verdict stands
        return {**float32, "ok": False, "float64_reference_error": f"{type(e).__name__}: {e}"}
    engine64, torch64 = parity(got, want64), parity(want32, want64)
    ok = parity_ok(engine64) or engine64["max_rel_error"] <= FLOAT32_SPREAD_FACTOR * torch64["max_rel_error"]
    return {
        **engine64,
        "reference_precision": "float64",
        "float32_reference": float32,
        "float32_reference_vs_float64": torch64,
        "ok": bool(ok),
    }


@reported
def check_incremental(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """The incremental graphs together (either graph's check runs both): the logits of inputs with
    one lead replaced by zeros over a window of ``max_window`` samples, at starts across the beat
    (both ends included), against the forward graph on the same inputs."""
    result = refs.shared_result("incremental", lambda: _incremental_parity(refs))
    return {graph: {**result, "ok": parity_ok(result)}}


def _incremental_parity(refs: References) -> dict[str, float]:
    from ecgx.service.methods.perturbation import MAX_WINDOW_KEY

    forward, acts_graph = refs.session("forward"), refs.session("incremental_activations")
    incremental = refs.session("incremental_forward")
    width = int(incremental.get_modelmeta().custom_metadata_map[MAX_WINDOW_KEY])
    x = refs.x
    leads, samples = x.shape[1:]
    acts = acts_graph.run(None, {"x": x})[0]
    ecg = np.repeat(np.arange(len(x)), leads)
    lead = np.tile(np.arange(leads), len(x))
    got, want = [], []
    ends = (samples - width - 1, samples - width, samples - 1)
    for start in sorted({0, 1, width // 2, samples // 2 - 1, *ends}):
        rows = x[ecg].copy()
        rows[np.arange(len(rows)), lead, start : start + width] = 0.0
        feeds = {"x": rows, "activations": acts, "ecg": ecg, "start": np.array([start], np.int64)}
        got.append(incremental.run(None, feeds)[0])
        want.append(forward.run(None, {"x": rows})[0])
    return parity(np.concatenate(got), np.concatenate(want, dtype=np.float64))


def _graph64(
    refs: References, graph: str, feeds: dict[str, np.ndarray], output: int = 1
) -> Callable[[list[int]], np.ndarray | None]:
    """``graph``'s output ``output`` run in float64 (``float64_graph``) on some of the check ECGs:
    the per-ECG feeds (first axis the batch) cut to those samples, the others as given."""

    def run(samples: list[int]) -> np.ndarray | None:
        n = len(refs.x)
        rows = {k: v[samples] if np.ndim(v) and np.shape(v)[0] == n else v for k, v in feeds.items()}
        try:
            return run_float64(onnx.load(str(refs.folder / f"{graph}.onnx")), rows)[output]
        except Exception as e:  # an op the reference evaluator lacks: no proof, the verdict stands
            log.info("graph %s could not run in float64 (%s: %s)", graph, type(e).__name__, e)
            return None

    return run


def _moved64(refs: References, method: str, **kwargs: Any) -> Callable[[int], np.ndarray]:
    """``method``'s float64 reference on the check ECGs moved by float32 rounding (``judge``)."""

    def run(draw: int) -> np.ndarray:
        moved = moved_by_float32_rounding(refs.x, draw)
        return autograd_attribution(refs.module64, method, moved, refs.target, **kwargs)

    return run


def _run_backward(refs: References, graph: str) -> np.ndarray:
    return refs.session(graph).run(None, {"x": refs.x, "seed": refs.seed})[1]


def _module_gradient(model: nn.Module, x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """d (seed . logits) / dx of a PyTorch module by plain autograd (eval mode)."""
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = model.eval()(xt)
    (out * torch.from_numpy(seed)).sum().backward()
    return xt.grad.detach().numpy()


def _module_gradient64(model: nn.Module, x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """``_module_gradient`` of a float64 copy of ``model``: the same computation in float64."""
    model64 = copy.deepcopy(model).double().eval()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = model64(xt)
    (out * torch.from_numpy(seed.astype(np.float64))).sum().backward()
    return xt.grad.detach().numpy()


@reported
def check_gradient(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """The input gradient against autograd on the IR module in float64 and, for a PyTorch model, on
    the module as given (in float64 where it runs in float64; else in float32, its own spread under
    the near ties excused)."""
    got = _run_backward(refs, "gradient")
    ref = autograd_attribution(refs.module64, "gradient", refs.x, refs.target)
    checks = {
        "gradient": judge(
            got,
            ref,
            refs.ties,
            lambda: autograd_attribution(refs.module, "gradient", refs.x, refs.target),
            _moved64(refs, "gradient"),
            _graph64(refs, "gradient", {"x": refs.x, "seed": refs.seed}),
        )
    }
    if isinstance(refs.src.original, nn.Module):
        # The model as given, not only as rebuilt from the IR: a front-end error shows here.
        original = refs.src.original

        def float32() -> np.ndarray:
            return _module_gradient(original, refs.x, refs.seed)

        try:
            want = _module_gradient64(original, refs.x, refs.seed)
        except Exception as e:  # a model with float32 hard-wired (a custom op, a typed constant)
            check = per_sample_parity(got, float32(), refs.ties)
            checks["gradient.original"] = {
                "reference_precision": f"float32 (the model does not run in float64: {type(e).__name__})",
                **check,
            }
        else:
            checks["gradient.original"] = judge(got, want, refs.ties, float32)
    return checks


def _captum_beside(got: np.ndarray, captum: Callable[[], np.ndarray], excused) -> dict[str, Any]:
    """Captum's attribution compared with the package's, recorded beside the primary check
    (informative: Captum's hooks act on a ReLU's or max pool's input tensor, not on the op's
    own edge, so it may legitimately differ; see the manifest's verification notes)."""
    try:
        captum = per_sample_parity(got, captum(), excused)
        captum["agrees"] = captum.pop("ok")
    except Exception as e:  # informative only: Captum's own refusal is recorded
        captum = {"agrees": False, "error": f"Captum could not run: {type(e).__name__}: {e}"}
    return {"informative": True, **captum}


@reported
def check_modified_backward(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """A modified-gradient graph (guided backpropagation, deconvolution) against its plain-autograd
    rule; Captum recorded beside it."""
    from ecgx.training.export.reference import captum_attribution

    got = _run_backward(refs, graph)
    ref = autograd_attribution(refs.module64, graph, refs.x, refs.target)
    return {
        graph: judge(
            got,
            ref,
            refs.ties,
            lambda: autograd_attribution(refs.module, graph, refs.x, refs.target),
            _moved64(refs, graph),
            _graph64(refs, graph, {"x": refs.x, "seed": refs.seed}),
        ),
        f"{graph}.captum": _captum_beside(
            got, lambda: captum_attribution(refs.module, graph, refs.x, refs.target), refs.ties
        ),
    }


@reported
def check_deeplift(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """DeepLIFT against its plain-autograd rescale rule (Captum beside it), and the rescale max-pool
    rule by summation to delta."""
    from ecgx.training.export.reference import captum_attribution, near_tie_samples

    sess = refs.session("deeplift")
    x, baseline, seed, target = refs.x, refs.baseline, refs.seed, refs.target
    feeds = {"x": x, "baseline": baseline, "seed": seed}
    plain = sess.run(None, {**feeds, "maxpool_rescale": np.array(False)})[1]
    from ecgx.training.export.reference import relu_near_ties

    reference = autograd_attribution(refs.module64, "deeplift", x, target, baseline=baseline)
    near_tie = refs.ties["near_max_pool_tie"] | np.asarray(near_tie_samples(refs.module, baseline), bool)
    relu_tie = refs.ties["near_relu_tie"] | relu_near_ties(refs.module, baseline, module64=refs.module64)[0]
    excused = {"near_max_pool_tie": near_tie, "near_relu_tie": relu_tie}
    checks = {
        "deeplift": judge(
            plain,
            reference,
            excused,
            lambda: autograd_attribution(refs.module, "deeplift", x, target, baseline=baseline),
            _moved64(refs, "deeplift", baseline=baseline),
            _graph64(refs, "deeplift", {**feeds, "maxpool_rescale": np.array(False)}),
        ),
        "deeplift.captum": _captum_beside(
            plain, lambda: captum_attribution(refs.module, "deeplift", x, target, baseline=baseline), excused
        ),
    }
    # The rescale max-pool rule: DeepLIFT's summation-to-delta, to float32's precision. The logit
    # difference is itself rounded relative to the logits, and the sum relative to its terms.
    logits, rescaled = sess.run(None, {**feeds, "maxpool_rescale": np.array(True)})
    logits_base = sess.run(None, {**feeds, "x": baseline, "maxpool_rescale": np.array(True)})[0]
    rows = np.arange(len(x))
    delta = (logits - logits_base)[rows, target]
    total = rescaled.astype(np.float64).sum(axis=(1, 2))
    scale = max(
        float(np.abs(delta).max()),
        float(np.abs(logits[rows, target]).max()),
        float(np.abs(logits_base[rows, target]).max()),
        float(np.abs(rescaled).sum(axis=(1, 2)).max()) * 1e-2,
    )
    error = float(np.abs(total - delta).max()) / (scale or 1.0)
    checks["deeplift.maxpool_rescale.summation"] = {
        "max_rel_error": error,
        "outlier_fraction": float(np.mean(np.abs(total - delta) / (scale or 1.0) > REL_TOL)),
        "ok": error <= REL_TOL,
    }
    return checks


@reported
def check_lrp(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """LRP-epsilon against its plain-autograd rule per edge at :data:`LRP_CHECK_EPSILONS` (Captum
    beside it)."""
    from ecgx.training.export.reference import captum_attribution, ill_conditioned_samples

    sess = refs.session("lrp")
    checks = {}
    for name, eps in LRP_CHECK_EPSILONS.items():
        got = sess.run(None, {"x": refs.x, "seed": refs.seed, "epsilon": np.array(eps, np.float32)})[1]
        ref = autograd_attribution(refs.module64, "lrp", refs.x, refs.target, epsilon=eps)
        ill = np.asarray(ill_conditioned_samples(refs.module, refs.x, eps, REL_TOL), bool)
        excused = {**refs.ties, "ill_conditioned": ill}
        ref32 = lambda eps=eps: autograd_attribution(refs.module, "lrp", refs.x, refs.target, epsilon=eps)  # noqa: E731
        moved64 = _moved64(refs, "lrp", epsilon=eps)
        graph64 = _graph64(
            refs, "lrp", {"x": refs.x, "seed": refs.seed, "epsilon": np.array(eps, np.float32)}
        )
        checks[name] = {"epsilon": eps, **judge(got, ref, excused, ref32, moved64, graph64)}
        checks[f"{name}.captum"] = _captum_beside(
            got,
            lambda eps=eps: captum_attribution(refs.module, "lrp", refs.x, refs.target, epsilon=eps),
            excused,
        )
    return checks


@reported
def check_lrp_composite(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """An LRP composite graph (``lrp_epsilon_plus``, ...) against the independent PyTorch rule
    reference (``lrp_reference``, float64), with each input rule, at the well-conditioned epsilon.
    A sample may differ by a few times its own float32 sensitivity (``composite_parity``): Zennit's
    Norm rule at an addition that nearly cancels (pre-activation blocks) amplifies rounding in
    any float32 implementation, while a construction error is of the order of the map itself."""

    # The composite graphs' input rules are independent reference runs: the first composite's
    # check runs those of every composite graph in the package on CHECK_WORKERS threads, the
    # others read their share (an error stays with its own graph and rule).
    outcomes = refs.shared_result("lrp_composites", lambda: _composite_outcomes(refs))
    if not any(g == graph for g, _ in outcomes):
        outcomes = _composite_outcomes(refs, [graph])
    checks = {}
    for (g, rule), outcome in outcomes.items():
        if g != graph:
            continue
        if isinstance(outcome, Exception):
            raise outcome
        checks[f"{graph}.{rule}"] = outcome
    return checks


def _composite_outcomes(
    refs: References, graphs: list[str] | None = None
) -> dict[tuple[str, str], dict[str, Any] | Exception]:
    """Each composite graph's check record per input rule (or the exception its check raised)."""
    if graphs is None:
        graphs = [g for g in GRAPH_COMPOSITES if (refs.folder / f"{g}.onnx").is_file()]
    items = [(g, rule) for g in graphs for rule in INPUT_RULES]
    for g in graphs:
        refs.session(g)  # created here, not raced for by the threads

    def outcome(item: tuple[str, str]) -> dict[str, Any] | Exception:
        try:
            return _composite_rule_check(refs, *item)
        except Exception as e:  # raised by the graph's own check, in package_writer's handling
            return e

    return dict(zip(items, run_parallel(outcome, items), strict=True))


def _composite_rule_check(refs: References, graph: str, rule: str) -> dict[str, Any]:
    composite = GRAPH_COMPOSITES[graph]
    eps = LRP_CHECK_EPSILONS["lrp"]
    flat = refs.x.reshape(len(refs.x), -1)
    low, high = flat.min(axis=1).astype(np.float32), flat.max(axis=1).astype(np.float32)
    feeds = {
        "x": refs.x,
        "seed": refs.seed,
        "epsilon": np.array(eps, np.float32),
        "input_rule": np.array(INPUT_RULES[rule], np.int64),
        "low": low,
        "high": high,
    }
    got = refs.session(graph).run(None, feeds)[1]
    check = composite_parity(
        got,
        refs.module,
        composite,
        refs.x,
        refs.target,
        epsilon=eps,
        input_rule=rule,
        low=low,
        high=high,
        excused=dict(refs.ties),
    )

    def ref64_of(samples: list[int]) -> np.ndarray:
        x, target = refs.x[samples], refs.target[samples]
        kwargs = {"epsilon": eps, "input_rule": rule, "low": low[samples], "high": high[samples]}
        return lrp_reference(refs.module, composite, x, target, dtype=torch.float64, **kwargs)

    prove_in_float64(check, _graph64(refs, graph, feeds), ref64_of)
    return {"epsilon": eps, **jsonable(check)}


@reported
def check_gradcam(refs: References, graph: str) -> dict[str, dict[str, Any]]:
    """The GradCAM layer's activations and gradients against autograd."""
    from ecgx.training.export.reference import layer_activations_and_gradients

    _, acts, grads = refs.session("gradcam").run(None, {"x": refs.x, "seed": refs.seed})

    def reference(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return layer_activations_and_gradients(module, module.op_modules[refs.layer], refs.x, refs.target)

    acts_ref, grads_ref = reference(refs.module64)
    return {
        "gradcam.activations": judge(acts, acts_ref, {}, lambda: reference(refs.module)[0]),
        "gradcam.gradients": judge(grads, grads_ref, refs.ties, lambda: reference(refs.module)[1]),
    }


# (references, graph name) -> check records: what a GraphSpec's ``check`` is.
Check = Callable[[References, str], dict[str, dict[str, Any]]]
