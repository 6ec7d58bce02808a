"""Cost caps and early parameter checks of the engine (service/limits.py), and bounded memory
for large requests that are allowed."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ecgx.cli import main
from ecgx.service import limits
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES
from ecgx.training.data.synth import generate

X = generate(3, np.random.default_rng(2)).signals


@pytest.fixture(scope="module")
def engine(tiny_package: Path) -> AttributionEngine:
    return AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_batch=64)


@pytest.fixture
def no_model_pass(engine: AttributionEngine, monkeypatch) -> list[str]:
    """Fails the test if a bad request reaches ONNX Runtime: checks come before any pass."""
    calls: list[str] = []

    def run(graph, feeds, outputs):
        calls.append(graph)
        raise AssertionError(f"a model pass ({graph}) ran before the parameters were checked")

    monkeypatch.setattr(engine, "run", run)
    return calls


# ------------------------------------------------------------------------------------------ cost caps


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "integrated_gradients",
            {"n_steps": 15000},
            r"n_steps must be between 1 and 1000, got 15000: each step is one gradient pass per ECG",
        ),
        ("integrated_gradients", {"n_steps": 1001}, r"n_steps must be between 1 and 1000, got 1001"),
        ("smoothgrad", {"n_samples": 2001}, r"n_samples must be between 1 and 2000, got 2001: each sample"),
        ("gradient_shap", {"n_samples": 10**6}, r"n_samples must be between 1 and 2000, got 1000000"),
        ("kernel_shap", {"n_samples": 2001}, r"n_samples must be between 2 and 2000, got 2001: each sample"),
        ("lime", {"n_samples": 10**9}, r"n_samples must be between 2 and 2000, got 1000000000"),
        (
            "deeplift_shap",
            {"baselines": np.broadcast_to(np.float32(0), (1001, 12, 600))},
            r"baselines must number between 1 and 1000, got 1001",
        ),
        (
            "gradient_shap",
            {"baselines": np.broadcast_to(np.float32(0), (1001, 12, 600))},
            r"baselines must number between 1 and 1000, got 1001",
        ),
        (
            "occlusion",
            {"window": 1, "stride": 1},
            r"occlusion with window=1, stride=1 needs 12 leads x 600 windows = 7200 forward passes per ECG; "
            r"the limit is 2000 \(it bounds a request's time\): use a larger window or stride",
        ),
        (
            "occlusion",
            {"window": 4, "stride": 2},
            r"window=4, stride=2 needs 12 leads x 299 windows = 3588 forward passes",
        ),
        (
            "feature_ablation",
            {"window": 1},
            r"feature_ablation with window=1 needs 12 leads x 600 segments = 7200 forward passes per ECG; "
            r"the limit is 2000",
        ),
        (
            "kernel_shap",
            {"window": 5, "n_samples": 2000},
            r"kernel_shap with n_samples=2000 and window=5 fits a 2000 x 1440 coalition matrix "
            r"\(2,880,000 entries\) per ECG; the limit is 2,000,000",
        ),
        (
            "lime",
            {"window": 2, "n_samples": 1000},
            r"lime with n_samples=1000 and window=2 fits a 1000 x 3600",
        ),
        (
            "smoothgrad",
            {"stdev": 1e6},
            r"stdev must be at most 50.0 mV \(inputs are millivolts\), got 1000000.0",
        ),
        ("gradient_shap", {"stdev": 51}, r"stdev must be at most 50.0 mV"),
    ],
)
def test_each_cost_cap_names_parameter_value_and_limit(
    engine: AttributionEngine, no_model_pass, method: str, params: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.attribute(method, X, None, **params)  # None: the target would need a forward pass


def test_the_caps_are_the_documented_constants() -> None:
    assert limits.MAX_N_STEPS == 1000 and limits.MAX_N_SAMPLES == 2000 and limits.MAX_BASELINES == 1000
    assert limits.MAX_PERTURBATIONS == 2000 and limits.MAX_SURROGATE_ENTRIES == 2_000_000
    readme = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    for figure in ("1000", "2000", "2,000,000", "4096", f"{limits.MAX_BATCH_ROWS}"):
        assert figure in readme, figure


def test_the_largest_allowed_settings_pass_the_checks(engine: AttributionEngine, no_model_pass) -> None:
    """The caps are inclusive: the limit itself is allowed (checked without running it)."""
    from ecgx.service.methods import get_method

    cases = {
        "integrated_gradients": {"n_steps": 1000},
        "smoothgrad": {"n_samples": 2000, "stdev": 50.0},
        "gradient_shap": {"n_samples": 2000},
        "deeplift_shap": {"baselines": np.broadcast_to(np.float32(0), (1000, 12, 600))},
        "occlusion": {"window": 5, "stride": 5},  # 12 x 120 = 1440 windows
        "feature_ablation": {"window": 4},  # 12 x 150 = 1800 segments
        "kernel_shap": {"n_samples": 2000, "window": 50},  # 2000 x 144
        "lime": {"n_samples": 1388, "window": 5},  # 1388 x 1440 = 1,998,720 entries
    }
    for method, params in cases.items():
        impl = get_method(method)
        assert impl.check(X, **{**impl.parameters(), **params}) >= 1, method
    assert not no_model_pass


def test_request_size_caps(tiny_package: Path) -> None:
    small = AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_request_ecgs=2)
    with pytest.raises(ValueError, match=r"inputs hold 3 ECGs; this engine takes at most 2 per request"):
        small.attribute("saliency", X, 0)
    capped = AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_request_rows=100)
    with pytest.raises(
        ValueError,
        match=r"integrated_gradients with these settings needs 50 model passes per ECG x 3 ECGs = 150 "
        r"passes; this engine allows at most 100 per request \(max_request_rows\)",
    ):
        capped.attribute("integrated_gradients", X, 0)
    capped.attribute("integrated_gradients", X, 0, n_steps=33)  # 99 passes
    unlimited = AttributionEngine(
        tiny_package, providers=["CPUExecutionProvider"], max_request_ecgs=None, max_request_rows=None
    )
    assert unlimited.attribute("saliency", X, 0).shape == X.shape


def test_default_request_caps_leave_the_gate_room() -> None:
    # The gate's default run: 256 ECGs, occlusion's 12 x 23 windows + 1 and Kernel SHAP's 200 samples.
    assert limits.MAX_REQUEST_ECGS >= 256
    assert 256 * max(12 * 23 + 1, 200) <= limits.MAX_REQUEST_ROWS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": limits.MAX_BATCH_ROWS + 1}, r"max_batch=1025 is over the limit of 1024"),
        ({"max_batch": 0}, r"max_batch must be a positive integer, got 0"),
        ({"max_batch": 2.0}, r"max_batch must be a positive integer"),
        ({"threads": -1}, r"threads must be a positive integer"),
        ({"max_request_ecgs": 0}, r"max_request_ecgs must be a positive integer"),
        ({"max_request_rows": "many"}, r"max_request_rows must be a positive integer"),
    ],
)
def test_engine_settings_are_checked(tiny_package: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], **kwargs)


def test_the_cli_reports_a_cap_as_a_one_line_error(
    tiny_package: Path, small_synth: Path, tmp_path: Path, capsys
) -> None:
    args = ["attribute", "--package", str(tiny_package), "--data", str(small_synth), "--count", "1"]
    out = tmp_path / "ig.npy"
    code = main(
        [*args, "--method", "integrated_gradients", "--param", "n_steps=15000", "--out", str(out), "-q"]
    )
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("ecgx: error: n_steps must be between 1 and 1000, got 15000")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- early parameter checks


NAN = float("nan")
BAD = [
    ("saliency", {"abs": "yes"}, r"abs must be true or false, got 'yes'"),
    ("integrated_gradients", {"n_steps": 2.5}, r"n_steps must be a positive integer, got 2.5"),
    ("integrated_gradients", {"n_steps": -3}, r"n_steps must be a positive integer, got -3"),
    ("integrated_gradients", {"n_steps": NAN}, r"n_steps must be a positive integer, got nan"),
    ("integrated_gradients", {"n_steps": True}, r"n_steps must be a positive integer, got True"),
    ("integrated_gradients", {"n_steps": "50"}, r"n_steps must be a positive integer, got '50'"),
    ("integrated_gradients", {"method": "simpson"}, r"method must be one of \['gausslegendre'"),
    ("integrated_gradients", {"method": ["gausslegendre"]}, r"method must be one of"),
    (
        "integrated_gradients",
        {"method": "riemann_trapezoid", "n_steps": 1},
        r"riemann_trapezoid needs n_steps",
    ),
    ("integrated_gradients", {"baseline": "zero"}, r"baseline must hold real numbers, got 'zero'"),
    ("integrated_gradients", {"baseline": {"mv": 0}}, r"baseline must hold real numbers"),
    ("integrated_gradients", {"baseline": np.full((12, 600), NAN)}, r"baseline holds NaN or infinite values"),
    ("integrated_gradients", {"baseline": np.zeros((2, 12, 600))}, r"baseline must be a number, one ECG"),
    ("integrated_gradients", {"baseline": 1j}, r"baseline must hold real numbers"),
    ("smoothgrad", {"stdev": -0.1}, r"stdev must be a finite number >= 0, got -0.1"),
    ("smoothgrad", {"stdev": NAN}, r"stdev must be a finite number >= 0, got nan"),
    ("smoothgrad", {"stdev": "0.1"}, r"stdev must be a number, got '0.1'"),
    ("smoothgrad", {"seed": -1}, r"seed must be a non-negative integer or None, got -1"),
    ("smoothgrad", {"seed": 1.5}, r"seed must be a non-negative integer or None, got 1.5"),
    ("smoothgrad", {"seed": True}, r"seed must be a non-negative integer or None, got True"),
    ("smoothgrad", {"n_samples": 0}, r"n_samples must be a positive integer, got 0"),
    ("smoothgrad", {"abs": 1}, r"abs must be true or false, got 1"),
    (
        "smoothgrad",
        {"n_samples": 2, "noise": np.zeros((3, 3, 12, 600))},
        r"noise must have shape \(2, 3, 12, 600\)",
    ),
    ("smoothgrad", {"n_samples": 1, "noise": np.full((1, 3, 12, 600), NAN)}, r"noise holds NaN"),
    ("gradient_shap", {"n_samples": 1, "alphas": [[0.5, NAN, 0.5]]}, r"alphas holds NaN or infinite values"),
    (
        "gradient_shap",
        {"n_samples": 1, "baseline_index": [[0.0, 1.0, 0.0]]},
        r"baseline_index must hold integers",
    ),
    ("gradient_shap", {"n_samples": 1, "baseline_index": [[0, 8, 0]]}, r"baseline_index must lie in 0\.\.7"),
    ("gradient_shap", {"baselines": np.zeros((0, 12, 600))}, r"baselines must have shape \(K, 12, 600\)"),
    ("gradient_shap", {"baselines": "flat"}, r"baselines must hold real numbers"),
    ("deeplift", {"maxpool_rule": None}, r"maxpool_rule must be one of \['rescale', 'gradient'\], got None"),
    ("deeplift_shap", {"seed": "x"}, r"seed must be a non-negative integer or None, got 'x'"),
    ("deeplift_shap", {"baselines": np.full((2, 12, 600), np.inf)}, r"baselines holds NaN or infinite"),
    ("gradcam", {"relu": "no"}, r"relu must be true or false, got 'no'"),
    ("gradcam", {"interpolation": "cubic"}, r"interpolation must be one of \['linear', 'nearest'\]"),
    ("guided_gradcam", {"interpolation": 3}, r"interpolation must be one of"),
    ("lrp", {"epsilon": -1e-6}, r"epsilon must be a finite number >= 0"),
    ("lrp", {"epsilon": float("inf")}, r"epsilon must be a finite number >= 0, got inf"),
    ("occlusion", {"window": "50"}, r"window must be a positive integer, got '50'"),
    ("occlusion", {"stride": 0}, r"stride must be a positive integer, got 0"),
    ("occlusion", {"baseline": [1, 2]}, r"baseline must be a number, one ECG"),
    ("feature_ablation", {"window": 601}, r"window must be at most 600 samples, got 601"),
    ("kernel_shap", {"n_samples": 1}, r"n_samples must be between 2 and 2000, got 1"),
    ("kernel_shap", {"coalitions": np.ones((200, 10))}, r"coalitions must have shape"),
    ("lime", {"kernel_width": NAN}, r"kernel_width must be a finite number >= 0, got nan"),
    ("lime", {"kernel_width": 0}, r"kernel_width must be > 0, got 0"),
    ("random", {"seed": "a"}, r"seed must be a non-negative integer or None, got 'a'"),
]


@pytest.mark.parametrize(("method", "params", "message"), BAD, ids=[f"{m}-{sorted(p)}" for m, p, _ in BAD])
def test_bad_parameters_fail_before_any_model_pass(
    engine: AttributionEngine, no_model_pass, method: str, params: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.attribute(method, X, None, **params)


def test_every_method_checks_every_parameter_it_takes() -> None:
    """Each setting is declared once (name, default, check): ``parameters()`` is that declaration,
    and the defaults pass the checks (tests/service/test_method_registry.py has the rest)."""
    from ecgx.service.methods import get_method

    for name in METHOD_NAMES:
        impl = get_method(name)
        assert impl.parameters() == {p.name: p.default for p in impl.params}, name
        assert impl.check(X, **impl.parameters()) >= 0, name


# ------------------------------------------------------------------------------------- bounded memory


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("method", "params", "full_mb"),
    [
        # full_mb: the (passes, B, 12, 600) array the method must never build, for B = 2
        ("integrated_gradients", {"n_steps": 1000}, 1000 * 2 * 7200 * 4 / 1e6),
        ("smoothgrad", {"n_samples": 2000, "seed": 0}, 2000 * 2 * 7200 * 8 / 1e6),
        ("gradient_shap", {"n_samples": 2000, "stdev": 0.1, "seed": 0}, 2000 * 2 * 7200 * 8 / 1e6),
        ("deeplift_shap", {"baselines": "1000 flat lines"}, 1000 * 2 * 7200 * 4 / 1e6),
        ("occlusion", {"window": 5, "stride": 5}, 1441 * 2 * 7200 * 4 / 1e6),
        ("kernel_shap", {"n_samples": 2000, "seed": 0}, 2000 * 2 * 7200 * 4 / 1e6),
    ],
    ids=["integrated_gradients", "smoothgrad", "gradient_shap", "deeplift_shap", "occlusion", "kernel_shap"],
)
def test_large_allowed_requests_keep_memory_bounded(
    engine: AttributionEngine, method: str, params: dict, full_mb: float
) -> None:
    """NumPy allocations (traced) stay far below the whole request's rows: rows are built and
    sent to ONNX Runtime max_batch (64) at a time. Measured: 6-14 MB."""
    x = X[:2]
    if params.get("baselines") == "1000 flat lines":
        params = {"baselines": np.zeros((1000, 12, 600), np.float32)}
    engine.warm_up()
    peak = _peak_mb(lambda: engine.attribute(method, x, 0, **params))
    assert peak < 32, f"{method}: peak {peak:.1f} MB (the full rows would be {full_mb:.0f} MB)"
    assert peak < full_mb / 4


def test_random_draws_do_not_depend_on_max_batch(tiny_package: Path) -> None:
    """Noise and baseline draws are made chunk by chunk, yet give the same maps for any max_batch."""
    one = AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_batch=5)
    many = AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_batch=256)
    baselines = np.random.default_rng(3).normal(0, 0.05, (10, 12, 600)).astype(np.float32)
    for method, params in (
        ("gradient_shap", {"n_samples": 7, "stdev": 0.05, "seed": 4}),
        ("smoothgrad", {"n_samples": 7, "seed": 4}),
        ("deeplift_shap", {"baselines": baselines}),
    ):
        a, b = one.attribute(method, X, "SR", **params), many.attribute(method, X, "SR", **params)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=method)
    a = one.attribute("gradient_shap", X, "SR", n_samples=7, stdev=0.05, seed=4)
    assert not np.allclose(a, one.attribute("gradient_shap", X, "SR", n_samples=7, stdev=0.05, seed=5))
