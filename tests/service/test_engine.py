"""The ONNX Runtime engine: loading, input checks, targets, batching, seeds, threads, no PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecgx.core.package_reader import PackageError, load_package
from ecgx.service.engine import AttributionEngine, select_providers
from ecgx.service.methods import METHOD_NAMES
from ecgx.training.data.synth import generate

X = generate(3, np.random.default_rng(1)).signals


@pytest.fixture(scope="module")
def engine(tiny_package: Path) -> AttributionEngine:
    return AttributionEngine(tiny_package, providers=["CPUExecutionProvider"], max_batch=4)


def test_every_method_returns_float32_maps(engine: AttributionEngine) -> None:
    for method in METHOD_NAMES:
        params = {"n_samples": 8} if method in ("kernel_shap", "lime") else {}
        out = engine.attribute(method, X, "SR", **params)
        assert out.shape == X.shape and out.dtype == np.float32, method
        assert np.isfinite(out).all(), method


def test_default_providers_end_with_cpu() -> None:
    assert select_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        select_providers(["NoSuchExecutionProvider"])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((2, 12, 500), np.float32), r"shape \(batch, 12, 600\)"),
        (np.zeros((0, 12, 600), np.float32), "batch size 0"),
        (np.full((1, 12, 600), np.nan, np.float32), r"ECG\(s\) \[0\] hold NaN"),
        (np.full((2, 12, 600), 900.0, np.float32), "exceed 50.0 mV"),
        (np.array([["a"] * 600] * 12), "real numbers"),
    ],
)
def test_bad_inputs_are_explained(engine: AttributionEngine, inputs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.attribute("saliency", inputs)


def test_targets_by_key_code_index_or_prediction(engine: AttributionEngine) -> None:
    by_key = engine.attribute("saliency", X, "AF")
    assert np.array_equal(by_key, engine.attribute("saliency", X, "164889003"))
    assert np.array_equal(by_key, engine.attribute("saliency", X, 3))
    assert np.array_equal(by_key, engine.attribute("saliency", X, [3, 3, 3]))
    predicted = engine.logits(X).argmax(axis=1)
    assert np.array_equal(engine.attribute("saliency", X), engine.attribute("saliency", X, predicted))
    for bad, message in (("XYZ", "unknown class"), (9, "out of range"), ([1, 2], "2 targets for 3 ECGs")):
        with pytest.raises(ValueError, match=message):
            engine.attribute("saliency", X, bad)


def test_unknown_method_and_parameters_are_named(engine: AttributionEngine) -> None:
    with pytest.raises(ValueError, match=r"unknown attribution method 'shap'.*saliency"):
        engine.attribute("shap", X)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['steps'\].*n_steps"):
        engine.attribute("integrated_gradients", X, steps=10)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        engine.attribute("integrated_gradients", X, n_steps=0)
    with pytest.raises(ValueError, match="maxpool_rule must be one of"):
        engine.attribute("deeplift", X, maxpool_rule="max")


def test_batching_does_not_change_results(tiny_package: Path) -> None:
    small = AttributionEngine(tiny_package, max_batch=1)
    large = AttributionEngine(tiny_package, max_batch=256)
    for method, params in (
        ("integrated_gradients", {"n_steps": 8}),
        ("deeplift_shap", {"seed": 0}),
        ("smoothgrad", {"n_samples": 3, "seed": 0}),
    ):
        a = small.attribute(method, X, "SR", **params)
        b = large.attribute(method, X, "SR", **params)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=method)


def test_stochastic_methods_follow_their_seed(engine: AttributionEngine) -> None:
    for method in ("smoothgrad", "gradient_shap", "deeplift_shap", "random"):
        a = engine.attribute(method, X, "SR", seed=1)
        assert np.array_equal(a, engine.attribute(method, X, "SR", seed=1)), method
        assert not np.array_equal(a, engine.attribute(method, X, "SR", seed=2)), method


def test_one_engine_is_safe_to_share_across_threads(engine: AttributionEngine) -> None:
    jobs = [
        (m, i % 3)
        for i, m in enumerate(["saliency", "integrated_gradients", "deeplift", "gradcam", "lrp"] * 4)
    ]
    expected = {job: engine.attribute(job[0], X, job[1]) for job in set(jobs)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: engine.attribute(job[0], X, job[1]), jobs))
    for job, result in zip(jobs, results, strict=True):
        assert np.array_equal(result, expected[job]), job


def test_tampered_or_malformed_packages_are_refused(tiny_package: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    assert load_package(pkg).n_classes == 9
    with open(pkg / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(PackageError, match=r"weights.bin does not match its SHA-256"):
        AttributionEngine(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["format_version"] = 99
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="version 99 is not supported"):
        load_package(pkg)
    with pytest.raises(PackageError, match=r"manifest.json is missing"):
        load_package(tmp_path)


def test_engine_process_never_imports_torch(tiny_package: Path) -> None:
    script = f"""
import sys
import numpy as np
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES
engine = AttributionEngine({str(tiny_package)!r})
x = np.zeros((1, 12, 600), np.float32)
for m in METHOD_NAMES:
    engine.attribute(m, x, 0, **({{"n_samples": 4}} if m in ("kernel_shap", "lime") else {{}}))
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_two_threads_split_rows_and_give_the_one_thread_result(tiny_package: Path) -> None:
    """threads=2 runs a pass of enough rows as concurrent single-thread runs over row ranges:
    every output (maps and logits, graphs with setting inputs such as DeepLIFT's flag) equals
    the one-thread engine's, also when many requests share the engine's pool at once."""
    from ecgx.service.engine import MIN_SPLIT_ROWS

    x = generate(2 * MIN_SPLIT_ROWS + 1, np.random.default_rng(2)).signals
    one = AttributionEngine(tiny_package, threads=1, max_batch=64)
    two = AttributionEngine(tiny_package, threads=2, max_batch=64)
    feeds = {"x": x.astype(np.float32), "seed": two.selectors(np.zeros(len(x), np.int64))}
    assert two._split("gradient", feeds, ["gradient"]) is not None  # this pass is split
    assert two._split("gradient", {k: v[:MIN_SPLIT_ROWS] for k, v in feeds.items()}, ["gradient"]) is None
    assert np.array_equal(one.logits(x), two.logits(x))
    jobs = [("saliency", {}), ("deeplift", {"maxpool_rule": "gradient"}), ("deeplift", {}), ("lrp", {})] * 3
    expected = [one.attribute(m, x, "SR", **kw) for m, kw in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: two.attribute(job[0], x, "SR", **job[1]), jobs))
    for job, a, b in zip(jobs, expected, got, strict=True):
        assert np.array_equal(a, b), job


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 9), start=st.integers(0, 30), length=st.integers(1, 60), seed=st.integers(0, 2**16)
)
def test_adding_sample_by_sample_equals_np_add_at_bit_for_bit(batch, start, length, seed) -> None:
    """The engine's accumulation of many passes per ECG keeps np.add.at's order of additions."""
    from ecgx.service.engine import _add_by_sample

    rng = np.random.default_rng(seed)
    contribution = rng.standard_normal((length, 3, 5)).astype(np.float32)
    expected = rng.standard_normal((batch, 3, 5)).astype(np.float32)
    got = expected.copy()
    np.add.at(expected, np.arange(start, start + length) % batch, contribution)
    _add_by_sample(got, slice(start, start + length), contribution)
    assert np.array_equal(got, expected)
