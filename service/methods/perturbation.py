"""Perturbation methods: occlusion, feature ablation, Kernel SHAP and LIME.

They need nothing but batched forward passes. Each reproduces Captum's
arithmetic (the reference implementation, DESIGN.md "Attribution methods") for
the target logit. Features are lead x time-window segments (:func:`segment_mask`).

Memory stays bounded whatever the request: perturbed inputs are built from row
indices chunk by chunk (at most ``engine.max_batch`` rows each), and the
coalitions of the sampling methods are held for a bounded group of ECGs at a time.
The number of perturbations per ECG and the surrogate's size are capped
(:mod:`ecgx.service.limits`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from types import MappingProxyType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.service.limits import MAX_N_SAMPLES, MAX_PERTURBATIONS, MAX_SURROGATE_ENTRIES
from ecgx.service.methods.base import (
    AttributionMethod,
    CheckContext,
    Param,
    Settings,
    broadcast_per_ecg,
    check_count,
    check_non_negative,
    check_positive_int,
    per_ecg,
    rng_for,
    seed,
)
from ecgx.service.methods.registry import register

DEFAULT_WINDOW = 50  # samples: 0.1 s at 500 Hz
KERNEL_SHAP_INF_WEIGHT = 1e6  # Captum's weight of the empty and the full coalition
LSTSQ_RCOND = 1e-6  # sklearn LinearRegression's default ``tol``: relative singular value cut-off
COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity's default eps
_GROUP_ENTRIES = 1 << 22  # coalition entries held at once (a group of ECGs), bounding memory

# (ecg indices, item indices) -> perturbed inputs (rows, leads, samples) float32
RowBuilder = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------- segments


def segment_mask(window: int = DEFAULT_WINDOW, leads: int = 12, samples: int = 600) -> np.ndarray:
    """Feature id of every input element: ``lead * n_windows + sample // window``.

    ``n_windows = ceil(samples / window)`` (the last window is shorter when
    ``window`` does not divide ``samples``). Returns (leads, samples) int64.
    """
    window = _check_window("window", window, samples)
    leads = check_positive_int("leads", leads)
    n_windows = -(-samples // window)
    time_ids = np.arange(samples) // window
    return (np.arange(leads)[:, None] * n_windows + time_ids[None, :]).astype(np.int64)


def _check_window(name: str, value: Any, samples: int) -> int:
    value = check_positive_int(name, value)
    if value > samples:
        raise InvalidArgument(f"{name} must be at most {samples} samples, got {value}")
    return value


def _window(name: str, value: Any, ctx: CheckContext) -> int:
    """A window (or stride) of 1..600 samples."""
    return _check_window(name, value, ctx.x.shape[2])


def _check_perturbations(method: str, settings: str, leads: int, per_lead: int, what: str) -> int:
    """Forward passes per ECG (perturbations and the unperturbed input), capped."""
    n = leads * per_lead
    if n > MAX_PERTURBATIONS:
        raise ResourceExhausted(
            f"{method} with {settings} needs {leads} leads x {per_lead} {what} = {n} forward passes per "
            f"ECG; the limit is {MAX_PERTURBATIONS} (it bounds a request's time): use a larger window"
            + (" or stride" if method == "occlusion" else "")
        )
    return n + 1


# ---------------------------------------------------------------------- batched forward passes


def _target_logits(engine, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    return engine.logits(rows)[np.arange(len(rows)), target].astype(np.float64)


def _perturbed_logits(engine, target: np.ndarray, n_items: int, build: RowBuilder) -> np.ndarray:
    """Target logits (B, n_items) of ``n_items`` perturbations of each of the B ECGs.

    Rows are ECG-major; each chunk of at most ``max_batch`` rows is built just
    before its forward pass, so the perturbed copies of a request never coexist.
    """
    total = len(target) * n_items
    out = np.empty(total, np.float64)
    for start in range(0, total, engine.max_batch):
        rows = np.arange(start, min(start + engine.max_batch, total))
        ecg, item = rows // n_items, rows % n_items
        out[rows] = _target_logits(engine, build(ecg, item), target[ecg])
    return out.reshape(len(target), n_items)


# ---------------------------------------------------------------------- building perturbed rows
# Building the perturbed copies with full-size boolean masks and ``np.where`` took about a quarter
# of an occlusion (ONNX Runtime the rest; benchmarks/RESULTS.md, issue #21). These builders give
# the same float32 values, element for element, from copies of the clean ECG with only the
# replaced samples written.


def _runs(ecg: np.ndarray) -> list[tuple[int, slice]]:
    """Runs of equal consecutive ECG indices: (ecg, rows) pairs. Rows are ECG-major, so a chunk
    holds few runs and each run's rows share one source ECG (broadcast copies, no gathers)."""
    cuts = np.flatnonzero(np.diff(ecg)) + 1
    bounds = [0, *cuts.tolist(), len(ecg)]
    return [(int(ecg[a]), slice(a, b)) for a, b in pairwise(bounds)]


