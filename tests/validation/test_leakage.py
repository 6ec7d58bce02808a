"""The leakage guard: the gate refuses validation data the gated model was trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_ecgx

from ecgx.core.dataset import beat_sha256, load_dataset
from ecgx.core.package_reader import TRAINING_BEATS_FILE, load_package
from ecgx.training.data.synth import synthesize_dataset
from ecgx.validation.gate import run_gate
from ecgx.validation.leakage import LeakageError, check_leakage, training_overlap

# Below the floor on purpose (research mode): only the refusal and the warning matter here.
SMALL = """
[gate]
ecgs = 8
allow_incomplete_data = true
[checks.randomisation]
ecgs = 2
[checks.perturbation]
bootstrap = 100
"""


def _train_data(trained_family: dict[str, Path]) -> Path:
    return Path(json.loads((trained_family["runs"] / "run.json").read_text())["data"]["path"])


def test_the_export_records_the_training_split(trained_family: dict[str, Path]) -> None:
    pkg = load_package(trained_family["seed-0"])
    entry = pkg.manifest["training_data"]
    assert entry["beats_file"] in pkg.manifest["files"] and entry["split_by"] == "beat"
    hashes = (trained_family["seed-0"] / TRAINING_BEATS_FILE).read_text().split()
    assert len(hashes) == entry["unique_beats"] > 1000  # 70 % of 1500 beats


def test_gating_on_the_training_data_is_refused_before_any_work(trained_family: dict[str, Path]) -> None:
    result = run_ecgx(
        "validate", str(trained_family["seed-0"]), "--data", str(_train_data(trained_family)), "--unsigned"
    )
    assert_clean_failure(
        result,
        "overlaps the training data of package",
        "validation ECGs are beats the model was trained on (identical signals)",
    )
    assert not (trained_family["seed-0"] / "gate.json").exists()


def test_disjoint_data_passes_the_guard(trained_family: dict[str, Path]) -> None:
    pkg, ds = load_package(trained_family["seed-0"]), load_dataset(trained_family["data"])
    assert training_overlap(pkg, ds, range(len(ds))) == []
    assert check_leakage(pkg, ds, range(len(ds))) == []


def test_one_training_beat_among_validation_beats_is_named(trained_family: dict[str, Path]) -> None:
    pkg, train = load_package(trained_family["seed-0"]), load_dataset(_train_data(trained_family))
    known = set((trained_family["seed-0"] / TRAINING_BEATS_FILE).read_text().split())
    inside = next(i for i in range(len(train)) if beat_sha256(train.signals[i : i + 1])[0] in known)
    assert training_overlap(pkg, train, [inside]) == [
        "1 of 1 validation ECGs are beats the model was trained on (identical signals)"
    ]


@pytest.fixture(scope="module")
def patient_package(small_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model trained (briefly) on data that names patients (5 beats each), exported."""
    from ecgx.training.config import TrainConfig
    from ecgx.training.export import export_checkpoint
    from ecgx.training.models import ModelConfig
    from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run

    tmp = tmp_path_factory.mktemp("patients")
    data = shutil.copytree(small_synth, tmp / "train")
    meta = json.loads((data / "meta.json").read_text())
    meta["patient_ids"] = [f"P{i // 5}" for i in range(meta["n"])]
    (data / "meta.json").write_text(json.dumps(meta))
    model = ModelConfig(widths=(8, 16), stem_stride=4)
    train_run(data, [0], tmp / "run", model, TrainConfig(max_epochs=1), show_progress=False)
    pkg = export_checkpoint(seed_dir(tmp / "run", 0) / CHECKPOINT_FILE, tmp / "pkg")
    return {"package": pkg, "tmp": tmp}


def test_training_splits_by_patient_and_the_package_keeps_the_patients(patient_package) -> None:
    pkg = load_package(patient_package["package"])
    assert pkg.manifest["training_data"]["split_by"] == "patient"
    ids = json.loads((patient_package["package"] / pkg.manifest["training_data"]["ids_file"]).read_text())
    assert ids["split_by"] == "patient" and 0 < len(ids["patient_ids"]) < 120


def test_a_validation_set_sharing_one_patient_is_refused(patient_package, tmp_path: Path) -> None:
    pkg = load_package(patient_package["package"])
    ids = json.loads((patient_package["package"] / pkg.manifest["training_data"]["ids_file"]).read_text())
    shared = ids["patient_ids"][0]
    data = synthesize_dataset(tmp_path / "val", 16, seed=21, show_progress=False)
    meta = json.loads((data / "meta.json").read_text())
    meta["patient_ids"] = [shared if i == 3 else f"V{i}" for i in range(meta["n"])]
    (data / "meta.json").write_text(json.dumps(meta))
    policy = tmp_path / "small.toml"
    policy.write_text(SMALL.replace("ecgs = 8", "ecgs = 16", 1))
    with pytest.raises(LeakageError, match=f"patients {shared} appear in the training split"):
        run_gate(pkg.path, data, policy=policy, methods=["saliency"], research=True, show_progress=False)
    result = run_ecgx(
        "validate", str(pkg.path), "--data", str(data), "--policy", str(policy), "--research", "--unsigned"
    )
    assert_clean_failure(result, f"patients {shared} appear in the training split")


def test_a_package_without_a_training_record_gets_a_warning_not_a_refusal(
    tiny_package: Path, trained_family: dict[str, Path], tmp_path: Path
) -> None:
    pkg = load_package(tiny_package)
    assert "training_data" not in pkg.manifest
    (warning,) = check_leakage(pkg, load_dataset(trained_family["data"]), [0, 1])
    assert "records no training data" in warning
    policy = tmp_path / "small.toml"
    policy.write_text(SMALL)
    run = run_gate(
        tiny_package,
        trained_family["data"],
        policy=policy,
        methods=["saliency"],
        research=True,
        workers=1,
        show_progress=False,
    )
    assert any("records no training data" in w for w in run.report["warnings"])
    assert run.report["leakage"]["checked"] is False
