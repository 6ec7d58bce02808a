"""The output rule (ecgx/core/outputs.py) and what it means for training runs, the CLI and interruptions."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import snapshot

import ecgx.cli
from ecgx.cli import describe_os_error, main
from ecgx.core.dataset import default_meta, load_dataset, write_dataset
from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import (
    DATASET,
    GATE_REPORT,
    OutputError,
    OutputExistsError,
    StagedOutput,
    check_output,
    classify_output,
    write_text_atomic,
)
from ecgx.training.config import TrainConfig
from ecgx.training.models import ModelConfig
from ecgx.training.train import CHECKPOINT_FILE, METRICS_FILE, RUN_FILE, make_split, seed_dir, train_run
from ecgx.validation.experiments import _relocate

TINY = ModelConfig(widths=(8, 16), kernel_size=5, stem_stride=4)
FAST = TrainConfig(max_epochs=1, batch_size=64)


def _dataset_folder(path: Path, marker: dict | None = None, content: str = "old") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "leads": [], "classes": []} if marker is None else marker
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "signals.npy").write_text(content)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_staged_folder_appears_whole_and_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "d"
    with StagedOutput(out, DATASET) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".d.") and tmp.name.endswith(".ecgx-tmp")
        (tmp / "meta.json").write_text("{}")
        assert not out.exists()
    assert (out / "meta.json").read_text() == "{}"
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_or_ctrl_c_leaves_nothing_not_even_the_parents_it_made(tmp_path: Path, error) -> None:
    with pytest.raises(error), StagedOutput(tmp_path / "a" / "b" / "d", DATASET) as tmp:
        (tmp / "meta.json").write_text("{}")
        raise error()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_after_the_new_output_is_complete(tmp_path: Path) -> None:
    out = _dataset_folder(tmp_path / "d")
    with StagedOutput(out, DATASET, overwrite=True) as tmp:
        _dataset_folder(tmp, content="new")
        assert (out / "signals.npy").read_text() == "old"  # still there while the new one is built
    assert (out / "signals.npy").read_text() == "new"
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), StagedOutput(out, DATASET, overwrite=True) as tmp:
        raise RuntimeError("failed half way")
    assert (out / "signals.npy").read_text() == "new" and _leftovers(tmp_path) == []


def test_an_existing_output_needs_overwrite_and_only_ecgx_outputs_are_replaced(tmp_path: Path) -> None:
    ours = _dataset_folder(tmp_path / "ours")
    with pytest.raises(OutputExistsError, match=r"already exists.*--overwrite") as info:
        check_output(ours, DATASET)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, ValueError)
    assert check_output(ours, DATASET, overwrite=True) == "ours"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"not a dataset folder written by ecgx .*thesis\.tex.*even with"):
        check_output(theirs, DATASET, overwrite=True)
    fake = _dataset_folder(tmp_path / "fake", marker={"title": "my notes"})  # meta.json, but not ours
    with pytest.raises(OutputError, match="not a dataset folder written by ecgx"):
        check_output(fake, DATASET, overwrite=True)
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", DATASET) == "empty"  # nothing to lose
    assert check_output(tmp_path / "new", DATASET) == "absent"


def test_file_outputs(tmp_path: Path) -> None:
    report = tmp_path / "gate.json"
    with StagedOutput(report, GATE_REPORT) as tmp:
        tmp.write_text(json.dumps({"schema": "ecgx-gate-report", "n": 1}))
    assert classify_output(report, GATE_REPORT) == "ours"
    with StagedOutput(report, GATE_REPORT, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"schema": "ecgx-gate-report", "n": 2}))
    assert json.loads(report.read_text())["n"] == 2 and _leftovers(tmp_path) == []
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}')
    with pytest.raises(OutputError, match="not a gate report"):
        check_output(other, GATE_REPORT, overwrite=True)
    with pytest.raises(OutputError, match="is a folder, but the gate report --out must be a file"):
        check_output(tmp_path, GATE_REPORT)


def test_wrong_kinds_of_path_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, but the dataset folder --out must be a folder"):
        check_output(tmp_path / "file", DATASET)
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        check_output(tmp_path / "file" / "a" / "d", DATASET)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(tmp_path / "link", DATASET, overwrite=True)


def test_commit_checks_again_for_what_appeared_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "d"
    with pytest.raises(OutputError, match="not a dataset folder"), StagedOutput(out, DATASET) as tmp:
        (tmp / "meta.json").write_text("{}")
        out.mkdir()
        (out / "someone-else.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in out.iterdir()) == ["someone-else.txt"]


def test_write_text_atomic(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.toml", "x = 1\n")
    write_text_atomic(tmp_path / "a.toml", "x = 2\n")
    assert (tmp_path / "a.toml").read_text() == "x = 2\n" and _leftovers(tmp_path) == []


# --- the CLI: file-system errors name the file; bugs keep their traceback ------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.EINVAL, "Invalid argument", "/data/x.pt"), "/data/x.pt: invalid argument"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "cfg.toml"), "cfg.toml: is a folder"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a/b"), "a/b: is not a folder"),
        (PermissionError(errno.EACCES, "Permission denied", "k.pem"), "k.pem: permission denied"),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"),
            "a -> b: invalid cross-device link",
        ),
        (OSError(errno.EINVAL, "Invalid argument"), "invalid argument"),
        (FileExistsError("runs/x already holds seed 0"), "runs/x already holds seed 0"),
    ],
)
def test_os_errors_are_described_with_their_file(error: OSError, expected: str) -> None:
    message = describe_os_error(error)
    assert expected in message and "[Errno" not in message


def test_main_maps_os_errors_to_exit_2_and_keeps_bugs_as_tracebacks(monkeypatch, capsys, tmp_path) -> None:
    def fails_with(error: BaseException):
        def command(args):
            raise error

        return command

    monkeypatch.setattr(
        ecgx.cli, "_cmd_data_info", fails_with(OSError(errno.EINVAL, "Invalid argument", "x.pt"))
    )
    assert main(["data", "info", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "ecgx: error: x.pt: invalid argument: the operating system refused this path or operation\n"
    )
    monkeypatch.setattr(ecgx.cli, "_cmd_data_info", fails_with(InvalidArgument("line one\nline two")))
    assert main(["data", "info", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "ecgx: error: line one; line two\n"
    # Only ecgx's own errors are user errors (issue #20): NumPy's or any other ValueError is a bug.
    monkeypatch.setattr(ecgx.cli, "_cmd_data_info", fails_with(ValueError("operands could not be broadcast")))
    with pytest.raises(ValueError, match="broadcast"):
        main(["data", "info", str(tmp_path)])
    monkeypatch.setattr(ecgx.cli, "_cmd_data_info", fails_with(KeyError("model_config")))
    with pytest.raises(KeyError):  # a bug, not bad input: never shown as `ecgx: error: model_config`
        main(["data", "info", str(tmp_path)])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_command_leaves_nothing_behind(tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "work" / "data"
    cmd = [sys.executable, "-m", "ecgx.cli", "data", "synth", "--n", "400000", "--out", str(out), "-q"]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN
    # (no KeyboardInterrupt): restore the default so the test means the same however it is run.
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60

    def writing() -> bool:
        return out.parent.exists() and any(p.name.endswith(".ecgx-tmp") for p in out.parent.iterdir())

    while not writing():
        assert time.monotonic() < deadline and proc.poll() is None, "the synthesis never started"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # not the output, not its temporary, not the folder made for it


# --- training runs ------------------------------------------------------------------------------


def test_seeds_are_added_to_a_run_of_the_same_data_and_config(small_synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(small_synth, [0], run, TINY, FAST, show_progress=False)
    first = (seed_dir(run, 0) / CHECKPOINT_FILE).read_bytes()
    train_run(small_synth, [2, 1], run, TINY, FAST, show_progress=False)
    summary = json.loads((run / RUN_FILE).read_text())
    assert list(summary["seeds"]) == ["0", "1", "2"]
    assert (seed_dir(run, 0) / CHECKPOINT_FILE).read_bytes() == first  # untouched
    assert all((seed_dir(run, s) / METRICS_FILE).is_file() for s in (0, 1, 2))
    assert _leftovers(tmp_path) == []
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"train\.max_epochs: 1 there, 2 here"):
        train_run(small_synth, [3], run, TINY, TrainConfig(max_epochs=2), show_progress=False)
    with pytest.raises(FileExistsError, match=r"already holds seed\(s\) 1"):
        train_run(small_synth, [1, 4], run, TINY, FAST, show_progress=False)
    assert snapshot(tmp_path) == before
    train_run(small_synth, [5], run, TINY, TrainConfig(max_epochs=2), overwrite=True, show_progress=False)
    assert sorted(p.name for p in run.iterdir()) == [RUN_FILE, "seed-5"]  # the whole run was replaced
    assert list(json.loads((run / RUN_FILE).read_text())["seeds"]) == ["5"]


def test_a_class_absent_from_the_test_split_is_recorded_as_undefined(
    small_synth: Path, tmp_path: Path
) -> None:
    ds = load_dataset(small_synth)
    labels = np.array(ds.labels)
    split = make_split(len(ds), FAST)
    lbbb = 5
    labels[np.concatenate([split.val, split.test]), lbbb] = 0  # LBBB beats only in training
    data = write_dataset(tmp_path / "d", np.array(ds.signals), labels, default_meta("test"))
    summary = train_run(data, [0], tmp_path / "run", TINY, FAST, show_progress=False)
    assert summary["unevaluable_classes"] == {"val": ["LBBB"], "test": ["LBBB"]}
    text = (seed_dir(tmp_path / "run", 0) / METRICS_FILE).read_text()
    assert "NaN" not in text
    row = json.loads(text)["classes"][lbbb]
    assert row["test_auroc"] is None and row["val_auroc"] is None and row["test_positives"] == 0
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["unevaluable_classes"]["test"] == ["LBBB"]


def test_experiment_reports_record_packages_where_they_end_up(tmp_path: Path) -> None:
    tmp, out = tmp_path / ".report.x.ecgx-tmp", tmp_path / "report"
    report = {
        "package": {"path": str(tmp / "packages" / "seed-0")},
        "family": [{"path": "/elsewhere/seed-1"}],
    }
    _relocate(report, tmp, out)
    assert report["package"]["path"] == str(out / "packages" / "seed-0")
    assert report["family"][0]["path"] == "/elsewhere/seed-1"