def _copies(src: np.ndarray, ecg: np.ndarray) -> np.ndarray:
    """``src[ecg]`` (rows, leads, samples), copied run by run."""
    rows = np.empty((len(ecg), *src.shape[1:]), src.dtype)
    for e, sl in _runs(ecg):
        rows[sl] = src[e]
    return rows


def _replace_windows(
    rows: np.ndarray, base: np.ndarray, ecg: np.ndarray, lead: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Set, in each row r, lead ``lead[r]`` over samples ``start[r]:end[r]`` to the baseline of
    ECG ``ecg[r]``, in place. A window cut at the end repeats its last sample's index (the same
    value written twice) so that all windows index alike."""
    width = int((end - start).max())
    t = np.minimum(start[:, None] + np.arange(width), end[:, None] - 1)
    lead = lead[:, None]
    rows[np.arange(len(rows))[:, None], lead, t] = base[ecg[:, None], lead, t]
    return rows


def _coalition_rows(
    z: np.ndarray, x: np.ndarray, base: np.ndarray, ecg: np.ndarray, window: int
) -> np.ndarray:
    """Inputs of coalitions ``z`` (rows, M) over :func:`segment_mask` segments of ``window``
    samples: each segment kept from ``x[ecg]`` where z is 1, else from ``base[ecg]``."""
    _, leads, samples = x.shape
    keep = np.repeat(z.reshape(len(z), leads, -1), window, axis=2)[:, :, :samples]
    rows = np.empty((len(z), leads, samples), x.dtype)
    for e, sl in _runs(ecg):
        np.copyto(rows[sl], base[e])
        np.copyto(rows[sl], x[e], where=keep[sl])
    return rows


# ---------------------------------------------------------------------- incremental forward passes
# A package exported with the incremental graphs (training/export/incremental_graphs.py) computes a
# window perturbation's logits from the clean activations, recomputing only the positions the window
# reaches in each early layer (2-4x less work per row; logits equal to the forward graph's to float32
# rounding). They are optional: the methods still name only ``forward``, and a package without them
# (exported before they existed, or a model they cannot serve) takes the plain path.
INCREMENTAL_GRAPHS = ("incremental_activations", "incremental_forward")
MAX_WINDOW_KEY = "ecgx.max_window"  # the incremental_forward graph's metadata: widest window served


def incremental_window(engine) -> int:
    """The widest window (samples) the package's incremental graphs serve; 0 when it has none."""
    if not all(g in engine.package.manifest["graphs"] for g in INCREMENTAL_GRAPHS):
        return 0
    meta = engine.session("incremental_forward").get_modelmeta().custom_metadata_map
    return int(meta.get(MAX_WINDOW_KEY, 0))


def _window_logits(
    engine, x: np.ndarray, target: np.ndarray, build: RowBuilder, item_start: np.ndarray, width: int
) -> np.ndarray:
    """Target logits (B, n_items) as :func:`_perturbed_logits`, for items that each change at most
    ``width`` samples from ``item_start[item]`` on; through the incremental graphs when the package
    has them and the window fits, else by the plain forward graph.

    Clean activations are computed for a group of at most ``max_batch`` ECGs at a time; each run
    takes rows (ECG-major, at most ``max_batch``) that share one window start.
    """
    n_items = len(item_start)
    if width > incremental_window(engine):
        return _perturbed_logits(engine, target, n_items, build)
    out = np.empty((len(x), n_items), np.float64)
    starts = np.unique(item_start)
    for g0 in range(0, len(x), engine.max_batch):
        ecgs = np.arange(g0, min(g0 + engine.max_batch, len(x)))
        acts = engine.run("incremental_activations", {"x": x[ecgs]}, ["activations"])[0]
        for start in starts:
            items = np.flatnonzero(item_start == start)
            ecg = np.repeat(ecgs, len(items))
            item = np.tile(items, len(ecgs))
            for c in range(0, len(ecg), engine.max_batch):
                engine.check_cancelled()
                e, i = ecg[c : c + engine.max_batch], item[c : c + engine.max_batch]
                # Only the chunk's own ECGs' activations: the graph slices every clean tensor it is fed.
                own, local = np.unique(e - g0, return_inverse=True)
                feeds = {"x": build(e, i), "activations": acts[own], "ecg": local, "start": np.array([start])}
                logits = engine.run("incremental_forward", feeds, ["logits"])[0]
                out[e, i] = logits[np.arange(len(e)), target[e]]
    return out


