"""Package integrity: every file a package uses is listed, hashed, inside the folder and verified;
sessions run on the verified bytes; malformed manifests and corrupt graphs are clear errors;
`ecgx gate verify` catches every file added, removed, changed or linked after gating."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecgx.cli import main
from ecgx.core.package_reader import MANIFEST_FILE, WEIGHTS_FILE, PackageError, load_package, sha256_file
from ecgx.core.signing import load_private_key, load_public_key, verify_gate
from ecgx.service.engine import AttributionEngine
from ecgx.training.data.synth import generate
from ecgx.validation.signing import generate_keypair, sign_report

X = generate(2, np.random.default_rng(5)).signals
CPU = ["CPUExecutionProvider"]


@pytest.fixture
def pkg(tiny_package: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny package (tests tamper with it)."""
    return shutil.copytree(tiny_package, tmp_path / "pkg")


def edit_manifest(pkg: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    edit(manifest)
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))


def rehash(pkg: Path, *names: str) -> None:
    """Record the current SHA-256 of ``names`` in the manifest (so only the check under test fails)."""

    def edit(m: dict[str, Any]) -> None:
        for name in names:
            m["files"][name] = {"sha256": sha256_file(pkg / name), "bytes": (pkg / name).stat().st_size}

    edit_manifest(pkg, edit)


def other_forward_graph(seed: int = 0) -> bytes:
    """A valid ONNX model with the forward graph's signature (x -> logits), different weights,
    no external data: what an attacker would swap in."""
    w = np.random.default_rng(seed).normal(0, 0.01, (12 * 600, 9)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "swapped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12, 600])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 9])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load_model(str(path), load_external_data=False)


def set_location(tensor: TensorProto, **fields: str) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    entries.update(fields)
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)


# ---------------------------------------------------------------------------------------- confinement


def test_an_intact_package_loads_and_keeps_the_verified_bytes(pkg: Path) -> None:
    package = load_package(pkg)
    assert package.graph_bytes("forward") == (pkg / "forward.onnx").read_bytes()
    assert package.weights_bytes() == (pkg / WEIGHTS_FILE).read_bytes()
    assert package.manifest_sha256 == sha256_file(pkg / MANIFEST_FILE)
    assert set(package.graph_parameters["forward"]) == set(package.parameter_table())


