"""``ecgx attribute --out FOLDER``: sharded Parquet with ECG ids, equal to the .npy output, resumable,
readable from a file:// URI, with clear errors (issue #24). No Ray here (test_attribute_ray.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgx.cli import main
from ecgx.service.engine import AttributionEngine
from ecgx.validation.batch_attribute import MANIFEST, read_attributions, shard_seed

COUNT, SHARD = 20, 8  # three shards: 8, 8, 4


def _attribute(pkg: Path, data: Path | str, out: Path, *extra: str, method: str = "saliency") -> list[str]:
    args = ["attribute", "--package", str(pkg), "--data", str(data), "--method", method]
    return [*args, "--start", "3", "--count", str(COUNT), "--out", str(out), "--quiet", *extra]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_parquet_equals_npy_with_ids(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    npy, folder = tmp_path / "a.npy", tmp_path / "shards"
    assert main(_attribute(tiny_package, small_synth, npy, "--target", "AF")) == 0
    assert (
        main(_attribute(tiny_package, small_synth, folder, "--target", "AF", "--shard-size", str(SHARD))) == 0
    )
    expected = np.load(npy)
    assert sorted(p.name for p in folder.glob("*.parquet")) == [f"shard-00000{i}.parquet" for i in range(3)]

    back = read_attributions(folder)
    assert back.attributions.dtype == np.float32
    np.testing.assert_array_equal(back.attributions, expected)  # bit for bit
    assert back.index.tolist() == list(range(3, 3 + COUNT))

    df = pd.read_parquet(folder)  # the manifest starts with "_": pandas skips it
    assert len(df) == COUNT and set(df["method"]) == {"saliency"} and set(df["target_key"]) == {"AF"}
    df = df.sort_values("index")
    np.testing.assert_array_equal(np.stack(df["attribution"].to_numpy()).reshape(expected.shape), expected)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["counts"] == {"shards": 3, "shards_done": 3, "ecgs": COUNT}
    assert manifest["shape"] == [12, 600] and manifest["seed"] is None
    assert manifest["package_info"]["format_version"] is not None
    assert df["package_sha256"].iloc[0] == manifest["package_sha256"]


def test_record_ids_are_the_datasets(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    import shutil

    data = Path(shutil.copytree(small_synth, tmp_path / "data"))
    meta = json.loads((data / "meta.json").read_text())
    n = meta["n"]
    meta.update(record_ids=[f"rec{i // 10}" for i in range(n)], patient_ids=[f"p{i // 30}" for i in range(n)])
    (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "shards"
    assert main(_attribute(tiny_package, data, out, "--shard-size", str(SHARD))) == 0
    df = pd.read_parquet(out).sort_values("index")
    assert df["record_id"].tolist() == [f"rec{i // 10}" for i in range(3, 3 + COUNT)]
    assert df["patient_id"].tolist() == [f"p{i // 30}" for i in range(3, 3 + COUNT)]


def test_stochastic_shards_use_the_documented_seeds(
    tiny_package: Path, small_synth: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    extra = ("--seed", "7", "--shard-size", str(SHARD), "--param", "n_samples=4")
    assert main(_attribute(tiny_package, small_synth, out, *extra, method="smoothgrad")) == 0
    back = read_attributions(out)
    engine = AttributionEngine(tiny_package)
    x = np.load(small_synth / "signals.npy")
    for i, a in enumerate(range(3, 3 + COUNT, SHARD)):
        b = min(a + SHARD, 3 + COUNT)
        want = engine.attribute("smoothgrad", x[a:b], None, n_samples=4, seed=shard_seed(7, i))
        np.testing.assert_array_equal(back.attributions[a - 3 : b - 3], want)


def test_resume_computes_only_missing_shards(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    argv = _attribute(tiny_package, small_synth, out, "--shard-size", str(SHARD), method="smoothgrad")
    argv += ["--param", "n_samples=4"]  # no seed: one is drawn and recorded, and resume adopts it
    assert main(argv) == 0
    first = read_attributions(out)
    kept = (out / "shard-000000.parquet").stat().st_mtime_ns
    (out / "shard-000001.parquet").unlink()  # as if killed before writing it
    (out / "shard-000002.parquet").write_bytes(b"PAR1 torn")  # as if torn (never by ecgx: renamed whole)
    (out / ".shard-000002.parquet.x.ecgx-tmp").write_bytes(b"half")  # a temporary of a killed run
    assert main([*argv, "--resume"]) == 0
    second = read_attributions(out)
    np.testing.assert_array_equal(second.attributions, first.attributions)
    assert (out / "shard-000000.parquet").stat().st_mtime_ns == kept  # finished shards are kept
    assert not list(out.glob(".*"))
    assert second.manifest["seed"] == first.manifest["seed"] is not None


def test_killed_run_resumes_to_the_same_result(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run (once the first shard is written), then --resume: the shards equal an
    uninterrupted run's."""
    out, whole = tmp_path / "killed", tmp_path / "whole"
    base = ["--seed", "3", "--shard-size", "2", "--param", "n_samples=16"]
    argv = _attribute(tiny_package, small_synth, out, *base, method="smoothgrad")
    proc = subprocess.Popen([sys.executable, "-m", "ecgx.cli", *argv], stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not list(out.glob("shard-*.parquet")) and proc.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not json.loads((out / MANIFEST).read_text())["complete"], "the run ended before the kill"
    assert main([*argv, "--resume"]) == 0
    assert main(_attribute(tiny_package, small_synth, whole, *base, method="smoothgrad")) == 0
    np.testing.assert_array_equal(read_attributions(out).attributions, read_attributions(whole).attributions)


def test_file_uri_equals_the_path(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "path", tmp_path / "uri"
    assert main(_attribute(tiny_package, small_synth, a, "--shard-size", str(SHARD))) == 0
    assert main(_attribute(tiny_package, small_synth.resolve().as_uri(), b, "--shard-size", str(SHARD))) == 0
    np.testing.assert_array_equal(read_attributions(a).attributions, read_attributions(b).attributions)
    assert json.loads((b / MANIFEST).read_text())["data"].startswith("file://")


def test_overwrite_replaces_a_run(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(_attribute(tiny_package, small_synth, out, "--shard-size", "4")) == 0
    assert main(_attribute(tiny_package, small_synth, out, "--shard-size", "10", "--overwrite")) == 0
    assert len(list(out.glob("*.parquet"))) == 2
    assert read_attributions(out).manifest["shard_size"] == 10


def test_clear_errors(tiny_package: Path, small_synth: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    err = _error(capsys, _attribute(tiny_package, small_synth, tmp_path / "a.parquet"))
    assert "a.parquet" in err and ".npy" in err and "folder" in err
    err = _error(capsys, _attribute(tiny_package, "foo://bucket/data", out))
    assert "foo://" in err and "file://" in err and "Traceback" not in err
    err = _error(capsys, _attribute(tiny_package, small_synth, tmp_path / "a.npy", "--resume"))
    assert "folder" in err
    assert not out.exists()

    assert main(_attribute(tiny_package, small_synth, out, "--shard-size", str(SHARD))) == 0
    err = _error(capsys, _attribute(tiny_package, small_synth, out, "--shard-size", str(SHARD)))
    assert "--resume" in err and "--overwrite" in err
    err = _error(capsys, _attribute(tiny_package, small_synth, out, "--shard-size", "5", "--resume"))
    assert "another run" in err and "shard_size: 8 there, 5 now" in err
    err = _error(capsys, _attribute(tiny_package, small_synth, out, "--resume", method="gradient_shap"))
    assert "method: 'saliency' there, 'gradient_shap' now" in err
    err = _error(capsys, _attribute(tiny_package, small_synth, out, "--resume", "--overwrite"))
    assert "choose one" in err

    err = _error(
        capsys, _attribute(tiny_package, small_synth, tmp_path / "s", "--seed", "-1", method="smoothgrad")
    )
    assert "seed" in err and not (tmp_path / "s").exists()
    err = _error(capsys, _attribute(tiny_package, small_synth, tmp_path / "s", "--seed", "1"))
    assert "seed" in err and not (tmp_path / "s").exists()  # saliency draws nothing
    assert "needs --ray" in _error(
        capsys, _attribute(tiny_package, small_synth, tmp_path / "s", "--workers", "2")
    )
    err = _error(capsys, _attribute(tiny_package, small_synth, tmp_path / "a.npy", "--shard-size", "4"))
    assert "--shard-size" in err and "folder" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = _error(capsys, _attribute(tiny_package, small_synth, foreign, "--overwrite"))
    assert "notes.txt" in err and "refusing" in err


def test_sharded_output_never_imports_ray(tiny_package: Path, small_synth: Path, tmp_path: Path) -> None:
    script = (
        "import sys; from ecgx.cli import main; "
        f"code = main({_attribute(tiny_package, small_synth, tmp_path / 'o', '--shard-size', '8')!r}); "
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'ray or torch imported'; "
        "sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_shard_must_fit_one_engine_call() -> None:
    from ecgx.core.errors import InvalidArgument
    from ecgx.validation.batch_attribute import _check_shard_cost

    _check_shard_cost("smoothgrad", 2000, 1000)  # 2,000,000 passes: the limit itself
    with pytest.raises(InvalidArgument, match="--shard-size 1000 or less"):
        _check_shard_cost("smoothgrad", 2000, 1001)
