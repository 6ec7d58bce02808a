"""``ecgx attribute --ray``: the shards computed on a Ray cluster equal the local run's bit for bit,
also when resumed across backends (issue #24). One private 2-CPU cluster per module
(tests/ray_helpers.py) and one ``--ray local`` run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ray_helpers import LocalRayCluster, ray_cluster  # noqa: F401  (module fixture)

from ecgx.cli import main
from ecgx.validation.batch_attribute import MANIFEST, read_attributions

pytest.importorskip("ray")

# Five shards of 4 ECGs: more shards than workers, so both actors work and results come back out
# of order; KernelSHAP draws its coalitions per call, so a wrong seed per shard would show.
METHOD = ["--method", "kernel_shap", "--param", "n_samples=24", "--seed", "11", "--shard-size", "4"]


def _attribute(pkg: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "attribute",
        "--package",
        str(pkg),
        "--data",
        str(data),
        *METHOD,
        "--start",
        "5",
        "--count",
        "20",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _assert_same(out: Path, reference: Path) -> None:
    want = read_attributions(reference).attributions
    np.testing.assert_array_equal(read_attributions(out).attributions, want)


@pytest.fixture(scope="module")
def local_run(tiny_package: Path, small_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attr") / "local"
    assert main(_attribute(tiny_package, small_synth, out)) == 0
    return out


def test_ray_cluster_equals_local(
    tiny_package: Path,
    small_synth: Path,
    local_run: Path,
    ray_cluster: LocalRayCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "ray"
    assert main(_attribute(tiny_package, small_synth, out, "--ray", ray_cluster.address)) == 0
    _assert_same(out, local_run)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["backend"]["kind"] == "ray" and manifest["complete"]


def test_resume_on_ray_of_a_local_run(
    tiny_package: Path,
    small_synth: Path,
    local_run: Path,
    ray_cluster: LocalRayCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    import shutil

    out = Path(shutil.copytree(local_run, tmp_path / "half"))
    for name in ("shard-000001.parquet", "shard-000004.parquet"):
        (out / name).unlink()
    assert main([*_attribute(tiny_package, small_synth, out, "--ray", ray_cluster.address), "--resume"]) == 0
    _assert_same(out, local_run)


def test_a_call_the_actors_cannot_take_is_refused_not_run_on_the_driver(
    tiny_package: Path,
    ray_cluster: LocalRayCluster,  # noqa: F811
) -> None:
    """Batch attribution asks for actors only: an engine the backend did not build (the driver's
    own) must not quietly keep the work on the driver."""
    from ecgx.core.errors import FailedPrecondition
    from ecgx.core.package_reader import load_package
    from ecgx.service.engine import AttributionEngine
    from ecgx.validation.ray_backend import connect

    pkg = load_package(tiny_package)
    x = np.zeros((1, *pkg.input_shape), np.float32)
    with connect(ray_cluster.address, [pkg], workers=1) as backend:
        own = AttributionEngine(pkg)
        made = backend.engine(
            pkg,
            providers=None,
            threads=None,
            parameters=None,
            max_request_ecgs=None,
            max_request_rows=None,
            max_batch=7,
        )
        ran = backend.map([lambda: (made.max_batch, made.logits(x).shape)], lambda: None, driver_ok=False)
        assert ran == [(7, (1, len(pkg.class_keys)))]  # --max-batch reaches the actors
        with pytest.raises(FailedPrecondition, match="cannot run on the Ray actors"):
            backend.map([lambda: own.logits(x)], lambda: None, driver_ok=False)


def test_ray_local_starts_and_stops_its_own_cluster(
    tiny_package: Path, small_synth: Path, local_run: Path, tmp_path: Path
) -> None:
    # In a process of its own, as a user runs it: a driver-local cluster started and shut down in
    # this process would break every later Ray connection the test session makes (its actors die
    # before they run).
    import subprocess
    import sys

    out = tmp_path / "ray-local"
    args = _attribute(tiny_package, small_synth, out, "--ray", "local", "--workers", "2")
    command = [sys.executable, "-m", "ecgx.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(out, local_run)
