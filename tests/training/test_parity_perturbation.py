"""Occlusion, feature ablation, Kernel SHAP and LIME on ONNX Runtime against Captum.

Two architectures (plain and residual), synthetic beats and one real median beat.
The sampling methods are compared on the same coalitions, fed to Captum through
its ``perturb_func``. Criterion (issue #3): relative error, to the reference's
largest magnitude, at most 1e-4 for all but 0.1% of elements.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion
from parity_helpers import assert_parity, randomise_batchnorm
from torch.utils.data import DataLoader, TensorDataset

from ecgx.core.median_beat import median_beat
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods.base import rng_for
from ecgx.service.methods.perturbation import kernel_shap_coalitions, segment_mask, window_starts
from ecgx.training.data.synth import generate
from ecgx.training.data.wfdb_import import read_record
from ecgx.training.export import export_package
from ecgx.training.models import ModelConfig, build_model

ARCHITECTURES = {
    "plain": ModelConfig(widths=(8, 16), stem_stride=4),
    "residual": ModelConfig(widths=(8, 16), stem_stride=4, residual=True),
}
X = generate(3, np.random.default_rng(0)).signals.astype(np.float32)
TARGET = np.array([0, 4, 8])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The reference runs many tiny forward passes; on a small, busy machine PyTorch's
    # thread pool makes each ~10x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def setup(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ARCHITECTURES[request.param]).eval()
    randomise_batchnorm(model)
    # An untrained net's logit barely moves when one 0.1 s segment is replaced, so the
    # float32 rounding of two nearly equal logits would dominate the comparison (up to
    # 3e-4 of the largest attribution on the real beat, Captum float32 vs float64).
    # A stronger stem stands in for the sensitivity of a trained model.
    with torch.no_grad():
        model.features[0][0].weight.mul_(10.0)
    pkg = export_package(model, tmp_path_factory.mktemp(request.param) / "pkg", sample_inputs=X)
    return model, _engine(pkg, max_batch=7)


def _engine(package, max_batch: int) -> AttributionEngine:
    # One intra-op thread: ONNX Runtime's idle pool threads spin and would starve
    # PyTorch and NumPy of the test machine's two cores.
    return AttributionEngine(package, providers=["CPUExecutionProvider"], max_batch=max_batch, threads=1)


class Float64LinearRegression(SkLearnLinearRegression):
    """Captum's SkLearnLinearRegression fitted in float64.

    Captum hands sklearn float32 data. With Kernel SHAP's 1e6 weights float32
    least squares loses up to ~1% of the coefficients to rounding (measured), and
    with fewer samples than segments the float32 singular-value cut-off keeps
    noise directions; the reference would test round-off rather than the method.
    """

    def fit(self, train_data: DataLoader, **kwargs):
        tensors = [t.double() for t in train_data.dataset.tensors]
        return super().fit(DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0])), **kwargs)


def _captum_surrogate(
    explainer, x: np.ndarray, target: np.ndarray, coalitions: np.ndarray, window: int, baseline: float = 0.0
) -> np.ndarray:
    """Captum's Kernel SHAP / LIME for each ECG on the given coalitions (B, n, M)."""
    mask = torch.tensor(segment_mask(window))[None]
    out = []
    for xi, ti, zi in zip(x, target, coalitions, strict=True):

        def given(original_inp, zi=zi, **kwargs):
            for row in zi:
                yield torch.tensor(row[None].astype(np.int64))

        explainer.perturb_func = given
        attr = explainer.attribute(
            torch.tensor(xi[None]),
            baselines=baseline,
            target=int(ti),
            feature_mask=mask,
            n_samples=len(zi),
            perturbations_per_eval=32,
        )
        out.append(attr.numpy())
    return np.concatenate(out)


def _kernel_shap(model: torch.nn.Module) -> KernelShap:
    explainer = KernelShap(model)
    explainer.interpretable_model = Float64LinearRegression()
    return explainer


def _lime(model: torch.nn.Module) -> Lime:
    return Lime(model, interpretable_model=Float64LinearRegression())