def test_an_absolute_graph_path_is_refused(pkg: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(pkg / "forward.onnx", outside / "forward.onnx")
    edit_manifest(pkg, lambda m: m["graphs"]["forward"].update(file=str(outside / "forward.onnx")))
    with pytest.raises(PackageError, match=r"field graphs\['forward'\]\.file must be the plain name"):
        AttributionEngine(pkg, providers=CPU)


def test_a_parent_folder_graph_path_is_refused(pkg: Path, tmp_path: Path) -> None:
    shutil.copy(pkg / "forward.onnx", tmp_path / "forward.onnx")
    edit_manifest(pkg, lambda m: m["graphs"]["forward"].update(file="../forward.onnx"))
    with pytest.raises(
        PackageError, match=r"graphs\['forward'\]\.file must be the plain name.*'\.\./forward"
    ):
        load_package(pkg)


def test_an_unlisted_graph_in_the_package_is_refused(pkg: Path) -> None:
    (pkg / "forward2.onnx").write_bytes(other_forward_graph())
    edit_manifest(pkg, lambda m: m["graphs"]["forward"].update(file="forward2.onnx"))
    with pytest.raises(PackageError, match=r"forward2\.onnx is used by the package but not listed in files"):
        load_package(pkg)


@pytest.mark.parametrize("name", ["forward.onnx", WEIGHTS_FILE, MANIFEST_FILE])
def test_a_symlink_leaving_the_folder_is_refused_even_with_the_right_content(
    pkg: Path, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / f"outside-{name}"
    shutil.move(pkg / name, outside)
    os.symlink(outside, pkg / name)  # same bytes, so the hash alone would pass
    with pytest.raises(PackageError, match=f"{name} is a symbolic link"):
        load_package(pkg)


def test_files_entries_outside_the_folder_are_refused_before_anything_is_read(
    pkg: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any package")
    messages = []
    for name in (str(secret), "../secret.txt", "../no-such-file", "sub/forward.onnx", ".."):
        fresh = shutil.copytree(pkg, tmp_path / f"copy{len(messages)}")
        edit_manifest(fresh, lambda m, name=name: m["files"].update({name: {"sha256": "0" * 64}}))
        with pytest.raises(PackageError, match="is not a plain file name in the package folder") as e:
            load_package(fresh)
        messages.append(str(e.value).replace(repr(name), "NAME").replace(str(fresh), "PKG"))
    # An existing and a missing outside file give the same answer: no existence or hash oracle.
    assert len(set(messages[:3])) == 1, messages


def test_a_graph_referencing_another_external_file_is_refused(pkg: Path) -> None:
    (pkg / "other.bin").write_bytes((pkg / WEIGHTS_FILE).read_bytes())
    model = load_graph(pkg / "forward.onnx")
    set_location(model.graph.initializer[0], location="other.bin")
    onnx.save_model(model, str(pkg / "forward.onnx"))
    rehash(pkg, "forward.onnx", "other.bin")  # even listed and hashed, the reference is refused
    with pytest.raises(
        PackageError, match=r"forward.onnx \(graph 'forward'\): initialiser .* reads external"
    ):
        load_package(pkg)


def test_a_parameter_read_from_another_place_of_weights_is_refused(pkg: Path) -> None:
    model = load_graph(pkg / "forward.onnx")
    set_location(model.graph.initializer[0], offset="64")
    onnx.save_model(model, str(pkg / "forward.onnx"))
    rehash(pkg, "forward.onnx")
    with pytest.raises(PackageError, match=r"not from weights\.bin at offset 0"):
        load_package(pkg)


def test_an_unlisted_tensor_with_external_data_is_refused(pkg: Path) -> None:
    model = load_graph(pkg / "forward.onnx")
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "smuggled")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    set_location(tensor, location="/etc/passwd", offset="0", length="16")
    model.graph.node.append(helper.make_node("Constant", [], ["smuggled_out"], value=tensor))
    onnx.save_model(model, str(pkg / "forward.onnx"))
    rehash(pkg, "forward.onnx")
    with pytest.raises(
        PackageError, match=r"node .* attribute 'value' reads external data from '/etc/passwd'"
    ):
        load_package(pkg)


def test_sessions_use_the_verified_bytes_not_the_files_on_disk(pkg: Path) -> None:
    engine = AttributionEngine(pkg, providers=CPU)
    expected = AttributionEngine(load_package(pkg), providers=CPU).logits(X)
    # Swap every file after loading and before any session exists.
    (pkg / "forward.onnx").write_bytes(other_forward_graph())
    weights = bytearray((pkg / WEIGHTS_FILE).read_bytes())
    weights[:64] = np.full(16, 7.0, "<f4").tobytes()
    (pkg / WEIGHTS_FILE).write_bytes(bytes(weights))
    shutil.copy(pkg / "forward.onnx", pkg / "gradient.onnx")
    np.testing.assert_array_equal(engine.logits(X), expected)
    assert np.isfinite(engine.attribute("saliency", X, 0)).all()
    with pytest.raises(PackageError, match="does not match its SHA-256"):
        load_package(pkg)  # a fresh load sees the swap


def test_nothing_is_read_from_disk_after_loading(pkg: Path, tmp_path: Path, monkeypatch) -> None:
    """Sessions built after the package folder is gone still work: ONNX Runtime reads neither
    the package folder nor the working directory (where a bytes-loaded model's relative
    external data would be looked up)."""
    reference = AttributionEngine(pkg, providers=CPU)
    expected = {m: reference.attribute(m, X, 0) for m in ("saliency", "deeplift", "lrp", "gradcam")}
    engine = AttributionEngine(pkg, providers=CPU)
    shutil.copytree(pkg, tmp_path / "moved")
    shutil.rmtree(pkg)
    monkeypatch.chdir(tmp_path / "moved")
    (tmp_path / "moved" / WEIGHTS_FILE).write_bytes(b"\0" * 64)  # a decoy in the working directory
    engine.warm_up()
    for method, result in expected.items():
        np.testing.assert_array_equal(engine.attribute(method, X, 0), result, err_msg=method)


def test_verify_hashes_off_still_confines_files(pkg: Path) -> None:
    edit_manifest(pkg, lambda m: m["graphs"]["forward"].update(file="../forward.onnx"))
    with pytest.raises(PackageError, match="must be the plain name"):
        load_package(pkg, verify_hashes=False)


# ------------------------------------------------------------------------------- manifest structure


def _param(m: dict[str, Any]) -> dict[str, Any]:
    return next(iter(m["parameters"].values()))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(files=list(m["files"])), r"field files must be a JSON object, got list"),
        (lambda m: m.pop("graphs"), r"field graphs is missing"),
        (lambda m: m.update(graphs={}), r"field graphs must not be empty"),
        (lambda m: m["graphs"].pop("forward"), r"field graphs has no 'forward' graph"),
        (lambda m: m["graphs"]["lrp"].pop("file"), r"field graphs\['lrp'\]\.file is missing"),
        (
            lambda m: m["graphs"]["lrp"].update(outputs="attribution"),
            r"graphs\['lrp'\]\.outputs must be a list",
        ),
        (lambda m: m.update(classes=["SR", "AF"]), r"field classes\[0\] must be a JSON object"),
        (lambda m: m.update(classes={"SR": 1}), r"field classes must be a list"),
        (lambda m: m["classes"][2].pop("key"), r"field classes\[2\]\.key is missing"),
        (lambda m: m["classes"][1].update(key=m["classes"][0]["key"]), r"classes\[1\]\.key repeats"),
        (lambda m: m["input"].update(shape=[None, 12]), r"field input\.shape must be \[batch or null"),
        (lambda m: m["input"].update(shape=[None, "12", 600]), r"field input\.shape\[1\] must be an integer"),
        (
            lambda m: m["input"].update(shape=[None, 11, 600]),
            r"input\.shape\[1\] is 11 leads, but leads lists",
        ),
        (lambda m: m.pop("input"), r"field input is missing"),
        (lambda m: m.update(leads="I,II"), r"field leads must be a list"),
        (lambda m: _param(m).update(offset=-4), r"parameters\['.*'\]\.offset must be an integer >= 0"),
        (lambda m: _param(m).update(offset=2), r"offset must be a multiple of 4"),
        (lambda m: _param(m).update(length=_param(m)["length"] + 4), r"\.length is \d+ bytes, but shape"),
        (lambda m: _param(m).update(shape=["8", 12]), r"\.shape\[0\] must be an integer"),
        (lambda m: _param(m).update(offset=1 << 20), r"beyond the end of weights\.bin"),
        (lambda m: m["parameters"].update(x=[0, 4]), r"field parameters\['x'\] must be a JSON object"),
        (lambda m: m["files"]["weights.bin"].update(sha256="abc"), r"sha256 must be 64 lowercase hex"),
        (lambda m: m["files"]["weights.bin"].pop("sha256"), r"files\['weights.bin'\]\.sha256 is missing"),
        (lambda m: m["files"].pop("weights.bin"), r"weights\.bin is used by the package but not listed"),
        (lambda m: m["layers"][0].update(parameters=["nope"]), r"layers\[0\]\.parameters\[0\] names no"),
        (lambda m: m["graphs"]["forward"].update(file=7), r"graphs\['forward'\]\.file must be a non-empty"),
        (lambda m: m["graphs"].pop("gradient"), r"field graphs has no 'gradient' graph"),
        (lambda m: m["input"].pop("sampling_rate_hz"), r"field input\.sampling_rate_hz is missing"),
        (
            lambda m: m["input"].update(sampling_rate_hz=0),
            r"input\.sampling_rate_hz must be a positive number",
        ),
        (lambda m: m["input"].update(sampling_rate_hz="500"), r"sampling_rate_hz must be a positive number"),
        (
            lambda m: m["input"].update(r_peak_sample=600),
            r"r_peak_sample must be null or a sample index in 0\.\.599",
        ),
        (lambda m: m.update(unavailable=["lrp"]), r"field unavailable must be a JSON object, got list"),
        (
            lambda m: m.update(unavailable={"lrp": {"reason": "r", "methods": ["lrp"]}}),
            r"field unavailable\['lrp'\] names a graph the package has under graphs",
        ),
        (
            lambda m: (m["graphs"].pop("lrp"), m.update(unavailable={"lrp": {"methods": ["lrp"]}})),
            r"field unavailable\['lrp'\]\.reason is missing",
        ),
        (
            lambda m: (
                m["graphs"].pop("lrp"),
                m.update(unavailable={"lrp": {"reason": "r", "methods": "lrp"}}),
            ),
            r"field unavailable\['lrp'\]\.methods must be a list",
        ),
        (
            lambda m: (
                m["graphs"].pop("gradient"),
                m.update(unavailable={"gradient": {"reason": "r", "methods": []}}),
            ),
            r"field graphs has no 'gradient' graph",
        ),
    ],
)
def test_malformed_manifests_name_the_file_and_field(pkg: Path, edit, message: str) -> None:
    edit_manifest(pkg, edit)
    with pytest.raises(PackageError, match=message) as e:
        load_package(pkg)
    assert str(pkg) in str(e.value)


