"""Gate reports are signed, and a gated package that changed afterwards fails verification."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from service.package import MANIFEST_FILE, sha256_file
from validation.signing import (
    PUBLIC_KEY_ENV,
    SIGNING_KEY_ENV,
    SigningError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_report,
    verify_gate,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package-shaped folder: files with content and a manifest listing their SHA-256."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (pkg / "forward.onnx").write_bytes(b"graph bytes")
    files = {n: {"sha256": sha256_file(pkg / n)} for n in ("weights.bin", "forward.onnx")}
    (pkg / MANIFEST_FILE).write_text(json.dumps({"files": files}))
    return pkg


def signed_report(pkg: Path, private: Path, **extra) -> Path:
    names = [*json.loads((pkg / MANIFEST_FILE).read_text())["files"], MANIFEST_FILE]
    report = {
        "schema": "ecgx-gate-report",
        "schema_version": 1,
        "verdict": "fail",
        "methods": {"occlusion": {"verdict": "pass", "score": 0.31}},
        "package": {"path": str(pkg), "files": {n: sha256_file(pkg / n) for n in names}},
        **extra,
    }
    path = pkg / "gate.json"
    path.write_text(json.dumps(sign_report(report, load_private_key(private))))
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads(keys, tmp_path: Path) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_keypair(tmp_path / "keys")
    assert generate_keypair(tmp_path / "keys", overwrite=True)[0].read_bytes() != b""


def test_keys_load_from_files_or_environment(keys) -> None:
    private, public = keys
    from_file = load_private_key(private)
    from_env = load_private_key(env={SIGNING_KEY_ENV: private.read_text()})
    assert from_file.private_bytes_raw() == from_env.private_bytes_raw()
    assert load_public_key(env={PUBLIC_KEY_ENV: public.read_text()}).public_bytes_raw() == (
        from_file.public_key().public_bytes_raw()
    )


def test_missing_or_wrong_keys_say_what_to_do(keys, tmp_path: Path) -> None:
    private, _ = keys
    with pytest.raises(
        SigningError, match=f"--signing-key FILE or set the environment variable {SIGNING_KEY_ENV}"
    ):
        load_private_key(env={})
    with pytest.raises(SigningError, match=PUBLIC_KEY_ENV):
        load_public_key(env={})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(SigningError, match=f"file {junk} does not hold"):
        load_private_key(junk)
    with pytest.raises(SigningError, match="holds a private key; verification needs the public key"):
        load_public_key(private)
    with pytest.raises(SigningError, match="does not exist"):
        load_private_key(tmp_path / "none.pem")


def test_signed_package_verifies(package: Path, keys) -> None:
    private, public = keys
    signed_report(package, private)
    result = verify_gate(package, load_public_key(public))
    assert result.ok and result.problems == ()
    assert result.verdict == "fail"  # a failed verdict is still authentic: the caller decides


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (
            lambda p: (p / "weights.bin").write_bytes(b"\x01" + (p / "weights.bin").read_bytes()[1:]),
            "weights.bin changed",
        ),
        (lambda p: (p / "forward.onnx").unlink(), "forward.onnx is missing"),
        (lambda p: _add_to_manifest(p, "extra.onnx"), "extra.onnx was added"),
        (lambda p: _edit_report(p, verdict="pass"), "modified after signing"),
        (lambda p: _edit_report(p, score=0.99), "modified after signing"),
        (lambda p: _edit_report(p, unsign=True), "not signed"),
    ],
    ids=["changed file", "deleted file", "added graph", "verdict edited", "score edited", "unsigned"],
)
def test_tampering_fails_verification(package: Path, keys, tamper, problem: str) -> None:
    private, public = keys
    signed_report(package, private)
    tamper(package)
    result = verify_gate(package, load_public_key(public))
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def _add_to_manifest(pkg: Path, name: str) -> None:
    (pkg / name).write_bytes(b"new graph")
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"sha256": sha256_file(pkg / name)}
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))


def _edit_report(pkg: Path, verdict: str | None = None, score: float | None = None, unsign: bool = False):
    report = json.loads((pkg / "gate.json").read_text())
    if verdict:
        report["verdict"] = verdict
    if score:
        report["methods"]["occlusion"]["score"] = score
    if unsign:
        del report["signature"]
    (pkg / "gate.json").write_text(json.dumps(report))


def test_another_key_does_not_verify(package: Path, keys, tmp_path: Path) -> None:
    private, _ = keys
    signed_report(package, private)
    _, other_public = generate_keypair(tmp_path / "other")
    result = verify_gate(package, load_public_key(other_public))
    assert not result.ok and any("another key" in p for p in result.problems)


def test_copied_package_verifies_with_its_report(package: Path, keys, tmp_path: Path) -> None:
    private, public = keys
    signed_report(package, private)
    copy = shutil.copytree(package, tmp_path / "copy")
    assert verify_gate(copy, load_public_key(public)).ok


def test_bad_reports_are_errors(package: Path, keys) -> None:
    private, public = keys
    with pytest.raises(SigningError, match="does not exist"):
        verify_gate(package, load_public_key(public))
    (package / "gate.json").write_text("{not json")
    with pytest.raises(SigningError, match="not valid JSON"):
        verify_gate(package, load_public_key(public))
    with pytest.raises(SigningError, match="NaN"):
        sign_report({"score": float("nan")}, load_private_key(private))
