"""``ecgx client`` (ecgx/client.py) as real subprocesses against a real server on loopback, and
the demo's last step (promote, serve, Explain over gRPC) on a small demo-like folder.

The repository holds model ``ecg``: version 1 is seed-0 under the session's gate (conftest
``gated``: gradcam passes, saliency fails), version 2 a copy whose gate failed (never serves).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ECGX_WITHOUT_TORCH, assert_clean_failure, run_ecgx, snapshot
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

PASSED, FAILED = "gradcam", "saliency"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(gated, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client") / "repo"
    make_package(gated, root / "ecg" / "1", 0)
    make_package(gated, root / "ecg" / "2", 1, verdict="fail", serve=[])
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    server, port, _, _ = build_server(
        repository, security=ServerSecurity.plaintext_unauthenticated(), host="127.0.0.1", port=0, max_batch=8
    )
    server.start()
    yield {"address": f"127.0.0.1:{port}", "repository": repository}
    server.stop(None)


@pytest.fixture(scope="module")
def beats(gated, tmp_path_factory: pytest.TempPathFactory) -> dict:
    x = np.asarray(load_dataset(gated["family"]["data"]).signals[:3], dtype=np.float32)
    folder = tmp_path_factory.mktemp("beats")
    np.save(folder / "one.npy", x[0])
    np.save(folder / "three.npy", x)
    return {"x": x, "one": folder / "one.npy", "three": folder / "three.npy"}


def client(server, action: str, *args: str) -> subprocess.CompletedProcess:
    return run_ecgx("client", action, "--server", server["address"], *args)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the three actions


def test_models_shows_versions_serving_state_and_gate_verdicts(server, tmp_path) -> None:
    compact = ok(client(server, "models"))  # one line per version by default (issue #22)
    assert f"version 1: serving; gate pass; serves {PASSED}" in compact and "threshold" not in compact
    out = ok(client(server, "models", "--verbose", "--json", str(tmp_path / "m.json")))
    assert "model ecg: default version 1" in out
    assert "version 1: serving" in out and "version 2: NOT serving" in out and "gate failed" in out
    lines = {
        line.split()[0]: line
        for line in out.split("version 2:")[0].splitlines()
        if line.startswith("    ") and "threshold" in line
    }
    assert "pass" in lines[PASSED] and "servable" in lines[PASSED] and "randomisation" in lines[PASSED]
    assert "refused" in lines[FAILED]
    doc = json.loads((tmp_path / "m.json").read_text())
    (model,) = doc["models"]
    v1 = model["versions"][0]
    assert model["name"] == "ecg" and v1["serving"] and len(v1["package_sha256"]) == 64
    gates = {m["method"]: m for m in v1["methods"]}
    assert gates[PASSED]["servable"] and not gates[FAILED]["servable"]


def test_predict_prints_probabilities_by_class_key(server, beats, tmp_path) -> None:
    out = ok(client(server, "predict", "--ecg", str(beats["three"]), "--json", str(tmp_path / "p.json")))
    engine = server["repository"].get("ecg").engine
    probs = engine.probabilities(beats["x"])
    keys = engine.package.class_keys
    assert "model ecg version 1" in out and "ecg 2:" in out and "164889003" in out  # AF's SNOMED code
    for i, p in enumerate(probs):
        first = out.split(f"ecg {i}:")[1].splitlines()[1].split()  # the most probable class first
        assert keys[int(np.argmax(p))] in first and f"{p.max():.3f}" in first
    doc = json.loads((tmp_path / "p.json").read_text())
    got = np.array([[d[k] for k in keys] for d in doc["probabilities"]])
    np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(doc["beats_mv"], np.float32), beats["x"])


def test_explain_prints_gate_scores_and_leads_and_draws_a_png(server, beats, tmp_path) -> None:
    png, js = tmp_path / "e.png", tmp_path / "e.json"
    out = ok(
        client(
            server, "explain", "--ecg", str(beats["one"]), "--method", PASSED, "--target", "AF",
            "--png", str(png), "--json", str(js),
        )
    )  # fmt: skip
    assert f"ecg 0: {PASSED} for AF" in out and "gate pass" in out
    assert "scores: randomisation" in out and "threshold" in out
    assert "top leads:" in out and "%" in out and "onnxruntime" in out
    assert f"picture: {png}" in out
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    doc = json.loads(js.read_text())
    (a,) = doc["attributions"]
    assert a["method"] == PASSED and a["target_class"] == "AF" and a["gate"]["verdict"] == "pass"
    engine = server["repository"].get("ecg").engine
    expected = engine.attribute(PASSED, beats["x"][:1], target="AF", **a["effective_parameters"])[0]
    np.testing.assert_allclose(np.asarray(a["attribution"]), expected, rtol=1e-4, atol=1e-6)
    assert abs(sum(a["lead_relevance_share"]) - 1) < 1e-6


def test_explain_a_batch_writes_one_picture_per_ecg(server, beats, tmp_path) -> None:
    png = tmp_path / "b.png"
    out = ok(
        client(
            server, "explain", "--ecg", str(beats["three"]), "--method", PASSED,
            "--target", "top-2", "--png", str(png),
        )
    )  # fmt: skip
    assert out.count(f": {PASSED} for ") == 6  # 3 ECGs x 2 classes
    for i in range(3):
        assert (tmp_path / f"b-ecg{i}.png").read_bytes().startswith(PNG_MAGIC)
    assert not png.exists()


def test_explain_a_wfdb_record_draws_over_the_servers_median_beat(server, shared_data, tmp_path) -> None:
    from ecgx.core.median_beat import median_beat
    from ecgx.training.data.wfdb_import import read_record

    record = shared_data / "ptbxl-sample" / "HR06000"
    png, js = tmp_path / "r.png", tmp_path / "r.json"
    out = ok(
        client(
            server,
            "explain",
            "--record",
            str(record),
            "--method",
            PASSED,
            "--png",
            str(png),
            "--json",
            str(js),
        )
    )
    assert f"ecg 0: {PASSED} for " in out and png.read_bytes().startswith(PNG_MAGIC)
    signal, fs, _ = read_record(record)
    beat = np.asarray(json.loads(js.read_text())["beats_mv"], np.float32)[0]
    np.testing.assert_allclose(beat, median_beat(signal, fs), atol=1e-6)


def test_a_rhythm_strip_in_npy_needs_fs(server, shared_data, tmp_path) -> None:
    from ecgx.training.data.wfdb_import import read_record

    signal, fs, _ = read_record(shared_data / "ptbxl-sample" / "HR06000")
    np.save(tmp_path / "strip.npy", signal)
    r = client(server, "predict", "--ecg", str(tmp_path / "strip.npy"))
    assert_clean_failure(r, "strip.npy", "--fs")
    ok(client(server, "predict", "--ecg", str(tmp_path / "strip.npy"), "--fs", str(fs)))


# ------------------------------------------------------------------------------ errors


def test_unknown_model_is_one_not_found_line(server, beats) -> None:
    r = client(server, "predict", "--ecg", str(beats["one"]), "--model", "nope")
    assert_clean_failure(r, "ecgx: error: NOT_FOUND: ", "nope")
    assert_clean_failure(client(server, "models", "--model", "nope"), "NOT_FOUND")


def test_a_method_the_gate_did_not_pass_is_failed_precondition(server, beats, tmp_path) -> None:
    before = snapshot(tmp_path)
    r = client(
        server, "explain", "--ecg", str(beats["one"]), "--method", FAILED, "--png", str(tmp_path / "x.png")
    )
    assert_clean_failure(r, "ecgx: error: FAILED_PRECONDITION: ", FAILED, before=before, roots=[tmp_path])


def test_server_side_bad_input_is_invalid_argument(server, beats, tmp_path) -> None:
    r = client(server, "explain", "--ecg", str(beats["one"]), "--method", PASSED, "--param", "steps=3")
    assert_clean_failure(r, "ecgx: error: INVALID_ARGUMENT: ", "steps")
    np.save(tmp_path / "uv.npy", beats["x"][0] * 1000)
    r = client(server, "predict", "--ecg", str(tmp_path / "uv.npy"))
    assert_clean_failure(r, "ecgx: error: INVALID_ARGUMENT: ", "MICROVOLT")  # µV sent as mV
    ok(client(server, "predict", "--ecg", str(tmp_path / "uv.npy"), "--units", "uV"))


def test_explain_without_method_lists_what_the_gate_passed(server, beats) -> None:
    r = client(server, "explain", "--ecg", str(beats["one"]))
    assert_clean_failure(r, "--method", PASSED)


def test_an_unreachable_server_is_one_unavailable_line(beats) -> None:
    port = free_port()
    r = run_ecgx(
        "client", "predict", "--server", f"127.0.0.1:{port}", "--ecg", str(beats["one"]), "--timeout", "20"
    )
    assert_clean_failure(r, f"UNAVAILABLE: cannot reach 127.0.0.1:{port}")


def test_bad_local_files_fail_before_any_call(server, beats, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 600), np.float32))
    (tmp_path / "taken.png").write_text("not a picture")
    cases = [
        (("predict", "--ecg", str(tmp_path / "missing.npy")), ("missing.npy", "does not exist")),
        (("predict", "--ecg", str(tmp_path / "notes.txt")), ("notes.txt", "not a NumPy")),
        (("predict", "--ecg", str(tmp_path / "wrong.npy")), ("wrong.npy", "shape (1, 3, 600)")),
        (("predict", "--record", str(tmp_path / "nothing")), ("nothing",)),
        (
            ("explain", "--ecg", str(beats["one"]), "--method", PASSED, "--png", str(tmp_path / "taken.png")),
            ("taken.png",),
        ),
        (
            ("explain", "--ecg", str(beats["one"]), "--method", PASSED, "--png", str(tmp_path / "p.jpg")),
            (".png",),
        ),
        (("predict", "--ecg", str(beats["one"]), "--json", str(tmp_path / "notes.txt")), (".json",)),
    ]
    for args, fragments in cases:
        before = snapshot(tmp_path)
        assert_clean_failure(client(server, *args), *fragments, before=before, roots=[tmp_path])


def test_existing_outputs_need_overwrite(server, beats, tmp_path) -> None:
    js = tmp_path / "p.json"
    ok(client(server, "predict", "--ecg", str(beats["one"]), "--json", str(js)))
    assert_clean_failure(
        client(server, "predict", "--ecg", str(beats["one"]), "--json", str(js)), "--overwrite"
    )
    ok(client(server, "predict", "--ecg", str(beats["one"]), "--json", str(js), "--overwrite"))


def test_the_client_never_imports_torch(server, shared_data, tmp_path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(ECGX_WITHOUT_TORCH)
    record = shared_data / "ptbxl-sample" / "HR06000"
    args = ["client", "explain", "--server", server["address"], "--record", str(record), "--method", PASSED]
    r = subprocess.run(
        [sys.executable, str(script), *args, "--png", str(tmp_path / "x.png"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED False" in r.stdout


# ------------------------------------------------------------------------------ the demo's last step


def _demo_like(gated, demo: Path) -> list[Path]:
    """A demo folder as the steps before the last one leave it: marker, keys, figures, gated packages."""
    from ecgx.demo import MARKER_FILE

    (demo / "figures").mkdir(parents=True)
    (demo / MARKER_FILE).write_text('{"ecgx_demo": 1}\n')
    shutil.copytree(gated["public_pem"].parent, demo / "keys")  # the key that signed the reports
    return [
        make_package(gated, demo / "packages" / "seed-0", 0),
        make_package(gated, demo / "packages" / "seed-1", 1, verdict="fail", serve=[]),  # not promoted
        make_package(gated, demo / "packages" / "seed-2", 2),
    ]


def test_the_demo_ends_with_an_explanation_over_grpc(gated, tmp_path, capsys) -> None:
    from ecgx.demo import GRPC_FIGURE, _serve_and_explain

    demo = tmp_path / "demo"
    packages = _demo_like(gated, demo)
    data = gated["family"]["data"]
    for _ in range(2):  # a second demo run rebuilds the repository of the first
        figure = _serve_and_explain(demo, packages, data, demo / "figures")
        out = capsys.readouterr().out
        assert figure == demo / "figures" / GRPC_FIGURE
        assert figure.read_bytes().startswith(PNG_MAGIC) and figure.stat().st_size > 20_000
        assert f"explanation over gRPC: {PASSED} for " in out and "gate pass" in out and str(figure) in out
        assert "2 version(s) of 'ecg' promoted" in out
        assert sorted(p.name for p in (demo / "repo" / "ecg").iterdir()) == ["1", "2"]
        assert not [p for p in demo.iterdir() if p.name.endswith(".ecgx-tmp")]
    # Something in the way that the demo did not write is refused, never replaced.
    shutil.rmtree(demo / "repo")
    (demo / "repo").mkdir()
    (demo / "repo" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not a model repository"):
        _serve_and_explain(demo, packages, data, demo / "figures")
    assert (demo / "repo" / "mine.txt").exists()


def test_run_demo_ends_with_the_grpc_step(gated, tmp_path, monkeypatch, capsys) -> None:
    """run_demo's wiring, with the minutes-long steps before the last one stubbed out."""
    import ecgx.demo as demo_module

    demo = tmp_path / "demo"
    packages = _demo_like(gated, demo)
    shutil.copytree(gated["family"]["data"], demo / "data")
    for name in ("_check_reusable_data", "_synthesise"):
        monkeypatch.setattr(demo_module, name, lambda *a, **k: None)
    monkeypatch.setattr(demo_module, "_train_and_export", lambda *a, **k: packages)
    monkeypatch.setattr(demo_module, "_draw", lambda *a, **k: [])
    monkeypatch.setattr(demo_module, "format_training_summary", lambda *a, **k: "")
    verdicts = {p: demo_module.PackageVerdict("pass", (PASSED,), 2) for p in packages}
    run = types.SimpleNamespace(report={})  # the gate run: only _write_report and _draw (stubbed) read it
    monkeypatch.setattr(demo_module, "_gate", lambda *a, **k: (verdicts, run))
    monkeypatch.setattr(demo_module, "_write_report", lambda *a, **k: demo / "report" / "report.html")
    demo_module.run_demo(demo, seeds=(0, 1, 2), show_progress=False)
    out = capsys.readouterr().out
    steps = ("experiments report:", "explanation over gRPC: ", "demo finished", "ecgx client explain")
    order = [out.index(line) for line in steps]
    assert order == sorted(order)
    assert (demo / "figures" / demo_module.GRPC_FIGURE).is_file()
    # The closing summary's next command explains the saved record with the method that was served.
    assert f"--ecg {demo / 'records' / 'test-beat.npy'} --method {PASSED}" in out


@pytest.mark.parametrize("action", ["models", "predict", "explain"])
def test_every_client_action_explains_itself(action: str, capsys) -> None:
    from ecgx.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["client", action, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ecgx client" in capsys.readouterr().out
