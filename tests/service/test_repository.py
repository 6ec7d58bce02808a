"""The model repository (service/repository.py) and `ecgx repo add`, on real trained, gated packages.

One package is gated once per session (a small policy, one cheap method); the reports of the other
seeds are that report with their own package record, signed again: the repository judges the
signed report, not how it came about.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run_ecgx, snapshot
from repo_helpers import make_package

from ecgx.core.errors import FailedPrecondition, NotFound
from ecgx.core.package_reader import load_package
from ecgx.service.repository import ModelRepository, ServedVersion, version_sort_key

MODEL = "ecg"


# ``gated`` (keys, policy and the gate report of seed-0, once per session) is in conftest.py.


def repository(gated: dict, root: Path, **kw: Any) -> ModelRepository:
    kw.setdefault("engine_options", {"threads": 1})
    return ModelRepository(root, [gated["public"]], **kw)


def served(repo: ModelRepository) -> dict[str, bool]:
    return {v.version: v.servable for v in repo.versions(MODEL)}


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture
def repo_root(gated: dict, tmp_path: Path) -> Path:
    """A repository with versions 1 (seed-0) and 2 (seed-1) of MODEL, both gated and passing."""
    root = tmp_path / "repo"
    make_package(gated, root / MODEL / "1", 0)
    make_package(gated, root / MODEL / "2", 1)
    return root


# ------------------------------------------------------------------------------------------ loading


def test_loads_verified_versions_and_serves_the_newest_by_default(gated, repo_root: Path) -> None:
    make_package(gated, repo_root / MODEL / "10", 2)
    (repo_root / ".hidden").mkdir()  # never read
    (repo_root / "notes.txt").write_text("not a model")
    repo = repository(gated, repo_root)
    assert repo.models() == [MODEL]
    assert [v.version for v in repo.versions(MODEL)] == ["1", "2", "10"]  # numeric, not by name
    default = repo.default_version(MODEL)
    assert default is not None and default.version == "10" and repo.get(MODEL).version == "10"
    v = repo.get(MODEL, "1")
    assert isinstance(v, ServedVersion) and v.servable and v.refusal is None
    assert v.package_sha256 == load_package(v.path).manifest_sha256
    assert v.report_bytes == (v.path / "gate.json").read_bytes()
    assert v.report_sha256 == __import__("hashlib").sha256(v.report_bytes).hexdigest()
    assert v.policy_sha256 == gated["report"]["policy"]["sha256"]
    p = v.engine.probabilities(np.zeros((1, 12, 600), np.float32))
    assert p.shape == (1, v.engine.package.n_classes)
    assert len(v.engine._sessions) == len(v.engine.package.manifest["graphs"])  # warmed up at load
    g = v.method_gate("gradcam")
    assert g.servable and g.verdict == "pass" and not g.ungated
    assert {c.check for c in g.checks} >= {"randomisation", "perturbation"}
    assert all(c.summary for c in g.checks)
    lime = v.method_gate("lime")
    assert not lime.servable and lime.verdict == "not checked" and lime.checks == ()
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        repo.get("nope")
    with pytest.raises(NotFound, match="no version '3'"):
        repo.get(MODEL, "3")


def test_the_repository_does_not_import_pytorch() -> None:
    code = "import sys; sys.modules['torch'] = None; import ecgx.service.repository; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_version_order_integers_first_then_names() -> None:
    assert sorted(["b", "10", "2", "a", "1"], key=version_sort_key) == ["1", "2", "10", "a", "b"]


def flip_weight_byte(folder: Path) -> str:
    data = bytearray((folder / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "weights.bin").write_bytes(bytes(data))
    return "weights.bin"


def replace_graph(folder: Path) -> str:
    # The graphs of all seeds are the same (weights live in weights.bin): another graph it is.
    shutil.copyfile(folder / "gradient.onnx", folder / "forward.onnx")
    return "forward.onnx"


def add_file(folder: Path) -> str:
    (folder / "extra.onnx").write_bytes(b"not gated")
    return "extra.onnx"


@pytest.mark.parametrize("tamper", ["weights", "graph", "added"])
def test_a_tampered_version_is_refused_and_the_others_keep_serving(
    gated, repo_root: Path, tamper, caplog
) -> None:
    folder = repo_root / MODEL / "2"
    if tamper == "weights":
        name = flip_weight_byte(folder)
    elif tamper == "graph":
        name = replace_graph(folder)
    else:
        name = add_file(folder)
    with caplog.at_level("INFO", logger="ecgx.service.repository"):
        repo = repository(gated, repo_root)
    assert served(repo) == {"1": True, "2": False}
    v2 = repo.versions(MODEL)[1]
    assert name in v2.refusal and v2.engine is None
    assert f"model {MODEL} version 2 does not serve: {v2.refusal}" in caplog.text  # the reason is logged
    assert repo.get(MODEL).version == "1"  # the default falls back to the newest that serves
    with pytest.raises(FailedPrecondition, match=name):
        repo.get(MODEL, "2")


def test_tampering_after_load_stops_serving_at_the_next_reload(gated, repo_root: Path) -> None:
    repo = repository(gated, repo_root)
    assert served(repo) == {"1": True, "2": True}
    flip_weight_byte(repo_root / MODEL / "2")
    repo.reload()
    assert served(repo) == {"1": True, "2": False}
    assert "weights.bin" in repo.versions(MODEL)[1].refusal


def test_a_report_signed_by_an_untrusted_key_is_refused(gated, repo_root: Path) -> None:
    make_package(gated, repo_root / MODEL / "3", 2, key=gated["other_private"])
    repo = repository(gated, repo_root)
    v3 = repo.versions(MODEL)[2]
    assert not v3.servable and "not trusted" in v3.refusal and v3.report is None
    # Any one of the trusted keys may sign.
    both = ModelRepository(repo_root, [gated["other_public"], gated["public"]], engine_options={"threads": 1})
    assert served(both) == {"1": True, "2": True, "3": True}


def test_an_edited_report_does_not_verify(gated, repo_root: Path) -> None:
    path = repo_root / MODEL / "2" / "gate.json"
    report = json.loads(path.read_text())
    report["serve"] = [*report["serve"], "lime"]
    path.write_text(json.dumps(report))
    repo = repository(gated, repo_root)
    assert "does not verify" in repo.versions(MODEL)[1].refusal


def test_a_failed_gate_never_serves_except_in_research_mode(gated, repo_root: Path) -> None:
    make_package(gated, repo_root / MODEL / "3", 2, verdict="fail", serve=[], headline="FAIL under policy x")
    repo = repository(gated, repo_root)
    v3 = repo.versions(MODEL)[2]
    assert not v3.servable and "gate failed" in v3.refusal and v3.report["verdict"] == "fail"
    assert not v3.method_gate("gradcam").servable and v3.method_gate("gradcam").verdict == "pass"
    assert repo.get(MODEL).version == "2"
    research = repository(gated, repo_root, allow_ungated=True)
    v3 = research.get(MODEL, "3")
    assert v3.servable and v3.ungated
    assert v3.method_gate("gradcam").servable and v3.method_gate("gradcam").ungated
    assert research.get(MODEL).version == "2"  # the default is still the newest that passed
    lime = research.get(MODEL, "2").method_gate("lime")
    assert lime.servable and lime.ungated and lime.verdict == "not checked"


def test_only_reports_under_an_allowed_policy_serve(gated, repo_root: Path) -> None:
    make_package(gated, repo_root / MODEL / "3", 2, policy={**gated["report"]["policy"], "sha256": "0" * 64})
    allowed = [gated["report"]["policy"]["sha256"]]
    repo = repository(gated, repo_root, allowed_policies=allowed)
    assert served(repo) == {"1": True, "2": True, "3": False}
    assert "allow-list" in repo.versions(MODEL)[2].refusal
    assert served(repository(gated, repo_root, allowed_policies=["f" * 64])) == {
        "1": False,
        "2": False,
        "3": False,
    }


def test_an_expired_version_stops_serving_at_the_next_reload(gated, repo_root: Path, monkeypatch) -> None:
    import ecgx.service.repository as repository_module

    now = datetime.now(UTC)
    soon = now + timedelta(hours=1)
    make_package(gated, repo_root / MODEL / "3", 2, expires=soon.isoformat())
    past = (now - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    make_package(gated, repo_root / MODEL / "4", 2, expires=past)
    make_package(gated, repo_root / MODEL / "5", 2, expires="2030-01-01T00:00:00")  # no offset
    repo = repository(gated, repo_root)
    assert served(repo) == {"1": True, "2": True, "3": True, "4": False, "5": False}
    assert "expired" in repo.versions(MODEL)[3].refusal
    assert "UTC offset" in repo.versions(MODEL)[4].refusal
    assert repo.get(MODEL, "3").expires == soon and repo.get(MODEL).version == "3"
    monkeypatch.setattr(repository_module, "_now", lambda: soon + timedelta(seconds=1))
    repo.reload()
    assert served(repo)["3"] is False and "expired" in repo.versions(MODEL)[2].refusal
    assert repo.get(MODEL).version == "2"


def test_a_revoked_version_stops_serving_and_is_not_rebuilt(gated, repo_root: Path) -> None:
    repo = repository(gated, repo_root)
    engine = repo.get(MODEL, "2").engine
    (repo_root / MODEL / "2" / "REVOKED").write_text("label leak found in audit 2026-11\n")
    repo.reload()
    v2 = repo.versions(MODEL)[1]
    assert not v2.servable and v2.refusal == "revoked: label leak found in audit 2026-11"
    assert repo.get(MODEL).version == "1"
    (repo_root / MODEL / "2" / "REVOKED").unlink()
    repo.reload()
    assert repo.get(MODEL).version == "2" and repo.get(MODEL, "2").engine is engine  # not rebuilt
    assert repo.get(MODEL, "1").engine is not None


# ------------------------------------------------------------------------------------- hot reload


def test_new_and_removed_versions_are_picked_up_without_a_restart(gated, repo_root: Path) -> None:
    repo = repository(gated, repo_root)
    engine_1 = repo.get(MODEL, "1").engine
    repo.start_watching(interval_s=0.2)
    try:
        # Promotion writes into a hidden sibling and renames it into place.
        tmp = make_package(gated, repo_root / MODEL / ".3.partial", 2)
        os.rename(tmp, repo_root / MODEL / "3")
        wait_for(lambda: repo.default_version(MODEL).version == "3")
        shutil.rmtree(repo_root / MODEL / "2")
        wait_for(lambda: [v.version for v in repo.versions(MODEL)] == ["1", "3"])
        make_package(gated, repo_root / "other" / "1", 0)
        wait_for(lambda: repo.models() == [MODEL, "other"])
        assert repo.get(MODEL, "1").engine is engine_1  # unchanged versions are not rebuilt
    finally:
        repo.stop()


def test_a_half_copied_version_is_not_loaded_until_complete(gated, repo_root: Path, tmp_path: Path) -> None:
    src = make_package(gated, tmp_path / "src", 2)
    repo = repository(gated, repo_root)
    dest = repo_root / MODEL / "3"
    dest.mkdir()
    names = sorted(p.name for p in src.iterdir())
    for name in names:
        if name not in ("gate.json", "weights.bin"):
            shutil.copyfile(src / name, dest / name)
    repo.reload()
    assert served(repo) == {"1": True, "2": True, "3": False}
    assert "gate.json is missing" in repo.versions(MODEL)[2].refusal
    weights = (src / "weights.bin").read_bytes()
    (dest / "weights.bin").write_bytes(weights[: len(weights) // 2])
    shutil.copyfile(src / "gate.json", dest / "gate.json")
    repo.reload()
    assert served(repo)["3"] is False and repo.default_version(MODEL).version == "2"
    (dest / "weights.bin").write_bytes(weights)  # the copy completes: retried, not marked bad for good
    repo.reload()
    assert served(repo)["3"] is True and repo.default_version(MODEL).version == "3"


def test_a_failed_reload_keeps_the_serving_versions(gated, repo_root: Path, tmp_path: Path) -> None:
    repo = repository(gated, repo_root)
    before = repo.versions(MODEL)
    os.rename(repo_root, tmp_path / "moved")
    try:
        repo.reload()
        assert repo.last_error and "serving versions stay" in repo.last_error
        assert repo.versions(MODEL) == before and repo.get(MODEL).version == "2"
    finally:
        os.rename(tmp_path / "moved", repo_root)
    generation = repo.generation
    repo.reload()
    assert repo.last_error is None and served(repo) == {"1": True, "2": True}
    assert repo.generation == generation + 1


def test_readers_see_whole_snapshots_during_reloads(gated, repo_root: Path) -> None:
    repo = repository(gated, repo_root)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                v = repo.get(MODEL)
                assert v.servable and v.engine is not None
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        repo.reload()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


# ---------------------------------------------------------------------------------- ecgx repo add


def repo_add(gated: dict, pkg: Path, root: Path, *extra: str, key: str = "public_pem"):
    return run_ecgx("repo", "add", str(pkg), "--repo", str(root), "--model", MODEL,
                    "--public-key", str(gated[key]), *extra)  # fmt: skip


def test_repo_add_promotes_a_verified_passing_package(gated, tmp_path: Path) -> None:
    pkg = make_package(gated, tmp_path / "pkg", 0)
    root = tmp_path / "repo"
    r = repo_add(gated, pkg, root)
    assert r.returncode == 0, r.stderr
    r = repo_add(gated, pkg, root, "--allowed-policy", gated["report"]["policy"]["sha256"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (root / MODEL).iterdir()) == ["1", "2"]  # no temporary left
    repo = repository(gated, root)
    assert served(repo) == {"1": True, "2": True}
    assert repo.get(MODEL, "1").package_sha256 == load_package(pkg).manifest_sha256


def test_repo_add_refuses_a_failed_or_unverified_gate_with_exit_1(gated, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    failed = make_package(gated, tmp_path / "failed", 0, verdict="fail", serve=[], headline="FAIL: x")
    r = repo_add(gated, failed, root)
    assert r.returncode == 1 and "gate failed" in r.stderr
    untrusted = make_package(gated, tmp_path / "untrusted", 0, key=gated["other_private"])
    r = repo_add(gated, untrusted, root)
    assert r.returncode == 1 and "not trusted" in r.stderr
    tampered = make_package(gated, tmp_path / "tampered", 0)
    flip_weight_byte(tampered)
    r = repo_add(gated, tampered, root)
    assert r.returncode == 1 and "weights.bin" in r.stderr
    ok = make_package(gated, tmp_path / "ok", 0)
    r = repo_add(gated, ok, root, "--allowed-policy", "0" * 64)
    assert r.returncode == 1 and "allow-list" in r.stderr
    (ok / "REVOKED").write_text("recalled\n")
    r = repo_add(gated, ok, root)
    assert r.returncode == 1 and "revoked: recalled" in r.stderr
    assert not (root / MODEL).exists() or not any((root / MODEL).iterdir())


def test_repo_add_bad_input_exits_2_and_never_overwrites(gated, tmp_path: Path) -> None:
    from cli_helpers import assert_clean_failure

    pkg = make_package(gated, tmp_path / "pkg", 0)
    root = tmp_path / "repo"
    assert repo_add(gated, pkg, root, "--version", "7").returncode == 0
    before = snapshot(root)
    other = make_package(gated, tmp_path / "other", 1)
    r = repo_add(gated, other, root, "--version", "7")
    assert_clean_failure(r, "already exists", before=before, roots=[root])
    ungated = shutil.copytree(gated["family"]["seed-0"], tmp_path / "ungated")
    r = repo_add(gated, ungated, root)
    assert_clean_failure(r, "no gate.json", before=before, roots=[root])
    r = repo_add(gated, tmp_path / "missing", root)
    assert_clean_failure(r, "missing", before=before, roots=[root])
    r = run_ecgx("repo", "add", str(pkg), "--repo", str(root), "--model", "../x",
                 "--public-key", str(gated["public_pem"]))  # fmt: skip
    assert_clean_failure(r, "not a plain name", before=before, roots=[root])
    r = run_ecgx("repo", "add", str(pkg), "--repo", str(root), "--model", MODEL,
                 "--public-key", str(tmp_path / "nokey.pem"))  # fmt: skip
    assert_clean_failure(r, "nokey.pem", before=before, roots=[root])
    r = repo_add(gated, other, root, "--allowed-policy", "abc")
    assert_clean_failure(r, "not a SHA-256", before=before, roots=[root])
    assert repo_add(gated, other, root).returncode == 0  # the next integer after 7
    assert sorted(p.name for p in (root / MODEL).iterdir()) == ["7", "8"]
