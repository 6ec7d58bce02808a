"""Bad input as a user meets it: every case runs ``ecgx`` in a fresh process and must exit 2
with one ``ecgx: error:`` line naming the file and field at fault, no traceback, and the file
system exactly as it was (outputs refused, checkpoints, config files, training labels)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_clean_failure, run_ecgx, snapshot

from ecgx.core.dataset import default_meta, load_dataset, write_dataset
from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.models import ModelConfig
from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run
from ecgx.validation.signing import generate_keypair

TINY_TOML = "[model]\nwidths = [8, 16]\nkernel_size = 5\nstem_stride = 4\n[train]\nmax_epochs = 1\n"
TINY = ModelConfig(widths=(8, 16), kernel_size=5, stem_stride=4)


@pytest.fixture(scope="module")
def assets(
    small_synth: Path, tiny_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Read-only inputs shared by the cases: datasets, a trained run, its checkpoint, a package."""
    root = tmp_path_factory.mktemp("bad-input-assets")
    train_run(small_synth, [0], root / "run", TINY, TrainConfig(max_epochs=1), show_progress=False)
    (root / "tiny.toml").write_text(TINY_TOML)
    other = synthesize_dataset(root / "other-data", 600, seed=2, show_progress=False)
    ds = load_dataset(small_synth)
    labels = np.array(ds.labels)
    no_af = labels.copy()
    no_af[:, 3] = 0  # AF
    write_dataset(root / "no-af", np.array(ds.signals), no_af, default_meta("test"))
    write_dataset(root / "no-labels", np.array(ds.signals), np.zeros_like(labels), default_meta("test"))
    return {
        "root": root,
        "data": small_synth,
        "other_data": other,
        "run": root / "run",
        "checkpoint": seed_dir(root / "run", 0) / CHECKPOINT_FILE,
        "config": root / "tiny.toml",
        "package": tiny_package,
        "no_af": root / "no-af",
        "no_labels": root / "no-labels",
    }


Case = Callable[[Path, dict[str, Path]], tuple[list[str], list[str]]]