def test_a_package_without_an_optional_graph_loads_and_refuses_its_methods(pkg: Path) -> None:
    """The reader accepts a graph listed as unavailable (the export could not build or check it),
    and the engine refuses every method that needs it with the export's reason."""
    from ecgx.core.errors import FailedPrecondition

    def drop_lrp(m: dict[str, Any]) -> None:
        m["graphs"].pop("lrp")
        m["files"].pop("lrp.onnx")
        m["unavailable"] = {"lrp": {"reason": "cannot be built: layer x is odd", "methods": ["lrp"]}}

    edit_manifest(pkg, drop_lrp)
    (pkg / "lrp.onnx").unlink()
    package = load_package(pkg)
    assert package.unavailable == {"lrp": {"reason": "cannot be built: layer x is odd", "methods": ["lrp"]}}
    engine = AttributionEngine(package, providers=CPU)
    with pytest.raises(FailedPrecondition, match=r"'lrp' is unavailable.*cannot be built: layer x is odd"):
        engine.attribute("lrp", X, target=0)
    assert engine.attribute("saliency", X, target=0).shape == X.shape


def test_a_malformed_manifest_is_a_one_line_cli_error(
    pkg: Path, small_synth: Path, tmp_path: Path, capsys
) -> None:
    edit_manifest(pkg, lambda m: m.update(files=list(m["files"])))
    args = ["attribute", "--package", str(pkg), "--data", str(small_synth), "--method", "saliency"]
    assert main([*args, "--count", "1", "--out", str(tmp_path / "a.npy"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecgx: error:") and "field files must be a JSON object" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------- corrupt graphs, weights


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],
        lambda data: np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes(),
        lambda data: b"",
    ],
    ids=["truncated", "random bytes", "empty"],
)
def test_a_corrupt_graph_with_a_matching_hash_is_a_package_error(pkg: Path, corrupt) -> None:
    (pkg / "lrp.onnx").write_bytes(corrupt((pkg / "lrp.onnx").read_bytes()))
    rehash(pkg, "lrp.onnx")
    with pytest.raises(PackageError, match=r"lrp\.onnx \(graph 'lrp'\) is not a valid ONNX model"):
        AttributionEngine(pkg, providers=CPU)