def _per_ecg_draws(draw, seed: int, batch: int) -> np.ndarray:
    """The coalitions the methods draw from ``seed``: one set per ECG, in ECG order."""
    rng = rng_for(seed)
    return np.stack([draw(rng) for _ in range(batch)])


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize(("window", "stride"), [(50, 25), (40, 30)])
def test_occlusion(setup, window, stride):
    model, engine = setup
    base = np.random.default_rng(2).normal(0, 0.05, X.shape).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Occlusion(model).attribute(
            torch.tensor(X),
            sliding_window_shapes=(1, window),
            strides=(1, stride),
            baselines=torch.tensor(base),
            target=torch.tensor(TARGET),
            perturbations_per_eval=32,
        )
    got = engine.attribute("occlusion", X, TARGET, window=window, stride=stride, baseline=base)
    assert_parity(got, ref.numpy())


@pytest.mark.parametrize(("window", "baseline"), [(50, 0.0), (70, 0.1)])
def test_feature_ablation(setup, window, baseline):
    model, engine = setup
    ref = FeatureAblation(model).attribute(
        torch.tensor(X),
        target=torch.tensor(TARGET),
        feature_mask=torch.tensor(segment_mask(window))[None],
        baselines=baseline,
        perturbations_per_eval=32,
    )
    got = engine.attribute("feature_ablation", X, TARGET, window=window, baseline=baseline)
    assert_parity(got, ref.numpy())


@pytest.mark.parametrize(("window", "n_samples"), [(50, 60), (100, 120)])
def test_kernel_shap(setup, window, n_samples):
    """Fewer samples than segments (minimum-norm fit) and more (unique fit); the seeded
    draw is reproduced to check the sampling path too."""
    model, engine = setup
    m = 12 * (-(-600 // window))
    z = _per_ecg_draws(lambda rng: kernel_shap_coalitions(rng, n_samples, m), 5, len(X))
    ref = _captum_surrogate(_kernel_shap(model), X, TARGET, z, window)
    got = engine.attribute("kernel_shap", X, TARGET, window=window, n_samples=n_samples, seed=5)
    assert_parity(got, ref)
    assert np.array_equal(
        got, engine.attribute("kernel_shap", X, TARGET, window=window, n_samples=n_samples, coalitions=z)
    )


def test_lime(setup):
    model, engine = setup
    z = _per_ecg_draws(lambda rng: rng.random((160, 144)) < 0.5, 6, len(X))
    ref = _captum_surrogate(_lime(model), X, TARGET, z, 50)
    assert_parity(engine.attribute("lime", X, TARGET, n_samples=160, seed=6), ref)


def test_lime_shared_coalitions_and_baseline(setup):
    """One coalition matrix for all ECGs, a non-zero baseline, fewer samples than segments."""
    model, engine = setup
    z = np.random.default_rng(7).random((100, 144)) < 0.5
    ref = _captum_surrogate(_lime(model), X, TARGET, np.stack([z] * len(X)), 50, baseline=0.05)
    got = engine.attribute("lime", X, TARGET, n_samples=100, baseline=0.05, coalitions=z.astype(np.int64))
    assert_parity(got, ref)


def test_real_median_beat(setup, shared_data: Path):
    model, engine = setup
    signal, fs, _ = read_record(shared_data / "ptbxl-sample" / "HR06000")
    x = median_beat(signal, fs)[None]
    target = engine.logits(x).argmax(axis=1)
    xt, tt = torch.tensor(x), torch.tensor(target)
    ref = Occlusion(model).attribute(
        xt, sliding_window_shapes=(1, 50), strides=(1, 25), target=tt, perturbations_per_eval=64
    )
    assert_parity(engine.attribute("occlusion", x, target), ref.numpy())
    mask = torch.tensor(segment_mask(50))[None]
    ref = FeatureAblation(model).attribute(xt, target=tt, feature_mask=mask, perturbations_per_eval=64)
    assert_parity(engine.attribute("feature_ablation", x, target), ref.numpy())
    z = kernel_shap_coalitions(np.random.default_rng(8), 200, 144)[None]
    ref = _captum_surrogate(_kernel_shap(model), x, target, z, 50)
    assert_parity(engine.attribute("kernel_shap", x, target, coalitions=z), ref)
    z = np.random.default_rng(9).random((1, 200, 144)) < 0.5
    ref = _captum_surrogate(_lime(model), x, target, z, 50)
    assert_parity(engine.attribute("lime", x, target, coalitions=z), ref)


# ---------------------------------------------------------------------- segments and sampling


def test_segment_mask():
    seg = segment_mask()
    assert seg.shape == (12, 600) and seg.dtype == np.int64
    assert seg.max() == 143 and np.array_equal(np.bincount(seg.ravel()), np.full(144, 50))
    assert seg[2, 149] == 2 * 12 + 2
    short = segment_mask(70)  # 9 windows per lead, the last one 40 samples long
    assert short.max() == 12 * 9 - 1 and (short[0] == 8).sum() == 40


def test_window_starts_cut_the_last_window_at_the_end():
    assert window_starts(600, 50, 25).tolist() == list(range(0, 551, 25))
    assert window_starts(600, 40, 30)[-1] == 570  # covers 570..599, 30 samples
    assert window_starts(600, 600, 7).tolist() == [0]


def test_kernel_shap_coalitions_follow_the_shapley_kernel():
    m, n = 12, 20_000
    z = kernel_shap_coalitions(np.random.default_rng(0), n, m)
    assert z[0].all() and not z[1].any()
    sizes = z[2:].sum(axis=1)
    k = np.arange(1, m)
    p = (m - 1) / (k * (m - k))
    p /= p.sum()
    freq = np.bincount(sizes, minlength=m)[1:] / (n - 2)
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n)
    # Given a size, every feature is equally likely to be kept.
    per_feature = z[2:][sizes == 6].mean(axis=0)
    assert np.abs(per_feature - 0.5).max() < 0.05


# ---------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_seeds(setup, method):
    _, engine = setup
    a = engine.attribute(method, X[:2], TARGET[:2], n_samples=20, seed=1)
    assert np.array_equal(a, engine.attribute(method, X[:2], TARGET[:2], n_samples=20, seed=1))
    assert not np.allclose(a, engine.attribute(method, X[:2], TARGET[:2], n_samples=20, seed=2))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("occlusion", {"window": 40, "stride": 30}),
        ("feature_ablation", {"window": 70}),
        ("kernel_shap", {"n_samples": 30, "seed": 3}),
        ("lime", {"n_samples": 30, "seed": 3}),
    ],
)
def test_batch_size_does_not_change_results(setup, method, params):
    _, engine = setup
    one, many = _engine(engine.package, max_batch=1), _engine(engine.package, max_batch=64)
    assert np.array_equal(
        one.attribute(method, X, TARGET, **params), many.attribute(method, X, TARGET, **params)
    )


