"""service.providers: provider selection and options, and benchmarks/gpu_check (its CPU dry run
here: no GPU on this machine or in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from ecgx.core.errors import InvalidArgument
from ecgx.core.package_reader import load_package
from ecgx.service.providers import (
    CPU,
    CUDA,
    PROVIDER_PREFERENCE,
    TENSORRT,
    ProviderSettings,
    gpu_providers_available,
    needs_warm_up,
    provider_options,
    select_providers,
    session_providers,
    warm_up,
    warm_up_feeds,
)

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = not gpu_providers_available()


def test_selection_prefers_tensorrt_then_cuda_then_cpu_and_refuses_what_is_missing():
    assert PROVIDER_PREFERENCE == (TENSORRT, CUDA, CPU)
    chosen = select_providers()
    assert chosen[-1] == CPU and chosen == [p for p in PROVIDER_PREFERENCE if p in chosen]
    with pytest.raises(InvalidArgument, match="not available"):
        select_providers(["NoSuchExecutionProvider"])
    with pytest.raises(InvalidArgument, match="at least one"):
        select_providers([])


def test_tensorrt_caches_and_precision_are_provider_options(tmp_path):
    opts = provider_options(TENSORRT, ProviderSettings(fp16=True, cache_dir=tmp_path / "trt", device_id=1))
    assert opts["trt_engine_cache_enable"] == "1" and opts["trt_timing_cache_enable"] == "1"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt" / "engines")
    assert opts["trt_timing_cache_path"] == str(tmp_path / "trt" / "timing")
    assert opts["trt_fp16_enable"] == "1" and opts["device_id"] == "1"
    off = provider_options(TENSORRT, ProviderSettings())
    assert off["trt_engine_cache_enable"] == "0" and "trt_engine_cache_path" not in off
    assert off["trt_fp16_enable"] == "0"
    cuda = provider_options(CUDA, ProviderSettings(tf32=False))
    assert cuda["use_tf32"] == "0" and cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert provider_options(CPU, ProviderSettings()) == {}
    pairs = session_providers([TENSORRT, CUDA, CPU], ProviderSettings(cache_dir=tmp_path / "trt"))
    assert [name for name, _ in pairs] == [TENSORRT, CUDA, CPU]
    assert (tmp_path / "trt" / "engines").is_dir() and (tmp_path / "trt" / "timing").is_dir()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device_id": -1}, "device_id"),
        ({"cudnn_search": "FAST"}, "cudnn_search"),
        ({"workspace_bytes": 0}, ">= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        ProviderSettings(**kwargs)


def test_warm_up_runs_every_graph_of_a_package_on_cpu(tiny_package):
    pkg = load_package(tiny_package)
    views = pkg.parameter_views()
    for graph in pkg.manifest["graphs"]:
        opts = ort.SessionOptions()
        names = list(pkg.graph_parameters.get(graph, ()))
        if names:
            opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(views[n]) for n in names])
        sess = ort.InferenceSession(pkg.graph_bytes(graph), opts, providers=session_providers([CPU]))
        feeds = warm_up_feeds(sess)
        assert all(a.shape[0] == 1 for a in feeds.values() if a.ndim == 3), graph
        warm_up(sess)
        assert not needs_warm_up(sess)  # CPU compiles nothing


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_gpu_check_dry_run_on_cpu_checks_every_graph(tiny_package, tmp_path):
    out = tmp_path / "gpu.md"
    r = _run(
        sys.executable, "benchmarks/gpu_check.py", "--package", str(tiny_package), "--cpu-only",
        "--batch", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    graphs = load_package(tiny_package).manifest["graphs"]
    for graph in graphs:
        assert f"| {graph} | 0.0e+00" in text, graph  # CPU against CPU: the same numbers
    for label in ("CUDA, TF32 on", "CUDA, TF32 off", "TensorRT, FP16 off", "TensorRT, FP16 on"):
        assert f"{label} [dry run: CPU]" in text
    assert "benchmark (dry run, not run): " in r.stdout and "bench_engine.py" in r.stdout


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU provider")
def test_gpu_check_without_a_gpu_says_so_and_exits_3(tiny_package):
    r = _run(sys.executable, "benchmarks/gpu_check.py", "--package", str(tiny_package))
    assert r.returncode == 3
    assert (
        "no GPU execution provider" in r.stderr and "onnxruntime-gpu" in r.stderr and "--cpu-only" in r.stderr
    )
    r = _run("bash", "benchmarks/gpu_check.sh", str(tiny_package.parent))
    assert r.returncode == 3 and "no GPU execution provider" in r.stderr


def test_gpu_check_sh_dry_run_on_a_demo_folder(tiny_package, tmp_path):
    demo = tmp_path / "demo"
    (demo / "packages").mkdir(parents=True)
    (demo / "packages" / "seed-0").symlink_to(tiny_package)
    r = _run("bash", "benchmarks/gpu_check.sh", str(demo), "--cpu-only", "--batch", "1", "--skip-bench")
    assert r.returncode == 0, r.stderr
    assert (demo / "gpu_check.md").read_text().startswith("## GPU check of")
    assert "gate on GPU vs CPU: skipped" in r.stdout