def test_a_graph_onnx_runtime_cannot_load_is_a_package_error_at_session_build(pkg: Path) -> None:
    model = load_graph(pkg / "lrp.onnx")
    model.graph.node[0].op_type = "NoSuchOperator"
    onnx.save_model(model, str(pkg / "lrp.onnx"))
    rehash(pkg, "lrp.onnx")
    engine = AttributionEngine(pkg, providers=CPU)  # loads: the file parses
    engine.attribute("saliency", X, 0)  # other graphs still serve
    with pytest.raises(PackageError, match=r"lrp\.onnx: ONNX Runtime cannot load graph 'lrp'"):
        engine.attribute("lrp", X, 0)


def test_a_graph_whose_signature_differs_from_the_manifest_is_refused(pkg: Path) -> None:
    edit_manifest(pkg, lambda m: m["graphs"]["forward"].update(outputs=["probabilities"]))
    engine = AttributionEngine(pkg, providers=CPU)
    with pytest.raises(PackageError, match=r"forward\.onnx: graph 'forward' has inputs \['x'\] and outputs"):
        engine.logits(X)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_weights_holding_nan_or_inf_are_refused_naming_the_parameter(pkg: Path, value: float) -> None:
    package = load_package(pkg)
    name, entry = list(package.parameter_table().items())[-1]
    weights = bytearray((pkg / WEIGHTS_FILE).read_bytes())
    weights[entry["offset"] : entry["offset"] + 4] = np.array([value], "<f4").tobytes()
    (pkg / WEIGHTS_FILE).write_bytes(bytes(weights))
    rehash(pkg, WEIGHTS_FILE)
    with pytest.raises(PackageError, match=rf"parameter '{name}' holds 1 NaN or infinite value"):
        AttributionEngine(pkg, providers=CPU)