def test_forward_passes_stay_within_max_batch(setup, monkeypatch):
    _, engine = setup
    seen = []
    logits = engine.logits

    def spy(rows):
        seen.append(len(rows))
        return logits(rows)

    monkeypatch.setattr(engine, "logits", spy)
    # Occlusion's perturbed rows take the incremental graph when the package has it (issue #21).
    run = engine.run

    def run_spy(graph, feeds, outputs):
        if graph == "incremental_forward":
            seen.append(len(feeds["x"]))
        return run(graph, feeds, outputs)

    monkeypatch.setattr(engine, "run", run_spy)
    engine.attribute("kernel_shap", X, TARGET, n_samples=30, seed=0)
    engine.attribute("occlusion", X, TARGET)
    assert max(seen) <= engine.max_batch
    assert sum(seen) >= 3 * 30 + 3 * 12 * 23


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("occlusion", {"window": 0}, "window must be a positive integer"),
        ("occlusion", {"window": 601}, "window must be at most 600"),
        ("occlusion", {"window": 20, "stride": 30}, "stride must be at most window"),
        ("occlusion", {"stride": 2.5}, "stride must be a positive integer"),
        ("occlusion", {"baseline": np.zeros((12, 500))}, "baseline must be"),
        ("feature_ablation", {"baseline": np.nan}, "baseline holds NaN"),
        ("kernel_shap", {"n_samples": 1}, "n_samples must be between 2"),
        ("kernel_shap", {"n_samples": 10**9}, "n_samples must be between 2"),
        ("kernel_shap", {"seed": -1}, "seed must be"),
        ("kernel_shap", {"n_samples": 4, "coalitions": np.ones((5, 144))}, "coalitions must have shape"),
        ("lime", {"n_samples": 2, "coalitions": np.full((2, 144), 0.5)}, "coalitions must hold only 0 and 1"),
        ("lime", {"kernel_width": 0}, "kernel_width must be > 0"),
        ("lime", {"kernel_width": "wide"}, "kernel_width must be a number"),
        ("lime", {"samples": 10}, "has no parameter"),
    ],
)
def test_bad_parameters_are_named(setup, method, params, message):
    _, engine = setup
    with pytest.raises(ValueError, match=message):
        engine.attribute(method, X[:1], 0, **params)
