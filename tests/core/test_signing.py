"""Gate reports are signed, and a gated package that changed afterwards fails verification.

Real keys, real files, real hashes: a package-shaped folder is built in tmp_path for each test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ecgx.core.package_reader import MANIFEST_FILE, sha256_file
from ecgx.core.signing import (
    GATE_REPORT_FILE,
    PUBLIC_KEY_ENV,
    SIGNING_KEY_ENV,
    GateVerification,
    SigningError,
    canonical_bytes,
    key_id,
    load_private_key,
    load_public_key,
    verify_gate,
    verify_signature,
)
from ecgx.validation.signing import generate_keypair, sign_report

PACKAGE_FILES = {
    "weights.bin": bytes(range(256)) * 8,
    "forward.onnx": b"forward graph bytes",
    "gradient.onnx": b"gradient graph bytes",
}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package-shaped folder: files with content and a manifest listing their SHA-256."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, content in PACKAGE_FILES.items():
        (pkg / name).write_bytes(content)
    files = {n: {"sha256": sha256_file(pkg / n)} for n in PACKAGE_FILES}
    manifest = {"format": "ecgx-model-package", "format_version": 1, "files": files}
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))
    return pkg


def gate_report(pkg: Path, **extra: Any) -> dict[str, Any]:
    """A report as the gate writes it: every manifest file and the manifest itself, hashed."""
    names = [*json.loads((pkg / MANIFEST_FILE).read_text())["files"], MANIFEST_FILE]
    return {
        "schema": "ecgx-gate-report",
        "schema_version": 1,
        "verdict": "fail",
        "methods": {"occlusion": {"verdict": "pass", "score": 0.31}, "random": {"score": None}},
        "package": {"path": str(pkg), "files": {n: sha256_file(pkg / n) for n in names}},
        **extra,
    }


def write_signed(pkg: Path, private: Path, report: dict[str, Any] | None = None) -> Path:
    report = gate_report(pkg) if report is None else report
    path = pkg / GATE_REPORT_FILE
    path.write_text(json.dumps(sign_report(report, load_private_key(private)), indent=1))
    return path


def verify(pkg: Path, public: Path) -> GateVerification:
    return verify_gate(pkg, load_public_key(public))


# ---------------------------------------------------------------------------------------------- keys


def test_keygen_writes_a_private_key_only_its_owner_reads(keys, tmp_path: Path) -> None:
    private, public = keys
    assert (private.name, public.name) == ("gate_signing_key.pem", "gate_public_key.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert (
        load_private_key(private).public_key().public_bytes_raw()
        == load_public_key(public).public_bytes_raw()
    )


def test_keygen_refuses_to_replace_keys_unless_told(keys, tmp_path: Path) -> None:
    private, public = keys
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(FileExistsError, match=r"gate_signing_key\.pem.*--overwrite"):
        generate_keypair(tmp_path / "keys")
    assert (private.read_bytes(), public.read_bytes()) == before
    public.unlink()  # half a pair is still a pair to protect
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "keys")


def test_keygen_overwrite_makes_a_new_private_key_only_its_owner_reads(keys, tmp_path: Path) -> None:
    private, _ = keys
    old = private.read_bytes()
    private.chmod(0o644)  # an old key someone made readable must not pass its mode to the new one
    assert generate_keypair(tmp_path / "keys", overwrite=True)[0] == private
    assert private.read_bytes() != old
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_keys_load_from_files_or_environment(keys) -> None:
    private, public = keys
    from_file = load_private_key(private)
    from_env = load_private_key(env={SIGNING_KEY_ENV: private.read_text()})
    assert from_file.private_bytes_raw() == from_env.private_bytes_raw()
    expected = from_file.public_key().public_bytes_raw()
    assert load_public_key(public).public_bytes_raw() == expected
    assert load_public_key(env={PUBLIC_KEY_ENV: public.read_text()}).public_bytes_raw() == expected
    # A file given explicitly wins over the environment.
    other_private, _ = generate_keypair(public.parent.parent / "other")
    env = {SIGNING_KEY_ENV: other_private.read_text()}
    assert load_private_key(private, env=env).private_bytes_raw() == from_file.private_bytes_raw()


def test_missing_keys_say_both_ways_to_give_one() -> None:
    with pytest.raises(SigningError, match="no signing key given") as e:
        load_private_key(env={})
    assert "--signing-key FILE" in str(e.value) and SIGNING_KEY_ENV in str(e.value)
    assert "ecgx gate keygen --out DIR" in str(e.value)
    with pytest.raises(SigningError, match="no public key given") as e:
        load_public_key(env={PUBLIC_KEY_ENV: "  \n"})
    assert "--public-key FILE" in str(e.value) and PUBLIC_KEY_ENV in str(e.value)


def test_non_key_files_are_signing_errors_naming_the_source(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(SigningError, match=f"signing key file {junk} holds no PEM text"):
        load_private_key(junk)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match=f"{broken} is not a readable PEM private key"):
        load_private_key(broken)
    with pytest.raises(SigningError, match=f"public key file {broken} holds a private key"):
        load_public_key(broken)
    with pytest.raises(SigningError, match="does not exist"):
        load_private_key(tmp_path / "none.pem")
    with pytest.raises(SigningError, match="is a folder"):
        load_public_key(tmp_path)


def test_an_environment_variable_holding_a_path_is_explained(keys) -> None:
    private, _ = keys
    with pytest.raises(SigningError, match="not a path to it: to use a file, pass --signing-key FILE"):
        load_private_key(env={SIGNING_KEY_ENV: str(private)})


def test_the_wrong_half_or_kind_of_key_is_refused(keys, tmp_path: Path) -> None:
    private, public = keys
    with pytest.raises(SigningError, match="holds a private key; verification needs the public key"):
        load_public_key(private)
    with pytest.raises(SigningError, match=f"environment variable {PUBLIC_KEY_ENV} holds a private key"):
        load_public_key(env={PUBLIC_KEY_ENV: private.read_text()})
    with pytest.raises(SigningError, match="holds a public key; signing needs the private key"):
        load_private_key(public)
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SigningError, match=r"holds a private key of type \w+, not Ed25519"):
        load_private_key(ec_key)
    ec_public = tmp_path / "ec_public.pem"
    ec_public.write_bytes(
        load_pem(ec_key)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SigningError, match=r"holds a public key of type \w+, not Ed25519"):
        load_public_key(ec_public)


def test_a_gate_public_key_in_another_form_is_named(keys, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from tls_helpers import Authority

    _, public = keys
    key = load_public_key(public)
    forms = {
        "a certificate": (Authority(tmp_path / "ca").pem, "holds an X.509 certificate, not a public key"),
        "OpenSSH": (
            key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
            "holds no PEM text (it is an OpenSSH key",
        ),
        "DER": (
            key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
            "holds no PEM text (it is binary DER",
        ),
        "empty": (b"", "holds no PEM text (it is empty)"),
        "RSA": (
            rsa.generate_private_key(public_exponent=65537, key_size=1024)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "holds a public key of type RSA, not Ed25519",
        ),
    }
    for name, (data, expected) in forms.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        with pytest.raises(SigningError) as e:
            load_public_key(path)
        assert f"public key file {path} {expected}" in str(e.value), name
        assert "\n" not in str(e.value)


def load_pem(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def test_encrypted_private_keys_are_refused_with_advice(tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SigningError, match=r"encrypted private key; .* unencrypted PKCS8"):
        load_private_key(encrypted)


def test_messages_never_hold_key_material(keys) -> None:
    private, _ = keys
    body_lines = [line for line in private.read_text().splitlines() if not line.startswith("-----")]
    # A damaged key (one character changed) in the environment, and a private key given as public.
    damaged = private.read_text().replace(body_lines[0], body_lines[0][:-2] + "!!")
    for load, env in [
        (load_private_key, {SIGNING_KEY_ENV: damaged}),
        (load_public_key, {PUBLIC_KEY_ENV: private.read_text()}),
    ]:
        with pytest.raises(SigningError) as e:
            load(env=env)
        assert not any(line[8:24] in str(e.value) for line in body_lines)


def test_key_id_is_the_sha256_of_the_raw_public_key(keys) -> None:
    public = load_public_key(keys[1])
    assert key_id(public) == hashlib.sha256(public.public_bytes_raw()).hexdigest()


# ------------------------------------------------------------------------------------------ signatures


def test_signing_copies_the_report_and_covers_everything_but_the_signature(keys, package: Path) -> None:
    key = load_private_key(keys[0])
    report = gate_report(package, extra_field={"b": [1, 2.5, None], "a": (True, "é")})
    snapshot = json.dumps(report)
    signed = sign_report(report, key)
    assert json.dumps(report) == snapshot  # the input is untouched
    assert signed["signature"]["algorithm"] == "Ed25519"
    assert signed["signature"]["key_id"] == key_id(key.public_key())
    assert len(base64.b64decode(signed["signature"]["value"])) == 64
    assert list(signed)[:3] == ["schema", "schema_version", "verdict"]  # files stay readable
    assert canonical_bytes(signed) == canonical_bytes(report)
    report["methods"]["occlusion"]["score"] = 0.99  # the caller's later edits do not reach the signed copy
    verify_signature(json.loads(json.dumps(signed)), key.public_key())  # and it survives a JSON round trip
    assert sign_report(signed, key)["signature"]["value"] == signed["signature"]["value"]  # re-signing


def test_canonical_bytes_are_sorted_compact_ascii() -> None:
    report = {"b": 1, "a": {"y": "é", "x": [1.5, None]}, "signature": {"value": "ignored"}}
    assert canonical_bytes(report) == b'{"a":{"x":[1.5,null],"y":"\\u00e9"},"b":1}'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"report\['methods'\]\['occlusion'\]\['score'\] is nan \(NaN or infinite\).*null"),
        (float("inf"), "is inf"),
        (Path("x"), "is a PosixPath, not a JSON value"),
        ({1: "one"}, "non-string key 1"),
    ],
    ids=["nan", "inf", "path", "int key"],
)
def test_reports_that_are_not_plain_json_cannot_be_signed(
    keys, package: Path, value: Any, message: str
) -> None:
    report = gate_report(package)
    report["methods"]["occlusion"]["score"] = value
    with pytest.raises(SigningError, match=message):
        sign_report(report, load_private_key(keys[0]))


def test_verify_signature_names_each_way_a_signature_is_wrong(keys, package: Path) -> None:
    key = load_private_key(keys[0])
    signed = sign_report(gate_report(package), key)
    verify_signature(signed, key.public_key())
    cases: list[tuple[Callable[[dict], None], str]] = [
        (lambda r: r.pop("signature"), "not signed"),
        (lambda r: r.update(signature="abc"), "signature is malformed"),
        (lambda r: r["signature"].update(algorithm="RSA"), "signed with 'RSA'; only Ed25519"),
        (lambda r: r["signature"].update(value="not base64!"), "not valid base64"),
        (lambda r: r["signature"].update(value=base64.b64encode(b"x" * 64).decode()), "does not verify"),
    ]
    for edit, message in cases:
        report = json.loads(json.dumps(signed))
        edit(report)
        with pytest.raises(SigningError, match=message):
            verify_signature(report, key.public_key())


# -------------------------------------------------------------------------------------- verification


def test_signed_package_verifies(package: Path, keys) -> None:
    private, public = keys
    report_path = write_signed(package, private)
    result = verify(package, public)
    assert result.ok and result.problems == ()
    assert (result.report_path, result.package_path) == (report_path, package)
    assert result.verdict == "fail"  # a failed verdict is still authentic: the caller decides


def test_copied_package_verifies_with_its_report(package: Path, keys, tmp_path: Path) -> None:
    private, public = keys
    write_signed(package, private)
    copy = shutil.copytree(package, tmp_path / "copy")
    assert verify(copy, public).ok


def test_report_may_live_outside_the_package(package: Path, keys, tmp_path: Path) -> None:
    private, public = keys
    report = write_signed(package, private).rename(tmp_path / "elsewhere.json")
    result = verify_gate(package, load_public_key(public), report)
    assert result.ok and result.report_path == report


def _change_one_byte(pkg: Path) -> None:
    data = bytearray((pkg / "weights.bin").read_bytes())
    data[100] ^= 0x01
    (pkg / "weights.bin").write_bytes(bytes(data))


def _add_to_manifest(pkg: Path, name: str = "extra.onnx") -> None:
    (pkg / name).write_bytes(b"new graph")
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"sha256": sha256_file(pkg / name)}
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))


def _edit_report(pkg: Path, edit: Callable[[dict], Any]) -> None:
    report = json.loads((pkg / GATE_REPORT_FILE).read_text())
    edit(report)
    (pkg / GATE_REPORT_FILE).write_text(json.dumps(report))


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_change_one_byte, "weights.bin changed after gating (SHA-256 "),
        (lambda p: (p / "forward.onnx").unlink(), "forward.onnx is missing"),
        (_add_to_manifest, "extra.onnx was added to the package after gating"),
        (lambda p: _edit_report(p, lambda r: r.update(verdict="pass")), "modified after signing"),
        (
            lambda p: _edit_report(p, lambda r: r["methods"]["occlusion"].update(score=0.99)),
            "modified after signing",
        ),
        (lambda p: _edit_report(p, lambda r: r.update(note="added")), "modified after signing"),
        (lambda p: _edit_report(p, lambda r: r.pop("signature")), "not signed"),
    ],
    ids=[
        "changed byte",
        "deleted file",
        "added graph",
        "verdict edited",
        "score edited",
        "field added",
        "unsigned",
    ],
)
def test_tampering_fails_verification(package: Path, keys, tamper, problem: str) -> None:
    private, public = keys
    write_signed(package, private)
    tamper(package)
    result = verify(package, public)
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_a_changed_file_is_reported_with_both_short_hashes(package: Path, keys) -> None:
    private, public = keys
    write_signed(package, private)
    recorded = sha256_file(package / "weights.bin")
    _change_one_byte(package)
    (problem,) = verify(package, public).problems
    actual = sha256_file(package / "weights.bin")
    assert problem == f"weights.bin changed after gating (SHA-256 {actual[:12]} != {recorded[:12]})"


def test_every_problem_is_reported_not_just_the_first(package: Path, keys) -> None:
    private, public = keys
    write_signed(package, private)
    _change_one_byte(package)
    (package / "forward.onnx").unlink()
    _edit_report(package, lambda r: r.update(verdict="pass"))
    result = verify(package, public)
    assert result.verdict == "pass"  # the (forged) verdict is still what the report says
    assert len(result.problems) == 3, result.problems
    assert "modified after signing" in result.problems[0]
    assert any("weights.bin changed" in p for p in result.problems)
    assert any("forward.onnx is missing" in p for p in result.problems)


def test_another_key_does_not_verify(package: Path, keys, tmp_path: Path) -> None:
    private, _ = keys
    write_signed(package, private)
    _, other_public = generate_keypair(tmp_path / "other")
    result = verify(package, other_public)
    assert not result.ok
    (problem,) = result.problems
    assert "signed by another key" in problem and key_id(load_public_key(other_public))[:12] in problem


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("schema", "something-else", "not a gate report: its schema is 'something-else'"),
        ("schema_version", 3, "schema version 3 is not supported"),
    ],
)
def test_unknown_schemas_do_not_verify_even_when_signed(
    package: Path, keys, field: str, value: Any, problem: str
) -> None:
    private, public = keys
    write_signed(package, private, gate_report(package, **{field: value}))
    result = verify(package, public)
    assert [p for p in result.problems if problem in p] == list(result.problems), result.problems


def test_files_outside_the_package_are_never_read(package: Path, keys, tmp_path: Path) -> None:
    private, public = keys
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the package")
    report = gate_report(package)
    report["package"]["files"]["../outside.bin"] = sha256_file(outside)
    report["package"]["files"][str(outside)] = sha256_file(outside)
    write_signed(package, private, report)
    problems = verify(package, public).problems
    assert len(problems) == 2 and all("not a file inside the package" in p for p in problems), problems


def test_a_report_that_does_not_cover_the_manifest_does_not_verify(package: Path, keys) -> None:
    private, public = keys
    report = gate_report(package)
    del report["package"]["files"][MANIFEST_FILE]
    write_signed(package, private, report)
    (problem,) = verify(package, public).problems
    assert f"does not record the SHA-256 of {MANIFEST_FILE}" in problem


def test_a_report_without_files_certifies_nothing(package: Path, keys) -> None:
    private, public = keys
    report = gate_report(package)
    del report["package"]
    write_signed(package, private, report)
    (problem,) = verify(package, public).problems
    assert "records no package files" in problem


def test_an_unreadable_manifest_is_a_problem(package: Path, keys) -> None:
    private, public = keys
    write_signed(package, private)
    (package / MANIFEST_FILE).write_text("{broken")
    problems = verify(package, public).problems
    assert any(f"{MANIFEST_FILE} changed after gating" in p for p in problems)
    assert any(f"{MANIFEST_FILE} is not valid JSON" in p for p in problems), problems


def test_a_missing_package_folder_is_one_problem(package: Path, keys, tmp_path: Path) -> None:
    private, public = keys
    report = write_signed(package, private).rename(tmp_path / "gate.json")
    shutil.rmtree(package)
    result = verify_gate(package, load_public_key(public), report)
    assert result.problems == (f"package folder {package} does not exist",)


def test_missing_or_malformed_reports_are_errors(package: Path, keys) -> None:
    _, public = keys
    with pytest.raises(SigningError, match=f"gate report {package / GATE_REPORT_FILE} does not exist"):
        verify(package, public)
    (package / GATE_REPORT_FILE).write_text("{not json")
    with pytest.raises(SigningError, match="is not valid JSON"):
        verify(package, public)
    (package / GATE_REPORT_FILE).write_text("[1, 2]")
    with pytest.raises(SigningError, match="is not a JSON object"):
        verify(package, public)