# ---------------------------------------------------------------------- occlusion and ablation


def window_starts(samples: int, window: int, stride: int) -> np.ndarray:
    """Start samples of Captum's sliding windows along time.

    Captum shifts ``ceil((samples - window) / stride) + 1`` times; a last window
    running past the end is cut at the end (Captum pads with a negative amount),
    not moved back.
    """
    n_shifts = -(-(samples - window) // stride) + 1
    return np.arange(n_shifts) * stride


def _stride(name: str, value: Any, ctx: CheckContext) -> int:
    stride = _window(name, value, ctx)
    window, samples = ctx.checked["window"], ctx.x.shape[2]
    # As Captum: a stride longer than the window would leave samples never occluded.
    if stride > window and window < samples:
        raise InvalidArgument(f"stride must be at most window ({window}), got {stride}")
    return stride


@register
class Occlusion(AttributionMethod):
    """Sliding-window occlusion (Zeiler & Fergus), as Captum's ``Occlusion`` with
    ``sliding_window_shapes=(1, window)``, ``strides=(1, stride)``.

    Each window covers one lead and ``window`` samples and is replaced by
    ``baseline``; an element's attribution is the mean of f(x) - f(occluded)
    over the windows covering it (f: target logit). ``baseline``: a number, one
    (12, 600) ECG, or one per ECG.
    """

    name, kind, graphs = "occlusion", "perturbation", ("forward",)
    params = (
        Param("window", DEFAULT_WINDOW, _window),
        Param("stride", 25, _stride),
        Param("baseline", 0.0, per_ecg()),
    )

    def cost(self, x, s: Settings) -> int:
        _, leads, samples = x.shape
        n_windows = len(window_starts(samples, s.window, s.stride))
        return _check_perturbations(
            "occlusion", f"window={s.window}, stride={s.stride}", leads, n_windows, "windows"
        )

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        _, leads, samples = x.shape
        window, stride = s.window, s.stride
        base = broadcast_per_ecg(s.baseline, x)
        starts = window_starts(samples, window, stride)
        ends = np.minimum(starts + window, samples)

        def build(ecg: np.ndarray, item: np.ndarray) -> np.ndarray:
            lead, k = item // len(starts), item % len(starts)
            return _replace_windows(_copies(x, ecg), base, ecg, lead, starts[k], ends[k])

        f0 = _target_logits(engine, x, target)
        item_start = np.tile(starts, leads)  # item = lead * len(starts) + k
        diff = f0[:, None] - _window_logits(engine, x, target, build, item_start, window)
        diff = diff.reshape(len(x), leads, len(starts))
        total = np.zeros(x.shape, np.float64)
        count = np.zeros(samples, np.float64)
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            total[:, :, s:e] += diff[:, :, k, None]
            count[s:e] += 1
        return (total / count).astype(np.float32)


@register
class FeatureAblation(AttributionMethod):
    """Segment ablation, as Captum's ``FeatureAblation`` with the :func:`segment_mask`
    feature mask: every element of a lead x window segment gets f(x) - f(x with the
    segment set to ``baseline``) (f: target logit)."""

    name, kind, graphs = "feature_ablation", "perturbation", ("forward",)
    params = (Param("window", DEFAULT_WINDOW, _window), Param("baseline", 0.0, per_ecg()))

    def cost(self, x, s: Settings) -> int:
        _, leads, samples = x.shape
        per_lead = -(-samples // s.window)
        return _check_perturbations("feature_ablation", f"window={s.window}", leads, per_lead, "segments")

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        _, leads, samples = x.shape
        seg = segment_mask(s.window, leads, samples)
        base = broadcast_per_ecg(s.baseline, x)
        per_lead = -(-samples // s.window)

        def build(ecg: np.ndarray, item: np.ndarray) -> np.ndarray:
            # Segment ``item`` is lead item // per_lead, window item % per_lead (segment_mask).
            start = item % per_lead * s.window
            end = np.minimum(start + s.window, samples)
            return _replace_windows(_copies(x, ecg), base, ecg, item // per_lead, start, end)

        f0 = _target_logits(engine, x, target)
        item_start = np.tile(np.arange(per_lead) * s.window, leads)
        diff = f0[:, None] - _window_logits(engine, x, target, build, item_start, s.window)
        return diff[:, seg].astype(np.float32)


# ---------------------------------------------------------------------- surrogate models


def weighted_linear_fit(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Coefficients of the weighted least-squares fit y ~ b + z @ coef (intercept b free).

    Exactly sklearn's ``LinearRegression().fit(z, y, sample_weight=w)`` (Captum's
    ``SkLearnLinearRegression``): centre z and y on their weighted means, scale
    the rows by sqrt(w), solve by SVD least squares with the same singular-value
    cut-off. With fewer samples than features this gives sklearn's minimum-norm
    solution (the intercept not penalised). Float64 throughout.
    """
    z = z.astype(np.float64)
    w = w.astype(np.float64)
    z_mean = w @ z / w.sum()
    y_mean = w @ y / w.sum()
    sw = np.sqrt(w)
    # A multi-threaded BLAS on a ~200 x 144 problem spends its time waiting for busy cores
    # (seen: 0.5 s instead of 2 ms when ONNX Runtime used the other core); one thread is right here.
    with threadpool_limits(limits=1, user_api="blas"):
        return np.linalg.lstsq((z - z_mean) * sw[:, None], (y - y_mean) * sw, rcond=LSTSQ_RCOND)[0]


def _given_coalitions(coalitions: Any, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Validated user coalitions: (n_samples, n_features) shared by all ECGs, or one
    set per ECG (B, n_samples, n_features); returned (B, n, M), possibly a view."""
    if coalitions is None:
        return None
    arr = np.asarray(coalitions)
    if arr.shape == shape[1:]:
        arr = np.broadcast_to(arr, shape)
    if arr.shape != shape:
        raise InvalidArgument(
            f"coalitions must have shape (n_samples, n_features) = {shape[1:]} or "
            f"(batch, n_samples, n_features) = {shape}, got {arr.shape}"
        )
    if arr.dtype == object or not np.isin(arr, (0, 1)).all():
        raise InvalidArgument(
            "coalitions must hold only 0 and 1 (1 keeps a segment, 0 replaces it by baseline)"
        )
    return arr


def _surrogate_attribution(
    engine,
    x: np.ndarray,
    target: np.ndarray,
    base: np.ndarray,
    seg: np.ndarray,
    n: int,
    draw: Callable[[], np.ndarray],
    given: np.ndarray | None,
    weigh: Callable[[np.ndarray, int], np.ndarray],
) -> np.ndarray:
    """Per ECG: evaluate ``n`` coalitions, weigh them, fit the linear surrogate.

    ``draw()`` gives one ECG's (n, M) coalitions, called in ECG order so the draws
    do not depend on grouping or ``max_batch``; ``weigh(z, ecg)`` their weights.
    Coalitions live only for one group of ECGs (about ``_GROUP_ENTRIES`` entries).
    """
    m = int(seg.max()) + 1
    window = int((seg[0] == 0).sum())  # seg is segment_mask(window): segment 0 spans the first window
    coef = np.empty((len(x), m), np.float64)
    group = max(1, _GROUP_ENTRIES // (n * m))
    for g0 in range(0, len(x), group):
        g = slice(g0, min(g0 + group, len(x)))
        z = given[g].astype(bool) if given is not None else np.stack([draw() for _ in range(g.stop - g0)])
        xg, bg = x[g], base[g]

        def build(ecg: np.ndarray, item: np.ndarray, z=z, xg=xg, bg=bg) -> np.ndarray:
            return _coalition_rows(z[ecg, item], xg, bg, ecg, window)

        y = _perturbed_logits(engine, target[g], n, build)
        for i in range(len(z)):
            engine.check_cancelled()  # a fit is ~0.1 s at the caps: stop between them too
            coef[g0 + i] = weighted_linear_fit(z[i], y[i], weigh(z[i], g0 + i))
    return coef[:, seg].astype(np.float32)


def kernel_shap_coalitions(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Captum's Kernel SHAP sampling of ``n`` coalitions of ``m`` features, (n, m) bool.

    First the full and the empty coalition, then for each further sample a size
    k in 1..m-1 with P(k) proportional to (m - 1) / (k (m - k)) (the Shapley
    kernel's total mass per size) and k features chosen uniformly at random.
    """
    z = np.zeros((n, m), bool)
    z[0] = True
    sizes = np.arange(1, m)
    p = (m - 1) / (sizes * (m - sizes))
    k = rng.choice(sizes, size=n - 2, p=p / p.sum())
    # Ranks of uniform keys are a uniform random permutation: the k lowest are a uniform k-subset.
    ranks = rng.random((n - 2, m)).argsort(axis=1).argsort(axis=1)
    z[2:] = ranks < k[:, None]
    return z


def _features(window: int, x: np.ndarray) -> int:
    """The number M of lead x window segments."""
    _, leads, samples = x.shape
    return leads * -(-samples // window)


def _surrogate_samples(name: str, value: Any, ctx: CheckContext) -> int:
    """Kernel SHAP's and LIME's ``n_samples``: 2..MAX_N_SAMPLES, and a coalition matrix of at most
    MAX_SURROGATE_ENTRIES per ECG."""
    why = "each sample is one forward pass per ECG; the cap bounds a request's time"
    n = check_count(name, value, MAX_N_SAMPLES, why, minimum=2)
    window = ctx.checked["window"]
    m = _features(window, ctx.x)
    if n * m > MAX_SURROGATE_ENTRIES:
        raise ResourceExhausted(
            f"{ctx.method} with n_samples={n} and window={window} fits a {n} x {m} coalition matrix "
            f"({n * m:,} entries) per ECG; the limit is {MAX_SURROGATE_ENTRIES:,} (it bounds the memory and "
            "time of the least-squares fit): lower n_samples or use a larger window"
        )
    return n


def _coalitions(name: str, value: Any, ctx: CheckContext) -> np.ndarray | None:
    n, m = ctx.checked["n_samples"], _features(ctx.checked["window"], ctx.x)
    return _given_coalitions(value, (len(ctx.x), n, m))


def _surrogate_setup(x: np.ndarray, s: Settings):
    """What Kernel SHAP and LIME share, from checked settings: segment mask, feature count,
    sample count, baseline, generator and any given coalitions."""
    _, leads, samples = x.shape
    seg = segment_mask(s.window, leads, samples)
    m = int(seg.max()) + 1
    return seg, m, s.n_samples, broadcast_per_ecg(s.baseline, x), rng_for(s.seed), s.coalitions


@register
class KernelShap(AttributionMethod):
    """Kernel SHAP (Lundberg & Lee), as Captum's ``KernelShap`` with the
    :func:`segment_mask` feature mask.

    Coalitions are binary vectors over the M segments (1: keep the ECG's segment,
    0: replace it by ``baseline``). Captum samples them from the Shapley kernel
    (:func:`kernel_shap_coalitions`, so every sampled coalition weighs 1), adds
    the full and the empty coalition with weight 1e6 (standing in for the
    infinite weight that pins the efficiency constraint), and fits the target
    logits of the perturbed inputs by weighted least squares with an intercept
    (sklearn ``LinearRegression``, here :func:`weighted_linear_fit` in NumPy).
    The coefficients, spread over their segments, are the attribution.

    ``n_samples`` counts the full and empty coalitions too (as Captum). ``coalitions``
    (n_samples, M) for all ECGs or (B, n_samples, M) per ECG replaces the random
    draw for exact reproduction (their weights follow the same rule). Without it
    each ECG gets its own draw from ``seed``, as Captum fits one model per example.
    """

    name, kind, graphs, stochastic = "kernel_shap", "perturbation", ("forward",), True
    params = (
        Param("window", DEFAULT_WINDOW, _window),
        Param("n_samples", 200, _surrogate_samples),
        Param("baseline", 0.0, per_ecg()),
        Param("seed", None, seed),
        Param("coalitions", None, _coalitions),
    )
    may_differ = MappingProxyType({"n_samples": "at_least"})  # more coalitions: a closer fit

    def cost(self, x, s: Settings) -> int:
        return s.n_samples

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        seg, m, n, base, rng, given = _surrogate_setup(x, s)

        def weigh(z: np.ndarray, ecg: int) -> np.ndarray:
            size = z.sum(axis=1)
            return np.where((size == 0) | (size == m), KERNEL_SHAP_INF_WEIGHT, 1.0)

        return _surrogate_attribution(
            engine, x, target, base, seg, n, lambda: kernel_shap_coalitions(rng, n, m), given, weigh
        )


# Cosine distances lie in [0, 2]: beyond this width every weight is 1 (and kernel_width**2
# overflows long before float64 does); below the minimum every perturbed weight underflows to 0.
MAX_KERNEL_WIDTH = 1e6
MIN_KERNEL_WIDTH = 1e-6


def _check_kernel_width(name: str, value: Any, ctx: CheckContext) -> float:
    width = check_non_negative(name, value, MAX_KERNEL_WIDTH)
    if width == 0:
        raise InvalidArgument("kernel_width must be > 0, got 0")
    if width < MIN_KERNEL_WIDTH:
        raise InvalidArgument(
            f"kernel_width must be between {MIN_KERNEL_WIDTH} and {MAX_KERNEL_WIDTH}, got {value!r}"
        )
    return width


def cosine_kernel_weights(
    z: np.ndarray, x: np.ndarray, base: np.ndarray, seg: np.ndarray, kernel_width: float
) -> np.ndarray:
    """Captum's default LIME similarity exp(-d^2 / (2 kernel_width^2)), d the cosine
    distance between the ECG ``x`` and each perturbed input (coalitions ``z``).

    Computed from per-segment sums (x.x, x.b, b.b) without building the inputs;
    a zero vector has cosine similarity 0, as in torch (norms clamped at eps).
    """
    m = z.shape[1]
    xs, bs = x.astype(np.float64), base.astype(np.float64)
    ids = seg.ravel()
    sums = [np.bincount(ids, (a * b).ravel(), minlength=m) for a, b in ((xs, xs), (xs, bs), (bs, bs))]
    sxx, sxb, sbb = sums
    zf = z.astype(np.float64)
    dot = zf @ sxx + (1 - zf) @ sxb
    norm_p = np.sqrt(np.maximum(zf @ sxx + (1 - zf) @ sbb, 0.0))
    norm_x = np.sqrt(sxx.sum())
    cos = dot / (max(norm_x, COSINE_EPS) * np.maximum(norm_p, COSINE_EPS))
    return np.exp(-((1 - cos) ** 2) / (2 * kernel_width**2))


@register
class Lime(AttributionMethod):
    """LIME (Ribeiro et al.) over lead x window segments, as Captum's ``Lime`` with
    the :func:`segment_mask` feature mask except for the surrogate model.

    As Captum's defaults: coalitions are uniform binary vectors (each segment kept
    with probability 1/2, otherwise set to ``baseline``); each is weighted by
    exp(-d^2 / (2 kernel_width^2)) with d the cosine distance between the ECG and
    the perturbed input in the original input space (``kernel_width=1.0``).

    Deliberate difference: Captum's default surrogate is sklearn's ``Lasso(alpha=0.01)``;
    here it is plain weighted least squares with an intercept (Captum's
    ``SkLearnLinearRegression``, :func:`weighted_linear_fit`, no ridge): no
    sklearn in the serving path, no penalty shrinking small segment effects to
    zero, and a unique answer. With fewer samples than segments the
    minimum-norm solution is returned, as sklearn does. Parity is with
    ``Lime(model, interpretable_model=SkLearnLinearRegression())``.

    ``coalitions`` (n_samples, M) or (B, n_samples, M) replaces the random draw.
    """

    name, kind, graphs, stochastic = "lime", "perturbation", ("forward",), True
    params = (
        Param("window", DEFAULT_WINDOW, _window),
        Param("n_samples", 200, _surrogate_samples),
        Param("baseline", 0.0, per_ecg()),
        Param("kernel_width", 1.0, _check_kernel_width),
        Param("seed", None, seed),
        Param("coalitions", None, _coalitions),
    )
    may_differ = MappingProxyType({"n_samples": "at_least"})  # more coalitions: a closer fit

    def cost(self, x, s: Settings) -> int:
        return s.n_samples

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        width = s.kernel_width
        seg, m, n, base, rng, given = _surrogate_setup(x, s)

        def weigh(z: np.ndarray, ecg: int) -> np.ndarray:
            return cosine_kernel_weights(z, x[ecg], base[ecg], seg, width)

        return _surrogate_attribution(
            engine, x, target, base, seg, n, lambda: rng.random((n, m)) < 0.5, given, weigh
        )