# -------------------------------------------------------------------------------------- gate verify


@pytest.fixture
def gated(pkg: Path, tmp_path: Path) -> dict[str, Path]:
    """The package with a signed report as the gate writes it (every manifest file and the manifest)."""
    private, public = generate_keypair(tmp_path / "keys")
    package = load_package(pkg)
    files = {n: e["sha256"] for n, e in package.manifest["files"].items()}
    files[MANIFEST_FILE] = package.manifest_sha256
    report = {
        "schema": "ecgx-gate-report",
        "schema_version": 1,
        "verdict": "pass",
        "package": {"path": str(pkg), "files": files},
    }
    (pkg / "gate.json").write_text(json.dumps(sign_report(report, load_private_key(private))))
    return {"pkg": pkg, "public": public}


def _add_file(p: Path) -> None:
    (p / "notes.txt").write_text("added after gating")


def _add_folder(p: Path) -> None:
    (p / "extra").mkdir()
    (p / "extra" / "forward.onnx").write_bytes(b"x")


def _add_symlink(p: Path) -> None:
    os.symlink("/etc/hostname", p / "hostname")


def _link_listed_file(p: Path) -> None:
    target = p.parent / "outside-forward.onnx"
    shutil.move(p / "forward.onnx", target)
    os.symlink(target, p / "forward.onnx")


def _change_file(p: Path) -> None:
    data = bytearray((p / "lrp.onnx").read_bytes())
    data[-1] ^= 1
    (p / "lrp.onnx").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_add_file, "notes.txt was added to the package after gating (a file the report does not list)"),
        (_add_folder, "extra was added to the package after gating (a folder)"),
        (_add_symlink, "hostname was added to the package after gating (a symbolic link)"),
        (_link_listed_file, "forward.onnx is a symbolic link"),
        (lambda p: (p / "gradcam.onnx").unlink(), "gradcam.onnx is missing"),
        (_change_file, "lrp.onnx changed after gating"),
    ],
    ids=["added file", "added folder", "added symlink", "listed file made a symlink", "removed", "changed"],
)
def test_gate_verify_catches_every_change_to_the_folder(
    gated: dict[str, Path], tamper, problem: str, capsys
) -> None:
    pkg, public = gated["pkg"], gated["public"]
    assert verify_gate(pkg, load_public_key(public)).ok
    tamper(pkg)
    result = verify_gate(pkg, load_public_key(public))
    assert any(problem in p for p in result.problems), result.problems
    assert main(["gate", "verify", str(pkg), "--public-key", str(public), "-q"]) == 1
    out = capsys.readouterr().out
    assert "does NOT verify" in out and problem in out and "every package file unchanged" not in out


def test_gate_verify_allows_only_the_report_beside_the_listed_files(
    gated: dict[str, Path], tmp_path: Path
) -> None:
    pkg, public = gated["pkg"], gated["public"]
    shutil.copy(pkg / "gate.json", pkg / "gate-copy.json")
    result = verify_gate(pkg, load_public_key(public), pkg / "gate-copy.json")
    assert result.ok, result.problems  # the report being verified, and gate.json, are not package files
    (pkg / "gate.json").unlink()
    result = verify_gate(pkg, load_public_key(public), pkg / "gate-copy.json")
    assert result.ok, result.problems
    outside = shutil.copy(pkg / "gate-copy.json", tmp_path / "elsewhere.json")
    problems = verify_gate(pkg, load_public_key(public), outside).problems
    assert problems == (
        "gate-copy.json was added to the package after gating (a file the report does not list)",
    )


def test_gate_hashes_are_what_the_loader_verified(gated: dict[str, Path]) -> None:
    package = load_package(gated["pkg"])
    for name, data in package.contents.items():
        assert hashlib.sha256(data).hexdigest() == package.manifest["files"][name]["sha256"]