def _file(path: Path, text: str = "keep me\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _folder_with_file(path: Path) -> Path:
    _file(path / "notes.txt")
    return path


def _checkpoint(tmp: Path, a: dict[str, Path], change: Callable[[dict], None]) -> str:
    payload = torch.load(a["checkpoint"], weights_only=True)
    payload = copy.deepcopy(payload)
    change(payload)
    path = tmp / "bad.pt"
    torch.save(payload, path)
    return str(path)


def _export(checkpoint: str, tmp: Path) -> list[str]:
    return ["export", checkpoint, "--out", str(tmp / "pkg")]


def _train(
    a: dict[str, Path], out: Path, *extra: str, data: str = "data", config: Path | None = None
) -> list[str]:
    config = a["config"] if config is None else config
    return ["train", "--data", str(a[data]), "--out", str(out), "--config", str(config), *extra]


def _attribute(a: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "attribute",
        "--package",
        str(a["package"]),
        "--data",
        str(a["data"]),
        "--method",
        "saliency",
        "--count",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def _validate(pkg: Path, a: dict[str, Path], *extra: str) -> list[str]:
    return ["validate", str(pkg), "--data", str(a["data"]), "--unsigned", *extra]


def _experiments(a: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["experiments", "--data", str(a["data"]), "--runs", str(a["run"]), "--out", str(out), *extra]


def _config(tmp: Path, a: dict[str, Path], text: str | bytes) -> list[str]:
    path = tmp / "config.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["train", "--data", str(a["data"]), "--out", str(tmp / "run"), "--config", str(path)]


def _fake_report(path: Path) -> Path:
    return _file(path, json.dumps({"schema": "ecgx-gate-report", "verdict": "pass"}))


def _copy_package(tmp: Path, a: dict[str, Path]) -> Path:
    return Path(shutil.copytree(a["package"], tmp / "pkg"))


def _pickled_object(tmp: Path) -> str:
    path = tmp / "object.pt"
    path.write_bytes(pickle.dumps({"model": pytest.MonkeyPatch}))
    return str(path)


def _unreadable(path: Path) -> Path:
    path.chmod(0o000)
    return path


CASES: dict[str, Case] = {
    # --- outputs: one rule for every command -------------------------------------------------
    "synth: --out is a folder ecgx did not write": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(_folder_with_file(t / "d"))],
        ["not a dataset folder written by ecgx", "notes.txt"],
    ),
    "synth: --overwrite never replaces a folder ecgx did not write": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(_folder_with_file(t / "d")), "--overwrite"],
        ["even with --overwrite", "notes.txt"],
    ),
    "synth: an existing dataset needs --overwrite": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(synthesize_dataset(t / "d", 5, 0, show_progress=False))],
        ["already exists", "--overwrite"],
    ),
    "synth: --out is a file": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(_file(t / "d"))],
        [f"{t / 'd'} is a file", "must be a folder"],
    ),
    "synth: the parent of --out is a file": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(_file(t / "f") / "sub" / "d")],
        [f"{t / 'f'} is a file, not a folder"],
    ),
    "synth: --out is a symbolic link": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(_symlink(t / "link", t / "target")), "--overwrite"],
        ["symbolic link"],
    ),
    "synth: a file name too long for the file system": lambda t, a: (
        ["data", "synth", "--n", "5", "--out", str(t / ("x" * 300))],
        ["name too long", "x" * 20],
    ),
    "import-wfdb: --overwrite never replaces a folder ecgx did not write": lambda t, a: (
        ["data", "import-wfdb", str(t / "records"), "--out", str(_folder_with_file(t / "d")), "--overwrite"],
        ["not a dataset folder written by ecgx", "notes.txt"],
    ),
    "import-wfdb: --out is a file": lambda t, a: (
        ["data", "import-wfdb", str(t / "records"), "--out", str(_file(t / "d"))],
        [f"{t / 'd'} is a file"],
    ),
    "train: --overwrite never replaces a folder ecgx did not write": lambda t, a: (
        _train(a, _folder_with_file(t / "run"), "--overwrite"),
        ["not a run folder written by ecgx", "run.json", "notes.txt"],
    ),
    "train: --out is a file": lambda t, a: (_train(a, _file(t / "run")), [f"{t / 'run'} is a file"]),
    "train: a seed already in the run folder": lambda t, a: (
        _train(a, Path(shutil.copytree(a["run"], t / "run")), "--seeds", "0"),
        ["already holds seed(s) 0", "--overwrite"],
    ),
    "train: adding a seed with another config": lambda t, a: (
        _train(
            a,
            Path(shutil.copytree(a["run"], t / "run")),
            "--seeds",
            "1",
            config=_file(t / "c.toml", TINY_TOML.replace("[8, 16]", "[8, 32]")),
        ),
        ["cannot add seeds to run folder", "model.widths: [8, 16] there, [8, 32] here"],
    ),
    "train: adding a seed trained on another dataset": lambda t, a: (
        _train(a, Path(shutil.copytree(a["run"], t / "run")), "--seeds", "1", data="other_data"),
        ["cannot add seeds to run folder", "dataset:", "fingerprint"],
    ),
    "export: an existing package needs --overwrite": lambda t, a: (
        ["export", str(a["checkpoint"]), "--out", str(_copy_package(t, a))],
        ["already exists", "model package", "--overwrite"],
    ),
    "export: --overwrite never replaces a folder ecgx did not write": lambda t, a: (
        ["export", str(a["checkpoint"]), "--out", str(_folder_with_file(t / "pkg")), "--overwrite"],
        ["not a model package written by ecgx", "manifest.json"],
    ),
    "export: --out is a file": lambda t, a: (
        ["export", str(a["checkpoint"]), "--out", str(_file(t / "pkg"))],
        [f"{t / 'pkg'} is a file"],
    ),
    "attribute: --overwrite never replaces a file that is not a .npy array": lambda t, a: (
        _attribute(a, _file(t / "a.npy"), "--overwrite"),
        ["not an attribution file written by ecgx", "a.npy"],
    ),
    "attribute: an existing .npy needs --overwrite": lambda t, a: (
        _attribute(a, _npy(t / "a.npy")),
        ["a.npy already exists", "--overwrite"],
    ),
    "attribute: --out is a folder": lambda t, a: (
        _attribute(a, _folder_with_file(t / "a.npy")),
        ["is a folder", "must be a file"],
    ),
    "attribute: --out is not a .npy name": lambda t, a: (_attribute(a, t / "a.txt"), ["a.txt", ".npy"]),
    "validate: a default PKG/gate.json that is not a gate report": lambda t, a: (
        _validate(_with_file(_copy_package(t, a), "gate.json"), a),
        ["gate.json already exists and is not a gate report", "even with --overwrite"],
    ),
    "validate: an explicit --out report needs --overwrite": lambda t, a: (
        _validate(a["package"], a, "--out", str(_fake_report(t / "r.json"))),
        ["r.json already exists", "--overwrite"],
    ),
    "validate: --overwrite never replaces a file that is not a gate report": lambda t, a: (
        _validate(a["package"], a, "--out", str(_file(t / "r.json")), "--overwrite"),
        ["not a gate report"],
    ),
    "validate: --out is a folder": lambda t, a: (
        _validate(a["package"], a, "--out", str(_folder_with_file(t / "r"))),
        ["is a folder", "must be a file"],
    ),
    "keygen: existing keys need --overwrite": lambda t, a: (
        ["gate", "keygen", "--out", str(generate_keypair(t / "keys")[0].parent)],
        ["gate_signing_key.pem", "already exist", "--overwrite"],
    ),
    "keygen: --overwrite never replaces a folder holding other files": lambda t, a: (
        ["gate", "keygen", "--out", str(_folder_with_file(t / "keys")), "--overwrite"],
        ["not a gate key folder written by ecgx", "notes.txt"],
    ),
    "keygen: --out is a file": lambda t, a: (
        ["gate", "keygen", "--out", str(_file(t / "keys"))],
        [f"{t / 'keys'} is a file"],
    ),
    "experiments: --overwrite never replaces a folder ecgx did not write": lambda t, a: (
        _experiments(a, _folder_with_file(t / "report"), "--overwrite"),
        ["not an experiments report folder written by ecgx", "experiments.json"],
    ),
    "experiments: --out is a file": lambda t, a: (
        _experiments(a, _file(t / "report")),
        [f"{t / 'report'} is a file"],
    ),
    "demo: never continues a folder it did not write": lambda t, a: (
        ["demo", "--out", str(_folder_with_file(t / "demo")), "--overwrite"],
        ["not a demo folder written by ecgx", "ecgx-demo.json"],
    ),
    "demo: --out is a file": lambda t, a: (["demo", "--out", str(_file(t / "demo"))], ["is a file"]),
    "demo: --n below 1": lambda t, a: (["demo", "--out", str(t / "demo"), "--n", "0"], ["--n", "0"]),
    "demo: an earlier demo's data of another size": lambda t, a: (
        ["demo", "--out", str(_fake_demo(t / "demo")), "--n", "300"],
        ["holds 5 beats", "300", "--overwrite"],
    ),
    # --- training labels ------------------------------------------------------------------------
    "train: a class without positive beats": lambda t, a: (
        _train(a, t / "run", data="no_af"),
        ["no-af", "AF has no positive beat (none in the whole dataset)"],
    ),
    "train: no class has positive beats": lambda t, a: (
        _train(a, t / "run", data="no_labels"),
        ["SR has no positive beat", "STT has no positive beat"],
    ),
    # --- checkpoints ------------------------------------------------------------------------------
    "checkpoint: random bytes": lambda t, a: (
        _export(str(_bytes(t / "c.pt", os.urandom(4096))), t),
        ["c.pt is not an ecgx checkpoint, or it is corrupt or truncated"],
    ),
    "checkpoint: truncated": lambda t, a: (
        _export(str(_bytes(t / "c.pt", a["checkpoint"].read_bytes()[:3000])), t),
        ["c.pt is not an ecgx checkpoint, or it is corrupt or truncated"],
    ),
    "checkpoint: empty file": lambda t, a: (
        _export(str(_bytes(t / "c.pt", b"")), t),
        ["c.pt is not an ecgx checkpoint, or it is corrupt or truncated"],
    ),
    "checkpoint: a plain torch.save of a tensor": lambda t, a: (
        _export(_saved(t / "c.pt", torch.zeros(3)), t),
        ["c.pt is not an ecgx checkpoint", "holds a Tensor"],
    ),
    "checkpoint: a plain torch.save of a dict": lambda t, a: (
        _export(_saved(t / "c.pt", {"state_dict": {"w": torch.zeros(3)}}), t),
        ["c.pt is not an ecgx checkpoint", "format='ecgx-checkpoint'"],
    ),
    "checkpoint: a pickled object (never unpickled)": lambda t, a: (
        _export(_pickled_object(t), t),
        ["object.pt is not an ecgx checkpoint, or it is corrupt"],
    ),
    "checkpoint: model_config missing": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.pop("model_config")), t),
        ["bad.pt", "field model_config is missing"],
    ),
    "checkpoint: state_dict missing": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.pop("state_dict")), t),
        ["bad.pt", "field state_dict is missing"],
    ),
    "checkpoint: another version": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.update(version=9)), t),
        ["bad.pt", "checkpoint version 9 is not supported"],
    ),
    "checkpoint: model_config.widths of the wrong type": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(widths="abc")), t),
        ["bad.pt", "model_config.widths must be a list of integers"],
    ),
    "checkpoint: model_config.kernel_size of the wrong type": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(kernel_size="seven")), t),
        ["bad.pt", "model_config.kernel_size must be an integer"],
    ),
    "checkpoint: model_config.residual of the wrong type": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(residual="no")), t),
        ["bad.pt", "model_config.residual must be true or false"],
    ),
    "checkpoint: model_config with an unknown key": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(depth=3)), t),
        ["bad.pt", "unknown model_config setting depth"],
    ),
    "checkpoint: model_config not a table": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.update(model_config=[8, 16])), t),
        ["bad.pt", "model_config must be a table"],
    ),
    "checkpoint: model_config with a bad value": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(kernel_size=4)), t),
        ["bad.pt", "model_config.kernel_size must be a positive odd number"],
    ),
    "checkpoint: weights of another architecture": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["model_config"].update(widths=[8, 32])), t),
        ["bad.pt", "state_dict.", "has shape", "needs"],
    ),
    "checkpoint: weights missing from the state dict": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["state_dict"].pop("classifier.weight")), t),
        ["bad.pt", "state_dict does not fit", "missing classifier.weight"],
    ),
    "checkpoint: a NaN weight": lambda t, a: (
        _export(
            _checkpoint(t, a, lambda p: p["state_dict"]["classifier.weight"].__setitem__((0, 0), np.nan)), t
        ),
        ["bad.pt", "parameter classifier.weight holds 1 NaN or infinite value(s) of 144"],
    ),
    "checkpoint: an infinite BatchNorm statistic": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p["state_dict"]["features.0.1.running_var"].fill_(np.inf)), t),
        ["bad.pt", "parameter features.0.1.running_var holds 8 NaN or infinite value"],
    ),
    "checkpoint: classes of another schema": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.update(classes=["A", "B"])), t),
        ["bad.pt", "field classes must list"],
    ),
    "checkpoint: metrics of the wrong type": lambda t, a: (
        _export(_checkpoint(t, a, lambda p: p.update(metrics="good")), t),
        ["bad.pt", "field metrics has the wrong type"],
    ),
    "checkpoint: a folder": lambda t, a: (
        _export(str(_folder_with_file(t / "c.pt")), t),
        ["c.pt is a folder", "checkpoint.pt"],
    ),
    "checkpoint: unreadable": lambda t, a: (
        _export(str(_unreadable(_bytes(t / "c.pt", a["checkpoint"].read_bytes()))), t),
        ["c.pt cannot be read: permission denied"],
    ),
    # --- training config files ----------------------------------------------------------------------
    "config: unknown key": lambda t, a: (
        _config(t, a, "[train]\nmax_epoch = 3\n"),
        ["config.toml", "unknown train setting max_epoch"],
    ),
    "config: unknown table": lambda t, a: (
        _config(t, a, "[optimiser]\nlr = 1\n"),
        ["config.toml", "unknown table(s) ['optimiser']"],
    ),
    "config: wrong type": lambda t, a: (
        _config(t, a, '[train]\nmax_epochs = "3"\n'),
        ["config.toml", "train.max_epochs must be an integer, got '3'"],
    ),
    "config: a float where an integer is needed": lambda t, a: (
        _config(t, a, "[model]\nwidths = [8.5, 16]\n"),
        ["config.toml", "model.widths must be a list of integers"],
    ),
    "config: a table that is a value": lambda t, a: (
        _config(t, a, "model = 3\n"),
        ["config.toml", "model must be a table"],
    ),
    "config: wrong value": lambda t, a: (
        _config(t, a, "[train]\nbatch_size = 0\n"),
        ["config.toml", "train.batch_size must be >= 1"],
    ),
    "config: not a finite number": lambda t, a: (
        _config(t, a, "[train]\nlearning_rate = nan\n"),
        ["config.toml", "train.learning_rate must be a finite number"],
    ),
    "config: invalid TOML": lambda t, a: (
        _config(t, a, "[train\n"),
        ["config.toml is not valid TOML"],
    ),
    "config: not UTF-8 text": lambda t, a: (
        _config(t, a, b"\xff\xfe[train]\n"),
        ["config.toml is not valid TOML", "UTF-8"],
    ),
    "config: a folder": lambda t, a: (
        _train(a, t / "run", config=_folder_with_file(t / "c")),
        [f"config file {t / 'c'} is a folder"],
    ),
    "config: unreadable": lambda t, a: (
        _train(a, t / "run", config=_unreadable(_file(t / "c.toml", TINY_TOML))),
        ["c.toml cannot be read: permission denied"],
    ),
}

NEEDS_NON_ROOT = {"checkpoint: unreadable", "config: unreadable"}


def _symlink(link: Path, target: Path) -> Path:
    target.mkdir()
    link.symlink_to(target)
    return link


def _npy(path: Path) -> Path:
    np.save(path, np.zeros(3))
    return path


def _with_file(folder: Path, name: str) -> Path:
    _file(folder / name)
    return folder


def _fake_demo(folder: Path) -> Path:
    _file(folder / "ecgx-demo.json", json.dumps({"ecgx_demo": 1}))
    _file(folder / "data" / "meta.json", json.dumps({"n": 5, "seed": 0}))
    return folder


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _saved(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_fails_cleanly(case: str, assets: dict[str, Path], tmp_path: Path) -> None:
    if case in NEEDS_NON_ROOT and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    work = tmp_path / "work"
    work.mkdir()
    args, fragments = CASES[case](work, assets)
    roots = [tmp_path, assets["root"], assets["data"], assets["package"]]
    before = snapshot(*roots)
    result = run_ecgx(*args)
    assert_clean_failure(result, *fragments, before=before, roots=roots)
    assert "weights_only" not in result.stderr  # torch's advice to run code from the file is never passed on
